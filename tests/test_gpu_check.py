"""``benchmarks/gpu/check.sh --dry-run`` in CI: every section at toy size on the CPU into a temporary
$OUT, with the JSON / Markdown schema of the real GPU run (benchmarks/gpu/README.md)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ["train", "pytest", "sampling", "compile", "adm", "fd", "loader"]
FINAL = {"ok", "partial", "timeout", "error", "not built", "skipped", "crashed"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-out")
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "PYTHONUNBUFFERED": "1",
           "SIMS_SITE": str(out.parent / "site")}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu" / "check.sh"), "--dry-run", "--budget", "400"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out, proc.stdout


def test_dry_run_writes_every_section_and_a_summary(dry_run):
    out, stdout = dry_run
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted([f"{s}.json" for s in SECTIONS] + ["summary.md"])
    assert len(files) <= 8  # what the device tool returns from $OUT
    for name in SECTIONS:
        d = json.loads((out / f"{name}.json").read_text())
        assert d["schema"] == "sims-gpu-check/1" and d["section"] == name and d["mode"] == "dry-run"
        assert d["status"] in FINAL
        assert d["status"] in ("ok", "partial"), (name, d["status"], d["notes"])
        assert d["env"]["device"] == "cpu" and d["env"]["torch"]
        assert isinstance(d["seconds"], (int, float)) and d["cap_s"] > 0
        assert d["tables"], name
        for t in d["tables"]:
            assert t["columns"] and isinstance(t["rows"], list)
            for r in t["rows"]:
                assert set(t["columns"]) <= set(r), (name, t["name"], r)
    assert "install:" in stdout


def test_training_table_has_throughput_and_mfu(dry_run):
    out, _ = dry_run
    d = json.loads((out / "train.json").read_text())
    rows = d["tables"][0]["rows"]
    by = {(r["model"], r["precision"]): r for r in rows}
    for p in ("fp32", "tf32", "bf16"):
        ours = by[("sims DDPM++", p)]
        assert ours["status"] == "ok" and ours["img_per_s"] > 0 and ours["step_ms"] > 0
        assert ours["tflop_per_step"] > 0 and 0 < ours["mfu_790"] and ours["mfu_990"] < ours["mfu_790"]
        theirs = by.get(("diffusers UNet2DModel", p))
        if theirs is not None:  # diffusers is a dependency: present in CI
            assert theirs["status"] == "ok"
            assert ours["ours_vs_diffusers"] == pytest.approx(ours["img_per_s"] / theirs["img_per_s"], rel=2e-3)
            assert abs(theirs["params"] / ours["params"] - 1) < 0.15  # toy widths match coarsely
    comp = json.loads((out / "compile.json").read_text())
    row = comp["tables"][0]["rows"][0]
    assert row["model"] == "sims DDPM++" and row["status"] == "ok" and row["speedup"] > 0
    assert any("stands in for inductor" in n for n in comp["notes"])


def test_other_sections(dry_run):
    out, _ = dry_run
    sampling = json.loads((out / "sampling.json").read_text())["tables"][0]["rows"]
    by = {r["variant"]: r for r in sampling}
    steps = by["base"]["steps"]
    assert by["base"]["nfe_per_img"] == 2 * steps - 1 and by["base"]["time_vs_base"] == 1
    assert by["sims"]["nfe_per_img"] == 2 * (2 * steps - 1)
    assert by["base"]["nfe_per_img"] <= by["sims, sigma in (0.28, 2.9]"]["nfe_per_img"] < by["sims"]["nfe_per_img"]
    fd = json.loads((out / "fd.json").read_text())
    assert any("stands in for Inception" in n for n in fd["notes"])
    row = fd["tables"][0]["rows"][0]
    assert row["status"] == "ok" and row["fd"] >= 0 and row["frechet_s"] > 0 and row["num_images"] == 256
    loader = json.loads((out / "loader.json").read_text())["tables"][0]["rows"]
    assert [r["workers"] for r in loader] == [0, 2] and all(r["img_per_s"] > 0 for r in loader)
    pyt = json.loads((out / "pytest.json").read_text())
    row = pyt["tables"][0]["rows"][0]
    assert row["failed"] == 0 and row["errors"] == 0 and row["skipped"] >= 5  # no CUDA: every GPU test skipped
    adm = json.loads((out / "adm.json").read_text())["tables"][0]["rows"]
    assert adm[0]["status"] == "ok" and adm[0]["img_per_s"] > 0


def test_summary_markdown(dry_run):
    out, stdout = dry_run
    md = (out / "summary.md").read_text()
    assert md.startswith("# sims GPU check")
    assert "**Dry run**" in md and "mode **dry-run**" in md
    for name in SECTIONS:
        assert f"## {name}:" in md
    assert "| model | precision | params | batch | step_ms | img_per_s |" in md
    assert "# sims GPU check" in stdout  # printed too (the device tool returns the output's tail)
