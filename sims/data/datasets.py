"""The in-memory data set every real (and synthetic) training set is turned into.

:class:`ArrayDataset` holds the whole data set as one float32 tensor: images ``[N, C, H, W]`` in
[-1, 1] (EDM's convention, SPEC section 2) or low-dimensional points ``[N, d]``. The data sets this
project trains on are small enough (CIFAR-10 train: 50,000 x 3 x 32 x 32 float32 = 614 MB) that a
tensor beats per-item file I/O on a 2-core machine and keeps item ``i`` a pure function of ``i``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from sims.errors import DatasetError  # noqa: F401  (re-exported: sims.data.datasets.DatasetError)

ArrayLike = Union[torch.Tensor, np.ndarray]


class StoredItems:
    """The Dataset protocol and shape information shared by the data sets (in memory, zip).

    A subclass stores N items and provides ``num_items`` (N), ``item_shape`` (``(C, H, W)`` or
    ``(d,)``), ``_stored_item(i)`` (float32 item i < N), ``labels`` (integer [N] or None),
    ``label_dim`` and ``xflip``. With ``xflip``, item ``i + N`` is item ``i`` mirrored left-right
    (EDM's dataset doubling: Karras et al. 2022, appendix F.2).
    ``self[i]`` returns ``(x, label)``: x float32 ``item_shape``, label float32 one-hot
    ``[label_dim]`` (or ``[0]``). Raises IndexError outside ``[-len, len)``.
    """

    num_items: int
    item_shape: tuple
    labels: Optional[torch.Tensor]
    label_dim: int
    xflip: bool

    def _stored_item(self, i: int) -> torch.Tensor:
        raise NotImplementedError

    def __len__(self) -> int:
        n = self.num_items
        return 2 * n if self.xflip else n

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        n = self.num_items
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        flip = index >= n
        i = index - n if flip else index
        x = self._stored_item(i)
        if flip:
            x = x.flip(-1)
        if self.label_dim > 0:
            label = torch.zeros(self.label_dim, dtype=torch.float32)
            label[int(self.labels[i])] = 1.0  # type: ignore[index]
        else:
            label = torch.zeros(0, dtype=torch.float32)
        return x, label

    @property
    def is_image(self) -> bool:
        """True for ``[C, H, W]`` image items, False for ``[d]`` points."""
        return len(self.item_shape) == 3

    @property
    def resolution(self) -> Optional[int]:
        """Image side H (= W for square images) in pixels; None for low-dimensional data."""
        return int(self.item_shape[-1]) if self.is_image else None

    @property
    def channels(self) -> Optional[int]:
        """Image channels C (1 grayscale, 3 RGB); None for low-dimensional data."""
        return int(self.item_shape[0]) if self.is_image else None

    @property
    def dim(self) -> int:
        """Number of values per item: C*H*W for images, d for points."""
        return int(np.prod(self.item_shape))

    @property
    def num_classes(self) -> int:
        """Number of classes the stored labels span (``labels.max() + 1``); 0 without labels."""
        if self.labels is None or not self.labels.numel():
            return max(self.label_dim, 0)
        return max(self.label_dim, int(self.labels.max()) + 1)


class ArrayDataset(StoredItems, Dataset):
    """A data set held in memory as one tensor, with optional integer class labels.

    Args:
        data: float tensor/array, images ``[N, C, H, W]`` in [-1, 1] or points ``[N, d]``
            (converted to float32, not copied when already a contiguous float32 tensor).
        labels: int class indices ``[N]`` (int64 after conversion), or None. They are stored even
            when not returned (``label_dim == 0``) so evaluation can use them (class shares).
        label_dim: length of the one-hot label vector that ``__getitem__`` returns; 0 means
            "unconditional": ``__getitem__`` returns an empty ``zeros(0)`` label. None infers
            ``labels.max() + 1`` when labels are given, else 0.
        xflip: images only. Doubles the data set EDM-style: item ``i + N`` is item ``i`` mirrored
            left-right (deterministic, so every item stays a pure function of its index).
        name: a short description used in ``repr`` and messages.

    ``__getitem__(i)`` returns ``(x, label)``: ``x`` float32 ``[C, H, W]`` or ``[d]``, ``label``
    float32 one-hot ``[label_dim]`` (or ``[0]``), so the default DataLoader collate gives
    ``([B, ...], [B, label_dim])``.

    Raises:
        ValueError: data not 2-D or 4-D, labels of the wrong shape/length, negative labels or
            labels >= label_dim, label_dim > 0 without labels, xflip on non-image data.
    """

    def __init__(
        self,
        data: ArrayLike,
        labels: Optional[ArrayLike] = None,
        label_dim: Optional[int] = None,
        xflip: bool = False,
        name: str = "array",
    ) -> None:
        data = torch.as_tensor(data)
        if data.dtype != torch.float32:
            data = data.float()
        if data.ndim not in (2, 4):
            raise ValueError(f"data must be [N, C, H, W] images or [N, d] points, got shape {tuple(data.shape)}")
        if labels is not None:
            labels = torch.as_tensor(labels)
            if labels.dtype.is_floating_point or labels.dtype == torch.bool:
                raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
            labels = labels.long()
            if labels.shape != (data.shape[0],):
                raise ValueError(f"labels must have shape [{data.shape[0]}], got {tuple(labels.shape)}")
            if labels.numel() and int(labels.min()) < 0:
                raise ValueError("labels must be >= 0")
        if label_dim is None:
            label_dim = int(labels.max()) + 1 if labels is not None and labels.numel() else 0
        label_dim = int(label_dim)
        if label_dim < 0:
            raise ValueError(f"label_dim must be >= 0, got {label_dim}")
        if label_dim > 0:
            if labels is None:
                raise ValueError(f"label_dim={label_dim} but the data set has no labels")
            if labels.numel() and int(labels.max()) >= label_dim:
                raise ValueError(f"label {int(labels.max())} does not fit label_dim={label_dim}")
        if xflip and data.ndim != 4:
            raise ValueError("xflip applies to images [N, C, H, W] only")
        self.data: torch.Tensor = data
        self.labels: Optional[torch.Tensor] = labels
        self.label_dim: int = label_dim
        self.xflip: bool = bool(xflip)
        self.name: str = name

    # ------------------------------------------------------------------ Dataset protocol
    @property
    def num_items(self) -> int:
        """Stored items N (``len(self)`` is 2N with ``xflip``)."""
        return int(self.data.shape[0])

    def _stored_item(self, i: int) -> torch.Tensor:
        return self.data[i]

    def get_batch(self, indices) -> tuple:
        """Items at ``indices`` at once: (x [B, ...] float32, labels [B, label_dim] one-hot or [B, 0]);
        equal to stacking ``self[i]`` (x-flipped copies included)."""
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        n = int(self.data.shape[0])
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise IndexError(f"indices out of range for {len(self)} items")
        flip = idx >= n
        base = idx - n * flip.long()
        x = self.data[base]
        if bool(flip.any()):
            x[flip] = x[flip].flip(-1)
        if self.label_dim > 0:
            labels = torch.nn.functional.one_hot(self.labels[base], self.label_dim).to(torch.float32)
        else:
            labels = torch.zeros(len(idx), 0, dtype=torch.float32)
        return x, labels

    # ------------------------------------------------------------------ shape information
    @property
    def item_shape(self) -> tuple:
        """Shape of one item: ``(C, H, W)`` or ``(d,)``."""
        return tuple(self.data.shape[1:])

    # ------------------------------------------------------------------ derived data sets
    def subset(self, indices: Union[Sequence[int], torch.Tensor, np.ndarray, slice]) -> "ArrayDataset":
        """A new ArrayDataset of the items at ``indices`` of the stored data (not the x-flipped copies).

        ``label_dim``, ``xflip`` and ``name`` carry over, so a subset of a conditional data set stays
        conditional with the same one-hot width even if some classes are absent.
        """
        if isinstance(indices, slice):
            data = self.data[indices]
            labels = self.labels[indices] if self.labels is not None else None
        else:
            idx = torch.as_tensor(np.asarray(indices), dtype=torch.long).reshape(-1)
            data = self.data[idx]
            labels = self.labels[idx] if self.labels is not None else None
        return ArrayDataset(data, labels, label_dim=self.label_dim, xflip=self.xflip, name=self.name)

    def __repr__(self) -> str:
        return (
            f"ArrayDataset(name={self.name!r}, items={int(self.data.shape[0])}, shape={self.item_shape}, "
            f"label_dim={self.label_dim}, xflip={self.xflip})"
        )
