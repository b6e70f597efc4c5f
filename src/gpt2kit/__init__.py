"""gpt2kit: generate with, fine-tune and serve GPT-2.

    import gpt2kit
    model = gpt2kit.load("gpt2")
    print(model.generate("Once upon a time", max_new_tokens=40, seed=42)[0])

Heavy modules (torch) are imported on first use, so `gpt2kit --help` starts at once.
"""

from __future__ import annotations

import importlib

from .config import DataConfig, GenerationConfig, LoraConfig, ModelConfig

# Imported now, not lazily: the function shares its submodule's name, and the first import of
# gpt2kit.convert would otherwise bind the module over it. convert.py imports no torch.
from .convert import convert
from .errors import (
    CheckpointError,
    DeviceError,
    Gpt2kitError,
    HubError,
    OptionError,
    PromptTooLong,
    TokenizerError,
)

__version__ = "0.1.0"

_LAZY = {
    "load": "api", "Model": "api",
    "Tokenizer": "tokenizer",
    "Completion": "inference.generate", "TokenLogprob": "inference.generate",
    "GPT": "model",
    "finetune": "training.loop", "RunResult": "training.loop", "TrainingInterrupted": "training.loop",
    "TrainConfig": "training.config",
}

__all__ = ["convert", "DataConfig", "GenerationConfig", "LoraConfig", "ModelConfig", "CheckpointError", "DeviceError", "Gpt2kitError",
           "HubError", "OptionError", "PromptTooLong", "TokenizerError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'gpt2kit' has no attribute {name!r}")
