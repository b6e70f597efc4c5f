"""Decode and prefill speed: gpt2kit vs its peers on the same random GPT-2 weights, in one run.

    python benchmarks/bench_generate.py                  # 124M shape, batch 1 and 8, every engine installed
    python benchmarks/bench_generate.py --engines transformers,gpt2kit --repeats 5
    python benchmarks/bench_generate.py --device cuda --dtype bfloat16

Engines (each skipped with a note when its package or binary is missing; `pip install -e ".[bench]"`):
  transformers          GPT2LMHeadModel.generate, its default (SDPA) attention
  gpt2kit, gpt2kit-int8 gpt2kit.load(folder) and load(folder, quantize="int8")
  gpt2kit-compile, gpt2kit-int8-compile
                        the same with compile=True (one torch.compile'd decode step; its
                        compilation happens in the warm-up run, outside the timing)
  gpt2kit-bf16, gpt2kit-bf16-compile
                        load(folder, dtype="bfloat16") whatever --dtype says (gpt2kit's AMX
                        tile kernel where the CPU has AMX, oneDNN's bfloat16 kernels
                        elsewhere), and with compile=True
  ctranslate2, ctranslate2-int8
                        the folder converted by CTranslate2's own `ct2-transformers-converter`,
                        run as float32 and with compute_type int8
  onnxruntime, onnxruntime-int8
                        the folder exported once per benchmark run, before the rounds, by ONNX
                        Runtime's own GPT-2 converter (`python -m onnxruntime.transformers.models.
                        gpt2.convert_to_onnx -o -p fp32`, and `-p int8`: its dynamic quantization
                        to MatMulInteger/QAttention), which fuses attention with its past state,
                        (Skip)LayerNormalization and GELU; then a greedy loop over an
                        InferenceSession (CPU, sequential, --threads intra-op threads) feeding
                        present_* back as past_*. Its graph returns logits for every position, so
                        prefill also pays the LM head on all --prefill-tokens positions
  llama.cpp-f32, -f16, -q8_0
                        llama-cpp-python on the folder exported to GGUF (llama.cpp's gguf
                        library via `gpt2kit convert --to gguf`: llama-cpp-python ships no
                        converter); batch 1 only, as its Python API decodes one sequence
  llama-bench-f32, llama-bench-q8_0
                        llama.cpp's own native `llama-bench` (--llama-bench PATH or $LLAMA_BENCH) on
                        the same GGUF files, timing itself: its tg test is the batch-1 decode row
                        (new tokens from an empty context, so without the prompt the others
                        process: under 1% of the time at the defaults), its pp test the prefill;
                        -r 1 (after its own warm-up) per round, its random tokens

Two peers need something outside pip's reach (kept out of the repository; paths are examples):
  ONNX Runtime's GPT-2 converter is deprecated upstream: it hands transformers the legacy tuple
  past and fuses the attention graph of transformers < 4.42 only (later ones use SDPA, then a new
  mask; 5.x rejects the tuple). It runs under --ort-export-python (or $ORT_EXPORT_PYTHON), by
  default this interpreter; an environment for it beside this one:
      python -m venv --system-site-packages /work/peers/ort-export-venv
      /work/peers/ort-export-venv/bin/pip install "transformers<4.42" torch==2.13.0
  llama-bench, built from the llama.cpp that llama-cpp-python's source distribution vendors
  (about 20 minutes on 2 cores; no network needed past the download). With clang: GCC 12 drops
  the tile configuration ggml's AMX kernels load (its stores look dead to it), so on a CPU with
  AMX the q8_0 prompt dies of SIGILL:
      apt-get install clang-16 libomp-16-dev          # Debian 12
      cd /work/peers && pip download --no-deps --no-binary :all: llama-cpp-python
      tar xzf llama_cpp_python-*.tar.gz
      cmake -S llama_cpp_python-*/vendor/llama.cpp -B llama-build-clang -G Ninja \\
          -DCMAKE_C_COMPILER=clang-16 -DCMAKE_CXX_COMPILER=clang++-16 -DCMAKE_BUILD_TYPE=Release \\
          -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_SERVER=OFF \\
          -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF
      cmake --build llama-build-clang --target llama-bench -j2
      export LLAMA_BENCH=/work/peers/llama-build-clang/bin/llama-bench

Decode: greedy, a fixed --prompt-tokens prompt per row, end-of-text ignored, so every engine
generates exactly --new-tokens tokens per row. Prefill: the time to the first token of a
--prefill-tokens prompt at batch 1. Every engine runs --repeats rounds, interleaved with the
others, each round in a fresh process (no engine's thread pool or caches linger into another's
turn): build, then one warm-up and one timed run per batch size. The tables show the median
(with min-max spread) and the ratio of medians to transformers. Absolute numbers on a shared
machine are noise; the ratios are the result. The output starts with machine_header(): the CPU,
its matrix-engine flags, torch and the thread count, a line to paste into RESULTS.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import machine_header

from gpt2kit.runtime import device_option

ENGINES = ("transformers", "gpt2kit", "gpt2kit-int8", "gpt2kit-compile", "gpt2kit-int8-compile",
           "gpt2kit-bf16", "gpt2kit-bf16-compile",
           "ctranslate2", "ctranslate2-int8", "onnxruntime", "onnxruntime-int8",
           "llama.cpp-f32", "llama.cpp-f16", "llama.cpp-q8_0", "llama-bench-f32", "llama-bench-q8_0")

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
    p.add_argument("--llama-bench", default=os.environ.get("LLAMA_BENCH"),
                   help="llama.cpp's llama-bench binary (default $LLAMA_BENCH; how to build it: above)")
    p.add_argument("--ort-export-python", default=os.environ.get("ORT_EXPORT_PYTHON", sys.executable),
                   help="the interpreter that runs ONNX Runtime's GPT-2 converter (default "
                        "$ORT_EXPORT_PYTHON, else this one; it needs transformers < 4.42: above)")
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
        self.model = gpt2kit.load(folder, device=args.device, **{"dtype": args.dtype, **options})

    def run(self, prompts: list[list[int]], new_tokens: int) -> int:
        from gpt2kit.config import GenerationConfig
        from gpt2kit.inference.generate import generate_events
        cfg = GenerationConfig(max_new_tokens=new_tokens, temperature=0, stop_at_eos=False)
        events = generate_events(self.model.module, self.model.tokenizer, prompts, cfg,
                                 decoder=self.model.decoder)  # compiled with compile=True
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


def gguf_file(folder: str, type: str) -> Path:
    """The folder exported to GGUF, shared by the llama.cpp engines: written by the first round
    that needs it (llama.cpp's gguf library via gpt2kit; neither llama.cpp engine ships a converter)."""
    import gpt2kit
    path = Path(folder) / f"model-{type}.gguf"
    if not path.exists():
        gpt2kit.convert(folder, to="gguf", out=path, type=type)
    return path


class LlamaCpp:
    batch_sizes = (1,)
    cpu_only = True  # the llama-cpp-python build pip makes here

    def __init__(self, folder: str, args, type: str):
        import llama_cpp
        self.llm = llama_cpp.Llama(model_path=str(gguf_file(folder, type)),
                                   n_ctx=max(args.prefill_tokens, args.prompt_tokens) + args.new_tokens + 8,
                                   n_batch=512, n_threads=args.threads, n_threads_batch=args.threads,
                                   verbose=False)

    def run(self, prompts: list[list[int]], new_tokens: int) -> int:
        self.llm.reset()
        n = 0
        for n, _ in enumerate(self.llm.generate(prompts[0], top_k=1, temp=0.0, repeat_penalty=1.0), 1):
            if n == new_tokens:
                break
        return n


class OnnxRuntime:
    """ONNX Runtime on the graph its own GPT-2 converter writes: one model for the prompt and for
    each step, with past_<layer> inputs of shape (2, batch, heads, past length, head size)."""
    batch_sizes = None
    cpu_only = True  # the CPU onnxruntime package

    def __init__(self, folder: str, args, precision: str):
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(str(self.exported(folder, precision)), options,
                                            providers=["CPUExecutionProvider"])
        self.past = [i for i in self.session.get_inputs() if i.name.startswith("past_")]
        self.outputs = [o.name for o in self.session.get_outputs()]  # logits, present_0, ...
        self.int_type = np.int32 if self.session.get_inputs()[0].type == "tensor(int32)" else np.int64

    @staticmethod
    def exported(folder: str, precision: str) -> Path:
        return Path(folder) / f"onnx-{precision}" / f"gpt2-{precision}.onnx"

    @classmethod
    def prepare(cls, folder: str, args, precision: str) -> str | None:
        """Export the folder once per benchmark run, in the parent, before the rounds (the rounds
        then time only the session). Returns why the engine cannot run, or None."""
        out = cls.exported(folder, precision)
        out.parent.mkdir()
        # -o: its fusions. Default model class and stage: logits and presents, one graph for the
        # prompt and the steps. -t 1 -r 1: its parity check against transformers, which always
        # runs, on one case. It writes a CSV into its working directory, hence cwd.
        converter = "onnxruntime.transformers.models.gpt2.convert_to_onnx"
        done = subprocess.run([args.ort_export_python, "-m", converter, "-m", folder, "--output", str(out),
                               "--cache_dir", str(out.parent / "cache"), "-o", "-p", precision,
                               "-t", "1", "-r", "1"], cwd=out.parent, capture_output=True, text=True)
        if done.returncode != 0 or not out.exists():
            last = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
            return (f"ONNX Runtime's GPT-2 converter failed under {args.ort_export_python} ({last}); "
                    "it needs transformers < 4.42: see --ort-export-python")
        for extra in out.parent.iterdir():  # its intermediate graphs, ~0.6 GB each at 124M
            if extra != out:
                shutil.rmtree(extra) if extra.is_dir() else extra.unlink()
        import onnx
        ops = {node.op_type for node in onnx.load(str(out)).graph.node}
        if not ops & {"Attention", "QAttention"}:  # a transformers whose attention graph it does not know
            return f"ONNX Runtime's GPT-2 converter fused no attention (ops: {', '.join(sorted(ops))})"
        return None

    def generate(self, prompts: list[list[int]], new_tokens: int) -> np.ndarray:
        """Greedy: the prompt in one call, then one call per token with the presents fed back."""
        import onnxruntime as ort
        tokens = np.array(prompts, dtype=self.int_type)
        batch = len(tokens)
        # An empty past for the prompt's call; the presents stay OrtValues, never copied to numpy.
        past = {i.name: ort.OrtValue.ortvalue_from_numpy(
            np.zeros((2, batch, i.shape[2], 0, i.shape[4]), np.float32)) for i in self.past}
        done, out = 0, []
        for _ in range(new_tokens):
            step = tokens.shape[1]
            positions = np.arange(done, done + step, dtype=self.int_type)
            feed = {"input_ids": tokens, "position_ids": np.repeat(positions[None], batch, axis=0),
                    # equal-length rows: no padding, every position attended
                    "attention_mask": np.ones((batch, done + step), self.int_type)}
            feed = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in feed.items()}
            logits, *presents = self.session.run_with_ort_values(self.outputs, feed | past)
            past = {i.name: v for i, v in zip(self.past, presents)}
            done += step
            tokens = logits.numpy()[:, -1].argmax(-1).astype(self.int_type)[:, None]
            out.append(tokens)
        return np.concatenate(out, axis=1)

    def run(self, prompts: list[list[int]], new_tokens: int) -> int:
        return self.generate(prompts, new_tokens).shape[1]


class LlamaBench:
    """llama.cpp's native llama-bench: it runs and times itself (one warm-up, then -r 1), on its
    own random tokens; this reads its JSON. Its tg test decodes from an empty context, its pp test
    is the prompt."""
    batch_sizes = (1,)
    cpu_only = True  # the build in the docstring

    def __init__(self, folder: str, args, type: str):
        self.command = [args.llama_bench, "-m", str(gguf_file(folder, type)), "-t", str(args.threads),
                        "-r", "1", "-o", "json"]

    @staticmethod
    def unavailable(args) -> str | None:
        if not (args.llama_bench and os.access(args.llama_bench, os.X_OK)):
            return "no llama-bench binary: give --llama-bench PATH or set LLAMA_BENCH (to build it: --help)"
        return None

    def timings(self, runs: dict[str, tuple[list[list[int]], int]]) -> dict[str, float]:
        """{"1": seconds for the new tokens, "prefill": seconds for the prompt}, from its tokens/s."""
        new = runs["1"][1] if "1" in runs else 0
        prompt = len(runs["prefill"][0][0]) if "prefill" in runs else 0
        if not new and not prompt:
            return {}
        # Its stderr (silent unless it fails) goes into this worker's, which the parent shows on failure.
        done = subprocess.run([*self.command, "-p", str(prompt), "-n", str(new)],
                              stdout=subprocess.PIPE, text=True, check=True)
        seconds = {}
        for test in json.loads(done.stdout):
            key = "1" if test["n_gen"] else "prefill"
            seconds[key] = (test["n_prompt"] + test["n_gen"]) / test["avg_ts"]
        return seconds


FACTORIES = {
    "transformers": (Transformers, "transformers", {}),
    "gpt2kit": (Gpt2kit, "gpt2kit", {}),
    "gpt2kit-int8": (Gpt2kit, "gpt2kit", {"quantize": "int8"}),
    "gpt2kit-compile": (Gpt2kit, "gpt2kit", {"compile": True}),
    "gpt2kit-int8-compile": (Gpt2kit, "gpt2kit", {"quantize": "int8", "compile": True}),
    "gpt2kit-bf16": (Gpt2kit, "gpt2kit", {"dtype": "bfloat16"}),
    "gpt2kit-bf16-compile": (Gpt2kit, "gpt2kit", {"dtype": "bfloat16", "compile": True}),
    "ctranslate2": (CTranslate2, "ctranslate2", {}),
    "ctranslate2-int8": (CTranslate2, "ctranslate2", {"compute_type": "int8"}),
    "llama.cpp-f32": (LlamaCpp, "llama_cpp", {"type": "f32"}),
    "llama.cpp-f16": (LlamaCpp, "llama_cpp", {"type": "f16"}),
    "llama.cpp-q8_0": (LlamaCpp, "llama_cpp", {"type": "q8_0"}),
    "onnxruntime": (OnnxRuntime, "onnxruntime", {"precision": "fp32"}),
    "onnxruntime-int8": (OnnxRuntime, "onnxruntime", {"precision": "int8"}),
    # gguf: the GGUF files are written here; the binary is checked by LlamaBench.unavailable
    "llama-bench-f32": (LlamaBench, "gguf", {"type": "f32"}),
    "llama-bench-q8_0": (LlamaBench, "gguf", {"type": "q8_0"}),
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
            reason = f"{package} is not installed"
        elif getattr(cls, "cpu_only", False) and args.device != "cpu":
            reason = "it runs on the CPU only here"
        else:
            reason = cls.unavailable(args) if hasattr(cls, "unavailable") else None
        if reason:
            print(f"({name}: skipped, {reason})")
        else:
            names.append(name)
    return names


def prepared(args, names: list[str], folder: str) -> list[str]:
    """The engines whose one-off preparation in the parent (an export) worked; a note for the
    others. Engines without a prepare step convert in their first round instead."""
    ready = []
    for name in names:
        cls, _, kwargs = FACTORIES[name]
        reason = cls.prepare(folder, args, **kwargs) if hasattr(cls, "prepare") else None
        if reason:
            print(f"({name}: skipped, {reason})")
        else:
            ready.append(name)
    return ready


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
    prefill) one warm-up run and one timed run (or the engine's own timings, for a benchmark
    binary); print the seconds as JSON."""
    cls, _, kwargs = FACTORIES[args.worker]
    engine = cls(args.folder, args, **kwargs)
    g = torch.Generator().manual_seed(1)  # the same prompts in every process
    runs = {str(b): (torch.randint(0, 50000, (b, args.prompt_tokens), generator=g).tolist(), args.new_tokens)
            for b in batch_sizes(args) if engine.batch_sizes is None or b in engine.batch_sizes}
    if args.prefill_tokens:
        runs["prefill"] = (torch.randint(0, 50000, (1, args.prefill_tokens), generator=g).tolist(), 1)
    seconds = engine.timings(runs) if hasattr(engine, "timings") else time_runs(engine, runs, args.worker)
    print(json.dumps(seconds))


def time_runs(engine, runs: dict[str, tuple[list[list[int]], int]], name: str) -> dict[str, float]:
    seconds = {}
    for key, (prompts, new_tokens) in runs.items():
        engine.run(prompts, new_tokens)
        n, seconds[key] = timed(lambda: engine.run(prompts, new_tokens))
        assert n == new_tokens, f"{name} generated {n} tokens, not {new_tokens}"
    return seconds


def measure(args, names: list[str], folder: str) -> dict[str, dict[str, list[float]]]:
    """{engine: {batch size or "prefill": seconds per round}}, the engines interleaved round by
    round, each round of each engine a fresh process (no engine's threads or caches linger into
    another's turn)."""
    seconds = {name: {} for name in names}
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
             if k in ("size", "batch_sizes", "new_tokens", "prompt_tokens", "prefill_tokens", "threads",
                      "device", "dtype", "llama_bench") and v is not None]
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
    print(machine_header(args.threads))
    with tempfile.TemporaryDirectory() as folder:
        write_model(args, folder)
        seconds = measure(args, prepared(args, available(args), folder), folder)
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
