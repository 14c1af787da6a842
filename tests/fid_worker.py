"""Run on every rank of a 2-process CPU (gloo) job by tests/test_fid_scale.py.

    python tests/fid_worker.py reference OUT

computes :func:`sims.stages.evaluate.build_reference` sharded over the job's ranks for each case
of :func:`reference_cases` and rank 0 writes ``OUT/reference.pt`` ({case: {mu, sigma, count,
pr_size, real_features}}), which the test compares with one process's. The job's processes come
from torchrun-style environment variables set by the test.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def reference_cases():
    """{case: (features, data set, pr_size, batch_size)}: the reference statistics both sides compute.

    - ``digits``: the 1,797 digits in digits-classifier features, batches of 400: 5 batches, so
      rank 0 gets 3 and rank 1 gets 2 (the last one of 197 items).
    - ``identity``: the same digits as 64-d vectors, batches of 256 (rank 1's last batch has 5 items).
    - ``small``: the first 100 digits in one batch of 1,000: rank 1 gets no batch at all.
    """
    from sims.config import load_config
    from sims.data import load_real_dataset
    from sims.data.datasets import ArrayDataset

    digits = load_real_dataset(load_config(ROOT / "configs/digits.yaml", ["run_dir=unused"]).data)
    small = ArrayDataset(digits.data[:100], name="digits-100")
    return {"digits": ("digits", digits, 300, 400), "identity": ("identity", digits, 500, 256),
            "small": ("identity", small, 40, 1000)}


def compute_references(ctx):
    """Every case of :func:`reference_cases` through ``build_reference`` on ``ctx``; the rank-0 view."""
    from sims.stages.evaluate import build_reference, make_extractor

    out = {}
    for case, (features, data, pr_size, batch) in reference_cases().items():
        ext = make_extractor(features, data_dim=64, inception_weights=None, device=ctx.device)
        ref = build_reference(ctx, ext, features, data, pr_size=pr_size, batch_size=batch)
        out[case] = {"mu": torch.from_numpy(ref.mu), "sigma": torch.from_numpy(ref.sigma), "count": ref.num_items,
                     "pr_size": ref.pr_size, "real_features": ref.real_features,
                     "has_manifold": ref.manifold is not None, "world": ctx.world_size}
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("scenario", choices=("reference",))
    p.add_argument("out")
    args = p.parse_args()
    from sims.dist import init_distributed

    torch.set_num_threads(1)
    ctx = init_distributed("cpu", 1, 1)
    out = Path(args.out)
    result = compute_references(ctx)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        torch.save(result, out / "reference.pt")
    from sims.dist import shutdown_distributed

    shutdown_distributed()  # barrier, then end the group: a gloo process left with it can abort at exit (-6)


if __name__ == "__main__":
    main()
