"""Check a whole run config before any work starts (no file is written, nothing is trained).

Everything a stage would otherwise find out only when it starts — after a base training that may
take days — is checked here, each failure a one-line :class:`~sims.errors.ConfigError` naming the
key: the data path, the network geometry, the batch decomposition, the sampler settings, the ω grid
and σ-interval, the feature extractor, the Inception weights and torch-fidelity, the reference
statistics (loadable, right dimension, right extractor), the disjointness of the seed sets, an
adopted base (``sims.base``), and the loop's model, workflows, methods, sizes and ω.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Tuple

from omegaconf import DictConfig, OmegaConf

from sims.errors import ConfigError, SimsError

SOLVERS = ("heun", "euler")


def _wrap(key: str, fn: Callable, *args, **kwargs):
    """Run a layer's own check; re-raise its error as a ConfigError that names ``key``."""
    try:
        return fn(*args, **kwargs)
    except ConfigError:
        raise
    except (SimsError, ValueError) as exc:
        raise ConfigError(f"{key}: {str(exc).splitlines()[0]}") from None


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def data_shape_of(cfg: DictConfig) -> Tuple[Tuple[int, ...], int]:
    """(sample shape, label_dim) the data config will give, without reading the data (label_dim of a
    folder data set is taken as 0 here; the data set itself is checked when loaded).

    Raises:
        ConfigError: unknown data set or toy, missing path, an impossible resolution.
    """
    from sims.data import DATASET_NAMES, TOY_NAMES, toy_dim

    d = cfg.data
    _require(d.name in DATASET_NAMES, "data.name", f"unknown data set {d.name!r}; choose one of {', '.join(DATASET_NAMES)}")
    if d.name == "toy2d":
        _require(d.toy in TOY_NAMES, "data.toy", f"unknown toy {d.toy!r}; choose one of {', '.join(TOY_NAMES)}")
        return (toy_dim(d.toy),), 0
    if d.name == "digits":
        _require(d.resolution in (8, 16), "data.resolution", f"digits are 8x8 or 16x16, got {d.resolution}")
        _require(d.channels in (1, 3), "data.channels", f"digits are gray (1) or gray repeated to RGB (3), got {d.channels}")
        return (int(d.channels), int(d.resolution), int(d.resolution)), 10 if d.use_labels else 0
    _require(bool(d.path), "data.path", f"data.name={d.name} needs data.path (a folder or .zip of PNGs, or the "
             "cifar-10-batches-py folder)")
    _require(Path(d.path).expanduser().exists(), "data.path", f"data set not found: {d.path}")
    if d.name == "cifar10":
        _require(d.resolution == 32, "data.resolution", f"CIFAR-10 images are 32x32, got {d.resolution}")
    return (int(d.channels), int(d.resolution), int(d.resolution)), 10 if (d.use_labels and d.name == "cifar10") else 0


def data_classes(cfg: DictConfig) -> int:
    """Classes of the data set's labels (whether or not the model is conditioned on them): 10 for
    digits and CIFAR-10, from ``dataset.json`` for a folder or zip (0 when it has none)."""
    import json
    import zipfile

    if cfg.data.name in ("digits", "cifar10"):
        return 10
    if cfg.data.name != "folder":
        return 0
    path = Path(cfg.data.path).expanduser()
    try:
        if path.is_dir():
            meta = json.loads((path / "dataset.json").read_text())
        else:
            with zipfile.ZipFile(path) as z:
                meta = json.loads(z.read("dataset.json"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return 0
    labels = meta.get("labels") or []
    return 1 + max((int(lab) for _, lab in labels), default=-1)


def check_network(cfg: DictConfig, network: dict, shape, label_dim: int) -> None:
    """Build the denoiser of ``network`` (the run's: the config's, or an adopted base's) on the meta device
    (no memory): every geometry error surfaces here."""
    import torch

    from sims.training.denoiser import build_denoiser

    with torch.device("meta"):
        _wrap("network", build_denoiser, network, shape, label_dim,
              float(cfg.train.sigma_data), str(cfg.train.precision))


def check_train(cfg: DictConfig, network: dict) -> None:
    from sims.dist import launch_shape, detect_launcher
    from sims.training.denoiser import PRECISIONS
    from sims.training.sampler import accumulation_steps

    t = cfg.train
    for key in ("total_kimg", "batch_size", "lr", "ema_halflife_kimg", "ckpt_every_kimg"):
        _require(float(t[key]) > 0, f"train.{key}", f"must be > 0, got {t[key]}")
    _require(t.precision in PRECISIONS, "train.precision", f"must be one of {sorted(PRECISIONS)}, got {t.precision!r}")
    _require(0.0 <= float(t.augment) <= 1.0, "train.augment", f"is a probability in [0, 1], got {t.augment}")
    if t.augment > 0:
        _require(int(network.get("augment_dim", 0) or 0) == 9, "network.augment_dim",
                 f"train.augment={t.augment} needs network.augment_dim=9 (EDM's augmentation labels)")
    for h in t.ema_halflives_kimg:
        _require(float(h) > 0, "train.ema_halflives_kimg", f"half-lives must be > 0, got {list(t.ema_halflives_kimg)}")
    _require(str(t.accelerator).lower() in ("auto", "gpu", "cuda", "cpu"), "train.accelerator",
             f"must be auto, gpu or cpu, got {t.accelerator!r}")
    local, nodes = _wrap("train.devices", launch_shape, detect_launcher(), int(t.devices), int(t.num_nodes))
    world = local * nodes
    batch_gpu = int(t.batch_gpu) if t.batch_gpu else int(t.batch_size) // world
    _wrap("train.batch_gpu", accumulation_steps, int(t.batch_size), max(batch_gpu, 1), world)


def check_sampler(cfg: DictConfig) -> None:
    s = cfg.sampler
    _require(s.solver in SOLVERS, "sampler.solver", f"must be one of {', '.join(SOLVERS)}, got {s.solver!r}")
    _require(int(s.num_steps) >= 1, "sampler.num_steps", f"must be >= 1, got {s.num_steps}")
    _require(float(s.S_churn) >= 0, "sampler.S_churn", f"must be >= 0, got {s.S_churn}")
    _require(float(s.S_noise) > 0, "sampler.S_noise", f"must be > 0, got {s.S_noise}")
    _require(0 < float(s.sigma_min) < float(s.sigma_max), "sampler.sigma_min",
             f"need 0 < sigma_min < sigma_max, got {s.sigma_min} and {s.sigma_max}")
    _require(float(s.rho) > 0, "sampler.rho", f"must be > 0, got {s.rho}")
    _require(float(s.S_min) <= float(s.S_max), "sampler.S_min", f"must be <= sampler.S_max, got {s.S_min} > {s.S_max}")
    _require(int(s.batch_size) >= 1, "sampler.batch_size", f"must be >= 1, got {s.batch_size}")


def check_features(cfg: DictConfig, shape, is_image: bool) -> str:
    """The feature extractor, its weights and the reference statistics; returns the extractor name."""
    import numpy as np

    from sims.metrics import FEATURE_EXTRACTORS, check_feature_dim, load_npz
    from sims.stages.evaluate import check_reference_record, feature_dim, feature_name

    s = cfg.sims
    name = feature_name(s.features, cfg.data.name, is_image)
    _require(name in FEATURE_EXTRACTORS, "sims.features",
             f"unknown feature extractor {s.features!r}; choose auto or one of {', '.join(FEATURE_EXTRACTORS)}")
    if name == "digits":
        _require(shape[0] in (1, 3) and shape[-1] in (8, 16), "sims.features",
                 f"digits features need 8x8 or 16x16 gray (or gray-as-RGB) images, the data gives {list(shape)}")
    if name == "inception":
        _require(is_image, "sims.features", "inception features need images")
        _require(bool(s.inception_weights), "sims.inception_weights",
                 "Inception features need a local weights file (never downloaded): set "
                 "sims.inception_weights=PATH to pt_inception-2015-12-05-6726825d.pth")
        _require(Path(s.inception_weights).expanduser().is_file(), "sims.inception_weights",
                 f"no file at {s.inception_weights}")
        try:
            import torch_fidelity  # noqa: F401
        except Exception as exc:  # ImportError, or a broken torchvision raising RuntimeError/OSError
            raise ConfigError(f"sims.features=inception needs torch-fidelity: pip install 'sims[fid]' "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    if s.reference:
        mu, _ = _wrap("sims.reference", load_npz, s.reference)
        _wrap("sims.reference", check_feature_dim, np.asarray(mu), feature_dim(name, shape),
              source=f"reference statistics {s.reference}")
        _wrap("sims.reference", check_reference_record, s.reference, name)
    return name


def check_sims(cfg: DictConfig, shape, label_dim: int) -> None:
    from sims.diffusion import SIMSGuidance
    from sims.stages.seeds import check_seed_sets

    s = cfg.sims
    _require(len(s.omegas) >= 1, "sims.omegas", "the ω grid is empty")
    for w in s.omegas:
        _wrap("sims.omegas", SIMSGuidance.check_omega, w)
    _wrap("sims.sigma_interval", SIMSGuidance.check_interval, s.sigma_interval)
    for key in ("num_synthetic", "aux_kimg", "selection_num_samples", "report_num_samples"):
        _require(float(s[key]) > 0, f"sims.{key}", f"must be > 0, got {s[key]}")
    _require(len(s.selection_seed_offsets) >= 1 and len(s.report_seed_offsets) >= 1, "sims.report_seed_offsets",
             "need at least one selection and one report seed set")
    if s.aux_snapshot_every_kimg is not None:
        _require(0 < float(s.aux_snapshot_every_kimg), "sims.aux_snapshot_every_kimg", "must be > 0 or null")
    for h in s.aux_ema_halflives_kimg:
        _require(float(h) > 0, "sims.aux_ema_halflives_kimg", f"half-lives must be > 0, got {list(s.aux_ema_halflives_kimg)}")
    if s.aux_lr is not None:
        _require(float(s.aux_lr) > 0, "sims.aux_lr", f"must be > 0, got {s.aux_lr}")
    _wrap("sims.selection_seed_offsets", check_seed_sets, cfg)
    if s.control.enabled:
        from sims.stages.control_config import check_control

        check_control(s.control, data_classes(cfg), data_shape=shape, num_synthetic=int(s.num_synthetic))


def check_base(cfg: DictConfig, shape, label_dim: int) -> dict:
    """An adopted base (``sims.base``): a completed run or weights file that fits this run's data.

    Returns:
        The base weights' metadata (its ``network`` is the run's network).
    """
    from sims.stages.base import base_weights_of, check_base_fits
    from sims.training.export import read_metadata

    weights = _wrap("sims.base", base_weights_of, Path(cfg.sims.base))
    meta = _wrap("sims.base", read_metadata, weights)
    if cfg.data.name != "folder":  # a folder's label_dim is known only from its dataset.json
        _wrap("sims.base", check_base_fits, meta, shape, label_dim, cfg.sims.base)
    return meta


def check_loop(cfg: DictConfig, shape) -> None:
    from sims.diffusion import SIMSGuidance
    from sims.loop.settings import settings

    from sims.loop.settings import AUX_DATA

    lp = cfg.loop
    _wrap("loop.omega", SIMSGuidance.check_omega, lp.omega)
    _require(lp.aux_data in AUX_DATA, "loop.aux_data", f"must be one of {', '.join(AUX_DATA)}, got {lp.aux_data!r}")
    st = settings(cfg)
    if st.subsample_size is not None:
        _require(st.subsample_size <= st.num_real + st.num_synthetic, "loop.subsample_size",
                 f"{st.subsample_size} exceeds the smallest pool (generation 2: {st.num_real} real + "
                 f"{st.num_synthetic} synthetic)")
    if "sims" in st.methods:
        _require(float(lp.omega) > 0, "loop.omega", "loop.methods has 'sims' but loop.omega is 0: set the guidance "
                 "weight of the SIMS streams' sampler, e.g. loop.omega=0.5")


def validate(cfg: DictConfig) -> None:
    """Check ``cfg`` before any work: see the module docstring.

    Raises:
        ConfigError: one line naming the key and what to change.
    """
    _require(not OmegaConf.is_missing(cfg, "run_dir") and bool(cfg.run_dir), "run_dir", "no run directory: add run_dir=PATH")
    loop_model = cfg.loop.model if cfg.loop.enabled else None
    if loop_model in ("gaussian", "kde"):
        check_loop(cfg, None)
        return
    shape, label_dim = data_shape_of(cfg)
    network = OmegaConf.to_container(cfg.network, resolve=True)
    if cfg.sims.base and loop_model is None:  # an adopted base: the run's network is the base's, not the config's
        network = dict(check_base(cfg, shape, label_dim)["network"])
    check_network(cfg, network, shape, label_dim)
    check_train(cfg, network)
    check_sampler(cfg)
    if cfg.sims.enabled or cfg.train.eval_every_kimg > 0 or loop_model is not None:
        check_features(cfg, shape, len(shape) == 3)
    if cfg.sims.enabled and loop_model is None:
        check_sims(cfg, shape, label_dim)
    if loop_model is not None:
        check_loop(cfg, shape)
    _require(math.isfinite(float(cfg.train.lr)), "train.lr", f"must be finite, got {cfg.train.lr}")
