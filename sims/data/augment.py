"""EDM's non-leaky geometric augmentation (``--augment p``) with its 9 conditioning labels.

What this is
------------
EDM (Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models", NeurIPS
2022, section 5 "augmentation regularization" and the appendix on training details) regularises
CIFAR-10 (p = 0.12) and FFHQ/AFHQv2-64 (p = 0.15) training with the geometric part of the
StyleGAN2-ADA augmentation pipeline (Karras et al., "Training Generative Adversarial Networks with
Limited Data", NeurIPS 2020). Each training image y is transformed *before* noise is added; the
denoiser is trained on the transformed image and receives the transform's parameters as an extra
conditioning vector (``augment_labels``, 9 numbers). At sampling time the vector is zero (EDM passes
``None``; the network's ``map_augment`` layer has no bias, so ``None`` and zeros are the same), so
the network generates un-augmented images: the augmentation does not "leak" into the samples.
(The paper's text is not in the stored corpus this module was written from; the statements in
this paragraph are the paper's as recalled. Everything below is read from the code.)

This module re-implements that pipeline from the facts listed here. **No code from NVlabs/edm
(CC BY-NC-SA 4.0) or NVlabs/stylegan2-ada-pytorch is copied**; the facts were read in NVlabs/edm
``training/augment.py`` (class ``AugmentPipe``) and ``train.py`` (the ``--augment`` options), and
compared with NVlabs/stylegan2-ada-pytorch ``training/augment.py``, from which EDM's derives.

Relation to StyleGAN2-ADA's ``AugmentPipe`` (same padding, sym6 filter bank, bilinear
``grid_sample`` and parameter distributions): ADA applies its x-flip as a geometric matrix
(resampled), has no y-flip, rotates both before and after the anisotropic scaling (each with
probability 1 − √(1 − rotate·p)) with the stretch along x in between, and returns no labels;
EDM blits the flips, adds the y-flip, uses one rotation, draws the stretch axis separately
(``aniso_rotate_prob``), and returns the labels.

Facts (EDM ``train.py``): ``--augment p`` (default 0.12) constructs ``AugmentPipe(p=p, xflip=1e8,
yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)`` and sets the network's
``augment_dim = 9``; the remaining ``AugmentPipe`` defaults apply: ``scale_std=0.2``,
``rotate_frac_max=1``, ``aniso_std=0.2``, ``aniso_rotate_prob=0.5``, ``translate_frac_std=0.125``.
EDM's loss calls ``y, augment_labels = augment_pipe(images)`` once per batch, then noises y.

Facts (EDM ``training/augment.py``), per image, in this order:

1. **x-flip.** w ~ uniform{0, 1}; kept if u < xflip·p (u ~ U[0, 1)), else 0 — i.e. applied with
   probability clip(xflip·p, 0, 1)·½. With xflip = 1e8 every image is flipped with probability ½
   as soon as p > 1e-8. Done by pixel blitting (``flip`` of the W axis), not resampling.
   Label 0 = w ∈ {0, 1}.
2. **y-flip.** The same with yflip·p (probability p/2 for EDM's options), flipping the H axis.
   Label 1 = w.
3. **Isotropic scale.** w ~ N(0, 1), kept with probability clip(scale·p); s = 2^(scale_std·w)
   (log2 standard deviation 0.2). The image is magnified by s about its centre. Label 2 = w
   (= log2(s)/scale_std, the "log-scale term").
4. **Rotation.** θ ~ U(−π·rotate_frac_max, π·rotate_frac_max) (full circle), kept with probability
   clip(rotate_frac·p). Labels 3, 4 = cos θ − 1, sin θ. In pixel coordinates (x right, y down) the
   content turns counter-clockwise as displayed by θ: θ = π/2 corresponds to
   ``torch.rot90(x, 1, dims=(2, 3))`` (up to the resampling error described below).
5. **Anisotropic scale.** w ~ N(0, 1) kept with probability clip(aniso·p); an axis angle
   r ~ U(−π, π) drawn independently and kept with probability aniso_rotate_prob = 0.5 (else r = 0,
   the x axis); s = 2^(aniso_std·w). The image is stretched by s along the unit vector
   (cos r, −sin r) (x right, y down; i.e. the axis at angle r counter-clockwise from +x as
   displayed) and by 1/s across it. Labels 5, 6 = w·cos r, w·sin r (both 0
   when w was not kept, whatever r). Note: this label does not identify the transform uniquely —
   (w, r) and (−w, r ± π) give the same label but stretch along perpendicular axes; that is EDM's
   layout and is kept.
6. **Translation.** (w_x, w_y) ~ N(0, I₂), both kept or both zeroed with probability
   clip(translate_frac·p); the content moves by (t_x, t_y) = (w_x·W, w_y·H)·translate_frac_std
   pixels (std 1/8 of the image size), right and down. Labels 7, 8 = w_x, w_y.

Steps 3–6 compose into one inverse map per image, from output pixel coordinates (centred on the
image centre ((W−1)/2, (H−1)/2), x right, y down, in pixels) to input coordinates:

    G⁻¹ = S(1/s) · R(θ) · R(−r) · diag(1/s_a, s_a) · R(r) · T(−t_x, −t_y),
    R(φ) = [[cos φ, −sin φ], [sin φ, cos φ]],

(scale, rotation, anisotropy, translation, rightmost applied first to the output coordinate),
which EDM executes ("Execute geometric transformations") as:

* **Padding**: the four output corners are mapped through every image's G⁻¹; the batch-wide
  maximum extent beyond the image, plus 2·Hz_pad = 6 pixels of slack, clipped to [0, W−1]
  ([0, H−1]) and rounded up, is padded on each side with ``mode='reflect'`` (mirror without
  repeating the edge pixel). The padding is computed over the *whole* batch, so it (and, at
  the outermost pixels of strongly shrunk images, the result) depends on the other images.
* **2× upsampling** with the 12-tap Symlet-6 ("sym6") low-pass filter h (orthonormal: Σh = √2,
  Σₙ h[n]h[n+2m] = δₘ), separably: u[n] = Σₖ h[n + 5 − 2k]·c[k]; upsampled sample n is treated
  as lying at padded-pixel position n/2.
* **Resampling**: an output canvas of 2·(H + 2·Hz_pad) × 2·(W + 2·Hz_pad) samples (Hz_pad = 3;
  canvas sample m at output position m/2 − 3) is filled by ``grid_sample(mode='bilinear',
  padding_mode='zeros', align_corners=False)`` at G⁻¹ of each canvas position.
* **2× downsampling** with the same filter (the adjoint of the upsampling: d[i] = Σⱼ h[j]·v[2i+1+j])
  and cropping the 3-pixel canvas border, back to H × W.
* EDM's colour transforms, integer rotation and integer translation are disabled by ``--augment``
  (multipliers 0) and are not implemented here.

Exact versus approximate (measured in ``tests/test_augment.py``):

* x-flip and y-flip: bit-exact (pixel blitting).
* Integer translations: exact up to float rounding (~1e-6) over the whole image, including the
  border pixels, which hold the reflect-padded content: the sym6 filter bank reconstructs
  perfectly and an even shift of the upsampled signal commutes with it.
* 90° (and 180°) rotation: **approximate**, not exact, in EDM's pipeline. The sym6 filter is not
  symmetric (its centroid is tap 5.098, where a symmetric 12-tap filter has 5.5), so
  (a) upsampled sample n really sits at padded position (n − 0.098)/2, not the n/2 EDM assumes;
  the effective centre of every scale/rotation/anisotropy is thereby offset by
  δ = (0.049, 0.049) px (``SYM6_OFFSET``): for linear content the result is exactly
  f(G⁻¹(p + δ) − δ), so a 90° rotation is ``rot90`` shifted by ≈ 0.098 px along x; and
  (b) mirroring (which a 90°/180° turn contains) does not commute with an asymmetric filter.
  Measured on 32×32 images: uniform noise in [−1, 1] differs from ``torch.rot90`` by 0.07 mean /
  0.29 max (|error|); a smooth cosine pattern of period 16 px by 0.04 max; a linear ramp matches
  f(G⁻¹(p + δ) − δ) to 1e-5.
* Arbitrary scales, rotations, anisotropies and fractional translations: bilinear interpolation
  of the 2× upsampled image (approximate by nature); exact (≤ 1e-4) for linear-ramp images away
  from the reflect-padded border (the filter reproduces polynomials, bilinear interpolation
  linear functions), with the δ offset above; without δ the error is δ·|1 − 1/s|·|∇f| for a
  scale s.

Differences from EDM's code (deliberate, documented):

* **Randomness** comes only from the caller's ``torch.Generator`` (on the images' device), never
  from the global RNG. Every call draws the same sequence of tensors, in EDM's order and count
  (x-flip randint, gate; y-flip randint, gate; scale randn, gate; rotation angle, gate; aniso randn,
  angle, gate, angle gate; translation randn [2, N], gate) whatever p, the multipliers or the
  outcomes, so the generator's state after a call depends only on N. (Bitwise agreement of the
  drawn values with EDM's global-RNG draws is not claimed.)
* **Images that received no geometric transform are not resampled** (EDM resamples the whole
  batch whenever any geometric multiplier is > 0, even at identity, which perturbs such images by
  float rounding of the filter bank, ~1e-6). Hence at p = 0 the output equals the input bit for
  bit and the labels are all zero. The padding is still computed over the whole batch as in EDM.
* The label vector always has the 9 entries of the ``--augment`` layout; a transform whose
  multiplier is 0 contributes zeros (EDM drops the entries of disabled transforms).
* The geometric part runs in float32 and is cast back to the input dtype.

Use: ``pipe = AugmentPipe(p=0.12)``; ``y, labels = pipe(images, generator)``. To force a
transform (tests, figures): ``pipe.apply(images, AugmentParams.make(n, rotate=math.pi / 2))``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional, Sequence, Tuple, Union

import torch

from sims.data.augment_warp import SYM6, SYM6_OFFSET, _diag, _margins, _rot, warp

__all__ = ["AUGMENT_DIM", "LABEL_NAMES", "SYM6", "SYM6_OFFSET", "AugmentParams", "AugmentPipe", "warp"]

AUGMENT_DIM = 9
LABEL_NAMES = ("xflip", "yflip", "scale", "rotate_cos_m1", "rotate_sin", "aniso_cos", "aniso_sin",
               "translate_x", "translate_y")

Values = Union[float, int, bool, Sequence[float], torch.Tensor]


def _prob(multiplier: float, p: float) -> float:
    return min(max(multiplier * p, 0.0), 1.0)


@dataclass(frozen=True)
class AugmentParams:
    """Per-image augmentation parameters (all float32, on one device; N images).

    Attributes (0 everywhere = no transform):
        xflip: [N] in {0, 1}; 1 = mirror left-right.
        yflip: [N] in {0, 1}; 1 = mirror top-bottom.
        scale: [N] w_s (standard-normal units); magnification s = 2^(scale_std·w_s).
        rotate: [N] θ in radians; content turns counter-clockwise (as displayed) by θ.
        aniso: [N] w_a; stretch s_a = 2^(aniso_std·w_a) along (cos r, −sin r) (x right, y down),
            1/s_a across.
        aniso_angle: [N] r in radians (irrelevant when aniso = 0).
        translate: [N, 2] (w_x, w_y); shift (w_x·W, w_y·H)·translate_frac_std pixels right/down.
    """

    xflip: torch.Tensor
    yflip: torch.Tensor
    scale: torch.Tensor
    rotate: torch.Tensor
    aniso: torch.Tensor
    aniso_angle: torch.Tensor
    translate: torch.Tensor

    @classmethod
    def make(cls, n: int, device: Optional[Union[str, torch.device]] = None, *, xflip: Values = 0,
             yflip: Values = 0, scale: Values = 0.0, rotate: Values = 0.0, aniso: Values = 0.0,
             aniso_angle: Values = 0.0, translate: Values = (0.0, 0.0)) -> "AugmentParams":
        """Parameters given by hand: each value is a scalar (all images) or one value per image
        (``translate``: a pair for all images or an [N, 2] array). Units as in the class doc:
        e.g. a magnification s needs ``scale=log2(s)/pipe.scale_std``; a shift of k pixels in x
        needs ``translate=(k / (W·pipe.translate_frac_std), 0)``."""

        def vec(v: Values, shape) -> torch.Tensor:
            t = torch.as_tensor(v, dtype=torch.float32, device=device)
            return t.expand(shape).clone() if t.shape != torch.Size(shape) else t.clone()

        return cls(vec(xflip, (n,)), vec(yflip, (n,)), vec(scale, (n,)), vec(rotate, (n,)), vec(aniso, (n,)),
                   vec(aniso_angle, (n,)), vec(translate, (n, 2)))

    @property
    def num(self) -> int:
        return int(self.xflip.shape[0])

    def labels(self) -> torch.Tensor:
        """EDM's 9 augmentation labels, [N, 9] float32: [xflip, yflip, w_s, cos θ − 1, sin θ,
        w_a·cos r, w_a·sin r, w_x, w_y] (see the module docstring)."""
        cols = [self.xflip, self.yflip, self.scale, torch.cos(self.rotate) - 1, torch.sin(self.rotate),
                self.aniso * torch.cos(self.aniso_angle), self.aniso * torch.sin(self.aniso_angle),
                self.translate[:, 0], self.translate[:, 1]]
        return torch.stack(cols, dim=1).to(torch.float32)

    def geometric_mask(self) -> torch.Tensor:
        """[N] bool: images with a non-identity scale, rotation, anisotropy or translation."""
        return ((self.scale != 0) | (self.rotate != 0) | (self.aniso != 0) | (self.translate != 0).any(dim=1))

    def select(self, index: torch.Tensor) -> "AugmentParams":
        """The parameters of the images ``index`` (a LongTensor or bool mask)."""
        return AugmentParams(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


class AugmentPipe:
    """EDM's ``--augment p`` pipeline: random flips + scale/rotation/anisotropy/translation, with labels.

    Args:
        p: overall probability multiplier (EDM: 0.12 CIFAR-10, 0.15 FFHQ/AFHQv2-64; 0 disables).
        xflip, yflip, scale, rotate_frac, aniso, translate_frac: per-transform multipliers; each
            transform is considered with probability clip(multiplier·p, 0, 1) (flips then flip with
            probability ½). Defaults: EDM's ``--augment`` values 1e8, 1, 1, 1, 1, 1.
        scale_std: log2 standard deviation of the isotropic scale (0.2).
        rotate_frac_max: rotation range as a fraction of a half turn each way (1: full circle).
        aniso_std: log2 standard deviation of the anisotropic scale (0.2).
        aniso_rotate_prob: probability that the stretch axis is a random angle rather than x (0.5).
        translate_frac_std: translation standard deviation as a fraction of the image size (0.125).

    ``pipe(images, generator)``: images [N, C, H, W] float (nominally in [-1, 1], any C), generator
    a ``torch.Generator`` on ``images.device``. Returns (augmented [N, C, H, W] in the input dtype,
    augment_labels [N, 9] float32 on the same device). All randomness comes from ``generator``.
    """

    augment_dim = AUGMENT_DIM

    def __init__(self, p: float = 0.12, *, xflip: float = 1e8, yflip: float = 1.0, scale: float = 1.0,
                 rotate_frac: float = 1.0, aniso: float = 1.0, translate_frac: float = 1.0,
                 scale_std: float = 0.2, rotate_frac_max: float = 1.0, aniso_std: float = 0.2,
                 aniso_rotate_prob: float = 0.5, translate_frac_std: float = 0.125):
        values = dict(p=p, xflip=xflip, yflip=yflip, scale=scale, rotate_frac=rotate_frac, aniso=aniso,
                      translate_frac=translate_frac, scale_std=scale_std, rotate_frac_max=rotate_frac_max,
                      aniso_std=aniso_std, aniso_rotate_prob=aniso_rotate_prob, translate_frac_std=translate_frac_std)
        for name, v in values.items():
            v = float(v)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"AugmentPipe {name} must be a finite number >= 0, got {v}")
            setattr(self, name, v)

    def __repr__(self) -> str:
        names = ("p", "xflip", "yflip", "scale", "rotate_frac", "aniso", "translate_frac", "scale_std",
                 "rotate_frac_max", "aniso_std", "aniso_rotate_prob", "translate_frac_std")
        return "AugmentPipe(" + ", ".join(f"{n}={getattr(self, n):g}" for n in names) + ")"

    # -- parameters ---------------------------------------------------------------------------------

    def sample(self, n: int, generator: torch.Generator) -> AugmentParams:
        """Draw parameters for n images from ``generator`` (on its device), EDM's distributions.

        The same tensors are drawn in the same order whatever p and the outcomes (see the module
        docstring), so the generator advances by an amount that depends on n only.
        """
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"AugmentPipe needs a torch.Generator, got {type(generator).__name__}")
        dev = generator.device
        kw = dict(generator=generator, device=dev)

        def rand(*shape):
            return torch.rand(*shape, dtype=torch.float32, **kw)

        def randn(*shape):
            return torch.randn(*shape, dtype=torch.float32, **kw)

        def flip(multiplier):
            w = torch.randint(2, (n,), **kw).to(torch.float32)
            return torch.where(rand(n) < _prob(multiplier, self.p), w, torch.zeros_like(w))

        def gated(w, multiplier):
            return torch.where(rand(n) < _prob(multiplier, self.p), w, torch.zeros_like(w))

        xflip = flip(self.xflip)
        yflip = flip(self.yflip)
        scale = gated(randn(n), self.scale)
        rotate = gated((rand(n) * 2 - 1) * (math.pi * self.rotate_frac_max), self.rotate_frac)
        aniso_w = randn(n)
        aniso_r = (rand(n) * 2 - 1) * math.pi
        aniso_w = torch.where(rand(n) < _prob(self.aniso, self.p), aniso_w, torch.zeros_like(aniso_w))
        aniso_r = torch.where(rand(n) < min(max(self.aniso_rotate_prob, 0.0), 1.0), aniso_r, torch.zeros_like(aniso_r))
        t = randn(2, n)
        t = torch.where(rand(1, n) < _prob(self.translate_frac, self.p), t, torch.zeros_like(t))
        return AugmentParams(xflip, yflip, scale, rotate, aniso_w, aniso_r, t.t().contiguous())

    def inverse_maps(self, params: AugmentParams, height: int, width: int) -> torch.Tensor:
        """[N, 2, 3] output → input maps G⁻¹ = S(1/s)·R(θ)·R(−r)·diag(1/s_a, s_a)·R(r)·T(−t) in
        centred pixel coordinates (see the module docstring)."""
        s = torch.exp2(params.scale * self.scale_std)
        sa = torch.exp2(params.aniso * self.aniso_std)
        r = params.aniso_angle
        lin = _diag(1 / s, 1 / s) @ _rot(params.rotate) @ _rot(-r) @ _diag(1 / sa, sa) @ _rot(r)
        t = params.translate * torch.tensor([width * self.translate_frac_std, height * self.translate_frac_std],
                                            dtype=torch.float32, device=params.translate.device)
        offset = -(lin @ t.unsqueeze(-1))  # G⁻¹ p = lin·(p − t)
        return torch.cat([lin, offset], dim=2)

    # -- application --------------------------------------------------------------------------------

    def apply(self, images: torch.Tensor, params: AugmentParams) -> Tuple[torch.Tensor, torch.Tensor]:
        """Apply given parameters (e.g. forced ones from :meth:`AugmentParams.make`).

        Args:
            images: [N, C, H, W] float.
            params: :class:`AugmentParams` for N images (moved to ``images.device``).
        Returns:
            (augmented [N, C, H, W] in ``images.dtype``, labels [N, 9] float32). Flips are applied
            first (exact), then the geometric transform, only to the images that have one.
        """
        if images.ndim != 4:
            raise ValueError(f"AugmentPipe expects images [N, C, H, W], got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"AugmentPipe expects float images in [-1, 1], got {images.dtype}")
        n, _, height, width = images.shape
        if params.num != n:
            raise ValueError(f"{params.num} augmentation parameter sets for {n} images")
        dev = images.device
        params = AugmentParams(**{f.name: getattr(params, f.name).to(device=dev, dtype=torch.float32)
                                  for f in fields(params)})
        labels = params.labels()
        out = torch.where((params.xflip != 0).view(n, 1, 1, 1), images.flip(3), images)
        out = torch.where((params.yflip != 0).view(n, 1, 1, 1), out.flip(2), out)
        idx = params.geometric_mask().nonzero().flatten()
        if idx.numel() > 0:
            g_inv = self.inverse_maps(params, height, width)
            pad = _margins(g_inv, height, width)  # over the whole batch, as EDM
            warped = warp(out.index_select(0, idx), g_inv.index_select(0, idx), pad)
            out = out.index_copy(0, idx, warped.to(out.dtype))
        return out, labels

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        """Augment a batch: ``apply(images, sample(N, generator))`` (see the class docstring)."""
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"AugmentPipe needs a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != images.device.type:
            raise ValueError(f"the generator is on {generator.device} but the images are on {images.device}; "
                             f"create it with torch.Generator(device=images.device)")
        return self.apply(images, self.sample(images.shape[0], generator))
