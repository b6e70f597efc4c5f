"""nanoGPT checkpoints: the `ckpt.pt` nanoGPT's train.py writes into its out_dir.

    {"model": state dict (every key prefixed "_orig_mod." when trained with compile=True),
     "model_args": {"n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout"},
     "optimizer": ..., "iter_num": int, "best_val_loss": ..., "config": {...}}

Read through torch.load(weights_only=True) only. nanoGPT names its parameters as GPT-2 does and its
nn.Linear weights are already (out, in), so the name map is the prefix plus the tied head. What
differs is handled here:
- `bias=False` models have no biases: they load as zeros, which computes the same function;
- `vocab_size` 50304 (GPT-2's 50257 padded to a multiple of 64 for speed): the padding rows are
  no token of the tokenizer and never a training target, so they are dropped;
- nanoGPT's MLP uses the exact (erf) GELU where GPT-2, transformers and gpt2kit use its tanh
  approximation: logits differ by about 1e-3, as when transformers loads nanoGPT weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from ..config import ModelConfig
from ..errors import CheckpointError
from . import LoadedModel
from .hf import AS_IS, TIED, Layout, Named, WeightSizes, build_model, expected_shapes, make_config, our_key
from .weights import WEIGHT_NAMES, load_pickle

MODEL_ARGS = {"vocab_size": "vocab_size", "block_size": "n_positions", "n_embd": "n_embd",
              "n_layer": "n_layer", "n_head": "n_head"}  # nanoGPT's GPTConfig -> ModelConfig
PREFIX = "_orig_mod."  # torch.compile's wrapper, which nanoGPT saves as part of every key
GPT2_VOCAB = 50257
WTE = "transformer.wte.weight"
RESAVE = ("if it is a nanoGPT checkpoint you trust, keep only its weights: ckpt = torch.load(path, "
          "weights_only=False); torch.save({'model': ckpt['model'], 'model_args': ckpt['model_args']}, path)")


def find(path: Path) -> tuple[Path, dict] | None:
    """(the ckpt.pt, its contents) when `path` is a nanoGPT checkpoint or an out_dir holding one."""
    if path.is_dir():
        if any((path / name).is_file() for name in WEIGHT_NAMES):
            return None
        path = path / "ckpt.pt"
    if path.suffix not in (".pt", ".pth") or not path.is_file():
        return None
    ckpt = load_pickle(path, fix=RESAVE)
    return (path, ckpt) if isinstance(ckpt, dict) and "model_args" in ckpt else None


def load(path: Path, ckpt: dict, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """The model in `ckpt`, the contents `find` read from `path`."""
    args = ckpt["model_args"]
    state = ckpt.get("model")
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{path} has no 'model' state dict of named tensors; {RESAVE}")
    shapes = {name: tuple(t.shape) for name, t in state.items()}
    cfg = read_model_args(args, path, WeightSizes.of(shapes, lambda name: our_key(name.removeprefix(PREFIX)), path))
    tensors = named_tensors(state, cfg, padded=args["vocab_size"], zero_biases=args["bias"] is False)
    model, stored = build_model(cfg, tensors, path, device, dtype)
    step = ckpt.get("iter_num")
    return LoadedModel(model=model, config=cfg, folder=path.parent, source=f"file: {path}",
                       weights_file=str(path), weights_dtype=stored,
                       format=f"nanogpt (iter {step})" if isinstance(step, int) else "nanogpt")


def read_model_args(args: object, path: Path, sizes: WeightSizes) -> ModelConfig:
    """model_args, checked against the sizes the state dict's shapes show (the padded vocabulary
    included), then as GPT-2's vocabulary."""
    if not isinstance(args, dict):
        raise CheckpointError(f"{path}: model_args is not a dictionary")
    if missing := [key for key in (*MODEL_ARGS, "bias") if key not in args]:
        raise CheckpointError(f"{path}: model_args has no {', '.join(missing)}")
    vocab = args["vocab_size"]
    if not isinstance(vocab, int) or vocab < GPT2_VOCAB:
        raise CheckpointError(f"{path} has vocab_size {vocab!r}: a nanoGPT model with its own vocabulary "
                              "(such as shakespeare_char's meta.pkl); gpt2kit reads models over GPT-2's "
                              f"{GPT2_VOCAB} BPE tokens")
    fields = {ours: args[theirs] for theirs, ours in MODEL_ARGS.items()}
    sizes.check(fields, f"{path}: model_args sets", names={ours: theirs for theirs, ours in MODEL_ARGS.items()})
    return make_config(fields | {"vocab_size": GPT2_VOCAB, "dropout": args.get("dropout") or 0.0},
                       f"{path}: model_args")


def named_tensors(state: dict[str, torch.Tensor], cfg: ModelConfig, padded: int,
                  zero_biases: bool) -> Iterator[Named]:
    """The state dict as (name, our key, tensor, layout) for build_model; the embedding and head
    lose their padding rows; a bias=False model's missing biases come as zeros."""
    vocab = Layout(lambda shape: (padded, *shape[1:]), lambda t: t[:cfg.vocab_size])
    present = set()
    for name, tensor in state.items():
        key = our_key(name.removeprefix(PREFIX))
        present.add(key)
        yield name, key, tensor, vocab if key in (WTE, TIED) else AS_IS
    if zero_biases:
        for key, shape in expected_shapes(cfg).items():
            if key.endswith(".bias") and key not in present:
                yield key, key, torch.zeros(shape), AS_IS
