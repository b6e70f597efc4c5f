"""TrainConfig: every fine-tuning option, its default, help text and check, in one place.

Kept free of torch (like config.py, where it may move) so the CLI can build `--flag`s from these
fields and print `--help` at once. Defaults that depend on the run (the learning rate, warm-up,
block size, dropout) are None here and resolved by training/setup.py, which says what it chose.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from ..config import PRESETS, check_finite, check_integer
from ..errors import OptionError

SCHEDULES = ("cosine", "linear")
LEARNING_RATES = {"fine-tune": 1e-4, "lora": 2e-4, "from-scratch": 6e-4}
# Fields `--resume` may change: they alter when things happen, not what the model learns
# (epochs and max_steps move the end of the schedule, said and recorded: setup.keep_schedule).
# (fsdp is one: sharded and replicated training compute the same steps, and checkpoints hold the
# same whole-model files either way.)
RESUME_SAFE = ("epochs", "max_steps", "eval_every", "eval_batches", "sample_every", "log_every",
               "save_every", "keep_checkpoints", "grad_checkpointing", "compile", "fsdp",
               "merge_lora", "device", "resume")


def _help(text: str) -> dict:
    return {"help": text}


@dataclass(frozen=True)
class TrainConfig:
    """How to fine-tune (or train from scratch) a GPT-2, and where the run folder goes."""

    out: str = field(metadata=_help(
        "run folder: checkpoints, metrics.jsonl, samples.jsonl, loss.png and the latest model "
        "in Hugging Face layout (required; an existing run needs --resume)"))
    epochs: float = field(default=3, metadata=_help(
        "passes over the training blocks (default 3); ignored when --max-steps is set"))
    max_steps: int | None = field(default=None, metadata=_help(
        "optimizer steps to train for, overriding --epochs (default: from --epochs)"))
    batch_size: int = field(default=8, metadata=_help(
        "blocks per micro-batch, split evenly across processes under torchrun (default 8)"))
    grad_accum: int = field(default=1, metadata=_help(
        "micro-batches per optimizer step; an optimizer step sees batch-size x grad-accum "
        "blocks whatever the number of processes (default 1)"))
    learning_rate: float | None = field(default=None, metadata=_help(
        "peak learning rate (default 1e-4 fine-tuning, 2e-4 with --lora, 6e-4 with --from-scratch)"))
    weight_decay: float = field(default=0.1, metadata=_help(
        "AdamW weight decay, applied to matrices and embeddings only, not to biases or "
        "LayerNorms (default 0.1)"))
    warmup_steps: int | None = field(default=None, metadata=_help(
        "linear warm-up steps (default 5 percent of the total steps, at most 500)"))
    schedule: str = field(default="cosine", metadata=_help(
        "learning-rate decay after warm-up, down to 10 percent of the peak: cosine or linear "
        "(default cosine)"))
    grad_clip: float = field(default=1.0, metadata=_help(
        "clip the gradient's global norm to this; 0 disables (default 1.0)"))
    seed: int = field(default=0, metadata=_help(
        "seed of the data order, dropout and initialisation (default 0)"))
    eval_every: int = field(default=200, metadata=_help(
        "evaluate the validation loss every N steps, at the start and at the end; 0: only at "
        "the start and end (default 200)"))
    eval_batches: int = field(default=50, metadata=_help(
        "at most this many validation batches per evaluation (default 50)"))
    sample_every: int = field(default=500, metadata=_help(
        "write 3 samples to samples.jsonl every N steps; 0 disables (default 500)"))
    log_every: int = field(default=1, metadata=_help(
        "write a training line to metrics.jsonl every N steps (default 1)"))
    save_every: int = field(default=500, metadata=_help(
        "save a checkpoint every N steps and at the end; 0: only at the end (default 500)"))
    keep_checkpoints: int = field(default=2, metadata=_help(
        "keep the newest N checkpoints, deleting older ones (default 2)"))
    grad_checkpointing: bool = field(default=False, metadata=_help(
        "recompute each block's activations in the backward pass: less memory, about a third "
        "slower (default off)"))
    compile: bool = field(default=False, metadata=_help(
        "torch.compile the model: slow first steps, faster later; needs a C++ compiler on CPU "
        "(default off)"))
    fsdp: bool = field(default=False, metadata=_help(
        "under torchrun, shard the weights, gradients and optimizer state across the processes "
        "(FSDP) instead of a full copy in each (DDP): for models whose training state does not "
        "fit one device; no effect in a single process (default off)"))
    lora: bool = field(default=False, metadata=_help(
        "train low-rank adapters only (LoRA), the base model frozen: much less memory (default off)"))
    from_scratch: bool = field(default=False, metadata=_help(
        "train a new randomly initialised model of shape --size instead of fine-tuning --model "
        "(default off)"))
    size: str = field(default="tiny", metadata=_help(
        f"model shape for --from-scratch: {', '.join(PRESETS)} (default tiny)"))
    block_size: int | None = field(default=None, metadata=_help(
        "tokens per training block (default: the model's context, at most 1024)"))
    resume: bool = field(default=False, metadata=_help(
        "continue the run in --out from its newest complete checkpoint; its run.json supplies "
        "the other settings, and only " + ", ".join(RESUME_SAFE[:-1]) + " may change (default off)"))
    merge_lora: bool = field(default=False, metadata=_help(
        "with --lora: also write the merged (plain) model into --out at the end (default off)"))
    dropout: float | None = field(default=None, metadata=_help(
        "dropout while training (default: the checkpoint's, 0.0 from scratch; GPT-2 used 0.1)"))
    device: str = field(default="auto", metadata=_help(
        "auto | cpu | cuda | cuda:N (default auto; under torchrun each process takes its own GPU)"))
    dtype: str = field(default="auto", metadata=_help(
        "auto | float32 | bfloat16 | float16: the autocast type; weights and optimizer stay "
        "float32 (default auto: bfloat16 on CUDA and on CPUs with native bfloat16 (AVX512-BF16 "
        "or AMX), float32 on other CPUs, float16 with loss scaling on GPUs without bfloat16)"))

    def __post_init__(self):
        if not isinstance(self.out, str) or not self.out.strip():
            raise OptionError("out", "must name the run folder (a path)")
        if not 0 < check_finite("epochs", self.epochs) <= 1e6:
            raise OptionError("epochs", f"must be greater than 0, got {self.epochs}")
        for name in ("max_steps", "warmup_steps", "block_size"):
            value = getattr(self, name)
            if value is not None and check_integer(name, value) < (0 if name == "warmup_steps" else 1):
                raise OptionError(name, f"must be at least {0 if name == 'warmup_steps' else 1}, got {value}")
        if self.block_size is not None and self.block_size < 2:
            raise OptionError("block_size", f"must be at least 2, got {self.block_size}")
        for name in ("batch_size", "grad_accum", "eval_batches", "log_every", "keep_checkpoints"):
            if check_integer(name, getattr(self, name)) < 1:
                raise OptionError(name, f"must be at least 1, got {getattr(self, name)}")
        for name in ("eval_every", "sample_every", "save_every"):
            if check_integer(name, getattr(self, name)) < 0:
                raise OptionError(name, f"must be at least 0 (0 disables), got {getattr(self, name)}")
        if not 0 <= check_integer("seed", self.seed) < 2**63:
            raise OptionError("seed", f"must be in [0, 2**63), got {self.seed}")
        if self.learning_rate is not None and not check_finite("learning_rate", self.learning_rate) > 0:
            raise OptionError("learning_rate", f"must be greater than 0, got {self.learning_rate}")
        for name in ("weight_decay", "grad_clip"):
            if check_finite(name, getattr(self, name)) < 0:
                raise OptionError(name, f"must be at least 0, got {getattr(self, name)}")
        if self.dropout is not None and not 0 <= check_finite("dropout", self.dropout) < 1:
            raise OptionError("dropout", f"must be in [0, 1), got {self.dropout}")
        if self.schedule not in SCHEDULES:
            raise OptionError("schedule", f"must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.size not in PRESETS:
            raise OptionError("size", f"must be one of {', '.join(PRESETS)}, got {self.size!r}")
        if self.lora and self.from_scratch:
            raise OptionError("lora", "cannot be combined with --from-scratch (there is no "
                              "trained base model to adapt)")
        if self.fsdp and self.lora:
            raise OptionError("fsdp", "cannot be combined with --lora (LoRA's optimizer state is "
                              "already tiny: run torchrun without --fsdp)")
        if self.merge_lora and not self.lora:
            raise OptionError("merge_lora", "needs --lora")
        for name in ("grad_checkpointing", "compile", "fsdp", "lora", "from_scratch", "resume", "merge_lora"):
            if not isinstance(getattr(self, name), bool):
                raise OptionError(name, f"must be true or false, got {getattr(self, name)!r}")

    @property
    def kind(self) -> str:
        """"fine-tune", "lora" or "from-scratch": picks the default learning rate."""
        return "from-scratch" if self.from_scratch else "lora" if self.lora else "fine-tune"

    @property
    def peak_lr(self) -> float:
        return self.learning_rate if self.learning_rate is not None else LEARNING_RATES[self.kind]

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}
