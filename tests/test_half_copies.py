"""bfloat16 working copies of the trained matrices (kernels/half_copies.py) with MasterAdamW: a
copy follows its master, and bfloat16 training with them is bit for bit the autocast-casting path
it replaces (one micro-batch a step and several), in finetune too; where they do not apply
(LoRA, float32) nothing changes."""

from __future__ import annotations

import pytest
import torch

from gpt2kit.config import ModelConfig
from gpt2kit.data.prepare import DataConfig
from gpt2kit.kernels import grad_clip, master_adamw
from gpt2kit.kernels.half_copies import HalfCopy, hold_half_copies
from gpt2kit.kernels.lean_backward import save_less_for_backward
from gpt2kit.kernels.master_adamw import MasterAdamW
from gpt2kit.lora import LoraConfig, apply_lora
from gpt2kit.model import GPT
from gpt2kit.runtime import autocast
from gpt2kit.training import setup
from gpt2kit.training.config import TrainConfig
from gpt2kit.training.loop import finetune

pytestmark = pytest.mark.skipif(not master_adamw.available(), reason="no native AdamW here (AVX512, a C compiler)")
CPU, BF16 = torch.device("cpu"), torch.bfloat16
CONFIG = ModelConfig(vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=2)


def test_a_copy_follows_its_master():
    master = torch.nn.Parameter(torch.randn(32, 16))
    half = HalfCopy(master, gradient=True)
    assert torch.equal(half.current(), master.detach().bfloat16()) and half.copy.requires_grad
    with torch.no_grad():
        master.mul_(3)  # changed other than by the step (a resume, load_state_dict): cast again
    assert torch.equal(half.current(), master.detach().bfloat16())
    with torch.no_grad():
        half.copy.zero_()
    assert half.current().count_nonzero() == 0  # the master did not change: the copy is trusted


def steps(copies_on: bool, accum: int, n: int = 3) -> tuple[GPT, torch.optim.Optimizer, list]:
    """n clipped bfloat16 steps of a small model, set up as finetune does, with or without copies."""
    torch.manual_seed(0)
    model = GPT(CONFIG).train()
    save_less_for_backward(model)
    cfg = TrainConfig(out="-", grad_accum=accum)
    loss_fn, copies = setup.objective(model, cfg, CPU, BF16 if copies_on else None, one_process=True)
    optimizer = setup.make_optimizer(model, cfg, CPU, copies)
    assert isinstance(optimizer, MasterAdamW) == copies_on
    x = torch.randint(0, CONFIG.vocab_size, (n, accum, 4, 33), generator=torch.Generator().manual_seed(1))
    record = []
    for step in range(n):
        for micro in range(accum):
            with autocast(CPU, BF16):
                loss = loss_fn(x[step, micro]) / accum
            loss.backward()
        grads = grad_clip.gradients(optimizer)
        assert grad_clip.folds_into_step(optimizer, grads)
        norm = grad_clip.total_norm(grads)
        grad_clip.clipped_step(optimizer, norm, 0.5)
        optimizer.zero_grad(set_to_none=True)
        record.append((loss.item(), norm))
    return model, optimizer, record


@pytest.mark.parametrize("accum", [1, 3])
def test_training_with_copies_is_the_casting_path_bit_for_bit(accum):
    plain, plain_optimizer, plain_record = steps(False, accum)
    ours, optimizer, record = steps(True, accum)
    assert len(optimizer.copies) == 4 * CONFIG.n_layer + 1  # the blocks' four matrices, the tied head
    assert record == plain_record
    for a, b in zip(plain.state_dict().values(), ours.state_dict().values()):
        assert torch.equal(a, b)
    for p, q in zip(plain_optimizer.state.values(), optimizer.state.values()):
        assert all(torch.equal(p[k], q[k]) for k in p)


def test_lora_and_float32_keep_no_copies():
    model = GPT(CONFIG)
    apply_lora(model, LoraConfig())
    save_less_for_backward(model)
    assert all(c.master is not model.lm_head.weight and c.master.requires_grad
               for c in hold_half_copies(model, accumulate=False))
    _, copies = setup.objective(GPT(CONFIG), TrainConfig(out="-"), CPU, None, one_process=True)
    assert copies == []


def test_finetune_in_bfloat16_steps_with_copies_as_without(tiny_folder, jokes_csv, tmp_path, monkeypatch):
    def run(name: str) -> tuple[list, type]:
        records, made = [], []
        real = setup.make_optimizer
        monkeypatch.setattr(setup, "make_optimizer", lambda *a: made.append(real(*a)) or made[-1])
        finetune(DataConfig(path=str(jokes_csv), column="Joke", cache_dir=str(tmp_path / "cache")), str(tiny_folder),
                 out=str(tmp_path / name), max_steps=4, batch_size=4, block_size=32, grad_accum=2,
                 learning_rate=3e-3, grad_clip=0.05, dtype="bfloat16", eval_every=0, sample_every=0, device="cpu",
                 progress=False, log=records.append)
        return [(r["loss"], r["grad_norm"]) for r in records if r["event"] == "train"], type(made[0])

    ours, kind = run("copies")
    assert kind is MasterAdamW
    monkeypatch.setattr(master_adamw, "available", lambda: False)
    plain, plain_kind = run("casts")
    assert plain_kind is torch.optim.AdamW and ours == plain
