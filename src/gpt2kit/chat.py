"""Chat templates: a conversation (system, user and assistant messages) as one text GPT-2 continues.

Every template is a Jinja template, rendered as transformers' `apply_chat_template` renders one
(variables `messages`, `add_generation_prompt`, `bos_token`, `eos_token`), in jinja2's immutable
sandbox: a template shipped with a checkpoint is untrusted input (CVE-2024-34359 was a template
in a model file reaching Python internals through an unsandboxed environment). Three sources:

- `BUILTIN` ("plain"), for base GPT-2: turns as plain text a web-trained model continues well,

      Be brief.

      User: Hi there
      Assistant: Hello!
      User: What is 2 + 2?
      Assistant:

  with a stop at the next "\\nUser:" (the model tends to write the user's next line itself).
- `DIALOGPT`: Microsoft's DialoGPT convention, each turn followed by <|endoftext|> and nothing
  else (the model answers after the last one and ends its turn with <|endoftext|>).
- a Jinja file (`--chat-template PATH`), or the `chat_template` a checkpoint's
  tokenizer_config.json (or chat_template.jinja) carries.

`choose_template` decides: the explicit file > the checkpoint's own template > DialoGPT when the
checkpoint is one > the built-in. `render` also returns where assistant text is, so fine-tuning
can put the loss on it only (`encode_chat`).
"""

from __future__ import annotations

import json
from bisect import bisect_right
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Any, Mapping, Sequence

from .errors import InputFileError, OptionError

ROLES = ("system", "user", "assistant")

BUILTIN_SOURCE = (
    "{% for m in messages %}"
    "{% if m.role == 'system' %}{{ m.content }}\n\n"
    "{% elif m.role == 'user' %}User: {{ m.content }}\n"
    "{% else %}Assistant: {{ m.content }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}")
# transformers' GPT2Tokenizer.default_chat_template before 4.43: DialoGPT's way of joining turns.
DIALOGPT_SOURCE = "{% for message in messages %}{{ message.content }}{{ eos_token }}{% endfor %}"

# Stands for the end-of-text token while a template renders, so that only the template can put
# one in: the same text typed by a user stays ordinary text (special-token injection).
EOS_MARK = "\ue000eos\ue001"
MAX_TEMPLATE_CHARS = 100_000
CHECKPOINT_TEMPLATE_FILE = "chat_template.jinja"  # a template a checkpoint folder carries as a file


@dataclass(frozen=True)
class Message:
    """One turn of a conversation."""

    role: str
    content: str

    def __post_init__(self):
        if self.role not in ROLES:
            raise OptionError("messages", f"role must be one of {', '.join(ROLES)}; got {self.role!r}")
        if not isinstance(self.content, str):
            raise OptionError("messages", f"content must be a string, got {type(self.content).__name__}")
        if EOS_MARK[0] in self.content:
            raise OptionError("messages", "content must not contain the private-use character U+E000")


def to_messages(items: Sequence[Message | Mapping[str, Any]]) -> list[Message]:
    """Messages from `Message`s or {"role", "content"} mappings, checked; errors name the index."""
    if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Sequence) or not items:
        raise OptionError("messages", "must be a non-empty list of {role, content} messages")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, Message):
            if not isinstance(item, Mapping) or "role" not in item or "content" not in item:
                raise OptionError("messages", f"[{i}] must be an object with a role and a content")
            item = _message(item["role"], item["content"], i)
        out.append(item)
    return out


def _message(role: Any, content: Any, index: int) -> Message:
    try:
        return Message(role, content)
    except OptionError as e:
        raise OptionError("messages", f"[{index}] {e.problem}") from None


@dataclass(frozen=True)
class Rendered:
    """A rendered conversation: its text (end-of-text tokens as EOS_MARK) and the character spans
    of assistant turns: their content and what closes it (a stop string or end-of-text)."""

    text: str
    assistant: list[tuple[int, int]]


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template and the strings that end an assistant's turn when generating."""

    source: str
    name: str
    stop: tuple[str, ...] = ()
    _compiled: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if not isinstance(self.source, str) or not self.source.strip():
            raise OptionError("chat_template", f"{self.name}: the template is empty")
        if len(self.source) > MAX_TEMPLATE_CHARS:
            raise OptionError("chat_template", f"{self.name}: the template has {len(self.source)} "
                              f"characters; at most {MAX_TEMPLATE_CHARS} are accepted")
        object.__setattr__(self, "_compiled", _compile(self.source, self.name))

    def render(self, messages: Sequence[Message | Mapping], add_generation_prompt: bool = False) -> Rendered:
        """The conversation as text and where its assistant turns are (for training: an error if
        the template rewrites an assistant's text); `add_generation_prompt` appends what starts
        the assistant's reply."""
        messages = to_messages(messages)
        text = self.render_text(messages, add_generation_prompt)
        return Rendered(text, self._assistant_spans(text, messages))

    def render_text(self, messages: Sequence[Message | Mapping], add_generation_prompt: bool = True) -> str:
        """The conversation as text, end-of-text tokens as EOS_MARK."""
        messages = to_messages(messages)
        try:
            return self._compiled.render(messages=[{"role": m.role, "content": m.content} for m in messages],
                                         add_generation_prompt=add_generation_prompt,
                                         bos_token=EOS_MARK, eos_token=EOS_MARK)
        except Exception as e:  # whatever a template raises (raise_exception, a sandbox refusal, a type error)
            raise OptionError("messages", f"the chat template {self.name} failed to render them: "
                              f"{_one_line(e)}") from None

    def _assistant_spans(self, text: str, messages: list[Message]) -> list[tuple[int, int]]:
        """Each message's content found in order; an assistant span runs on over a stop string or
        end-of-text right after it, or to the end of a text that ends with it (the model must learn
        to end its turn). Templates that drop a
        system or user message are fine; one that rewrites an assistant's text cannot be trained on."""
        spans, at = [], 0
        for m in messages:
            start = text.find(m.content, at)
            if start < 0:
                if m.role == "assistant":
                    raise OptionError("chat_template", f"{self.name} does not put an assistant's text into "
                                      "the conversation verbatim, so its tokens cannot be told apart")
                continue
            at = start + len(m.content)
            if m.role == "assistant":
                end = at + next((len(s) for s in (EOS_MARK, *self.stop) if text.startswith(s, at)), 0)
                spans.append((start, len(text) if not text[end:].strip() else end))  # a last turn: to the end
        return spans


def _compile(source: str, name: str):
    """The template compiled in jinja2's immutable sandbox, with transformers' extras (loop
    controls, `tojson`, `raise_exception`) so templates written for transformers render here."""
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise OptionError("chat_template", "chat templates need jinja2: pip install jinja2") from None

    def raise_exception(message: str):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise OptionError("chat_template", f"{name} is not a valid Jinja template: {_one_line(e)}") from None


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


BUILTIN = ChatTemplate(BUILTIN_SOURCE, "built-in (plain User:/Assistant: turns)", stop=("\nUser:",))
DIALOGPT = ChatTemplate(DIALOGPT_SOURCE, "DialoGPT (turns separated by <|endoftext|>)")


def template_file(path: str | Path) -> ChatTemplate:
    """A Jinja chat template read from a file (--chat-template PATH)."""
    path = Path(path)
    try:
        return ChatTemplate(path.read_text(encoding="utf-8"), str(path))
    except (OSError, UnicodeDecodeError) as e:
        raise InputFileError(f"cannot read the chat template {path}: {getattr(e, 'strerror', None) or e}") from None


def checkpoint_template(folder: Path) -> ChatTemplate | None:
    """The template a checkpoint folder carries: chat_template.jinja, else tokenizer_config.json's
    `chat_template` (a string, or a list of named templates of which "default" is taken)."""
    jinja = folder / CHECKPOINT_TEMPLATE_FILE
    if jinja.is_file():
        return template_file(jinja)
    config = _read_json(folder / "tokenizer_config.json")
    source = config.get("chat_template")
    if isinstance(source, list):
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    return ChatTemplate(source, f"{folder / 'tokenizer_config.json'} chat_template") if source else None


def is_dialogpt(folder: Path) -> bool:
    """DialoGPT checkpoints are plain GPT-2s; what tells them apart is their config.json's
    `task_specific_params.conversational` (set for transformers' conversational pipeline) or,
    for copies without it, Microsoft's hub name in the folder's path (`models--microsoft--DialoGPT-*`
    in the hub cache, or `_name_or_path`)."""
    config = _read_json(folder / "config.json")
    params = config.get("task_specific_params")
    if isinstance(params, dict) and "conversational" in params:
        return True
    names = (str(folder), str(config.get("_name_or_path", "")))
    return any("dialogpt" in n.lower() for n in names)


def choose_template(path: str | Path | None = None, folder: Path | None = None) -> ChatTemplate:
    """The explicit file, else the checkpoint's own template, else DialoGPT's convention for a
    DialoGPT checkpoint, else the built-in one."""
    if path is not None:
        return template_file(path)
    if folder is not None:
        if (own := checkpoint_template(folder)) is not None:
            return own
        if is_dialogpt(folder):
            return DIALOGPT
    return BUILTIN


def _read_json(path: Path) -> dict:
    """A small JSON object from a checkpoint folder, or {} if there is none (the loader reports
    files it needs; here a missing or odd file only means "no template said so")."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def encode_chat(tokenizer, rendered: Rendered) -> tuple[list[int], list[bool]]:
    """Token ids of a rendered conversation and, per token, whether it is assistant text. The
    text between end-of-text marks is encoded as ordinary text (special-token text typed by a
    user stays text); a token counts as assistant text if any of its bytes are."""
    ids: list[int] = []
    mask: list[bool] = []
    offset = 0
    for k, piece in enumerate(rendered.text.split(EOS_MARK)):
        if k:
            mark = offset - len(EOS_MARK)
            ids.append(tokenizer.eos_id)
            mask.append(_overlaps(rendered.assistant, mark, offset))
        piece_ids = tokenizer.encode(piece)
        ends = list(accumulate(len(tokenizer.token_bytes(t)) for t in piece_ids))
        chars = list(accumulate((len(c.encode("utf-8", "surrogatepass")) for c in piece), initial=0))
        start = 0
        for t, end in zip(piece_ids, ends):
            # byte offsets -> the characters they touch (a token may hold part of a character)
            first, last = bisect_right(chars, start) - 1, bisect_right(chars, end - 1)
            ids.append(t)
            mask.append(_overlaps(rendered.assistant, offset + first, offset + last))
            start = end
        offset += len(piece) + len(EOS_MARK)
    return ids, mask


def _overlaps(spans: list[tuple[int, int]], start: int, end: int) -> bool:
    return any(s < end and start < e for s, e in spans)


def prompt_ids(tokenizer, template: ChatTemplate, messages: Sequence[Message | Mapping]) -> list[int]:
    """The token ids a model continues to answer `messages`."""
    return encode_chat(tokenizer, Rendered(template.render_text(messages, add_generation_prompt=True), []))[0]


def fit_history(messages: list[Message], count, limit: int) -> tuple[list[Message], int]:
    """The conversation cut to at most `limit` tokens (`count(messages)` measures it): the oldest
    turns after any leading system message go first, the last message always stays. Returns the
    kept messages and how many were dropped."""
    head = 1 if messages and messages[0].role == "system" else 0
    kept, dropped = list(messages), 0
    while count(kept) > limit and len(kept) - head > 1:
        del kept[head]
        dropped += 1
    return kept, dropped
