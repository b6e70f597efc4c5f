"""MasterAdamW (kernels/master_adamw.py, native/adamw.c): torch's fused AdamW step, bit for bit,
from float32 or bfloat16 gradients, with the clipping factor folded in, writing each master's
bfloat16 copy as Tensor.to rounds it; torch's state and state_dict, so a run resumes either way."""

from __future__ import annotations

import pytest
import torch

from gpt2kit.kernels import master_adamw
from gpt2kit.kernels.half_copies import HalfCopy
from gpt2kit.kernels.master_adamw import MasterAdamW

pytestmark = pytest.mark.skipif(not master_adamw.available(), reason="no native AdamW here (AVX512, a C compiler)")
SIZES = [(70000,), (48, 16), (768,), (16,), (2304, 64)]  # multiples of 16, one over a chunk
HYPER = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8)


def groups(params: list[torch.nn.Parameter]) -> list[dict]:
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def pair(sizes=SIZES, seed: int = 0):
    """Two identical sets of parameters: (for torch's AdamW, for MasterAdamW with copies)."""
    g = torch.Generator().manual_seed(seed)
    plain = [torch.nn.Parameter(torch.randn(size, generator=g)) for size in sizes]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in plain]
    return plain, ours


def gradients(sizes, seed: int, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, generator=g).to(dtype) for size in sizes]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [None, 2.5])  # no clipping; the clipping factor's inverse
def test_step_is_fused_adamws_bits(dtype, scale):
    plain, ours = pair()
    reference = torch.optim.AdamW(groups(plain), **HYPER, fused=True)
    copies = [HalfCopy(p, gradient=True) for p in ours if p.dim() >= 2]
    optimizer = MasterAdamW(groups(ours), copies, **HYPER)
    for step in range(3):
        for p, q, g in zip(plain, ours, gradients(SIZES, step, dtype)):
            p.grad = g.float()
            half = optimizer.copies.get(q)
            if half is not None and dtype == torch.bfloat16:
                half.copy.grad = g.clone()  # where autograd leaves a copy's gradient
            else:
                q.grad = g.float().clone()  # not p's: the step divides float32 gradients in place
        for opt in (reference, optimizer):
            if scale is not None:
                opt.grad_scale, opt.found_inf = torch.tensor(scale), None
            opt.step()
        for p, q in zip(plain, ours):
            assert torch.equal(p, q)
            assert all(torch.equal(reference.state[p][k], optimizer.state[q][k]) for k in reference.state[p])
            if q.grad is not None:  # float32 gradients are left divided by the scale, as torch leaves them
                assert torch.equal(p.grad, q.grad)
        assert all(torch.equal(c.copy, c.master.detach().to(torch.bfloat16)) for c in copies)
        optimizer.zero_grad()
        assert all(c.copy.grad is None for c in copies) and all(q.grad is None for q in ours)


def test_odd_sizes_agree_to_rounding():
    """torch runs the last elements of a size that is not a multiple of 16 one at a time, in other
    operations; here they take the vector path too (GPT-2's tensors are all multiples of 16)."""
    sizes = [(37,), (5, 3)]
    plain, ours = pair(sizes, seed=1)
    reference = torch.optim.AdamW(groups(plain), **HYPER, fused=True)
    optimizer = MasterAdamW(groups(ours), [], **HYPER)
    for step in range(3):
        for p, q, g in zip(plain, ours, gradients(sizes, step, torch.float32)):
            p.grad, q.grad = g, g.clone()
        reference.step()
        optimizer.step()
    for p, q in zip(plain, ours):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


def test_state_dicts_resume_either_way():
    plain, ours = pair()
    reference = torch.optim.AdamW(groups(plain), **HYPER, fused=True)
    optimizer = MasterAdamW(groups(ours), [], **HYPER)
    for p, q, g in zip(plain, ours, gradients(SIZES, 0, torch.float32)):
        p.grad, q.grad = g, g.clone()
    reference.step()
    optimizer.step()
    swapped = MasterAdamW(groups(plain), [], **HYPER), torch.optim.AdamW(groups(ours), **HYPER, fused=True)
    swapped[0].load_state_dict(reference.state_dict())
    swapped[1].load_state_dict(optimizer.state_dict())
    for p, q, g in zip(plain, ours, gradients(SIZES, 1, torch.float32)):
        p.grad, q.grad = g, g.clone()
    for opt in swapped:
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(plain, ours))


def test_a_copy_is_written_even_where_its_master_has_no_gradient_this_step():
    plain, ours = pair()
    copies = [HalfCopy(p, gradient=False) for p in ours]
    optimizer = MasterAdamW(groups(ours), copies, **HYPER)
    ours[0].grad = torch.ones_like(ours[0])
    optimizer.step()
    assert all(torch.equal(c.current(), c.master.detach().bfloat16()) for c in copies)


def test_what_it_does_not_do_is_refused():
    _, ours = pair()
    ours[0].grad = torch.ones_like(ours[0])
    with pytest.raises(ValueError, match="amsgrad"):
        optimizer = MasterAdamW(groups(ours), [], **HYPER)
        optimizer.param_groups[0]["amsgrad"] = True
        optimizer.step()
    two = groups(ours)
    two[1]["betas"] = (0.8, 0.9)
    with pytest.raises(ValueError, match="same betas"):
        MasterAdamW(two, [], **HYPER).step()
    strided = torch.nn.Parameter(torch.randn(16, 32).t())  # not contiguous
    strided.grad = torch.ones(strided.shape)
    optimizer = MasterAdamW(groups(ours + [strided]), [], **HYPER)
    with pytest.raises(ValueError, match="contiguous float32"):
        optimizer.step()
    assert not optimizer.state  # refused before any state moved
