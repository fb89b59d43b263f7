"""Data-parallel training on torch.distributed: set up from ``torchrun``'s environment.

``torchrun --nproc-per-node N -m equilibria train digits`` starts N processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set. :func:`setup` joins the
process group only when ``WORLD_SIZE > 1`` (gloo on CPU, nccl on GPU), so the same code runs as a
single process without any distributed machinery.

Batches are split so that the *global* batch does not depend on the number of processes: every
process draws the same permutation of the data (seeded per epoch), global batch k is
``perm[k*B:(k+1)*B]`` and process r takes the r-th contiguous slice of it. DistributedDataParallel
averages the gradients, which equals the gradient of the mean loss over the global batch: 1 and N
processes take the same optimization steps.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from .config import ConfigError


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job.

    Attributes:
        rank: global rank.
        world_size: number of processes.
        local_rank: rank on this machine (selects the GPU).
        device: the device this process trains on.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Only the main process (rank 0) writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether a process group is in use."""
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an int, got {value!r}") from None


def setup(device: str = "auto") -> DistInfo:
    """Read torchrun's environment, pick the device, and join the process group if N > 1.

    Args:
        device: ``"auto"`` (CUDA if available), ``"cpu"`` or ``"cuda"``.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", 0)
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError(
            "--device cuda: CUDA is not available to this torch build or machine; use --device "
            "cpu or auto"
        )
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def teardown(info: DistInfo) -> None:
    """Leave the process group (if one was joined)."""
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


def local_slice(global_batch: Tensor, info: DistInfo) -> Tensor:
    """This process's contiguous share of a global batch of indices (size divisible by N)."""
    n = global_batch.numel() // info.world_size
    return global_batch[info.rank * n : (info.rank + 1) * n]


def all_sum(values: list[float], info: DistInfo) -> list[float]:
    """Sum a few numbers over all processes (identity for one process)."""
    if not info.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return t.tolist()


def barrier(info: DistInfo) -> None:
    """Wait for every process (no-op for one process)."""
    if info.distributed:
        dist.barrier()


def raise_from_main(error: Exception | None, info: DistInfo) -> None:
    """Raise rank 0's ``error`` on every process (rank 0 passes what its own step raised, the
    others ``None``; nothing happens when it is ``None`` everywhere).

    For the steps only rank 0 takes (creating, locking and reading the run folder): without it
    the other processes would wait in their next collective call until rank 0's exit cut the
    connection, and print gloo's "Connection closed by peer" traceback instead of the error.
    The error's class must be constructible from its message (ConfigError, RunFolderError).
    """
    if info.distributed:
        box = [(type(error), str(error)) if info.is_main and error is not None else None]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None and not info.is_main:
            cls, message = box[0]
            raise cls(message)
    if error is not None:
        raise error
