"""The server fuzzed (issue 17): hypothesis posts arbitrary JSON bodies to every POST endpoint the
app's OpenAPI schema lists (so a route added later is fuzzed without touching this file), against
a real uvicorn on 127.0.0.1 serving a tiny random model.

Bodies are mostly well-typed requests built from the endpoint's own request schema with a few
fields swapped for arbitrary JSON (NaN and Infinity literals, huge integers, nested structures),
so the fuzzing reaches the value checks and generation, not only the type checks; some bodies
are not objects or not JSON at all. Every answer must be a 2xx whose body (or each streamed
event) matches the endpoint's response schema, or a 4xx with OpenAI's error body; never a 5xx,
never a hang, and /health answers after each. Examples are derandomized (the same every run).
"""

from __future__ import annotations

import json
import math
from datetime import timedelta

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_helpers import running_server

from gpt2kit.server.app import create_app
from gpt2kit.server.errors import error_type
from gpt2kit.server.listen import HTTPProtocol
from gpt2kit.server.settings import ServerConfig

HANG_S = 20  # an answer slower than this is a hang (the largest request allowed here takes < 1 s)
FAST = settings(max_examples=120, deadline=timedelta(seconds=HANG_S * 2), derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MANY = settings(FAST, max_examples=200)  # 1,500 took ~3 min quiet; CI's 15 minutes were nearly used up
# Small caps keep every accepted request cheap on the tiny model (64-token context); the checks
# that refuse the rest are the ones the defaults run.
LIMITS = ServerConfig(max_tokens_limit=32, token_budget=128, max_n=4, max_prompt_chars=2000,
                      max_body_bytes=200_000)

# Values a field may get besides its schema's: any JSON, including what Python's json writes for
# non-finite floats, integers past 64 bits, and nesting.
SCALARS = (st.none() | st.booleans() | st.floats() | st.text(max_size=12)
           | st.integers() | st.sampled_from([-1, 0, 2**31, 2**63, -2**63, 2**64, 10**30]))
ANY_JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


@pytest.fixture(scope="module")
def server(tiny_model):
    app = create_app(tiny_model, LIMITS, "tiny")
    with running_server(app, http=HTTPProtocol) as url:
        yield url, app.openapi()


# ---- the schema: which endpoints, what they take, what they answer ---------------------------

def resolve(spec: dict, schema: dict) -> dict:
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def post_endpoints(spec: dict) -> dict[str, dict]:
    """path -> the JSON request schema of every POST operation that takes a JSON body."""
    found = {}
    for path, operations in spec["paths"].items():
        body = operations.get("post", {}).get("requestBody", {}).get("content", {}).get("application/json")
        if body is not None:
            found[path] = resolve(spec, body["schema"])
    return found


def success_schema(spec: dict, path: str) -> dict:
    content = spec["paths"][path]["post"]["responses"]["200"]["content"]
    return resolve(spec, content["application/json"]["schema"])


def values(spec: dict, schema: dict) -> st.SearchStrategy:
    """Values of `schema`'s type, leaning on the edges (0, negatives, 2**63, tiny and huge floats)."""
    schema = resolve(spec, schema)
    if "anyOf" in schema:
        return st.one_of([values(spec, s) for s in schema["anyOf"]])
    kind = schema.get("type")
    if kind == "integer":
        return st.integers(-2, 40) | st.sampled_from([0, 50256, 50257, 2**31, 2**63 - 1, 2**63, -2**63, 10**20])
    if kind == "number":
        return st.floats(-3, 3) | st.sampled_from([0.0, 1.0, 1e-9, 1e300, -1e300])
    if kind == "string":
        return st.text(max_size=40) | st.sampled_from(["Hello", "<|endoftext|>", "\ud83d", "🤗 é 한국어"])
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        return st.lists(values(spec, schema.get("items", {})), max_size=5)
    if kind == "object" and "properties" in schema:
        return objects(spec, schema)
    return ANY_JSON


def objects(spec: dict, schema: dict) -> st.SearchStrategy[dict]:
    props = schema.get("properties", {})
    required = set(schema.get("required", ()))
    return st.fixed_dictionaries({k: values(spec, s) for k, s in props.items() if k in required},
                                 optional={k: values(spec, s) for k, s in props.items() if k not in required})


@st.composite
def bodies(draw, spec: dict, schema: dict) -> bytes:
    """A request body: the required fields and a few others, well typed, with up to two fields (or
    unknown ones) set to any JSON and sometimes a required field missing; or any JSON at all; or
    bytes that are not JSON."""
    kind = draw(st.sampled_from(["typed"] * 3 + ["mutated"] * 4 + ["any json", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=64) | st.sampled_from([b"", b'{"prompt":', b"\xff\xfe{}"]))
    if kind == "any json":
        return json.dumps(draw(ANY_JSON)).encode()
    props, required = schema.get("properties", {}), sorted(schema.get("required", ()))
    optional = sorted(set(props) - set(required))
    body = {name: draw(values(spec, props[name])) for name in required}
    for name in draw(st.lists(st.sampled_from(optional), max_size=4, unique=True)) if optional else ():
        body[name] = draw(values(spec, props[name]))
    if kind == "mutated":
        for name in draw(st.lists(st.sampled_from(sorted(props) + ["unknown_field"]), min_size=1,
                                  max_size=2, unique=True)):
            body[name] = draw(ANY_JSON)
        if required and draw(st.integers(0, 5)) == 0:
            body.pop(draw(st.sampled_from(required)))
    return json.dumps(body).encode()  # allow_nan: NaN and Infinity literals, as Python clients send


# ---- the property --------------------------------------------------------------------------

def conforms(spec: dict, value, schema: dict) -> bool:
    """Whether `value` matches `schema` (the subset of JSON Schema FastAPI's OpenAPI output uses)."""
    schema = resolve(spec, schema)
    if "anyOf" in schema:
        return any(conforms(spec, value, s) for s in schema["anyOf"])
    if "const" in schema or "enum" in schema:
        return value in schema.get("enum", [schema.get("const")])
    kind = schema.get("type")
    types = {"string": str, "integer": int, "number": (int, float), "boolean": bool,
             "null": type(None), "array": list, "object": dict}
    if kind is None:
        return True
    if not isinstance(value, types[kind]) or (isinstance(value, bool) and kind in ("integer", "number")):
        return False
    if kind == "array":
        return all(conforms(spec, v, schema.get("items", {})) for v in value)
    if kind == "object":
        props = schema.get("properties", {})
        return set(schema.get("required", ())) <= set(value) and all(
            conforms(spec, v, props[k]) for k, v in value.items() if k in props)
    return True


def check_error(r: httpx.Response) -> None:
    assert r.headers.get("content-type") == "application/json", (r.status_code, r.text[:300])
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert "\n" not in error["message"] and "Traceback" not in error["message"], error
    assert error["type"] == error_type(r.status_code), (r.status_code, error)  # the status's own type


def check_events(spec: dict, r: httpx.Response, schema: dict) -> None:
    """Server-sent events: each a body of the success schema (an error event would be a 5xx
    reported after the 200), ending with [DONE]."""
    events = [line.removeprefix("data: ") for line in r.text.split("\n") if line]
    assert events and events[-1] == "[DONE]", r.text[-300:]
    for event in events[:-1]:
        assert conforms(spec, json.loads(event), schema), event[:300]


def post_and_check(url: str, spec: dict, path: str, body: bytes) -> None:
    r = httpx.post(url + path, content=body, headers={"content-type": "application/json"}, timeout=HANG_S)
    assert r.status_code < 500, (r.status_code, body[:300], r.text[:300])
    if r.status_code >= 300:
        assert 400 <= r.status_code < 500, r.status_code
        check_error(r)
    elif r.headers.get("content-type", "").startswith("text/event-stream"):
        check_events(spec, r, success_schema(spec, path))
    else:
        assert conforms(spec, r.json(), success_schema(spec, path)), r.text[:300]
    health = httpx.get(url + "/health", timeout=5)
    assert health.status_code == 200 and health.json()["status"] == "ok"


def fuzz(url: str, spec: dict, budget: settings) -> dict[str, int]:
    """Run the property on every POST endpoint; how many bodies passed, by endpoint."""
    passed: dict[str, int] = {}
    for path, schema in post_endpoints(spec).items():
        passed[path] = 0

        @budget
        @given(body=bodies(spec, schema))
        def one(body: bytes) -> None:
            post_and_check(url, spec, path, body)
            passed[path] += 1

        one()
    return passed


def test_every_post_endpoint_answers_any_body_with_2xx_or_an_openai_4xx(server):
    url, spec = server
    passed = fuzz(url, spec, FAST)
    assert "/v1/completions" in passed and all(passed.values()), passed


# Each of these in each field, the rest of the body valid: every field meets every kind of value.
ODD_VALUES = [None, True, -1, 1.5, 2**64, -2**63, math.nan, -math.inf, "", "x" * 300, [[[]]],
              {"a": [1, {"b": None}]}]


def simple(spec: dict, schema: dict):
    """A small value of `schema`'s first type: the valid part of a body whose one field is odd."""
    schema = resolve(spec, schema)
    if "anyOf" in schema:
        return simple(spec, schema["anyOf"][0])
    kind = schema.get("type")
    if kind == "array":
        return [simple(spec, schema.get("items", {}))]
    if kind == "object":
        return {k: simple(spec, s) for k, s in schema.get("properties", {}).items() if k in schema.get("required", ())}
    return {"string": "Hi", "integer": 1, "number": 1.0, "boolean": False}.get(kind)


def test_every_field_meets_every_kind_of_json_value(server):
    url, spec = server
    for path, schema in post_endpoints(spec).items():
        base = simple(spec, schema)
        if "max_tokens" in schema.get("properties", {}):
            base["max_tokens"] = 1  # the hundreds of bodies accepted stay cheap
        post_and_check(url, spec, path, json.dumps(base).encode())
        for name in schema.get("properties", {}):
            for value in ODD_VALUES:
                post_and_check(url, spec, path, json.dumps({**base, name: value}).encode())


@pytest.mark.slow
def test_many_more_bodies(server):
    url, spec = server
    assert fuzz(url, spec, MANY)


def test_the_bodies_reach_generation(server):
    """The mutated bodies are not all refused by the type checks: some generate (statuses kept)."""
    url, spec = server
    schema = post_endpoints(spec)["/v1/completions"]
    statuses: list[int] = []

    @settings(FAST, max_examples=60)
    @given(body=bodies(spec, schema))
    def one(body: bytes) -> None:
        statuses.append(httpx.post(url + "/v1/completions", content=body, timeout=HANG_S,
                                   headers={"content-type": "application/json"}).status_code)

    one()
    assert statuses.count(200) >= 5 and statuses.count(400) >= 5, statuses


def test_the_checker_refuses_what_it_should(server):
    """conforms() is what the 2xx bodies are judged by: it must say no to a wrong one."""
    _, spec = server
    schema = success_schema(spec, "/v1/completions")
    good = {"id": "x", "object": "text_completion", "created": 1, "model": "tiny",
            "choices": [{"index": 0, "text": "hi", "logprobs": None, "finish_reason": "stop"}]}
    assert conforms(spec, good, schema)
    assert not conforms(spec, {**good, "choices": [{"index": "0", "text": "hi"}]}, schema)
    assert not conforms(spec, {**good, "object": "chat"}, schema)
    assert not conforms(spec, {k: v for k, v in good.items() if k != "id"}, schema)
