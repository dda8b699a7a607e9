"""``wnconvert`` command line. When this process *is* the command (the ``wnconvert`` script or
``python -m wnconvert.cli``), SIGTERM is turned into the Ctrl-C path from the first import on, so a
SIGTERM during start-up (imports take seconds on a busy machine) ends with one line and exit 130,
not a silent 143; training installs its own handler later (models/train.py)."""

import os as _os
import signal as _signal
import sys as _sys
import threading as _threading


def _terminate(signum, frame):
    """From ``main()`` on: the Ctrl-C path (cli/errors.py), which lets ``finally`` blocks run."""
    raise KeyboardInterrupt("SIGTERM")


def _terminate_importing(signum, frame):
    """While the command's modules import (nothing is written yet): one line, exit 130 now."""
    _os.write(2, b"wnconvert: error: interrupted by SIGTERM\n")
    _os._exit(130)


def _is_the_command() -> bool:
    argv0 = _os.path.basename(_sys.argv[0]) if _sys.argv else ""
    return argv0 == "wnconvert" or _sys.argv[0:1] == ["-m"] or argv0 == "__main__.py"


if _is_the_command() and _threading.current_thread() is _threading.main_thread() \
        and _signal.getsignal(_signal.SIGTERM) is _signal.SIG_DFL:
    _signal.signal(_signal.SIGTERM, _terminate_importing)
