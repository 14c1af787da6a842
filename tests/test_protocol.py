"""The evaluation protocol (SPEC §4): selection vs report sets, min/mean/paired figures, NFE as
counted, the report schema, and the selected snapshot/EMAs used by sampling."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sims.config import load_config, save_config, to_container
from sims.diffusion import karras_sigmas
from sims.dist import single_process
from sims.stages.evaluate import Reference, evaluate_denoiser, make_extractor
from sims.stages.report import summarize
from sims.stages.rundir import load_run_denoiser
from sims.stages.sims import Cell
from sims.training.export import save_denoiser
from sims.training.denoiser import build_denoiser


def _cfg(*extra):
    return load_config("configs/toy2d.yaml", ["run_dir=x", "sims.selection_seed_offsets=[0,100]",
                                              "sims.report_seed_offsets=[1000,2000,3000]", *extra])


def _row(fd, omega, nfe, offset, precision=0.5):
    return {"fd": fd, "omega": omega, "nfe": nfe, "seed_offset": offset, "precision": precision, "recall": 0.9,
            "fd_mean_term": fd / 10, "num_samples": 10}


def test_summary_figures_match_a_hand_computation():
    cfg = _cfg()
    base, sims = Cell(0.0), Cell(0.5)
    fds = {(base, 1000): 2.0, (base, 2000): 4.0, (base, 3000): 3.0, (sims, 1000): 1.5, (sims, 2000): 3.0, (sims, 3000): 3.3}
    results = {c.key("rep", o): _row(v, c.omega, 15.0 if c.omega == 0 else 30.0, o) for (c, o), v in fds.items()}
    results.update({c.key("sel", o): _row(1.0, c.omega, 15.0, o) for c in (base, sims) for o in (0, 100)})
    ref = Reference(np.zeros(2), np.eye(2), "identity", "identity", "computed:toy", None, 10, 10)
    rep = summarize(cfg, results, [base, sims], sims, base, ref, 0)
    assert rep["base"]["fd_per_set"] == [2.0, 4.0, 3.0] and rep["base"]["fd_min"] == 2.0 and rep["base"]["fd_mean"] == 3.0
    assert rep["sims"]["fd_min"] == 1.5 and rep["sims"]["fd_mean"] == pytest.approx(2.6)
    assert rep["relative_change_per_set"] == pytest.approx([-0.25, -0.25, 0.1])
    assert rep["relative_change_paired_mean"] == pytest.approx(-0.4 / 3)
    assert rep["relative_change"] == pytest.approx(2.6 / 3.0 - 1)
    assert rep["base"]["nfe"] == 15.0 and rep["sims"]["nfe"] == 30.0
    # the schema benchmarks and users read: flat integer lists, the legacy keys, the chosen setting
    assert rep["selection_seed_offsets"] == [0, 100] and rep["report_seed_offsets"] == [1000, 2000, 3000]
    assert all(isinstance(o, int) for o in rep["selection_seed_offsets"] + rep["report_seed_offsets"])
    for key in ("best_omega", "base_fd_mean", "best_fd_mean", "relative_change", "chosen", "selection", "rows",
                "edge_of_grid", "reference"):
        assert key in rep
    assert rep["best_omega"] == 0.5 and rep["chosen"]["omega"] == 0.5
    assert rep["edge_of_grid"] == []  # only two ω values: no edge flagged on a 2-point grid
    json.dumps(rep)  # JSON-able


def test_nfe_is_counted_with_the_sigma_interval():
    torch.manual_seed(0)
    cfg = _cfg()
    base = build_denoiser(to_container(cfg.network) | {"hidden_dim": 16, "num_layers": 1}, (2,), 0, 1.0).eval()
    aux = build_denoiser(to_container(cfg.network) | {"hidden_dim": 16, "num_layers": 1}, (2,), 0, 1.0).eval()
    ctx = single_process()
    ext = make_extractor("identity", data_dim=2, inception_weights=None, device="cpu")
    ref = Reference(np.zeros(2), np.eye(2), "identity", "identity", "x", None, 10, 0)
    lo, hi, n = 0.28, 2.9, 8
    kw = dict(data_shape=(2,), label_dim=0, sampler={"num_steps": n}, batch_size=7, extractor=ext, reference=ref,
              precision_recall_=False)
    assert evaluate_denoiser(ctx, base, range(20), **kw)["nfe"] == 2 * n - 1
    assert evaluate_denoiser(ctx, base, range(20), aux=aux, omega=0.5, **kw)["nfe"] == 2 * (2 * n - 1)
    # Heun evaluates at sigma_i (i < N) and at sigma_{i+1} (i < N - 1): the auxiliary only inside (lo, hi]
    s = karras_sigmas(n).tolist()
    points = s[:n] + s[1:n]
    inside = sum(lo < p <= hi for p in points)
    got = evaluate_denoiser(ctx, base, range(20), aux=aux, omega=0.5, sigma_interval=[lo, hi], **kw)["nfe"]
    assert got == 2 * n - 1 + inside and inside < len(points)


def test_sampling_uses_the_selected_snapshot_and_emas(tmp_path):
    cfg = load_config("configs/toy2d.yaml", [f"run_dir={tmp_path}", "network.hidden_dim=16", "network.num_layers=1"])
    save_config(cfg, tmp_path / "config.yaml")
    net = to_container(cfg.network)
    nets = {}
    for i, rel in enumerate(["base/ema.safetensors", "base/ema-5.safetensors", "aux/ema.safetensors",
                             "aux/snapshots/kimg1/ema.safetensors"]):
        torch.manual_seed(i)
        d = build_denoiser(net, (2,), 0, 1.0)
        with torch.no_grad():
            for p in d.parameters():
                p.normal_()
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        save_denoiser(d, tmp_path / rel, network=net, data_shape=[2], label_dim=0, sigma_data=1.0)
        nets[rel] = d.eval()
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval/report.json").write_text(json.dumps({"chosen": {"base_ema": "5", "aux_snapshot": "kimg1",
                                                                      "aux_ema": ""}}))
    x, sigma = torch.randn(4, 2), torch.full((4,), 0.7)
    g, _, _ = load_run_denoiser(tmp_path, 0.5)
    expected = 1.5 * nets["base/ema-5.safetensors"](x, sigma) - 0.5 * nets["aux/snapshots/kimg1/ema.safetensors"](x, sigma)
    torch.testing.assert_close(g(x, sigma), expected)
    # told otherwise: the main EMA and the final auxiliary
    g, _, _ = load_run_denoiser(tmp_path, 0.5, base_ema="", aux_snapshot="")
    expected = 1.5 * nets["base/ema.safetensors"](x, sigma) - 0.5 * nets["aux/ema.safetensors"](x, sigma)
    torch.testing.assert_close(g(x, sigma), expected)
