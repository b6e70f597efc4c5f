"""What a fine-tuning run trains, settled before anything is built (steps 1 and 4 of loop.py's
recipe): the options, the data and base model, the adapters, the checkpoint it resumes from,
and once the data's size is known, its length in steps. A Plan never changes; settling more of
it returns a new one.

Resuming: run.json supplies every setting; the caller may change only the fields
in RESUME_SAFE. The checkpoint then must match what would be trained now, field by field: model
shape, block size, tokenizer, data fingerprint and adapters. Any difference is refused with the
list of what differs, never half-applied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable

from ..checkpoints.hf import read_config
from ..config import PRESETS, ModelConfig
from ..data.prepare import DataConfig, PreparedData, tokenizer_identity
from ..data.readers import check_input
from ..errors import CheckpointError, Gpt2kitError, OptionError
from ..lora import LoraConfig
from ..model import GPT
from ..tokenizer import Tokenizer
from .config import RESUME_SAFE, TrainConfig
from .runs import STATE, Run, RunFolderError, read_state_json
from .schedule import get_lr


class ResumeMismatch(Gpt2kitError):
    """--resume was asked to continue a run under different settings or data."""

    def __init__(self, path: Path, problems: list[str]):
        super().__init__(f"cannot resume the run in {path}: {'; '.join(problems)}. Resume with "
                         "the run's own settings, or start a new run with another --out")


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a resumed run continues from."""

    folder: Path
    state: dict  # its trainer_state.json: step, schedule, identity, losses, random states

    @property
    def step(self) -> int:
        return int(self.state["step"])


@dataclass(frozen=True)
class Steps:
    """The run's length: optimizer steps in all, and of linear warm-up."""

    total: int
    warmup: int


@dataclass(frozen=True)
class Plan:
    """What to train, settled: options, data, base model, adapters, the resume point, and (after
    plan_steps, which needs the data's size) the number of steps."""

    cfg: TrainConfig
    data: DataConfig
    model: str | None  # hub id or path of the base; None from scratch
    lora: LoraConfig | None
    resume: ResumePoint | None = None
    steps: Steps | None = None

    def lr(self, step: int) -> float:
        """The learning rate of update `step` (0-based)."""
        return get_lr(step, self.cfg.peak_lr, self.steps.warmup, self.steps.total, self.cfg.schedule)


# ---- 1. options ----------------------------------------------------------------------------

def settle(data, model: str | None, config: TrainConfig | None, lora: LoraConfig | bool | None,
           options: dict, emit: Callable[[dict], None]) -> Plan:
    """finetune's arguments as a Plan: `options` over `config`, or on --resume the run's own
    settings with the safe changes; the data checked before any model is loaded."""
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
    check_input(plan.data)  # a wrong file or column fails before any model is loaded
    return plan


def _absolute(spec: str) -> str:
    """An existing local path made absolute; anything else (a hub id) as it is."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def resume_plan(run: Run, cfg: TrainConfig, given: set, data, model, lora, emit) -> Plan:
    """run.json's settings with the safe changes applied, and the newest complete checkpoint."""
    saved = run.settings()
    try:
        old = TrainConfig(**saved["train"])
        old_data = DataConfig.from_json(saved["data"])
        old_lora = LoraConfig(**saved["lora"]) if saved.get("lora") else None
    except (KeyError, TypeError, OptionError) as e:
        raise CheckpointError(f"{run.path / 'run.json'} is corrupt ({e})") from None
    folder = run.latest(warn=lambda message: emit({"event": "note", "message": message}))
    if folder is None:
        raise RunFolderError(f"no complete checkpoint to resume from in {run.checkpoints}; "
                             "start a new run with another --out")
    point = ResumePoint(folder, read_state_json(folder / STATE))
    problems = [f"{name} (the run has {getattr(old, name)!r}, given {getattr(cfg, name)!r})"
                for name in sorted(given - {*RESUME_SAFE, "out"}) if getattr(cfg, name) != getattr(old, name)]
    if lora is not None and lora != old_lora:
        problems.append(f"lora settings (the run has {old_lora}, given {lora})")
    if model is not None and _absolute(str(model)) != saved.get("model"):
        problems += identity_mismatches(point.state, requested_identity(str(model)))
        emit({"event": "note", "message": f"continuing from {folder}; --model {model} is not read"})
    if problems:
        raise ResumeMismatch(run.path, problems)
    if isinstance(data, DataConfig):
        old_data = data
    elif data is not None:
        old_data = replace(old_data, path=_absolute(str(data)))
    safe = {name: getattr(cfg, name) for name in given & set(RESUME_SAFE)}
    cfg = replace(old, **{**safe, "resume": True, "out": cfg.out})
    return Plan(cfg, old_data, saved.get("model"), old_lora, resume=point)


def run_settings(plan: Plan) -> dict:
    """run.json: what --resume needs to carry on without repeating every flag."""
    as_dict = lambda obj: {f.name: getattr(obj, f.name) for f in fields(obj)}  # noqa: E731
    return {"train": plan.cfg.to_json(), "data": as_dict(plan.data), "model": plan.model,
            "lora": None if plan.lora is None else as_dict(plan.lora)}


# ---- 4. steps ------------------------------------------------------------------------------

def plan_steps(plan: Plan, blocks: int) -> Plan:
    """The plan with its length for `blocks` training blocks: --max-steps, or --epochs' worth of
    batch_size x grad_accum blocks per step; warm-up --warmup-steps, or 5% of the steps up to
    500. On --resume the run's own warm-up stays (see check_resumable in setup.py)."""
    cfg, per_step = plan.cfg, plan.cfg.batch_size * plan.cfg.grad_accum
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * blocks / per_step))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else min(500, total // 20)
    if plan.resume is not None:  # a default warm-up (a share of the total) must not change length
        warmup = (plan.resume.state.get("schedule") or {}).get("warmup_steps", warmup)
    return replace(plan, steps=Steps(total, warmup))


# ---- what a checkpoint must share with the run resuming it ---------------------------------

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
    """The fields of `identity` that differ from those a checkpoint's trainer state recorded."""
    saved = state.get("identity", {})
    short = lambda v: v[:12] + "..." if isinstance(v, str) and len(v) > 16 else v  # noqa: E731
    return [f"{key.replace('_', ' ')} (checkpoint: {short(saved.get(key))}; now: {short(value)})"
            for key, value in identity.items() if saved.get(key) != value]
