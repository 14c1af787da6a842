"""Shared parts of the GPU check (``benchmarks/gpu/check.sh``): modes, the section JSON schema,
time caps, precision settings, one timed training step and its FLOPs.

Section JSON (one file per section, ``<section>.json``, rewritten atomically after every table row
so a run cut off mid-section still returns its figures)::

    {"schema": "sims-gpu-check/1", "section": "train", "title": "...", "mode": "gpu|dry-run|cpu",
     "status": "running|ok|partial|timeout|error|not built|skipped|crashed",
     "notes": ["..."], "seconds": 12.3, "cap_s": 100, "env": {...},
     "tables": [{"name": "...", "columns": ["model", ...], "rows": [{"model": ...}, ...]}]}

``status``: ``ok`` every measurement ran; ``partial`` some rows are ``not built`` / skipped with a
note; ``timeout`` the section's time cap stopped it (rows so far are kept); ``error`` it raised
(message in ``notes``); ``not built`` the network or feature it measures does not exist in this
tree; ``skipped`` not run (out of the time budget, or not part of this mode); ``crashed`` the
process died inside it (written by the next run of the orchestrator).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import signal
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SCHEMA = "sims-gpu-check/1"
STATUSES = ("running", "ok", "partial", "timeout", "error", "not built", "skipped", "crashed")
# bf16 dense matrix rate: measured on this workplace's H200 (8192^3 bf16 matmul, KINDS.md) and the datasheet's.
PEAK_BF16_MEASURED = 790e12
PEAK_BF16_DATASHEET = 990e12

# EDM's CIFAR-10 DDPM++ (edm-cifar10-32x32-uncond-vp): 55,733,891 parameters with augment_dim 9.
CIFAR10_NET = dict(arch="ddpmpp", model_channels=128, channel_mult=[2, 2, 2], channel_mult_emb=4, num_blocks=4,
                   attn_resolutions=[16], adaptive_scale=False, augment_dim=9, dropout=0.13)
CIFAR10_PARAMS = 55_733_891
# EDM's ImageNet-64 ADM (edm-imagenet-64x64-cond-adm): 295,899,267 parameters, label_dim 1000.
ADM_NET = dict(arch="adm", model_channels=192, channel_mult=[1, 2, 3, 4], channel_mult_emb=4, num_blocks=3,
               attn_resolutions=[32, 16, 8], dropout=0.10, channels_per_head=64)
# Toy stand-ins for the dry run (same code paths, seconds on a CPU).
TOY_RES = 8  # images 8x8 in the dry run
TOY_DDPMPP = dict(arch="ddpmpp", model_channels=16, channel_mult=[1, 2], channel_mult_emb=2, num_blocks=1,
                  attn_resolutions=[4], adaptive_scale=False, augment_dim=9, dropout=0.13)
TOY_ADM = dict(arch="adm", model_channels=32, channel_mult=[1, 2], channel_mult_emb=2, num_blocks=1,
               attn_resolutions=[4], dropout=0.10, channels_per_head=32)


class SectionTimeout(Exception):
    """Raised inside a section when its time cap runs out (SIGALRM)."""


class NotBuilt(Exception):
    """The network or feature a section (or row) measures does not exist in this tree."""


@dataclass
class Mode:
    """How big the check runs: ``gpu`` (the real run), ``dry-run`` (toy sizes on the CPU, same
    schema) or ``cpu`` (the real CIFAR-10 configuration on the CPU at a small batch)."""

    name: str
    device: torch.device

    @property
    def dry(self) -> bool:
        return self.name == "dry-run"

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


_ENV: Dict[str, Dict[str, Any]] = {}


def env_info(mode: Mode) -> Dict[str, Any]:
    """Machine and package versions for every JSON (what a reader needs to trust the figures);
    the package versions are looked up once per process, the load average each time."""
    if mode.name in _ENV:
        info = dict(_ENV[mode.name])
        try:
            info["loadavg_1m"] = round(os.getloadavg()[0], 2)
        except OSError:
            pass
        return info
    info: Dict[str, Any] = {"mode": mode.name, "device": str(mode.device), "python": platform.python_version(),
                            "torch": torch.__version__, "cpu_count": os.cpu_count(),
                            "torch_threads": torch.get_num_threads()}
    try:
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    if mode.cuda:
        p = torch.cuda.get_device_properties(mode.device)
        info.update(gpu=p.name, gpu_mem_GiB=round(p.total_memory / 2**30, 1), sm_count=p.multi_processor_count,
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    import importlib.metadata
    import importlib.util

    for mod, dist in (("diffusers", "diffusers"), ("omegaconf", "omegaconf"), ("torch_fidelity", "torch-fidelity"),
                      ("torchvision", "torchvision"), ("lightning", "lightning")):
        # versions from the installed metadata: no import (diffusers and lightning take seconds to import)
        try:
            found = importlib.util.find_spec(mod) is not None
        except (ImportError, ValueError):  # a broken package, or a module without a spec
            found = mod in sys.modules
        if not found:
            info[mod] = "missing"
            continue
        try:
            info[mod] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            info[mod] = "importable (version unknown)"
    note = os.environ.get("SIMS_GPU_INSTALL_NOTE")
    if note:
        info["install"] = note
    _ENV[mode.name] = dict(info)
    return info


def timeout_in_chain(exc: BaseException) -> Optional[BaseException]:
    """The :class:`SectionTimeout` that caused ``exc``, if any (torch.compile wraps exceptions
    raised inside the compiler, e.g. in ``BackendCompilerFailed``)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, SectionTimeout):
            return exc
        seen.add(id(exc))
        exc = getattr(exc, "inner_exception", None) or exc.__cause__ or exc.__context__
    return None


def write_json(path: Path, obj: Dict[str, Any]) -> None:
    """Write ``obj`` to ``path`` atomically (temporary file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_jsonable, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _jsonable(v):
    if isinstance(v, (torch.dtype, torch.device, Path)):
        return str(v)
    raise TypeError(f"not JSON-able: {type(v).__name__}")


def clean(v):
    """Floats rounded for the JSON (4 significant digits), NaN/inf as None."""
    if isinstance(v, float):
        if not math.isfinite(v):
            return None
        return float(f"{v:.4g}")
    if isinstance(v, dict):
        return {k: clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [clean(x) for x in v]
    return v


class Section:
    """One section's record: tables of rows, notes, status; saved after every change."""

    def __init__(self, name: str, title: str, mode: Mode, out_dir: Path, cap_s: float):
        self.name, self.title, self.mode, self.out_dir, self.cap_s = name, title, mode, Path(out_dir), cap_s
        self.t0 = time.perf_counter()
        self.data: Dict[str, Any] = {"schema": SCHEMA, "section": name, "title": title, "mode": mode.name,
                                     "status": "running", "notes": [], "seconds": 0.0, "cap_s": cap_s,
                                     "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "env": env_info(mode),
                                     "tables": []}
        self.save()

    @property
    def path(self) -> Path:
        return self.out_dir / f"{self.name}.json"

    def table(self, name: str, columns: List[str]) -> "Table":
        t = {"name": name, "columns": list(columns), "rows": []}
        self.data["tables"].append(t)
        self.save()
        return Table(self, t)

    def note(self, text: str) -> None:
        print(f"[{self.name}] {text}", flush=True)
        self.data["notes"].append(str(text))
        self.save()

    def finish(self, status: str) -> None:
        assert status in STATUSES, status
        self.data["status"] = status
        self.save()

    def save(self) -> None:
        self.data["seconds"] = round(time.perf_counter() - self.t0, 2)
        write_json(self.path, self.data)


class Table:
    def __init__(self, section: Section, data: Dict[str, Any]):
        self.section, self.data = section, data

    def add(self, **row) -> Dict[str, Any]:
        row = clean(row)
        missing = [c for c in self.data["columns"] if c not in row]
        for c in missing:
            row[c] = None
        self.data["rows"].append(row)
        self.section.save()
        shown = ", ".join(f"{c}={row[c]}" for c in self.data["columns"] if row.get(c) is not None)
        print(f"[{self.section.name}] {self.data['name']}: {shown}", flush=True)
        return row


class CompileTimeout(SectionTimeout):
    """A nested cap (e.g. torch.compile's 120 s) ran out before the section's own."""


_DEADLINES: List[float] = []  # absolute perf_counter deadlines of the active caps, outermost first


def _arm(handler_exc) -> None:
    remaining = _DEADLINES[-1] - time.perf_counter()
    if remaining <= 0:
        raise handler_exc("time cap reached")
    signal.setitimer(signal.ITIMER_REAL, remaining)


@contextlib.contextmanager
def time_cap(seconds: float, exc: type = SectionTimeout) -> Iterator[None]:
    """Raise ``exc`` (a :class:`SectionTimeout`) in this (main) thread after ``seconds`` (SIGALRM:
    Python code is interrupted between operations, a blocking C call when it returns). Caps nest:
    an inner cap never outlives the outer one, and the outer one is re-armed when the inner exits."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return
    now = time.perf_counter()
    outer = _DEADLINES[-1] if _DEADLINES else math.inf
    own = now + max(float(seconds), 0.0)
    which = exc if own <= outer else SectionTimeout

    def handler(signum, frame):
        raise which(f"time cap of {seconds:.0f} s reached" if which is exc else "the section's time cap was reached")

    old = signal.signal(signal.SIGALRM, handler)
    _DEADLINES.append(min(own, outer))
    try:
        _arm(which)
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        _DEADLINES.pop()
        signal.signal(signal.SIGALRM, old)
        if _DEADLINES:
            _arm(SectionTimeout)


def remaining_s() -> float:
    """Seconds left under the innermost active cap (inf when none)."""
    return (_DEADLINES[-1] - time.perf_counter()) if _DEADLINES else math.inf


def check_deadline() -> None:
    """Raise :class:`SectionTimeout` if the innermost cap has run out — a second line of defence for
    an alarm whose exception some library caught (torch.compile's tracer, for one)."""
    if remaining_s() <= 0:
        raise SectionTimeout("the section's time cap was reached")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------ precision
PRECISIONS = ("fp32", "tf32", "bf16")


@contextlib.contextmanager
def precision_flags(precision: str) -> Iterator[Optional[torch.dtype]]:
    """Set the TF32 switches for ``precision`` and yield the backbone's autocast dtype.

    fp32: TF32 off for matmul and cuDNN (as EDM trains: ``torch.backends.cuda.matmul.allow_tf32 =
    torch.backends.cudnn.allow_tf32 = False``); tf32: both on; bf16: both on (the float32 parts —
    embedding, attention softmax, loss — may use TF32) and bf16 autocast inside the backbone only
    (:class:`sims.diffusion.EDMPrecond` ``autocast_dtype``). Restores the switches afterwards.
    Uses only the long-standing ``allow_tf32`` flags (present in torch 2.2 … 2.13).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    tf32 = precision != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        yield torch.bfloat16 if precision == "bf16" else None
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


# ------------------------------------------------------------------------------------------ training
def build_net(net: Dict[str, Any], res: int, ch: int, label_dim: int = 0):
    """Our backbone from a NetworkConfig-like dict (:func:`sims.networks.build_backbone`); raises
    :class:`NotBuilt` when the arch does not exist in this tree."""
    try:
        from sims.config import NetworkConfig
        from sims.networks import ARCHS, build_backbone
    except ImportError as exc:
        raise NotBuilt(f"sims.networks: {exc}") from None
    if net["arch"] not in ARCHS:
        raise NotBuilt(f"arch {net['arch']!r} is not in sims.networks.ARCHS {ARCHS}")
    return build_backbone(NetworkConfig(**net), res, ch, label_dim=label_dim)


def build_diffusers_match(n_params: int, net: Dict[str, Any], res: int, ch: int):
    """diffusers' UNet2DModel with our layout, base width chosen so its parameter count is nearest
    ``n_params`` (:func:`sims.networks.diffusers_unet.diffusers_unet_kwargs_matching`); additive
    time injection like EDM's DDPM++, dropout 0. Raises :class:`NotBuilt` without diffusers."""
    try:
        from sims.networks.diffusers_unet import DiffusersUNet, diffusers_unet_kwargs_matching
        import diffusers  # noqa: F401
    except ImportError as exc:
        raise NotBuilt(f"diffusers: {exc}") from None
    layout = {k: net[k] for k in ("model_channels", "channel_mult", "num_blocks", "attn_resolutions")}
    kw = diffusers_unet_kwargs_matching(n_params, res, ch, dropout=0.0, adaptive_scale=False,
                                        channel_mult_emb=net["channel_mult_emb"], **layout)
    return DiffusersUNet(kw), kw


class Trainer:
    """One model's EDM training step: EDM loss (Karras et al. 2022, Table 1; sum over elements,
    mean over the batch) forward + backward + Adam (fused on CUDA, as
    :class:`sims.training.module.EDMModule`), on random images in [-1, 1] of shape [B, C, R, R].

    ``augment_dim`` > 0 passes all-zero augmentation labels [B, augment_dim] (EDM's label of an
    un-augmented image). ``label_dim`` > 0 passes random one-hot class labels. ``compile``
    wraps the backbone in ``torch.compile`` (default inductor; ``compile_backend`` for another).
    """

    def __init__(self, name: str, backbone: torch.nn.Module, *, batch: int, res: int, ch: int,
                 device: torch.device, autocast_dtype: Optional[torch.dtype], augment_dim: int = 0,
                 label_dim: int = 0, compile: bool = False, compile_backend: Optional[str] = None):
        from sims.diffusion import EDMLoss, EDMPrecond

        self.name = name
        self.params = sum(p.numel() for p in backbone.parameters())
        backbone = backbone.to(device)
        self.eager_backbone = backbone
        if compile:
            backbone = torch.compile(backbone, **({"backend": compile_backend} if compile_backend else {}))
        self.denoiser = EDMPrecond(backbone, sigma_data=0.5, autocast_dtype=autocast_dtype, label_dim=label_dim)
        self.denoiser.train()
        self.loss_fn = EDMLoss()
        fused = {"fused": True} if device.type == "cuda" else {}
        self.opt = torch.optim.Adam(self.eager_backbone.parameters(), lr=1e-4, **fused)
        g = torch.Generator().manual_seed(0)
        self.images = (torch.rand(batch, ch, res, res, generator=g) * 2 - 1).to(device)
        self.augment = torch.zeros(batch, augment_dim, device=device) if augment_dim else None
        self.labels = None
        if label_dim:
            idx = torch.randint(label_dim, (batch,), generator=g)
            self.labels = torch.nn.functional.one_hot(idx, label_dim).float().to(device)
        self.batch, self.device = batch, device
        self.rates: List[float] = []
        self.cpu_rates: List[float] = []
        self.last_cpu_rate = float("nan")

    def step(self) -> torch.Tensor:
        loss = self.loss_fn(self.denoiser, self.images, self.labels, augment_labels=self.augment)
        loss = loss.sum() / self.batch
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss

    def run(self, n: int) -> float:
        """``n`` steps; returns img/s. Raises RuntimeError on a non-finite loss."""
        sync(self.device)
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            check_deadline()
            loss = self.step()
        sync(self.device)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        if not torch.isfinite(loss):
            raise RuntimeError(f"{self.name}: non-finite loss {loss.item()}")
        self.last_cpu_rate = n * self.batch / cpu if cpu > 0 else float("nan")  # img per CPU-second (this process)
        return n * self.batch / dt

    def flops(self, count_batch: int = 16) -> float:
        """FLOPs of one forward + backward at this batch (``torch.utils.flop_counter.FlopCounterMode``:
        convolutions, matrix products and attention; the element-wise ops and Adam are not counted),
        counted on the first ``count_batch`` images and scaled to the batch (every counted op is
        per image, so the count is linear in the batch)."""
        from torch.utils.flop_counter import FlopCounterMode

        b = min(count_batch, self.batch)
        labels = self.labels[:b] if self.labels is not None else None
        augment = self.augment[:b] if self.augment is not None else None
        with FlopCounterMode(display=False) as fc:
            loss = self.loss_fn(self.denoiser, self.images[:b], labels, augment_labels=augment)
            (loss.sum() / b).backward()
        self.opt.zero_grad(set_to_none=True)
        return float(fc.get_total_flops()) * self.batch / b

    def set_batch(self, batch: int) -> None:
        """Use the first ``batch`` images from now on (after an out-of-memory error)."""
        self.images = self.images[:batch].contiguous()
        self.augment = self.augment[:batch].contiguous() if self.augment is not None else None
        self.labels = self.labels[:batch].contiguous() if self.labels is not None else None
        self.batch = batch


def interleaved(trainers: List[Trainer], warmup: int, iters: int, repeats: int) -> None:
    """Warm every trainer up, then time them in alternating rounds (``repeats`` rounds of
    ``iters // repeats`` steps), so a load change hits all; rates land in ``trainer.rates``."""
    for t in trainers:
        if warmup:
            t.run(warmup)
    per = max(1, iters // repeats)
    for _ in range(repeats):
        for t in trainers:
            t.rates.append(t.run(per))
            t.cpu_rates.append(t.last_cpu_rate)


def median(xs: List[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def mfu(flops_per_step: float, img_per_s: float, batch: int) -> Dict[str, float]:
    """Achieved TFLOP/s and MFU against the measured (790) and datasheet (990 TFLOP/s) bf16 rates."""
    if not flops_per_step or not img_per_s:
        return {"tflops": None, "mfu_790": None, "mfu_990": None}
    achieved = flops_per_step * img_per_s / batch
    return {"tflops": achieved / 1e12, "mfu_790": achieved / PEAK_BF16_MEASURED,
            "mfu_990": achieved / PEAK_BF16_DATASHEET}


def peak_mem_gib(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def free() -> None:
    """Collect garbage and return cached CUDA memory (between rows; drop your references first)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def guarded(section: Section, table: Table, what: str, fn: Callable[[], Dict[str, Any]],
            base_row: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """Run one row's measurement; a :class:`NotBuilt` becomes a ``not built`` row and an OOM or
    other error a row with ``status`` and a note, so one failure does not lose the table.
    :class:`SectionTimeout` propagates (the caller's time cap)."""
    check_deadline()
    try:
        row = dict(fn())
        status = row.pop("status", "ok")
        return table.add(**{**base_row, **row}, status=status)
    except SectionTimeout:
        raise
    except NotBuilt as exc:
        section.note(f"{what}: not built ({exc})")
        return table.add(**base_row, status="not built")
    except Exception as exc:  # noqa: BLE001 - reported in the JSON, the next row still runs
        cause = timeout_in_chain(exc)
        if cause is not None:
            raise cause
        status = "oom" if is_oom(exc) else "error"
        section.note(f"{what}: {status}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        free()
        return table.add(**base_row, status=status)
