"""Training sections of the GPU check: ``train`` (EDM's CIFAR-10 DDPM++ in fp32 / TF32 / bf16 next
to diffusers' UNet2DModel, peak memory, the largest per-GPU batch), ``compile`` (bf16 +
torch.compile against bf16 eager) and ``adm`` (EDM's ImageNet-64 ADM step time).

One step = EDM loss (Karras et al. 2022, Table 1) forward + backward + Adam
(:class:`common.Trainer`). MFU = FLOPs of one forward + backward at that batch
(``FlopCounterMode``) ÷ step time ÷ 790 TFLOP/s (bf16 matmul rate measured on this workplace's
H200), also against the datasheet's 990.
"""
from __future__ import annotations

import time
from typing import Any, Dict

import torch

from common import (ADM_NET, CIFAR10_NET, CIFAR10_PARAMS, TOY_ADM, TOY_DDPMPP, TOY_RES, CompileTimeout, Mode, NotBuilt,
                    Section, SectionTimeout, Trainer, build_diffusers_match, build_net, free, guarded, interleaved,
                    is_oom, median, mfu, timeout_in_chain, peak_mem_gib, precision_flags, remaining_s, reset_peak, time_cap)

TRAIN_COLUMNS = ["model", "precision", "params", "batch", "step_ms", "img_per_s", "ours_vs_diffusers",
                 "tflop_per_step", "tflops", "mfu_790", "mfu_990", "peak_mem_GiB", "status"]


def train_sizes(mode: Mode) -> Dict[str, Any]:
    """Network, image size and timing lengths for each mode."""
    if mode.dry:
        return dict(net=TOY_DDPMPP, res=TOY_RES, ch=3, batch=4, warmup=1, iters=2, repeats=2,
                    precisions=("fp32", "tf32", "bf16"), compile_precision="bf16")
    if mode.cuda:
        return dict(net=CIFAR10_NET, res=32, ch=3, batch=256, warmup=2, iters=6, repeats=3,
                    precisions=("fp32", "tf32", "bf16"), compile_precision="bf16")
    # CPU figures: TF32 does not exist on a CPU and bf16 autocast is emulated (slow) without AVX512-BF16.
    return dict(net=CIFAR10_NET, res=32, ch=3, batch=8, warmup=2, iters=3, repeats=3,
                precisions=("fp32",), compile_precision="fp32")


def _train_setup(mode: Mode, args):
    """(sizes, batch, network) of the training sections: the mode's sizes, ``--batch`` if given, the
    network without dropout (timing without dropout in both models; diffusers' is 0 too); cuDNN
    autotuning on for CUDA."""
    z = train_sizes(mode)
    if mode.cuda:
        torch.backends.cudnn.benchmark = True
    return z, args.batch or z["batch"], {**z["net"], "dropout": 0.0}


def section_train(sec: Section, mode: Mode, args) -> str:
    """fp32 (TF32 off, EDM's setting) / TF32 / bf16 img/s and MFU of our DDPM++ and diffusers' UNet2DModel,
    interleaved per precision; then the largest per-GPU batch (bf16, fp32)."""
    z, batch, net = _train_setup(mode, args)
    device = mode.device
    sec.data["config"] = dict(network=net, resolution=z["res"], batch=batch, warmup=z["warmup"], iters=z["iters"],
                              repeats=z["repeats"], step="EDM loss fwd+bwd+Adam (fused on CUDA), dropout 0")
    table = sec.table("training throughput (img/s, MFU vs 790 / 990 TFLOP/s bf16)", TRAIN_COLUMNS)
    torch.manual_seed(0)
    try:
        ours = build_net(net, z["res"], z["ch"])
    except NotBuilt as exc:
        sec.note(f"ddpmpp: not built ({exc})")
        for p in ("fp32", "tf32", "bf16"):
            table.add(model="sims DDPM++", precision=p, batch=batch, status="not built")
        return "not built"
    n_ours = sum(p.numel() for p in ours.parameters())
    if not mode.dry and n_ours != CIFAR10_PARAMS:
        sec.note(f"our DDPM++ has {n_ours:,} parameters, EDM's CIFAR-10 net {CIFAR10_PARAMS:,}")
    trainers = [Trainer("sims DDPM++", ours, batch=batch, res=z["res"], ch=z["ch"], device=device,
                        autocast_dtype=None, augment_dim=net["augment_dim"])]
    try:
        theirs, kw = build_diffusers_match(n_ours, net, z["res"], z["ch"])
        n_theirs = sum(p.numel() for p in theirs.parameters())
        sec.data["diffusers_kwargs"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in kw.items()}
        sec.note(f"diffusers UNet2DModel: {n_theirs:,} parameters ({100 * (n_theirs / n_ours - 1):+.1f}% of ours), "
                 f"base width {kw['block_out_channels'][0] // net['channel_mult'][0]}")
        if abs(n_theirs / n_ours - 1) > 0.05:
            sec.note("diffusers model is outside ±5% of our parameter count")
        trainers.append(Trainer("diffusers UNet2DModel", theirs, batch=batch, res=z["res"], ch=z["ch"],
                                device=device, autocast_dtype=None))
    except NotBuilt as exc:
        sec.note(f"diffusers UNet2DModel: not built ({exc})")
    flops = {}  # per image
    for t in trainers:
        with precision_flags("fp32"):
            flops[t.name] = t.flops() / t.batch
    sec.data["flops_per_image_fwd_bwd"] = flops
    status = "ok" if len(trainers) == 2 else "partial"
    if len(z["precisions"]) < 3:
        sec.note(f"{mode.name} mode: precisions {', '.join(z['precisions'])} only")
    for precision in z["precisions"]:
        while True:
            try:
                with precision_flags(precision) as dtype:
                    peaks = {}
                    for t in trainers:
                        t.denoiser.autocast_dtype = dtype
                        t.rates, t.cpu_rates = [], []
                        reset_peak(device)
                        t.run(z["warmup"])
                        peaks[t.name] = peak_mem_gib(device)
                    interleaved(trainers, 0, z["iters"], z["repeats"])
                break
            except Exception as exc:  # noqa: BLE001 - out of memory: half the batch, same precision
                if timeout_in_chain(exc) is not None or not is_oom(exc) or batch <= 16:
                    raise
                batch //= 2
                sec.note(f"{precision}: out of memory, batch halved to {batch}")
                for t in trainers:
                    t.opt.zero_grad(set_to_none=True)
                    t.set_batch(batch)
                free()
        rates = {t.name: median(t.rates) for t in trainers}
        for t in trainers:
            ips = rates[t.name]
            ratio = ips / rates["diffusers UNet2DModel"] if (t is trainers[0] and len(trainers) == 2) else None
            fl = flops[t.name] * batch
            table.add(model=t.name, precision=precision, params=t.params, batch=batch, step_ms=1e3 * batch / ips,
                      img_per_s=ips, ours_vs_diffusers=ratio, tflop_per_step=fl / 1e12,
                      **mfu(fl, ips, batch), peak_mem_GiB=peaks[t.name], round_img_per_s=t.rates,
                      status="ok")
    for t in trainers:
        t.denoiser.autocast_dtype = None
    del trainers, ours
    free()
    max_batch(sec, mode, net, z)
    return status


def max_batch(sec: Section, mode: Mode, net: Dict[str, Any], z: Dict[str, Any]) -> None:
    """Largest per-GPU batch of our DDPM++ (bf16, then fp32): peak memory at batches 64 and 256
    gives a linear model mem ≈ a + b·B; its prediction for 94% of the card is tried and stepped
    down by 10% until one training step fits (cuDNN autotuning off for these trials)."""
    table = sec.table("largest per-GPU batch (sims DDPM++, one training step)",
                      ["model", "precision", "batch", "peak_mem_GiB", "tried", "status"])
    if not mode.cuda:
        for p in ("bf16", "fp32"):
            table.add(model="sims DDPM++", precision=p, status="n/a on CPU")
        return
    total = torch.cuda.get_device_properties(mode.device).total_memory / 2**30
    for precision in ("bf16", "fp32"):
        if remaining_s() < 25:
            table.add(model="sims DDPM++", precision=precision, status="skipped (time)")
            continue
        tried = []
        torch.manual_seed(0)
        backbone = build_net(net, z["res"], z["ch"]).to(mode.device)  # one network for every trial batch

        def fits(b: int):
            reset_peak(mode.device)
            t = None
            bench = torch.backends.cudnn.benchmark
            torch.backends.cudnn.benchmark = False  # no autotuning (seconds, and workspace) per trial batch
            try:
                with precision_flags(precision) as dtype:
                    t = Trainer("sims DDPM++", backbone, batch=b, res=z["res"],
                                ch=z["ch"], device=mode.device, autocast_dtype=dtype, augment_dim=net["augment_dim"])
                    t.run(1)
                peak = peak_mem_gib(mode.device)
                tried.append([b, round(peak, 2)])
                return peak
            except Exception as exc:  # noqa: BLE001
                if not is_oom(exc):
                    raise
                tried.append([b, "oom"])
                return None
            finally:
                torch.backends.cudnn.benchmark = bench
                del t
                free()

        def one():
            m1 = fits(64)
            if m1 is None:
                return {"batch": None, "peak_mem_GiB": None, "tried": tried, "status": "oom at 64"}
            m2 = fits(256)
            if m2 is None:  # one point: an upper bound of the per-image memory (the fixed part counted in)
                best, peak, slope = 64, m1, m1 / 64
            else:
                best, peak, slope = 256, m2, max((m2 - m1) / 192, 1e-6)
            b = int((0.94 * total - (peak - best * slope)) / slope) // 64 * 64
            for _ in range(6):
                if b <= best:
                    break
                got = fits(b)
                if got is not None:
                    best, peak = b, got
                    break
                b = int(b * 0.9) // 64 * 64
            return {"batch": best, "peak_mem_GiB": peak, "tried": tried}

        guarded(sec, table, f"max batch {precision}", one, {"model": "sims DDPM++", "precision": precision})
        backbone = None  # freed (fits() closes over the name, so it is rebound rather than deleted)
        free()


def section_compile(sec: Section, mode: Mode, args) -> str:
    """bf16 (fp32 in the CPU mode) + torch.compile against eager (ours; then diffusers if time is left), interleaved;
    compile time measured separately (first compiled steps minus a compiled step), skipped with a
    note past ``args.compile_cap`` seconds (120 on the GPU)."""
    z, batch, net = _train_setup(mode, args)
    device = mode.device
    backend = "eager" if mode.dry else None  # the dry run checks the path, not inductor's C++ build
    precision = z["compile_precision"]
    dtype = torch.bfloat16 if precision == "bf16" else None
    sec.data["config"] = dict(network=net, resolution=z["res"], batch=batch, backend=backend or "inductor",
                              compile_cap_s=args.compile_cap,
                              precision="bf16 autocast in the backbone, TF32 on" if dtype else "fp32")
    if backend:
        sec.note("dry run: torch.compile backend 'eager' (dynamo only) stands in for inductor")
    table = sec.table(f"torch.compile ({precision})", ["model", "batch", "compile_s", "eager_img_per_s", "compiled_img_per_s",
                                               "speedup", "mfu_790", "mfu_990", "status"])
    status = "ok"
    for name in ("sims DDPM++", "diffusers UNet2DModel"):
        if name.startswith("diffusers") and remaining_s() < args.compile_cap + 30:
            table.add(model=name, batch=batch, status="skipped (time)")
            sec.note(f"{name}: compile not tried, {remaining_s():.0f} s left in the section")
            status = "partial"
            continue

        def one(name=name):
            torch.manual_seed(0)
            backbone = build_net(net, z["res"], z["ch"])
            n = sum(p.numel() for p in backbone.parameters())
            aug = net["augment_dim"]
            if name.startswith("diffusers"):
                backbone, _ = build_diffusers_match(n, net, z["res"], z["ch"])
                aug = 0
            eager = Trainer(name, backbone, batch=batch, res=z["res"], ch=z["ch"], device=device,
                            autocast_dtype=dtype, augment_dim=aug)
            compiled = Trainer(name + " compiled", _copy(backbone), batch=batch, res=z["res"], ch=z["ch"],
                               device=device, autocast_dtype=dtype, augment_dim=aug, compile=True,
                               compile_backend=backend)
            flops = eager.flops()
            with precision_flags(precision):
                eager.run(2)
                t_step = batch / eager.run(2)
                t0 = time.perf_counter()
                try:
                    with time_cap(args.compile_cap, exc=CompileTimeout):
                        compiled.run(2)  # the first steps compile forward and backward
                except Exception as exc:  # noqa: BLE001 - the compiler may wrap our timeout
                    cause = timeout_in_chain(exc)
                    if not isinstance(cause, CompileTimeout):
                        raise
                    sec.note(f"{name}: torch.compile skipped, compile past {args.compile_cap:.0f} s")
                    return {"batch": batch, "compile_s": None, "status": f"compile > {args.compile_cap:.0f} s"}
                compile_s = time.perf_counter() - t0 - 2 * t_step
                if compile_s > args.compile_cap:  # the alarm was swallowed inside the compiler
                    sec.note(f"{name}: torch.compile took {compile_s:.0f} s, past {args.compile_cap:.0f} s: not timed")
                    return {"batch": batch, "compile_s": compile_s, "status": f"compile > {args.compile_cap:.0f} s"}
                interleaved([eager, compiled], 1, z["iters"], z["repeats"])
            e, c = median(eager.rates), median(compiled.rates)
            return {"batch": batch, "compile_s": compile_s, "eager_img_per_s": e, "compiled_img_per_s": c,
                    "speedup": c / e, **{k: v for k, v in mfu(flops, c, batch).items() if k != "tflops"}}

        row = guarded(sec, table, name, one, {"model": name})
        if row is None or row.get("status") != "ok":
            status = "partial"
        free()
    return status


def _copy(module: torch.nn.Module) -> torch.nn.Module:
    """An independent copy of ``module`` (same weights), so eager and compiled runs do not share state."""
    import copy

    return copy.deepcopy(module)


ADM_COLUMNS = ["model", "precision", "params", "batch", "step_ms", "img_per_s", "tflop_per_step", "tflops",
               "mfu_790", "mfu_990", "peak_mem_GiB", "status"]


def section_adm(sec: Section, mode: Mode, args) -> str:
    """EDM's ImageNet-64 ADM (192 channels, 1-2-3-4, 3 blocks, attention at 32/16/8, label_dim 1000):
    one training step at the largest of 256 → 128 → 64 per-GPU images that fits, bf16 then TF32."""
    device = mode.device
    if mode.dry:
        net, res, label_dim, batches, warmup, iters = TOY_ADM, TOY_RES, 10, [4], 1, 2
    elif mode.cuda:
        net, res, label_dim, batches, warmup, iters = ADM_NET, 64, 1000, [256, 128, 64], 2, 6
    else:
        net, res, label_dim, batches, warmup, iters = ADM_NET, 64, 1000, [2], 1, 1
    net = {**net, "dropout": 0.0}
    if mode.cuda:
        torch.backends.cudnn.benchmark = True
    sec.data["config"] = dict(network=net, resolution=res, label_dim=label_dim, batches_tried=batches)
    table = sec.table("ImageNet-64 ADM training step", ADM_COLUMNS)
    status = "ok"
    fitted = None
    for precision in ("bf16", "tf32"):
        if precision == "tf32" and remaining_s() < 30:
            table.add(model="sims ADM", precision=precision, status="skipped (time)")
            status = "partial"
            continue

        def one(precision=precision):
            nonlocal fitted
            for b in ([fitted] if fitted else batches):
                t = None
                try:
                    torch.manual_seed(0)
                    backbone = build_net(net, res, 3, label_dim=label_dim)
                    with precision_flags(precision) as dtype:
                        t = Trainer("sims ADM", backbone, batch=b, res=res, ch=3, device=device,
                                    autocast_dtype=dtype, label_dim=label_dim)
                        del backbone
                        flops = t.flops()
                        reset_peak(device)
                        t.run(warmup)
                        ips = t.run(iters)
                    fitted = b
                    return {"params": t.params, "batch": b, "step_ms": 1e3 * b / ips, "img_per_s": ips,
                            "tflop_per_step": flops / 1e12, **mfu(flops, ips, b), "peak_mem_GiB": peak_mem_gib(device)}
                except SectionTimeout:
                    raise
                except Exception as exc:  # noqa: BLE001
                    if timeout_in_chain(exc) is not None or not is_oom(exc) or b == batches[-1]:
                        raise
                    sec.note(f"ADM {precision}: batch {b} does not fit, trying a smaller one")
                finally:
                    del t
                    free()
            raise RuntimeError("no batch fits")

        row = guarded(sec, table, f"ADM {precision}", one, {"model": "sims ADM", "precision": precision})
        if row.get("status") == "not built":
            return "not built"
        if row.get("status") != "ok":
            status = "partial"
    return status
