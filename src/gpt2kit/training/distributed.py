"""Data-parallel training under torchrun: process-group setup and teardown, the DDP and FSDP
wrappers, the whole-model state of a sharded model, and the few collective operations the
training loop needs.

    torchrun --nproc_per_node=2 -m gpt2kit finetune data.txt --out runs/x
    torchrun --nproc_per_node=2 -m gpt2kit finetune data.txt --out runs/x --fsdp

torchrun describes the job to each process through environment variables (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT): that is its protocol, so they are read here and nowhere else.
A plain `python -m gpt2kit` run is a world of one process, and every helper below is then a no-op.

Each optimizer step still sees batch_size x grad_accum blocks, whatever the number of processes:
every micro-batch is split into equal contiguous shares, one per process (`share`), and DDP
averages the gradients. So N processes train the same model as one process would, only faster.
Rank 0 alone logs, evaluates, samples and saves.

With --fsdp (FSDP2, `fully_shard`: one shard group per transformer block, then the root) each
process holds 1/N of the weights, gradients and AdamW state, and gathers one block's weights at a
time for its forward and backward. The run folder stays the same: for evaluation, samples and
checkpoints, every process takes part in gathering the whole state on rank 0 (`full_copy`,
`optimizer_state`), which then works on a plain GPT as without FSDP. The optimizer state is saved
in the usual `optimizer.state_dict()` layout, so a checkpoint resumes with or without --fsdp.
"""

from __future__ import annotations

import datetime
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import CheckpointError, OptionError
from ..model import GPT


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


def wrap(objective: torch.nn.Module, world: World, device: torch.device, fsdp: bool = False) -> torch.nn.Module:
    """With several processes: DistributedDataParallel over the training objective (a module
    whose `.model` is the GPT), or with `fsdp` the objective itself, sharded in place (the
    optimizer must be made afterwards, over the shards). Otherwise `objective` as it is."""
    if not world.distributed:
        return objective
    if fsdp:
        return shard(objective, world, device)
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)


def shard(objective: torch.nn.Module, world: World, device: torch.device) -> torch.nn.Module:
    """FSDP2 over the loaded model: each block its own group (gathered for its forward, freed
    after, gathered again for its backward), then the objective as the root for the rest
    (embeddings with the tied head, ln_f), gathered for its whole forward: the model's and the
    loss's use of the head. Every process loaded the same whole model (checkpoint, or seeded
    initialisation) and keeps its 1/N here. Gradients are reduce-scattered at every micro-step
    rather than held whole until the last (`no_sync`): sharded gradients are the memory FSDP is for."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.type, (world.world_size,))  # explicit: a CPU run on a GPU host
    for block in objective.model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(objective, mesh=mesh, reshard_after_forward=False)
    return objective


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether FSDP shards any of `model`'s parameters (its blocks; its root group belongs to the
    objective that wraps it)."""
    from torch.distributed.fsdp import FSDPModule
    return any(isinstance(m, FSDPModule) for m in model.modules())


def _whole(**options):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, **options)


def full_copy(model: GPT, world: World, device: torch.device) -> GPT | None:
    """On rank 0, a plain GPT with a sharded model's weights, on `device`; None on the others.
    Every process must call it (the weights are gathered). Needs room for one whole float32 copy
    of the weights on rank 0, a quarter of what unsharded training needs."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    state = get_model_state_dict(model, options=_whole(cpu_offload=True))  # {} except on rank 0
    if not world.is_main:
        return None
    with torch.device("meta"):
        copy = GPT(model.config)
    state.pop("lm_head.weight", None)  # listed or not, depending on how the tie was made
    result = copy.load_state_dict(state, strict=False, assign=True)
    assert result.missing_keys == ["lm_head.weight"] and not result.unexpected_keys, result
    copy.tie_weights()
    return copy.to(device).train(model.training)


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """`optimizer.state_dict()`; for a sharded model gathered whole on rank 0 ({} elsewhere, and
    every process must call it), with the parameters numbered as the unsharded optimizer does."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    state = get_optimizer_state_dict(model, optimizer, options=_whole(cpu_offload=True))
    if not state:
        return {}
    number = {name: i for i, name in enumerate(_parameter_names(model, optimizer))}
    return {"state": {number[name]: s for name, s in state["state"].items()},
            "param_groups": [{**g, "params": [number[name] for name in g["params"]]}
                             for g in state["param_groups"]]}


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a (whole) `optimizer_state` into `optimizer`, each process keeping its own shards."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    names = _parameter_names(model, optimizer)
    try:
        state = {"state": {names[i]: s for i, s in state["state"].items()},
                 "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                                  for g in state["param_groups"]]}
    except (KeyError, IndexError, TypeError) as e:
        raise CheckpointError(f"the optimizer state does not match this model ({e!r})") from None
    set_optimizer_state_dict(model, optimizer, state, options=_whole())


def _parameter_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The optimizer's parameters by name, in the order state_dict() numbers them."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


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
