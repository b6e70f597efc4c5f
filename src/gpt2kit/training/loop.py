"""Fine-tuning GPT-2 (or training one from scratch), as a recipe in the shape of nanoGPT's train.py:

    finetune(data, model, config)
      1. options: the given ones, or on --resume the run's run.json with safe changes only
      2. model: load it (or build one --from-scratch), then LoRA, dropout and the fast paths
      3. data: packed token blocks and a validation split (data/prepare.py)
      4. steps, then the parts: summary and memory check, AdamW, the wrapped objective, and on
         --resume the checkpoint's exact state
      5. loop: learning rate, micro-steps, clip, step, log; evaluate, sample and save when due

What to train is a Plan (plan.py: steps 1 and 4's length), what it is trained with are Parts
built once (setup.py: steps 2-4), and what the loop changes is a small State. The run folder is
runs.py. Every optimizer step sees batch_size x grad_accum blocks, in an order that is a pure
function of (seed, step), and all randomness is checkpointed, so a resumed run continues bit for
bit as the uninterrupted run would have. Ctrl-C or SIGTERM stops at the next step boundary with
a checkpoint.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from ..chat import BUILTIN, CHECKPOINT_TEMPLATE_FILE, DIALOGPT
from ..checkpoints import save_hf
from ..data.prepare import DataConfig
from ..errors import Gpt2kitError, Stopped
from ..inference.scoring import evaluate_blocks
from ..kernels import grad_clip
from ..lora import LoraConfig, merge_lora, save_adapter
from ..model import GPT
from ..runtime import autocast, resolve_device
from . import distributed
from .config import TrainConfig
from .plan import Plan, ResumeMismatch, plan_steps, settle
from .runs import METRICS, capture_rng, nonfinite, tensor_bytes
from .samples import write_samples
from .schedule import MIN_LR_RATIO, get_lr
from .setup import Parts, State, build, heap_for_training, load_for_training, prepare, summary_lines

__all__ = ["finetune", "get_lr", "RunResult", "TrainConfig", "TrainingInterrupted", "TrainingDiverged",
           "ResumeMismatch"]


class TrainingInterrupted(Stopped):
    """Training stopped on SIGINT (exit 130) or SIGTERM (exit 143) after saving a checkpoint."""

    def __init__(self, step: int, checkpoint: Path | None, signum: int | None, result: "RunResult"):
        self.exit_code = 143 if signum == signal.SIGTERM else 130
        self.result = result
        name = signal.Signals(signum).name if signum else "a signal"
        super().__init__(f"training stopped by {name} at step {step}; saved checkpoint to "
                         f"{checkpoint}; resume with --resume")


class TrainingDiverged(Gpt2kitError):
    """The loss or the gradient norm became NaN or infinite (the weights were not updated), or
    the weights did (they were not saved). `checkpoint` is the newest one with finite weights."""

    def __init__(self, value: float, step: int, checkpoint: Path | None, what: str = "loss is"):
        kind = "NaN" if math.isnan(value) else "infinite"
        good = checkpoint or "none saved yet"
        super().__init__(f"{what} {kind} at step {step}; last good checkpoint: {good} "
                         "(try a lower --learning-rate)")


@dataclass
class RunResult:
    out: Path  # the run folder; its top level is the latest model
    steps: int  # optimizer steps done
    train_loss: float | None  # the last step's loss
    val_loss: float | None  # the last evaluation's
    status: str  # "completed" or "interrupted"
    summary: dict = field(default_factory=dict)


# ---- the recipe ----------------------------------------------------------------------------

def finetune(data: str | DataConfig | None = None, model: str | None = None,
             config: TrainConfig | None = None, *, lora: LoraConfig | bool | None = None,
             progress: bool = True, log: Callable[[dict], None] | None = None,
             **options) -> RunResult:
    """Fine-tune `model` (hub id or folder; default gpt2, or on --resume the run's) on `data` (a
    path or DataConfig; optional on --resume) and return a RunResult. `options` are TrainConfig
    fields and override `config`'s; `out` is required. `lora`: True or a LoraConfig (its rank,
    alpha, targets) trains adapters only. `log` receives every event as a dict
    (summary, train, eval, sample, checkpoint, note); with progress=True and no `log`, a progress
    bar and the summary, evaluations and samples go to stderr. Raises TrainingInterrupted after
    a graceful stop, TrainingDiverged on a NaN/inf loss, other Gpt2kitErrors in one line."""
    world = distributed.from_env()
    emit = _emitter(log, progress and world.is_main)
    plan = settle(data, model, config, lora, options, emit)                             # 1. options
    device = distributed.setup(world, resolve_device(plan.cfg.device))
    parts = None
    try:
        distributed.check_batch(world, plan.cfg.batch_size)
        gpt, tokenizer = load_for_training(plan, device)                                # 2. model
        blocks = prepare(plan, tokenizer, gpt.config.n_positions, world, emit, progress)  # 3. data
        plan = plan_steps(plan, len(blocks.train))                                      # 4. steps
        parts = build(plan, world, device, gpt, tokenizer, blocks, emit, progress)      #    and parts
        with StopSignals() as stop, heap_for_training(parts):
            return train(plan, parts, State.start(plan), stop)                          # 5. loop
    finally:
        if parts is not None:
            parts.bar.close()
        distributed.teardown(world)


def train(plan: Plan, parts: Parts, state: State, stop: StopSignals) -> RunResult:
    """The loop: one optimizer step per iteration, then whatever is due after it."""
    cfg, total = plan.cfg, plan.steps.total
    if plan.resume is not None and parts.world.is_main:
        # A kill mid-publish can leave the top level without weights (the first publish) or
        # with an older checkpoint's: make it the checkpoint resumed from before any step.
        parts.run.publish(plan.resume.folder)
    if state.step == 0:
        evaluate(plan, parts, state)
    while state.step < total:
        lr = plan.lr(state.step)
        for group in parts.optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        loss, grad_norm = optimizer_step(plan, parts, state)
        state.step += 1
        log_step(plan, parts, state, loss, lr, grad_norm, time.perf_counter() - t0)
        last = state.step == total
        if last or (cfg.eval_every and state.step % cfg.eval_every == 0):
            evaluate(plan, parts, state)
        if cfg.sample_every and state.step % cfg.sample_every == 0:
            sample(plan, parts, state)
        if last or (cfg.save_every and state.step % cfg.save_every == 0):
            save(plan, parts, state)
        if not last and distributed.any_process(parts.world, stop.signum is not None, parts.device):
            save(plan, parts, state)
            raise TrainingInterrupted(state.step, state.last_checkpoint, stop.signum,
                                      result(parts, state, "interrupted"))
        state.gathered = None  # FSDP: rank 0's whole copy of the weights is not kept while training
    finish(plan, parts)
    return result(parts, state, "completed")


class StopSignals:
    """SIGINT and SIGTERM ask the loop to stop after the current optimizer step. Later signals are
    ignored, so a second Ctrl-C cannot break the checkpoint being saved. The previous
    handlers are restored on exit. (Signal handlers can only be set from the main thread.)"""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


# ---- 5. the steps ----------------------------------------------------------------------------

def optimizer_step(plan: Plan, parts: Parts, state: State) -> tuple[float, float]:
    """Forward and backward over the step's micro-batches (loss / grad_accum each), then clip and
    step. Returns the step's mean loss over all processes and the gradient norm before clipping.
    A NaN/inf loss stops training before the weights are touched, so the last checkpoint stays the last good one."""
    accum, scaler, optimizer = plan.cfg.grad_accum, parts.scaler, parts.optimizer
    total = torch.zeros((), device=parts.device)
    for micro in range(accum):
        x = micro_batch(plan, parts, state, micro).to(parts.device)
        with distributed.no_sync(parts.net, sync=micro == accum - 1), autocast(parts.device, parts.autocast_dtype):
            loss = parts.net(x) / accum
            (scaler.scale(loss) if scaler else loss).backward()
        total += loss.detach()
    loss = distributed.mean(parts.world, total).item()
    if not math.isfinite(loss):
        raise TrainingDiverged(loss, state.step + 1, parts.run.last_good(state.last_checkpoint))
    if scaler is not None:
        scaler.unscale_(optimizer)
    params, grads = [p for g in optimizer.param_groups for p in g["params"]], grad_clip.gradients(optimizer)
    max_norm = plan.cfg.grad_clip or math.inf
    # fused AdamW on CPU, whole gradients (one process or DDP's replicas, not FSDP's shards): the
    # clipping folded into the step (kernels/grad_clip.py)
    folded = scaler is None and grad_clip.folds_into_step(optimizer, grads)
    norm = grad_clip.total_norm(grads) if folded else float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    if scaler is None and not math.isfinite(norm):
        raise TrainingDiverged(norm, state.step + 1, parts.run.last_good(state.last_checkpoint),
                               what="gradient norm is")
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    elif folded:
        grad_clip.clipped_step(optimizer, norm, max_norm)
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, norm


def micro_batch(plan: Plan, parts: Parts, state: State, micro: int) -> torch.Tensor:
    """This process's share of micro-batch `micro` of the current step: blocks at consecutive
    positions of an endless stream of epochs, each epoch its own shuffle of all blocks."""
    rows, train_blocks = plan.cfg.batch_size, parts.data.train
    first = (state.step * plan.cfg.grad_accum + micro) * rows
    positions = range(first, first + rows)[distributed.share(parts.world, rows)]
    blocks = []
    for p in positions:
        epoch, i = divmod(p, len(train_blocks))
        if epoch not in state.orders:
            state.orders = {epoch: train_blocks.order(epoch, plan.cfg.seed)}
        blocks.append(int(state.orders[epoch][i]))
    return train_blocks.batch(blocks)


def log_step(plan: Plan, parts: Parts, state: State, loss: float, lr: float, grad_norm: float,
             seconds: float) -> None:
    cfg = plan.cfg
    state.train_loss = loss
    tokens = cfg.batch_size * cfg.grad_accum * (parts.data.block_size - 1)
    blocks_seen = state.step * cfg.batch_size * cfg.grad_accum
    record = {"step": state.step, "epoch": round(blocks_seen / len(parts.data.train), 4), "loss": loss,
              "lr": lr, "grad_norm": grad_norm, "tokens_per_s": round(tokens / max(seconds, 1e-9), 1)}
    if parts.world.is_main and state.step % cfg.log_every == 0:
        parts.run.append(METRICS, record)
        parts.emit({"event": "train", **record})
    parts.bar.update(1)
    parts.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)


def evaluate(plan: Plan, parts: Parts, state: State) -> None:
    """Validation loss and perplexity (rank 0, at most eval_batches batches), and loss.png.
    Under FSDP every process takes part in gathering the weights first (plain_model)."""
    if parts.data.val is None or (model := plain_model(parts, state)) is None:
        return
    loss, ppl = evaluate_blocks(model, parts.data.val, plan.cfg.batch_size, plan.cfg.eval_batches)
    state.val_losses.append([state.step, loss])
    record = {"step": state.step, "val_loss": loss, "val_ppl": ppl}
    parts.run.append(METRICS, record)
    parts.emit({"event": "eval", **record})
    parts.run.plot()


def sample(plan: Plan, parts: Parts, state: State) -> None:
    """Three short samples from an empty prompt, written to samples.jsonl (rank 0)."""
    if (model := plain_model(parts, state)) is not None:
        for record in write_samples(model, parts.tokenizer, parts.run, state.step, plan.cfg.seed, parts.copies):
            parts.emit({"event": "sample", **record})


def plain_model(parts: Parts, state: State) -> GPT | None:
    """The model as one plain module on rank 0, None on the others. Under FSDP a copy gathered
    from the shards, once per step (every process must call this: the gather is collective)."""
    if not distributed.is_sharded(parts.model):
        return parts.model if parts.world.is_main else None
    if state.gathered is None or state.gathered[0] != state.step:
        state.gathered = None  # free the old copy before gathering the new one
        state.gathered = (state.step, distributed.full_copy(parts.model, parts.world, parts.device))
    return state.gathered[1]


def save(plan: Plan, parts: Parts, state: State) -> None:
    """A checkpoint of this step (once), made the run folder's model, old ones pruned (rank 0).
    Weights that are not all finite are never saved (TrainingDiverged): a finite loss can still
    take a step to infinity (a huge learning rate), and a saved checkpoint is published as the
    run's model and named as the last good one."""
    if state.saved_step == state.step:
        return
    model = plain_model(parts, state)  # under FSDP these two gather on every process
    bad = nonfinite(saved_tensors(plan, model)) if model is not None else None
    if distributed.any_process(parts.world, bad is not None, parts.device):
        raise TrainingDiverged(math.nan if bad is None else bad, state.step,
                               parts.run.last_good(state.last_checkpoint), what="the weights are")
    optimizer = distributed.optimizer_state(parts.model, parts.optimizer)
    if parts.world.is_main:
        rng, rng_json = capture_rng()
        folder = parts.run.save(state.step, lambda p: write_model(plan, parts, model, p), optimizer,
                                rng, trainer_state(plan, parts, state, rng_json),
                                model_bytes=tensor_bytes(saved_tensors(plan, model)))
        parts.run.publish(folder)
        parts.run.prune(plan.cfg.keep_checkpoints)
        state.last_checkpoint = folder
        parts.emit({"event": "checkpoint", "step": state.step, "path": str(folder)})
    distributed.barrier(parts.world)
    state.saved_step = state.step


def saved_tensors(plan: Plan, model: GPT) -> list[torch.Tensor]:
    """What a checkpoint keeps of the model: its parameters, or with LoRA the adapters (the
    trained ones)."""
    return [p.detach() for p in model.parameters() if plan.lora is None or p.requires_grad]


def write_model(plan: Plan, parts: Parts, model: GPT, folder: Path) -> None:
    if plan.lora is not None:
        save_adapter(model, plan.lora, folder, base=plan.model)
        parts.tokenizer.save(folder)
    else:
        save_hf(model, folder, tokenizer=parts.tokenizer)
    template = parts.data.chat_template
    if template is not None and template not in (BUILTIN, DIALOGPT):
        # A template from a file or the base checkpoint goes with the run, so the model chats as it
        # was trained; the built-in ones are chosen again (they carry stop strings a file cannot).
        (folder / CHECKPOINT_TEMPLATE_FILE).write_text(template.source, encoding="utf-8")


def trainer_state(plan: Plan, parts: Parts, state: State, rng_json: dict) -> dict:
    cfg, n = plan.cfg, len(parts.data.train)
    seen = state.step * cfg.batch_size * cfg.grad_accum
    schedule = {"kind": cfg.schedule, "peak_lr": cfg.peak_lr, "warmup_steps": plan.steps.warmup,
                "total_steps": plan.steps.total, "min_lr_ratio": MIN_LR_RATIO}
    return {"step": state.step, "epoch": seen / n, "epoch_index": seen // n, "position_in_epoch": seen % n,
            "blocks_seen": seen, "schedule": schedule,
            "config": cfg.to_json(), "identity": parts.identity, "train_loss": state.train_loss,
            "val_losses": state.val_losses, "rng": rng_json, "world_size": parts.world.world_size,
            "sharded": distributed.is_sharded(parts.model),
            "grad_scaler": parts.scaler.state_dict() if parts.scaler is not None else None}


def finish(plan: Plan, parts: Parts) -> None:
    """--merge-lora: fold the adapters in and write the plain model into the run folder too."""
    parts.bar.close()
    if parts.world.is_main:
        parts.run.plot()
    if parts.world.is_main and plan.cfg.merge_lora:
        merge_lora(parts.model)
        tmp = parts.run.path / ".merged.partial"
        save_hf(parts.model, tmp, tokenizer=parts.tokenizer)
        parts.run.publish(tmp, move=True)
        tmp.rmdir()
        parts.emit({"event": "note", "message": f"wrote the merged model to {parts.run.path}"})


def result(parts: Parts, state: State, status: str) -> RunResult:
    val = state.val_losses[-1][1] if state.val_losses else None
    return RunResult(parts.run.path, state.step, state.train_loss, val, status, parts.summary)


def _emitter(log: Callable[[dict], None] | None, progress: bool) -> Callable[[dict], None]:
    """`log`, or with progress on, human-readable lines on stderr (between progress-bar updates)."""
    if log is not None:
        return log
    if not progress:
        return lambda record: None

    def show(record: dict) -> None:
        for line in summary_lines(record):
            tqdm.write(line, file=sys.stderr)
    return show

