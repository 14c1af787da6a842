"""The disjointness of a SIMS run's seed sets (SPEC §4: no sample of a selection or report set is
ever used for training or for another choice). Lightning-free: ``validate`` calls it before any work."""
from __future__ import annotations

from typing import Tuple

from omegaconf import DictConfig

from sims.errors import ConfigError


def seed_range(offset: int, n: int) -> Tuple[int, int]:
    return int(offset), int(offset) + int(n)


def check_seed_sets(cfg: DictConfig) -> None:
    """Synthetic, selection, report and FD-callback seed ranges must be pairwise disjoint, and n_s at
    least one batch.

    Raises:
        ConfigError: naming the two overlapping ranges.
    """
    s = cfg.sims
    ranges = [("synthetic", "sims.synthetic_seed_offset", seed_range(s.synthetic_seed_offset, s.num_synthetic))]
    ranges += [(f"selection set {o}", "sims.selection_seed_offsets", seed_range(o, s.selection_num_samples))
               for o in s.selection_seed_offsets]
    ranges += [(f"report set {o}", "sims.report_seed_offsets", seed_range(o, s.report_num_samples))
               for o in s.report_seed_offsets]
    if cfg.train.eval_every_kimg > 0:
        ranges.append(("FD-callback", "train.eval_seed_offset",
                       seed_range(cfg.train.eval_seed_offset, cfg.train.eval_num_samples)))
    for i, (name_a, key_a, (a0, a1)) in enumerate(ranges):
        for name_b, key_b, (b0, b1) in ranges[i + 1:]:
            if a0 < b1 and b0 < a1:
                raise ConfigError(f"{name_a} seeds [{a0}, {a1}) overlap {name_b} seeds [{b0}, {b1}): change "
                                  f"{key_a} or {key_b}")
    if int(s.num_synthetic) < int(cfg.train.batch_size):
        raise ConfigError(f"sims.num_synthetic={s.num_synthetic} is smaller than one batch ({cfg.train.batch_size})")
