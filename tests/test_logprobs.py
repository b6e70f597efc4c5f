"""Log-probabilities gpt2kit reports (`Model.complete(logprobs=N)`, `Model.score`) against
transformers' log-softmax of its own GPT2LMHeadModel's logits, on the same random weights."""

from __future__ import annotations

import pytest
import torch

TOP = 5


@pytest.fixture(scope="module")
def hf(tiny_folder):
    import transformers
    return transformers.GPT2LMHeadModel.from_pretrained(tiny_folder).eval()


def hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """(len(ids), V) float32: log p(next token | ids[:t + 1]) at every position t, by transformers."""
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)


def test_completion_logprobs_and_alternatives_are_transformers_log_softmax(tiny_model, hf):
    """Sampled (so mostly not the most likely token), with filters and a penalty that must not
    leak into the reported numbers: they are the model's, before any sampling step. An empty
    prompt starts from <|endoftext|>."""
    prompts = ["Hello there", "", "The quick brown fox jumps over the"]
    completions = tiny_model.complete(prompts, n=2, seed=3, max_new_tokens=12, stop_at_eos=False, logprobs=TOP,
                                      temperature=1.5, top_k=40, repetition_penalty=1.2)
    assert len(completions) == 6
    not_top = 0
    for c in completions:
        prompt = tiny_model.tokenizer.encode(prompts[c.prompt_index]) or [tiny_model.tokenizer.eos_id]
        expected = hf_logprobs(hf, prompt + c.token_ids)[len(prompt) - 1:-1]  # the chosen tokens' positions
        assert [lp.token_id for lp in c.logprobs] == c.token_ids and len(c.token_ids) == 12
        for lp, row in zip(c.logprobs, expected):
            assert abs(lp.logprob - row[lp.token_id].item()) < 1e-4
            top = torch.topk(row, TOP)
            assert len(lp.top) == TOP and len({i for i, _, _ in lp.top}) == TOP
            assert max(abs(v - w) for (_, _, v), w in zip(lp.top, top.values.tolist())) < 1e-4
            assert all(abs(v - row[i].item()) < 1e-4 for i, _, v in lp.top)  # ids right, whatever the order of near-ties
            not_top += lp.token_id != lp.top[0][0]
    assert not_top > 0  # the chosen token's own logprob is checked, not only the top alternative's


def test_score_token_logprobs_are_transformers_log_softmax(tiny_model, hf):
    """Each token conditioned on <|endoftext|> and the tokens before it; several texts of
    different lengths scored in one batch."""
    texts = ["Hello there, general Kenobi.", "a", "The quick brown fox jumps over the lazy dog. " * 3]
    scores = tiny_model.score(texts)
    eos = tiny_model.tokenizer.eos_id
    for text, s in zip(texts, scores):
        ids = tiny_model.tokenizer.encode(text)
        assert s.token_ids == ids and s.n_tokens == len(s.token_logprobs) == len(ids)
        expected = hf_logprobs(hf, [eos, *ids])[:-1].gather(-1, torch.tensor(ids)[:, None])[:, 0]
        assert (torch.tensor(s.token_logprobs) - expected).abs().max() < 1e-4
        assert s.total == pytest.approx(expected.double().sum().item(), abs=1e-3)
    one = tiny_model.score(texts[0])  # a single text: the same numbers
    assert one.token_logprobs == pytest.approx(scores[0].token_logprobs, abs=1e-5)
