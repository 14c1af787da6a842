"""The training sampler: data order by arithmetic, rank sharding, resume, workers, bounded memory."""
from __future__ import annotations

import itertools
import os
import resource
import tracemalloc

import pytest
import torch

from sims.errors import ConfigError
from sims.training.sampler import TrainingSampler, TrainingStream, accumulation_steps


def _sampler(n=50, B=16, b=4, rank=0, world=2, seed=0):
    return TrainingSampler(n, global_batch=B, batch_gpu=b, rank=rank, world_size=world, seed=seed)


def test_a_step_covers_the_global_batch_once_whatever_the_decomposition():
    # B = 16 from 2 ranks x 2 micro-batches of 4, or 1 rank x 4 micro-batches: the same 16 items per step,
    # the same item for each slice k
    for step in (0, 1, 3, 7):
        two = [_sampler(rank=r).indices(step, m) for r in (0, 1) for m in range(2)]
        one = [_sampler(world=1).indices(step, m) for m in range(4)]
        assert all(torch.equal(a, b) for a, b in zip(two, one))
    # epochs are permutations: 50 items, positions 0..49 cover each once
    seen = torch.cat([_sampler(world=1, B=10, b=10).indices(s, 0) for s in range(5)])
    assert sorted(seen.tolist()) == list(range(50))
    # a batch straddling two epochs, and another seed
    assert len(_sampler(world=1, B=16, b=16).indices(3, 0)) == 16
    assert not torch.equal(_sampler(seed=1).indices(0, 0), _sampler(seed=0).indices(0, 0))


def test_resume_is_arithmetic_and_workers_do_not_change_the_order():
    s = _sampler(world=1, b=8)
    it = s.micro_batches(0)
    first = [next(it) for _ in range(12)]
    resumed = s.micro_batches(3)
    assert [(st, k) for st, k, _ in first[6:]] == [(st, k) for st, k, _ in (next(resumed) for _ in range(6))]
    # two workers: worker w serves every second micro-batch; interleaved they give the same stream
    w0, w1 = s.micro_batches(0, 0, 2), s.micro_batches(0, 1, 2)
    merged = [x for pair in itertools.islice(zip(w0, w1), 6) for x in pair]
    assert all(a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2]) for a, b in zip(merged, first))


def test_stream_with_dataloader_workers_equals_no_workers():
    data = torch.utils.data.TensorDataset(torch.arange(40).float()[:, None], torch.zeros(40, 0))
    s = _sampler(n=40, world=1, B=8, b=4)

    def batches(workers):
        dl = torch.utils.data.DataLoader(TrainingStream(data, s, start_step=2), batch_size=None, num_workers=workers)
        out = []
        for i, b in enumerate(dl):
            out.append(b)
            if i == 9:
                break
        return out

    a, b = batches(0), batches(2)
    for x, y in zip(a, b):
        assert torch.equal(x[0], y[0]) and torch.equal(x[2], y[2])
    assert a[0][2].tolist() == [2, 0]  # the stream starts at the resumed step


def test_bad_decompositions_are_refused():
    with pytest.raises(ConfigError, match="not a multiple of train.batch_gpu=48"):
        accumulation_steps(512, 48, 2)
    assert accumulation_steps(512, 64, 2) == 4


def _rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_memory_does_not_grow_with_the_run_length():
    """Rank 7 of 8 of the CIFAR-10 recipe (50,000 items, 200 Mimg, batch 512): building its stream
    and taking 1,000 batches, and again after a resume near the end, stays far below 50 MB."""
    data = torch.utils.data.TensorDataset(torch.zeros(50_000, 1), torch.zeros(50_000, 0))
    steps = 200_000_000 // 512
    for start in (0, steps - 1_000):
        rss0 = _rss_mb()
        tracemalloc.start()
        s = TrainingSampler(50_000, global_batch=512, batch_gpu=64, rank=7, world_size=8, seed=0)
        stream = iter(TrainingStream(data, s, start_step=start))
        for _ in range(1_000):
            next(stream)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak / 2 ** 20 < 50, peak
        assert _rss_mb() - rss0 < 50
