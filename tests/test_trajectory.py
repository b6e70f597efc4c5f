"""The training trajectory against an oracle, in the manner of llm.c's test_gpt2: a few AdamW
steps of `finetune` (the real recipe: NextTokenLoss, make_optimizer's groups, the schedule,
gradient accumulation, clipping) on a tiny random GPT-2, and the same steps written out plainly
in PyTorch on transformers' GPT2LMHeadModel built from the same weights and fed the same
batches. The losses agree at every step, and so do the weights after the last.

The oracle shares no code with gpt2kit: its loss is transformers' own (`labels=`), its weight
decay is chosen by parameter name (matrices and embeddings; not biases or LayerNorms), its
schedule is written out here.
"""

from __future__ import annotations

import math

import pytest
import torch

from gpt2kit.data.prepare import DataConfig
from gpt2kit.training.loop import finetune
from gpt2kit.training.objective import NextTokenLoss

STEPS, WARMUP, PEAK_LR = 5, 2, 1e-2
BATCH, ACCUM, BLOCK = 2, 2, 32
# A high rate and decay: weight decay on the wrong parameters then moves them far beyond the
# float noise between the two (1-2e-4 of a tensor's update, most of it in attention's key bias,
# whose exact gradient is zero, so that Adam scales noise up to a full step).
CLIP, DECAY = 1.0, 0.5


def oracle_lr(step: int) -> float:
    """Linear warm-up over WARMUP steps, then cosine decay to a tenth of the peak at STEPS."""
    if step < WARMUP:
        return PEAK_LR * (step + 1) / WARMUP
    progress = (step - WARMUP) / (STEPS - WARMUP)
    return PEAK_LR * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


@pytest.fixture(scope="module")
def trained(tiny_folder, jokes_csv, tmp_path_factory):
    """(run folder, the micro-batches finetune's objective was given, its per-step records)."""
    out = tmp_path_factory.mktemp("trajectory") / "run"
    batches, records = [], []
    real = NextTokenLoss.forward

    def recording(self, x):
        batches.append(x.clone())
        return real(self, x)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(NextTokenLoss, "forward", recording)
        finetune(DataConfig(path=str(jokes_csv), column="Joke", cache_dir=str(out.parent / "cache")),
                 str(tiny_folder), out=str(out), max_steps=STEPS, warmup_steps=WARMUP,
                 learning_rate=PEAK_LR, schedule="cosine", batch_size=BATCH, grad_accum=ACCUM,
                 block_size=BLOCK, grad_clip=CLIP, weight_decay=DECAY, dropout=0.0, eval_every=0,
                 sample_every=0, save_every=0, device="cpu", dtype="float32", progress=False,
                 log=records.append)  # float32: auto is bfloat16 autocast on CPUs that have it
    return out, batches, [r for r in records if r["event"] == "train"]


def oracle(folder, batches: list[torch.Tensor]):
    """(model, per-step losses, per-step gradient norms) of plain PyTorch training on transformers."""
    import transformers
    model = transformers.GPT2LMHeadModel.from_pretrained(
        folder, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager").train()
    named = dict(model.named_parameters())  # the tied LM head once, as transformer.wte.weight
    plain = {n for n in named if n.endswith(".bias") or ".ln_" in n or n.startswith("transformer.ln_f.")}
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in named.items() if n not in plain], "weight_decay": DECAY},
         {"params": [p for n, p in named.items() if n in plain], "weight_decay": 0.0}],
        lr=PEAK_LR, betas=(0.9, 0.95), eps=1e-8)
    losses, norms = [], []
    for step in range(STEPS):
        for group in optimizer.param_groups:
            group["lr"] = oracle_lr(step)
        total = 0.0
        for x in batches[step * ACCUM:(step + 1) * ACCUM]:
            loss = model(input_ids=x, labels=x).loss / ACCUM  # transformers shifts the labels itself
            loss.backward()
            total += loss.item()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
    return model, losses, norms


@pytest.fixture(scope="module")
def reference(tiny_folder, trained):
    _, batches, _ = trained
    return oracle(tiny_folder, batches)


def test_finetune_fed_the_oracle_distinct_full_batches(trained):
    _, batches, records = trained
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert len(batches) == STEPS * ACCUM and all(x.shape == (BATCH, BLOCK) for x in batches)
    assert len({tuple(x.flatten().tolist()) for x in batches}) == len(batches)


def test_losses_learning_rates_and_gradient_norms_match_the_oracle_at_every_step(trained, reference):
    _, _, records = trained
    _, losses, norms = reference
    for step, (record, loss, norm) in enumerate(zip(records, losses, norms, strict=True)):
        assert record["lr"] == pytest.approx(oracle_lr(step), rel=1e-12), step
        assert record["loss"] == pytest.approx(loss, abs=2e-5), step
        # gpt2kit's norm is one native float64-accumulated pass (kernels/grad_clip.py), torch's a norm
        # of per-tensor float32 norms: the first step's differ by ~2e-6 (gpt2kit's the nearer to an
        # exact sum), which these few high-rate steps amplify to a few 1e-4 (with torch's norm fed to
        # the same folded step, they agree to ~1e-6 again)
        assert record["grad_norm"] == pytest.approx(norm, rel=5e-4), step
    assert losses[-1] < losses[0] - 0.1  # the steps did something for the comparison to mean anything


def test_weights_after_the_last_step_match_the_oracle(tiny_folder, trained, reference):
    """Each tensor's update over the run agrees with the oracle's to 1e-3 of its size."""
    import transformers
    out, _, _ = trained
    model, _, _ = reference
    ours, initial = (transformers.GPT2LMHeadModel.from_pretrained(f).state_dict() for f in (out, tiny_folder))
    for name, expected in model.state_dict().items():
        if name in ours:  # attention-mask buffers of older transformers are not saved
            update = (expected - initial[name]).norm()
            assert update > 0 and (ours[name] - expected).norm() <= 1e-3 * update, name
