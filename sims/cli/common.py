"""Shared CLI plumbing: one-line errors a user can act on (set SIMS_DEBUG=1 for the traceback)."""
from __future__ import annotations

import functools
import logging
import os
import sys
import warnings


def quiet_lightning() -> None:
    """Keep Lightning's INFO chatter (GPU available, tips) out of the output, if it is imported.

    Lightning sets its loggers' levels when imported, so callers call this again after importing it.
    """
    if "lightning" in sys.modules:
        for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
            logging.getLogger(name).setLevel(logging.WARNING)


def user_errors(prog: str):
    """Decorate a ``main`` so expected failures (bad config, data, weights, NaN loss) print one line
    ``PROG: error: ...`` and exit with status 2 instead of a traceback."""
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
            except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError, RuntimeError, ImportError,
                    NotImplementedError) as exc:
                if os.environ.get("SIMS_DEBUG"):
                    raise
                msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                if type(exc) is RuntimeError:  # not one of ours: say how to see where it came from
                    msg += " (set SIMS_DEBUG=1 for the traceback)"
                print(f"{prog}: error: {msg}", file=sys.stderr)
                return 2
        return main
    return wrap
