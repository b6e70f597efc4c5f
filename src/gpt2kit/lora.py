"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), applied from outside
the model: each targeted nn.Linear is swapped for a LoraLinear that adds a trainable low-rank update
(alpha / r) * B @ A to its frozen weight. Only A and B train, a fraction of a percent of GPT-2.

Adapters are saved in PEFT's format (huggingface/peft), so a folder written here loads with
`PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), folder)`, and PEFT's folders
load here. PEFT is not needed for either.

- adapter_model.safetensors holds `base_model.model.<module>.lora_A.weight` (r, in) and
  `...lora_B.weight` (out, r). PEFT wraps GPT-2's Conv1D (weight stored (in, out)) with
  lora_A = nn.Linear(in, r) and lora_B = nn.Linear(r, out), taking in and out from
  Conv1D.weight.shape (peft/tuners/lora/layer.py, LoraLayer.__init__). So the adapter tensors have
  our layout as they are: unlike the base weights (checkpoints/hf.py), nothing is transposed.
- adapter_config.json says fan_in_fan_out=true, which PEFT forces for Conv1D targets (it warns and
  sets it when false). It describes the *base* weight's (in, out) layout, so PEFT transposes
  B @ A when merging; the stored tensors and the forward pass B(A(x)) do not depend on it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .atomic import write_atomically
from .checkpoints.hf import key_listing
from .checkpoints.weights import iter_tensors, read_json, save_safetensors
from .config import TARGETS, LoraConfig, ModelConfig
from .errors import CheckpointError, OptionError
from .model import GPT

# Suffixes of the Linear modules inside each block; "c_proj" names both attn.c_proj and mlp.c_proj.
PREFIX = "base_model.model."  # PEFT's path to the wrapped model inside a PeftModel
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILES = ("adapter_model.safetensors", "adapter_model.bin")  # the .bin from PEFT < 0.7
# PEFT options that change what an adapter computes, with the value plain LoRA has: written
# as is, and refused when a file sets anything else (it would load silently wrong).
PLAIN_LORA = {"use_dora": False, "use_rslora": False, "bias": "none", "lora_bias": False,
              "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {},
              "alpha_pattern": {}}
# Newer PEFT options of the same kind, refused when set but not written (older PEFT lacks them).
REFUSED = {**PLAIN_LORA, "exclude_modules": None, "layer_replication": None, "target_parameters": None,
           "trainable_token_indices": None, "alora_invocation_tokens": None}


class LoraLinear(nn.Module):
    """`base_layer(x) + (alpha / r) * lora_B(lora_A(dropout(x)))`, the base frozen.

    B starts at zero, so the wrapped layer starts out computing exactly what the base did. The
    adapter is kept in float32 over a bfloat16/float16 base (as PEFT does): its small updates
    would round away in 8 mantissa bits.
    """

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base_layer = base_layer
        self.scaling = alpha / rank
        w = base_layer.weight
        dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(base_layer.in_features, rank, bias=False, device=w.device, dtype=dtype)
        self.lora_B = nn.Linear(rank, base_layer.out_features, bias=False, device=w.device, dtype=dtype)
        # nn.Linear's own init for A, zeros for B: the reference code (microsoft/LoRA loralib) and PEFT.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # (r, in)
        nn.init.zeros_(self.lora_B.weight)  # (out, r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        base = self.base_layer(x)  # under autocast, in its dtype (bfloat16), not x's
        return base + (update * self.scaling).to(base.dtype)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base layer with the update folded into its weight: W + (alpha / r) * B @ A, (out, in)."""
        w = self.base_layer.weight
        acc = torch.promote_types(w.dtype, torch.float32)  # no rounding before the sum in bf16
        delta = (self.lora_B.weight.to(acc) @ self.lora_A.weight.to(acc)) * self.scaling
        w.copy_((w.to(acc) + delta).to(w.dtype))
        return self.base_layer


# ---- applying, merging ---------------------------------------------------------------------

def apply_lora(model: GPT, cfg: LoraConfig) -> GPT:
    """Freeze every parameter of `model` and wrap each targeted nn.Linear in a LoraLinear.

    Apply LoRA before kernels.packed_linear.prepare_for_inference (which packs the linear layers); to run a
    trained adapter fast, merge_lora first.
    """
    linears = _targeted(model, cfg.targets)
    model.requires_grad_(False)
    for name, linear in linears.items():
        parent, child = _parent(model, name)
        layer = LoraLinear(linear, cfg.rank, cfg.alpha, cfg.dropout)
        setattr(parent, child, layer.train(model.training))  # no dropout in an eval-mode model
    return model


def merge_lora(model: GPT) -> GPT:
    """Fold every adapter into its base weight and put the plain nn.Linear back: the result is an
    ordinary GPT (save_hf exports it). Parameters stay frozen, as PEFT's merge_and_unload leaves
    them; call `model.requires_grad_(True)` to train the whole model."""
    for name, layer in _lora_layers(model).items():
        parent, child = _parent(model, name)
        setattr(parent, child, layer.merged())
    return model


@dataclass(frozen=True)
class ParameterCount:
    """A model's parameters, counted one way everywhere (`gpt2kit info`, the fine-tuning
    summary): each tensor once, so the tied embedding / LM head counts once, as transformers'
    `num_parameters()` counts it; LoRA adapters apart from the model they adapt."""

    model: int  # the GPT-2's own
    adapters: int  # LoRA's A and B matrices
    trainable: int  # those that require a gradient

    @property
    def total(self) -> int:
        return self.model + self.adapters


def count_parameters(model: nn.Module) -> ParameterCount:
    adapters = {id(w) for m in model.modules() if isinstance(m, LoraLinear)
                for w in (m.lora_A.weight, m.lora_B.weight)}
    params = list(model.parameters())  # each shared tensor once
    n_adapters = sum(p.numel() for p in params if id(p) in adapters)
    return ParameterCount(model=sum(p.numel() for p in params) - n_adapters, adapters=n_adapters,
                          trainable=sum(p.numel() for p in params if p.requires_grad))


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def _targeted(model: GPT, targets: tuple[str, ...]) -> dict[str, nn.Linear]:
    if any(isinstance(m, LoraLinear) for m in model.modules()):
        raise OptionError("lora", "is already applied to this model; merge_lora() it first or "
                          "start from a fresh model")
    found = {name: m for name, m in model.named_modules()
             if type(m) is nn.Linear and _matches(name, targets)}
    if not found:
        raise OptionError("lora_targets", f"{', '.join(targets)} match no nn.Linear of this model (was "
                          "it prepared for inference? apply LoRA before kernels.packed_linear.prepare_for_inference)")
    return found


def _lora_layers(model: GPT) -> dict[str, LoraLinear]:
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}
    if not layers:
        raise OptionError("lora", "is not applied to this model: call apply_lora() or load_adapter() first")
    return layers


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, child = name.rpartition(".")
    return model.get_submodule(parent), child


# ---- PEFT files ----------------------------------------------------------------------------

def lora_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The adapter tensors only, under PEFT's names, as CPU copies (safe to write or keep)."""
    return {PREFIX + key: tensor.detach().cpu().clone().contiguous()
            for key, tensor in model.state_dict().items()
            if key.endswith((".lora_A.weight", ".lora_B.weight"))}


def peft_config(cfg: LoraConfig, base: str) -> dict:
    """adapter_config.json as PEFT writes it for a GPT-2 LoRA (fan_in_fan_out: see the module doc)."""
    alpha = int(cfg.alpha) if cfg.alpha.is_integer() else cfg.alpha
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
            "r": cfg.rank, "lora_alpha": alpha, "lora_dropout": cfg.dropout,
            "target_modules": list(cfg.targets), "fan_in_fan_out": True,
            "init_lora_weights": True, "inference_mode": True, "revision": None, **PLAIN_LORA}


def save_adapter(model: GPT, cfg: LoraConfig, folder: str | Path, base: str) -> None:
    """Write adapter_model.safetensors and adapter_config.json into `folder`; `base` is the model
    the adapter was trained on (a hub id or path), recorded for PEFT. Each file is replaced
    atomically, so an interrupted save never leaves half a file."""
    _check_matches(model, cfg)
    folder = Path(folder).expanduser()
    state = lora_state_dict(model)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_atomically(folder / WEIGHTS_FILES[0], lambda p: save_safetensors(state, p))
        text = json.dumps(peft_config(cfg, base), indent=2, sort_keys=True) + "\n"
        write_atomically(folder / CONFIG_FILE, lambda p: p.write_text(text))
    except OSError as e:
        raise CheckpointError(f"could not save the adapter to {folder}: {e.strerror or e}") from None


def load_adapter(model: GPT, folder: str | Path) -> GPT:
    """Apply the LoRA adapter saved in `folder` (ours or PEFT's) to `model` and return it.

    The files are checked before the model is touched: a bad adapter leaves `model` as it was.
    """
    folder = Path(folder).expanduser()
    cfg = read_adapter_config(folder / CONFIG_FILE)
    try:
        linears = _targeted(model, cfg.targets)
    except OptionError as e:
        raise CheckpointError(f"the adapter in {folder} does not fit this model: {e}") from None
    state = _read_adapter_weights(folder, linears, cfg.rank)
    apply_lora(model, cfg)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, tensor in state.items():
            params[key].copy_(tensor)
    return model


def read_adapter(folder: str | Path, config: ModelConfig) -> tuple[LoraConfig, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """An adapter's config and, by module name (`transformer.h.0.attn.c_attn`), its A (r, in) and
    B (out, r), every name and shape checked against a model of `config`: for serving several
    adapters over one base (inference/adapters.py), whose linears may already be packed."""
    folder = Path(folder).expanduser()
    cfg = read_adapter_config(folder / CONFIG_FILE)
    with torch.device("meta"):  # the model's linears' shapes, without weights
        skeleton = GPT(config)
    state = _read_adapter_weights(folder, _targeted(skeleton, cfg.targets), cfg.rank)
    names = {key.rsplit(".", 2)[0] for key in state}
    return cfg, {name: (state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"]) for name in sorted(names)}


def read_adapter_config(path: Path) -> LoraConfig:
    """LoraConfig from PEFT's adapter_config.json, refusing any LoRA variant gpt2kit does not run."""
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} is truncated or corrupt (expected a JSON object)")
    if raw.get("peft_type") != "LORA":
        raise CheckpointError(f"{path} describes a {raw.get('peft_type')!r} adapter; gpt2kit loads "
                              "only LoRA adapters (peft_type \"LORA\")")
    for option, plain in REFUSED.items():
        if raw.get(option) and raw[option] != plain:
            raise CheckpointError(f"{path} sets {option}={json.dumps(raw[option])}, a LoRA variant "
                                  f"gpt2kit does not implement (it needs {json.dumps(plain)})")
    targets = raw.get("target_modules") or ("c_attn",)  # PEFT's default for GPT-2
    if isinstance(targets, str):
        raise CheckpointError(f"{path} gives target_modules as a pattern ({targets!r}); gpt2kit "
                              f"needs a list of names among {', '.join(TARGETS)}")
    try:
        return LoraConfig(rank=raw.get("r", 8), alpha=raw.get("lora_alpha", 8),
                          dropout=raw.get("lora_dropout", 0.0), targets=tuple(targets))
    except (OptionError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def _read_adapter_weights(folder: Path, linears: dict[str, nn.Linear], rank: int) -> dict[str, torch.Tensor]:
    """The adapter tensors under our parameter names, every name and shape checked."""
    path = next((folder / n for n in WEIGHTS_FILES if (folder / n).is_file()), None)
    if path is None:
        raise CheckpointError(f"no adapter weights in {folder}: looked for {', '.join(WEIGHTS_FILES)}")
    expected = {}
    for name, linear in linears.items():
        expected[f"{PREFIX}{name}.lora_A.weight"] = (rank, linear.in_features)
        expected[f"{PREFIX}{name}.lora_B.weight"] = (linear.out_features, rank)
    state, unexpected = {}, []
    for key, tensor in iter_tensors([path]):
        if key not in expected:
            unexpected.append(key)
        elif tuple(tensor.shape) != expected[key]:
            raise CheckpointError(f"{key} in {path} has shape {tuple(tensor.shape)} but a rank-{rank} "
                                  f"adapter of this model needs {expected[key]}")
        else:
            state[key.removeprefix(PREFIX)] = tensor
    missing = sorted(k for k in expected if k.removeprefix(PREFIX) not in state)
    if missing or unexpected:
        raise CheckpointError(f"the adapter in {path} does not match its config ({CONFIG_FILE}): "
                              f"missing {key_listing(missing)}; unexpected {key_listing(unexpected)}")
    return state


def _check_matches(model: GPT, cfg: LoraConfig) -> None:
    """The adapters in `model` are the ones `cfg` describes, so the saved config tells the truth."""
    layers = _lora_layers(model)
    wanted = {name for name, m in model.named_modules()
              if _matches(name, cfg.targets) and isinstance(m, (nn.Linear, LoraLinear))}
    ranks = {layer.lora_A.out_features for layer in layers.values()}
    scalings = {layer.scaling for layer in layers.values()}
    if set(layers) != wanted or ranks != {cfg.rank} or scalings != {cfg.alpha / cfg.rank}:
        raise OptionError("lora", f"config (rank {cfg.rank}, alpha {cfg.alpha}, targets "
                          f"{', '.join(cfg.targets)}) is not the one the model's adapters were "
                          "made with; pass the LoraConfig given to apply_lora()")


