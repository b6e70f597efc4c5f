"""GET /metrics: the server's counters in Prometheus' text format, every name starting gpt2kit_.

    gpt2kit_requests_total{route, status}          HTTP requests answered, by route and status code
    gpt2kit_request_duration_seconds{route}        histogram: request received -> response finished
    gpt2kit_prompt_tokens_total                    prompt tokens of accepted completion requests
    gpt2kit_generation_tokens_total                tokens decoded (one per running row per step)
    gpt2kit_requests_waiting                       requests queued, not yet started
    gpt2kit_rows_running                           rows (sequences) in the running batch
    gpt2kit_time_to_first_token_seconds            histogram: request queued -> its row's first token
    gpt2kit_time_per_output_token_seconds          histogram: time between a row's tokens

Each app has its own CollectorRegistry (several apps may live in one process, as in the tests),
so nothing is registered globally.
"""

from __future__ import annotations

import time
import weakref
from typing import Callable

from fastapi import APIRouter, Response

from ..errors import Gpt2kitError
from ..inference.generate import Row

try:
    import prometheus_client as prometheus
except ImportError:  # pragma: no cover - the serve extra installs it
    raise Gpt2kitError('the server\'s /metrics needs prometheus-client: pip install -e ".[serve]" in the '
                       "gpt2kit folder (or pip install prometheus-client)") from None

# Seconds. A CPU decodes GPT-2 small at ~10-50 ms a token; a queued request may wait seconds.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    """The app's metrics. `step` is called by the scheduler's thread after each decoding step;
    the rest on the event loop."""

    def __init__(self, load: Callable[[], dict]):
        self.registry = registry = prometheus.CollectorRegistry()

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()):
            return prometheus.Counter(name, doc, labels, registry=registry)

        def histogram(name: str, doc: str, buckets: tuple[float, ...], labels: tuple[str, ...] = ()):
            return prometheus.Histogram(name, doc, labels, buckets=buckets, registry=registry)

        def gauge(name: str, doc: str, key: str) -> None:
            prometheus.Gauge(name, doc, registry=registry).set_function(lambda: load()[key])

        self.requests = counter("gpt2kit_requests", "HTTP requests answered, by route and status code",
                                ("route", "status"))
        self.request_seconds = histogram("gpt2kit_request_duration_seconds",
                                         "request received to response finished, by route", REQUEST_BUCKETS, ("route",))
        self.prompt_tokens = counter("gpt2kit_prompt_tokens",
                                     "prompt tokens of accepted completion requests (their usage.prompt_tokens)")
        self.generation_tokens = counter("gpt2kit_generation_tokens",
                                         "tokens decoded: one per running row per step, <|endoftext|> included")
        gauge("gpt2kit_requests_waiting", "requests queued, not yet started", "waiting")
        gauge("gpt2kit_rows_running", "rows (sequences) in the running batch", "running")
        self.first_token = histogram("gpt2kit_time_to_first_token_seconds",
                                     "request queued to its row's first token", TTFT_BUCKETS)
        self.per_token = histogram("gpt2kit_time_per_output_token_seconds",
                                   "time between a row's consecutive tokens", TPOT_BUCKETS)
        self._started: weakref.WeakSet[Row] = weakref.WeakSet()  # rows that have had a token
        self._last_step = 0.0

    def step(self, rows: list[Row], queued: list[float]) -> None:
        """Each of `rows` just got a token; `queued[i]` is when row i's request was queued
        (time.perf_counter). Every row already started was in the previous step too (a running
        batch steps all its rows), so its token took the time since that step."""
        now = time.perf_counter()
        for row, since in zip(rows, queued):
            if row in self._started:
                self.per_token.observe(now - self._last_step)
            else:
                self._started.add(row)
                self.first_token.observe(now - since)
        self.generation_tokens.inc(len(rows))
        self._last_step = now

    def router(self) -> APIRouter:
        routes = APIRouter()

        text = prometheus.CONTENT_TYPE_LATEST

        @routes.get("/metrics", response_class=Response, responses={200: {"content": {text: {}}}})
        async def metrics() -> Response:
            return Response(prometheus.generate_latest(self.registry), media_type=text)

        return routes


class CountRequests:
    """ASGI middleware: counts every response by route and status, and times it. The route is the
    matched route's path template; requests matching none, or refused before routing (413, 431),
    count as route "other" (a label per path sent would let any client grow the metrics)."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), "500"  # an exception escaping the app becomes a 500

        async def counting_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            route = getattr(scope.get("route"), "path", "other")  # set by FastAPI's routing
            self.metrics.requests.labels(route, status).inc()
            self.metrics.request_seconds.labels(route).observe(time.perf_counter() - start)
