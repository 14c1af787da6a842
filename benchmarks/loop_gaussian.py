"""Gaussian model collapse through the loop driver ("Collapse or Thrive?" Gaussian setting).

Kazdan, Schaeffer et al. 2025 (arXiv 2410.16713) / Gerstgrasser et al. 2024: truth N(0, I_d),
MLE mean and covariance, n samples per generation, 100 generations; workflows replace,
accumulate and accumulate-subsample. Runs :func:`sims.loop.run_loop` (the same code path as
``sims-train configs/loop/gaussian.yaml``: run directory, npz synthetic data, manifest) for
d = 10 and each n, vectorised over all seeds, and compares with theory:

- replace: E||mu_t - mu_0||^2 = (d/n) sum_{k<t} ((n-1)/n)^k (exact for MLE covariances; ~ t d/n
  for t << n) and E tr Sigma_t / d = ((n-1)/n)^t; det Sigma_t -> 0;
- accumulate: ||mu_t - mu_0||^2 -> (pi^2/6) d/n (expected within 15%);
- accumulate-subsample: in between;
- method ``sims`` (the debiased density-space SIMS analogue, :func:`sims.toy.gaussian.sims_guided_gaussian`):
  replace E tr G_t / d = (kappa (n-1)/n)^t with kappa = E[guided / base covariance] by Monte Carlo
  (:func:`sims.toy.gaussian.sims_covariance_inflation`), and the count of seed-generations whose
  guided precision was not positive definite (metric ``guidance_skipped``).

Timing: wall and CPU seconds of each ``run_loop`` (the whole protocol for one n, records and
metrics files included, no plots), the load average of the machine when it ran, and the speed-up
over the 66.8 s that the "Collapse or Thrive?" authors' own loop took for the n = 1000 protocol
(measured once, elsewhere: not re-measured by this script).

Outputs (small files only): ``benchmarks/results/loop_gaussian.{json,md,png}``; the run
directories go to a temporary directory (``--run-dir`` keeps them; they are large: S x G x n x d
float64 per workflow).

Usage::

    python benchmarks/loop_gaussian.py                      # d=10, n in {100, 1000}, 100 gens, 50 seeds
    python benchmarks/loop_gaussian.py --seeds 100 --n 100 316 1000
    python benchmarks/loop_gaussian.py --methods standard sims --guidance 0.5   # SIMS analogue too
"""
from __future__ import annotations

import argparse
import json
import os
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
from sims.toy.gaussian import (  # noqa: E402
    accumulate_mean_error_limit,
    expected_replace_mean_error,
    expected_replace_trace_ratio,
    expected_sims_replace_trace_ratio,
    sims_covariance_inflation,
)
from sims.utils import atomic_write, atomic_write_json, atomic_write_text  # noqa: E402

WORKFLOWS = ["replace", "accumulate", "accumulate-subsample"]
CHECK_T = [1, 2, 5, 10, 25, 50, 100]
REFERENCE_S = 66.8  # the authors' loop, d=10, n=1000, 100 generations, 50 seeds, 3 workflows; measured once elsewhere
REFERENCE_N = 1000


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=10)
    p.add_argument("--n", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--generations", type=int, default=100)
    p.add_argument("--seeds", type=int, default=50)
    p.add_argument("--methods", nargs="+", default=["standard"])
    p.add_argument("--guidance", type=float, default=0.0, help="SIMS weight w (method sims)")
    p.add_argument("--run-dir", type=Path, default=None, help="keep run directories here (default: temporary)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--name", default="loop_gaussian")
    args = p.parse_args(argv)

    d, G = args.dim, args.generations
    import scipy.stats  # noqa: F401  one-off import of the metrics' t quantiles (~1 s), kept out of the timings
    tmp = Path(tempfile.mkdtemp(prefix="loop_gaussian_")) if args.run_dir is None else args.run_dir
    results = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
               "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
               "dim": d, "generations": G, "seeds": args.seeds, "methods": args.methods, "guidance": args.guidance,
               "runs": {}}
    total = 0.0
    try:
        for n in args.n:
            cfg = load_config(ROOT / "configs/loop/gaussian.yaml", [
                "run_dir=unused", f"loop.dim={d}", f"loop.num_real={n}", f"loop.num_synthetic={n}",
                f"loop.generations={G}", "loop.seeds=" + json.dumps(list(range(args.seeds))),
                "loop.workflows=" + json.dumps(WORKFLOWS), "loop.methods=" + json.dumps(args.methods),
                f"loop.omega={args.guidance}"])
            run_dir = tmp / f"n{n}"
            load = os.getloadavg()[0]
            t0, c0 = time.perf_counter(), time.process_time()
            res = run_loop(cfg, run_dir, plots=False)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            total += wall
            results["runs"][str(n)] = summarise(res.rows, d, n, G, args.methods, wall, args.guidance)
            results["runs"][str(n)].update(cpu_s=cpu, load_avg_1min=load, cpu_count=os.cpu_count())
            print(f"n={n}: {wall:.1f} s wall, {cpu:.1f} s CPU (load average {load:.1f})", flush=True)
    finally:
        if args.run_dir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    results["total_wall_s"] = total
    md = markdown(results)
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / f"{args.name}.json", results)
    atomic_write_text(args.out / f"{args.name}.md", md)
    plot(results, args.out / f"{args.name}.png")
    return 0


def summarise(rows, d, n, G, methods, wall, omega):
    out = {"wall_s": wall, "theory": {}, "curves": {}}
    t = np.arange(1, G + 1)
    out["theory"] = {
        "t_d_over_n": (t * d / n).tolist(),
        "replace_mean_sq_error_mle": expected_replace_mean_error(t, d, n).tolist(),
        "replace_trace_ratio_mle": expected_replace_trace_ratio(t, n).tolist(),
        "accumulate_limit_pi2_6_d_over_n": float(accumulate_mean_error_limit(d, n)),
    }
    if "sims" in methods and omega > 0:
        kappa, se = sims_covariance_inflation(omega, n, d)
        out["theory"]["sims_kappa"] = kappa
        out["theory"]["sims_kappa_se"] = se
        out["theory"]["replace_trace_ratio_sims"] = expected_sims_replace_trace_ratio(t, n, kappa).tolist()
    for metric in ("mean_sq_error", "det_ratio", "trace_ratio"):
        for (wf, method), s in series(rows, metric).items():
            c = out["curves"].setdefault(f"{wf}/{method}", {})
            c[metric] = {"mean": s["mean"].tolist(), "ci95": s["ci95"].tolist(),
                         "median": np.median(s["per_seed"], axis=0).tolist()}
    for (wf, method), s in series(rows, "guidance_skipped").items():
        hits = np.argwhere(s["per_seed"] > 0)
        out["curves"][f"{wf}/{method}"]["guidance_skipped"] = {
            "total": int(len(hits)), "seed_generation": [[int(s["seeds"][i]), int(s["generation"][j])] for i, j in hits]}
    return out


def markdown(res) -> str:
    d, G = res["dim"], res["generations"]
    lines = [f"# Gaussian collapse loop (d={d}, {G} generations, {res['seeds']} seeds, MLE)", "",
             f"Command: `python benchmarks/{res['command']}`; machine: {res['machine']}; "
             f"total wall time {res['total_wall_s']:.1f} s (run_loop: records, manifest and metrics files; "
             "synthetic data kept in memory; no plots; scipy.stats imported beforehand).", "",
             "Timing (the whole protocol through `run_loop`, measured by this run; the reference is the "
             "\"Collapse or Thrive?\" authors' own loop for the n = 1000 protocol, 66.8 s, measured once "
             "elsewhere, not re-measured here):", "",
             "| n | streams | wall s | CPU s | load average (1 min) | speed-up vs 66.8 s reference |",
             "|---|---|---|---|---|---|"]
    for n, r in res["runs"].items():
        ref = f"{REFERENCE_S / r['wall_s']:.1f}x" if int(n) == REFERENCE_N and r["curves"].keys() == {
            f"{w}/standard" for w in WORKFLOWS} else "n/a (different protocol)"
        lines.append(f"| {n} | {len(r['curves'])} | {r['wall_s']:.2f} | {r.get('cpu_s', float('nan')):.2f} | "
                     f"{r.get('load_avg_1min', float('nan')):.1f} on {r.get('cpu_count', '?')} CPUs | {ref} |")
    lines.append("")
    for n, r in res["runs"].items():
        n = int(n)
        th = r["theory"]
        lines += [f"## n = {n}  (wall {r['wall_s']:.1f} s for {len(r['curves'])} workflow/method streams)", "",
                  "Mean error ||mu_t - mu_0||^2 (mean over seeds ± 95% CI):", "",
                  "| t | t·d/n | replace theory (MLE) | replace | ratio to theory | accumulate | accumulate-subsample |",
                  "|---|---|---|---|---|---|---|"]
        for t in [t for t in CHECK_T if t <= G]:
            rep = r["curves"]["replace/standard"]["mean_sq_error"]
            acc = r["curves"]["accumulate/standard"]["mean_sq_error"]
            sub = r["curves"]["accumulate-subsample/standard"]["mean_sq_error"]
            lines.append(f"| {t} | {th['t_d_over_n'][t - 1]:.4g} | {th['replace_mean_sq_error_mle'][t - 1]:.4g} | "
                         f"{rep['mean'][t - 1]:.4g} ± {rep['ci95'][t - 1]:.2g} | "
                         f"{rep['mean'][t - 1] / th['replace_mean_sq_error_mle'][t - 1]:.3f} | "
                         f"{acc['mean'][t - 1]:.4g} ± {acc['ci95'][t - 1]:.2g} | {sub['mean'][t - 1]:.4g} ± {sub['ci95'][t - 1]:.2g} |")
        lim = th["accumulate_limit_pi2_6_d_over_n"]
        lines += ["", f"Final generation (t = {G}); accumulate limit (π²/6)·d/n = {lim:.4g}:", "",
                  "| workflow/method | mean error | / (π²/6)·d/n | det ratio mean | det ratio median | trace ratio mean |",
                  "|---|---|---|---|---|---|"]
        for key, c in r["curves"].items():
            lines.append(f"| {key} | {c['mean_sq_error']['mean'][-1]:.4g} ± {c['mean_sq_error']['ci95'][-1]:.2g} | "
                         f"{c['mean_sq_error']['mean'][-1] / lim:.3f} | {c['det_ratio']['mean'][-1]:.3g} | "
                         f"{c['det_ratio']['median'][-1]:.3g} | {c['trace_ratio']['mean'][-1]:.3g} |")
        lines += ["", f"replace trace ratio at t = {G}: {r['curves']['replace/standard']['trace_ratio']['mean'][-1]:.3g} "
                  f"(theory ((n-1)/n)^t = {th['replace_trace_ratio_mle'][-1]:.3g})", ""]
        if "replace_trace_ratio_sims" in th:
            rs = r["curves"]["replace/sims"]["trace_ratio"]
            lines += [f"SIMS analogue (debiased auxiliary precision, ω = {res['guidance']}): kappa = E[guided/base "
                      f"covariance] = {th['sims_kappa']:.4f} ± {th['sims_kappa_se']:.1g} (Monte Carlo); replace trace "
                      "ratio vs (kappa (n-1)/n)^t:", "",
                      "| t | theory | replace/sims mean ± 95% CI | median | accumulate/sims | accumulate-subsample/sims |",
                      "|---|---|---|---|---|---|"]
            for t in [t for t in CHECK_T if t <= G]:
                acc = r["curves"]["accumulate/sims"]["trace_ratio"]["mean"][t - 1]
                sub = r["curves"]["accumulate-subsample/sims"]["trace_ratio"]["mean"][t - 1]
                lines.append(f"| {t} | {th['replace_trace_ratio_sims'][t - 1]:.4g} | {rs['mean'][t - 1]:.4g} ± "
                             f"{rs['ci95'][t - 1]:.2g} | {rs['median'][t - 1]:.4g} | {acc:.4g} | {sub:.4g} |")
            skips = {k: c["guidance_skipped"] for k, c in r["curves"].items() if "guidance_skipped" in c}
            lines += ["", "Guided precision not positive definite (that seed sampled its base model that generation): "
                      + "; ".join(f"{k}: {v['total']} ({', '.join(f'seed {a} t={b}' for a, b in v['seed_generation'][:5])})"
                                  if v["total"] else f"{k}: 0" for k, v in skips.items()), ""]
    return "\n".join(lines)


def plot(res, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = res["runs"]
    fig = Figure(figsize=(5.2 * len(runs), 8))
    FigureCanvasAgg(fig)
    G = res["generations"]
    t = np.arange(1, G + 1)
    for j, (n, r) in enumerate(runs.items()):
        ax = fig.add_subplot(2, len(runs), j + 1)
        for key, c in r["curves"].items():
            m, ci = np.array(c["mean_sq_error"]["mean"]), np.array(c["mean_sq_error"]["ci95"])
            (line,) = ax.plot(t, m, label=key.replace("/standard", ""))
            ax.fill_between(t, np.maximum(m - ci, m.min() / 10), m + ci, color=line.get_color(), alpha=0.2, lw=0)
        ax.plot(t, r["theory"]["replace_mean_sq_error_mle"], "k--", lw=1, label="replace theory (MLE)")
        ax.plot(t, r["theory"]["t_d_over_n"], "k:", lw=1, label="t·d/n")
        ax.axhline(r["theory"]["accumulate_limit_pi2_6_d_over_n"], color="gray", ls="-.", lw=1, label="(π²/6)·d/n")
        ax.set_yscale("log")
        ax.set_title(f"d={res['dim']}, n={n}: ||μ_t − μ_0||²", fontsize=9)
        ax.set_xlabel("generation")
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
        ax = fig.add_subplot(2, len(runs), len(runs) + j + 1)
        for key, c in r["curves"].items():
            ax.plot(t, c["det_ratio"]["median"], label=key.replace("/standard", "") + " (median)")
        ax.set_yscale("log")
        ax.set_title(f"d={res['dim']}, n={n}: det Σ_t / det Σ_0", fontsize=9)
        ax.set_xlabel("generation")
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=90))


if __name__ == "__main__":
    sys.exit(main())
