"""Hidden states, embeddings and text scores (issue 7) on the tiny random GPT-2 of conftest
(2 layers, 64 positions), loaded through `gpt2kit.load` (so with the CPU inference layout) and
checked against transformers loaded from the same folder."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gpt2kit.cli import main
from gpt2kit.errors import OptionError, TokenizerError
from gpt2kit.inference.scoring import score_tokens

TOL = 1e-4  # the bound for parity with transformers in float32
TEXTS = ["The cat sat on the mat.", "Hi", "A much longer sentence, with commas, that goes on for a while.",
         "x" * 3, " a" * 150]  # the last is longer than the 64-token context


@pytest.fixture(scope="module")
def hf(tiny_folder):
    import transformers
    return transformers.GPT2LMHeadModel.from_pretrained(tiny_folder).eval()


def random_ids(shape, seed=0) -> torch.Tensor:
    return torch.randint(0, 50257, shape, generator=torch.Generator().manual_seed(seed))


# ---- hidden states -------------------------------------------------------------------------

def test_hidden_states_match_transformers(tiny_model, hf):
    ids = random_ids((2, 40))
    with torch.no_grad():
        out = hf.transformer(ids, output_hidden_states=True)
    ours = tiny_model.hidden_states(ids, layers=None)
    assert len(ours) == len(out.hidden_states) == tiny_model.config.n_layer + 1
    for mine, theirs in zip(ours, out.hidden_states):
        assert mine.dtype == torch.float32 and mine.shape == (2, 40, tiny_model.config.n_embd)
        assert (mine - theirs).abs().max() <= TOL
    [last] = tiny_model.hidden_states(ids, layers=[-1])
    assert (last - out.last_hidden_state).abs().max() <= TOL


def test_only_the_last_entry_has_the_final_layernorm(tiny_model, hf):
    """What the README documents, checked on transformers itself: its last hidden state is ln_f of
    the last block's output, and the entries before it are raw block inputs."""
    ids = random_ids((1, 12), seed=1)
    with torch.no_grad():
        out = hf.transformer(ids, output_hidden_states=True)
        last_block = hf.transformer.h[-1](out.hidden_states[-2])
        last_block = last_block[0] if isinstance(last_block, tuple) else last_block
        assert torch.allclose(out.hidden_states[-1], hf.transformer.ln_f(last_block), atol=1e-6)
        assert torch.equal(out.hidden_states[-1], out.last_hidden_state)
    embedding, last = tiny_model.hidden_states(ids, layers=[0, 2])
    wte, wpe = hf.transformer.wte.weight, hf.transformer.wpe.weight
    assert (embedding[0] - (wte[ids[0]] + wpe[:12])).abs().max() <= TOL


def test_layers_in_any_order_and_negative(tiny_model):
    ids = random_ids((1, 8), seed=2)
    every = tiny_model.hidden_states(ids, layers=None)
    picked = tiny_model.hidden_states(ids, layers=[2, -3, 1, -1])
    for got, want in zip(picked, [every[2], every[0], every[1], every[2]]):
        assert torch.equal(got, want)
    assert torch.equal(tiny_model.hidden_states(ids[0].tolist(), layers=1)[0], every[1])


# ---- embeddings ----------------------------------------------------------------------------

@pytest.mark.parametrize("pool", ["mean", "last"])
def test_embed_matches_pooled_transformers_states(tiny_model, hf, pool):
    texts = TEXTS[:4]
    vectors = tiny_model.embed(texts, pool=pool)
    assert vectors.shape == (4, tiny_model.config.n_embd) and vectors.dtype == torch.float32
    for text, vector in zip(texts, vectors):
        ids = torch.tensor([tiny_model.tokenizer.encode(text)])
        with torch.no_grad():
            h = hf.transformer(ids).last_hidden_state[0]
        expected = h.mean(0) if pool == "mean" else h[-1]
        assert (vector - expected).abs().max() <= TOL


@pytest.mark.parametrize("pool, layer", [("mean", -1), ("last", -1), ("mean", 1), ("last", 0)])
def test_embed_batched_and_padded_equals_one_at_a_time(tiny_model, pool, layer):
    texts = TEXTS[:4] + ["one more", "and the last one of them all"]
    alone = torch.cat([tiny_model.embed(t, pool=pool, layer=layer) for t in texts])
    for batch_size in (1, 3, 16):
        batched = tiny_model.embed(texts, pool=pool, layer=layer, batch_size=batch_size)
        assert (batched - alone).abs().max() <= 1e-5


# ---- scores --------------------------------------------------------------------------------

def test_score_matches_transformers_loss(tiny_model, hf):
    s = tiny_model.score("The cat sat on the mat.")
    eot = tiny_model.tokenizer.eos_id
    assert s.token_ids == tiny_model.tokenizer.encode("The cat sat on the mat.")
    seq = torch.tensor([[eot, *s.token_ids]])  # the first token is conditioned on <|endoftext|>
    with torch.no_grad():
        out = hf(seq, labels=seq)
    assert abs(s.nll - out.loss.item()) < 1e-5
    expected = F.log_softmax(out.logits[0, :-1], -1).gather(-1, seq[0, 1:, None])[:, 0]
    assert (torch.tensor(s.token_logprobs) - expected).abs().max() < 1e-5
    assert s.total == pytest.approx(-s.nll * s.n_tokens) and s.ppl == pytest.approx(math.exp(s.nll))


def test_score_is_the_eval_scoring_path(tiny_model):
    """A long text goes through the same sliding windows as `gpt2kit eval` (score_tokens)."""
    ids = tiny_model.tokenizer.encode(TEXTS[-1])
    assert len(ids) > tiny_model.config.n_positions
    for stride in (None, 10):
        expected = score_tokens(tiny_model.module, ids, tiny_model.tokenizer.eos_id, stride=stride)
        got = tiny_model.score(TEXTS[-1], stride=stride)
        assert got.n_tokens == len(ids)
        assert np.abs(np.subtract(got.token_logprobs, expected.token_logprobs)).max() < 1e-5


def test_score_batched_equals_one_at_a_time(tiny_model):
    alone = [tiny_model.score(t) for t in TEXTS]
    for batch_size in (1, 3, 8):
        batched = tiny_model.score(TEXTS, batch_size=batch_size)
        assert [s.token_ids for s in batched] == [s.token_ids for s in alone]
        for got, want in zip(batched, alone):
            assert np.abs(np.subtract(got.token_logprobs, want.token_logprobs)).max() < 1e-5
            assert abs(got.nll - want.nll) < 1e-6


# ---- bad input -----------------------------------------------------------------------------

def _raises(error, field, call):
    with pytest.raises(error) as info:
        call()
    assert "\n" not in str(info.value)
    if field is not None:
        assert info.value.field == field
    return str(info.value)


def test_empty_inputs(tiny_model):
    assert "empty list" in _raises(OptionError, "texts", lambda: tiny_model.embed([]))
    assert "empty list" in _raises(OptionError, "texts", lambda: tiny_model.score([]))
    assert "2 of 2 has no tokens" in _raises(OptionError, "text", lambda: tiny_model.embed(["ok", ""]))
    assert "2 of 2 is empty" in _raises(OptionError, "text", lambda: tiny_model.score(["ok", ""]))
    assert "is empty" in _raises(OptionError, "text", lambda: tiny_model.score(""))


def test_unknown_pool_and_bad_batch_size(tiny_model):
    assert "mean, last" in _raises(OptionError, "pool", lambda: tiny_model.embed(["a"], pool="max"))
    _raises(OptionError, "batch_size", lambda: tiny_model.embed(["a"], batch_size=0))


@pytest.mark.parametrize("layers", [[3], [-4], [], [0, 1.5], [True]])
def test_layers_out_of_range(tiny_model, layers):
    _raises(OptionError, "layers", lambda: tiny_model.hidden_states([1, 2, 3], layers=layers))


def test_embed_layer_out_of_range(tiny_model):
    assert "0..2" in _raises(OptionError, "layer", lambda: tiny_model.embed(["a"], layer=3))


def test_bad_token_ids(tiny_model):
    assert "50257" in _raises(TokenizerError, None, lambda: tiny_model.hidden_states([1, 50257]))
    assert "-1" in _raises(TokenizerError, None, lambda: tiny_model.hidden_states([[1, -1]]))
    _raises(OptionError, "token_ids", lambda: tiny_model.hidden_states([[1, 2], [3]]))
    _raises(OptionError, "token_ids", lambda: tiny_model.hidden_states([]))
    assert "65 tokens" in _raises(OptionError, "token_ids", lambda: tiny_model.hidden_states([1] * 65))


def test_embed_text_longer_than_the_context(tiny_model):
    assert "150 tokens" in _raises(OptionError, "text", lambda: tiny_model.embed(TEXTS))


# ---- CLI -----------------------------------------------------------------------------------

@pytest.fixture
def texts_file(tmp_path):
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(TEXTS[:4]) + "\n\n", encoding="utf-8")  # a blank line is skipped
    return path


def test_cli_score_writes_one_json_line_per_text(tiny_folder, tiny_model, texts_file, tmp_path, capsys):
    out = tmp_path / "scores.jsonl"
    assert main(["score", "-m", str(tiny_folder), str(texts_file), "--output", str(out)]) == 0
    assert "wrote 4 scores" in capsys.readouterr().err
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [line["text"] for line in lines] == TEXTS[:4]
    for line, expected in zip(lines, tiny_model.score(TEXTS[:4])):
        assert set(line) == {"text", "tokens", "logprobs", "nll", "ppl"}
        assert "".join(line["tokens"]) == line["text"]
        assert np.abs(np.subtract(line["logprobs"], expected.token_logprobs)).max() < 1e-5
        assert line["nll"] == pytest.approx(expected.nll) and line["ppl"] == pytest.approx(expected.ppl)
    assert main(["score", "-m", str(tiny_folder), str(texts_file)]) == 0  # no --output: stdout
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == lines


def test_cli_embed_writes_npy(tiny_folder, tiny_model, texts_file, tmp_path, capsys):
    out = tmp_path / "vectors.npy"
    args = ["embed", "-m", str(tiny_folder), str(texts_file), "--output", str(out), "--pool", "last"]
    assert main(args + ["--batch-size", "2"]) == 0
    assert "wrote 4 vectors" in capsys.readouterr().err
    vectors = np.load(out)
    assert vectors.shape == (4, tiny_model.config.n_embd) and vectors.dtype == np.float32
    assert np.abs(vectors - tiny_model.embed(TEXTS[:4], pool="last").numpy()).max() < 1e-5
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


@pytest.mark.parametrize("extra, code, fragment", [
    (["--pool", "max"], 2, "--pool must be one of mean, last"),
    (["--layer", "7"], 2, "--layer is 7"),
    (["--output", "vectors.txt"], 2, "--output must end in .npy"),
])
def test_cli_embed_errors_are_one_line(tiny_folder, texts_file, tmp_path, capsys, extra, code, fragment):
    args = ["embed", "-m", str(tiny_folder), str(texts_file), "--output", str(tmp_path / "v.npy"), *extra]
    assert main(args) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and fragment in err[-1]


def test_cli_text_too_long_names_the_file(tiny_folder, tmp_path, capsys):
    path = tmp_path / "long.txt"
    path.write_text("short\n" + TEXTS[-1] + "\n", encoding="utf-8")
    assert main(["embed", "-m", str(tiny_folder), str(path), "-o", str(tmp_path / "v.npy")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {path}: text 2 of 2 has 150 tokens"), err
