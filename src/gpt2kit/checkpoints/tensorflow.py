"""OpenAI's released GPT-2 folders and gpt-2-simple runs: TensorFlow checkpoints, no TensorFlow needed.

    models/124M/ or checkpoint/run1/
      hparams.json                n_vocab, n_ctx, n_embd, n_head, n_layer
      checkpoint                  text: model_checkpoint_path: "model-1000" (the latest save)
      model-1000.index, model-1000.data-00000-of-00001   the tensors (tf_bundle.py reads them)
      encoder.json, vocab.bpe     GPT-2's BPE under OpenAI's names (vocab.json, merges.txt)

OpenAI's variable names (gpt-2 `src/model.py`) map onto ours with the tables below; its Conv1D
weights `w` are [1, in, out] and become our nn.Linear's (out, in).
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path, PureWindowsPath
from typing import Iterator

import torch

from ..config import ModelConfig
from ..errors import CheckpointError
from ..tokenizer import Tokenizer
from . import LoadedModel
from .hf import AS_IS, Layout, Named, WeightSizes, build_model, make_config
from .tf_bundle import read_bundle, read_index
from .weights import printable, read_json

HPARAMS = {"n_vocab": "vocab_size", "n_ctx": "n_positions", "n_embd": "n_embd",
           "n_head": "n_head", "n_layer": "n_layer"}  # hparams.json -> ModelConfig
TOP = {"model/wte": "transformer.wte.weight", "model/wpe": "transformer.wpe.weight",
       "model/ln_f/g": "transformer.ln_f.weight", "model/ln_f/b": "transformer.ln_f.bias"}
BLOCK = {  # model/h{i}/<name> -> transformer.h.{i}.<ours>
    "ln_1/g": "ln_1.weight", "ln_1/b": "ln_1.bias",
    "attn/c_attn/w": "attn.c_attn.weight", "attn/c_attn/b": "attn.c_attn.bias",
    "attn/c_proj/w": "attn.c_proj.weight", "attn/c_proj/b": "attn.c_proj.bias",
    "ln_2/g": "ln_2.weight", "ln_2/b": "ln_2.bias",
    "mlp/c_fc/w": "mlp.c_fc.weight", "mlp/c_fc/b": "mlp.c_fc.bias",
    "mlp/c_proj/w": "mlp.c_proj.weight", "mlp/c_proj/b": "mlp.c_proj.bias",
}
BLOCK_NAME = re.compile(r"model/h(\d+)/(.+)")
CONV1D = Layout(lambda shape: (1, *shape[::-1]), lambda t: t[0].t())  # [1, in, out] -> (out, in)
LATEST = re.compile(r'^\s*model_checkpoint_path:\s*"(.*)"\s*$', re.MULTILINE)


def is_checkpoint(path: Path) -> bool:
    """A folder with hparams.json and a TensorFlow checkpoint, or one checkpoint's .index file."""
    folder = path.parent if path.suffix == ".index" else path
    return folder.is_dir() and (folder / "hparams.json").is_file() and (
        path.is_file() or (folder / "checkpoint").is_file() or any(folder.glob("*.index")))


def load(path: Path, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """The model of a TensorFlow checkpoint folder (or .index file), with its own tokenizer if any."""
    prefix = find_prefix(path)
    folder = prefix.parent
    index = prefix.with_name(prefix.name + ".index")
    shapes = {name: entry.shape for name, entry in read_index(index)[1].items()}
    cfg = read_hparams(folder / "hparams.json", WeightSizes.of(shapes, our_key, index))
    model, stored = build_model(cfg, named_tensors(prefix), folder, device, dtype)
    return LoadedModel(model=model, config=cfg, folder=folder, source=f"folder: {folder} ({index.name})",
                       weights_file=str(index), weights_dtype=stored,
                       format=f"tensorflow (checkpoint {prefix.name})", tokenizer=read_tokenizer(folder))


def find_prefix(path: Path) -> Path:
    """The checkpoint to read: an .index file given directly, else the one the folder's `checkpoint`
    file names (gpt-2-simple's latest save), else the folder's only one."""
    if path.suffix == ".index":
        return path.with_name(path.name.removesuffix(".index"))
    pointer = path / "checkpoint"
    if pointer.is_file():
        found = LATEST.search(pointer.read_text(encoding="utf-8", errors="replace"))
        if not found:
            raise CheckpointError(f"{pointer} is truncated or corrupt (no model_checkpoint_path line)")
        # TensorFlow often writes an absolute path from the machine that trained (/content/...):
        # the checkpoint is looked for beside this file, under the same name.
        name = PureWindowsPath(found[1]).name
        if not (path / f"{name}.index").is_file():
            shown = printable(name)
            raise CheckpointError(f"{pointer} names the checkpoint {shown}, but {shown}.index is not in "
                                  f"{path}; copy it there or pass one of the .index files as the model")
        return path / name
    indexes = sorted(p.name.removesuffix(".index") for p in path.glob("*.index"))
    if len(indexes) != 1:
        raise CheckpointError(f"{path} holds {len(indexes)} TensorFlow checkpoints "
                              f"({', '.join(indexes) or 'none'}) and no checkpoint file naming the "
                              "latest; pass the .index file of the one to load")
    return path / indexes[0]


def read_hparams(path: Path, sizes: WeightSizes) -> ModelConfig:
    """hparams.json, checked against the sizes the checkpoint's index shows."""
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} is truncated or corrupt (expected a JSON object)")
    if missing := [key for key in HPARAMS if key not in raw]:
        raise CheckpointError(f"{path} has no {', '.join(missing)}; a GPT-2 hparams.json names "
                              f"{', '.join(HPARAMS)}")
    fields = {ours: raw[theirs] for theirs, ours in HPARAMS.items()}
    sizes.check(fields, f"{path} sets", names={ours: theirs for theirs, ours in HPARAMS.items()})
    return make_config(fields, str(path))  # GPT-2's TensorFlow code: no dropout at inference, epsilon 1e-5


def our_key(name: str) -> str | None:
    """Our parameter name for a TensorFlow variable; None for variables that are not the model's
    (global_step, optimizer slots such as model/wte/Adam); unknown model names pass through, to
    be reported as unexpected."""
    if name in TOP:
        return TOP[name]
    if (block := BLOCK_NAME.fullmatch(name)) and block[2] in BLOCK:
        return f"transformer.h.{block[1]}.{BLOCK[block[2]]}"
    parent = name.rpartition("/")[0]
    if not name.startswith("model/") or (parent and our_key(parent)):
        return None
    return name


def named_tensors(prefix: Path) -> Iterator[Named]:
    """The checkpoint's tensors as (name, our key, tensor, layout) for build_model."""
    for name, tensor in read_bundle(prefix):
        yield name, our_key(name), tensor, CONV1D if name.endswith("/w") else AS_IS


def read_tokenizer(folder: Path) -> Tokenizer | None:
    """The folder's own BPE from encoder.json + vocab.bpe; None when it has none, or when they are
    GPT-2's vocabulary, which the built-in tokenizer already is (the usual case)."""
    encoder, bpe = folder / "encoder.json", folder / "vocab.bpe"
    if not encoder.is_file() and not bpe.is_file():
        return None
    if not (encoder.is_file() and bpe.is_file()):
        present, absent = (encoder, bpe) if encoder.is_file() else (bpe, encoder)
        raise CheckpointError(f"{folder} has {present.name} but no {absent.name}; GPT-2's tokenizer needs both")
    assets = resources.files("gpt2kit") / "assets"
    if (read_json(encoder) == json.loads((assets / "vocab.json").read_text(encoding="utf-8"))
            and _merges(bpe.read_text(encoding="utf-8")) == _merges((assets / "merges.txt").read_text(encoding="utf-8"))):
        return None
    # Tokenizer has no public constructor from two files of other names; this is its own builder.
    return Tokenizer._from_vocab_merges(encoder, bpe, {}, {}, str(folder))


def _merges(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#version")]
