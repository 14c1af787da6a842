"""Sampling throughput: unguided vs SIMS-guided (and σ-interval-guided) EDM sampling.

SIMS evaluates two networks per step, so the guided/unguided time ratio is at most ≈ 2 (target ≤ 2.1);
guidance only for σ ∈ (0.28, 2.9] (Kynkäänniemi et al. 2024) skips the auxiliary model elsewhere.
Weights are random (speed does not depend on them).

    python benchmarks/sampling_throughput.py [--device cuda] [--configs digits cifar10]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from sims.config import NetworkConfig
from sims.diffusion import CountedDenoiser, SIMSGuidance
from sims.dist import single_process
from sims.generation import generate
from sims.training.denoiser import build_denoiser


def sample_seeds(denoiser, seeds, shape, *, sampler, device):
    """All of ``seeds`` in one batch through :func:`sims.generation.generate` (the package's sampling loop)."""
    return torch.cat([x for _, x, _ in generate(single_process(device), denoiser, seeds, shape, sampler=sampler,
                                                batch_size=len(seeds))])

CONFIGS = {
    "digits": dict(shape=(1, 8, 8), batch=500, steps=18,
                   net=dict(model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)),
    "cifar10": dict(shape=(3, 32, 32), batch=8, steps=4,
                    net=dict(model_channels=128, channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16], dropout=0.13)),
}


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (the first heavy run after start is slow)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--cifar-batch", type=int, default=None, help="batch for the CIFAR-10 config (GPU: e.g. 256)")
    p.add_argument("--digits-batch", type=int, default=None, help="batch for the digits config (default 500)")
    p.add_argument("--out", default="benchmarks/results/sampling_throughput.json")
    args = p.parse_args()
    from omegaconf import OmegaConf

    rows = []
    for name in args.configs:
        c = CONFIGS[name]
        batch = args.cifar_batch if (name == "cifar10" and args.cifar_batch) else c["batch"]
        batch = args.digits_batch if (name == "digits" and args.digits_batch) else batch
        net = OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(NetworkConfig), c["net"]))
        torch.manual_seed(0)
        base = build_denoiser(net, c["shape"], 0).to(args.device).eval()
        aux = build_denoiser(net, c["shape"], 0).to(args.device).eval()
        sampler = {"num_steps": c["steps"]}
        seeds = list(range(batch))
        variants = {"base": base, "sims": SIMSGuidance(base, aux, 0.5),
                    "sims_interval": SIMSGuidance(base, aux, 0.5, sigma_interval=(0.28, 2.9))}
        times = {}
        for vname, den in variants.items():
            times[vname] = timed(lambda: sample_seeds(den, seeds, c["shape"], sampler=sampler, device=args.device),
                                 args.repeats)
        nfes = {}
        for vname, den in variants.items():  # network evaluations per image, both networks counted
            b = CountedDenoiser(base)
            if isinstance(den, SIMSGuidance):
                a = CountedDenoiser(aux)
                den = SIMSGuidance(b, a, den.omega, sigma_interval=den.sigma_interval)
            else:
                a, den = None, b
            sample_seeds(den, seeds[:1], c["shape"], sampler=sampler, device=args.device)
            nfes[vname] = b.rows + (a.rows if a is not None else 0)
        for vname, t in times.items():
            rows.append({"config": name, "variant": vname, "batch": batch, "steps": c["steps"],
                         "nfe_per_image": nfes[vname], "img_per_s": batch / t, "ratio_vs_base": t / times["base"]})
    print("| config | variant | batch | steps | NFE/img | img/s | time ratio vs base |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['variant']} | {r['batch']} | {r['steps']} | {r['nfe_per_image']} | "
              f"{r['img_per_s']:.3g} | {r['ratio_vs_base']:.3f} |")
    out = {"command": "python " + " ".join(sys.argv), "device": args.device, "torch": torch.__version__,
           "threads": torch.get_num_threads(), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
