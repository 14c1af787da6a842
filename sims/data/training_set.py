"""Which samples one generation of a self-consuming loop trains on (SPEC section 3).

:class:`TrainingSet` is the index bookkeeping that :func:`sims.data.workflows.compose` returns and
:class:`sims.data.sample_pool.SamplePool` turns into arrays: real indices into the real pool of one
seed and synthetic ``(generation, index)`` pairs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np

from sims.errors import WorkflowError


@dataclass(frozen=True)
class TrainingSet:
    """Which samples one generation trains on (for one seed).

    Attributes:
        workflow: workflow name.
        generation: t (1-based).
        real: int64 [k], indices into the seed's real pool (sorted, unique).
        synthetic: int64 [m, 2], rows ``(generation s, index i)`` = sample ``i`` of synthetic
            generation ``s`` (made by the model of generation ``s``), ``1 <= s < t``, sorted,
            unique.
    """

    workflow: str
    generation: int
    real: np.ndarray
    synthetic: np.ndarray

    @property
    def num_real(self) -> int:
        """Number of real samples."""
        return int(self.real.shape[0])

    @property
    def num_synthetic(self) -> int:
        """Number of synthetic samples."""
        return int(self.synthetic.shape[0])

    @property
    def size(self) -> int:
        """Training-set size k + m."""
        return self.num_real + self.num_synthetic

    @property
    def real_fraction(self) -> float:
        """Share of real samples in the training set, in [0, 1]."""
        return self.num_real / self.size if self.size else 0.0

    @property
    def synthetic_generations(self) -> Tuple[int, ...]:
        """Synthetic generations this set draws from, ascending."""
        return tuple(int(g) for g in np.unique(self.synthetic[:, 0]))


def _check_positive(**values: int) -> None:
    for key, value in values.items():
        if int(value) != value or value < 1:
            raise WorkflowError(f"{key} must be a positive integer, got {value!r}")
