"""SIMS Algorithm 1 step 2: the synthetic set, n_s samples of the base model in a resumable store."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from sims.data.datasets import ArrayDataset
from sims.data.store import SyntheticStore
from sims.dist import DistContext
from sims.generation import generate
from sims.utils import fault_point


def make_synthetic(ctx: DistContext, denoiser, store_dir: Path, seeds: Sequence[int], *, data_shape: Sequence[int],
                   label_dim: int, sampler: Dict[str, Any], batch_size: int, class_label: Optional[int] = None,
                   info: Optional[Dict[str, Any]] = None) -> ArrayDataset:
    """Fill ``store_dir`` with one sample per seed (collective: each rank makes its share of the seed
    batches, rank 0 checks and writes the manifest), then load it.

    Resumable: seeds already stored are never made again, whatever the batch size or number of
    processes of the earlier attempt, so no sample is duplicated or lost; asked for more seeds than
    a complete store holds, it adds the missing ones (and a prefix of a grown store loads as is).

    Args:
        denoiser: the base model D(x, sigma, class_labels).
        store_dir: the store's folder (:class:`sims.data.store.SyntheticStore`).
        seeds: one seed per synthetic sample (SIMS: ``sims.synthetic_seed_offset + i``).
        data_shape, label_dim, sampler, batch_size, class_label: as :func:`sims.generation.generate`;
            class-conditional models store each sample's label.
        info: extra manifest fields (e.g. the base weights' path).
    Returns:
        The stored samples as an :class:`ArrayDataset` (images in [-1, 1], labels when conditional).
    Raises:
        DatasetError: the store is inconsistent after generation (a seed missing or duplicated).
    """
    store = SyntheticStore(store_dir)
    seeds = [int(s) for s in seeds]
    have = store.manifest() if store.complete else None
    if have is not None and have["first_seed"] == min(seeds) and have["count"] > len(seeds) \
            and seeds == list(range(min(seeds), min(seeds) + len(seeds))):
        return store.load(label_dim).subset(slice(0, len(seeds)))  # a grown store holds these as its prefix
    if have is None or have["count"] != len(seeds) or have["first_seed"] != min(seeds):
        # new, interrupted, or to be grown (distribution control draws more samples into the same store)
        store.root.mkdir(parents=True, exist_ok=True)
        stored = set(store.stored_seeds())

        def missing(batch: List[int]) -> List[int]:
            return [s for s in batch if s not in stored]

        for batch, x, labels in generate(ctx, denoiser, seeds, data_shape, label_dim=label_dim, sampler=sampler,
                                         batch_size=batch_size, class_label=class_label, skip=missing):
            store.write_shard(batch, x, labels, writer_rank=ctx.rank)
            fault_point("synthetic_shard")
        ctx.barrier()
        if ctx.is_main:
            store.finalize(seeds, data_shape, **(info or {}))
        ctx.barrier()
    return store.load(label_dim)
