"""Generation: greedy parity with transformers, seeds, stops, lengths, streaming, logprobs."""

import pytest
import torch

import gpt2kit
from gpt2kit.config import GenerationConfig
from gpt2kit.inference.generate import generate_events, split_stop

GREEDY = dict(temperature=0, stop_at_eos=False)


def hf_greedy(hf, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """transformers' own generate() with left padding and an attention mask."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                      do_sample=False, pad_token_id=0)
    return out[:, width:].tolist()


def test_greedy_matches_transformers_batched_different_lengths(tiny_folder, tiny_model):
    import transformers
    hf = transformers.GPT2LMHeadModel.from_pretrained(tiny_folder).eval()
    prompts = [[464, 3290, 318], [15496, 11, 314, 1101, 257, 3303, 2746, 11, 290], [50256]]
    expected = hf_greedy(hf, prompts, 24)
    alone = [hf_greedy(hf, [p], 24)[0] for p in prompts]
    assert expected == alone
    got = [c.token_ids for c in _complete_ids(tiny_model, prompts, GenerationConfig(max_new_tokens=24, **GREEDY))]
    assert got == expected


def _complete_ids(model, prompts, cfg):
    done = {}
    for e in generate_events(model.module, model.tokenizer, prompts, cfg):
        if e.completion:
            done[e.row] = e.completion
    return [done[i] for i in range(len(prompts))]


def test_generate_returns_n_texts_per_prompt(tiny_model):
    texts = tiny_model.generate("Once upon a time", max_new_tokens=8, n=3, seed=1)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    assert len(set(texts)) > 1  # different samples
    batch = tiny_model.generate(["prompt one", "a much longer prompt two"], max_new_tokens=5, n=2, seed=1)
    assert len(batch) == 4


def test_seed_reproducible_and_zero_honoured(tiny_model):
    a = tiny_model.generate("Hello", max_new_tokens=12, seed=0)
    b = tiny_model.generate("Hello", max_new_tokens=12, seed=0)
    c = tiny_model.generate("Hello", max_new_tokens=12, seed=1)
    assert a == b and a != c


def test_same_seed_same_text_whatever_else_is_in_the_batch(tiny_model):
    alone = tiny_model.generate("The cat", max_new_tokens=16, seed=5, n=2)
    batch = tiny_model.generate(["A completely different and longer prompt here", "The cat"],
                                max_new_tokens=16, seed=5, n=2)
    assert batch[2:] == alone


def test_unseeded_rows_draw_independently(tiny_model):
    """Without a seed no two rows share random draws: the same prompt twice, or different
    prompts. Near-uniform sampling over the whole vocabulary (top_k 0, temperature 2 on a random
    model) makes shared draws visible: rows drawing from one stream pick the same tokens, while
    independent rows agree on a token about 1 time in 50,000."""
    prompts = ["Why did the", "Why did the", "Once upon a time", "Hello"] * 8
    done = tiny_model.complete(prompts, max_new_tokens=12, temperature=2.0, top_k=0, stop_at_eos=False)
    rows = [c.token_ids for c in done]
    assert len({tuple(r) for r in rows}) == len(rows), "every row is its own sample"
    agree = sum(a[t] == b[t] for i, a in enumerate(rows) for b in rows[i + 1:] for t in range(12))
    pairs = len(rows) * (len(rows) - 1) // 2 * 12
    assert agree <= 0.01 * pairs, f"{agree} of {pairs} same-step draws agree: rows share randomness"
    streamed = [list(tiny_model.stream("Why did the", max_new_tokens=12, temperature=2.0, top_k=0))
                for _ in range(2)]
    assert streamed[0] != streamed[1], "two unseeded calls differ"


def test_max_new_tokens_and_max_length(tiny_model):
    [c] = tiny_model.complete("Hello world", max_new_tokens=7, seed=0, stop_at_eos=False)
    assert len(c.token_ids) == 7 and c.finish_reason == "length"
    [c] = tiny_model.complete("Hello world", max_length=5, max_new_tokens=None, seed=0, stop_at_eos=False)
    assert c.prompt_tokens == 2 and len(c.token_ids) == 3


def test_stop_string_ends_text_early_and_is_not_included(tiny_model):
    [full] = tiny_model.complete("Hello", max_new_tokens=30, **GREEDY)
    stop = full.text[10:13]
    [c] = tiny_model.complete("Hello", max_new_tokens=30, stop=[stop], **GREEDY)
    assert c.finish_reason == "stop"
    assert c.text == full.text[:full.text.find(stop)]
    assert len(c.token_ids) < 30  # stopped early, not cut afterwards
    streamed = "".join(tiny_model.stream("Hello", max_new_tokens=30, stop=[stop], **GREEDY))
    assert streamed == c.text


def test_split_stop_holds_back_partial_matches():
    assert split_stop("abc Hel", ("Hello",)) == ("abc ", False)
    assert split_stop("abc Hello there", ("Hello",)) == ("abc ", True)
    assert split_stop("abc", ()) == ("abc", False)
    assert split_stop("xx", ("yz", "xxy")) == ("", False)


def eos_loving(folder):
    """A fresh load of `folder` whose every next-token distribution is dominated by <|endoftext|>."""
    m = gpt2kit.load(folder, device="cpu")
    ln_f = m.module.transformer.ln_f
    with torch.no_grad():
        ln_f.weight.zero_()
        ln_f.bias.copy_(m.module.transformer.wte.weight[m.tokenizer.eos_id] * 1e4)
    return m


def test_stops_at_eos_unless_told_not_to(tiny_folder):
    m = eos_loving(tiny_folder)
    [c] = m.complete("Hi", max_new_tokens=10, seed=0)
    assert c.finish_reason == "stop" and c.token_ids == [] and c.text == ""
    [c] = m.complete("Hi", max_new_tokens=10, seed=0, min_new_tokens=4)
    assert c.finish_reason == "stop" and len(c.token_ids) == 4
    [c] = m.complete("Hi", max_new_tokens=10, seed=0, stop_at_eos=False)
    assert c.finish_reason == "length" and c.token_ids == [m.tokenizer.eos_id] * 10


def test_empty_prompt_starts_from_endoftext(tiny_model):
    [c] = tiny_model.complete("", max_new_tokens=5, seed=3, stop_at_eos=False)
    assert len(c.token_ids) == 5 and c.prompt_tokens == 1


def test_prompt_as_long_as_context_is_an_error(tiny_model):
    n = tiny_model.config.n_positions
    with pytest.raises(gpt2kit.PromptTooLong, match=str(n)):
        tiny_model.generate(" a" * n, max_new_tokens=3)


def test_generation_past_the_window_slides(tiny_model):
    n = tiny_model.config.n_positions
    [c] = tiny_model.complete(" a" * (n - 4), max_new_tokens=20, seed=0, stop_at_eos=False)
    assert len(c.token_ids) == 20 and c.finish_reason == "length"


def test_logprobs_are_the_models(tiny_model):
    [c] = tiny_model.complete("Hello there", max_new_tokens=4, logprobs=3, **GREEDY)
    prompt = tiny_model.tokenizer.encode("Hello there")
    logits = tiny_model.logits([prompt + c.token_ids])[0]
    logp = torch.log_softmax(logits, -1)
    for k, lp in enumerate(c.logprobs):
        assert lp.token_id == c.token_ids[k]
        assert abs(lp.logprob - logp[len(prompt) - 1 + k, lp.token_id].item()) < 1e-4
        assert len(lp.top) == 3 and lp.top[0][0] == lp.token_id  # greedy picks the top one


def test_stream_concatenation_equals_generate_and_utf8_is_never_split(tiny_model):
    kwargs = dict(max_new_tokens=40, seed=11, temperature=1.0, top_k=0, stop_at_eos=False)
    pieces = list(tiny_model.stream("🤗 é 한국어 中文", **kwargs))
    [text] = tiny_model.generate("🤗 é 한국어 中文", **kwargs)
    assert "".join(pieces) == text
    if "\ufffd" not in text:
        assert not any("\ufffd" in p for p in pieces)


def test_stream_serves_several_prompts_and_samples(tiny_model):
    """Pieces of many (prompt, sample) rows, interleaved, each tagged: joined per row they are
    generate()'s texts for the same seed; and each sample alone (GenerationConfig.sample) too."""
    prompts, cfg = ["Hello", "Once upon a time"], GenerationConfig(n=3, seed=7, max_new_tokens=12)
    texts: dict[tuple[int, int], str] = {}
    finished = []
    for piece in tiny_model.stream(prompts, cfg):
        key = (piece.prompt_index, piece.sample_index)
        texts[key] = texts.get(key, "") + piece
        if piece.finish_reason is not None:
            finished.append(key)
    assert sorted(finished) == sorted(texts) == [(i, j) for i in range(2) for j in range(3)]
    assert [texts[i, j] for i in range(2) for j in range(3)] == tiny_model.generate(prompts, cfg)
    alone = "".join(tiny_model.stream(prompts[1], cfg.sample(2)))
    assert alone == texts[1, 2]


def test_penalties_change_greedy_output(tiny_model):
    plain = tiny_model.generate("the the the", max_new_tokens=20, **GREEDY)
    penalised = tiny_model.generate("the the the", max_new_tokens=20, repetition_penalty=5.0, **GREEDY)
    assert plain != penalised


def test_bfloat16_weights_generate_and_track_float32(tiny_folder, tiny_model):
    """The reduced-precision path (what CUDA uses by default) runs on CPU too: weights and cache
    in bfloat16, logits returned as float32, greedy output close to the float32 model's."""
    bf16 = gpt2kit.load(tiny_folder, device="cpu", dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16 and bf16.info()["dtype"] == "bfloat16"
    ids = tiny_model.tokenizer.encode("Hello there, general")
    assert bf16.logits(ids).dtype == torch.float32
    assert (bf16.logits(ids) - tiny_model.logits(ids)).abs().max().item() < 0.05
    [c] = bf16.complete("Hello", max_new_tokens=8, **GREEDY)
    assert len(c.token_ids) == 8


def test_dtype_choices_are_checked():
    from gpt2kit.runtime import resolve_dtype
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    with pytest.raises(gpt2kit.DeviceError, match="float16"):
        resolve_dtype("float16", cpu)
    with pytest.raises(gpt2kit.DeviceError, match="--dtype"):
        resolve_dtype("float8", cpu)
