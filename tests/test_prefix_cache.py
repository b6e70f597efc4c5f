"""Prefix caching (issue 16, item 5): prompts that start alike reuse cached keys and values, and
every output (tokens, text, logprobs) is the same with the cache on or off."""

from __future__ import annotations

import httpx
import pytest
import torch
from server_helpers import running_server
from test_running_batch import rows_for

from gpt2kit.config import GenerationConfig
from gpt2kit.errors import OptionError
from gpt2kit.inference.generate import step
from gpt2kit.inference.prefix_cache import PrefixCache
from gpt2kit.inference.running_batch import RunningBatch
from gpt2kit.server.app import create_app
from gpt2kit.server.settings import ServerConfig

BLOCK = 4  # small blocks, so the tiny model's 64 positions hold several


def system_tokens(tokenizer) -> list[int]:
    return tokenizer.encode(" You are a helpful assistant who answers in short sentences. Question:")


def prompts_sharing_prefixes(tokenizer) -> list[list[int]]:
    """Prompts sharing starts of different lengths (a whole block or not), and one sharing none."""
    system = system_tokens(tokenizer)
    return [system + tokenizer.encode(" what is two plus two?"),
            system[:9] + tokenizer.encode(" different after nine tokens"),
            system + tokenizer.encode(" name a colour."),
            tokenizer.encode("Unrelated start"),
            system[:BLOCK * 2],  # exactly two blocks: the second is recomputed for its logits
            system + tokenizer.encode(" what is two plus two? And three plus three, please?")]


def configs() -> list[GenerationConfig]:
    sampled = GenerationConfig(temperature=0.9, top_k=50, seed=7, stop_at_eos=False, max_new_tokens=9, logprobs=2)
    greedy = GenerationConfig(temperature=0, stop_at_eos=False, max_new_tokens=12, logprobs=1)
    return [sampled, greedy, sampled, greedy, sampled, greedy]


def run(model, prompts, schedule: dict[int, list[int]], prefix_cache: PrefixCache | None, capacity: int = 6):
    """Join prompts[k] for k in schedule[s] before step s; each row's Completion by prompt number."""
    rows = rows_for(model, prompts, configs())
    done = {}
    with torch.inference_mode():
        batch = RunningBatch(model.module, capacity, prefix_cache=prefix_cache)
        s = 0
        while batch.rows or any(k >= s for k in schedule):
            if joining := [rows[k] for k in schedule.get(s, [])]:
                batch.join(joining, [row.prompt for row in joining])
            for event in step(batch, model.tokenizer) if batch.rows else []:
                if event.completion:
                    done[event.row] = event.completion
            s += 1
    return done


def same(a, b) -> None:
    """Completions equal: tokens, text and finish exactly; logprobs to float32 rounding. Not to
    the last bit: attention sums over all of a row's cache slots in vector lanes, so a key's last
    bits depend on the slot it sat at when computed (on the row's padding, which depends on its
    batch), with or without the cache; cached blocks were computed at another row's slots."""
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k].token_ids, a[k].text, a[k].finish_reason) == (b[k].token_ids, b[k].text, b[k].finish_reason)
        for x, y in zip(a[k].logprobs, b[k].logprobs, strict=True):
            assert (x.token_id, [t[0] for t in x.top]) == (y.token_id, [t[0] for t in y.top])
            assert x.logprob == pytest.approx(y.logprob, abs=1e-5)
            assert [t[2] for t in x.top] == pytest.approx([t[2] for t in y.top], abs=1e-5)


# Rows join one at a time (the running batch's padding then differs from the prompt's own: a
# shorter prompt joins a longer batch, a longer one moves the running rows right), and together.
SCHEDULES = [{0: [0], 2: [1], 3: [2, 3], 5: [4], 6: [5]}, {0: [0, 1, 2], 4: [3, 4, 5]}]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_outputs_are_identical_with_the_cache_on_or_off(tiny_model, schedule):
    prompts = prompts_sharing_prefixes(tiny_model.tokenizer)
    cache = PrefixCache(budget=10 << 20, block=BLOCK)
    same(run(tiny_model, prompts, schedule, cache), run(tiny_model, prompts, schedule, None))
    assert cache.stats.reused > 0  # the cached path ran
    # and a second pass finds every prompt's blocks already cached
    reused = cache.stats.reused
    same(run(tiny_model, prompts, schedule, cache), run(tiny_model, prompts, schedule, None))
    assert cache.stats.reused - reused == sum((len(p) - 1) // BLOCK * BLOCK for p in prompts)


def test_joiners_sharing_an_uncached_start_compute_it_once(tiny_model, monkeypatch):
    prompts = prompts_sharing_prefixes(tiny_model.tokenizer)
    computed = []
    forward = type(tiny_model.module).forward
    monkeypatch.setattr(type(tiny_model.module), "forward",
                        lambda self, idx, *a, **k: (computed.append(idx.numel()), forward(self, idx, *a, **k))[1])
    cache = PrefixCache(budget=10 << 20, block=BLOCK)
    with torch.inference_mode():
        batch = RunningBatch(tiny_model.module, 3, prefix_cache=cache)
        batch.join([0, 2, 5], [prompts[0], prompts[2], prompts[5]])
    # prompt 0 first; 2 and 5 then share its cached blocks and compute only their own tails
    assert len(computed) == 2 and computed[0] == len(prompts[0])
    # 2 finds the blocks inside the system text, 5 (prompt 0 and more) every block 0 stored
    shared = len(system_tokens(tiny_model.tokenizer)) // BLOCK * BLOCK
    assert cache.stats.reused == shared + (len(prompts[0]) - 1) // BLOCK * BLOCK
    assert computed[1] < len(prompts[2]) + len(prompts[5])


def test_eviction_keeps_memory_within_the_budget(tiny_model):
    prompts = prompts_sharing_prefixes(tiny_model.tokenizer)
    probe = PrefixCache(budget=10 << 20, block=BLOCK)
    run(tiny_model, prompts, SCHEDULES[0], probe)
    per_block = probe.nbytes // len(probe)
    small = PrefixCache(budget=5 * per_block, block=BLOCK)
    same(run(tiny_model, prompts, SCHEDULES[0], small), run(tiny_model, prompts, SCHEDULES[0], None))
    assert small.nbytes <= small.budget and len(small) == 5 and small.stats.evicted > 0
    # only leaves are evicted: every kept block's parent is kept too
    kept = {id(b) for b in small.lru.values()}
    assert all(b.parent is None or id(b.parent) in kept for b in small.lru.values())


def test_a_budget_smaller_than_one_block_keeps_nothing(tiny_model):
    prompts = prompts_sharing_prefixes(tiny_model.tokenizer)
    cache = PrefixCache(budget=100, block=BLOCK)
    same(run(tiny_model, prompts, SCHEDULES[1], cache), run(tiny_model, prompts, SCHEDULES[1], None))
    assert len(cache) == 0 and cache.stats.reused == 0


def test_prefix_cache_setting_is_checked():
    assert ServerConfig().prefix_cache_mb > 0
    with pytest.raises(OptionError, match="prefix_cache_mb"):
        ServerConfig(prefix_cache_mb=-1)


def complete(url: str, prompt: str, seed: int) -> dict:
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0.8, "seed": seed, "logprobs": 2}
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return [(c["text"], c["logprobs"]) for c in r.json()["choices"]]


def test_server_answers_the_same_with_the_cache_on_or_off(tiny_model):
    system = " You are a helpful assistant who answers in short sentences. Question:"
    prompts = [system + q for q in (" what is two plus two?", " name a colour.", " why?")] + [system[:20]]
    answers = []
    for mb in (0, 1):
        app = create_app(tiny_model, ServerConfig(prefix_cache_mb=mb), "tiny")
        with running_server(app) as url:
            answers.append([complete(url, p, seed) for seed in (1, 2) for p in prompts])
        cache = app.state.scheduler.prefix_cache
        assert (cache is None) == (mb == 0)
    assert answers[0] == answers[1]
    assert cache.stats.reused > 0


def test_blocks_are_kept_apart_by_adapter(tiny_model):
    """Keys and values depend on the weights: blocks one adapter computed never serve another."""
    tokens = prompts_sharing_prefixes(tiny_model.tokenizer)[0]
    cache = PrefixCache(budget=10 << 20, block=BLOCK)
    with torch.inference_mode():
        batch = RunningBatch(tiny_model.module, 1, prefix_cache=cache)
        batch.join([0], [tokens])
    stored = len(cache)
    assert stored == (len(tokens) - 1) // BLOCK and len(cache.match(tokens, space=-1)) == stored
    assert cache.match(tokens, space=0) == [] and cache.shares_new_block([tokens, tokens], [-1, 0]) == [False, False]
