"""Error bodies of the server (issue 19, items 5-9), against a real uvicorn on 127.0.0.1: requests
the HTTP parser refuses, wrong methods, every generation field's errors named as the request
names it, a field of the wrong JSON type, and a prompt as long as the context."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from server_helpers import running_server

from gpt2kit.server import listen
from gpt2kit.server.app import create_app
from gpt2kit.server.listen import HTTPProtocol
from gpt2kit.server.schemas import GENERATION_PARAMS
from gpt2kit.server.settings import ServerConfig

N_CTX = 64  # the tiny model's context


@pytest.fixture(scope="module")
def url(tiny_model):
    assert tiny_model.config.n_positions == N_CTX
    with running_server(create_app(tiny_model, ServerConfig(), "tiny"), http=HTTPProtocol) as base:
        yield base


def post(url: str, body) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json=body, timeout=60)


def openai_error(status: int, content_type: str | None, body: bytes, expected: int = 400) -> dict:
    assert status == expected and content_type == "application/json", (status, content_type, body)
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def error_of(r: httpx.Response, expected: int = 400) -> dict:
    return openai_error(r.status_code, r.headers.get("content-type"), r.content, expected)


# ---- 5. what the HTTP parser refuses --------------------------------------------------------

def raw_exchange(url: str, *parts: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send `parts` (a pause between them, so the server reads them apart) and read the answer
    until the server closes the connection: (status, headers, body)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        for i, part in enumerate(parts):
            if i:
                time.sleep(0.2)
            s.sendall(part)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


POST = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
MALFORMED = {
    "100 KB header": (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000, b"a" * 80_000 + b"\r\n\r\n"),
    "Content-Length -1": (POST + b"Content-Length: -1\r\n\r\n{}",),
    "Content-Length abc": (POST + b"Content-Length: abc\r\n\r\n{}",),
    "bad chunk size": (POST + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",),
    "garbage request line": (b"HELLO THERE\r\n\r\n",),
    "binary": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(64)) + b"\r\n\r\n",),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_requests_the_http_parser_refuses_get_openais_json(url, case):
    status, headers, body = raw_exchange(url, *MALFORMED[case])
    error = openai_error(status, headers.get("content-type"), body)
    assert error["type"] == "invalid_request_error" and "malformed" in error["message"]
    assert int(headers["content-length"]) == len(body) and headers["connection"] == "close"
    assert httpx.get(url + "/health").status_code == 200  # and the server serves on


def test_serve_uses_the_json_protocol(tiny_folder, monkeypatch):
    """`gpt2kit serve` runs uvicorn with HTTPProtocol (the tests above pass it themselves)."""
    import gpt2kit.server as server
    configs = []
    monkeypatch.setattr(listen.Server, "run", lambda self: configs.append(self.config))
    server.serve(str(tiny_folder), ServerConfig(port=0), device="cpu")
    assert configs[0].http is HTTPProtocol


# ---- 6. wrong method, unknown path --------------------------------------------------------------

@pytest.mark.parametrize("method,path,allowed", [("GET", "/v1/completions", "POST"), ("POST", "/health", "GET"),
                                                 ("DELETE", "/v1/models", "GET")])
def test_a_wrong_method_is_an_invalid_request(url, method, path, allowed):
    r = httpx.request(method, url + path)
    error = error_of(r, 405)
    assert error["type"] == "invalid_request_error"
    assert error["message"] == f"{method} is not allowed on {path}; use {allowed}"
    assert r.headers["allow"] == allowed


def test_an_unknown_path_is_not_found(url):
    r = httpx.post(url + "/v1/chat/completion", json={})
    error = error_of(r, 404)
    assert error["type"] == "not_found_error" and "/v1/chat/completion" in error["message"]


# ---- 7. every generation field, by the request's name ------------------------------------------

OUT_OF_RANGE = {"max_new_tokens": 0, "min_new_tokens": -1, "temperature": 2.5, "top_k": -1, "top_p": 0,
                "min_p": 1.5, "repetition_penalty": 0, "presence_penalty": 3, "frequency_penalty": -3,
                "n": 0, "seed": -1, "stop": [""], "logprobs": 21, "logit_bias": {"5": 101}, "bad_words": [""]}


def test_every_served_field_has_a_bad_value_here():
    assert set(OUT_OF_RANGE) == set(GENERATION_PARAMS) - {"stop_at_eos"}  # a boolean: only its type can be wrong


@pytest.mark.parametrize("name", sorted(GENERATION_PARAMS))
def test_every_fields_errors_use_the_requests_name(url, name):
    param = GENERATION_PARAMS[name]
    bad = [{"a": 1}] + ([OUT_OF_RANGE[name]] if name in OUT_OF_RANGE else [])
    for value in bad:
        r = post(url, {"prompt": "Hi", "max_tokens": 2, param: value})
        error = error_of(r)
        assert error["param"] == param and error["message"].startswith(param), (value, error)
        assert name == param or name not in error["message"], (value, error)


# ---- 8. a field of the wrong JSON type ------------------------------------------------------------

@pytest.mark.parametrize("field,value", [("logit_bias", [1]), ("logit_bias", "x"), ("stream_options", [1])])
def test_a_field_of_the_wrong_type_is_named(url, field, value):
    r = post(url, {"prompt": "Hi", "max_tokens": 2, field: value})
    error = error_of(r)
    assert error["param"] == field and error["message"].startswith(f"{field}: ")
    assert "request body" not in error["message"]


# ---- 9. a prompt as long as the context -----------------------------------------------------------

@pytest.mark.parametrize("slide", [False, True])
def test_a_prompt_that_fills_the_context_is_refused_without_advice_that_fails(url, slide):
    r = post(url, {"prompt": [11] * N_CTX, "slide": slide})
    error = error_of(r)
    assert error["param"] == "prompt" and error["code"] == "context_length_exceeded"
    assert f"maximum context length is {N_CTX} tokens; the prompt has {N_CTX}" in error["message"]
    assert f"at most {N_CTX - 1} tokens" in error["message"] and "slide" not in error["message"]


def test_the_slide_advice_works_where_it_is_given(url):
    body = {"prompt": [11] * (N_CTX - 1), "max_tokens": 10, "ignore_eos": True}
    error = error_of(post(url, body))
    assert error["param"] == "max_tokens" and '"slide": true' in error["message"]
    done = post(url, {**body, "slide": True})
    assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 10
