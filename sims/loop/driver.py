"""The generation-loop driver: one stream of generations per (workflow, method, seed batch).

See :mod:`sims.loop` for the protocol, the seeds and the run directory. Two mechanisms keep cheap
models (the Gaussian and KDE toys) from paying more for bookkeeping than for their math:

- a model with ``recompute_synthetic = True`` (:class:`~sims.loop.protocol.GenerativeModel`) has
  its synthetic data kept in memory only; a resumed stream replays its completed generations;
- unit records and the manifest are written in batches (:class:`_Records`, at least every
  :data:`RECORD_FLUSH_S` seconds, at the end of each stream and when a stream stops on an
  exception), so a model that takes less than that per generation does not rewrite the manifest
  for every unit; derived seeds are computed vectorised (:func:`derive_seeds`) and memoised.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
from omegaconf import DictConfig, OmegaConf

from sims.data.workflows import SamplePool, check_real_available, compose, keeps_history, required_real
from sims.dist import DistContext, single_process
from sims.errors import ConfigMismatchError, LoopError, WorkflowError
from sims.loop.protocol import GenerativeModel
from sims.loop.registry import available_models, model_spec
from sims.loop.report import collect_rows, plot_metrics, write_metrics_csv, write_metrics_json
from sims.loop.runner import RECORD_FLUSH_S, _Records, _Runner, _SeedCache, derive_seeds  # noqa: F401
from sims.loop.rundir import (_SHARED, MANIFEST_FORMAT, RunDir, StepInfo, batch_name, completed_units,
                              describe_mismatch, load_synthetic, sample_figure, save_npz, unit_key)
from sims.loop.settings import Settings, config_hash, hashed_config, settings
from sims.utils import atomic_write_json, atomic_write_text

log = logging.getLogger("sims.loop")


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
    records, derived = _Records(ctx, rd, manifest), _SeedCache(st.generations)
    for workflow in st.workflows:
        for method in st.methods:
            for seeds in batches:
                done = min(int(manifest["completed"].get(unit_key(workflow, method, s), 0)) for s in seeds)
                if done >= st.generations:
                    continue
                if seeds not in real_cache:
                    real_cache.clear()
                    real_cache[seeds] = runner.real_data(need_real, derived(seeds, "real"))
                _run_stream(runner, rd, records, st, workflow, method, seeds, real_cache[seeds], done, hooks, ctx,
                            derived)
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


def _run_stream(runner: _Runner, rd: RunDir, records: _Records, st: Settings, workflow: str, method: str,
                seeds: Tuple[int, ...], real_all: np.ndarray, done: int,
                hooks: Optional[Callable[[StepInfo], None]], ctx: DistContext, derived: _SeedCache) -> None:
    """Generations done+1..G of one (workflow, method, seed batch) stream."""
    try:
        _stream_generations(runner, rd, records, st, workflow, method, seeds, real_all, done, hooks, ctx, derived)
    finally:
        records.flush()


def _stream_generations(runner: _Runner, rd: RunDir, records: _Records, st: Settings, workflow: str, method: str,
                        seeds: Tuple[int, ...], real_all: np.ndarray, done: int,
                        hooks: Optional[Callable[[StepInfo], None]], ctx: DistContext, derived: _SeedCache) -> None:
    n_r, n_s, G = st.num_real, st.num_synthetic, st.generations
    recompute = bool(getattr(runner.model, "recompute_synthetic", False))
    pool = SamplePool(real_all[:, : required_real(workflow, G, n_r)], n_s, G, keeps_history(workflow))
    stream_key = (workflow, method, seeds)

    def training_sets(t: int):
        if workflow == "accumulate-subsample":
            return [compose(workflow, t, num_real=n_r, num_synthetic=n_s, seed=sub_seed,
                            subsample_size=st.subsample_size) for sub_seed in derived(seeds, "subsample", workflow, t)]
        return [compose(workflow, t, num_real=n_r, num_synthetic=n_s)] * len(seeds)

    def fit(t: int, sets) -> Path:
        train = pool.training_data(sets, key=stream_key if t > 1 else (_SHARED, method, seeds))
        workdir = rd.workdir(workflow, method, seeds, t)
        previous = rd.workdir(workflow, method, seeds, t - 1) if (st.init == "previous" and t > 1) else None
        runner.fit(train, generation=t, seeds=derived(seeds, "fit", t), workdir=workdir, previous=previous,
                   method=method)
        return workdir

    def sample(t: int) -> np.ndarray:
        samples = runner.sample(n_s, derived(seeds, "sample", t))
        if np.issubdtype(samples.dtype, np.floating) and not np.all(np.isfinite(samples)):
            raise LoopError(f"{workflow}/{method} generation {t}: the model produced non-finite samples (seeds {list(seeds)})")
        return samples

    if recompute:
        # synthetic data is not stored: replay the completed generations (fit + sample, no records)
        for t in range(1, done + 1):
            fit(t, training_sets(t))
            pool.add(t, sample(t))
    else:
        reload = range(1, done + 1) if keeps_history(workflow) else range(max(done, 1), done + 1)
        for g in reload:
            pool.add(g, load_synthetic(rd.synthetic(workflow, method, seeds, g), seeds, n_s))
    eval_seeds = derived(seeds, "eval")
    for t in range(done + 1, G + 1):
        sets = training_sets(t)
        workdir = fit(t, sets)

        def hook(phase: str) -> None:
            if hooks is not None:
                hooks(StepInfo(phase, workflow, method, seeds, t, workdir))

        hook("fit")
        syn_path = rd.synthetic(workflow, method, seeds, t)
        if recompute:
            samples = sample(t)
        elif syn_path.is_file():  # a previous attempt (or, for generation 1, another workflow) made it
            samples = load_synthetic(syn_path, seeds, n_s)
        else:
            samples = sample(t)
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
            metrics = runner.evaluate(runner.sample(st.num_eval, derived(seeds, "eval-sample")), eval_seeds)
        hook("evaluate")
        record = {
            "workflow": workflow, "method": method, "generation": t, "seeds": list(seeds),
            "train_size": [ts.size for ts in sets],
            "real_fraction": [ts.real_fraction for ts in sets],
            "metrics": {k: [float(x) for x in v] for k, v in metrics.items()},
        }
        records.add(rd.unit(workflow, method, seeds, t), record, [unit_key(workflow, method, s) for s in seeds], t)
        ctx.barrier()
        hook("record")
        if log.isEnabledFor(logging.INFO):
            summary = ", ".join(f"{k}={np.mean(v):.4g}" for k, v in metrics.items())
            log.info("%s/%s %s generation %d/%d: %s", workflow, method, batch_name(seeds), t, G, summary)
        if t < G:
            pool.add(t, samples)
