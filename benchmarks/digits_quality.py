"""Digits main job, timed and judged.

Runs ``sims-train CONFIG run_dir=R`` (unless --skip-train), then ``sims-sample R --seeds 0-999``, and
judges the 1,000 samples with a scikit-learn logistic regression trained on the real 8×8 digits:
share labelled with confidence ≥ 0.5 (target ≥ 90%) and the share of every class (target ≥ 4%).
Also reports the shipped CNN judge, the base's training speed (steps/s, from ``base/DONE``) and,
when the run has a SIMS evaluation, writes its report (selection/report protocol) as
``benchmarks/results/<name>_sims_report.{json,md}`` with its two figures.

    python benchmarks/digits_quality.py --run-dir runs/digits     # -> benchmarks/results/digits_quality.json, digits_sims_report.*
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def stage_times(log: str) -> dict:
    out = {}
    for line in log.splitlines():
        if line.startswith("[sims] base model:") and "min)" in line:
            out["base_min"] = float(line.rsplit("(", 1)[1].split()[0])
        if line.startswith("[sims] report:") and "min in all" in line:
            out["total_min"] = float(line.rsplit("(", 1)[1].split()[0])
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/digits.yaml")
    p.add_argument("--run-dir", default="runs/digits")
    p.add_argument("--skip-train", action="store_true", help="judge an existing run")
    p.add_argument("--train-log", default=None,
                   help="with --skip-train: that run's sims-train output, for its stage times (and --train-command)")
    p.add_argument("--train-command", default=None, help="with --train-log: the command that wrote it")
    p.add_argument("--out", default="benchmarks/results/digits_quality.json")
    p.add_argument("--name", default="digits", help="prefix of the SIMS report files in benchmarks/results")
    p.add_argument("overrides", nargs="*", help="key=value overrides for sims-train")
    args = p.parse_args()

    record: dict = {"config": args.config, "run_dir": args.run_dir}
    if not args.skip_train:
        cmd = [sys.executable, "-m", "sims.cli.train", args.config, f"run_dir={args.run_dir}", *args.overrides]
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        record["train_command"] = " ".join(["sims-train", *cmd[3:]])
        record["train_wall_min"] = (time.time() - t0) / 60
        record.update(stage_times(proc.stdout))
        if proc.returncode != 0:
            print(proc.stdout[-2000:], proc.stderr[-2000:])
            return 1
    elif args.train_log:
        log = Path(args.train_log).read_text(errors="replace").replace("\r", "\n")
        record["train_command"] = args.train_command or "(not given)"
        record["train_log"] = str(args.train_log)
        record.update(stage_times(log))
    done = Path(args.run_dir) / "base" / "DONE"
    if done.exists():
        fields = dict(line.split("=", 1) for line in done.read_text().split() if "=" in line)
        if "steps_per_second" in fields:
            record["base_steps_per_second"] = float(fields["steps_per_second"])
    import platform

    record["machine"] = f"{platform.node()} ({platform.machine()}, {__import__('os').cpu_count()} cores)"
    record["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                      text=True).stdout.strip()
    samples = Path(args.run_dir) / "samples_0-999"
    cmd = [sys.executable, "-m", "sims.cli.sample", args.run_dir, "--seeds", "0-999", "--out", str(samples), "--grid",
           str(Path(args.run_dir) / "samples_0-999.png")]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    record["sample_command"] = " ".join(["sims-sample", *cmd[3:]])

    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    digits = load_digits()
    clf = LogisticRegression(max_iter=5000).fit(digits.data / 16.0, digits.target)
    x = np.stack([np.asarray(Image.open(samples / f"{s:06d}.png"), dtype=np.float64) for s in range(1000)])
    proba = clf.predict_proba(x.reshape(len(x), -1) / 255.0)
    conf, pred = proba.max(1), proba.argmax(1)
    share = np.bincount(pred, minlength=10) / len(pred)
    record["logreg"] = {"train_accuracy_on_real": float(clf.score(digits.data / 16.0, digits.target)),
                        "confident_fraction@0.5": float((conf >= 0.5).mean()),
                        "class_share": share.round(4).tolist(), "min_class_share": float(share.min()),
                        "targets": {"confident_fraction@0.5": ">= 0.90", "min_class_share": ">= 0.04"}}
    import torch

    from sims.metrics import judge_digits

    cnn = judge_digits(torch.from_numpy(x[:, None] / 127.5 - 1).float(), threshold=0.5)
    record["cnn_judge"] = {"confident_fraction@0.5": cnn["confident_fraction"], "min_class_share": min(cnn["class_share"])}
    report = Path(args.run_dir) / "eval" / "report.json"
    if report.exists():
        import shutil

        rep = json.loads(report.read_text())
        record["sims"] = {k: rep[k] for k in ("base_fd_mean", "best_omega", "best_fd_mean", "relative_change",
                                               "relative_change_per_set", "relative_change_paired_mean", "chosen",
                                               "selection_seed_offsets", "report_seed_offsets") if k in rep}
        results = ROOT / "benchmarks" / "results"
        for src, dst in (("report.json", "sims_report.json"), ("report.md", "sims_report.md"),
                         ("fd_vs_omega.png", "fd_vs_omega.png"), ("grid_base_vs_sims.png", "grid_base_vs_sims.png"),
                         ("shares_vs_omega.png", "shares_vs_omega.png")):
            if (report.parent / src).exists():
                shutil.copyfile(report.parent / src, results / f"{args.name}_{dst}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    lr = record["logreg"]
    print(f"| judge | confident (p >= 0.5) | min class share |\n|---|---|---|\n"
          f"| logistic regression | {lr['confident_fraction@0.5']:.3f} | {lr['min_class_share']:.3f} |\n"
          f"| shipped CNN | {cnn['confident_fraction']:.3f} | {min(cnn['class_share']):.3f} |")
    for k in ("train_wall_min", "base_min", "total_min", "base_steps_per_second"):
        if k in record:
            print(f"{k}: {record[k]:.1f}")
    if "sims" in record:
        s = record["sims"]
        print(f"SIMS (held-out report sets): omega {s.get('best_omega')}, FD {s.get('best_fd_mean'):.4g} vs base "
              f"{s.get('base_fd_mean'):.4g}; per set {[round(c * 100, 1) for c in s.get('relative_change_per_set', [])]} %, "
              f"mean of paired changes {s.get('relative_change_paired_mean', 0) * 100:+.1f}%")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
