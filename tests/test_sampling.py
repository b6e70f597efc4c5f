"""The sampling chain (gpt2kit.inference.sampling): hand-made cases, then each step and the whole
chain against transformers' own logits processors on random logits."""

import math

import pytest
import torch

from gpt2kit.config import GenerationConfig
from gpt2kit.inference import sampling

INF = float("-inf")


def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(logits[0])).flatten().tolist())


def test_top_k_keeps_exactly_k_even_with_ties():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.5]])
    out = sampling.top_k(logits, 2)
    assert len(kept(out)) == 2
    assert kept(out) <= {1, 2, 3}
    assert torch.equal(logits, torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.5]]))  # input untouched


def test_top_k_zero_or_large_keeps_all():
    logits = torch.randn(3, 10)
    assert torch.equal(sampling.top_k(logits, 0), logits)
    assert torch.equal(sampling.top_k(logits, 10), logits)


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    assert kept(sampling.top_p(logits, 0.5)) == {0}
    assert kept(sampling.top_p(logits, 0.51)) == {0, 1}
    assert kept(sampling.top_p(logits, 0.8)) == {0, 1}
    assert kept(sampling.top_p(logits, 0.81)) == {0, 1, 2}
    assert kept(sampling.top_p(logits, 1.0)) == {0, 1, 2, 3}


def test_top_p_always_keeps_the_top_token_and_works_unsorted():
    logits = torch.tensor([[0.1, 5.0, 0.2]])
    assert kept(sampling.top_p(logits, 1e-6)) == {1}


def test_min_p_relative_to_top_token():
    probs = torch.tensor([[0.6, 0.3, 0.065, 0.035]])
    assert kept(sampling.min_p(probs.log(), 0.1)) == {0, 1, 2}  # threshold 0.06, not 0.1
    assert kept(sampling.min_p(probs.log(), 0.2)) == {0, 1}  # threshold 0.12
    assert kept(sampling.min_p(probs.log(), 0.0)) == {0, 1, 2, 3}


def test_temperature_scales_and_zero_is_rejected():
    logits = torch.tensor([[2.0, 4.0]])
    assert torch.allclose(sampling.apply_temperature(logits, 2.0), torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError):
        sampling.apply_temperature(logits, 0.0)


def test_repetition_penalty_divides_positive_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 2.0]])
    seen = torch.tensor([[True, True, False]])
    out = sampling.apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 2.0]]


def test_presence_and_frequency_penalties():
    logits = torch.zeros(1, 3)
    counts = torch.tensor([[0.0, 1.0, 3.0]])
    out = sampling.apply_presence_frequency(logits, counts, 0.5, 0.25)
    assert out.tolist() == [[0.0, -0.75, -1.25]]


def test_temperature_zero_is_greedy():
    cfg = GenerationConfig(temperature=0)
    logits = torch.tensor([[0.1, 0.9, 0.3], [2.0, 1.0, 0.0]])
    assert sampling.choose(logits, cfg, [None, None]).tolist() == [1, 0]


def test_sample_respects_filters_and_per_row_generators():
    # Token 2 leads only slightly: unfiltered, 32 rows would draw it every time with odds of 1e-18.
    logits = torch.tensor([[1.0, 1.0, 1.1, 1.0]]).repeat(32, 1)
    gens = [torch.Generator().manual_seed(i) for i in range(32)]
    assert sampling.choose(logits, GenerationConfig(top_k=1), gens).tolist() == [2] * 32
    gens = [torch.Generator().manual_seed(i) for i in range(32)]
    assert set(sampling.choose(logits, GenerationConfig(top_k=0), gens).tolist()) == {0, 1, 2, 3}


def test_sample_distribution_matches_probabilities():
    probs = torch.tensor([0.1, 0.2, 0.7])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sampling.sample(probs.log()[None], [g]) for _ in range(4000)]).flatten()
    freq = torch.bincount(draws, minlength=3).float() / len(draws)
    assert torch.allclose(freq, probs, atol=0.03)


def test_row_draws_do_not_depend_on_other_rows():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 50, generator=g)
    alone = [sampling.sample(logits[i:i + 1], [torch.Generator().manual_seed(100 + i)]).item() for i in range(8)]
    batch = torch.cat([torch.randn(3, 50, generator=g), logits])  # other rows first, with their own seeds
    together = sampling.sample(batch, [torch.Generator().manual_seed(s) for s in [1, 2, 3, *range(100, 108)]])
    assert together[3:].tolist() == alone
    assert alone != logits.argmax(-1).tolist()  # these are draws, not the argmax


def test_process_order_and_no_mutation():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    before = logits.clone()
    out = sampling.process(logits, GenerationConfig(temperature=0.5, top_k=2, top_p=1.0))
    assert torch.equal(logits, before)
    assert kept(out) == {2, 3}
    assert math.isclose(out[0, 3].item(), 8.0)
    # Temperature comes before top-p: sharpened, probabilities 0.5, 0.3, 0.15, 0.05 become 0.69,
    # 0.25, 0.06, 0.01, so p = 0.9 keeps two tokens (top-p first would keep three).
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert kept(sampling.process(probs.log(), GenerationConfig(temperature=0.5, top_k=0, top_p=0.9))) == {0, 1}
    # Penalties come before temperature: (x - 1) / 0.5, not x / 0.5 - 1.
    out = sampling.process(torch.zeros(1, 2), GenerationConfig(temperature=0.5, top_k=0, presence_penalty=1.0),
                           counts=torch.tensor([[1.0, 0.0]]))
    assert out.tolist() == [[-2.0, 0.0]]


@pytest.mark.parametrize("options, field", [
    (dict(temperature=-1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-3), "top_k"),
    (dict(n=0), "n"), (dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=-5), "max_new_tokens"),
    (dict(max_length=0), "max_length"), (dict(min_p=2), "min_p"), (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(stop=("",)), "stop"), (dict(top_k=1.5), "top_k"), (dict(logprobs=21), "logprobs"),
    (dict(seed=-1), "seed"),
])
def test_config_rejects_bad_values(options, field):
    from gpt2kit.errors import OptionError
    with pytest.raises(OptionError) as e:
        GenerationConfig(**options)
    assert e.value.field == field


# ---- against transformers' own logits processors -------------------------------------------
# Random float32 logits, batch > 1, from a handful of tokens to GPT-2's vocabulary. Filters only
# replace logits by -inf, so surviving tokens and their values are compared exactly.

VOCABS = [7, 100, 50257]


def random_logits(vocab: int, seed: int, rows: int = 4, ties: bool = False, neg_inf: float = 0.0) -> torch.Tensor:
    """(rows, vocab) float32 logits; `ties`: rounded to integers (many equal values); `neg_inf`:
    that fraction of entries already -inf (never a row's first, so each row keeps a finite one)."""
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(rows, vocab, generator=g)
    if ties:
        logits = logits.round()
    banned = torch.rand(rows, vocab, generator=g) < neg_inf
    banned[:, 0] = False
    return logits.masked_fill(banned, INF)


def kept_per_row(logits: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(logits).sum(-1)


def kept_values(logits: torch.Tensor) -> list[list[float]]:
    """Each row's surviving logits, sorted: what a filter keeps, whichever of equal tokens it picks."""
    return [sorted(row[torch.isfinite(row)].tolist()) for row in logits]


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("neg_inf", [0.0, 0.5])
def test_top_k_matches_transformers_without_ties(vocab, neg_inf):
    from transformers import TopKLogitsWarper
    logits = random_logits(vocab, seed=vocab, neg_inf=neg_inf)
    for k in (1, 3, vocab // 2, vocab - 1):
        kth, next_ = torch.topk(logits, k + 1).values[:, -2:].unbind(-1)
        assert (kth > next_).all() | torch.isinf(kth).any()  # no tie at the boundary in this data
        assert torch.equal(sampling.top_k(logits, k), TopKLogitsWarper(k)(None, logits)), k


@pytest.mark.parametrize("vocab", VOCABS)
def test_top_k_with_ties_keeps_exactly_k_where_transformers_keeps_every_tie(vocab):
    """The documented difference: gpt2kit keeps exactly k tokens (which of the tokens tied with
    the k-th it keeps is unspecified); transformers keeps every token equal to the k-th."""
    from transformers import TopKLogitsWarper
    logits = random_logits(vocab, seed=1, ties=True)
    k = min(5, vocab - 1)
    ours, theirs = sampling.top_k(logits, k), TopKLogitsWarper(k)(None, logits)
    assert (kept_per_row(ours) == k).all()
    assert (kept_per_row(theirs) > k).any()  # this data does have ties at the k-th value
    assert torch.isfinite(theirs)[torch.isfinite(ours)].all()  # ours is a subset of theirs ...
    assert torch.equal(ours[torch.isfinite(ours)], logits[torch.isfinite(ours)])  # ... values untouched
    kth = torch.topk(logits, k).values[:, -1:]
    assert torch.isfinite(ours)[logits > kth].all()  # every token above the k-th value is kept


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("neg_inf", [0.0, 0.5])
@pytest.mark.parametrize("p", [0.01, 0.3, 0.9, 0.99])
def test_top_p_matches_transformers_without_ties(vocab, neg_inf, p):
    from transformers import TopPLogitsWarper
    logits = random_logits(vocab, seed=vocab + 1, neg_inf=neg_inf)
    ours, theirs = sampling.top_p(logits, p), TopPLogitsWarper(p)(None, logits)
    exact = torch.softmax(logits.double(), -1)  # the kept sets' probabilities, to say who is right
    same = torch.equal(ours, theirs)
    assert same, (
        f"kept per row: gpt2kit {kept_per_row(ours).tolist()}, transformers {kept_per_row(theirs).tolist()}; "
        f"their probability (float64): gpt2kit {(exact * torch.isfinite(ours)).sum(-1).tolist()}, "
        f"transformers {(exact * torch.isfinite(theirs)).sum(-1).tolist()}; p = {p}")


@pytest.mark.parametrize("vocab", VOCABS[:2])
@pytest.mark.parametrize("p", [0.3, 0.7, 0.95])
def test_top_p_with_ties_keeps_as_many_tokens_as_transformers(vocab, p):
    """Which of several equal tokens at the boundary survives depends on the sort and is not
    specified by either library; how many survive, and their values, are."""
    from transformers import TopPLogitsWarper
    logits = random_logits(vocab, seed=2, ties=True)
    ours, theirs = sampling.top_p(logits, p), TopPLogitsWarper(p)(None, logits)
    assert torch.equal(kept_per_row(ours), kept_per_row(theirs))
    assert kept_values(ours) == kept_values(theirs)


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("ties, neg_inf", [(False, 0.0), (True, 0.0), (False, 0.5)])
def test_min_p_matches_transformers(vocab, ties, neg_inf):
    from transformers import MinPLogitsWarper
    logits = random_logits(vocab, seed=3, ties=ties, neg_inf=neg_inf)
    for p in (0.0, 0.05, 0.5, 1.0):  # 1.0 keeps only the top token(s)
        assert torch.equal(sampling.min_p(logits, p), MinPLogitsWarper(p)(None, logits)), p


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("penalty", [1.3, 0.7])  # < 1 favours repeats
def test_repetition_penalty_matches_transformers(vocab, penalty):
    """Each row's seen tokens are its own (with repeats), as transformers reads them from input_ids."""
    from transformers import RepetitionPenaltyLogitsProcessor
    logits = random_logits(vocab, seed=4, neg_inf=0.2)
    logits[:, 1] = 0.0  # neither divided nor multiplied into anything else
    g = torch.Generator().manual_seed(5)
    input_ids = torch.randint(0, vocab, (logits.shape[0], 12), generator=g)
    input_ids[:, :2] = torch.tensor([1, 0])  # the zero and a finite logit are among the seen
    seen = torch.zeros_like(logits, dtype=torch.bool).scatter(1, input_ids, True)
    expected = RepetitionPenaltyLogitsProcessor(penalty)(input_ids, logits)
    assert torch.equal(sampling.apply_repetition_penalty(logits, seen, penalty), expected)


@pytest.mark.parametrize("vocab", VOCABS)
def test_temperature_matches_transformers(vocab):
    from transformers import TemperatureLogitsWarper
    logits = random_logits(vocab, seed=6, neg_inf=0.2)
    for t in (0.3, 1.0, 1.7):
        assert torch.equal(sampling.apply_temperature(logits, t), TemperatureLogitsWarper(t)(None, logits)), t


@pytest.mark.parametrize("vocab", VOCABS[1:])
def test_the_chain_matches_transformers_default_order(vocab):
    """`process` against the processors transformers' own generate() builds for the same options,
    in its order: repetition penalty, temperature, top-k, top-p, min-p. (Presence and frequency
    penalties are OpenAI's and have no transformers counterpart.)"""
    import transformers
    from conftest import tiny_hf_model
    options = dict(temperature=0.7, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.3)
    hf = tiny_hf_model(n_layer=1, n_head=1, n_embd=4, vocab_size=vocab, bos_token_id=0, eos_token_id=0)
    chain = hf._get_logits_processor(transformers.GenerationConfig(do_sample=True, **options),
                                     input_ids_seq_length=12, device="cpu")
    assert [type(step).__name__ for step in chain] == [
        "RepetitionPenaltyLogitsProcessor", "TemperatureLogitsWarper", "TopKLogitsWarper",
        "TopPLogitsWarper", "MinPLogitsWarper"]
    logits = random_logits(vocab, seed=7)
    input_ids = torch.randint(0, vocab, (logits.shape[0], 12), generator=torch.Generator().manual_seed(8))
    input_ids[:, 0] = logits.argmax(-1)  # the penalty reorders the top tokens
    seen = torch.zeros_like(logits, dtype=torch.bool).scatter(1, input_ids, True)
    ours = sampling.process(logits, GenerationConfig(**options), seen=seen)
    assert torch.equal(ours, chain(input_ids, logits))
    assert (kept_per_row(ours) < 50).all()  # top-p and min-p did cut after top-k


# ---- per-row token rules: logit_bias and banned phrases ----------------------------------------

def random_biases(vocab: int, seed: int, count: int = 5) -> tuple[tuple[int, float], ...]:
    """`count` distinct tokens with biases strictly inside (-100, 100): the ends are exact, below."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(vocab, generator=g)[:count].tolist()
    return tuple((t, float(b)) for t, b in zip(ids, (torch.rand(count, generator=g) * 190 - 95).tolist()))


@pytest.mark.parametrize("vocab", VOCABS)
def test_logit_bias_matches_transformers_sequence_bias_row_by_row(vocab):
    from transformers import SequenceBiasLogitsProcessor
    logits = random_logits(vocab, seed=9, neg_inf=0.2)
    biases = [random_biases(vocab, seed=r, count=min(5, vocab)) for r in range(logits.shape[0])]
    biases[1] = ()  # a row without biases, beside rows with them
    before = logits.clone()
    ours = sampling.apply_logit_bias(logits, biases)
    assert torch.equal(logits, before)
    for r, pairs in enumerate(biases):
        theirs = logits[r:r + 1] if not pairs else SequenceBiasLogitsProcessor(
            [[[t], b] for t, b in pairs])(torch.zeros(1, 3, dtype=torch.long), logits[r:r + 1])
        assert torch.equal(ours[r:r + 1], theirs), r
    assert not torch.equal(ours[0], logits[0])


def test_logit_bias_ends_ban_and_force_exactly():
    logits = torch.tensor([[5.0, 1.0, 0.0, -1.0], [5.0, 1.0, 0.0, -1.0], [5.0, INF, 0.0, -1.0]])
    out = sampling.apply_logit_bias(logits, [((0, -100.0),), ((2, 100.0), (3, 100.0)), ((1, 100.0), (2, 3.0))])
    assert out[0].tolist() == [INF, 1.0, 0.0, -1.0]  # 5 - 100 would still be finite: banned outright
    assert kept(out[1:2]) == {2, 3}  # only the forced tokens stay, their logits raised by 100
    assert out[1, 2] == 100.0 and out[1, 3] == 99.0
    assert out[2].tolist() == [5.0, INF, 3.0, -1.0]  # a banned token is not lifted by forcing it
    assert sampling.apply_logit_bias(logits, [(), (), ()]) is logits


def bad_words_case(vocab: int, seed: int):
    """Histories over a few tokens (so phrases do match) and per-row phrase lists that include
    each row's own ending, a one-token phrase and phrases that do not match."""
    g = torch.Generator().manual_seed(seed)
    histories = torch.randint(0, min(vocab, 4), (4, 10), generator=g)
    phrases = []
    for r in range(4):
        own = tuple(histories[r, -2:].tolist()) + (r + 1,)  # matches row r: bans token r + 1
        other = tuple(torch.randint(0, min(vocab, 4), (3,), generator=g).tolist())
        phrases.append((own, other, (vocab - 1,)) if r != 2 else ())
    return histories, phrases


@pytest.mark.parametrize("vocab", VOCABS)
def test_banned_sequences_match_transformers_bad_words_row_by_row(vocab):
    from transformers import NoBadWordsLogitsProcessor
    logits = random_logits(vocab, seed=10, neg_inf=0.2)
    histories, phrases = bad_words_case(vocab, seed=vocab)
    ours = sampling.ban_sequences(logits, [h.tolist() for h in histories], phrases)
    for r, seqs in enumerate(phrases):
        theirs = logits[r:r + 1] if not seqs else NoBadWordsLogitsProcessor(
            [list(s) for s in seqs])(histories[r:r + 1], logits[r:r + 1])
        assert torch.equal(ours[r:r + 1], theirs), r
    assert torch.isinf(ours[0, 1]) and torch.isinf(ours[0, vocab - 1])  # both kinds of ban happened
    assert torch.equal(ours[2], logits[2])


def test_banned_sequences_look_back_only_as_far_as_given():
    """A phrase longer than the context given cannot match (the caller passes the last
    len(phrase) - 1 tokens)."""
    logits = torch.zeros(1, 5)
    assert sampling.ban_sequences(logits, [[1]], [((0, 1, 2),)]) is logits
    assert torch.isinf(sampling.ban_sequences(logits, [[0, 1]], [((0, 1, 2),)])[0, 2])


@pytest.mark.parametrize("options, fragment", [
    (dict(logit_bias={"5": 101}), "bias of token 5 must be a number in [-100, 100], got 101"),
    (dict(logit_bias={"5": float("nan")}), "bias of token 5 must be a number in [-100, 100]"),
    (dict(logit_bias={"x": 1}), "keys must be token ids (integers), got 'x'"),
    (dict(logit_bias={1.5: 1}), "keys must be token ids (integers), got 1.5"),
    (dict(logit_bias=("5",)), "must be given as ID=BIAS (e.g. 50256=-100), got '5'"),
    (dict(logit_bias=("5=high",)), "bias of token 5 must be a number in [-100, 100], got high"),
    (dict(logit_bias={str(i): 1 for i in range(301)}), "may bias at most 300 tokens, got 301"),
    (dict(bad_words=("",)), "phrases must be non-empty text, got ''"),
    (dict(bad_words=(3,)), "phrases must be non-empty text, got 3"),
])
def test_token_rules_refuse_bad_values_by_name(options, fragment):
    from gpt2kit.errors import OptionError
    with pytest.raises(OptionError) as e:
        GenerationConfig(**options)
    assert e.value.field == next(iter(options)) and fragment in e.value.problem


def test_token_rules_accept_the_forms_api_cli_and_server_give():
    expected = ((11, -100.0), (50256, 2.5))
    for given in ({50256: 2.5, 11: -100}, {"50256": 2.5, "11": -100}, ("50256=2.5", "11=-100"),
                  [(11, -100), (50256, 2.5)]):
        assert GenerationConfig(logit_bias=given).logit_bias == expected, given
    assert GenerationConfig(bad_words="a cat").bad_words == ("a cat",)
    assert GenerationConfig(bad_words=["x", "x", "y"]).bad_words == ("x", "y")
