"""Evaluation of base vs SIMS-guided sampling over an ω grid on paired seed sets (SPEC §1, §4).

For every seed set (seeds offset … offset+N−1, the same seeds for every ω) and every ω, samples are
generated with D = (1+ω)·D_base − ω·D_aux, mapped to features, and compared with the reference
statistics of the real data: Fréchet distance (Heusel et al. 2017), precision/recall (k = 5,
Kynkäänniemi et al. 2019), and on digits the share/confidence judged by the shipped classifier.
Results are written after each (ω, set) so a killed evaluation resumes where it stopped.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from sims.diffusion import SIMSGuidance, sampler_nfe
from sims.generation import barrier, dist_info, sample_seeds, seed_batches
from sims.metrics import (FeatureStats, build_feature_extractor, check_feature_dim, frechet_distance, load_npz,
                          precision_recall, save_npz)
from sims.utils import atomic_write, atomic_write_json, atomic_write_text


def feature_name(features: str, data_name: str, is_image: bool) -> str:
    """Resolve ``sims.features=auto``: digit features on digits, identity on vectors, Inception otherwise."""
    if features != "auto":
        return features
    if not is_image:
        return "identity"
    return "digits" if data_name == "digits" else "inception"


def make_extractor(cfg, dataset, device):
    name = feature_name(cfg.sims.features, cfg.data.name, dataset.is_image)
    ext = build_feature_extractor(name, data_dim=dataset.dim, inception_weights=cfg.sims.inception_weights)
    return name, (ext.to(device) if isinstance(ext, torch.nn.Module) else ext)


@torch.no_grad()
def features_of(extractor, x: torch.Tensor, device, batch_size: int = 1000) -> torch.Tensor:
    """Features [N, D] of samples [N, ...] (computed in batches on ``device``, returned on CPU)."""
    out = [extractor(x[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out)


def real_statistics(extractor, data: torch.Tensor, device) -> Tuple[Tuple[np.ndarray, np.ndarray], torch.Tensor]:
    """Features of the real data and their statistics: ((mu [D], sigma [D, D]), features [N, D])."""
    feats = features_of(extractor, data, device)
    return FeatureStats(feats.shape[1]).update(feats).mean_cov(), feats


def reference(cfg, eval_dir: Path, extractor, dataset, device) -> Tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """Reference statistics (mu, sigma) and real features for precision/recall.

    ``sims.reference`` (an EDM-format .npz) is used when set, else statistics of the whole training
    set are computed and saved to ``eval_dir/reference.npz``.

    Raises:
        ValueError: reference statistics with another feature dimension than the extractor's.
    """
    real = features_of(extractor, dataset.data, device)
    if cfg.sims.reference:  # the given statistics replace the data's: no covariance of the real features needed
        mu, sigma = load_npz(cfg.sims.reference)
        check_feature_dim(mu, real.shape[1], source=f"reference statistics {cfg.sims.reference}")
    else:
        mu, sigma = FeatureStats(real.shape[1]).update(real).mean_cov()
        if dist_info()[0] == 0:
            save_npz(eval_dir / "reference.npz", mu, sigma)
    return np.asarray(mu), np.asarray(sigma), real


def resample_floor(real_feats: torch.Tensor, mu_r: np.ndarray, sigma_r: np.ndarray, n: int, repeats: int = 3,
                   seed: int = 0) -> Dict[str, float]:
    """The Fréchet distance a perfect model would get at ``n`` samples: real features resampled.

    FD estimated from ``n`` samples is biased upwards (roughly ∝ 1/n); drawing ``n`` of the real
    feature vectors [N, D] with replacement and comparing them with the reference (mu_r [D],
    sigma_r [D, D]) measures that floor, so a relative change can be read against it.

    Returns:
        {"mean": mean FD over ``repeats`` draws, "std": their standard deviation}.
    """
    gen = torch.Generator().manual_seed(seed)
    fds = []
    for _ in range(repeats):
        idx = torch.randint(len(real_feats), (n,), generator=gen)
        mu, sigma = FeatureStats(real_feats.shape[1]).update(real_feats[idx]).mean_cov()
        fds.append(frechet_distance(mu, sigma, mu_r, sigma_r))
    return {"mean": float(np.mean(fds)), "std": float(np.std(fds))}


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Images as they are written to PNG: clip(round(127.5·x + 127.5))/127.5 − 1 (SPEC §4); vectors unchanged."""
    if x.ndim != 4:
        return x
    return (x * 127.5 + 127.5).round().clamp(0, 255) / 127.5 - 1


@torch.no_grad()
def evaluate_one(denoiser, seeds: Sequence[int], data_shape, label_dim: int, sampler: Dict[str, Any], extractor,
                 device, batch_size: int, keep: int = 100, judge: bool = False,
                 threshold: float = 0.5) -> Tuple[FeatureStats, torch.Tensor, Optional[Dict[str, Any]]]:
    """Generate ``seeds`` (sharded over ranks), quantise images to 8 bits, accumulate features across ranks.

    Args:
        judge: also judge digits with the shipped classifier (class shares, share with top-class
            probability ≥ ``threshold``), summed over ranks.
    Returns:
        (merged FeatureStats keeping every feature vector, the first ``keep`` samples made on this rank,
        the judge's dict or None).
    """
    rank, world = dist_info()
    stats = FeatureStats(max_items=len(seeds))
    kept: List[torch.Tensor] = []
    counts = torch.zeros(12, dtype=torch.float64)  # 10 class counts, confident count, confidence sum
    clf = None
    if judge:
        from sims.metrics import load_digits_classifier

        clf = load_digits_classifier().to(device)
    for batch in seed_batches(seeds, batch_size, rank, world):
        x, _ = sample_seeds(denoiser, batch, data_shape, label_dim=label_dim, sampler=sampler, device=device)
        x = quantize(x)
        stats.update(features_of(extractor, x, device))
        if clf is not None:
            conf, pred = clf.probabilities(x.to(device)).cpu().max(dim=1)
            counts[:10] += torch.bincount(pred, minlength=10).double()
            counts[10] += float((conf >= threshold).sum())
            counts[11] += float(conf.sum())
        if keep > 0 and sum(len(k) for k in kept) < keep:
            kept.append(x)
    stats.all_reduce()
    if world > 1 and clf is not None:
        c = counts.to(device)
        torch.distributed.all_reduce(c)
        counts = c.cpu()
    verdict = None
    if clf is not None:
        total = float(counts[:10].sum())
        verdict = {"class_share": (counts[:10] / total).tolist(), "confident_fraction": float(counts[10]) / total,
                   "mean_confidence": float(counts[11]) / total, "threshold": threshold}
    return stats, (torch.cat(kept)[:keep] if kept else torch.empty(0)), verdict


def evaluate_grid(cfg, eval_dir: Path, dataset, base, aux, data_shape, label_dim: int, device) -> Dict[str, Any]:
    """Evaluate every ω of ``sims.omegas`` on every seed set of ``sims.eval_seed_offsets``; resumable.

    Returns:
        The report dict (also written as ``report.json``, ``report.md``, ``fid_vs_omega.png`` and
        ``grid_base_vs_sims.png`` in ``eval_dir``).
    """
    rank, _ = dist_info()
    eval_dir.mkdir(parents=True, exist_ok=True)
    fname, extractor = make_extractor(cfg, dataset, device)
    mu_r, sigma_r, real_feats = reference(cfg, eval_dir, extractor, dataset, device)
    results_path = eval_dir / "results.json"
    results: Dict[str, Any] = json.loads(results_path.read_text()) if results_path.exists() else {}
    sampler = dict(cfg.sampler)
    n = int(cfg.sims.eval_num_samples)
    first_set = cfg.sims.eval_seed_offsets[0]
    samples_for_grid: Dict[float, torch.Tensor] = {}
    for offset in cfg.sims.eval_seed_offsets:
        seeds = list(range(int(offset), int(offset) + n))
        for omega in cfg.sims.omegas:
            key = f"omega={float(omega):g}@seeds={offset}"
            if key in results:
                continue
            denoiser = SIMSGuidance(base, aux, float(omega), sigma_interval=cfg.sims.sigma_interval)
            stats, kept, verdict = evaluate_one(denoiser, seeds, data_shape, label_dim, sampler, extractor, device,
                                                int(cfg.sampler.batch_size), judge=fname == "digits")
            if offset == first_set:
                samples_for_grid[float(omega)] = kept
            mu, sigma = stats.mean_cov()
            row = {"omega": float(omega), "seed_offset": int(offset), "num_samples": n, "features": fname,
                   "fd": frechet_distance(mu, sigma, mu_r, sigma_r),
                   # ‖μ − μ_r‖²: the part of FD from the mean alone (on digits, mostly class proportions)
                   "fd_mean_term": float(np.sum((np.asarray(mu) - mu_r) ** 2)),
                   **precision_recall(real_feats, stats.features(), k=5)}
            if verdict is not None:
                row.update({"confident_fraction": verdict["confident_fraction"],
                            "mean_confidence": verdict["mean_confidence"],
                            "min_class_share": float(min(verdict["class_share"]))})
            results[key] = row
            if rank == 0:
                atomic_write_json(results_path, results)
                print(f"[sims] eval {key}: fd={row['fd']:.4f} precision={row['precision']:.3f} "
                      f"recall={row['recall']:.3f}", flush=True)
    barrier()
    report = summarize(cfg, results, fname)
    if rank == 0:  # only rank 0 writes the report: the other ranks need not pay for the floor
        report["real_resample_fd"] = resample_floor(real_feats, mu_r, sigma_r, n)
        if not samples_for_grid or 0.0 not in samples_for_grid:
            samples_for_grid = _grid_samples(cfg, base, aux, data_shape, label_dim, device, report)
        write_report(eval_dir, report, samples_for_grid)
    return report


def _grid_samples(cfg, base, aux, data_shape, label_dim, device, report) -> Dict[float, torch.Tensor]:
    """100 samples of the first seed set for ω = 0 and the best ω (when resuming a finished evaluation)."""
    seeds = list(range(int(cfg.sims.eval_seed_offsets[0]), int(cfg.sims.eval_seed_offsets[0]) + 100))
    out = {}
    for w in {0.0, float(report.get("best_omega", 0.0))}:
        x, _ = sample_seeds(SIMSGuidance(base, aux, w, sigma_interval=cfg.sims.sigma_interval), seeds, data_shape,
                            label_dim=label_dim, sampler=dict(cfg.sampler), device=device)
        out[w] = quantize(x)
    return out


def summarize(cfg, results: Dict[str, Any], features: str) -> Dict[str, Any]:
    """Per-ω means over seed sets, the best ω (lowest mean Fréchet distance) and the change vs ω = 0."""
    rows = list(results.values())
    omegas = sorted({r["omega"] for r in rows})
    sets = sorted({r["seed_offset"] for r in rows})
    summary = []
    for w in omegas:
        rs = [r for r in rows if r["omega"] == w]
        entry = {"omega": w, "fd_per_set": [r["fd"] for r in sorted(rs, key=lambda r: r["seed_offset"])]}
        for k in ("fd", "precision", "recall", "confident_fraction", "min_class_share"):
            vals = [r[k] for r in rs if k in r]
            if vals:
                entry[f"{k}_mean"] = float(np.mean(vals))
        summary.append(entry)
    base = next((e for e in summary if e["omega"] == 0.0), None)
    best = min(summary, key=lambda e: e["fd_mean"]) if summary else None
    steps, solver = int(cfg.sampler.num_steps), str(cfg.sampler.solver)
    out = {"features": features, "num_samples_per_set": int(cfg.sims.eval_num_samples), "seed_offsets": sets,
           "nfe": {"base": sampler_nfe(steps, solver), "sims": 2 * sampler_nfe(steps, solver)},
           "sigma_interval": list(cfg.sims.sigma_interval) if cfg.sims.sigma_interval else None,
           "summary": summary, "results": rows}
    if base is not None and best is not None:
        out["base_fd_mean"] = base["fd_mean"]
        out["best_omega"] = best["omega"]
        out["best_fd_mean"] = best["fd_mean"]
        out["relative_change"] = best["fd_mean"] / base["fd_mean"] - 1.0
        out["relative_change_per_set"] = [b / a - 1.0 for a, b in zip(base["fd_per_set"], best["fd_per_set"])]
    return out


def write_report(eval_dir: Path, report: Dict[str, Any], samples: Dict[float, torch.Tensor]) -> None:
    """report.json, report.md (table), fid_vs_omega.png, grid_base_vs_sims.png."""
    atomic_write_json(eval_dir / "report.json", report)
    lines = [f"# SIMS evaluation ({report['features']} features, {report['num_samples_per_set']} samples per "
             f"seed set, sets at {report['seed_offsets']})", "",
             f"NFE: base {report['nfe']['base']}, SIMS {report['nfe']['sims']}.", "",
             "| ω | FD (mean) | FD per seed set | Δ vs base | precision | recall |", "|---|---|---|---|---|---|"]
    base_fd = report.get("base_fd_mean")
    for e in report["summary"]:
        delta = f"{(e['fd_mean'] / base_fd - 1) * 100:+.1f}%" if base_fd else ""
        per = ", ".join(f"{v:.4g}" for v in e["fd_per_set"])
        lines.append(f"| {e['omega']:g} | {e['fd_mean']:.4g} | {per} | {delta} | {e.get('precision_mean', float('nan')):.3f} "
                     f"| {e.get('recall_mean', float('nan')):.3f} |")
    if "best_omega" in report:
        lines += ["", f"Best ω = {report['best_omega']:g}: FD {report['best_fd_mean']:.4g} vs base {base_fd:.4g} "
                      f"({report['relative_change'] * 100:+.1f}%; per set "
                      + ", ".join(f"{c * 100:+.1f}%" for c in report["relative_change_per_set"]) + ")."]
    floor = report.get("real_resample_fd")
    if floor:
        lines += ["", f"Finite-sample floor: the real data resampled to {report['num_samples_per_set']} gives FD "
                      f"{floor['mean']:.4g} ± {floor['std']:.2g} (what a perfect model would score)."]
    atomic_write_text(eval_dir / "report.md", "\n".join(lines) + "\n")
    _plot(eval_dir / "fid_vs_omega.png", report)
    best = report.get("best_omega")
    if samples and best is not None and 0.0 in samples and best in samples:
        _side_by_side(eval_dir / "grid_base_vs_sims.png", samples[0.0], samples[best], best)


def _plot(path: Path, report: Dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    om = [e["omega"] for e in report["summary"]]
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=110)
    nsets = len(report["seed_offsets"])
    for i in range(nsets):
        ax.plot(om, [e["fd_per_set"][i] if i < len(e["fd_per_set"]) else math.nan for e in report["summary"]],
                "o--", alpha=0.5, label=f"seeds {report['seed_offsets'][i]}+")
    ax.plot(om, [e["fd_mean"] for e in report["summary"]], "o-", color="k", label="mean")
    ax.set_xlabel("guidance weight ω (0 = base)")
    ax.set_ylabel(f"Fréchet distance ({report['features']})")
    ax.set_title("SIMS: FD vs ω")
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)


def _side_by_side(path: Path, base: torch.Tensor, sims: torch.Tensor, omega: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sims.generation import make_grid, to_uint8

    fig, axes = plt.subplots(1, 2, figsize=(8, 4.2), dpi=110)
    for ax, x, title in zip(axes, (base, sims), ("base (ω = 0)", f"SIMS (ω = {omega:g})")):
        if x.ndim == 4:
            g = np.asarray(make_grid(to_uint8(x[:100])))
            ax.imshow(g, cmap="gray" if g.ndim == 2 else None, interpolation="nearest")
            ax.axis("off")
        else:
            ax.scatter(x[:, 0], x[:, 1], s=3)
        ax.set_title(title)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
