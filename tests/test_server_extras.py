"""Issue 16, items 1-4, through real HTTP: POST /tokenize and /detokenize (vLLM's shapes),
GET /metrics (Prometheus), logit_bias and bad_words in requests, and scoring a prompt with
echo + logprobs + max_tokens 0 (lm-eval's local-completions model)."""

from __future__ import annotations

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from server_helpers import running_server
from test_server import error_of, streamed

from gpt2kit.server.app import create_app
from gpt2kit.server.metrics import Metrics
from gpt2kit.server.settings import ServerConfig

openai = pytest.importorskip("openai", reason="openai is a test dependency (pip install -e \".[test]\"); CI installs it")

MODEL = "tiny-model"
N_CTX = 64


@pytest.fixture(scope="module")
def url(tiny_model):
    assert tiny_model.config.n_positions == N_CTX
    with running_server(create_app(tiny_model, ServerConfig(), MODEL)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def complete(url: str, body: dict) -> dict:
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def complete_error(url: str, body: dict, status: int = 400) -> dict:
    return error_of(httpx.post(url + "/v1/completions", json=body, timeout=60), status)


# ---- 1. tokens ----------------------------------------------------------------------------------

def test_tokenize_counts_what_a_completion_uses(url, tiny_model):
    prompt = "Hello world <|endoftext|> é"
    out = httpx.post(url + "/tokenize", json={"model": MODEL, "prompt": prompt}).json()
    assert set(out) == {"count", "max_model_len", "tokens"}
    assert out["tokens"] == tiny_model.tokenizer.encode(prompt) and out["max_model_len"] == N_CTX
    assert 50256 not in out["tokens"]  # special-token text is ordinary text, as in completions
    usage = complete(url, {"prompt": prompt, "max_tokens": 1})["usage"]
    assert out["count"] == len(out["tokens"]) == usage["prompt_tokens"]
    back = httpx.post(url + "/detokenize", json={"model": MODEL, "tokens": out["tokens"]}).json()
    assert back == {"prompt": prompt}
    assert httpx.post(url + "/detokenize", json={"tokens": []}).json() == {"prompt": ""}


@pytest.mark.parametrize("path, body, param, status", [
    ("/detokenize", {"tokens": [50257]}, "tokens", 400), ("/detokenize", {"tokens": [-1]}, "tokens", 400),
    ("/detokenize", {"tokens": [1.5]}, "tokens", 400), ("/detokenize", {"tokens": "Hi"}, "tokens", 400),
    ("/detokenize", {}, "tokens", 400), ("/tokenize", {"prompt": 5}, "prompt", 400),
    ("/tokenize", {"prompt": ""}, "prompt", 400), ("/tokenize", {"prompt": "a" * 100_001}, "prompt", 400),
    ("/tokenize", {"prompt": "Hi", "model": "gpt-9"}, "model", 404),
    ("/detokenize", {"tokens": [1], "model": "gpt-9"}, "model", 404),
])
def test_token_endpoints_refuse_bad_input_by_name(url, path, body, param, status):
    error = error_of(httpx.post(url + path, json=body), status)
    assert error["param"] == param, error
    if body.get("tokens") in ([50257], [-1]):
        assert str(body["tokens"][0]) in error["message"] and "50256" in error["message"]
    assert httpx.get(url + "/health").status_code == 200


# ---- 2. metrics -------------------------------------------------------------------------------

def scrape(url: str, **kwargs) -> dict[tuple, float]:
    """Every sample of /metrics by (name, sorted labels)."""
    r = httpx.get(url + "/metrics", **kwargs)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def test_metrics_count_requests_tokens_and_latencies(url):
    before = scrape(url)
    complete(url, {"prompt": [11, 12, 13], "max_tokens": 5, "n": 2, "ignore_eos": True, "seed": 1})
    texts, _ = streamed(url, {"prompt": [11, 12], "max_tokens": 4, "ignore_eos": True, "seed": 2})
    complete_error(url, {"prompt": "Hi", "top_p": 5})
    after = scrape(url)

    def grew(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert grew("gpt2kit_requests_total", route="/v1/completions", status="200") == 2
    assert grew("gpt2kit_requests_total", route="/v1/completions", status="400") == 1
    assert grew("gpt2kit_request_duration_seconds_count", route="/v1/completions") == 3
    assert grew("gpt2kit_prompt_tokens_total") == 3 + 2
    assert grew("gpt2kit_generation_tokens_total") == 2 * 5 + 4
    assert grew("gpt2kit_time_to_first_token_seconds_count") == 3  # one per row
    assert grew("gpt2kit_time_per_output_token_seconds_count") == 2 * 4 + 3  # the other tokens
    assert grew("gpt2kit_time_per_output_token_seconds_sum") > 0
    assert after[("gpt2kit_requests_waiting", ())] == 0 and after[("gpt2kit_rows_running", ())] == 0
    httpx.get(url + "/no-such-path")
    assert scrape(url)[("gpt2kit_requests_total", (("route", "other"), ("status", "404")))] >= 1


def test_metrics_count_chat_requests_and_their_rendered_prompt(url):
    messages = [{"role": "user", "content": "Hello there"}]
    before = scrape(url)
    r = httpx.post(url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 3, "seed": 1})
    assert r.status_code == 200
    after = scrape(url)
    key = ("gpt2kit_requests_total", (("route", "/v1/chat/completions"), ("status", "200")))
    assert after[key] - before.get(key, 0) == 1
    grew = after[("gpt2kit_prompt_tokens_total", ())] - before[("gpt2kit_prompt_tokens_total", ())]
    assert grew == r.json()["usage"]["prompt_tokens"] > 0


def test_metric_gauges_read_the_scheduler_and_apps_do_not_share_a_registry(tiny_model):
    metrics = Metrics(lambda: {"waiting": 3, "running": 2})
    from prometheus_client import generate_latest
    text = generate_latest(metrics.registry).decode()
    assert "gpt2kit_requests_waiting 3.0" in text and "gpt2kit_rows_running 2.0" in text
    one, two = create_app(tiny_model, ServerConfig()), create_app(tiny_model, ServerConfig())  # no clash
    assert one is not two


def test_new_endpoints_honour_the_api_key(tiny_model):
    with running_server(create_app(tiny_model, ServerConfig(api_key="s3cret"), MODEL)) as base:
        key = {"authorization": "Bearer s3cret"}
        for method, path, body in [("POST", "/tokenize", {"prompt": "Hi"}), ("POST", "/detokenize", {"tokens": [1]}),
                                   ("GET", "/metrics", None)]:
            assert error_of(httpx.request(method, base + path, json=body), 401)["type"] == "authentication_error"
            assert httpx.request(method, base + path, json=body, headers=key).status_code == 200, path
        assert scrape(base, headers=key)[("gpt2kit_requests_total", (("route", "/tokenize"), ("status", "401")))] == 1


# ---- 3. logit_bias and bad_words --------------------------------------------------------------

def test_logit_bias_and_bad_words_through_the_openai_client(client):
    forced = client.completions.create(model=MODEL, prompt="Hello", max_tokens=6, seed=1,
                                       logit_bias={"11": 100, "13": 100}, extra_body={"ignore_eos": True})
    assert set(forced.choices[0].text) <= {",", "."} and len(forced.choices[0].text) == 6
    free = client.completions.create(model=MODEL, prompt="Hello", max_tokens=8, temperature=0, logprobs=0,
                                     extra_body={"ignore_eos": True}).choices[0]
    word = free.logprobs.tokens[0]  # the first token's text: a one-token phrase
    banned = client.completions.create(model=MODEL, prompt="Hello", max_tokens=8, temperature=0,
                                       extra_body={"ignore_eos": True, "bad_words": [word]}).choices[0].text
    assert banned != free.text and not banned.startswith(word)
    assert client.completions.create(model=MODEL, prompt="Hello", max_tokens=2, logit_bias=None).choices


@pytest.mark.parametrize("field, value, fragment", [
    ("logit_bias", {"11": 101}, "logit_bias bias of token 11 must be a number in [-100, 100], got 101"),
    ("logit_bias", {"11": -100.5}, "in [-100, 100], got -100.5"),
    ("logit_bias", {"eleven": 1}, "logit_bias keys must be token ids (integers), got 'eleven'"),
    ("logit_bias", {"50257": 1}, "logit_bias names token id 50257, outside the vocabulary (ids 0 to 50256)"),
    ("logit_bias", {"11": True}, "logit_bias: "), ("logit_bias", {"11": "x"}, "logit_bias: "),
    ("bad_words", [""], "bad_words phrases must be non-empty text, got ''"),
    ("bad_words", "x", "bad_words: "), ("bad_words", [1], "bad_words: "),
])
def test_bad_biases_and_phrases_are_400s_naming_the_field(url, field, value, fragment):
    error = complete_error(url, {"prompt": "Hi", "max_tokens": 2, field: value})
    assert error["param"] == field and fragment in error["message"], error


# ---- 4. scoring: echo + logprobs + max_tokens 0 --------------------------------------------------

def prompt_logprobs(model, ids: list[int]) -> list[float]:
    logp = torch.log_softmax(model.logits([ids])[0], -1)
    return [logp[t - 1, ids[t]].item() for t in range(1, len(ids))]


def test_echo_with_max_tokens_0_scores_the_prompt(client, tiny_model):
    ids = tiny_model.tokenizer.encode("The quick brown fox jumps")
    out = client.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=1)
    [choice] = out.choices
    assert choice.text == "The quick brown fox jumps" and choice.finish_reason == "length"
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.tokens) == len(ids)
    assert lp.token_logprobs[1:] == pytest.approx(prompt_logprobs(tiny_model, ids), abs=1e-4)
    assert "".join(lp.tokens) == choice.text and lp.text_offset[1] == len(lp.tokens[0])
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 0


def test_lm_eval_local_completions_requests(url, tiny_model):
    """The body lm-eval sends for loglikelihood (a batch of token-id prompts, max_tokens 1, echo,
    logprobs 1, temperature 0) and how it reads the answer: sum(token_logprobs[ctxlen:-1]), and
    greedy if each token's logprob is its top_logprobs' maximum."""
    tok = tiny_model.tokenizer
    pairs = [("The capital of France is", " Paris"), ("One, two,", " three")]
    prompts = [tok.encode(c) + tok.encode(x) for c, x in pairs]
    body = {"model": MODEL, "prompt": prompts, "temperature": 0, "max_tokens": 1, "logprobs": 1,
            "seed": 1234, "echo": True}
    out = complete(url, body)
    for (context, _), ids, choice in zip(pairs, prompts, sorted(out["choices"], key=lambda c: c["index"])):
        ctxlen = len(tok.encode(context))
        values = choice["logprobs"]["token_logprobs"]
        assert len(values) == len(ids) + 1  # the prompt, then the one generated token
        assert sum(values[ctxlen:-1]) == pytest.approx(sum(prompt_logprobs(tiny_model, ids)[ctxlen - 1:]), abs=1e-4)
        tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
        assert all(max(top.values()) >= v - 1e-6 for v, top in zip(values[ctxlen:-1], tops))
    zero = complete(url, {**body, "max_tokens": 0})  # the same scores, without generating
    assert [c["logprobs"]["token_logprobs"] for c in zero["choices"]] == [
        c["logprobs"]["token_logprobs"][:-1] for c in out["choices"]]


def test_scoring_streams_and_fills_the_whole_context(url, tiny_model):
    body = {"prompt": "Hello there", "max_tokens": 0, "echo": True, "logprobs": 0,
            "stream_options": {"include_usage": True}}
    texts, events = streamed(url, body)
    plain = complete(url, body)["choices"][0]
    assert texts[0] == plain["text"] == "Hello there"
    assert events[0]["choices"][0]["logprobs"]["token_logprobs"] == plain["logprobs"]["token_logprobs"]
    assert [e["choices"][0]["finish_reason"] for e in events[:-1]] == [None, "length"]
    assert events[-1]["usage"]["completion_tokens"] == 0
    full = complete(url, {"prompt": [11] * N_CTX, "max_tokens": 0, "echo": True, "logprobs": 0})
    assert len(full["choices"][0]["logprobs"]["tokens"]) == N_CTX
    error = complete_error(url, {"prompt": [11] * (N_CTX + 1), "max_tokens": 0, "echo": True})
    assert error["code"] == "context_length_exceeded" and f"at most {N_CTX} tokens" in error["message"]
    error = complete_error(url, {"prompt": "Hi", "max_tokens": 0})
    assert error["param"] == "max_tokens" and "echo" in error["message"]
    two = complete(url, {"prompt": ["Hi", "Hello there"], "max_tokens": 0, "echo": True, "n": 2})
    assert [c["text"] for c in two["choices"]] == ["Hi", "Hi", "Hello there", "Hello there"]
    assert all(c["logprobs"] is None for c in two["choices"])
