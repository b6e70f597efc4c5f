"""`gpt2kit`: a thin command-line layer over the Python API, one module per group of commands.

Option flags are built from the same dataclasses the API and the server take (`flags.py`), so
`--help`, the API and the server share one set of names, defaults and checks. Heavy imports
happen inside the commands: `gpt2kit --help` never loads torch. Errors become one line on stderr
and a non-zero exit."""

from __future__ import annotations

import argparse
import sys

from ..errors import Gpt2kitError, OptionError
from .chat import CHAT_EXAMPLES, configure_chat, run_chat
from .flags import Parser, flag_of
from .generate import GENERATE_EXAMPLES, configure_generate, run_generate
from .messages import show_library_messages
from .models import CONVERT_EXAMPLES, configure_convert, configure_info, run_convert, run_info
from .serve import SERVE_EXAMPLES, configure_serve, run_serve
from .texts import EMBED_EXAMPLES, SCORE_EXAMPLES, configure_embed, configure_score, run_embed, run_score
from .training import FINETUNE_EXAMPLES, configure_eval, configure_finetune, run_eval, run_finetune


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
    from .. import __version__
    return __version__


COMMANDS = {
    "generate": (run_generate, configure_generate, "continue prompts with a GPT-2 model"),
    "chat": (run_chat, configure_chat, "a conversation with a model in the terminal; during it: /reset, /save PATH, /quit"),
    "info": (run_info, configure_info, "describe a model: architecture, size, dtype, tokenizer, source"),
    "finetune": (run_finetune, configure_finetune, "fine-tune GPT-2 on your text (or train one from scratch)"),
    "eval": (run_eval, configure_eval, "token-level loss and perplexity of a model on a file"),
    "serve": (run_serve, configure_serve, "serve a model over an OpenAI-compatible HTTP API, with a playground"),
    "score": (run_score, configure_score, "per-token log-probabilities, loss and perplexity of each line of a file"),
    "embed": (run_embed, configure_embed, "one vector per line of a file (pooled hidden states), saved as .npy"),
    "convert": (run_convert, configure_convert, "write a model as a Hugging Face folder or a GGUF file"),
}


EXAMPLES = {"generate": GENERATE_EXAMPLES, "chat": CHAT_EXAMPLES, "finetune": FINETUNE_EXAMPLES, "serve": SERVE_EXAMPLES,
            "score": SCORE_EXAMPLES, "embed": EMBED_EXAMPLES, "convert": CONVERT_EXAMPLES}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    show_library_messages()
    try:
        return args.run(args)
    except OptionError as e:
        print(f"error: {e.as_flag(flag_of(e.field))}", file=sys.stderr)
        return e.exit_code
    except Gpt2kitError as e:
        print(f"{e.label}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `gpt2kit generate ... | head`
        sys.stderr.close()
        return 0

