"""``sims-train CONFIG [key=value ...] [--force-unlock]``: train a base model (and, with
``sims.enabled=true``, the SIMS auxiliary model and its evaluation), or run a generation loop
(``loop.enabled=true``).

The whole config is checked before any work (:func:`sims.cli.validate.validate`). One process, or
many: ``train.devices=N`` (Lightning's launcher), ``torchrun --nproc_per_node=N sims-train ...`` or
``srun sims-train ...`` (SLURM); every stage runs on all processes. Re-running the same command
resumes where it stopped; a different config in the same run_dir is refused; a run directory is
locked while a job works in it.
"""
from __future__ import annotations

import argparse
import sys

from sims.cli.common import user_errors
from sims.config import load_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sims-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config (e.g. configs/digits.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. run_dir=runs/a train.lr=2e-4")
    p.add_argument("--force-unlock", action="store_true",
                   help="take over the run directory's lock even if another host's job seems to hold it")
    return p


@user_errors("sims-train")
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    from sims.cli.validate import validate

    validate(cfg)
    from pathlib import Path

    from sims.dist import init_distributed
    from sims.stages.rundir import lock_run_dir

    ctx = init_distributed(cfg.train.accelerator, int(cfg.train.devices), int(cfg.train.num_nodes))
    lock = lock_run_dir(ctx, Path(cfg.run_dir), force=args.force_unlock)
    try:
        if cfg.loop.enabled:
            from sims.loop import run_loop

            run_loop(cfg, cfg.run_dir, ctx=ctx)
        else:
            from sims.stages.pipeline import run_training
            from sims.stages.rundir import prepare_run_dir

            run_training(ctx, cfg, prepare_run_dir(ctx, cfg))
    finally:
        if lock is not None:
            lock.release()
    from sims.dist import shutdown_distributed

    shutdown_distributed()  # only after success: after an error the other ranks may never reach a barrier
    return 0


if __name__ == "__main__":
    sys.exit(main())
