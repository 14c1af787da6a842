"""The run directory of ``sims-train``: its config check, its lock, and loading the denoiser it holds.

Layout::

    RUN/config.yaml                  resolved config (a re-run with another config is refused)
    RUN/.lock                        held while a job works here (pid, host, heartbeat)
    RUN/base/{checkpoints/last.ckpt, logs/metrics.csv, ema*.safetensors, grid.png, DONE}
    RUN/synthetic/{shard_*.npz, manifest.json}
    RUN/aux/{..., ema*.safetensors, snapshots/kimgNNNNNNN/ema*.safetensors}
    RUN/eval/{results.json, report.json, report.md, fd_vs_omega.png, grid_base_vs_sims.png, reference.npz}
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf

from sims.config import RESUME_KEYS, save_config, to_container
from sims.dist import DistContext
from sims.errors import ConfigError, RunDirLockedError, WeightsError
from sims.utils import atomic_write_text, flatten_dict

log = logging.getLogger("sims")

SIMS_STAGES = ("synthetic", "aux", "eval")
LOCK_NAME = ".lock"
HEARTBEAT_S = 30.0
STALE_S = 600.0  # a lock from another host whose heartbeat is older than this is taken over


def config_differences(old: Dict[str, Any], new: Dict[str, Any], *, ignore_sims: bool = False) -> list:
    """Keys whose values differ between two flattened configs, minus :data:`sims.config.RESUME_KEYS`
    (and every ``sims.*`` key when ``ignore_sims``)."""
    return sorted(k for k in set(old) | set(new) if k not in RESUME_KEYS and old.get(k) != new.get(k)
                  and not (ignore_sims and k.startswith("sims.")))


def prepare_run_dir(ctx: DistContext, cfg: DictConfig) -> Path:
    """Create the run directory and save the resolved config, or check it matches a previous run's.

    Raises:
        ConfigError: the directory holds a run made with different settings (mixing them would
            corrupt results; the message lists the differing keys and the way out), or it is a
            non-empty folder that is not a sims run directory.
    """
    run_dir = Path(cfg.run_dir)
    saved = run_dir / "config.yaml"
    if saved.exists():
        old = flatten_dict(OmegaConf.to_container(OmegaConf.load(saved), resolve=True))
        new = flatten_dict(to_container(cfg))
        # Before any SIMS stage has run, its settings may still change (e.g. sims.enabled=true on a base run).
        sims_free = not old.get("sims.enabled") and not any((run_dir / d).exists() for d in SIMS_STAGES)
        diff = config_differences(old, new, ignore_sims=sims_free)
        if diff:
            shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:6])
            raise ConfigError(f"{run_dir} was made by a different config ({shown}); refusing to mix runs. "
                              f"Use a new run_dir=..., or delete {run_dir} to start fresh")
    elif run_dir.exists() and any(p.name != LOCK_NAME for p in run_dir.iterdir()):
        raise ConfigError(f"{run_dir} exists, is not empty and has no config.yaml: not a sims run directory. "
                          "Choose another run_dir=...")
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, saved)
    ctx.barrier()
    return run_dir


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunDirLock:
    """An exclusive lock on a run directory, held by the job's global rank 0.

    ``RUN/.lock`` holds ``{"pid", "host", "started", "heartbeat"}``; a daemon thread refreshes the
    heartbeat every :data:`HEARTBEAT_S` seconds. Another job is refused with a message naming the
    holder. A lock left by a dead process of this host is taken over; a lock from another host once
    its heartbeat is older than :data:`STALE_S`, or at once with ``force``.
    Readers (``sims-sample``, ``sims-fid``) never lock.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _holder(self) -> Optional[dict]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def _stale(self, holder: dict) -> bool:
        if holder.get("host") == self.info["host"]:
            return not _pid_alive(int(holder.get("pid", -1)))
        return time.time() - float(holder.get("heartbeat", 0)) > STALE_S

    def _write(self, exclusive: bool) -> bool:
        payload = json.dumps({**self.info, "heartbeat": time.time()})
        if not exclusive:
            atomic_write_text(self.path, payload)
            return True
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            fh.write(payload)
        return True

    def acquire(self, force: bool = False) -> "RunDirLock":
        """Take the lock (creating the run directory).

        Raises:
            RunDirLockedError: another live job holds it.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._write(exclusive=True):
                break
            holder = self._holder()
            if holder is not None and not force and not self._stale(holder):
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0))))
                raise RunDirLockedError(
                    f"{self.path.parent} is in use by pid {holder.get('pid')} on host {holder.get('host')} "
                    f"(since {since}); wait for it, or re-run with --force-unlock if no job is working there")
            if holder is not None:
                log.warning("taking over the lock of pid %s on %s (%s)", holder.get("pid"), holder.get("host"),
                            "forced" if force else "stale")
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        else:
            raise RunDirLockedError(f"could not lock {self.path.parent}: another job keeps taking it")
        self._thread = threading.Thread(target=self._beat, daemon=True, name="sims-lock-heartbeat")
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            holder = self._holder()
            if holder is None or holder.get("pid") != self.info["pid"] or holder.get("host") != self.info["host"]:
                return  # taken over (forced): stop refreshing someone else's lock
            self._write(exclusive=False)

    def release(self) -> None:
        """Drop the lock if this process still holds it."""
        self._stop.set()
        holder = self._holder()
        if holder is not None and holder.get("pid") == self.info["pid"] and holder.get("host") == self.info["host"]:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass


def lock_run_dir(ctx: DistContext, run_dir: Path, force: bool = False) -> Optional[RunDirLock]:
    """Global rank 0 takes :class:`RunDirLock` (after the process group exists); every rank learns
    the outcome, so the job's other ranks are never refused and all ranks fail together.

    Returns:
        The lock on rank 0 (release it at the end), None on the other ranks.
    Raises:
        RunDirLockedError: on every rank, when rank 0 could not take the lock.
    """
    lock, error = None, None
    if ctx.is_main:
        try:
            lock = RunDirLock(run_dir).acquire(force=force)
        except RunDirLockedError as exc:
            error = str(exc)
    error = ctx.broadcast_object(error)
    if error:
        raise RunDirLockedError(error)
    return lock


# ------------------------------------------------------------------------------------------------
# Reading a run


def read_run_config(run_dir: Path) -> Dict[str, Any]:
    """The saved config of a run directory as a plain dict.

    Raises:
        WeightsError: not a run directory.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise WeightsError(f"{run_dir} is not a sims run directory (no config.yaml)")
    return OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=True)


COMPAT_KEYS = ("network", "data_shape", "label_dim", "sigma_data")


def check_compatible(base_meta: dict, aux_meta: dict, aux_path: Path) -> None:
    """The auxiliary model must have the base's architecture, data shape, classes and σ_data.

    Raises:
        WeightsError: naming the first mismatching field.
    """
    for key in COMPAT_KEYS:
        if base_meta.get(key) != aux_meta.get(key):
            raise WeightsError(f"auxiliary model {aux_path} does not match the base model: {key} is "
                               f"{aux_meta.get(key)!r}, base has {base_meta.get(key)!r}")


def weights_file(stage_dir: Path, ema: Optional[str] = None, snapshot: Optional[str] = None) -> Path:
    """The exported weights of a stage: its main EMA, another EMA (``ema``, a :func:`ema_key`), or
    one of its snapshots (``snapshot``, a folder name under ``snapshots/``)."""
    folder = Path(stage_dir) / "snapshots" / snapshot if snapshot else Path(stage_dir)
    return folder / ("ema.safetensors" if not ema else f"ema-{ema}.safetensors")


def selected_settings(run_dir: Path) -> Dict[str, Any]:
    """What the SIMS evaluation chose (``eval/report.json``: base EMA, auxiliary snapshot and EMA),
    or {} when the run has no report."""
    path = Path(run_dir) / "eval" / "report.json"
    if not path.is_file():
        return {}
    report = json.loads(path.read_text())
    chosen = report.get("chosen", {})
    return {k: chosen.get(k) for k in ("base_ema", "aux_snapshot", "aux_ema") if k in chosen}


def load_run_denoiser(run_dir: str | Path, omega: float = 0.0, *, sigma_interval: Optional[Sequence[float]] = None,
                      device="cpu", base_ema: Optional[str] = None, aux_snapshot: Optional[str] = None,
                      aux_ema: Optional[str] = None) -> Tuple[object, Dict[str, Any], Dict[str, Any]]:
    """The denoiser to sample a run with: its base EMA model (ω = 0) or SIMS guidance with the run's
    auxiliary model (ω > 0). Unless told otherwise, the EMA lengths and the auxiliary snapshot are
    the ones the run's evaluation selected (``eval/report.json``), else the main ones.

    Returns:
        (denoiser, the run's config as a dict, the base weights' metadata).
    Raises:
        WeightsError / MissingFileError: not a run directory, no base weights, ω > 0 but no (or a
            mismatched) auxiliary model.
        InputError: ω not finite or negative.
    """
    from sims.diffusion import SIMSGuidance
    from sims.training.export import load_denoiser

    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    SIMSGuidance.check_omega(omega)
    chosen = selected_settings(run_dir)
    base_ema = base_ema if base_ema is not None else chosen.get("base_ema")
    base, meta = load_denoiser(weights_file(run_dir / "base", base_ema), device)
    if omega == 0:
        return base, cfg, meta
    aux_snapshot = aux_snapshot if aux_snapshot is not None else chosen.get("aux_snapshot")
    aux_ema = aux_ema if aux_ema is not None else chosen.get("aux_ema")
    aux_path = weights_file(run_dir / "aux", aux_ema, aux_snapshot)
    if not aux_path.is_file():
        raise WeightsError(f"{run_dir} has no auxiliary model ({aux_path}): guidance omega={omega} needs one; "
                           "train it with sims-train CONFIG run_dir=... sims.enabled=true")
    aux, aux_meta = load_denoiser(aux_path, device)
    check_compatible(meta, aux_meta, aux_path)
    return SIMSGuidance(base, aux, omega, sigma_interval=sigma_interval), cfg, meta
