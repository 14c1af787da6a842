"""The synthetic augmentation loop on the real digits, standard vs SIMS (SPEC §1 MAD-prophylaxis).

Runs ``sims-train configs/loop/digits.yaml run_dir=R`` (resumable: re-run to continue), then writes a
table, a JSON and the Fréchet-distance plot to benchmarks/results/loop_digits.*. Target: the standard
stream's FD rises over generations, while the SIMS stream's last generation stays within 10% of
(or below) its first.

    python benchmarks/loop_digits.py [--run-dir runs/loop-digits] [key=value overrides ...]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/loop/digits.yaml")
    p.add_argument("--run-dir", default="runs/loop-digits")
    p.add_argument("--name", default="loop_digits")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cmd = [sys.executable, "-m", "sims.cli.train", args.config, f"run_dir={args.run_dir}", *args.overrides]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT)
    cmd = ["sims-train", *cmd[3:]]
    wall = (time.time() - t0) / 60
    if proc.returncode != 0:
        return proc.returncode
    from sims.loop import read_metrics_csv

    all_rows = read_metrics_csv(Path(args.run_dir) / "metrics.csv")
    rows = [r for r in all_rows if r["seed"] == "mean"] or [r for r in all_rows if isinstance(r["seed"], int)]
    table = {}
    for r in rows:
        table.setdefault((r["workflow"], r["method"]), {})[int(r["generation"])] = r
    lines = ["| workflow | method | " + " | ".join(f"gen {g} FD" for g in sorted({int(r['generation']) for r in rows}))
             + " | last/first | precision (first→last) | recall (first→last) |"]
    lines.append("|" + "---|" * (len(lines[0].split("|")) - 2))
    verdict = {}
    for (wf, method), gens in sorted(table.items()):
        gs = sorted(gens)
        fds = [float(gens[g]["fd"]) for g in gs]
        ratio = fds[-1] / fds[0]
        verdict[f"{wf}/{method}"] = {"fd": fds, "last_over_first": ratio,
                                      "precision": [float(gens[g]["precision"]) for g in gs],
                                      "recall": [float(gens[g]["recall"]) for g in gs]}
        lines.append(f"| {wf} | {method} | " + " | ".join(f"{v:.3g}" for v in fds) + f" | {ratio:.3f} | "
                     f"{float(gens[gs[0]]['precision']):.3f}→{float(gens[gs[-1]]['precision']):.3f} | "
                     f"{float(gens[gs[0]]['recall']):.3f}→{float(gens[gs[-1]]['recall']):.3f} |")
    out_dir = ROOT / "benchmarks" / "results"
    md = "\n".join(lines)
    print(md)
    print(f"wall time: {wall:.1f} min (this invocation; a resumed run counts only what it did)")
    (out_dir / f"{args.name}.md").write_text(f"# Digits synthetic augmentation loop\n\nCommand: `{' '.join(cmd)}`\n\n{md}\n")
    (out_dir / f"{args.name}.json").write_text(json.dumps({"command": " ".join(cmd), "wall_min_this_invocation": wall,
                                                           "streams": verdict}, indent=2) + "\n")
    plot = Path(args.run_dir) / "plots" / "fd.png"
    if plot.exists():
        shutil.copy(plot, out_dir / f"{args.name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
