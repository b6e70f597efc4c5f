"""POST /v1/completions: a request checked and turned into rows, and results into OpenAI's shapes.

Checks happen here, before anything is queued: the OpenAI fields, the server's caps, and the
context window (prompt + max_tokens must fit unless the request asks to slide). Sampling values
are checked by GenerationConfig itself, the same check the CLI and Python API use.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

from fastapi import Request

from ..api import Model
from ..config import DEFAULT_MAX_NEW_TOKENS, GenerationConfig
from ..errors import Gpt2kitError
from ..inference.adapters import BASE
from ..inference.generate import Completion, Row, TokenLogprob, make_rows, token_logprob
from . import adapters
from .errors import APIError, from_gpt2kit
from .scheduler import Job, JobFailed, QueueFull, Scheduler
from .schemas import GENERATION_PARAMS, Choice, CompletionRequest, Logprobs, Usage
from .schemas import Completion as CompletionBody
from .settings import ServerConfig


@dataclass
class Plan:
    """A checked request: what to generate and how to answer."""

    request: CompletionRequest
    cfg: GenerationConfig
    prompts: list[list[int]]
    rows: list[Row]
    model_name: str
    id: str
    created: int
    adapter: int = BASE  # the served LoRA adapter the request picked (server/adapters.py)

    def choice_prompt(self, choice: int) -> list[int]:
        return self.prompts[choice // self.cfg.n]

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.cfg.n


def check_model(requested: str | None, served: str, settings: ServerConfig) -> tuple[str, int]:
    """A request names the served model, one of its `--lora` adapters, or no model: (the name to
    answer with, the adapter's index or BASE); another name is a 404."""
    return adapters.pick(requested, served, list(settings.adapters()))


def scoring_only(req: CompletionRequest) -> bool:
    """echo with max_tokens 0: the prompt (and its logprobs) back, nothing generated. This is how
    lm-eval's local-completions model and OpenAI's legacy API score a text."""
    return req.echo and req.max_tokens == 0


def plan(req: CompletionRequest, model: Model, settings: ServerConfig, served: str,
         extra_stop: tuple[str, ...] = ()) -> Plan:
    """`extra_stop`: stop strings added after the request's own were checked against the caps
    (a chat template's end of turn)."""
    name, adapter = check_model(req.model, served, settings)
    _refuse_unsupported(req)
    prompts = read_prompts(req.prompt, model, settings)
    try:
        cfg = generation_config(req, prompts, model.config.n_positions, settings, extra_stop)
        rows = [] if scoring_only(req) else make_rows(
            model.tokenizer, [p for p in prompts for _ in range(cfg.n)], cfg, model.config.n_positions,
            model.device, sample_indices=[j for _ in prompts for j in range(cfg.n)],
            prompt_indices=[i for i in range(len(prompts)) for _ in range(cfg.n)])
    except Gpt2kitError as e:
        raise from_gpt2kit(e) from None
    for row in rows:
        row.adapter = adapter
    return Plan(req, cfg, prompts, rows, name, f"cmpl-{uuid.uuid4().hex}", int(time.time()), adapter)


def _refuse_unsupported(req: CompletionRequest) -> None:
    if req.best_of is not None and req.best_of > 1:
        raise APIError(400, "best_of > 1 is not supported; ask for n choices instead", param="best_of")
    if req.suffix:
        raise APIError(400, "suffix (insertion) is not supported by GPT-2", param="suffix")


def read_prompts(prompt, model: Model, settings: ServerConfig) -> list[list[int]]:
    """Token ids of each prompt: text is length-checked before it is tokenized, ids are range-checked."""
    empty = APIError(400, "prompt must be a non-empty string or list of token ids", param="prompt")
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise empty
    vocab = min(model.config.vocab_size, model.tokenizer.vocab_size)
    prompts = []
    for p in prompt:
        if not p:
            raise empty
        if isinstance(p, str):
            if len(p) > settings.max_prompt_chars:
                raise APIError(400, f"the prompt has {len(p)} characters; this server accepts at most "
                               f"{settings.max_prompt_chars}", param="prompt", code="context_length_exceeded")
            prompts.append(model.tokenizer.encode(p))
        else:
            bad = next((t for t in p if not 0 <= t < vocab), None)
            if bad is not None:
                raise APIError(400, f"prompt token id {bad} is outside the vocabulary (ids 0 to {vocab - 1})",
                               param="prompt")
            prompts.append(list(p))
    return prompts


def generation_config(req: CompletionRequest, prompts: list[list[int]], n_ctx: int,
                      settings: ServerConfig, extra_stop: tuple[str, ...] = ()) -> GenerationConfig:
    longest = max(len(p) for p in prompts)
    # With or without "slide", the prompt must leave room for one token (the window slides over
    # generated text only); a prompt that is only scored may fill the window.
    most = n_ctx if scoring_only(req) else n_ctx - 1
    if longest > most:
        raise APIError(400, f"This model's maximum context length is {n_ctx} tokens; the prompt has "
                       f"{longest}. Shorten the prompt to at most {most} tokens.",
                       param="prompt", code="context_length_exceeded")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > settings.max_stop or any(len(s) > settings.max_stop_chars for s in stop):
        raise APIError(400, f"stop takes at most {settings.max_stop} strings of at most "
                       f"{settings.max_stop_chars} characters", param="stop")
    # Every served option by its request name (schemas.GENERATION_PARAMS), then those that need
    # more than a copy: max_tokens checked against the room, stop as a tuple, ignore_eos negated,
    # logit_bias's null (OpenAI's "none") as no biases.
    options = {name: getattr(req, param) for name, param in GENERATION_PARAMS.items()}
    cfg = GenerationConfig(**{**options, "max_new_tokens": _max_tokens(req, longest, n_ctx, settings),
                              "stop": tuple(dict.fromkeys((*stop, *extra_stop))), "stop_at_eos": not req.ignore_eos,
                              "logit_bias": req.logit_bias or {}})
    if cfg.n > settings.max_n:
        raise APIError(400, f"n must be at most {settings.max_n} on this server, got {cfg.n}", param="n")
    total = cfg.max_new_tokens * cfg.n * len(prompts)
    if total > settings.token_budget:
        raise APIError(400, f"max_tokens x n x prompts = {total} tokens is over this server's budget of "
                       f"{settings.token_budget} per request; ask for fewer", param="n")
    return cfg


def _max_tokens(req: CompletionRequest, longest: int, n_ctx: int, settings: ServerConfig) -> int:
    """The request's max_tokens, checked against the caps and the room the prompt leaves; if it is
    not given, the default, cut to that room."""
    if req.max_tokens == 0:
        if scoring_only(req):
            return 1  # nothing is generated (no rows are made); the other options are still checked
        raise APIError(400, "max_tokens must be at least 1, got 0 (0 only with echo: true, which "
                       "returns the prompt and, with logprobs, scores it)", param="max_tokens")
    limit = settings.max_tokens_limit
    room = n_ctx - longest
    if req.max_tokens is None:
        return min(DEFAULT_MAX_NEW_TOKENS, limit, limit if req.slide else room)
    if isinstance(req.max_tokens, int) and req.max_tokens >= 1:
        if req.max_tokens > limit:
            raise APIError(400, f"max_tokens must be at most {limit} on this server, got {req.max_tokens}",
                           param="max_tokens")
        if req.max_tokens > room and not req.slide:
            raise APIError(400, f"max_tokens is too large: {req.max_tokens}. This model's maximum context "
                           f"length is {n_ctx} tokens and the prompt has {longest} ({req.max_tokens} > "
                           f"{n_ctx} - {longest}). Ask for fewer, or send \"slide\": true to let the "
                           "window slide over the text.", param="max_tokens", code="context_length_exceeded")
    return req.max_tokens  # GenerationConfig rejects 0 and negative values by name


# --- running -------------------------------------------------------------------------------

def submit(scheduler: Scheduler, plan: Plan) -> Job:
    """Queue a plan's rows; a full queue or a stopped scheduler is a 503 the client may retry."""
    try:
        return scheduler.submit(plan.rows)
    except QueueFull as e:
        raise APIError(503, f"the server is busy ({e}); retry shortly", code="queue_full",
                       headers={"Retry-After": "1"}) from None
    except JobFailed as e:
        raise APIError(503, str(e)) from None


async def collect(job: Job, scheduler: Scheduler, request: Request) -> list[Completion]:
    """Wait for every row of a non-streamed job; cancel it as soon as the client goes away."""
    done: dict[int, Completion] = {}
    gone = asyncio.ensure_future(disconnected(request))
    try:
        while True:
            get = asyncio.ensure_future(job.events.get())
            await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                get.cancel()
                raise APIError(499, "the client closed the connection")
            item = get.result()
            if item is None:
                return [done[k] for k in sorted(done)]
            if isinstance(item, JobFailed):
                raise APIError(500, str(item))
            if item.completion is not None:
                done[item.row - job.first] = item.completion
    finally:
        gone.cancel()
        scheduler.cancel(job)


async def disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so nothing else arrives)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# --- responses ------------------------------------------------------------------------------

def logprobs_body(entries: list[TokenLogprob], offset: int) -> Logprobs:
    """OpenAI's legacy logprobs object; `offset` is where the first token's text starts."""
    tokens, values, tops, offsets = [], [], [], []
    for entry in entries:
        offsets.append(offset)
        tokens.append(entry.token)
        values.append(entry.logprob)
        scored = entry.logprob is not None  # a prompt's first token has no context to be scored in
        tops.append({entry.token: entry.logprob, **{tok: v for _, tok, v in entry.top}} if scored else None)
        offset += len(entry.token)
    return Logprobs(tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets)


def prompt_logprobs(model: Model, ids: list[int], top_n: int) -> list[TokenLogprob]:
    """For echo with logprobs: each prompt token's log-probability given the ones before it."""
    logits = model.logits([ids])[0]
    first = TokenLogprob(ids[0], model.tokenizer.decode(ids[:1]), None, [])
    return [first] + [token_logprob(logits[t - 1], ids[t], top_n, model.tokenizer) for t in range(1, len(ids))]


def scored(plan: Plan) -> list[Completion]:
    """The choices of a request that generates nothing (scoring_only): each ends at once."""
    return [Completion(text="", token_ids=[], finish_reason="length", prompt_tokens=len(plan.choice_prompt(k)),
                       prompt_index=k // plan.cfg.n, sample_index=k % plan.cfg.n,
                       logprobs=None if plan.cfg.logprobs is None else [])
            for k in range(plan.choices)]


def usage(plan: Plan, completions: list[Completion]) -> Usage:
    prompt = sum(len(p) for p in plan.prompts)
    generated = sum(len(c.token_ids) for c in completions)
    return Usage(prompt_tokens=prompt, completion_tokens=generated, total_tokens=prompt + generated)


def response(plan: Plan, completions: list[Completion], model: Model,
             echoes: dict[int, list[TokenLogprob]]) -> CompletionBody:
    """The whole (non-streamed) answer; `echoes` holds prompt logprobs by prompt index."""
    choices = []
    for index, c in enumerate(completions):
        prefix = model.tokenizer.decode(plan.choice_prompt(index)) if plan.request.echo else ""
        logprobs = None
        if c.logprobs is not None:
            logprobs = logprobs_body(echoes.get(c.prompt_index, []) + c.logprobs, 0)
        choices.append(Choice(index=index, text=prefix + c.text, logprobs=logprobs, finish_reason=c.finish_reason))
    return CompletionBody(id=plan.id, created=plan.created, model=plan.model_name, choices=choices,
                          usage=usage(plan, completions))


def chunk(plan: Plan, choices: list[Choice], usage_: Usage | None = None) -> str:
    """One server-sent event."""
    body = CompletionBody(id=plan.id, created=plan.created, model=plan.model_name, choices=choices, usage=usage_)
    return f"data: {body.model_dump_json()}\n\n"
