"""The OpenAI-compatible server, run for real on 127.0.0.1: the official `openai` client, raw HTTP
for bad input of every kind (malformed bodies, wrong types, out-of-range values), limits, disconnects and faults."""

from __future__ import annotations

import json
import time
from dataclasses import fields

import httpx
import pytest
import torch
from server_helpers import running_server

from gpt2kit.config import GenerationConfig
from gpt2kit.server import completions
from gpt2kit.server.app import create_app
from gpt2kit.server.schemas import GENERATION_PARAMS, NOT_SERVED, CompletionRequest
from gpt2kit.server.settings import ServerConfig

openai = pytest.importorskip("openai", reason="openai is a test dependency (pip install -e \".[test]\"); CI installs it")

MODEL = "tiny-model"


@pytest.fixture(scope="module")
def url(tiny_model):
    with running_server(create_app(tiny_model, ServerConfig(), MODEL)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def post(url: str, body=None, **kwargs) -> httpx.Response:
    if body is not None:
        kwargs["json"] = body
    return httpx.post(url + "/v1/completions", timeout=60, **kwargs)


def error_of(response: httpx.Response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "Traceback" not in error["message"] and " at 0x" not in error["message"]
    return error


def streamed(url: str, body: dict) -> tuple[dict[int, str], list[dict]]:
    """Texts by choice index and every event of a streamed request."""
    texts: dict[int, str] = {}
    events = []
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        event = json.loads(line.removeprefix("data: "))
        events.append(event)
        for choice in event.get("choices", []):
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    return texts, events


# --- the official client ---------------------------------------------------------------------

def test_openai_client_plain_and_streaming_agree(client):
    options = dict(model=MODEL, prompt="Why did the", max_tokens=20, temperature=0.9, n=3, seed=7)
    plain = client.completions.create(**options)
    assert plain.object == "text_completion" and plain.model == MODEL and plain.id.startswith("cmpl-")
    assert [c.index for c in plain.choices] == [0, 1, 2]
    assert plain.usage.prompt_tokens == 3 and plain.usage.completion_tokens == sum(
        len(c.logprobs.tokens) if c.logprobs else 0 for c in plain.choices) or plain.usage.completion_tokens > 0
    texts = {}
    for chunk in client.completions.create(stream=True, **options):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert [texts[i] for i in range(3)] == [c.text for c in plain.choices]
    assert len({c.text for c in plain.choices}) > 1


def test_seed_reproducible_and_greedy_deterministic(client):
    def text(**kw):
        return client.completions.create(model=MODEL, prompt="Hello", max_tokens=15, **kw).choices[0].text
    assert text(seed=3) == text(seed=3) != text(seed=4)
    assert text(temperature=0) == text(temperature=0)
    # A tiny temperature divides the logits by it in float32 and still picks the top token.
    assert text(temperature=1e-9, seed=1) == text(temperature=0)


def test_stop_strings_and_logprobs(client, tiny_model):
    full = client.completions.create(model=MODEL, prompt="Hello", max_tokens=30, temperature=0).choices[0]
    stop = full.text[8:12]
    cut = client.completions.create(model=MODEL, prompt="Hello", max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].text == full.text[:full.text.find(stop)] and cut.choices[0].finish_reason == "stop"
    lp = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=0, logprobs=2)
    logprobs = lp.choices[0].logprobs
    assert len(logprobs.tokens) == 5 and "".join(logprobs.tokens) == lp.choices[0].text
    assert all(len(top) >= 2 for top in logprobs.top_logprobs)
    expected = torch.log_softmax(tiny_model.logits(tiny_model.tokenizer.encode("Hello"))[0, -1], -1).max()
    assert abs(logprobs.token_logprobs[0] - expected.item()) < 1e-4
    assert logprobs.text_offset[1] == len(logprobs.tokens[0])


def test_echo_puts_the_prompt_first_and_scores_it(url):
    body = {"prompt": "Hello there", "max_tokens": 4, "temperature": 0, "echo": True, "logprobs": 1}
    choice = post(url, body).json()["choices"][0]
    assert choice["text"].startswith("Hello there")
    assert choice["logprobs"]["token_logprobs"][0] is None and len(choice["logprobs"]["tokens"]) == 2 + 4
    texts, _ = streamed(url, body)
    assert texts[0] == choice["text"]


def test_list_prompts_token_ids_and_usage(url, tiny_model):
    ids = tiny_model.tokenizer.encode("Hello there")
    body = {"prompt": ["Hello there", "Hi"], "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    out = post(url, body).json()
    assert [c["index"] for c in out["choices"]] == [0, 1]
    assert out["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}
    by_ids = post(url, {**body, "prompt": [ids, tiny_model.tokenizer.encode("Hi")]}).json()
    assert [c["text"] for c in by_ids["choices"]] == [c["text"] for c in out["choices"]]
    assert post(url, {**body, "prompt": ids}).json()["choices"][0]["text"] == out["choices"][0]["text"]
    _, events = streamed(url, {**body, "stream_options": {"include_usage": True}})
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 6


def test_models_health_and_openapi(client, url):
    [card] = client.models.list().data
    assert card.id == MODEL and card.model_extra["max_model_len"] == 64
    assert httpx.get(url + "/health").json()["status"] == "ok"
    schema = httpx.get(url + "/openapi.json").json()
    request = schema["components"]["schemas"]["CompletionRequest"]
    assert {"prompt", "max_tokens", "top_k", "seed", "stream"} <= set(request["properties"])
    assert request["properties"]["top_k"]["default"] == 50


# A non-default value of every GenerationConfig field a request sets: (request value, config value).
SERVED_SAMPLES = {
    "max_new_tokens": (5, 5), "min_new_tokens": (2, 2), "temperature": (0.5, 0.5), "top_k": (7, 7),
    "top_p": (0.9, 0.9), "min_p": (0.1, 0.1), "repetition_penalty": (1.3, 1.3),
    "presence_penalty": (0.5, 0.5), "frequency_penalty": (0.25, 0.25), "n": (2, 2), "seed": (11, 11),
    "stop": (["x", "yz"], ("x", "yz")), "stop_at_eos": (True, False), "logprobs": (3, 3),
    "logit_bias": ({"13": 5, "11": -100}, ((11, -100.0), (13, 5.0))), "bad_words": (["a b"], ("a b",))}


def test_every_generation_option_is_reachable_from_a_request():
    """A GenerationConfig field is set by a request field (its own name or a listed rename), or
    excluded in NOT_SERVED with the reason: a new option cannot be forgotten by the server."""
    served = [f.name for f in fields(GenerationConfig) if f.name not in NOT_SERVED]
    assert set(NOT_SERVED) <= {f.name for f in fields(GenerationConfig)}
    assert sorted(GENERATION_PARAMS) == sorted(served) == sorted(SERVED_SAMPLES)
    body = {GENERATION_PARAMS[name]: request for name, (request, _) in SERVED_SAMPLES.items()}
    cfg = completions.generation_config(CompletionRequest(prompt="Hi", **body), [[1, 2]], 64, ServerConfig())
    assert {name: getattr(cfg, name) for name in served} == {n: v for n, (_, v) in SERVED_SAMPLES.items()}


def test_the_playground_starts_at_the_generation_defaults(url):
    page = httpx.get(url + "/").text
    assert "{{" not in page
    for field in ("temperature", "top_k", "top_p", "n"):
        default = next(f.default for f in fields(GenerationConfig) if f.name == field)
        ident = field.replace("_", "-")
        assert f'id="{ident}" min=' in page and f'value="{default}"' in page.split(f'id="{ident}"')[1].split(">")[0]


# --- bad input -----------------------------------------------------------------------------

@pytest.mark.parametrize("content,ctype", [
    (b'{"prompt":', "application/json"), (b"[1,2]", "application/json"), (b"42", "application/json"),
    (b"null", "application/json"), (b"prompt=hi", "text/plain")])
def test_s1_body_not_a_json_object(url, content, ctype):
    error_of(post(url, content=content, headers={"content-type": ctype}))


@pytest.mark.parametrize("field,value", [
    ("max_tokens", "ten"), ("max_tokens", True), ("n", 1.5), ("temperature", "hot"), ("stop", 5),
    ("prompt", {"a": 1}), ("seed", "x"), ("stream", "yes")])
def test_s2_wrong_types_name_the_field(url, field, value):
    body = {"prompt": "Hi", "max_tokens": 2, field: value}
    assert error_of(post(url, body))["param"] == field


@pytest.mark.parametrize("body", [{}, {"prompt": ""}, {"prompt": []}, {"prompt": [""]}, {"prompt": [[]]}])
def test_s3_missing_or_empty_prompt(url, body):
    error = error_of(post(url, body))
    assert error["param"] == "prompt" and "non-empty" in error["message"]


@pytest.mark.parametrize("ids", [[50257], [-1], [2**40]])
def test_s4_token_ids_outside_the_vocabulary(url, ids):
    error = error_of(post(url, {"prompt": ids, "max_tokens": 2}))
    assert str(ids[0]) in error["message"] and "50256" in error["message"]
    assert httpx.get(url + "/health").status_code == 200


def test_s5_prompt_longer_than_the_context(url):
    error = error_of(post(url, {"prompt": [11] * 70}))
    assert error["param"] == "prompt" and error["code"] == "context_length_exceeded"
    assert "64" in error["message"] and "70" in error["message"]


def test_s6_max_tokens_beyond_the_room_left(url):
    error = error_of(post(url, {"prompt": [11] * 60, "max_tokens": 10}))
    assert error["param"] == "max_tokens" and "10 > 64 - 60" in error["message"]
    choice = post(url, {"prompt": [11] * 60, "ignore_eos": True}).json()["choices"][0]
    assert choice["finish_reason"] == "length"
    out = post(url, {"prompt": [11] * 60, "ignore_eos": True, "logprobs": 0}).json()
    assert len(out["choices"][0]["logprobs"]["tokens"]) == 4
    slid = post(url, {"prompt": [11] * 60, "max_tokens": 20, "slide": True, "ignore_eos": True}).json()
    assert slid["usage"]["completion_tokens"] == 20


@pytest.mark.parametrize("value,words", [(0, "at least 1"), (-5, "at least 1"), (10**9, "at most")])
def test_s7_max_tokens_out_of_range(url, value, words):
    error = error_of(post(url, {"prompt": "Hi", "max_tokens": value}))
    assert error["param"] == "max_tokens" and words in error["message"]


@pytest.mark.parametrize("field,value", [
    ("temperature", -1), ("temperature", 2.5), ("temperature", "NaN"), ("temperature", "Infinity"),
    ("top_p", 0), ("top_p", 1.0001), ("top_p", -1), ("top_k", -2), ("top_k", 1.5),
    ("presence_penalty", 3), ("frequency_penalty", -2.5), ("min_p", 2), ("repetition_penalty", 0),
    ("logprobs", 21), ("min_tokens", -1)])
def test_s8_sampling_values_out_of_range(url, field, value):
    literal = value if isinstance(value, str) else json.dumps(value)  # NaN and Infinity as bare literals
    content = f'{{"prompt": "Hi", "max_tokens": 2, "{field}": {literal}}}'.encode()
    error = error_of(post(url, content=content, headers={"content-type": "application/json"}))
    assert error["param"] == field


@pytest.mark.parametrize("body,words", [
    ({"n": 0}, "at least 1"), ({"n": 1.5}, "integer"), ({"n": 10**6}, "at most 16"),
    ({"n": 4, "temperature": 0}, "greedy"), ({"n": 16, "max_tokens": 60, "prompt": ["Hi"] * 20}, "budget")])
def test_s9_n_limits(url, body, words):
    error = error_of(post(url, {"prompt": "Hi", "max_tokens": 2, **body}))
    assert error["param"] == "n" and words in error["message"]


@pytest.mark.parametrize("stop", [[""], ["x"] * 50, ["y" * 10_000]])
def test_s10_bad_stop_lists(url, stop):
    assert error_of(post(url, {"prompt": "Hi", "max_tokens": 2, "stop": stop}))["param"] == "stop"


def test_s10_stop_string_split_across_chunks_is_never_streamed(url, tiny_model):
    body = {"prompt": "Hello", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    full = post(url, body).json()["choices"][0]["text"]
    pieces = [c["choices"][0]["text"] for c in streamed(url, body)[1]]
    boundary = len(pieces[0]) + len(pieces[1])  # a stop string spanning the 2nd and 3rd chunks
    stop = full[boundary - 2:boundary + 2]
    texts, _ = streamed(url, {**body, "stop": [stop]})
    expected = full[:full.find(stop)]
    assert texts[0] == expected == post(url, {**body, "stop": [stop]}).json()["choices"][0]["text"]


def test_s11_unknown_model_is_404(url):
    error = error_of(post(url, {"model": "gpt-9", "prompt": "Hi"}), 404)
    assert error["type"] == "not_found_error" and MODEL in error["message"]


def test_unknown_fields_ignored_unsupported_ones_refused(url):
    assert post(url, {"prompt": "Hi", "max_tokens": 2, "frobnicate": 1, "user": "me"}).status_code == 200
    for field, value in [("best_of", 2), ("suffix", "end")]:
        assert error_of(post(url, {"prompt": "Hi", "max_tokens": 2, field: value}))["param"] == field


def test_s12_oversized_body_header_flood_and_giant_word(url):
    error_of(post(url, {"prompt": "a " * 1_500_000}), 413)
    try:
        flood = httpx.get(url + "/health", headers={f"x-h{i}": "v" for i in range(10_000)})
        assert error_of(flood, 431)["message"].startswith("too many request headers")
    except httpx.HTTPError:
        pass  # the HTTP layer dropped the connection: also a refusal
    start = time.monotonic()
    error = error_of(post(url, {"prompt": "a" * 1_000_000, "max_tokens": 2}))
    assert "characters" in error["message"] and time.monotonic() - start < 5
    assert httpx.get(url + "/health").status_code == 200


def test_s16_multibyte_text_streams_without_replacement_characters(url):
    body = {"prompt": "🤗 é 한국어 中文", "max_tokens": 40, "seed": 11, "top_k": 0, "ignore_eos": True}
    full = post(url, body).json()["choices"][0]["text"]
    texts, events = streamed(url, body)
    assert texts[0] == full
    if "\ufffd" not in full:
        assert all("\ufffd" not in e["choices"][0]["text"] for e in events)


# --- access -----------------------------------------------------------------------------------

def test_api_key_required_when_set(tiny_model):
    with running_server(create_app(tiny_model, ServerConfig(api_key="s3cret"), MODEL)) as base:
        assert error_of(post(base, {"prompt": "Hi", "max_tokens": 2}), 401)
        wrong = post(base, {"prompt": "Hi", "max_tokens": 2}, headers={"authorization": "Bearer nope"})
        assert error_of(wrong, 401)["code"] == "invalid_api_key"
        assert httpx.get(base + "/v1/models").status_code == 401
        good = openai.OpenAI(base_url=base + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model=MODEL, prompt="Hi", max_tokens=2).choices
        assert httpx.get(base + "/health").status_code == 200 and httpx.get(base + "/").status_code == 200
