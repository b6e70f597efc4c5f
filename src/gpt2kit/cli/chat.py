"""gpt2kit chat: a conversation in the terminal, the history kept within the context window."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Iterator

from ..chat import Message, fit_history
from ..config import CHAT_TEMPLATE_DEFAULT, GenerationConfig
from ..errors import Gpt2kitError
from .files import write_output
from .flags import add_dataclass_flags, add_model_flags, generation_config, load_options

# Lines after "examples:" run in tests/test_readme.py, in a folder holding my-model and runs/jokes.
CHAT_EXAMPLES = """examples:
  gpt2kit chat -m gpt2 --temperature 0.7 --top-p 0.9
  gpt2kit chat -m runs/jokes --system "You tell jokes." --max-new-tokens 60
  echo "Tell me a joke" | gpt2kit chat -m my-model --seed 1
"""
COMMANDS = "/reset, /save PATH, /quit"


def configure_chat(p: argparse.ArgumentParser) -> None:
    add_model_flags(p)
    p.add_argument("--system", default=None, help="a system message that starts the conversation "
                   "(kept when old turns are dropped)")
    p.add_argument("--chat-template", type=Path, default=None,
                   help=f"a Jinja chat template file ({CHAT_TEMPLATE_DEFAULT})")
    add_dataclass_flags(p, GenerationConfig, "generation options (same names and defaults as the Python API)",
                        skip=("n", "logprobs"))


def run_chat(args: argparse.Namespace) -> int:
    cfg = generation_config(args)
    from ..api import load
    model = load(args.model, **load_options(args), chat_template=args.chat_template)
    chat = Conversation(model, cfg, args.system)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {args.model} ({model.chat_template.name}); type a message, or {COMMANDS}",
              file=sys.stderr)
    while (line := read_line(interactive)) is not None:
        if not line.strip():
            continue
        if line.startswith("/"):
            if not chat.command(line.strip()):
                break
            continue
        if (cfg := chat.ask(line)) is None:
            continue
        print("Assistant:" if interactive else "", end=" " if interactive else "", flush=True)
        for piece in chat.answer(cfg):
            print(piece, end="", flush=True)
        print()
    return 0


def read_line(interactive: bool) -> str | None:
    """The user's next line (None at end of input)."""
    if interactive:
        try:
            return input("You: ")
        except EOFError:
            print()
            return None
    line = sys.stdin.readline()
    return line.rstrip("\n") if line else None


class Conversation:
    """The messages so far and how to answer the next one within the model's context."""

    def __init__(self, model, cfg: GenerationConfig, system: str | None = None):
        self.model, self.cfg = model, cfg
        self.start = [Message("system", system)] if system else []
        self.messages = list(self.start)

    def ask(self, text: str) -> GenerationConfig | None:
        """Add the user's `text`, dropping the oldest turns that no longer fit beside room for the
        reply (said on stderr); the options to answer with, or None if `text` alone is too long."""
        self.messages.append(Message("user", text))
        n_ctx = self.model.config.n_positions
        reserve = min(self.cfg.new_tokens_for(0), n_ctx // 2)  # room kept for the reply
        kept, dropped = fit_history(self.messages, lambda m: len(self.model.chat_prompt_ids(m)), n_ctx - reserve)
        prompt = len(self.model.chat_prompt_ids(kept))
        if prompt >= n_ctx:
            self.messages.pop()
            print(f"(that message is {prompt} tokens with the template; the context holds {n_ctx}: say "
                  "something shorter)", file=sys.stderr)
            return None
        if dropped:
            print(f"(dropped the {dropped} oldest message{'s' * (dropped > 1)} to fit the {n_ctx}-token "
                  "context)", file=sys.stderr)
        self.messages = kept
        return replace(self.cfg, max_length=None, max_new_tokens=min(self.cfg.new_tokens_for(prompt), n_ctx - prompt))

    def answer(self, cfg: GenerationConfig) -> Iterator[str]:
        """The assistant's reply, piece by piece; when it is done it joins the history."""
        pieces = []
        for piece in self.model.chat_stream(self.messages, cfg):
            pieces.append(piece)
            yield piece
        self.messages.append(Message("assistant", "".join(pieces).strip()))

    def command(self, line: str) -> bool:
        """Run a /command; False means quit."""
        name, _, rest = line.partition(" ")
        if name in ("/quit", "/exit"):
            return False
        if name == "/reset":
            self.messages = list(self.start)
            print("(conversation reset)", file=sys.stderr)
        elif name == "/save" and rest.strip():
            self.save(Path(rest.strip()))
        else:
            print(f"(unknown command {line!r}; commands: {COMMANDS})", file=sys.stderr)
        return True

    def save(self, path: Path) -> None:
        """The messages as a JSON list of {role, content}; a failed write is said, not fatal."""
        body = json.dumps([asdict(m) for m in self.messages], ensure_ascii=False, indent=1) + "\n"
        try:
            write_output(path, lambda tmp: tmp.write_text(body, encoding="utf-8"))
        except Gpt2kitError as e:
            print(f"error: {e}", file=sys.stderr)
            return
        print(f"(saved {len(self.messages)} messages to {path})", file=sys.stderr)

