"""Sampling, FD and data-loader sections of the GPU check.

``sampling``: EDM sampling (Heun, 18 steps, EDM Algorithm 2) of EDM's CIFAR-10 DDPM++ at batch 512
through :func:`sims.generation.generate`, unguided vs SIMS-guided (:class:`sims.diffusion.SIMSGuidance`,
Alemohammad et al. 2024) with and without the σ ∈ (0.28, 2.9] interval (Kynkäänniemi et al. 2024).
``fd``: Fréchet distance on 10k samples: Inception-v3 features (:class:`sims.metrics.features.InceptionFeatures`,
torch-fidelity's network, at random weights — weights do not change the time), accumulated
with :func:`sims.metrics.features.compute_stats`, then :func:`sims.metrics.frechet_distance`.
``loader``: img/s of the training data path (:class:`sims.data.zip_dataset.ImageZipDataset` on a
generated EDM zip → :class:`sims.training.sampler.TrainingStream` → DataLoader with workers).
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import CIFAR10_NET, TOY_DDPMPP, TOY_RES, Mode, NotBuilt, Section, build_net, check_deadline, free, guarded, sync

SAMPLING_COLUMNS = ["variant", "batch", "steps", "nfe_per_img", "seconds", "img_per_s", "time_vs_base", "status"]


def section_sampling(sec: Section, mode: Mode, args) -> str:
    """Base vs SIMS vs SIMS with σ-interval: seconds per batch and img/s (fp32, PyTorch's default
    TF32 switches), the time ratio to the base and the measured network evaluations per image."""
    try:
        from sims.diffusion import CountedDenoiser, EDMPrecond, SIMSGuidance
        from sims.dist import single_process
        from sims.generation import generate
    except ImportError as exc:
        sec.note(f"not built ({exc})")
        return "not built"
    if mode.dry:
        net, res, batch, steps = TOY_DDPMPP, TOY_RES, 8, 4
    elif mode.cuda:
        net, res, batch, steps = CIFAR10_NET, 32, 512, 18
    else:
        net, res, batch, steps = CIFAR10_NET, 32, 4, 3
    batch = args.sample_batch or batch
    device = mode.device
    if mode.cuda:
        torch.backends.cudnn.benchmark = True
    sec.data["config"] = dict(network=net, resolution=res, batch=batch, steps=steps, solver="heun", omega=0.5,
                              sigma_interval=[0.28, 2.9], precision="fp32 (torch defaults)")
    table = sec.table("sampling (one batch, seconds and img/s)", SAMPLING_COLUMNS)
    torch.manual_seed(0)
    base = EDMPrecond(build_net(net, res, 3).to(device).eval()).requires_grad_(False)
    torch.manual_seed(1)
    aux = EDMPrecond(build_net(net, res, 3).to(device).eval()).requires_grad_(False)
    ctx = single_process(device)
    shape = (3, res, res)
    seeds = list(range(batch))

    def sample(denoiser, num_steps=steps):
        counted = CountedDenoiser(denoiser)
        sync(device)
        t0 = time.perf_counter()
        for _ in generate(ctx, counted, seeds, shape, sampler={"num_steps": num_steps}, batch_size=batch):
            check_deadline()
        sync(device)
        return time.perf_counter() - t0, counted.rows / batch

    sample(base, 2)  # warm-up: cuDNN picks its algorithms for this batch
    variants = {"base": base, "sims": SIMSGuidance(base, aux, 0.5),
                "sims, sigma in (0.28, 2.9]": SIMSGuidance(base, aux, 0.5, sigma_interval=(0.28, 2.9))}
    t_base = None
    for name, den in variants.items():
        def one(den=den):
            nonlocal t_base
            aux_counter = None
            if isinstance(den, SIMSGuidance):  # count both networks' evaluations
                aux_counter = CountedDenoiser(den.aux)
                den = SIMSGuidance(den.base, aux_counter, den.omega, sigma_interval=den.sigma_interval)
            seconds, nfe = sample(den)
            if aux_counter is not None:
                nfe += aux_counter.rows / batch
            t_base = t_base or seconds
            return {"batch": batch, "steps": steps, "nfe_per_img": nfe, "seconds": seconds,
                    "img_per_s": batch / seconds, "time_vs_base": seconds / t_base}

        guarded(sec, table, name, one, {"variant": name})
    del base, aux
    free()
    return "ok"


FD_COLUMNS = ["extractor", "feature_dim", "num_images", "batch", "features_s", "img_per_s", "frechet_s", "fd",
              "status"]


class _StandIn(torch.nn.Module):
    """A small random conv net standing in for Inception-v3 in the dry run (no torchvision /
    torch-fidelity needed): uint8-like [N, 3, H, W] → [N, 64]."""

    feature_dim = 64

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, stride=2), torch.nn.SiLU(),
                                       torch.nn.Conv2d(32, 64, 3, stride=2), torch.nn.AdaptiveAvgPool2d(1),
                                       torch.nn.Flatten())

    def forward(self, x):
        return self.net(x.float() / 127.5 - 1)


def _inception(sec: Section, mode: Mode):
    """(extractor taking [N, 3, H, W] images in [-1, 1], its name): sims' InceptionFeatures (torch-fidelity's
    Inception-v3) at random weights; else torchvision's inception_v3 (random weights); else the stand-in."""
    if not mode.dry:
        try:
            from sims.metrics.features import InceptionFeatures
            from sims.metrics.inception_weights import random_inception_weights

            with tempfile.TemporaryDirectory() as d:  # random weights: they do not change the time
                extractor = InceptionFeatures(random_inception_weights(Path(d) / "random-inception.pth"))
            return extractor, "sims InceptionFeatures (torch-fidelity Inception-v3, random weights)"
        except Exception as exc:  # noqa: BLE001
            sec.note(f"InceptionFeatures (torch-fidelity) could not be built ({type(exc).__name__}: {exc})")
        try:
            import torchvision

            tv = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
            tv.fc = torch.nn.Identity()

            class TV(torch.nn.Module):
                feature_dim = 2048

                def __init__(self):
                    super().__init__()
                    self.net = tv

                def forward(self, x):
                    x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
                    return self.net(x)

            sec.note("using torchvision's inception_v3 (random weights) instead: same network shape, another resize")
            return TV(), "torchvision inception_v3 (random weights)"
        except Exception as exc:  # noqa: BLE001
            sec.note(f"torchvision's inception_v3 is not importable either ({type(exc).__name__}); using a stand-in")
    else:
        sec.note("dry run: a small random conv net (64 features) stands in for Inception-v3")
    return _StandIn(), "stand-in conv net (not Inception)"


def section_fd(sec: Section, mode: Mode, args) -> str:
    """Features of 10k random images in [-1, 1] through the extractor, moments in float64
    (:class:`sims.metrics.FeatureStats`), and one Fréchet distance against a second set."""
    try:
        from sims.metrics import frechet_distance
        from sims.metrics.features import compute_stats
    except ImportError as exc:
        sec.note(f"not built ({exc})")
        return "not built"
    n, batch = (256, 64) if mode.dry else ((10_000, 500) if mode.cuda else (200, 50))
    device = mode.device
    if mode.cuda:
        torch.backends.cudnn.benchmark = True
    table = sec.table("Fréchet distance", FD_COLUMNS)
    extractor, name = _inception(sec, mode)
    sec.data["config"] = dict(num_images=n, batch=batch, extractor=name, resolution=32)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, 32, 32, generator=g) * 2 - 1
    other = (images + 0.1 * torch.randn(n, 3, 32, 32, generator=g)).clamp(-1, 1)

    def one():
        batches = lambda x: (x[i:i + batch] for i in range(0, n, batch))  # noqa: E731
        compute_stats(extractor, batches(images[:batch]), device)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        s1 = compute_stats(extractor, batches(images), device)
        sync(device)
        t_feat = time.perf_counter() - t0
        s2 = compute_stats(extractor, batches(other), device)
        t0 = time.perf_counter()
        fd = frechet_distance(*s1.mean_cov(), *s2.mean_cov())
        t_fd = time.perf_counter() - t0
        return {"feature_dim": s1.dim, "num_images": n, "batch": batch, "features_s": t_feat, "img_per_s": n / t_feat,
                "frechet_s": t_fd, "fd": fd}

    row = guarded(sec, table, name, one, {"extractor": name})
    return "ok" if row.get("status") == "ok" and "stand-in" not in name else "partial"


LOADER_COLUMNS = ["workers", "batch", "num_images", "img_per_s", "first_batch_s", "status"]


def write_zip(path: Path, n: int, res: int = 32) -> None:
    """An EDM-format zip of ``n`` random RGB PNGs (``{i//1000:05d}/img{i:08d}.png`` + ``dataset.json``,
    labels null), written with :func:`sims.data.zip_writer.write_dataset`."""
    from sims.data.image_folder import image_name
    from sims.data.image_transforms import encode_png
    from sims.data.zip_writer import write_dataset

    rng = np.random.default_rng(0)

    def emit(put) -> None:
        for i in range(n):
            put(image_name(i), encode_png(rng.integers(0, 256, (res, res, 3), dtype=np.uint8)))
        put("dataset.json", b'{"labels": null}')

    write_dataset(path, emit)


def section_loader(sec: Section, mode: Mode, args) -> str:
    """The training data path's img/s (EDM zip → ImageZipDataset with x-flip → TrainingStream →
    DataLoader with ``pin_memory`` on CUDA → device), for several worker counts."""
    try:
        from sims.data.zip_dataset import ImageZipDataset
        from sims.training.sampler import TrainingSampler, TrainingStream
    except ImportError as exc:
        sec.note(f"not built ({exc})")
        return "not built"
    if mode.dry:
        n, batch, nbatches, workers = 200, 32, 6, [0, 2]
    elif mode.cuda:
        n, batch, nbatches, workers = 10_000, 512, 24, [0, 4, 8, 12]
    else:
        n, batch, nbatches, workers = 2000, 128, 8, [0, 2]
    table = sec.table("data loader (EDM zip, 32x32 PNG)", LOADER_COLUMNS)
    device = mode.device
    with tempfile.TemporaryDirectory(prefix="sims-gpu-loader-") as d:
        path = Path(d) / "data.zip"
        t0 = time.perf_counter()
        write_zip(path, n)
        sec.note(f"wrote {n} PNGs to an EDM zip in {time.perf_counter() - t0:.1f} s ({path.stat().st_size / 2**20:.1f} MiB)")
        ds = ImageZipDataset(path, xflip=True)
        sec.data["config"] = dict(num_images=n, xflip=True, batch=batch, batches_timed=nbatches,
                                  pin_memory=device.type == "cuda", cpu_count=os.cpu_count())
        for w in workers:
            def one(w=w):
                sampler = TrainingSampler(len(ds), global_batch=batch, batch_gpu=batch, rank=0, world_size=1, seed=0)
                extra = {"prefetch_factor": 2} if w > 0 else {}
                dl = torch.utils.data.DataLoader(TrainingStream(ds, sampler), batch_size=None, num_workers=w,
                                                 pin_memory=device.type == "cuda", **extra)
                t0 = time.perf_counter()
                it = iter(dl)
                x, _, _ = next(it)
                x = x.to(device, non_blocking=True)
                first = time.perf_counter() - t0
                t0 = time.perf_counter()
                for _ in range(nbatches):
                    x, _, _ = next(it)
                    x = x.to(device, non_blocking=True)
                sync(device)
                dt = time.perf_counter() - t0
                del it, dl
                return {"batch": batch, "num_images": nbatches * batch, "img_per_s": nbatches * batch / dt,
                        "first_batch_s": first}

            guarded(sec, table, f"workers={w}", one, {"workers": w})
        ds.close()
    return "ok"


__all__ = ["section_fd", "section_loader", "section_sampling", "write_zip", "NotBuilt"]
