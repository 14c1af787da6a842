"""Layers shared by the EDM backbones (DDPM++ = EDM's SongUNet, ADM = EDM's DhariwalUNet) and the MLP.

Written from the facts in ``EDM_FORMAT.md`` §2 (parameter names and shapes) and §3 (numerics and
initialisation), which describe Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models" (NeurIPS), appendix F.2 and its released networks. No code is
taken from NVlabs/edm (CC BY-NC-SA 4.0).

Module and parameter names equal EDM's (``norm0``, ``conv0``, ``affine``, ``norm1``, ``conv1``,
``skip``, ``norm2``, ``qkv``, ``proj``), so an EDM state dict loads by name; EDM's
``resample_filter`` buffers are not registered: resampling with the [1, 1] filter is exactly 2×2
average pooling (down) and 2× nearest-neighbour upsampling (up), done functionally here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

INIT_MODES = ("xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal")


# --------------------------------------------------------------------------------------------------
# Initialisation (EDM_FORMAT §3 "Init")
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Init:
    """EDM's weight-init recipe for one layer: ``mode`` and the factors applied to weight and bias.

    ``mode`` (EDM's ``weight_init``): xavier_uniform √(6/(fan_in+fan_out))·U(−1,1); xavier_normal
    √(2/(fan_in+fan_out))·N(0,1); kaiming_uniform √(3/fan_in)·U(−1,1); kaiming_normal √(1/fan_in)·N(0,1).
    weight = that draw × ``weight``; bias = a draw from the same distribution (the layer's fans) ×
    ``bias`` (EDM's default bias factor is 0, i.e. zero bias). A factor of exactly 0 gives exact zeros.
    """

    mode: str = "xavier_uniform"
    weight: float = 1.0
    bias: float = 0.0


def init_std(mode: str, fan_in: int, fan_out: int) -> float:
    """Standard deviation of EDM's ``weight_init`` distribution (before the ``Init.weight`` factor).

    xavier_uniform: bound √(6/(fan_in+fan_out)), std = bound/√3; xavier_normal: √(2/(fan_in+fan_out));
    kaiming_uniform: bound √(3/fan_in), std = bound/√3; kaiming_normal: √(1/fan_in).
    Raises ValueError for an unknown mode.
    """
    if mode == "xavier_uniform":
        return math.sqrt(6.0 / (fan_in + fan_out)) / math.sqrt(3.0)
    if mode == "xavier_normal":
        return math.sqrt(2.0 / (fan_in + fan_out))
    if mode == "kaiming_uniform":
        return math.sqrt(3.0 / fan_in) / math.sqrt(3.0)
    if mode == "kaiming_normal":
        return math.sqrt(1.0 / fan_in)
    raise ValueError(f"unknown init mode {mode!r}; valid: {', '.join(INIT_MODES)}")


def fans(module: nn.Module) -> tuple[int, int]:
    """(fan_in, fan_out) as EDM defines them: Linear (in, out); Conv2d (C_in·k², C_out·k²)."""
    w = module.weight
    if w.ndim == 2:
        return int(w.shape[1]), int(w.shape[0])
    if w.ndim == 4:
        k2 = int(w.shape[2] * w.shape[3])
        return int(w.shape[1]) * k2, int(w.shape[0]) * k2
    raise ValueError(f"fans: expected a Linear or Conv2d weight, got shape {tuple(w.shape)}")


@torch.no_grad()
def edm_init_(module: nn.Module, init: Init) -> nn.Module:
    """Re-initialise a Linear/Conv2d ``module`` in place with EDM's recipe ``init``; returns it.

    The distributions of :class:`Init` drawn in place (``uniform_`` / ``normal_``; the random stream
    differs from EDM's, the distribution does not). Meta tensors are left alone.
    """
    fan_in, fan_out = fans(module)
    if init.mode not in INIT_MODES:
        raise ValueError(f"unknown init mode {init.mode!r}; valid: {', '.join(INIT_MODES)}")
    std = init_std(init.mode, fan_in, fan_out)
    for t, factor in ((module.weight, init.weight), (getattr(module, "bias", None), init.bias)):
        if t is None or t.is_meta:  # meta tensors hold no data (and normal_ on meta imports torch._dynamo)
            continue
        if factor == 0:
            t.zero_()
        elif init.mode.endswith("uniform"):
            bound = math.sqrt(3.0) * std * factor
            t.uniform_(-bound, bound)
        else:
            t.normal_(0.0, std * factor)
    return module


def init_small(module: nn.Module, scale: float = 1e-5) -> nn.Module:
    """Scale a layer's current weight by ``scale`` and zero its bias ('nearly zero' init, in place).

    Used by the MLP backbone for the last layer of every residual branch: the untrained block is
    ~identity while every gradient stays non-zero.
    """
    with torch.no_grad():
        module.weight.mul_(scale)
        if getattr(module, "bias", None) is not None:
            module.bias.zero_()
    return module


class Linear(nn.Linear):
    """``nn.Linear`` (weight [out, in], bias [out]) whose ``reset_parameters`` applies EDM's recipe ``init``."""

    def __init__(self, in_features: int, out_features: int, init: Init, bias: bool = True):
        object.__setattr__(self, "init", init)  # read by reset_parameters(), which nn.Linear.__init__ calls
        super().__init__(in_features, out_features, bias=bias)

    def reset_parameters(self) -> None:
        edm_init_(self, self.init)


def linear(in_features: int, out_features: int, init: Init, bias: bool = True) -> nn.Linear:
    """:class:`Linear` (an ``nn.Linear``, weight [out, in]) initialised with EDM's recipe ``init``."""
    return Linear(in_features, out_features, init, bias=bias)


# --------------------------------------------------------------------------------------------------
# GroupNorm (EDM_FORMAT §3 "GroupNorm")
# --------------------------------------------------------------------------------------------------

def edm_num_groups(num_channels: int, max_groups: int = 32, min_channels_per_group: int = 4) -> int:
    """EDM's GroupNorm group count ``min(32, C // 4)`` (no fix-up).

    Raises:
        ValueError: the count is 0 (C < 4) or does not divide C (e.g. C = 18 → 4 groups); the
            message names the channel count. EDM's own networks have no such widths.
    """
    groups = min(max_groups, num_channels // min_channels_per_group)
    if groups < 1 or num_channels % groups != 0:
        raise ValueError(f"GroupNorm over {num_channels} channels: EDM's rule min({max_groups}, C // "
                         f"{min_channels_per_group}) = {groups} groups does not divide {num_channels}; "
                         f"choose model_channels / channel_mult so every width (also the decoder's "
                         f"concatenations) is a multiple of 4·min(32, C//4)")
    return groups


def group_norm(num_channels: int, eps: float) -> nn.GroupNorm:
    """``nn.GroupNorm`` with EDM's group rule (:func:`edm_num_groups`), affine weight 1 and bias 0.

    ``eps``: 1e-6 in DDPM++ (SongUNet), 1e-5 in ADM (DhariwalUNet). Raises ValueError as
    :func:`edm_num_groups`.
    """
    return nn.GroupNorm(edm_num_groups(num_channels), num_channels, eps=eps)


def group_norm_groups(channels: int, max_groups: int = 32, min_channels_per_group: int = 4) -> int:
    """The largest g ≤ min(32, C // 4) that divides C (at least 1): a GroupNorm group count that always works.

    Not EDM's rule (that is :func:`edm_num_groups`); used by the diffusers adapter, whose single
    ``norm_num_groups`` must divide every width.
    """
    g = max(1, min(max_groups, channels // min_channels_per_group))
    while channels % g != 0:
        g -= 1
    return g


# --------------------------------------------------------------------------------------------------
# Resampling convolutions (EDM_FORMAT §3 "Resampling with [1,1]")
# --------------------------------------------------------------------------------------------------

def resample(x: torch.Tensor, up: bool = False, down: bool = False) -> torch.Tensor:
    """EDM's [1, 1]-filter resampling: 2× nearest-neighbour upsampling (``up``) or 2×2 average pooling (``down``).

    x [N, C, H, W] -> [N, C, 2H, 2W] (up), [N, C, H/2, W/2] (down) or x itself.
    """
    if up:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    if down:
        return F.avg_pool2d(x, 2)
    return x


class Conv2d(nn.Conv2d):
    """EDM's Conv2d: optional up/down-sampling **before** a k×k convolution with padding k//2.

    Parameters ``weight`` [C_out, C_in, k, k] and ``bias`` [C_out], initialised with EDM's recipe
    ``init`` (``reset_parameters`` re-applies it). forward: x [N, C_in, H, W] -> [N, C_out, H', W'] (H' = 2H up, H/2 down, H otherwise).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, init: Init,
                 up: bool = False, down: bool = False, bias: bool = True):
        if up and down:
            raise ValueError("a convolution cannot both upsample and downsample")
        object.__setattr__(self, "init", init)  # read by reset_parameters(), which nn.Conv2d.__init__ calls
        super().__init__(in_channels, out_channels, kernel, padding=kernel // 2, bias=bias)
        self.up, self.down = bool(up), bool(down)

    def reset_parameters(self) -> None:
        edm_init_(self, self.init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(resample(x, self.up, self.down))


class Resample(nn.Module):
    """Parameter-free up/down-sampling (EDM's kernel-0 Conv2d, e.g. ADM's same-width down/up skip).

    Holds no tensors (EDM's only tensor there is the ``resample_filter`` buffer, not registered here).
    """

    def __init__(self, in_channels: int, up: bool = False, down: bool = False):
        super().__init__()
        if up and down:
            raise ValueError("a resample layer cannot both upsample and downsample")
        self.in_channels = self.out_channels = int(in_channels)
        self.up, self.down = bool(up), bool(down)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return resample(x, self.up, self.down)


# --------------------------------------------------------------------------------------------------
# Embeddings and labels
# --------------------------------------------------------------------------------------------------

class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of a scalar per sample (EDM_FORMAT §3 "Positional embedding"; Vaswani et al. 2017).

    half = C/2; freqs_i = (1/max_positions)^(i / (half − 1)) (``endpoint=True``, DDPM++/SongUNet) or
    (1/max_positions)^(i / half) (``endpoint=False``, ADM/DhariwalUNet), i = 0 … half−1, computed in
    float32 exactly as EDM (arange / denominator, then pow); emb = [cos(c·f), sin(c·f)], swapped to
    [sin(c·f), cos(c·f)] when ``flip`` (SongUNet's swap). Holds no tensors (EDM's ``map_noise``).

    Args:
        num_channels: C, even and >= 4.
        max_positions: inverse of the lowest frequency (10000 in EDM).
        endpoint: see above.
        flip: output [sin, cos] instead of [cos, sin].
    forward(c): c [N] (EDM: c_noise = ln(σ)/4) -> [N, C] float32 (computed in c's dtype if c is
        float64).
    Raises:
        ValueError: odd or too small ``num_channels`` (construction); ``c`` not one-dimensional.
    """

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False,
                 flip: bool = False):
        super().__init__()
        if num_channels % 2 != 0 or num_channels < 4:
            raise ValueError(f"PositionalEmbedding needs an even num_channels >= 4, got {num_channels}")
        self.num_channels = int(num_channels)
        self.max_positions = max_positions
        self.endpoint = bool(endpoint)
        self.flip = bool(flip)

    def frequencies(self, device=None) -> torch.Tensor:
        """freqs [C/2] float32 (see the class docstring)."""
        half = self.num_channels // 2
        freqs = torch.arange(start=0, end=half, dtype=torch.float32, device=device)
        freqs = freqs / (half - (1 if self.endpoint else 0))
        return (1 / self.max_positions) ** freqs

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        if c.ndim != 1:
            raise ValueError(f"noise labels must have shape [N], got {tuple(c.shape)}")
        if not c.is_floating_point() or c.dtype in (torch.float16, torch.bfloat16):
            c = c.to(torch.float32)
        arg = torch.outer(c, self.frequencies(c.device).to(c.dtype))
        if self.flip:
            return torch.cat([arg.sin(), arg.cos()], dim=1)
        return torch.cat([arg.cos(), arg.sin()], dim=1)


# --------------------------------------------------------------------------------------------------
# Attention (EDM_FORMAT §3 "UNetBlock", attention part)
# --------------------------------------------------------------------------------------------------

class AttentionOp(nn.Module):
    """Per-head dot-product attention in float32, EDM's channel-major layout.

    forward(q, k, v): each [B, d, L] (B = N·heads, d channels per head, L = H·W positions), any
    float dtype -> a [B, d, L] **float32** (float64 for float64 inputs), with
    a[b, c, i] = Σ_j w[b, i, j]·v[b, c, j] and
    w[b, i, :] = softmax_j(Σ_c q[b, c, i]·k[b, c, j] / √d). Autocast is disabled inside and q, k, v
    are cast to float32, so the softmax is float32 even under bf16/fp16 autocast (EDM computes the
    attention weights in float32); the caller casts the result back to its activation dtype.
    Implemented with ``scaled_dot_product_attention`` (scale 1/√d) on float32 [B, L, d] tensors.
    Holds no tensors.
    """

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        d = q.shape[1]
        dtype = torch.promote_types(q.dtype, torch.float32)  # float32 (float64 stays float64)
        with torch.autocast(device_type=q.device.type, enabled=False):
            q32, k32, v32 = (t.to(dtype).transpose(1, 2) for t in (q, k, v))  # [B, L, d]
            a = F.scaled_dot_product_attention(q32, k32, v32, scale=1.0 / math.sqrt(d))
        return a.transpose(1, 2)


# --------------------------------------------------------------------------------------------------
# UNet block (EDM_FORMAT §2.3 per-block tensors, §3 "UNetBlock")
# --------------------------------------------------------------------------------------------------

class UNetBlock(nn.Module):
    """EDM's U-Net residual block (used by both SongUNet/DDPM++ and DhariwalUNet/ADM).

    h = conv0(SiLU(norm0(x)))                     (conv0 up/down-samples first if ``up``/``down``)
    p = affine(emb)[:, :, None, None]             (autocast off: in the weights' dtype, then cast to h's)
    adaptive_scale: (scale, shift) = halves of p (scale first); h = SiLU(shift + norm1(h)·(scale + 1))
    otherwise:      h = SiLU(norm1(h + p))
    h = conv1(dropout(h));  x = (h + skip(x)) · skip_scale        (skip: identity, 1×1 conv or resample)
    attention (heads > 0): qkv = qkv(norm2(x)) viewed as [N·heads, d, 3, H·W] (output channel
        o = h·3d + 3c + j, j = q/k/v — EDM's interleaved layout); a = AttentionOp(q, k, v);
        x = (proj(a) + x) · skip_scale.

    Args:
        in_channels, out_channels: C_in, C_out.
        emb_channels: E, width of the embedding.
        up, down: 2× nearest upsampling / 2×2 average-pool downsampling in conv0 and skip.
        attention: add self-attention; heads = ``num_heads`` if given, else C_out // ``channels_per_head``
            (EDM's rule; 0 heads means no attention layer at all, as in EDM).
        dropout: probability of the dropout before conv1 (the only dropout).
        skip_scale: √0.5 (SongUNet) or 1 (DhariwalUNet).
        eps: GroupNorm epsilon (1e-6 SongUNet, 1e-5 DhariwalUNet).
        resample_proj: a 1×1 skip conv also for same-width up/down blocks (SongUNet True); without it
            a same-width up/down skip is a parameter-free :class:`Resample` (DhariwalUNet).
        adaptive_scale: FiLM scale-shift (affine outputs 2·C_out) or additive (C_out) injection.
        init, init_zero, init_attn: EDM's :class:`Init` for conv0/affine/skip, for conv1/proj, for qkv.
    forward(x [N, C_in, H, W], emb [N, E]) -> [N, C_out, H', W'].
    Raises:
        ValueError: C_out not divisible by the number of heads; a GroupNorm width EDM's rule rejects.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, *, up: bool = False,
                 down: bool = False, attention: bool = False, num_heads: Optional[int] = None,
                 channels_per_head: int = 64, dropout: float = 0.0, skip_scale: float = 1.0,
                 eps: float = 1e-5, resample_proj: bool = False, adaptive_scale: bool = True,
                 init: Init = Init(), init_zero: Init = Init(weight=0.0),
                 init_attn: Optional[Init] = None):
        super().__init__()
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.emb_channels = int(emb_channels)
        if not attention:
            heads = 0
        elif num_heads is not None:
            heads = int(num_heads)
        else:
            heads = self.out_channels // int(channels_per_head)
        if heads and self.out_channels % heads != 0:
            raise ValueError(f"UNetBlock: {self.out_channels} channels are not divisible by {heads} attention heads")
        self.num_heads = heads
        self.dropout = float(dropout)
        self.skip_scale = float(skip_scale)
        self.adaptive_scale = bool(adaptive_scale)

        self.norm0 = group_norm(in_channels, eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, init, up=up, down=down)
        self.affine = linear(emb_channels, out_channels * (2 if adaptive_scale else 1), init)
        self.norm1 = group_norm(out_channels, eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, init_zero)
        self.skip: Optional[nn.Module] = None
        if out_channels != in_channels or up or down:
            if resample_proj or out_channels != in_channels:
                self.skip = Conv2d(in_channels, out_channels, 1, init, up=up, down=down)
            else:
                self.skip = Resample(in_channels, up=up, down=down)
        if heads:
            self.norm2 = group_norm(out_channels, eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, init_attn if init_attn is not None else init)
            self.proj = Conv2d(out_channels, out_channels, 1, init_zero)
            self.attn_op = AttentionOp()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        with torch.autocast(device_type=emb.device.type, enabled=False):
            params = self.affine(emb.to(self.affine.weight.dtype))
        params = params[:, :, None, None].to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x + params))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale
        if self.num_heads:
            n, c, h, w = x.shape
            qkv = self.qkv(self.norm2(x)).reshape(n * self.num_heads, c // self.num_heads, 3, h * w)
            q, k, v = qkv.unbind(2)
            a = self.attn_op(q, k, v).to(x.dtype)
            x = (self.proj(a.reshape(n, c, h, w)) + x) * self.skip_scale
        return x


__all__ = [
    "AttentionOp", "Conv2d", "INIT_MODES", "Init", "Linear", "PositionalEmbedding", "Resample", "UNetBlock",
    "edm_init_", "edm_num_groups", "fans", "group_norm", "group_norm_groups", "init_small", "init_std", "linear",
    "resample",
]
