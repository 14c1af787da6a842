"""Backbones F(x_in, c_noise, class_labels, augment_labels): EDM's exact DDPM++ (SongUNet) and ADM
(DhariwalUNet) — parameter counts, EDM's state_dict names, EDM's init, layout oracles written from
EDM_FORMAT §3's formulas, float32 attention under autocast — plus shapes, conditioning, errors,
gradients and the MLP / diffusers adapters."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sims.config import NetworkConfig
from sims.networks import ADM, DDPMpp, MLPBackbone, build_backbone, count_parameters
from sims.networks.layers import AttentionOp, PositionalEmbedding, UNetBlock, edm_num_groups, group_norm_groups

FIXTURES = Path(__file__).parent / "fixtures"
TINY = dict(arch="ddpmpp", model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)
TINY_ADM = dict(arch="adm", model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
                dropout=0.0, channels_per_head=16)
DIGITS = dict(arch="ddpmpp", model_channels=32, channel_mult=[1, 2], num_blocks=2, attn_resolutions=[4], dropout=0.0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _net(label_dim=0, base=TINY, **over):
    cfg = NetworkConfig(**{**base, **over})
    torch.manual_seed(0)
    return build_backbone(cfg, img_resolution=8, img_channels=1, label_dim=label_dim)


def _randomize(net, scale=0.05, seed=1):
    """Add N(0, scale²) to every parameter so no layer is (nearly) zero."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn_like(p))
    return net


@pytest.fixture(scope="module")
def cifar10_net():
    """EDM's CIFAR-10 DDPM++ (edm-cifar10-32x32-uncond-vp: augment_dim 9), freshly initialised."""
    torch.manual_seed(0)
    return build_backbone(NetworkConfig(augment_dim=9), img_resolution=32, img_channels=3)


# ------------------------------------------------------------------------------------------------
# Exactly EDM's networks: sizes, names, init
# ------------------------------------------------------------------------------------------------

def test_edm_parameter_counts(cifar10_net):
    """EDM_FORMAT §2.3-2.5: 55,733,891 (CIFAR-10 DDPM++), 61,805,571 (FFHQ/AFHQv2-64), 295,899,267 (ADM IN-64)."""
    assert isinstance(cifar10_net, DDPMpp)
    assert count_parameters(cifar10_net) == 55_733_891
    with torch.device("meta"):
        cond = DDPMpp(32, 3, label_dim=10, augment_dim=9)
        ffhq = build_backbone(NetworkConfig(channel_mult=[1, 2, 2, 2], augment_dim=9, dropout=0.05), 64, 3)
        adm = build_backbone(NetworkConfig(arch="adm", model_channels=192, channel_mult=[1, 2, 3, 4], num_blocks=3,
                                           attn_resolutions=[32, 16, 8], dropout=0.10), 64, 3, label_dim=1000)
        film = DDPMpp(32, 3, augment_dim=9, adaptive_scale=True)
    assert count_parameters(cond) == 55_735_299  # + map_label.weight [128, 10] + map_label.bias [128]
    assert count_parameters(ffhq) == 61_805_571 and len(ffhq.state_dict()) == 541
    assert isinstance(adm, ADM) and count_parameters(adm) == 295_899_267 and len(adm.state_dict()) == 541
    assert tuple(adm.map_label.weight.shape) == (768, 1000) and adm.map_label.bias is None
    # FiLM option: every affine doubles (33 blocks x 256 x (512 + 1)).
    assert count_parameters(film) == 55_733_891 + 33 * 256 * 513


def _expected_cifar10_names():
    rows = []
    for line in (FIXTURES / "edm_cifar10_names.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, shape = line.split(" ", 1)
            rows.append((name, [int(s) for s in shape.strip("[]").split(",")]))
    return rows


def test_cifar10_state_dict_is_edms(cifar10_net):
    """Names, shapes and order = EDM's ``ema`` tensors (Appendix A) minus ``model.`` and the 8 resample_filter buffers."""
    expected = _expected_cifar10_names()
    assert len(expected) == 417
    got = [(k, list(v.shape)) for k, v in cifar10_net.state_dict().items()]
    assert got == expected
    assert not list(cifar10_net.buffers())  # no resample_filter / freqs buffers
    assert list(cifar10_net.enc)[:3] == ["32x32_conv", "32x32_block0", "32x32_block1"]
    assert list(cifar10_net.dec)[:2] == ["8x8_in0", "8x8_in1"] and list(cifar10_net.dec)[-2:] == [
        "32x32_aux_norm", "32x32_aux_conv"]


def test_adm_names_follow_edm():
    """DhariwalUNet's layout (EDM_FORMAT §2.5): attention in every block at attention resolutions, none in in1."""
    with torch.device("meta"):
        net = ADM(64, 3, label_dim=1000)
    names = list(net.state_dict())
    assert names[:5] == ["map_layer0.weight", "map_layer0.bias", "map_layer1.weight", "map_layer1.bias",
                         "map_label.weight"]
    assert names[-4:] == ["out_norm.weight", "out_norm.bias", "out_conv.weight", "out_conv.bias"]
    assert list(net.enc)[0] == "64x64_conv" and net.enc["64x64_conv"].out_channels == 192
    heads = {k: b.num_heads for k, b in net.dec.items()}
    assert heads["8x8_in0"] == 12 and heads["8x8_in1"] == 0
    assert all(heads[f"16x16_block{i}"] == 9 for i in range(4)) and heads["16x16_up"] == 0
    assert all(heads[f"32x32_block{i}"] == 6 for i in range(4)) and heads["64x64_block0"] == 0
    assert net.enc["32x32_down"].skip is not None and not list(net.enc["32x32_down"].skip.parameters())
    assert tuple(net.dec["16x16_block0"].norm0.weight.shape) == (1344,)
    assert tuple(net.enc["8x8_block0"].affine.weight.shape) == (1536, 768)  # adaptive scale: 2·C_out


def _check_std(name, t, std, bound=None, rel=0.02):
    """Sample std within ``rel`` (2%) of ``std``; loosened to 4 standard errors of a sample std for
    tensors under ~5000 elements (CIFAR-10: only map_augment [128, 9], measured 1.3% off)."""
    n = t.numel()
    tol = max(rel, 4 * math.sqrt(0.5 / n))
    got = t.double().std().item()
    assert abs(got / std - 1) < tol, f"{name}: std {got:.4g}, expected {std:.4g} (tol {tol:.3f})"
    if bound is not None:  # uniform init: |w| <= bound, and the extremes come close to it
        assert t.abs().max().item() <= bound * (1 + 1e-6), name
        assert t.abs().max().item() > 0.9 * bound, name


def _fans(w):
    k2 = w.shape[2] * w.shape[3] if w.ndim == 4 else 1
    return w.shape[1] * k2, w.shape[0] * k2


def test_cifar10_init_is_edms(cifar10_net):
    """EDM_FORMAT §3 'Init' for SongUNet: xavier_uniform weights, zero biases; conv1/proj/aux_conv x 1e-5,
    qkv x sqrt(0.2); GroupNorm weight 1, bias 0."""
    seen = {"small": 0, "attn": 0, "plain": 0, "norm": 0}
    for name, p in cifar10_net.named_parameters():
        module = name.rsplit(".", 2)[-2]
        if "norm" in module:
            expected = torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p)
            assert torch.equal(p, expected), name
            seen["norm"] += 1
            continue
        if name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
            continue
        fan_in, fan_out = _fans(p)
        bound = math.sqrt(6 / (fan_in + fan_out))
        small = module in ("conv1", "proj") or module.endswith("_aux_conv")
        kind = "small" if small else "attn" if module == "qkv" else "plain"
        factor = {"small": 1e-5, "attn": math.sqrt(0.2), "plain": 1.0}[kind]
        _check_std(name, p, factor * bound / math.sqrt(3), factor * bound)
        seen[kind] += 1
    # 33 blocks' conv1 + 6 attention proj + aux_conv; 6 qkv; 73 GroupNorms (146 tensors); 135 other biases.
    assert seen == {"small": 33 + 6 + 1, "attn": 6, "norm": 146, "plain": 417 - 146 - 135 - 40 - 6}


def test_adm_init_is_edms():
    """EDM_FORMAT §3 'Init' for DhariwalUNet: kaiming_uniform x sqrt(1/3) weights and biases (bound 1/sqrt(fan_in)),
    exact zeros for conv1/proj/out_conv/map_augment, map_label kaiming_normal x sqrt(label_dim) = N(0, 1)."""
    torch.manual_seed(0)
    net = ADM(16, 3, label_dim=10, augment_dim=9, model_channels=64, channel_mult=[1, 2], num_blocks=1,
              attn_resolutions=[8], dropout=0.0)
    for name, p in net.named_parameters():
        module = name.rsplit(".", 2)[-2]
        if "norm" in module:
            expected = torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p)
            assert torch.equal(p, expected), name
        elif module in ("conv1", "proj", "out_conv", "map_augment"):
            assert torch.count_nonzero(p) == 0, name
        elif module == "map_label":
            _check_std(name, p, 1.0, rel=0.05)
        else:
            w = dict(net.named_parameters())[name.rsplit(".", 1)[0] + ".weight"]
            fan_in = _fans(w)[0]
            bound = 1 / math.sqrt(fan_in)  # sqrt(3 / fan_in) * sqrt(1/3)
            if name.endswith("weight"):
                _check_std(name, p, bound / math.sqrt(3), bound)
            else:
                assert p.abs().max() <= bound * (1 + 1e-6) and torch.count_nonzero(p) == p.numel(), name
    x = torch.randn(2, 3, 16, 16)
    assert torch.count_nonzero(net.eval()(x, torch.zeros(2), torch.tensor([1, 2]))) == 0  # out_conv = 0


# ------------------------------------------------------------------------------------------------
# Layout oracles written from EDM_FORMAT §3 (reference code of the test, not the project's)
# ------------------------------------------------------------------------------------------------

def _ref_group_norm(x, weight, bias, eps):
    c = x.shape[1]
    g = min(32, c // 4)
    xg = x.reshape(x.shape[0], g, -1)
    xg = (xg - xg.mean(-1, keepdim=True)) / (xg.var(-1, unbiased=False, keepdim=True) + eps).sqrt()
    return xg.reshape(x.shape) * weight[None, :, None, None] + bias[None, :, None, None]


def _ref_resample(x, up, down):
    if up:  # depthwise transposed conv with the all-ones 2x2 filter, stride 2
        return x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    if down:  # depthwise conv with the 0.25 2x2 filter, stride 2
        n, c, h, w = x.shape
        return x.reshape(n, c, h // 2, 2, w // 2, 2).mean(dim=(3, 5))
    return x


def _ref_attention(qkv, heads, layout="edm"):
    """EDM: view qkv [N, 3C, H, W] as [N·heads, d, 3, HW] (channel o = h·3d + 3c + j)."""
    n, c3, h, w = qkv.shape
    c = c3 // 3
    d = c // heads
    if layout == "edm":
        q, k, v = qkv.reshape(n * heads, d, 3, h * w).unbind(2)
    else:  # blocked [q | k | v]: what EDM does NOT do
        q, k, v = (t.reshape(n * heads, d, h * w) for t in qkv.reshape(n, 3, c, h * w).unbind(1))
    wts = torch.einsum("nci,ncj->nij", q, k / math.sqrt(d)).softmax(dim=2)
    return torch.einsum("nij,ncj->nci", wts, v).reshape(n, c, h, w)


def _ref_block(b, x, emb, eps, layout="edm"):
    P = dict(b.named_parameters())
    up, down = b.conv0.up, b.conv0.down
    h = F.conv2d(_ref_resample(F.silu(_ref_group_norm(x, P["norm0.weight"], P["norm0.bias"], eps)), up, down),
                 P["conv0.weight"], P["conv0.bias"], padding=1)
    p = (emb @ P["affine.weight"].t() + P["affine.bias"])[:, :, None, None]
    if b.adaptive_scale:
        scale, shift = p[:, : h.shape[1]], p[:, h.shape[1]:]
        h = F.silu(shift + _ref_group_norm(h, P["norm1.weight"], P["norm1.bias"], eps) * (scale + 1))
    else:
        h = F.silu(_ref_group_norm(h + p, P["norm1.weight"], P["norm1.bias"], eps))
    h = F.conv2d(h, P["conv1.weight"], P["conv1.bias"], padding=1)
    skip = _ref_resample(x, up, down)
    if "skip.weight" in P:
        skip = F.conv2d(skip, P["skip.weight"], P["skip.bias"])
    x = (h + skip) * b.skip_scale
    if b.num_heads:
        qkv = F.conv2d(_ref_group_norm(x, P["norm2.weight"], P["norm2.bias"], eps), P["qkv.weight"], P["qkv.bias"])
        a = _ref_attention(qkv, b.num_heads, layout)
        x = (F.conv2d(a, P["proj.weight"], P["proj.bias"]) + x) * b.skip_scale
    return x


@pytest.mark.parametrize("style", ["ddpmpp", "ddpmpp_film", "adm"])
def test_unet_block_matches_reference(style):
    """Whole UNetBlock vs §3's formulas (GroupNorm min(32, C/4), resample, additive/FiLM, interleaved qkv)."""
    torch.manual_seed(0)
    if style == "adm":  # same-width up block: parameter-free skip; 2 heads of 32
        kw = dict(up=True, channels_per_head=32, skip_scale=1.0, eps=1e-5, resample_proj=False, adaptive_scale=True)
        cin, cout, eps = 64, 64, 1e-5
    else:  # width-changing down block with a 1x1 resample skip; 2 heads to exercise the head split
        kw = dict(down=True, num_heads=2, skip_scale=math.sqrt(0.5), eps=1e-6, resample_proj=True,
                  adaptive_scale=style == "ddpmpp_film")
        cin, cout, eps = 32, 64, 1e-6
    b = _randomize(UNetBlock(cin, cout, 16, attention=True, **kw), scale=0.2).double().eval()
    x, emb = torch.randn(2, cin, 8, 8, dtype=torch.float64), torch.randn(2, 16, dtype=torch.float64)
    with torch.no_grad():
        got = b(x, emb)
        ref = _ref_block(b, x, emb, eps)
        blocked = _ref_block(b, x, emb, eps, layout="blocked")
    assert got.shape == (2, cout, 16 if style == "adm" else 4, 16 if style == "adm" else 4)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    assert (got - blocked).abs().max() > 1e-3  # the oracle can tell EDM's qkv layout from the blocked one


def test_positional_embedding_matches_reference():
    """§3: freqs_i = (1/10000)^(i/(half-1)) (SongUNet, output [sin, cos]) or ^(i/half) (Dhariwal, [cos, sin]),
    computed in float32 — at VP-range c_noise too, where float64 frequencies would differ by ~1e-4."""
    c = torch.tensor([-1.554, 0.0, 0.5, 1.096, 258.7013, 932.58])
    for endpoint, flip in [(True, True), (False, False)]:
        half = 64
        e = torch.arange(half, dtype=torch.float32) / (half - 1 if endpoint else half)
        freqs = torch.pow(torch.tensor(1e-4, dtype=torch.float32), e)
        arg = c[:, None] * freqs[None, :]
        ref = torch.cat([arg.sin(), arg.cos()] if flip else [arg.cos(), arg.sin()], dim=1)
        got = PositionalEmbedding(2 * half, endpoint=endpoint, flip=flip)(c)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
        f64 = ((1 / 10000) ** (torch.arange(half, dtype=torch.float64) / (half - 1 if endpoint else half))).float()
        assert (c[-1] * f64 - arg[-1]).abs().max() > 1e-5  # why float32 matters
    # The networks' map_noise: DDPM++ swaps to [sin, cos], ADM does not.
    assert DDPMpp(8, 1, model_channels=16, channel_mult=[1], num_blocks=1, attn_resolutions=[]).map_noise.flip
    assert not ADM(8, 1, model_channels=32, channel_mult=[1], num_blocks=1, attn_resolutions=[]).map_noise.flip
    emb = PositionalEmbedding(8, endpoint=True, flip=True)(torch.tensor([0.0]))
    torch.testing.assert_close(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))  # sin 0, cos 0


def _ref_embedding_ddpmpp(net, c, onehot, aug):
    emb = net.map_noise(c) + onehot * math.sqrt(net.label_dim) @ net.map_label.weight.t() + net.map_label.bias
    emb = emb + aug @ net.map_augment.weight.t()
    emb = F.silu(emb @ net.map_layer0.weight.t() + net.map_layer0.bias)
    return F.silu(emb @ net.map_layer1.weight.t() + net.map_layer1.bias)


def _ref_embedding_adm(net, c, onehot, aug):
    emb = net.map_noise(c) + aug @ net.map_augment.weight.t()
    emb = F.silu(emb @ net.map_layer0.weight.t() + net.map_layer0.bias)
    emb = emb @ net.map_layer1.weight.t() + net.map_layer1.bias + onehot @ net.map_label.weight.t()
    return F.silu(emb)


@pytest.mark.parametrize("arch", ["ddpmpp", "adm"])
def test_embedding_order_matches_reference(arch):
    """§3 'Embedding MLP': SongUNet adds label (x sqrt(label_dim), with bias) and augment before map_layer0;
    DhariwalUNet adds the label (no bias, no scaling) after map_layer1."""
    net = _randomize(_net(label_dim=4, base=TINY if arch == "ddpmpp" else TINY_ADM, augment_dim=9), 0.1).eval()
    c, aug = torch.tensor([-1.2, 0.3, 2.0]), torch.randn(3, 9)
    onehot = F.one_hot(torch.tensor([0, 3, 1]), 4).float()
    ref = (_ref_embedding_ddpmpp if arch == "ddpmpp" else _ref_embedding_adm)(net, c, onehot, aug)
    with torch.no_grad():
        torch.testing.assert_close(net.embed(c, torch.tensor([0, 3, 1]), aug), ref, rtol=0, atol=1e-6)
        # None label = the zero label (the label bias is still added); None augment = no augment term.
        torch.testing.assert_close(net.embed(c, None, aug), net.embed(c, torch.zeros(3, 4), aug))
        torch.testing.assert_close(net.embed(c, onehot, None), net.embed(c, onehot, torch.zeros(3, 9)))
    if arch == "ddpmpp":
        assert net.map_label.bias is not None and net.map_augment.bias is None
    else:
        assert net.map_label.bias is None


@pytest.mark.parametrize("arch", ["ddpmpp", "adm"])
def test_attention_is_float32_under_bf16_autocast(arch):
    """§3: attention weights in float32 even when the backbone runs in reduced precision; embedding in float32."""
    net = _randomize(_net(label_dim=0, base=TINY if arch == "ddpmpp" else TINY_ADM)).eval()
    seen, emb_dtypes = [], []
    ops = [m for m in net.modules() if isinstance(m, AttentionOp)]
    assert ops
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((i[0].dtype, o.dtype))) for m in ops]
    hooks.append(net.map_layer1.register_forward_hook(lambda m, i, o: emb_dtypes.append(o.dtype)))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = net(torch.randn(2, 1, 8, 8), torch.zeros(2))
    for h in hooks:
        h.remove()
    assert len(seen) == len(ops)
    assert all(o == torch.float32 for _, o in seen)
    assert any(i == torch.bfloat16 for i, _ in seen)  # the op really ran inside autocast
    assert emb_dtypes == [torch.float32] and y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


def test_attention_op_matches_softmax_formula():
    q, k, v = (torch.randn(3, 8, 10) for _ in range(3))
    ref = torch.einsum("nij,ncj->nci", torch.einsum("nci,ncj->nij", q, k / math.sqrt(8)).softmax(2), v)
    torch.testing.assert_close(AttentionOp()(q, k, v), ref, rtol=0, atol=1e-6)
    assert AttentionOp()(q.bfloat16(), k.bfloat16(), v.bfloat16()).dtype == torch.float32


def test_group_norm_rule():
    """EDM's num_groups = min(32, C // 4), with a clear error where that does not divide C."""
    assert edm_num_groups(256) == 32 and edm_num_groups(16) == 4 and edm_num_groups(24) == 6
    assert edm_num_groups(1536) == 32 and edm_num_groups(48) == 12
    with pytest.raises(ValueError, match="18 channels"):
        edm_num_groups(18)
    with pytest.raises(ValueError, match="18 channels"):
        UNetBlock(18, 18, 8)
    assert group_norm_groups(18) == 3  # the always-valid rule kept for the diffusers adapter


# ------------------------------------------------------------------------------------------------
# Behaviour: shapes, conditioning, errors, gradients, dropout
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("base", [TINY, TINY_ADM], ids=["ddpmpp", "adm"])
@pytest.mark.parametrize("label_dim", [0, 10])
def test_output_shape_and_labels(base, label_dim):
    net = _net(label_dim, base=base).eval()
    x = torch.randn(3, 1, 8, 8)
    labels = F.one_hot(torch.tensor([0, 3, 9]), 10).float() if label_dim else None
    y = net(x, torch.randn(3), labels)
    assert y.shape == x.shape and y.dtype == torch.float32
    if label_dim:
        _randomize(net)
        c = torch.zeros(3)
        torch.testing.assert_close(net(x, c, torch.tensor([0, 3, 9])), net(x, c, labels))  # int = one-hot
        torch.testing.assert_close(net(x, c, None), net(x, c, torch.zeros(3, 10)))  # None = zero label
        assert not torch.allclose(net(x, c, labels), net(x, c, None), atol=1e-4)
        assert not torch.allclose(net(x, c, labels), net(x, torch.ones(3), labels), atol=1e-4)
    else:
        with pytest.raises(ValueError, match="unconditional"):
            net(x, torch.zeros(3), torch.tensor([0, 1, 2]))


def test_other_sizes_and_channels():
    net = build_backbone(NetworkConfig(**{**TINY, "attn_resolutions": [8]}), img_resolution=16, img_channels=3).eval()
    for hw in [(16, 16), (8, 24)]:  # any size divisible by 2**(levels-1)
        x = torch.randn(2, 3, *hw)
        assert net(x, torch.zeros(2)).shape == x.shape


def test_augment_labels():
    net = _randomize(_net(augment_dim=9)).eval()
    x, c = torch.randn(2, 1, 8, 8), torch.zeros(2)
    assert not torch.allclose(net(x, c, augment_labels=torch.randn(2, 9)), net(x, c), atol=1e-4)
    with pytest.raises(ValueError, match=r"\[2, 9\]"):
        net(x, c, augment_labels=torch.randn(2, 4))
    with pytest.raises(ValueError, match="augment_dim=0"):
        _net()(x, c, augment_labels=torch.randn(2, 9))


@pytest.mark.parametrize("label_dim", [0, 4])
def test_mlp_output_shape(label_dim):
    cfg = NetworkConfig(arch="mlp", hidden_dim=32, num_layers=2, dropout=0.0)
    net = build_backbone(cfg, img_resolution=0, img_channels=5, label_dim=label_dim).eval()
    assert isinstance(net, MLPBackbone)
    labels = torch.tensor([0, 1, 3, 2]) if label_dim else None
    y = net(torch.randn(4, 5), torch.randn(4), labels)
    assert y.shape == (4, 5)
    with pytest.raises(ValueError, match=r"\[N, 5\]"):
        net(torch.randn(4, 3), torch.randn(4), labels)
    with pytest.raises(ValueError, match="augment_labels"):
        net(torch.randn(4, 5), torch.randn(4), labels, augment_labels=torch.zeros(4, 9))
    with pytest.raises(ValueError, match="augment_dim"):
        build_backbone(NetworkConfig(arch="mlp", augment_dim=9), 0, 5)


def test_digits_config_size():
    assert 0.5e6 < count_parameters(build_backbone(NetworkConfig(**DIGITS), 8, 1)) < 2e6


def test_output_is_nearly_zero_at_init():
    """EDM's init: aux_conv x 1e-5 (DDPM++) / out_conv = 0 (ADM), so the untrained F ~ 0 and D ~ c_skip·x."""
    net = _net(label_dim=10).eval()
    y = net(torch.randn(4, 1, 8, 8) * 3, torch.linspace(-2, 2, 4), torch.tensor([1, 2, 3, 4]))
    assert 0 < y.abs().max() < 1e-3
    assert torch.count_nonzero(_net(base=TINY_ADM).eval()(torch.randn(2, 1, 8, 8), torch.zeros(2))) == 0
    mlp = build_backbone(NetworkConfig(arch="mlp", hidden_dim=32, num_layers=2), 0, 2).eval()
    assert mlp(torch.randn(8, 2), torch.randn(8)).abs().max() < 1e-3


def test_unknown_arch_error():
    with pytest.raises(ValueError, match="ddpmpp.*adm.*mlp.*diffusers_unet"):
        build_backbone(NetworkConfig(arch="resnet9000"), 8, 1)


@pytest.mark.parametrize("base", [TINY, TINY_ADM], ids=["ddpmpp", "adm"])
def test_resolution_errors(base):
    with pytest.raises(ValueError, match="not divisible"):
        build_backbone(NetworkConfig(**{**base, "channel_mult": [1, 1, 1]}), 10, 1)  # 10 % 4 != 0
    net = _net(base=base)
    with pytest.raises(ValueError, match="not divisible"):
        net(torch.randn(1, 1, 8, 7), torch.zeros(1))
    with pytest.raises(ValueError, match="attn_resolutions"):
        build_backbone(NetworkConfig(**{**base, "attn_resolutions": [16]}), 8, 1)
    with pytest.raises(ValueError, match="expects x of shape"):
        net(torch.randn(1, 3, 8, 8), torch.zeros(1))
    with pytest.raises(ValueError, match="noise_labels"):
        net(torch.randn(2, 1, 8, 8), torch.zeros(3))


def test_label_errors():
    net = _net(label_dim=10)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        net(torch.randn(2, 1, 8, 8), torch.zeros(2), torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="label_dim"):
        net(torch.randn(2, 1, 8, 8), torch.zeros(2), torch.zeros(2, 3))


@pytest.mark.parametrize("arch", ["ddpmpp", "adm", "mlp"])
def test_gradients_reach_every_parameter(arch):
    """One backward: every parameter gets a finite, non-zero gradient (DDPM++ straight from EDM's init;
    ADM after randomising, since its conv1/proj/out_conv start at exactly 0)."""
    labels = torch.tensor([0, 1, 2, 0])
    aug = None
    if arch == "mlp":
        net = build_backbone(NetworkConfig(arch="mlp", hidden_dim=16, num_layers=2), 0, 2, label_dim=3)
        x = torch.randn(4, 2)
    else:
        net, x, aug = _net(label_dim=3, base=TINY if arch == "ddpmpp" else TINY_ADM, augment_dim=9), \
            torch.randn(4, 1, 8, 8), torch.randn(4, 9)
        if arch == "adm":
            _randomize(net)
    net.train()
    y = net(x, torch.randn(4), labels, augment_labels=aug) if aug is not None else net(x, torch.randn(4), labels)
    (y - x).square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no gradient reaches {name}"


@pytest.mark.parametrize("base", [TINY, TINY_ADM], ids=["ddpmpp", "adm"])
def test_eval_mode_is_deterministic_and_dropout_active_in_train(base):
    net = _randomize(_net(base=base, dropout=0.5))
    x, c = torch.randn(2, 1, 8, 8), torch.randn(2)
    net.eval()
    torch.testing.assert_close(net(x, c), net(x, c), rtol=0, atol=0)
    net.train()
    assert not torch.allclose(net(x, c), net(x, c))


def test_label_dropout_in_training_only():
    net = _randomize(_net(label_dim=4, label_dropout=1.0))
    x, c, labels = torch.randn(2, 1, 8, 8), torch.zeros(2), torch.tensor([1, 2])
    net.train()
    train_out = net(x, c, labels)  # every label dropped -> the zero label (dropout 0 elsewhere)
    torch.testing.assert_close(train_out, net(x, c, None))
    net.eval()
    assert not torch.allclose(net(x, c, labels), net(x, c, None), atol=1e-4)


def test_diffusers_adapter_shapes():
    pytest.importorskip("diffusers")
    cfg = NetworkConfig(**{**TINY, "arch": "diffusers_unet"})
    net = build_backbone(cfg, 8, 1, label_dim=4).eval()
    x = torch.randn(2, 1, 8, 8)
    y = net(x, torch.randn(2), torch.tensor([0, 3]))
    assert y.shape == x.shape
    onehot = F.one_hot(torch.tensor([0, 3]), 4).float()
    c = torch.tensor([0.3, -0.2])
    torch.testing.assert_close(net(x, c, torch.tensor([0, 3])), net(x, c, onehot))
    with pytest.raises(ValueError, match="augment_labels"):
        net(x, c, onehot, augment_labels=torch.zeros(2, 9))
