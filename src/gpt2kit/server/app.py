"""The HTTP layer: `create_app(model, settings)` builds the FastAPI app over one scheduler.

Routes: POST /v1/completions (plain or server-sent events), GET /v1/models, POST /tokenize and
/detokenize (tokens.py), GET /metrics (metrics.py), GET /health, and the playground page at /.
Handlers only check, queue and translate: decoding happens on the scheduler's thread, never on
the event loop.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from contextlib import asynccontextmanager, nullcontext
from dataclasses import fields
from importlib import resources
from typing import AsyncIterator

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, StreamingResponse

from ..api import Model
from ..config import GenerationConfig
from ..errors import OptionError
from ..inference.adapters import AdapterRows
from ..inference.generate import Completion, Event
from ..inference.prefix_cache import PrefixCache
from . import adapters, chat, completions, errors, tokens
from .adapters import ServedModels
from .completions import Plan
from .errors import APIError
from .metrics import CountRequests, Metrics
from .scheduler import Job, JobFailed, Scheduler
from .schemas import Choice, CompletionRequest, ErrorResponse
from .schemas import Completion as CompletionBody
from .settings import ServerConfig

ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 500, 503)}


def create_app(model: Model, settings: ServerConfig, served: str | None = None) -> FastAPI:
    served = settings.served_model_name or served or model.source
    prefix_cache = PrefixCache(settings.prefix_cache_mb << 20) if settings.prefix_cache_mb else None
    folders = settings.adapters()
    if served in folders:
        raise OptionError("lora", f"names an adapter {served!r}, the base model's own name; rename it")
    lora = model.add_adapters(folders) if folders else None
    metrics = Metrics(lambda: scheduler.load)
    scheduler = Scheduler(model.module, model.tokenizer, settings.max_batch, settings.max_queue, model.decoder,
                          prefix_cache, lora, on_step=metrics.step)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="gpt2kit", summary="An OpenAI-compatible completions server for GPT-2",
                  lifespan=lifespan)
    app.state.scheduler = scheduler
    app.add_middleware(RequestLimits, limit=settings.max_body_bytes)
    app.add_middleware(CountRequests, metrics=metrics)  # outermost: counts refusals (413, 431) too
    errors.install(app)
    auth = [Depends(bearer_check(settings.api_key))]
    app.include_router(tokens.router(model, settings, served), dependencies=auth)
    app.include_router(metrics.router(), dependencies=auth)
    app.include_router(chat.router(model, settings, served, scheduler, metrics, auth))

    page = playground_page()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground() -> str:
        return page

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": served, **scheduler.load}

    @app.get("/v1/models", response_model=ServedModels, dependencies=auth, responses=ERRORS)
    async def models() -> ServedModels:
        root = str(model.loaded.folder or served)
        return adapters.model_list(served, root, folders, created, model.config.n_positions)

    @app.post("/v1/completions", response_model=CompletionBody, dependencies=auth, responses=ERRORS)
    async def create_completion(body: CompletionRequest, request: Request):
        plan = completions.plan(body, model, settings, served)
        metrics.prompt_tokens.inc(sum(map(len, plan.prompts)))
        echoes = await _prompt_logprobs(plan, model, lora)
        job = completions.submit(scheduler, plan) if plan.rows else None  # None: only scoring
        if body.stream:
            return StreamingResponse(_stream(plan, job, model, scheduler, echoes),
                                     media_type="text/event-stream")
        done = await completions.collect(job, scheduler, request) if job else completions.scored(plan)
        return completions.response(plan, done, model, echoes)

    return app


def playground_page() -> str:
    """static/index.html with its {{field}} marks replaced by GenerationConfig's defaults, so the
    page's sliders start where the API does without repeating its numbers."""
    page = resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8")
    for f in fields(GenerationConfig):
        page = page.replace("{{" + f.name + "}}", str(f.default))
    return page


def bearer_check(api_key: str | None):
    async def check(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'")
        if not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "incorrect API key", code="invalid_api_key")
    return check


async def _prompt_logprobs(plan: Plan, model: Model, lora: AdapterRows | None) -> dict[int, list]:
    """Echo with logprobs also scores the prompts (off the event loop, with the request's adapter)."""
    if not (plan.request.echo and plan.cfg.logprobs is not None):
        return {}

    def score(ids: list[int]) -> list:
        with lora.use([plan.adapter], model.device) if lora is not None else nullcontext():
            return completions.prompt_logprobs(model, ids, plan.cfg.logprobs)
    return {i: await asyncio.to_thread(score, ids) for i, ids in enumerate(plan.prompts)}


async def _events(job: Job | None, plan: Plan) -> AsyncIterator[Event | JobFailed]:
    """A job's events as they come; without a job (nothing to generate), each choice's end."""
    if job is None:
        for index, completion in enumerate(completions.scored(plan)):
            yield Event(index, "", completion)
        return
    while (item := await job.events.get()) is not None:
        yield item


async def _stream(plan: Plan, job: Job | None, model: Model, scheduler: Scheduler,
                  echoes: dict[int, list]) -> AsyncIterator[str]:
    """Server-sent events: one chunk per piece of text, then usage if asked for, then [DONE].
    An error after the response has started can only be reported in the stream itself."""
    offsets = [0] * plan.choices
    done: list[Completion] = []
    first = job.first if job else 0
    try:
        if plan.request.echo:
            for index in range(plan.choices):
                yield _echo_chunk(plan, index, model, echoes, offsets)
        async for item in _events(job, plan):
            if isinstance(item, JobFailed):
                yield f"data: {APIError(500, str(item)).response().body.decode()}\n\n"
                break
            index = item.row - first
            logprobs = None
            if item.logprobs is not None:
                logprobs = completions.logprobs_body(item.logprobs, offsets[index])
            offsets[index] += len(item.text)
            reason = item.completion.finish_reason if item.completion else None
            if item.completion is not None:
                done.append(item.completion)
            if item.text or reason or logprobs:
                yield completions.chunk(plan, [Choice(index=index, text=item.text, logprobs=logprobs,
                                                      finish_reason=reason)])
        else:
            options = plan.request.stream_options
            if options is not None and options.include_usage:
                yield completions.chunk(plan, [], completions.usage(plan, done))
        yield "data: [DONE]\n\n"
    finally:
        if job is not None:
            scheduler.cancel(job)  # a client that left frees its rows at the next step


def _echo_chunk(plan: Plan, index: int, model: Model, echoes: dict, offsets: list[int]) -> str:
    text = model.tokenizer.decode(plan.choice_prompt(index))
    entries = echoes.get(index // plan.cfg.n)
    logprobs = None if entries is None else completions.logprobs_body(entries, 0)
    offsets[index] = len(text)
    return completions.chunk(plan, [Choice(index=index, text=text, logprobs=logprobs)])


class RequestLimits:
    """Refuse header floods (431) and request bodies over `limit` bytes (413), whether the size is
    declared up front or only seen while streaming in."""

    MAX_HEADERS = 100

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if len(scope["headers"]) > self.MAX_HEADERS:
            response = APIError(431, f"too many request headers ({len(scope['headers'])}; at most "
                                f"{self.MAX_HEADERS})").response()
            return await response(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            response = APIError(413, self._message()).response()
            return await response(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise HTTPException(413, self._message())
            return message

        await self.app(scope, limited_receive, send)

    def _message(self) -> str:
        return f"the request body is larger than this server's limit of {self.limit} bytes"
