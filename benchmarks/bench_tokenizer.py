"""Encode throughput: gpt2kit's Tokenizer vs transformers' GPT2TokenizerFast vs tiktoken.

All three are built offline from the same GPT-2 files (gpt2kit's package data), checked to give
the same ids, then timed on the same text: one long document, and a batch of short texts (one
per line). Repeats are interleaved (a, b, c, a, b, c, ...) so machine noise hits all three alike;
the median is reported. "gpt2kit speed-up" is that encoder's time over gpt2kit's (>1: gpt2kit is
faster). Run: python benchmarks/bench_tokenizer.py [--text FILE] [--repeats N]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "onelinefun.csv"


def build_encoders(assets: Path, scratch: Path) -> dict:
    """name -> (encode one text, encode a list of texts), all from the same vocabulary files."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str
    from transformers import GPT2TokenizerFast

    from gpt2kit.tokenizer import Tokenizer

    ours = Tokenizer.default()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(assets / name, scratch / name)
    hf = GPT2TokenizerFast.from_pretrained(scratch)  # not (vocab_file=...): ignored by transformers 5
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(assets / "merges.txt"),
                                            encoder_json_file=str(assets / "vocab.json"))
    tt = tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                           special_tokens={"<|endoftext|>": 50256})
    return {
        "gpt2kit": (ours.encode, ours.encode_batch),
        "GPT2TokenizerFast": (lambda t: hf.encode(t, split_special_tokens=True),
                              lambda ts: hf(ts, split_special_tokens=True)["input_ids"]),
        "tiktoken": (tt.encode_ordinary, tt.encode_ordinary_batch),
    }


def time_interleaved(calls: dict, repeats: int) -> dict[str, float]:
    """Median seconds per call for each name, running the calls round-robin."""
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in seconds.items()}


def report(title: str, n_bytes: int, n_tokens: int, medians: dict[str, float]) -> None:
    ours = medians["gpt2kit"]
    print(f"\n{title}: {n_bytes / 1e6:.2f} MB, {n_tokens:,} tokens")
    print(f"{'encoder':<20}{'median s':>10}{'MB/s':>9}{'M tok/s':>9}{'gpt2kit speed-up':>18}")
    for name, s in medians.items():
        print(f"{name:<20}{s:>10.4f}{n_bytes / s / 1e6:>9.2f}{n_tokens / s / 1e6:>9.2f}{s / ours:>17.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="UTF-8 text file to encode")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repeats per encoder")
    args = parser.parse_args()

    import gpt2kit
    assets = Path(gpt2kit.__file__).parent / "assets"
    text = args.text.read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line]
    with tempfile.TemporaryDirectory() as scratch:
        encoders = build_encoders(assets, Path(scratch))
    reference = encoders["gpt2kit"][0](text)
    for name, (one, batch) in encoders.items():
        assert one(text) == reference and batch(lines[:200]) == encoders["gpt2kit"][1](lines[:200]), name

    print(f"text: {args.text} ({len(lines):,} lines); {args.repeats} interleaved repeats, median")
    medians = time_interleaved({name: (lambda f=one: f(text)) for name, (one, _) in encoders.items()}, args.repeats)
    report("one document", len(text.encode("utf-8")), len(reference), medians)
    n_tokens = sum(len(ids) for ids in encoders["gpt2kit"][1](lines))
    medians = time_interleaved({name: (lambda f=batch: f(lines)) for name, (_, batch) in encoders.items()},
                               args.repeats)
    report("batch of lines", sum(len(line.encode("utf-8")) for line in lines), n_tokens, medians)


if __name__ == "__main__":
    main()
