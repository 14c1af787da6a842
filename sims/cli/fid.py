"""``sims-fid``: Fréchet distance (and precision/recall) of a sample folder or a run against a reference.

  sims-fid SAMPLES_DIR --ref REF.npz [--features inception --inception-weights W] [--expect 50000]
  sims-fid RUN_DIR --seeds 0-49999 [--guidance OMEGA] --ref REF.npz [--devices 8]
  sims-fid SAMPLES_DIR --ref-data CONFIG          (reference computed from the config's data set; adds P/R)
  sims-fid --ref-data configs/digits.yaml --save-ref digits-ref.npz      (reference statistics of a data set)

SAMPLES_DIR holds ``{seed:06d}.png`` (or ``.npy`` for vector data) as written by ``sims-sample``.
Reference statistics are EDM-format ``.npz`` files (``mu``, ``sigma``); published EDM references
load (Inception assumed), files written here also record their feature extractor. Features:
``inception`` (Inception-v3 pool3 via torch-fidelity, extra ``fid``, weights from a local path only),
``digits`` (the shipped digit classifier), ``identity`` (vectors). Sampling, reading and feature
extraction are sharded over ``--devices`` processes; the result equals one process's.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch

from sims.cli.common import user_errors
from sims.errors import InputError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sims-fid", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", nargs="?", help="a folder of samples or a sims-train run directory")
    p.add_argument("--ref", help="reference statistics .npz (mu, sigma)")
    p.add_argument("--ref-data", help="compute the reference from this config's data set instead")
    p.add_argument("--save-ref", help="write the reference statistics computed from --ref-data here")
    p.add_argument("--features", default="digits", help="digits | inception | identity (default digits)")
    p.add_argument("--inception-weights", default=None, help="local Inception weights file (never downloaded)")
    p.add_argument("--expect", type=int, default=None, help="fail unless the folder holds exactly this many samples")
    p.add_argument("--seeds", default="0-1999", help="seeds to generate when SOURCE is a run directory")
    p.add_argument("--guidance", type=float, default=0.0, help="SIMS guidance weight when SOURCE is a run")
    p.add_argument("--batch", type=int, default=500, help="samples per batch")
    p.add_argument("--devices", type=int, default=1, help="processes (GPUs, or CPU gloo processes)")
    p.add_argument("--accelerator", default="auto", help="auto | cpu | gpu")
    p.add_argument("--json", default=None, help="also write the result as JSON here")
    return p


class SampleFolderError(InputError):
    """An empty, partial or unreadable sample folder."""


def sample_files(folder: str | Path, expect: Optional[int] = None) -> List[Path]:
    """The ``*.png`` or ``*.npy`` sample files of a folder, by name.

    Raises:
        SampleFolderError: missing/empty folder, a mix of kinds, or a count other than ``expect``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SampleFolderError(f"sample folder not found: {folder}")
    pngs, npys = sorted(folder.glob("*.png")), sorted(folder.glob("*.npy"))
    if not pngs and not npys:
        raise SampleFolderError(f"{folder} holds no samples (*.png or *.npy): run sims-sample first")
    if pngs and npys:
        raise SampleFolderError(f"{folder} mixes .png and .npy samples")
    files = pngs or npys
    if expect is not None and len(files) != expect:
        raise SampleFolderError(f"{folder} is partial: {len(files)} samples, expected {expect}; "
                                "re-run the same sims-sample command to complete it")
    return files


def read_samples(files: Sequence[Path]) -> torch.Tensor:
    """PNG files → [N, C, H, W] in [-1, 1] (via :func:`sims.data.images.from_hwc_uint8`), or ``.npy`` → [N, d].

    Raises:
        SampleFolderError: an unreadable file, or samples of different shapes.
    """
    from PIL import Image

    from sims.data.images import from_hwc_uint8

    arrays = []
    for f in files:
        try:
            arrays.append(np.asarray(Image.open(f)) if f.suffix == ".png" else np.load(f))
        except Exception as exc:
            raise SampleFolderError(f"cannot read sample {f}: {exc}") from None
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise SampleFolderError(f"samples of different shapes: {sorted(shapes)}")
    stacked = np.stack(arrays)
    return from_hwc_uint8(stacked) if files[0].suffix == ".png" else torch.from_numpy(stacked).float()


def load_sample_folder(folder: str | Path, expect: Optional[int] = None, only: Optional[Sequence[int]] = None):
    """All samples of a folder (or those of the seeds ``only``) as one tensor; see :func:`read_samples`."""
    files = sample_files(folder, expect)
    if only is not None:
        wanted = {f"{int(s):06d}" for s in only}
        files = [f for f in files if f.stem in wanted]
    return read_samples(files)


@user_errors("sims-fid")
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from sims.dist import init_distributed
    from sims.generation import rank_batches
    from sims.stages.evaluate import build_reference, evaluate_denoiser, evaluate_samples, make_extractor

    if args.source is None and not args.ref_data:
        raise InputError("give a sample folder or run directory, or --ref-data CONFIG to compute a reference")
    if args.source is not None and not (args.ref or args.ref_data):
        raise InputError("no reference: give --ref REF.npz or --ref-data CONFIG")
    ctx = init_distributed(args.accelerator, args.devices, 1)
    source = Path(args.source) if args.source else None
    is_run = source is not None and (source / "config.yaml").is_file()
    files = sample_files(source, args.expect) if source is not None and not is_run else []
    real = None
    if args.ref_data:
        from sims.config import load_config
        from sims.data import load_real_dataset

        real = load_real_dataset(load_config(args.ref_data, ["run_dir=unused"]).data)
        data_dim = real.dim
    elif is_run:
        from sims.training.export import read_metadata

        data_dim = int(np.prod(read_metadata(source / "base" / "ema.safetensors")["data_shape"]))
    else:
        data_dim = int(np.prod(read_samples(files[:1]).shape[1:]))
    extractor = make_extractor(args.features, data_dim=data_dim, inception_weights=args.inception_weights,
                               device=ctx.device)
    if real is not None:
        reference = build_reference(ctx, extractor, args.features, real, pr_size=len(real),
                                    save_to=Path(args.save_ref) if args.save_ref else None)
        if args.save_ref and ctx.is_main:
            print(f"[sims] reference statistics of {len(real)} items ({args.features}, D={len(reference.mu)}) "
                  f"-> {args.save_ref}", flush=True)
        if source is None:
            return 0
    else:
        from sims.data.datasets import ArrayDataset

        empty = ArrayDataset(torch.zeros(0, data_dim))  # no real data: statistics from the file, no P/R
        reference = build_reference(ctx, extractor, args.features, empty, reference_path=args.ref, pr_size=0)
    if is_run:
        from sims.stages.rundir import load_run_denoiser
        from sims.utils import parse_seeds

        denoiser, cfg, meta = load_run_denoiser(source, args.guidance, device=ctx.device)
        base, aux = (denoiser.base, denoiser.aux) if args.guidance else (denoiser, None)
        seeds = parse_seeds(args.seeds)
        result = evaluate_denoiser(ctx, base, seeds, data_shape=meta["data_shape"], label_dim=int(meta["label_dim"]),
                                   sampler=cfg["sampler"], batch_size=args.batch, extractor=extractor,
                                   reference=reference, aux=aux, omega=args.guidance)
    else:
        ids = list(range(len(files)))
        mine = ((b, read_samples([files[i] for i in b])) for b in rank_batches(ctx, ids, args.batch))
        result = evaluate_samples(ctx, mine, extractor=extractor, reference=reference, pr_ids=ids[:reference.pr_size])
    result = {"source": str(source), "features": args.features, **result, **reference.provenance()}
    if ctx.is_main:
        print(json.dumps(result))
        if args.json:
            from sims.utils import atomic_write_json

            atomic_write_json(Path(args.json), result)
    from sims.dist import shutdown_distributed

    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
