"""kernels/bf16_products.py: bfloat16 products cut into the blocks oneDNN runs fastest on 2
threads, the Linear built on them, and lean_backward's sparse token-embedding gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpt2kit.config import ModelConfig
from gpt2kit.kernels import bf16_products, lean_backward
from gpt2kit.kernels.bf16_products import blocks, mm
from gpt2kit.kernels.lean_backward import save_less_for_backward, sparse_embedding_gradient
from gpt2kit.model import GPT

BF16 = torch.bfloat16


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the thread count the blocks were measured for, on any machine
    yield
    torch.set_num_threads(before)


def test_blocks_halve_narrow_products_and_slice_the_vocabulary_on_two_threads_only():
    assert blocks(1024, 768, 2) == (512, 768)  # the residual stream's products at 4 x 256 tokens
    assert blocks(768, 768, 2) == (384, 768)
    assert blocks(1000, 768, 2) == (512, 768)  # halves rounded up to 32 rows
    assert blocks(1024, 3072, 2) == (1024, 3072)  # wide products ran fast whole
    assert blocks(8192, 768, 2) == (8192, 768)  # and so did many rows
    assert blocks(512, 768, 2) == (512, 768)
    assert blocks(1024, 50257, 2) == (1024, 4096)  # the LM head
    assert blocks(1024, 768, 1) == (1024, 768) and blocks(1024, 50257, 8) == (1024, 50257)
    assert blocks(768, 768, 2, a_transposed=True) == (768, 768)  # a weight's gradient: whole


@pytest.mark.parametrize("M, K, N, bias, transposed", [(1024, 64, 768, False, False), (1000, 48, 768, True, False),
                                                       (64, 32, 9000, True, True), (700, 16, 8200, False, False)])
def test_cut_products_are_each_blocks_own_product(two_threads, M, K, N, bias, transposed):
    """Every block of rows sees all of K: each output block is exactly torch's product of that
    block (so the cut changes nothing but oneDNN's own blocking), and the whole is the product
    to bfloat16 rounding. Transposed operands, as the backward passes them, alike."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(K, M, generator=g).to(BF16).t() if transposed else torch.randn(M, K, generator=g).to(BF16)
    b = torch.randn(N, K, generator=g).to(BF16).t()  # a weight, transposed as the forward passes it
    c = torch.randn(N, generator=g).to(BF16) if bias else None
    out = mm(a, b, c)
    rows, cols = blocks(M, N, 2, transposed)
    assert (rows, cols) != (M, N)  # the case cuts
    for i in range(0, M, rows):
        for j in range(0, N, cols):
            part = a[i:i + rows] @ b[:, j:j + cols]
            if bias:
                part = torch.addmm(c[j:j + cols], a[i:i + rows], b[:, j:j + cols])
            assert torch.equal(out[i:i + rows, j:j + cols], part)
    want = a.double() @ b.double() + (c.double() if bias else 0)
    assert torch.allclose(out.double(), want, rtol=2e-2, atol=2e-2 * K ** 0.5)


@pytest.mark.parametrize("M, K, N", [(1024, 768, 2304), (1000, 48, 96), (7, 64, 33)])
def test_a_whole_product_with_bias_is_addmms(M, K, N):
    """oneDNN's linear with the bias fused (plus_bias) gives torch.addmm's bits."""
    g = torch.Generator().manual_seed(1)
    a, w, c = (torch.randn(*shape, generator=g).to(BF16) for shape in ((M, K), (N, K), (N,)))
    assert torch.equal(mm(a, w.t(), c), torch.addmm(c, a, w.t()))


def test_a_cpu_without_onednn_bfloat16_adds_the_bias_with_addmm(monkeypatch):
    monkeypatch.setattr(bf16_products, "onednn_bfloat16", lambda: False)
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", None)  # would fail if called
    a, w, c = torch.randn(64, 32).to(BF16), torch.randn(48, 32).to(BF16), torch.randn(48).to(BF16)
    assert torch.equal(mm(a, w.t(), c), torch.addmm(c, a, w.t()))


@pytest.mark.parametrize("frozen, bias", [(False, True), (True, True), (False, False)])
def test_linear_is_autocasts_linear_under_bfloat16_autocast(two_threads, frozen, bias):
    """Forward and gradients as F.linear's under CPU autocast (the same bfloat16 casts): equal
    where no product is cut, within bfloat16 rounding where one is (M = 1024 rows, 48 columns)."""
    g = torch.Generator().manual_seed(1)
    for M in (64, 1024):
        x = torch.randn(M // 64, 64, 80, generator=g, requires_grad=True)
        w = torch.randn(48, 80, generator=g).requires_grad_(not frozen)
        b = torch.randn(48, generator=g, requires_grad=True) if bias else None
        dy = torch.randn(M // 64, 64, 48, generator=g)
        grads = []
        for f in (F.linear, bf16_products.Linear.apply):
            with torch.autocast("cpu", dtype=BF16):
                y = f(x, w, b)
            assert y.dtype == BF16
            y.float().backward(dy)
            grads.append([y.detach()] + [t.grad for t in (x, w, b) if t is not None and t.requires_grad])
            assert all(t.dtype == torch.float32 for t in grads[-1][1:])  # autograd casts back
            for t in (x, w, b):
                if t is not None:
                    t.grad = None
        for plain, ours in zip(*grads, strict=True):
            if M == 64:
                assert torch.equal(plain, ours)
            else:
                assert torch.allclose(plain.float(), ours.float(), rtol=2e-2, atol=0.3)


def test_lean_linears_run_the_cut_products_under_bfloat16_autocast_only(monkeypatch):
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, n_positions=32, vocab_size=97))
    save_less_for_backward(model)
    calls = []
    real = bf16_products.Linear.apply
    monkeypatch.setattr(bf16_products.Linear, "apply", lambda *a: calls.append(1) or real(*a))
    x = torch.randint(0, 97, (2, 17))
    model(x).sum().backward()  # float32: F.linear, the plain bits
    assert calls == []
    with torch.autocast("cpu", dtype=BF16):
        model(x).float().sum().backward()
    assert len(calls) == 4  # c_attn, attn.c_proj, c_fc, and mlp.c_proj (LeanGeluLinear)
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        model(x)
    assert len(calls) == 4


def test_a_sparse_token_embedding_gradient_sums_to_the_dense_one():
    """The tied embedding's gradient: its rows as a sparse tensor, added by autograd into the
    head's dense gradient, gives the dense gradient (a dense tensor, as the optimizers need)."""
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=32, n_positions=32, vocab_size=97)
    torch.manual_seed(0)
    dense, sparse = GPT(cfg), GPT(cfg)
    sparse.load_state_dict(dense.state_dict())
    sparse_embedding_gradient(sparse)
    assert sparse.transformer.wte.sparse and not dense.transformer.wte.sparse
    x = torch.randint(0, 97, (3, 17))
    x[0, :4] = 5  # a token repeated: its rows summed
    for m in (dense, sparse):
        m(x).sum().backward()
    grad = sparse.transformer.wte.weight.grad
    assert grad.layout == torch.strided and grad.is_contiguous()
    assert torch.allclose(grad, dense.transformer.wte.weight.grad, rtol=1e-6, atol=1e-6)


def test_an_untied_embedding_keeps_its_dense_gradient():
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, n_positions=32, vocab_size=97))
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    lean_backward.sparse_embedding_gradient(model)
    assert not model.transformer.wte.sparse


@pytest.mark.parametrize("autocast", [False, True])
def test_the_heads_dense_gradient_takes_the_sparse_rows_in_place(monkeypatch, autocast):
    """NextTokenLoss takes the head's weight through LateGradient before the embedding lookup, so
    the sparse embedding rows reach the weight first and autograd adds them into the head's
    dense gradient itself: the weight's .grad is the very tensor the head's backward returned
    (no (V, C) copy), and equals the gradient of the plain, dense path."""
    from gpt2kit.kernels import fused_loss
    from gpt2kit.training.objective import NextTokenLoss
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=32, n_positions=32, vocab_size=97)
    torch.manual_seed(0)
    plain, fast = GPT(cfg), GPT(cfg)
    fast.load_state_dict(plain.state_dict())
    sparse_embedding_gradient(fast)
    returned = []
    backward = fused_loss.HeadCrossEntropy.backward

    def spy(ctx, grad):
        grads = backward(ctx, grad)
        returned.append(grads[1].data_ptr())  # not the tensor: a reference would force the copy
        return grads

    monkeypatch.setattr(fused_loss.HeadCrossEntropy, "backward", staticmethod(spy))
    x = torch.randint(0, 97, (3, 18))
    for model in (plain, fast):
        with torch.autocast("cpu", dtype=BF16, enabled=autocast):
            NextTokenLoss(model)(x).backward()
    grad = fast.transformer.wte.weight.grad
    assert grad.data_ptr() == returned[1]
    assert torch.allclose(grad, plain.transformer.wte.weight.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("rows, cols, offset", [(1, 1, 0), (5, 7, 0), (33, 65, 0), (64, 96, 0), (64, 96, 3),
                                                (1024, 200, 0), (100, 37, 1)])
def test_transposed_is_the_row_major_transpose(rows, cols, offset):
    """native/transpose.c over whole and partial 32 x 32 blocks, rows apart by more than their
    width, and destinations aligned (whole blocks streamed) or not."""
    x = torch.randn(rows, cols + offset + 2).to(BF16)[:, offset:offset + cols]
    out = bf16_products.transposed(x)
    assert out.shape == (cols, rows) and out.is_contiguous()
    assert torch.equal(out, x.t())


def test_transposed_falls_back_to_torch_without_the_kernel(monkeypatch):
    monkeypatch.setattr(bf16_products, "library", lambda name: None)
    x = torch.randn(40, 70).to(BF16)
    assert torch.equal(bf16_products.transposed(x), x.t())
    assert torch.equal(bf16_products.transposed(x.float()), x.float().t())


def test_a_weight_gradient_is_grad_t_times_x(two_threads):
    g = torch.Generator().manual_seed(2)
    grad, x = torch.randn(1024, 96, generator=g).to(BF16), torch.randn(1024, 80, generator=g).to(BF16)
    want = grad.double().t() @ x.double()
    assert torch.allclose(bf16_products.weight_gradient(grad, x).double(), want, rtol=2e-2, atol=1.0)
