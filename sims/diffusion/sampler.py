"""EDM time discretisation and deterministic/stochastic sampler (Karras et al. 2022, eq. 5 and
Algorithm 2), plus a per-seed noise source so every sample is a pure function of its seed."""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

Denoiser = Callable[..., torch.Tensor]


def karras_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                  rho: float = 7.0, device=None) -> torch.Tensor:
    """Noise levels σ_0 > … > σ_{N−1} followed by σ_N = 0 (EDM eq. 5).

    σ_i = (σ_max^{1/ρ} + i/(N−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, i = 0 … N−1.

    Returns:
        float64-accurate values as a float32 tensor of shape [num_steps + 1], last entry 0.
    Raises:
        ValueError: num_steps < 1, σ_min ≤ 0, σ_max < σ_min or ρ ≤ 0.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not (0 < sigma_min <= sigma_max) or rho <= 0:
        raise ValueError(f"need 0 < sigma_min <= sigma_max and rho > 0, got {sigma_min}, {sigma_max}, {rho}")
    i = torch.arange(num_steps, dtype=torch.float64)
    if num_steps == 1:
        sig = torch.tensor([sigma_max], dtype=torch.float64)
    else:
        a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
        sig = (a + i / (num_steps - 1) * (b - a)) ** rho
    return torch.cat([sig, torch.zeros(1, dtype=torch.float64)]).to(torch.float32).to(device)


def sampler_nfe(num_steps: int, solver: str = "heun") -> int:
    """Network evaluations per image of :func:`edm_sampler`: 2N−1 for Heun, N for Euler (EDM §3)."""
    return 2 * num_steps - 1 if solver == "heun" else num_steps


def edm_sampler(denoiser: Denoiser, latents: torch.Tensor, *, class_labels: Optional[torch.Tensor] = None,
                num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                S_churn: float = 0.0, S_min: float = 0.0, S_max: float = float("inf"), S_noise: float = 1.0,
                randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
                solver: str = "heun", callback: Optional[Callable[[dict], None]] = None) -> torch.Tensor:
    """EDM Algorithm 2: Heun's 2nd-order ODE solver (Euler on the last step) with optional churn.

    Args:
        denoiser: any callable D(x, sigma, class_labels) returning an estimate of the clean data.
        latents: unit-variance Gaussian noise, [N, C, H, W] or [N, d]; x_0 = σ_0·latents.
        class_labels: passed through to the denoiser ([N, label_dim] one-hot) or None.
        num_steps: N, the number of noise levels (NFE = 2N−1 for Heun, N for Euler).
        sigma_min, sigma_max, rho: the discretisation of :func:`karras_sigmas`.
        S_churn, S_min, S_max, S_noise: stochasticity; γ_i = min(S_churn/N, √2−1) for
            σ_i ∈ [S_min, S_max], σ̂ = σ(1+γ), x̂ = x + √(σ̂²−σ²)·S_noise·z.
        randn_like: the noise source for churn (inject a per-seed generator for reproducibility).
        solver: 'heun' (EDM) or 'euler' (first order).
        callback: called after every step with {'i', 'x', 'sigma', 'denoised'}.
    Returns:
        The final sample x_N (σ = 0), float32, the shape of ``latents``.
    Raises:
        ValueError: unknown solver.
    """
    if solver not in ("heun", "euler"):
        raise ValueError(f"solver must be 'heun' or 'euler', got {solver!r}")
    sigmas = karras_sigmas(num_steps, sigma_min, sigma_max, rho, device=latents.device)
    gamma_max = min(S_churn / num_steps, math.sqrt(2) - 1)
    x_next = latents.to(torch.float64) * sigmas[0].double()
    for i in range(num_steps):
        t_cur, t_next = sigmas[i].double(), sigmas[i + 1].double()
        x_cur = x_next
        gamma = gamma_max if S_churn > 0 and S_min <= float(t_cur) <= S_max else 0.0
        t_hat = t_cur * (1 + gamma)
        if gamma > 0:
            x_hat = x_cur + (t_hat**2 - t_cur**2).sqrt() * S_noise * randn_like(x_cur).to(torch.float64)
        else:
            x_hat = x_cur
        denoised = denoiser(x_hat.to(torch.float32), t_hat.to(torch.float32), class_labels).to(torch.float64)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if solver == "heun" and i < num_steps - 1:
            denoised = denoiser(x_next.to(torch.float32), t_next.to(torch.float32), class_labels).to(torch.float64)
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
        if callback is not None:
            callback({"i": i, "x": x_next, "sigma": t_next, "denoised": denoised})
    return x_next.to(torch.float32)


class SeedNoise:
    """Per-seed random streams: row k of every draw comes from its own ``torch.Generator`` seeded
    with ``seeds[k]``, so a sample depends on its seed only, never on the batch it is in or on the
    number of processes (EDM's ``StackedRandomGenerator``, Karras et al. 2022, ``generate.py``).

    The generators live on ``device`` and every draw happens there: on CUDA, one
    ``torch.Generator("cuda")`` per seed, so latents, labels and churn noise are made on the GPU
    with no host-to-device copy (EDM's semantics). A seed therefore gives the same sample on every
    device *of one type*, whatever the batch size or world size, but CPU and CUDA samples of the
    same seed differ (the CPU's Mersenne Twister and CUDA's Philox are different streams; a large
    CUDA draw may also differ between GPU models, whose launch grids differ). Seeds are taken modulo
    2**32, as EDM's ``manual_seed(seed % 2**32)``; on the CPU this is no change (its Mersenne
    Twister reads only the low 32 bits of a seed), so seeds s and s + 2**32 share a stream on
    every device.

    Args:
        seeds: non-negative integer seeds, one per row.
        device: where the generators live, the draws happen and the returned tensors are.
    """

    def __init__(self, seeds: Sequence[int], device="cpu"):
        self.seeds = [int(s) for s in seeds]
        self.device = torch.device(device)
        self.generators = [torch.Generator(device=self.device).manual_seed(s % 2**32) for s in self.seeds]

    def randn(self, *shape: int) -> torch.Tensor:
        """Standard normal draws of shape [len(seeds), *shape], float32, on ``device``."""
        return torch.stack([torch.randn(shape, generator=g, device=self.device) for g in self.generators])

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        """Standard normal draws of x's shape (its first dimension must equal len(seeds)), drawn in
        float32 and returned in x's dtype on ``device``."""
        if x.shape[0] != len(self.generators):
            raise ValueError(f"batch of {x.shape[0]} rows but {len(self.generators)} seeds")
        return self.randn(*x.shape[1:]).to(dtype=x.dtype)

    def randint(self, high: int) -> torch.Tensor:
        """One integer in [0, high) per seed, shape [len(seeds)], int64, on ``device``."""
        return torch.stack([torch.randint(high, (), generator=g, device=self.device) for g in self.generators])
