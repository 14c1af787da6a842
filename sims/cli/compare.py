"""``sims-compare``: compare the metrics of several generation-loop runs.

Usage::

    sims-compare RUN_DIR [RUN_DIR ...] --out DIR [--metric NAME]

Reads ``RUN_DIR/metrics.csv`` (written by :func:`sims.loop.run_loop`) of every run and writes to
``DIR``: one ``<metric>.png`` per metric (mean over seeds vs generation, one line per
run/workflow/method, shaded 95% CI) and ``comparison.md``, a Markdown table per metric with the
first- and last-generation values (mean +/- 95% CI half-width over seeds) of every
run/workflow/method. Errors (missing run, unknown metric) print ``sims-compare: error: ...`` and
exit with status 2.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from sims.loop import LoopError, metric_columns, plot_metrics, read_metrics_csv, series
from sims.utils import atomic_write_text

PROG = "sims-compare"


def _labels(run_dirs: Sequence[Path]) -> List[str]:
    """Short unique labels: the directory name, or parent/name where names collide."""
    names = [p.resolve().name for p in run_dirs]
    out = []
    for p, name in zip(run_dirs, names):
        out.append(f"{p.resolve().parent.name}/{name}" if names.count(name) > 1 else name)
    if len(set(out)) != len(out):
        out = [f"{i}:{label}" for i, label in enumerate(out)]
    return out


def _fmt(mean: float, ci: float) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.4g}" + ("" if math.isnan(ci) else f" ± {ci:.2g}")


def compare(run_dirs: Sequence[Path], out: Path, metric: Optional[str] = None) -> Dict[str, List[Path]]:
    """Write the comparison plots and table; return ``{"plots": [...], "table": [path]}``.

    Raises:
        LoopError: a run without metrics.csv, no runs, or ``metric`` in none of the runs (the
            message lists the metrics that exist).
    """
    if not run_dirs:
        raise LoopError("give at least one run directory")
    labels = _labels(run_dirs)
    per_run = {label: read_metrics_csv(Path(d) / "metrics.csv") for label, d in zip(labels, run_dirs)}
    available = metric_columns(r for rows in per_run.values() for r in rows)
    if metric is not None and metric not in available:
        raise LoopError(f"metric {metric!r} is in none of the runs; available: {', '.join(available) or 'none'}")
    metrics = [metric] if metric else available
    combined = []
    for label, rows in per_run.items():
        for r in rows:
            combined.append(dict(r, workflow=f"{label}: {r['workflow']}"))
    out.mkdir(parents=True, exist_ok=True)
    plots = plot_metrics(combined, out, metrics=metrics, title="comparison")

    lines = ["# Loop comparison", "", "Runs: " + ", ".join(f"`{label}` ({d})" for label, d in zip(labels, run_dirs)), ""]
    for m in metrics:
        lines += [f"## {m}", "", "| run | workflow | method | seeds | first gen | first (mean ± 95% CI) | last gen | last (mean ± 95% CI) | last / first |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for label, rows in per_run.items():
            for (wf, method), s in series(rows, m).items():
                if not len(s["generation"]):
                    continue
                first, last = s["mean"][0], s["mean"][-1]
                ratio = last / first if first != 0 and not math.isnan(first) else math.nan
                lines.append(
                    f"| {label} | {wf} | {method} | {len(s['seeds'])} | {int(s['generation'][0])} | {_fmt(first, s['ci95'][0])} "
                    f"| {int(s['generation'][-1])} | {_fmt(last, s['ci95'][-1])} | {'n/a' if math.isnan(ratio) else f'{ratio:.3g}'} |"
                )
        lines.append("")
    table = out / "comparison.md"
    atomic_write_text(table, "\n".join(lines))
    return {"plots": plots, "table": [table]}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``sims-compare`` (see the module docstring). Returns the exit status."""
    parser = argparse.ArgumentParser(prog=PROG, description="Compare metrics.csv of several sims loop runs.")
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="run directories with metrics.csv")
    parser.add_argument("--out", required=True, type=Path, help="output directory for PNGs and comparison.md")
    parser.add_argument("--metric", default=None, help="only this metric (default: every metric found)")
    args = parser.parse_args(argv)
    try:
        res = compare(args.run_dirs, args.out, args.metric)
    except (LoopError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(res['plots'])} plot(s) and {res['table'][0]}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
