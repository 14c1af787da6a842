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

Everything here is *index bookkeeping*: a :class:`~sims.data.training_set.TrainingSet` lists which
real indices (into the real pool of one seed) and which synthetic ``(generation, index)`` pairs a
generation trains on, so composition can be tested without any model.
:class:`~sims.data.sample_pool.SamplePool` turns that bookkeeping into arrays (with a leading seed
axis, so cheap models can be vectorised over seeds).

Real pool: ``real[i]`` for ``i < required_real(...)``. Block ``b`` is ``[b n_r, (b+1) n_r)``;
every workflow except ``fresh`` uses block 0 only.
"""
from __future__ import annotations

from typing import Iterable, Optional, Tuple

import numpy as np

from sims.data.sample_pool import SamplePool, TrainingData
from sims.data.training_set import TrainingSet, _check_positive
from sims.errors import WorkflowError

__all__ = ["WORKFLOWS", "SamplePool", "TrainingData", "TrainingSet", "check_real_available", "check_workflow",
           "compose", "keeps_history", "required_real"]

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
