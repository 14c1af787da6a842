"""DDPM++ backbone F(x_in, c_noise, class_labels, augment_labels): EDM's SongUNet with the DDPM++ settings.

Architecture: Song et al. 2021, "Score-Based Generative Modeling through Stochastic Differential
Equations" (ICLR), appendix H, as re-implemented in Karras et al. 2022, "Elucidating the Design
Space of Diffusion-Based Generative Models" (NeurIPS), Table 7 / appendix F.2 ("config F",
``--arch=ddpmpp``): positional noise embedding, standard encoder and decoder, [1, 1] resampling,
``channel_mult_noise = 1``. Exact names, shapes, numerics and initialisation follow
``EDM_FORMAT.md`` §2.3–§2.4 (names/shapes) and §3 (numerics, init), so that a released EDM network
(``edm-cifar10-32x32-*-vp.pkl``, ``edm-{ffhq,afhqv2}-64x64-uncond-vp.pkl``) loads by name after
dropping the ``model.`` prefix and the ``resample_filter`` buffers.

Written from those descriptions; no code is taken from NVlabs/edm (CC BY-NC-SA 4.0).

EDM's CIFAR-10 configuration (the defaults here, plus ``augment_dim=9`` for the released nets):
128 base channels, channel_mult 2-2-2, channel_mult_emb 4, 4 blocks per resolution, attention at
16×16, dropout 0.13: 55,733,891 parameters with ``augment_dim=9`` (EDM_FORMAT §2.3).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from sims.networks.layers import Conv2d, Init, PositionalEmbedding, group_norm, linear
from sims.networks.unet import EDMUNetBase, build_decoder, build_encoder


class DDPMpp(EDMUNetBase):
    """EDM's SongUNet in the DDPM++ configuration (EDM_FORMAT §2.3, §3).

    Embedding (float32, autocast disabled, as EDM's embedding path):
        emb = PE(c_noise) [N, model_channels]  (endpoint=True, output [sin, cos])
              + map_label(one_hot · √label_dim)   (conditional; Linear with bias)
              + map_augment(augment_labels)       (augment_dim > 0 and labels given; no bias)
        emb = SiLU(map_layer1(SiLU(map_layer0(emb))))     [N, E], E = model_channels·channel_mult_emb
    Encoder ``enc`` (ModuleDict): ``{R}x{R}_conv`` (3×3, in_channels → model_channels) at level 0,
        ``{R}x{R}_down`` (same width, down) at later levels, then ``{R}x{R}_block{i}``
        (i < num_blocks, → model_channels·channel_mult[level], attention iff R ∈ attn_resolutions);
        every encoder output is pushed as a skip.
    Decoder ``dec``: at the lowest level ``{R}x{R}_in0`` (attention) and ``{R}x{R}_in1``, else
        ``{R}x{R}_up``; then ``{R}x{R}_block{i}`` (i ≤ num_blocks; input = concat(x, skips.pop())
        whenever x's width differs from the block's in_channels; attention only for i = num_blocks at
        attention resolutions); at level 0 ``{R}x{R}_aux_norm`` (GroupNorm eps 1e-6) and
        ``{R}x{R}_aux_conv`` (3×3 → out_channels): out = aux_conv(SiLU(aux_norm(x))).
    Blocks: :class:`sims.networks.layers.UNetBlock` with 1 head, skip_scale √0.5, eps 1e-6,
        resample_proj True, ``adaptive_scale`` (False = EDM's additive injection).
    Init (EDM's): xavier_uniform weights, zero biases; conv1, proj and aux_conv × 1e-5; qkv × √0.2;
        GroupNorm weight 1, bias 0.

    Args:
        img_resolution: side R of the (square) training images; fixes where attention happens.
        in_channels / out_channels: image channels (out defaults to in).
        label_dim: number of classes (0: unconditional).
        augment_dim: width of EDM's augmentation labels (9 for the released nets; 0: no map_augment).
        model_channels, channel_mult, channel_mult_emb, num_blocks, attn_resolutions, dropout:
            EDM's SongUNet arguments (CIFAR-10: 128, [2,2,2], 4, 4, [16], 0.13).
        adaptive_scale: False (EDM) adds the affine embedding before norm1; True uses FiLM
            (affine outputs 2·C, scale first: h = SiLU(shift + norm1(h)·(scale + 1))) — not EDM's net.
        label_dropout: probability of zeroing a sample's one-hot label in training (EDM: 0).

    forward(x, noise_labels, class_labels=None, augment_labels=None):
        x [N, in_channels, H, W] (H, W divisible by 2**(len(channel_mult)-1)); noise_labels c_noise
        [N] (EDM: ln(σ)/4; a scalar is broadcast); class_labels float [N, label_dim] or integer [N]
        (None for a conditional net = the all-zero label); augment_labels [N, augment_dim] or None
        (None: no map_augment term, as EDM at sampling). Returns [N, out_channels, H, W] (float32, or
        the autocast dtype inside autocast).

    Raises:
        ValueError: at construction, an img_resolution not divisible by 2**(len(channel_mult)-1), an
            attention resolution that no level has, an empty channel_mult, a GroupNorm width that
            EDM's group rule rejects; in forward, wrong input channels, non-divisible H/W, labels
            given to an unconditional net, augment labels given with augment_dim=0, bad label shapes.
    """

    def __init__(self, img_resolution: int, in_channels: int, out_channels: Optional[int] = None,
                 label_dim: int = 0, augment_dim: int = 0, model_channels: int = 128,
                 channel_mult: Sequence[int] = (2, 2, 2), channel_mult_emb: int = 4, num_blocks: int = 4,
                 attn_resolutions: Sequence[int] = (16,), dropout: float = 0.13, label_dropout: float = 0.0,
                 adaptive_scale: bool = False):
        super().__init__()
        channel_mult, attn_resolutions, level_res = self._setup(
            "DDPMpp", img_resolution, in_channels, out_channels, label_dim, augment_dim, label_dropout,
            channel_mult, num_blocks, attn_resolutions)
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels  # channel_mult_noise = 1
        init = Init("xavier_uniform")
        init_zero = Init("xavier_uniform", weight=1e-5)
        init_attn = Init("xavier_uniform", weight=math.sqrt(0.2))
        kw = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
                  resample_proj=True, adaptive_scale=adaptive_scale, init=init, init_zero=init_zero,
                  init_attn=init_attn)

        # Mapping (EDM's registration order: map_noise, map_label, map_augment, map_layer0, map_layer1).
        self.map_noise = PositionalEmbedding(noise_channels, endpoint=True, flip=True)
        self.map_label = linear(label_dim, noise_channels, init) if label_dim else None
        self.map_augment = linear(augment_dim, noise_channels, init, bias=False) if augment_dim else None
        self.map_layer0 = linear(noise_channels, emb_channels, init)
        self.map_layer1 = linear(emb_channels, emb_channels, init)

        # Encoder and decoder (a decoder level attends in its last block only), then the aux head at level 0.
        self.enc, cout, skips = build_encoder(self.in_channels, model_channels, channel_mult, level_res, num_blocks,
                                              attn_resolutions, model_channels, init, kw)
        self.dec, cout = build_decoder(cout, skips, model_channels, channel_mult, level_res, num_blocks,
                                       lambda idx, res: idx == num_blocks and res in attn_resolutions, kw)
        res = level_res[0]
        self.dec[f"{res}x{res}_aux_norm"] = group_norm(cout, eps=1e-6)
        self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, self.out_channels, 3, init_zero)

    def embed(self, noise_labels: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
              augment_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Embedding [N, E] from c_noise [N] and the labels (class docstring); float32, autocast off."""
        device, dtype, onehot, augment = self._embedding_inputs(noise_labels, class_labels, augment_labels)
        with torch.autocast(device_type=device.type, enabled=False):
            emb = self.map_noise(noise_labels).to(dtype)
            if self.map_label is not None:
                emb = emb + self.map_label(self._drop_labels(onehot) * math.sqrt(self.label_dim))
            if self.map_augment is not None and augment is not None:
                emb = emb + self.map_augment(augment)
            emb = F.silu(self.map_layer0(emb))
            return F.silu(self.map_layer1(emb))

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor,
                class_labels: Optional[torch.Tensor] = None,
                augment_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        x, emb, skips = self._encode(x, noise_labels, class_labels, augment_labels)
        aux = None
        for name, block in self.dec.items():
            if name.endswith("_aux_norm"):
                aux = block(x)
            elif name.endswith("_aux_conv"):
                aux = block(F.silu(aux))
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux


__all__ = ["DDPMpp"]
