"""Steps 2-4 of the fine-tuning recipe (loop.py): load the model, prepare the data, then build
the Parts the loop works with (checked against the checkpoint on --resume; precision, summary
and memory check, the wrapped objective, AdamW, the checkpoint's states restored), and the
State it starts from. The Plan (plan.py) says what to build; the Parts are not changed after.
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from ..checkpoints import load_model
from ..config import ModelConfig
from ..data.prepare import PreparedData, prepare_data
from ..errors import OptionError
from ..kernels import master_adamw
from ..kernels.checkpointing import checkpoint_blocks
from ..kernels.compile_log import FIRST_RUN
from ..kernels.fused_loss import chunk_rows
from ..kernels.half_copies import HalfCopy, head_copy, hold_half_copies
from ..kernels.heap import freed_memory_held
from ..kernels.lean_backward import save_less_for_backward, sparse_embedding_gradient
from ..kernels.master_adamw import MasterAdamW
from ..lora import ParameterCount, apply_lora, count_parameters, load_adapter
from ..model import GPT
from ..runtime import precision
from ..tokenizer import Tokenizer
from . import distributed
from .config import TrainConfig
from .distributed import World
from .memory import MemoryEstimate, available_memory, check_fits, estimate, gb
from .objective import NextTokenLoss
from .plan import Plan, ResumeMismatch, ResumePoint, identity_mismatches, model_identity, run_settings
from .runs import OPTIMIZER, RNG, Run, load_tensors, restore_rng
from .samples import CopyDetector

# ---- 2. model ------------------------------------------------------------------------------

def load_for_training(plan: Plan, device: torch.device) -> tuple[GPT, Tokenizer]:
    """The model to train, float32 in train mode, and its tokenizer (the checkpoint's own, or
    GPT-2's). On --resume: the checkpoint's weights, or the base plus the checkpoint's adapter."""
    cfg, ckpt = plan.cfg, plan.resume.folder if plan.resume else None
    torch.manual_seed(cfg.seed)  # initialisation (from scratch; LoRA's A) follows the run's seed
    if cfg.from_scratch and ckpt is None:
        model, tokenizer = GPT(ModelConfig.preset(cfg.size)).to(device), Tokenizer.default()
    else:
        loaded = load_model(str(ckpt if ckpt and not cfg.lora else plan.model), device, torch.float32)
        model = loaded.model
        tokenizer = (Tokenizer.from_folder(loaded.folder) if loaded.folder else None) or Tokenizer.default()
    if cfg.lora:
        model = load_adapter(model, ckpt) if ckpt else apply_lora(model, plan.lora)
    if cfg.dropout is not None:
        set_dropout(model, cfg.dropout)
    if cfg.grad_checkpointing:
        checkpoint_blocks(model)
    save_less_for_backward(model)  # same bits, ~0.4 GB less at GPT-2 124M's peak (kernels/lean_backward.py)
    return model.train(), tokenizer


def set_dropout(model: GPT, p: float) -> None:
    """Set the model's dropout where GPT-2 has it (embeddings, attention weights, residual
    branches), by the model's structure: adapters' own dropout (LoRA) is not the model's."""
    model.transformer.drop.p = p
    for block in model.transformer.h:
        block.attn.core.p = block.attn.resid_dropout.p = block.mlp.dropout.p = p
    model.config = replace(model.config, dropout=p)


# ---- 3. data -------------------------------------------------------------------------------

def prepare(plan: Plan, tokenizer: Tokenizer, n_ctx: int, world: World,
            emit: Callable[[dict], None], progress: bool) -> PreparedData:
    """Token blocks of min(context n_ctx, 1024) tokens (or --block-size); rank 0 fills the cache first."""
    block_size = plan.cfg.block_size or min(n_ctx, 1024)
    if block_size > n_ctx:
        raise OptionError("block_size", f"({block_size}) exceeds the model's context ({n_ctx} tokens)")
    data = None
    for main_turn in (True, False):
        if world.is_main == main_turn:
            data = prepare_data(plan.data, tokenizer, block_size, seed=plan.cfg.seed,
                                progress=progress and world.is_main)
        distributed.barrier(world)
    for note in data.notes:
        emit({"event": "note", "message": note})
    return data


# ---- 4. the parts ----------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Parts:
    """What the loop works with, built once by `build`."""

    run: Run
    world: World
    device: torch.device
    model: GPT  # the plain module: saved, evaluated and sampled
    tokenizer: Tokenizer
    data: PreparedData
    # What the training forward runs: NextTokenLoss over `model`, under DDP, or sharded in place
    # by FSDP; compiled with --compile.
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None  # float16 autocast's loss scaling
    autocast_dtype: torch.dtype | None  # None: float32
    emit: Callable[[dict], None]
    identity: dict  # what a checkpoint must share with a run resuming it (plan.py)
    summary: dict  # the summary event's fields, also in RunResult
    copies: CopyDetector | None  # when sampling, on rank 0
    bar: tqdm


def build(plan: Plan, world: World, device: torch.device, model: GPT, tokenizer: Tokenizer,
          data: PreparedData, emit: Callable[[dict], None], progress: bool) -> Parts:
    """On --resume the checkpoint checked against what would be trained now; precision, the
    summary and memory check, the objective wrapped for the processes, AdamW; then on --resume
    the checkpoint's optimizer, loss-scaler and random states, else the run folder started."""
    run, identity = Run(plan.cfg.out), model_identity(model, tokenizer, data, plan.lora)
    if plan.resume is not None:
        check_resumable(plan, identity, run, world, emit)
    autocast_dtype, scaling = precision(plan.cfg.dtype, device)
    scaler = torch.amp.GradScaler(device.type) if scaling else None
    summary = check_memory(plan, world, device, model, data, autocast_dtype)
    net, optimizer = wrap_objective(plan, model, world, device, autocast_dtype, emit)
    if plan.resume is not None:
        restore(plan.resume, run, world, model, optimizer, scaler, emit)
    elif world.is_main:
        run.start(run_settings(plan))
    sampling = plan.cfg.sample_every and world.is_main
    copies = CopyDetector(data.train.tokens, tokenizer.eos_id) if sampling else None
    emit({"event": "summary", **summary})
    bar = progress_bar(plan, progress and world.is_main)
    return Parts(run=run, world=world, device=device, model=model, tokenizer=tokenizer, data=data,
                 net=net, optimizer=optimizer, scaler=scaler, autocast_dtype=autocast_dtype, emit=emit,
                 identity=identity, summary=summary, copies=copies, bar=bar)


def heap_for_training(parts: Parts) -> contextlib.AbstractContextManager[bool]:
    """Around the loop, under autocast on CPU (bfloat16): freed memory kept in the C heap for the
    next step (kernels/heap.py: page faults were ~20% of a step); float32 keeps its lower peak."""
    return freed_memory_held(parts.device.type == "cpu" and parts.autocast_dtype is not None)


def check_resumable(plan: Plan, identity: dict, run: Run, world: World, emit: Callable[[dict], None]) -> None:
    """The checkpoint must match what would be trained now (else ResumeMismatch, naming what
    differs). The run's warm-up stays as it was (plan_steps); a new --max-steps or --epochs moves
    only the end of the decay, said in one note and recorded in run.json (so a later --resume
    keeps it). Without this, a default warm-up (a share of the total) would silently change length."""
    problems = identity_mismatches(plan.resume.state, identity)
    if problems:
        raise ResumeMismatch(run.path, problems)
    step, total = plan.resume.step, plan.steps.total
    old_total = (plan.resume.state.get("schedule") or {}).get("total_steps", total)
    if total == old_total:
        return
    if total <= step:
        raise OptionError("max_steps", f"would end the run at step {total}, but it is "
                          f"already at step {step}; give more steps (or epochs) to continue it")
    old = replace(plan, steps=replace(plan.steps, total=old_total))
    emit({"event": "note", "message": f"extending the run's schedule from {old_total} to {total} "
          f"steps: warm-up stays {plan.steps.warmup} steps, the decay now ends at step {total} "
          f"(learning rate at step {step + 1}: {old.lr(step):.3g} -> {plan.lr(step):.3g}); "
          "recorded in run.json"})
    if world.is_main:
        run.start(run_settings(plan))


def check_memory(plan: Plan, world: World, device: torch.device, model: GPT, data: PreparedData,
                 autocast_dtype: torch.dtype | None) -> dict:
    """The run's summary, and NotEnoughMemory before training when the estimate does not fit."""
    cfg, count = plan.cfg, count_parameters(model)
    half = autocast_dtype in (torch.bfloat16, torch.float16)
    est = estimate(model.config, count.total, count.trainable, cfg.batch_size // world.world_size,
                   data.block_size, cfg.grad_checkpointing, model.config.dropout,
                   activation_bytes=2 if half else 4, shards=world.world_size if cfg.fsdp else 1,
                   loss_rows=chunk_rows(autocast_dtype),  # NextTokenLoss's fused head
                   lean=device.type == "cpu" and not half)  # lean_backward's case
    available = available_memory(device)
    summary = describe(plan, world, device, data, autocast_dtype, count, est, available)
    processes = world.local_world_size if device.type == "cpu" else 1
    check_fits(est, available, resident=est.weights, processes=processes)
    return summary


def wrap_objective(plan: Plan, model: GPT, world: World, device: torch.device, autocast_dtype: torch.dtype | None,
                   emit: Callable[[dict], None]) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """(net, optimizer): NextTokenLoss over the model under DDP or FSDP, compiled with --compile,
    and AdamW over the parameters it trains."""
    loss, copies = objective(model, plan.cfg, device, autocast_dtype, one_process=not world.distributed)
    net = distributed.wrap(loss, world, device, plan.cfg.fsdp)
    optimizer = make_optimizer(model, plan.cfg, device, copies)  # after FSDP: over the shards
    if plan.cfg.compile:  # DDP first, then compile: TorchDynamo then splits the graph at DDP's buckets
        net = torch.compile(net)
        emit({"event": "note", "message": f"--compile: the first step compiles the model ({FIRST_RUN})"})
    return net, optimizer


def objective(model: GPT, cfg: TrainConfig, device: torch.device, autocast_dtype: torch.dtype | None,
              one_process: bool) -> tuple[NextTokenLoss, list[HalfCopy]]:
    """NextTokenLoss over the model, and the bfloat16 copies make_optimizer's AdamW must keep. In
    one process: the token embedding's gradient as sparse rows; and under bfloat16 on CPU, not
    compiled, the trained matrices' bfloat16 copies (kernels/half_copies.py)."""
    copies = []
    if one_process:
        sparse_embedding_gradient(model)
        if device.type == "cpu" and autocast_dtype == torch.bfloat16 and not cfg.compile and master_adamw.available():
            copies = hold_half_copies(model, accumulate=cfg.grad_accum > 1)
    return NextTokenLoss(model, head_copy(model, copies)), copies


def make_optimizer(model: GPT, cfg: TrainConfig, device: torch.device,
                   copies: list[HalfCopy] | None = None) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings (dim >= 2) only, as nanoGPT: biases and
    LayerNorm gains are not decayed. Betas (0.9, 0.95) as GPT-3. The fused kernel on CPU as on
    CUDA: one pass over each parameter instead of a dozen (on CPU the default is a per-tensor
    loop; fused takes GPT-2 124M's step from about 0.35 s to 0.08 s on 2 cores). With bfloat16
    `copies` of the matrices, MasterAdamW: the same step, which also writes them."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if copies:
        return MasterAdamW(groups, copies, lr=cfg.peak_lr, betas=(0.9, 0.95), eps=1e-8)
    return torch.optim.AdamW(groups, lr=cfg.peak_lr, betas=(0.9, 0.95), eps=1e-8,
                             fused=device.type in ("cpu", "cuda"))


def restore(point: ResumePoint, run: Run, world: World, model: GPT, optimizer: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler | None, emit: Callable[[dict], None]) -> None:
    """The checkpoint's optimizer, loss-scaler and random states; its logs cut back to its step."""
    distributed.load_optimizer_state(model, optimizer, load_tensors(point.folder / OPTIMIZER))
    if scaler is not None and point.state.get("grad_scaler"):
        scaler.load_state_dict(point.state["grad_scaler"])
    restore_rng(load_tensors(point.folder / RNG), point.state["rng"])
    if world.is_main:
        run.truncate_logs(point.step)  # a torn last line: a warning on the gpt2kit logger
        emit({"event": "note", "message": f"resuming from {point.folder} at step {point.step}"})


def progress_bar(plan: Plan, enabled: bool) -> tqdm:
    return tqdm(total=plan.steps.total, initial=plan.resume.step if plan.resume else 0, unit="step",
                file=sys.stderr, dynamic_ncols=True, disable=not enabled)


# ---- the state the loop changes ------------------------------------------------------------

@dataclass(eq=False)
class State:
    """What changes as the loop runs (everything else it reads is in the Plan and the Parts)."""

    step: int = 0  # optimizer steps done
    saved_step: int = -1  # the step last saved, so that one is saved once
    last_checkpoint: Path | None = None
    train_loss: float | None = None  # the last step's
    val_losses: list[list] = field(default_factory=list)  # [step, loss] per evaluation
    gathered: tuple[int, GPT | None] | None = None  # FSDP: (step, rank 0's whole copy of the weights)
    orders: dict = field(default_factory=dict)  # epoch -> its block order (the current one only)

    @classmethod
    def start(cls, plan: Plan) -> State:
        """A new run's state, or on --resume the checkpoint's step and history."""
        if (point := plan.resume) is None:
            return cls()
        return cls(step=point.step, saved_step=point.step, last_checkpoint=point.folder,
                   train_loss=point.state.get("train_loss"), val_losses=list(point.state.get("val_losses", [])))


# ---- the summary -----------------------------------------------------------------------------

def describe(plan: Plan, world: World, device: torch.device, data: PreparedData,
             autocast_dtype: torch.dtype | None, count: ParameterCount, est: MemoryEstimate,
             available: int | None) -> dict:
    cfg, steps, per_step = plan.cfg, plan.steps, plan.cfg.batch_size * plan.cfg.grad_accum
    source = f"new {cfg.size} GPT-2" if cfg.from_scratch else plan.model
    return {"model": source, "device": str(device), "processes": world.world_size,
            "sharded": cfg.fsdp and world.distributed,
            "precision": precision_text(cfg.dtype, device, autocast_dtype),
            "documents": data.documents, "val_documents": data.val_documents, "tokens": data.tokens,
            "blocks": len(data.train), "val_blocks": len(data.val) if data.val is not None else 0,
            "block_size": data.block_size, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
            "steps_per_epoch": math.ceil(len(data.train) / per_step), "total_steps": steps.total,
            "epochs": round(steps.total * per_step / len(data.train), 2),
            "learning_rate": cfg.peak_lr, "schedule": cfg.schedule, "warmup_steps": steps.warmup,
            "trainable_parameters": count.trainable, "parameters": count.model,
            "adapter_parameters": count.adapters,
            "memory_estimate": est.total, "memory_detail": est.describe(), "memory_available": available}


def precision_text(requested: str, device: torch.device, autocast_dtype: torch.dtype | None) -> str:
    if autocast_dtype is None:
        return "float32"
    text = f"float32 weights, {str(autocast_dtype).removeprefix('torch.')} autocast"
    if requested == "auto" and device.type == "cpu":  # a choice the user may not expect: say why
        text += " (--dtype auto: this CPU multiplies bfloat16 natively; --dtype float32 for float32)"
    return text


def summary_lines(record: dict) -> list[str]:
    """Human-readable lines for an event (the progress bar shows the training steps)."""
    kind = record.get("event")
    if kind == "summary":
        r = record
        room = f"of {gb(r['memory_available'])} available" if r["memory_available"] else "(available unknown)"
        adapters = f" + {r['adapter_parameters'] / 1e6:.2f}M in LoRA adapters" if r["adapter_parameters"] else ""
        return [f"model: {r['model']}: {r['parameters'] / 1e6:.1f}M parameters{adapters}, "
                f"{r['trainable_parameters'] / 1e6:.2f}M trainable; {r['precision']} on {r['device']}"
                + (f" x {r['processes']} processes" if r["processes"] > 1 else "")
                + (" (FSDP: state sharded across them)" if r.get("sharded") else ""),
                f"data: {r['documents']:,} documents, {r['tokens']:,} tokens -> {r['blocks']:,} blocks "
                f"of {r['block_size']} (validation: {r['val_documents']:,} documents, "
                f"{r['val_blocks']:,} blocks)",
                f"steps: {r['steps_per_epoch']:,} per epoch (batch {r['batch_size']} x grad-accum "
                f"{r['grad_accum']}), {r['total_steps']:,} in all ({r['epochs']} epochs); learning rate "
                f"{r['learning_rate']:g}, {r['schedule']}, {r['warmup_steps']} warm-up steps",
                f"memory: about {r['memory_detail']} {room}"]
    if kind == "eval":
        return [f"step {record['step']}: val_loss {record['val_loss']:.4f}, val_ppl {record['val_ppl']:.2f}"]
    if kind == "sample":
        flag = " [copies training text]" if record["memorized"] else ""
        return [f"sample {record['index'] + 1} at step {record['step']}{flag}: {record['text']!r}"]
    if kind == "checkpoint":
        return [f"saved checkpoint {record['path']}"]
    if kind == "note":
        return [record["message"]]
    return []
