"""The digits SIMS sweep (issue 12): ω × auxiliary snapshot × base EMA × auxiliary EMA, chosen on the
selection sets, the chosen cell and the base reported once on held-out sets.

Runs ``sims-train configs/digits.yaml run_dir=R`` with the sweep's grid (defaults below; a base and an
auxiliary that track several EMA half-lives at once, auxiliary snapshots), then writes the whole
selection table, the report and a heat-map plot:

    python benchmarks/digits_sweep.py [--run-dir runs/digits-sweep] [key=value overrides ...]
    # -> benchmarks/results/digits_sweep.{json,md,png}

Grid (overridable): ω ∈ {0, 0.25, 0.5, 0.75, 1}; auxiliary snapshots every 64 kimg of its 192 (64, 128,
final); base EMA half-lives 50 kimg (the main one; ramp-up 0.05 caps it at 25.6 kimg at the end of the
4,000 steps) and 12.8 kimg; auxiliary EMA half-lives 50 kimg (ramp-up 0.05: 9.6 kimg at its end) and
2.4 kimg. The run resumes and reuses finished cells when re-run.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GRID = ["sims.omegas=[0,0.25,0.5,0.75,1.0]", "sims.aux_snapshot_every_kimg=64", "train.ema_halflives_kimg=[12.8]",
        "sims.aux_ema_halflives_kimg=[2.4]", "sims.selection_num_samples=2000"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/digits-sweep")
    p.add_argument("--name", default="digits_sweep")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cmd = [sys.executable, "-m", "sims.cli.train", "configs/digits.yaml", f"run_dir={args.run_dir}", *GRID,
           *args.overrides]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT)
    if proc.returncode != 0:
        return proc.returncode
    wall = (time.time() - t0) / 60
    report = json.loads((Path(args.run_dir) / "eval" / "report.json").read_text())
    from sims.figures import new_figure, save_figure
    from sims.utils import atomic_write_json, atomic_write_text

    sel = report["selection"]
    lines = ["# Digits SIMS sweep: ω × auxiliary snapshot × base EMA × auxiliary EMA", "",
             f"Command: `python benchmarks/digits_sweep.py {' '.join(sys.argv[1:])}` (runs `sims-train "
             f"{' '.join(cmd[3:])}`); wall time of this invocation {wall:.1f} min.", "",
             f"Selection sets {report['selection_seed_offsets']} × {report['selection_num_samples']} samples; "
             f"report sets {report['report_seed_offsets']} × {report['report_num_samples']}.", "",
             "| ω | aux snapshot | base EMA | aux EMA | FD per selection set | mean | precision |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(sel, key=lambda r: r["fd_mean"]):
        lines.append(f"| {r['omega']:g} | {r['aux_snapshot'] or ('final' if r['omega'] else '–')} | "
                     f"{r['base_ema'] or 'main'} | {(r['aux_ema'] or 'main') if r['omega'] else '–'} | "
                     + ", ".join(f"{v:.4g}" for v in r["fd_per_set"]) + f" | {r['fd_mean']:.4g} | "
                     + (f"{r['precision_mean']:.3f}" if r["precision_mean"] is not None else "–") + " |")
    c, b, s = report["chosen"], report["base"], report["sims"]
    lines += ["", f"Chosen: {json.dumps(c)}", "",
              f"Report sets: base FD {', '.join(f'{v:.4g}' for v in b['fd_per_set'])} (min {b['fd_min']:.4g}, mean "
              f"{b['fd_mean']:.4g}); SIMS {', '.join(f'{v:.4g}' for v in s['fd_per_set'])} (min {s['fd_min']:.4g}, "
              f"mean {s['fd_mean']:.4g}); paired changes "
              + ", ".join(f"{v * 100:+.1f}%" for v in report["relative_change_per_set"])
              + f", mean {report['relative_change_paired_mean'] * 100:+.1f}%."]
    for e in report["edge_of_grid"]:
        lines.append(f"\nAt the edge of its grid: {e}.")
    out = ROOT / "benchmarks" / "results"
    atomic_write_text(out / f"{args.name}.md", "\n".join(lines) + "\n")
    atomic_write_json(out / f"{args.name}.json", {"command": " ".join(["python benchmarks/digits_sweep.py", *sys.argv[1:]]),
                                                  "train_command": " ".join(["sims-train", *cmd[3:]]),
                                                  "wall_min_this_invocation": wall, "report": report})
    # one panel per (base EMA, aux EMA): mean selection FD vs ω, one line per snapshot
    combos = sorted({(r["base_ema"], r["aux_ema"]) for r in sel if r["omega"] > 0})
    fig, axes = new_figure(4 * len(combos), 3.4, ncols=len(combos))
    axes = axes if isinstance(axes, list) else [axes]
    base_fd = {r["base_ema"]: r["fd_mean"] for r in sel if r["omega"] == 0}
    for ax, (be, ae) in zip(axes, combos):
        for snap in sorted({r["aux_snapshot"] or "final" for r in sel if r["omega"] > 0}):
            rows = sorted((r for r in sel if r["omega"] > 0 and r["base_ema"] == be and r["aux_ema"] == ae
                           and (r["aux_snapshot"] or "final") == snap), key=lambda r: r["omega"])
            ax.plot([0] + [r["omega"] for r in rows], [base_fd[be]] + [r["fd_mean"] for r in rows], "o-", label=snap)
        ax.set_title(f"base EMA {be or 'main'}, aux EMA {ae or 'main'}", fontsize=8)
        ax.set_xlabel("ω")
        ax.set_ylabel("mean selection FD (digits features)")
        ax.legend(fontsize=6, title="aux snapshot", title_fontsize=6)
    save_figure(fig, out / f"{args.name}.png")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
