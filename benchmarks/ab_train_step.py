"""In-process A/B of two variants of gpt2kit's training step: one model, one optimizer, steps
alternating between the variants (A B, B A, A B, ...), the median step time of each and their
ratio. On these shared machines speed drifts by +-10% within minutes, which interleaved processes
(bench_train.py) cannot resolve for a 3-5% change; alternating step by step in one process can.

    python benchmarks/ab_train_step.py VARIANTS.py [--rounds 16] [--batch-size 4] [--block-size 256]

VARIANTS.py defines A() and B(), each switching the code path in place (monkeypatching a module
attribute, say), called before each of its steps. The step is bench_train.py's gpt2kit step: the
model as finetune sets it up, bfloat16 autocast on CPU (--dtype), the fused head, clipping folded
into fused AdamW; random GPT-2 weights of --size.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import tempfile
import time

import bench_train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", help="a Python file defining A() and B()")
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--size", default="gpt2")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    import torch
    from machine import machine_header

    from gpt2kit.kernels import grad_clip
    from gpt2kit.kernels.heap import freed_memory_held
    from gpt2kit.runtime import autocast

    spec = importlib.util.spec_from_file_location("variants", args.variants)
    variants = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(variants)
    torch.set_num_threads(args.threads)
    device, half = torch.device("cpu"), None if args.dtype == "float32" else torch.bfloat16
    heap = freed_memory_held(half is not None)  # as finetune holds it; until the process ends
    heap.__enter__()
    with tempfile.TemporaryDirectory() as folder:
        bench_train.make_weights(args.size, folder)
        model, loss_fn, optimizer = bench_train.build("gpt2kit", folder, device, half)  # set up as finetune does
    x = torch.randint(0, 50257, (args.batch_size, args.block_size + 1), generator=torch.Generator().manual_seed(0))

    def step() -> float:
        start = time.perf_counter()
        with autocast(device, half):
            loss = loss_fn(x)
        loss.backward()
        grad_clip.clipped_step(optimizer, grad_clip.total_norm(grad_clip.gradients(optimizer)), 1.0)
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    times = {"A": [], "B": []}
    for name in ("A", "B"):  # warm-up: allocations, AdamW state, each variant's first call
        getattr(variants, name)()
        step()
    for r in range(args.rounds):
        for name in ("A", "B") if r % 2 == 0 else ("B", "A"):
            getattr(variants, name)()
            times[name].append(step())
    a, b = statistics.median(times["A"]), statistics.median(times["B"])
    print(machine_header(args.threads))
    print(f"{args.batch_size} x {args.block_size} tokens, {args.dtype}, {args.rounds} rounds: A {a:.3f} s, B {b:.3f} s "
          f"(medians; min {min(times['A']):.3f} / {min(times['B']):.3f}); B / A {b / a:.3f}")


if __name__ == "__main__":
    main()
