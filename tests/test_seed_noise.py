"""Per-seed noise (sims.diffusion.SeedNoise) on the CPU: EDM's StackedRandomGenerator semantics, and
a seed's sample is the same whatever the batch size (1, 7, 64) or the number of ranks. The CUDA
counterparts are in tests/test_gpu.py (``pytest -m gpu``)."""
from __future__ import annotations

import torch

from sims.diffusion import SeedNoise
from sims.dist import DistContext
from sims.generation import generate


def test_draws_are_edms_per_seed_generators():
    seeds = [0, 3, 99, 2**32 - 1, 2**40 + 5]
    noise = SeedNoise(seeds)
    assert all(g.device.type == "cpu" for g in noise.generators)
    x = noise.randn(2, 5)
    for row, s in zip(x, seeds):
        ref = torch.randn((2, 5), generator=torch.Generator().manual_seed(s))
        assert torch.equal(row, ref)
    # EDM's manual_seed(seed % 2**32): larger seeds fold onto smaller ones (the CPU generator did so before).
    assert torch.equal(x[3], torch.randn((2, 5), generator=torch.Generator().manual_seed(2**32 - 1)))
    assert torch.equal(x[4], SeedNoise([5]).randn(2, 5)[0])
    assert not torch.equal(x[0], x[1])
    # randint and randn_like continue the same per-seed stream.
    idx = SeedNoise(seeds).randint(10)
    assert idx.dtype == torch.int64 and idx.shape == (5,)
    assert idx.tolist() == [int(torch.randint(10, (), generator=torch.Generator().manual_seed(s))) for s in seeds]
    churn = noise.randn_like(torch.zeros(5, 3, dtype=torch.float64))
    assert churn.dtype == torch.float64 and churn.shape == (5, 3)


class _RowWise:
    """A denoiser that treats every row on its own (a per-sample Gaussian posterior mean): the
    sampler's only batch dependence would come from the noise."""

    def __call__(self, x, sigma, class_labels=None):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return x * 0.25 / (0.25 + sigma**2) + 0.1 * torch.tanh(x).flip(-1)


def _samples(batch, world=1, label_dim=0):
    seeds = list(range(64))
    parts = {}
    for rank in range(world):
        ctx = DistContext(rank=rank, world_size=world)
        for ids, x, labels in generate(ctx, _RowWise(), seeds, (1, 4, 4), batch_size=batch, label_dim=label_dim,
                                       sampler={"num_steps": 6, "S_churn": 30, "S_min": 0.01, "S_max": 50}):
            for s, row, lab in zip(ids, x, labels if labels is not None else [None] * len(ids)):
                parts[s] = (row, lab)
    assert sorted(parts) == seeds
    x = torch.stack([parts[s][0] for s in seeds])
    labels = torch.stack([parts[s][1] for s in seeds]) if label_dim else None
    return x, labels


def test_same_seed_same_sample_at_batch_1_7_64_and_any_world_size():
    ref, ref_labels = _samples(64, label_dim=5)
    assert ref.std() > 0.1 and len({tuple(r.flatten().tolist()) for r in ref}) == 64  # seeds differ
    for batch, world in ((1, 1), (7, 1), (7, 3), (64, 2)):
        x, labels = _samples(batch, world, label_dim=5)
        assert torch.equal(x, ref), (batch, world)  # bit for bit: the noise is per seed, the denoiser per row
        assert torch.equal(labels, ref_labels)
    no_churn = generate(DistContext(), _RowWise(), [0], (1, 4, 4), sampler={"num_steps": 6})
    assert not torch.equal(next(no_churn)[1][0], ref[0])  # churn noise really entered the samples
