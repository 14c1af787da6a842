"""The training data order: an infinite, rank-sharded, resumable sampler and the stream that reads it.

Addressing (the idea of EDM's infinite sampler, written for exact resume): the training data is an
endless sequence of epochs, epoch ``e`` a permutation of the N items drawn from
``derive_seed(seed, "epoch", e)``. Optimizer step ``s`` consumes the global positions
``[s·B, (s+1)·B)`` of that sequence (B = ``train.batch_size``). The global batch is cut into
``B / b`` *slices* of ``b = batch_gpu`` items; slice ``k`` is processed by rank ``k // A`` as its
micro-batch ``k % A`` (A = ``B / (world·b)`` accumulation steps). So a step's data depends only on
(seed, step, b), never on the world size, and a resumed run starts at step ``s`` by arithmetic —
no stored RNG state and no list of the run's indices: memory is one permutation of N (one more
while a batch straddles two epochs), whatever the run length.

The loss noise of slice ``k`` at step ``s`` is drawn from ``derive_seed(seed, "loss", k, s)``
(:class:`sims.training.module.EDMModule`), so the same slice decomposition gives the same training
on 1 or 8 processes.
"""
from __future__ import annotations

from typing import Dict, Iterator, Tuple

import torch
from torch.utils.data import IterableDataset, get_worker_info

from sims.errors import ConfigError
from sims.utils import derive_seed


def accumulation_steps(global_batch: int, batch_gpu: int, world_size: int) -> int:
    """A = B / (world · b), the micro-batches one rank accumulates per optimizer step.

    Raises:
        ConfigError: B is not a multiple of world · b.
    """
    if global_batch < 1 or batch_gpu < 1:
        raise ConfigError(f"train.batch_size and train.batch_gpu must be >= 1, got {global_batch}, {batch_gpu}")
    if global_batch % (batch_gpu * world_size):
        raise ConfigError(f"train.batch_size={global_batch} is not a multiple of train.batch_gpu={batch_gpu} x "
                          f"{world_size} process(es); choose batch_gpu dividing {global_batch // world_size}")
    return global_batch // (batch_gpu * world_size)


class TrainingSampler:
    """Indices of every micro-batch of a run (see the module docstring).

    Args:
        num_items: N, the data set's length (x-flipped copies included).
        global_batch: B.
        batch_gpu: b, items per micro-batch.
        rank, world_size: this rank and the number of ranks.
        seed: the run's training seed.
    Raises:
        ConfigError: B not a multiple of world · b; N < 1.
    """

    def __init__(self, num_items: int, *, global_batch: int, batch_gpu: int, rank: int, world_size: int, seed: int):
        if num_items < 1:
            raise ConfigError("the training set is empty")
        self.num_items, self.global_batch, self.batch_gpu = int(num_items), int(global_batch), int(batch_gpu)
        self.rank, self.world_size, self.seed = int(rank), int(world_size), int(seed)
        self.accum = accumulation_steps(self.global_batch, self.batch_gpu, self.world_size)
        self._perms: Dict[int, torch.Tensor] = {}

    def slice_index(self, micro: int) -> int:
        """k, the slice of the global batch that this rank's micro-batch ``micro`` is."""
        return self.rank * self.accum + int(micro)

    def _perm(self, epoch: int) -> torch.Tensor:
        perm = self._perms.get(epoch)
        if perm is None:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
            perm = torch.randperm(self.num_items, generator=gen)
            self._perms = {e: p for e, p in self._perms.items() if e == epoch - 1}  # at most two epochs
            self._perms[epoch] = perm
        return perm

    def indices(self, step: int, micro: int) -> torch.Tensor:
        """Item indices (int64 [b]) of micro-batch ``micro`` of optimizer step ``step`` on this rank."""
        start = int(step) * self.global_batch + self.slice_index(micro) * self.batch_gpu
        pos = torch.arange(start, start + self.batch_gpu, dtype=torch.int64)
        epochs, offsets = pos // self.num_items, pos % self.num_items
        out = torch.empty_like(pos)
        for e in torch.unique(epochs).tolist():
            sel = epochs == e
            out[sel] = self._perm(int(e))[offsets[sel]]
        return out

    def micro_batches(self, start_step: int, worker: int = 0, num_workers: int = 1
                      ) -> Iterator[Tuple[int, int, torch.Tensor]]:
        """(step, slice k, indices) of this rank's micro-batches from ``start_step`` on, forever;
        with ``num_workers`` > 1 only every ``num_workers``-th one, starting at ``worker`` (a
        DataLoader interleaves its workers' outputs round-robin, restoring the order)."""
        position = 0
        step = int(start_step)
        while True:
            for micro in range(self.accum):
                if position % num_workers == worker:
                    yield step, self.slice_index(micro), self.indices(step, micro)
                position += 1
            step += 1


def fetch_batch(dataset, indices: torch.Tensor):
    """(x [b, ...], labels [b, L]) of ``dataset`` at ``indices``: ``dataset.get_batch`` when it has
    one (in-memory and zip data sets), else item by item."""
    if hasattr(dataset, "get_batch"):
        return dataset.get_batch(indices)
    items = [dataset[int(i)] for i in indices]
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


class TrainingStream(IterableDataset):
    """Micro-batches ``(x [b, ...], labels [b, L], tag int64 [2] = (step, slice k))`` for a DataLoader
    with ``batch_size=None``; workers split the micro-batches round-robin and each reads its own items.

    Args:
        dataset: map-style data set (``__getitem__`` → (x, one-hot label), optional ``get_batch``).
        sampler: :class:`TrainingSampler`.
        start_step: the first optimizer step to serve (the resumed global step).
    """

    def __init__(self, dataset, sampler: TrainingSampler, start_step: int = 0):
        super().__init__()
        self.dataset, self.sampler, self.start_step = dataset, sampler, int(start_step)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for step, k, idx in self.sampler.micro_batches(self.start_step, worker, workers):
            x, labels = fetch_batch(self.dataset, idx)
            yield x, labels, torch.tensor([step, k], dtype=torch.int64)
