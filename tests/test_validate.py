"""Every bad setting is refused before any work: one stderr line naming the key, exit status 2, and
nothing written in the run directory (no stage directory, no checkpoint)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT

from sims.cli.train import main as train_main
from sims.metrics import save_npz

LOOP = ["loop.enabled=true", "loop.model=diffusion", "loop.workflows=[accumulate]", "loop.methods=[standard,sims]",
        "loop.omega=0.5"]

BAD = [
    (["sims.omegas=[0,-1]"], "sims.omegas"),
    (["sims.omegas=[0,nan]"], "sims.omegas"),
    (["sims.omegas=[]"], "sims.omegas"),
    (["sims.features=lenet"], "sims.features"),
    (["sims.features=inception", "sims.inception_weights=/nonexistent/pt_inception.pth"], "sims.inception_weights"),
    (["sims.features=inception"], "sims.inception_weights"),
    (["sims.reference=/nonexistent/ref.npz"], "sims.reference"),
    (["sampler.solver=rk4"], "sampler.solver"),
    (["sampler.S_churn=-1"], "sampler.S_churn"),
    (["sampler.S_noise=0"], "sampler.S_noise"),
    (["sampler.sigma_min=100"], "sampler.sigma_min"),
    (["sims.sigma_interval=[1.0]"], "sims.sigma_interval"),
    (["sims.sigma_interval=[3.0,1.0]"], "sims.sigma_interval"),
    (["data.name=folder", "data.path=/nonexistent/digits.zip"], "data.path"),
    (["data.name=folder"], "data.path"),
    (["train.batch_gpu=48"], "train.batch_gpu"),
    (["train.augment=0.2"], "network.augment_dim"),
    (["network.attn_resolutions=[3]"], "network"),
    (["data.channels=2"], "data.channels"),
    (["sims.base=/nonexistent/run"], "sims.base"),
    (["sims.report_seed_offsets=[0,1000]"], "sims.selection_seed_offsets"),
    ([*LOOP, "loop.model=vae"], "loop.model"),
    ([*LOOP, "loop.workflows=[bogus]"], "loop.workflows"),
    ([*LOOP, "loop.methods=[bogus]"], "loop.methods"),
    ([*LOOP, "loop.generations=0"], "loop.generations"),
    ([*LOOP, "loop.workflows=[accumulate-subsample]", "loop.num_real=100", "loop.num_synthetic=100",
      "loop.subsample_size=500"], "loop.subsample_size"),
    ([*LOOP, "loop.omega=nan"], "loop.omega"),
    ([*LOOP, "loop.omega=0"], "loop.omega"),
]


@pytest.mark.parametrize("overrides,key", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_setting_fails_first_with_one_line(tmp_path, capsys, overrides, key):
    run = tmp_path / "R"
    rc = train_main(["configs/digits.yaml", f"run_dir={run}", *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("sims-train: error:") and key in err[0], err
    assert not run.exists() or not any(run.iterdir())


def test_reference_of_another_dimension_or_extractor(tmp_path, capsys):
    wrong_dim = tmp_path / "ref2048.npz"
    save_npz(wrong_dim, np.zeros(2048), np.eye(2048))
    no_record = tmp_path / "ref128.npz"
    save_npz(no_record, np.zeros(128), np.eye(128))
    other = tmp_path / "other.npz"
    save_npz(other, np.zeros(128), np.eye(128), feature_extractor=np.asarray("identity"))
    for path, words in ((wrong_dim, "D=2048"), (no_record, "no feature-extractor record"), (other, "'identity'")):
        rc = train_main(["configs/digits.yaml", f"run_dir={tmp_path / 'R'}", f"sims.reference={path}"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "sims.reference" in err[0] and words in err[0], err
    assert not (tmp_path / "R").exists()


def test_unknown_key_and_bad_type_are_one_line(tmp_path, capsys):
    for override, words in (("train.lrr=1", "unknown config key 'train.lrr'"), ("train.lr=fast", "train.lr")):
        assert train_main(["configs/digits.yaml", f"run_dir={tmp_path / 'R'}", override]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0]


def test_a_bug_is_not_hidden_as_a_one_liner(monkeypatch, tmp_path):
    """Only the project's errors become one line; anything else keeps its traceback."""
    import sims.cli.validate as v

    def broken(cfg):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(v, "validate", broken)
    with pytest.raises(ZeroDivisionError):
        train_main(["configs/digits.yaml", f"run_dir={tmp_path / 'R'}"])


def test_a_refused_config_never_imports_lightning(tmp_path):
    """A config error comes before the Lightning import (seconds, not the ~10 s Lightning costs on a
    loaded 2-core machine): the validation builds the network on the meta device without it."""
    code = ("import sys; from sims.cli.train import main; "
            f"rc = main(['configs/digits.yaml', 'run_dir={tmp_path / 'R'}', 'sims.omegas=[0,nan]']); "
            "print(rc, 'lightning' in sys.modules)")
    ok = ("import sys; from sims.config import load_config; from sims.cli.validate import validate\n"
          "for c in ('configs/digits.yaml', 'configs/loop/digits.yaml', 'configs/digits_control.yaml'):\n"
          "    validate(load_config(c, ['run_dir=/unused']))\n"
          "print('lightning' in sys.modules)")
    refused = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert refused.stdout.split() == ["2", "False"], refused.stdout + refused.stderr[-2000:]
    passed = subprocess.run([sys.executable, "-c", ok], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert passed.stdout.split() == ["False"], passed.stdout + passed.stderr[-2000:]
