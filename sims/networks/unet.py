"""What EDM's two U-Nets share: input attributes, the embedding's inputs, the encoder, the decoder skeleton.

Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models" (NeurIPS),
appendix F.2: SongUNet (DDPM++, :mod:`sims.networks.ddpmpp`) and DhariwalUNet (ADM,
:mod:`sims.networks.adm`) build their encoder the same way and their decoder with the same
skeleton; they differ in widths, in where the decoder attends and in the head. Names follow
``EDM_FORMAT.md`` §2.3–§2.5 (``enc.{R}x{R}_conv|_down|_block{i}``, ``dec.{R}x{R}_in0|_in1|_up|_block{i}``).
Modules are created in EDM's registration order, so a seeded construction draws the same initial
weights as before this code was shared.

Written from those descriptions; no code is taken from NVlabs/edm (CC BY-NC-SA 4.0).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from sims.networks.inputs import (check_augment_labels, check_image_input, check_noise_labels,
                                  check_unet_geometry, conditional_onehot)
from sims.networks.layers import Conv2d, Init, UNetBlock


class EDMUNetBase(nn.Module):
    """Base of :class:`~sims.networks.ddpmpp.DDPMpp` and :class:`~sims.networks.adm.ADM`.

    Subclasses call :meth:`_setup` first in ``__init__`` and use :meth:`_embedding_inputs`,
    :meth:`_drop_labels`, :meth:`_encode` in ``embed``/``forward``.
    """

    def _setup(self, name: str, img_resolution: int, in_channels: int, out_channels: Optional[int],
               label_dim: int, augment_dim: int, label_dropout: float, channel_mult: Sequence[int],
               num_blocks: int, attn_resolutions: Sequence[int]) -> Tuple[List[int], List[int], List[int]]:
        """Store the geometry; returns (channel_mult, attn_resolutions as ints, level → resolution).

        Raises:
            ValueError: geometry that EDM's nets reject (see ``check_unet_geometry``).
        """
        self._arch = name
        channel_mult = [int(m) for m in channel_mult]
        attn_resolutions = [int(r) for r in attn_resolutions]
        level_res = check_unet_geometry(name, int(img_resolution), channel_mult, int(num_blocks), attn_resolutions)
        self.factor = 2 ** (len(channel_mult) - 1)
        self.img_resolution = int(img_resolution)
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels or in_channels)
        self.label_dim = int(label_dim)
        self.augment_dim = int(augment_dim)
        self.label_dropout = float(label_dropout)
        return channel_mult, attn_resolutions, level_res

    def _embedding_inputs(self, noise_labels: torch.Tensor, class_labels: Optional[torch.Tensor],
                          augment_labels: Optional[torch.Tensor]):
        """(device, dtype, one-hot [N, label_dim] or None, augment [N, augment_dim] or None); dtype float32.

        Raises:
            ValueError: labels that do not fit the net (see :mod:`sims.networks.inputs`).
        """
        n, device = noise_labels.shape[0], noise_labels.device
        onehot = conditional_onehot(class_labels, self.label_dim, n, device)
        augment = check_augment_labels(augment_labels, self.augment_dim, n, device)
        dtype = self.map_layer0.weight.dtype  # float32 (autocast is off: EDM's embedding runs in float32)
        onehot = onehot.to(dtype) if onehot is not None else None
        augment = augment.to(dtype) if augment is not None else None
        return device, dtype, onehot, augment

    def _drop_labels(self, onehot: torch.Tensor) -> torch.Tensor:
        """Zero each row of onehot [N, label_dim] with probability label_dropout (training only)."""
        if self.training and self.label_dropout:
            keep = torch.rand(onehot.shape[0], 1, device=onehot.device) >= self.label_dropout
            onehot = onehot * keep.to(onehot.dtype)
        return onehot

    def _encode(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: Optional[torch.Tensor],
                augment_labels: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]:
        """Check inputs, embed, run the encoder: (x [N, C, R_low, R_low], emb [N, E], skips).

        Raises:
            ValueError: wrong input channels or size, bad c_noise or labels.
        """
        check_image_input(self._arch, x, self.in_channels, self.factor)
        noise_labels = check_noise_labels(noise_labels, x.shape[0], x.device)
        emb = self.embed(noise_labels, class_labels, augment_labels)
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        return x, emb, skips


def build_encoder(in_channels: int, model_channels: int, channel_mult: Sequence[int], level_res: Sequence[int],
                  num_blocks: int, attn_resolutions: Sequence[int], first_width: int, init: Init,
                  kw: dict) -> Tuple[nn.ModuleDict, int, List[int]]:
    """EDM's encoder: ``{R}x{R}_conv`` (3×3, in_channels → first_width) at level 0, ``{R}x{R}_down``
    (same width) at later levels, then ``{R}x{R}_block{i}`` (i < num_blocks, width model_channels·mult,
    attention iff R ∈ attn_resolutions). Returns (enc, last width, every output's width as a skip).
    first_width: DDPM++ model_channels, ADM model_channels·channel_mult[0]; kw: UNetBlock arguments.
    """
    enc = nn.ModuleDict()
    cout = in_channels
    for level, mult in enumerate(channel_mult):
        res = level_res[level]
        if level == 0:
            cin, cout = cout, first_width
            enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3, init)
        else:
            enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **kw)
        for idx in range(num_blocks):
            cin, cout = cout, model_channels * mult
            enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **kw)
    return enc, cout, [block.out_channels for block in enc.values()]


def build_decoder(cout: int, skips: List[int], model_channels: int, channel_mult: Sequence[int],
                  level_res: Sequence[int], num_blocks: int, attend: Callable[[int, int], bool],
                  kw: dict) -> Tuple[nn.ModuleDict, int]:
    """EDM's decoder skeleton: at the lowest level ``{R}x{R}_in0`` (attention) and ``_in1``, else
    ``{R}x{R}_up``; then ``{R}x{R}_block{i}`` (i ≤ num_blocks, input width cout + skips.pop(),
    attention iff attend(i, R)). Level 0 comes last, so a head appended to ``dec`` afterwards (DDPM++'s
    ``aux_norm``/``aux_conv``) follows it in EDM's order. Returns (dec, last width); all skips must be used.
    """
    dec = nn.ModuleDict()
    for level in reversed(range(len(channel_mult))):
        res = level_res[level]
        if level == len(channel_mult) - 1:
            dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **kw)
            dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **kw)
        else:
            dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **kw)
        for idx in range(num_blocks + 1):
            cin, cout = cout + skips.pop(), model_channels * channel_mult[level]
            dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attend(idx, res), **kw)
    assert not skips
    return dec, cout


__all__ = ["EDMUNetBase", "build_decoder", "build_encoder"]
