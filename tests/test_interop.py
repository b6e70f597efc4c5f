"""Interop: OpenAI / gpt-2-simple TensorFlow checkpoints and nanoGPT ckpt.pt in; Hugging Face
folders and GGUF files out; `info` naming each format.

The TensorFlow fixture (tests/fixtures/tf-tiny) was written once by real TensorFlow
(scripts/make_tf_fixture.py); its expected logits come from transformers on the same arrays.
nanoGPT checkpoints are built here in nanoGPT's exact layout from a tiny transformers model.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_checkpoints import CPU, Payload, hf_logits, our_logits, save_nanogpt, tiny_hf

import gpt2kit
from gpt2kit.checkpoints import hf, hub, load_model
from gpt2kit.checkpoints.tensorflow import named_tensors, our_key, read_tokenizer
from gpt2kit.checkpoints.tf_bundle import read_bundle
from gpt2kit.cli import main
from gpt2kit.config import ModelConfig
from gpt2kit.convert import OutputError
from gpt2kit.errors import CheckpointError, OptionError

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "tf-tiny"
TOL = 1e-4


@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"hub.download called with {args}")
    monkeypatch.setattr(hub, "download", refuse)


@pytest.fixture
def tf_copy(tmp_path) -> Path:
    """A private copy of the TensorFlow fixture, to rename or damage."""
    return shutil.copytree(FIXTURE, tmp_path / "run1")


def expected() -> tuple[list[list[int]], torch.Tensor]:
    """The fixture's token ids (1, T) and transformers' logits for them (1, T, 512)."""
    data = np.load(FIXTURE / "expected_logits.npz")
    return [data["ids"].tolist()], torch.from_numpy(data["logits"])[None]


def tf_logits(spec) -> torch.Tensor:
    ids, _ = expected()
    return our_logits(load_model(str(spec), CPU, torch.float32).model, ids)


def error(spec) -> str:
    with pytest.raises(CheckpointError) as info:
        load_model(str(spec), CPU, torch.float32)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# ---- TensorFlow: OpenAI's release and gpt-2-simple runs ---------------------------------------

def test_gpt2_simple_run_gives_transformers_logits():
    loaded = load_model(str(FIXTURE), CPU, torch.float32)
    ids, want = expected()
    assert (our_logits(loaded.model, ids) - want).abs().max() < TOL
    assert loaded.format == "tensorflow (checkpoint model-1000)"
    assert loaded.weights_file == str(FIXTURE / "model-1000.index")
    assert loaded.weights_dtype == "float32"
    assert (loaded.config.vocab_size, loaded.config.n_positions, loaded.config.n_embd,
            loaded.config.n_layer, loaded.config.n_head) == (512, 64, 32, 2, 2)


def test_checkpoint_file_with_a_foreign_absolute_path(tf_copy):
    # gpt-2-simple on Colab records /content/checkpoint/run1/model-1000: found here by its name.
    (tf_copy / "checkpoint").write_text('model_checkpoint_path: "/content/checkpoint/run1/model-1000"\n'
                                        'all_model_checkpoint_paths: "/content/checkpoint/run1/model-1000"\n')
    assert (tf_logits(tf_copy) - expected()[1]).abs().max() < TOL


def test_openai_release_layout(tf_copy):
    """models/124M: model.ckpt.* and a checkpoint file naming "model.ckpt"."""
    for path in tf_copy.glob("model-1000.*"):
        path.rename(tf_copy / path.name.replace("model-1000", "model.ckpt"))
    (tf_copy / "checkpoint").write_text('model_checkpoint_path: "model.ckpt"\n')
    assert (tf_logits(tf_copy) - expected()[1]).abs().max() < TOL
    assert load_model(str(tf_copy), CPU, torch.float32).format == "tensorflow (checkpoint model.ckpt)"
    (tf_copy / "checkpoint").unlink()  # no checkpoint file: the folder's only checkpoint
    assert (tf_logits(tf_copy) - expected()[1]).abs().max() < TOL


def test_an_index_file_picks_one_of_several_checkpoints(tf_copy):
    for path in tf_copy.glob("model-1000.*"):
        shutil.copy(path, tf_copy / path.name.replace("1000", "500"))
    (tf_copy / "checkpoint").unlink()
    message = error(tf_copy)
    assert "model-1000, model-500" in message and ".index" in message
    loaded = load_model(str(tf_copy / "model-500.index"), CPU, torch.float32)
    assert loaded.format == "tensorflow (checkpoint model-500)"


def test_api_uses_the_folders_own_tokenizer():
    model = gpt2kit.load(FIXTURE, device="cpu")
    assert model.tokenizer.vocab_size == 512 and model.tokenizer.source == str(FIXTURE)
    assert model.tokenizer.decode(model.tokenizer.encode("the cat sat")) == "the cat sat"
    assert model.info()["format"] == "tensorflow (checkpoint model-1000)"
    texts = model.generate("the", max_new_tokens=5, seed=1, n=2)
    assert len(texts) == 2 and texts == model.generate("the", max_new_tokens=5, seed=1, n=2)


def test_gpt2s_own_vocabulary_is_the_builtin_tokenizer(tmp_path):
    assets = Path(gpt2kit.__file__).parent / "assets"
    shutil.copy(assets / "vocab.json", tmp_path / "encoder.json")
    shutil.copy(assets / "merges.txt", tmp_path / "vocab.bpe")
    assert read_tokenizer(tmp_path) is None  # the built-in tokenizer is used
    (tmp_path / "vocab.bpe").unlink()
    with pytest.raises(CheckpointError, match="encoder.json but no vocab.bpe"):
        read_tokenizer(tmp_path)


def test_variable_names():
    assert our_key("model/h1/attn/c_attn/w") == "transformer.h.1.attn.c_attn.weight"
    assert our_key("model/ln_f/g") == "transformer.ln_f.weight"
    for not_the_model in ("global_step", "beta1_power", "model/wte/Adam", "model/h0/mlp/c_fc/w/Adam_1"):
        assert our_key(not_the_model) is None
    assert our_key("model/h0/extra/w") == "model/h0/extra/w"  # reported as unexpected


def test_hparams_are_checked_against_the_index_before_building(tf_copy, monkeypatch):
    monkeypatch.setattr(hf, "meta_model", lambda cfg: pytest.fail("built a model before checking"))
    hparams = json.loads((tf_copy / "hparams.json").read_text())
    for field, value, shown in [("n_ctx", 128, "model/wpe in {} has shape (64, 32)"),
                                ("n_layer", 100000, "the weights in {} hold 2 blocks (h.0 to h.1)")]:
        (tf_copy / "hparams.json").write_text(json.dumps({**hparams, field: value}))
        assert error(tf_copy) == (f"{tf_copy / 'hparams.json'} sets {field}={value} but "
                                  + shown.format(tf_copy / "model-1000.index"))


def test_shape_errors_name_the_tensorflow_variable(tf_copy):
    cfg = ModelConfig(vocab_size=512, n_positions=128, n_embd=32, n_layer=2, n_head=2)
    with pytest.raises(CheckpointError) as info:
        hf.build_model(cfg, named_tensors(tf_copy / "model-1000"), tf_copy, CPU, torch.float32)
    assert "model/wpe" in str(info.value) and "(64, 32)" in str(info.value) and "(128, 32)" in str(info.value)


@pytest.mark.parametrize("damage, words", [
    (lambda d: (d / "model-1000.data-00000-of-00001").write_bytes(
        (d / "model-1000.data-00000-of-00001").read_bytes()[:1000]), "is truncated or corrupt (tensor"),
    (lambda d: (d / "model-1000.data-00000-of-00001").unlink(), "cannot read the checkpoint's data file"),
    (lambda d: (d / "model-1000.index").write_bytes((d / "model-1000.index").read_bytes()[:-10]),
     "no table footer"),
    (lambda d: _flip((d / "model-1000.index"), 40), "checksum mismatch"),
    (lambda d: (d / "model-1000.index").write_bytes(b""), "no table footer"),
    (lambda d: (d / "checkpoint").write_text('model_checkpoint_path: "model-2000"\n'),
     "names the checkpoint model-2000, but model-2000.index is not in"),
    (lambda d: (d / "checkpoint").write_text("garbage\n"), "no model_checkpoint_path"),
    (lambda d: (d / "hparams.json").write_text('{"n_vocab": 512}'), "has no n_ctx, n_embd, n_head, n_layer"),
    (lambda d: (d / "hparams.json").write_text('{"n_vocab": 512,'), "hparams.json is truncated or corrupt"),
    (lambda d: (d / "hparams.json").write_text(
        '{"n_vocab": 512, "n_ctx": 64, "n_embd": 32, "n_head": 3, "n_layer": 2}'), "must be divisible"),
])
def test_damaged_checkpoints_give_one_line_errors(tf_copy, damage, words):
    damage(tf_copy)
    assert words in error(tf_copy)


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_fixture_regenerates_identically(tmp_path):
    """The committed fixture is what scripts/make_tf_fixture.py writes (needs TensorFlow)."""
    pytest.importorskip("tensorflow", reason="TensorFlow is not installed: the fixture cannot be regenerated")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tf_fixture.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    fresh, committed = dict(read_bundle(tmp_path / "model-1000")), dict(read_bundle(FIXTURE / "model-1000"))
    assert fresh.keys() == committed.keys()
    assert all(torch.equal(fresh[k], committed[k]) for k in fresh)
    for name in ("hparams.json", "encoder.json", "vocab.bpe", "counter"):
        assert (tmp_path / name).read_bytes() == (FIXTURE / name).read_bytes(), name
    a, b = np.load(tmp_path / "expected_logits.npz"), np.load(FIXTURE / "expected_logits.npz")
    assert np.array_equal(a["ids"], b["ids"]) and np.allclose(a["logits"], b["logits"], atol=1e-5)


# ---- nanoGPT ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def oracle():
    return tiny_hf(vocab_size=50257)  # nanoGPT models use GPT-2's tokenizer


def test_nanogpt_checkpoint_gives_transformers_logits(oracle, tmp_path):
    path = save_nanogpt(oracle, tmp_path / "out" / "ckpt.pt")
    for spec in (path, path.parent):  # the file, or nanoGPT's out_dir
        loaded = load_model(str(spec), CPU, torch.float32)
        assert loaded.config.vocab_size == 50257  # the 47 padding rows are dropped
        assert (our_logits(loaded.model) - hf_logits(oracle)).abs().max() < TOL
        assert loaded.format == "nanogpt (iter 5000)" and loaded.source == f"file: {path}"


def test_nanogpt_without_biases_loads_as_zero_biases(oracle, tmp_path):
    biasless = tiny_hf(vocab_size=50257)
    with torch.no_grad():
        for name, p in biasless.named_parameters():
            if name.endswith(".bias"):
                p.zero_()
    path = save_nanogpt(biasless, tmp_path / "ckpt.pt", bias=False, vocab_size=50257)
    loaded = load_model(str(path), CPU, torch.float32)
    assert (our_logits(loaded.model) - hf_logits(biasless)).abs().max() < TOL


def test_nanogpt_needing_arbitrary_unpickling_is_refused(oracle, tmp_path):
    marker = tmp_path / "pwned"
    path = save_nanogpt(oracle, tmp_path / "ckpt.pt", best_val_loss=np.float64(3.25), payload=Payload(marker))
    message = error(path)
    assert message.startswith(f"unsafe or unsupported pickle content in {path}")
    assert "torch.save({'model': ckpt['model'], 'model_args': ckpt['model_args']}, path)" in message
    assert not marker.exists()


@pytest.mark.parametrize("change, words", [
    ({"vocab_size": 65}, "has vocab_size 65: a nanoGPT model with its own vocabulary"),
    ({"n_head": 5}, "must be divisible"),
    ({"block_size": 128}, "model_args sets block_size=128 but _orig_mod.transformer.wpe.weight in"),
    ({"n_layer": 3}, "model_args sets n_layer=3 but the weights in"),
    ({"dropout": "x"}, "model_args: dropout must be a finite number, got 'x'"),
])
def test_nanogpt_model_args_are_checked(oracle, tmp_path, change, words):
    path = save_nanogpt(oracle, tmp_path / "ckpt.pt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["model_args"].update(change)
    torch.save(ckpt, path)
    assert words in error(path)


def test_missing_model_args_key(oracle, tmp_path):
    path = save_nanogpt(oracle, tmp_path / "ckpt.pt")
    ckpt = torch.load(path, weights_only=True)
    del ckpt["model_args"]["bias"]
    torch.save(ckpt, path)
    assert "model_args has no bias" in error(path)


# ---- export: Hugging Face and GGUF -----------------------------------------------------------

def test_tensorflow_to_hf_loads_in_transformers(tmp_path):
    import transformers
    out = gpt2kit.convert(FIXTURE, to="hf", out=tmp_path / "run1")
    ids, want = expected()
    theirs = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    assert (hf_logits(theirs, ids) - want).abs().max() < TOL
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer("the cat sat")["input_ids"] == gpt2kit.load(FIXTURE).tokenizer.encode("the cat sat")


def test_nanogpt_to_hf_f16(oracle, tmp_path):
    import transformers
    path = save_nanogpt(oracle, tmp_path / "ckpt.pt")
    out = gpt2kit.convert(path, to="hf", out=tmp_path / "nano", type="f16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    theirs = transformers.GPT2LMHeadModel.from_pretrained(out, dtype=torch.float32).eval()
    assert (hf_logits(theirs) - hf_logits(oracle)).abs().max() < 2e-2


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputError, match="already exists; choose another output or pass --force"):
        gpt2kit.convert(FIXTURE, to="gguf", out=out)
    assert out.read_bytes() == b"keep me"
    gpt2kit.convert(FIXTURE, to="gguf", out=out, force=True)
    assert out.read_bytes()[:4] == b"GGUF"
    with pytest.raises(OptionError, match="type must be one of f32, f16 for --to hf"):
        gpt2kit.convert(FIXTURE, to="hf", out=tmp_path / "x", type="q8_0")


@pytest.fixture(scope="module")
def tf_model():
    return load_model(str(FIXTURE), CPU, torch.float32)


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("gguf")
    return {t: gpt2kit.convert(FIXTURE, to="gguf", out=folder / f"tiny-{t}.gguf", type=t)
            for t in ("f32", "f16", "q8_0")}


def test_gguf_metadata_is_what_llama_cpp_reads(gguf_files, tf_model):
    import gguf
    reader = gguf.GGUFReader(gguf_files["f32"])
    meta = {name: field.contents() for name, field in reader.fields.items()}
    assert {k: meta[k] for k in ("general.architecture", "gpt2.context_length", "gpt2.embedding_length",
                                 "gpt2.feed_forward_length", "gpt2.block_count", "gpt2.attention.head_count",
                                 "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id",
                                 "tokenizer.ggml.eos_token_id", "general.file_type")} == {
        "general.architecture": "gpt2", "gpt2.context_length": 64, "gpt2.embedding_length": 32,
        "gpt2.feed_forward_length": 128, "gpt2.block_count": 2, "gpt2.attention.head_count": 2,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.bos_token_id": 511,
        "tokenizer.ggml.eos_token_id": 511, "general.file_type": 0}
    assert meta["gpt2.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    vocab = json.loads((FIXTURE / "encoder.json").read_text())
    assert meta["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    assert meta["tokenizer.ggml.token_type"] == [1] * 511 + [3]  # normal, then <|endoftext|> as control
    assert meta["tokenizer.ggml.merges"] == (FIXTURE / "vocab.bpe").read_text().splitlines()[1:]


def test_gguf_tensor_names_agree_with_gguf_and_round_trip(gguf_files, tf_model):
    import gguf

    from gpt2kit.checkpoints.gguf import gguf_name
    reader = gguf.GGUFReader(gguf_files["f32"])
    tensors = {t.name: t for t in reader.tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, tf_model.config.n_layer)
    state = tf_model.model.state_dict()
    assert set(tensors) == {gguf_name(k) for k in state}
    for key, ours in state.items():
        assert gguf_name(key) == names.get_name(key, try_suffixes=(".weight", ".bias"))  # llama.cpp's own map
        t = tensors[gguf_name(key)]
        assert tuple(int(n) for n in t.shape) == tuple(ours.shape[::-1]), key  # ggml lists dims reversed
        assert np.array_equal(np.asarray(t.data).reshape(ours.shape), ours.numpy()), key


def test_gguf_f16_and_q8_0_types_and_values(gguf_files, tf_model):
    import gguf
    from gguf.quants import dequantize
    state = tf_model.model.state_dict()
    for kind, matrix_type, tol in (("f16", "F16", 1e-3), ("q8_0", "Q8_0", 2e-2)):
        reader = gguf.GGUFReader(gguf_files[kind])
        for t in reader.tensors:
            want = "F32" if len(t.shape) == 1 or t.name == "position_embd.weight" else matrix_type
            assert t.tensor_type.name == want, (kind, t.name)
        qkv = next(t for t in reader.tensors if t.name == "blk.0.attn_qkv.weight")
        values = dequantize(np.asarray(qkv.data), qkv.tensor_type).reshape(96, 32)
        assert np.abs(values - state["transformer.h.0.attn.c_attn.weight"].numpy()).max() < tol


def test_gguf_write_is_atomic(tmp_path, monkeypatch):
    import gguf
    out = gpt2kit.convert(FIXTURE, to="gguf", out=tmp_path / "m.gguf")
    before = out.read_bytes()

    def crash(self, **kwargs):
        raise RuntimeError("killed mid-write")
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", crash)
    with pytest.raises(RuntimeError):
        gpt2kit.convert(FIXTURE, to="gguf", out=out, force=True)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["f32", "f16"])
def test_llama_cpp_generates_our_greedy_tokens(gguf_files, tf_model, kind):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    llm = llama_cpp.Llama(model_path=str(gguf_files[kind]), n_ctx=64, verbose=False)
    prompt = gpt2kit.load(FIXTURE).tokenizer.encode("the cat sat on the")
    assert llm.tokenize(b"the cat sat on the", add_bos=False) == prompt
    theirs = []
    for token in llm.generate(prompt, top_k=1, temp=0.0):
        theirs.append(token)
        if len(theirs) == 8:
            break
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(tf_model.model(torch.tensor([ids]))[0, -1].argmax()))
    assert theirs == ids[len(prompt):]


# ---- the CLI and info ------------------------------------------------------------------------

def test_cli_convert(tmp_path):
    out = tmp_path / "tiny.gguf"
    r = subprocess.run([sys.executable, "-m", "gpt2kit", "convert", str(FIXTURE), "--to", "gguf", str(out),
                        "--type", "q8_0"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr.startswith(f"wrote {out}"), r.stderr
    assert out.read_bytes()[:4] == b"GGUF"


@pytest.mark.parametrize("args, code, words", [
    (["--to", "gguf", "EXISTING"], 1, "already exists; choose another output or pass --force"),
    (["--to", "hf", "NEW", "--type", "q8_0"], 2, "error: --type must be one of f32, f16 for --to hf"),
    (["--to", "onnx", "NEW"], 2, "argument --to: invalid choice"),
])
def test_cli_convert_errors_are_one_line(tmp_path, capsys, args, code, words):
    (tmp_path / "EXISTING").write_bytes(b"x")
    args = [str(tmp_path / a) if a in ("EXISTING", "NEW") else a for a in args]
    try:
        got = main(["convert", str(FIXTURE), *args])
    except SystemExit as e:  # argparse's own errors
        got = e.code
    err = capsys.readouterr().err
    assert got == code and err.count("\n") == 1 and words in err, err


def test_cli_generate_and_info_on_a_gpt2_simple_run(capsys):
    assert main(["generate", "the", "-m", str(FIXTURE), "--max-new-tokens", "4", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("the")
    assert main(["info", str(FIXTURE), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "tensorflow (checkpoint model-1000)" and info["vocab_size"] == 512


def test_info_format_of_hugging_face_folders_and_runs(tiny_folder, tmp_path):
    assert gpt2kit.load(tiny_folder).info()["format"] == "huggingface (safetensors)"
    run_folder = shutil.copytree(tiny_folder, tmp_path / "run")
    (run_folder / "run.json").write_text("{}")
    assert load_model(str(run_folder), CPU, torch.float32).format == "gpt2kit run (safetensors)"
