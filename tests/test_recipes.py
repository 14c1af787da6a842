"""EDM's training recipes (configs/{cifar10,ffhq64,afhqv2-64,imagenet64}.yaml) and the SIMS recipes that start
from EDM's released networks (configs/sims/*.yaml): their settings against EDM's published options
(EDM_FORMAT §4, SPEC §1-§2), their networks against EDM's parameter counts (EDM_FORMAT §2.3-§2.5), and
``sims.cli.validate.validate`` on each of them.

Stand-ins, because the real inputs are not on this machine:
* data: a tiny EDM-format zip of the recipe's resolution and channels (``write_image_folder``); the ImageNet
  stand-in carries labels up to 999, so it gives label_dim 1000 as the real data set does;
* Inception: an empty placeholder file for ``sims.inception_weights`` (validate checks that the file exists,
  it does not open it), and -- ONLY because torch-fidelity is not installed on this CPU machine -- an empty
  ``torch_fidelity`` module put into ``sys.modules`` for the duration of a test, so that validate's import
  check passes and the rest of the feature checks (weights path, the reference's dimension and record) run.
  ``sims.features`` is never changed: the recipes are validated with Inception features as written;
* reference: an EDM-style ``.npz`` (``mu`` [2048], ``sigma`` [2048, 2048], no extractor record, like EDM's
  fid-refs files);
* imported base (``sims.base``): a run directory laid out as ``sims-import edm`` writes it (config.yaml,
  base/ema.safetensors, base/DONE, IMPORT.json) for EDM's released network, converted by the project's own
  converter from a snapshot whose tensors live on the meta device (``convert_edm_network(build=False)``:
  names, shapes and arguments checked, nothing allocated). Its weights file carries the import's metadata
  but a one-tensor body: validate reads only the metadata. (The real path, writer pickle -> sims-import ->
  sims-train, is run at toy size by benchmarks/recipes_smoke.py.)
"""
from __future__ import annotations

import collections
import importlib.machinery
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT
from sims.cli.import_edm import LICENCE, edm_sampler_settings, imported_config
from sims.cli.validate import validate
from sims.config import load_config, save_config
from sims.data import load_real_dataset, write_image_folder
from sims.errors import ConfigError
from sims.stages.base import check_base_fits
from sims.training.edm_import import convert_edm_network, edm_tensor_shapes, resolve_backbone_kwargs
from sims.training.edm_pickle import ClassNode, EDMSnapshot
from sims.training.export import read_metadata, save_denoiser
from sims.training.denoiser import build_denoiser

CONFIGS = ROOT / "configs"
OMEGA_GRID = [0.25 * i for i in range(9)]  # 0 ... 2 in steps of 0.25 (Neon, SPEC §1)
SONG = dict(embedding_type="positional", encoder_type="standard", decoder_type="standard", channel_mult_noise=1,
            resample_filter=[1, 1])

# EDM's published settings per released network (EDM README training table + train.py defaults, EDM_FORMAT §4;
# parameter counts EDM_FORMAT §2.3-§2.5). `kwargs` are the model kwargs train.py passes (EDM_FORMAT §1.3).
EDM = {
    "cifar10": dict(
        pkl="edm-cifar10-32x32-uncond-vp.pkl", backbone="SongUNet", shape=(3, 32, 32), classes=0,
        params=55_733_891, augment=0.12, steps=18, churn=None, fid=1.97,
        kwargs=dict(model_channels=128, channel_mult=[2, 2, 2], augment_dim=9, dropout=0.13, **SONG),
        train=dict(total_kimg=200_000, batch_size=512, lr=1e-3, lr_rampup_kimg=10_000, ema_halflife_kimg=500,
                   ema_rampup_ratio=0.05, augment=0.12, precision="32-true")),
    "ffhq64": dict(
        pkl="edm-ffhq-64x64-uncond-vp.pkl", backbone="SongUNet", shape=(3, 64, 64), classes=0,
        params=61_805_571, augment=0.15, steps=40, churn=None, fid=2.39,
        kwargs=dict(model_channels=128, channel_mult=[1, 2, 2, 2], augment_dim=9, dropout=0.05, **SONG),
        train=dict(total_kimg=200_000, batch_size=256, lr=2e-4, lr_rampup_kimg=10_000, ema_halflife_kimg=500,
                   ema_rampup_ratio=0.05, augment=0.15, precision="32-true")),
    "afhqv2-64": dict(
        pkl="edm-afhqv2-64x64-uncond-vp.pkl", backbone="SongUNet", shape=(3, 64, 64), classes=0,
        params=61_805_571, augment=0.15, steps=40, churn=None, fid=1.96,
        kwargs=dict(model_channels=128, channel_mult=[1, 2, 2, 2], augment_dim=9, dropout=0.25, **SONG),
        train=dict(total_kimg=200_000, batch_size=256, lr=2e-4, lr_rampup_kimg=10_000, ema_halflife_kimg=500,
                   ema_rampup_ratio=0.05, augment=0.15, precision="32-true")),
    "imagenet64": dict(
        pkl="edm-imagenet-64x64-cond-adm.pkl", backbone="DhariwalUNet", shape=(3, 64, 64), classes=1000,
        params=295_899_267, augment=0.0, steps=256, churn=dict(S_churn=40.0, S_min=0.05, S_max=50.0, S_noise=1.003),
        fid=1.36, kwargs=dict(model_channels=192, channel_mult=[1, 2, 3, 4], dropout=0.10),
        # EDM trained in fp16; the recipe states bf16-mixed in its place
        train=dict(total_kimg=2_500_000, batch_size=4096, lr=1e-4, lr_rampup_kimg=10_000, ema_halflife_kimg=50_000,
                   ema_rampup_ratio=0.05, augment=0.0, precision="bf16-mixed")),
}
# The SIMS settings that have a source (Neon, SPEC §1); AFHQv2 and ImageNet have none.
NEON = {"cifar10": dict(num_synthetic=6000, aux_kimg=6000, aux_lr=1e-4),
        "ffhq64": dict(num_synthetic=18000, aux_kimg=3000, aux_lr=4e-6)}
NAMES = list(EDM)


def recipe(name: str, sims: bool = False) -> Path:
    return CONFIGS / ("sims" if sims else "") / f"{name}.yaml"


# --------------------------------------------------------------------------------------------------
# Stand-ins
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    """Tiny data sets, an empty Inception weights file, an EDM-style reference .npz."""
    root = tmp_path_factory.mktemp("standins")
    rng = np.random.default_rng(0)
    data = {}
    for res, labelled in ((32, False), (64, False), (64, True)):
        images = rng.integers(0, 256, size=(4, res, res, 3), dtype=np.uint8)
        labels = np.array([0, 1, 2, 999]) if labelled else None
        data[(res, labelled)] = write_image_folder(root / f"data{res}{'-labels' if labelled else ''}.zip", images,
                                                   labels, layout="NHWC")
    weights = root / "pt_inception-2015-12-05-6726825d.pth"
    weights.write_bytes(b"")  # validate checks the file exists; it does not open it
    reference = root / "fid-ref.npz"
    np.savez(reference, mu=np.zeros(2048), sigma=np.eye(2048))  # EDM's keys, no extractor record
    return types.SimpleNamespace(root=root, data=data, weights=weights, reference=reference)


@pytest.fixture
def fake_torch_fidelity(monkeypatch):
    """torch-fidelity is not installed on this machine: an empty module lets validate's import check pass.

    Everything validate imports is imported first, so no library (Lightning, torchmetrics) sees the stub
    while deciding at import time whether torch-fidelity is available; it is removed after the test."""
    import lightning  # noqa: F401
    import sims.stages.evaluate  # noqa: F401
    import sims.stages.sims  # noqa: F401

    stub = types.ModuleType("torch_fidelity")
    stub.__spec__ = importlib.machinery.ModuleSpec("torch_fidelity", None)
    monkeypatch.setitem(sys.modules, "torch_fidelity", stub)


def released_snapshot(name: str) -> EDMSnapshot:
    """EDM's released network ``name`` as the safe loader would return it, tensors on the meta device
    (resample filters real: the converter checks their values)."""
    e = EDM[name]
    c, r, _ = e["shape"]
    model_type = e["backbone"]
    backbone_kwargs = dict(img_resolution=r, in_channels=c, out_channels=c, label_dim=e["classes"], **e["kwargs"])
    precond_kwargs = dict(img_resolution=r, img_channels=c, label_dim=e["classes"], model_type=model_type,
                          use_fp16=name == "imagenet64", **e["kwargs"])
    shapes = edm_tensor_shapes(model_type, resolve_backbone_kwargs(model_type, backbone_kwargs))
    tensors = collections.OrderedDict(
        (n, torch.full(s, 0.25) if n.endswith("resample_filter") else torch.empty(s, device="meta"))
        for n, s in shapes.items())
    aug = e["augment"]
    return EDMSnapshot(
        precond="EDMPrecond", precond_kwargs=precond_kwargs,
        precond_attrs=dict(img_resolution=r, img_channels=c, label_dim=e["classes"], sigma_data=0.5),
        backbone=model_type, backbone_kwargs=backbone_kwargs, tensors=tensors, loss_fn="EDMLoss",
        loss_kwargs=dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5),
        augment_pipe="AugmentPipe" if aug else None,
        augment_kwargs=dict(p=aug, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1) if aug else None,
        dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path=f"datasets/{name}.zip",
                            use_labels=bool(e["classes"]), xflip=False, cache=True, resolution=r),
        sha256="0" * 64,
        tree=ClassNode("EDMPrecond", precond_kwargs,
                       collections.OrderedDict(model=ClassNode(model_type, backbone_kwargs, collections.OrderedDict()))))


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """name -> (ImportedNetwork, run dir laid out as sims-import writes it, its config)."""
    out = {}
    for name in NAMES:
        snap = released_snapshot(name)
        net = convert_edm_network(snap, build=False)
        run = tmp_path_factory.mktemp(f"edm-{name}")
        cfg = imported_config(net, snap, run)
        (run / "base").mkdir()
        # the import's metadata (the same call as sims-import), with a one-tensor body: validate reads only the header
        save_denoiser(torch.nn.Linear(1, 1, bias=False), run / "base" / "ema.safetensors", network=net.network,
                      data_shape=net.data_shape, label_dim=net.label_dim, sigma_data=net.sigma_data, kimg=None,
                      stage="imported", source=snap.dataset_kwargs["path"], source_sha256=snap.sha256, licence=LICENCE)
        save_config(cfg, run / "config.yaml")
        (run / "IMPORT.json").write_text(json.dumps({**net.info, "licence": LICENCE}))
        (run / "base" / "DONE").write_text(f"imported={snap.sha256}\n")
        out[name] = (net, run, cfg)
    return out


def load(name: str, standins, *, sims: bool = False, extra=()):
    e = EDM[name]
    data = standins.data[(e["shape"][1], bool(e["classes"]))]
    return load_config(recipe(name, sims), [f"run_dir={standins.root / 'runs' / name}", f"data.path={data}", *extra])


def with_inception(standins):
    return [f"sims.inception_weights={standins.weights}", f"sims.reference={standins.reference}"]


# --------------------------------------------------------------------------------------------------
# Networks: EDM's parameter counts, and the same network as the import of EDM's file
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_recipe_networks_have_edms_parameter_count_and_match_the_import(name, standins, imported):
    e = EDM[name]
    net, _, _ = imported[name]
    assert net.info["parameters"] == e["params"]  # the converter's count for EDM's released file
    assert net.data_shape == list(e["shape"]) and net.label_dim == e["classes"]
    for sims in (False, True):
        cfg = load(name, standins, sims=sims)
        with torch.device("meta"):
            d = build_denoiser(OmegaConf.to_container(cfg.network), e["shape"], e["classes"], 0.5,
                               str(cfg.train.precision))
        assert sum(p.numel() for p in d.parameters()) == e["params"], recipe(name, sims)
        # every setting the import derives from EDM's file is the recipe's
        for key, value in net.network.items():
            assert cfg.network[key] == value, f"{recipe(name, sims)}: network.{key}"
        assert [cfg.data.channels, cfg.data.resolution, cfg.data.resolution] == net.data_shape
        assert cfg.data.use_labels == bool(net.label_dim) and cfg.data.name == "folder"


# --------------------------------------------------------------------------------------------------
# Settings against their sources
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_recipe_settings_are_edms(name, standins, imported):
    e = EDM[name]
    _, _, icfg = imported[name]
    for sims in (False, True):
        cfg = load(name, standins, sims=sims)
        where = recipe(name, sims)
        for key, value in e["train"].items():
            assert cfg.train[key] == value, f"{where}: train.{key}"
        assert list(cfg.train.betas) == [0.9, 0.999] and cfg.train.eps == 1e-8
        assert (cfg.train.P_mean, cfg.train.P_std, cfg.train.sigma_data) == (-1.2, 1.2, 0.5)
        # what sims-import derives from EDM's file: the augmentation p, the loss, EDM's recommended sampler
        assert cfg.train.augment == icfg.train.augment == e["augment"]
        for key, value in edm_sampler_settings(e["shape"], e["classes"], cfg.network.arch).items():
            assert cfg.sampler[key] == value == icfg.sampler[key], f"{where}: sampler.{key}"
        assert cfg.sampler.num_steps == e["steps"] and cfg.sampler.solver == "heun"
        assert (cfg.sampler.sigma_min, cfg.sampler.sigma_max, cfg.sampler.rho) == (0.002, 80.0, 7.0)
        if e["churn"] is None:
            assert cfg.sampler.S_churn == 0
        else:
            assert {k: cfg.sampler[k] for k in e["churn"]} == e["churn"]
        assert cfg.data.xflip is False  # EDM's --xflip default
        # evaluation defaults of benchmark recipes (issue 12, SPEC §4)
        s = cfg.sims
        assert list(s.report_seed_offsets) == [0, 50_000, 100_000] and s.report_num_samples == 50_000
        assert list(s.selection_seed_offsets) == [200_000, 300_000] and s.selection_num_samples == 10_000
        assert s.features == "inception" and s.inception_weights is None and s.reference is None
        assert [float(w) for w in s.omegas] == OMEGA_GRID
        assert s.aux_lr_rampup_kimg <= 0.05 * s.aux_kimg  # no 10-Mimg ramp on a short fine-tune (SPEC §1)
        assert s.aux_ema_rampup_ratio is None  # EDM's --transfer
        assert s.aux_snapshot_every_kimg is not None and s.aux_snapshot_every_kimg < s.aux_kimg
        for key, value in NEON.get(name, {}).items():
            assert s[key] == value, f"{where}: sims.{key}"
    # the base recipe's SIMS stage is the SIMS recipe's
    a = OmegaConf.to_container(load(name, standins).sims)
    b = OmegaConf.to_container(load(name, standins, sims=True).sims)
    for key in ("enabled", "base"):
        a.pop(key), b.pop(key)
    assert a == b


@pytest.mark.parametrize("name", NAMES)
def test_recipe_headers_state_sources_and_commands(name):
    base, sims = recipe(name).read_text(), recipe(name, True).read_text()
    assert f"sims-train configs/{name}.yaml" in base and "sims-dataset" in base
    assert f"sims-import edm {EDM[name]['pkl']} --out runs/" in sims
    assert f"sims-train configs/sims/{name}.yaml" in sims and "sims.base=runs/" in sims
    for text in (base, sims):
        assert EDM[name]["pkl"] in text
    if name in ("afhqv2-64", "imagenet64"):
        assert "CHOSEN, NOT SOURCED" in sims
    if name == "imagenet64":
        for text in (base, sims):
            assert "bf16-mixed" in text and "IN PLACE OF EDM's fp16" in text
    else:
        assert "bf16" not in base and "bf16" not in sims


def test_adopted_base_has_only_its_imported_ema(standins):
    # sweep_cells reads base/ema-<key>.safetensors for every train.ema_halflives_kimg: an import has none
    for name in NAMES:
        assert list(load(name, standins, sims=True).train.ema_halflives_kimg) == []


# --------------------------------------------------------------------------------------------------
# validate() on every recipe
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_edm_recipe_validates(name, standins, fake_torch_fidelity):
    validate(load(name, standins))  # the base training alone
    validate(load(name, standins, extra=["sims.enabled=true", *with_inception(standins)]))  # then SIMS


@pytest.mark.parametrize("name", NAMES)
def test_sims_recipe_validates_on_the_imported_base(name, standins, imported, fake_torch_fidelity):
    e = EDM[name]
    _, run, _ = imported[name]
    cfg = load(name, standins, sims=True, extra=[f"sims.base={run}", *with_inception(standins)])
    validate(cfg)
    # the adopted base fits the data this config reads (adopt_base's check; validate skips it for folders,
    # whose label_dim is known only from dataset.json)
    data = load_real_dataset(cfg.data)
    assert data.item_shape == e["shape"] and (data.label_dim if cfg.data.use_labels else 0) == e["classes"]
    check_base_fits(read_metadata(run / "base" / "ema.safetensors"), data.item_shape,
                    data.label_dim if cfg.data.use_labels else 0, run)


def test_sims_recipe_refusals(standins, imported, fake_torch_fidelity):
    _, c10, _ = imported["cifar10"]
    _, ffhq, _ = imported["ffhq64"]
    with pytest.raises(ConfigError, match="sims.inception_weights"):
        validate(load("cifar10", standins, sims=True, extra=[f"sims.base={c10}"]))
    with pytest.raises(ConfigError, match="sims.base"):
        validate(load("cifar10", standins, sims=True, extra=[f"sims.base={standins.root}", *with_inception(standins)]))
    with pytest.raises(ConfigError, match="shape"):  # a 64x64 base for the 32x32 data
        check_base_fits(read_metadata(ffhq / "base" / "ema.safetensors"), (3, 32, 32), 0, ffhq)
    with pytest.raises(ConfigError, match="label_dim"):  # the conditional base without data.use_labels
        _, inet, _ = imported["imagenet64"]
        check_base_fits(read_metadata(inet / "base" / "ema.safetensors"), (3, 64, 64), 0, inet)


def test_inception_check_is_real_without_the_stub(standins):
    try:
        import torch_fidelity  # noqa: F401
    except Exception:
        with pytest.raises(ConfigError, match="torch-fidelity"):
            validate(load("cifar10", standins, extra=["sims.enabled=true", *with_inception(standins)]))
    else:  # pragma: no cover - a machine with torch-fidelity
        validate(load("cifar10", standins, extra=["sims.enabled=true", *with_inception(standins)]))


def test_loop_recipe_validates(standins, fake_torch_fidelity):
    cfg = load_config(CONFIGS / "loop" / "cifar10.yaml",
                      [f"run_dir={standins.root / 'loop'}", f"data.path={standins.data[(32, False)]}",
                       *with_inception(standins)])
    validate(cfg)
    base = load("cifar10", standins)
    for section in ("data", "network", "train", "sampler"):  # every generation trains EDM's CIFAR-10 recipe
        a, b = OmegaConf.to_container(cfg[section]), OmegaConf.to_container(base[section])
        a.pop("path", None), b.pop("path", None)
        assert a == b, section
    for key in ("num_synthetic", "aux_kimg", "aux_lr", "aux_lr_rampup_kimg"):
        assert cfg.sims[key] == base.sims[key]
