"""Lightning callbacks: periodic Fréchet-distance evaluation of the EMA model during training."""
from __future__ import annotations

import random
from typing import Optional

import lightning as L
import numpy as np
import torch


class FDEvalCallback(L.Callback):
    """Every ``every_kimg`` thousand training images, sample ``num_samples`` seeds from the EMA
    denoiser (sharded over ranks), and log ``fd`` (Fréchet distance to the training data's
    statistics in ``extractor``'s features, Heusel et al. 2017) plus ``precision``/``recall``.

    The evaluation draws its noise from per-seed generators (seeds 0..num_samples−1, fixed, so the
    curve is comparable across evaluations) and saves/restores the global CPU, CUDA, numpy and
    Python RNG states, so training is bit-for-bit what it would be without the callback.

    Args:
        every_kimg: evaluation period in kimg (> 0).
        num_samples: samples per evaluation.
        extractor: features [N, D] of samples (see :mod:`sims.metrics.features`).
        real: the training data [N, ...] (reference statistics and precision/recall).
        sampler: ``SamplerConfig`` dict.
        batch_size: seeds per sampling batch.
    """

    def __init__(self, every_kimg: float, num_samples: int, extractor, real: torch.Tensor, sampler: dict,
                 batch_size: int = 256):
        if every_kimg <= 0 or num_samples < 2:
            raise ValueError("FDEvalCallback needs every_kimg > 0 and num_samples >= 2")
        self.every_nimg = every_kimg * 1000.0
        self.num_samples = int(num_samples)
        self.extractor = extractor
        self.real = real
        self.sampler = dict(sampler)
        self.batch_size = int(batch_size)
        self._ref = None
        self.history = []

    def _reference(self, device):
        if self._ref is None:
            from sims.evaluation import real_statistics

            self._ref = real_statistics(self.extractor, self.real, device)
        return self._ref

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        prev = (pl_module.global_step - 1) * pl_module.batch_size
        if int(pl_module.cur_nimg // self.every_nimg) == int(prev // self.every_nimg):
            return
        fd = self.evaluate(pl_module)
        pl_module.log_dict(fd, on_step=True, on_epoch=False, sync_dist=False)
        self.history.append({"kimg": pl_module.cur_nimg / 1000.0, **fd})

    @torch.no_grad()
    def evaluate(self, pl_module) -> dict:
        from sims.evaluation import evaluate_one
        from sims.metrics import frechet_distance, precision_recall

        device = pl_module.device
        states = _rng_state()
        try:
            extractor = self.extractor.to(device) if isinstance(self.extractor, torch.nn.Module) else self.extractor
            (mu_r, sigma_r), real_feats = self._reference(device)
            stats, _, _ = evaluate_one(pl_module.ema.module, list(range(self.num_samples)), pl_module.data_shape,
                                       pl_module.label_dim, self.sampler, extractor, device, self.batch_size, keep=0)
            mu, sigma = stats.mean_cov()
            out = {"fd": frechet_distance(mu, sigma, mu_r, sigma_r), **precision_recall(real_feats, stats.features(), k=5)}
        finally:
            _set_rng_state(states)
        return out


def _rng_state():
    return (torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            np.random.get_state(), random.getstate())


def _set_rng_state(states) -> None:
    cpu, cuda, np_state, py_state = states
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
    np.random.set_state(np_state)
    random.setstate(py_state)
