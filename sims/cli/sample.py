"""``sims-sample RUN_DIR --seeds 0-999 --out DIR [--guidance OMEGA] [--class K] [--steps N] [--grid FILE] [--devices N]``

Writes one ``{seed:06d}.png`` per seed (``.npy`` for vector data); each is a function of (weights,
seed, sampler settings), the same with 1 or N processes. ``--guidance ω > 0`` samples with SIMS,
D = (1+ω)·D_base − ω·D_aux, using the run's auxiliary model. Unless ``--ema`` / ``--aux-ema`` /
``--aux-snapshot`` say otherwise, the EMA lengths and the auxiliary snapshot are those the run's
evaluation selected (``eval/report.json``). RUN_DIR may be an imported EDM network (``sims-import``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sims.cli.common import user_errors


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sims-sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a sims-train (or sims-import) run directory")
    p.add_argument("--seeds", default="0-63", help="seed list, e.g. 0-49999 or 0-9,100-109")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--guidance", type=float, default=0.0, help="SIMS guidance weight omega >= 0 (0: base model)")
    p.add_argument("--sigma-interval", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                   help="guide only for sigma in (LO, HI]")
    p.add_argument("--class", dest="class_label", type=int, default=None,
                   help="class of every sample (class-conditional models)")
    p.add_argument("--ema", default=None, help="base EMA to use: main, or a half-life key such as 50 or 12p5")
    p.add_argument("--aux-ema", default=None, help="auxiliary EMA to use (as --ema)")
    p.add_argument("--aux-snapshot", default=None, help="auxiliary snapshot folder (e.g. kimg38.4), or final")
    p.add_argument("--steps", type=int, default=None, help="sampler steps N (default: the run's sampler.num_steps)")
    p.add_argument("--batch", type=int, default=None, help="seeds per batch (default: sampler.batch_size)")
    p.add_argument("--grid", default=None, help="also save a grid picture of the first 64 seeds here")
    p.add_argument("--devices", type=int, default=1, help="processes (GPUs, or CPU gloo processes)")
    p.add_argument("--accelerator", default="auto", help="auto | cpu | gpu")
    return p


def _choice(value):
    return None if value is None else ("" if value in ("main", "final") else value)


@user_errors("sims-sample")
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from sims.diffusion import SIMSGuidance
    from sims.dist import init_distributed
    from sims.errors import InputError
    from sims.stages.rundir import load_run_denoiser
    from sims.utils import parse_seeds

    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as exc:
        raise InputError(f"--seeds: {exc}") from None
    SIMSGuidance.check_omega(args.guidance)
    ctx = init_distributed(args.accelerator, args.devices, 1)
    snap = _choice(args.aux_snapshot)
    denoiser, cfg, meta = load_run_denoiser(Path(args.run_dir), args.guidance, sigma_interval=args.sigma_interval,
                                            device=ctx.device, base_ema=_choice(args.ema), aux_ema=_choice(args.aux_ema),
                                            aux_snapshot=snap if snap else (None if snap is None else ""))
    sampler = dict(cfg["sampler"])
    if args.steps is not None:
        sampler["num_steps"] = args.steps
    from sims.generation import generate_to_folder

    n = generate_to_folder(ctx, denoiser, seeds, args.out, meta["data_shape"], label_dim=int(meta["label_dim"]),
                           sampler=sampler, batch_size=args.batch or sampler["batch_size"],
                           class_label=args.class_label, progress=True)
    ctx.barrier()
    if ctx.is_main:
        if args.grid:
            _grid(args.out, seeds[:64], meta["data_shape"], args.grid)
        print(f"[sims] {len(seeds)} samples in {args.out} (omega={args.guidance}, {ctx.world_size} process(es); "
              f"this run wrote {n} on rank 0)", flush=True)
    from sims.dist import shutdown_distributed

    shutdown_distributed()
    return 0


def _grid(out_dir, seeds, data_shape, path):
    from sims.cli.fid import load_sample_folder
    from sims.figures import save_sample_figure

    save_sample_figure(load_sample_folder(out_dir, only=seeds), path)


if __name__ == "__main__":
    sys.exit(main())
