"""2-D toy (moons): does ``sims-train configs/toy2d.yaml`` learn the data, and does SIMS help there?

1. Times ``sims-train configs/toy2d.yaml run_dir=R`` (target ≤ 2 minutes) and compares 5,000 samples
   with 5,000 fresh real points (Fréchet distance in the raw 2-D coordinates, precision/recall k = 5),
   next to the same numbers for two independent real sets (the noise floor).
2. With ``--sims``: times the SIMS pipeline on the same run (``sims.enabled=true``; target ≤ 3 minutes
   in all) and reports base vs SIMS with identity features on two seed sets.

    python benchmarks/toy2d_quality.py [--run-dir runs/toy2d] [--sims]     # -> benchmarks/results/toy2d_quality.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def fd_pr(a: np.ndarray, b: np.ndarray) -> dict:
    from sims.metrics import FeatureStats, frechet_distance, precision_recall

    sa, sb = FeatureStats(2).update(a), FeatureStats(2).update(b)
    (m1, s1), (m2, s2) = sa.mean_cov(), sb.mean_cov()
    pr = precision_recall(torch.from_numpy(a).float(), torch.from_numpy(b).float(), k=5)
    return {"fd": frechet_distance(m1, s1, m2, s2), **pr}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/toy2d")
    p.add_argument("--sims", action="store_true")
    p.add_argument("--out", default="benchmarks/results/toy2d_quality.json")
    args = p.parse_args()
    base_cmd = [sys.executable, "-m", "sims.cli.train", "configs/toy2d.yaml", f"run_dir={args.run_dir}"]
    t0 = time.time()
    subprocess.run(base_cmd, cwd=ROOT, check=True, capture_output=True)
    record = {"train_command": " ".join(["sims-train", *base_cmd[3:]]), "train_wall_s": time.time() - t0}

    from sims.data import make_toy
    from sims.dist import single_process
    from sims.generation import generate
    from sims.training.export import load_denoiser

    den, meta = load_denoiser(Path(args.run_dir) / "base" / "ema.safetensors")
    x = torch.cat([b for _, b, _ in generate(single_process(), den, range(5000), meta["data_shape"],
                                             sampler={"num_steps": 18}, batch_size=2500)])
    real_a = make_toy("moons", 5000, 0.05, seed=12345)
    real_b = make_toy("moons", 5000, 0.05, seed=54321)
    record["samples_vs_real"] = fd_pr(real_a, x.numpy().astype(np.float64))
    record["real_vs_real"] = fd_pr(real_a, real_b)
    print(f"train: {record['train_wall_s']:.0f} s")
    print("| comparison | FD (2-D) | precision | recall |\n|---|---|---|---|")
    for k in ("samples_vs_real", "real_vs_real"):
        r = record[k]
        print(f"| {k} | {r['fd']:.4f} | {r['precision']:.3f} | {r['recall']:.3f} |")
    if args.sims:
        cmd = [*base_cmd, "sims.enabled=true"]
        t0 = time.time()
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
        record["sims_command"] = " ".join(["sims-train", *cmd[3:]])
        record["sims_stages_wall_s"] = time.time() - t0
        record["total_wall_s"] = record["train_wall_s"] + record["sims_stages_wall_s"]
        rep = json.loads((Path(args.run_dir) / "eval" / "report.json").read_text())
        record["sims"] = {k: rep.get(k) for k in ("base_fd_mean", "best_omega", "best_fd_mean", "relative_change",
                                                  "relative_change_per_set", "relative_change_paired_mean",
                                                  "selection", "report_seed_offsets")}
        print(f"SIMS stages: {record['sims_stages_wall_s']:.0f} s (total {record['total_wall_s']:.0f} s); best omega "
              f"{rep.get('best_omega')}: FD {rep.get('best_fd_mean'):.4g} vs base {rep.get('base_fd_mean'):.4g} "
              f"(per set {[round(c * 100, 1) for c in rep.get('relative_change_per_set', [])]} %)")
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
