"""Training memory: lean_backward.save_less_for_backward keeps fewer activations for the backward pass
(the probabilities of attention with dropout once, not three times; no GELU output; dropout masks
as bool), is on by default in fine-tuning, and changes no bit of the loss, gradients or update.
"""

from __future__ import annotations

import pytest
import torch

from gpt2kit.config import ModelConfig
from gpt2kit.data.prepare import DataConfig
from gpt2kit.kernels.checkpointing import checkpoint_blocks
from gpt2kit.kernels.lean_backward import save_less_for_backward
from gpt2kit.lora import LoraConfig, apply_lora
from gpt2kit.model import GPT
from gpt2kit.training.config import TrainConfig
from gpt2kit.training.memory import estimate
from gpt2kit.training.objective import NextTokenLoss
from gpt2kit.training.plan import Plan
from gpt2kit.training.setup import load_for_training, make_optimizer

CFG = ModelConfig(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=2, dropout=0.1)
B, T = 2, 24  # B*nh*T*T, B*T*C and B*T*4C elements all differ, so saved tensors can be told apart


def saved_for_backward(model: GPT, x: torch.Tensor) -> list[tuple[torch.dtype, int]]:
    """(dtype, elements) of every tensor the forward saves for the backward, parameters excepted."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved, seen = [], set()

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:
            seen.add(ptr)
            saved.append((t.dtype, t.untyped_storage().nbytes() // t.element_size()))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        NextTokenLoss(model)(x)
    return saved


def count(saved, dtype, elements) -> int:
    return saved.count((dtype, elements))


def test_attention_mlp_and_dropout_keep_less():
    torch.manual_seed(0)
    plain, x = GPT(CFG).train(), torch.randint(0, CFG.vocab_size, (B, T + 1))
    lean = GPT(CFG).train()
    save_less_for_backward(lean)
    probs, hidden, width = B * CFG.n_head * T * T, B * T * 4 * CFG.n_embd, B * T * CFG.n_embd
    before, after = saved_for_backward(plain, x), saved_for_backward(lean, x)
    n = CFG.n_layer
    # attention: probabilities, dropout noise and dropped probabilities -> probabilities + bool mask
    assert count(before, torch.float32, probs) == 3 * n and count(after, torch.float32, probs) == n
    assert count(after, torch.bool, probs) == n
    # MLP: c_fc's output and GELU's -> c_fc's output only
    assert count(before, torch.float32, hidden) == 2 * n and count(after, torch.float32, hidden) == n
    # residual and embedding dropout: the noise as bool
    assert count(after, torch.bool, width) == 2 * n + 1
    assert sum(e * d.itemsize for d, e in after) < 0.7 * sum(e * d.itemsize for d, e in before)


def test_the_memory_estimate_counts_what_lean_forwards_save():
    """memory.estimate(lean=True) drops about the bytes the lean forwards stop saving."""
    torch.manual_seed(0)
    plain, x = GPT(CFG).train(), torch.randint(0, CFG.vocab_size, (B, T + 1))
    lean = GPT(CFG).train()
    save_less_for_backward(lean)
    saved = [sum(e * d.itemsize for d, e in saved_for_backward(m, x)) for m in (plain, lean)]
    n = sum(p.numel() for p in plain.parameters())
    est = [estimate(CFG, n, n, B, T, dropout=CFG.dropout, loss_rows=T, lean=flag).activations
           for flag in (False, True)]
    assert est[0] - est[1] == pytest.approx(saved[0] - saved[1], rel=0.15)


@pytest.mark.parametrize("lora", [False, True])
def test_a_lean_step_is_bitwise_the_plain_step(lora):
    """Same seed, same batch: the loss, every gradient and the weights after clipping and AdamW
    are bit for bit those of the plain modules (the same operations and dropout draws)."""
    torch.manual_seed(0)
    x = torch.randint(0, CFG.vocab_size, (B, T + 1))
    state = GPT(CFG).state_dict()
    results = []
    for lean in (False, True):
        model = GPT(CFG)
        model.load_state_dict(state)
        if lora:
            torch.manual_seed(2)
            apply_lora(model, LoraConfig(dropout=0.1))
        if lean:
            save_less_for_backward(model)
        model.train()
        optimizer = make_optimizer(model, TrainConfig(out="-"), torch.device("cpu"))
        params = [p for g in optimizer.param_groups for p in g["params"]]
        torch.manual_seed(1)
        loss = NextTokenLoss(model)(x)
        loss.backward()
        grads = [p.grad.clone() for p in params]
        torch.nn.utils.clip_grad_norm_(params, 0.1)
        optimizer.step()
        results.append((loss.detach(), grads, [p.detach().clone() for p in params]))
    (loss0, grads0, after0), (loss1, grads1, after1) = results
    assert torch.equal(loss0, loss1)
    assert all(torch.equal(a, b) for a, b in zip(grads0, grads1))
    assert all(torch.equal(a, b) for a, b in zip(after0, after1))


def test_eval_and_no_grad_run_the_plain_forward():
    torch.manual_seed(0)
    plain, x = GPT(CFG), torch.randint(0, CFG.vocab_size, (B, T))
    lean = GPT(CFG)
    lean.load_state_dict(plain.state_dict())
    save_less_for_backward(lean)
    with torch.no_grad():
        assert torch.equal(plain.eval()(x), lean.eval()(x))
        torch.manual_seed(3)
        a = plain.train()(x)
        torch.manual_seed(3)
        assert torch.equal(a, lean.train()(x))


def test_finetune_keeps_less_by_default(tmp_path):
    """The model train_setup hands to the loop has the lean forwards, with no flag."""
    cfg = TrainConfig(out=str(tmp_path / "run"), from_scratch=True, dropout=0.1)
    plan = Plan(cfg, DataConfig(path=str(tmp_path / "unused.txt")), None, None)
    model, _ = load_for_training(plan, torch.device("cpu"))
    c = model.config
    x = torch.randint(0, c.vocab_size, (1, 17))
    saved = saved_for_backward(model, x)
    assert count(saved, torch.float32, c.n_head * 16 * 16) == c.n_layer
    assert count(saved, torch.float32, 16 * 4 * c.n_embd) == c.n_layer


def test_the_fast_paths_are_module_swaps_keeping_names_parameters_and_mode():
    """Each swap is a class of its own (shown by print(model)), holds the very Parameters it
    replaces (same state-dict keys, same optimizer order) and takes the replaced module's mode:
    a new module starts in train mode, which would turn dropout on in an eval-mode model."""
    model = GPT(CFG).eval()
    keys, params = list(model.state_dict()), list(model.parameters())
    checkpoint_blocks(model)
    save_less_for_backward(model)
    shown = str(model)
    for name in ("CheckpointedBlock", "LeanScaledDotProduct", "LeanGeluLinear", "LeanLinear", "LeanDropout"):
        assert name in shown, name
    assert "GELU" not in shown and "(drop): LeanDropout" in shown
    assert list(model.state_dict()) == keys
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    assert not any(m.training for m in model.modules())
    assert not any("forward" in vars(m) for m in model.modules())  # no instance-bound forwards


def test_checkpointed_blocks_keep_less_and_run_plainly_without_grad():
    torch.manual_seed(0)
    plain, x = GPT(CFG).train(), torch.randint(0, CFG.vocab_size, (B, T + 1))
    checkpointed = GPT(CFG).train()
    checkpointed.load_state_dict(plain.state_dict())
    checkpoint_blocks(checkpointed)
    size = [sum(e * d.itemsize for d, e in saved_for_backward(m, x)) for m in (plain, checkpointed)]
    assert size[1] < 0.5 * size[0]
    with torch.no_grad():
        assert torch.equal(plain.eval()(x), checkpointed.eval()(x))


def test_a_lora_wrapped_c_proj_is_left_alone():
    model = GPT(CFG)
    apply_lora(model, LoraConfig(targets=("mlp.c_proj",), dropout=0.1))
    save_less_for_backward(model)
    mlp = model.transformer.h[0].mlp
    assert type(mlp.act) is torch.nn.GELU and type(mlp.c_proj).__name__ == "LoraLinear"
    assert type(mlp.c_proj.lora_dropout).__name__ == "LeanDropout"  # LoRA's dropout keeps a bool mask too


def test_grad_checkpointing_composes_with_the_lean_forwards():
    x = torch.randint(0, CFG.vocab_size, (B, T + 1))
    grads = []
    for grad_checkpointing in (False, True, "first"):  # "first": load_for_training's order
        torch.manual_seed(0)
        model = GPT(CFG).train()
        if grad_checkpointing == "first":
            checkpoint_blocks(model)
        save_less_for_backward(model)
        if grad_checkpointing is True:
            checkpoint_blocks(model)
        torch.manual_seed(1)
        NextTokenLoss(model)(x).backward()
        grads.append([p.grad for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads[:2]))
    assert all(torch.equal(a, b) for a, b in zip(*grads[::2]))
