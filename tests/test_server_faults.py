"""Server faults and limits (body size, queue, slow clients), continuous batching, and shutdown on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from server_helpers import running_server

import gpt2kit
from gpt2kit.server import listen
from gpt2kit.server.app import create_app
from gpt2kit.server.settings import ServerConfig

LONG = {"prompt": "Tell me a story", "max_tokens": 400, "slide": True, "ignore_eos": True}


class Instrumented(torch.nn.Module):
    """The model, slowed down, recording each call's input shape, and failing on demand."""

    def __init__(self, inner: torch.nn.Module, delay: float):
        super().__init__()
        self.inner, self.config, self.delay = inner, inner.config, delay
        self.transformer = inner.transformer  # what a KV cache reads the dtype and device from
        self.shapes: list[tuple[int, int]] = []
        self.fail_at: int | None = None

    def forward(self, idx, *args, **kwargs):
        self.shapes.append(tuple(idx.shape))
        if self.fail_at is not None and len(self.shapes) >= self.fail_at:
            raise RuntimeError("injected fault")
        time.sleep(self.delay)
        return self.inner(idx, *args, **kwargs)


def server_with(tiny_model, delay: float = 0.0, **settings):
    app = create_app(tiny_model, ServerConfig(**settings), "tiny")
    app.state.scheduler.model = model = Instrumented(tiny_model.module, delay)
    app.state.scheduler.decoder = None  # each step through the instrumented model, eagerly
    return app, model


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def load(url: str) -> dict:
    return httpx.get(url + "/health").json()


def test_s13_disconnects_free_the_slot_and_drop_queued_requests(tiny_model):
    app, model = server_with(tiny_model, delay=0.02, max_batch=1)
    with running_server(app) as url:
        with httpx.stream("POST", url + "/v1/completions", json={**LONG, "stream": True}, timeout=30) as r:
            chunks = r.iter_lines()
            assert next(chunks).startswith("data: ") and next(chunks) == ""
            # A second request waits behind it; its client gives up while it is still queued.
            queued = {**LONG, "prompt": [11] * 37}
            with pytest.raises(httpx.TimeoutException):
                httpx.post(url + "/v1/completions", json=queued, timeout=0.5)
            assert load(url)["running"] == 1
        wait_until(lambda: load(url) == {**load(url), "running": 0, "waiting": 0}, timeout=3)
        start = time.monotonic()
        ok = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 3}, timeout=10)
        assert ok.status_code == 200 and time.monotonic() - start < 2
        assert (1, 37) not in model.shapes  # the abandoned request never reached the model


def test_s14_a_full_queue_answers_503_with_retry_after(tiny_model):
    app, _ = server_with(tiny_model, delay=0.02, max_batch=1, max_queue=1)
    with running_server(app) as url:
        with httpx.stream("POST", url + "/v1/completions", json={**LONG, "stream": True}, timeout=30) as r:
            lines = r.iter_lines()  # kept: a dropped iterator closes the connection
            next(lines)
            waiting = threading.Thread(target=httpx.post, args=(url + "/v1/completions",),
                                       kwargs=dict(json={"prompt": "Hi", "max_tokens": 2}, timeout=30))
            waiting.start()
            wait_until(lambda: load(url)["waiting"] == 1)
            full = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
            assert full.status_code == 503 and full.headers["retry-after"] == "1"
            assert full.json()["error"]["type"] == "overloaded_error"
        waiting.join(timeout=30)
        assert httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200


def test_s15_a_fault_mid_stream_is_reported_and_the_server_goes_on(tiny_model):
    app, model = server_with(tiny_model)
    body = {"prompt": "Hi", "max_tokens": 20, "ignore_eos": True, "temperature": 0}
    with running_server(app) as url:
        model.fail_at = len(model.shapes) + 4  # prefill and two decode steps succeed: three tokens
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            lines = [line for line in r.iter_lines() if line]
        assert lines[-1] == "data: [DONE]"
        events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
        assert "error" in events[-1] and "injected fault" in events[-1]["error"]["message"]
        assert sum(1 for e in events if "choices" in e) == 3
        model.fail_at = len(model.shapes) + 2
        failed = httpx.post(url + "/v1/completions", json=body)
        assert failed.status_code == 500 and failed.json()["error"]["type"] == "server_error"
        model.fail_at = None
        assert httpx.post(url + "/v1/completions", json=body).status_code == 200


def test_concurrent_requests_share_decoding_steps(tiny_model):
    app, model = server_with(tiny_model, delay=0.01, max_batch=8)
    body = {"prompt": "Hi", "max_tokens": 30, "ignore_eos": True}
    with running_server(app) as url:
        results = [None] * 8

        def one(k):
            results[k] = httpx.post(url + "/v1/completions", json={**body, "seed": k}, timeout=60).json()

        threads = [threading.Thread(target=one, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        batched = max(shape[0] for shape in model.shapes)
        alone = httpx.post(url + "/v1/completions", json={**body, "seed": 3}).json()
    assert all(r["usage"]["completion_tokens"] == 30 for r in results)
    assert batched >= 4  # requests joined one running batch
    assert results[3]["choices"][0]["text"] == alone["choices"][0]["text"]  # the seed, not the batch, decides


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sigterm_lets_in_flight_requests_finish(tiny_folder):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "gpt2kit", "serve", "-m", str(tiny_folder), "--device", "cpu",
                               "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _up(url), timeout=60)
        body = {**LONG, "max_tokens": 600, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            first = next(lines)
            server.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert first.startswith("data: ") and rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"
        # uvicorn re-raises the signal once it has shut down, so the parent sees "terminated by SIGTERM".
        assert server.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        server.kill()
        server.wait()


def test_native_caches_are_bounded_unless_the_environment_says_otherwise(monkeypatch):
    for name in listen.NATIVE_CACHE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "7")  # an operator's own choice stays
    listen.bound_native_caches()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(listen.NATIVE_CACHE_CAPACITY)
    assert os.environ["LRU_CACHE_CAPACITY"] == "7"


SOAK = Path(__file__).resolve().parents[1] / "benchmarks" / "soak_server.py"


@pytest.mark.slow
def test_a_short_soak_gets_no_5xx_and_the_same_seeded_text(tmp_path):
    """benchmarks/soak_server.py for 20 s at 8 clients (valid, malformed and abandoned requests)."""
    out = tmp_path / "soak.json"
    done = subprocess.run([sys.executable, str(SOAK), "--seconds", "20", "--clients", "8", "--json", str(out)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(Path(gpt2kit.__file__).parents[1])})
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    assert result["five_xx"] == [] and result["seeded_same_under_load"]
    by_status = result["by_status"]
    assert by_status.get("200", 0) > 50 and by_status.get("400", 0) > 10 and by_status.get("disconnected", 0) > 0
    assert set(by_status) <= {"200", "400", "404", "disconnected"}, by_status  # no timeouts, no 5xx
    assert result["sigterm_exit"] in (0, -signal.SIGTERM)


def _up(url: str) -> bool:
    try:
        return httpx.get(url + "/health").status_code == 200
    except httpx.HTTPError:
        return False
