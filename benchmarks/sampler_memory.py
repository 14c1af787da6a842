"""Host memory of the training data order (issue 9): the stream of rank 7 of 8 for EDM's CIFAR-10
recipe (50,000 items, 200 Mimg at batch 512, 64 per GPU), building it and taking its first 1,000
batches, and again after a resume 1,000 steps before the end. Prints a table and writes
benchmarks/results/sampler_memory.json.

    python benchmarks/sampler_memory.py
"""
from __future__ import annotations

import os
import platform
import sys
import time
import tracemalloc
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sims.training.sampler import TrainingSampler, TrainingStream  # noqa: E402
from sims.utils import atomic_write_json  # noqa: E402


def rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    n, batch, batch_gpu, world, rank = 50_000, 512, 64, 8, 7
    steps = 200_000_000 // batch
    data = torch.utils.data.TensorDataset(torch.zeros(n, 1), torch.zeros(n, 0))  # indices only: the sampler's cost
    rows = []
    for label, start in (("start", 0), ("resume near the end", steps - 1_000)):
        rss0 = rss_mb()
        t = time.time()
        tracemalloc.start()
        stream = iter(TrainingStream(data, TrainingSampler(n, global_batch=batch, batch_gpu=batch_gpu, rank=rank,
                                                           world_size=world, seed=0), start_step=start))
        for _ in range(1_000):
            next(stream)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        rows.append({"case": label, "start_step": start, "tracemalloc_peak_mb": peak / 2 ** 20,
                     "rss_growth_mb": rss_mb() - rss0, "seconds": time.time() - t})
    print("| case | start step | tracemalloc peak (MB) | RSS growth (MB) | s for 1,000 batches |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['start_step']} | {r['tracemalloc_peak_mb']:.2f} | {r['rss_growth_mb']:.2f} | "
              f"{r['seconds']:.2f} |")
    atomic_write_json(ROOT / "benchmarks/results/sampler_memory.json",
                      {"command": "python benchmarks/sampler_memory.py", "machine": platform.node(),
                       "items": n, "total_steps": steps, "batch": batch, "batch_gpu": batch_gpu, "rank": rank,
                       "world": world, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
