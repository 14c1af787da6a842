"""The EDM mathematics (Karras et al. 2022) and SIMS guidance (Alemohammad et al. 2024), pure PyTorch.

A *denoiser* is any callable ``D(x, sigma, class_labels=None) -> Tensor`` (x: [N,C,H,W] or [N,d];
sigma: scalar or [N], data units; returns x's shape). Base, auxiliary, guided and analytic
denoisers share it, so samplers never need to know which they have.
"""
from sims.diffusion.guidance import CountedDenoiser, SIMSGuidance
from sims.diffusion.loss import EDMLoss, edm_loss_weight
from sims.diffusion.precond import EDMPrecond, edm_coefficients, expand_sigma
from sims.diffusion.sampler import SeedNoise, edm_sampler, karras_sigmas, sampler_nfe

__all__ = ["CountedDenoiser", "EDMPrecond", "EDMLoss", "SIMSGuidance", "SeedNoise", "edm_coefficients", "edm_loss_weight",
           "edm_sampler", "expand_sigma", "karras_sigmas", "sampler_nfe"]
