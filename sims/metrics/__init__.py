"""Evaluation metrics: feature extractors, running feature statistics, FID / KID / precision-recall.

Typical use (SPEC section 4)::

    from sims.metrics import build_feature_extractor, compute_stats, frechet_distance, load_npz
    ext = build_feature_extractor("digits")
    fake = compute_stats(ext, sample_batches, ctx=ctx)  # all-reduced over the ranks of a DistContext
    mu_r, sigma_r = load_npz("ref.npz")
    fd = frechet_distance(*fake.mean_cov(), mu_r, sigma_r)
"""
from sims.metrics.features import (
    FEATURE_EXTRACTORS,
    DigitsClassifier,
    DigitsFeatures,
    IdentityFeatures,
    InceptionFeatures,
    build_feature_extractor,
    compute_stats,
    judge_digits,
    load_digits_classifier,
)
from sims.metrics.frechet import KNNManifold, frechet_distance, kernel_inception_distance, precision_recall
from sims.metrics.stats import FeatureStats, check_feature_dim, load_npz, save_npz

__all__ = [
    "FeatureStats",
    "save_npz",
    "load_npz",
    "check_feature_dim",
    "frechet_distance",
    "kernel_inception_distance",
    "precision_recall",
    "KNNManifold",
    "FEATURE_EXTRACTORS",
    "IdentityFeatures",
    "DigitsClassifier",
    "DigitsFeatures",
    "InceptionFeatures",
    "build_feature_extractor",
    "compute_stats",
    "judge_digits",
    "load_digits_classifier",
]
