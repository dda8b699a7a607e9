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
        except KeyboardInterrupt:
            fail("interrupted", INTERRUPTED)
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


def run_app(app) -> None:
    """Run the Typer app so that a usage error (unknown option, bad value, missing argument, an
    unusable ``--config``) is one line on stderr and exit 2, like every other bad input."""
    import typer

    try:
        result = app(standalone_mode=False)
    except typer.TyperException as e:  # Click's usage errors
        code = getattr(e, "exit_code", 2) or 2
        if not e.format_message().strip():  # no arguments at all: the help was the message
            raise SystemExit(code) from None
        fail(e.format_message(), code)
    except typer.Abort:
        fail("interrupted", INTERRUPTED)
    if isinstance(result, int) and result:  # --help and friends return their exit code
        raise SystemExit(result)
