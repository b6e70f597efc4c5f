"""Data-parallel training under torchrun: process-group setup and teardown, the DDP wrapper, and
the few collective operations the training loop needs.

    torchrun --nproc_per_node=2 -m gpt2kit finetune data.txt --out runs/x

torchrun describes the job to each process through environment variables (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT): that is its protocol, so they are read here and nowhere else.
A plain `python -m gpt2kit` run is a world of one process, and every helper below is then a no-op.

Each optimizer step still sees batch_size x grad_accum blocks, whatever the number of processes:
every micro-batch is split into equal contiguous shares, one per process (`share`), and DDP
averages the gradients. So N processes train the same model as one process would, only faster.
Rank 0 alone logs, evaluates, samples and saves.
"""

from __future__ import annotations

import datetime
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import OptionError


@dataclass(frozen=True)
class World:
    """This process's place in the job: rank among world_size processes, local_rank on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def from_env() -> World:
    """The World torchrun describes, or a world of one when not launched by torchrun."""
    env = os.environ
    world_size = int(env.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return World()
    return World(rank=int(env["RANK"]), world_size=world_size, local_rank=int(env.get("LOCAL_RANK", "0")),
                 local_world_size=int(env.get("LOCAL_WORLD_SIZE", str(world_size))))


def setup(world: World, device: torch.device) -> torch.device:
    """Join the process group (NCCL on CUDA, gloo on CPU); return this process's device."""
    if not world.distributed:
        return device
    if device.type == "cuda":  # one GPU per process, chosen by its local rank
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=world.rank,
                                world_size=world.world_size, timeout=datetime.timedelta(minutes=30))
    return device


def teardown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def check_batch(world: World, batch_size: int) -> None:
    if batch_size % world.world_size:
        raise OptionError("batch_size", f"({batch_size}) must be divisible by the number of "
                          f"processes ({world.world_size}): each takes an equal share of every batch")


def wrap(model: torch.nn.Module, world: World, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel over `model` when there are several processes, else `model`."""
    if not world.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def share(world: World, rows: int) -> slice:
    """This process's contiguous share of a micro-batch of `rows` blocks."""
    n = rows // world.world_size
    return slice(world.rank * n, (world.rank + 1) * n)


def no_sync(model: torch.nn.Module, sync: bool):
    """Skip DDP's gradient all-reduce on micro-steps that are not the last of an optimizer step."""
    if sync or not hasattr(model, "no_sync"):
        return nullcontext()
    return model.no_sync()


def mean(world: World, value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar tensor over all processes (the logged loss of the whole batch)."""
    if not world.distributed:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / world.world_size


def any_process(world: World, flag: bool, device: torch.device) -> bool:
    """True on every process when `flag` is true on any (e.g. one of them received SIGTERM), so
    all of them stop at the same step instead of waiting forever for the ones that left."""
    if not world.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()
