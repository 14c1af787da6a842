"""``sims-fid``: Fréchet distance (and precision/recall) of a sample folder or a run against a reference.

  sims-fid SAMPLES_DIR --ref REF.npz [--features inception --inception-weights PATH] [--expect 50000]
  sims-fid RUN_DIR --seeds 0-9999 [--guidance OMEGA] --ref REF.npz
  sims-fid --ref-data configs/digits.yaml --save-ref digits-ref.npz      (reference statistics of a data set)

SAMPLES_DIR holds ``{seed:06d}.png`` (or ``.npy`` for vector data) as written by ``sims-sample``.
Reference statistics are EDM-format ``.npz`` files (``mu``, ``sigma``); published EDM references load.
Features: ``inception`` (Inception-v3 pool3 via torch-fidelity, extra ``fid``, weights from a local
path only), ``digits`` (the shipped digit classifier), ``identity`` (vectors).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from sims.cli.common import user_errors


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
    p.add_argument("--json", default=None, help="also write the result as JSON here")
    return p


class SampleFolderError(ValueError):
    """An empty, partial or unreadable sample folder."""


def load_sample_folder(folder: str | Path, expect: int | None = None) -> torch.Tensor:
    """All ``*.png`` (→ [N, C, H, W] in [-1, 1]) or ``*.npy`` (→ [N, d]) samples of a folder, by name.

    Raises:
        SampleFolderError: missing/empty folder, a mix of kinds, unreadable files, images of
            different sizes, or a count other than ``expect``.
    """
    from PIL import Image

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
    arrays = []
    for f in files:
        try:
            arrays.append(np.asarray(Image.open(f)) if pngs else np.load(f))
        except Exception as exc:
            raise SampleFolderError(f"cannot read sample {f}: {exc}") from None
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise SampleFolderError(f"{folder} holds samples of different shapes: {sorted(shapes)}")
    x = torch.from_numpy(np.stack(arrays))
    if pngs:
        x = x.float()
        x = (x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)) / 127.5 - 1
    return x.float()


@user_errors("sims-fid")
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from sims.metrics import (FeatureStats, build_feature_extractor, check_feature_dim, frechet_distance, load_npz,
                              save_npz)

    if args.ref_data:
        from sims.config import load_config
        from sims.data import load_real_dataset

        cfg = load_config(args.ref_data, ["run_dir=unused"])
        real = load_real_dataset(cfg.data).data
    else:
        real = None
    if args.source is None and real is None:
        raise ValueError("give a sample folder or run directory, or --ref-data CONFIG to compute a reference")

    def extractor_for(x: torch.Tensor):
        return build_feature_extractor(args.features, data_dim=int(np.prod(x.shape[1:])),
                                       inception_weights=args.inception_weights)

    def stats_of(ext, x):
        from sims.evaluation import features_of

        return FeatureStats(ext.feature_dim).update(features_of(ext, x, "cpu"))

    if real is not None:
        ext = extractor_for(real)
        mu_r, sigma_r = stats_of(ext, real).mean_cov()
        if args.save_ref:
            save_npz(args.save_ref, mu_r, sigma_r)
            print(f"[sims] reference statistics of {len(real)} items ({args.features}, D={len(mu_r)}) -> {args.save_ref}")
        if args.source is None:
            return 0
    elif args.ref:
        mu_r, sigma_r = load_npz(args.ref)
    else:
        raise ValueError("no reference: give --ref REF.npz or --ref-data CONFIG")

    source = Path(args.source)
    if (source / "config.yaml").is_file():
        from sims.generation import sample_seeds
        from sims.sims_pipeline import load_run_denoiser
        from sims.utils import parse_seeds

        denoiser, cfg, meta = load_run_denoiser(source, args.guidance)
        seeds = parse_seeds(args.seeds)
        parts = [sample_seeds(denoiser, seeds[i:i + 500], meta["data_shape"], label_dim=int(meta["label_dim"]),
                              sampler=cfg["sampler"])[0] for i in range(0, len(seeds), 500)]
        from sims.evaluation import quantize

        x = quantize(torch.cat(parts))
    else:
        x = load_sample_folder(source, args.expect)
    ext = extractor_for(x)
    check_feature_dim(mu_r, ext.feature_dim, source=f"reference statistics {args.ref or args.ref_data}")
    mu, sigma = stats_of(ext, x).mean_cov()
    result = {"source": str(source), "num_samples": len(x), "features": args.features,
              "fd": frechet_distance(mu, sigma, mu_r, sigma_r)}
    if real is not None:
        from sims.evaluation import features_of
        from sims.metrics import precision_recall

        result.update(precision_recall(features_of(ext, real, "cpu"), features_of(ext, x, "cpu"), k=5))
    print(json.dumps(result))
    if args.json:
        from sims.utils import atomic_write_json

        atomic_write_json(Path(args.json), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
