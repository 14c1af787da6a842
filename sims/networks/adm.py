"""ADM backbone F(x_in, c_noise, class_labels, augment_labels): EDM's DhariwalUNet (the ImageNet-64 network).

Architecture: Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis" (NeurIPS),
as re-implemented in Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models" (NeurIPS), Table 7 / appendix F.2 (``--arch=adm``, released as
``edm-imagenet-64x64-cond-adm.pkl``). Names, shapes, numerics and initialisation follow
``EDM_FORMAT.md`` §2.5 and §3, so the released network loads by name after dropping the ``model.``
prefix and the ``resample_filter`` buffers.

Written from those descriptions; no code is taken from NVlabs/edm (CC BY-NC-SA 4.0).

EDM's ImageNet-64 configuration (the defaults here with ``label_dim=1000``): 192 base channels,
channel_mult 1-2-3-4, channel_mult_emb 4, 3 blocks per resolution, attention at 32/16/8,
64 channels per head, dropout 0.10: 295,899,267 parameters (EDM_FORMAT §2.5).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from sims.networks.layers import Conv2d, Init, PositionalEmbedding, group_norm, linear
from sims.networks.unet import EDMUNetBase, build_decoder, build_encoder


class ADM(EDMUNetBase):
    """EDM's DhariwalUNet (EDM_FORMAT §2.5, §3).

    Embedding (float32, autocast disabled, as EDM's embedding path):
        emb = PE(c_noise) [N, model_channels]   (endpoint=False, output [cos, sin] — no swap)
              + map_augment(augment_labels)      (augment_dim > 0 and labels given; no bias)
        emb = map_layer1(SiLU(map_layer0(emb)))
              + map_label(one_hot)               (conditional; no bias, no √label_dim scaling)
        emb = SiLU(emb)                          [N, E], E = model_channels·channel_mult_emb
    Encoder ``enc`` (ModuleDict): ``{R}x{R}_conv`` (3×3, in_channels → model_channels·channel_mult[0])
        at level 0, ``{R}x{R}_down`` (same width, down; parameter-free skip) at later levels, then
        ``{R}x{R}_block{i}`` (i < num_blocks; attention iff R ∈ attn_resolutions). Every encoder
        output is pushed as a skip.
    Decoder ``dec``: at the lowest level ``{R}x{R}_in0`` (attention) and ``{R}x{R}_in1`` (none), else
        ``{R}x{R}_up``; then ``{R}x{R}_block{i}`` (i ≤ num_blocks; input = concat(x, skips.pop())
        whenever x's width differs from the block's in_channels; **every** block at an attention
        resolution has attention). Head: out = out_conv(SiLU(out_norm(x))) (GroupNorm eps 1e-5).
    Blocks: :class:`sims.networks.layers.UNetBlock` with heads = C_out // channels_per_head,
        skip_scale 1, eps 1e-5, resample_proj False, adaptive_scale True (FiLM, scale first).
    Init (EDM's): kaiming_uniform × √(1/3) for weights and biases (PyTorch's default layer init);
        exact zero for conv1, proj, out_conv and map_augment; map_label kaiming_normal × √label_dim
        (i.e. N(0, 1)); GroupNorm weight 1, bias 0.

    Args:
        img_resolution, in_channels, out_channels (default in_channels), label_dim, augment_dim,
        model_channels, channel_mult, channel_mult_emb, num_blocks, attn_resolutions, dropout,
        label_dropout: EDM's DhariwalUNet arguments (ImageNet-64: 192, [1,2,3,4], 4, 3, [32,16,8],
        0.10, label_dim 1000, augment_dim 0).
        channels_per_head: attention heads = C_out // channels_per_head (EDM: 64; a block whose
            width is below it gets no attention layer, as in EDM).

    forward(x, noise_labels, class_labels=None, augment_labels=None): as
        :class:`sims.networks.ddpmpp.DDPMpp` — x [N, in_channels, H, W], c_noise [N], class_labels
        float [N, label_dim] / integer [N] / None (= all-zero label for a conditional net),
        augment_labels [N, augment_dim] or None; returns [N, out_channels, H, W].

    Raises:
        ValueError: bad geometry or GroupNorm width at construction; wrong inputs in forward
            (see DDPMpp).
    """

    def __init__(self, img_resolution: int, in_channels: int, out_channels: Optional[int] = None,
                 label_dim: int = 0, augment_dim: int = 0, model_channels: int = 192,
                 channel_mult: Sequence[int] = (1, 2, 3, 4), channel_mult_emb: int = 4, num_blocks: int = 3,
                 attn_resolutions: Sequence[int] = (32, 16, 8), dropout: float = 0.10,
                 label_dropout: float = 0.0, channels_per_head: int = 64):
        super().__init__()
        channel_mult, attn_resolutions, level_res = self._setup(
            "ADM", img_resolution, in_channels, out_channels, label_dim, augment_dim, label_dropout,
            channel_mult, num_blocks, attn_resolutions)
        emb_channels = model_channels * channel_mult_emb
        init = Init("kaiming_uniform", weight=math.sqrt(1 / 3), bias=math.sqrt(1 / 3))
        init_zero = Init("kaiming_uniform", weight=0.0, bias=0.0)
        kw = dict(emb_channels=emb_channels, channels_per_head=channels_per_head, dropout=dropout, skip_scale=1.0,
                  eps=1e-5, resample_proj=False, adaptive_scale=True, init=init, init_zero=init_zero)

        # Mapping (EDM's registration order: map_noise, map_augment, map_layer0, map_layer1, map_label).
        self.map_noise = PositionalEmbedding(model_channels, endpoint=False, flip=False)
        self.map_augment = linear(augment_dim, model_channels, init_zero, bias=False) if augment_dim else None
        self.map_layer0 = linear(model_channels, emb_channels, init)
        self.map_layer1 = linear(emb_channels, emb_channels, init)
        self.map_label = (linear(label_dim, emb_channels, Init("kaiming_normal", weight=math.sqrt(label_dim)),
                                 bias=False) if label_dim else None)

        # Encoder and decoder (every decoder block at an attention resolution attends).
        self.enc, cout, skips = build_encoder(self.in_channels, model_channels, channel_mult, level_res, num_blocks,
                                              attn_resolutions, model_channels * channel_mult[0], init, kw)
        self.dec, cout = build_decoder(cout, skips, model_channels, channel_mult, level_res, num_blocks,
                                       lambda idx, res: res in attn_resolutions, kw)
        self.out_norm = group_norm(cout, eps=1e-5)
        self.out_conv = Conv2d(cout, self.out_channels, 3, init_zero)

    def embed(self, noise_labels: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
              augment_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Embedding [N, E] from c_noise [N] and the labels (class docstring); float32, autocast off."""
        device, dtype, onehot, augment = self._embedding_inputs(noise_labels, class_labels, augment_labels)
        with torch.autocast(device_type=device.type, enabled=False):
            emb = self.map_noise(noise_labels).to(dtype)
            if self.map_augment is not None and augment is not None:
                emb = emb + self.map_augment(augment)
            emb = self.map_layer1(F.silu(self.map_layer0(emb)))
            if self.map_label is not None:
                emb = emb + self.map_label(self._drop_labels(onehot))
            return F.silu(emb)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor,
                class_labels: Optional[torch.Tensor] = None,
                augment_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        x, emb, skips = self._encode(x, noise_labels, class_labels, augment_labels)
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


__all__ = ["ADM"]
