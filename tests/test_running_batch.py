"""Continuous batching: rows that join and leave a running batch get exactly the tokens they get alone."""

import torch

from gpt2kit.config import GenerationConfig
from gpt2kit.inference.generate import make_rows, step
from gpt2kit.inference.kv_cache import KVCache
from gpt2kit.inference.running_batch import RunningBatch

GREEDY = GenerationConfig(temperature=0, stop_at_eos=False, max_new_tokens=30)


def alone(model, prompt: list[int], cfg: GenerationConfig) -> list[int]:
    [c] = model.complete(model.tokenizer.decode(prompt), cfg)
    return c.token_ids


def rows_for(model, prompts, cfgs, first=0):
    return [make_rows(model.tokenizer, [p], cfg, model.config.n_positions, model.device, first_index=first + k)[0]
            for k, (p, cfg) in enumerate(zip(prompts, cfgs))]


def run(model, schedule: dict[int, list], capacity: int) -> dict[int, list[int]]:
    """Step a batch, joining `schedule[s]` rows before step s; return each row's tokens by index."""
    done = {}
    with torch.inference_mode():
        batch = RunningBatch(model.module, capacity)
        s = 0
        while batch.rows or any(k >= s for k in schedule):
            joining = schedule.get(s, [])
            if joining:
                batch.join(joining, [row.prompt for row in joining])
            for event in step(batch, model.tokenizer) if batch.rows else []:
                if event.completion:
                    done[event.row] = event.completion.token_ids
            s += 1
    return done


def test_rows_joining_later_get_their_solo_tokens(tiny_model, monkeypatch):
    moves = []
    real_move = KVCache.move_slots
    monkeypatch.setattr(KVCache, "move_slots", lambda self, rows, src, dst, n: (
        moves.append("right" if dst > src else "left"), real_move(self, rows, src, dst, n)))
    enc = tiny_model.tokenizer.encode
    prompts = [enc("Hello there"), enc(" one two three four five six seven eight nine ten eleven twelve"),
               enc("Hi"), enc("A fairly long prompt that joins last of all, after the others")]
    cfgs = [GREEDY, GenerationConfig(temperature=0, stop_at_eos=False, max_new_tokens=12),
            GenerationConfig(temperature=0, stop_at_eos=False, max_new_tokens=55), GREEDY]
    rows = rows_for(tiny_model, prompts, cfgs)
    # Row 1 is longer than the running row (the batch moves right); rows 2 and 3 join late, so the
    # cache of 64 positions fills and the padding columns are dropped.
    got = run(tiny_model, {0: [rows[0]], 4: [rows[1]], 9: [rows[2]], 20: [rows[3]]}, capacity=3)
    assert "right" in moves and "left" in moves
    for k, (p, cfg) in enumerate(zip(prompts, cfgs)):
        assert got[k] == alone(tiny_model, p, cfg), f"row {k}"


def test_a_row_that_fills_the_window_slides_inside_the_batch(tiny_model):
    enc = tiny_model.tokenizer.encode
    long_prompt = enc(" a b c d e f g h i j k l m n o p q r s t u v w x y z" * 2)[:50]
    prompts = [long_prompt, enc("Short one")]
    cfgs = [GREEDY, GenerationConfig(temperature=0, stop_at_eos=False, max_new_tokens=40)]
    rows = rows_for(tiny_model, prompts, cfgs)
    got = run(tiny_model, {0: [rows[0]], 3: [rows[1]]}, capacity=2)
    assert len(got[0]) == 30 and len(long_prompt) + 30 > tiny_model.config.n_positions
    for k, (p, cfg) in enumerate(zip(prompts, cfgs)):
        assert got[k] == alone(tiny_model, p, cfg), f"row {k}"


def test_rows_with_different_sampling_settings_share_a_batch(tiny_model):
    enc = tiny_model.tokenizer.encode
    cfgs = [GenerationConfig(seed=1, temperature=0.7, top_k=20, max_new_tokens=20, stop_at_eos=False),
            GenerationConfig(seed=2, temperature=1.3, top_p=0.9, top_k=0, max_new_tokens=15, stop_at_eos=False),
            GenerationConfig(seed=3, repetition_penalty=1.3, frequency_penalty=0.5, min_p=0.05,
                             max_new_tokens=25, stop_at_eos=False),
            GenerationConfig(temperature=0, presence_penalty=1.0, max_new_tokens=10, stop_at_eos=False)]
    prompts = [enc("The cat"), enc("Once upon a time"), enc("Why did the"), enc("Hello")]
    rows = rows_for(tiny_model, prompts, cfgs)
    got = run(tiny_model, {0: rows[:2], 2: rows[2:]}, capacity=4)
    for k, (p, cfg) in enumerate(zip(prompts, cfgs)):
        assert got[k] == alone(tiny_model, p, cfg), f"row {k}"


def test_leaving_rows_free_their_slots_for_new_ones(tiny_model):
    enc = tiny_model.tokenizer.encode
    short = GenerationConfig(temperature=0, stop_at_eos=False, max_new_tokens=3)
    rows = rows_for(tiny_model, [enc("a"), enc("b c"), enc("d e f")], [short, GREEDY, short])
    with torch.inference_mode():
        batch = RunningBatch(tiny_model.module, capacity=2)
        batch.join(rows[:2], [r.prompt for r in rows[:2]])
        while rows[0].finish_reason is None:
            step(batch, tiny_model.tokenizer)
        assert batch.rows == [rows[1]] and batch.free == 1
        batch.join(rows[2:], [rows[2].prompt])
        while batch.rows:
            step(batch, tiny_model.tokenizer)
    assert rows[2].tokens == alone(tiny_model, enc("d e f"), short)
