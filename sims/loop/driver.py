"""The generation-loop driver: one stream of generations per (workflow, method, seed batch).

See :mod:`sims.loop` for the protocol, the seeds and the run directory.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from omegaconf import DictConfig, OmegaConf

from sims.data.workflows import SamplePool, TrainingData, check_real_available, compose, keeps_history, required_real
from sims.dist import DistContext, single_process
from sims.errors import ConfigMismatchError, LoopError, WorkflowError
from sims.loop.protocol import GenerativeModel
from sims.loop.registry import available_models, model_spec
from sims.loop.report import collect_rows, plot_metrics, write_metrics_csv, write_metrics_json
from sims.loop.rundir import (_SHARED, MANIFEST_FORMAT, RunDir, StepInfo, batch_name, completed_units,
                              describe_mismatch, load_synthetic, sample_figure, save_npz, unit_key)
from sims.loop.settings import Settings, config_hash, hashed_config, settings
from sims.utils import atomic_write_json, atomic_write_text, derive_seed

log = logging.getLogger("sims.loop")


class _Runner:
    """One batched interface over batched and per-seed models."""

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
    ctx: Optional[DistContext] = None,
    model: Optional[GenerativeModel] = None,
    hooks: Optional[Callable[[StepInfo], None]] = None,
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
        ctx: the job's :class:`~sims.dist.DistContext` (default: one process). All ranks call
            ``run_loop``; rank 0 writes.
        model: use this model instead of the registry's (the config hash still uses the registry
            entry of ``cfg.loop.model`` if there is one).
        hooks: called with a :class:`StepInfo` after each phase of each generation (progress
            reporting; tests raise from it to simulate a crash).
        plots: write plots/<metric>.png.
    Returns:
        :class:`LoopResult` (paths and the rows of metrics.csv).
    Raises:
        LoopError: invalid loop settings (unknown workflow/method, method unsupported by the
            model, bad sizes), too little real data, or a damaged run directory.
        ConfigMismatchError: ``run_dir`` was created by a different configuration.
    """
    start_time = time.time()
    ctx = ctx if ctx is not None else single_process()
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(cfg)
    if run_dir is None:
        run_dir = cfg.get("run_dir") if not OmegaConf.is_missing(cfg, "run_dir") else None
        if not run_dir:
            raise LoopError("no run directory: pass run_dir or set run_dir=... in the config")
    st = settings(cfg)
    spec = model_spec(st.model) if model is None or st.model in available_models() else None
    if model is None:
        model = spec.load()(cfg, ctx)
    runner = _Runner(model)
    need_real = _check_model(model, st)
    rd = RunDir(Path(run_dir))
    manifest = _open_run_dir(ctx, cfg, rd, st, hashed_config(cfg, spec.config_keys if spec else None))

    batches = [tuple(st.seeds)] if runner.batched else [(s,) for s in st.seeds]
    real_cache: Dict[Tuple[int, ...], np.ndarray] = {}
    for workflow in st.workflows:
        for method in st.methods:
            for seeds in batches:
                done = min(int(manifest["completed"].get(unit_key(workflow, method, s), 0)) for s in seeds)
                if done >= st.generations:
                    continue
                if seeds not in real_cache:
                    real_cache.clear()
                    real_cache[seeds] = runner.real_data(need_real, [derive_seed(s, "real") for s in seeds])
                _run_stream(runner, rd, manifest, st, workflow, method, seeds, real_cache[seeds], done, hooks, ctx)
    real_cache.clear()
    result = _finish(ctx, rd, manifest, st, plots)
    result.wall_time_s = time.time() - start_time
    return result


def _check_model(model: GenerativeModel, st: Settings) -> int:
    """The model supports the methods and has enough real data; returns the real samples needed."""
    supported = tuple(getattr(model, "supported_methods", ("standard",)))
    for m in st.methods:
        if m not in supported:
            raise LoopError(
                f"loop.model={st.model!r} does not support method {m!r} (supported: {', '.join(supported)}); "
                "remove it from loop.methods"
            )
    try:
        return check_real_available(st.workflows, st.generations, st.num_real,
                                    getattr(model, "num_real_available", None))
    except WorkflowError as exc:
        raise LoopError(str(exc)) from None


def _open_run_dir(ctx: DistContext, cfg: DictConfig, rd: RunDir, st: Settings, entries: Dict[str, Any]) -> dict:
    """The run's manifest: read (and checked against the config hash) or created; rank 0 writes it."""
    chash = config_hash(entries)
    manifest = rd.read_manifest()
    if manifest is not None:
        if manifest.get("format") != MANIFEST_FORMAT:
            raise LoopError(f"{rd.manifest_path} is not a {MANIFEST_FORMAT} manifest; use a new run_dir")
        if manifest.get("config_hash") != chash:
            raise ConfigMismatchError(
                f"run directory {rd.root} was made by a different configuration "
                f"(hash {manifest.get('config_hash')} vs {chash}: {describe_mismatch(manifest.get('config', {}), entries)}). "
                f"To start fresh, use a new run_dir or delete {rd.root}; to continue it, rerun with its config "
                f"({rd.root / 'config.yaml'})."
            )
        log.info("continuing %s: %d units done", rd.root, len(completed_units(manifest)))
    else:
        manifest = {"format": MANIFEST_FORMAT, "config_hash": chash, "model": st.model, "config": entries,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "completed": {}, "finished": False}
    if ctx.is_main:
        rd.root.mkdir(parents=True, exist_ok=True)
        if not (rd.root / "config.yaml").exists():
            resolved = cfg.copy()
            resolved.run_dir = str(rd.root)
            atomic_write_text(rd.root / "config.yaml", OmegaConf.to_yaml(resolved, resolve=True))
        atomic_write_json(rd.manifest_path, manifest)
    ctx.barrier()
    return manifest


def _finish(ctx: DistContext, rd: RunDir, manifest: dict, st: Settings, plots: bool) -> LoopResult:
    """metrics.csv, metrics.json and the plots from the unit records (rank 0)."""
    result = LoopResult(rd.root, rd.root / "metrics.csv", rd.root / "metrics.json", [])
    rows = collect_rows(rd.root, st)
    result.rows = rows
    if ctx.is_main:
        write_metrics_csv(rows, result.metrics_csv)
        write_metrics_json(rows, result.metrics_json, manifest, st)
        if plots:
            result.plots = plot_metrics(rows, rd.root / "plots", title=f"{st.model}: n_r={st.num_real}, n_s={st.num_synthetic}")
        manifest["finished"] = True
        manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        atomic_write_json(rd.manifest_path, manifest)
    ctx.barrier()
    return result


def _run_stream(runner: _Runner, rd: RunDir, manifest: dict, st: Settings, workflow: str, method: str,
                seeds: Tuple[int, ...], real_all: np.ndarray, done: int,
                hooks: Optional[Callable[[StepInfo], None]], ctx: DistContext) -> None:
    """Generations done+1..G of one (workflow, method, seed batch) stream."""
    n_r, n_s, G = st.num_real, st.num_synthetic, st.generations
    pool = SamplePool(real_all[:, : required_real(workflow, G, n_r)], n_s, G, keeps_history(workflow))
    reload = range(1, done + 1) if keeps_history(workflow) else range(max(done, 1), done + 1)
    for g in reload:
        pool.add(g, load_synthetic(rd.synthetic(workflow, method, seeds, g), seeds, n_s))
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
            samples = load_synthetic(syn_path, seeds, n_s)
        else:
            samples = runner.sample(n_s, [derive_seed(s, "sample", t) for s in seeds])
            if np.issubdtype(samples.dtype, np.floating) and not np.all(np.isfinite(samples)):
                raise LoopError(f"{workflow}/{method} generation {t}: the model produced non-finite samples (seeds {list(seeds)})")
            if ctx.is_main:
                save_npz(syn_path, samples=samples, seeds=np.asarray(seeds, dtype=np.int64),
                          generation=np.asarray(t))
            ctx.barrier()
        if ctx.is_main and getattr(runner.model, "sample_figures", False):
            fig = rd.figure(workflow, method, seeds, t)
            if not fig.is_file():
                sample_figure(samples[0], real_all[0, :n_r], fig, f"{workflow}/{method} generation {t}")
        hook("sample")
        if st.num_eval is None:
            metrics = runner.evaluate(samples, eval_seeds)
        else:
            # the same seeds in every generation: common random numbers for the comparison across generations
            metrics = runner.evaluate(runner.sample(st.num_eval, [derive_seed(s, "eval-sample") for s in seeds]),
                                      eval_seeds)
        hook("evaluate")
        if ctx.is_main:
            record = {
                "workflow": workflow, "method": method, "generation": t, "seeds": list(seeds),
                "train_size": [ts.size for ts in sets],
                "real_fraction": [ts.real_fraction for ts in sets],
                "metrics": {k: [float(x) for x in v] for k, v in metrics.items()},
            }
            atomic_write_json(rd.unit(workflow, method, seeds, t), record)
            for s in seeds:
                manifest["completed"][unit_key(workflow, method, s)] = t
            manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            atomic_write_json(rd.manifest_path, manifest)
        else:
            for s in seeds:
                manifest["completed"][unit_key(workflow, method, s)] = t
        ctx.barrier()
        hook("record")
        if log.isEnabledFor(logging.INFO):
            summary = ", ".join(f"{k}={np.mean(v):.4g}" for k, v in metrics.items())
            log.info("%s/%s %s generation %d/%d: %s", workflow, method, batch_name(seeds), t, G, summary)
        if t < G:
            pool.add(t, samples)
