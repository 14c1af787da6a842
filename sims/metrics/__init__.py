"""Evaluation metrics: feature extractors, running feature statistics, FID / KID / precision-recall.

Typical use (SPEC section 4)::

    from sims.metrics import build_feature_extractor, compute_stats, frechet_distance, load_npz
    ext = build_feature_extractor("digits")
    fake = compute_stats(ext, sample_batches, ctx=ctx)  # all-reduced over the ranks of a DistContext
    mu_r, sigma_r = load_npz("ref.npz")
    fd = frechet_distance(*fake.mean_cov(), mu_r, sigma_r)
"""
from sims.metrics import features as _features
from sims.metrics import frechet as _frechet
from sims.metrics import stats as _stats

# The package re-exports each submodule's public names, as listed in its __all__ (hence the noqa).
from sims.metrics.features import (DIGITS_INFO, DIGITS_WEIGHTS, FEATURE_EXTRACTORS, DigitsClassifier,  # noqa: F401
                                   DigitsFeatures, IdentityFeatures, InceptionFeatures, build_feature_extractor,  # noqa: F401
                                   compute_stats, judge_digits, load_digits_classifier, load_digits_info)  # noqa: F401
from sims.metrics.frechet import KNNManifold, frechet_distance, kernel_inception_distance, precision_recall  # noqa: F401
from sims.metrics.stats import FeatureStats, check_feature_dim, load_npz, save_npz  # noqa: F401

__all__ = [*_stats.__all__, *_frechet.__all__, *_features.__all__]
