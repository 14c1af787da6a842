"""LightningDataModule around an in-memory :class:`sims.data.ArrayDataset`."""
from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader, Dataset, RandomSampler


class ArrayDataModule(L.LightningDataModule):
    """Serves a training set with a per-device batch of ``global_batch // world_size``.

    Args:
        dataset: map-style dataset returning (x, label) with label one-hot [label_dim] or empty.
        global_batch: images per optimizer step over all ranks (``train.batch_size``).
        num_workers: DataLoader workers.
        total_steps: optimizer steps of the run; the loader then yields successive random
            permutations of the data for all of them as one epoch (progress shows step / total).
    Raises:
        ValueError: the global batch does not divide evenly over the ranks, or the data set is
            smaller than one per-device batch.
    """

    def __init__(self, dataset: Dataset, global_batch: int, num_workers: int = 0, total_steps: int = 0):
        super().__init__()
        self.dataset = dataset
        self.global_batch = int(global_batch)
        self.num_workers = int(num_workers)
        self.total_steps = int(total_steps)

    def per_device_batch(self) -> int:
        world = self.trainer.world_size if self.trainer is not None else 1
        if self.global_batch % world:
            raise ValueError(f"train.batch_size={self.global_batch} is not divisible by the {world} devices")
        return self.global_batch // world

    def train_dataloader(self) -> DataLoader:
        batch = self.per_device_batch()
        if len(self.dataset) < batch:
            raise ValueError(f"the training set has {len(self.dataset)} items, fewer than one batch of {batch}: "
                             "lower train.batch_size")
        sampler = None
        if self.total_steps > 0:
            # Lightning wraps this sampler for DDP so each rank gets its share of every permutation.
            sampler = RandomSampler(self.dataset, replacement=False, num_samples=self.total_steps * self.global_batch)
        return DataLoader(self.dataset, batch_size=batch, shuffle=sampler is None, sampler=sampler, drop_last=True,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)
