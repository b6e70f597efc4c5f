"""Tiny random GPT-2 checkpoints in every layout the loader reads, built with transformers (the oracle)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from gpt2kit.checkpoints.hf import CONV1D

IDS = [[5, 17, 99, 3, 64, 2, 120, 42], [1, 2, 3, 4, 5, 6, 7, 8]]  # (B, T) = (2, 8), inside a 128 vocab
CPU = torch.device("cpu")


def tiny_hf(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=128, seed=0):
    """A small random transformers GPT2LMHeadModel, in eval mode."""
    import transformers
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                                  n_positions=n_positions, vocab_size=vocab_size)
    return transformers.GPT2LMHeadModel(cfg).eval()


@torch.no_grad()
def hf_logits(hf_model, ids=IDS) -> torch.Tensor:
    return hf_model(torch.tensor(ids)).logits.float()


@torch.no_grad()
def our_logits(model, ids=IDS) -> torch.Tensor:
    return model(torch.tensor(ids, device=next(model.parameters()).device)).float().cpu()


def hf_state(hf_model) -> dict[str, torch.Tensor]:
    """The Hugging Face state dict with the head dropped (tied) and tensors unshared."""
    return {k: v.clone().contiguous() for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}


def save_bin(hf_model, folder: Path, name: str = "pytorch_model.bin") -> Path:
    """config.json + a pickle state dict, as transformers < 5 saved with safe_serialization=False."""
    folder.mkdir(parents=True, exist_ok=True)
    hf_model.config.save_pretrained(folder)
    torch.save(hf_model.state_dict(), folder / name)
    return folder


def save_sharded_bin(hf_model, folder: Path, shards: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    hf_model.config.save_pretrained(folder)
    state = hf_state(hf_model)
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k] for k in keys[i::shards]}
        torch.save(part, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    write_index(folder / "pytorch_model.bin.index.json", weight_map)
    return folder


def save_original_layout(hf_model, folder: Path) -> Path:
    """Like the original openai-community/gpt2 file: no `transformer.` prefix, no lm_head,
    and the attention-mask buffers saved alongside the weights."""
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    hf_model.config.save_pretrained(folder)
    state = {k.removeprefix("transformer."): v for k, v in hf_state(hf_model).items()}
    n_pos = hf_model.config.n_positions
    for i in range(hf_model.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n_pos, n_pos)).view(1, 1, n_pos, n_pos)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def write_index(path: Path, weight_map: dict[str, str]) -> None:
    path.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


class Payload:
    """Pickles to a call of os.system: what a malicious pytorch_model.bin carries."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def save_nanogpt(hf_model, path: Path, *, bias: bool = True, vocab_size: int = 50304, **extra) -> Path:
    """A ckpt.pt laid out exactly as nanoGPT's train.py saves it (compile=True, padded vocabulary)."""
    cfg = hf_model.config
    state = {}
    for key, value in hf_model.state_dict().items():
        if key == "lm_head.weight" or (not bias and key.endswith(".bias")):
            continue
        value = value.t() if key.endswith(CONV1D) else value  # nanoGPT's nn.Linear is (out, in)
        if key == "transformer.wte.weight":
            value = torch.cat([value, torch.randn(vocab_size - cfg.vocab_size, cfg.n_embd)])
        state["_orig_mod." + key] = value.clone().contiguous()
    state["_orig_mod.lm_head.weight"] = state["_orig_mod.transformer.wte.weight"]  # tied: one tensor
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], betas=(0.9, 0.95))
    opt.param_groups[0]["params"][0].grad = torch.ones(3)
    opt.step()
    model_args = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.n_positions,
                      bias=bias, vocab_size=vocab_size, dropout=0.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state, "optimizer": opt.state_dict(), "model_args": model_args, "iter_num": 5000,
                "best_val_loss": torch.tensor(3.25), "config": {"dataset": "openwebtext", "compile": True},
                **extra}, path)
    return path
