"""Scoring against transformers on a tiny random GPT-2 (n_positions 64): the loss of a short text,
the perplexity guide's sliding windows over a long one, and the training loss of token blocks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_hf_model

from gpt2kit.checkpoints import load_model
from gpt2kit.data.blocks import TokenBlocks
from gpt2kit.errors import OptionError, TokenizerError
from gpt2kit.inference.scoring import (
    Scores,
    evaluate_blocks,
    evaluate_documents,
    score_sequences,
    score_tokens,
    sliding_windows,
)

EOT = 50256
N_CTX = 64
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(transformers model, our model loaded from its save_pretrained folder)."""
    hf = tiny_hf_model(n_positions=N_CTX)
    folder = tmp_path_factory.mktemp("tiny")
    hf.save_pretrained(folder)
    return hf, load_model(str(folder), CPU, torch.float32).model


def random_ids(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, EOT + 1, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def guide_nll(hf, seq: list[int], stride: int) -> tuple[float, int]:
    """The loop of https://huggingface.co/docs/transformers/perplexity with the transformers model:
    the same windows and labels. One fix: each window's mean loss is weighted by the number of
    labels it really averaged. The guide weights every window by trg_len - 1, which is right for
    the first window only (the label shift drops its first token); later windows average trg_len."""
    input_ids = torch.tensor([seq])
    seq_len = input_ids.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + N_CTX, seq_len)
        trg_len = end_loc - prev_end_loc
        window = input_ids[:, begin_loc:end_loc]
        target_ids = window.clone()
        target_ids[:, :-trg_len] = -100
        loss = hf(window, labels=target_ids).loss
        num_loss_tokens = (target_ids[:, 1:] != -100).sum().item()
        nll_sum += loss.item() * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return nll_sum / n_tokens, n_tokens


# ---- score_tokens --------------------------------------------------------------------------

def test_short_text_matches_transformers_loss(pair):
    hf, model = pair
    ids = random_ids(20)
    scores = score_tokens(model, ids, bos_id=EOT)
    seq = torch.tensor([[EOT, *ids]])
    with torch.no_grad():
        out = hf(seq, labels=seq)
    assert abs(scores.nll - out.loss.item()) < 1e-5
    assert scores.n_tokens == len(scores.token_logprobs) == len(ids)
    expected = F.log_softmax(out.logits[0, :-1].float(), -1).gather(-1, seq[0, 1:, None])[:, 0]
    assert (torch.tensor(scores.token_logprobs) - expected).abs().max() < 1e-5
    assert scores.ppl == pytest.approx(math.exp(scores.nll))


def test_a_text_filling_the_context_exactly_is_one_window(pair):
    hf, model = pair
    ids = random_ids(N_CTX - 1, seed=3)  # [bos] + ids is exactly n_positions tokens
    seq = torch.tensor([[EOT, *ids]])
    with torch.no_grad():
        expected = hf(seq, labels=seq).loss.item()
    assert abs(score_tokens(model, ids, bos_id=EOT).nll - expected) < 1e-5


@pytest.mark.parametrize("stride", [None, 17, 63])
def test_long_text_matches_the_perplexity_guide(pair, stride):
    hf, model = pair
    ids = random_ids(200, seed=1)
    expected, n_tokens = guide_nll(hf, [EOT, *ids], stride or N_CTX // 2)
    scores = score_tokens(model, ids, bos_id=EOT, stride=stride)
    assert scores.n_tokens == n_tokens == len(ids)  # every token scored once
    assert abs(scores.nll - expected) < 1e-5


def test_batching_windows_does_not_change_the_scores(pair):
    _, model = pair
    ids = random_ids(200, seed=2)  # 6 windows at stride 32, the last one shorter
    one = score_tokens(model, ids, bos_id=EOT, batch_size=1)
    for batch_size in (2, 4, 8):
        batched = score_tokens(model, ids, bos_id=EOT, batch_size=batch_size)
        assert np.abs(np.subtract(batched.token_logprobs, one.token_logprobs)).max() < 1e-5
        assert abs(batched.nll - one.nll) < 1e-6


def test_bfloat16_model_scores_close_to_float32(pair, tmp_path):
    hf, model = pair
    hf.save_pretrained(tmp_path)
    bf16 = load_model(str(tmp_path), CPU, torch.bfloat16).model
    ids = random_ids(100, seed=4)
    exact, rough = score_tokens(model, ids, bos_id=EOT), score_tokens(bf16, ids, bos_id=EOT)
    assert all(math.isfinite(x) for x in rough.token_logprobs)
    assert abs(rough.nll - exact.nll) < 0.02


def test_sequences_scored_together_equal_one_at_a_time(pair):
    """Many texts share batches (windows of different texts, right-padded, widest first); each
    text's scores are still those of scoring it alone."""
    _, model = pair
    seqs = [random_ids(n, seed=n) for n in (3, 200, 1, 40, 63, 64, 90)]
    alone = [score_tokens(model, ids, bos_id=EOT, stride=20) for ids in seqs]
    for batch_size in (1, 3, 16):
        together = score_sequences(model, seqs, bos_id=EOT, stride=20, batch_size=batch_size)
        for got, want, ids in zip(together, alone, seqs):
            assert got.token_ids == want.token_ids == ids and got.n_tokens == len(ids)
            assert np.abs(np.subtract(got.token_logprobs, want.token_logprobs)).max() < 1e-5
    assert alone[0].total == pytest.approx(sum(alone[0].token_logprobs))


def test_empty_list_of_sequences(pair):
    _, model = pair
    with pytest.raises(OptionError, match="empty list"):
        score_sequences(model, [], bos_id=EOT)
    with pytest.raises(OptionError, match="2 of 3 is empty") as info:
        score_sequences(model, [[1], [], [2]], bos_id=EOT)
    assert info.value.field == "text"


@pytest.mark.parametrize("n, stride", [(2, 32), (64, 32), (65, 32), (200, 32), (200, 1), (200, 63), (129, 64)])
def test_windows_score_every_position_once(n, stride):
    n_ctx = 65 if stride == 64 else N_CTX
    scored = []
    for begin, end, first in sliding_windows(n, n_ctx, stride):
        assert end - begin <= n_ctx and first - begin >= 1  # fits, and has a token before it
        scored += range(first, end)
    assert scored == list(range(1, n))


def test_scoring_restores_training_mode(pair):
    _, model = pair
    ids = random_ids(30)
    expected = score_tokens(model, ids, bos_id=EOT).nll
    model.train()
    try:
        assert score_tokens(model, ids, bos_id=EOT).nll == expected  # dropout was off
        assert model.training
    finally:
        model.eval()


# ---- bad input -----------------------------------------------------------------------------

def test_empty_text_is_an_option_error(pair):
    _, model = pair
    with pytest.raises(OptionError, match="is empty") as info:
        score_tokens(model, [], bos_id=EOT)
    assert info.value.field == "text"
    for docs in ([], [[], []]):
        with pytest.raises(OptionError) as info:
            evaluate_documents(model, docs, bos_id=EOT)
        assert info.value.field == "text"


@pytest.mark.parametrize("kwargs, field", [
    ({"stride": 0}, "stride"), ({"stride": N_CTX}, "stride"), ({"stride": 2.5}, "stride"),
    ({"batch_size": 0}, "batch_size"),
])
def test_bad_options(pair, kwargs, field):
    _, model = pair
    with pytest.raises(OptionError) as info:
        score_tokens(model, [1, 2, 3], bos_id=EOT, **kwargs)
    assert info.value.field == field


def test_ids_outside_the_vocabulary(pair):
    _, model = pair
    with pytest.raises(TokenizerError, match="50257"):
        score_tokens(model, [1, 50257], bos_id=EOT)
    with pytest.raises(TokenizerError, match="-1"):
        score_tokens(model, [-1, 2], bos_id=EOT)


# ---- documents and blocks ------------------------------------------------------------------

def test_documents_are_one_stream_separated_by_endoftext(pair):
    _, model = pair
    a, b = random_ids(40, seed=5), random_ids(50, seed=6)
    scores = evaluate_documents(model, iter([a, [], b]), bos_id=EOT, stride=20)
    expected = score_tokens(model, [*a, EOT, *b, EOT], bos_id=EOT, stride=20)
    assert scores == expected
    assert scores.n_tokens == len(a) + len(b) + 2


def test_evaluate_blocks_is_the_training_loss(pair):
    _, model = pair
    tokens = np.array(random_ids(5 * 16 + 3, seed=7), dtype=np.uint16)
    blocks = TokenBlocks(tokens, block_size=16)  # 5 blocks: batches of 2, 2 and 1
    x = blocks.batch(range(len(blocks)))

    def by_hand(rows):
        with torch.no_grad():
            logits = model(rows)
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1)).item()

    loss, ppl = evaluate_blocks(model, blocks, batch_size=2)
    assert abs(loss - by_hand(x)) < 1e-5 and ppl == pytest.approx(math.exp(loss))
    first, _ = evaluate_blocks(model, blocks, batch_size=2, max_batches=1)
    assert abs(first - by_hand(x[:2])) < 1e-5


def test_evaluate_blocks_bad_input(pair):
    _, model = pair
    with pytest.raises(OptionError) as info:
        evaluate_blocks(model, TokenBlocks(np.zeros(10, dtype=np.uint16), block_size=16))
    assert info.value.field == "blocks"
    blocks = TokenBlocks(np.zeros(32, dtype=np.uint16), block_size=16)
    with pytest.raises(OptionError, match="max_batches"):
        evaluate_blocks(model, blocks, max_batches=0)


def test_ppl_of_a_huge_loss_is_infinite():
    assert Scores(token_logprobs=[-800.0], n_tokens=1, nll=800.0).ppl == math.inf
