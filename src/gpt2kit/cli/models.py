"""gpt2kit info and gpt2kit convert: what a checkpoint is, and writing it in another format."""

from __future__ import annotations

import argparse
import json
import sys


def configure_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="hub id, Hugging Face-layout folder or weights file")
    p.add_argument("--device", default="cpu", help="where to load it (default: cpu)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def run_info(args: argparse.Namespace) -> int:
    from ..api import load
    info = load(args.model, device=args.device, dtype=args.dtype).info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for key, value in info.items():
            if key == "parameters":
                value = f"{value:,} ({value / 1e6:.1f}M; the tied embedding and LM head counted once)"
            elif value is None:
                value = "none"
            print(f"{key.replace('_', ' '):<{width}}  {value}")
    return 0


CONVERT_EXAMPLES = """examples:
  gpt2kit convert checkpoint/run1 --to hf out/run1         # a gpt-2-simple run, for transformers, vLLM, TGI
  gpt2kit convert models/124M --to hf out/gpt2             # OpenAI's original release folder
  gpt2kit convert out/ckpt.pt --to hf out/nano             # a nanoGPT checkpoint
  gpt2kit convert runs/jokes --to gguf jokes.gguf --type q8_0   # for llama.cpp / ollama
"""


def configure_convert(p: argparse.ArgumentParser) -> None:
    from ..convert import TARGETS
    p.add_argument("source", help="the model: hub id, Hugging Face folder or weights file, OpenAI or "
                   "gpt-2-simple TensorFlow checkpoint folder, nanoGPT ckpt.pt, gpt2kit run folder")
    p.add_argument("out", help="where to write it: a folder (--to hf) or a .gguf file (--to gguf)")
    p.add_argument("--to", required=True, choices=TARGETS, help="hf: safetensors folder for transformers, "
                   "vLLM, TGI; gguf: one file for llama.cpp and ollama")
    p.add_argument("--type", default="f32", choices=list(dict.fromkeys(t for ts in TARGETS.values() for t in ts)),
                   help="weights type: f32 (default, lossless), f16, or q8_0 (gguf only)")
    p.add_argument("--force", action="store_true", help="replace an existing output")


def run_convert(args: argparse.Namespace) -> int:
    from ..convert import convert
    out = convert(args.source, to=args.to, out=args.out, type=args.type, force=args.force)
    use = (f"transformers.AutoModelForCausalLM.from_pretrained('{out}')" if args.to == "hf"
           else f"llama-cli -m {out}")
    print(f"wrote {out} (use it: {use})", file=sys.stderr)
    return 0
