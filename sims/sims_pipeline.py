"""SIMS (Alemohammad et al. 2024, arXiv 2408.16333, Algorithm 1) on top of a trained base model:
synthetic data → auxiliary fine-tune → guided evaluation over the ω grid."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch
from omegaconf import OmegaConf

from sims.diffusion import SIMSGuidance
from sims.training.export import WeightsError, load_denoiser

COMPAT_KEYS = ("network", "data_shape", "label_dim", "sigma_data")


def check_compatible(base_meta: dict, aux_meta: dict, aux_path: Path) -> None:
    """The auxiliary model must have the base's architecture, data shape, classes and σ_data.

    Raises:
        WeightsError: naming the first mismatching field.
    """
    for key in COMPAT_KEYS:
        if base_meta.get(key) != aux_meta.get(key):
            raise WeightsError(f"auxiliary model {aux_path} does not match the base model: {key} is "
                               f"{aux_meta.get(key)!r}, base has {base_meta.get(key)!r}")


def load_run_denoiser(run_dir: str | Path, omega: float = 0.0, *, sigma_interval: Optional[Sequence[float]] = None,
                      device="cpu") -> Tuple[object, dict, dict]:
    """The denoiser to sample a run with: the base EMA model (ω = 0) or SIMS guidance with the run's
    auxiliary model (ω > 0).

    Returns:
        (denoiser, the run's config as a dict, the base weights' metadata).
    Raises:
        WeightsError: not a run directory, no base weights, ω > 0 but no (or a mismatched) auxiliary model.
        ValueError: ω not finite or negative.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise WeightsError(f"{run_dir} is not a sims run directory (no config.yaml)")
    cfg = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=True)
    base, meta = load_denoiser(run_dir / "base" / "ema.safetensors", device)
    if omega == 0 and sigma_interval is None:
        SIMSGuidance(base, base, omega)  # validates omega
        return base, cfg, meta
    aux_path = run_dir / "aux" / "ema.safetensors"
    if not aux_path.is_file():
        SIMSGuidance(base, base, omega)  # a bad omega is reported before a missing model
        raise WeightsError(f"{run_dir} has no auxiliary model ({aux_path}): guidance omega={omega} needs one; "
                           "train it with sims-train CONFIG run_dir=... sims.enabled=true")
    aux, aux_meta = load_denoiser(aux_path, device)
    check_compatible(meta, aux_meta, aux_path)
    return SIMSGuidance(base, aux, omega, sigma_interval=sigma_interval), cfg, meta


def aux_train_config(cfg) -> dict:
    """The auxiliary fine-tune's ``train`` settings: the base's, with SIMS's own lr, ramp-up and EMA.

    SPEC §1: the fine-tune has its own schedule — a 10-Mimg ramp-up on a few-Mimg fine-tune would
    never reach the nominal learning rate.
    """
    from sims.config import to_container

    t = to_container(cfg.train)
    s = cfg.sims
    if s.aux_lr is not None:
        t["lr"] = float(s.aux_lr)
    t["lr_rampup_kimg"] = float(s.aux_lr_rampup_kimg)
    if s.aux_ema_halflife_kimg is not None:
        t["ema_halflife_kimg"] = float(s.aux_ema_halflife_kimg)
    return t


def check_seed_sets(cfg) -> None:
    """Synthetic seeds must be disjoint from every evaluation seed set.

    Raises:
        ConfigError: overlapping ranges, named.
    """
    from sims.config import ConfigError

    s = cfg.sims
    syn = (int(s.synthetic_seed_offset), int(s.synthetic_seed_offset) + int(s.num_synthetic))
    for off in s.eval_seed_offsets:
        ev = (int(off), int(off) + int(s.eval_num_samples))
        if syn[0] < ev[1] and ev[0] < syn[1]:
            raise ConfigError(f"synthetic seeds [{syn[0]}, {syn[1]}) overlap evaluation seeds [{ev[0]}, {ev[1]}): "
                              "change sims.synthetic_seed_offset or sims.eval_seed_offsets")
    if int(s.num_synthetic) < int(cfg.train.batch_size):
        raise ConfigError(f"sims.num_synthetic={s.num_synthetic} is smaller than one batch ({cfg.train.batch_size})")


def device_for(cfg) -> torch.device:
    """The device of this rank: the current CUDA device when training on GPUs, else CPU."""
    if cfg.train.accelerator != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def run_sims(cfg, run_dir: Path, dataset, base_weights: Path) -> Optional[Path]:
    """SIMS Algorithm 1 steps 2–4 after the base model: resumable stages under ``run_dir``::

        synthetic/   n_s samples of the base EMA model (seeds synthetic_seed_offset + i), shards + manifest
        aux/         the auxiliary model fine-tuned from the base weights on synthetic/ for aux_kimg
        eval/        FD / precision / recall per ω and seed set, report.json/.md, fid_vs_omega.png

    Returns:
        The path of ``eval/report.json`` (rank 0), else None.
    """
    import lightning as L
    from safetensors.torch import load_file

    from sims.config import to_container
    from sims.data.store import SyntheticStore, fill_store
    from sims.evaluation import evaluate_grid
    from sims.generation import dist_info, sample_seeds
    from sims.pipeline import fit_stage, write_grid
    from sims.training.module import EDMModule

    check_seed_sets(cfg)
    device = device_for(cfg)
    base, meta = load_denoiser(base_weights, device)
    shape, label_dim = tuple(meta["data_shape"]), int(meta["label_dim"])
    sampler = to_container(cfg.sampler)

    # Step 2: synthetic data from the base model.
    store = SyntheticStore(run_dir / "synthetic")
    seeds = range(int(cfg.sims.synthetic_seed_offset), int(cfg.sims.synthetic_seed_offset) + int(cfg.sims.num_synthetic))
    fill_store(store, seeds, lambda b: sample_seeds(base, b, shape, label_dim=label_dim, sampler=sampler, device=device),
               int(cfg.sampler.batch_size), shape, model=str(base_weights))
    synthetic = store.load(label_dim)

    # Step 3: the auxiliary model, initialised from the base EMA weights, with its own schedule.
    base_module = EDMModule(to_container(cfg.network), to_container(cfg.train), shape, label_dim)
    base_module.ema.module.load_state_dict(load_file(str(base_weights)))
    aux_module = EDMModule.from_base(base_module, aux_train_config(cfg))
    L.seed_everything(int(cfg.train.seed) + 1, workers=True, verbose=False)
    if dist_info()[0] == 0:
        print(f"[sims] auxiliary: fine-tune on {len(synthetic)} synthetic samples for {cfg.sims.aux_kimg} kimg "
              f"at lr {aux_module.train_cfg['lr']}", flush=True)
    aux_weights = fit_stage(cfg, run_dir / "aux", aux_module, synthetic, float(cfg.sims.aux_kimg))
    aux, aux_meta = load_denoiser(aux_weights, device)
    check_compatible(meta, aux_meta, aux_weights)
    write_grid(cfg, aux_weights, run_dir / "aux" / "grid.png", dataset)

    # Step 4: guided sampling over the ω grid, against the base (ω = 0) on the same seeds.
    report = evaluate_grid(cfg, run_dir / "eval", dataset, base, aux, shape, label_dim, device)
    if dist_info()[0] == 0:
        if "best_omega" in report:
            print(f"[sims] best omega {report['best_omega']:g}: FD {report['best_fd_mean']:.4g} vs base "
                  f"{report['base_fd_mean']:.4g} ({report['relative_change'] * 100:+.1f}%)", flush=True)
        return run_dir / "eval" / "report.json"
    return None
