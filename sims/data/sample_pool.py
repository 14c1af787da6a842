"""Arrays of a self-consuming loop's training sets (SPEC section 3).

:class:`SamplePool` holds the real and synthetic samples of one loop stream with a leading seed
axis and turns the :class:`~sims.data.training_set.TrainingSet` bookkeeping of
:func:`sims.data.workflows.compose` into :class:`TrainingData` (views of one buffer where possible).
"""
from __future__ import annotations

from typing import Hashable, List, Optional, Sequence, Tuple

import numpy as np

from sims.data.training_set import TrainingSet, _check_positive
from sims.errors import WorkflowError


class TrainingData:
    """A training set as an ordered list of immutable *parts*; ``np.asarray(td)`` concatenates them.

    Models that just want an array call ``np.asarray(train_data)`` (one part: a view, no copy).
    Models that can reuse work across generations (e.g. the Gaussian MLE, whose ``accumulate``
    training set grows by one synthetic generation per generation) may instead walk
    :attr:`parts`: each is ``(key, array)`` where ``key`` is a hashable identifier that is unique
    within a run and always denotes the same array contents (e.g. ``(stream, "syn", 3)``), or
    ``None`` when the part is a one-off (an ``accumulate-subsample`` subset).

    Args:
        parts: ``(key, array)`` pairs, arrays [S, n_i, *item] if ``batched`` else [n_i, *item].
        batched: whether arrays carry a leading seed axis.
        sets: the :class:`TrainingSet` of each seed (bookkeeping; one per seed, or one).
    """

    def __init__(self, parts: Sequence[Tuple[Optional[Hashable], np.ndarray]], *, batched: bool,
                 sets: Sequence[TrainingSet] = ()):
        if not parts:
            raise WorkflowError("empty training set")
        self.parts: List[Tuple[Optional[Hashable], np.ndarray]] = list(parts)
        self.batched = bool(batched)
        self.sets: Tuple[TrainingSet, ...] = tuple(sets)
        self._axis = 1 if batched else 0

    def __len__(self) -> int:
        """N, the number of training samples (per seed)."""
        return sum(int(a.shape[self._axis]) for _, a in self.parts)

    @property
    def shape(self) -> Tuple[int, ...]:
        """Shape of the concatenated array."""
        first = self.parts[0][1].shape
        return first[: self._axis] + (len(self),) + first[self._axis + 1 :]

    def __array__(self, dtype=None, copy=None):
        if len(self.parts) == 1:
            out = self.parts[0][1]
        else:
            out = np.concatenate([a for _, a in self.parts], axis=self._axis)
        return out if dtype is None else out.astype(dtype, copy=False)

    def seed(self, i: int) -> "TrainingData":
        """The training data of seed ``i`` of a batched set, without the seed axis (views)."""
        if not self.batched:
            raise WorkflowError("TrainingData.seed() needs batched data")
        sets = (self.sets[i],) if len(self.sets) > 1 else self.sets
        return TrainingData([(k, a[i]) for k, a in self.parts], batched=False, sets=sets)


class SamplePool:
    """The real and synthetic samples of one loop stream, with a leading seed axis.

    Holds ``real`` [S, R, *item] and the synthetic generations added with :meth:`add`
    ([S, n_s, *item] each) in one preallocated buffer, so that an ``accumulate`` training set is a
    contiguous slice (a view, no copy) and a batch of S seeds can be fitted at once.

    Layout (positions along axis 1): real ``[0, R)``; synthetic generation ``s`` at
    ``[R + (s-1) n_s, R + s n_s)`` if ``keep_history`` else always ``[R, R + n_s)`` (only the
    latest generation is kept: ``replace``, ``fresh``, ``augment`` never look further back).

    Args:
        real: [S, R, *item] real samples of each seed.
        num_synthetic: n_s per generation.
        generations: G, the most generations that will be added.
        keep_history: keep every generation (see :func:`keeps_history`).
    Raises:
        WorkflowError: on shape mismatches or use of a generation that is not in the pool.
    """

    def __init__(self, real: np.ndarray, num_synthetic: int, generations: int, keep_history: bool):
        real = np.asarray(real)
        if real.ndim < 2:
            raise WorkflowError(f"real must be [S, R, ...], got shape {real.shape}")
        _check_positive(num_synthetic=num_synthetic, generations=generations)
        self.num_seeds, self.num_real = int(real.shape[0]), int(real.shape[1])
        self.item_shape = tuple(real.shape[2:])
        self.num_synthetic = int(num_synthetic)
        self.keep_history = bool(keep_history)
        slots = generations if keep_history else 1
        self._buf = np.empty(
            (self.num_seeds, self.num_real + slots * self.num_synthetic) + self.item_shape, dtype=real.dtype
        )
        self._buf[:, : self.num_real] = real
        self._have: set = set()

    @property
    def dtype(self) -> np.dtype:
        """Storage dtype (that of the real data); synthetic samples are cast to it on :meth:`add`."""
        return self._buf.dtype

    def _slot(self, generation: int) -> int:
        return self.num_real + ((generation - 1) * self.num_synthetic if self.keep_history else 0)

    def add(self, generation: int, samples: np.ndarray) -> None:
        """Store synthetic generation ``generation`` ([S, n_s, *item])."""
        samples = np.asarray(samples)
        want = (self.num_seeds, self.num_synthetic) + self.item_shape
        if samples.shape != want:
            raise WorkflowError(f"synthetic generation {generation}: shape {samples.shape}, expected {want}")
        start = self._slot(generation)
        if start + self.num_synthetic > self._buf.shape[1]:
            raise WorkflowError(f"generation {generation} exceeds the pool's capacity")
        self._buf[:, start : start + self.num_synthetic] = samples
        if not self.keep_history:
            self._have.clear()
        self._have.add(int(generation))

    def positions(self, ts: TrainingSet) -> np.ndarray:
        """Positions along axis 1 of the samples of ``ts`` (int64 [size]).

        Raises:
            WorkflowError: a real index beyond R, or a synthetic generation not in the pool.
        """
        if ts.num_real and int(ts.real.max()) >= self.num_real:
            raise WorkflowError(f"real index {int(ts.real.max())} beyond the pool's {self.num_real} real samples")
        missing = set(ts.synthetic_generations) - self._have
        if missing:
            raise WorkflowError(f"synthetic generation(s) {sorted(missing)} are not in the pool")
        syn = ts.synthetic
        if len(syn) and (int(syn[:, 1].min()) < 0 or int(syn[:, 1].max()) >= self.num_synthetic):
            raise WorkflowError(f"synthetic index outside [0, {self.num_synthetic})")
        gen_offset = (syn[:, 0] - 1) * self.num_synthetic if self.keep_history else 0
        syn_pos = self.num_real + gen_offset + syn[:, 1]
        return np.concatenate([ts.real, syn_pos]).astype(np.int64)

    def gather(self, sets: Sequence[TrainingSet]) -> np.ndarray:
        """Training data [S, N, *item] for one training set per seed.

        If all seeds share one contiguous set of positions the result is a read-only *view* of
        the pool (no copy); otherwise a new array.

        Raises:
            WorkflowError: ``len(sets) != S`` or sets of different sizes.
        """
        if len(sets) != self.num_seeds:
            raise WorkflowError(f"need one training set per seed ({self.num_seeds}), got {len(sets)}")
        pos = [self.positions(ts) for ts in sets]
        if len({p.shape[0] for p in pos}) != 1:
            raise WorkflowError("training sets of one batch must have the same size")
        first = pos[0]
        if all(np.array_equal(first, p) for p in pos[1:]):
            if first.size and np.array_equal(first, np.arange(first[0], first[0] + first.size)):
                view = self._buf[:, int(first[0]) : int(first[0]) + first.size]
                view.flags.writeable = False
                return view
            return self._buf[:, first]
        return np.stack([self._buf[i, p] for i, p in enumerate(pos)])

    def training_data(self, sets: Sequence[TrainingSet], key: Hashable = None) -> TrainingData:
        """The training sets of the S seeds as :class:`TrainingData` with a leading seed axis.

        When all seeds share one structured set (every workflow but ``accumulate-subsample``),
        the parts are a contiguous run of real samples, keyed ``(key, "real", start, stop)``, and
        one part per synthetic generation, keyed ``(key, "syn", generation)`` -- views of the
        pool, no copies. Otherwise there is one gathered part with key ``None``. ``key`` should
        identify the stream (workflow, method, seeds) so that keys are unique within a run.

        Raises:
            WorkflowError: as :meth:`positions` / :meth:`gather`.
        """
        if len(sets) != self.num_seeds:
            raise WorkflowError(f"need one training set per seed ({self.num_seeds}), got {len(sets)}")
        first = sets[0]
        same = all(
            ts is first or (np.array_equal(first.real, ts.real) and np.array_equal(first.synthetic, ts.synthetic))
            for ts in sets[1:]
        )
        parts: List[Tuple[Optional[Hashable], np.ndarray]] = []
        if same:
            real, syn = first.real, first.synthetic
            gens, counts = np.unique(syn[:, 0], return_counts=True)
            structured = (
                (not real.size or np.array_equal(real, np.arange(real[0], real[0] + real.size)))
                and bool(np.all(counts == self.num_synthetic))
                and bool(np.all(np.diff(syn[:, 0]) >= 0))
                and np.array_equal(syn[:, 1], np.tile(np.arange(self.num_synthetic), len(gens)))
            )
            gens = [int(g) for g in gens]
            if structured:
                self.positions(first)  # validates indices and generations
                if real.size:
                    a, b = int(real[0]), int(real[0]) + real.size
                    parts.append(((key, "real", a, b), self._readonly(self._buf[:, a:b])))
                for g in gens:
                    start = self._slot(g)
                    parts.append(((key, "syn", g), self._readonly(self._buf[:, start : start + self.num_synthetic])))
                return TrainingData(parts, batched=True, sets=sets)
        return TrainingData([(None, self.gather(sets))], batched=True, sets=sets)

    @staticmethod
    def _readonly(a: np.ndarray) -> np.ndarray:
        a.flags.writeable = False
        return a
