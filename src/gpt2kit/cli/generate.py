"""gpt2kit generate: continue prompts, print or save the samples."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..config import GenerationConfig
from ..errors import OptionError
from .files import read_lines, write_output
from .flags import add_dataclass_flags, add_model_flags, generation_config, load_options

SEPARATOR = "=" * 20
GENERATE_EXAMPLES = """examples:
  gpt2kit generate "Hello, I'm a language model," -n 5 --max-length 30 --seed 42
  gpt2kit generate "Once upon a time" -m gpt2-medium --temperature 0.7 --top-k 50 --top-p 0.95
  gpt2kit generate -m ./my-model --prompts-file prompts.txt --output samples.jsonl
  echo "prompt" | gpt2kit generate -m ./my-model --stream
"""


def configure_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", default=None,
                   help='the prompt ("" starts from <|endoftext|>); omitted: one prompt per line '
                   "from --prompts-file or standard input")
    add_model_flags(p)
    p.add_argument("--prompts-file", type=Path, help="text file with one prompt per line")
    p.add_argument("--output", "-o", type=Path,
                   help="write samples to a .txt or .jsonl file instead of standard output")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    add_dataclass_flags(p, GenerationConfig, "generation options (same names and defaults as the Python API)")


def read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt is not None:
        return [args.prompt]
    prompts = read_lines(args.prompts_file, "prompt")
    if prompts is None:
        raise OptionError("prompt", "is missing: give a prompt, --prompts-file FILE, or pipe text in")
    return prompts


def run_generate(args: argparse.Namespace) -> int:
    cfg = generation_config(args)
    prompts = read_prompts(args)
    if args.output and args.output.suffix not in (".txt", ".jsonl"):
        raise OptionError("output", f"must end in .txt or .jsonl, got {args.output.name!r}")
    from ..api import load
    model = load(args.model, **load_options(args))
    if args.stream and not args.output:
        return stream_to_stdout(model, prompts, cfg)
    completions = model.complete(prompts, cfg)
    if args.output:
        write_samples(args.output, prompts, completions)
        print(f"wrote {len(completions)} samples to {args.output}", file=sys.stderr)
    else:
        for k, c in enumerate(completions):
            print((SEPARATOR + "\n") * (k > 0) + prompts[c.prompt_index] + c.text)
    return 0


def stream_to_stdout(model, prompts: list[str], cfg: GenerationConfig) -> int:
    """Each (prompt, sample) in turn, as it is generated: the same texts as without --stream."""
    for i, prompt in enumerate(prompts):
        for j in range(cfg.n):
            if i or j:
                print("\n" + SEPARATOR)
            print(prompt, end="", flush=True)
            for piece in model.stream(prompt, cfg.sample(j)):
                print(piece, end="", flush=True)
    print()
    return 0


def write_samples(path: Path, prompts: list[str], completions) -> None:
    """Write all samples at once through a temporary file, so a failure leaves no partial file."""
    if path.suffix == ".jsonl":
        body = "".join(json.dumps({
            "prompt": prompts[c.prompt_index], "text": c.text, "prompt_index": c.prompt_index,
            "sample_index": c.sample_index, "finish_reason": c.finish_reason,
            "prompt_tokens": c.prompt_tokens, "completion_tokens": len(c.token_ids),
            **({} if c.logprobs is None else {"logprobs": [
                {"token": lp.token, "logprob": lp.logprob,
                 "top": {tok: v for _, tok, v in lp.top}} for lp in c.logprobs]}),
        }, ensure_ascii=False) + "\n" for c in completions)
    else:
        body = f"\n{SEPARATOR}\n".join(prompts[c.prompt_index] + c.text for c in completions) + "\n"
    write_output(path, lambda tmp: tmp.write_text(body, encoding="utf-8"))
