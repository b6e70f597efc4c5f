"""logit_bias and banned phrases through generation: the API, rows of one batch with different
rules, and the CLI flags (--logit-bias ID=BIAS, --ban PHRASE). The pure steps themselves are
compared with transformers' processors in test_sampling.py."""

import pytest
import torch

from gpt2kit.cli import main
from gpt2kit.config import GenerationConfig
from gpt2kit.errors import OptionError
from gpt2kit.inference.generate import banned_sequences, make_rows, step
from gpt2kit.inference.running_batch import RunningBatch

GREEDY = dict(temperature=0, max_new_tokens=24, stop_at_eos=False)


def greedy_ids(model, prompt="Hello there", **options) -> list[int]:
    [c] = model.complete(prompt, **{**GREEDY, **options})
    return c.token_ids


def contains(ids: list[int], seq: list[int]) -> bool:
    return any(ids[i:i + len(seq)] == seq for i in range(len(ids) - len(seq) + 1))


def test_a_phrase_is_banned_as_written_and_after_a_space(tiny_model):
    tok = tiny_model.tokenizer
    assert banned_sequences(tok, ("cat", " dog", "a cat")) == (
        tuple(tok.encode("cat")), tuple(tok.encode(" cat")), tuple(tok.encode(" dog")),
        tuple(tok.encode("a cat")), tuple(tok.encode(" a cat")))


def test_banned_phrases_never_appear_and_change_the_text(tiny_model):
    tok = tiny_model.tokenizer
    free = greedy_ids(tiny_model)
    # a two-token phrase the free text contains, which the tokenizer splits the same way again
    pair = next(free[i:i + 2] for i in range(len(free) - 1)
                if tok.encode(tok.decode(free[i:i + 2])) == free[i:i + 2])
    phrase = tok.decode(pair)
    banned = greedy_ids(tiny_model, bad_words=(phrase,))
    assert banned != free and not contains(tok.encode("Hello there") + banned, pair)
    single = free[0]
    assert tok.encode(tok.decode([single])) == [single]
    assert single not in greedy_ids(tiny_model, bad_words=(tok.decode([single]),))


def test_logit_bias_bans_forces_and_nudges(tiny_model):
    free = greedy_ids(tiny_model)
    assert greedy_ids(tiny_model, logit_bias={free[0]: -100})[0] != free[0]
    forced = tiny_model.complete("Hello", max_new_tokens=6, seed=3, logit_bias={"11": 100, "13": 100})
    assert set(forced[0].token_ids) <= {11, 13} and len(forced[0].token_ids) == 6
    # A ban wins over forcing: <|endoftext|> forced but banned by min_new_tokens is not drawn.
    early = tiny_model.complete("Hello", max_new_tokens=3, min_new_tokens=3, seed=1,
                                logit_bias={str(tiny_model.tokenizer.eos_id): 100})
    assert len(early[0].token_ids) == 3
    # Logprobs stay those of the model, before any bias (as OpenAI reports them).
    plain = tiny_model.complete("Hello", max_new_tokens=1, temperature=0, logprobs=0)[0].logprobs[0]
    nudged = tiny_model.complete("Hello", max_new_tokens=1, temperature=0, logprobs=0,
                                 logit_bias={plain.token_id: 5})[0].logprobs[0]
    assert nudged.logprob == pytest.approx(plain.logprob)


def test_rows_of_one_batch_keep_their_own_rules(tiny_model):
    """One running batch: a row with a ban, a row forced to two tokens, a row with neither; each
    gets the tokens it gets alone."""
    tok = tiny_model.tokenizer
    prompt = tok.encode("Hello there")
    free = greedy_ids(tiny_model)
    cfgs = [GenerationConfig(**GREEDY, bad_words=(tok.decode(free[:1]),)),
            GenerationConfig(**GREEDY, logit_bias={11: 100, 13: 100}),
            GenerationConfig(**GREEDY)]
    rows = [make_rows(tok, [prompt], cfg, tiny_model.config.n_positions, tiny_model.device, first_index=k)[0]
            for k, cfg in enumerate(cfgs)]
    done = {}
    with torch.inference_mode():
        batch = RunningBatch(tiny_model.module, 3)
        batch.join(rows, [row.prompt for row in rows])
        while batch.rows:
            done |= {e.row: e.completion.token_ids for e in step(batch, tok) if e.completion}
    assert done == {k: greedy_ids(tiny_model, bad_words=cfg.bad_words, logit_bias=cfg.logit_bias)
                    for k, cfg in enumerate(cfgs)}
    assert done[0][0] != free[0] and set(done[1]) <= {11, 13} and done[2] == free


def test_a_token_outside_the_vocabulary_is_named(tiny_model):
    with pytest.raises(OptionError) as e:
        tiny_model.generate("Hi", logit_bias={50257: 1})
    assert e.value.field == "logit_bias" and "token id 50257, outside the vocabulary (ids 0 to 50256)" in str(e.value)


def test_cli_flags(tiny_folder, capsys):
    code = main(["generate", "Hello", "-m", str(tiny_folder), "--max-new-tokens", "5", "--seed", "1",
                 "--logit-bias", "11=100", "--ignore-eos"])
    assert code == 0 and capsys.readouterr().out == "Hello,,,,,\n"
    code = main(["generate", "Hello", "-m", str(tiny_folder), "--max-new-tokens", "5", "--seed", "1",
                 "--logit-bias", "11=100", "--logit-bias", "13=100", "--ban", ",", "--ignore-eos"])
    assert code == 0 and capsys.readouterr().out == "Hello.....\n"


@pytest.mark.parametrize("flags, line", [
    (["--logit-bias", "11"], "error: --logit-bias must be given as ID=BIAS (e.g. 50256=-100), got '11'"),
    (["--logit-bias", "11=-101"], "error: --logit-bias bias of token 11 must be a number in [-100, 100], got -101"),
    (["--logit-bias", "x=1"], "error: --logit-bias keys must be token ids (integers), got 'x'"),
    (["--ban", ""], "error: --ban phrases must be non-empty text, got ''"),
])
def test_cli_errors_are_one_line_naming_the_flag(flags, line, capsys):
    assert main(["generate", "hi", "-m", "./no-such-dir", *flags]) == 2
    assert capsys.readouterr().err == line + "\n"


def test_cli_token_outside_the_vocabulary(tiny_folder, capsys):
    assert main(["generate", "hi", "-m", str(tiny_folder), "--logit-bias", "99999=1"]) == 2
    assert capsys.readouterr().err.startswith("error: --logit-bias names token id 99999, outside the vocabulary")
