"""The Hugging Face layout: config.json + model.safetensors (or pytorch_model.bin, or shards).

Our parameter names are Hugging Face's (`transformer.h.{i}.attn.c_attn.weight`, ...), so import and
export are the same keys plus a transpose of the four Conv1D weights, which Hugging Face stores
as (in, out) while our nn.Linear holds (out, in). The original openai-community/gpt2 file has no
`transformer.` prefix; save_pretrained output has it; both load.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from ..atomic import atomic_folder
from ..config import PRESETS, ModelConfig
from ..errors import CheckpointError, OptionError
from ..model import GPT
from .weights import (
    TORCH_SUFFIXES,
    describe_dtypes,
    find_weights,
    iter_tensors,
    printable,
    read_json,
    read_shapes,
    save_safetensors,
    weight_files,
)

# Hugging Face's Conv1D keeps these weights as (in, out): transposed on import and on export.
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Causal-mask buffers that older transformers versions saved with the weights: not parameters.
MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")
LAYER = re.compile(r"transformer\.h\.(\d+)\.")
TIED = "lm_head.weight"  # tied to transformer.wte.weight: optional on import, omitted on export


@dataclass(frozen=True)
class Layout:
    """How a checkpoint format stores one of our tensors: shapes are checked in the file's layout
    (so errors show what the file holds), then the tensor is turned into ours (a view, no copy)."""

    file_shape: Callable[[tuple[int, ...]], tuple[int, ...]]  # our shape -> the file's
    to_ours: Callable[[torch.Tensor], torch.Tensor]


AS_IS = Layout(lambda shape: shape, lambda t: t)
TRANSPOSED = Layout(lambda shape: shape[::-1], lambda t: t.t())  # Hugging Face's Conv1D: (in, out)
# One checkpoint tensor: (its name in the file, our key or None to skip it, the tensor, its layout).
Named = tuple[str, "str | None", torch.Tensor, Layout]

# config.json options that change the architecture, with the value GPT-2 itself uses.
FIXED_OPTIONS = {
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "scale_attn_weights": True,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
}
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # both are the tanh approximation our MLP uses
EOT = 50256  # <|endoftext|>, GPT-2's bos and eos token
log = logging.getLogger("gpt2kit.checkpoints")


# ---- config.json ---------------------------------------------------------------------------

def read_config(path: Path, sizes: "WeightSizes | None" = None) -> ModelConfig:
    """ModelConfig from a Hugging Face config.json, refusing anything that is not plain GPT-2, or
    (given `sizes`) anything its weights' shapes contradict."""
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} is truncated or corrupt (expected a JSON object)")
    model_type = raw.get("model_type")
    if model_type != "gpt2":
        raise CheckpointError(f"{path} describes a {model_type!r} model; gpt2kit loads only GPT-2 "
                              "checkpoints (model_type \"gpt2\")")
    for option, gpt2_value in FIXED_OPTIONS.items():
        if option in raw and raw[option] != gpt2_value:
            raise CheckpointError(f"{path} sets {option}={json.dumps(raw[option])}, a GPT-2 variant "
                                  f"gpt2kit does not implement (it needs {json.dumps(gpt2_value)})")
    activation = raw.get("activation_function", "gelu_new")
    if activation not in ACTIVATIONS:
        raise CheckpointError(f"{path} sets activation_function={activation!r}; gpt2kit implements "
                              f"only {' / '.join(ACTIVATIONS)} (the tanh GELU of GPT-2)")
    fields = {
        "vocab_size": raw.get("vocab_size", ModelConfig.vocab_size),
        "n_positions": raw.get("n_positions", raw.get("n_ctx", ModelConfig.n_positions)),
        "n_embd": raw.get("n_embd", ModelConfig.n_embd),
        "n_layer": raw.get("n_layer", ModelConfig.n_layer),
        "n_head": raw.get("n_head", ModelConfig.n_head),
        "layer_norm_epsilon": raw.get("layer_norm_epsilon", ModelConfig.layer_norm_epsilon),
        "dropout": raw.get("resid_pdrop", 0.1),  # transformers' default when absent
    }
    if sizes is not None:
        sizes.check(fields, f"{path} sets")
    cfg = make_config(fields, str(path))
    if raw.get("n_inner") not in (None, 4 * cfg.n_embd):
        raise CheckpointError(f"{path} sets n_inner={json.dumps(raw['n_inner'])}; gpt2kit's MLP is 4 * n_embd wide")
    return cfg


def make_config(fields: dict, source: str) -> ModelConfig:
    """ModelConfig(**fields) read from `source`; a bad value is a CheckpointError naming the source."""
    try:
        return ModelConfig(**fields)
    except (OptionError, TypeError) as e:
        raise CheckpointError(f"{source}: {e}") from None


@dataclass(frozen=True)
class WeightSizes:
    """The config's sizes as a checkpoint's own tensor shapes show them (safetensors header, shard
    index, pickle metadata, TensorFlow index), read before any module is described: a config that
    disagrees fails in one line instead of building a model of 100,000 layers first."""

    where: Path
    found: dict[str, tuple[int, str]]  # config field -> (its size in the weights, what shows it)

    @classmethod
    def of(cls, shapes: dict[str, tuple[int, ...]], key_of: Callable[[str], str | None],
           where: Path) -> "WeightSizes":
        """From every tensor's name and shape in the file; `key_of` maps a name to our key."""
        ours = {key: (name, tuple(shape)) for name, shape in shapes.items() if (key := key_of(name))}
        found: dict[str, tuple[int, str]] = {}
        for key, names in (("transformer.wte.weight", ("vocab_size", "n_embd")),
                           ("transformer.wpe.weight", ("n_positions",))):
            name, shape = ours.get(key, (key, ()))
            if len(shape) == 2:  # any other shape is refused by build_model, naming the tensor
                found |= {field: (size, f"{printable(name)} in {where} has shape {shape}") for field, size in zip(names, shape)}
        blocks = sorted({int(m[1]) for key in ours if (m := LAYER.match(key))})
        if blocks:
            found["n_layer"] = (len(blocks), f"the weights in {where} hold {len(blocks)} blocks "
                                f"(h.{blocks[0]} to h.{blocks[-1]})")
        return cls(where, found)

    def check(self, fields: dict, sets: str, names: dict[str, str] | None = None) -> None:
        """Refuse an integer in `fields` (our field names; `names` gives the file's own) that the
        weights contradict. Other values are left to ModelConfig's checks."""
        for field, (size, shown) in self.found.items():
            value = fields.get(field)
            if isinstance(value, int) and not isinstance(value, bool) and value != size:
                raise CheckpointError(f"{sets} {(names or {}).get(field, field)}={value} but {shown}")


def infer_config(sizes: WeightSizes) -> ModelConfig:
    """The shape of a lone weights file without config.json, from its tensors' shapes.

    The head count is not visible in the weights; it is taken from the released sizes (PRESETS)
    when the width names exactly one of them.
    """
    found = {field: size for field, (size, _) in sizes.found.items()}
    if len(found) < 4:
        raise CheckpointError(f"{sizes.where} has no GPT-2 embeddings (wte, wpe) or blocks (h.0, ...); "
                              "is it a GPT-2 checkpoint?")
    heads = {p["n_head"] for p in PRESETS.values() if p["n_embd"] == found["n_embd"]}
    if len(heads) != 1:
        raise CheckpointError(f"cannot tell the number of attention heads of {sizes.where} from its weights "
                              f"(n_embd={found['n_embd']} is not a released GPT-2 width); put the model's "
                              "config.json beside it")
    return make_config(found | {"n_head": heads.pop(), "dropout": 0.0}, str(sizes.where))


def hf_config(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    """config.json for `cfg`, as transformers' GPT2Config writes it."""
    eot = _eot(cfg)
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.n_positions, "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": None,
        "layer_norm_epsilon": cfg.layer_norm_epsilon, "activation_function": "gelu_new",
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "initializer_range": 0.02, "bos_token_id": eot, "eos_token_id": eot,
        "tie_word_embeddings": True, "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
    }


def _eot(cfg: ModelConfig) -> int | None:
    """<|endoftext|>, unless the vocabulary is too small to hold it (a custom tokenizer)."""
    return EOT if cfg.vocab_size > EOT else None


# ---- weights -------------------------------------------------------------------------------

def our_key(name: str) -> str | None:
    """Our parameter name for a checkpoint key, or None for a mask buffer to skip."""
    if name.endswith(MASK_BUFFERS):
        return None
    return name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name


def load_checkpoint(path: Path, device: torch.device, dtype: torch.dtype) -> tuple[GPT, Path, str]:
    """A model folder or a single weights file -> (model in eval mode, weights file read, stored dtype)."""
    if path.is_dir():
        weights = find_weights(path)
    elif path.name.endswith(".index.json") or path.suffix in (".safetensors", *TORCH_SUFFIXES):
        weights = path
    else:
        raise CheckpointError(f"{path} is not a weights file gpt2kit can read: expected a model "
                              "folder, a .safetensors or a .bin file")
    files = weight_files(weights)
    sizes = WeightSizes.of(read_shapes(files), our_key, weights)
    config_path = weights.parent / "config.json"
    # A lone weights file: its shape from its tensors.
    cfg = read_config(config_path, sizes) if config_path.is_file() else infer_config(sizes)
    model, stored = build_model(cfg, hf_tensors(files), files[0].parent, device, dtype)
    return model, weights, stored


def hf_tensors(files: list[Path]) -> Iterator[Named]:
    for name, tensor in iter_tensors(files):
        key = our_key(name)
        yield name, key, tensor, TRANSPOSED if key and key.endswith(CONV1D) else AS_IS


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our state dict's keys and shapes for `cfg`, from a model on the meta device (no memory)."""
    return {k: tuple(v.shape) for k, v in meta_model(cfg).state_dict().items()}


def meta_model(cfg: ModelConfig) -> GPT:
    """GPT(cfg) on the meta device: shapes only, no memory, no initialisation."""
    with torch.device("meta"), _SkipInit():
        return GPT(cfg)


class _SkipInit(torch.overrides.TorchFunctionMode):
    """Skips `torch.nn.init` calls (the modules' own reset_parameters). On a meta tensor there is
    nothing to initialise, and nn.Embedding's `normal_` there runs torch's Python reference
    implementation, whose first call imports torch._dynamo: ~1 s of every cold start."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def build_model(cfg: ModelConfig, tensors: Iterable[Named], where: Path, device: torch.device,
                dtype: torch.dtype) -> tuple[GPT, str]:
    """GPT(cfg) holding `tensors` (from any format's reader), checked key by key and shape by shape.

    The model is built on the meta device (no memory, no random init) and each tensor is
    converted to its final dtype and device as it is read, then assigned: the weights are never
    held twice.
    """
    model = meta_model(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    stored: set[torch.dtype] = set()
    for name, key, tensor, layout in tensors:
        if key is None:
            continue
        if key not in expected:
            unexpected.append(name)
            continue
        want = layout.file_shape(expected[key])
        if tuple(tensor.shape) != want:
            raise CheckpointError(f"{printable(name)} in {where} has shape {tuple(tensor.shape)} but "
                                  f"this GPT-2 ({cfg.n_layer} layers, n_embd={cfg.n_embd}, "
                                  f"vocab {cfg.vocab_size}) needs {want}")
        if not tensor.dtype.is_floating_point:
            raise CheckpointError(f"{printable(name)} in {where} holds {str(tensor.dtype).removeprefix('torch.')} "
                                  "values; GPT-2's weights are floating point: is this the right file?")
        stored.add(tensor.dtype)
        if key == TIED:
            continue  # the head is the embedding (tied), as in the released models
        # Always a copy: safetensors hands out views of the memory-mapped file, which would keep
        # every page read resident a second time and crash (SIGBUS) if the file were rewritten
        # while the model is in use. (Packing straight from the file's tensors instead saved only
        # ~0.1 s of the 124M cold start: oneDNN packs a transposed view slower.)
        state[key] = layout.to_ours(tensor).to(device=device, dtype=dtype, copy=True,
                                               memory_format=torch.contiguous_format)
    missing = sorted(set(expected) - set(state) - {TIED})
    if missing or unexpected:
        raise CheckpointError(f"the weights in {where} do not match GPT-2 "
                              f"({cfg.n_layer} layers): missing {key_listing(missing)}; "
                              f"unexpected {key_listing(unexpected)}")
    result = model.load_state_dict(state, strict=False, assign=True)
    assert result.missing_keys == [TIED] and not result.unexpected_keys, result
    model.tie_weights()
    warn_non_finite(state, where)
    return model.eval(), describe_dtypes(stored)


def warn_non_finite(state: dict[str, torch.Tensor], where: Path) -> None:
    """Say (once, on the `gpt2kit` logger) how many tensors hold NaN or infinity: such weights
    load and run, but generate nothing meaningful (a diverged run, a bad conversion)."""
    # One foreach L2 norm over all the weights is finite whenever every element is: ~0.1 s for
    # the 124M model even on a busy machine, where ~150 separate reductions each wait for the
    # thread pool (0.1-0.8 s). Only a norm that is not finite (or overflowed) has each tensor looked at.
    if torch.isfinite(torch.nn.utils.get_total_norm(list(state.values()), 2.0, foreach=True)):
        return
    bad = [key for key, tensor in state.items() if not torch.isfinite(tensor).all()]
    if bad:
        log.warning("%d of the %d weight tensors in %s hold NaN or infinite values (%s); the model "
                    "will not generate meaningful text", len(bad), len(state), where, key_listing(bad, 3))


def key_listing(keys: list[str], limit: int = 8) -> str:
    if not keys:
        return "none"
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(map(printable, keys[:limit])) + more


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under Hugging Face names and layouts, on the CPU, contiguous, head omitted."""
    state = {}
    for key, tensor in model.state_dict().items():
        if key == TIED:
            continue  # shares wte's storage, which safetensors refuses to write twice
        tensor = tensor.detach()
        state[key] = (tensor.t() if key.endswith(CONV1D) else tensor).contiguous().cpu()
    return state


# ---- export --------------------------------------------------------------------------------

def save_hf(model: GPT, folder: str | Path, *, tokenizer=None,
            generation_config: dict | None = None) -> Path:
    """Write `model` as a Hugging Face folder (config.json, model.safetensors,
    generation_config.json, and the tokenizer's files when `tokenizer` is given) that
    transformers' GPT2LMHeadModel.from_pretrained loads.

    Atomic (atomic.atomic_folder): everything is written into a hidden folder beside `folder` and
    renamed into place at the end, so an interrupted save leaves the previous folder (or none),
    never half of one.
    """
    final = Path(folder).expanduser().absolute()
    _check_replaceable(final)
    dtype = next(model.parameters()).dtype
    eot = _eot(model.config)
    try:
        with atomic_folder(final) as tmp:
            _write_json(tmp / "config.json", hf_config(model.config, dtype))
            save_safetensors(hf_state_dict(model), tmp / "model.safetensors")
            _write_json(tmp / "generation_config.json",
                        {"bos_token_id": eot, "eos_token_id": eot, **(generation_config or {})})
            if tokenizer is not None:
                tokenizer.save(tmp)
    except OSError as e:
        raise CheckpointError(f"could not save the model to {final}: {e.strerror or e}") from None
    return final


def _check_replaceable(final: Path) -> None:
    if final.exists() and not final.is_dir():
        raise CheckpointError(f"cannot save the model to {final}: it is a file")
    if final.is_dir() and any(final.iterdir()) and not (final / "config.json").is_file():
        raise CheckpointError(f"cannot save the model to {final}: the folder holds other files and "
                              "no config.json; choose a new or empty folder")


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
