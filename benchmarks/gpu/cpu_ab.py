"""CPU A/B of our DDPM++ training step: this tree's networks against an earlier commit's, and
diffusers' UNet2DModel, interleaved in one process (EDM's CIFAR-10 configuration, batch 8).

The earlier networks are read with ``git show REF:sims/networks/{layers,ddpmpp}.py`` into a temporary
module, built with the same weights as ours, and checked to give the same output and gradients (a
speed change must leave the numerics unchanged); then the three models' fwd+bwd+Adam steps are
timed in alternating rounds (``--repeats``), so a load change on the shared machine hits all.
``--profile`` prints torch.profiler's top operators of our step instead. Besides wall-clock img/s
it reports images per CPU-second of this process (``time.process_time``): with ``--threads 1`` that
counts the work done and not the time other processes held the cores, so it is the steadier figure
on a shared machine.

    python benchmarks/gpu/cpu_ab.py --ref HEAD                 # before = the last commit
    python benchmarks/gpu/cpu_ab.py --profile --batch 8

Writes ``--out`` (default benchmarks/results/gpu-cpu/cpu_ab.json).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import CIFAR10_NET, ROOT, Trainer, build_diffusers_match, build_net, interleaved, median, write_json  # noqa: E402


def load_ref_ddpmpp(ref: str):
    """The DDPMpp class of commit ``ref`` (its layers.py and ddpmpp.py), as a throw-away module."""
    d = Path(tempfile.mkdtemp(prefix="sims-ref-"))
    for name in ("layers", "ddpmpp"):
        src = subprocess.run(["git", "show", f"{ref}:sims/networks/{name}.py"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout
        src = src.replace("from sims.networks.layers import", "from sims_ref_layers import")
        (d / f"sims_ref_{name}.py").write_text(src)
    sys.path.insert(0, str(d))
    for name in ("layers", "ddpmpp"):
        spec = importlib.util.spec_from_file_location(f"sims_ref_{name}", d / f"sims_ref_{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[f"sims_ref_{name}"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["sims_ref_ddpmpp"].DDPMpp


def same_numerics(new, old, batch: int = 2) -> float:
    """Max |difference| of outputs and parameter gradients of two nets with the same weights (train mode, no dropout)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    c = torch.randn(batch, generator=g)
    aug = torch.randn(batch, 9, generator=g)
    with torch.no_grad():  # non-trivial weights: EDM's init zeroes the residual branches' outputs
        for p in new.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    old.load_state_dict(new.state_dict())
    worst = 0.0
    for net in (new, old):
        net.zero_grad(set_to_none=True)
    ys = []
    for net in (new, old):
        y = net(x, c, None, aug)
        (y.square().mean()).backward()
        ys.append(y.detach())
    worst = max(worst, (ys[0] - ys[1]).abs().max().item())
    for (n1, p1), (n2, p2) in zip(new.named_parameters(), old.named_parameters()):
        assert n1 == n2
        worst = max(worst, (p1.grad - p2.grad).abs().max().item())
    return worst


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ref", default="HEAD", help="git commit of the 'before' networks")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-diffusers", action="store_true")
    p.add_argument("--profile", action="store_true", help="print the profiler's top ops of our step and exit")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu-cpu" / "cpu_ab.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as sims.training.fit does on CPU
    net = {**CIFAR10_NET, "dropout": 0.0}
    dev = torch.device("cpu")
    torch.manual_seed(0)
    ours = build_net(net, 32, 3)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        t = Trainer("ours", ours, batch=args.batch, res=32, ch=3, device=dev, autocast_dtype=None, augment_dim=9)
        t.run(2)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            t.run(2)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
        return 0
    Ref = load_ref_ddpmpp(args.ref)
    kw = dict(img_resolution=32, in_channels=3, augment_dim=9, model_channels=128, channel_mult=[2, 2, 2],
              channel_mult_emb=4, num_blocks=4, attn_resolutions=[16], dropout=0.0, adaptive_scale=False)
    old = Ref(**kw)
    diff = same_numerics(ours, old)
    print(f"max |new - {args.ref}| over output and gradients: {diff:.3g}")
    trainers = [Trainer("sims DDPM++ (this tree)", ours, batch=args.batch, res=32, ch=3, device=dev,
                        autocast_dtype=None, augment_dim=9),
                Trainer(f"sims DDPM++ ({args.ref})", old, batch=args.batch, res=32, ch=3, device=dev,
                        autocast_dtype=None, augment_dim=9)]
    if not args.no_diffusers:
        n = sum(q.numel() for q in ours.parameters())
        theirs, _ = build_diffusers_match(n, net, 32, 3)
        trainers.append(Trainer("diffusers UNet2DModel", theirs, batch=args.batch, res=32, ch=3, device=dev,
                                autocast_dtype=None))
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    interleaved(trainers, args.warmup, args.iters, args.repeats)
    rows = []
    for t in trainers:
        rows.append({"model": t.name, "params": t.params, "batch": args.batch, "img_per_s": median(t.rates),
                     "best_img_per_s": max(t.rates), "steps_per_s": median(t.rates) / args.batch,
                     "img_per_cpu_s": median(t.cpu_rates),
                     "round_img_per_s": [round(r, 4) for r in t.rates],
                     "round_img_per_cpu_s": [round(r, 4) for r in t.cpu_rates]})
    for key, ratio in (("img_per_s", "vs_ref"), ("img_per_cpu_s", "cpu_vs_ref")):
        for r in rows:
            r[ratio] = r[key] / rows[1][key]
            if len(rows) == 3:
                r[ratio.replace("ref", "diffusers")] = r[key] / rows[2][key]
    result = {"command": "python benchmarks/gpu/cpu_ab.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "ref": args.ref, "max_abs_diff_output_and_grads": diff, "threads": args.threads,
              "loadavg_1m_start": load0, "loadavg_1m_end": os.getloadavg()[0], "cpu_count": os.cpu_count(),
              "seconds": time.perf_counter() - t0, "torch": torch.__version__,
              "step": "EDM loss fwd+bwd+Adam, dropout 0, float32, all-zero augment labels", "rows": rows}
    print("| model | img/s (median) | best | steps/s | vs ref | vs diffusers | img/CPU-s | vs ref (CPU time) | "
          "vs diffusers (CPU time) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['img_per_s']:.3f} | {r['best_img_per_s']:.3f} | {r['steps_per_s']:.4f} | "
              f"{r['vs_ref']:.3f} | {r.get('vs_diffusers', float('nan')):.3f} | {r['img_per_cpu_s']:.3f} | "
              f"{r['cpu_vs_ref']:.3f} | {r.get('cpu_vs_diffusers', float('nan')):.3f} |")
    print(f"load average {load0:.2f} -> {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    write_json(Path(args.out), result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
