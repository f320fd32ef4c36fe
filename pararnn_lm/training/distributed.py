"""One entry point under ``python``, ``torchrun``, the ``deepspeed`` launcher and ``srun``: rank, device,
process group, the collectives the loop uses, logging per rank and moving batches to the device."""
from __future__ import annotations

import datetime
import logging
import os
import socket
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return default


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(device: str = "auto", process_group: bool = False) -> DistInfo:
    """Read rank/world from torchrun/deepspeed (RANK, WORLD_SIZE, LOCAL_RANK) or srun (SLURM_*).

    A process group is created when there are several ranks, or when ``process_group`` asks for one
    even for a single process (DeepSpeed needs it).
    """
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    world_size = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device(device)
    if (world_size > 1 or process_group) and not dist.is_initialized():
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world_size))
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if world_size == 1:  # one process that no launcher started: its own host, a port the OS says is free,
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")  # so runs side by side on a machine do not collide
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        else:  # torchrun and the deepspeed launcher set both; plain srun: the node srun ran on
            os.environ.setdefault("MASTER_ADDR", os.environ.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"))
            os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
        logger.info("initialised %s process group: rank %d / %d", backend, rank, world_size)
    return DistInfo(rank, world_size, local_rank, dev)


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.world_size > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= info.world_size
    return value


def all_reduce_max(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.world_size > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


def setup_rank_logging(rank: int) -> None:
    """INFO on the main rank, warnings only elsewhere (Hydra configures handlers for the main process)."""
    logging.getLogger().setLevel(logging.INFO if rank == 0 else logging.WARNING)
    if not logging.getLogger().handlers:
        logging.basicConfig(stream=sys.stderr, format="[%(asctime)s][%(name)s][%(levelname)s] %(message)s")


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch's tensors on ``device``; asynchronous from pinned memory (``data.pin_memory``)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
