"""The bfloat16 products of a GPT-2 training step, whole (one torch.mm) and as
kernels/bf16_products.py runs them (cut into blocks; a weight's gradient from a row-major copy of
grad.t(), the copy's time included), side by side: GFLOP/s and the ratio, per product.

    python benchmarks/bench_products.py                    # GPT-2 124M, 4 x 256 tokens, 2 threads
    python benchmarks/bench_products.py --rows 8192        # the seed job's 8 x 1024 tokens
    python benchmarks/bench_products.py --threads 1

Each product is timed as the step runs it (the same operand layouts: a weight transposed in the
forward, a gradient transposed for the weight's gradient), the median of --repeats calls after a
warm-up, the two ways interleaved. Where the cut is the whole product (blocks() leaves it whole on
this shape or thread count) both columns time the same call. Operands stay in cache here, where
a step's come from memory; the process's freed memory is held, as in bfloat16 training. The step's own gain is measured by bench_train.py.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from machine import machine_header


def products(rows: int, C: int, V: int) -> list[tuple[str, tuple[int, int], tuple[int, int], bool, bool]]:
    """(name, a's shape, b's shape, a transposed, b transposed) of one step's products: the
    forward, input-gradient and weight-gradient product of each linear of a block, and the head's
    (whose rows are fused_loss's chunk of at most 1024)."""
    out = []
    for name, n_in, n_out in (("c_attn", C, 3 * C), ("attn.c_proj", C, C), ("c_fc", C, 4 * C),
                              ("mlp.c_proj", 4 * C, C)):
        out += [(f"{name} forward", (rows, n_in), (n_in, n_out), False, True),
                (f"{name} input grad", (rows, n_out), (n_out, n_in), False, False),
                (f"{name} weight grad", (n_out, rows), (rows, n_in), True, False)]
    head = min(rows, 1024)
    return out + [("head forward", (head, C), (C, V), False, True),
                  ("head input grad", (head, V), (V, C), False, False),
                  ("head weight grad", (V, head), (head, C), True, False)]


def operand(shape: tuple[int, int], transposed: bool) -> torch.Tensor:
    m = torch.randn(shape[::-1] if transposed else shape).to(torch.bfloat16)
    return m.t() if transposed else m


def median_seconds(f, repeats: int) -> float:
    f()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1024, help="tokens per step (batch x block)")
    parser.add_argument("--n-embd", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from gpt2kit.kernels import bf16_products
    from gpt2kit.kernels.heap import freed_memory_held
    with freed_memory_held():  # as bfloat16 training holds it: outputs reuse memory, no page faults
        table(args, bf16_products)


def table(args, bf16_products) -> None:

    print(machine_header(args.threads))
    print(f"bfloat16 products of one training step, {args.rows} rows, n_embd {args.n_embd}, "
          f"vocabulary {args.vocab}; median of {args.repeats}")
    print("| product | shape (M x K x N) | cut into | whole GFLOP/s | gpt2kit GFLOP/s | ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    whole_total = cut_total = 0.0
    for name, sa, sb, ta, tb in products(args.rows, args.n_embd, args.vocab):
        a, b = operand(sa, ta), operand(sb, tb)
        M, K, N = sa[0], sa[1], sb[1]
        whole = median_seconds(lambda: torch.mm(a, b), args.repeats)
        if ta:  # a weight's gradient: a is grad.t()
            cut = median_seconds(lambda: bf16_products.weight_gradient(a.t(), b), args.repeats)
        else:
            cut = median_seconds(lambda: bf16_products.mm(a, b), args.repeats)
        whole_total, cut_total = whole_total + whole, cut_total + cut
        rows, cols = bf16_products.blocks(M, N, args.threads)
        flops = 2 * M * K * N / 1e9
        print(f"| {name} | {M} x {K} x {N} | {rows} x {cols} | {flops / whole:,.0f} | {flops / cut:,.0f} | "
              f"{whole / cut:.2f}x |")
    print(f"all of a block's and the head's products: whole {whole_total * 1e3:.1f} ms, gpt2kit's {cut_total * 1e3:.1f} ms, "
          f"{whole_total / cut_total:.2f}x")


if __name__ == "__main__":
    main()
