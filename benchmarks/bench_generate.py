"""Decode speed: gpt2kit vs transformers on the same random GPT-2 weights, in one run.

    python benchmarks/bench_generate.py                  # 124M shape, batch 1 and 8, 128 new tokens
    python benchmarks/bench_generate.py --device cuda --dtype bfloat16

Greedy decoding, a fixed 16-token prompt per row, <|endoftext|> ignored so every run generates
exactly --new-tokens tokens. The two engines run interleaved, --repeats times each, after one
warm-up; the table shows the median tokens/s (with min-max spread) and the ratio of medians.
Absolute numbers on a shared machine are noise; the ratio is the result.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="gpt2", help="model shape preset (default gpt2 = 124M)")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    return p.parse_args()


def build_models(args, folder: str):
    import transformers

    import gpt2kit
    from gpt2kit.config import ModelConfig
    shape = ModelConfig.preset(args.size)
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(n_layer=shape.n_layer, n_head=shape.n_head, n_embd=shape.n_embd)
    transformers.GPT2LMHeadModel(hf_cfg).save_pretrained(folder)
    dtype = getattr(torch, args.dtype)
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder, dtype=dtype).to(args.device).eval()
    ours = gpt2kit.load(folder, device=args.device, dtype=args.dtype)
    return hf, ours


def run_hf(hf, prompts, new_tokens):
    ids = torch.tensor(prompts, device=hf.device)
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out.shape[1] - ids.shape[1]


def run_ours(model, prompts, new_tokens):
    from gpt2kit.config import GenerationConfig
    from gpt2kit.generate import generate_events
    cfg = GenerationConfig(max_new_tokens=new_tokens, temperature=0, stop_at_eos=False)
    done = [e.completion for e in generate_events(model.module, model.tokenizer, prompts, cfg) if e.completion]
    return len(done[0].token_ids)


def timed(fn, *a):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    n = fn(*a)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return n, time.perf_counter() - start


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        hf, ours = build_models(args, folder)
        g = torch.Generator().manual_seed(1)
        rows = []
        for batch in map(int, args.batch_sizes.split(",")):
            prompts = torch.randint(0, 50000, (batch, args.prompt_tokens), generator=g).tolist()
            engines = {"transformers": lambda: run_hf(hf, prompts, args.new_tokens),
                       "gpt2kit": lambda: run_ours(ours, prompts, args.new_tokens)}
            for fn in engines.values():  # warm-up
                fn()
            speeds = {name: [] for name in engines}
            for _ in range(args.repeats):
                for name, fn in engines.items():
                    n, seconds = timed(fn)
                    assert n == args.new_tokens, f"{name} generated {n} tokens"
                    speeds[name].append(batch * n / seconds)
            rows.append((batch, speeds))
    print(f"decode, {args.size} shape, random weights, greedy, {args.new_tokens} new tokens, "
          f"{args.device} {args.dtype}, {args.threads} threads, median of {args.repeats} (min-max)")
    print("| batch | transformers tok/s | gpt2kit tok/s | ratio |")
    print("| --- | --- | --- | --- |")
    for batch, speeds in rows:
        cells = [f"{statistics.median(s):.1f} ({min(s):.1f}-{max(s):.1f})" for s in speeds.values()]
        ratio = statistics.median(speeds["gpt2kit"]) / statistics.median(speeds["transformers"])
        print(f"| {batch} | {cells[0]} | {cells[1]} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
