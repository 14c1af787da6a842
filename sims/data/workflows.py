"""Training-set composition of a self-consuming generation loop (SPEC section 3).

A *generation* ``t = 1, 2, ..., G`` fits a model on a training set and then samples
``num_synthetic`` synthetic data points ("synthetic generation t") from it. Generation 1 always
trains on real data only (MAD: "generation 1 trains on real data"); for ``t >= 2`` the workflow
decides which real and which synthetic samples generation ``t`` trains on:

=========================  ==================================================================
``replace``                the ``n_s`` synthetic samples of generation ``t-1`` only (fully
                           synthetic loop; Gerstgrasser et al. 2024 "replace").
``accumulate``             the real set (``n_r``) and every synthetic sample made so far,
                           ``n_r + (t-1) n_s`` samples (Gerstgrasser et al. 2024).
``accumulate-subsample``   pool as ``accumulate``; train on a uniformly drawn subset of fixed
                           size ``m`` (default ``n_r``), drawn without replacement with a
                           generation-specific seed (Kazdan, Schaeffer et al. 2025,
                           arXiv 2410.16713).
``fresh``                  MAD's *fresh data loop* (Alemohammad et al., ICLR 2024, section 5):
                           a new real block of ``n_r`` samples -- real indices
                           ``[(t-1) n_r, t n_r)``, disjoint from every other generation's -- plus
                           the ``n_s`` synthetic samples of generation ``t-1``.
``augment``                MAD's *synthetic augmentation loop* and the SIMS "MAD-prophylaxis"
                           setting (Alemohammad et al. 2024, arXiv 2408.16333): the fixed real set
                           (``n_r``) plus the ``n_s`` synthetic samples of generation ``t-1``
                           (the "pollution" ratio is ``n_s / n_r``).
=========================  ==================================================================

Everything here is *index bookkeeping*: a :class:`TrainingSet` lists which real indices (into
the real pool of one seed) and which synthetic ``(generation, index)`` pairs a generation trains
on, so composition can be tested without any model. :class:`SamplePool` turns that bookkeeping
into arrays (with a leading seed axis, so cheap models can be vectorised over seeds).

Real pool: ``real[i]`` for ``i < required_real(...)``. Block ``b`` is ``[b n_r, (b+1) n_r)``;
every workflow except ``fresh`` uses block 0 only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from sims.errors import WorkflowError

WORKFLOWS: Tuple[str, ...] = ("replace", "accumulate", "accumulate-subsample", "fresh", "augment")
"""Workflow names accepted by :func:`compose`."""

_HISTORY_WORKFLOWS = frozenset({"accumulate", "accumulate-subsample"})


def check_workflow(name: str) -> str:
    """Return ``name`` if it is a known workflow.

    Raises:
        WorkflowError: unknown name; the message lists the choices.
    """
    if name not in WORKFLOWS:
        raise WorkflowError(f"unknown workflow {name!r}; choose one of: {', '.join(WORKFLOWS)}")
    return name


def keeps_history(workflow: str) -> bool:
    """True if generation ``t`` may train on synthetic data older than generation ``t-1``."""
    return check_workflow(workflow) in _HISTORY_WORKFLOWS


def required_real(workflow: str, generations: int, num_real: int) -> int:
    """Number of distinct real samples a ``generations``-long loop of ``workflow`` uses.

    ``fresh`` needs a new block of ``num_real`` per generation (``generations * num_real``);
    every other workflow reuses the first ``num_real``.
    """
    check_workflow(workflow)
    _check_positive(generations=generations, num_real=num_real)
    return generations * num_real if workflow == "fresh" else num_real


def check_real_available(
    workflows: Iterable[str], generations: int, num_real: int, available: Optional[int]
) -> int:
    """Check the real data set is large enough for every workflow; return the largest need.

    Args:
        workflows: workflow names.
        generations: G, number of generations.
        num_real: n_r, real samples per generation.
        available: size of the real data set (``None``: unlimited, e.g. a known distribution).
    Returns:
        ``max(required_real(w, generations, num_real) for w in workflows)``.
    Raises:
        WorkflowError: a workflow needs more real samples than exist; the message says how many
            exist and how many are needed.
    """
    needs = {w: required_real(w, generations, num_real) for w in workflows}
    if not needs:
        raise WorkflowError("no workflow given; choose from: " + ", ".join(WORKFLOWS))
    worst = max(needs, key=needs.get)
    if available is not None and needs[worst] > available:
        how = (
            f"{generations} generations x {num_real} fresh real samples = {needs[worst]}"
            if worst == "fresh"
            else f"{needs[worst]} real samples"
        )
        raise WorkflowError(
            f"workflow {worst!r} needs {how}, but the real data set has only {available}; "
            f"lower loop.num_real{' or loop.generations' if worst == 'fresh' else ''}, or use more data"
        )
    return needs[worst]


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


def _synthetic_block(generation: int, num: int) -> np.ndarray:
    out = np.empty((num, 2), dtype=np.int64)
    out[:, 0] = generation
    out[:, 1] = np.arange(num)
    return out


def compose(
    workflow: str,
    generation: int,
    *,
    num_real: int,
    num_synthetic: int,
    seed: Optional[int] = None,
    subsample_size: Optional[int] = None,
) -> TrainingSet:
    """Training set of ``generation`` under ``workflow`` (see the module docstring for the rules).

    Args:
        workflow: one of :data:`WORKFLOWS`.
        generation: t >= 1.
        num_real: n_r, real samples per generation (size of real block 0 and of each fresh block).
        num_synthetic: n_s, synthetic samples made per generation.
        seed: seed of the subset draw of ``accumulate-subsample`` (required there, for t >= 2);
            the loop driver derives it from (run seed, workflow, generation) so that the subset
            is reproducible and differs across generations.
        subsample_size: m, the fixed subset size of ``accumulate-subsample`` (default n_r, so
            every generation trains on as many samples as generation 1).
    Returns:
        A :class:`TrainingSet`.
    Raises:
        WorkflowError: unknown workflow, non-positive sizes or generation, missing seed, or a
            subset size larger than the pool.
    Sources: Gerstgrasser et al. 2024 (replace/accumulate); Kazdan, Schaeffer et al. 2025
    (accumulate-subsample); Alemohammad et al., ICLR 2024 (fresh, augment).
    """
    check_workflow(workflow)
    _check_positive(generation=generation, num_real=num_real, num_synthetic=num_synthetic)
    t = int(generation)
    real_block0 = np.arange(num_real, dtype=np.int64)
    empty_syn = np.empty((0, 2), dtype=np.int64)
    if t == 1:
        return TrainingSet(workflow, t, real_block0, empty_syn)
    previous = _synthetic_block(t - 1, num_synthetic)
    if workflow == "replace":
        return TrainingSet(workflow, t, np.empty(0, dtype=np.int64), previous)
    if workflow == "augment":
        return TrainingSet(workflow, t, real_block0, previous)
    if workflow == "fresh":
        real = np.arange((t - 1) * num_real, t * num_real, dtype=np.int64)
        return TrainingSet(workflow, t, real, previous)
    if workflow == "accumulate":
        history = np.concatenate([_synthetic_block(s, num_synthetic) for s in range(1, t)])
        return TrainingSet(workflow, t, real_block0, history)
    # accumulate-subsample: positions in the accumulate pool [real block 0, syn 1, ..., syn t-1]
    m = num_real if subsample_size is None else int(subsample_size)
    _check_positive(subsample_size=m)
    pool = num_real + (t - 1) * num_synthetic
    if m > pool:
        raise WorkflowError(
            f"accumulate-subsample: subset size {m} exceeds the pool of generation {t} ({pool} samples)"
        )
    if seed is None:
        raise WorkflowError("accumulate-subsample needs a seed for the subset draw")
    chosen = np.sort(np.random.default_rng(seed).choice(pool, size=m, replace=False)).astype(np.int64)
    real = chosen[chosen < num_real]
    offset = chosen[chosen >= num_real] - num_real
    syn = np.stack([1 + offset // num_synthetic, offset % num_synthetic], axis=1)
    return TrainingSet(workflow, t, real, syn)


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
