"""The diffusion model in the generation loop (``loop.model=diffusion``): EDM training with Lightning
(DDP when ``train.devices > 1``), SIMS auxiliary fine-tune for ``method=sims``, seeded sharded sampling,
and Fréchet distance / precision / recall against the real data.

One generation of a ``sims`` stream is SIMS Algorithm 1 (Alemohammad et al. 2024): base on the
generation's training set → n_s base samples → auxiliary fine-tune → the synthetic data handed to
the next generation is sampled with D = (1+ω)·D_base − ω·D_aux, ω = ``loop.sampling_guidance``.
A ``standard`` stream samples the base model (ω = 0). This is the MAD-prophylaxis experiment of
SIMS §5 when the workflow is ``accumulate`` or ``augment`` (synthetic augmentation loop).

Base models are content-addressed: ``RUN/models/_bases/<hash of (training data, seed, warm start)>``,
so identical fits (generation 1 of the standard and the SIMS stream) are trained once.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch
from omegaconf import DictConfig

from sims.config import ConfigError, to_container
from sims.data import ArrayDataset, load_real_dataset
from sims.diffusion import SIMSGuidance
from sims.generation import dist_info, sample_seeds, seed_batches


class DiffusionLoopModel:
    """:class:`sims.loop.GenerativeModel` for EDM diffusion on image or vector data.

    Args:
        cfg: the run config (data, network, train, sampler, sims, loop sections).
    Raises:
        ConfigError: ``sims`` in loop.methods with ``loop.sampling_guidance`` = 0.
    """

    batched = False
    supported_methods = ("standard", "sims")
    sample_figures = True  # the driver saves samples/<wf>/<method>/<seed>/genNNN.png

    def __init__(self, cfg: DictConfig):
        from sims.sims_pipeline import device_for

        self.cfg = cfg
        self.real = load_real_dataset(cfg.data)
        self.num_real_available = len(self.real)
        self.device = device_for(cfg)
        self.omega = float(cfg.loop.sampling_guidance)
        if "sims" in cfg.loop.methods and self.omega <= 0:
            raise ConfigError("loop.methods has 'sims' but loop.sampling_guidance is 0: set the guidance weight "
                              "used for the synthetic data, e.g. loop.sampling_guidance=0.5")
        self.denoiser = None
        self._extractor = None
        self._reference = None
        self.distributed = _TorchDist()

    # -- data ------------------------------------------------------------------------------------------
    def real_data(self, num: int, *, seed: int) -> np.ndarray:
        """The real set permuted with ``seed``; first ``num`` items ([num, C, H, W] or [num, d], float32)."""
        perm = np.random.default_rng(seed).permutation(len(self.real))[:num]
        return self.real.data[torch.from_numpy(perm)].numpy()

    # -- training --------------------------------------------------------------------------------------
    def _base_dir(self, data: np.ndarray, seed: int, previous: Optional[Path]) -> Path:
        h = hashlib.sha1()
        h.update(np.ascontiguousarray(data, dtype=np.float32).tobytes())
        h.update(f"seed={seed};previous={previous}".encode())
        return Path(self.cfg.run_dir) / "models" / "_bases" / h.hexdigest()[:16]

    def fit(self, train_data, *, generation: int, seed: int, workdir: Path, previous: Optional[Path] = None,
            method: str = "standard") -> None:
        """Train the base (and for ``sims`` the auxiliary) model; resumable, idempotent."""
        import lightning as L
        from safetensors.torch import load_file

        from sims.data.store import SyntheticStore, fill_store
        from sims.pipeline import fit_stage
        from sims.sims_pipeline import aux_train_config
        from sims.training.export import load_denoiser
        from sims.training.module import EDMModule

        cfg = self.cfg
        data = np.asarray(train_data, dtype=np.float32)
        dataset = ArrayDataset(torch.from_numpy(data.copy()), name=f"generation{generation}")
        shape = tuple(data.shape[1:])
        base_dir = self._base_dir(data, seed, previous)
        L.seed_everything(int(seed) % (2**31), workers=True, verbose=False)
        module = EDMModule(to_container(cfg.network), to_container(cfg.train), shape, 0)
        if previous is not None:
            state = load_file(str(_weights_of(previous)))
            module.net.load_state_dict(state)
            module.ema.module.load_state_dict(state)
        base_weights = fit_stage(cfg, base_dir, module, dataset, float(cfg.train.total_kimg))
        _link(workdir, base_weights)
        base, _ = load_denoiser(base_weights, self.device)
        if method != "sims":
            self.denoiser = base
            return
        store = SyntheticStore(workdir / "synthetic")
        offset = int(cfg.sims.synthetic_seed_offset)
        sampler = to_container(cfg.sampler)
        fill_store(store, range(offset, offset + int(cfg.sims.num_synthetic)),
                   lambda b: sample_seeds(base, b, shape, sampler=sampler, device=self.device),
                   int(cfg.sampler.batch_size), shape)
        base_module = EDMModule(to_container(cfg.network), to_container(cfg.train), shape, 0)
        base_module.ema.module.load_state_dict(load_file(str(base_weights)))
        aux_module = EDMModule.from_base(base_module, aux_train_config(cfg))
        L.seed_everything(int(seed) % (2**31) + 1, workers=True, verbose=False)
        aux_weights = fit_stage(cfg, workdir / "aux", aux_module, store.load(0), float(cfg.sims.aux_kimg))
        aux, _ = load_denoiser(aux_weights, self.device)
        self.denoiser = SIMSGuidance(base, aux, self.omega, sigma_interval=cfg.sims.sigma_interval)

    # -- sampling and evaluation ------------------------------------------------------------------------
    def sample(self, num: int, *, seed: int) -> np.ndarray:
        """``num`` samples with per-image seeds ``seed·10⁶ + i`` (8-bit quantised images), on every rank."""
        from sims.evaluation import quantize

        if self.denoiser is None:
            raise RuntimeError("sample() before fit()")
        shape = tuple(self.real.data.shape[1:])
        seeds = [int(seed) % 2**31 * 1_000_000 + i for i in range(num)]
        rank, world = dist_info()
        parts: Dict[int, np.ndarray] = {}
        for batch in seed_batches(seeds, int(self.cfg.sampler.batch_size), rank, world):
            x, _ = sample_seeds(self.denoiser, batch, shape, sampler=to_container(self.cfg.sampler), device=self.device)
            parts[batch[0]] = quantize(x).numpy()
        if world > 1:
            gathered = [None] * world
            torch.distributed.all_gather_object(gathered, parts)
            parts = {k: v for d in gathered for k, v in d.items()}
        return np.concatenate([parts[k] for k in sorted(parts)])

    def evaluate(self, samples: np.ndarray, *, seed: int) -> Mapping[str, Any]:
        """Fréchet distance (``sims.features``, digits features on digits), precision and recall (k = 5)
        of the samples against the whole real data set."""
        from sims.evaluation import features_of, make_extractor, real_statistics
        from sims.metrics import FeatureStats, frechet_distance, precision_recall

        if self._extractor is None:
            _, self._extractor = make_extractor(self.cfg, self.real, self.device)
            self._reference = real_statistics(self._extractor, self.real.data, self.device)
        (mu_r, sigma_r), real = self._reference
        fake = features_of(self._extractor, torch.from_numpy(np.asarray(samples, dtype=np.float32)), self.device)
        mu, sigma = FeatureStats(fake.shape[1]).update(fake).mean_cov()
        return {"fd": frechet_distance(mu, sigma, mu_r, sigma_r), **precision_recall(real, fake, k=5)}


class _TorchDist:
    """:class:`sims.loop.Distributed` over torch.distributed (single process when not initialised)."""

    @property
    def rank(self) -> int:
        return dist_info()[0]

    def barrier(self) -> None:
        from sims.generation import barrier

        barrier()


def _weights_of(workdir: Path) -> Path:
    ref = Path(workdir) / "base_weights.txt"
    if not ref.exists():
        raise FileNotFoundError(f"{workdir} has no trained model to warm-start from")
    return Path(ref.read_text().strip())


def _link(workdir: Path, weights: Path) -> None:
    """Record in ``workdir`` which (content-addressed) base model this generation used."""
    from sims.utils import atomic_write_text

    if dist_info()[0] == 0:
        atomic_write_text(Path(workdir) / "base_weights.txt", str(weights) + "\n")


def _factory(cfg: DictConfig) -> DiffusionLoopModel:
    return DiffusionLoopModel(cfg)


def register() -> None:
    """Register ``loop.model=diffusion`` with the loop driver."""
    from sims.loop import register_model

    register_model("diffusion", _factory)
