"""GGUF export for llama.cpp and ollama, written with the `gguf` package (llama.cpp's own writer).

Tensor names and metadata are those llama.cpp's GPT-2 loader reads (its src/models/gpt2.cpp and
gguf-py's constants; convert_hf_to_gguf.py's GPT2Model writes the same). Our nn.Linear weights
are (out, in), which is already GGUF's layout (ggml lists dimensions in reverse numpy order):
nothing is transposed. As llama.cpp's converter does, norms, biases and the position embedding
stay float32 whatever the type; q8_0 falls back to f16 for a matrix whose rows are not a whole
number of 32-value blocks.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..atomic import write_atomically
from ..errors import CheckpointError, Gpt2kitError
from ..model import GPT
from ..tokenizer import Tokenizer

TYPES = ("f32", "f16", "q8_0")
TOP = {"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
       "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias",
       "lm_head.weight": "output.weight"}  # tied, but written: older llama.cpp builds require it
BLOCK = {  # transformer.h.{i}.<ours> -> blk.{i}.<theirs>
    "ln_1.weight": "attn_norm.weight", "ln_1.bias": "attn_norm.bias",
    "attn.c_attn.weight": "attn_qkv.weight", "attn.c_attn.bias": "attn_qkv.bias",
    "attn.c_proj.weight": "attn_output.weight", "attn.c_proj.bias": "attn_output.bias",
    "ln_2.weight": "ffn_norm.weight", "ln_2.bias": "ffn_norm.bias",
    "mlp.c_fc.weight": "ffn_up.weight", "mlp.c_fc.bias": "ffn_up.bias",
    "mlp.c_proj.weight": "ffn_down.weight", "mlp.c_proj.bias": "ffn_down.bias",
}
ALWAYS_F32 = ("position_embd.weight",)  # besides every 1-D tensor


def gguf_name(key: str) -> str:
    """The GGUF tensor name of one of our parameters."""
    if key in TOP:
        return TOP[key]
    _, _, i, rest = key.split(".", 3)  # transformer.h.{i}.rest
    return f"blk.{i}.{BLOCK[rest]}"


def save_gguf(model: GPT, tokenizer: Tokenizer, path: Path, type: str = "f32", name: str = "gpt2") -> Path:
    """Write `model` and `tokenizer` to one .gguf file (atomically: the file appears complete or not at all)."""
    try:
        import gguf
    except ImportError:
        raise Gpt2kitError('GGUF export needs the gguf package: pip install -e ".[gguf]" in the '
                           "gpt2kit folder (or pip install gguf)") from None
    if type not in TYPES:
        raise CheckpointError(f"unknown GGUF type {type!r}; choose one of {', '.join(TYPES)}")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise CheckpointError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                              f"{model.config.vocab_size}")

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, "gpt2")
        add_metadata(writer, model, name, type)
        add_vocabulary(writer, tokenizer, model.config.vocab_size)
        for key, tensor in model.state_dict().items():
            add_tensor(writer, gguf_name(key), tensor, type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    path = Path(path)
    try:
        write_atomically(path, write)
    except OSError as e:
        raise CheckpointError(f"could not write {path}: {e.strerror or e}") from None
    return path


def add_metadata(writer, model: GPT, name: str, type: str) -> None:
    import gguf
    cfg = model.config  # general.architecture is written by GGUFWriter itself
    writer.add_type("model")
    writer.add_name(name)
    writer.add_context_length(cfg.n_positions)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_feed_forward_length(4 * cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_head_count(cfg.n_head)
    writer.add_layer_norm_eps(cfg.layer_norm_epsilon)
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(file_types[type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def add_vocabulary(writer, tokenizer: Tokenizer, n_vocab: int) -> None:
    """GPT-2's BPE as llama.cpp reads it: tokens in id order (byte-level spelling, `Ġthe`), their
    types, the merges, and <|endoftext|> as bos and eos. A model row past the tokenizer (a padded
    vocabulary) gets an unused placeholder token, as llama.cpp's converter writes."""
    import gguf
    vocab, merges, special = tokenizer_files(tokenizer)
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [gguf.TokenType.UNUSED] * n_vocab
    for token, i in vocab.items():
        tokens[i] = token
        types[i] = gguf.TokenType.CONTROL if token in special else gguf.TokenType.NORMAL
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # GPT-2's pre-tokenizer regex
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.eos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_add_bos_token(False)  # GPT-2 starts from the prompt itself, as gpt2kit does


def tokenizer_files(tokenizer: Tokenizer) -> tuple[dict[str, int], list[str], set[str]]:
    """(token -> id with added tokens, merges "a b", special tokens), read back from what
    Tokenizer.save writes for transformers: the tokenizer's public description of itself."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(tmp)
        folder = Path(tmp)
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
        added = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["added_tokens"]
    vocab.update({t["content"]: t["id"] for t in added})
    merges = [line for line in lines if line and not line.startswith("#version")]
    return vocab, merges, {t["content"] for t in added if t.get("special")}


def add_tensor(writer, name: str, tensor: torch.Tensor, type: str) -> None:
    import gguf
    from gguf.quants import quantize
    data = tensor.detach().float().cpu().contiguous().numpy()
    if type == "f32" or data.ndim == 1 or name in ALWAYS_F32:
        writer.add_tensor(name, data)
    elif type == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        qtype = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(name, quantize(data, qtype), raw_dtype=qtype)  # bytes; the writer derives the shape
    else:
        writer.add_tensor(name, data.astype(np.float16))
