"""KDE model collapse through the loop driver ("Collapse or Thrive?" KDE setting).

Kazdan, Schaeffer et al. 2025 (arXiv 2410.16713): Gaussian-kernel KDE (scikit-learn
``KernelDensity``) on moons (``sims.data.toys.make_toy``, noise 0.05, standardised coordinates),
n = 100 samples per generation, bandwidth 0.1, 100 generations; workflows replace, accumulate,
accumulate-subsample; metric: mean NLL of 500 fresh real test points (one test set per seed,
shared by all generations and workflows). Expected: replace's NLL diverges, accumulate's stays
bounded, accumulate-subsample in between.

Runs :func:`sims.loop.run_loop` (same code path as ``sims-train configs/loop/kde.yaml``).
Outputs: ``benchmarks/results/loop_kde.{json,md,png}``; the run directory is temporary unless
``--run-dir`` is given.

Usage::

    python benchmarks/loop_kde.py                        # moons, n=100, h=0.1, 100 gens, 10 seeds
    python benchmarks/loop_kde.py --toy circles --bandwidth 0.5 --seeds 20
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sims.config import load_config  # noqa: E402
from sims.loop import run_loop, series  # noqa: E402
from sims.utils import atomic_write, atomic_write_json, atomic_write_text  # noqa: E402

WORKFLOWS = ["replace", "accumulate", "accumulate-subsample"]
CHECK_T = [1, 2, 5, 10, 25, 50, 100]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--toy", default="moons")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--bandwidth", type=float, default=0.1)
    p.add_argument("--generations", type=int, default=100)
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--run-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--name", default="loop_kde")
    args = p.parse_args(argv)

    cfg = load_config(ROOT / "configs/loop/kde.yaml", [
        "run_dir=unused", f"loop.toy={args.toy}", f"loop.num_real={args.n}", f"loop.num_synthetic={args.n}",
        f"loop.bandwidth={args.bandwidth}", f"loop.generations={args.generations}",
        "loop.seeds=" + json.dumps(list(range(args.seeds))), "loop.workflows=" + json.dumps(WORKFLOWS)])
    tmp = Path(tempfile.mkdtemp(prefix="loop_kde_")) if args.run_dir is None else args.run_dir
    try:
        t0 = time.perf_counter()
        res = run_loop(cfg, tmp / "run", plots=False)
        wall = time.perf_counter() - t0
    finally:
        if args.run_dir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    curves = {}
    for (wf, method), s in series(res.rows, "test_nll").items():
        curves[wf] = {"mean": s["mean"].tolist(), "ci95": s["ci95"].tolist(), "std": s["std"].tolist(),
                      "median": np.median(s["per_seed"], axis=0).tolist()}
    out = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
           "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
           "toy": args.toy, "n": args.n, "bandwidth": args.bandwidth, "generations": args.generations,
           "seeds": args.seeds, "num_test": int(cfg.loop.num_test), "noise": float(cfg.data.noise),
           "wall_s": wall, "test_nll": curves}
    md = markdown(out)
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / f"{args.name}.json", out)
    atomic_write_text(args.out / f"{args.name}.md", md)
    plot(out, args.out / f"{args.name}.png")
    return 0


def markdown(r) -> str:
    G = r["generations"]
    lines = [f"# KDE collapse loop ({r['toy']}, n={r['n']}, bandwidth {r['bandwidth']}, {G} generations, {r['seeds']} seeds)", "",
             f"Command: `python benchmarks/{r['command']}`; machine: {r['machine']}; wall time {r['wall_s']:.1f} s "
             "(run_loop incl. storage).", "",
             f"Mean NLL of {r['num_test']} fresh real test points (nats/point; mean over seeds ± 95% CI):", "",
             "| t | " + " | ".join(r["test_nll"]) + " |", "|---|" + "---|" * len(r["test_nll"])]
    for t in [t for t in CHECK_T if t <= G]:
        lines.append(f"| {t} | " + " | ".join(f"{c['mean'][t - 1]:.3f} ± {c['ci95'][t - 1]:.2g}" for c in r["test_nll"].values()) + " |")
    lines += ["", "Increase of the NLL from generation 1 to generation "
              f"{G}: " + ", ".join(f"{wf} {c['mean'][-1] - c['mean'][0]:+.3f}" for wf, c in r["test_nll"].items()), ""]
    return "\n".join(lines)


def plot(r, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    t = np.arange(1, r["generations"] + 1)
    for wf, c in r["test_nll"].items():
        m, ci = np.array(c["mean"]), np.array(c["ci95"])
        (line,) = ax.plot(t, m, label=wf)
        ax.fill_between(t, m - ci, m + ci, color=line.get_color(), alpha=0.2, lw=0)
    ax.set_xlabel("generation")
    ax.set_ylabel("test NLL (nats / point)")
    ax.set_title(f"KDE {r['toy']}, n={r['n']}, h={r['bandwidth']}, {r['seeds']} seeds (band: 95% CI)", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=90))


if __name__ == "__main__":
    sys.exit(main())
