"""Cheap generative models for the self-consuming loop ("Collapse or Thrive?" task settings).

- :class:`~sims.toy.gaussian.GaussianMLE`: multivariate Gaussian MLE, vectorised over seeds.
- :class:`~sims.toy.kde.KDEModel`: scikit-learn Gaussian-kernel KDE on 2-D/3-D toy data.

Both implement :class:`sims.loop.GenerativeModel` and are registered in :mod:`sims.loop` as
``gaussian`` and ``kde``.
"""
from sims.toy.gaussian import GaussianMLE
from sims.toy.kde import KDEModel

__all__ = ["GaussianMLE", "KDEModel"]
