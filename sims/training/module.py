"""The Lightning parts of EDM training: one LightningModule for the base and the auxiliary model.

The module holds the live denoiser (:class:`~sims.diffusion.EDMPrecond` around a backbone) and a
separate EMA copy, trains with the EDM loss (Karras et al. 2022, Table 1) and Adam with a linear
learning-rate ramp-up measured in images (EDM Table 7), and refuses to continue on a non-finite
loss. The auxiliary model of SIMS (Alemohammad et al. 2024, Algorithm 1 step 3) is the same
module, created from the base weights with its own (short) schedule: see :meth:`EDMModule.from_base`.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence

import lightning as L
import torch
from torch import nn

from sims.diffusion import EDMLoss, EDMPrecond
from sims.networks import build_backbone
from sims.training.ema import EMA

PRECISIONS = {"32-true": None, "32": None, "bf16-mixed": torch.bfloat16, "bf16": torch.bfloat16}


def autocast_dtype(precision: str) -> Optional[torch.dtype]:
    """Map ``train.precision`` to the backbone's autocast dtype (mixed precision only inside F).

    Raises:
        ValueError: a precision other than 32-true / bf16-mixed.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision]


def build_denoiser(network: Dict[str, Any], data_shape: Sequence[int], label_dim: int,
                   sigma_data: float = 0.5, precision: str = "32-true") -> EDMPrecond:
    """Backbone from the network config + EDM preconditioning.

    Args:
        network: a ``NetworkConfig`` as a dict.
        data_shape: one sample's shape, (C, H, W) for images or (d,) for vectors.
        label_dim: number of classes (0: unconditional).
    """
    from omegaconf import OmegaConf

    from sims.config import NetworkConfig

    net_cfg = OmegaConf.merge(OmegaConf.structured(NetworkConfig), network)
    if len(data_shape) == 3:
        channels, resolution = data_shape[0], data_shape[1]
    elif len(data_shape) == 1:
        channels, resolution = data_shape[0], 1
    else:
        raise ValueError(f"data_shape must be (C, H, W) or (d,), got {tuple(data_shape)}")
    backbone = build_backbone(net_cfg, img_resolution=resolution, img_channels=channels, label_dim=label_dim)
    return EDMPrecond(backbone, sigma_data=sigma_data, autocast_dtype=autocast_dtype(precision), label_dim=label_dim)


class EDMModule(L.LightningModule):
    """EDM training of one denoiser with an EMA copy.

    Args:
        network: ``NetworkConfig`` as a dict.
        train: ``TrainConfig`` as a dict (lr, lr_rampup_kimg, batch_size (global), EMA, P_mean/P_std...).
        data_shape: one sample's shape, (C, H, W) or (d,).
        label_dim: classes for conditioning (0: unconditional).

    Attributes:
        net: the live :class:`EDMPrecond`; ``ema.module``: the averaged copy used for sampling/export.
        cur_nimg: images seen so far (global, all ranks), derived from the global step.
    """

    def __init__(self, network: Dict[str, Any], train: Dict[str, Any], data_shape: Sequence[int], label_dim: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.train_cfg = dict(train)
        self.data_shape = tuple(int(s) for s in data_shape)
        self.label_dim = int(label_dim)
        self.net = build_denoiser(network, self.data_shape, self.label_dim, train["sigma_data"], train["precision"])
        self.ema = EMA(self.net, train["ema_halflife_kimg"], train["ema_rampup_ratio"])
        self.loss_fn = EDMLoss(train["P_mean"], train["P_std"], train["sigma_data"])

    # -- schedule ----------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
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
        opt = torch.optim.Adam(self.net.parameters(), lr=c["lr"], betas=tuple(c["betas"]), eps=c["eps"])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- steps ---------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        images, labels = batch
        labels = labels if self.label_dim > 0 else None
        # EDM reduction: sum over a sample's elements, mean over the batch.
        loss = self.loss_fn(self.net, images, labels).flatten(1).sum(1).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss ({loss.item()}) at step {self.global_step} "
                f"({self.cur_nimg / 1000:.1f} kimg): lower train.lr (now {self.train_cfg['lr']}), "
                "check the data for NaN/Inf, or train with train.precision=32-true")
        self.log("loss", loss, prog_bar=True, on_step=True, on_epoch=False, sync_dist=False)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        beta = self.ema.update(self.net, self.batch_size, self.cur_nimg)
        if self.global_step % max(int(self.train_cfg.get("log_every_steps", 50)), 1) == 0:
            self.log_dict({"kimg": self.cur_nimg / 1000.0, "ema_beta": beta,
                           "lr": self.trainer.optimizers[0].param_groups[0]["lr"]}, on_step=True, on_epoch=False)

    # -- SIMS auxiliary model --------------------------------------------------------------------------
    @classmethod
    def from_base(cls, base: "EDMModule", train: Dict[str, Any]) -> "EDMModule":
        """The SIMS auxiliary model: same architecture, initialised from the base model's EMA weights,
        trained with its own ``train`` settings (lr, ramp-up, EMA half-life) — SIMS Algorithm 1 step 3.
        """
        aux = cls(base.hparams["network"], train, base.data_shape, base.label_dim)
        state = base.ema.module.state_dict()
        aux.net.load_state_dict(state)
        aux.ema.module.load_state_dict(state)
        return aux


def steps_for_kimg(kimg: float, batch_size: int) -> int:
    """Optimizer steps needed to show ``kimg`` thousand images at a global ``batch_size`` (≥ 1)."""
    return max(1, math.ceil(kimg * 1000.0 / batch_size))


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
