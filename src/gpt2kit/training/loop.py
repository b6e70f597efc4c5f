"""Fine-tuning GPT-2 (or training one from scratch), as a recipe in the shape of nanoGPT's train.py:

    finetune(data, model, config)
      1. options: the given ones, or on --resume the run's run.json with safe changes only
      2. model: load it (or build one --from-scratch), then LoRA, dropout and the fast paths
      3. data: packed token blocks and a validation split (data/prepare.py)
      4. summary and memory check, AdamW, and on --resume the checkpoint's exact state
      5. loop: learning rate, micro-steps, clip, step, log; evaluate, sample and save when due

Steps 1-4 are in setup.py, the run folder in runs.py. Every optimizer step sees
batch_size x grad_accum blocks, in an order that is a pure function of (seed, step), and all
randomness is checkpointed, so a resumed run continues bit for bit as the uninterrupted run would
have. Ctrl-C or SIGTERM stops at the next step boundary with a checkpoint.
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

from ..checkpoints import save_hf
from ..data.prepare import DataConfig
from ..errors import Gpt2kitError, Stopped
from ..inference.scoring import evaluate_blocks
from ..kernels.compile_log import FIRST_RUN
from ..kernels.fused_loss import LOSS_CHUNK
from ..lora import LoraConfig, merge_lora, save_adapter
from ..model import GPT
from ..runtime import autocast, precision, resolve_device
from . import distributed
from .config import TrainConfig
from .objective import NextTokenLoss
from .runs import METRICS, Run, capture_rng
from .samples import CopyDetector, write_samples
from .schedule import MIN_LR_RATIO, get_lr
from .setup import (
    Job,
    ResumeMismatch,
    check_memory,
    load_for_training,
    make_optimizer,
    plan_steps,
    prepare,
    progress_bar,
    restore,
    run_settings,
    settle,
    summary_lines,
)

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
    """The loss (or the gradient norm) became NaN or infinite; the weights were not updated."""

    def __init__(self, value: float, step: int, checkpoint: Path | None, what: str = "loss"):
        kind = "NaN" if math.isnan(value) else "infinite"
        good = checkpoint or "none saved yet"
        super().__init__(f"{what} is {kind} at step {step}; last good checkpoint: {good} "
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
    job = None
    try:
        distributed.check_batch(world, plan.cfg.batch_size)
        job = Job(plan, Run(plan.cfg.out), world, device, *load_for_training(plan, device), emit)  # 2.
        job.data = prepare(job, progress)                                               # 3. data
        setup(job, progress)                                                            # 4. setup
        with StopSignals() as stop:
            return train(job, stop)                                                     # 5. loop
    finally:
        if job is not None and job.bar is not None:
            job.bar.close()
        distributed.teardown(world)


def setup(job: Job, progress: bool) -> None:
    """Steps, precision, summary and memory check, optimizer, wrappers, then the resumed state."""
    plan_steps(job)
    job.autocast_dtype, scaling = precision(job.cfg.dtype, job.device)
    job.scaler = torch.amp.GradScaler(job.device.type) if scaling else None
    check_memory(job, loss_rows=None if job.autocast_dtype else LOSS_CHUNK)
    job.net = distributed.wrap(NextTokenLoss(job.model), job.world, job.device, job.cfg.fsdp)
    job.optimizer = make_optimizer(job.model, job.cfg, job.device)  # after FSDP: over the shards
    if job.cfg.compile:  # DDP first, then compile: TorchDynamo then splits the graph at DDP's buckets
        job.net = torch.compile(job.net)
        job.emit({"event": "note", "message": f"--compile: the first step compiles the model ({FIRST_RUN})"})
    if job.plan.resume_from is not None:
        restore(job, job.plan.resume_from)
    elif job.world.is_main:
        job.run.start(run_settings(job.plan))
    if job.cfg.sample_every and job.world.is_main:
        job.copies = CopyDetector(job.data.train.tokens, job.tokenizer.eos_id)
    job.emit({"event": "summary", **job.summary})
    job.bar = progress_bar(job, progress and job.world.is_main)


def train(job: Job, stop: StopSignals) -> RunResult:
    """The loop: one optimizer step per iteration, then whatever is due after it."""
    cfg = job.cfg
    if job.step == 0:
        evaluate(job)
    while job.step < job.total_steps:
        lr = get_lr(job.step, cfg.peak_lr, job.warmup_steps, job.total_steps, cfg.schedule)
        for group in job.optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        loss, grad_norm = optimizer_step(job)
        job.step += 1
        log_step(job, loss, lr, grad_norm, time.perf_counter() - t0)
        last = job.step == job.total_steps
        if last or (cfg.eval_every and job.step % cfg.eval_every == 0):
            evaluate(job)
        if cfg.sample_every and job.step % cfg.sample_every == 0:
            sample(job)
        if last or (cfg.save_every and job.step % cfg.save_every == 0):
            save(job)
        if not last and distributed.any_process(job.world, stop.signum is not None, job.device):
            save(job)
            raise TrainingInterrupted(job.step, job.last_checkpoint, stop.signum, result(job, "interrupted"))
        job.gathered = None  # FSDP: rank 0's whole copy of the weights is not kept while training
    finish(job)
    return result(job, "completed")


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

def optimizer_step(job: Job) -> tuple[float, float]:
    """Forward and backward over the step's micro-batches (loss / grad_accum each), then clip and
    step. Returns the step's mean loss over all processes and the gradient norm before clipping.
    A NaN/inf loss stops training before the weights are touched, so the last checkpoint stays the last good one."""
    cfg, accum = job.cfg, job.cfg.grad_accum
    total = torch.zeros((), device=job.device)
    for micro in range(accum):
        x = micro_batch(job, micro).to(job.device)
        with distributed.no_sync(job.net, sync=micro == accum - 1), autocast(job.device, job.autocast_dtype):
            loss = job.net(x) / accum
            (job.scaler.scale(loss) if job.scaler else loss).backward()
        total += loss.detach()
    loss = distributed.mean(job.world, total).item()
    if not math.isfinite(loss):
        raise TrainingDiverged(loss, job.step + 1, job.last_checkpoint)
    if job.scaler is not None:
        job.scaler.unscale_(job.optimizer)
    params = [p for g in job.optimizer.param_groups for p in g["params"]]
    norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or math.inf))
    if job.scaler is None and not math.isfinite(norm):
        raise TrainingDiverged(norm, job.step + 1, job.last_checkpoint, what="gradient norm")
    if job.scaler is not None:
        job.scaler.step(job.optimizer)
        job.scaler.update()
    else:
        job.optimizer.step()
    job.optimizer.zero_grad(set_to_none=True)
    return loss, norm


def micro_batch(job: Job, micro: int) -> torch.Tensor:
    """This process's share of micro-batch `micro` of the current step: blocks at consecutive
    positions of an endless stream of epochs, each epoch its own shuffle of all blocks."""
    rows = job.cfg.batch_size
    first = (job.step * job.cfg.grad_accum + micro) * rows
    positions = range(first, first + rows)[distributed.share(job.world, rows)]
    n = len(job.data.train)
    blocks = []
    for p in positions:
        epoch, i = divmod(p, n)
        if epoch not in job.orders:
            job.orders = {epoch: job.data.train.order(epoch, job.cfg.seed)}
        blocks.append(int(job.orders[epoch][i]))
    return job.data.train.batch(blocks)


def log_step(job: Job, loss: float, lr: float, grad_norm: float, seconds: float) -> None:
    job.train_loss = loss
    tokens = job.cfg.batch_size * job.cfg.grad_accum * (job.data.block_size - 1)
    blocks_seen = job.step * job.cfg.batch_size * job.cfg.grad_accum
    record = {"step": job.step, "epoch": round(blocks_seen / len(job.data.train), 4), "loss": loss,
              "lr": lr, "grad_norm": grad_norm, "tokens_per_s": round(tokens / max(seconds, 1e-9), 1)}
    if job.world.is_main and job.step % job.cfg.log_every == 0:
        job.run.append(METRICS, record)
        job.emit({"event": "train", **record})
    if job.bar is not None:
        job.bar.update(1)
        job.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)


def evaluate(job: Job) -> None:
    """Validation loss and perplexity (rank 0, at most eval_batches batches), and loss.png.
    Under FSDP every process takes part in gathering the weights first (plain_model)."""
    if job.data.val is None or (model := plain_model(job)) is None:
        return
    loss, ppl = evaluate_blocks(model, job.data.val, job.cfg.batch_size, job.cfg.eval_batches)
    job.val_losses.append([job.step, loss])
    record = {"step": job.step, "val_loss": loss, "val_ppl": ppl}
    job.run.append(METRICS, record)
    job.emit({"event": "eval", **record})
    job.run.plot()


def sample(job: Job) -> None:
    """Three short samples from an empty prompt, written to samples.jsonl (rank 0)."""
    if (model := plain_model(job)) is not None:
        for record in write_samples(model, job.tokenizer, job.run, job.step, job.cfg.seed, job.copies):
            job.emit({"event": "sample", **record})


def plain_model(job: Job) -> GPT | None:
    """The model as one plain module on rank 0, None on the others. Under FSDP a copy gathered
    from the shards, once per step (every process must call this: the gather is collective)."""
    if not distributed.is_sharded(job.model):
        return job.model if job.world.is_main else None
    if job.gathered is None or job.gathered[0] != job.step:
        job.gathered = None  # free the old copy before gathering the new one
        job.gathered = (job.step, distributed.full_copy(job.model, job.world, job.device))
    return job.gathered[1]


def save(job: Job) -> None:
    """A checkpoint of this step (once), made the run folder's model, old ones pruned (rank 0)."""
    if job.saved_step == job.step:
        return
    model = plain_model(job)  # under FSDP these two gather on every process
    optimizer = distributed.optimizer_state(job.model, job.optimizer)
    if job.world.is_main:
        rng, rng_json = capture_rng()
        folder = job.run.save(job.step, lambda p: write_model(job, model, p), optimizer,
                              rng, trainer_state(job, rng_json))
        job.run.publish(folder)
        job.run.prune(job.cfg.keep_checkpoints)
        job.last_checkpoint = folder
        job.emit({"event": "checkpoint", "step": job.step, "path": str(folder)})
    distributed.barrier(job.world)
    job.saved_step = job.step


def write_model(job: Job, model: GPT, folder: Path) -> None:
    if job.plan.lora is not None:
        save_adapter(model, job.plan.lora, folder, base=job.plan.model)
        job.tokenizer.save(folder)
    else:
        save_hf(model, folder, tokenizer=job.tokenizer)


def trainer_state(job: Job, rng_json: dict) -> dict:
    n, seen = len(job.data.train), job.step * job.cfg.batch_size * job.cfg.grad_accum
    schedule = {"kind": job.cfg.schedule, "peak_lr": job.cfg.peak_lr, "warmup_steps": job.warmup_steps,
                "total_steps": job.total_steps, "min_lr_ratio": MIN_LR_RATIO}
    return {"step": job.step, "epoch": seen / n, "epoch_index": seen // n, "position_in_epoch": seen % n,
            "blocks_seen": seen, "schedule": schedule,
            "config": job.cfg.to_json(), "identity": job.identity, "train_loss": job.train_loss,
            "val_losses": job.val_losses, "rng": rng_json, "world_size": job.world.world_size,
            "sharded": distributed.is_sharded(job.model),
            "grad_scaler": job.scaler.state_dict() if job.scaler is not None else None}


def finish(job: Job) -> None:
    """--merge-lora: fold the adapters in and write the plain model into the run folder too."""
    if job.bar is not None:
        job.bar.close()
    if job.world.is_main:
        job.run.plot()
    if job.world.is_main and job.cfg.merge_lora:
        merge_lora(job.model)
        tmp = job.run.path / ".merged.partial"
        save_hf(job.model, tmp, tokenizer=job.tokenizer)
        job.run.publish(tmp, move=True)
        tmp.rmdir()
        job.emit({"event": "note", "message": f"wrote the merged model to {job.run.path}"})


def result(job: Job, status: str) -> RunResult:
    val = job.val_losses[-1][1] if job.val_losses else None
    return RunResult(job.run.path, job.step, job.train_loss, val, status, job.summary)


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

