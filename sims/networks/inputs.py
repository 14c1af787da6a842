"""Input checks and label normalisation shared by the backbones (DDPM++, ADM, the diffusers U-Net, the MLP).

Each function raises ``ValueError`` with a one-line message naming the backbone and the expected shape,
before any computation: class labels (integer [N] or float [N, label_dim]), c_noise [N], EDM's
augmentation labels [N, augment_dim], the U-Net geometry and image size.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def labels_to_onehot(class_labels: Optional[torch.Tensor], label_dim: int, batch: int,
                     device, dtype) -> Optional[torch.Tensor]:
    """Normalise class labels to float [N, label_dim] (one-hot or soft); None stays None.

    Accepts integer labels [N] (converted to one-hot) or float [N, label_dim] (used as given; an
    all-zero row is the 'unconditional' label used for label dropout / guidance).
    Raises:
        ValueError: labels given to an unconditional network, wrong shape, or out-of-range index.
    """
    if class_labels is None:
        return None
    if label_dim == 0:
        raise ValueError("class_labels were given to an unconditional backbone (label_dim=0)")
    if class_labels.ndim == 1 and not class_labels.is_floating_point():
        if class_labels.shape[0] != batch:
            raise ValueError(f"integer class_labels must have shape [N]={batch}, got {tuple(class_labels.shape)}")
        if class_labels.numel() and (class_labels.min() < 0 or class_labels.max() >= label_dim):
            raise ValueError(f"integer class_labels must lie in [0, {label_dim}), got "
                             f"[{int(class_labels.min())}, {int(class_labels.max())}]")
        return F.one_hot(class_labels.long(), label_dim).to(device=device, dtype=dtype)
    if class_labels.shape != (batch, label_dim):
        raise ValueError(f"class_labels must be integer [N] or float [N, label_dim]=[{batch}, {label_dim}], "
                         f"got {tuple(class_labels.shape)} ({class_labels.dtype})")
    return class_labels.to(device=device, dtype=dtype)


def conditional_onehot(class_labels: Optional[torch.Tensor], label_dim: int, batch: int,
                       device) -> Optional[torch.Tensor]:
    """Float32 [N, label_dim] labels for a network with ``label_dim`` classes (None for label_dim 0).

    For a conditional network ``None`` means the all-zero label (EDM's preconditioner passes zeros,
    so ``map_label``'s bias, if any, is still added). Raises ValueError as :func:`labels_to_onehot`
    (labels given to an unconditional network, bad shapes or indices).
    """
    onehot = labels_to_onehot(class_labels, label_dim, batch, device, torch.float32)
    if onehot is None and label_dim:
        onehot = torch.zeros(batch, label_dim, device=device, dtype=torch.float32)
    return onehot


def check_noise_labels(noise_labels, batch: int, device) -> torch.Tensor:
    """c_noise as a [N] tensor on ``device`` (a scalar is broadcast); ValueError for another shape."""
    noise_labels = torch.as_tensor(noise_labels, device=device)
    if noise_labels.ndim == 0:
        noise_labels = noise_labels.expand(batch)
    if noise_labels.shape != (batch,):
        raise ValueError(f"noise_labels must have shape [N]={batch}, got {tuple(noise_labels.shape)}")
    return noise_labels


def check_augment_labels(augment_labels: Optional[torch.Tensor], augment_dim: int, batch: int,
                         device) -> Optional[torch.Tensor]:
    """Float32 [N, augment_dim] augmentation labels, or None.

    Raises:
        ValueError: labels given to a network built with ``augment_dim=0``, or a shape other than
            [N, augment_dim].
    """
    if augment_labels is None:
        return None
    if augment_dim == 0:
        raise ValueError("augment_labels were given to a backbone without augmentation conditioning "
                         "(augment_dim=0); build it with network.augment_dim=9 for EDM's augment pipe")
    if augment_labels.shape != (batch, augment_dim):
        raise ValueError(f"augment_labels must have shape [N, augment_dim]=[{batch}, {augment_dim}], "
                         f"got {tuple(augment_labels.shape)}")
    return augment_labels.to(device=device, dtype=torch.float32)


def check_unet_geometry(name: str, img_resolution: int, channel_mult: Sequence[int], num_blocks: int,
                        attn_resolutions: Sequence[int]) -> list:
    """Validate a U-Net geometry; returns the per-level resolutions ``img_resolution >> level``.

    Raises:
        ValueError: empty channel_mult, num_blocks < 1, img_resolution not divisible by
            2**(levels-1), or an attention resolution that no level has.
    """
    if not channel_mult:
        raise ValueError(f"{name}: channel_mult must list at least one level")
    if num_blocks < 1:
        raise ValueError(f"{name}: num_blocks must be >= 1, got {num_blocks}")
    factor = 2 ** (len(channel_mult) - 1)
    if img_resolution % factor != 0:
        raise ValueError(f"{name}: img_resolution {img_resolution} is not divisible by 2**(len(channel_mult)-1)"
                         f" = {factor} (channel_mult={list(channel_mult)}); use fewer levels or another size")
    level_res = [img_resolution >> level for level in range(len(channel_mult))]
    missing = sorted(set(attn_resolutions) - set(level_res))
    if missing:
        raise ValueError(f"{name}: attn_resolutions {missing} are not among the U-Net's resolutions {level_res} "
                         f"(img_resolution={img_resolution}, channel_mult={list(channel_mult)})")
    return level_res


def check_image_input(name: str, x: torch.Tensor, in_channels: int, factor: int) -> None:
    """Validate backbone input x [N, C, H, W]: C == in_channels, H and W divisible by ``factor``. Raises ValueError."""
    if x.ndim != 4 or x.shape[1] != in_channels:
        raise ValueError(f"{name} expects x of shape [N, {in_channels}, H, W], got {tuple(x.shape)}")
    if x.shape[-1] % factor or x.shape[-2] % factor:
        raise ValueError(f"{name}: image size {tuple(x.shape[-2:])} is not divisible by {factor} "
                         f"(2**(levels-1)); pad or resize the images")
