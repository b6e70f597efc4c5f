"""Every error the server returns, in OpenAI's shape, mapped from typed exceptions in one place.

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}

Framework validation errors (FastAPI's 422) are rewritten into the same shape with status 400, so
a client sees one kind of error whatever went wrong. Messages are ours, never a traceback.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import Gpt2kitError, OptionError, PromptTooLong, TokenizerError
from .schemas import GENERATION_PARAMS

# OpenAI's error types; any other 4xx (405, 413, 431, ...) is the client's: invalid_request_error.
TYPES = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error",
         500: "server_error", 503: "overloaded_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, error_type(self.status), self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_type(status: int) -> str:
    return TYPES.get(status, "invalid_request_error" if 400 <= status < 500 else "server_error")


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def from_gpt2kit(e: Gpt2kitError) -> APIError:
    """Our typed exceptions as HTTP errors: bad options and prompts are the client's (400)."""
    if isinstance(e, OptionError):
        param = GENERATION_PARAMS.get(e.field, e.field)  # GenerationConfig's name -> the request's
        return APIError(400, f"{param} {e.problem}", param=param)
    if isinstance(e, PromptTooLong):
        return APIError(400, str(e), param="prompt", code="context_length_exceeded")
    if isinstance(e, TokenizerError):
        return APIError(400, str(e), param="prompt")
    return APIError(500, str(e))


def install(app: FastAPI) -> None:
    """Route every error through the OpenAI body."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(Gpt2kitError)
    async def gpt2kit_error(request: Request, e: Gpt2kitError):
        return from_gpt2kit(e).response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        return validation_to_api_error(e.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return from_http_exception(request, e).response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):
        return APIError(500, f"internal error ({type(e).__name__}); the server keeps running").response()


def from_http_exception(request: Request, e: StarletteHTTPException) -> APIError:
    """Starlette's routing errors, saying what to send instead (its Allow header kept)."""
    message = str(e.detail)
    if e.status_code == 404:
        message = f"there is no {request.url.path} on this server; see /docs for the routes"
    elif e.status_code == 405:
        allowed = (e.headers or {}).get("Allow", "")
        message = f"{request.method} is not allowed on {request.url.path}; use {allowed}"
    return APIError(e.status_code, message, headers=e.headers)


def validation_to_api_error(errors: list[dict]) -> APIError:
    """The first of pydantic's errors as one 400 naming the request field."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    kind = first.get("type", "")
    if kind == "json_invalid":
        return APIError(400, "the request body is not valid JSON")
    if not loc:  # the body itself (an array, a number, null, or not JSON at all)
        return APIError(400, "the request body must be a JSON object (Content-Type: application/json)")
    param = loc[0]
    if param == "prompt":
        return APIError(400, "prompt must be a non-empty string, list of strings, list of token ids "
                        "or list of token-id lists", param="prompt")
    return APIError(400, f"{param}: {first.get('msg', 'invalid value')}", param=param)
