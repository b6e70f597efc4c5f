"""Training speed and memory: gpt2kit vs transformers on the same random GPT-2 weights, in one run.

    python benchmarks/bench_train.py                     # 124M shape, batch 4 x 256 tokens, fp32 CPU
    python benchmarks/bench_train.py --engines gpt2kit,gpt2kit:bfloat16,transformers,transformers:bfloat16
    python benchmarks/bench_train.py --device cuda --dtype bfloat16

One training step = forward, float32 cross-entropy, backward, gradient clipping, AdamW step (the
same optimizer and parameter groups for both engines, train_setup.make_optimizer: fused AdamW, as
transformers' Trainer also defaults to; dropout 0.1, GPT-2's; gpt2kit clips as finetune does,
on CPU inside the fused step: kernels/grad_clip.py). gpt2kit runs its training loss,
training.objective.NextTokenLoss (the LM head fused with the cross-entropy), on the model as `finetune` sets it
up by default (lean_backward.save_less_for_backward; under bfloat16 on CPU also the process's
heap, training.setup.heap_for_training); transformers runs
GPT2LMHeadModel's forward, then cross_entropy over the float32 logits. Each measurement is a fresh subprocess (so its peak resident memory,
VmHWM, belongs to one engine), the engines interleaved, --repeats each; the table shows the median
tokens/s with its min-max spread and the ratio of medians. LoRA (rank 8 on c_attn) is measured
the same way, and so is gpt2kit-compile (`finetune --compile`: torch.compile over the loss). An
engine named NAME:DTYPE runs under that autocast dtype (weights stay float32) instead of --dtype,
so float32 and bfloat16 runs share one table. Finally the wall time of the seed's job, `gpt2kit finetune onelinefun.csv --column
Joke -m gpt2 --epochs 10` (batch 8 x 1024 tokens), is estimated at the measured speed.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import machine_header

from gpt2kit.runtime import device_option

ENGINES = ("gpt2kit", "transformers", "gpt2kit-lora", "gpt2kit-compile")
DTYPES = ("float32", "bfloat16", "float16")
JOKES = Path(__file__).resolve().parents[2] / "shared" / "data" / "onelinefun.csv"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="gpt2", help="model shape preset (default gpt2 = 124M)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--block-size", type=int, default=256, help="input tokens per row")
    p.add_argument("--steps", type=int, default=3, help="timed steps per measurement, after 1 warm-up")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", type=device_option)
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="autocast dtype of engines named without one (weights stay float32)")
    p.add_argument("--engines", default=",".join(ENGINES[:3]),
                   help=f"comma-separated, each one of {', '.join(ENGINES)}, optionally :DTYPE")
    p.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---- one measurement, in its own process ------------------------------------------------------

def build(engine: str, folder: str, device, dtype):
    """(model, loss(x), optimizer): the engine's training loss of predicting x[:, 1:] from
    x[:, :-1] under autocast to `dtype` (None: float32), and the AdamW finetune would step."""
    import torch
    import torch.nn.functional as F

    from gpt2kit.training.config import TrainConfig
    from gpt2kit.training.setup import make_optimizer, objective
    cfg = TrainConfig(out="-", compile=engine == "gpt2kit-compile")
    if engine == "transformers":
        import transformers
        hf = transformers.GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).to(device).train()
        return hf, lambda x: F.cross_entropy(hf(input_ids=x[:, :-1]).logits.float().flatten(0, 1),
                                             x[:, 1:].flatten()), make_optimizer(hf, cfg, device)
    from gpt2kit.checkpoints import load_model
    from gpt2kit.kernels.lean_backward import save_less_for_backward
    from gpt2kit.lora import LoraConfig, apply_lora
    model = load_model(folder, device, torch.float32).model
    if engine == "gpt2kit-lora":
        apply_lora(model, LoraConfig())
    save_less_for_backward(model)  # as training/setup.py's load_for_training does for every run
    loss, copies = objective(model, cfg, device, dtype, one_process=True)  # as wrap_objective
    optimizer = make_optimizer(model, cfg, device, copies)
    return model.train(), torch.compile(loss) if cfg.compile else loss, optimizer


def worker(args) -> dict:
    import torch

    from gpt2kit.kernels import grad_clip
    from gpt2kit.kernels.heap import freed_memory_held
    from gpt2kit.runtime import autocast
    from gpt2kit.training.memory import process_peak_rss
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    half = None if args.dtype == "float32" else getattr(torch, args.dtype)
    # as finetune does around its loop; kept referenced until the worker returns
    heap = freed_memory_held(args.worker.startswith("gpt2kit") and device.type == "cpu" and half is not None)
    heap.__enter__()
    model, compute_loss, optimizer = build(args.worker, args.folder, device, half)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50257, (args.batch_size, args.block_size + 1), generator=g).to(device)

    def step():
        with autocast(device, half):
            loss = compute_loss(x)
        loss.backward()
        grads = grad_clip.gradients(optimizer)
        if args.worker.startswith("gpt2kit") and grad_clip.folds_into_step(optimizer, grads):
            grad_clip.clipped_step(optimizer, grad_clip.total_norm(grads), 1.0)  # as finetune clips
        else:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocates gradients and AdamW state
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else process_peak_rss()
    trainable = sum(p.numel() for p in params)
    return {"tokens_per_s": args.steps * args.batch_size * args.block_size / seconds,
            "peak_bytes": peak, "trainable": trainable}


# ---- the orchestration --------------------------------------------------------------------------

def make_weights(size: str, folder: str) -> None:
    import torch
    import transformers

    from gpt2kit.config import ModelConfig
    shape = ModelConfig.preset(size)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=shape.n_layer, n_head=shape.n_head, n_embd=shape.n_embd,
                                  n_positions=shape.n_positions)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)


def measure(args, spec: str, folder: str) -> dict:
    engine, _, dtype = spec.partition(":")
    cmd = [sys.executable, __file__, "--worker", engine, "--folder", folder, "--device", args.device,
           "--dtype", dtype or args.dtype, "--batch-size", str(args.batch_size), "--block-size", str(args.block_size),
           "--steps", str(args.steps), "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def seed_job(tokens_per_s: float) -> str:
    """The seed's job at `tokens_per_s`: 10 epochs of onelinefun.csv's jokes, gpt2, batch 8 x 1024."""
    from gpt2kit.data.prepare import DataConfig, prepare_data
    from gpt2kit.tokenizer import Tokenizer
    with tempfile.TemporaryDirectory() as cache:
        data = prepare_data(DataConfig(path=str(JOKES), column="Joke", cache_dir=cache),
                            Tokenizer.default(), 1024)
    steps = math.ceil(10 * len(data.train) / 8)
    seconds = steps * 8 * (data.block_size - 1) / tokens_per_s
    return (f"seed job: onelinefun.csv, {data.documents:,} training jokes = {data.tokens:,} tokens = "
            f"{len(data.train)} blocks of {data.block_size}; 10 epochs at batch 8 = {steps} steps; "
            f"at {tokens_per_s:,.0f} tokens/s about {seconds / 60:.0f} min ({seconds / 3600:.1f} h)")


def main():
    args = parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    engines = args.engines.split(",")
    for spec in engines:
        engine, _, dtype = spec.partition(":")
        if engine not in ENGINES or dtype not in ("", *DTYPES):
            sys.exit(f"--engines: unknown engine {spec!r}; use {', '.join(ENGINES)}, optionally :DTYPE")
    results = {name: [] for name in engines}
    with tempfile.TemporaryDirectory() as folder:
        make_weights(args.size, folder)
        for _ in range(args.repeats):
            for name in engines:
                results[name].append(measure(args, name, folder))
    print(machine_header(args.threads))
    print(f"training step (forward + backward + clip + AdamW), {args.size} shape, random weights, "
          f"batch {args.batch_size} x {args.block_size} tokens, {args.device}, autocast {args.dtype} "
          "where the engine names none, "
          f"{args.threads} threads; median of {args.repeats} runs of {args.steps} steps (min-max)")
    print("| engine | trainable params | tokens/s | peak memory |")
    print("| --- | --- | --- | --- |")
    for name, runs in results.items():
        speeds = [r["tokens_per_s"] for r in runs]
        peak = max(r["peak_bytes"] or 0 for r in runs) / 2**20
        print(f"| {name} | {runs[0]['trainable'] / 1e6:.2f}M | {statistics.median(speeds):.0f} "
              f"({min(speeds):.0f}-{max(speeds):.0f}) | {peak:,.0f} MB |")
    median = {name: statistics.median(r["tokens_per_s"] for r in runs) for name, runs in results.items()}
    for name in median:
        base = "transformers" + name.partition(":")[1] + name.partition(":")[2]
        if name.startswith("gpt2kit") and base in median:
            print(f"ratio {name} / {base}: {median[name] / median[base]:.2f}x")
    for name in median:
        if name.startswith("gpt2kit") and "lora" not in name and args.size == "gpt2":
            print(f"{name}: {seed_job(median[name])}")


if __name__ == "__main__":
    main()
