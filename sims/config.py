"""Typed configuration: OmegaConf structured configs merged from YAML and ``key=value`` overrides.

A run is fully described by one :class:`RunConfig`. YAML files in ``configs/`` are merged over the
typed defaults below; unknown keys and values of the wrong type are errors (OmegaConf's struct
mode), so a typo never silently becomes a default. The resolved config is written to the run
directory (``config.yaml``) so every result can be traced to the settings that produced it.

Units follow the field: training length and schedules in kimg (thousands of training images
seen), σ in data units (images in [-1, 1]), EMA half-life in kimg.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException


from sims.errors import ConfigError

# The keys that may differ between a run and its resumption without changing what it computes:
# where it runs (devices, nodes, per-rank batch), where outputs go, logging, and the ω grid (results
# are cached per cell). The stage run directory and the loop's config hash both use this one list.
RESUME_KEYS = frozenset({
    "run_dir", "train.devices", "train.num_nodes", "train.accelerator", "train.batch_gpu",
    "train.progress_bar", "train.wandb", "train.log_every_steps", "data.num_workers", "sampler.batch_size",
    "sims.omegas", "sims.enabled", "loop.enabled",
})


@dataclass
class DataConfig:
    """Where the real training data comes from.

    ``name``: ``digits`` (scikit-learn's bundled 8x8 scans), ``toy2d`` (scikit-learn 2-D/3-D toys),
    ``folder`` (EDM-format zip or folder of PNGs with ``dataset.json``), ``cifar10`` (python pickle
    batches). ``resolution`` is the side in pixels the images must have (digits: 8 or 16; folder
    data sets are checked against it). ``toy``: moons | circles | blobs | swiss_roll | gmm.
    """

    name: str = "digits"
    path: Optional[str] = None
    split: str = "train"  # cifar10: train | test
    resolution: int = 8
    channels: int = 1
    use_labels: bool = False
    toy: str = "moons"
    num_samples: int = 10000
    noise: float = 0.05
    max_size: Optional[int] = None  # take only the first max_size items (debugging, loop subsets)
    xflip: bool = False
    num_workers: int = 0
    seed: int = 0


@dataclass
class NetworkConfig:
    """Backbone F(x_in, c_noise, class_labels) of the denoiser (EDM Table 1, 'network and preconditioning').

    ``arch``: ``ddpmpp`` (EDM's SongUNet with the DDPM++ settings: positional embedding, standard
    encoder/decoder, [1,1] resampling), ``adm`` (EDM's DhariwalUNet, the ImageNet-64 network), ``mlp``
    (low-dimensional data), ``diffusers_unet`` (adapter around diffusers' UNet2DModel, for comparison).
    Key names follow EDM's constructor arguments (``channel_mult_emb``, ``augment_dim``, ...).
    ``adaptive_scale``: DDPM++ only; True injects the noise embedding as FiLM scale-shift instead of
    EDM's additive injection (not EDM's network; ADM is always adaptive). ``augment_dim``: width of
    EDM's augmentation labels (9 when trained with ``train.augment > 0``, 0 otherwise).
    """

    arch: str = "ddpmpp"
    model_channels: int = 128
    channel_mult: List[int] = field(default_factory=lambda: [2, 2, 2])
    channel_mult_emb: int = 4
    num_blocks: int = 4
    attn_resolutions: List[int] = field(default_factory=lambda: [16])
    dropout: float = 0.13
    adaptive_scale: bool = False
    augment_dim: int = 0
    label_dropout: float = 0.0
    channels_per_head: int = 64  # adm: attention heads = channels / channels_per_head
    # MLP backbone
    hidden_dim: int = 256
    num_layers: int = 4


@dataclass
class TrainConfig:
    """Optimisation (EDM Table 7 conventions: lengths in kimg, Adam, linear learning-rate ramp-up).

    ``batch_size`` is the global batch (all ranks, one optimizer step); ``batch_gpu`` the images one
    rank processes at a time (null: ``batch_size / world size``); ``batch_size / (world·batch_gpu)``
    micro-batches are accumulated per step. Training randomness (σ, noise, dropout, augmentation)
    is a function of (seed, micro-batch slice, step), so with a fixed ``batch_gpu`` a run gives the
    same result on any number of processes. ``ema_halflife_kimg`` / ``ema_rampup_ratio``: EDM's EMA,
    half-life = min(halflife, ratio · kimg seen); ``ema_halflives_kimg``: further EMAs tracked at
    once (exported beside the main one, swept by the SIMS evaluation). ``augment``: EDM's non-leaky
    augmentation probability p (needs ``network.augment_dim=9``). ``precision``: ``32-true`` or
    ``bf16-mixed`` (autocast confined to the backbone).
    """

    total_kimg: float = 200000.0
    batch_size: int = 512
    batch_gpu: Optional[int] = None
    lr: float = 1e-3
    lr_rampup_kimg: float = 10000.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: Optional[float] = None
    ema_halflife_kimg: float = 500.0
    ema_rampup_ratio: Optional[float] = 0.05
    ema_halflives_kimg: List[float] = field(default_factory=list)
    augment: float = 0.0
    P_mean: float = -1.2
    P_std: float = 1.2
    sigma_data: float = 0.5
    precision: str = "32-true"
    compile: bool = False
    seed: int = 0
    devices: int = 1
    accelerator: str = "auto"
    num_nodes: int = 1
    log_every_steps: int = 50
    ckpt_every_kimg: float = 50.0
    grid_seeds: int = 64
    eval_every_kimg: float = 0.0  # > 0: log the Fréchet distance (sims.features) of the EMA model this often
    eval_num_samples: int = 1000
    eval_seed_offset: int = 3_000_000  # the FD callback's seeds: inside no report set
    wandb: bool = False
    progress_bar: bool = True


@dataclass
class SamplerConfig:
    """EDM Algorithm 2 settings (EDM section 3 and Table 5)."""

    num_steps: int = 18
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    S_churn: float = 0.0
    S_min: float = 0.0
    S_max: float = float("inf")
    S_noise: float = 1.0
    solver: str = "heun"
    batch_size: int = 256


@dataclass
class ControlConfig:
    """Distribution control (SPEC §1): the auxiliary model's synthetic set is composed, by a judge's
    labels, so that guidance moves the sampled shares toward ``target`` ({group: share}; unlisted
    groups share the rest in proportion to their base shares) at the design weight ``omega``
    (:func:`sims.stages.control.compose_aux_shares`). ``judge``: ``digits`` (the shipped CNN),
    ``pixel-digits`` or a ``package.module:function`` entry point with optional safetensors
    ``judge_weights``; ``independent_judge`` measures the shares too but chooses nothing. Base
    samples are drawn up to ``max_synthetic`` to find enough of each group.
    """

    enabled: bool = False
    target: Dict[int, float] = field(default_factory=dict)
    omega: float = 1.0
    floor: float = 0.005
    judge: str = "digits"
    judge_weights: Optional[str] = None
    independent_judge: Optional[str] = "pixel-digits"
    independent_judge_weights: Optional[str] = None
    max_synthetic: int = 20_000


@dataclass
class SIMSConfig:
    """SIMS (Alemohammad et al. 2024, Algorithm 1): auxiliary fine-tune and guided evaluation.

    ``base``: a completed run directory (e.g. written by ``sims-import``) or weights file whose
    weights are this run's base model instead of training one; the network is then the base's (its
    metadata), and the config's ``network`` section is not used. ``num_synthetic`` = n_s, ``aux_kimg`` = budget B
    (kimg); ``aux_lr``, ``aux_lr_rampup_kimg``, ``aux_ema_halflife_kimg`` and
    ``aux_ema_rampup_ratio`` (null: off, as EDM's transfer learning) give the auxiliary model its
    own schedule; ``aux_snapshot_every_kimg`` exports auxiliary snapshots for the sweep.
    Evaluation protocol (SPEC §4): every setting chosen by a metric (ω from ``omegas``, the
    auxiliary snapshot, the EMA lengths) is chosen on the *selection* seed sets, then the base and
    the chosen SIMS setting are evaluated once on the disjoint *report* seed sets.
    ``sigma_interval`` (lo, hi] restricts guidance (Kynkäänniemi et al. 2024); null = everywhere.
    """

    enabled: bool = False
    base: Optional[str] = None
    num_synthetic: int = 3000
    synthetic_seed_offset: int = 1_000_000
    aux_kimg: float = 192.0
    aux_lr: Optional[float] = None  # None: the base lr
    aux_lr_rampup_kimg: float = 0.0
    aux_ema_halflife_kimg: Optional[float] = None  # None: the base EMA half-life
    aux_ema_rampup_ratio: Optional[float] = None  # None: no ramp-up (EDM --transfer)
    aux_ema_halflives_kimg: List[float] = field(default_factory=list)
    aux_snapshot_every_kimg: Optional[float] = None
    omegas: List[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0])
    sigma_interval: Optional[List[float]] = None
    selection_seed_offsets: List[int] = field(default_factory=lambda: [200_000, 300_000])
    selection_num_samples: int = 10_000
    report_seed_offsets: List[int] = field(default_factory=lambda: [0, 50_000, 100_000])
    report_num_samples: int = 50_000
    features: str = "auto"  # auto | digits | identity | inception
    reference: Optional[str] = None  # .npz with mu/sigma; None: computed from the training data
    inception_weights: Optional[str] = None  # local pt_inception-2015-12-05 file; never downloaded
    control: ControlConfig = field(default_factory=ControlConfig)


@dataclass
class LoopConfig:
    """Self-consuming generation loop (SPEC section 3). See :mod:`sims.loop`."""

    enabled: bool = False
    model: str = "diffusion"  # diffusion | gaussian | kde
    workflows: List[str] = field(default_factory=lambda: ["replace", "accumulate", "accumulate-subsample"])
    methods: List[str] = field(default_factory=lambda: ["standard"])
    generations: int = 5
    num_real: int = 1000
    num_synthetic: int = 1000
    subsample_size: Optional[int] = None  # accumulate-subsample: training-set size (None: num_real)
    num_eval: Optional[int] = None  # samples evaluated per generation (None: the synthetic data itself)
    omega: float = 0.0  # SIMS guidance weight of the sims streams' sampler
    aux_data: str = "own"  # what a sims stream's auxiliary learns from: own | synthetic | both (see sims.loop.models.diffusion)
    init: str = "scratch"  # scratch | previous
    seeds: List[int] = field(default_factory=lambda: [0])
    # Gaussian / KDE task settings ("Collapse or Thrive?")
    dim: int = 10
    sampling_bias: float = 1.0
    bandwidth: float = 0.1
    toy: str = "moons"
    num_test: int = 500


@dataclass
class RunConfig:
    """Everything one ``sims-train`` run needs."""

    run_dir: str = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    sims: SIMSConfig = field(default_factory=SIMSConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)


OPEN_KEYS = ("sims.control.target",)


def _raise(message: str) -> None:
    raise ConfigError(message)


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = (), base=RunConfig) -> DictConfig:
    """Merge the typed defaults, a YAML file and ``key=value`` overrides into a struct config.

    Args:
        path: YAML file (may be None: defaults only).
        overrides: dotlist strings such as ``train.lr=2e-4`` or ``run_dir=runs/a``.
        base: the structured-config class to validate against.
    Returns:
        A read-only-keys (struct) DictConfig.
    Raises:
        ConfigError: missing file, YAML syntax error, unknown key, wrong value type, or an override
            not of the form ``key=value``; the message names the key and the source.
    """
    schema = OmegaConf.structured(base)
    OmegaConf.set_struct(schema, True)
    for key in OPEN_KEYS:  # maps whose keys are data (group ids), not config names
        node = OmegaConf.select(schema, key)
        if node is not None:
            OmegaConf.set_struct(node, False)
    cfg = schema
    if path is not None:
        path = Path(path)
        if not path.is_file():
            _raise(f"config file not found: {path}")
        try:
            file_cfg = OmegaConf.load(path)
        except Exception as exc:  # yaml errors come in many types
            _raise(f"cannot parse {path}: {exc}")
        try:
            cfg = OmegaConf.merge(cfg, file_cfg)
        except OmegaConfBaseException as exc:
            _raise(f"{path}: {_describe(exc)}")
    for item in overrides:
        if "=" not in item or item.startswith("="):
            _raise(f"override {item!r} is not of the form key=value (e.g. train.lr=2e-4)")
    if overrides:
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        except OmegaConfBaseException as exc:
            _raise(f"command-line override: {_describe(exc)}")
    OmegaConf.set_struct(cfg, True)
    return cfg


def _describe(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    if isinstance(exc, ConfigKeyError):
        return f"unknown config key {key!r}"
    msg = str(exc).splitlines()[0]
    return f"bad value for {key!r}: {msg}" if key else msg


def save_config(cfg: DictConfig, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically (temporary file + rename)."""
    from sims.utils import atomic_write_text

    atomic_write_text(Path(path), OmegaConf.to_yaml(cfg, resolve=True))


def to_container(cfg: DictConfig) -> dict:
    """Plain-dict view of a config (for JSON, safetensors metadata, hyper-parameter logging)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
