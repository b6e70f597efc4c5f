"""Decode and prefill speed: gpt2kit vs its peers on the same random GPT-2 weights, in one run.

    python benchmarks/bench_generate.py                  # 124M shape, batch 1 and 8, every engine installed
    python benchmarks/bench_generate.py --engines transformers,gpt2kit --repeats 5
    python benchmarks/bench_generate.py --device cuda --dtype bfloat16

Engines (each skipped with a note when its package is missing; `pip install -e ".[bench]"`):
  transformers          GPT2LMHeadModel.generate, its default (SDPA) attention
  gpt2kit, gpt2kit-int8 gpt2kit.load(folder) and load(folder, quantize="int8")
  gpt2kit-compile, gpt2kit-int8-compile
                        the same with compile=True (one torch.compile'd decode step; its
                        compilation happens in the warm-up run, outside the timing)
  ctranslate2, ctranslate2-int8
                        the folder converted by CTranslate2's own `ct2-transformers-converter`,
                        run as float32 and with compute_type int8
  llama.cpp-f32, -f16, -q8_0
                        llama-cpp-python on the folder exported to GGUF (llama.cpp's gguf
                        library via `gpt2kit convert --to gguf`: llama-cpp-python ships no
                        converter); batch 1 only, as its Python API decodes one sequence

Decode: greedy, a fixed --prompt-tokens prompt per row, end-of-text ignored, so every engine
generates exactly --new-tokens tokens per row. Prefill: the time to the first token of a
--prefill-tokens prompt at batch 1. Every engine runs --repeats rounds, interleaved with the
others, each round in a fresh process (no engine's thread pool or caches linger into another's
turn): build, then one warm-up and one timed run per batch size. The tables show the median
(with min-max spread) and the ratio of medians to transformers. Absolute numbers on a shared
machine are noise; the ratios are the result.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gpt2kit.runtime import device_option

ENGINES = ("transformers", "gpt2kit", "gpt2kit-int8", "gpt2kit-compile", "gpt2kit-int8-compile",
           "ctranslate2", "ctranslate2-int8",
           "llama.cpp-f32", "llama.cpp-f16", "llama.cpp-q8_0")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="gpt2", help="model shape preset (default gpt2 = 124M)")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--prefill-tokens", type=int, default=512, help="0 skips the prefill table")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", type=device_option)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--engines", default=",".join(ENGINES), help="comma-separated, from: " + ", ".join(ENGINES))
    p.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    return p.parse_args()


# ---- engines: each runs greedy decoding and returns how many tokens it generated per row ------

class Transformers:
    batch_sizes = None  # any

    def __init__(self, folder: str, args):
        import transformers
        self.model = transformers.GPT2LMHeadModel.from_pretrained(
            folder, dtype=getattr(torch, args.dtype)).to(args.device).eval()

    def run(self, prompts: list[list[int]], new_tokens: int) -> int:
        ids = torch.tensor(prompts, device=self.model.device)
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        return out.shape[1] - ids.shape[1]


class Gpt2kit:
    batch_sizes = None

    def __init__(self, folder: str, args, **options):
        import gpt2kit
        self.model = gpt2kit.load(folder, device=args.device, dtype=args.dtype, **options)

    def run(self, prompts: list[list[int]], new_tokens: int) -> int:
        from gpt2kit.config import GenerationConfig
        from gpt2kit.generate import generate_events
        cfg = GenerationConfig(max_new_tokens=new_tokens, temperature=0, stop_at_eos=False)
        events = generate_events(self.model.module, self.model.tokenizer, prompts, cfg)
        done = [e.completion for e in events if e.completion]
        return len(done[0].token_ids)


class CTranslate2:
    batch_sizes = None

    def __init__(self, folder: str, args, compute_type: str = "float32"):
        import ctranslate2
        converted = Path(folder) / "ct2"
        if not converted.exists():
            subprocess.run(["ct2-transformers-converter", "--model", folder, "--output_dir", str(converted)],
                           check=True, capture_output=True)
        device = "cuda" if args.device.startswith("cuda") else "cpu"
        if compute_type == "float32" and args.dtype != "float32":
            compute_type = args.dtype
        self.generator = ctranslate2.Generator(str(converted), device=device, compute_type=compute_type,
                                               intra_threads=args.threads)
        vocab = json.loads((Path(folder) / "vocab.json").read_text(encoding="utf-8"))
        self.names = {i: token for token, i in vocab.items()}

    def run(self, prompts: list[list[int]], new_tokens: int) -> int:
        tokens = [[self.names[i] for i in row] for row in prompts]
        out = self.generator.generate_batch(tokens, max_length=new_tokens, min_length=new_tokens,
                                            sampling_topk=1, include_prompt_in_result=False)
        return len(out[0].sequences_ids[0])


class LlamaCpp:
    batch_sizes = (1,)

    def __init__(self, folder: str, args, type: str):
        import llama_cpp

        import gpt2kit
        path = Path(folder) / f"model-{type}.gguf"
        if not path.exists():  # converted by the first round's process
            gpt2kit.convert(folder, to="gguf", out=path, type=type)
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(args.prefill_tokens, args.prompt_tokens)
                                   + args.new_tokens + 8, n_batch=512, n_threads=args.threads,
                                   n_threads_batch=args.threads, verbose=False)

    def run(self, prompts: list[list[int]], new_tokens: int) -> int:
        self.llm.reset()
        n = 0
        for n, _ in enumerate(self.llm.generate(prompts[0], top_k=1, temp=0.0, repeat_penalty=1.0), 1):
            if n == new_tokens:
                break
        return n


FACTORIES = {
    "transformers": (Transformers, "transformers", {}),
    "gpt2kit": (Gpt2kit, "gpt2kit", {}),
    "gpt2kit-int8": (Gpt2kit, "gpt2kit", {"quantize": "int8"}),
    "gpt2kit-compile": (Gpt2kit, "gpt2kit", {"compile": True}),
    "gpt2kit-int8-compile": (Gpt2kit, "gpt2kit", {"quantize": "int8", "compile": True}),
    "ctranslate2": (CTranslate2, "ctranslate2", {}),
    "ctranslate2-int8": (CTranslate2, "ctranslate2", {"compute_type": "int8"}),
    "llama.cpp-f32": (LlamaCpp, "llama_cpp", {"type": "f32"}),
    "llama.cpp-f16": (LlamaCpp, "llama_cpp", {"type": "f16"}),
    "llama.cpp-q8_0": (LlamaCpp, "llama_cpp", {"type": "q8_0"}),
}


def write_model(args, folder: str) -> None:
    """The random GPT-2 every engine reads: a Hugging Face folder with GPT-2's tokenizer files."""
    import transformers

    import gpt2kit
    from gpt2kit.config import ModelConfig
    shape = ModelConfig.preset(args.size)
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(n_layer=shape.n_layer, n_head=shape.n_head, n_embd=shape.n_embd)
    transformers.GPT2LMHeadModel(hf_cfg).save_pretrained(folder)
    gpt2kit.Tokenizer.default().save(folder)  # CTranslate2's converter reads the vocabulary


def available(args) -> list[str]:
    """The engines asked for that can run here (a note for each one skipped)."""
    names = []
    for name in args.engines.split(","):
        if name not in FACTORIES:
            sys.exit(f"unknown engine {name!r}; choose from {', '.join(ENGINES)}")
        cls, package, _ = FACTORIES[name]
        if importlib.util.find_spec(package) is None:
            print(f"({name}: skipped, {package} is not installed)")
        elif cls is LlamaCpp and args.device != "cpu":
            print(f"({name}: skipped, this llama-cpp-python build runs on the CPU)")
        else:
            names.append(name)
    return names


# ---- measurement ------------------------------------------------------------------------------

def timed(fn) -> tuple[int, float]:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    n = fn()
    sync()
    return n, time.perf_counter() - start


def worker(args) -> None:
    """One round of one engine, in its own process: build it, then for each batch size (and the
    prefill) one warm-up run and one timed run; print the seconds as JSON."""
    cls, _, kwargs = FACTORIES[args.worker]
    engine = cls(args.folder, args, **kwargs)
    g = torch.Generator().manual_seed(1)  # the same prompts in every process
    runs = {str(b): (torch.randint(0, 50000, (b, args.prompt_tokens), generator=g).tolist(), args.new_tokens)
            for b in batch_sizes(args) if engine.batch_sizes is None or b in engine.batch_sizes}
    if args.prefill_tokens:
        runs["prefill"] = (torch.randint(0, 50000, (1, args.prefill_tokens), generator=g).tolist(), 1)
    seconds = {}
    for key, (prompts, new_tokens) in runs.items():
        engine.run(prompts, new_tokens)
        n, seconds[key] = timed(lambda: engine.run(prompts, new_tokens))
        assert n == new_tokens, f"{args.worker} generated {n} tokens, not {new_tokens}"
    print(json.dumps(seconds))


def measure(args, names: list[str], folder: str) -> dict[str, dict[str, list[float]]]:
    """{engine: {batch size or "prefill": seconds per round}}, the engines interleaved round by
    round, each round of each engine a fresh process (no engine's threads or caches linger into
    another's turn)."""
    seconds = {name: {} for name in names}
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
             if k in ("size", "batch_sizes", "new_tokens", "prompt_tokens", "prefill_tokens", "threads",
                      "device", "dtype")]
    for _ in range(args.repeats):
        for name in names:
            done = subprocess.run([sys.executable, __file__, "--worker", name, "--folder", folder, *flags],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
            for key, s in json.loads(done.stdout.strip().splitlines()[-1]).items():
                seconds[name].setdefault(key, []).append(s)
    return seconds


def batch_sizes(args) -> list[int]:
    return [int(b) for b in args.batch_sizes.split(",")]


def cell(values: list[float], fmt: str = "{:.1f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def ratio(values: list[float], base: list[float] | None) -> str:
    return f"{statistics.median(values) / statistics.median(base):.2f}x" if base else "-"


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        return worker(args)
    batches = batch_sizes(args)
    with tempfile.TemporaryDirectory() as folder:
        write_model(args, folder)
        seconds = measure(args, available(args), folder)
    decode = {b: {n: [b * args.new_tokens / s for s in v[str(b)]] for n, v in seconds.items() if str(b) in v}
              for b in batches}
    prefill = {n: [s * 1e3 for s in v["prefill"]] for n, v in seconds.items() if "prefill" in v}

    print(f"\ndecode, {args.size} shape, random weights, greedy, {args.prompt_tokens}-token prompts, "
          f"{args.new_tokens} new tokens, {args.device} {args.dtype}, {args.threads} threads; "
          f"tokens/s, median of {args.repeats} (min-max), ratio to transformers")
    print("| engine | " + " | ".join(f"batch {b} tok/s | ratio" for b in batches) + " |")
    print("| --- |" + " --- | --- |" * len(batches))
    for name in seconds:
        cells = []
        for b in batches:
            v = decode[b].get(name)
            cells += [cell(v), ratio(v, decode[b].get("transformers"))] if v else ["-", "-"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if prefill:
        print(f"\nprefill, batch 1, {args.prefill_tokens}-token prompt to the first token; ms, "
              "median (min-max), speed ratio to transformers")
        print("| engine | ms | speed ratio |\n| --- | --- | --- |")
        base = prefill.get("transformers")
        for name, v in prefill.items():
            speed = f"{statistics.median(base) / statistics.median(v):.2f}x" if base else "-"
            print(f"| {name} | {cell(v, '{:.0f}')} | {speed} |")


if __name__ == "__main__":
    main()
