"""Evaluate a denoiser by the field's protocol (SPEC §4): sample → 8-bit quantise → features →
Fréchet distance and precision/recall against reference statistics — one function for every caller
(the SIMS evaluation, the FD callback during training, the loop's diffusion model, ``sims-fid``).

Sampling and features are sharded over the job's ranks (a rank may get no batch); the float64
feature moments are all-reduced; precision/recall runs once, on rank 0, on sets of equal size
(Kynkäänniemi et al. 2019 compare equal sizes): the real manifold is a fixed subset of the real
features whose k-NN radii are computed once per reference, and the fake set is the first seeds of
the evaluated seed list (the same samples whatever the number of processes).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from sims.data.images import quantize
from sims.diffusion import CountedDenoiser, SIMSGuidance
from sims.dist import DistContext
from sims.errors import InputError
from sims.generation import generate
from sims.metrics import (FEATURE_EXTRACTORS, FeatureStats, KNNManifold, build_feature_extractor, check_feature_dim,
                          frechet_distance, load_npz, precision_recall, save_npz)
from sims.utils import fault_point, sha256_file

PR_K = 5


def feature_name(features: str, data_name: str, is_image: bool) -> str:
    """Resolve ``sims.features=auto``: digit features on digits, identity on vectors, Inception otherwise."""
    if features != "auto":
        return features
    if not is_image:
        return "identity"
    return "digits" if data_name == "digits" else "inception"


def feature_dim(name: str, data_shape: Sequence[int]) -> int:
    """D of extractor ``name`` for samples of ``data_shape`` (known without building it).

    Raises:
        InputError: unknown extractor.
    """
    dims = {"digits": 128, "inception": 2048, "identity": int(np.prod(data_shape))}
    if name not in dims:
        raise InputError(f"unknown feature extractor {name!r}; choose one of {', '.join(FEATURE_EXTRACTORS)}")
    return dims[name]


def extractor_version(name: str) -> str:
    """A record of which extractor (and which weights) made a set of features, stored with reference files."""
    if name == "digits":
        from sims.metrics.features import DIGITS_WEIGHTS

        return f"digits-cnn sha256:{sha256_file(DIGITS_WEIGHTS)[:16]}"
    if name == "inception":
        return "inception-v3 2015-12-05 pool3 (torch-fidelity)"
    return name


def make_extractor(name: str, *, data_dim: int, inception_weights: Optional[str], device) -> torch.nn.Module:
    """The feature extractor ``name`` on ``device`` (see :func:`sims.metrics.build_feature_extractor`)."""
    return build_feature_extractor(name, data_dim=data_dim, inception_weights=inception_weights).to(device)


@torch.no_grad()
def _features(extractor, x: torch.Tensor, device, batch_size: int = 1000) -> torch.Tensor:
    out = [extractor(x[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, extractor.feature_dim)


@dataclass
class Reference:
    """Reference statistics of the real data in one feature space, ready for many evaluations.

    Attributes:
        mu, sigma: mean [D] and covariance [D, D] (float64).
        features: extractor name; version: :func:`extractor_version`.
        source: the ``.npz`` path, or ``computed:<data set>``; sha256: of the ``.npz`` (None if computed).
        num_items: real items behind the statistics (0 if unknown).
        pr_size: size of the precision/recall sets (real subset and fake prefix), on every rank.
        manifold: the real subset's k-NN manifold (rank 0 only), radii computed once.
        real_features: the real subset's features [pr_size, D] on CPU (rank 0 only).
        real_indices: their items' indices in the data set (rank 0 only).
        note: e.g. "EDM reference without an extractor record, accepted for Inception".
    """

    mu: np.ndarray
    sigma: np.ndarray
    features: str
    version: str
    source: str
    sha256: Optional[str]
    num_items: int
    pr_size: int
    manifold: Optional[KNNManifold] = None
    real_features: Optional[torch.Tensor] = None
    real_indices: Optional[torch.Tensor] = None
    note: str = ""

    def provenance(self) -> Dict[str, Any]:
        """What a report row records about this reference."""
        return {"reference": self.source, "reference_sha256": self.sha256, "features": self.features,
                "feature_version": self.version, "reference_items": self.num_items, "reference_note": self.note}


def _dataset_batches(dataset, indices: Sequence[int], batch_size: int):
    from sims.training.sampler import fetch_batch

    for i in range(0, len(indices), batch_size):
        idx = torch.as_tensor(list(indices[i:i + batch_size]), dtype=torch.long)
        yield idx, fetch_batch(dataset, idx)[0]


def check_reference_record(path: str, features: str) -> str:
    """Refuse a reference file whose recorded extractor is not ``features``; return a note.

    ``.npz`` files written by sims carry ``feature_extractor``; EDM's published files carry no
    record and are accepted for Inception features (with a note), refused for others.

    Raises:
        InputError: another extractor recorded, or no record for non-Inception features.
    """
    with np.load(path, allow_pickle=False) as z:
        recorded = str(z["feature_extractor"]) if "feature_extractor" in z.files else None
    if recorded is None:
        if features == "inception":
            return "no extractor record (EDM-style file): assumed Inception-v3 pool3"
        raise InputError(f"reference statistics {path} carry no feature-extractor record and sims.features={features}: "
                         "recompute them with sims-fid --ref-data CONFIG --save-ref FILE")
    if recorded != features:
        raise InputError(f"reference statistics {path} were made with {recorded!r} features, "
                         f"but this run uses {features!r}")
    return ""


def build_reference(ctx: DistContext, extractor, features: str, dataset, *, reference_path: Optional[str] = None,
                    pr_size: int, save_to: Optional[Path] = None, batch_size: int = 1000, seed: int = 0) -> Reference:
    """Reference statistics of the real data set (collective: every rank calls it).

    The real features are computed once, sharded over ranks: their moments are all-reduced into μ
    and Σ (unless ``reference_path`` gives them), and the features of a fixed random subset of
    ``pr_size`` items are gathered on rank 0 for the precision/recall manifold.

    Args:
        extractor: the feature extractor (on ``ctx.device``); features: its name.
        dataset: map-style real data set.
        reference_path: an EDM-format ``.npz`` (``mu``, ``sigma``) to use instead of the data's statistics.
        pr_size: precision/recall set size (capped at the data set's size).
        save_to: rank 0 writes the computed statistics here (with the extractor record).
    Raises:
        InputError / MissingFileError: a reference of another dimension or extractor, or no file.
    """
    n = len(dataset)
    pr_size = int(min(pr_size, n))
    subset = set(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:pr_size].tolist())
    stats = FeatureStats(dim=extractor.feature_dim)
    kept_idx: List[torch.Tensor] = []
    kept: List[torch.Tensor] = []
    mine = list(range(ctx.rank * batch_size, n, batch_size * ctx.world_size))
    for start in mine:
        idx, x = next(_dataset_batches(dataset, list(range(start, min(start + batch_size, n))), batch_size))
        f = _features(extractor, quantize(x), ctx.device, batch_size)
        stats.update(f)
        sel = torch.tensor([int(i) in subset for i in idx], dtype=torch.bool)
        if sel.any():
            kept_idx.append(idx[sel])
            kept.append(f[sel])
    stats.all_reduce(ctx)
    parts = ctx.gather_object((torch.cat(kept_idx) if kept_idx else torch.zeros(0, dtype=torch.long),
                               torch.cat(kept) if kept else torch.zeros(0, extractor.feature_dim)))
    note, sha = "", None
    if reference_path:
        mu, sigma = load_npz(reference_path)
        check_feature_dim(mu, extractor.feature_dim, source=f"reference statistics {reference_path}")
        note = check_reference_record(reference_path, features)
        source, sha = str(reference_path), sha256_file(reference_path)
    else:
        mu, sigma = stats.mean_cov()
        source = f"computed:{getattr(dataset, 'name', 'dataset')}"
        if save_to is not None and ctx.is_main:
            save_npz(save_to, mu, sigma, feature_extractor=np.asarray(features), count=np.asarray(stats.count))
    ref = Reference(np.asarray(mu), np.asarray(sigma), features, extractor_version(features), source, sha,
                    int(stats.count), pr_size, note=note)
    if ctx.is_main:
        idx = torch.cat([p[0] for p in parts])
        feats = torch.cat([p[1] for p in parts])
        order = torch.argsort(idx)
        ref.real_features, ref.real_indices = feats[order], idx[order]
        if pr_size > PR_K:
            ref.manifold = KNNManifold(ref.real_features, k=PR_K, device=ctx.device)
    return ref


@dataclass
class Judge:
    """A classifier that labels samples (class shares, confidence): ``probabilities(x) -> [B, K]``
    for quantised samples [B, ...] in [-1, 1] on ``ctx.device``."""

    name: str
    probabilities: Callable[[torch.Tensor], torch.Tensor]
    num_classes: int
    threshold: float = 0.5


def digits_judge(device) -> Judge:
    """The shipped digits classifier as a :class:`Judge` (confident: top probability ≥ 0.5)."""
    from sims.metrics import load_digits_classifier

    clf = load_digits_classifier().to(device)
    return Judge("digits", clf.probabilities, 10, 0.5)


def guided(base, aux=None, omega: float = 0.0, sigma_interval=None):
    """(denoiser, counters): SIMS guidance D = (1+ω)·D_base − ω·D_aux over counted networks, or the
    counted base alone when ω = 0 — ``sum(c.rows for c in counters) / N`` is the NFE of N samples."""
    base_c = CountedDenoiser(base)
    if omega == 0 or aux is None:
        SIMSGuidance.check_omega(omega)
        if omega != 0:
            raise InputError(f"omega={omega} needs an auxiliary model")
        return base_c, [base_c]
    aux_c = CountedDenoiser(aux)
    return SIMSGuidance(base_c, aux_c, omega, sigma_interval=sigma_interval), [base_c, aux_c]


@torch.no_grad()
def evaluate_samples(ctx: DistContext, batches: Iterable[Tuple[List[int], torch.Tensor]], *, extractor,
                     reference: Reference, judges: Sequence[Judge] = (), pr_ids: Sequence[int] = (),
                     extra_references: Optional[Dict[str, Reference]] = None) -> Dict[str, Any]:
    """Measure samples against a reference: 8-bit quantisation → features → FD, precision/recall and
    the judges' class shares. The one place where FD and precision/recall are computed.

    Collective: each rank passes its own share of the samples (any split, a rank may pass none);
    every rank gets the same result.

    Args:
        batches: this rank's ``(ids, samples [B, ...] in [-1, 1])``; ``ids`` are the samples' seeds
            (or indices), which order the precision/recall subset.
        extractor: feature extractor on ``ctx.device``; reference: :func:`build_reference`.
        judges: classifiers whose class shares and confidence are reported (e.g. :func:`digits_judge`).
        pr_ids: the ids of the samples that form the precision/recall set (at most
            ``reference.pr_size``; empty: no precision/recall).
        extra_references: further statistics to measure FD against, reported as ``fd_<name>``
            (e.g. the real data reweighted to a target's group shares).
    Returns:
        ``fd``, ``fd_mean_term`` (‖μ−μ_r‖², the part of FD from the means), ``num_samples``,
        ``precision``/``recall``/``pr_size`` (None/0 without them) and per judge
        ``<name>_class_share`` (list), ``<name>_confident_fraction``, ``<name>_mean_confidence``.
    Raises:
        InputError: fewer than 2 samples in all.
    """
    stats = FeatureStats(dim=extractor.feature_dim)
    prefix = set(int(i) for i in pr_ids)
    kept_ids: List[int] = []
    kept: List[torch.Tensor] = []
    counts = torch.zeros(sum(j.num_classes + 2 for j in judges), dtype=torch.float64)
    for ids, x in batches:
        x = quantize(x)
        f = _features(extractor, x, ctx.device)
        stats.update(f)
        sel = [i for i, s in enumerate(ids) if int(s) in prefix]
        if sel:
            kept_ids.extend(int(ids[i]) for i in sel)
            kept.append(f[sel])
        offset = 0
        for j in judges:
            conf, pred = j.probabilities(x.to(ctx.device)).float().cpu().max(dim=1)
            counts[offset:offset + j.num_classes] += torch.bincount(pred, minlength=j.num_classes).double()
            counts[offset + j.num_classes] += float((conf >= j.threshold).sum())
            counts[offset + j.num_classes + 1] += float(conf.sum())
            offset += j.num_classes + 2
        fault_point("eval_batch")
    stats.all_reduce(ctx)
    counts = ctx.all_reduce(counts)
    if stats.count < 2:
        raise InputError(f"an evaluation needs at least 2 samples, got {stats.count}")
    mu, sigma = stats.mean_cov()
    result: Dict[str, Any] = {"fd": frechet_distance(mu, sigma, reference.mu, reference.sigma),
                              "fd_mean_term": float(np.sum((np.asarray(mu) - reference.mu) ** 2)),
                              "num_samples": int(stats.count)}
    for name, ref in (extra_references or {}).items():
        result[f"fd_{name}"] = frechet_distance(mu, sigma, ref.mu, ref.sigma)
    offset = 0
    for j in judges:
        c = counts[offset:offset + j.num_classes + 2]
        total = float(c[:j.num_classes].sum())
        result[f"{j.name}_class_share"] = (c[:j.num_classes] / total).tolist()
        result[f"{j.name}_confident_fraction"] = float(c[j.num_classes]) / total
        result[f"{j.name}_mean_confidence"] = float(c[j.num_classes + 1]) / total
        offset += j.num_classes + 2
    pr = None
    parts = ctx.gather_object((kept_ids, torch.cat(kept) if kept else torch.zeros(0, extractor.feature_dim)))
    if ctx.is_main and len(prefix) > PR_K and reference.manifold is not None:
        order = np.argsort(np.concatenate([np.asarray(p[0], dtype=np.int64) for p in parts]), kind="stable")
        fake = torch.cat([p[1] for p in parts])[torch.from_numpy(order)]
        pr = precision_recall(reference.manifold, fake)
        pr["pr_size"] = int(len(fake))
    pr = ctx.broadcast_object(pr)
    result.update(pr if pr is not None else {"precision": None, "recall": None, "pr_size": 0})
    return result


def evaluate_denoiser(ctx: DistContext, base, seeds: Sequence[int], *, data_shape: Sequence[int], label_dim: int,
                      sampler: Dict[str, Any], batch_size: int, extractor, reference: Reference, aux=None,
                      omega: float = 0.0, sigma_interval=None, judges: Sequence[Judge] = (),
                      precision_recall_: bool = True,
                      extra_references: Optional[Dict[str, Reference]] = None) -> Dict[str, Any]:
    """Sample ``seeds`` (SIMS-guided when ``aux`` and ω > 0) sharded over the ranks and measure them
    with :func:`evaluate_samples`; adds ``nfe``, the network evaluations per sample actually made.

    Args:
        base / aux: denoisers D(x, sigma, class_labels); omega, sigma_interval: the guidance.
        seeds: the seed set (each sample a function of its seed); its first ``reference.pr_size``
            seeds form the precision/recall set.
        data_shape, label_dim, sampler, batch_size: as :func:`sims.generation.generate`.
        precision_recall_: False skips precision/recall.
    Raises:
        InputError: fewer than 2 seeds; ω > 0 without an auxiliary model.
    """
    seeds = [int(s) for s in seeds]
    denoiser, counters = guided(base, aux, omega, sigma_interval)
    batches = ((ids, x) for ids, x, _ in generate(ctx, denoiser, seeds, data_shape, label_dim=label_dim,
                                                  sampler=sampler, batch_size=batch_size))
    pr_ids = seeds[:reference.pr_size] if precision_recall_ else []
    result = evaluate_samples(ctx, batches, extractor=extractor, reference=reference, judges=judges, pr_ids=pr_ids,
                              extra_references=extra_references)
    rows = ctx.all_reduce(torch.tensor([float(sum(c.rows for c in counters))], dtype=torch.float64))
    result["nfe"] = float(rows.item()) / result["num_samples"]
    return result


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
