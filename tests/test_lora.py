"""LoRA on tiny random GPT-2s: starts equal to the base, trains only the adapters, merges to the
same logits, round-trips through PEFT-format files, and refuses bad options and bad files."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers_checkpoints import CPU, tiny_hf
from safetensors.torch import load_file, save_file

from gpt2kit.checkpoints import load_model
from gpt2kit.config import ModelConfig
from gpt2kit.errors import CheckpointError, OptionError
from gpt2kit.lora import (
    TARGETS,
    LoraConfig,
    LoraLinear,
    apply_lora,
    count_parameters,
    load_adapter,
    lora_state_dict,
    merge_lora,
    save_adapter,
)
from gpt2kit.model import GPT

CFG = ModelConfig(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=2)
IDS = torch.tensor([[5, 17, 99, 3, 64, 2, 120, 42], [1, 2, 3, 4, 5, 6, 7, 8]])  # (B, T) = (2, 8)
ALL = ("c_attn", "c_proj", "c_fc")  # every Linear of a block (c_proj: attn and mlp)


def base_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(CFG).eval()


@torch.no_grad()
def logits(model: GPT) -> torch.Tensor:
    return model(IDS)


def train(model: GPT, steps: int = 5, lr: float = 0.5) -> None:
    """A few SGD steps on the adapters, with LoRA dropout on."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        out = model(IDS[:, :-1])
        loss = F.cross_entropy(out.reshape(-1, CFG.vocab_size), IDS[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="module")
def trained():
    """(base state dict, config, LoRA model after training) on every block Linear."""
    torch.manual_seed(1)
    model = base_model()
    base = copy.deepcopy(model.state_dict())
    cfg = LoraConfig(rank=4, alpha=8, targets=ALL)
    apply_lora(model, cfg)
    train(model)
    return base, cfg, model


def fresh_base(state) -> GPT:
    model = GPT(CFG).eval()
    model.load_state_dict(state)
    return model


# ---- the wrapped model ---------------------------------------------------------------------

def test_wrapped_model_starts_equal_to_base():
    model = base_model()
    before = logits(model)
    apply_lora(model, LoraConfig(targets=ALL))
    assert torch.equal(logits(model), before)
    assert not any(m.training for m in model.modules())  # the adapters' dropout follows eval mode
    assert sum(isinstance(m, LoraLinear) for m in model.modules()) == 4 * CFG.n_layer


def test_only_adapters_train_and_they_are_few():
    model = apply_lora(base_model(), LoraConfig(rank=8))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    count = count_parameters(model)
    C = CFG.n_embd
    assert count.trainable == count.adapters == CFG.n_layer * 8 * (C + 3 * C)  # A (r, C) + B (3C, r) per c_attn
    assert count.model == sum(p.numel() for p in base_model().parameters())  # tied: counted once


def test_gpt2_124m_trains_a_fraction_of_a_percent():
    with torch.device("meta"):  # the real shape, no memory
        model = apply_lora(GPT(ModelConfig()), LoraConfig())
    count = count_parameters(model)
    assert count.trainable == 12 * 8 * (768 + 3 * 768)  # 294,912
    assert count.model == 124_439_808  # transformers' GPT2LMHeadModel("gpt2").num_parameters()
    assert count.trainable / count.total < 0.003


def test_training_changes_output_and_merge_gives_the_same_logits(trained):
    base, _, model = trained
    assert all(torch.equal(p, base[k]) for k, p in model.state_dict().items() if k in base)  # frozen
    lora_logits = logits(model)
    assert (lora_logits - logits(fresh_base(base))).abs().max() > 1e-3
    merged = merge_lora(copy.deepcopy(model))
    assert (logits(merged) - lora_logits).abs().max() < 1e-5
    assert not any(isinstance(m, LoraLinear) for m in merged.modules())
    assert set(merged.state_dict()) == set(base)
    assert all(type(b.attn.c_attn) is nn.Linear and type(b.mlp.c_proj) is nn.Linear
               for b in merged.transformer.h)


def test_lora_state_dict_uses_peft_names_and_shapes(trained):
    _, cfg, model = trained
    state = lora_state_dict(model)
    C, r = CFG.n_embd, cfg.rank
    assert state["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (r, C)
    assert state["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (3 * C, r)
    assert state["base_model.model.transformer.h.1.mlp.c_fc.lora_B.weight"].shape == (4 * C, r)
    assert state["base_model.model.transformer.h.1.mlp.c_proj.lora_A.weight"].shape == (r, 4 * C)
    assert len(state) == 2 * 4 * CFG.n_layer


def test_peft_merge_rule_on_transformers_conv1d(tmp_path):
    """PEFT merges a Conv1D adapter as W(in, out) += (B @ A).T * alpha / r (fan_in_fan_out). Doing
    that with our saved tensors to transformers' own model must give our LoRA model's logits:
    the stored layout is the one PEFT reads."""
    ref = tiny_hf(n_positions=32)
    ref.save_pretrained(tmp_path / "base")
    model = load_model(str(tmp_path / "base"), CPU, torch.float32).model
    cfg = LoraConfig(rank=4, alpha=8, targets=("c_attn", "mlp.c_fc"))
    apply_lora(model, cfg)
    train(model)
    state = lora_state_dict(model)
    with torch.no_grad():
        for name, module in ref.named_modules():
            a = state.get(f"base_model.model.{name}.lora_A.weight")
            if a is not None:
                b = state[f"base_model.model.{name}.lora_B.weight"]
                module.weight += (b @ a).T * (cfg.alpha / cfg.rank)
        expected = ref(IDS).logits
    assert (logits(model) - expected).abs().max() < 1e-4


# ---- files ---------------------------------------------------------------------------------

def test_save_and_load_adapter_round_trip(trained, tmp_path):
    base, cfg, model = trained
    save_adapter(model, cfg, tmp_path / "adapter", base="openai-community/gpt2")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]  # no temp files left
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.05)
    assert config["target_modules"] == list(ALL) and config["fan_in_fan_out"] is True
    assert config["base_model_name_or_path"] == "openai-community/gpt2"
    assert config["bias"] == "none" and config["use_dora"] is False

    loaded = load_adapter(fresh_base(base), tmp_path / "adapter")
    assert torch.equal(logits(loaded), logits(model))
    # saving again over the same folder replaces the files
    save_adapter(loaded, cfg, tmp_path / "adapter", base="openai-community/gpt2")
    assert torch.equal(logits(load_adapter(fresh_base(base), tmp_path / "adapter")), logits(model))


def test_adapter_with_wrong_shapes_is_refused_naming_the_key(trained, tmp_path):
    base, cfg, model = trained
    folder = tmp_path / "adapter"
    save_adapter(model, cfg, folder, base="gpt2")
    state = load_file(folder / "adapter_model.safetensors")
    key = "base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"
    state[key] = torch.zeros(3 * CFG.n_embd, cfg.rank + 1)
    save_file(state, folder / "adapter_model.safetensors")
    target = fresh_base(base)
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.") + r" .*has shape \(96, 5\)"):
        load_adapter(target, folder)
    assert not any(isinstance(m, LoraLinear) for m in target.modules())  # left untouched


def test_adapter_with_missing_tensors_is_refused(trained, tmp_path):
    base, cfg, model = trained
    save_adapter(model, cfg, tmp_path, base="gpt2")
    state = load_file(tmp_path / "adapter_model.safetensors")
    del state["base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight"]
    save_file(state, tmp_path / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing .*h\.0\.mlp\.c_fc\.lora_A\.weight"):
        load_adapter(fresh_base(base), tmp_path)


@pytest.mark.parametrize("edit, message", [
    ({"peft_type": "IA3"}, "only LoRA adapters"),
    ({"use_dora": True}, "use_dora=true"),
    ({"rank_pattern": {"h.0.attn.c_attn": 2}}, "rank_pattern"),
    ({"exclude_modules": ["h.0.attn.c_attn"]}, "exclude_modules"),
    ({"target_modules": ".*c_attn"}, "pattern"),
    ({"target_modules": ["q_proj"]}, "q_proj"),
    ({"r": 0}, "rank must be at least 1"),
])
def test_unsupported_adapter_configs_are_refused(trained, tmp_path, edit, message):
    base, cfg, model = trained
    save_adapter(model, cfg, tmp_path, base="gpt2")
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    with pytest.raises(CheckpointError, match=message):
        load_adapter(fresh_base(base), tmp_path)


def test_missing_adapter_folder_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        load_adapter(base_model(), tmp_path / "nowhere")


def test_save_refuses_a_config_that_does_not_describe_the_model(trained, tmp_path):
    _, cfg, model = trained
    with pytest.raises(OptionError, match="not the one the model's adapters were made with"):
        save_adapter(model, LoraConfig(rank=8, alpha=8, targets=ALL), tmp_path, base="gpt2")
    with pytest.raises(OptionError, match="not applied"):
        save_adapter(base_model(), cfg, tmp_path, base="gpt2")


# ---- options -------------------------------------------------------------------------------

def test_unknown_target_lists_the_valid_ones():
    with pytest.raises(OptionError) as info:
        LoraConfig(targets=("c_attn", "q_proj"))
    assert info.value.field == "targets"
    assert "q_proj" in str(info.value) and all(t in str(info.value) for t in TARGETS)


@pytest.mark.parametrize("kwargs, field", [
    ({"rank": 0}, "rank"), ({"rank": 2.5}, "rank"), ({"alpha": 0}, "alpha"),
    ({"alpha": float("nan")}, "alpha"), ({"dropout": 1.0}, "dropout"), ({"dropout": -0.1}, "dropout"),
    ({"targets": ()}, "targets"),
])
def test_bad_options(kwargs, field):
    with pytest.raises(OptionError) as info:
        LoraConfig(**kwargs)
    assert info.value.field == field


def test_targets_may_be_a_comma_separated_string():
    assert LoraConfig(targets="c_attn, mlp.c_fc").targets == ("c_attn", "mlp.c_fc")


def test_lora_cannot_be_applied_twice():
    model = apply_lora(base_model(), LoraConfig())
    with pytest.raises(OptionError, match="already applied"):
        apply_lora(model, LoraConfig())


def test_bfloat16_base_keeps_float32_adapters():
    model = base_model().to(torch.bfloat16)
    apply_lora(model, LoraConfig(targets=ALL))
    layer = model.transformer.h[0].attn.c_attn
    assert layer.lora_A.weight.dtype == torch.float32 and layer.base_layer.weight.dtype == torch.bfloat16
    assert model(IDS).dtype == torch.bfloat16
    merged = merge_lora(model)
    assert merged.transformer.h[0].attn.c_attn.weight.dtype == torch.bfloat16
