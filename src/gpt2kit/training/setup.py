"""Steps 1-4 of the fine-tuning recipe (loop.py): settle the options, load the model, prepare
the data, then summary, memory check, optimizer and the resumed state.

Resuming: run.json supplies every setting; the caller may change only the fields
in RESUME_SAFE. The checkpoint then must match what would be trained now, field by field: model
shape, block size, tokenizer, data fingerprint and adapters. Any difference is refused with the
list of what differs, never half-applied.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from ..checkpoints import load_model
from ..checkpoints.hf import read_config
from ..config import PRESETS, ModelConfig
from ..data.prepare import DataConfig, PreparedData, prepare_data, tokenizer_identity
from ..data.readers import existing_path, pieces
from ..errors import CheckpointError, Gpt2kitError, InputFileError, OptionError
from ..kernels.checkpointing import checkpoint_blocks
from ..kernels.lean_backward import save_less_for_backward
from ..lora import LoraConfig, ParameterCount, apply_lora, count_parameters, load_adapter
from ..model import GPT
from ..tokenizer import Tokenizer
from . import distributed
from .config import RESUME_SAFE, TrainConfig
from .memory import MemoryEstimate, available_memory, check_fits, estimate, gb
from .runs import OPTIMIZER, RNG, STATE, Run, RunFolderError, load_tensors, read_state_json, restore_rng
from .schedule import get_lr


class ResumeMismatch(Gpt2kitError):
    """--resume was asked to continue a run under different settings or data."""

    def __init__(self, path: Path, problems: list[str]):
        super().__init__(f"cannot resume the run in {path}: {'; '.join(problems)}. Resume with "
                         "the run's own settings, or start a new run with another --out")


@dataclass
class Plan:
    """What to train, settled: options, data, base model, adapters."""

    cfg: TrainConfig
    data: DataConfig
    model: str | None  # hub id or path of the base; None from scratch
    lora: LoraConfig | None
    resume_from: Path | None = None  # the checkpoint folder, when resuming


@dataclass(eq=False)
class Job:
    """Everything the loop reads and updates."""

    plan: Plan
    run: Run
    world: distributed.World
    device: torch.device
    model: GPT  # the plain module: saved, evaluated and sampled
    tokenizer: Tokenizer
    emit: Callable[[dict], None]
    data: PreparedData | None = None
    # What the training forward runs: DDP over `model`, or `model` itself sharded in place by
    # FSDP; compiled with --compile.
    net: torch.nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    scaler: torch.amp.GradScaler | None = None
    autocast_dtype: torch.dtype | None = None
    total_steps: int = 0
    warmup_steps: int = 0
    identity: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    step: int = 0
    saved_step: int = -1
    last_checkpoint: Path | None = None
    train_loss: float | None = None
    val_losses: list = field(default_factory=list)
    copies: object = None  # samples.CopyDetector when sampling
    gathered: tuple[int, GPT | None] | None = None  # FSDP: (step, rank 0's whole copy of the weights)
    orders: dict = field(default_factory=dict)  # epoch -> its block order (the current one only)
    bar: tqdm | None = None

    @property
    def cfg(self) -> TrainConfig:
        return self.plan.cfg


# ---- 1. options ----------------------------------------------------------------------------

def settle(data, model: str | None, config: TrainConfig | None, lora: LoraConfig | None,
           options: dict, emit) -> Plan:
    if config is not None and not isinstance(config, TrainConfig):
        raise OptionError("config", f"must be a TrainConfig, got {type(config).__name__}")
    if isinstance(lora, bool):  # finetune(..., lora=True): the TrainConfig switch, default adapters
        options, lora = {**options, "lora": lora}, None
    if config is None and "out" not in options:
        raise OptionError("out", "is required: the folder for the run's checkpoints and model")
    cfg = replace(config, **options) if config else TrainConfig(**options)
    given = set(options) | ({f.name for f in fields(cfg) if getattr(config, f.name) != f.default}
                            if config else set())
    if lora is not None:
        cfg, given = replace(cfg, lora=True), given | {"lora"}
    run = Run(cfg.out)
    run.check_usable(cfg.resume)
    if cfg.resume:
        plan = resume_plan(run, cfg, given, data, model, lora, emit)
    elif data is None:
        raise OptionError("data", "is required: a .txt, .csv, .jsonl file or a folder of .txt files")
    else:
        data = data if isinstance(data, DataConfig) else DataConfig(path=str(data))
        data = replace(data, path=_absolute(data.path))  # run.json must work from any directory
        plan = Plan(cfg, data, None if cfg.from_scratch else _absolute(str(model or "gpt2")),
                    (lora or LoraConfig()) if cfg.lora else None)
    check_data(plan.data)
    return plan


def check_data(data: DataConfig) -> None:
    """Fail fast, before any model is loaded, on a missing file, a wrong --column or --field, or
    no text at all, so a mistake costs seconds, not a model download: reading the first piece of text runs the readers' own checks."""
    for path, what in ((data.path, "training"), (data.val_file, "validation")):
        if path is not None and next(pieces(data, existing_path(path)), None) is None:
            raise InputFileError(f"no {what} text found in {path}: it holds no non-blank document")


def _absolute(spec: str) -> str:
    """An existing local path made absolute; anything else (a hub id) as it is."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def resume_plan(run: Run, cfg: TrainConfig, given: set, data, model, lora, emit) -> Plan:
    """run.json's settings with the safe changes applied, and the newest complete checkpoint."""
    saved = run.settings()
    try:
        old = TrainConfig(**saved["train"])
        old_data = DataConfig(**saved["data"])
        old_lora = LoraConfig(**saved["lora"]) if saved.get("lora") else None
    except (KeyError, TypeError, OptionError) as e:
        raise CheckpointError(f"{run.path / 'run.json'} is corrupt ({e})") from None
    folder = run.latest(warn=lambda message: emit({"event": "note", "message": message}))
    if folder is None:
        raise RunFolderError(f"no complete checkpoint to resume from in {run.checkpoints}; "
                             "start a new run with another --out")
    problems = [f"{name} (the run has {getattr(old, name)!r}, given {getattr(cfg, name)!r})"
                for name in sorted(given - {*RESUME_SAFE, "out"}) if getattr(cfg, name) != getattr(old, name)]
    if lora is not None and lora != old_lora:
        problems.append(f"lora settings (the run has {old_lora}, given {lora})")
    if model is not None and _absolute(str(model)) != saved.get("model"):
        problems += identity_mismatches(read_state_json(folder / STATE), requested_identity(str(model)))
        emit({"event": "note", "message": f"continuing from {folder}; --model {model} is not read"})
    if problems:
        raise ResumeMismatch(run.path, problems)
    if isinstance(data, DataConfig):
        old_data = data
    elif data is not None:
        old_data = replace(old_data, path=_absolute(str(data)))
    safe = {name: getattr(cfg, name) for name in given & set(RESUME_SAFE)}
    cfg = replace(old, **{**safe, "resume": True, "out": cfg.out})
    return Plan(cfg, old_data, saved.get("model"), old_lora, resume_from=folder)


def model_identity(model: GPT, tokenizer: Tokenizer, data: PreparedData, lora: LoraConfig | None) -> dict:
    """What a checkpoint must share with the run resuming it."""
    adapters = None if lora is None else {"rank": lora.rank, "alpha": lora.alpha,
                                          "targets": list(lora.targets)}
    return {"model_shape": _shape(model.config), "block_size": data.block_size,
            "tokenizer": tokenizer_identity(tokenizer), "data_fingerprint": data.fingerprint,
            "lora": adapters}


def requested_identity(spec: str) -> dict:
    """The shape and tokenizer of a model given by name or folder, read without loading it."""
    folder = Path(spec).expanduser()
    name = spec.removeprefix("openai-community/")
    if (folder / "config.json").is_file():
        c = read_config(folder / "config.json")
    elif name in PRESETS:
        c = ModelConfig.preset(name)
    else:
        return {}
    tokenizer = (Tokenizer.from_folder(folder) if folder.is_dir() else None) or Tokenizer.default()
    return {"model_shape": _shape(c), "tokenizer": tokenizer_identity(tokenizer)}


def _shape(c: ModelConfig) -> dict:
    return {"n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd, "vocab_size": c.vocab_size,
            "n_positions": c.n_positions}


def identity_mismatches(state: dict, identity: dict) -> list[str]:
    saved = state.get("identity", {})
    short = lambda v: v[:12] + "..." if isinstance(v, str) and len(v) > 16 else v  # noqa: E731
    return [f"{key.replace('_', ' ')} (checkpoint: {short(saved.get(key))}; now: {short(value)})"
            for key, value in identity.items() if saved.get(key) != value]


# ---- 2. model ------------------------------------------------------------------------------

def load_for_training(plan: Plan, device: torch.device) -> tuple[GPT, Tokenizer]:
    """The model to train, float32 in train mode, and its tokenizer (the checkpoint's own, or
    GPT-2's). On --resume: the checkpoint's weights, or the base plus the checkpoint's adapter."""
    cfg, ckpt = plan.cfg, plan.resume_from
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


# ---- 3. data -------------------------------------------------------------------------------

def prepare(job: Job, progress: bool) -> PreparedData:
    """Token blocks of min(context, 1024) tokens (or --block-size); rank 0 fills the cache first."""
    n_ctx = job.model.config.n_positions
    block_size = job.cfg.block_size or min(n_ctx, 1024)
    if block_size > n_ctx:
        raise OptionError("block_size", f"({block_size}) exceeds the model's context ({n_ctx} tokens)")
    data = None
    for main_turn in (True, False):
        if job.world.is_main == main_turn:
            data = prepare_data(job.plan.data, job.tokenizer, block_size, seed=job.cfg.seed,
                                progress=progress and job.world.is_main)
        distributed.barrier(job.world)
    for note in data.notes:
        job.emit({"event": "note", "message": note})
    return data


# ---- 4. summary, memory, optimizer, resume ---------------------------------------------------

def plan_steps(job: Job) -> None:
    cfg, blocks = job.cfg, len(job.data.train)
    per_step = cfg.batch_size * cfg.grad_accum
    job.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * blocks / per_step))
    job.warmup_steps = cfg.warmup_steps if cfg.warmup_steps is not None else min(500, job.total_steps // 20)
    job.identity = model_identity(job.model, job.tokenizer, job.data, job.plan.lora)
    if job.plan.resume_from is not None:
        state = read_state_json(job.plan.resume_from / STATE)
        problems = identity_mismatches(state, job.identity)
        if problems:
            raise ResumeMismatch(job.run.path, problems)
        keep_schedule(job, state)


def keep_schedule(job: Job, state: dict) -> None:
    """On --resume, the run's warm-up stays as it was; a new --max-steps or --epochs moves only
    the end of the decay, said in one note and recorded in run.json (so a later --resume keeps
    it). Without this, a default warm-up (a share of the total) would silently change length."""
    saved = state.get("schedule") or {}
    step, old_total = int(state["step"]), saved.get("total_steps", job.total_steps)
    job.warmup_steps = saved.get("warmup_steps", job.warmup_steps)
    if job.total_steps == old_total:
        return
    if job.total_steps <= step:
        raise OptionError("max_steps", f"would end the run at step {job.total_steps}, but it is "
                          f"already at step {step}; give more steps (or epochs) to continue it")
    lr = lambda total: get_lr(step, job.cfg.peak_lr, job.warmup_steps, total, job.cfg.schedule)  # noqa: E731
    job.emit({"event": "note", "message": f"extending the run's schedule from {old_total} to "
              f"{job.total_steps} steps: warm-up stays {job.warmup_steps} steps, the decay now ends "
              f"at step {job.total_steps} (learning rate at step {step + 1}: {lr(old_total):.3g} -> "
              f"{lr(job.total_steps):.3g}); recorded in run.json"})
    if job.world.is_main:
        job.run.start(run_settings(job.plan))


def check_memory(job: Job, loss_rows: int | None) -> None:
    """The run's summary, and NotEnoughMemory before training when the estimate does not fit.
    `loss_rows`: logits rows the loss holds at a time (None: all, the plain loss)."""
    count = count_parameters(job.model)
    half = job.autocast_dtype in (torch.bfloat16, torch.float16)
    shards = job.world.world_size if job.cfg.fsdp else 1
    est = estimate(job.model.config, count.total, count.trainable, job.cfg.batch_size // job.world.world_size,
                   job.data.block_size, job.cfg.grad_checkpointing, job.model.config.dropout,
                   activation_bytes=2 if half else 4, shards=shards, loss_rows=loss_rows,
                   lean=job.device.type == "cpu" and not half)  # lean_backward's case
    available = available_memory(job.device)
    job.summary = describe(job, count, est, available)
    processes = job.world.local_world_size if job.device.type == "cpu" else 1
    check_fits(est, available, resident=est.weights, processes=processes)


def make_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings (dim >= 2) only, as nanoGPT: biases and
    LayerNorm gains are not decayed. Betas (0.9, 0.95) as GPT-3. The fused kernel on CPU as on
    CUDA: one pass over each parameter instead of a dozen (on CPU the default is a per-tensor
    loop; fused takes GPT-2 124M's step from about 0.35 s to 0.08 s on 2 cores)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.peak_lr, betas=(0.9, 0.95), eps=1e-8,
                             fused=device.type in ("cpu", "cuda"))


def restore(job: Job, folder: Path) -> None:
    """The checkpoint's optimizer, loss scaler, random states, step and history."""
    state = read_state_json(folder / STATE)
    distributed.load_optimizer_state(job.model, job.optimizer, load_tensors(folder / OPTIMIZER))
    if job.scaler is not None and state.get("grad_scaler"):
        job.scaler.load_state_dict(state["grad_scaler"])
    restore_rng(load_tensors(folder / RNG), state["rng"])
    job.step = job.saved_step = int(state["step"])
    job.last_checkpoint = folder
    job.train_loss, job.val_losses = state.get("train_loss"), list(state.get("val_losses", []))
    if job.world.is_main:
        job.run.truncate_logs(job.step)
        job.emit({"event": "note", "message": f"resuming from {folder} at step {job.step}"})


def run_settings(plan: Plan) -> dict:
    """run.json: what --resume needs to carry on without repeating every flag."""
    as_dict = lambda obj: {f.name: getattr(obj, f.name) for f in fields(obj)}  # noqa: E731
    return {"train": plan.cfg.to_json(), "data": as_dict(plan.data), "model": plan.model,
            "lora": None if plan.lora is None else as_dict(plan.lora)}


def describe(job: Job, count: ParameterCount, est: MemoryEstimate, available: int | None) -> dict:
    cfg, data, per_step = job.cfg, job.data, job.cfg.batch_size * job.cfg.grad_accum
    source = f"new {cfg.size} GPT-2" if cfg.from_scratch else job.plan.model
    return {"model": source, "device": str(job.device), "processes": job.world.world_size,
            "sharded": job.cfg.fsdp and job.world.distributed,
            "precision": "float32" if job.autocast_dtype is None else
            f"float32 weights, {str(job.autocast_dtype).removeprefix('torch.')} autocast",
            "documents": data.documents, "val_documents": data.val_documents, "tokens": data.tokens,
            "blocks": len(data.train), "val_blocks": len(data.val) if data.val is not None else 0,
            "block_size": data.block_size, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
            "steps_per_epoch": math.ceil(len(data.train) / per_step), "total_steps": job.total_steps,
            "epochs": round(job.total_steps * per_step / len(data.train), 2),
            "learning_rate": cfg.peak_lr, "schedule": cfg.schedule, "warmup_steps": job.warmup_steps,
            "trainable_parameters": count.trainable, "parameters": count.model,
            "adapter_parameters": count.adapters,
            "memory_estimate": est.total, "memory_detail": est.describe(), "memory_available": available}


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


def progress_bar(job: Job, enabled: bool) -> tqdm:
    return tqdm(total=job.total_steps, initial=job.step, unit="step", file=sys.stderr,
                dynamic_ncols=True, disable=not enabled)


def set_dropout(model: GPT, p: float) -> None:
    """Set the model's dropout where GPT-2 has it (embeddings, attention weights, residual
    branches), by the model's structure: adapters' own dropout (LoRA) is not the model's."""
    model.transformer.drop.p = p
    for block in model.transformer.h:
        block.attn.core.p = block.attn.resid_dropout.p = block.mlp.dropout.p = p
    model.config = replace(model.config, dropout=p)
