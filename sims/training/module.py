"""The Lightning parts of EDM training: one LightningModule for the base and the auxiliary model.

The module holds the live denoiser (:class:`~sims.diffusion.EDMPrecond` around a backbone) and
separate EMA copies, trains with the EDM loss (Karras et al. 2022, Table 1) and Adam with a linear
learning-rate ramp-up measured in images (EDM Table 7), and refuses to continue on a non-finite
loss. The auxiliary model of SIMS (Alemohammad et al. 2024, Algorithm 1 step 3) is the same
module, created from the base weights with its own (short) schedule: :meth:`EDMModule.from_state`.

Randomness: micro-batch ``k`` of step ``s`` (see :mod:`sims.training.sampler`) draws σ and the noise
from ``derive_seed(seed, "loss", k, s)``, dropout from ``derive_seed(seed, "dropout", k, s)`` and
the augmentation from ``derive_seed(seed, "augment", k, s)``: each rank draws its own, and a resumed
run draws what the uninterrupted one would have. The EMAs are updated right after each optimizer
step (inside :meth:`EDMModule.optimizer_step`), so a checkpoint taken at the end of step ``s`` holds
step ``s``'s weights *and* EMA.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Sequence

import lightning as L
import torch
from torch import nn

from sims.diffusion import EDMLoss
from sims.errors import ConfigError, TrainingDivergedError
from sims.training.denoiser import build_denoiser
from sims.training.ema import EMA
from sims.utils import derive_seed


def ema_key(halflife_kimg: float) -> str:
    """Name of an extra EMA (file ``ema-<key>.safetensors``): the half-life in kimg, e.g. ``50`` or ``12.5``."""
    return f"{float(halflife_kimg):g}".replace(".", "p")


class EDMModule(L.LightningModule):
    """EDM training of one denoiser with EMA copies.

    Args:
        network: ``NetworkConfig`` as a dict.
        train: ``TrainConfig`` as a dict (lr, lr_rampup_kimg, batch_size (global), EMA, P_mean/P_std,
            seed, augment, ema_halflives_kimg, ...).
        data_shape: one sample's shape, (C, H, W) or (d,).
        label_dim: classes for conditioning (0: unconditional).

    Attributes:
        net: the live :class:`EDMPrecond`; ``ema.module``: the main average, used for sampling and
            export; ``extra_emas``: further averages keyed by :func:`ema_key`.
        cur_nimg: images seen so far (global, all ranks), derived from the global step.
    Raises:
        ConfigError: ``train.augment > 0`` on a network without ``augment_dim`` 9.

    ``training_step`` expects batches ``(x [b, ...], labels [b, L], tag [2] = (step, slice))`` from
    :class:`sims.training.sampler.TrainingStream`.
    """

    def __init__(self, network: Dict[str, Any], train: Dict[str, Any], data_shape: Sequence[int], label_dim: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.train_cfg = dict(train)
        self.data_shape = tuple(int(s) for s in data_shape)
        self.label_dim = int(label_dim)
        self.seed = int(train.get("seed", 0))
        with torch.random.fork_rng(devices=[]):  # the initial weights are a function of the seed alone
            torch.manual_seed(derive_seed(self.seed, "init"))
            self.net = build_denoiser(network, self.data_shape, self.label_dim, train["sigma_data"], train["precision"])
        rampup = train["ema_rampup_ratio"]
        self.ema = EMA(self.net, train["ema_halflife_kimg"], rampup)
        self.extra_emas = nn.ModuleDict({ema_key(h): EMA(self.net, float(h), rampup)
                                         for h in train.get("ema_halflives_kimg", []) or []})
        self.loss_fn = EDMLoss(train["P_mean"], train["P_std"], train["sigma_data"])
        self.augment_pipe = None
        p = float(train.get("augment", 0.0) or 0.0)
        if p > 0:
            if int(network.get("augment_dim", 0) or 0) != 9:
                raise ConfigError(f"train.augment={p} needs network.augment_dim=9 (EDM's augmentation labels), "
                                  f"got {network.get('augment_dim', 0)}")
            from sims.data.augment import AugmentPipe

            self.augment_pipe = AugmentPipe(p)
        self.last_beta = 0.0

    # -- schedule ----------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        """The global batch B (images per optimizer step over all ranks)."""
        return int(self.train_cfg["batch_size"])

    @property
    def cur_nimg(self) -> int:
        return int(self.global_step) * self.batch_size

    def lr_factor(self, step: int) -> float:
        """Linear ramp-up of the learning rate over ``lr_rampup_kimg`` (EDM Table 7), factor in (0, 1]."""
        ramp = float(self.train_cfg["lr_rampup_kimg"]) * 1000.0
        if ramp <= 0:
            return 1.0
        return min((step + 1) * self.batch_size / ramp, 1.0)

    def configure_optimizers(self):
        c = self.train_cfg
        fused = {"fused": True} if next(self.net.parameters()).is_cuda else {}
        opt = torch.optim.Adam(self.net.parameters(), lr=c["lr"], betas=tuple(c["betas"]), eps=c["eps"], **fused)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- steps ---------------------------------------------------------------------------------------
    def step_generator(self, purpose: str, slice_index: int, step: int, device) -> torch.Generator:
        """The generator of one micro-batch's ``purpose`` (``loss`` or ``augment``) randomness."""
        return torch.Generator(device=device).manual_seed(derive_seed(self.seed, purpose, slice_index, step))

    def training_step(self, batch, batch_idx):
        images, labels, tag = batch
        step, k = int(tag[0]), int(tag[1])
        if step != self.global_step:
            raise RuntimeError(f"the data stream serves step {step} but the trainer is at step {self.global_step}")
        torch.manual_seed(derive_seed(self.seed, "dropout", k, step))  # dropout draws from the global generator
        augment_labels = None
        if self.augment_pipe is not None:
            images, augment_labels = self.augment_pipe(images, self.step_generator("augment", k, step, images.device))
        gen = self.step_generator("loss", k, step, images.device)
        # EDM reduction: sum over a sample's elements, mean over the (micro-)batch; Lightning divides by the
        # accumulation steps and DDP averages over ranks, so the gradient is that of the global-batch mean.
        loss = self.loss_fn(self.net, images, labels if self.label_dim > 0 else None, generator=gen,
                            augment_labels=augment_labels).flatten(1).sum(1).mean()
        if not torch.isfinite(loss):
            raise TrainingDivergedError(
                f"non-finite training loss ({loss.item()}) at step {self.global_step} "
                f"({self.cur_nimg / 1000:.1f} kimg): lower train.lr (now {self.train_cfg['lr']}), "
                "check the data for NaN/Inf, or train with train.precision=32-true")
        self.log("loss", loss, prog_bar=True, on_step=True, on_epoch=False, sync_dist=False)
        return loss

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        """The optimizer step, then the EMA updates (before any callback sees the step)."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        nimg = self.cur_nimg  # the global step already counts this step
        self.last_beta = self.ema.update(self.net, self.batch_size, nimg)
        for ema in self.extra_emas.values():
            ema.update(self.net, self.batch_size, nimg)
        every = max(int(self.train_cfg.get("log_every_steps", 50)), 1)
        if self.global_step % every == 0:
            self.log_dict({"kimg": nimg / 1000.0, "ema_beta": self.last_beta,
                           "lr": optimizer.param_groups[0]["lr"]}, on_step=True, on_epoch=False)

    def averages(self) -> Dict[str, EMA]:
        """Every EMA: ``{"": main, key: extra}`` (the main one under the empty key)."""
        return {"": self.ema, **dict(self.extra_emas.items())}

    # -- SIMS auxiliary model --------------------------------------------------------------------------
    @classmethod
    def from_state(cls, state: Dict[str, torch.Tensor], network: Dict[str, Any], train: Dict[str, Any],
                   data_shape: Sequence[int], label_dim: int = 0) -> "EDMModule":
        """A module whose live network and every EMA start from ``state`` (an :class:`EDMPrecond`
        state dict, e.g. the base model's exported EMA weights) — SIMS Algorithm 1 step 3, and EDM's
        ``--transfer``.

        Raises:
            WeightsError: the state does not fit the network.
        """
        from sims.errors import WeightsError

        module = cls(network, train, data_shape, label_dim)
        try:
            module.net.load_state_dict(state)
        except RuntimeError as exc:
            raise WeightsError(f"the base weights do not fit the auxiliary network: {str(exc).splitlines()[0]}") from None
        for ema in module.averages().values():
            ema.module.load_state_dict(state)
        return module


def steps_for_kimg(kimg: float, batch_size: int) -> int:
    """Optimizer steps needed to show ``kimg`` thousand images at a global ``batch_size`` (≥ 1)."""
    return max(1, math.ceil(kimg * 1000.0 / batch_size))
