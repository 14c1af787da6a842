"""Scenarios run on every rank of a 2-process CPU (gloo) job by tests/test_distributed.py.

    python tests/ddp_worker.py fit OUT [--launcher-devices N]    a short toy training; writes OUT/rank<r>.pt
    python tests/ddp_worker.py eval OUT                         an evaluation in which rank 1 gets no batch

The job's processes come from the environment (torchrun-style or SLURM variables set by the test),
or from Lightning's launcher (``--launcher-devices 2`` in a plain process).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOY = ["train.batch_size=64", "network.hidden_dim=16", "network.num_layers=1", "data.num_samples=512",
       "train.ckpt_every_kimg=0.32", "train.progress_bar=false", "train.lr_rampup_kimg=0.5", "train.ema_rampup_ratio=null",
       "train.ema_halflife_kimg=0.2"]


def toy_config(out: Path, *extra):
    from sims.config import load_config

    return load_config(ROOT / "configs/toy2d.yaml", [f"run_dir={out}", *TOY, *extra])


def train_toy(ctx, out: Path, steps: int = 6, batch_gpu: int = 32):
    """Train the toy for ``steps`` steps of 64 (micro-batches of ``batch_gpu``); return (σ per call, module)."""
    from sims.config import to_container
    from sims.data import load_real_dataset
    from sims.diffusion import EDMLoss
    from sims.training.fit import fit_stage
    from sims.training.module import EDMModule

    cfg = toy_config(out, f"train.total_kimg={steps * 64 / 1000}", f"train.batch_gpu={batch_gpu}")
    sigmas = []
    original = EDMLoss.sample_sigma

    def recording(self, n, device, generator=None):
        s = original(self, n, device, generator)
        sigmas.append(s.detach().clone())
        return s

    EDMLoss.sample_sigma = recording
    try:
        module = EDMModule(to_container(cfg.network), to_container(cfg.train), (2,), 0)
        fit_stage(ctx, out / "base", module, load_real_dataset(cfg.data), total_kimg=float(cfg.train.total_kimg),
                  train=to_container(cfg.train), progress=False)
    finally:
        EDMLoss.sample_sigma = original
    return sigmas, module


def scenario_fit(ctx, out: Path) -> None:
    sigmas, module = train_toy(ctx, out)
    torch.save({"sigmas": sigmas, "net": module.net.state_dict(), "ema": module.ema.module.state_dict(),
                "rank": ctx.rank, "world": ctx.world_size, "launcher": ctx.launcher}, out / f"rank{ctx.rank}.pt")


def eval_fixture(ctx, out: Path):
    """A fixed denoiser and reference on the toy data (the same in every process)."""
    from sims.config import to_container
    from sims.data import load_real_dataset
    from sims.stages.evaluate import build_reference, make_extractor
    from sims.training.denoiser import build_denoiser

    cfg = toy_config(out)
    data = load_real_dataset(cfg.data)
    torch.manual_seed(0)
    net = build_denoiser(to_container(cfg.network), (2,), 0, 1.0).eval()
    extractor = make_extractor("identity", data_dim=2, inception_weights=None, device=ctx.device)
    reference = build_reference(ctx, extractor, "identity", data, pr_size=256)
    return net, extractor, reference, to_container(cfg.sampler)


def evaluate_one_batch(ctx, out: Path):
    """30 seeds in one batch of 30: with two ranks, rank 1 gets no batch."""
    from sims.stages.evaluate import evaluate_denoiser

    net, extractor, reference, sampler = eval_fixture(ctx, out)
    sampler["num_steps"] = 4
    return evaluate_denoiser(ctx, net, range(30), data_shape=(2,), label_dim=0, sampler=sampler, batch_size=30,
                             extractor=extractor, reference=reference)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("scenario", choices=("fit", "eval"))
    p.add_argument("out")
    p.add_argument("--launcher-devices", type=int, default=1)
    args = p.parse_args()
    from sims.dist import init_distributed

    torch.set_num_threads(1)
    ctx = init_distributed("cpu", args.launcher_devices, 1)
    out = Path(args.out)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    ctx.barrier()
    if args.scenario == "fit":
        scenario_fit(ctx, out)
    else:
        result = evaluate_one_batch(ctx, out)
        (out / f"eval_rank{ctx.rank}.json").write_text(json.dumps({**result, "world": ctx.world_size}))
    from sims.dist import shutdown_distributed

    shutdown_distributed()  # as the CLIs do: a gloo process left with its group can abort at exit (-6)


if __name__ == "__main__":
    main()
