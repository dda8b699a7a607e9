"""Exceptions with a one-line, user-facing message and an exit code.

Library code raises these; ``wnconvert.cli.errors`` turns them into one line on stderr and the exit
code below. Anything else escaping to the CLI is a bug and is reported as such.
"""


class WnError(Exception):
    """Base class: ``str(err)`` is the one-line message shown to the user."""

    exit_code = 1


class UserInputError(WnError):
    """Bad arguments, unknown names, unreadable or mismatched files."""

    exit_code = 2


class ParityError(WnError):
    """A folded or exported model does not compute what the reference computes."""

    exit_code = 3


class RangeError(WnError):
    """A stored weight lies outside [-1, 1] where the user required unit range."""

    exit_code = 4


class TrainingError(WnError):
    """Training cannot go on (non-finite loss)."""

    exit_code = 5


class Interrupted(WnError):
    """Stopped by SIGINT (Ctrl-C) or SIGTERM; the message says what was saved."""

    exit_code = 130
