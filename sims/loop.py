"""Self-consuming generation-loop driver (SPEC section 3; DESIGN "the flow").

One *generation* t = 1..G of one *stream* (workflow, method, seed batch):

1. compose the training set (:func:`sims.data.workflows.compose`: real data and synthetic
   generations < t, by workflow);
2. ``model.fit(train_data, generation=t, seed=..., workdir=..., previous=..., method=...)``
   (for ``method="sims"`` the model also trains its auxiliary model: SIMS Algorithm 1 steps 1-3,
   Alemohammad et al. 2024, arXiv 2408.16333);
3. ``model.sample(num_synthetic, seed=...)``: the synthetic data of generation t (which the
   next generation may train on), stored as ``npz`` (atomic temp + rename);
4. ``model.evaluate(samples, seed=...)`` -> metrics, recorded as the unit
   (workflow, method, seed, generation) in the manifest. ``samples`` is the synthetic data of
   step 3, or, with ``loop.num_eval`` set, that many further samples of the same model (a
   sample-based metric such as FD then has the same finite-sample bias whatever ``num_synthetic``).

Workflows: Gerstgrasser et al. 2024 "Is Model Collapse Inevitable?" (replace, accumulate);
Kazdan, Schaeffer et al. 2025 "Collapse or Thrive?", arXiv 2410.16713 (accumulate-subsample);
Alemohammad et al., ICLR 2024 "Self-Consuming Generative Models Go MAD" (fresh, augment).

Randomness is a pure function of the run seed and the position in the loop, never of process
history: every random draw uses an integer seed from :func:`derive_seed` (numpy ``SeedSequence``
spawn keys):

========================  =====================================================
real data                 ``derive_seed(seed, "real")``
evaluation (test sets)    ``derive_seed(seed, "eval")`` (same for every generation)
fit (e.g. init, aux)      ``derive_seed(seed, "fit", t)``
sampling                  ``derive_seed(seed, "sample", t)``
evaluation samples        ``derive_seed(seed, "eval-sample")`` (``loop.num_eval``; same for every generation)
subset draw               ``derive_seed(seed, "subsample", workflow, t)``
========================  =====================================================

Fit and sample seeds deliberately do *not* depend on the workflow or method: generation 1 is the
same computation for every workflow (it trains on the first ``num_real`` real samples), so its
model and samples are shared between workflows (``_shared`` directories: a diffusion loop trains
its generation-1 base model once), and comparisons between workflows use common random numbers.

Run directory (created by :func:`run_loop`)::

    manifest.json                      format, config hash, hashed config, completed units
    config.yaml                        resolved config (written if absent)
    synthetic/<wf>/<method>/<batch>/gen003.npz   samples [S, n_s, ...] + seeds  (gen 1: _shared/)
    samples/<wf>/<method>/<batch>/gen003.png     grid of 100 synthetic images / 2-D scatter
                                                 (models with ``sample_figures = True``: diffusion)
    models/<wf>/<method>/<batch>/gen003/         model workdir (gen 1: _shared/)
    units/<wf>/<method>/<batch>/gen003.json      metrics of the unit (per seed)
    metrics.csv, metrics.json, plots/<metric>.png

Killing the process at any point and re-running the same command continues from the last
completed unit and gives bit-identical metrics; a run directory created by a different config is
refused (:class:`ConfigMismatchError`).
"""
from __future__ import annotations

import csv
import functools
import hashlib
import json
import logging
import math
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Protocol, Sequence, Tuple, Union

import numpy as np
from omegaconf import DictConfig, OmegaConf

from sims.data.workflows import (
    WORKFLOWS,
    SamplePool,
    TrainingData,
    WorkflowError,
    check_real_available,
    check_workflow,
    compose,
    keeps_history,
    required_real,
)
from sims.utils import atomic_write, atomic_write_json, atomic_write_text, flatten_dict

log = logging.getLogger("sims.loop")

METHODS: Tuple[str, ...] = ("standard", "sims")
"""Sampling methods: ``standard`` (the model's own sampler) or ``sims`` (negative guidance)."""
INITS: Tuple[str, ...] = ("scratch", "previous")
KNOWN_METRICS: Tuple[str, ...] = ("mean_sq_error", "det_ratio", "trace_ratio", "test_nll", "fd", "precision", "recall")
"""Metric columns in SPEC order (Gaussian, KDE, image data); other names a model returns follow."""
META_COLUMNS: Tuple[str, ...] = ("generation", "workflow", "method", "seed", "train_size", "real_fraction")
AGGREGATES: Tuple[str, ...] = ("mean", "std", "ci95")
"""Aggregate rows of metrics.csv: seed='mean', 'std' (ddof=1), 'ci95' (half-width of the t interval)."""
MANIFEST_FORMAT = "sims-loop/1"
_COSMETIC_KEYS = frozenset(
    {"run_dir", "train.progress_bar", "train.wandb", "train.log_every_steps", "data.num_workers", "sampler.batch_size",
     "loop.enabled"}
)
_SHARED = "_shared"


class LoopError(ValueError):
    """A loop configuration or run-directory problem the user must fix."""


class ConfigMismatchError(LoopError):
    """The run directory was created by a different configuration."""


# ----------------------------------------------------------------------------------------------
# Seeds


def _key_int(key: Union[int, str]) -> int:
    if isinstance(key, (int, np.integer)):
        if key < 0:
            raise ValueError(f"seed keys must be >= 0, got {key}")
        return int(key)
    return zlib.crc32(str(key).encode("utf-8"))


@functools.lru_cache(maxsize=1 << 16)
def derive_seed(seed: int, *keys: Union[int, str]) -> int:
    """A 32-bit integer seed that is a pure function of ``seed`` and ``keys``.

    ``SeedSequence(entropy=seed, spawn_key=keys)`` (strings mapped through CRC-32, stable across
    processes and Python versions), first 32-bit word of its state. Independent streams for
    distinct keys; fits ``torch.manual_seed`` and Lightning's ``seed_everything``.

    Raises:
        ValueError: negative seed or key.
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    ss = np.random.SeedSequence(int(seed), spawn_key=tuple(_key_int(k) for k in keys))
    return int(ss.generate_state(1, dtype=np.uint32)[0])


# ----------------------------------------------------------------------------------------------
# The model protocol and registry


class GenerativeModel(Protocol):
    """What the loop driver needs from a generative model.

    Attributes:
        batched: if True, every method takes a *sequence* of S seeds and arrays carry a leading
            seed axis ([S, N, ...]); the driver then runs all seeds of a run as one batch
            (cheap models vectorised over seeds, e.g. :class:`sims.toy.gaussian.GaussianMLE`).
            If False (diffusion, KDE) seeds are ints, arrays have no seed axis, and the driver
            runs one seed at a time.
        supported_methods: subset of :data:`METHODS`; others are refused before any work.
        num_real_available: size of the real data set, or None if unlimited (a known
            distribution). Checked against the workflows' needs before any work.

    Contract (what makes resume and reproducibility work):

    - every method is a deterministic function of its arguments and of what ``fit`` left in
      ``workdir``; all randomness comes from the integer ``seed`` arguments;
    - ``fit`` must be *idempotent and resumable*: the driver calls it again with the same
      arguments after a crash. A model whose fit is expensive (diffusion) writes its checkpoints
      in ``workdir`` (``workdir`` is unique to the (workflow, method, seed, generation); generation
      1 is shared by all workflows), resumes from the latest checkpoint there, and if ``workdir``
      already holds a finished model (e.g. a ``done`` marker written last, atomically) just
      loads it. ``previous`` is the previous generation's ``workdir`` when ``loop.init ==
      "previous"`` (warm start from the model saved there), else None;
    - ``sample`` returns the same array on every call with the same seed (and, under DDP, the
      full array on every rank);
    - ``evaluate`` returns ``{metric name: value}`` (floats; arrays [S] if batched).

    A diffusion model (``batched = False``) would: ``real_data`` = the data set permuted with
    ``seed``, first ``num`` items; ``fit`` = Lightning training of the base model on
    ``np.asarray(train_data)`` with ``seed_everything(seed)``, checkpoints and a final
    safetensors export + ``done`` marker in ``workdir`` (resume from ``workdir``'s last
    checkpoint; initialise from ``previous`` if given), then for ``method == "sims"`` the
    auxiliary fine-tune on base samples in ``workdir / "aux"`` the same way; ``sample`` = EDM
    sampling (SIMS-guided for ``sims``) with per-image seeds ``seed + i``; ``evaluate`` =
    Fréchet distance / precision / recall of ``samples`` against the real data. Register it
    with ``register_model("diffusion", factory)``.
    """

    batched: bool
    supported_methods: Tuple[str, ...]
    num_real_available: Optional[int]

    def real_data(self, num: int, *, seed: Any) -> np.ndarray:
        """``num`` real training samples for ``seed`` ([num, ...]; batched: [S, num, ...]).

        Must be prefix-stable (the first k rows never depend on ``num``); a finite data set is
        typically permuted with ``seed`` and its first ``num`` items returned.
        """

    def fit(self, train_data: TrainingData, *, generation: int, seed: Any, workdir: Path,
            previous: Optional[Path] = None, method: str = "standard") -> None:
        """Train on ``train_data`` (``np.asarray(train_data)`` gives [N, ...]; batched [S, N, ...]).

        The arrays may be read-only views of the driver's sample pool, valid during this call
        only: copy whatever must outlive it.
        """

    def sample(self, num: int, *, seed: Any) -> np.ndarray:
        """``num`` samples of the fitted model ([num, ...]; batched [S, num, ...])."""

    def evaluate(self, samples: np.ndarray, *, seed: Any) -> Mapping[str, Any]:
        """Metrics of the fitted model; ``samples`` were just drawn by :meth:`sample` (the synthetic
        data, or ``loop.num_eval`` samples with their own seed)."""


class Distributed(Protocol):
    """Process-group view the driver needs under DDP: only rank 0 writes, all ranks wait."""

    rank: int

    def barrier(self) -> None:
        """Block until every rank reaches this point."""


class SingleProcess:
    """The default :class:`Distributed`: one process, rank 0, no-op barrier."""

    rank = 0

    def barrier(self) -> None:
        """No-op."""


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: ``factory(cfg) -> GenerativeModel`` and the config keys its results
    depend on (dotted keys or sections; None = the whole config), which enter the config hash."""

    factory: Callable[[DictConfig], GenerativeModel]
    config_keys: Optional[Tuple[str, ...]] = None


_REGISTRY: Dict[str, ModelSpec] = {}


def register_model(name: str, factory: Callable[[DictConfig], GenerativeModel], *,
                   config_keys: Optional[Sequence[str]] = None) -> None:
    """Register (or replace) the loop model ``name`` (the value of ``loop.model``).

    Args:
        name: e.g. ``"diffusion"``.
        factory: called with the full run config, returns a :class:`GenerativeModel`.
        config_keys: config keys/sections the model's results depend on (``("loop",)`` for the
            toys); None hashes the whole config except cosmetic keys (safe default for diffusion).
    """
    if not name or not isinstance(name, str):
        raise ValueError("model name must be a non-empty string")
    _REGISTRY[name] = ModelSpec(factory, tuple(config_keys) if config_keys is not None else None)


def available_models() -> List[str]:
    """Registered model names (plus ``diffusion`` once the training package registers it)."""
    return sorted(_REGISTRY)


def _gaussian_factory(cfg: DictConfig) -> GenerativeModel:
    from sims.toy.gaussian import GaussianMLE

    lp = cfg.loop
    return GaussianMLE(dim=lp.dim, sampling_bias=lp.sampling_bias, guidance=lp.sampling_guidance,
                       aux_size=lp.num_synthetic)


def _kde_factory(cfg: DictConfig) -> GenerativeModel:
    from sims.toy.kde import KDEModel

    lp = cfg.loop
    return KDEModel(toy=lp.toy, bandwidth=lp.bandwidth, noise=cfg.data.noise, num_test=lp.num_test,
                    sampling_bias=lp.sampling_bias)


register_model("gaussian", _gaussian_factory, config_keys=("loop",))
register_model("kde", _kde_factory, config_keys=("loop", "data.noise"))


def _spec(name: str) -> ModelSpec:
    if name == "diffusion" and name not in _REGISTRY:
        from sims.loop_diffusion import register

        register()
    if name in _REGISTRY:
        return _REGISTRY[name]
    raise LoopError(f"unknown loop.model {name!r}; choose one of: {', '.join(sorted(set(available_models()) | {'diffusion'}))}")


def make_model(cfg: DictConfig) -> GenerativeModel:
    """Build the model named by ``cfg.loop.model`` from the registry.

    Raises:
        NotImplementedError: ``diffusion`` before the diffusion package registered it.
        LoopError: unknown name (lists the choices).
    """
    return _spec(str(cfg.loop.model)).factory(cfg)


# ----------------------------------------------------------------------------------------------
# Settings and config hash


@dataclass(frozen=True)
class _Settings:
    model: str
    workflows: Tuple[str, ...]
    methods: Tuple[str, ...]
    generations: int
    num_real: int
    num_synthetic: int
    seeds: Tuple[int, ...]
    init: str
    subsample_size: Optional[int]
    num_eval: Optional[int]


def _settings(cfg: DictConfig) -> _Settings:
    lp = cfg.loop

    def positive(key: str) -> int:
        value = lp.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise LoopError(f"loop.{key} must be a positive integer, got {value!r}")
        return value

    workflows = tuple(lp.workflows)
    if not workflows:
        raise LoopError(f"loop.workflows is empty; choose from: {', '.join(WORKFLOWS)}")
    for w in workflows:
        try:
            check_workflow(w)
        except WorkflowError as exc:
            raise LoopError(f"loop.workflows: {exc}") from None
    methods = tuple(lp.methods)
    if not methods:
        raise LoopError(f"loop.methods is empty; choose from: {', '.join(METHODS)}")
    for m in methods:
        if m not in METHODS:
            raise LoopError(f"loop.methods: unknown method {m!r}; choose one of: {', '.join(METHODS)}")
    seeds = tuple(int(s) for s in lp.seeds)
    if not seeds or min(seeds) < 0:
        raise LoopError(f"loop.seeds must be a non-empty list of integers >= 0, got {list(lp.seeds)}")
    for name, items in (("workflows", workflows), ("methods", methods), ("seeds", seeds)):
        if len(set(items)) != len(items):
            raise LoopError(f"loop.{name} has duplicates: {list(items)}")
    if lp.init not in INITS:
        raise LoopError(f"loop.init must be one of {', '.join(INITS)}, got {lp.init!r}")
    sub = lp.get("subsample_size", None)
    if sub is not None and (not isinstance(sub, int) or sub < 1):
        raise LoopError(f"loop.subsample_size must be a positive integer or null, got {sub!r}")
    num_eval = lp.get("num_eval", None)
    if num_eval is not None:
        num_eval = positive("num_eval")
    return _Settings(str(lp.model), workflows, methods, positive("generations"), positive("num_real"),
                     positive("num_synthetic"), seeds, str(lp.init), sub, num_eval)


def hashed_config(cfg: DictConfig, config_keys: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """The flattened config entries a run's results depend on (dotted key -> value).

    ``config_keys`` selects sections/keys (None: all); cosmetic keys (run_dir, logging, data
    loader workers, sampler batch size, loop.enabled) are always left out.
    """
    flat = flatten_dict(OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg))
    keep = {}
    for key, value in flat.items():
        if key in _COSMETIC_KEYS:
            continue
        if config_keys is None or any(key == k or key.startswith(k + ".") for k in config_keys):
            keep[key] = value
    return dict(sorted(keep.items()))


def config_hash(entries: Mapping[str, Any]) -> str:
    """SHA-256 (hex, first 16 chars) of the canonical JSON of :func:`hashed_config` entries."""
    blob = json.dumps(entries, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Adapter: one batched interface over batched and per-seed models


class _Runner:
    def __init__(self, model: GenerativeModel):
        self.model = model
        self.batched = bool(getattr(model, "batched", False))

    def real_data(self, num: int, seeds: Sequence[int]) -> np.ndarray:
        if self.batched:
            out = np.asarray(self.model.real_data(num, seed=list(seeds)))
        else:
            out = np.stack([np.asarray(self.model.real_data(num, seed=s)) for s in seeds])
        if out.shape[:2] != (len(seeds), num):
            raise LoopError(f"model.real_data returned shape {out.shape}, expected ({len(seeds)}, {num}, ...)")
        return out

    def fit(self, td: TrainingData, *, generation: int, seeds: Sequence[int], workdir: Path,
            previous: Optional[Path], method: str) -> None:
        if self.batched:
            self.model.fit(td, generation=generation, seed=list(seeds), workdir=workdir, previous=previous, method=method)
        else:
            self.model.fit(td.seed(0), generation=generation, seed=seeds[0], workdir=workdir, previous=previous,
                           method=method)

    def sample(self, num: int, seeds: Sequence[int]) -> np.ndarray:
        out = self.model.sample(num, seed=list(seeds)) if self.batched else self.model.sample(num, seed=seeds[0])[None]
        out = np.asarray(out)
        if out.shape[:2] != (len(seeds), num):
            raise LoopError(f"model.sample returned shape {out.shape}, expected ({len(seeds)}, {num}, ...)")
        return out

    def evaluate(self, samples: np.ndarray, seeds: Sequence[int]) -> Dict[str, np.ndarray]:
        res = self.model.evaluate(samples, seed=list(seeds)) if self.batched else self.model.evaluate(samples[0], seed=seeds[0])
        out = {}
        for name, value in dict(res).items():
            arr = np.asarray(value, dtype=np.float64).reshape(-1)
            if arr.shape != (len(seeds),):
                raise LoopError(f"model.evaluate: metric {name!r} has {arr.size} values for {len(seeds)} seeds")
            out[str(name)] = arr
        return out


# ----------------------------------------------------------------------------------------------
# Run directory


@dataclass(frozen=True)
class StepInfo:
    """Passed to ``hooks`` after each phase: ``fit``, ``sample``, ``evaluate``, ``record``."""

    phase: str
    workflow: str
    method: str
    seeds: Tuple[int, ...]
    generation: int
    workdir: Path


def batch_name(seeds: Sequence[int]) -> str:
    """Directory name of a seed batch: ``seed7``, ``seeds0-49`` (a contiguous range) or a hash."""
    seeds = list(seeds)
    if len(seeds) == 1:
        return f"seed{seeds[0]}"
    if seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"seeds{seeds[0]}-{seeds[-1]}"
    return "seeds-" + hashlib.sha1(",".join(map(str, seeds)).encode()).hexdigest()[:10]


def _unit_key(workflow: str, method: str, seed: int) -> str:
    return f"{workflow}/{method}/{seed}"


class _RunDir:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.manifest_path = self.root / "manifest.json"

    def _base(self, kind: str, workflow: str, method: str, seeds: Sequence[int], generation: int) -> Path:
        wf = _SHARED if generation == 1 else workflow
        return self.root / kind / wf / method / batch_name(seeds)

    def synthetic(self, workflow: str, method: str, seeds: Sequence[int], generation: int) -> Path:
        return self._base("synthetic", workflow, method, seeds, generation) / f"gen{generation:03d}.npz"

    def workdir(self, workflow: str, method: str, seeds: Sequence[int], generation: int) -> Path:
        return self._base("models", workflow, method, seeds, generation) / f"gen{generation:03d}"

    def figure(self, workflow: str, method: str, seeds: Sequence[int], generation: int) -> Path:
        return self._base("samples", workflow, method, seeds, generation) / f"gen{generation:03d}.png"

    def unit(self, workflow: str, method: str, seeds: Sequence[int], generation: int) -> Path:
        return self.root / "units" / workflow / method / batch_name(seeds) / f"gen{generation:03d}.json"

    def read_manifest(self) -> Optional[dict]:
        if not self.manifest_path.is_file():
            return None
        try:
            return json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise LoopError(f"cannot read {self.manifest_path}: {exc}; delete the run directory to start over") from None


def completed_units(manifest: Mapping) -> List[Tuple[str, str, int, int]]:
    """Expand a manifest's ``completed`` record into (workflow, method, seed, generation) units."""
    out = []
    for key, last in manifest.get("completed", {}).items():
        wf, method, seed = key.rsplit("/", 2)
        out.extend((wf, method, int(seed), g) for g in range(1, int(last) + 1))
    return sorted(out)


def _describe_mismatch(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    keys = sorted(set(old) | set(new))
    diffs = [f"{k}: {old.get(k, '<absent>')!r} (run dir) vs {new.get(k, '<absent>')!r} (now)"
             for k in keys if old.get(k, "<absent>") != new.get(k, "<absent>")]
    more = f" and {len(diffs) - 6} more" if len(diffs) > 6 else ""
    return "; ".join(diffs[:6]) + more


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    atomic_write(path, write)


# ----------------------------------------------------------------------------------------------
# The driver


@dataclass
class LoopResult:
    """What :func:`run_loop` produced."""

    run_dir: Path
    metrics_csv: Path
    metrics_json: Path
    plots: List[Path]
    rows: List[Dict[str, Any]] = field(repr=False, default_factory=list)
    wall_time_s: float = 0.0


def run_loop(
    cfg: DictConfig,
    run_dir: Optional[Union[str, Path]] = None,
    *,
    model: Optional[GenerativeModel] = None,
    hooks: Optional[Callable[[StepInfo], None]] = None,
    dist: Optional[Distributed] = None,
    plots: bool = True,
) -> LoopResult:
    """Run (or continue) the self-consuming loop described by ``cfg.loop`` in ``run_dir``.

    Args:
        cfg: a :class:`sims.config.RunConfig` DictConfig (``load_config``). Reads ``cfg.loop``:
            model, workflows, methods, generations (G), num_real (n_r), num_synthetic (n_s),
            seeds, init, and optionally ``subsample_size`` (m of accumulate-subsample, default
            n_r) and ``num_eval`` (samples drawn for the metrics of each generation; default:
            the generation's n_s synthetic samples); model settings are read by the model's factory.
        run_dir: output directory (default ``cfg.run_dir``).
        model: use this model instead of ``make_model(cfg)`` (the config hash still uses the
            registry entry of ``cfg.loop.model`` if there is one).
        hooks: called with a :class:`StepInfo` after each phase of each generation (progress
            reporting; tests raise from it to simulate a crash).
        dist: :class:`Distributed` for DDP (default: ``model.distributed`` if the model has one,
            else a single process). All ranks must call ``run_loop``; rank 0 writes.
        plots: write plots/<metric>.png.
    Returns:
        :class:`LoopResult` (paths and the rows of metrics.csv).
    Raises:
        LoopError: invalid loop settings (unknown workflow/method, method unsupported by the
            model, bad sizes), too little real data, or a damaged run directory.
        ConfigMismatchError: ``run_dir`` was created by a different configuration.
        NotImplementedError: ``loop.model='diffusion'`` with no registered implementation.
    """
    start_time = time.time()
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(cfg)
    if run_dir is None:
        run_dir = cfg.get("run_dir") if not OmegaConf.is_missing(cfg, "run_dir") else None
        if not run_dir:
            raise LoopError("no run directory: pass run_dir or set run_dir=... in the config")
    st = _settings(cfg)
    spec = _spec(st.model) if model is None or st.model in _REGISTRY or st.model == "diffusion" else None
    if model is None:
        model = make_model(cfg)
    runner = _Runner(model)
    dist = dist or getattr(model, "distributed", None) or SingleProcess()
    supported = tuple(getattr(model, "supported_methods", ("standard",)))
    for m in st.methods:
        if m not in supported:
            raise LoopError(
                f"loop.model={st.model!r} does not support method {m!r} (supported: {', '.join(supported)}); "
                "remove it from loop.methods"
            )
    try:
        need_real = check_real_available(st.workflows, st.generations, st.num_real,
                                         getattr(model, "num_real_available", None))
    except WorkflowError as exc:
        raise LoopError(str(exc)) from None

    rd = _RunDir(Path(run_dir))
    entries = hashed_config(cfg, spec.config_keys if spec else None)
    chash = config_hash(entries)
    manifest = rd.read_manifest()
    if manifest is not None:
        if manifest.get("format") != MANIFEST_FORMAT:
            raise LoopError(f"{rd.manifest_path} is not a {MANIFEST_FORMAT} manifest; use a new run_dir")
        if manifest.get("config_hash") != chash:
            raise ConfigMismatchError(
                f"run directory {rd.root} was made by a different configuration "
                f"(hash {manifest.get('config_hash')} vs {chash}: {_describe_mismatch(manifest.get('config', {}), entries)}). "
                f"To start fresh, use a new run_dir or delete {rd.root}; to continue it, rerun with its config "
                f"({rd.root / 'config.yaml'})."
            )
        log.info("continuing %s: %d units done", rd.root, len(completed_units(manifest)))
    else:
        manifest = {"format": MANIFEST_FORMAT, "config_hash": chash, "model": st.model, "config": entries,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "completed": {}, "finished": False}
    if dist.rank == 0:
        rd.root.mkdir(parents=True, exist_ok=True)
        if not (rd.root / "config.yaml").exists():
            resolved = cfg.copy()
            resolved.run_dir = str(rd.root)
            atomic_write_text(rd.root / "config.yaml", OmegaConf.to_yaml(resolved, resolve=True))
        atomic_write_json(rd.manifest_path, manifest)
    dist.barrier()

    batches = [tuple(st.seeds)] if runner.batched else [(s,) for s in st.seeds]
    real_cache: Dict[Tuple[int, ...], np.ndarray] = {}
    for workflow in st.workflows:
        for method in st.methods:
            for seeds in batches:
                done = min(int(manifest["completed"].get(_unit_key(workflow, method, s), 0)) for s in seeds)
                if done >= st.generations:
                    continue
                if seeds not in real_cache:
                    real_cache.clear()
                    real_cache[seeds] = runner.real_data(need_real, [derive_seed(s, "real") for s in seeds])
                _run_stream(runner, rd, manifest, st, workflow, method, seeds, real_cache[seeds], done, hooks, dist)
    real_cache.clear()

    result = LoopResult(rd.root, rd.root / "metrics.csv", rd.root / "metrics.json", [])
    rows = collect_rows(rd.root, st)
    result.rows = rows
    if dist.rank == 0:
        write_metrics_csv(rows, result.metrics_csv)
        _write_metrics_json(rows, result.metrics_json, manifest, st)
        if plots:
            result.plots = plot_metrics(rows, rd.root / "plots", title=f"{st.model}: n_r={st.num_real}, n_s={st.num_synthetic}")
        manifest["finished"] = True
        manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        atomic_write_json(rd.manifest_path, manifest)
    dist.barrier()
    result.wall_time_s = time.time() - start_time
    return result


def _run_stream(runner: _Runner, rd: _RunDir, manifest: dict, st: _Settings, workflow: str, method: str,
                seeds: Tuple[int, ...], real_all: np.ndarray, done: int,
                hooks: Optional[Callable[[StepInfo], None]], dist: Distributed) -> None:
    """Generations done+1..G of one (workflow, method, seed batch) stream."""
    n_r, n_s, G = st.num_real, st.num_synthetic, st.generations
    pool = SamplePool(real_all[:, : required_real(workflow, G, n_r)], n_s, G, keeps_history(workflow))
    reload = range(1, done + 1) if keeps_history(workflow) else range(max(done, 1), done + 1)
    for g in reload:
        pool.add(g, _load_synthetic(rd.synthetic(workflow, method, seeds, g), seeds, n_s))
    eval_seeds = [derive_seed(s, "eval") for s in seeds]
    stream_key = (workflow, method, seeds)
    for t in range(done + 1, G + 1):
        if workflow == "accumulate-subsample":
            sets = [compose(workflow, t, num_real=n_r, num_synthetic=n_s, seed=derive_seed(s, "subsample", workflow, t),
                            subsample_size=st.subsample_size) for s in seeds]
        else:
            sets = [compose(workflow, t, num_real=n_r, num_synthetic=n_s)] * len(seeds)
        train = pool.training_data(sets, key=stream_key if t > 1 else (_SHARED, method, seeds))
        workdir = rd.workdir(workflow, method, seeds, t)
        previous = rd.workdir(workflow, method, seeds, t - 1) if (st.init == "previous" and t > 1) else None

        def hook(phase: str) -> None:
            if hooks is not None:
                hooks(StepInfo(phase, workflow, method, seeds, t, workdir))

        runner.fit(train, generation=t, seeds=[derive_seed(s, "fit", t) for s in seeds], workdir=workdir,
                   previous=previous, method=method)
        hook("fit")
        syn_path = rd.synthetic(workflow, method, seeds, t)
        if syn_path.is_file():  # a previous attempt (or, for generation 1, another workflow) made it
            samples = _load_synthetic(syn_path, seeds, n_s)
        else:
            samples = runner.sample(n_s, [derive_seed(s, "sample", t) for s in seeds])
            if np.issubdtype(samples.dtype, np.floating) and not np.all(np.isfinite(samples)):
                raise LoopError(f"{workflow}/{method} generation {t}: the model produced non-finite samples (seeds {list(seeds)})")
            if dist.rank == 0:
                _save_npz(syn_path, samples=samples, seeds=np.asarray(seeds, dtype=np.int64),
                          generation=np.asarray(t))
            dist.barrier()
        if dist.rank == 0 and getattr(runner.model, "sample_figures", False):
            fig = rd.figure(workflow, method, seeds, t)
            if not fig.is_file():
                _sample_figure(samples[0], real_all[0, :n_r], fig, f"{workflow}/{method} generation {t}")
        hook("sample")
        if st.num_eval is None:
            metrics = runner.evaluate(samples, eval_seeds)
        else:
            # the same seeds in every generation: common random numbers for the comparison across generations
            metrics = runner.evaluate(runner.sample(st.num_eval, [derive_seed(s, "eval-sample") for s in seeds]),
                                      eval_seeds)
        hook("evaluate")
        if dist.rank == 0:
            record = {
                "workflow": workflow, "method": method, "generation": t, "seeds": list(seeds),
                "train_size": [ts.size for ts in sets],
                "real_fraction": [ts.real_fraction for ts in sets],
                "metrics": {k: [float(x) for x in v] for k, v in metrics.items()},
            }
            atomic_write_json(rd.unit(workflow, method, seeds, t), record)
            for s in seeds:
                manifest["completed"][_unit_key(workflow, method, s)] = t
            manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            atomic_write_json(rd.manifest_path, manifest)
        else:
            for s in seeds:
                manifest["completed"][_unit_key(workflow, method, s)] = t
        dist.barrier()
        hook("record")
        if log.isEnabledFor(logging.INFO):
            summary = ", ".join(f"{k}={np.mean(v):.4g}" for k, v in metrics.items())
            log.info("%s/%s %s generation %d/%d: %s", workflow, method, batch_name(seeds), t, G, summary)
        if t < G:
            pool.add(t, samples)


def _sample_figure(samples: np.ndarray, real: np.ndarray, path: Path, title: str) -> None:
    """A grid of the first 100 images, or a scatter of 2-D samples over the real points (first seed)."""
    import torch

    from sims.generation import save_sample_figure

    if samples.ndim == 4:
        save_sample_figure(torch.from_numpy(np.ascontiguousarray(samples[:100])), path)
    elif samples.ndim == 2 and samples.shape[1] >= 2:
        save_sample_figure(torch.from_numpy(samples[:, :2]), path, reference=real[:, :2], title=title)


def _load_synthetic(path: Path, seeds: Sequence[int], num: int) -> np.ndarray:
    try:
        with np.load(path) as z:
            samples, stored = z["samples"], z["seeds"]
    except (OSError, KeyError, ValueError) as exc:
        raise LoopError(f"cannot read synthetic data {path}: {exc}; delete the run directory to start over") from None
    if list(stored) != list(seeds) or samples.shape[:2] != (len(seeds), num):
        raise LoopError(f"{path} holds seeds {list(stored)} / shape {samples.shape}, expected seeds {list(seeds)} "
                        f"and ({len(seeds)}, {num}, ...); the run directory is damaged, delete it to start over")
    return samples


# ----------------------------------------------------------------------------------------------
# Outputs: metrics.csv, metrics.json, plots


def _metric_order(names: Iterable[str]) -> List[str]:
    names = set(names)
    return [m for m in KNOWN_METRICS if m in names] + sorted(names - set(KNOWN_METRICS))


def collect_rows(run_dir: Union[str, Path], st: Optional[_Settings] = None) -> List[Dict[str, Any]]:
    """Per-seed and aggregate rows from the unit records of ``run_dir``.

    Per-seed rows: ``generation, workflow, method, seed (int), train_size, real_fraction, <metrics>``;
    then for every (workflow, method, generation) with any seeds, rows with seed ``mean``, ``std``
    (ddof 1; NaN for one seed) and ``ci95`` (half-width t_{0.975, S-1} std / sqrt(S)).
    Rows are ordered by workflow and method (config order when ``st`` is given), generation, seed.
    """
    root = Path(run_dir) / "units"
    records = []
    for path in sorted(root.glob("*/*/*/gen*.json")) if root.is_dir() else []:
        rec = json.loads(path.read_text(encoding="utf-8"))
        if st is not None and (rec["workflow"] not in st.workflows or rec["method"] not in st.methods
                               or rec["generation"] > st.generations or not set(rec["seeds"]) <= set(st.seeds)):
            continue
        records.append(rec)
    wf_order = {w: i for i, w in enumerate(st.workflows if st else WORKFLOWS)}
    me_order = {m: i for i, m in enumerate(st.methods if st else METHODS)}
    groups: Dict[Tuple[str, str, int], List[Dict[str, Any]]] = {}
    for rec in records:
        for i, seed in enumerate(rec["seeds"]):
            row = {"generation": rec["generation"], "workflow": rec["workflow"], "method": rec["method"], "seed": seed,
                   "train_size": rec["train_size"][i], "real_fraction": rec["real_fraction"][i]}
            row.update({k: v[i] for k, v in rec["metrics"].items()})
            groups.setdefault((rec["workflow"], rec["method"], rec["generation"]), []).append(row)
    rows: List[Dict[str, Any]] = []
    for key in sorted(groups, key=lambda k: (wf_order.get(k[0], 99), k[0], me_order.get(k[1], 99), k[1], k[2])):
        per_seed = sorted(groups[key], key=lambda r: r["seed"])
        rows.extend(per_seed)
        rows.extend(aggregate_rows(per_seed))
    return rows


def aggregate_rows(per_seed: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The ``mean``, ``std`` and ``ci95`` (Student t, 95%) rows of one (generation, workflow, method)
    from its per-seed rows (std and ci95 are NaN for one seed)."""
    base = {k: per_seed[0][k] for k in ("generation", "workflow", "method")}
    base["train_size"] = int(round(np.mean([r["train_size"] for r in per_seed])))  # equal for all seeds
    base["real_fraction"] = float(np.mean([r["real_fraction"] for r in per_seed]))  # mean over seeds
    names = _metric_order(k for r in per_seed for k in r if k not in META_COLUMNS)
    n = len(per_seed)
    out = {a: dict(base, seed=a) for a in AGGREGATES}
    if n > 1:
        from scipy.stats import t as student_t

        tq = float(student_t.ppf(0.975, n - 1))
    for name in names:
        vals = np.array([r.get(name, np.nan) for r in per_seed], dtype=np.float64)
        mean = float(np.mean(vals))
        std = float(np.std(vals, ddof=1)) if n > 1 else math.nan
        out["mean"][name] = mean
        out["std"][name] = std
        out["ci95"][name] = tq * std / math.sqrt(n) if n > 1 else math.nan
    return [out[a] for a in AGGREGATES]


def metric_columns(rows: Iterable[Mapping[str, Any]]) -> List[str]:
    """Metric column names present in ``rows`` (SPEC order first)."""
    return _metric_order(k for r in rows for k in r if k not in META_COLUMNS)


def write_metrics_csv(rows: Sequence[Mapping[str, Any]], path: Union[str, Path]) -> None:
    """Write rows (see :func:`collect_rows`) as CSV, atomically; floats in full precision (repr)."""
    cols = list(META_COLUMNS) + metric_columns(rows)

    def fmt(v: Any) -> str:
        if v is None:
            return ""
        return repr(float(v)) if isinstance(v, (float, np.floating)) else str(v)

    lines = [",".join(cols)] + [",".join(fmt(r.get(c)) for c in cols) for r in rows]
    atomic_write_text(Path(path), "\n".join(lines) + "\n")


def read_metrics_csv(path: Union[str, Path]) -> List[Dict[str, Any]]:
    """Read a metrics.csv written by :func:`write_metrics_csv` (numbers parsed; seed stays a
    string for aggregate rows, int otherwise).

    Raises:
        LoopError: missing file or missing columns.
    """
    path = Path(path)
    if not path.is_file():
        raise LoopError(f"no metrics file {path}")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = set(META_COLUMNS) - set(reader.fieldnames or [])
        if missing:
            raise LoopError(f"{path} lacks columns {sorted(missing)}; is it a sims loop metrics.csv?")
        rows = []
        for r in reader:
            row: Dict[str, Any] = {"workflow": r["workflow"], "method": r["method"], "generation": int(r["generation"]),
                                   "seed": r["seed"] if r["seed"] in AGGREGATES else int(r["seed"]),
                                   "train_size": int(r["train_size"]), "real_fraction": float(r["real_fraction"])}
            for k, v in r.items():
                if k not in META_COLUMNS:
                    row[k] = float(v) if v not in ("", None) else math.nan
            rows.append(row)
    return rows


def series(rows: Sequence[Mapping[str, Any]], metric: str) -> Dict[Tuple[str, str], Dict[str, np.ndarray]]:
    """Per (workflow, method): arrays ``generation``, ``mean``, ``ci95``, ``std`` of ``metric``
    from the aggregate rows, and ``per_seed`` [S, G] from the per-seed rows (NaN where missing)."""
    out: Dict[Tuple[str, str], Dict[str, Any]] = {}
    for r in rows:
        if metric not in r:
            continue
        d = out.setdefault((r["workflow"], r["method"]), {"agg": {}, "seeds": {}})
        if r["seed"] in AGGREGATES:
            d["agg"].setdefault(r["generation"], {})[r["seed"]] = r[metric]
        else:
            d["seeds"].setdefault(r["seed"], {})[r["generation"]] = r[metric]
    result = {}
    for key, d in out.items():
        gens = sorted(d["agg"])
        seeds = sorted(d["seeds"])
        result[key] = {
            "generation": np.array(gens),
            **{a: np.array([d["agg"][g].get(a, math.nan) for g in gens], dtype=float) for a in AGGREGATES},
            "seeds": np.array(seeds),
            "per_seed": np.array([[d["seeds"][s].get(g, math.nan) for g in gens] for s in seeds], dtype=float)
            if seeds else np.empty((0, len(gens))),
        }
    return result


def _write_metrics_json(rows: List[Dict[str, Any]], path: Path, manifest: Mapping, st: _Settings) -> None:
    metrics = metric_columns(rows)
    out: Dict[str, Any] = {
        "format": MANIFEST_FORMAT, "config_hash": manifest["config_hash"], "model": st.model,
        "generations": st.generations, "num_real": st.num_real, "num_synthetic": st.num_synthetic,
        "num_eval": st.num_eval if st.num_eval is not None else st.num_synthetic,
        "seeds": list(st.seeds), "metrics": metrics, "series": {},
    }
    for metric in metrics:
        for (wf, method), s in series(rows, metric).items():
            d = out["series"].setdefault(wf, {}).setdefault(method, {})
            d[metric] = {
                "generation": s["generation"].tolist(),
                **{a: [None if math.isnan(v) else v for v in s[a].tolist()] for a in AGGREGATES},
                "per_seed": {str(seed): [None if math.isnan(v) else v for v in vals]
                             for seed, vals in zip(s["seeds"].tolist(), s["per_seed"].tolist())},
            }
    sizes: Dict[str, Dict[str, List[Any]]] = {}
    for r in rows:
        if r["seed"] == "mean" and r["method"] == st.methods[0]:
            d = sizes.setdefault(r["workflow"], {"train_size": [], "real_fraction": []})
            d["train_size"].append(r["train_size"])
            d["real_fraction"].append(r["real_fraction"])
    out["training_sets"] = sizes
    atomic_write_json(path, out)


def use_log_scale(values: np.ndarray) -> bool:
    """Log y-axis when every finite value is positive and they span more than a factor 20."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return bool(v.size and v.min() > 0 and v.max() / v.min() > 20)


def plot_metrics(rows: Sequence[Mapping[str, Any]], out_dir: Union[str, Path], *, title: str = "",
                 metrics: Optional[Sequence[str]] = None, label_prefix: str = "") -> List[Path]:
    """One PNG per metric vs generation: a line per (workflow, method) = mean over seeds, with a
    shaded band mean +/- ci95 (95% t interval over seeds); log y-axis where :func:`use_log_scale`.

    Uses matplotlib's Agg canvas directly (no global backend switch). Returns the paths written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    out_dir = Path(out_dir)
    paths = []
    for metric in metrics or metric_columns(rows):
        data = series(rows, metric)
        if not data:
            continue
        fig = Figure(figsize=(7, 4.5))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        allv = np.concatenate([d["mean"] for d in data.values()])
        log_y = use_log_scale(allv)
        floor = np.nanmin(allv[allv > 0]) / 10 if log_y else None
        colours: Dict[str, str] = {}
        for (wf, method), d in data.items():
            label = f"{label_prefix}{wf}" + ("" if method == "standard" else f" ({method})")
            colour = colours.setdefault(wf, f"C{len(colours) % 10}")  # one colour per workflow
            style = "-" if method == "standard" else "--"  # one line style per method
            ax.plot(d["generation"], d["mean"], label=label, lw=1.6, color=colour, ls=style)
            ci = np.nan_to_num(d["ci95"], nan=0.0)
            lo, hi = d["mean"] - ci, d["mean"] + ci
            if log_y:
                lo = np.maximum(lo, floor)
            ax.fill_between(d["generation"], lo, hi, color=colour, alpha=0.15, lw=0)
        if log_y:
            ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("generation")
        ax.set_ylabel(metric)
        ax.set_title(f"{title}  {metric} (mean over seeds, band: 95% CI)".strip(), fontsize=9)
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{metric}.png"
        atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))
        paths.append(path)
    return paths
