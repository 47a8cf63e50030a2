"""Which process of a ``torchrun`` launch this is, its device, and the one synchronization a
corpus scan needs. The launching and communication are torch.distributed's; this module
only reads the rank and world size it sets up."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Placement:
    """Which process this is: ``rank`` of ``world_size`` (torchrun's RANK and WORLD_SIZE)."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> Placement:
        """From torch.distributed if initialized, else from torchrun's environment, else 0 of 1."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return cls(torch.distributed.get_rank(), torch.distributed.get_world_size())
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))

    def owns(self, shard: int) -> bool:
        return shard % self.world_size == self.rank


def local_device(device: str | torch.device | None = None) -> torch.device:
    """The device for this process: ``device``, else its own GPU (torchrun's LOCAL_RANK), else CPU.

    A CUDA device without an index gets the process's LOCAL_RANK, so ``--device cuda`` puts each
    of several ranks on its own GPU.

    Raises:
        ValueError: the rank's GPU does not exist (more processes per node than GPUs).
    """
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device is None and not torch.cuda.is_available():
        return torch.device("cpu")
    resolved = torch.device("cuda" if device is None else device)
    if resolved.type != "cuda":
        return resolved
    index = local_rank if resolved.index is None else resolved.index
    resolved = torch.device("cuda", index)
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index >= available:
        raise ValueError(
            f"this process (LOCAL_RANK {local_rank}) wants {resolved}, but this machine has "
            f"{available} GPU(s); launch at most {max(available, 1)} process(es) per node "
            "(torchrun --nproc_per_node), or scan on the CPU (device='cpu', `--device cpu`)"
        )
    return resolved


def init_distributed(device: str | torch.device | None = None) -> Placement:
    """Join torchrun's process group if launched by torchrun: nccl on a GPU, gloo on the CPU.

    Args:
        device: the device this process scans on (see :func:`local_device`); it decides the
            backend, so a CPU scan on a GPU machine uses gloo.
    """
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not torch.distributed.is_initialized():
        resolved = local_device(device)
        if resolved.type != "cuda":
            torch.distributed.init_process_group(backend="gloo")
        else:
            torch.cuda.set_device(resolved)
            # naming the rank's GPU spares nccl guessing it from the rank
            torch.distributed.init_process_group(backend="nccl", device_id=resolved)
    return Placement.current()


def barrier() -> None:
    """Wait for every process of the torchrun launch (nothing to wait for in one process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
