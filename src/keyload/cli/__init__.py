"""The command line: parses, calls, prints. Errors map to exit codes in one place.

Run as the ``keyload`` command, a Ctrl-C that arrives while the command's modules are
still being imported ends it the way a later one does (``keyload: interrupted``, exit
130) instead of with a traceback: :func:`keyload.cli.main.main` hands SIGINT back to
Python's own handler once it starts.
"""

import os
import signal
import sys
from types import FrameType


def _interrupted_early(signum: int, frame: FrameType | None) -> None:
    os.write(2, b"keyload: interrupted\n")
    os._exit(130)


if os.path.basename(sys.argv[0] if sys.argv else "") == "keyload" and \
        signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _interrupted_early)
