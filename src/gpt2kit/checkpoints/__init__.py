"""Load a GPT-2 from a hub id, a Hugging Face-layout folder or a single weights file.

    resolve.py  path or hub id?          hub.py      the only network code
    hf.py       config.json, key names   weights.py  reading files safely (safetensors, pickles, shards)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import CheckpointError
from ..model import GPT
from .hf import load_checkpoint, save_hf
from .resolve import resolve_spec

__all__ = ["LoadedModel", "load_model", "save_hf"]


@dataclass
class LoadedModel:
    model: GPT  # in eval mode, on the requested device and dtype
    config: ModelConfig
    folder: Path | None  # where tokenizer files may be found
    source: str  # where the weights came from, for people: "hub: gpt2 (revision ..., cached at ...)"
    weights_file: str  # the file read (a shard index for sharded checkpoints)
    weights_dtype: str  # the dtype stored in the file ("float32", "bfloat16+float32" when mixed)


def load_model(spec: str, device: torch.device, dtype: torch.dtype, *,
               revision: str | None = None) -> LoadedModel:
    """Load `spec`: an existing folder or weights file, else a Hugging Face hub id (`gpt2`,
    `openai-community/gpt2-large`) at `revision`, downloaded into the hub cache."""
    target = resolve_spec(str(spec))
    if isinstance(target, Path):
        if revision is not None:
            raise CheckpointError(f"a revision ({revision}) applies only to hub model ids, not to "
                                  f"the local path {target}")
        model, weights, stored = load_checkpoint(target, device, dtype)
        folder = target if target.is_dir() else target.parent
        source = (f"folder: {target} ({weights.relative_to(target)})" if target.is_dir()
                  else f"file: {target}")
    else:
        from . import hub
        folder = hub.download(target, revision)
        model, weights, stored = load_checkpoint(folder, device, dtype)
        source = f"hub: {target} (revision {folder.name}, cached at {folder})"
    return LoadedModel(model=model, config=model.config, folder=folder, source=source,
                       weights_file=str(weights), weights_dtype=stored)
