"""Several LoRA fine-tunes on one base (issue 16, item 6): `--lora NAME=PATH` serves adapters beside
the base, the request's `model` picks one, rows of different adapters share a batch, and each
gives what `gpt2kit.load(adapter folder)` (the adapter merged into the base) gives."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import httpx
import pytest
import torch
from server_helpers import running_server

import gpt2kit
from gpt2kit.checkpoints import load_model
from gpt2kit.cli import build_parser
from gpt2kit.config import GenerationConfig, LoraConfig
from gpt2kit.errors import CheckpointError, OptionError
from gpt2kit.inference.adapters import BASE, MultiLoraLinear
from gpt2kit.inference.generate import make_rows, step
from gpt2kit.inference.running_batch import RunningBatch
from gpt2kit.lora import apply_lora, save_adapter
from gpt2kit.model import GPT
from gpt2kit.server.app import create_app
from gpt2kit.server.settings import ServerConfig

MODEL = "base"
# 30-odd tokens: two prefix-cache blocks, which must never be shared between adapters
PROMPT = ("The old lighthouse keeper climbed the stairs one last time, carrying a lamp, a letter from "
          "his daughter and the key to the door that nobody had opened in forty years")
TARGETS = {"attn": ("c_attn",), "all": ("c_attn", "c_proj", "c_fc")}  # c_fc: the GELU comes out of its kernel


def write_adapter(base: str, folder, targets: tuple[str, ...], rank: int, seed: int, n_embd: int | None = None):
    """A random LoRA adapter of `base` (B not zero, so it changes the output) in PEFT's format."""
    model = load_model(base, torch.device("cpu"), torch.float32).model
    if n_embd is not None:  # an adapter of another shape
        model = GPT(replace(model.config, n_embd=n_embd))
    cfg = LoraConfig(rank=rank, alpha=2 * rank, targets=targets)
    apply_lora(model, cfg)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B.weight"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    save_adapter(model, cfg, folder, base=base)
    return folder


@pytest.fixture(scope="module")
def adapters(tiny_folder, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: str(write_adapter(str(tiny_folder), root / name, targets, rank=2 + k, seed=k))
            for k, (name, targets) in enumerate(TARGETS.items())}


@pytest.fixture(scope="module")
def served(tiny_folder, adapters):
    """A server of a fresh base model (adding adapters changes its modules) with both adapters."""
    settings = ServerConfig(lora=tuple(f"{name}={path}" for name, path in adapters.items()))
    app = create_app(gpt2kit.load(tiny_folder, device="cpu"), settings, MODEL)
    with running_server(app) as url:
        yield url, app


REQUEST = {"prompt": PROMPT, "max_tokens": 10, "temperature": 0.9, "seed": 3, "logprobs": 2, "ignore_eos": True}
CFG = GenerationConfig(max_new_tokens=10, temperature=0.9, seed=3, logprobs=2, stop_at_eos=False)


def ask(url: str, model: str) -> tuple[str, list[float]]:
    r = httpx.post(url + "/v1/completions", json={**REQUEST, "model": model}, timeout=60)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert r.json()["model"] == model
    return choice["text"], choice["logprobs"]["token_logprobs"]


def reference(spec) -> tuple[str, list[float]]:
    """The Python API's answer: the adapter merged into the base (or the base alone)."""
    [c] = gpt2kit.load(spec, device="cpu").complete(PROMPT, CFG)
    return c.text, [t.logprob for t in c.logprobs]


def test_each_model_answers_as_its_merged_adapter_does_in_one_batch(served, tiny_folder, adapters):
    url, app = served
    names = [MODEL, *adapters, MODEL, *adapters]
    with ThreadPoolExecutor(len(names)) as pool:  # at once: rows of all three share the batch
        got = list(pool.map(lambda name: ask(url, name), names))
    want = {MODEL: reference(tiny_folder), **{name: reference(path) for name, path in adapters.items()}}
    assert len({text for text, _ in want.values()}) == 3  # each adapter changes the text
    for name, (text, logprobs) in zip(names, got):
        assert text == want[name][0], name
        # merged weights round differently from base + B A: float32 rounding, nothing more
        assert logprobs == pytest.approx(want[name][1], abs=1e-4), name
    assert app.state.scheduler.prefix_cache.stats.reused > 0  # the same prompt: per adapter, cached


def test_models_lists_base_and_adapters_with_parent_and_root(served, adapters):
    url, _ = served
    cards = httpx.get(url + "/v1/models").json()["data"]
    assert [c["id"] for c in cards] == [MODEL, *adapters]
    assert cards[0]["parent"] is None and cards[0]["root"]
    assert [(c["parent"], c["root"]) for c in cards[1:]] == [(MODEL, path) for path in adapters.values()]


def test_unknown_model_is_404_naming_what_is_served(served):
    url, _ = served
    r = httpx.post(url + "/v1/completions", json={"model": "nope", "prompt": "Hi"}, timeout=60)
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["code"] == "model_not_found" and "'attn'" in error["message"] and "'base'" in error["message"]


def test_echo_scores_the_prompt_with_the_requested_adapter(served, adapters):
    url, _ = served
    body = {"prompt": PROMPT, "max_tokens": 1, "echo": True, "logprobs": 0, "temperature": 0}
    scored = {}
    for name in (MODEL, "attn"):
        r = httpx.post(url + "/v1/completions", json={**body, "model": name}, timeout=60)
        scored[name] = r.json()["choices"][0]["logprobs"]["token_logprobs"][1:-1]
    merged = gpt2kit.load(adapters["attn"], device="cpu")
    ids = merged.tokenizer.encode(PROMPT)
    logprobs = torch.log_softmax(merged.logits([ids])[0], -1)
    assert scored["attn"] != pytest.approx(scored[MODEL], abs=1e-3)
    assert scored["attn"] == pytest.approx([float(logprobs[t - 1, ids[t]]) for t in range(1, len(ids))], abs=1e-4)


def test_rows_of_different_adapters_in_one_batch_get_their_solo_tokens(tiny_folder, adapters):
    """Base, adapter 0 and adapter 1 rows joined and decoded together vs each alone."""
    model = gpt2kit.load(tiny_folder, device="cpu")
    lora = model.add_adapters(adapters)
    cfg = GenerationConfig(temperature=0, stop_at_eos=False, max_new_tokens=8)
    prompt = model.tokenizer.encode(PROMPT)

    def run(picks: list[int]) -> list[list[int]]:
        rows = make_rows(model.tokenizer, [prompt[:12 + 3 * k] for k in range(len(picks))], cfg,
                         model.config.n_positions, model.device)
        with torch.inference_mode():
            batch = RunningBatch(model.module, len(rows), adapters=lora)
            batch.join(rows, [row.prompt for row in rows], adapters=picks)
            while batch.rows:
                step(batch, model.tokenizer)
        return [row.tokens for row in rows]

    together = run([BASE, 0, 1])
    assert together[0] == run([BASE])[0]
    assert together != run([BASE, BASE, BASE])  # the adapters ran
    assert [together[1], together[2]] == [run([BASE, 0])[1], run([BASE, 0, 1])[2]]
    # the Python API of a model serving adapters still gives the base's output
    assert model.complete(PROMPT, cfg)[0].token_ids == gpt2kit.load(tiny_folder, device="cpu").complete(PROMPT, cfg)[0].token_ids
    assert sum(isinstance(m, MultiLoraLinear) for m in model.module.modules()) == 2 * 4  # 2 blocks x 4 linears


def test_bad_adapters_are_refused_at_start_in_one_line(tiny_folder, tmp_path):
    wrong = write_adapter(str(tiny_folder), tmp_path / "wrong", ("c_attn",), rank=2, seed=0, n_embd=48)
    model = gpt2kit.load(tiny_folder, device="cpu")
    with pytest.raises(CheckpointError, match=r"^adapter 'wrong': .*lora_A\.weight .* has shape") as e:
        create_app(model, ServerConfig(lora=(f"wrong={wrong}",)), MODEL)
    assert "\n" not in str(e.value)
    assert not any(isinstance(m, MultiLoraLinear) for m in model.module.modules())  # left as it was
    with pytest.raises(CheckpointError, match="adapter 'gone'"):
        create_app(model, ServerConfig(lora=(f"gone={tmp_path / 'missing'}",)), MODEL)
    with pytest.raises(OptionError, match="base model's own name"):
        create_app(model, ServerConfig(lora=(f"{MODEL}={wrong}",)), MODEL)
    for entries in (("no-equals-sign",), ("=path",), ("a=x", "a=y")):
        with pytest.raises(OptionError, match="lora"):
            ServerConfig(lora=entries)


def test_serve_takes_repeated_lora_flags():
    args = build_parser().parse_args(["serve", "-m", "x", "--lora", "a=/p/a", "--lora", "b=/p/b"])
    assert args.lora == ["a=/p/a", "b=/p/b"]
