"""Checkpoint loading and export against transformers on tiny random GPT-2s, and every bad input
of hostile input: missing paths, corrupt files, pickle payloads, shard paths leaving the folder."""

from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch
from helpers_checkpoints import (
    CPU,
    Payload,
    edit_config,
    hf_logits,
    our_logits,
    save_bin,
    save_original_layout,
    save_sharded_bin,
    tiny_hf,
    write_index,
)

from gpt2kit.checkpoints import LoadedModel, hf, hub, load_model, save_hf
from gpt2kit.checkpoints.resolve import resolve_spec
from gpt2kit.config import ModelConfig
from gpt2kit.errors import CheckpointError
from gpt2kit.model import GPT

TOL = 1e-4


@pytest.fixture(scope="module")
def ref():
    return tiny_hf()


@pytest.fixture(scope="module")
def ref_logits(ref):
    return hf_logits(ref)


@pytest.fixture(scope="module")
def st_folder(ref, tmp_path_factory):
    folder = tmp_path_factory.mktemp("safetensors")
    ref.save_pretrained(folder)
    return folder


@pytest.fixture
def copy_of(st_folder, tmp_path):
    """A private copy of the safetensors folder, to damage."""
    import shutil
    return shutil.copytree(st_folder, tmp_path / "model")


@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    """Local specs must never reach the hub code."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"hub.download called with {args}")
    monkeypatch.setattr(hub, "download", refuse)


def load(spec, dtype=torch.float32, **kw) -> LoadedModel:
    return load_model(str(spec), CPU, dtype, **kw)


def error(spec, **kw) -> str:
    with pytest.raises(CheckpointError) as info:
        load(spec, **kw)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# ---- loading: every layout gives transformers' logits ----------------------------------------

def test_safetensors_folder(st_folder, ref_logits):
    loaded = load(st_folder)
    assert (our_logits(loaded.model) - ref_logits).abs().max() < TOL
    assert loaded.folder == st_folder
    assert loaded.source == f"folder: {st_folder} (model.safetensors)"
    assert loaded.weights_file == str(st_folder / "model.safetensors")
    assert loaded.weights_dtype == "float32"
    assert loaded.config == ModelConfig(vocab_size=128, n_positions=64, n_embd=32, n_layer=2,
                                        n_head=2, dropout=0.1)


def test_loaded_model_is_tied_eval_and_materialised(st_folder):
    model = load(st_folder, dtype=torch.bfloat16).model
    assert not model.training
    assert model.lm_head.weight is model.transformer.wte.weight
    params = list(model.parameters())
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in params)
    assert all(p.is_contiguous() for p in params)


def test_weights_are_assigned_not_initialised(st_folder, ref_logits, monkeypatch):
    """The model is built on the meta device: no random init, no second copy of the weights."""
    def no_init(module):
        raise AssertionError("random initialisation ran while loading")
    monkeypatch.setattr(GPT, "_init_weights", staticmethod(no_init))
    assert (our_logits(load(st_folder).model) - ref_logits).abs().max() < TOL


def test_loaded_model_survives_its_file_being_rewritten(copy_of):
    """No tensor stays a view of the memory-mapped safetensors file: truncating the file (a new
    checkpoint written over it) while the model is in use would otherwise kill the process with
    SIGBUS. Run in a subprocess, so a failure is an exit code rather than a dead test runner."""
    import subprocess
    import sys
    folder = copy_of
    script = (f"import torch\nfrom gpt2kit.checkpoints import load_model\n"
              f"m = load_model({str(folder)!r}, torch.device('cpu'), torch.float32).model\n"
              f"open({str(folder / 'model.safetensors')!r}, 'wb').close()\n"
              f"with torch.no_grad():\n    print(m(torch.tensor([[1, 2, 3]])).sum().item())\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-500:])


def test_bin_folder(ref, ref_logits, tmp_path):
    folder = save_bin(ref, tmp_path / "bin")
    loaded = load(folder)
    assert (our_logits(loaded.model) - ref_logits).abs().max() < TOL
    assert loaded.weights_file.endswith("pytorch_model.bin")


def test_sharded_safetensors(ref, ref_logits, tmp_path):
    ref.save_pretrained(tmp_path, max_shard_size="40KB")
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    loaded = load(tmp_path)
    assert (our_logits(loaded.model) - ref_logits).abs().max() < TOL
    assert loaded.weights_file.endswith("model.safetensors.index.json")


def test_sharded_bin(ref, ref_logits, tmp_path):
    folder = save_sharded_bin(ref, tmp_path / "sharded")
    assert (our_logits(load(folder).model) - ref_logits).abs().max() < TOL


def test_original_layout_without_prefix_head_or_buffers(ref, ref_logits, tmp_path):
    folder = save_original_layout(ref, tmp_path / "orig")
    assert (our_logits(load(folder).model) - ref_logits).abs().max() < TOL


def test_half_precision_file(ref, ref_logits, tmp_path):
    ref.half().save_pretrained(tmp_path)
    ref.float()
    loaded = load(tmp_path)
    assert loaded.weights_dtype == "float16"
    assert next(loaded.model.parameters()).dtype == torch.float32
    assert (our_logits(loaded.model) - ref_logits).abs().max() < 2e-2  # fp16 rounding of the weights


def test_single_file_uses_config_beside_it(st_folder, ref_logits):
    loaded = load(st_folder / "model.safetensors")
    assert loaded.source == f"file: {st_folder / 'model.safetensors'}"
    assert loaded.folder == st_folder
    assert (our_logits(loaded.model) - ref_logits).abs().max() < TOL


def test_single_file_shape_inferred_from_a_released_width(tmp_path):
    wide = tiny_hf(n_layer=1, n_head=4, n_embd=256, n_positions=16)  # the "tiny" preset's width
    save_bin(wide, tmp_path)
    (tmp_path / "config.json").unlink()
    loaded = load(tmp_path / "pytorch_model.bin")
    assert (loaded.config.n_head, loaded.config.n_layer, loaded.config.n_positions) == (4, 1, 16)
    assert (our_logits(loaded.model) - hf_logits(wide)).abs().max() < TOL


def test_single_file_of_unknown_width_asks_for_config(copy_of):
    (copy_of / "config.json").unlink()
    message = error(copy_of / "model.safetensors")
    assert "n_embd=32" in message and "config.json" in message


def test_safetensors_preferred_over_bin(copy_of, ref_logits, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"x": Payload(marker)}, copy_of / "pytorch_model.bin")
    loaded = load(copy_of)
    assert loaded.weights_file.endswith("model.safetensors")
    assert (our_logits(loaded.model) - ref_logits).abs().max() < TOL
    assert not marker.exists()


# ---- export ----------------------------------------------------------------------------------

class FakeTokenizer:
    def save(self, folder):
        (folder / "vocab.json").write_text("{}")


def test_save_hf_round_trip_through_transformers(st_folder, ref_logits, tmp_path):
    import transformers
    model = load(st_folder).model
    out = save_hf(model, tmp_path / "export", tokenizer=FakeTokenizer(),
                  generation_config={"max_new_tokens": 20})
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "vocab.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    assert json.loads((out / "generation_config.json").read_text())["max_new_tokens"] == 20
    theirs = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    assert (hf_logits(theirs) - ref_logits).abs().max() < TOL
    assert torch.equal(our_logits(load(out).model), our_logits(model))


def test_save_hf_full_vocab_config_and_bfloat16(tmp_path):
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=32, n_positions=16)
    model = GPT(cfg).to(torch.bfloat16)
    out = save_hf(model, tmp_path / "bf16")
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["dtype"]) == (50256, 50256, "bfloat16")
    loaded = load(out, dtype=torch.bfloat16)
    assert loaded.weights_dtype == "bfloat16"
    for (k, a), b in zip(model.state_dict().items(), loaded.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_save_hf_is_atomic(st_folder, tmp_path, monkeypatch):
    model = load(st_folder).model
    target = save_hf(model, tmp_path / "model")
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def crash(*args, **kwargs):
        raise RuntimeError("killed mid-write")
    monkeypatch.setattr(hf, "save_safetensors", crash)
    with pytest.raises(RuntimeError):
        save_hf(model, tmp_path / "model")
    with pytest.raises(RuntimeError):
        save_hf(model, tmp_path / "fresh")
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before  # old model intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # nothing partial left


def test_save_hf_replaces_a_model_but_not_other_folders(st_folder, tmp_path):
    model = load(st_folder).model
    save_hf(model, tmp_path / "m")
    (tmp_path / "m" / "stale.txt").write_text("old")
    save_hf(model, tmp_path / "m")
    assert not (tmp_path / "m" / "stale.txt").exists()
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="holds other files"):
        save_hf(model, tmp_path / "docs")
    assert (tmp_path / "docs" / "notes.txt").read_text() == "mine"


# ---- bad inputs: C4 missing, C5 pickles, C6 corrupt, C7 traversal, wrong architecture ----------

@pytest.mark.parametrize("spec", ["./no-such-dir", "/no/such/model", "~/no-such-model",
                                  "models/a/b", "weights.safetensors", "ckpt.bin", "model.pt"])
def test_path_like_spec_that_does_not_exist(spec):
    message = error(spec)
    assert message.startswith(f"no such file or folder: {spec}")
    assert "model.safetensors" in message and "pytorch_model.bin" in message


@pytest.mark.parametrize("spec", ["gpt2", "distilgpt2", "openai-community/gpt2-large",
                                  "user/my-finetune"])
def test_hub_ids(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_spec(spec) == spec


def test_existing_relative_folder_is_a_path_not_a_hub_id(st_folder, tmp_path, monkeypatch):
    import shutil
    shutil.copytree(st_folder, tmp_path / "gpt2")
    monkeypatch.chdir(tmp_path)
    assert resolve_spec("gpt2") == tmp_path / "gpt2"
    assert load("gpt2").folder == tmp_path / "gpt2"


def test_folder_without_weights(tmp_path):
    message = error(tmp_path)
    assert str(tmp_path) in message
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json"):
        assert name in message


def test_revision_only_for_hub_ids(st_folder):
    assert "revision" in error(st_folder, revision="main")


def test_other_architecture(copy_of):
    edit_config(copy_of, model_type="llama")
    message = error(copy_of)
    assert "'llama'" in message and "GPT-2" in message


@pytest.mark.parametrize("option,value", [("scale_attn_by_inverse_layer_idx", True),
                                          ("reorder_and_upcast_attn", True),
                                          ("activation_function", "relu"),
                                          ("tie_word_embeddings", False)])
def test_unsupported_gpt2_options(copy_of, option, value):
    edit_config(copy_of, **{option: value})
    assert option in error(copy_of)


@pytest.mark.parametrize("changes,words", [({"n_embd": "32"}, "n_embd must be a positive integer"),
                                           ({"n_head": 5}, "divisible by n_head"),
                                           ({"layer_norm_epsilon": [1]}, "config.json"),
                                           ({"n_inner": 100}, "n_inner=100")])
def test_bad_config_values(copy_of, changes, words):
    edit_config(copy_of, **changes)
    assert words in error(copy_of)


def test_config_that_is_not_an_object(copy_of):
    (copy_of / "config.json").write_text("[1, 2]")
    assert "truncated or corrupt" in error(copy_of)


def test_config_that_is_not_json(copy_of):
    (copy_of / "config.json").write_text('{"model_type": "gpt2", ')
    assert error(copy_of).startswith(f"{copy_of / 'config.json'} is truncated or corrupt")


def test_truncated_safetensors(copy_of):
    path = copy_of / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert error(copy_of).startswith(f"{path} is truncated or corrupt (")


def test_safetensors_header_length_past_end_of_file(copy_of):
    path = copy_of / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(data) * 10) + data[8:])
    assert error(copy_of).startswith(f"{path} is truncated or corrupt (")


def test_truncated_bin(ref, tmp_path):
    folder = save_bin(ref, tmp_path / "bin")
    path = folder / "pytorch_model.bin"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    message = error(folder)
    assert message.startswith(f"{path} is truncated or corrupt (") and "central directory" not in message


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch, on the plain pickle
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_pickle_payload_is_refused_and_never_runs(ref, tmp_path, writer):
    folder = save_bin(ref, tmp_path / "evil")
    marker = tmp_path / "pwned"
    payload = {"transformer.wte.weight": torch.zeros(1), "x": Payload(marker)}
    if writer == "torch.save":
        torch.save(payload, folder / "pytorch_model.bin")
    else:
        with open(folder / "pytorch_model.bin", "wb") as f:
            pickle.dump(payload, f)
    message = error(folder)
    assert message == (f"unsafe or unsupported pickle content in {folder / 'pytorch_model.bin'}; "
                       "convert it to safetensors")
    assert not marker.exists()


@pytest.mark.parametrize("shard", ["../../etc/passwd", "/etc/passwd", "sub/../../x.safetensors",
                                   "..\\..\\x.safetensors", "C:/x.safetensors"])
def test_shard_paths_must_stay_inside_the_folder(ref, tmp_path, shard):
    ref.save_pretrained(tmp_path, max_shard_size="40KB")
    index = tmp_path / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    weight_map["transformer.wte.weight"] = shard
    write_index(index, weight_map)
    assert "outside the model folder" in error(tmp_path)


def test_missing_shard(ref, tmp_path):
    ref.save_pretrained(tmp_path, max_shard_size="40KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[0]
    victim.unlink()
    message = error(tmp_path)
    assert victim.name in message and "missing" in message


def test_config_against_the_weights_names_field_value_and_shape(copy_of):
    edit_config(copy_of, n_positions=128)
    assert error(copy_of) == (f"{copy_of / 'config.json'} sets n_positions=128 but transformer.wpe.weight "
                              f"in {copy_of / 'model.safetensors'} has shape (64, 32)")


def test_shape_mismatch_names_key_and_both_shapes(ref, tmp_path):
    from safetensors.torch import save_file
    state = {k: v.clone().contiguous() for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    state["transformer.ln_f.bias"] = torch.zeros(33)
    ref.config.save_pretrained(tmp_path)
    save_file(state, tmp_path / "model.safetensors")
    message = error(tmp_path)
    assert "transformer.ln_f.bias" in message and "(33,)" in message and "needs (32,)" in message


def test_conv1d_shape_is_checked_in_the_file_layout(ref, tmp_path):
    from safetensors.torch import save_file
    state = {k: v.clone().contiguous() for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    state["transformer.h.0.mlp.c_fc.weight"] = state["transformer.h.0.mlp.c_fc.weight"].t().contiguous()
    ref.config.save_pretrained(tmp_path)
    save_file(state, tmp_path / "model.safetensors")
    message = error(tmp_path)
    assert "transformer.h.0.mlp.c_fc.weight" in message and "(128, 32)" in message and "(32, 128)" in message


def test_missing_and_unexpected_keys_are_listed(ref, tmp_path):
    from safetensors.torch import save_file
    state = {k: v.clone().contiguous() for k, v in ref.state_dict().items()
             if k != "lm_head.weight" and not k.startswith("transformer.h.1.ln_2")}
    state["transformer.h.0.adapter.weight"] = torch.zeros(3)
    ref.config.save_pretrained(tmp_path)
    save_file(state, tmp_path / "model.safetensors")
    message = error(tmp_path)
    assert "transformer.h.1.ln_2.weight" in message and "transformer.h.1.ln_2.bias" in message
    assert "transformer.h.0.adapter.weight" in message


# ---- configs the weights contradict, weights that cannot be right (issues 17.1, 19.4) ---------

def write_layout(ref, folder, layout: str):
    """`ref` saved as one of the HF layouts; returns (folder, the weights file the loader names)."""
    if layout == "bin":
        return save_bin(ref, folder), folder / "pytorch_model.bin"
    if layout == "sharded":
        ref.save_pretrained(folder, max_shard_size="40KB")
        return folder, folder / "model.safetensors.index.json"
    ref.save_pretrained(folder)
    return folder, folder / "model.safetensors"


@pytest.mark.parametrize("layout", ["safetensors", "bin", "sharded"])
@pytest.mark.parametrize("field, value, shown", [
    ("n_layer", 100000, "the weights in {} hold 2 blocks (h.0 to h.1)"),
    ("n_embd", 10**9, "transformer.wte.weight in {} has shape (128, 32)"),
    ("vocab_size", 2**40, "transformer.wte.weight in {} has shape (128, 32)"),
    ("n_positions", 65, "transformer.wpe.weight in {} has shape (64, 32)"),
])
def test_config_contradicting_the_weights_fails_before_any_module(ref, tmp_path, monkeypatch, layout,
                                                                  field, value, shown):
    folder, weights = write_layout(ref, tmp_path / "m", layout)
    edit_config(folder, **{field: value})
    monkeypatch.setattr(hf, "meta_model", lambda cfg: pytest.fail(f"a model was described for {cfg}"))
    assert error(folder) == f"{folder / 'config.json'} sets {field}={value} but {shown.format(weights)}"


@pytest.mark.parametrize("field, value", [("n_layer", 1025), ("n_embd", 2**16 + 2), ("n_positions", 2**21),
                                          ("vocab_size", 2**25)])
def test_model_config_bounds(field, value):
    from gpt2kit.errors import OptionError
    with pytest.raises(OptionError, match=f"{field} must be at most"):
        ModelConfig(**{"n_embd": 64, "n_head": 2, field: value})


def test_bin_shapes_are_read_without_reading_the_tensors(tmp_path):
    """The pickle's metadata, with the tensors left mapped on disk: resident memory does not grow
    by the file's 64 MB."""
    from gpt2kit.checkpoints.weights import read_shapes
    path = tmp_path / "pytorch_model.bin"
    torch.save({"wte.weight": torch.ones(2**14, 2**10)}, path)

    def resident() -> int:
        return int(open("/proc/self/statm").read().split()[1]) * 4096

    before = resident()
    assert read_shapes([path]) == {"wte.weight": (2**14, 2**10)}
    assert resident() - before < 8 * 2**20


@pytest.mark.parametrize("value", ["nan", float("nan"), float("inf"), -1e-5, 0, "1e-5"])
def test_layer_norm_epsilon_must_be_a_positive_number(copy_of, value):
    edit_config(copy_of, layer_norm_epsilon=value)
    assert error(copy_of).startswith(f"{copy_of / 'config.json'}: layer_norm_epsilon must be")


def save_state(ref, folder, change) -> None:
    from safetensors.torch import save_file
    state = {k: v.clone().contiguous() for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    change(state)
    ref.config.save_pretrained(folder)
    save_file(state, folder / "model.safetensors")


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.uint8])
def test_non_floating_tensors_are_refused_by_name(ref, tmp_path, dtype):
    key = "transformer.h.1.ln_2.weight"
    save_state(ref, tmp_path, lambda s: s.update({key: s[key].to(dtype)}))
    name = str(dtype).removeprefix("torch.")
    assert error(tmp_path) == (f"{key} in {tmp_path} holds {name} values; GPT-2's weights are floating "
                               "point: is this the right file?")


def test_non_finite_weights_load_with_one_warning(ref, tmp_path, caplog):
    def poison(state):
        state["transformer.wte.weight"][3, 1] = float("inf")
        state["transformer.h.0.attn.c_attn.bias"][:] = float("nan")
        state["transformer.h.1.mlp.c_fc.weight"][:] = 3e38  # finite, but its sum overflows
    save_state(ref, tmp_path, poison)
    with caplog.at_level("WARNING", logger="gpt2kit"):
        load(tmp_path)
    assert [r.getMessage() for r in caplog.records] == [
        f"2 of the 28 weight tensors in {tmp_path} hold NaN or infinite values (transformer.h.0.attn.c_attn.bias, "
        "transformer.wte.weight); the model will not generate meaningful text"]


def test_finite_weights_load_without_a_warning(st_folder, caplog):
    with caplog.at_level("WARNING", logger="gpt2kit"):
        load(st_folder)
    assert not caplog.records


def test_cli_shows_the_non_finite_warning(tiny_folder, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    from gpt2kit.cli import main
    folder = shutil.copytree(tiny_folder, tmp_path / "nan")
    state = load_file(folder / "model.safetensors")
    save_file({k: torch.full_like(v, float("nan")) for k, v in state.items()}, folder / "model.safetensors")
    assert main(["info", str(folder)]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: 28 of the 28 weight tensors") and "NaN" in err


def test_names_from_the_file_cannot_break_the_one_line(ref, tmp_path):
    save_state(ref, tmp_path, lambda s: s.update({"transformer.h.0.x\nerror: forged": torch.zeros(1)}))
    assert "unexpected transformer.h.0.x\\nerror: forged" in error(tmp_path)
    edit_config(tmp_path, n_inner="7\nerror: forged")
    assert 'n_inner="7\\nerror: forged"' in error(tmp_path)


def test_lone_file_naming_too_many_blocks_is_refused_by_the_bounds(tmp_path, monkeypatch):
    """Without config.json the shape comes from the header alone: 1,025 one-number blocks ask for
    a model the bounds refuse before it is described."""
    from safetensors.torch import save_file
    state = {"wte.weight": torch.zeros(8, 768), "wpe.weight": torch.zeros(8, 768)}  # gpt2's width
    state |= {f"h.{i}.ln_1.weight": torch.zeros(1) for i in range(1025)}
    save_file(state, tmp_path / "lone.safetensors")
    monkeypatch.setattr(hf, "meta_model", lambda cfg: pytest.fail(f"a model was described for {cfg}"))
    assert error(tmp_path / "lone.safetensors") == (f"{tmp_path / 'lone.safetensors'}: n_layer must be at "
                                                    "most 1024, got 1025")
