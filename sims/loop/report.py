"""The loop's outputs: metrics.csv (per seed and aggregates), metrics.json and one plot per metric."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from sims.data.workflows import WORKFLOWS
from sims.errors import LoopError
from sims.loop.protocol import METHODS
from sims.loop.rundir import MANIFEST_FORMAT
from sims.loop.settings import Settings
from sims.utils import atomic_write, atomic_write_json, atomic_write_text

KNOWN_METRICS: Tuple[str, ...] = ("mean_sq_error", "det_ratio", "trace_ratio", "test_nll", "fd", "precision", "recall")
"""Metric columns in SPEC order (Gaussian, KDE, image data); other names a model returns follow."""
META_COLUMNS: Tuple[str, ...] = ("generation", "workflow", "method", "seed", "train_size", "real_fraction")
AGGREGATES: Tuple[str, ...] = ("mean", "std", "ci95")
"""Aggregate rows of metrics.csv: seed='mean', 'std' (ddof=1), 'ci95' (half-width of the t interval)."""


def _metric_order(names: Iterable[str]) -> List[str]:
    names = set(names)
    return [m for m in KNOWN_METRICS if m in names] + sorted(names - set(KNOWN_METRICS))


def collect_rows(run_dir: Union[str, Path], st: Optional[Settings] = None) -> List[Dict[str, Any]]:
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


def write_metrics_json(rows: List[Dict[str, Any]], path: Path, manifest: Mapping, st: Settings) -> None:
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
