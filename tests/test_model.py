"""Our GPT-2 against transformers' GPT2LMHeadModel on the same random weights, and the cached and
padded paths against the plain forward."""

import pytest
import torch
from conftest import tiny_hf_model

import gpt2kit
from gpt2kit.inference.kv_cache import KVCache
from gpt2kit.model import Positions


def ids(*shape, seed=0):
    return torch.randint(0, 50257, shape, generator=torch.Generator().manual_seed(seed))


SHAPES = [dict(n_layer=2, n_head=2, n_embd=32), dict(n_layer=3, n_head=4, n_embd=64),
          dict(n_layer=1, n_head=1, n_embd=16)]


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: "L{n_layer}-H{n_head}-C{n_embd}".format(**s))
def pair(request, tmp_path_factory):
    hf = tiny_hf_model(**request.param, seed=1)
    folder = tmp_path_factory.mktemp("pair")
    hf.save_pretrained(folder)
    return hf, gpt2kit.load(folder, device="cpu")


def test_logits_match_transformers(pair):
    hf, ours = pair
    idx = ids(3, 40)
    with torch.no_grad():
        expected = hf(idx).logits
    got = ours.logits(idx)
    assert got.shape == (3, 40, 50257) and got.dtype == torch.float32
    assert (got - expected).abs().max().item() < 1e-4


def test_cached_decode_equals_full_forward(pair):
    _, ours = pair
    model = ours.module
    idx = ids(2, 30)
    with torch.no_grad():
        full = model(idx)
        cache = KVCache.for_model(model, 2, 30)
        steps = [model(idx[:, :12], cache, Positions.at(0, 12))]
        steps += [model(idx[:, t:t + 1], cache, Positions.at(t, 1)) for t in range(12, 30)]
    assert (torch.cat(steps, 1) - full).abs().max().item() < 1e-5


def test_left_padded_rows_equal_unpadded(pair):
    _, ours = pair
    model = ours.module
    a, b = ids(1, 20, seed=1), ids(1, 13, seed=2)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 7, dtype=torch.long), b], 1)])
    pad = torch.tensor([0, 7])
    with torch.no_grad():
        cache = KVCache.for_model(model, 2, 25)
        out = model(batch, cache, Positions.at(0, 20, pad))
        nxt = ids(2, 1, seed=3)
        step = model(nxt, cache, Positions.at(20, 1, pad))
        ref_a = model(torch.cat([a, nxt[:1]], 1))
        ref_b = model(torch.cat([b, nxt[1:]], 1))
    assert (out[0] - ref_a[0, :20]).abs().max() < 1e-5
    assert (out[1, 7:] - ref_b[0, :13]).abs().max() < 1e-5
    assert (step[0, 0] - ref_a[0, -1]).abs().max() < 1e-5
    assert (step[1, 0] - ref_b[0, -1]).abs().max() < 1e-5


def test_forward_past_context_is_refused(pair):
    _, ours = pair
    n = ours.config.n_positions
    with pytest.raises(ValueError, match="context"):
        ours.module(torch.zeros(1, n + 1, dtype=torch.long))


def test_logits_rejects_out_of_vocab_ids(pair):
    _, ours = pair
    with pytest.raises(gpt2kit.TokenizerError, match="50257"):
        ours.logits([[1, 2, 50257]])


def test_inference_layout_equals_plain_model(tiny_folder):
    """packed_linear.prepare_for_inference (packed linears, fused GELU, packed head) vs the plain module."""
    from gpt2kit.checkpoints import load_model
    plain = load_model(str(tiny_folder), torch.device("cpu"), torch.float32).model
    fast = gpt2kit.load(tiny_folder, device="cpu").module
    from gpt2kit.kernels.packed_linear import PackedLinear
    if torch.backends.mkldnn.is_available():  # the fast path must really be in use here
        assert PackedLinear.available()
        assert isinstance(fast.transformer.h[0].mlp.c_fc, PackedLinear)
        assert isinstance(fast.lm_head, PackedLinear)
    idx = ids(2, 24)
    with torch.no_grad():
        assert (fast(idx) - plain(idx)).abs().max().item() < 1e-4
        cache_a, cache_b = KVCache.for_model(plain, 2, 30), KVCache.for_model(fast, 2, 30)
        plain(idx, cache_a, Positions.at(0, 24)), fast(idx, cache_b, Positions.at(0, 24))
        step = ids(2, 1, seed=1)
        at = Positions.at(24, 1)
        assert (fast(step, cache_b, at) - plain(step, cache_a, at)).abs().max().item() < 1e-4


def test_inference_layout_gives_the_plain_models_greedy_tokens(tiny_folder):
    """Greedy decoding through the packed layout picks exactly the plain module's tokens."""
    from gpt2kit.checkpoints import load_model
    from gpt2kit.config import GenerationConfig
    from gpt2kit.inference.generate import generate_events
    fast = gpt2kit.load(tiny_folder, device="cpu")
    plain = load_model(str(tiny_folder), torch.device("cpu"), torch.float32).model
    prompts = [fast.tokenizer.encode(p) for p in ("Hello there, how are", "Hi", "Once upon a time")]
    cfg = GenerationConfig(temperature=0, stop_at_eos=False, max_new_tokens=40)

    def tokens(module):
        done = [e.completion for e in generate_events(module, fast.tokenizer, prompts, cfg) if e.completion]
        return sorted((c.prompt_index, c.token_ids) for c in done)
    assert tokens(fast.module) == tokens(plain)
