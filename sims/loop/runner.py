"""The loop driver's helpers: one batched interface over batched and per-seed models, the batched
unit records, and derived seeds computed in one vectorised pass."""
from __future__ import annotations

from __future__ import annotations
import json
import logging
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union
import numpy as np
from sims.data.workflows import TrainingData
from sims.dist import DistContext
from sims.errors import LoopError
from sims.loop.protocol import GenerativeModel
from sims.loop.rundir import (RunDir)
from sims.utils import _key_int, atomic_write_json, atomic_write_text, derive_seed

log = logging.getLogger("sims.loop")

RECORD_FLUSH_S = 1.0
"""Unit records and the manifest are written at least this often (seconds) while a stream runs
(and at its end): a model faster than that per generation does not pay a manifest rewrite per unit."""


class _Runner:
    """One batched interface over batched and per-seed models."""

    def __init__(self, model: GenerativeModel):
        self.model = model
        self.batched = bool(getattr(model, "batched", False))

    def real_data(self, num: int, seeds: Sequence[int]) -> np.ndarray:
        if self.batched:
            out = np.asarray(self.model.real_data(num, seed=list(seeds)))
        else:
            out = np.stack([np.asarray(self.model.real_data(num, seed=s)) for s in seeds])
        if out.shape[:2] != (len(seeds), num):
            raise LoopError(f"model.real_data returned shape {out.shape}, expected ({len(seeds)}, {num}, ...)")
        return out

    def fit(self, td: TrainingData, *, generation: int, seeds: Sequence[int], workdir: Path,
            previous: Optional[Path], method: str) -> None:
        if self.batched:
            self.model.fit(td, generation=generation, seed=list(seeds), workdir=workdir, previous=previous, method=method)
        else:
            self.model.fit(td.seed(0), generation=generation, seed=seeds[0], workdir=workdir, previous=previous,
                           method=method)

    def sample(self, num: int, seeds: Sequence[int]) -> np.ndarray:
        out = self.model.sample(num, seed=list(seeds)) if self.batched else self.model.sample(num, seed=seeds[0])[None]
        out = np.asarray(out)
        if out.shape[:2] != (len(seeds), num):
            raise LoopError(f"model.sample returned shape {out.shape}, expected ({len(seeds)}, {num}, ...)")
        return out

    def evaluate(self, samples: np.ndarray, seeds: Sequence[int]) -> Dict[str, np.ndarray]:
        res = self.model.evaluate(samples, seed=list(seeds)) if self.batched else self.model.evaluate(samples[0], seed=seeds[0])
        out = {}
        for name, value in dict(res).items():
            arr = np.asarray(value, dtype=np.float64).reshape(-1)
            if arr.shape != (len(seeds),):
                raise LoopError(f"model.evaluate: metric {name!r} has {arr.size} values for {len(seeds)} seeds")
            out[str(name)] = arr
        return out


class _Records:
    """Unit records and the manifest of a run, written by rank 0 in batches.

    A unit's record is written before the manifest that lists it (both atomically), so the
    manifest never claims a unit whose record is missing. Records are flushed when at least
    ``interval`` seconds passed since the last flush (so every unit of a model that takes longer
    than that per generation is written at once), at the end of each stream and when a stream stops
    on an exception; a hard kill loses at most ``interval`` seconds of units, which a resume
    recomputes (bit-identically: every unit is a pure function of the seeds).
    """

    def __init__(self, ctx: DistContext, rd: RunDir, manifest: dict, interval: float = RECORD_FLUSH_S):
        self.ctx, self.rd, self.manifest, self.interval = ctx, rd, manifest, float(interval)
        self.pending: List[Tuple[Path, dict]] = []
        self.last = time.monotonic()

    def add(self, path: Path, record: dict, keys: Sequence[str], generation: int) -> None:
        for key in keys:
            self.manifest["completed"][key] = generation
        if self.ctx.is_main:
            self.pending.append((path, record))
            if time.monotonic() - self.last >= self.interval:
                self.flush()

    def flush(self) -> None:
        if not (self.ctx.is_main and self.pending):
            return
        for path, record in self.pending:  # one line each: read by collect_rows, not by people
            atomic_write_text(path, json.dumps(record) + "\n")
        self.pending.clear()
        self.manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        atomic_write_json(self.rd.manifest_path, self.manifest)
        self.last = time.monotonic()


_M32 = 0xFFFFFFFF


def derive_seeds(seeds: Sequence[int], *keys: Union[int, str, Sequence[int]]) -> List[int]:
    """``[derive_seed(s, *keys) for s in seeds]``, vectorised (bit-identical).

    A key may also be a sequence of integers (e.g. generations): the result then holds, seed-major,
    ``derive_seed(s, ..., k_j, ...)`` for every seed ``s`` and every entry ``k_j`` (all sequence keys
    must have the same length). :func:`sims.utils.derive_seed` is
    ``SeedSequence(s, spawn_key=keys).generate_state(1)[0]``; this evaluates numpy's SeedSequence
    hash (an entropy pool of 4 words, ``hashmix``/``mix`` with numpy's constants, from
    ``numpy/random/bit_generator.pyx``) on uint32 arrays, one lane per result, so thousands of
    seeds cost about as much as a few calls of ``derive_seed``. Seeds or keys of 32 bits or more
    fall back to ``derive_seed``.
    """
    seeds = [int(s) for s in seeds]
    lengths = {len(k) for k in keys if not isinstance(k, (int, str, np.integer))}
    if len(lengths) > 1:
        raise ValueError(f"sequence keys of different lengths: {sorted(lengths)}")
    reps = lengths.pop() if lengths else None
    if not seeds or reps == 0:
        return []
    cols = [[_key_int(v) for v in k] if not isinstance(k, (int, str, np.integer)) else [_key_int(k)] * (reps or 1)
            for k in keys]
    m = reps or 1
    if min(seeds) < 0 or max(seeds) > _M32 or any(w > _M32 for col in cols for w in col):
        return [derive_seed(s, *(col[j] for col in cols)) for s in seeds for j in range(m)]
    lanes = len(seeds) * m
    # assembled entropy: the run seed (one word), zero-padded to the pool size, then the spawn-key words
    zero = np.zeros(lanes, np.uint32)
    entropy = [np.repeat(np.asarray(seeds, dtype=np.uint32), m), zero, zero, zero]
    entropy += [np.tile(np.asarray(col, dtype=np.uint32), len(seeds)) for col in cols]
    hash_const = [0x43B0D7E5]

    def hashmix(value: np.ndarray) -> np.ndarray:
        value = value ^ np.uint32(hash_const[0])
        hash_const[0] = (hash_const[0] * 0x931E8875) & _M32
        value = value * np.uint32(hash_const[0])
        return value ^ (value >> np.uint32(16))

    def mix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        result = np.uint32(0xCA01F9DD) * x - np.uint32(0x4973F715) * y
        return result ^ (result >> np.uint32(16))

    with np.errstate(over="ignore"):
        pool = [hashmix(entropy[i]) for i in range(4)]
        for i_src in range(4):
            for i_dst in range(4):
                if i_src != i_dst:
                    pool[i_dst] = mix(pool[i_dst], hashmix(pool[i_src]))
        for i_src in range(4, len(entropy)):
            for i_dst in range(4):
                pool[i_dst] = mix(pool[i_dst], hashmix(entropy[i_src]))
        # generate_state(1, uint32): the first pool word through the output hash
        value = (pool[0] ^ np.uint32(0x8B51F9DD)) * np.uint32((0x8B51F9DD * 0x58F38DED) & _M32)
        value = value ^ (value >> np.uint32(16))
    return value.tolist()


class _SeedCache:
    """:func:`derive_seeds` of a seed batch, memoised for the run (fit and sample seeds do not
    depend on the workflow or method, so every stream reuses them). A request whose last key is a
    generation t fetches generations 1..G at once (one vectorised evaluation per kind of seed)."""

    def __init__(self, generations: int):
        self.generations = int(generations)
        self._memo: Dict[Tuple[Any, ...], List[int]] = {}

    def __call__(self, seeds: Sequence[int], *keys: Any) -> List[int]:
        seeds = tuple(seeds)
        key = (seeds,) + keys
        out = self._memo.get(key)
        if out is not None:
            return out
        *head, last = keys if keys else (None,)
        if keys and isinstance(last, int) and 1 <= last <= self.generations:
            gens = range(1, self.generations + 1)
            flat = derive_seeds(seeds, *head, gens)
            for j, t in enumerate(gens):
                self._memo[(seeds, *head, t)] = flat[j :: len(gens)]
            return self._memo[key]
        out = self._memo[key] = derive_seeds(seeds, *keys)
        return out
