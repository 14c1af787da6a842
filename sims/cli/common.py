"""Shared CLI plumbing: the project's errors become one line and exit status 2 (set SIMS_DEBUG=1 for
the traceback); any other exception is a bug and shows its traceback."""
from __future__ import annotations

import functools
import logging
import os
import sys
import warnings

from sims.errors import PreemptedError, SimsError
from sims.utils import quiet_lightning

EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 after a checkpoint; re-run (requeue) to resume


def user_errors(prog: str):
    """Decorate a ``main(argv)`` so that a :class:`~sims.errors.SimsError` prints one line
    ``PROG: error: ...`` and exits with status 2 (75 for a pre-emption), instead of a traceback."""
    def wrap(fn):
        @functools.wraps(fn)
        def main(argv=None):
            logging.basicConfig(level=logging.INFO, format="[sims] %(message)s")
            if not os.environ.get("SIMS_DEBUG"):
                warnings.filterwarnings("ignore", module="lightning")
                warnings.filterwarnings("ignore", category=UserWarning)
                quiet_lightning()
            try:
                return fn(argv) or 0
            except SimsError as exc:
                if os.environ.get("SIMS_DEBUG"):
                    raise
                msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                print(f"{prog}: error: {msg}", file=sys.stderr, flush=True)
                return EXIT_PREEMPTED if isinstance(exc, PreemptedError) else EXIT_USER_ERROR
        return main
    return wrap
