"""Where the time of one batch-1 decode step goes (issue 5): matrix products, the LM head,
attention over the cache, the other kernels, torch.compile's machinery, and the Python between.

    python benchmarks/profile_decode.py                       # GPT-2 124M shape, float32, eager
    python benchmarks/profile_decode.py --compile             # the compiled step (load(compile=True))
    python benchmarks/profile_decode.py --quantize int8 --compile

Random weights saved as a Hugging Face folder and loaded with gpt2kit.load, a 16-token prompt,
then --steps greedy decode steps (RunningBatch.decode + argmax, slots 16 onwards of a
--max-len cache) under torch.profiler. Each operator's own time (not its children's) goes to one
part by its name and input shapes; what no operator accounts for is Python and dispatch, and
gpt2kit's native kernels (ctypes calls: the decode products and attention where they run). Inside
a compiled step Inductor fuses everything into one C++ function, so the LM head and attention
are not told apart there. The last line times the whole generation loop per token against the
bare steps: sampling, text decoding and stop rules, plus the prefill spread over the tokens.
The profiler adds its own cost to every operator, most in the eager step (~150 operators): the
unprofiled bare step on that line is the step's real time; the shares are what the table tells.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("TORCHINDUCTOR_CPP_ENABLE_KERNEL_PROFILE", "1")  # compiled kernels as events

import torch  # noqa: E402

import gpt2kit  # noqa: E402
from gpt2kit.checkpoints.hf import save_hf  # noqa: E402
from gpt2kit.config import GenerationConfig, ModelConfig  # noqa: E402
from gpt2kit.inference.generate import generate_events  # noqa: E402
from gpt2kit.inference.running_batch import RunningBatch  # noqa: E402
from gpt2kit.model import GPT  # noqa: E402
from gpt2kit.runtime import device_option  # noqa: E402

PROMPT = 16
# (part, test on an operator's name, its input shapes and the vocabulary size), first match wins
PARTS = [
    ("compiled kernels (int8 products; with --compile the whole step)",
     lambda n, s, v: n.startswith(("graph_", "cpp_fused"))),
    ("torch.compile: Inductor's wrapper (buffers, calls)",
     lambda n, s, v: n.startswith("## Call CompiledFxGraph")),
    ("torch.compile: guards", lambda n, s, v: n == "TorchDynamo Cache Lookup"),
    ("torch.compile: frame, inputs", lambda n, s, v: n in ("Torch-Compiled Region", "Pregraph bytecode")
     or n.startswith("AOTDispatcher")),
    ("LM head", lambda n, s, v: _product(n) and any(v in d for d in s if d)),
    ("block matrix products", lambda n, s, v: _product(n)),
    ("attention", lambda n, s, v: "attention" in n or n == "aten::_softmax"),
    ("KV cache writes", lambda n, s, v: n in ("aten::copy_", "aten::index_copy_")),
]


def _product(name: str) -> bool:
    return "linear" in name or name in ("aten::addmm", "aten::mm", "aten::matmul")

def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="gpt2", help="model shape preset (default gpt2 = 124M)")
    p.add_argument("--quantize", choices=["int8"], help="weight-only int8")
    p.add_argument("--compile", action="store_true", help="the compiled decode step")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", type=device_option)
    return p.parse_args()


def part_of(name: str, shapes, vocab: int) -> str:
    other = "other operators (LayerNorm, GELU, adds, ...)"
    return next((part for part, test in PARTS if test(name, shapes, vocab)), other)


def decode(batch: RunningBatch, steps: int) -> None:
    for _ in range(steps):
        batch.decode([int(batch.logits[0].argmax())])


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        save_hf(GPT(ModelConfig.preset(args.size)), folder)
        model = gpt2kit.load(folder, device=args.device, quantize=args.quantize, compile=args.compile)
    prompt = torch.randint(0, model.config.vocab_size, (PROMPT,)).tolist()
    with torch.inference_mode():
        batch = RunningBatch(model.module, 1, max_len=args.max_len)
        batch.join([0], [prompt])
        decode(batch, 4)  # compiles here with --compile
        batch = RunningBatch(model.module, 1, max_len=args.max_len)
        batch.join([0], [prompt])
        with torch.profiler.profile(record_shapes=True) as prof:
            start = time.perf_counter()
            decode(batch, args.steps)
            wall = (time.perf_counter() - start) / args.steps * 1e3
    parts: dict[str, float] = {}
    for event in prof.key_averages(group_by_input_shape=True):
        part = part_of(event.key, event.input_shapes or [], model.config.vocab_size)
        parts[part] = parts.get(part, 0.0) + event.self_cpu_time_total / 1e3 / args.steps
    # gpt2kit's native kernels (kernels/native) are ctypes calls, not operators: they land here.
    parts["Python, dispatch and gpt2kit's native kernels"] = wall - sum(parts.values())
    what = f"{args.size}, {args.quantize or 'float32'}, {'compiled' if args.compile else 'eager'}"
    print(f"\none decode step, batch 1, {what}, slots {PROMPT}-{PROMPT + args.steps} of {args.max_len}, "
          f"{args.threads} threads (profiled: {wall:.2f} ms per step)")
    print("| part | ms per step | share |\n| --- | --- | --- |")
    for part, ms in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"| {part} | {ms:.2f} | {ms / wall:.0%} |")
    loop_overhead(model, prompt, args)


def loop_overhead(model, prompt: list[int], args, rounds: int = 3) -> None:
    """The generation loop per token against bare decode steps, unprofiled, interleaved."""
    cfg = GenerationConfig(max_new_tokens=args.steps, temperature=0, stop_at_eos=False)
    loops, bares = [], []
    with torch.inference_mode():
        for _ in range(rounds):
            start = time.perf_counter()
            list(generate_events(model.module, model.tokenizer, [prompt], cfg))
            loops.append((time.perf_counter() - start) / args.steps * 1e3)
            batch = RunningBatch(model.module, 1, max_len=args.max_len)
            batch.join([0], [prompt])
            start = time.perf_counter()
            decode(batch, args.steps - 1)
            bares.append((time.perf_counter() - start) / (args.steps - 1) * 1e3)
    loop, bare = statistics.median(loops), statistics.median(bares)
    print(f"\nunprofiled (medians of {rounds}): generation loop {loop:.2f} ms per token, bare decode steps "
          f"{bare:.2f} ms; {loop - bare:.2f} ms per token for sampling, text, stop rules and the prefill")

if __name__ == "__main__":
    main()
