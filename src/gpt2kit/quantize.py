"""int8 inference: `gpt2kit.load(..., quantize="int8")`, `--quantize int8`.

Every matrix (the blocks' linears and the tied embedding / LM head) is stored as int8 with one
float scale per output row (symmetric, absmax / 127); LayerNorm, attention and the KV cache stay
in the model's float dtype. A quarter of the float32 weight bytes: decoding one sequence streams
every weight once per token, so it runs up to 4x faster where memory bandwidth is the limit (CPU
batch-1 decode). On CPUs with VNNI or AMX the matrices' inputs are quantized too, a scale per
token, and multiplied int8 by int8 (issue 15); elsewhere the activations stay float
(weight-only). The modules and their kernels are in kernels/int8.py; this module swaps them in
(`quantize_int8`) and measures what that costs in accuracy (`compare`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from .config import QUANTIZE
from .errors import OptionError
from .kernels.int8 import (
    INT8_ACTIVATION_DTYPES,
    Int8Embedding,
    Int8Linear,
    Int8MLP,
    Int8Products,
    int8_products_available,
    quantize_rows,
    tiles_available,
)
from .model import GPT

if TYPE_CHECKING:
    from .api import Model


def check_quantize(quantize: str | None) -> None:
    if quantize is not None and quantize not in QUANTIZE:
        raise OptionError("quantize", f"must be one of {', '.join(QUANTIZE)} (or unset for no "
                          f"quantization), got {quantize!r}")


def quantize_int8(model: GPT) -> GPT:
    """Replace the model's matrices with int8 ones, in place; returns the model (inference only)."""
    weight = model.transformer.wte.weight
    dtype = weight.dtype
    # one way to multiply for all of the model's matrices (kernels/int8.py)
    products = Int8Products(int8_activations=dtype in INT8_ACTIVATION_DTYPES
                            and int8_products_available(weight.device.type),
                            tiles=dtype == torch.float32 and weight.device.type == "cpu" and tiles_available())
    for block in model.transformer.h:
        for parent, name in ((block.attn, "c_attn"), (block.attn, "c_proj"),
                             (block.mlp, "c_fc"), (block.mlp, "c_proj")):
            linear = getattr(parent, name)
            weight, scale = quantize_rows(linear.weight.detach())
            gelu = name == "c_fc"  # the MLP's tanh-GELU moves into c_fc's kernel
            setattr(parent, name, Int8Linear(weight, scale.to(dtype), linear.bias.detach(), products, gelu=gelu))
        block.mlp.act = torch.nn.Identity()
        if products.int8_activations:
            block.mlp = Int8MLP(block.mlp)  # a decode step's MLP in one native call
    weight, scale = quantize_rows(model.transformer.wte.weight.detach())
    embedding = Int8Embedding(weight, scale.to(dtype))
    model.transformer.wte = embedding
    model.lm_head = Int8Linear(embedding.weight, embedding.scale, None, products)  # still tied: same int8 storage
    return model


@dataclass
class Agreement:
    """How far a quantized model's outputs are from its float reference's (see `compare`)."""

    token_agreement: float  # greedy tokens equal to the reference's, position by position
    identical_continuations: float  # fraction of prompts whose greedy continuations are equal
    logit_max_error: float  # largest |logit difference|, over the reference's continuations
    logit_mean_error: float
    logit_std: float  # the reference logits' standard deviation, for scale
    products: str  # how the quantized model multiplied (int8 x int8, or weight-only)


def compare(reference: Model, quantized: Model, prompts: Sequence[str], max_new_tokens: int = 32) -> Agreement:
    """Greedy continuations of `prompts` from both models, compared token by token, and both
    models' logits along the reference's continuations (prompt + continuation, teacher-forced)."""
    cfg = {"max_new_tokens": max_new_tokens, "temperature": 0, "stop_at_eos": False}
    ref = reference.complete(list(prompts), **cfg)
    got = quantized.complete(list(prompts), **cfg)
    same = sum(a == b for r, g in zip(ref, got) for a, b in zip(r.token_ids, g.token_ids))
    errors, logits = [], []
    for prompt, r in zip(prompts, ref):
        ids = (reference.tokenizer.encode(prompt) or [reference.tokenizer.eos_id]) + r.token_ids
        a, b = reference.logits(ids), quantized.logits(ids)
        errors.append((a - b).abs().flatten())
        logits.append(a.flatten())
    errors, logits = torch.cat(errors), torch.cat(logits)
    return Agreement(token_agreement=same / sum(len(r.token_ids) for r in ref),
                     identical_continuations=sum(r.token_ids == g.token_ids for r, g in zip(ref, got)) / len(ref),
                     logit_max_error=errors.max().item(), logit_mean_error=errors.mean().item(),
                     logit_std=logits.std().item(), products=repr(quantized.module.lm_head.products))
