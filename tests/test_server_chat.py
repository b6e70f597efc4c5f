"""POST /v1/chat/completions on a real server: the official `openai` client (plain and streamed),
raw HTTP for OpenAI's shapes and for bad input, the API key, and a checkpoint's own template."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from server_helpers import running_server

from gpt2kit.chat import BUILTIN
from gpt2kit.server.app import create_app
from gpt2kit.server.settings import ServerConfig

openai = pytest.importorskip("openai", reason="openai is a test dependency (pip install -e \".[test]\"); CI installs it")

MODEL = "tiny-chat"
TALK = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Tell me a joke"}]


@pytest.fixture(scope="module")
def url(tiny_model):
    assert tiny_model.chat_template is BUILTIN
    with running_server(create_app(tiny_model, ServerConfig(), MODEL)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def post(url: str, body, **kwargs) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=60, **kwargs)


def error_of(response: httpx.Response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and "Traceback" not in error["message"]
    return error


def test_openai_client_plain_and_streamed_agree(client, tiny_model):
    options = dict(model=MODEL, messages=TALK, max_tokens=12, temperature=0.9, n=3, seed=11)
    plain = client.chat.completions.create(**options)
    assert plain.object == "chat.completion" and plain.id.startswith("chatcmpl-") and plain.model == MODEL
    assert [c.index for c in plain.choices] == [0, 1, 2]
    assert all(c.message.role == "assistant" and c.finish_reason in ("stop", "length") for c in plain.choices)
    assert plain.usage.prompt_tokens == len(tiny_model.chat_prompt_ids(TALK))
    texts, roles, reasons = {}, {}, {}
    stream = client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **options)
    chunks = list(stream)
    for chunk in chunks:
        assert chunk.object == "chat.completion.chunk"
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            roles.setdefault(c.index, c.delta.role)  # the first delta of each choice names the role
            reasons[c.index] = c.finish_reason or reasons.get(c.index)
    assert [texts[i] for i in range(3)] == [c.message.content for c in plain.choices]
    assert roles == {0: "assistant", 1: "assistant", 2: "assistant"}
    assert [reasons[i] for i in range(3)] == [c.finish_reason for c in plain.choices]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert len({c.message.content for c in plain.choices}) > 1


def test_reply_is_the_python_apis_and_the_completion_of_the_rendered_prompt(client, url, tiny_model):
    reply = client.chat.completions.create(model=MODEL, messages=TALK, max_tokens=10, seed=4).choices[0]
    [own] = tiny_model.chat(TALK, max_new_tokens=10, seed=4)
    assert reply.message.content == own.text
    ids = tiny_model.chat_prompt_ids(TALK)
    completion = httpx.post(url + "/v1/completions", timeout=60, json={
        "prompt": ids, "max_tokens": 10, "seed": 4, "stop": ["\nUser:"]}).json()
    assert completion["choices"][0]["text"] == own.text


def test_seed_greedy_stop_and_max_completion_tokens(client):
    def reply(**kw):
        return client.chat.completions.create(model=MODEL, messages=TALK, **kw).choices[0]
    assert reply(seed=3, max_tokens=8).message.content == reply(seed=3, max_tokens=8).message.content
    assert reply(seed=3, max_tokens=8).message.content != reply(seed=4, max_tokens=8).message.content
    full = reply(temperature=0, max_tokens=20, extra_body={"ignore_eos": True}).message.content
    stop = full[6:10]
    cut = reply(temperature=0, max_tokens=20, stop=[stop])
    assert cut.message.content == full[:full.find(stop)] and cut.finish_reason == "stop"
    limited = client.chat.completions.create(model=MODEL, messages=TALK, max_tokens=50, max_completion_tokens=3,
                                             extra_body={"ignore_eos": True})
    assert limited.usage.completion_tokens == 3 and limited.choices[0].finish_reason == "length"


def test_the_templates_end_of_turn_joins_the_requests_stops(tiny_model):
    from gpt2kit.server.chat import ChatRequest, chat_plan
    body = ChatRequest(messages=TALK, stop=["x", "\nUser:"], max_tokens=2)
    plan = chat_plan(body, tiny_model, ServerConfig(max_stop=2), MODEL)
    assert plan.cfg.stop == ("x", "\nUser:")  # no duplicate, and not counted against max_stop
    plan = chat_plan(ChatRequest(messages=TALK, stop=["a", "b"], max_tokens=2), tiny_model,
                     ServerConfig(max_stop=2), MODEL)
    assert plan.cfg.stop == ("a", "b", "\nUser:")


def test_logprobs_in_the_chat_shape(client, tiny_model):
    out = client.chat.completions.create(model=MODEL, messages=TALK, max_tokens=5, temperature=0,
                                         logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    choice = out.choices[0]
    content = choice.logprobs.content
    assert len(content) == 5 and all(len(t.top_logprobs) == 3 for t in content)
    assert b"".join(bytes(t.bytes) for t in content).decode() == choice.message.content
    first = torch.log_softmax(tiny_model.logits(tiny_model.chat_prompt_ids(TALK))[0, -1], -1)
    assert abs(content[0].logprob - first.max().item()) < 1e-4  # greedy: the top token's
    assert abs(content[0].top_logprobs[0].logprob - first.max().item()) < 1e-4
    plain = client.chat.completions.create(model=MODEL, messages=TALK, max_tokens=5, temperature=0)
    assert plain.choices[0].logprobs is None
    streamed = client.chat.completions.create(model=MODEL, messages=TALK, max_tokens=5, temperature=0, logprobs=True,
                                              stream=True, extra_body={"ignore_eos": True})
    tokens = [t.token for chunk in streamed for c in chunk.choices if c.logprobs for t in c.logprobs.content]
    assert tokens == [t.token for t in content]


def test_content_parts_and_the_developer_role(url):
    parts = [{"role": "developer", "content": "Be brief."},
             {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    a = post(url, {"messages": parts, "max_tokens": 4, "seed": 1}).json()
    b = post(url, {"messages": plain, "max_tokens": 4, "seed": 1}).json()
    assert a["choices"][0]["message"] == b["choices"][0]["message"]
    assert a["usage"] == b["usage"]


@pytest.mark.parametrize("body, param, words", [
    ({"messages": []}, "messages", "non-empty"),
    ({}, "messages", "messages"),
    ({"messages": "hi"}, "messages", "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages", "role must be one of system, user, assistant"),
    ({"messages": [{"role": "user", "content": 42}]}, "messages", "content must be a string"),
    ({"messages": [{"role": "user", "content": None}]}, "messages", "content must be a string"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages", "text parts"),
    ({"messages": [{"role": "user", "content": "hi " * 200}]}, "messages", "maximum context length"),
    ({"messages": TALK, "max_tokens": 0}, "max_tokens", "at least 1"),
    ({"messages": TALK, "temperature": 3}, "temperature", "[0, 2]"),
    ({"messages": TALK, "n": 2, "temperature": 0}, "n", "greedy"),
    ({"messages": TALK, "top_logprobs": 2}, "top_logprobs", "logprobs: true"),
    ({"messages": TALK, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "[0, 20]"),
    ({"messages": TALK, "logprobs": 2}, "logprobs", "logprobs"),
    ({"messages": TALK, "stop": [""]}, "stop", "non-empty"),
])
def test_bad_requests_get_openai_errors(url, body, param, words):
    error = error_of(post(url, body))
    assert error["param"] == param and words in error["message"] and error["type"] == "invalid_request_error"


def test_unknown_model_and_non_object_body(url):
    assert error_of(post(url, {"model": "gpt-9", "messages": TALK}), 404)["param"] == "model"
    bad = httpx.post(url + "/v1/chat/completions", content=b"[1, 2]", timeout=60,
                     headers={"content-type": "application/json"})
    assert "JSON object" in error_of(bad)["message"]


def test_a_template_that_fails_to_render_is_a_400(tiny_folder, tmp_path):
    import gpt2kit
    path = tmp_path / "strict.jinja"
    path.write_text("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system "
                    "messages, please') }}{% endif %}{{ m.content }}\n{% endfor %}")
    model = gpt2kit.load(tiny_folder, device="cpu", chat_template=path)
    with running_server(create_app(model, ServerConfig(), MODEL)) as base:
        error = error_of(post(base, {"messages": TALK, "max_tokens": 2}))
        assert error["param"] == "messages" and "no system messages, please" in error["message"]
        ok = post(base, {"messages": TALK[1:2], "max_tokens": 2, "seed": 0})
        assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] == 3  # "Hi there\n"


def test_a_checkpoints_own_template_is_used(tiny_folder, tmp_path):
    import shutil

    import gpt2kit
    folder = tmp_path / "with-template"
    shutil.copytree(tiny_folder, folder)
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"}))
    model = gpt2kit.load(folder, device="cpu")
    with running_server(create_app(model, ServerConfig(), MODEL)) as base:
        out = post(base, {"messages": TALK[1:2], "max_tokens": 2, "seed": 0}).json()
    assert out["usage"]["prompt_tokens"] == len(model.tokenizer.encode("[user] Hi there\n"))


def test_api_key_is_required_when_set(tiny_model):
    with running_server(create_app(tiny_model, ServerConfig(api_key="s3cret"), MODEL)) as base:
        assert error_of(post(base, {"messages": TALK}), 401)["type"] == "authentication_error"
        wrong = post(base, {"messages": TALK}, headers={"Authorization": "Bearer nope"})
        assert error_of(wrong, 401)["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=base + "/v1", api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(model=MODEL, messages=TALK, max_tokens=2).choices


def test_openapi_lists_the_chat_route(url):
    schema = httpx.get(url + "/openapi.json").json()
    assert "/v1/chat/completions" in schema["paths"]
    request = schema["components"]["schemas"]["ChatCompletionRequest"]
    assert {"messages", "max_tokens", "max_completion_tokens", "top_logprobs", "seed", "top_k"} <= set(
        request["properties"])
    assert "prompt" not in request["properties"] and request["properties"]["top_k"]["default"] == 50


def test_serve_takes_a_chat_template_file(tiny_folder, tmp_path, monkeypatch):
    """`gpt2kit serve --chat-template FILE` loads the model with it (checked before serving: a
    missing file is one line and a non-zero exit, nothing listens); serve bounds torch's kernel
    caches before loading (server/listen.py)."""
    import os
    import subprocess
    import sys

    import gpt2kit.server
    path = tmp_path / "turns.jinja"
    path.write_text("{% for m in messages %}<{{ m.role }}> {{ m.content }}\n{% endfor %}")
    seen = {}
    from gpt2kit.server import listen
    for name in listen.NATIVE_CACHE_VARIABLES:  # serve bounds torch's kernel caches (restored after)
        monkeypatch.delenv(name, raising=False)

    def fake_app(model, settings, served=None):  # stop before listening: what was loaded is the point
        seen["template"] = model.chat_template
        raise SystemExit(0)
    monkeypatch.setattr("gpt2kit.server.app.create_app", fake_app)
    with pytest.raises(SystemExit):
        gpt2kit.server.serve(str(tiny_folder), ServerConfig(chat_template=str(path)), device="cpu")
    assert seen["template"].render_text([{"role": "user", "content": "hi"}]).startswith("<user> hi")
    assert all(os.environ[name] == str(listen.NATIVE_CACHE_CAPACITY) for name in listen.NATIVE_CACHE_VARIABLES)
    missing = subprocess.run([sys.executable, "-m", "gpt2kit", "serve", "-m", str(tiny_folder),
                              "--chat-template", str(tmp_path / "nope.jinja")], capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and len(missing.stderr.strip().splitlines()) == 1
    assert "nope.jinja" in missing.stderr
