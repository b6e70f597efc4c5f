"""POST /v1/chat/completions: OpenAI's chat shapes over the completions path.

A chat request is its messages rendered by the model's chat template (gpt2kit.chat) into token
ids, then planned, queued and decoded exactly as a completion request (completions.plan, the one
scheduler); only the answer's shape differs: `chat.completion` with a `message`, or streamed
`chat.completion.chunk`s whose `delta` carries the role first, then the text. The template's end
of turn (the built-in one's "\\nUser:") is added to the request's stop strings.
"""

from __future__ import annotations

import uuid
from typing import Any, AsyncIterator, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, create_model

from ..api import Model
from ..chat import prompt_ids
from ..errors import Gpt2kitError
from ..inference.generate import Completion, TokenLogprob
from . import completions
from .completions import Plan
from .errors import APIError, from_gpt2kit
from .metrics import Metrics
from .scheduler import Job, JobFailed, Scheduler
from .schemas import CompletionRequest, ErrorResponse, Usage
from .settings import ServerConfig

# Completion fields a chat request does not have (it has messages, and logprobs as a switch).
NOT_CHAT = {"prompt", "echo", "best_of", "suffix", "logprobs"}
MAX_TOP_LOGPROBS = 20
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role


class ChatFields(BaseModel):
    """The fields only a chat request has; the sampling fields are CompletionRequest's."""

    model_config = ConfigDict(strict=True, extra="ignore")

    messages: list[dict[str, Any]] = Field(description=(
        "the conversation: {role, content} objects, role system, user or assistant ('developer' "
        "is read as system); content a string or a list of text parts"))
    logprobs: bool = Field(default=False, description="return the log-probability of each token")
    top_logprobs: int | None = Field(default=None, description=(
        f"with logprobs: also the N most likely tokens at each position, N in [0, {MAX_TOP_LOGPROBS}]"))
    max_completion_tokens: int | None = Field(default=None, description="OpenAI's newer name for max_tokens")


ChatRequest = create_model(
    "ChatCompletionRequest", __base__=ChatFields, __doc__="POST /v1/chat/completions.",
    **{name: (f.annotation, f) for name, f in CompletionRequest.model_fields.items() if name not in NOT_CHAT})


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    """Each server-sent event's data when streaming."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


def router(model: Model, settings: ServerConfig, served: str, scheduler: Scheduler, metrics: Metrics,
           dependencies: list) -> APIRouter:
    """The chat route over `create_app`'s model, scheduler and metrics; `dependencies`: its
    API-key check."""
    api = APIRouter(dependencies=dependencies)
    errors = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 500, 503)}

    @api.post("/v1/chat/completions", response_model=ChatCompletion, responses=errors)
    async def create_chat_completion(body: ChatRequest, request: Request):
        plan = chat_plan(body, model, settings, served)
        metrics.prompt_tokens.inc(sum(map(len, plan.prompts)))
        job = completions.submit(scheduler, plan)
        if body.stream:
            return StreamingResponse(stream(plan, job, model, scheduler), media_type="text/event-stream")
        return response(plan, await completions.collect(job, scheduler, request), model)

    return api


def chat_plan(body: ChatFields, model: Model, settings: ServerConfig, served: str) -> Plan:
    """The request checked and rendered into a completion plan (with a chat id)."""
    messages = read_messages(body.messages, settings)
    try:
        ids = prompt_ids(model.tokenizer, model.chat_template, messages)
    except Gpt2kitError as e:
        raise from_gpt2kit(e) from None
    fields = {name: getattr(body, name) for name in CompletionRequest.model_fields if name not in NOT_CHAT}
    if body.max_completion_tokens is not None:
        fields["max_tokens"] = body.max_completion_tokens
    request = CompletionRequest(**fields, prompt=ids, logprobs=top_logprobs(body))
    try:
        plan = completions.plan(request, model, settings, served, extra_stop=model.chat_template.stop)
    except APIError as e:
        if e.param == "prompt":  # the rendered conversation is the prompt: name what the client sent
            e.param = "messages"
        raise
    plan.id = f"chatcmpl-{uuid.uuid4().hex}"
    return plan


def read_messages(items: list[dict[str, Any]], settings: ServerConfig) -> list[dict[str, str]]:
    """OpenAI's message objects as {role, content} strings: text parts joined, 'developer' read as
    system, the total length capped before anything is tokenized. Roles are checked by the
    template (gpt2kit.chat.Message)."""
    if not items:
        raise APIError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
    out, chars = [], 0
    for i, item in enumerate(items):
        role, content = item.get("role"), item.get("content")
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                             and isinstance(p.get("text"), str) for p in content):
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string or a list of text parts, got "
                           f"{type(content).__name__}", param="messages")
        chars += len(content)
        out.append({"role": ROLE_ALIASES.get(role, role), "content": content})
    if chars > settings.max_prompt_chars:
        raise APIError(400, f"the messages have {chars} characters; this server accepts at most "
                       f"{settings.max_prompt_chars}", param="messages", code="context_length_exceeded")
    return out


def top_logprobs(body: ChatFields) -> int | None:
    """The completions path's `logprobs` (alternatives per token, or None for off)."""
    if body.top_logprobs is not None:
        if not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if not 0 <= body.top_logprobs <= MAX_TOP_LOGPROBS:
            raise APIError(400, f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {body.top_logprobs}",
                           param="top_logprobs")
    return (body.top_logprobs or 0) if body.logprobs else None


def logprobs_body(entries: list[TokenLogprob] | None, model: Model) -> ChoiceLogprobs | None:
    """OpenAI's chat logprobs: each token with its UTF-8 bytes and its top alternatives."""
    if entries is None:
        return None

    def top(token_id: int, token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(model.tokenizer.token_bytes(token_id))}

    return ChoiceLogprobs(content=[ChatTokenLogprob(**top(e.token_id, e.token, e.logprob),
                                                    top_logprobs=[TopLogprob(**top(*t)) for t in e.top])
                                   for e in entries])


def response(plan: Plan, done: list[Completion], model: Model) -> ChatCompletion:
    choices = [ChatChoice(index=i, message=ChatMessage(content=c.text), finish_reason=c.finish_reason,
                          logprobs=logprobs_body(c.logprobs, model)) for i, c in enumerate(done)]
    return ChatCompletion(id=plan.id, created=plan.created, model=plan.model_name, choices=choices,
                          usage=completions.usage(plan, done))


async def stream(plan: Plan, job: Job, model: Model, scheduler: Scheduler) -> AsyncIterator[str]:
    """Server-sent events: each choice's role, then its text as it comes with finish_reason on the
    last piece, then usage if asked for, then [DONE]. A failure after the start is an error event."""
    done: list[Completion] = []
    try:
        yield chunk(plan, [ChunkChoice(index=i, delta=Delta(role="assistant", content=""))
                           for i in range(len(plan.rows))])
        while (item := await job.events.get()) is not None:
            if isinstance(item, JobFailed):
                yield f"data: {APIError(500, str(item)).response().body.decode()}\n\n"
                break
            reason = item.completion.finish_reason if item.completion else None
            if item.completion is not None:
                done.append(item.completion)
            if item.text or reason or item.logprobs:
                yield chunk(plan, [ChunkChoice(index=item.row - job.first, delta=Delta(content=item.text or None),
                                               logprobs=logprobs_body(item.logprobs, model), finish_reason=reason)])
        else:
            options = plan.request.stream_options
            if options is not None and options.include_usage:
                yield chunk(plan, [], completions.usage(plan, done))
        yield "data: [DONE]\n\n"
    finally:
        scheduler.cancel(job)  # a client that left frees its rows at the next step


def chunk(plan: Plan, choices: list[ChunkChoice], usage: Usage | None = None) -> str:
    body = ChatCompletionChunk(id=plan.id, created=plan.created, model=plan.model_name, choices=choices, usage=usage)
    return f"data: {body.model_dump_json(exclude_none=True)}\n\n"
