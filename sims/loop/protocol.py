"""What the loop driver needs from a generative model (:class:`GenerativeModel`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Protocol, Tuple

import numpy as np

from sims.data.workflows import TrainingData

METHODS: Tuple[str, ...] = ("standard", "sims")
"""Sampling methods: ``standard`` (the model's own sampler) or ``sims`` (negative guidance)."""
INITS: Tuple[str, ...] = ("scratch", "previous")


class GenerativeModel(Protocol):
    """What the loop driver needs from a generative model.

    Attributes:
        batched: if True, every method takes a *sequence* of S seeds and arrays carry a leading
            seed axis ([S, N, ...]); the driver then runs all seeds of a run as one batch
            (cheap models vectorised over seeds, e.g. :class:`sims.toy.gaussian.GaussianMLE`).
            If False (diffusion, KDE) seeds are ints, arrays have no seed axis, and the driver
            runs one seed at a time.
        supported_methods: subset of :data:`METHODS`; others are refused before any work.
        num_real_available: size of the real data set, or None if unlimited (a known
            distribution). Checked against the workflows' needs before any work.
        recompute_synthetic (optional, default False): True if the model's fit and sampling are
            cheap enough to redo (the toys). The driver then keeps the synthetic data in memory
            only (no ``synthetic/*.npz``) and, on resume, *replays* each unfinished stream's
            completed generations (fit + sample, deterministic by the contract below; no hooks,
            no records) to rebuild its pool. Left False (diffusion), every generation's samples are
            stored atomically and reloaded on resume.

    Contract (what makes resume and reproducibility work):

    - every method is a deterministic function of its arguments and of what ``fit`` left in
      ``workdir``; all randomness comes from the integer ``seed`` arguments;
    - ``fit`` must be *idempotent and resumable*: the driver calls it again with the same
      arguments after a crash. A model whose fit is expensive (diffusion) writes its checkpoints
      in ``workdir`` (``workdir`` is unique to the (workflow, method, seed, generation); generation
      1 is shared by all workflows), resumes from the latest checkpoint there, and if ``workdir``
      already holds a finished model (e.g. a ``done`` marker written last, atomically) just
      loads it. ``previous`` is the previous generation's ``workdir`` when ``loop.init ==
      "previous"`` (warm start from the model saved there), else None;
    - ``sample`` returns the same array on every call with the same seed (and, under DDP, the
      full array on every rank);
    - ``evaluate`` returns ``{metric name: value}`` (floats; arrays [S] if batched).

    Models are built by a factory ``factory(cfg, ctx)`` named in :mod:`sims.loop.registry`
    (:class:`sims.loop.models.diffusion.DiffusionLoopModel` is the diffusion one).
    """

    batched: bool
    supported_methods: Tuple[str, ...]
    num_real_available: Optional[int]
    recompute_synthetic: bool

    def real_data(self, num: int, *, seed: Any) -> np.ndarray:
        """``num`` real training samples for ``seed`` ([num, ...]; batched: [S, num, ...]).

        Must be prefix-stable (the first k rows never depend on ``num``); a finite data set is
        typically permuted with ``seed`` and its first ``num`` items returned.
        """

    def fit(self, train_data: TrainingData, *, generation: int, seed: Any, workdir: Path,
            previous: Optional[Path] = None, method: str = "standard") -> None:
        """Train on ``train_data`` (``np.asarray(train_data)`` gives [N, ...]; batched [S, N, ...]).

        The arrays may be read-only views of the driver's sample pool, valid during this call
        only: copy whatever must outlive it.
        """

    def sample(self, num: int, *, seed: Any) -> np.ndarray:
        """``num`` samples of the fitted model ([num, ...]; batched [S, num, ...])."""

    def evaluate(self, samples: np.ndarray, *, seed: Any) -> Mapping[str, Any]:
        """Metrics of the fitted model; ``samples`` were just drawn by :meth:`sample` (the synthetic
        data, or ``loop.num_eval`` samples with their own seed)."""
