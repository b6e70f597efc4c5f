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
    probs = torch.tensor([[0.6, 0.3, 0.06, 0.04]])
    assert kept(sampling.min_p(probs.log(), 0.1)) == {0, 1}  # threshold 0.06
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

