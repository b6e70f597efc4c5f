"""The learning-rate schedule: linear warm-up, then cosine or linear decay to a floor."""

from __future__ import annotations

import math

MIN_LR_RATIO = 0.1  # the schedules decay to 10% of the peak, as nanoGPT and the GPT-3 paper


def get_lr(step: int, peak: float, warmup: int, total: int, schedule: str) -> float:
    """The learning rate of update `step` (0-based): linear warm-up to `peak` over `warmup`
    steps, then cosine or linear decay to MIN_LR_RATIO x peak at step `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return peak * (MIN_LR_RATIO + (1.0 - MIN_LR_RATIO) * decay)
