"""``sims-train CONFIG [key=value ...]``: train a base model (and, with ``sims.enabled=true``, the SIMS
auxiliary model and its evaluation), or run a generation loop (``loop.enabled=true``).

Re-running the same command resumes where it stopped; a different config in the same run_dir
is refused.
"""
from __future__ import annotations

import argparse
import sys
import time

from omegaconf import OmegaConf

from sims.cli.common import user_errors
from sims.config import ConfigError, load_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sims-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config (e.g. configs/digits.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. run_dir=runs/a train.lr=2e-4")
    return p


@user_errors("sims-train")
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if OmegaConf.is_missing(cfg, "run_dir"):
        raise ConfigError("no run directory: add run_dir=PATH")
    if cfg.loop.enabled:
        from sims.loop import run_loop

        run_loop(cfg, cfg.run_dir)
        return 0
    from sims.data import load_real_dataset
    from sims.pipeline import prepare_run_dir, train_base

    start = time.time()
    run_dir = prepare_run_dir(cfg)
    dataset = load_real_dataset(cfg.data)
    weights = train_base(cfg, run_dir, dataset)
    print(f"[sims] base model: {weights} ({(time.time() - start) / 60:.1f} min)", flush=True)
    if cfg.sims.enabled:
        from sims.sims_pipeline import run_sims

        report = run_sims(cfg, run_dir, dataset, weights)
        if report is not None:
            print(f"[sims] report: {report} ({(time.time() - start) / 60:.1f} min in all)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
