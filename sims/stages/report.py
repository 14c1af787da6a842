"""The SIMS evaluation report: the selection sweep, the held-out report sets, provenance.

``report.json`` schema (flat lists of integers for seed sets; FD = Fréchet distance in the run's
features, FID when they are Inception's):

==============================  ================================================================
``best_omega``                  ω of the chosen setting (chosen on the selection sets)
``base_fd_mean``                base model's mean FD over the report sets
``best_fd_mean``                chosen SIMS setting's mean FD over the report sets
``relative_change``             ``best_fd_mean / base_fd_mean − 1``
``relative_change_per_set``     per report set, SIMS FD / base FD − 1 (paired: same seeds)
``relative_change_paired_mean`` mean of the per-set changes
``selection_seed_offsets``      [int], ``selection_num_samples`` (int)
``report_seed_offsets``         [int], ``report_num_samples`` (int)
``base``, ``sims``              per method: ``fd_per_set``, ``fd_min`` (the papers' convention),
                                ``fd_mean``, ``precision_per_set``, ``recall_per_set``,
                                ``precision_mean``, ``recall_mean``, ``nfe`` (counted)
``chosen``                      ``omega``, ``aux_snapshot`` (folder or null = final),
                                ``aux_snapshot_kimg``, ``base_ema``, ``aux_ema`` (``""`` = main),
                                ``base_ema_halflife_kimg``, ``aux_ema_halflife_kimg``,
                                ``base_ema_unguided`` (the base's own best EMA at ω = 0)
``edge_of_grid``                [str]: chosen values at the edge of their grid
``selection``                   one row per sweep cell: its setting and mean FD over the selection sets
``rows``                        every report-set evaluation with its provenance: weights SHA-256,
                                kimg, EMA length, ω, σ-interval, seed set, N, NFE, reference file
                                and SHA-256, feature extractor and version
``real_resample_fd``            FD of the real data resampled to the report size (the floor)
==============================  ================================================================
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np
import torch
from omegaconf import DictConfig

from sims.config import to_container
from sims.dist import DistContext, single_process
from sims.figures import new_figure, save_figure, save_side_by_side
from sims.generation import generate
from sims.stages.evaluate import Reference, guided, resample_floor
from sims.stages.rundir import weights_file
from sims.training.callbacks import snapshot_kimg
from sims.utils import atomic_write_json, atomic_write_text


def _method_summary(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    fds = [r["fd"] for r in rows]
    out = {"fd_per_set": fds, "fd_min": float(min(fds)), "fd_mean": float(np.mean(fds)),
           "nfe": float(np.mean([r["nfe"] for r in rows]))}
    for k in ("precision", "recall", "fd_mean_term", "digits_confident_fraction"):
        vals = [r.get(k) for r in rows]
        if all(v is not None for v in vals):
            out[f"{k}_per_set"] = vals
            out[f"{k}_mean"] = float(np.mean(vals))
    if all("digits_class_share" in r for r in rows):
        out["digits_min_class_share_mean"] = float(np.mean([min(r["digits_class_share"]) for r in rows]))
    return out


def _halflife(rows: Sequence[Dict[str, Any]], key: str):
    return rows[0].get(key) if rows else None


def summarize(cfg: DictConfig, results: Dict[str, Any], cells, chosen, unguided, reference: Reference,
              label_dim: int) -> Dict[str, Any]:
    """The report dict (schema in the module docstring) from the cached evaluations."""
    s = cfg.sims
    sel = [int(o) for o in s.selection_seed_offsets]
    rep = [int(o) for o in s.report_seed_offsets]
    base_rows = [results[unguided.key("rep", o)] for o in rep]
    sims_rows = [results[chosen.key("rep", o)] for o in rep]
    base, sims = _method_summary(base_rows), _method_summary(sims_rows)
    per_set = [b / a - 1.0 for a, b in zip(base["fd_per_set"], sims["fd_per_set"])]
    selection = []
    for c in cells:
        rs = [results[c.key("sel", o)] for o in sel]
        selection.append({"omega": c.omega, "aux_snapshot": c.aux_snapshot, "base_ema": c.base_ema,
                          "aux_ema": c.aux_ema, "fd_per_set": [r["fd"] for r in rs],
                          "fd_mean": float(np.mean([r["fd"] for r in rs])),
                          "precision_mean": (float(np.mean([r["precision"] for r in rs]))
                                             if all(r.get("precision") is not None for r in rs) else None),
                          "nfe": float(np.mean([r["nfe"] for r in rs]))})
    edges = []
    omegas = sorted({c.omega for c in cells})
    if chosen.omega > 0 and chosen.omega == omegas[-1] and len(omegas) > 2:
        edges.append(f"omega={chosen.omega:g} is the largest value of sims.omegas: extend the grid")
    snaps = sorted({c.aux_snapshot for c in cells if c.aux_snapshot}, key=snapshot_kimg)
    if chosen.omega > 0 and snaps and chosen.aux_snapshot == snaps[0]:
        edges.append(f"aux snapshot {chosen.aux_snapshot} is the earliest: take snapshots more often")
    for name, value, grid in (("base EMA", chosen.base_ema, [""] + [c.base_ema for c in cells]),
                              ("auxiliary EMA", chosen.aux_ema, [""] + [c.aux_ema for c in cells])):
        keys = sorted(set(grid), key=lambda k: float(k.replace("p", ".")) if k else -1.0)
        if len(keys) > 2 and value and value == keys[-1]:
            edges.append(f"{name} {value} kimg is the longest tracked")
    chosen_d = {"omega": chosen.omega, "aux_snapshot": chosen.aux_snapshot if chosen.omega else None,
                "aux_snapshot_kimg": (snapshot_kimg(chosen.aux_snapshot) if chosen.aux_snapshot and chosen.omega
                                      else _halflife(sims_rows, "aux_kimg")),
                "base_ema": chosen.base_ema, "aux_ema": chosen.aux_ema if chosen.omega else None,
                "base_ema_halflife_kimg": _halflife(sims_rows, "base_ema_halflife_kimg"),
                "aux_ema_halflife_kimg": _halflife(sims_rows, "aux_ema_halflife_kimg"),
                "base_ema_unguided": unguided.base_ema,
                "base_ema_unguided_halflife_kimg": _halflife(base_rows, "base_ema_halflife_kimg")}
    return {
        "features": reference.features, "feature_version": reference.version,
        "best_omega": chosen.omega, "base_fd_mean": base["fd_mean"], "best_fd_mean": sims["fd_mean"],
        "relative_change": sims["fd_mean"] / base["fd_mean"] - 1.0, "relative_change_per_set": per_set,
        "relative_change_paired_mean": float(np.mean(per_set)),
        "selection_seed_offsets": sel, "selection_num_samples": int(s.selection_num_samples),
        "report_seed_offsets": rep, "report_num_samples": int(s.report_num_samples),
        "sigma_interval": list(s.sigma_interval) if s.sigma_interval else None,
        "base": base, "sims": sims, "chosen": chosen_d, "edge_of_grid": edges, "selection": selection,
        "rows": base_rows + ([] if chosen == unguided else sims_rows), "reference": reference.provenance(),
        "label_dim": int(label_dim),
    }


def _grid_samples(ctx: DistContext, cfg: DictConfig, weights, run_dir: Path, cell, shape, label_dim: int):
    base = weights.get(weights_file(run_dir / "base", cell.base_ema))[0]
    aux = weights.get(weights_file(run_dir / "aux", cell.aux_ema, cell.aux_snapshot))[0] if cell.omega else None
    denoiser, _ = guided(base, aux, cell.omega, cfg.sims.sigma_interval)
    seeds = range(int(cfg.sims.report_seed_offsets[0]), int(cfg.sims.report_seed_offsets[0]) + 100)
    return torch.cat([x for _, x, _ in generate(single_process(ctx.device), denoiser, seeds, shape, label_dim=label_dim,
                                                sampler=to_container(cfg.sampler),
                                                batch_size=int(cfg.sampler.batch_size))])


def write_report(ctx: DistContext, cfg: DictConfig, eval_dir: Path, report: Dict[str, Any], reference: Reference,
                 weights, run_dir: Path, chosen, unguided, shape, label_dim: int) -> None:
    """``report.json``, ``report.md``, ``fd_vs_omega.png`` and ``grid_base_vs_sims.png`` (rank 0)."""
    if reference.real_features is not None and len(reference.real_features) > 1:
        report["real_resample_fd"] = resample_floor(reference.real_features, reference.mu, reference.sigma,
                                                    int(cfg.sims.report_num_samples))
    atomic_write_json(eval_dir / "report.json", report)
    atomic_write_text(eval_dir / "report.md", report_markdown(report))
    plot_selection(eval_dir / "fd_vs_omega.png", report)
    if "control" in report:
        from sims.stages.control_stage import plot_shares

        plot_shares(eval_dir / "shares_vs_omega.png", report["control"])
    grid = eval_dir / "grid_base_vs_sims.png"
    if not grid.exists():
        left = _grid_samples(ctx, cfg, weights, run_dir, unguided, shape, label_dim)
        right = _grid_samples(ctx, cfg, weights, run_dir, chosen, shape, label_dim)
        save_side_by_side(grid, left, right, ("base (ω = 0)", f"SIMS (ω = {chosen.omega:g})"))


def _fmt(v, spec=".4g") -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def report_markdown(report: Dict[str, Any]) -> str:
    """The report as Markdown: the held-out result first, then the selection sweep."""
    fd = "FID" if report["features"] == "inception" else f"FD ({report['features']} features)"
    b, s, c = report["base"], report["sims"], report["chosen"]
    lines = [f"# SIMS evaluation — {fd}", "",
             f"Chosen on the selection sets {report['selection_seed_offsets']} ({report['selection_num_samples']} "
             f"samples each): ω = {c['omega']:g}, auxiliary snapshot {c['aux_snapshot'] or 'final'}, "
             f"base EMA {c['base_ema'] or 'main'}, auxiliary EMA {c['aux_ema'] or 'main'}; base alone: EMA "
             f"{c['base_ema_unguided'] or 'main'}.", "",
             f"Reported once on the held-out report sets {report['report_seed_offsets']} "
             f"({report['report_num_samples']} samples each):", "",
             f"| | {fd} per set | min | mean | precision | recall | NFE |", "|---|---|---|---|---|---|---|"]
    for name, m in (("base", b), (f"SIMS ω = {c['omega']:g}", s)):
        per = ", ".join(_fmt(v) for v in m["fd_per_set"])
        lines.append(f"| {name} | {per} | {_fmt(m['fd_min'])} | {_fmt(m['fd_mean'])} | "
                     f"{_fmt(m.get('precision_mean'), '.3f')} | {_fmt(m.get('recall_mean'), '.3f')} | {m['nfe']:.1f} |")
    changes = ", ".join(f"{v * 100:+.1f}%" for v in report["relative_change_per_set"])
    lines += ["", f"Change per paired report set: {changes}; mean {report['relative_change_paired_mean'] * 100:+.1f}%"
                  f" (of the means: {report['relative_change'] * 100:+.1f}%)."]
    floor = report.get("real_resample_fd")
    if floor:
        lines += ["", f"Finite-sample floor: the real data resampled to {report['report_num_samples']} gives "
                      f"{fd} {floor['mean']:.4g} ± {floor['std']:.2g} (what a perfect model would score)."]
    for e in report["edge_of_grid"]:
        lines.append(f"\n**At the edge of its grid:** {e}.")
    lines += ["", "## Selection sweep", "", f"| ω | aux snapshot | base EMA | aux EMA | {fd} per selection set | mean |"
              " precision |", "|---|---|---|---|---|---|---|"]
    for r in report["selection"]:
        per = ", ".join(_fmt(v) for v in r["fd_per_set"])
        lines.append(f"| {r['omega']:g} | {r['aux_snapshot'] or ('final' if r['omega'] else '–')} | "
                     f"{r['base_ema'] or 'main'} | {(r['aux_ema'] or 'main') if r['omega'] else '–'} | {per} | "
                     f"{_fmt(r['fd_mean'])} | {_fmt(r['precision_mean'], '.3f')} |")
    if "control" in report:
        lines += control_markdown(report["control"], fd)
    ref = report["reference"]
    lines += ["", f"Reference: {ref['reference']} (sha256 {str(ref['reference_sha256'])[:16]}), {ref['features']} "
                  f"features ({ref['feature_version']}). {ref['reference_note']}".rstrip()]
    return "\n".join(lines) + "\n"


def _at(d: Dict, g: int):
    """``d[g]`` for a dict keyed by int (in memory) or by str (read back from JSON)."""
    return d[g] if g in d else d[str(g)]


def control_markdown(c: Dict[str, Any], fd: str) -> List[str]:
    """The distribution-control section of report.md."""
    groups = sorted(int(k) for k in c["target_given"])
    j0, judges = c["judges"][0], c["judges"]
    target = ", ".join(f"group {g} {_at(c['target_given'], g):.0%}" for g in groups)
    base = ", ".join(f"group {g} {_at(c['base_shares'], g):.3f}" for g in groups)
    share_cols = " | ".join(f"group {g} ({j})" for g in groups for j in judges)
    lines = ["", "## Distribution control", "",
             f"Target {target} (design ω* = {c['design_omega']:g}); composing judge {j0}; base shares {base}; "
             f"auxiliary set drawn from {c['pool_size']} base samples.", "",
             f"| ω | {share_cols} | first-order prediction | {fd} | {fd} to target-reweighted real | precision |",
             "|" + "---|" * (len(groups) * len(judges) + 5)]
    for e in c["selection"]:
        shares = " | ".join(f"{e[j]['share'][g]:.3f} [{_at(e[j]['interval'], g)['low']:.3f}, "
                            f"{_at(e[j]['interval'], g)['high']:.3f}]" for g in groups for j in judges)
        pred = ", ".join(f"{_at(e['predicted'], g):.3f}" for g in groups)
        lines.append(f"| {e['omega']:g} | {shares} | {pred} | {_fmt(e['fd'])} | {_fmt(e['fd_target'])} | "
                     f"{_fmt(e['precision'], '.3f')} |")
    r = c["report"]
    lines += ["", f"Held-out report sets {r['sets']} ({r['samples_per_set']} each): the base vs SIMS at the target "
                  f"ω = {c['target_omega']:g} (chosen on the selection sets; the best-FD ω is {c['best_fd_omega']:g}):", "",
              f"| | {share_cols} | confident ({j0}) | {fd} | {fd} to target | precision |",
              "|" + "---|" * (len(groups) * len(judges) + 5)]
    for name in ("base", "target"):
        m = r[name]
        shares = " | ".join(f"{m[j]['share'][g]:.3f}" for g in groups for j in judges)
        label = "base" if name == "base" else f"SIMS ω = {m['omega']:g}"
        lines.append(f"| {label} | {shares} | {m[j0]['confident_fraction']:.3f} | {_fmt(m['fd'])} | "
                     f"{_fmt(m['fd_target'])} | {_fmt(m['precision'], '.3f')} |")
    return lines


def plot_selection(path: Path, report: Dict[str, Any]) -> Path:
    """FD vs ω on the selection sets (best over snapshots and EMAs at each ω), one line per set and the
    mean, with the chosen ω marked."""
    by_omega: Dict[float, Dict[str, Any]] = {}
    for r in report["selection"]:
        if r["omega"] not in by_omega or r["fd_mean"] < by_omega[r["omega"]]["fd_mean"]:
            by_omega[r["omega"]] = r
    om = sorted(by_omega)
    fig, ax = new_figure(5, 3.5)
    for i, off in enumerate(report["selection_seed_offsets"]):
        ax.plot(om, [by_omega[w]["fd_per_set"][i] for w in om], "o--", alpha=0.5, label=f"selection seeds {off}+")
    ax.plot(om, [by_omega[w]["fd_mean"] for w in om], "o-", color="k", label="mean")
    ax.axvline(report["best_omega"], color="C3", lw=0.8, ls=":", label=f"chosen ω = {report['best_omega']:g}")
    ax.set_xlabel("guidance weight ω (0 = base)")
    ax.set_ylabel("FID" if report["features"] == "inception" else f"Fréchet distance ({report['features']})")
    ax.set_title("SIMS selection sweep")
    ax.legend(fontsize=7)
    return save_figure(fig, path)
