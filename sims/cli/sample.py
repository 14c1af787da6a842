"""``sims-sample RUN_DIR --seeds 0-999 --out DIR [--guidance OMEGA] [--steps N] [--grid FILE] [--devices N]``

Writes one ``{seed:06d}.png`` per seed (``.npy`` for vector data); each is a pure function of
(weights, seed, sampler settings), the same with 1 or N processes. ``--guidance ω > 0`` samples
with SIMS, D = (1+ω)·D_base − ω·D_aux, using the run's auxiliary model.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sims.cli.common import user_errors


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sims-sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a sims-train run directory")
    p.add_argument("--seeds", default="0-63", help="seed list, e.g. 0-49999 or 0-9,100-109")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--guidance", type=float, default=0.0, help="SIMS guidance weight omega >= 0 (0: base model)")
    p.add_argument("--sigma-interval", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                   help="guide only for sigma in (LO, HI]")
    p.add_argument("--steps", type=int, default=None, help="sampler steps N (default: the run's sampler.num_steps)")
    p.add_argument("--batch", type=int, default=None, help="seeds per batch (default: sampler.batch_size)")
    p.add_argument("--grid", default=None, help="also save a grid picture of the first 64 seeds here")
    p.add_argument("--devices", type=int, default=1, help="processes (GPUs, or CPU gloo processes)")
    p.add_argument("--accelerator", default="auto", help="auto | cpu | gpu")
    return p


@user_errors("sims-sample")
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from sims.sims_pipeline import load_run_denoiser
    from sims.utils import parse_seeds

    seeds = parse_seeds(args.seeds)
    run_dir = Path(args.run_dir)
    fabric = None
    if args.devices > 1:
        from lightning.fabric import Fabric

        fabric = Fabric(accelerator=args.accelerator, devices=args.devices, strategy="ddp")
        fabric.launch()
    import torch

    device = fabric.device if fabric is not None else torch.device(
        "cuda" if args.accelerator in ("auto", "gpu") and torch.cuda.is_available() else "cpu")
    denoiser, cfg, meta = load_run_denoiser(run_dir, args.guidance, sigma_interval=args.sigma_interval,
                                            device=device)
    sampler = dict(cfg["sampler"])
    if args.steps is not None:
        sampler["num_steps"] = args.steps
    from sims.generation import barrier, dist_info, generate_to_folder

    n = generate_to_folder(denoiser, seeds, args.out, meta["data_shape"], label_dim=int(meta["label_dim"]),
                           sampler=sampler, batch_size=args.batch or sampler["batch_size"], device=device,
                           progress=True)
    barrier()
    rank, world = dist_info()
    if rank == 0:
        if args.grid:
            _grid(args.out, seeds[:64], meta["data_shape"], args.grid)
        print(f"[sims] {len(seeds)} samples in {args.out} (omega={args.guidance}, {world} process(es); "
              f"this run wrote {n} on rank 0)", flush=True)
    return 0


def _grid(out_dir, seeds, data_shape, path):
    import numpy as np
    import torch

    from sims.generation import save_sample_figure

    if len(data_shape) == 3:
        from PIL import Image

        imgs = [np.asarray(Image.open(Path(out_dir) / f"{s:06d}.png")) for s in seeds]
        x = torch.from_numpy(np.stack(imgs)).float()
        x = (x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)) / 127.5 - 1
    else:
        x = torch.from_numpy(np.stack([np.load(Path(out_dir) / f"{s:06d}.npy") for s in seeds]))
    save_sample_figure(x, path)


if __name__ == "__main__":
    sys.exit(main())
