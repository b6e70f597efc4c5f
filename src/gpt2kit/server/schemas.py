"""Request and response bodies of the OpenAI-compatible API, as pydantic models.

Types are strict (`"max_tokens": "ten"` or `true` is an error, never coerced) and unknown fields
are ignored, as OpenAI's API does. Defaults and ranges are not repeated here: the sampling fields
take their defaults from `GenerationConfig`, which also checks their values, so the CLI, the
Python API and the server cannot drift apart. The responses document the shapes in /openapi.json.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..config import GenerationConfig

_DEFAULTS = {f.name: f.default for f in fields(GenerationConfig)}


def _option(name: str, description: str):
    return Field(default=_DEFAULTS[name], description=description)


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
    temperature: float = _option("temperature", "in [0, 2]; 0 is greedy decoding")
    top_p: float = _option("top_p", "nucleus sampling, in (0, 1]")
    n: int = _option("n", "choices per prompt")
    stop: str | list[str] | None = Field(default=None, description="up to 4 strings that end a choice")
    stream: bool = Field(default=False, description="send server-sent events as text is generated")
    stream_options: StreamOptions | None = None
    seed: int | None = _option("seed", "same seed, prompt and options give the same text")
    logprobs: int | None = _option("logprobs", "log-probabilities of the top N tokens, N in [0, 20]")
    echo: bool = Field(default=False, description="put the prompt before the generated text")
    presence_penalty: float = _option("presence_penalty", "in [-2, 2]")
    frequency_penalty: float = _option("frequency_penalty", "in [-2, 2]")
    user: str | None = Field(default=None, description="accepted and ignored")
    top_k: int = _option("top_k", "sample from the k most likely tokens; 0 disables")
    min_p: float = _option("min_p", "in [0, 1]; 0 disables")
    repetition_penalty: float = _option("repetition_penalty", "CTRL's penalty; 1 disables")
    min_tokens: int = Field(default=0, description="suppress the end-of-text token until this many tokens")
    ignore_eos: bool = Field(default=False, description="keep generating past <|endoftext|>")
    slide: bool = Field(default=False, description=(
        "allow prompt + max_tokens beyond the context window: the window slides over the text"))
    best_of: int | None = Field(default=None, description="not supported beyond 1")
    suffix: str | None = Field(default=None, description="not supported")
    logit_bias: dict[str, float] | None = Field(default=None, description="not supported")


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
