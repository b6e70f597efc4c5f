"""Request and response bodies of the OpenAI-compatible API, as pydantic models.

Types are strict (`"max_tokens": "ten"` or `true` is an error, never coerced) and unknown fields
are ignored, as OpenAI's API does. Defaults, ranges and descriptions are not repeated here: the
sampling fields take them from `GenerationConfig` (which also checks the values) and the limits
from `ServerConfig`, so the CLI, the Python API and the server cannot drift apart. The responses
document the shapes in /openapi.json.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..config import GenerationConfig
from .settings import ServerConfig

_DEFAULTS = {f.name: f.default for f in fields(GenerationConfig)}
_HELP = {f.name: f.metadata["help"] for f in fields(GenerationConfig)}
_NEGATED = {f.name: f.metadata["negated"] for f in fields(GenerationConfig) if "negated" in f.metadata}

# GenerationConfig fields a request names otherwise: OpenAI's max_tokens, and vLLM's min_tokens
# and ignore_eos (the negation of stop_at_eos).
RENAMED = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "stop_at_eos": "ignore_eos"}
# GenerationConfig fields no request sets, with the reason.
NOT_SERVED = {"max_length": "OpenAI's max_tokens counts generated tokens only; the prompt's length "
              "plus max_tokens is that total"}
# Every other GenerationConfig field -> the request field that sets it (and that errors name).
GENERATION_PARAMS = {f.name: RENAMED.get(f.name, f.name) for f in fields(GenerationConfig)
                     if f.name not in NOT_SERVED}


def _option(name: str):
    """A sampling field: GenerationConfig's default and description."""
    return Field(default=_DEFAULTS[name], description=_HELP[name])


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """POST /v1/completions. Sampling fields have the CLI's names and defaults."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = Field(default=None, description="the served model id (see /v1/models)")
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="text, a batch of texts, token ids, or a batch of token-id lists")
    max_tokens: int | None = Field(default=None, description=(
        f"tokens to generate per choice (default {_DEFAULTS['max_new_tokens']}, or what is left of "
        "the context window if that is less)"))
    temperature: float = _option("temperature")
    top_p: float = _option("top_p")
    n: int = _option("n")
    stop: str | list[str] | None = Field(default=None, description=(
        f"{_HELP['stop']}; at most max_stop of them, each at most max_stop_chars characters long "
        f"(server settings; default {ServerConfig.max_stop} and {ServerConfig.max_stop_chars})"))
    stream: bool = Field(default=False, description="send server-sent events as text is generated")
    stream_options: StreamOptions | None = None
    seed: int | None = _option("seed")
    logprobs: int | None = _option("logprobs")
    echo: bool = Field(default=False, description="put the prompt before the generated text")
    presence_penalty: float = _option("presence_penalty")
    frequency_penalty: float = _option("frequency_penalty")
    user: str | None = Field(default=None, description="accepted and ignored")
    top_k: int = _option("top_k")
    min_p: float = _option("min_p")
    repetition_penalty: float = _option("repetition_penalty")
    min_tokens: int = Field(default=_DEFAULTS["min_new_tokens"], description=_HELP["min_new_tokens"])
    ignore_eos: bool = Field(default=not _DEFAULTS["stop_at_eos"],
                             description=_NEGATED["stop_at_eos"])
    slide: bool = Field(default=False, description=(
        "allow prompt + max_tokens beyond the context window (the prompt itself must fit): the "
        "window slides over the text as it grows"))
    best_of: int | None = Field(default=None, description="not supported beyond 1")
    suffix: str | None = Field(default=None, description="not supported")
    logit_bias: dict[str, float] | None = Field(default=None, description=(
        "token id (as a string) -> bias: " + _HELP["logit_bias"]))
    bad_words: list[str] = Field(default_factory=list, description=_HELP["bad_words"])


class Logprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class Choice(BaseModel):
    index: int
    text: str
    logprobs: Logprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Completion(BaseModel):
    """The response, and (with `stream`) each server-sent event's data."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "gpt2kit"
    max_model_len: int = Field(description="the context window in tokens")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
