"""MLP backbone F(x_in, c_noise, class_labels) for low-dimensional data ([N, d]: 2-D toys, Gaussians).

Same role and signature as the DDPM++ U-Net (EDM Table 1's F), built from pre-norm residual
blocks (LayerNorm -> Linear -> SiLU -> Linear) whose hidden activations are modulated by the noise
embedding (FiLM scale-shift, as in the U-Net's blocks). The sinusoidal noise embedding is the
Transformer/DDPM one (Vaswani et al. 2017) applied to EDM's c_noise = ln(sigma)/4.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from sims.networks.inputs import labels_to_onehot
from sims.networks.layers import PositionalEmbedding, init_small


class MLPBlock(nn.Module):
    """Residual block: ``x + Linear(dropout(SiLU(FiLM(Linear(LayerNorm(x)), emb))))``.

    forward(x [N, H], emb [N, E]) -> [N, H]. The last Linear is initialised ~0 (block ~identity).
    """

    def __init__(self, hidden_dim: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_dim)
        self.fc0 = nn.Linear(hidden_dim, hidden_dim)
        self.affine = nn.Linear(emb_dim, 2 * hidden_dim)
        self.dropout = nn.Dropout(dropout)
        self.fc1 = init_small(nn.Linear(hidden_dim, hidden_dim))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.affine(emb).chunk(2, dim=1)
        h = self.fc0(self.norm(x))
        h = F.silu(torch.addcmul(shift, h, scale + 1))
        return x + self.fc1(self.dropout(h))


class MLPBackbone(nn.Module):
    """MLP denoiser backbone for vector data.

    Embedding: PositionalEmbedding(c_noise) [N, hidden_dim] ([cos, sin], endpoint=True)
    (+ Linear(one-hot label)) -> Linear -> SiLU -> Linear -> SiLU, width E = hidden_dim.
    Trunk: Linear(d -> hidden_dim), ``num_layers`` :class:`MLPBlock`, then LayerNorm -> SiLU -> Linear(hidden_dim -> d) initialised ~0 (the
    untrained F is ~0).

    Args:
        data_dim: d, the data dimension.
        hidden_dim: trunk width (even, >= 4).
        num_layers: number of residual blocks (>= 1).
        label_dim: number of classes (0: unconditional).
        dropout: dropout inside the blocks.
        max_positions: inverse lowest frequency of the sinusoidal embedding.
    forward(x [N, d], noise_labels [N] float (c_noise), class_labels float [N, label_dim] or
        integer [N] or None, augment_labels None) -> [N, d].
    Raises:
        ValueError: bad sizes at construction; wrong x / noise_labels / label shapes in forward;
            augment_labels that are not None.
    """

    def __init__(self, data_dim: int, hidden_dim: int = 256, num_layers: int = 4, label_dim: int = 0,
                 dropout: float = 0.0, max_positions: float = 10000.0):
        super().__init__()
        if data_dim < 1:
            raise ValueError(f"data_dim must be >= 1, got {data_dim}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if hidden_dim < 4 or hidden_dim % 2:
            raise ValueError(f"hidden_dim must be even and >= 4, got {hidden_dim}")
        self.data_dim = int(data_dim)
        self.label_dim = int(label_dim)
        self.map_noise = PositionalEmbedding(hidden_dim, max_positions=max_positions, endpoint=True)
        self.map_label = nn.Linear(label_dim, hidden_dim, bias=False) if label_dim else None
        self.map_layer0 = nn.Linear(hidden_dim, hidden_dim)
        self.map_layer1 = nn.Linear(hidden_dim, hidden_dim)
        self.fc_in = nn.Linear(data_dim, hidden_dim)
        self.blocks = nn.ModuleList(MLPBlock(hidden_dim, hidden_dim, dropout) for _ in range(num_layers))
        self.out_norm = nn.LayerNorm(hidden_dim)
        self.fc_out = init_small(nn.Linear(hidden_dim, data_dim))

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor,
                class_labels: Optional[torch.Tensor] = None,
                augment_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        if augment_labels is not None:
            raise ValueError("MLPBackbone has no augmentation conditioning; augment_labels must be None")
        if x.ndim != 2 or x.shape[1] != self.data_dim:
            raise ValueError(f"MLPBackbone expects x of shape [N, {self.data_dim}], got {tuple(x.shape)}")
        noise_labels = torch.as_tensor(noise_labels, device=x.device)
        if noise_labels.ndim == 0:
            noise_labels = noise_labels.expand(x.shape[0])
        if noise_labels.shape != (x.shape[0],):
            raise ValueError(f"noise_labels must have shape [N]={x.shape[0]}, got {tuple(noise_labels.shape)}")
        emb = self.map_noise(noise_labels)
        if self.map_label is not None:
            onehot = labels_to_onehot(class_labels, self.label_dim, x.shape[0], emb.device, emb.dtype)
            if onehot is None:
                onehot = torch.zeros(x.shape[0], self.label_dim, device=emb.device, dtype=emb.dtype)
            emb = emb + self.map_label(onehot * math.sqrt(self.label_dim))
        elif class_labels is not None:
            raise ValueError("class_labels were given to an unconditional backbone (label_dim=0)")
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))
        h = self.fc_in(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.fc_out(F.silu(self.out_norm(h)))
