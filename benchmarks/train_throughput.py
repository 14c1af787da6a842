"""Training throughput of the DDPM++ backbone next to diffusers' UNet2DModel of similar size.

One training step = EDM loss (Karras et al. 2022, Table 1: ln sigma ~ N(-1.2, 1.2^2), lambda(sigma)
weighting, preconditioned denoiser) forward + backward + Adam step, on random images in [-1, 1].
Both backbones go through the same :class:`sims.diffusion.EDMPrecond` and :class:`sims.diffusion.EDMLoss`.

Configurations (``--configs``):
    digits:  8x8x1,  model_channels 32, channel_mult [1,2], 2 blocks, attention at 4, batch 128
    cifar10: 32x32x3, EDM's CIFAR-10 DDPM++ exactly (SongUNet, ``edm-cifar10-32x32-uncond-vp``: 128,
             [2,2,2], 4 blocks, attention at 16, additive embedding, augment_dim 9 — 55,733,891
             parameters; EDM_FORMAT §2.3), batch 8 on CPU (``--batch-cifar10`` to change; e.g. 128
             or 512 on a GPU). Its steps pass all-zero augment labels [N, 9] (EDM's label for an
             un-augmented image), so map_augment is trained as in EDM.
The diffusers model uses the same layout keys with additive time injection, its base width chosen
so its parameter count is nearest ours. Dropout is 0 in both.

Timing: ``--warmup`` steps per model are discarded (the first steps allocate and tune), then the
models are timed in alternating rounds (``--repeats``) of ``--iters / repeats`` steps each, so a
load change on a shared machine hits both; the median round rate is reported ("img/s"), and the
best round ("best img/s", the least disturbed by other processes on a shared machine).

Output: a table on stdout and ``benchmarks/results/train_throughput.json`` (written atomically),
including the command line. Columns: params (M), batch, img/s, img/s x params (M) ("per-parameter
throughput": work done per second scaled by model size), and ours/diffusers ratios of both.

Usage::

    python benchmarks/train_throughput.py                     # CPU, both configs (~3-5 min on 2 cores)
    python benchmarks/train_throughput.py --device cuda --bf16 --batch-cifar10 128 --iters 60
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))

# the training step, its interleaved timing and the matched diffusers UNet are the GPU check's (one copy)
from common import Trainer, build_diffusers_match, interleaved  # noqa: E402

from sims.config import NetworkConfig  # noqa: E402
from sims.networks import build_backbone, count_parameters  # noqa: E402

CONFIGS = {
    "digits": dict(res=8, ch=1, batch=128, iters=30, warmup=3, repeats=5,
                   net=dict(model_channels=32, channel_mult=[1, 2], num_blocks=2, attn_resolutions=[4])),
    # EDM's CIFAR-10 DDPM++ (edm-cifar10-32x32-uncond-vp.pkl): 55,733,891 parameters.
    "cifar10": dict(res=32, ch=3, batch=8, iters=3, warmup=2, repeats=3,
                    net=dict(model_channels=128, channel_mult=[2, 2, 2], channel_mult_emb=4, num_blocks=4,
                             attn_resolutions=[16], adaptive_scale=False, augment_dim=9)),
}


def bench_config(name, spec, args, device, autocast_dtype):
    batch = args.batch_cifar10 if (name == "cifar10" and args.batch_cifar10) else spec["batch"]
    if name == "digits" and args.batch_digits:
        batch = args.batch_digits
    iters = args.iters or spec["iters"]
    warmup = spec["warmup"] if args.warmup is None else args.warmup
    repeats = args.repeats or spec["repeats"]
    torch.manual_seed(0)
    cfg = NetworkConfig(arch="ddpmpp", dropout=0.0, **spec["net"])
    ours = build_backbone(cfg, spec["res"], spec["ch"])
    n_ours = count_parameters(ours)
    theirs, kw = build_diffusers_match(n_ours, {**spec["net"], "channel_mult_emb": cfg.channel_mult_emb},
                                       spec["res"], spec["ch"])
    trainers = [Trainer("sims DDPM++", ours, batch=batch, res=spec["res"], ch=spec["ch"], device=device,
                        autocast_dtype=autocast_dtype, augment_dim=cfg.augment_dim),
                Trainer("diffusers UNet2DModel", theirs, batch=batch, res=spec["res"], ch=spec["ch"], device=device,
                        autocast_dtype=autocast_dtype)]
    interleaved(trainers, warmup, iters, repeats)
    per_round = max(1, iters // repeats)
    rows = []
    for t in trainers:
        ips = statistics.median(t.rates)
        rows.append(dict(config=name, model=t.name, params_M=t.params / 1e6, batch=batch, img_per_s=ips,
                         img_per_s_x_params_M=ips * t.params / 1e6, best_img_per_s=max(t.rates),
                         round_rates=t.rates,
                         timed_iters=per_round * repeats, warmup=warmup, loss_impl="sims.diffusion"))
    rows[0]["ratio_img_per_s"] = rows[0]["img_per_s"] / rows[1]["img_per_s"]
    rows[0]["ratio_img_per_s_x_params"] = rows[0]["img_per_s_x_params_M"] / rows[1]["img_per_s_x_params_M"]
    rows[0]["ratio_best_img_per_s"] = rows[0]["best_img_per_s"] / rows[1]["best_img_per_s"]
    rows[1]["diffusers_kwargs"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in kw.items()}
    return rows


def print_table(rows):
    hdr = f"{'config':8} {'model':22} {'params(M)':>9} {'batch':>5} {'img/s':>9} {'img/s*P(M)':>11} " \
          f"{'best img/s':>10} {'ours/diff img/s':>15} {'ours/diff img/s*P':>17} {'ours/diff best':>14}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        r1 = f"{r['ratio_img_per_s']:.2f}" if "ratio_img_per_s" in r else ""
        r2 = f"{r['ratio_img_per_s_x_params']:.2f}" if "ratio_img_per_s_x_params" in r else ""
        r3 = f"{r['ratio_best_img_per_s']:.2f}" if "ratio_best_img_per_s" in r else ""
        print(f"{r['config']:8} {r['model']:22} {r['params_M']:9.2f} {r['batch']:5d} {r['img_per_s']:9.2f} "
              f"{r['img_per_s_x_params_M']:11.1f} {r['best_img_per_s']:10.2f} {r1:>15} {r2:>17} {r3:>14}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="digits,cifar10", help="comma list of: " + ", ".join(CONFIGS))
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast inside the backbone (EDM's rule)")
    p.add_argument("--iters", type=int, default=None, help="timed steps per model (default: digits 30, cifar10 3)")
    p.add_argument("--warmup", type=int, default=None, help="discarded steps per model (default: digits 3, cifar10 2)")
    p.add_argument("--repeats", type=int, default=None, help="alternating timing rounds (default: digits 5, cifar10 3)")
    p.add_argument("--batch-cifar10", type=int, default=None)
    p.add_argument("--batch-digits", type=int, default=None)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_throughput.json"))
    args = p.parse_args(argv)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        p.error(f"unknown config(s) {unknown}; valid: {', '.join(CONFIGS)}")
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            p.error("--device cuda but CUDA is not available")
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast_dtype = torch.bfloat16 if args.bf16 else None

    import diffusers

    rows = []
    for name in names:
        rows += bench_config(name, CONFIGS[name], args, device, autocast_dtype)
    print_table(rows)
    result = dict(
        command="python " + " ".join([os.path.relpath(sys.argv[0], ROOT) if argv is None else
                                      "benchmarks/train_throughput.py"] + (sys.argv[1:] if argv is None else argv)),
        device=(torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"),
        torch_threads=torch.get_num_threads(), os_cpu_count=os.cpu_count(), bf16=args.bf16,
        torch=torch.__version__, diffusers=diffusers.__version__, python=platform.python_version(),
        step="EDM loss (sum over elements, mean over batch) forward+backward+Adam; dropout 0",
        time=time.strftime("%Y-%m-%dT%H:%M:%S%z"), rows=rows,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
