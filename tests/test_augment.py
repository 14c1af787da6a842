"""EDM's non-leaky augmentation (sims.data.augment): forced transforms, labels, rates, determinism."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from sims.data.augment import AUGMENT_DIM, SYM6, SYM6_OFFSET, AugmentParams, AugmentPipe, warp

P_EDM = 0.12


def gen(seed, device="cpu"):
    return torch.Generator(device=device).manual_seed(seed)


def noise_images(n, c=3, h=16, w=16, seed=0):
    return torch.rand(n, c, h, w, generator=gen(seed)) * 2 - 1


def centred_grid(h, w):
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32) - (h - 1) / 2,
                            torch.arange(w, dtype=torch.float32) - (w - 1) / 2, indexing="ij")
    return xs, ys


def ramp(xs, ys, a=0.02, b=-0.03, c=0.1):
    return a * xs + b * ys + c


def ramp_expectation(pipe, params, h, w, i=0, coeffs=(0.02, -0.03, 0.1)):
    """Analytic result for a linear ramp: f(G⁻¹(p + δ) − δ) (δ: the sym6 centre offset), and the
    mask of output pixels whose source lies safely inside the image (away from reflect padding)."""
    xs, ys = centred_grid(h, w)
    g = pipe.inverse_maps(params, h, w)[i]
    p = torch.stack([xs + SYM6_OFFSET, ys + SYM6_OFFSET], -1)
    q = p @ g[:, :2].T + g[:, 2] - SYM6_OFFSET
    border = 4 + 2 * torch.linalg.matrix_norm(g[:, :2], ord=2).item()
    ok = (q[..., 0].abs() < (w - 1) / 2 - border) & (q[..., 1].abs() < (h - 1) / 2 - border)
    return ramp(q[..., 0], q[..., 1], *coeffs), ok


def expected_labels(**nonzero):
    lab = torch.zeros(AUGMENT_DIM)
    names = ["xflip", "yflip", "scale", "rotate_cos_m1", "rotate_sin", "aniso_cos", "aniso_sin", "translate_x",
             "translate_y"]
    for k, v in nonzero.items():
        lab[names.index(k)] = v
    return lab


# --- the filter ---------------------------------------------------------------------------------

def test_sym6_is_orthonormal_and_offset():
    h = torch.tensor(SYM6, dtype=torch.float64)
    assert h.numel() == 12
    assert abs(h.sum().item() - math.sqrt(2)) < 1e-12
    for m in range(6):
        assert abs((h[: 12 - 2 * m] * h[2 * m:]).sum().item() - (1.0 if m == 0 else 0.0)) < 1e-11
    centroid = (torch.arange(12, dtype=torch.float64) * h).sum().item() / h.sum().item()
    assert abs(centroid - 5.0983) < 1e-3 and abs(SYM6_OFFSET - (centroid - 5) / 2) < 1e-12


def test_identity_warp_is_perfect_reconstruction():
    x = noise_images(3, h=12, w=10)
    eye = torch.tensor([[1.0, 0, 0], [0, 1, 0]]).expand(3, 2, 3)
    assert (warp(x, eye) - x).abs().max() < 1e-5


# --- forced transforms: images and labels ----------------------------------------------------------

def test_forced_xflip_and_yflip_are_bit_exact():
    pipe = AugmentPipe(P_EDM)
    x = noise_images(3)
    out, lab = pipe.apply(x, AugmentParams.make(3, xflip=[1, 0, 1], yflip=[0, 1, 1]))
    assert torch.equal(out[0], x[0].flip(-1))
    assert torch.equal(out[1], x[1].flip(-2))
    assert torch.equal(out[2], x[2].flip(-1).flip(-2))
    assert torch.equal(lab[0], expected_labels(xflip=1))
    assert torch.equal(lab[1], expected_labels(yflip=1))
    assert torch.equal(lab[2], expected_labels(xflip=1, yflip=1))
    assert lab.dtype == torch.float32 and lab.shape == (3, AUGMENT_DIM)


def test_forced_integer_translation_is_exact_including_reflected_border():
    pipe = AugmentPipe(P_EDM)
    h = w = 16
    x = noise_images(2, h=h, w=w)
    wx = 1 / (w * pipe.translate_frac_std)   # +1 pixel right
    wy = -2 / (h * pipe.translate_frac_std)  # 2 pixels up
    out, lab = pipe.apply(x, AugmentParams.make(2, translate=(wx, wy)))
    ref = F.pad(x, [1, 0, 0, 2], mode="reflect")[:, :, 2:, :w]  # out[y, x] = x[y + 2, x − 1], mirrored
    assert (out - ref).abs().max() < 1e-5
    assert torch.allclose(lab[0], expected_labels(translate_x=0.5, translate_y=-1.0))


def test_forced_rotation_labels_and_images():
    pipe = AugmentPipe(P_EDM)
    h = w = 32
    x = noise_images(1, h=h, w=w)
    for k, cos_m1, sin in [(1, -1.0, 1.0), (-1, -1.0, -1.0), (2, -2.0, 0.0)]:
        out, lab = pipe.apply(x, AugmentParams.make(1, rotate=k * math.pi / 2))
        assert torch.allclose(lab[0], expected_labels(rotate_cos_m1=cos_m1, rotate_sin=sin), atol=1e-6)
        # Approximate, not exact: sym6 is asymmetric (≈0.1 px offset + mirroring error). Pin the size.
        err = (out - torch.rot90(x, k, dims=(2, 3))).abs()
        assert 0.02 < err.mean() < 0.15 and err.max() < 0.6
    # Smooth content: rot90 to within ≈0.1 px × gradient.
    xs, ys = centred_grid(h, w)
    smooth = (torch.cos(2 * math.pi * xs / 16 + 0.3) * torch.sin(2 * math.pi * ys / 16 + 1.1))[None, None]
    out, _ = pipe.apply(smooth, AugmentParams.make(1, rotate=math.pi / 2))
    assert (out - torch.rot90(smooth, 1, dims=(2, 3))).abs().max() < 0.05
    # Linear ramp: exactly f(R(p + δ) − δ), whole image (a 90° turn maps the square onto itself).
    for theta in (math.pi / 2, 0.5):
        params = AugmentParams.make(1, rotate=theta)
        out, _ = pipe.apply(ramp(xs, ys)[None, None], params)
        want, ok = ramp_expectation(pipe, params, h, w)
        assert ok.float().mean() > 0.2 and (out[0, 0] - want)[ok].abs().max() < 1e-4
    # 90°: the ramp's content really turned counter-clockwise (as displayed): column x → row −x.
    out, _ = pipe.apply(xs[None, None].clone(), AugmentParams.make(1, rotate=math.pi / 2))
    assert (out[0, 0] - (-ys)).abs()[4:-4, 4:-4].max() < 0.15  # within the 0.1-px offset


def test_forced_isotropic_scale():
    pipe = AugmentPipe(P_EDM)
    h = w = 32
    xs, ys = centred_grid(h, w)
    img = ramp(xs, ys)[None, None]
    for s in (2.0, 0.5):
        w_s = math.log2(s) / pipe.scale_std  # ±5
        params = AugmentParams.make(1, scale=w_s)
        out, lab = pipe.apply(img, params)
        assert torch.allclose(lab[0], expected_labels(scale=w_s))
        want, ok = ramp_expectation(pipe, params, h, w)
        # s = 2: the source is the central half, so the whole image is exact; s = 1/2: the interior.
        assert ok.all() if s == 2.0 else ok.sum() >= 36
        assert (out[0, 0] - want)[ok].abs().max() < 1e-4
        # The same without the δ correction: out(p) ≈ f(p / s) to within δ·|1 − 1/s|·|∇f|.
        plain = ramp(xs / s, ys / s)
        assert (out[0, 0] - plain)[ok].abs().max() < 0.06 * SYM6_OFFSET * abs(1 - 1 / s) + 1e-4


def test_forced_anisotropic_scale():
    pipe = AugmentPipe(P_EDM)
    h = w = 32
    xs, ys = centred_grid(h, w)
    img = ramp(xs, ys)[None, None]
    w_a = math.log2(2.0) / pipe.aniso_std  # stretch ×2 along the axis, ×1/2 across
    cases = [(0.0, w_a, 0.0), (math.pi / 2, 0.0, w_a), (0.7, w_a * math.cos(0.7), w_a * math.sin(0.7))]
    for r, lab_cos, lab_sin in cases:
        params = AugmentParams.make(1, aniso=w_a, aniso_angle=r)
        out, lab = pipe.apply(img, params)
        assert torch.allclose(lab[0], expected_labels(aniso_cos=lab_cos, aniso_sin=lab_sin), atol=1e-6)
        want, ok = ramp_expectation(pipe, params, h, w)
        assert ok.sum() >= 100 and (out[0, 0] - want)[ok].abs().max() < 1e-4
    # r = 0 by hand: out(x, y) ≈ f(x / 2, 2y); r = π/2: f(2x, y / 2).
    for r, sx, sy in [(0.0, 0.5, 2.0), (math.pi / 2, 2.0, 0.5)]:
        out, _ = pipe.apply(img, AugmentParams.make(1, aniso=w_a, aniso_angle=r))
        _, ok = ramp_expectation(pipe, AugmentParams.make(1, aniso=w_a, aniso_angle=r), h, w)
        assert (out[0, 0] - ramp(xs * sx, ys * sy))[ok].abs().max() < 0.01


def test_random_composites_follow_the_ramp_formula():
    pipe = AugmentPipe(p=1.0)
    h = w = 32
    xs, ys = centred_grid(h, w)
    params = pipe.sample(12, gen(3))
    params = dataclasses.replace(params, xflip=torch.zeros(12), yflip=torch.zeros(12))
    out, _ = pipe.apply(ramp(xs, ys)[None, None].expand(12, 1, h, w), params)
    checked = 0
    for i in range(12):
        want, ok = ramp_expectation(pipe, params, h, w, i)
        if ok.sum() >= 16:
            checked += 1
            assert (out[i, 0] - want)[ok].abs().max() < 2e-4
    assert checked >= 6


# --- p = 0, rates, pairing, determinism -------------------------------------------------------------

def test_p0_is_bit_identical_and_labels_zero():
    x = noise_images(16, h=8, w=8)
    g0, g1 = gen(5), gen(5)
    out, lab = AugmentPipe(0.0)(x, g0)
    assert torch.equal(out, x) and torch.count_nonzero(lab) == 0 and lab.shape == (16, AUGMENT_DIM)
    # The generator advances by the same amount at any p (it depends on N only).
    AugmentPipe(0.5)(x, g1)
    assert torch.equal(g0.get_state(), g1.get_state())


def test_rates_at_p012_within_3_sigma():
    n = 10_000
    pipe = AugmentPipe(P_EDM)
    _, lab = pipe(torch.zeros(n, 1, 8, 8), gen(11))
    fired = lab != 0
    rates = [0.5, P_EDM / 2, P_EDM, P_EDM, P_EDM, P_EDM, P_EDM * pipe.aniso_rotate_prob, P_EDM, P_EDM]
    for j, q in enumerate(rates):
        k = fired[:, j].sum().item()
        assert abs(k - n * q) <= 3 * math.sqrt(n * q * (1 - q)), (j, k, n * q)
    assert torch.equal(fired[:, 7], fired[:, 8])  # translation fires as a pair
    assert not (fired[:, 6] & ~fired[:, 5]).any()  # the aniso angle only shows when aniso fired
    assert ((lab[:, 0] == 0) | (lab[:, 0] == 1)).all() and ((lab[:, 1] == 0) | (lab[:, 1] == 1)).all()
    # Distributions of the fired values (loose, ~5σ): N(0, 1) draws, uniform angle on the circle.
    for j in (2, 7, 8):
        v = lab[fired[:, j], j]
        assert abs(v.mean()) < 5 / math.sqrt(v.numel()) and abs(v.std() - 1) < 0.1
    theta = torch.atan2(lab[fired[:, 4], 4], lab[fired[:, 4], 3] + 1)
    assert abs(theta.mean()) < 5 * math.pi / math.sqrt(3 * theta.numel()) and theta.abs().max() <= math.pi
    assert abs(theta.abs().mean() - math.pi / 2) < 0.15
    w_a = torch.hypot(lab[:, 5], lab[:, 6])[fired[:, 5]]
    assert abs((w_a ** 2).mean() - 1) < 0.15


def decode(labels):
    """Parameters from labels (valid when aniso is disabled: the aniso label is not invertible)."""
    n = labels.shape[0]
    return AugmentParams(labels[:, 0], labels[:, 1], labels[:, 2], torch.atan2(labels[:, 4], labels[:, 3] + 1),
                         torch.zeros(n), torch.zeros(n), labels[:, 7:9].contiguous())


def test_labels_stay_paired_with_their_images():
    pipe = AugmentPipe(p=1.0, aniso=0.0)
    n = 8
    x = noise_images(n, c=3, h=16, w=16, seed=1)
    out, lab = pipe(x, gen(21))
    assert torch.count_nonzero(lab[:, 5:7]) == 0
    params = decode(lab)
    assert torch.allclose(params.labels(), lab, atol=1e-6)
    for i in range(n):
        single, single_lab = pipe.apply(x[i:i + 1], params.select(torch.tensor([i])))
        assert torch.allclose(single_lab[0], lab[i], atol=1e-6)
        # Away from the 3-pixel border the result does not depend on the batch-wide padding.
        assert (single[0] - out[i])[:, 3:-3, 3:-3].abs().max() < 1e-4, i
    # Permuting the batch together with its parameters permutes the output, exactly.
    full = AugmentPipe(p=1.0)
    params = full.sample(n, gen(22))
    out, lab = full.apply(x, params)
    perm = torch.randperm(n, generator=gen(23))
    out_p, lab_p = full.apply(x[perm], params.select(perm))
    assert torch.allclose(out_p, out[perm], atol=1e-6) and torch.equal(lab_p, lab[perm])


def test_same_seed_same_output_different_seed_different():
    pipe = AugmentPipe(p=0.5)
    x = noise_images(8, h=8, w=8)
    a, la = pipe(x, gen(7))
    b, lb = pipe(x, gen(7))
    c, lc = pipe(x, gen(8))
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(la, lc) and not torch.equal(a, c)
    # __call__ is apply(sample(...)).
    d, ld = pipe.apply(x, pipe.sample(8, gen(7)))
    assert torch.equal(a, d) and torch.equal(la, ld)


def test_dtypes_shapes_and_errors():
    pipe = AugmentPipe(p=1.0)
    for dtype in (torch.float64, torch.bfloat16):
        x = noise_images(4, c=1, h=12, w=8).to(dtype)
        out, lab = pipe(x, gen(1))
        assert out.dtype == dtype and out.shape == x.shape and lab.dtype == torch.float32
    with pytest.raises(TypeError):
        pipe(noise_images(2), None)
    with pytest.raises(ValueError):
        pipe(torch.zeros(3, 8, 8), gen(0))
    with pytest.raises(TypeError):
        pipe(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), gen(0))
    with pytest.raises(ValueError):
        AugmentPipe(p=-0.1)
    empty, lab = pipe(torch.zeros(0, 3, 8, 8), gen(0))
    assert empty.shape == (0, 3, 8, 8) and lab.shape == (0, AUGMENT_DIM)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    pipe = AugmentPipe(p=1.0)
    x = noise_images(6, h=16, w=16)
    params = pipe.sample(6, gen(4))
    cpu, lab_cpu = pipe.apply(x, params)
    cuda, lab_cuda = pipe.apply(x.cuda(), params)
    assert (cuda.cpu() - cpu).abs().max() < 1e-4 and torch.allclose(lab_cuda.cpu(), lab_cpu, atol=1e-6)
    a, la = pipe(x.cuda(), gen(9, "cuda"))
    b, lb = pipe(x.cuda(), gen(9, "cuda"))
    assert a.is_cuda and la.is_cuda and torch.equal(a, b) and torch.equal(la, lb)
    with pytest.raises(ValueError):
        pipe(x.cuda(), gen(9))
    out0, lab0 = AugmentPipe(0.0)(x.cuda(), gen(9, "cuda"))
    assert torch.equal(out0.cpu(), x) and torch.count_nonzero(lab0) == 0
