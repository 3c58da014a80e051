"""Data parallel training with torch.distributed, launched by `torchrun` (which sets RANK, WORLD_SIZE, LOCAL_RANK).

One replica of the model per process; a replica is one device, or two with the paper's two-tower placement
(`--devices cuda:0,cuda:1`: local rank r then uses GPUs 2r and 2r+1). NCCL between GPUs, gloo on CPU (tests run two
ranks on one machine). Without torchrun everything here is the single-process no-op: world size 1, rank 0.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from alexrepro.core.errors import ConfigError


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Only rank 0 writes checkpoints and history and reports progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def ranks_from_env() -> Ranks:
    env = os.environ
    return Ranks(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def init_distributed(ranks: Ranks, device_type: str) -> None:
    """Join the process group torchrun set up (NCCL on CUDA, gloo on CPU); nothing for a single process."""
    if ranks.distributed and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed_ranks(devices_spec: str, towers: int) -> Iterator[tuple[Ranks, list[torch.device]]]:
    """This process's rank and devices (train's and evaluate's set-up); joins the process group `torchrun`
    describes (RANK, WORLD_SIZE), if any.

    A group the caller already initialised is used as is and left open; one opened here is closed on exit.
    """
    if dist.is_available() and dist.is_initialized():
        ranks = Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
        yield ranks, resolve_devices(devices_spec, towers, ranks.local_rank)
        return
    ranks = ranks_from_env()
    devices = resolve_devices(devices_spec, towers, ranks.local_rank)
    if devices[0].type == "cuda":
        torch.cuda.set_device(devices[0])  # NCCL, its object collectives and the default stream follow this GPU
    init_distributed(ranks, devices[0].type)
    try:
        yield ranks, devices
    finally:
        if ranks.distributed:
            shutdown_distributed()


def resolve_devices(spec: str, towers: int, local_rank: int = 0) -> list[torch.device]:
    """Devices of this process's replica from the `devices` setting.

    "auto": this rank's GPU if CUDA is present, else the CPU. "cpu", "cuda", "cuda:1": one device.
    "cuda:0,cuda:1": one tower per device (needs towers=2). Under torchrun with several processes per machine,
    GPU indices count from this rank's share: local rank r with k listed GPUs uses GPUs r·k … r·k+k−1.
    """
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    names = [name.strip() for name in spec.split(",") if name.strip()]
    if len(names) not in (1, 2):
        raise ConfigError(f"key 'devices' must name one device or two (one per tower), got {spec!r}")
    if len(names) == 2 and towers != 2:
        raise ConfigError(f"key 'devices' lists two devices but towers={towers}; use towers: 2 or one device")
    devices = []
    for name in names:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ConfigError(f"key 'devices': {name!r} is not a device name (cpu, cuda, cuda:0)") from None
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError(f"key 'devices' asks for {name} but CUDA is not available; use --devices cpu")
            index = (device.index or 0) + local_rank * len(names)
            if index >= torch.cuda.device_count():
                raise ConfigError(
                    f"key 'devices': rank {local_rank} needs cuda:{index} but this machine has "
                    f"{torch.cuda.device_count()} GPUs; list fewer devices or start fewer processes"
                )
            device = torch.device("cuda", index)
        devices.append(device)
    return devices


def rank_batch_size(global_batch: int, ranks: Ranks) -> int:
    """Images per rank per step; the global batch (the paper's 128) must split evenly."""
    if global_batch % ranks.world_size:
        raise ConfigError(
            f"key 'batch_size' ({global_batch}) must be divisible by the number of processes ({ranks.world_size})"
        )
    return global_batch // ranks.world_size


def wrap_model(model: torch.nn.Module, devices: Sequence[torch.device], ranks: Ranks) -> torch.nn.Module:
    """DistributedDataParallel around the replica when there are several ranks; the model itself otherwise.

    A replica spread over two devices is a multi-device module, for which DDP wants device_ids=None.
    """
    if not ranks.distributed:
        return model
    single_gpu = len(devices) == 1 and devices[0].type == "cuda"
    # broadcast_buffers is left at its default: AlexNet has no buffers (no BatchNorm), and newer torch deprecates it.
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[devices[0]] if single_gpu else None)


def all_reduce_sum(tensor: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """Sum over ranks, in place and returned (identity for one process)."""
    if ranks.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, device: torch.device, ranks: Ranks) -> bool:
    """True when `flag` is true on any rank, so that every rank stops at the same step."""
    if not ranks.distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_reduce_sum(value, ranks).item() > 0)


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        dist.barrier()
