"""Will this training run fit in memory? A peak estimate, and what the device has free.

The estimate counts what a training step holds at its peak (the end of the forward pass):

- weights, 4 bytes per parameter (float32 master weights, also under autocast);
- gradients and AdamW's two moments, 4 + 8 bytes per *trainable* parameter (LoRA: adapters only;
  bfloat16 on CPU in one process, a matrix's 4 bytes of gradient are its bfloat16 copy and that
  copy's bfloat16 gradient: kernels/half_copies.py);
- activations saved for the backward pass, per token of the micro-batch:
  ~20 C-wide tensors per block (LayerNorm inputs, q/k/v, attention output, the 4C MLP hidden
  before and after GELU, dropout masks), in the autocast dtype;
  attention probabilities (nh x T per token per block) only with dropout, which sends
  scaled_dot_product_attention to its math path (without dropout the fused kernels keep none);
  for the loss, four float32 copies of the (T, V) logits (the logits, log-softmax, and their
  gradients), or with the fused head + loss of float32 training (kernels/fused_loss.py) one
  chunk of logits rows plus the head's gradients, which it makes in the forward pass.
  With gradient checkpointing only each block's input is kept, plus one block being recomputed.
  Float32 training on CPU keeps less (lean_backward, the default there): no GELU output (4
  C-wide), dropout masks as bool (~1.5 C-wide in all), and of attention with dropout the
  probabilities once instead of three float (T, T) tensors.

Under FSDP with N processes, weights, gradients and AdamW state are 1/N each, plus what is
gathered whole at a time: the root's parameters (embeddings, ln_f) and two blocks' (the one
running and the one prefetched), with their gradients in the backward pass.

Calibrated against peak RSS on CPU (torch 2.13, fp32, GPT-2 124M and the "tiny" preset, batch
2-8, T 256-1024), before lean_backward: within about 25 percent, erring high except with gradient
checkpointing. With the fused loss it erred low: 7.2 GB estimated, 7.7 GB peak RSS for GPT-2
124M at 2 x 1024 tokens (3.3 and 4.0 GB at 4 x 256), the process's own ~0.5 GB (libraries,
allocator) included. The lean terms follow what lean_backward measured it saves (452 MB for GPT-2
124M at 4 x 256 tokens, dropout 0.1; the estimate's difference is 468 MB); a test compares them
with the tensors a step saves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import Gpt2kitError

GB = 1024**3
ACTIVATIONS_PER_BLOCK = 20  # C-wide tensors saved per token per block (see the module doc)
LOGIT_COPIES = 4
LEAN_SAVED_PER_BLOCK = 5  # C-wide tensors lean_backward does not keep (GELU output, float masks)


class NotEnoughMemory(Gpt2kitError):
    """The training run's estimated peak memory exceeds what the device has available."""


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int  # bytes
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def describe(self) -> str:
        parts = ", ".join(f"{name} {gb(getattr(self, name))}"
                          for name in ("weights", "gradients", "optimizer", "activations"))
        return f"{gb(self.total)} ({parts})"


def gb(n: int) -> str:
    return f"{n / GB:.2f} GB"


def estimate(cfg: ModelConfig, n_params: int, n_trainable: int, micro_batch: int, block_size: int,
             grad_checkpointing: bool = False, dropout: float = 0.0,
             activation_bytes: int = 4, shards: int = 1,
             loss_rows: int | None = None, lean: bool = False) -> MemoryEstimate:
    """Peak bytes of one process training `n_trainable` of `n_params` parameters on micro-batches
    of `micro_batch` x `block_size` tokens, its state sharded `shards` ways (FSDP). `loss_rows`:
    logits rows the fused loss holds at a time (None: the plain loss, all of them). `lean`: the
    forwards of lean_backward.save_less_for_backward are in use."""
    tokens = micro_batch * block_size
    per_block = ACTIVATIONS_PER_BLOCK - (LEAN_SAVED_PER_BLOCK if lean else 0)
    block = tokens * cfg.n_embd * per_block * activation_bytes
    if dropout > 0:  # probabilities (lean) or scores, probabilities and dropped ones; the mask
        block += micro_batch * cfg.n_head * block_size**2 * ((1 if lean else 3) * activation_bytes + 1)
    if grad_checkpointing:
        blocks = cfg.n_layer * tokens * cfg.n_embd * activation_bytes + block
    else:
        blocks = cfg.n_layer * block
    if loss_rows is None:
        logits = tokens * cfg.vocab_size * 4 * LOGIT_COPIES
    else:  # a chunk's logits: float32; or half-precision logits, float32 log-probabilities and
        # their half-precision gradient (fused_loss's low-precision path)
        per_logit = 4 if activation_bytes == 4 else 2 * activation_bytes + 4
        logits = per_logit * min(loss_rows, tokens) * cfg.vocab_size + 4 * (cfg.vocab_size + tokens) * cfg.n_embd
    gathered = 0
    if shards > 1:
        C = cfg.n_embd
        gathered = (cfg.vocab_size + cfg.n_positions + 2) * C + 2 * (12 * C * C + 13 * C)
    return MemoryEstimate(weights=4 * (n_params // shards + gathered),
                          gradients=4 * (n_trainable // shards + gathered),
                          optimizer=8 * n_trainable // shards, activations=blocks + logits)


def available_memory(device: torch.device) -> int | None:
    """Bytes free for this process on `device`, or None when it cannot be told.

    CUDA: the driver's free memory. CPU: /proc/meminfo's MemAvailable, lowered to the cgroup's
    limit minus its usage when the process runs in a container with a memory limit.
    """
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    free = _meminfo_available()
    limit = _cgroup_room()
    if free is None or limit is None:
        return free if limit is None else limit
    return min(free, limit)


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_room() -> int | None:
    """cgroup v2 memory.max - memory.current, or None without a limit."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((root / "memory.current").read_text()))
    except (OSError, ValueError):
        return None


def check_fits(est: MemoryEstimate, available: int | None, resident: int = 0,
               processes: int = 1) -> None:
    """Raise NotEnoughMemory when `processes` runs of `est` on one device need more than
    `available`; `resident` bytes of each (the loaded weights) are already in use."""
    if available is None:
        return
    needed = processes * (est.total - resident)
    if needed <= available:
        return
    who = f"{processes} processes x " if processes > 1 else ""
    raise NotEnoughMemory(
        f"training needs about {who}{est.describe()} but only {gb(available)} is available; "
        "try --lora, --grad-checkpointing, a smaller --batch-size (with a larger --grad-accum) "
        "or a smaller --block-size")


def process_peak_rss() -> int | None:
    """This process's peak resident memory in bytes (Linux VmHWM), for reports and benchmarks."""
    try:
        for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None
