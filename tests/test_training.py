"""Training: EMA, schedule, the LightningModule, sims-train / sims-sample end to end, resume and bad input."""
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import DIGITS_ARGS, ROOT, TOY_ARGS, run_cli
from sims.config import ConfigError, load_config, to_container
from sims.training.ema import EMA, ema_beta
from sims.training.export import load_denoiser
from sims.training.module import EDMModule, steps_for_kimg


def test_ema_beta_matches_edm():
    # half-life 500 kimg, ramp 0.05: after 1 Mimg the half-life is 50 kimg.
    assert ema_beta(512, 1_000_000, 500, 0.05) == pytest.approx(0.5 ** (512 / 50_000))
    assert ema_beta(512, 100_000_000, 500, 0.05) == pytest.approx(0.5 ** (512 / 500_000))
    assert ema_beta(512, 1_000_000, 500, None) == pytest.approx(0.5 ** (512 / 500_000))


def test_ema_is_separate_and_averages():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, halflife_kimg=1.0, rampup_ratio=None)
    assert all(p is not q for p, q in zip(ema.module.parameters(), model.parameters()))
    assert not any(p.requires_grad for p in ema.module.parameters())
    old = [p.clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    beta = ema.update(model, batch_size=100, cur_nimg=10_000)
    assert beta == pytest.approx(0.5 ** 0.1)
    for o, e, m in zip(old, ema.module.parameters(), model.parameters()):
        torch.testing.assert_close(e, beta * o + (1 - beta) * m)


def _cfg(*overrides):
    return load_config(ROOT / "configs/toy2d.yaml", ["run_dir=/tmp/x", *overrides])


def test_lr_ramp_and_nan_guard():
    cfg = _cfg("train.lr_rampup_kimg=10", "train.batch_size=1000", "network.hidden_dim=16", "network.num_layers=1")
    m = EDMModule(to_container(cfg.network), to_container(cfg.train), (2,), 0)
    assert m.lr_factor(0) == pytest.approx(0.1)
    assert m.lr_factor(4) == pytest.approx(0.5)
    assert m.lr_factor(100) == 1.0
    assert steps_for_kimg(10, 1000) == 10 and steps_for_kimg(10.5, 1000) == 11
    with pytest.raises(FloatingPointError, match="non-finite training loss"):
        m.training_step((torch.full((4, 2), float("nan")), torch.zeros(4, 0), torch.tensor([0, 0])), 0)
    with pytest.raises(RuntimeError, match="serves step 3 but the trainer is at step 0"):
        m.training_step((torch.zeros(4, 2), torch.zeros(4, 0), torch.tensor([3, 0])), 0)


def test_initial_weights_are_a_function_of_the_seed():
    cfg = _cfg("network.hidden_dim=16", "network.num_layers=1")
    a, b = (EDMModule(to_container(cfg.network), to_container(cfg.train), (2,), 0) for _ in range(2))
    c = EDMModule(to_container(cfg.network), {**to_container(cfg.train), "seed": 1}, (2,), 0)
    assert all(torch.equal(p, q) for p, q in zip(a.net.parameters(), b.net.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.net.parameters(), c.net.parameters()))


def test_aux_from_state_copies_the_base_weights_into_every_ema():
    cfg = _cfg("network.hidden_dim=16", "network.num_layers=1")
    base = EDMModule(to_container(cfg.network), to_container(cfg.train), (2,), 0)
    with torch.no_grad():
        for p in base.ema.module.parameters():
            p.normal_()
    state = base.ema.module.state_dict()
    aux = EDMModule.from_state(state, to_container(cfg.network),
                               {**to_container(cfg.train), "lr": 1e-5, "lr_rampup_kimg": 0.0, "ema_halflives_kimg": [5.0]},
                               (2,), 0)
    for module in (aux.net, aux.ema.module, aux.extra_emas["5"].module):
        for a, b in zip(module.parameters(), base.ema.module.parameters()):
            assert torch.equal(a, b)
    assert aux.train_cfg["lr"] == 1e-5 and aux.lr_factor(0) == 1.0


def test_config_errors():
    with pytest.raises(ConfigError, match="unknown config key 'train.lrr'"):
        _cfg("train.lrr=1")
    with pytest.raises(ConfigError, match="train.lr"):
        _cfg("train.lr=fast")
    with pytest.raises(ConfigError, match="key=value"):
        _cfg("train.lr")
    with pytest.raises(ConfigError, match="not found"):
        load_config("configs/nope.yaml")


def test_toy_train_sample_end_to_end(tmp_path):
    run = tmp_path / "run"
    run_cli("sims.cli.train", *TOY_ARGS, f"run_dir={run}")
    for f in ["config.yaml", "base/ema.safetensors", "base/DONE", "base/grid.png", "base/logs/metrics.csv",
              "base/checkpoints/last.ckpt"]:
        assert (run / f).exists(), f
    assert "loss" in (run / "base/logs/metrics.csv").read_text().splitlines()[0]
    # exported weights load without the checkpoint (no pickle) and denoise
    D, meta = load_denoiser(run / "base/ema.safetensors")
    assert meta["data_shape"] == [2] and meta["network"]["arch"] == "mlp"
    x = torch.randn(5, 2)
    assert D(x, torch.full((5,), 0.5)).shape == (5, 2)
    # a re-run of a finished run skips training
    again = run_cli("sims.cli.train", *TOY_ARGS, f"run_dir={run}")
    assert "resuming" not in again.stdout
    # another config in the same run directory is refused, with the way out
    bad = run_cli("sims.cli.train", *TOY_ARGS, f"run_dir={run}", "train.lr=0.1", check=False)
    assert bad.returncode == 2 and "different config" in bad.stderr and "run_dir" in bad.stderr
    # samples: one file per seed, a function of the seed only
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    run_cli("sims.cli.sample", str(run), "--seeds", "0-9", "--out", str(s1), "--batch", "10")
    run_cli("sims.cli.sample", str(run), "--seeds", "5-9,0-4", "--out", str(s2), "--batch", "3")
    for s in range(10):
        np.testing.assert_allclose(np.load(s1 / f"{s:06d}.npy"), np.load(s2 / f"{s:06d}.npy"), atol=1e-5)


def test_digits_train_sample_pngs(tmp_path):
    run = tmp_path / "run"
    run_cli("sims.cli.train", *DIGITS_ARGS, f"run_dir={run}")
    grid = Image.open(run / "base/grid.png")
    assert grid.width > 8 * 4
    out = tmp_path / "samples"
    run_cli("sims.cli.sample", str(run), "--seeds", "0-11", "--out", str(out), "--grid", str(tmp_path / "g.png"))
    files = sorted(p.name for p in out.iterdir())
    assert files == [f"{s:06d}.png" for s in range(12)]
    img = np.asarray(Image.open(out / "000003.png"))
    assert img.shape == (8, 8) and img.dtype == np.uint8
    assert (tmp_path / "g.png").exists()
    # the same seed from a different batch gives the same picture
    out2 = tmp_path / "samples2"
    run_cli("sims.cli.sample", str(run), "--seeds", "3", "--out", str(out2))
    diff = np.abs(np.asarray(Image.open(out2 / "000003.png"), dtype=int) - img.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.95
    # guidance without an auxiliary model is a clear error
    bad = run_cli("sims.cli.sample", str(run), "--seeds", "0-1", "--out", str(out2), "--guidance", "0.5", check=False)
    assert bad.returncode == 2 and "no auxiliary model" in bad.stderr


@pytest.mark.parametrize("override,message", [
    ("data.name=folder", "data.path"),
    ("data.path=/nonexistent/data.zip", "not found"),
    ("train.lr=abc", "train.lr"),
    ("train.bogus=1", "unknown config key"),
    ("train.lr=1e30", "non-finite training loss"),
])
def test_cli_bad_input_one_line(tmp_path, override, message):
    extra = ["data.name=folder", "data.resolution=8"] if override.startswith("data.path") else []
    proc = run_cli("sims.cli.train", *TOY_ARGS, f"run_dir={tmp_path / 'r'}", *extra, override, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith("sims-train: error:") and message in err[-1], proc.stderr[-2000:]


def test_cli_wrong_image_size(tmp_path):
    from sims.data import write_image_folder

    write_image_folder(tmp_path / "d.zip", np.zeros((4, 12, 12, 1), dtype=np.uint8))
    proc = run_cli("sims.cli.train", *DIGITS_ARGS, f"run_dir={tmp_path / 'r'}", "data.name=folder",
                   f"data.path={tmp_path / 'd.zip'}", check=False)
    assert proc.returncode == 2 and "expected 8x8" in proc.stderr
