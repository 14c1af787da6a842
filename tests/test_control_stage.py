"""Distribution control as a stage: the auxiliary's set composed by a judge, drawing more base
samples when a group is short, failing before the fine-tune when it stays short; bad settings refused."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sims.cli.train import main as train_main
from sims.config import load_config
from sims.dist import single_process
from sims.errors import ConfigError
from sims.stages.control_stage import controlled_synthetic, target_reference
from sims.stages.evaluate import Judge, Reference


def identity_denoiser(x, sigma, labels=None):
    return x  # with D(x) = x the sampler keeps x = sigma_max * latent: pixels ±1 once quantised, fixed per seed


def bucket_judge() -> Judge:
    """Class = (sign pattern of the first 4 pixels) mod 10: classes 0-5 12.5% each, 6-9 6.25%."""
    def probs(x):
        bits = (x.reshape(len(x), -1)[:, :4].cpu() > 0).long()
        cls = (bits * torch.tensor([1, 2, 4, 8])).sum(1) % 10
        return torch.nn.functional.one_hot(cls, 10).float()

    return Judge("bucket", probs, 10, 0.5)


def _cfg(tmp_path, *extra):
    return load_config("configs/digits_control.yaml", [f"run_dir={tmp_path}", "sims.num_synthetic=300",
                                                      "sampler.num_steps=1", "sampler.batch_size=100",
                                                      "sims.control.omega=1.0", *extra])


def test_composed_set_has_the_counts_the_rule_asks_for(tmp_path):
    cfg = _cfg(tmp_path, "sims.control.max_synthetic=3000")
    data, record = controlled_synthetic(single_process(), cfg, identity_denoiser, tmp_path / "syn", bucket_judge(),
                                        data_shape=(1, 8, 8), label_dim=0)
    assert len(data) == 300 and record["pool_size"] >= 300
    labels = bucket_judge().probabilities(torch.from_numpy(np.asarray(data.data))).argmax(1)
    counts = torch.bincount(labels, minlength=10).tolist()
    assert counts == [record["aux_counts"][g] for g in range(10)]
    # fewer zeros than the base has, so that guidance pushes toward zeros; the prediction meets 25% at omega*
    assert record["aux_shares"][0] < record["base_shares"][0]
    assert record["predicted_at_design_omega"][0] == pytest.approx(0.25, abs=1e-6)
    assert json.loads((tmp_path / "syn" / "control.json").read_text())["aux_counts"]["0"] == record["aux_counts"][0]


def test_a_short_group_draws_more_samples_then_fails_before_the_fine_tune(tmp_path):
    # target 1% zeros: the auxiliary needs mostly zeros, but only ~10% of base samples are zeros
    cfg = _cfg(tmp_path, "sims.control.target={0: 0.01}", "sims.control.max_synthetic=600")
    with pytest.raises(ConfigError, match=r"needs \d+ samples judged as group 0 but only \d+ of 600"):
        controlled_synthetic(single_process(), cfg, identity_denoiser, tmp_path / "syn", bucket_judge(),
                             data_shape=(1, 8, 8), label_dim=0)
    assert json.loads((tmp_path / "syn" / "manifest.json").read_text())["count"] == 600  # it did draw more first


def test_target_reweighted_reference():
    feats = torch.tensor([[0.0], [0.0], [1.0], [1.0], [1.0], [1.0]], dtype=torch.float64)
    ref = Reference(np.zeros(1), np.eye(1), "identity", "identity", "x", None, 6, 6, real_features=feats,
                    real_indices=torch.arange(6))
    out = target_reference(ref, torch.tensor([0, 0, 1, 1, 1, 1]), {0: 0.5, 1: 0.5})
    assert out.mu[0] == pytest.approx(0.5)  # groups weighted 50/50, not 2:4 as in the data


@pytest.mark.parametrize("override,words", [
    ("sims.control.target={0: 1.5}", "sims.control.target"),
    ("sims.control.target={12: 0.3}", "sims.control.target"),
    ("sims.control.judge=nosuchpkg.mod:fn", "sims.control.judge"),
    ("sims.control.max_synthetic=10", "sims.control.max_synthetic"),
])
def test_bad_control_settings_fail_before_any_work(tmp_path, capsys, override, words):
    rc = train_main(["configs/digits_control.yaml", f"run_dir={tmp_path / 'R'}", override])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and words in err[0], err
    assert not (tmp_path / "R").exists() or not any((tmp_path / "R").iterdir())
