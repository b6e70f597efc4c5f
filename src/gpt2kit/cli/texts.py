"""gpt2kit score and gpt2kit embed: one result per line of a text file."""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path

from ..config import EMBED_BATCH_SIZE, POOLS, SCORE_BATCH_SIZE
from ..errors import InputFileError, OptionError
from .files import read_lines, write_output
from .flags import add_model_flags, load_options

SCORE_EXAMPLES = """output: one JSON line per text (to --output, else standard output):
  {"text", "tokens": [token strings], "logprobs": [log p of each token, the first conditioned
  on <|endoftext|>], "nll": mean negative log-likelihood (nats per token), "ppl": exp(nll)}

examples:
  gpt2kit score -m gpt2 texts.txt --output scores.jsonl
  echo "The cat sat on the mat." | gpt2kit score -m gpt2
"""


EMBED_EXAMPLES = """examples:
  gpt2kit embed -m gpt2 texts.txt --output vectors.npy
  gpt2kit embed -m gpt2 texts.txt --output vectors.npy --pool last --layer 6
"""


def add_texts_flags(p: argparse.ArgumentParser, batch_size: int, what: str) -> None:
    p.add_argument("file", nargs="?", type=Path, default=None,
                   help="text file, one text per non-empty line (default: standard input)")
    add_model_flags(p)
    p.add_argument("--batch-size", type=int, default=batch_size,
                   help=f"{what} per forward pass (default {batch_size})")


def configure_score(p: argparse.ArgumentParser) -> None:
    add_texts_flags(p, SCORE_BATCH_SIZE, "context windows")
    p.add_argument("--output", "-o", type=Path, help="write the JSON lines to this .jsonl file "
                   "(atomically) instead of standard output")
    p.add_argument("--stride", type=int, default=None,
                   help="sliding-window step for texts longer than the context (default: half the context)")


def configure_embed(p: argparse.ArgumentParser) -> None:
    add_texts_flags(p, EMBED_BATCH_SIZE, "texts")
    p.add_argument("--output", "-o", type=Path, required=True,
                   help="the .npy file to write: float32 (texts, n_embd), row i for text i")
    p.add_argument("--pool", default=POOLS[0], help="mean: average the tokens' "
                   f"hidden states, last: take the last token's (default: {POOLS[0]})")
    p.add_argument("--layer", type=int, default=-1, help="hidden-state layer: 0 the embedding output, "
                   "i the i-th block's output, -1 the last block's after the final LayerNorm (default -1)")


def run_score(args: argparse.Namespace) -> int:
    """One JSON line per text: text, tokens, logprobs (per token, the first conditioned on
    <|endoftext|>), nll (mean, nats per token) and ppl."""
    texts, model = texts_and_model(args, ".jsonl")
    with text_errors(args.file):
        scores = model.score(texts, stride=args.stride, batch_size=args.batch_size, progress=True)
    decode = model.tokenizer.decode
    body = "".join(json.dumps({"text": t, "tokens": [decode([i]) for i in s.token_ids],
                               "logprobs": s.token_logprobs, "nll": s.nll, "ppl": s.ppl},
                              ensure_ascii=False) + "\n" for t, s in zip(texts, scores))
    if not args.output:
        sys.stdout.write(body)
        return 0
    write_output(args.output, lambda tmp: tmp.write_text(body, encoding="utf-8"))
    from ..api import perplexity
    n_tokens = sum(s.n_tokens for s in scores)
    print(f"wrote {len(scores)} scores to {args.output} ({n_tokens:,} tokens, perplexity "
          f"{perplexity(-sum(s.total for s in scores) / n_tokens):.2f} over all)", file=sys.stderr)
    return 0


def run_embed(args: argparse.Namespace) -> int:
    import numpy as np
    texts, model = texts_and_model(args, ".npy")
    with text_errors(args.file):
        vectors = model.embed(texts, pool=args.pool, layer=args.layer, batch_size=args.batch_size,
                              progress=True).numpy()

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would add .npy to the temporary name
            np.save(f, vectors)
    write_output(args.output, save)
    print(f"wrote {vectors.shape[0]} vectors of {vectors.shape[1]} floats to {args.output}", file=sys.stderr)
    return 0


def texts_and_model(args: argparse.Namespace, suffix: str):
    """The texts to work on and the loaded model, the cheap checks first."""
    texts = read_lines(args.file, "text")
    if texts is None:
        raise InputFileError("no texts: give a file with one text per line, or pipe the text in")
    if args.output and args.output.suffix != suffix:
        raise OptionError("output", f"must end in {suffix}, got {args.output.name!r}")
    from ..api import load
    return texts, load(args.model, **load_options(args))


@contextmanager
def text_errors(path: Path | None):
    """A problem with one text names the input it came from (there is no --text flag to blame)."""
    try:
        yield
    except OptionError as e:
        if e.field != "text":
            raise
        raise InputFileError(f"{path or 'standard input'}: {e}") from None
