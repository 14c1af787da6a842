"""The synthetic store: samples of a model as npz shards plus a manifest (SIMS Algorithm 1 step 2).

Layout::

    STORE/shard_{first_seed:09d}.npz   seeds [B] int64, x [B, H, W, C] uint8 (images) or [B, d] float32,
                                       labels [B] int64 (-1 when unconditional), writer_rank (int)
    STORE/manifest.json                written last: seeds, count, data_shape, shards, complete

Images are stored quantised to uint8 exactly as they would be written as PNGs
(clip(round(127.5·x + 127.5))), so training on the store equals training on the PNG folder.
Every shard is written atomically and named by its first seed; a re-run regenerates only the
missing seeds (:func:`sims.stages.synthetic.make_synthetic`), so no sample is ever duplicated or lost.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch

from sims.data.datasets import ArrayDataset
from sims.data.images import from_hwc_uint8, to_hwc_uint8
from sims.errors import DatasetError
from sims.utils import atomic_write, atomic_write_json


class SyntheticStore:
    """A folder of synthetic samples.

    Args:
        root: the store's folder (created on first write).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    # -- writing -------------------------------------------------------------------------------------
    def shard_path(self, first_seed: int) -> Path:
        """``shard_{first_seed:09d}.npz`` in the store."""
        return self.root / f"shard_{int(first_seed):09d}.npz"

    def write_shard(self, seeds: Sequence[int], x: torch.Tensor, labels: Optional[torch.Tensor] = None,
                    writer_rank: int = 0) -> Path:
        """Store one batch: x [B, C, H, W] in [-1, 1] (quantised to uint8) or [B, d]; labels one-hot or
        None; ``writer_rank`` (the rank that made it) is kept in the shard for provenance."""
        seeds_arr = np.asarray(list(seeds), dtype=np.int64)
        data = to_hwc_uint8(x) if x.ndim == 4 else x.detach().cpu().numpy().astype(np.float32)
        lab = (labels.argmax(1).cpu().numpy().astype(np.int64) if labels is not None
               else np.full(len(seeds_arr), -1, dtype=np.int64))
        path = self.shard_path(seeds_arr[0])
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.savez(fh, seeds=seeds_arr, x=data, labels=lab, writer_rank=np.asarray(int(writer_rank)))

        atomic_write(path, write)
        return path

    def finalize(self, seeds: Sequence[int], data_shape: Sequence[int], **info) -> dict:
        """Check every seed is stored exactly once and write the manifest (the store is then complete).

        Raises:
            DatasetError: seeds missing or duplicated.
        """
        stored = self.stored_seeds()
        expected = sorted(int(s) for s in seeds)
        if sorted(stored) != expected:
            missing = sorted(set(expected) - set(stored))
            dup = len(stored) - len(set(stored))
            raise DatasetError(f"synthetic store {self.root} is inconsistent: {len(missing)} seeds missing, "
                               f"{dup} duplicated; re-run the same command to regenerate missing shards")
        manifest = {"count": len(expected), "first_seed": expected[0], "last_seed": expected[-1],
                    "data_shape": list(data_shape), "shards": sorted(p.name for p in self.root.glob("shard_*.npz")),
                    "complete": True, **info}
        atomic_write_json(self.root / "manifest.json", manifest)
        return manifest

    # -- reading -------------------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        m = self.root / "manifest.json"
        return m.exists() and json.loads(m.read_text()).get("complete", False)

    def manifest(self) -> dict:
        m = self.root / "manifest.json"
        if not m.exists():
            raise DatasetError(f"synthetic store {self.root} has no manifest.json: it is incomplete; "
                               "re-run the command that makes it")
        return json.loads(m.read_text())

    def _shards(self) -> List[Path]:
        return sorted(self.root.glob("shard_*.npz"))

    def stored_seeds(self) -> List[int]:
        """Seeds of every stored sample (shard order; duplicates would show up twice)."""
        out: List[int] = []
        for p in self._shards():
            with np.load(p) as f:
                out.extend(int(s) for s in f["seeds"])
        return out

    def load(self, label_dim: int = 0) -> ArrayDataset:
        """All stored samples, sorted by seed, as an :class:`ArrayDataset` ([-1, 1] floats for images).

        Raises:
            DatasetError: the store is incomplete (no manifest) or its shards disagree with the manifest.
        """
        manifest = self.manifest()
        seeds, xs, labels = [], [], []
        for p in self._shards():
            with np.load(p) as f:
                seeds.append(f["seeds"])
                xs.append(f["x"])
                labels.append(f["labels"])
        seeds_a = np.concatenate(seeds)
        if len(seeds_a) != manifest["count"] or len(np.unique(seeds_a)) != len(seeds_a):
            raise DatasetError(f"synthetic store {self.root}: {len(seeds_a)} samples on disk, manifest says "
                               f"{manifest['count']}")
        order = np.argsort(seeds_a)
        x = np.concatenate(xs)[order]
        if x.dtype == np.uint8:
            data = from_hwc_uint8(x)
        else:
            data = torch.from_numpy(x).float()
        lab = np.concatenate(labels)[order]
        use = label_dim > 0 and (lab >= 0).all()
        return ArrayDataset(data, torch.from_numpy(lab) if use else None, label_dim=label_dim if use else 0,
                            name=f"synthetic:{self.root.name}")
