"""The loop's run directory: paths, manifest, synthetic-data files, sample figures."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from sims.errors import LoopError
from sims.utils import atomic_write

MANIFEST_FORMAT = "sims-loop/1"
_SHARED = "_shared"


@dataclass(frozen=True)
class StepInfo:
    """Passed to ``hooks`` after each phase: ``fit``, ``sample``, ``evaluate``, ``record``."""

    phase: str
    workflow: str
    method: str
    seeds: Tuple[int, ...]
    generation: int
    workdir: Path


def batch_name(seeds: Sequence[int]) -> str:
    """Directory name of a seed batch: ``seed7``, ``seeds0-49`` (a contiguous range) or a hash."""
    seeds = list(seeds)
    if len(seeds) == 1:
        return f"seed{seeds[0]}"
    if seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"seeds{seeds[0]}-{seeds[-1]}"
    return "seeds-" + hashlib.sha1(",".join(map(str, seeds)).encode()).hexdigest()[:10]


def unit_key(workflow: str, method: str, seed: int) -> str:
    return f"{workflow}/{method}/{seed}"


class RunDir:
    """Paths of a loop run directory (see :mod:`sims.loop`) and its manifest."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.manifest_path = self.root / "manifest.json"

    def _base(self, kind: str, workflow: str, method: str, seeds: Sequence[int], generation: int) -> Path:
        wf = _SHARED if generation == 1 else workflow
        return self.root / kind / wf / method / batch_name(seeds)

    def synthetic(self, workflow: str, method: str, seeds: Sequence[int], generation: int) -> Path:
        return self._base("synthetic", workflow, method, seeds, generation) / f"gen{generation:03d}.npz"

    def workdir(self, workflow: str, method: str, seeds: Sequence[int], generation: int) -> Path:
        return self._base("models", workflow, method, seeds, generation) / f"gen{generation:03d}"

    def figure(self, workflow: str, method: str, seeds: Sequence[int], generation: int) -> Path:
        return self._base("samples", workflow, method, seeds, generation) / f"gen{generation:03d}.png"

    def unit(self, workflow: str, method: str, seeds: Sequence[int], generation: int) -> Path:
        return self.root / "units" / workflow / method / batch_name(seeds) / f"gen{generation:03d}.json"

    def read_manifest(self) -> Optional[dict]:
        if not self.manifest_path.is_file():
            return None
        try:
            return json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise LoopError(f"cannot read {self.manifest_path}: {exc}; delete the run directory to start over") from None


def completed_units(manifest: Mapping) -> List[Tuple[str, str, int, int]]:
    """Expand a manifest's ``completed`` record into (workflow, method, seed, generation) units."""
    out = []
    for key, last in manifest.get("completed", {}).items():
        wf, method, seed = key.rsplit("/", 2)
        out.extend((wf, method, int(seed), g) for g in range(1, int(last) + 1))
    return sorted(out)


def describe_mismatch(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    keys = sorted(set(old) | set(new))
    diffs = [f"{k}: {old.get(k, '<absent>')!r} (run dir) vs {new.get(k, '<absent>')!r} (now)"
             for k in keys if old.get(k, "<absent>") != new.get(k, "<absent>")]
    more = f" and {len(diffs) - 6} more" if len(diffs) > 6 else ""
    return "; ".join(diffs[:6]) + more


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    atomic_write(path, write)


def load_synthetic(path: Path, seeds: Sequence[int], num: int) -> np.ndarray:
    try:
        with np.load(path) as z:
            samples, stored = z["samples"], z["seeds"]
    except (OSError, KeyError, ValueError) as exc:
        raise LoopError(f"cannot read synthetic data {path}: {exc}; delete the run directory to start over") from None
    if list(stored) != list(seeds) or samples.shape[:2] != (len(seeds), num):
        raise LoopError(f"{path} holds seeds {list(stored)} / shape {samples.shape}, expected seeds {list(seeds)} "
                        f"and ({len(seeds)}, {num}, ...); the run directory is damaged, delete it to start over")
    return samples


def sample_figure(samples: np.ndarray, real: np.ndarray, path: Path, title: str) -> None:
    """A grid of the first 100 images, or a scatter of 2-D samples over the real points (first seed)."""
    import torch

    from sims.figures import save_sample_figure

    if samples.ndim == 4:
        save_sample_figure(torch.from_numpy(np.ascontiguousarray(samples[:100])), path)
    elif samples.ndim == 2 and samples.shape[1] >= 2:
        save_sample_figure(torch.from_numpy(samples[:, :2]), path, reference=real[:, :2], title=title)
