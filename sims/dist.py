"""The one distributed context (layer 0): rank, world size, device, barrier and collectives.

Every command builds one :class:`DistContext` at its start with :func:`init_distributed` and passes
it down explicitly; every stage (base training, synthetic generation, auxiliary fine-tune,
evaluation, loop generations) runs on all ranks whether or not a training stage ran before it in
the same process. This is the only module that reads the launchers' environment variables or asks
``torch.distributed`` for ranks.

Launchers (detected from the environment, in this order):

==============  ==================================================================================
``torchrun``    ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``GROUP_RANK`` (torchrun /
                torch.distributed.elastic); the launcher fixes the number of processes.
``slurm``       ``SLURM_NTASKS`` > 1 with ``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_NODEID``,
                ``SLURM_NNODES``, ``SLURM_NODELIST`` (``srun``); the allocation fixes the processes.
``lightning``   ``LOCAL_RANK`` set by Lightning's launcher in a child process it started.
``single``      none of these: one process, or Lightning's launcher re-runs the command for
                ``devices × num_nodes`` processes (``train.devices=N``).
==============  ==================================================================================

The process group is created once by Lightning Fabric's DDP strategy (gloo on CPU, NCCL on CUDA)
and reused by every later ``lightning.Trainer`` (which then neither spawns processes nor
re-initialises the group).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from sims.errors import ConfigError

LAUNCHERS = ("single", "lightning", "torchrun", "slurm")
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job.

    Attributes:
        rank: global rank in [0, world_size).
        world_size: number of processes of the job.
        local_rank: rank on this node.
        node_rank: index of this node.
        num_nodes: nodes of the job.
        device: this rank's device (``cuda:local_rank`` on GPUs, else CPU).
        launcher: one of :data:`LAUNCHERS`.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    node_rank: int = 0
    num_nodes: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    launcher: str = "single"

    # -- facts ------------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        """True on global rank 0 (the rank that writes reports and manifests)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when there is more than one process."""
        return self.world_size > 1

    @property
    def devices(self) -> int:
        """Processes per node (Lightning's ``devices``)."""
        return self.world_size // max(self.num_nodes, 1)

    @property
    def accelerator(self) -> str:
        """Lightning accelerator name of :attr:`device`: ``gpu`` or ``cpu``."""
        return "gpu" if self.device.type == "cuda" else "cpu"

    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    # -- collectives (no-ops in one process) -------------------------------------------------------
    def barrier(self) -> None:
        """Block until every rank reaches this point."""
        if self.distributed:
            torch.distributed.barrier()

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """A new tensor: the element-wise ``sum`` / ``max`` / ``min`` of ``tensor`` over ranks, on
        ``tensor``'s device and dtype (float64 sums stay float64)."""
        if not self.distributed:
            return tensor.clone()
        ops = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX,
               "min": torch.distributed.ReduceOp.MIN}
        buf = tensor.detach().to(self._comm_device()).clone()
        torch.distributed.all_reduce(buf, op=ops[op])
        return buf.to(tensor.device)

    def all_gather(self, tensor: torch.Tensor) -> List[torch.Tensor]:
        """Every rank's ``tensor`` (same shape and dtype on every rank), in rank order, on CPU."""
        if not self.distributed:
            return [tensor.detach().cpu()]
        buf = tensor.detach().to(self._comm_device()).contiguous()
        out = [torch.empty_like(buf) for _ in range(self.world_size)]
        torch.distributed.all_gather(out, buf)
        return [t.cpu() for t in out]

    def all_gather_object(self, obj: Any) -> List[Any]:
        """Every rank's picklable ``obj``, in rank order."""
        if not self.distributed:
            return [obj]
        out: List[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def gather_object(self, obj: Any, dst: int = 0) -> Optional[List[Any]]:
        """Every rank's picklable ``obj`` on rank ``dst`` (in rank order); None on the other ranks."""
        if not self.distributed:
            return [obj]
        out: Optional[List[Any]] = [None] * self.world_size if self.rank == dst else None
        torch.distributed.gather_object(obj, out, dst=dst)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj if self.rank == src else None]
        torch.distributed.broadcast_object_list(box, src=src)
        return box[0]

    # -- Lightning ----------------------------------------------------------------------------------
    def trainer_kwargs(self) -> Dict[str, Any]:
        """``lightning.Trainer`` keyword arguments that reuse this job's processes and process group."""
        if not self.distributed:
            return {"accelerator": self.accelerator, "devices": 1, "num_nodes": 1, "strategy": "auto"}
        from lightning.pytorch.strategies import DDPStrategy

        return {"accelerator": self.accelerator, "devices": self.devices, "num_nodes": self.num_nodes,
                "strategy": DDPStrategy(cluster_environment=_cluster_environment(self.launcher),
                                        process_group_backend=_backend(self.accelerator))}


def detect_launcher(env: Optional[Dict[str, str]] = None) -> str:
    """The launcher that started this process (see the module docstring), from ``env`` (default os.environ)."""
    env = os.environ if env is None else env
    if all(k in env for k in _TORCHRUN_VARS):
        return "torchrun"
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_PROCID" in env:
        return "slurm"
    if "LOCAL_RANK" in env:
        return "lightning"
    return "single"


def _int_env(env: Dict[str, str], key: str, launcher: str) -> int:
    try:
        return int(env[key])
    except (KeyError, ValueError):
        raise ConfigError(f"{launcher} launch: environment variable {key} is missing or not an integer") from None


def _backend(accelerator: str) -> str:
    return "nccl" if accelerator == "gpu" else "gloo"


def _cluster_environment(launcher: str):
    from lightning.fabric.plugins.environments import LightningEnvironment, SLURMEnvironment, TorchElasticEnvironment

    if launcher == "torchrun":
        return TorchElasticEnvironment()
    if launcher == "slurm":
        return SLURMEnvironment(auto_requeue=False)  # pre-emption is handled by sims (checkpoint, exit)
    return LightningEnvironment()


def _resolve_accelerator(accelerator: str) -> str:
    acc = str(accelerator).lower()
    if acc in ("auto",):
        return "gpu" if torch.cuda.is_available() else "cpu"
    if acc in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("train.accelerator=gpu but no CUDA device is available (use train.accelerator=cpu)")
        return "gpu"
    if acc == "cpu":
        return "cpu"
    raise ConfigError(f"train.accelerator must be auto, gpu or cpu, got {accelerator!r}")


def launch_shape(launcher: str, devices: int, num_nodes: int, env: Optional[Dict[str, str]] = None) -> tuple:
    """(processes per node, nodes) of the job, from the launcher's environment when it fixes them.

    Raises:
        ConfigError: ``devices``/``num_nodes`` set to values the launcher contradicts, or a
            launcher variable missing.
    """
    env = os.environ if env is None else env
    if launcher == "torchrun":
        world = _int_env(env, "WORLD_SIZE", launcher)
        local = int(env.get("LOCAL_WORLD_SIZE", world))
        shape = (local, max(world // max(local, 1), 1))
    elif launcher == "slurm":
        world = _int_env(env, "SLURM_NTASKS", launcher)
        nodes = int(env.get("SLURM_NNODES", "1") or 1)
        shape = (world // nodes, nodes)
    else:
        return int(devices), int(num_nodes)
    for name, given, actual in (("train.devices", devices, shape[0]), ("train.num_nodes", num_nodes, shape[1])):
        if int(given) not in (1, actual):
            raise ConfigError(f"{name}={given} but the {launcher} launcher started {actual} per "
                              f"{'node' if name == 'train.devices' else 'job'}; leave {name} at 1 or set it to {actual}")
    return shape


def init_distributed(accelerator: str = "auto", devices: int = 1, num_nodes: int = 1) -> DistContext:
    """Create this job's :class:`DistContext` (and, for several processes, its process group).

    Call once, at the start of a command, in every process. With one process and no launcher it
    only picks the device. Otherwise Lightning Fabric's DDP strategy initialises the process group
    from the launcher's environment; with no external launcher (``single``) and ``devices ×
    num_nodes > 1`` Fabric first starts the other processes by re-running the command.

    Args:
        accelerator: ``auto`` | ``gpu`` | ``cpu``.
        devices: processes per node when no external launcher fixes it.
        num_nodes: nodes when no external launcher fixes it.
    Raises:
        ConfigError: unknown accelerator, GPU requested without CUDA, or settings the launcher contradicts.
    """
    launcher = detect_launcher()
    acc = _resolve_accelerator(accelerator)
    local, nodes = launch_shape(launcher, devices, num_nodes)
    if local < 1 or nodes < 1:
        raise ConfigError(f"train.devices and train.num_nodes must be >= 1, got {devices}, {num_nodes}")
    if local * nodes == 1:
        device = torch.device("cuda", torch.cuda.current_device()) if acc == "gpu" else torch.device("cpu")
        return DistContext(device=device, launcher=launcher)
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import DDPStrategy

    strategy = DDPStrategy(cluster_environment=_cluster_environment(launcher), process_group_backend=_backend(acc))
    fabric = Fabric(accelerator=acc, devices=local, num_nodes=nodes, strategy=strategy)
    fabric.launch()
    return DistContext(rank=fabric.global_rank, world_size=fabric.world_size, local_rank=fabric.local_rank,
                       node_rank=fabric.node_rank, num_nodes=nodes, device=fabric.device,
                       launcher=detect_launcher() if launcher == "single" else launcher)


def shutdown_distributed() -> None:
    """End a command's process group: a barrier, then ``destroy_process_group`` (no-op with one process).

    Without it a gloo process can abort at interpreter exit ("terminate called without an active
    exception", exit -6) while its communication threads are torn down, after its work is done.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def single_process(device: str | torch.device = "cpu") -> DistContext:
    """A one-process context on ``device`` (library use and tests)."""
    return DistContext(device=torch.device(device))
