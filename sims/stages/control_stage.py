"""Distribution control as a SIMS stage (SPEC §1): compose the auxiliary model's synthetic set by a
judge's labels, and summarise what guidance then does to the group shares.

Composition (:func:`controlled_synthetic`): draw base samples (the synthetic store), label them with
the composing judge, measure the base shares b_g, set the auxiliary shares a_g so that the first-order
prediction b_g·(b_g/a_g)^ω*, renormalised, meets the target at ω* = ``sims.control.omega``
(:func:`sims.stages.control.compose_aux_shares`), and pick that many samples of each group in seed
order. When a group has too few samples, more base samples are drawn (the same store, more seeds)
up to ``sims.control.max_synthetic``; beyond that the stage fails *before* the auxiliary fine-tune,
naming the group, its count and the count needed. The choice is written to ``synthetic/control.json``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from omegaconf import DictConfig

from sims.config import to_container
from sims.dist import DistContext
from sims.stages.control import (compose_aux_shares, full_target, group_counts, judge_labels, pool_size_needed,
                                 predicted_shares, select_synthetic, shares_from_labels, shortfall_error)
from sims.stages.control_config import parse_target
from sims.stages.control_judges import load_judge
from sims.stages.control_report import reweighted_moments, share_intervals
from sims.stages.evaluate import Judge, Reference
from sims.stages.synthetic import make_synthetic
from sims.utils import atomic_write_json

log = logging.getLogger("sims")


def control_judges(cfg: DictConfig, device, num_classes: int) -> List[Judge]:
    """The composing judge, then the independent one (if any)."""
    c = cfg.sims.control
    judges = [load_judge(c.judge, device=device, num_classes=num_classes, weights=c.judge_weights)]
    if c.independent_judge:
        judges.append(load_judge(c.independent_judge, device=device, num_classes=num_classes,
                                 weights=c.independent_judge_weights, key="sims.control.independent_judge"))
    return judges


def controlled_synthetic(ctx: DistContext, cfg: DictConfig, base, store_dir: Path, judge: Judge, *, data_shape,
                         label_dim: int, info: Optional[Dict[str, Any]] = None):
    """The auxiliary model's training set under distribution control (collective).

    Returns:
        (the composed :class:`~sims.data.datasets.ArrayDataset` of ``sims.num_synthetic`` samples,
        the composition record also written to ``store_dir/control.json``).
    Raises:
        ConfigError: a group still short after ``sims.control.max_synthetic`` base samples.
    """
    s, c = cfg.sims, cfg.sims.control
    n, offset, cap = int(s.num_synthetic), int(s.synthetic_seed_offset), int(c.max_synthetic)
    target = parse_target(c.target, judge.num_classes)
    pool_n = n
    while True:
        pool = make_synthetic(ctx, base, store_dir, range(offset, offset + pool_n), data_shape=data_shape,
                              label_dim=label_dim, sampler=to_container(cfg.sampler),
                              batch_size=int(cfg.sampler.batch_size), info=info)
        labels = judge_labels(judge, pool.data, device=ctx.device) if ctx.is_main else None
        labels = ctx.broadcast_object(labels)
        b = shares_from_labels(labels, judge.num_classes)
        a = compose_aux_shares(target, b, float(c.omega), float(c.floor))
        counts = group_counts(a, n)
        selection = select_synthetic(labels, counts)
        if selection.ok:
            break
        if pool_n >= cap:
            raise shortfall_error(selection.shortfalls, pool_n, cap)
        pool_n = min(max(pool_size_needed(selection.shortfalls, pool_n), pool_n + 1), cap)
        if ctx.is_main:
            log.info("control: too few samples of some group in %d base samples; drawing %d", len(labels), pool_n)
    record = {"target": {int(k): float(v) for k, v in full_target(target, b).items()},
              "target_given": {int(k): float(v) for k, v in target.items()}, "design_omega": float(c.omega),
              "floor": float(c.floor), "judge": judge.name, "pool_size": int(pool_n),
              "base_shares": {int(k): float(v) for k, v in b.items()},
              "aux_shares": {int(k): float(v) for k, v in a.items()}, "aux_counts": {int(k): int(v) for k, v in counts.items()},
              "predicted_at_design_omega": {int(k): float(v) for k, v in predicted_shares(b, a, float(c.omega)).items()}}
    if ctx.is_main:
        atomic_write_json(Path(store_dir) / "control.json", record)
    return pool.subset(torch.as_tensor(np.sort(np.asarray(selection.indices)))), record


def target_reference(reference: Reference, real_labels: torch.Tensor, target: Dict[int, float]) -> Optional[Reference]:
    """Reference statistics of the real data reweighted to the target shares (rank 0's real
    features, which must cover the whole real set), or None where they are not available."""
    if reference.real_features is None or reference.real_indices is None:
        return None
    labels = real_labels[reference.real_indices].numpy()
    mu, sigma = reweighted_moments(reference.real_features.double().numpy(), labels, target)
    return Reference(mu, sigma, reference.features, reference.version, reference.source + "+reweighted:target",
                     reference.sha256, reference.num_items, 0, note="real data reweighted to the target shares")


def target_distance(row: Dict[str, Any], judge: str, target: Dict[int, float]) -> float:
    """Σ over the target's listed groups of |measured share − target share| (the composing judge's)."""
    shares = row[f"{judge}_class_share"]
    return float(sum(abs(shares[g] - t) for g, t in target.items()))


def control_summary(results: Dict[str, Any], cells, record: Dict[str, Any], judges: Sequence[str],
                    sel: Sequence[int], rep: Sequence[int], base_cell, target_cell, fd_cell, report_n: int) -> Dict:
    """The ``control`` section of report.json: per ω (selection sets, the cell closest to the target
    at that ω) each judge's group shares with 95% Wilson intervals, the first-order prediction, FD to
    the unweighted and to the target-reweighted real data and precision; the report-set figures of
    the base and of the SIMS setting closest to the target (``target_omega``) beside the best-FD ω."""
    given = {int(k): float(v) for k, v in record["target_given"].items()}
    b, a = record["base_shares"], record["aux_shares"]
    per_omega: Dict[float, Any] = {}
    for cell in cells:
        rows = [results[cell.key("sel", o)] for o in sel]
        dist = float(np.mean([target_distance(r, judges[0], given) for r in rows]))
        if cell.omega in per_omega and per_omega[cell.omega]["target_distance"] <= dist:
            continue
        entry = {"omega": cell.omega, "target_distance": dist, "fd": float(np.mean([r["fd"] for r in rows])),
                 "fd_target": (float(np.mean([r["fd_target"] for r in rows])) if "fd_target" in rows[0] else None),
                 "precision": float(np.mean([r["precision"] for r in rows])) if rows[0].get("precision") is not None else None,
                 "predicted": predicted_shares({int(k): v for k, v in b.items()}, {int(k): v for k, v in a.items()},
                                               cell.omega)}
        for j in judges:
            counts = np.sum([np.round(np.asarray(r[f"{j}_class_share"]) * r["num_samples"]) for r in rows], axis=0)
            entry[j] = {"share": (counts / counts.sum()).tolist(), "interval": share_intervals(counts.astype(int)),
                        "confident_fraction": float(np.mean([r[f"{j}_confident_fraction"] for r in rows]))}
        per_omega[cell.omega] = entry

    def on_report(cell) -> Dict[str, Any]:
        rows = [results[cell.key("rep", o)] for o in rep]
        out = {"omega": cell.omega, "fd": float(np.mean([r["fd"] for r in rows])),
               "fd_target": float(np.mean([r["fd_target"] for r in rows])) if "fd_target" in rows[0] else None,
               "precision": float(np.mean([r["precision"] for r in rows])) if rows[0].get("precision") is not None else None}
        for j in judges:
            counts = np.sum([np.round(np.asarray(r[f"{j}_class_share"]) * r["num_samples"]) for r in rows], axis=0)
            out[j] = {"share": (counts / counts.sum()).tolist(), "interval": share_intervals(counts.astype(int)),
                      "confident_fraction": float(np.mean([r[f"{j}_confident_fraction"] for r in rows]))}
        return out

    return {**record, "judges": list(judges), "target_omega": target_cell.omega, "best_fd_omega": fd_cell.omega,
            "selection": [per_omega[w] for w in sorted(per_omega)],
            "report": {"base": on_report(base_cell), "target": on_report(target_cell), "samples_per_set": report_n,
                       "sets": list(rep)}}


def plot_shares(path: Path, control: Dict[str, Any]):
    """Share of each target group vs ω (selection sets), per judge with its 95% interval, the
    first-order prediction dashed and the target drawn in."""
    from sims.figures import new_figure, save_figure

    fig, ax = new_figure(5.5, 3.6)
    om = [e["omega"] for e in control["selection"]]
    for gi, (g, t) in enumerate(sorted((int(k), v) for k, v in control["target_given"].items())):
        for ji, j in enumerate(control["judges"]):
            share = [e[j]["share"][g] for e in control["selection"]]
            lo = [e[j]["interval"][g]["low"] for e in control["selection"]]
            hi = [e[j]["interval"][g]["high"] for e in control["selection"]]
            ax.errorbar(om, share, yerr=[np.subtract(share, lo), np.subtract(hi, share)], marker="o", capsize=2,
                        ls="-" if ji == 0 else ":", color=f"C{gi}", label=f"group {g}, judge {j}")
        ax.plot(om, [e["predicted"][g] for e in control["selection"]], "--", color=f"C{gi}", alpha=0.5,
                label=f"group {g}, first-order prediction")
        ax.axhline(t, color=f"C{gi}", lw=0.8, alpha=0.7)
    ax.axvline(control["target_omega"], color="k", lw=0.8, ls=":", label=f"target ω = {control['target_omega']:g}")
    ax.set_xlabel("guidance weight ω")
    ax.set_ylabel("share of samples")
    ax.set_title("Distribution control: group share vs ω (selection sets)")
    ax.legend(fontsize=6)
    return save_figure(fig, path)
