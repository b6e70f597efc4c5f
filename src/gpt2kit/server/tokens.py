"""POST /tokenize and POST /detokenize, in vLLM's shapes.

    {"model", "prompt"} -> {"count", "max_model_len", "tokens"}
    {"model", "tokens"} -> {"prompt"}

A prompt is tokenized exactly as POST /v1/completions tokenizes it (the same character cap;
special-token text such as <|endoftext|> is ordinary text), so `count` is the prompt_tokens a
completion of it reports.
"""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from ..api import Model
from ..errors import TokenizerError
from .completions import check_model, read_prompts
from .errors import APIError
from .schemas import ErrorResponse
from .settings import ServerConfig


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = Field(default=None, description="the served model id (see /v1/models)")
    prompt: str = Field(description="the text to tokenize, as /v1/completions would")


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int = Field(description="the context window in tokens")
    tokens: list[int]


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = Field(default=None, description="the served model id (see /v1/models)")
    tokens: list[int] = Field(description="token ids, each inside the vocabulary")


class DetokenizeResponse(BaseModel):
    prompt: str = Field(description="the text of the tokens (bytes that are not UTF-8 become U+FFFD)")


def router(model: Model, settings: ServerConfig, served: str) -> APIRouter:
    """The two routes over `model`'s tokenizer; the app adds its API-key check."""
    routes = APIRouter(responses={status: {"model": ErrorResponse} for status in (400, 401, 404)})

    @routes.post("/tokenize", response_model=TokenizeResponse)
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        check_model(body.model, served, settings)
        [ids] = read_prompts(body.prompt, model, settings)
        return TokenizeResponse(count=len(ids), max_model_len=model.config.n_positions, tokens=ids)

    @routes.post("/detokenize", response_model=DetokenizeResponse)
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        check_model(body.model, served, settings)
        try:
            return DetokenizeResponse(prompt=model.tokenizer.decode(body.tokens))
        except TokenizerError as e:
            raise APIError(400, str(e), param="tokens") from None

    return routes
