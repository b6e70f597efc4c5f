"""What int8 weights change: a small GPT-2 trained on the jokes, then quantized (issue 5, target 3).

    python benchmarks/bench_quantize.py                       # tiny preset (4 layers, 256 wide), 300 steps
    python benchmarks/bench_quantize.py --model runs/jokes    # your own trained model instead

Trains the `--size` preset from scratch on onelinefun.csv (a random model's near-uniform logits
flip at any perturbation, so agreement is only meaningful on a trained one), loads it as float32
and with quantize="int8", and reports `gpt2kit.quantize.compare` over a fixed prompt set (the
first three words of the last --prompts jokes, which sit in the validation split): the share of
greedy tokens equal to float32's position by position (after the first difference the two
continuations usually part, so one flip costs the rest of its row), the share of identical
continuations, and the logit error along float32's continuations.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path

import gpt2kit
from gpt2kit.quantize import compare

JOKES = Path(__file__).resolve().parents[2] / "shared" / "data" / "onelinefun.csv"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a trained model to quantize instead of training one")
    p.add_argument("--size", default="tiny", help="preset to train from scratch (default tiny)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--prompts", type=int, default=30)
    p.add_argument("--new-tokens", type=int, default=24)
    return p.parse_args()


def main():
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            data = gpt2kit.DataConfig(path=str(JOKES), column="Joke")  # blocks of the full context, as in RESULTS.md
            result = gpt2kit.finetune(data, out=str(Path(tmp) / "run"), from_scratch=True, size=args.size,
                                      batch_size=8, max_steps=args.steps, learning_rate=2e-3,
                                      eval_batches=4, sample_every=0, device="cpu", progress=True)
            model = result.out
            print(f"trained {args.size} for {result.steps} steps: validation loss {result.val_loss:.3f}")
        with open(JOKES, newline="", encoding="utf-8") as f:
            jokes = [row["Joke"] for row in csv.DictReader(f)][-args.prompts:]
        prompts = [" ".join(joke.split()[:3]) for joke in jokes]
        report = compare(gpt2kit.load(model, device="cpu"), gpt2kit.load(model, device="cpu", quantize="int8"),
                         prompts, args.new_tokens)
    print(f"\nint8 vs float32, {len(prompts)} prompts x {args.new_tokens} greedy tokens")
    print("| greedy tokens equal | identical continuations | logit error max / mean | logit std |")
    print("| --- | --- | --- | --- |")
    print(f"| {report.token_agreement:.1%} | {report.identical_continuations:.1%} | "
          f"{report.logit_max_error:.4f} / {report.logit_mean_error:.4f} | {report.logit_std:.3f} |")


if __name__ == "__main__":
    main()
