"""Load a GPT-2 from a hub id, a Hugging Face-layout folder, a single weights file, a TensorFlow
checkpoint (OpenAI's release, gpt-2-simple) or a nanoGPT ckpt.pt.

    resolve.py     path or hub id?          hub.py         the only network code
    hf.py          config.json, key names   weights.py     reading files safely (safetensors, pickles, shards)
    tensorflow.py  OpenAI / gpt-2-simple    tf_bundle.py   TensorFlow's checkpoint format, by hand
    nanogpt.py     nanoGPT's ckpt.pt        gguf.py        export for llama.cpp
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import CheckpointError
from ..model import GPT
from ..tokenizer import Tokenizer
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
    format: str  # what was found, for people: "huggingface (safetensors)", "nanogpt (iter 5000)", ...
    tokenizer: Tokenizer | None = None  # one the format keeps outside Hugging Face's files (TensorFlow's)

    def load_tokenizer(self) -> Tokenizer:
        """The checkpoint's own tokenizer, else GPT-2's built-in one."""
        if self.tokenizer is not None:
            return self.tokenizer
        return (Tokenizer.from_folder(self.folder) if self.folder else None) or Tokenizer.default()


def is_adapter_folder(path: Path) -> bool:
    """A LoRA run or PEFT adapter folder: adapter files and no full weights of its own."""
    from .weights import WEIGHT_NAMES
    return path.is_dir() and (path / "adapter_config.json").is_file() and \
        not any((path / name).is_file() for name in WEIGHT_NAMES)


def load_adapter_folder(folder: Path, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """The base model named in adapter_config.json with the adapter merged into its weights."""
    from ..lora import load_adapter, merge_lora
    from .weights import read_json
    base = read_json(folder / "adapter_config.json").get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise CheckpointError(f"{folder / 'adapter_config.json'} does not name its base model "
                              "(base_model_name_or_path); cannot load the adapter")
    loaded = load_model(base, device, dtype)
    merge_lora(load_adapter(loaded.model, folder))
    return LoadedModel(model=loaded.model.eval(), config=loaded.config, folder=folder,
                       source=f"LoRA adapter: {folder} merged into {loaded.source}",
                       weights_file=str(folder / "adapter_model.safetensors"),
                       weights_dtype=loaded.weights_dtype, format=f"LoRA adapter on {loaded.format}")


def load_model(spec: str, device: torch.device, dtype: torch.dtype, *,
               revision: str | None = None) -> LoadedModel:
    """Load `spec`: an existing folder or weights file, else a Hugging Face hub id (`gpt2`,
    `openai-community/gpt2-large`) at `revision`, downloaded into the hub cache."""
    target = resolve_spec(str(spec))
    if isinstance(target, Path):
        if revision is not None:
            raise CheckpointError(f"a revision ({revision}) applies only to hub model ids, not to "
                                  f"the local path {target}")
        if is_adapter_folder(target):
            return load_adapter_folder(target, device, dtype)
        from . import nanogpt, tensorflow
        if tensorflow.is_checkpoint(target):
            return tensorflow.load(target, device, dtype)
        if found := nanogpt.find(target):
            return nanogpt.load(*found, device, dtype)
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
                       weights_file=str(weights), weights_dtype=stored, format=hf_format(folder, weights))


def hf_format(folder: Path, weights: Path) -> str:
    """"huggingface (safetensors)", "gpt2kit run (sharded pytorch pickle)", ..."""
    kind = "safetensors" if ".safetensors" in weights.name else "pytorch pickle"
    sharded = "sharded " if weights.name.endswith(".index.json") else ""
    owner = "gpt2kit run" if (folder / "run.json").is_file() else "huggingface"
    return f"{owner} ({sharded}{kind})"
