"""`gpt2kit.convert`: any model gpt2kit reads, written as a Hugging Face folder or a GGUF file.

    gpt2kit.convert("checkpoint/run1", to="hf", out="out/run1")              # transformers, vLLM, TGI
    gpt2kit.convert("runs/jokes", to="gguf", out="jokes.gguf", type="q8_0")  # llama.cpp, ollama

torch is imported inside `convert`, so the CLI reads TARGETS for --help without it.
"""

from __future__ import annotations

from pathlib import Path

from .errors import Gpt2kitError, OptionError

TARGETS = {"hf": ("f32", "f16"), "gguf": ("f32", "f16", "q8_0")}  # --to -> the --type values it takes


class OutputError(Gpt2kitError):
    """The conversion's output cannot be written as asked (it exists, or is the wrong kind)."""


def convert(source: str | Path, to: str, out: str | Path, *, type: str = "f32", force: bool = False) -> Path:
    """Read `source` (hub id, Hugging Face folder or file, OpenAI / gpt-2-simple TensorFlow
    checkpoint, nanoGPT ckpt.pt, gpt2kit run) and write it to `out` as `to`: "hf" (a safetensors
    folder) or "gguf" (one file). `type`: f32 | f16, or q8_0 for gguf. An existing `out` is
    replaced only with `force`."""
    if to not in TARGETS:
        raise OptionError("to", f"must be one of {', '.join(TARGETS)}, got {to!r}")
    if type not in TARGETS[to]:
        raise OptionError("type", f"must be one of {', '.join(TARGETS[to])} for --to {to}, got {type!r}")
    out = Path(out).expanduser().absolute()
    if out.exists() and not force:
        raise OutputError(f"{out} already exists; choose another output or pass --force to replace it")
    if to == "gguf" and out.is_dir():
        raise OutputError(f"{out} is a folder; --to gguf writes one file (such as {out.name}.gguf)")
    import torch

    from .checkpoints import load_model, save_hf
    dtype = torch.float16 if (to, type) == ("hf", "f16") else torch.float32
    loaded = load_model(str(source), torch.device("cpu"), dtype)
    tokenizer = loaded.load_tokenizer()
    if to == "hf":
        return save_hf(loaded.model, out, tokenizer=tokenizer)
    from .checkpoints.gguf import save_gguf
    name = Path(str(source).rstrip("/\\")).stem or "gpt2"  # checkpoint/run1 -> run1, out/ckpt.pt -> ckpt
    return save_gguf(loaded.model, tokenizer, out, type=type, name=name)
