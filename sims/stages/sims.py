"""SIMS (Alemohammad et al. 2024, arXiv 2408.16333, Algorithm 1) after the base model: synthetic set
→ auxiliary fine-tune → guided evaluation by the selection/report protocol (SPEC §4).

Protocol: every setting chosen by looking at a metric — ω (``sims.omegas``), the auxiliary snapshot
(``sims.aux_snapshot_every_kimg``) and the EMA lengths of base and auxiliary
(``train.ema_halflives_kimg``, ``sims.aux_ema_halflives_kimg``) — is chosen by the mean Fréchet
distance over the *selection* seed sets. The base model alone (ω = 0, with the EMA that is best
unguided, chosen the same way) and the chosen SIMS setting are then evaluated once on each
disjoint *report* seed set. Every evaluation is cached in ``eval/results.json`` as soon as it is
done, so a killed sweep resumes and reuses finished cells.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from omegaconf import DictConfig

from sims.config import to_container
from sims.dist import DistContext
from sims.stages.aux import finetune_aux
from sims.stages.evaluate import (Reference, build_reference, digits_judge, evaluate_denoiser, feature_name,
                                  make_extractor)
from sims.stages.rundir import check_compatible, weights_file
from sims.stages.seeds import check_seed_sets
from sims.stages.synthetic import make_synthetic
from sims.training.callbacks import snapshot_kimg
from sims.training.export import load_denoiser, weights_sha256
from sims.training.module import ema_key
from sims.utils import atomic_write_json

log = logging.getLogger("sims")


@dataclass(frozen=True)
class Cell:
    """One setting of the sweep: ω, auxiliary snapshot (None: the final model), base and auxiliary EMA
    (``""``: the main one, else an :func:`ema_key`)."""

    omega: float
    aux_snapshot: Optional[str] = None
    base_ema: str = ""
    aux_ema: str = ""

    def key(self, kind: str, offset: int) -> str:
        if self.omega == 0:
            return f"{kind}|omega=0|base_ema={self.base_ema}|seeds={offset}"
        return (f"{kind}|omega={self.omega:g}|snap={self.aux_snapshot or 'final'}|base_ema={self.base_ema}"
                f"|aux_ema={self.aux_ema}|seeds={offset}")


def sweep_cells(cfg: DictConfig, aux_dir: Path) -> List[Cell]:
    """ω × auxiliary snapshot × base EMA × auxiliary EMA (ω = 0 once per base EMA)."""
    base_emas = [""] + [ema_key(h) for h in cfg.train.ema_halflives_kimg]
    aux_emas = [""] + [ema_key(h) for h in cfg.sims.aux_ema_halflives_kimg]
    snaps: List[Optional[str]] = [None]
    root = Path(aux_dir) / "snapshots"
    if root.is_dir():
        snaps = sorted((p.name for p in root.iterdir() if (p / "ema.safetensors").is_file()), key=snapshot_kimg)
        snaps = [*snaps, None]
    cells = []
    for w in sorted({float(x) for x in cfg.sims.omegas} | {0.0}):
        if w == 0:
            cells += [Cell(0.0, None, b) for b in base_emas]
        else:
            cells += [Cell(w, s, b, a) for s in snaps for b in base_emas for a in aux_emas]
    return cells


class WeightsCache:
    """Loads each exported weights file once (base/aux EMAs and snapshots) on the job's device."""

    def __init__(self, device):
        self.device = device
        self._cache: Dict[Path, Tuple[Any, dict, str]] = {}

    def get(self, path: Path):
        if path not in self._cache:
            net, meta = load_denoiser(path, self.device)
            self._cache[path] = (net, meta, weights_sha256(path))
        return self._cache[path]


def cell_provenance(cell: Cell, base, aux, cfg: DictConfig) -> Dict[str, Any]:
    """Where a result came from: weights (SHA-256, kimg, EMA length), ω, σ-interval."""
    out = {"omega": cell.omega, "base_ema": cell.base_ema, "base_sha256": base[2], "base_kimg": base[1].get("kimg"),
           "base_ema_halflife_kimg": base[1].get("ema_halflife_kimg"),
           "sigma_interval": list(cfg.sims.sigma_interval) if cfg.sims.sigma_interval and cell.omega else None}
    if aux is not None and cell.omega != 0:
        out.update({"aux_snapshot": cell.aux_snapshot, "aux_ema": cell.aux_ema, "aux_sha256": aux[2],
                    "aux_kimg": aux[1].get("kimg"), "aux_ema_halflife_kimg": aux[1].get("ema_halflife_kimg")})
    return out


def run_cells(ctx: DistContext, cfg: DictConfig, kind: str, cells: Sequence[Cell], offsets: Sequence[int], n: int, *,
              results: Dict[str, Any], results_path: Path, run_dir: Path, weights: WeightsCache, extractor,
              reference: Reference, judges, extra_references: Optional[Dict[str, Reference]] = None) -> None:
    """Evaluate every (cell, seed set) not yet in ``results``; each result is saved as it is done."""
    sampler = to_container(cfg.sampler)
    for offset in offsets:
        for cell in cells:
            key = cell.key(kind, offset)
            if key in results:
                continue
            base = weights.get(weights_file(run_dir / "base", cell.base_ema))
            aux = None
            if cell.omega != 0:
                aux = weights.get(weights_file(run_dir / "aux", cell.aux_ema, cell.aux_snapshot))
                check_compatible(base[1], aux[1], run_dir / "aux")
            row = evaluate_denoiser(ctx, base[0], range(int(offset), int(offset) + int(n)),
                                    data_shape=base[1]["data_shape"], label_dim=int(base[1]["label_dim"]),
                                    sampler=sampler, batch_size=int(cfg.sampler.batch_size), extractor=extractor,
                                    reference=reference, aux=aux[0] if aux else None, omega=cell.omega,
                                    sigma_interval=cfg.sims.sigma_interval, judges=judges,
                                    extra_references=extra_references)
            row.update({"kind": kind, "seed_offset": int(offset), **cell_provenance(cell, base, aux, cfg),
                        **reference.provenance()})
            results[key] = row
            if ctx.is_main:
                atomic_write_json(results_path, results)
                pr = f" precision={row['precision']:.3f}" if row.get("precision") is not None else ""
                print(f"[sims] {key}: fd={row['fd']:.4f}{pr} nfe={row['nfe']:.1f}", flush=True)


def best_cell(cells: Sequence[Cell], results: Dict[str, Any], offsets: Sequence[int]) -> Tuple[Cell, float]:
    """The cell with the lowest mean FD over the selection sets ``offsets`` (ties: the first)."""
    scored = [(sum(results[c.key("sel", o)]["fd"] for o in offsets) / len(offsets), i, c) for i, c in enumerate(cells)]
    fd, _, cell = min(scored)
    return cell, fd


def run_sims(ctx: DistContext, cfg: DictConfig, run_dir: Path, dataset, base_weights: Path) -> Optional[Path]:
    """SIMS Algorithm 1 steps 2–4 after the base model: resumable stages under ``run_dir`` (collective).
    With ``sims.control.enabled`` the auxiliary's set is composed by a judge
    (:mod:`sims.stages.control_stage`) and the report adds the group shares.

    Returns:
        ``eval/report.json`` (on every rank).
    """
    from sims.stages.control_stage import control_judges, controlled_synthetic, target_distance, target_reference
    from sims.stages.report import summarize, write_report

    check_seed_sets(cfg)
    run_dir = Path(run_dir)
    base, meta = load_denoiser(base_weights, ctx.device)
    shape, label_dim = tuple(meta["data_shape"]), int(meta["label_dim"])
    s = cfg.sims
    fname = feature_name(s.features, cfg.data.name, len(shape) == 3)
    control = bool(s.control.enabled)
    judges = (control_judges(cfg, ctx.device, int(dataset.num_classes)) if control
              else [digits_judge(ctx.device)] if fname == "digits" else [])
    info = {"model_sha256": weights_sha256(base_weights)}
    record = None
    if control:
        synthetic, record = controlled_synthetic(ctx, cfg, base, run_dir / "synthetic", judges[0], data_shape=shape,
                                                 label_dim=label_dim, info=info)
    else:
        seeds = range(int(s.synthetic_seed_offset), int(s.synthetic_seed_offset) + int(s.num_synthetic))
        synthetic = make_synthetic(ctx, base, run_dir / "synthetic", seeds, data_shape=shape, label_dim=label_dim,
                                   sampler=to_container(cfg.sampler), batch_size=int(cfg.sampler.batch_size), info=info)
    del base
    finetune_aux(ctx, cfg, base_weights, synthetic, run_dir / "aux")

    eval_dir = run_dir / "eval"
    if ctx.is_main:
        eval_dir.mkdir(parents=True, exist_ok=True)
    ctx.barrier()
    extractor = make_extractor(fname, data_dim=int(dataset.dim), inception_weights=s.inception_weights,
                               device=ctx.device)
    pr_size = min(int(s.selection_num_samples), int(s.report_num_samples))
    reference = build_reference(ctx, extractor, fname, dataset, reference_path=s.reference, pr_size=pr_size,
                                save_to=eval_dir / "reference.npz")
    extra = None
    if control and dataset.labels is not None:
        tref = target_reference(reference, dataset.labels, record["target"]) if ctx.is_main else None
        tref = ctx.broadcast_object(tref)
        extra = {"target": tref} if tref is not None else None
    results_path = eval_dir / "results.json"
    results: Dict[str, Any] = json.loads(results_path.read_text()) if results_path.exists() else {}
    weights = WeightsCache(ctx.device)
    cells = sweep_cells(cfg, run_dir / "aux")
    sel = [int(o) for o in s.selection_seed_offsets]
    common = dict(results=results, results_path=results_path, run_dir=run_dir, weights=weights, extractor=extractor,
                  reference=reference, judges=judges, extra_references=extra)
    run_cells(ctx, cfg, "sel", cells, sel, s.selection_num_samples, **common)
    chosen, _ = best_cell(cells, results, sel)
    unguided, _ = best_cell([c for c in cells if c.omega == 0], results, sel)
    finals = [unguided, chosen]
    target_cell = None
    if control:
        given = {int(k): float(v) for k, v in record["target_given"].items()}
        target_cell = min(cells, key=lambda c: (np.mean([target_distance(results[c.key("sel", o)], judges[0].name,
                                                                         given) for o in sel]), c.omega))
        finals.append(target_cell)
    rep = [int(o) for o in s.report_seed_offsets]
    finals = list(dict.fromkeys(finals))
    run_cells(ctx, cfg, "rep", finals, rep, s.report_num_samples, **common)
    report = summarize(cfg, results, cells, chosen, unguided, reference, label_dim)
    if control:
        from sims.stages.control_stage import control_summary

        report["control"] = control_summary(results, cells, record, [j.name for j in judges], sel, rep, unguided,
                                            target_cell, chosen, int(s.report_num_samples))
    if ctx.is_main:
        write_report(ctx, cfg, eval_dir, report, reference, weights, run_dir, chosen, unguided, shape, label_dim)
    ctx.barrier()
    return eval_dir / "report.json"
