"""DDPM++ U-Net backbone F(x_in, c_noise, class_labels) as configured in EDM.

Architecture: Song et al. 2021, "Score-Based Generative Modeling through Stochastic Differential
Equations" (ICLR), appendix H ("DDPM++": residual BigGAN-style blocks, no FIR resampling,
positional noise embedding, skip connections rescaled by 1/sqrt(2)), in the configuration of
Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"
(NeurIPS), Table 7 and appendix F.2: for CIFAR-10 128 base channels, channel multipliers 2-2-2,
4 residual blocks per resolution, self-attention at 16x16, dropout 0.13, ~56 M parameters.

Written from the papers' descriptions; no code is taken from NVlabs/edm or NVlabs/edm2
(CC BY-NC-SA 4.0).

Block (one :class:`ResBlock`)::

    h = conv3x3(resample(SiLU(GroupNorm(x))))
    h = GroupNorm(h);  h = h * (1 + scale(emb)) + shift(emb)    (adaptive_scale=True, 'FiLM')
                  or   h = GroupNorm(h + shift(emb))            (adaptive_scale=False, EDM DDPM++)
    h = conv3x3(dropout(SiLU(h)))                               (initialised ~0)
    out = (h + skip(x)) / sqrt(2)                               (skip: identity or 1x1 conv)
    [out = (out + proj(attention(GroupNorm(out)))) / sqrt(2)]   (at attention resolutions)

Shapes: x [N, C, H, W] (H, W divisible by 2**(len(channel_mult)-1)), c_noise [N] float
(EDM: c_noise = ln(sigma)/4), class labels one-hot/soft [N, label_dim] or integer [N].
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

SKIP_SCALE = 1.0 / math.sqrt(2.0)


def group_norm_groups(channels: int, max_groups: int = 32, min_channels_per_group: int = 4) -> int:
    """Number of GroupNorm groups for ``channels``: the largest g <= min(32, C // 4) dividing C.

    32 groups is the Wu & He (2018) default used by DDPM/DDPM++; for small channel counts
    (CPU test configurations) at least 4 channels per group are kept. Returns >= 1.
    """
    g = max(1, min(max_groups, channels // min_channels_per_group))
    while channels % g != 0:
        g -= 1
    return g


def _normalize(channels: int, eps: float = 1e-6) -> nn.GroupNorm:
    return nn.GroupNorm(group_norm_groups(channels), channels, eps=eps)


def _init_small(module: nn.Module, scale: float = 1e-5) -> nn.Module:
    """Re-initialise a layer's weight to ``scale`` x its default init and its bias to zero.

    EDM-style 'nearly zero' init for the last layer of every residual branch and of the network:
    the untrained block is ~identity and the untrained network outputs ~0, yet every gradient is
    non-zero (a weight of exactly 0 would block gradients to all layers before it at step 0).
    """
    with torch.no_grad():
        module.weight.mul_(scale)
        if getattr(module, "bias", None) is not None:
            module.bias.zero_()
    return module


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of a scalar per sample (Vaswani et al. 2017; DDPM/DDPM++, EDM appendix F.2).

    ``emb[:, i] = cos(c * f_i)``, ``emb[:, half + i] = sin(c * f_i)`` with
    ``f_i = (1 / max_positions) ** (i / (half - 1))`` for i = 0..half-1 (frequencies from 1 down to
    1/max_positions).

    Args:
        num_channels: output width (even, >= 4).
        max_positions: inverse of the lowest frequency.
    forward(c): c [N] float (EDM: c_noise = ln(sigma)/4) -> [N, num_channels] float32.
    Raises:
        ValueError: odd or too small ``num_channels``; ``c`` not one-dimensional.
    """

    def __init__(self, num_channels: int, max_positions: float = 10000.0):
        super().__init__()
        if num_channels % 2 != 0 or num_channels < 4:
            raise ValueError(f"PositionalEmbedding needs an even num_channels >= 4, got {num_channels}")
        half = num_channels // 2
        freqs = (1.0 / max_positions) ** (torch.arange(half, dtype=torch.float64) / (half - 1))
        self.register_buffer("freqs", freqs.to(torch.float32), persistent=False)
        self.num_channels = num_channels

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        if c.ndim != 1:
            raise ValueError(f"noise labels must have shape [N], got {tuple(c.shape)}")
        arg = c.to(torch.float32)[:, None] * self.freqs[None, :]
        return torch.cat([arg.cos(), arg.sin()], dim=1)


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


class ResBlock(nn.Module):
    """DDPM++ residual block with noise-embedding injection and optional up/down-sampling and attention.

    Args:
        in_channels, out_channels: C_in, C_out.
        emb_channels: width E of the noise embedding.
        up / down: nearest-neighbour x2 upsampling / 2x2 average-pool downsampling applied before
            the first conv and in the skip path (resampling filter [1,1], as in EDM's DDPM++).
        attention: add a self-attention layer after the residual branch.
        num_heads: attention heads (EDM's DDPM++ uses 1).
        dropout: dropout probability before the second conv.
        adaptive_scale: FiLM scale-shift (True) or additive (False, as EDM's DDPM++) injection.
    forward(x [N, C_in, H, W], emb [N, E]) -> [N, C_out, H', W'] (H' = 2H, H/2 or H).
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, *, up: bool = False,
                 down: bool = False, attention: bool = False, num_heads: int = 1, dropout: float = 0.0,
                 adaptive_scale: bool = True):
        super().__init__()
        if up and down:
            raise ValueError("a block cannot both upsample and downsample")
        self.up, self.down = up, down
        self.adaptive_scale = adaptive_scale
        self.norm0 = _normalize(in_channels)
        self.conv0 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.affine = nn.Linear(emb_channels, out_channels * (2 if adaptive_scale else 1))
        self.norm1 = _normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = _init_small(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        # 1x1 projection whenever the channel count or the resolution changes (resample_proj).
        self.skip = (nn.Conv2d(in_channels, out_channels, 1)
                     if (in_channels != out_channels or up or down) else None)
        self.num_heads = num_heads
        if attention:
            if out_channels % num_heads != 0:
                raise ValueError(f"{out_channels} channels are not divisible by {num_heads} heads")
            self.norm2 = _normalize(out_channels)
            self.qkv = nn.Conv2d(out_channels, out_channels * 3, 1)
            self.proj = _init_small(nn.Conv2d(out_channels, out_channels, 1))
        else:
            self.norm2 = self.qkv = self.proj = None

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        orig = x
        h = self.conv0(self._resample(F.silu(self.norm0(x))))
        params = self.affine(emb)[:, :, None, None].to(h.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        else:
            h = F.silu(self.norm1(h + params))
        h = self.conv1(self.dropout(h))
        skip = self._resample(orig)
        if self.skip is not None:
            skip = self.skip(skip)
        x = (h + skip) * SKIP_SCALE
        if self.qkv is not None:
            n, c, hh, ww = x.shape
            qkv = self.qkv(self.norm2(x)).reshape(n, 3, self.num_heads, c // self.num_heads, hh * ww)
            q, k, v = (t.transpose(-1, -2) for t in qkv.unbind(1))  # [N, heads, HW, C/heads]
            a = F.scaled_dot_product_attention(q, k, v)
            a = a.transpose(-1, -2).reshape(n, c, hh, ww)
            x = (self.proj(a) + x) * SKIP_SCALE
        return x


class DDPMpp(nn.Module):
    """DDPM++ U-Net (Song et al. 2021, appendix H) in EDM's configuration (Karras et al. 2022, Table 7).

    Noise embedding: PositionalEmbedding(c_noise) [N, model_channels] (+ Linear(one-hot label),
    + Linear(augment labels)) -> Linear -> SiLU -> Linear -> SiLU, width
    E = model_channels * embedding_dim_mult.
    Encoder: conv3x3 (img_channels -> model_channels); per level l (resolution R >> l) a
    downsampling ResBlock (l > 0) then ``num_blocks`` ResBlocks with model_channels*channel_mult[l]
    channels (attention where the resolution is in ``attn_resolutions``). Every encoder output is
    kept as a U-Net skip.
    Decoder: at the lowest resolution two ResBlocks (the first with attention); per level an
    upsampling ResBlock (except the lowest), then ``num_blocks + 1`` ResBlocks on the concatenation
    with a skip (attention on the last one at attention resolutions).
    Output: GroupNorm -> SiLU -> conv3x3 (initialised ~0, so the untrained F is ~0 and the
    untrained EDM denoiser is D(x;sigma) ~ c_skip * x).

    Args:
        img_resolution: side R of the (square) training images; fixes where attention happens.
        in_channels / out_channels: image channels (out defaults to in).
        label_dim: number of classes (0: unconditional).
        model_channels, channel_mult, num_blocks, attn_resolutions, dropout, embedding_dim_mult:
            as in :class:`sims.config.NetworkConfig` (EDM CIFAR-10: 128, [2,2,2], 4, [16], 0.13, 4).
        num_heads: attention heads (EDM's DDPM++ uses 1).
        adaptive_scale: FiLM scale-shift embedding injection (True) or EDM DDPM++'s additive (False).
            EDM CIFAR-10 config: 55.7 M parameters additive, ~60 M with FiLM.
        augment_dim: width of optional augmentation labels (EDM's non-leaking augmentation; 0: none).
        label_dropout: probability of zeroing the class label per sample in training (CFG-style).

    forward(x, noise_labels, class_labels=None, augment_labels=None):
        x: [N, in_channels, H, W] (H, W divisible by 2**(len(channel_mult)-1)); noise_labels:
        c_noise, float [N]; class_labels: float [N, label_dim] or integer [N];
        augment_labels: [N, augment_dim]. Returns [N, out_channels, H, W] (float32, or the autocast
        dtype inside autocast).

    Raises:
        ValueError: at construction, an img_resolution not divisible by 2**(len(channel_mult)-1),
            an attention resolution that no level has, or an empty channel_mult; in forward, wrong
            input channels, non-divisible H/W, or bad label shapes.
    """

    def __init__(self, img_resolution: int, in_channels: int, out_channels: Optional[int] = None,
                 label_dim: int = 0, model_channels: int = 128, channel_mult: Sequence[int] = (2, 2, 2),
                 num_blocks: int = 4, attn_resolutions: Sequence[int] = (16,), dropout: float = 0.13,
                 embedding_dim_mult: int = 4, num_heads: int = 1, adaptive_scale: bool = True,
                 augment_dim: int = 0, label_dropout: float = 0.0):
        super().__init__()
        channel_mult = [int(m) for m in channel_mult]
        attn_resolutions = [int(r) for r in attn_resolutions]
        if not channel_mult:
            raise ValueError("channel_mult must list at least one level")
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.factor = 2 ** (len(channel_mult) - 1)
        if img_resolution % self.factor != 0:
            raise ValueError(f"img_resolution {img_resolution} is not divisible by 2**(len(channel_mult)-1)"
                             f" = {self.factor} (channel_mult={channel_mult}); use fewer levels or another size")
        level_res = [img_resolution >> level for level in range(len(channel_mult))]
        missing = sorted(set(attn_resolutions) - set(level_res))
        if missing:
            raise ValueError(f"attn_resolutions {missing} are not among the U-Net's resolutions {level_res} "
                             f"(img_resolution={img_resolution}, channel_mult={channel_mult})")
        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.label_dim = int(label_dim)
        self.augment_dim = int(augment_dim)
        self.label_dropout = float(label_dropout)
        emb_channels = model_channels * embedding_dim_mult
        noise_channels = model_channels

        # Noise (and label) embedding.
        self.map_noise = PositionalEmbedding(noise_channels)
        self.map_label = nn.Linear(label_dim, noise_channels, bias=False) if label_dim else None
        self.map_augment = nn.Linear(augment_dim, noise_channels, bias=False) if augment_dim else None
        self.map_layer0 = nn.Linear(noise_channels, emb_channels)
        self.map_layer1 = nn.Linear(emb_channels, emb_channels)

        kw = dict(emb_channels=emb_channels, num_heads=num_heads, dropout=dropout, adaptive_scale=adaptive_scale)
        # Encoder: a flat list; entry i's output is skip i.
        self.conv_in = nn.Conv2d(in_channels, model_channels, 3, padding=1)
        self.enc = nn.ModuleList()
        skip_channels = [model_channels]
        cout = model_channels
        for level, mult in enumerate(channel_mult):
            res = level_res[level]
            if level > 0:
                self.enc.append(ResBlock(cout, cout, down=True, **kw))
                skip_channels.append(cout)
            for _ in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc.append(ResBlock(cin, cout, attention=res in attn_resolutions, **kw))
                skip_channels.append(cout)

        # Decoder: (block, takes_skip) pairs.
        self.dec = nn.ModuleList()
        self._dec_takes_skip = []
        for level in reversed(range(len(channel_mult))):
            res = level_res[level]
            if level == len(channel_mult) - 1:
                self.dec.append(ResBlock(cout, cout, attention=True, **kw))
                self.dec.append(ResBlock(cout, cout, **kw))
                self._dec_takes_skip += [False, False]
            else:
                self.dec.append(ResBlock(cout, cout, up=True, **kw))
                self._dec_takes_skip.append(False)
            for idx in range(num_blocks + 1):
                cin = cout + skip_channels.pop()
                cout = model_channels * channel_mult[level]
                attn = idx == num_blocks and res in attn_resolutions
                self.dec.append(ResBlock(cin, cout, attention=attn, **kw))
                self._dec_takes_skip.append(True)
        assert not skip_channels
        self.out_norm = _normalize(cout)
        self.out_conv = _init_small(nn.Conv2d(cout, self.out_channels, 3, padding=1))

    def embed(self, noise_labels: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
              augment_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Noise(+label) embedding [N, E] from c_noise [N] (and labels); see the class docstring."""
        emb = self.map_noise(noise_labels)
        n = emb.shape[0]
        if self.map_label is not None:
            onehot = labels_to_onehot(class_labels, self.label_dim, n, emb.device, emb.dtype)
            if onehot is None:  # unconditional evaluation of a conditional net: the zero label
                onehot = torch.zeros(n, self.label_dim, device=emb.device, dtype=emb.dtype)
            if self.training and self.label_dropout > 0:
                keep = torch.rand(n, 1, device=emb.device) >= self.label_dropout
                onehot = onehot * keep.to(onehot.dtype)
            emb = emb + self.map_label(onehot * math.sqrt(self.label_dim))
        elif class_labels is not None:
            raise ValueError("class_labels were given to an unconditional backbone (label_dim=0)")
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        emb = F.silu(self.map_layer0(emb))
        return F.silu(self.map_layer1(emb))

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor,
                class_labels: Optional[torch.Tensor] = None,
                augment_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"DDPMpp expects x of shape [N, {self.in_channels}, H, W], got {tuple(x.shape)}")
        if x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by {self.factor} "
                             f"(2**(levels-1)); pad or resize the images")
        noise_labels = torch.as_tensor(noise_labels, device=x.device)
        if noise_labels.ndim == 0:
            noise_labels = noise_labels.expand(x.shape[0])
        if noise_labels.shape != (x.shape[0],):
            raise ValueError(f"noise_labels must have shape [N]={x.shape[0]}, got {tuple(noise_labels.shape)}")
        emb = self.embed(noise_labels, class_labels, augment_labels)

        h = self.conv_in(x)
        skips = [h]
        for block in self.enc:
            h = block(h, emb)
            skips.append(h)
        for block, takes_skip in zip(self.dec, self._dec_takes_skip):
            if takes_skip:
                h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb)
        return self.out_conv(F.silu(self.out_norm(h)))
