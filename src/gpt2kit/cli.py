"""`gpt2kit`: a thin command-line layer over the Python API.

Generation flags are built from `GenerationConfig`'s fields, so `--help`, the API and (later) the
server share one set of names, defaults and checks. Heavy imports happen inside the commands:
`gpt2kit --help` never loads torch. Errors become one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from .config import DataConfig, GenerationConfig, LoraConfig, option_fields
from .errors import Gpt2kitError, InputFileError, OptionError

# Fields whose flag is not simply --field-name (the CLI keeps the names users know).
FLAGS = {"n": ("-n", "--num-samples"), "stop_at_eos": ("--ignore-eos",)}
# OptionError fields that only LoRA's options have, shown with the CLI's --lora- prefix.
ERROR_FLAGS = {"rank": "--lora-rank", "alpha": "--lora-alpha", "targets": "--lora-targets"}
SEPARATOR = "=" * 20

GENERATE_EXAMPLES = """examples:
  gpt2kit generate "Hello, I'm a language model," -n 5 --max-length 30 --seed 42
  gpt2kit generate "Once upon a time" -m gpt2-medium --temperature 0.7 --top-k 50 --top-p 0.95
  gpt2kit generate -m ./my-model --prompts-file prompts.txt --output samples.jsonl
  echo "prompt" | gpt2kit generate -m ./my-model --stream
"""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see: {self.prog} --help)\n")


def flag_of(field_name: str) -> str:
    if field_name in ERROR_FLAGS:
        return ERROR_FLAGS[field_name]
    return FLAGS.get(field_name, ("--" + field_name.replace("_", "-"),))[-1]


SCALARS = {"int": int, "float": float, "str": str}


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, title: str, skip: tuple[str, ...] = (),
                        prefix: str = "") -> None:
    """One flag per documented field of `cls` (named --PREFIX-FIELD-NAME); unset flags stay None
    so the dataclass defaults (documented once, in its help text) apply."""
    group = parser.add_argument_group(title)
    for f in option_fields(cls):
        if f.name in skip:
            continue
        dest = prefix + f.name
        names = FLAGS.get(dest, ("--" + dest.replace("_", "-"),))
        kind = str(f.type).replace(" | None", "")
        if f.name == "stop_at_eos":
            group.add_argument(*names, dest=dest, action="store_false", default=None,
                               help="keep generating past <|endoftext|> (default: stop there)")
        elif kind == "bool":
            group.add_argument(*names, dest=dest, action="store_true", default=None, help=f.metadata["help"])
        elif kind.startswith("tuple"):
            group.add_argument(*names, dest=dest, action="append", default=None, metavar="TEXT",
                               help=f.metadata["help"] + " (may be repeated)")
        else:
            group.add_argument(*names, dest=dest, type=SCALARS.get(kind, str), default=None,
                               metavar=f.name.upper(), help=f.metadata["help"])


def options_for(cls, args: argparse.Namespace, prefix: str = "") -> dict:
    """The fields of `cls` given on the command line (flags left unset are omitted)."""
    return {f.name: tuple(v) if isinstance(v, list) else v
            for f in fields(cls) if (v := getattr(args, prefix + f.name, None)) is not None}


def generation_config(args: argparse.Namespace) -> GenerationConfig:
    """The GenerationConfig for the flags given; the dataclass defaults fill the rest."""
    given = options_for(GenerationConfig, args)
    if "max_length" in given and "max_new_tokens" not in given:
        given["max_new_tokens"] = None
    return GenerationConfig(**given)


def add_model_flags(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument("-m", "--model", default=None if required else "gpt2",
                        help="hub id (gpt2, distilgpt2, openai-community/gpt2-large, ...), a "
                        "Hugging Face-layout folder, or a weights file (default: gpt2)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--dtype", default="auto",
                        help="auto | float32 | bfloat16 | float16 (auto: bfloat16 on CUDA, float32 on CPU)")


def build_parser() -> Parser:
    parser = Parser(prog="gpt2kit", description="Generate with, fine-tune and serve GPT-2.")
    parser.add_argument("--version", action="version", version=f"gpt2kit {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, (run, configure, summary) in COMMANDS.items():
        p = sub.add_parser(name, help=summary, description=summary,
                           epilog=EXAMPLES.get(name),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        configure(p)
        p.set_defaults(run=run)
    return parser


def _version() -> str:
    from . import __version__
    return __version__


# --- generate -------------------------------------------------------------------------------

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
    if args.prompts_file is not None:
        try:
            data = args.prompts_file.read_bytes()
        except OSError as e:
            raise InputFileError(f"cannot read prompts file {args.prompts_file}: {e.strerror}") from None
        text = decode_utf8(data, args.prompts_file)
    elif not sys.stdin.isatty():
        text = decode_utf8(sys.stdin.buffer.read(), "standard input")
    else:
        raise OptionError("prompt", "is missing: give a prompt, --prompts-file FILE, or pipe text in")
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InputFileError(f"no prompts found in {args.prompts_file or 'standard input'} "
                             "(one prompt per non-empty line)")
    return prompts


def decode_utf8(data: bytes, name) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise InputFileError(f"{name} is not valid UTF-8 at byte {e.start} (line {line}); "
                             "save it as UTF-8") from None


def run_generate(args: argparse.Namespace) -> int:
    cfg = generation_config(args)
    prompts = read_prompts(args)
    if args.output and args.output.suffix not in (".txt", ".jsonl"):
        raise OptionError("output", f"must end in .txt or .jsonl, got {args.output.name!r}")
    from .api import load
    model = load(args.model, device=args.device, dtype=args.dtype)
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
    from dataclasses import replace
    from .generate import generate_events
    for i, prompt in enumerate(prompts):
        ids = model.tokenizer.encode(prompt)
        for j in range(cfg.n):
            if i or j:
                print("\n" + SEPARATOR)
            print(prompt, end="", flush=True)
            one = replace(cfg, n=1)
            for event in generate_events(model.module, model.tokenizer, [ids], one, [j], [i]):
                print(event.text, end="", flush=True)
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
    from .atomic import write_atomically
    try:
        write_atomically(path, lambda tmp: tmp.write_text(body, encoding="utf-8"))
    except OSError as e:
        raise InputFileError(f"cannot write {path}: {e.strerror}") from None


# --- info -----------------------------------------------------------------------------------

def configure_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="hub id, Hugging Face-layout folder or weights file")
    p.add_argument("--device", default="cpu", help="where to load it (default: cpu)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def run_info(args: argparse.Namespace) -> int:
    from .api import load
    info = load(args.model, device=args.device, dtype=args.dtype).info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for key, value in info.items():
            if key == "parameters":
                value = f"{value:,} ({value / 1e6:.1f}M)"
            print(f"{key.replace('_', ' '):<{width}}  {value}")
    return 0


# --- eval -----------------------------------------------------------------------------------

READ_ONLY_DATA = ("path", "val_fraction", "val_file", "block_size", "cache_dir")


def configure_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="text to score: .txt, .csv/.tsv (with --column), .jsonl (with --field) "
                   "or a folder of .txt files, read as fine-tuning reads it")
    add_model_flags(p)
    add_dataclass_flags(p, DataConfig, "data options", skip=READ_ONLY_DATA)
    p.add_argument("--stride", type=int, default=None,
                   help="sliding-window step for texts longer than the context (default: half the context)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def run_eval(args: argparse.Namespace) -> int:
    data = DataConfig(path=args.data, **options_for(DataConfig, args))
    from .api import load
    scores = load(args.model, device=args.device, dtype=args.dtype).evaluate(data, stride=args.stride)
    result = {"loss": scores.nll, "perplexity": scores.ppl, "tokens": scores.n_tokens}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"loss {scores.nll:.4f}  perplexity {scores.ppl:.2f}  ({scores.n_tokens:,} tokens)")
    return 0


# --- finetune -------------------------------------------------------------------------------

FINETUNE_EXAMPLES = """examples:
  gpt2kit finetune ../shared/data/onelinefun.csv --column Joke -m gpt2 --out runs/jokes --epochs 10
  gpt2kit finetune data.txt --out runs/x --resume          # continue after a crash or Ctrl-C
  gpt2kit finetune data.jsonl --field text --lora --out runs/y
  gpt2kit finetune corpus.txt --from-scratch --size tiny --out runs/t
  torchrun --nproc_per_node=2 -m gpt2kit finetune data.txt --out runs/ddp
"""


def configure_finetune(p: argparse.ArgumentParser) -> None:
    from .train_config import TrainConfig
    p.add_argument("data", nargs="?", default=None,
                   help="training text: .txt, .csv/.tsv (with --column), .jsonl (with --field) or a "
                   "folder of .txt files (optional with --resume: the run's data is reused)")
    p.add_argument("-m", "--model", default=None, help="model to start from: hub id, folder or weights "
                   "file (default gpt2; with --resume, the run's)")
    add_dataclass_flags(p, TrainConfig, "training options")
    add_dataclass_flags(p, DataConfig, "data options", skip=("path", "block_size"))
    add_dataclass_flags(p, LoraConfig, "LoRA options (with --lora)", prefix="lora_")


def run_finetune(args: argparse.Namespace) -> int:
    from .train import finetune
    from .train_config import TrainConfig
    data_options = options_for(DataConfig, args)
    data = DataConfig(path=args.data, **data_options) if args.data else None
    if data_options and data is None:
        raise OptionError("data", "options need the data file: repeat its path with --resume")
    lora_options = options_for(LoraConfig, args, prefix="lora_")
    lora = LoraConfig(**lora_options) if lora_options else None
    result = finetune(data, args.model, lora=lora, progress=True, **options_for(TrainConfig, args))
    print(f"{result.status}: {result.steps} steps; model saved in {result.out} "
          f"(gpt2kit generate -m {result.out} ...)", file=sys.stderr)
    return 0


# --- serve ----------------------------------------------------------------------------------

SERVE_EXAMPLES = """examples:
  gpt2kit serve -m runs/jokes --port 8000            # then open http://127.0.0.1:8000/
  gpt2kit serve -m gpt2 --host 0.0.0.0 --api-key s3cret --max-batch 8
"""


def configure_serve(p: argparse.ArgumentParser) -> None:
    add_model_flags(p)
    from .server.settings import ServerConfig
    add_dataclass_flags(p, ServerConfig, "server options")


def run_serve(args: argparse.Namespace) -> int:
    import os
    from .server import ServerConfig, serve
    options = options_for(ServerConfig, args)
    if "api_key" not in options and os.environ.get("GPT2KIT_API_KEY"):
        options["api_key"] = os.environ["GPT2KIT_API_KEY"]
    serve(args.model, ServerConfig(**options), device=args.device, dtype=args.dtype)
    return 0


COMMANDS = {
    "generate": (run_generate, configure_generate, "continue prompts with a GPT-2 model"),
    "info": (run_info, configure_info, "describe a model: architecture, size, dtype, tokenizer, source"),
    "finetune": (run_finetune, configure_finetune, "fine-tune GPT-2 on your text (or train one from scratch)"),
    "eval": (run_eval, configure_eval, "token-level loss and perplexity of a model on a file"),
    "serve": (run_serve, configure_serve, "serve a model over an OpenAI-compatible HTTP API, with a playground"),
}


EXAMPLES = {"generate": GENERATE_EXAMPLES, "finetune": FINETUNE_EXAMPLES, "serve": SERVE_EXAMPLES}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except OptionError as e:
        print(f"error: {e.as_flag(flag_of(e.field))}", file=sys.stderr)
        return e.exit_code
    except Gpt2kitError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `gpt2kit generate ... | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
