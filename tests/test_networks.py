"""Backbones F(x_in, c_noise, class_labels): shapes, EDM CIFAR-10 size, init, errors, gradients."""
from __future__ import annotations

import pytest
import torch

from sims.config import NetworkConfig
from sims.networks import DDPMpp, MLPBackbone, build_backbone, count_parameters
from sims.networks.ddpmpp import PositionalEmbedding, group_norm_groups

TINY = dict(arch="ddpmpp", model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)
DIGITS = dict(arch="ddpmpp", model_channels=32, channel_mult=[1, 2], num_blocks=2, attn_resolutions=[4], dropout=0.0)


def _net(label_dim=0, **over):
    cfg = NetworkConfig(**{**TINY, **over})
    torch.manual_seed(0)
    return build_backbone(cfg, img_resolution=8, img_channels=1, label_dim=label_dim)


def _randomize_small_layers(net):
    """Give the ~0-initialised layers O(1) weights so outputs/gradients are not tiny."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))


@pytest.mark.parametrize("label_dim", [0, 10])
def test_ddpmpp_output_shape(label_dim):
    net = _net(label_dim).eval()
    x = torch.randn(3, 1, 8, 8)
    labels = torch.nn.functional.one_hot(torch.tensor([0, 3, 9]), 10).float() if label_dim else None
    y = net(x, torch.randn(3), labels)
    assert y.shape == x.shape and y.dtype == torch.float32
    if label_dim:  # integer labels are the same as their one-hot vectors
        _randomize_small_layers(net)
        torch.testing.assert_close(net(x, torch.zeros(3), torch.tensor([0, 3, 9])), net(x, torch.zeros(3), labels))


def test_ddpmpp_other_sizes_and_channels():
    net = build_backbone(NetworkConfig(**{**TINY, "attn_resolutions": [8]}), img_resolution=16, img_channels=3).eval()
    for hw in [(16, 16), (8, 24)]:  # any size divisible by 2**(levels-1)
        x = torch.randn(2, 3, *hw)
        assert net(x, torch.zeros(2)).shape == x.shape


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


def test_cifar10_config_parameter_count():
    """EDM Table 7 / appendix F.2: DDPM++ on CIFAR-10 has 55.7 M parameters (56 M in the text)."""
    torch.manual_seed(0)
    cfg = NetworkConfig()  # the defaults are the EDM CIFAR-10 DDPM++ configuration
    film = count_parameters(build_backbone(cfg, 32, 3))
    additive = count_parameters(DDPMpp(32, 3, adaptive_scale=False))
    print(f"DDPM++ CIFAR-10: {film / 1e6:.2f} M (FiLM), {additive / 1e6:.2f} M (additive, EDM)")
    assert abs(film - 55.7e6) / 55.7e6 < 0.15
    assert abs(additive - 55.7e6) / 55.7e6 < 0.01  # exactly EDM's layout
    assert 0.5e6 < count_parameters(build_backbone(NetworkConfig(**DIGITS), 8, 1)) < 2e6


def test_output_is_nearly_zero_at_init():
    """Design: last conv of every residual branch and of the network init at 1e-5 x default, so
    the untrained F ~ 0 (D(x;sigma) ~ c_skip x) while all gradients stay non-zero."""
    net = _net(label_dim=10).eval()
    y = net(torch.randn(4, 1, 8, 8) * 3, torch.linspace(-2, 2, 4), torch.tensor([1, 2, 3, 4]))
    assert 0 < y.abs().max() < 1e-3
    mlp = build_backbone(NetworkConfig(arch="mlp", hidden_dim=32, num_layers=2), 0, 2).eval()
    assert mlp(torch.randn(8, 2), torch.randn(8)).abs().max() < 1e-3


def test_noise_and_label_conditioning_change_output():
    net = _net(label_dim=10).eval()
    _randomize_small_layers(net)
    x = torch.randn(2, 1, 8, 8)
    a = net(x, torch.zeros(2), torch.tensor([1, 1]))
    assert not torch.allclose(a, net(x, torch.ones(2), torch.tensor([1, 1])), atol=1e-4)
    assert not torch.allclose(a, net(x, torch.zeros(2), torch.tensor([2, 2])), atol=1e-4)


def test_unknown_arch_error():
    with pytest.raises(ValueError, match="ddpmpp.*mlp.*diffusers_unet"):
        build_backbone(NetworkConfig(arch="resnet9000"), 8, 1)


def test_resolution_errors():
    with pytest.raises(ValueError, match="not divisible"):
        build_backbone(NetworkConfig(**{**TINY, "channel_mult": [1, 1, 1]}), 10, 1)  # 10 % 4 != 0
    net = _net()
    with pytest.raises(ValueError, match="not divisible"):
        net(torch.randn(1, 1, 8, 7), torch.zeros(1))
    with pytest.raises(ValueError, match="attn_resolutions"):
        build_backbone(NetworkConfig(**{**TINY, "attn_resolutions": [16]}), 8, 1)
    with pytest.raises(ValueError, match="expects x of shape"):
        net(torch.randn(1, 3, 8, 8), torch.zeros(1))


def test_label_errors():
    net = _net(label_dim=10)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        net(torch.randn(2, 1, 8, 8), torch.zeros(2), torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="unconditional"):
        _net()(torch.randn(2, 1, 8, 8), torch.zeros(2), torch.tensor([0, 1]))


@pytest.mark.parametrize("arch", ["ddpmpp", "mlp"])
def test_gradients_reach_every_parameter(arch):
    """One backward from the untrained net: every parameter gets a finite, non-zero gradient."""
    if arch == "ddpmpp":
        net, x = _net(label_dim=3), torch.randn(4, 1, 8, 8)
    else:
        net = build_backbone(NetworkConfig(arch="mlp", hidden_dim=16, num_layers=2), 0, 2, label_dim=3)
        x = torch.randn(4, 2)
    net.train()
    y = net(x, torch.randn(4), torch.tensor([0, 1, 2, 0]))
    (y - x).square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_eval_mode_is_deterministic_and_dropout_active_in_train():
    net = _net(dropout=0.5)
    _randomize_small_layers(net)
    x, c = torch.randn(2, 1, 8, 8), torch.randn(2)
    net.eval()
    torch.testing.assert_close(net(x, c), net(x, c), rtol=0, atol=0)
    net.train()
    assert not torch.allclose(net(x, c), net(x, c))


def test_positional_embedding_and_groups():
    emb = PositionalEmbedding(8)(torch.tensor([0.0, 1.0]))
    assert emb.shape == (2, 8)
    torch.testing.assert_close(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))  # cos 0 = 1, sin 0 = 0
    assert emb[1, 0] == pytest.approx(torch.cos(torch.tensor(1.0)).item())  # highest frequency is 1
    assert group_norm_groups(256) == 32 and group_norm_groups(16) == 4 and group_norm_groups(24) == 6


def test_diffusers_adapter_shapes():
    pytest.importorskip("diffusers")
    cfg = NetworkConfig(**{**TINY, "arch": "diffusers_unet"})
    net = build_backbone(cfg, 8, 1, label_dim=4).eval()
    x = torch.randn(2, 1, 8, 8)
    y = net(x, torch.randn(2), torch.tensor([0, 3]))
    assert y.shape == x.shape
    onehot = torch.nn.functional.one_hot(torch.tensor([0, 3]), 4).float()
    c = torch.tensor([0.3, -0.2])
    torch.testing.assert_close(net(x, c, torch.tensor([0, 3])), net(x, c, onehot))
