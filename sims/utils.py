"""Small shared helpers (layer 0): atomic writes, seed parsing and derivation, hashing, fault injection."""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import signal
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Union

import numpy as np


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path`` (same directory).

    A crash leaves either the old file or the new one, never a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    """Atomically write ``text`` (UTF-8) to ``path``."""
    atomic_write(Path(path), lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write_text(Path(path), json.dumps(obj, indent=2, sort_keys=False) + "\n")


def parse_seeds(spec: str) -> List[int]:
    """Parse a seed list such as ``0-999``, ``1,3,5`` or ``0-9,100-109`` (inclusive ranges).

    Raises:
        ValueError: on an empty spec, a non-integer, a negative seed or a descending range.
    """
    seeds: List[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part[1:]:
                lo_s, hi_s = part.split("-", 1)
                lo, hi = int(lo_s), int(hi_s)
                if hi < lo:
                    raise ValueError(f"descending seed range {part!r}")
                seeds.extend(range(lo, hi + 1))
            else:
                seeds.append(int(part))
        except ValueError as exc:
            raise ValueError(f"bad seed list {spec!r}: {exc}") from None
    if not seeds:
        raise ValueError(f"empty seed list {spec!r}")
    if min(seeds) < 0:
        raise ValueError(f"seeds must be >= 0, got {spec!r}")
    return seeds


def flatten_dict(d: Mapping, prefix: str = "") -> Dict[str, Any]:
    """Nested mapping -> {"a.b.c": value} (lists are values)."""
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_dict(v, key + "."))
        else:
            out[key] = v
    return out


def _key_int(key: Union[int, str]) -> int:
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        if key < 0:
            raise ValueError(f"seed keys must be >= 0, got {key}")
        return int(key)
    return zlib.crc32(str(key).encode("utf-8"))


@functools.lru_cache(maxsize=1 << 16)
def derive_seed(seed: int, *keys: Union[int, str]) -> int:
    """A 32-bit integer seed that is a pure function of ``seed`` and ``keys``.

    ``SeedSequence(entropy=seed, spawn_key=keys)`` (strings mapped through CRC-32, stable across
    processes and Python versions), first 32-bit word of its state: independent streams for
    distinct keys, e.g. ``derive_seed(seed, "loss", shard, step)`` for one training micro-batch.

    Raises:
        ValueError: negative seed or key.
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    ss = np.random.SeedSequence(int(seed), spawn_key=tuple(_key_int(k) for k in keys))
    return int(ss.generate_state(1, dtype=np.uint32)[0])


def sha256_file(path: Union[str, Path], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (provenance of weights and reference statistics)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


_FAULT_COUNTS: Dict[str, int] = {}


def fault_point(name: str) -> None:
    """Fault injection for the resume tests: ``SIMS_FAULT="name:N"`` (comma-separated for several)
    kills this process with SIGKILL at the N-th time it passes ``fault_point(name)``.

    Unset (the normal case), this is a dictionary lookup and does nothing.
    """
    spec = os.environ.get("SIMS_FAULT")
    if not spec:
        return
    _FAULT_COUNTS[name] = _FAULT_COUNTS.get(name, 0) + 1
    for item in spec.split(","):
        key, _, count = item.partition(":")
        if key == name and _FAULT_COUNTS[name] == int(count or 1):
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)


def quiet_lightning() -> None:
    """Keep Lightning's INFO chatter (GPU available, tips) out of the output, if it is imported.

    Lightning sets its loggers' levels when imported, so callers call this again after importing it.
    """
    if "lightning" in sys.modules:
        for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
            logging.getLogger(name).setLevel(logging.WARNING)
