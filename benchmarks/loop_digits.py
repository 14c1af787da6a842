"""The synthetic augmentation loop on the real digits, standard vs SIMS (SPEC §1 MAD-prophylaxis).

Runs ``sims-train configs/loop/digits.yaml run_dir=R`` (resumable: re-run to continue), then writes a
table, a JSON and the Fréchet-distance plot to benchmarks/results/loop_digits.*. Target: the standard
stream's FD rises over generations, while the SIMS stream's last generation stays within 10% of
(or below) its first.

    python benchmarks/loop_digits.py [--run-dir runs/loop-digits] [--control] [key=value overrides ...]

``loop.aux_data=synthetic`` (an override) trains each SIMS generation's auxiliary on the pollution in
its training set instead of its own samples (issue 14); ``--reuse RUN`` copies RUN's content-addressed
base models first, so the fits the two settings share (the standard stream, generation 1) are not
trained again. Analysis written by hand goes in ``benchmarks/results/<name>_notes.md``, never in the
generated ``<name>.md``.

``--control`` adds a real-data-only control: for every generation t, a model trained on the real set
alone with generation t's training seed, evaluated on the same samples seeds (RUN/control/). The
loop's models of generation t share that seed, so the control separates what the synthetic data
does from the run-to-run spread of training.
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


def control_rows(cfg) -> list:
    """Real-data-only models, one per (seed, generation) with the loop's fit seed; resumable (one JSON each)."""
    from sims.dist import single_process
    from sims.loop import derive_seed
    from sims.loop.models.diffusion import DiffusionLoopModel
    from sims.utils import atomic_write_json

    model = DiffusionLoopModel(cfg, single_process())
    n_eval = cfg.loop.num_eval or cfg.loop.num_synthetic
    rows = []
    for seed in cfg.loop.seeds:
        real = model.real_data(int(cfg.loop.num_real), seed=derive_seed(seed, "real"))
        for t in range(1, int(cfg.loop.generations) + 1):
            out = Path(cfg.run_dir) / "control" / f"seed{seed}" / f"gen{t:03d}.json"
            if not out.exists():
                model.fit(real, generation=t, seed=derive_seed(seed, "fit", t), workdir=out.parent / f"gen{t:03d}")
                samples = model.sample(n_eval, seed=derive_seed(seed, "eval-sample"))
                atomic_write_json(out, {k: float(v) for k, v in model.evaluate(samples, seed=derive_seed(seed, "eval")).items()})
            rows.append({"workflow": "real only", "method": "control", "generation": t, "seed": seed,
                         "train_size": len(real), "real_fraction": 1.0, **json.loads(out.read_text())})
    return rows


def synthetic_table(cfg) -> list:
    """Markdown rows describing each generation's stored synthetic data (first seed): share the shipped digit
    classifier judges with p >= 0.9, class shares' total-variation distance from uniform, and the median L2
    distance to the nearest real digit (real-to-real leave-one-out median in the header)."""
    import numpy as np
    import torch

    from sims.data import load_real_dataset
    from sims.metrics import judge_digits

    synthetic = Path(cfg.run_dir) / "synthetic"
    real = load_real_dataset(cfg.data).data.flatten(1).double()
    d = torch.cdist(real, real)
    d.fill_diagonal_(float("inf"))
    lines = ["| synthetic data | p ≥ 0.9 | class shares (min–max) | TV from uniform | median L2 to nearest real "
             f"(real–real {d.min(1).values.median():.2f}) |", "|---|---|---|---|---|"]
    for path in sorted(synthetic.glob("**/gen*.npz")):
        x = torch.from_numpy(np.load(path)["samples"][0]).float()
        j = judge_digits(x, threshold=0.9)
        share = np.asarray(j["class_share"])
        nn = torch.cdist(x.flatten(1).double(), real).min(1).values.median()
        lines.append(f"| {path.relative_to(synthetic)} | {j['confident_fraction']:.3f} | "
                     f"{share.min():.2f}–{share.max():.2f} | {0.5 * np.abs(share - 0.1).sum():.3f} | {nn:.2f} |")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/loop/digits.yaml")
    p.add_argument("--run-dir", default="runs/loop-digits")
    p.add_argument("--name", default="loop_digits")
    p.add_argument("--control", action="store_true", help="also train the real-data-only control per generation")
    p.add_argument("--reuse", default=None, help="copy this loop run's models/_bases first (shared fits)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    if args.reuse and not (Path(args.run_dir) / "models" / "_bases").exists():
        shutil.copytree(Path(args.reuse) / "models" / "_bases", Path(args.run_dir) / "models" / "_bases")
    cmd = [sys.executable, "-m", "sims.cli.train", args.config, f"run_dir={args.run_dir}", *args.overrides]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT)
    cmd = ["sims-train", *cmd[3:]]
    if proc.returncode != 0:
        return proc.returncode
    from sims.config import load_config
    from sims.loop import aggregate_rows, plot_metrics, read_metrics_csv

    cfg = load_config(ROOT / args.config, [f"run_dir={args.run_dir}", *args.overrides])
    all_rows = read_metrics_csv(Path(args.run_dir) / "metrics.csv")
    wall = (time.time() - t0) / 60
    wall_control = 0.0
    if args.control:
        ctrl = control_rows(cfg)
        for t in sorted({r["generation"] for r in ctrl}):
            ctrl += aggregate_rows([r for r in ctrl if r["generation"] == t and isinstance(r["seed"], int)])
        all_rows += ctrl
        wall_control = (time.time() - t0) / 60 - wall
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
    settings = json.loads((Path(args.run_dir) / "metrics.json").read_text())
    num_eval = settings.get("num_eval", settings["num_synthetic"])  # absent from runs made before loop.num_eval
    first = table[sorted(table)[0]]
    sizes = ", ".join(f"gen {g}: {first[g]['train_size']} ({float(first[g]['real_fraction']):.0%} real)" for g in sorted(first))
    lines.append("")
    lines.append(f"Settings: {settings['num_real']} real, {settings['num_synthetic']} synthetic added per generation, "
                 f"metrics on {num_eval} samples per generation (seeds {settings['seeds']}). "
                 f"Training sets: {sizes}.")
    target = {}
    std = [v for k, v in verdict.items() if k.endswith("/standard")]
    sims = [v for k, v in verdict.items() if k.endswith("/sims")]
    if std and sims:
        target = {"standard_rises": all(v["last_over_first"] > 1 for v in std),
                  "sims_last_within_10pct_of_first": all(v["last_over_first"] <= 1.1 for v in sims)}
        lines.append(f"Target: standard FD rises (last/first > 1): {target['standard_rises']}; "
                     f"SIMS last within 10% of (or below) first (last/first <= 1.1): "
                     f"{target['sims_last_within_10pct_of_first']}.")
    if cfg.data.name == "digits":
        lines += ["", *synthetic_table(cfg)]
    lines.append("")
    lines.append(f"Wall time of this invocation (a resumed run counts only what it did): loop {wall:.1f} min"
                 + (f", real-only control {wall_control:.1f} min." if args.control else "."))
    md = "\n".join(lines)
    print(md)
    bench = " ".join(["python benchmarks/loop_digits.py", *sys.argv[1:]])
    (out_dir / f"{args.name}.md").write_text(f"# Digits synthetic augmentation loop\n\nCommand: `{bench}` "
                                             f"(runs `{' '.join(cmd)}`)\n\n{md}\n")
    (out_dir / f"{args.name}.json").write_text(json.dumps({
        "command": bench, "loop_command": " ".join(cmd), "wall_min_this_invocation": wall, "control_wall_min_this_invocation": wall_control, "num_real": settings["num_real"],
        "num_synthetic": settings["num_synthetic"], "num_eval": num_eval, "streams": verdict, "target": target,
        "training_sets": settings.get("training_sets")}, indent=2) + "\n")
    plot = Path(args.run_dir) / "plots" / "fd.png"
    if args.control:  # the loop's own plot has no control line
        plot, = plot_metrics(all_rows, plot.parent / "with-control", metrics=["fd"],
                             title=f"digits loop, +{settings['num_synthetic']}/gen")
    if plot.exists():
        shutil.copy(plot, out_dir / f"{args.name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
