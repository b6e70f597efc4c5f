"""Configuration dataclasses: the model's shape and the generation options.

This module imports nothing heavy (no torch) so the CLI can build its flags from these fields and
print `--help` at once. Each field's `help` metadata is the one place its meaning and default are
documented; the CLI, the Python API and the server all read it from here.
"""

from __future__ import annotations

import codecs
import hashlib
import math
import os
from dataclasses import dataclass, field, fields, replace
from dataclasses import field as _field  # DataConfig has a field named "field"

from .errors import OptionError

# Defaults the API and the CLI share (torch-free here, so `--help` stays fast):
SCORE_BATCH_SIZE = 8  # context windows per forward pass: Model.score / evaluate, gpt2kit score / eval
EMBED_BATCH_SIZE = 16  # texts per forward pass: Model.embed, gpt2kit embed
POOLS = ("mean", "last")  # how Model.embed pools a text's hidden states; the first is the default
QUANTIZE = ("int8",)  # gpt2kit.load(quantize=...) and --quantize: int8 weights (gpt2kit.quantize)


# Upper bounds of ModelConfig's sizes, far above any GPT-2 (gpt2-xl: 48 layers, 1600 wide) or
# GPT-3 (96, 12288). A config file is untrusted input: past these, describing the model alone
# (even on the meta device) takes minutes (100,000 layers) or overflows torch's size arithmetic
# (n_embd 10**9), before any weight could show the config wrong.
MODEL_LIMITS = {"vocab_size": 2**24, "n_positions": 2**20, "n_embd": 2**16, "n_layer": 1024, "n_head": 2**16}


@dataclass(frozen=True)
class ModelConfig:
    """The GPT-2 architecture's shape (Radford et al. 2019), named as Hugging Face's config.json."""

    vocab_size: int = 50257  # tokens in the vocabulary (the LM head's rows)
    n_positions: int = 1024  # context window: learned position embeddings
    n_embd: int = 768  # width of the residual stream, C
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads per block, nh; head size hs = C // nh
    layer_norm_epsilon: float = 1e-5  # added to the variance in LayerNorm: finite, > 0
    dropout: float = 0.0  # embedding, attention and residual dropout (used only in training)

    def __post_init__(self):
        for name, most in MODEL_LIMITS.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise OptionError(name, f"must be a positive integer, got {value!r}")
            if value > most:
                raise OptionError(name, f"must be at most {most}, got {value}")
        if self.n_embd % self.n_head:
            raise OptionError("n_embd", f"({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if check_finite("layer_norm_epsilon", self.layer_norm_epsilon) <= 0:
            raise OptionError("layer_norm_epsilon", f"must be greater than 0, got {self.layer_norm_epsilon}")
        if not 0.0 <= check_finite("dropout", self.dropout) < 1.0:
            raise OptionError("dropout", f"must be in [0, 1), got {self.dropout}")
        object.__setattr__(self, "layer_norm_epsilon", float(self.layer_norm_epsilon))
        object.__setattr__(self, "dropout", float(self.dropout))

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise OptionError("size", f"must be one of {', '.join(PRESETS)}; got {name!r}")
        return cls(**{**PRESETS[name], **overrides})


# The released GPT-2 family (and two small shapes for training from scratch and for tests).
PRESETS: dict[str, dict] = {
    "distilgpt2": dict(n_layer=6, n_head=12, n_embd=768),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    "tiny": dict(n_layer=4, n_head=4, n_embd=256, n_positions=256),
    "mini": dict(n_layer=6, n_head=6, n_embd=384, n_positions=512),
}

DEFAULT_MAX_NEW_TOKENS = 200
# Most logit_bias entries and bad_words phrases per request: a bounded cost per decoding step, and
# far fewer than GPT-2's 50,257 tokens, so bans cannot leave a row without a token to choose.
MAX_TOKEN_RULES = 300


def check_finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise OptionError(name, f"must be a finite number, got {value!r}")
    return float(value)


def check_integer(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionError(name, f"must be an integer, got {value!r}")
    return value


@dataclass(frozen=True)
class GenerationConfig:
    """How to continue a prompt. The same names and defaults serve the API, CLI and server."""

    max_new_tokens: int | None = field(default=DEFAULT_MAX_NEW_TOKENS, metadata={
        "help": f"tokens to generate after the prompt (default {DEFAULT_MAX_NEW_TOKENS}); "
        "ignored when max_length is set"})
    max_length: int | None = field(default=None, metadata={
        "help": "total length, prompt included, as in the transformers pipeline (default: unset)"})
    min_new_tokens: int = field(default=0, metadata={
        "help": "suppress <|endoftext|> until this many tokens were generated (default 0)"})
    temperature: float = field(default=1.0, metadata={
        "help": "sampling temperature in [0, 2]; 0 means greedy (always the most likely token); tiny "
        "values behave like greedy (default 1.0)"})
    top_k: int = field(default=50, metadata={
        "help": "sample only from the k most likely tokens; 0 disables (default 50)"})
    top_p: float = field(default=1.0, metadata={
        "help": "nucleus sampling: the smallest set of tokens whose probability reaches p, "
        "in (0, 1]; 1 disables (default 1.0)"})
    min_p: float = field(default=0.0, metadata={
        "help": "drop tokens less likely than min_p times the top token's probability, "
        "in [0, 1]; 0 disables (default 0.0)"})
    repetition_penalty: float = field(default=1.0, metadata={
        "help": "divide positive logits (multiply negative ones) of tokens already present by "
        "this, as in CTRL; 1 disables (default 1.0)"})
    presence_penalty: float = field(default=0.0, metadata={
        "help": "subtract this from the logits of tokens already generated, in [-2, 2] (default 0)"})
    frequency_penalty: float = field(default=0.0, metadata={
        "help": "subtract this times the count of each generated token, in [-2, 2] (default 0)"})
    n: int = field(default=1, metadata={"help": "samples per prompt (default 1)"})
    seed: int | None = field(default=None, metadata={
        "help": "random seed; the same prompt, seed and options give the same text "
        "(default: a fresh random seed)"})
    stop: tuple[str, ...] = field(default=(), metadata={
        "help": "strings that end the text (not included in it)"})
    stop_at_eos: bool = field(default=True, metadata={
        "help": "stop at <|endoftext|> (default true)",
        # The CLI's --ignore-eos and the server's ignore_eos set it to false.
        "negated": "keep generating past <|endoftext|> (default: stop there)"})
    logprobs: int | None = field(default=None, metadata={
        "help": "also return the log-probability of each chosen token and of the top N "
        "alternatives, N in [0, 20] (default: off)"})
    logit_bias: tuple[tuple[int, float], ...] = field(default=(), metadata={
        "help": "add BIAS to token ID's logit before sampling, BIAS in [-100, 100], as OpenAI's "
        "logit_bias: -100 bans the token, 100 forces it (or one of the forced tokens); at most "
        f"{MAX_TOKEN_RULES} tokens", "metavar": "ID=BIAS"})
    bad_words: tuple[str, ...] = field(default=(), metadata={
        "help": "a phrase never to generate, as transformers' bad_words_ids: its last token is banned "
        "wherever the text ends with the rest of it; banned as written and after a space (\"cat\" "
        f"also bans \" cat\"); at most {MAX_TOKEN_RULES} phrases", "metavar": "PHRASE"})

    def __post_init__(self):
        if self.max_new_tokens is not None and check_integer("max_new_tokens", self.max_new_tokens) < 1:
            raise OptionError("max_new_tokens", f"must be at least 1, got {self.max_new_tokens}")
        if self.max_length is not None and check_integer("max_length", self.max_length) < 1:
            raise OptionError("max_length", f"must be at least 1, got {self.max_length}")
        if self.max_new_tokens is None and self.max_length is None:
            raise OptionError("max_new_tokens", "or max_length must be set")
        if check_integer("min_new_tokens", self.min_new_tokens) < 0:
            raise OptionError("min_new_tokens", f"must be at least 0, got {self.min_new_tokens}")
        if not 0 <= check_finite("temperature", self.temperature) <= 2:
            raise OptionError("temperature", f"must be in [0, 2], got {self.temperature}")
        if check_integer("top_k", self.top_k) < 0:
            raise OptionError("top_k", f"must be at least 0 (0 disables it), got {self.top_k}")
        if not 0 < check_finite("top_p", self.top_p) <= 1:
            raise OptionError("top_p", f"must be in (0, 1], got {self.top_p}")
        if not 0 <= check_finite("min_p", self.min_p) <= 1:
            raise OptionError("min_p", f"must be in [0, 1], got {self.min_p}")
        if check_finite("repetition_penalty", self.repetition_penalty) <= 0:
            raise OptionError("repetition_penalty", f"must be greater than 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= check_finite(name, getattr(self, name)) <= 2:
                raise OptionError(name, f"must be in [-2, 2], got {getattr(self, name)}")
        if check_integer("n", self.n) < 1:
            raise OptionError("n", f"must be at least 1, got {self.n}")
        if self.n > 1 and self.greedy:
            raise OptionError("n", f"must be 1 with greedy decoding (temperature 0), got {self.n}: "
                              "every sample would be the same text")
        if self.seed is not None and not 0 <= check_integer("seed", self.seed) < 2**63:
            raise OptionError("seed", f"must be in [0, 2**63), got {self.seed}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise OptionError("stop", f"strings must be non-empty text, got {s!r}")
        if self.logprobs is not None and not 0 <= check_integer("logprobs", self.logprobs) <= 20:
            raise OptionError("logprobs", f"must be in [0, 20], got {self.logprobs}")
        object.__setattr__(self, "logit_bias", check_logit_bias(self.logit_bias))
        object.__setattr__(self, "bad_words", check_phrases(self.bad_words))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def sample(self, j: int) -> "GenerationConfig":
        """The options that generate sample `j` of these on its own (n=1): with a seed, the same
        text as sample j of the batched call; without one, a sample as independent as that."""
        return replace(self, n=1, seed=None if self.seed is None else sample_seed(self.seed, j))

    def new_tokens_for(self, prompt_len: int) -> int:
        """How many tokens to generate after a prompt of `prompt_len` tokens (at least 1)."""
        if self.max_length is not None:
            return max(1, self.max_length - prompt_len)
        return self.max_new_tokens


def check_logit_bias(value) -> tuple[tuple[int, float], ...]:
    """logit_bias as sorted (token id, bias) pairs, from a {id: bias} mapping (JSON's keys are
    strings of digits), (id, bias) pairs, or "ID=BIAS" strings (the CLI's --logit-bias)."""
    if isinstance(value, str) or not isinstance(value, (dict, list, tuple)):
        raise OptionError("logit_bias", f"must map token ids to biases, got {value!r}")
    pairs = value.items() if isinstance(value, dict) else [_bias_pair(item) for item in value]
    biases = {_token_id(key): _bias(key, bias) for key, bias in pairs}
    if len(biases) > MAX_TOKEN_RULES:
        raise OptionError("logit_bias", f"may bias at most {MAX_TOKEN_RULES} tokens, got {len(biases)}")
    return tuple(sorted(biases.items()))


def _bias_pair(item) -> tuple:
    if isinstance(item, str):
        key, sep, bias = item.partition("=")
        if not sep:
            raise OptionError("logit_bias", f"must be given as ID=BIAS (e.g. 50256=-100), got {item!r}")
        return key.strip(), bias.strip()
    if not isinstance(item, (list, tuple)) or len(item) != 2:
        raise OptionError("logit_bias", f"entries must be (token id, bias) pairs, got {item!r}")
    return tuple(item)


def _token_id(key) -> int:
    if isinstance(key, str) and key.lstrip("-").isdigit():
        key = int(key)
    if isinstance(key, bool) or not isinstance(key, int):
        raise OptionError("logit_bias", f"keys must be token ids (integers), got {key!r}")
    return key


def _bias(key, bias) -> float:
    value = bias
    if isinstance(bias, str):  # from ID=BIAS
        try:
            value = float(bias)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
        raise OptionError("logit_bias", f"bias of token {key} must be a number in [-100, 100], got {bias}")
    return float(value)


def check_phrases(value) -> tuple[str, ...]:
    """bad_words as a tuple of non-empty strings (one string is one phrase)."""
    phrases = (value,) if isinstance(value, str) else value
    if not isinstance(phrases, (list, tuple)):
        raise OptionError("bad_words", f"must be a list of phrases, got {value!r}")
    for phrase in phrases:
        if not isinstance(phrase, str) or not phrase:
            raise OptionError("bad_words", f"phrases must be non-empty text, got {phrase!r}")
    if len(phrases) > MAX_TOKEN_RULES:
        raise OptionError("bad_words", f"may hold at most {MAX_TOKEN_RULES} phrases, got {len(phrases)}")
    return tuple(dict.fromkeys(phrases))


def sample_seed(seed: int, sample_index: int) -> int:
    """The seed of sample `sample_index` of a prompt: the seed itself for the first sample."""
    if sample_index == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


ENCODING_ERRORS = ("strict", "replace", "ignore", "backslashreplace")
DATA_FORMATS = ("text", "chat")


# Which template chat uses when none is given (gpt2kit.chat.choose_template), said by every flag
# that takes one.
CHAT_TEMPLATE_DEFAULT = ("default: the checkpoint's own template, DialoGPT's convention for DialoGPT "
                         "models, else plain User:/Assistant: turns")

@dataclass(frozen=True)
class DataConfig:
    """Where the training text is and how to read and split it. The CLI builds flags from these
    fields. How long a block is belongs to training (TrainConfig.block_size): it depends on the
    model's context, and resuming checks it."""

    path: str = _field(metadata={
        "help": "training text: a .txt file, a .csv/.tsv file, a .jsonl file or a folder of .txt files"})
    column: str | None = _field(default=None, metadata={
        "help": "CSV/TSV column holding the text (required when the file has several columns)"})
    field: str | None = _field(default=None, metadata={
        "help": "JSONL field holding the text (required when the objects have several fields)"})
    line_by_line: bool = _field(default=False, metadata={
        "help": "plain text: one document per non-empty line (default: one document per file)"})
    encoding: str = _field(default="utf-8", metadata={
        "help": "text encoding of the data files (default utf-8; a UTF-8 byte order mark is skipped)"})
    encoding_errors: str = _field(default="strict", metadata={
        "help": "bytes invalid in the encoding: strict (stop with an error), replace (with U+FFFD), "
        "ignore or backslashreplace (default strict)"})
    val_fraction: float = _field(default=0.05, metadata={
        "help": "fraction of the documents held out for validation, in [0, 0.5]; 0 disables "
        "(default 0.05; ignored with --val-file)"})
    val_file: str | None = _field(default=None, metadata={
        "help": "validation data, read like the training data (default: hold out --val-fraction)"})
    cache_dir: str | None = _field(default=None, metadata={
        "help": "folder for tokenized data (default: $GPT2KIT_CACHE or ~/.cache/gpt2kit/data)"})
    format: str = _field(default="text", metadata={
        "help": "text (each document is text to learn) or chat (a .jsonl file of conversations, one "
        '{"messages": [{"role": ..., "content": ...}, ...]} per line, rendered with the chat template; '
        "the loss is on the assistant's turns only) (default text)"})
    train_on_all_tokens: bool = _field(default=False, metadata={
        "help": "with --format chat: put the loss on every token, system and user turns too "
        "(default: the assistant's turns only)"})
    chat_template: str | None = _field(default=None, metadata={
        "help": f"with --format chat: a Jinja chat template file ({CHAT_TEMPLATE_DEFAULT})"})

    def __post_init__(self):
        for name in ("path", "column", "field", "val_file", "cache_dir", "chat_template"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                object.__setattr__(self, name, value := os.fspath(value))
            if (value is not None or name == "path") and (not isinstance(value, str) or not value):
                raise OptionError(name, f"must be a non-empty string, got {value!r}")
        for name in ("line_by_line", "train_on_all_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise OptionError(name, f"must be true or false, got {getattr(self, name)!r}")
        if self.format not in DATA_FORMATS:
            raise OptionError("format", f"must be one of {', '.join(DATA_FORMATS)}; got {self.format!r}")
        if self.format != "chat" and (self.train_on_all_tokens or self.chat_template is not None):
            name = "train_on_all_tokens" if self.train_on_all_tokens else "chat_template"
            raise OptionError(name, "applies with --format chat only")
        try:
            codecs.lookup(self.encoding)
        except (LookupError, TypeError):
            raise OptionError("encoding", f"{self.encoding!r} is not a known encoding; "
                              "e.g. utf-8, latin-1, cp1252, utf-16") from None
        if self.encoding_errors not in ENCODING_ERRORS:
            raise OptionError("encoding_errors", f"must be one of {', '.join(ENCODING_ERRORS)}; "
                              f"got {self.encoding_errors!r}")
        v = self.val_fraction
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and 0 <= v <= 0.5):
            raise OptionError("val_fraction", f"must be a number in [0, 0.5], got {v!r}")

    @classmethod
    def from_json(cls, saved: dict) -> "DataConfig":
        """The DataConfig a run.json recorded. Runs saved before block_size left DataConfig (issue
        14: it was validated but never read; TrainConfig.block_size is the one training uses)
        still record it, so it is dropped here."""
        return cls(**{name: value for name, value in saved.items() if name != "block_size"})


# Linear layers LoRA can adapt (module-name suffixes in GPT; "c_proj" means both projections).
TARGETS = ("c_attn", "c_proj", "c_fc", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters: which linear layers get one, its rank and its scale."""

    rank: int = field(default=8, metadata={
        "help": "rank r of each adapter's update B @ A (default 8)"})
    alpha: float = field(default=16.0, metadata={
        "help": "the update is scaled by alpha / rank (default 16)"})
    dropout: float = field(default=0.05, metadata={
        "help": "dropout on each adapter's input while training, in [0, 1) (default 0.05)"})
    targets: tuple[str, ...] = field(default=("c_attn",), metadata={
        "help": f"linear layers to adapt, by name: {', '.join(TARGETS)} (c_proj means both); "
        "names may also be given comma-separated (default c_attn)"})

    def __post_init__(self):
        if check_integer("rank", self.rank) < 1:
            raise OptionError("rank", f"must be at least 1, got {self.rank}")
        if check_finite("alpha", self.alpha) <= 0:
            raise OptionError("alpha", f"must be greater than 0, got {self.alpha}")
        if not 0 <= check_finite("dropout", self.dropout) < 1:
            raise OptionError("dropout", f"must be in [0, 1), got {self.dropout}")
        given = (self.targets,) if isinstance(self.targets, str) else self.targets
        # "c_attn,c_proj" as one string or as an item of a list (a repeated --lora-targets)
        targets = [part for t in given for part in (t.split(",") if isinstance(t, str) else [t])]
        targets = tuple(dict.fromkeys(t.strip() if isinstance(t, str) else t for t in targets))
        for t in targets:
            if t not in TARGETS:
                raise OptionError("targets", f"must be among {', '.join(TARGETS)}; got {t!r}")
        if not targets:
            raise OptionError("targets", f"must name at least one of {', '.join(TARGETS)}")
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))
        object.__setattr__(self, "targets", targets)


def option_fields(cls) -> list:
    """The dataclass fields the CLI turns into flags (those with help text)."""
    return [f for f in fields(cls) if "help" in f.metadata]
