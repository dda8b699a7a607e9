"""The one place where failures become a one-line message and an exit code.

Exit codes: 0 ok; 1 other wnconvert error; 2 bad input (arguments, files, names); 3 parity failed;
4 weight outside [-1, 1] where unit range was required; 5 training stopped; 6 export failed;
70 internal error (a bug: set WNCONVERT_DEBUG=1 for the traceback); 130 interrupted.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback

import typer
from typer.core import TyperGroup

from wnconvert.convert.errors import WnError

INTERNAL = 70
INTERRUPTED = 130


def fail(message: str, code: int) -> None:
    # One line: errors re-raised by DataLoader workers carry the worker's traceback after it.
    first = (message.strip().splitlines() or ["unknown error"])[0]
    print(f"wnconvert: error: {first}", file=sys.stderr)
    raise SystemExit(code)


def handle_errors(fn):
    """Wrap a command so that no traceback reaches the user."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except WnError as e:
            fail(str(e), e.exit_code)
        except KeyboardInterrupt as e:
            fail("interrupted by SIGTERM" if str(e) == "SIGTERM" else "interrupted", INTERRUPTED)
        except PermissionError as e:
            fail(f"permission denied: {e.filename or e}", 2)
        except OSError as e:
            where = f" ({e.filename})" if getattr(e, "filename", None) else ""
            fail(f"{e.strerror or e}{where}", 2)
        except (SystemExit, GeneratorExit):
            raise
        except Exception as e:  # a bug: say so in one line, traceback on request
            if os.environ.get("WNCONVERT_DEBUG"):
                traceback.print_exc()
            first = (str(e).strip().splitlines() or [""])[0][:300]
            fail(f"internal error: {type(e).__name__}: {first} (set WNCONVERT_DEBUG=1 for details)",
                 INTERNAL)

    return wrapper


class OneLineErrors(TyperGroup):
    """The command group: a parser error (an unknown option, a value outside a choice, a missing
    argument) is one line on stderr and exit 2, like every other bad input; ``message`` turns
    the parser's wording into the library's."""

    message = staticmethod(lambda param_name, text: text)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        argv = sys.argv[1:] if args is None else list(args)
        if not standalone_mode or not argv:  # no arguments: the help, as Typer shows it
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as e:
            param = getattr(e, "param", None)
            fail(self.message(getattr(param, "name", None), getattr(e, "message", None) or e.format_message()),
                 getattr(e, "exit_code", 2))
        except typer.Abort as e:
            fail("interrupted by SIGTERM" if str(e.__cause__) == "SIGTERM" else "interrupted", INTERRUPTED)
        raise SystemExit(code if isinstance(code, int) else 0)
