"""``sims-import edm FILE.pkl --out RUN_DIR [--describe]``: an EDM network pickle as a sims base.

Reads NVIDIA's EDM network snapshots (``edm-cifar10-32x32-uncond-vp.pkl``, ``edm-ffhq-64x64-uncond-vp.pkl``,
``edm-imagenet-64x64-cond-adm.pkl``, your own ``network-snapshot-*.pkl``) without executing anything
they contain (:mod:`sims.training.edm_pickle`: an allow-listed unpickler), builds the project's
network from the pickle's own constructor arguments, maps the weights strictly and writes RUN_DIR
as a completed base::

    RUN_DIR/config.yaml            a resolved config: the network, the data shape, EDM's loss and
                                   augmentation settings, EDM's recommended sampler for the data set
    RUN_DIR/base/ema.safetensors   the weights (safetensors, no pickle), metadata incl. the source SHA-256
    RUN_DIR/base/DONE
    RUN_DIR/IMPORT.json            source path and SHA-256, recovered classes and arguments, loss_fn,
                                   augment_pipe and dataset_kwargs, and the licence of the weights

Then ``sims-sample RUN_DIR ...`` samples it, ``sims.load_denoiser(RUN_DIR)`` returns D(x, σ), and
``sims-train CONFIG run_dir=R sims.base=RUN_DIR sims.enabled=true`` runs the SIMS stages on it.
The weights keep NVIDIA's licence (CC BY-NC-SA 4.0): do not redistribute converted files under
another licence. ``--describe`` prints the recovered classes, arguments and SHA-256 and writes nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict

from sims.cli.common import user_errors
from sims.errors import InputError

LICENCE = "weights © NVIDIA (EDM, Karras et al. 2022), CC BY-NC-SA 4.0; converted by sims-import, not relicensed"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sims-import", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="kind", required=True, metavar="{edm}")
    e = sub.add_parser("edm", help="an EDM network pickle (network-snapshot-*.pkl, edm-*.pkl)")
    e.add_argument("file", help="the .pkl file")
    e.add_argument("--out", help="the run directory to write (must not exist, or be empty)")
    e.add_argument("--describe", action="store_true", help="print classes, arguments and SHA-256; write nothing")
    return p


def edm_sampler_settings(data_shape, label_dim: int, arch: str) -> Dict[str, Any]:
    """EDM's recommended sampler (EDM README, SPEC §2): ImageNet-64 ADM 256 steps with churn
    (S_churn 40, S_min 0.05, S_max 50, S_noise 1.003); 64×64 (FFHQ, AFHQv2) 40 steps; else 18 (CIFAR-10)."""
    res = int(data_shape[-1])
    if arch == "adm" and label_dim > 0 and res == 64:
        return {"num_steps": 256, "S_churn": 40.0, "S_min": 0.05, "S_max": 50.0, "S_noise": 1.003}
    return {"num_steps": 40 if res >= 64 else 18}


def imported_config(net, snapshot, out: Path):
    """The resolved run config of an imported network (a RunConfig with the network's settings)."""
    from omegaconf import OmegaConf

    from sims.config import load_config

    c, r = int(net.data_shape[0]), int(net.data_shape[1])
    loss = snapshot.loss_kwargs or {}
    aug = snapshot.augment_kwargs or {}
    data = snapshot.dataset_kwargs or {}
    overrides = {
        "run_dir": str(out),
        "data": {"name": "folder", "path": None, "resolution": r, "channels": c, "use_labels": bool(net.label_dim),
                 "xflip": bool(data.get("xflip", False))},
        "network": net.network,
        "train": {"P_mean": float(loss.get("P_mean", -1.2)), "P_std": float(loss.get("P_std", 1.2)),
                  "sigma_data": float(net.sigma_data), "augment": float(aug.get("p", 0.0))},
        "sampler": edm_sampler_settings(net.data_shape, net.label_dim, net.network["arch"]),
    }
    cfg = load_config(None, [])
    return OmegaConf.merge(cfg, OmegaConf.create(overrides))


@user_errors("sims-import")
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from sims.training.edm_import import convert_edm_network
    from sims.training.edm_pickle import load_edm_pickle

    snapshot = load_edm_pickle(args.file)
    if args.describe:
        print(json.dumps({"file": str(args.file), "sha256": snapshot.sha256, "precond": snapshot.precond,
                          "precond_kwargs": snapshot.precond_kwargs, "backbone": snapshot.backbone,
                          "backbone_kwargs": snapshot.backbone_kwargs, "tensors": len(snapshot.tensors),
                          "loss_fn": snapshot.loss_fn, "loss_kwargs": snapshot.loss_kwargs,
                          "augment_pipe": snapshot.augment_pipe, "augment_kwargs": snapshot.augment_kwargs,
                          "dataset_kwargs": snapshot.dataset_kwargs}, indent=2, default=str))
        return 0
    if not args.out:
        raise InputError("give --out RUN_DIR (or --describe to only print what the file holds)")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{out} exists and is not empty: choose a new --out")
    net = convert_edm_network(snapshot)
    from sims.config import save_config
    from sims.training.export import save_denoiser
    from sims.utils import atomic_write_json, atomic_write_text

    cfg = imported_config(net, snapshot, out)
    (out / "base").mkdir(parents=True, exist_ok=True)
    save_denoiser(net.module, out / "base" / "ema.safetensors", network=net.network, data_shape=net.data_shape,
                  label_dim=net.label_dim, sigma_data=net.sigma_data, kimg=None, stage="imported",
                  source=str(Path(args.file).resolve()), source_sha256=snapshot.sha256, licence=LICENCE)
    save_config(cfg, out / "config.yaml")
    atomic_write_json(out / "IMPORT.json", {**net.info, "source": str(Path(args.file).resolve()),
                                            "sha256": snapshot.sha256, "licence": LICENCE})
    atomic_write_text(out / "base" / "DONE", f"imported={snapshot.sha256}\n")
    params = sum(v.numel() for v in net.state_dict.values())
    print(f"[sims] imported {snapshot.precond}/{snapshot.backbone} ({params:,} parameters, sha256 "
          f"{snapshot.sha256[:12]}…) -> {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
