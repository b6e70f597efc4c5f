"""The CLI as a user runs it: real subprocesses, exit codes, one-line errors, output files."""

import dataclasses
import json
import os
import subprocess
import sys
import time

import pytest

from gpt2kit.cli import main


def run(*args, stdin=None, env=None):
    return subprocess.run([sys.executable, "-m", "gpt2kit", *args], input=stdin, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def one_line_error(result, code, *fragments):
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_generate_prints_prompt_and_samples(tiny_folder):
    r = run("generate", "Hello, I'm a language model,", "-m", str(tiny_folder), "-n", "3",
            "--max-length", "20", "--seed", "42")
    assert r.returncode == 0, r.stderr
    samples = r.stdout.strip().split("\n" + "=" * 20 + "\n")
    assert len(samples) == 3 and all(s.startswith("Hello, I'm a language model,") for s in samples)
    again = run("generate", "Hello, I'm a language model,", "-m", str(tiny_folder), "-n", "3",
                "--max-length", "20", "--seed", "42")
    assert again.stdout == r.stdout


def test_prompts_file_to_jsonl(tiny_folder, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first prompt\n\nsecond prompt\n", encoding="utf-8")
    out = tmp_path / "samples.jsonl"
    r = run("generate", "-m", str(tiny_folder), "--prompts-file", str(prompts), "--output", str(out),
            "--max-new-tokens", "5", "--seed", "1", "-n", "2")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["prompt"] for row in rows] == ["first prompt"] * 2 + ["second prompt"] * 2
    assert all(row["finish_reason"] in ("stop", "length") for row in rows)
    assert "logprobs" not in rows[0]


def test_logprobs_written_to_jsonl(tiny_folder, tmp_path):
    out = tmp_path / "lp.jsonl"
    r = run("generate", "Hello", "-m", str(tiny_folder), "--output", str(out), "--max-new-tokens", "4",
            "--temperature", "0", "--ignore-eos", "--logprobs", "2")
    assert r.returncode == 0, r.stderr
    [row] = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(row["logprobs"]) == 4 and all(len(lp["top"]) <= 2 and lp["logprob"] <= 0 for lp in row["logprobs"])


def test_stdin_stream(tiny_folder):
    r = run("generate", "-m", str(tiny_folder), "--stream", "--max-new-tokens", "6", "--seed", "3",
            stdin="Once upon a time\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Once upon a time")
    plain = run("generate", "Once upon a time", "-m", str(tiny_folder), "--max-new-tokens", "6", "--seed", "3")
    assert r.stdout.strip() == plain.stdout.strip()


def test_info(tiny_folder):
    r = run("info", str(tiny_folder))
    assert r.returncode == 0, r.stderr
    for word in ("GPT-2", "parameters", "float32", "context", "tokenizer", str(tiny_folder)):
        assert word in r.stdout
    data = json.loads(run("info", str(tiny_folder), "--json").stdout)
    assert data["layers"] == 2 and data["context"] == 64
    assert data["quantize"] is None and "None" not in r.stdout  # text says "none"
    import transformers
    hf = transformers.GPT2LMHeadModel.from_pretrained(tiny_folder)
    assert data["parameters"] == hf.num_parameters()  # the tied embedding / LM head counted once
    assert f"{hf.num_parameters():,}" in r.stdout


def test_saved_models_are_readable_like_any_other_file(tiny_folder, tmp_path):
    """safetensors creates its files 0600; every file of a converted model gets the usual mode."""
    r = run("convert", str(tiny_folder), "--to", "hf", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    assert len(set(modes.values())) == 1 and modes["model.safetensors"] == modes["config.json"], modes


def test_a_deliberate_stop_is_not_reported_as_an_error(monkeypatch, capsys, jokes_csv, tmp_path):
    import gpt2kit.training.loop as train

    def stopped(*args, **kwargs):
        raise train.TrainingInterrupted(3, tmp_path / "checkpoints" / "step-0000003", 2, None)
    monkeypatch.setattr(train, "finetune", stopped)
    code = main(["finetune", str(jokes_csv), "--column", "Joke", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 130 and err.startswith("stopped: training stopped by SIGINT at step 3"), err


@pytest.mark.parametrize("flags, fragment", [
    (["--temperature", "-1"], "--temperature must be in [0, 2], got -1"),
    (["--temperature", "0", "-n", "3"], "--num-samples must be 1 with greedy decoding"),
    (["--temperature", "nan"], "--temperature must be a finite number"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["--top-k", "-3"], "--top-k must be at least 0"),
    (["--max-length", "0"], "--max-length must be at least 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--max-new-tokens", "-4"], "--max-new-tokens must be at least 1"),
    (["--num-samples", "0"], "--num-samples must be at least 1"),
    (["-n", "0"], "--num-samples must be at least 1"),
])
def test_bad_options_are_one_line_exit_2(flags, fragment, capsys):
    code = main(["generate", "hi", "-m", "./no-such-dir", *flags])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], err


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "hi", "--top-k", "x"])
    assert e.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_missing_model_path_never_goes_to_the_hub(tmp_path):
    r = run("generate", "hi", "-m", "./no-such-dir")
    one_line_error(r, 1, "no-such-dir")
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run("generate", "hi", "-m", str(empty))
    one_line_error(r, 1, "model.safetensors", "pytorch_model.bin")


def test_invalid_utf8_prompts_file(tiny_folder, tmp_path):
    bad = tmp_path / "prompts.txt"
    bad.write_bytes(b"good line\ncaf\xe9 au lait\n")
    r = run("generate", "-m", str(tiny_folder), "--prompts-file", str(bad))
    one_line_error(r, 1, "not valid UTF-8", "line 2")


def test_prompt_longer_than_context(tiny_folder):
    r = run("generate", " a" * 100, "-m", str(tiny_folder), "--max-new-tokens", "2")
    one_line_error(r, 1, "100 tokens", "64")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_gpu(tiny_folder):
    r = run("generate", "hi", "-m", str(tiny_folder), "--device", "cuda")
    one_line_error(r, 1, "no CUDA GPU")


def test_benchmark_device_option_refuses_a_missing_gpu_in_one_line(monkeypatch):
    import argparse

    import torch

    from gpt2kit.runtime import device_option
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_option("cpu") == "cpu"
    for bad, message in (("cuda", "no CUDA GPU"), ("tpu", "must be one of")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            device_option(bad)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_benchmark_with_cuda_on_a_cpu_machine_is_a_usage_error():
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_train.py")
    r = subprocess.run([sys.executable, script, "--device", "cuda"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith("use --device cpu (or auto)")


def test_empty_prompt_is_allowed(tiny_folder):
    r = run("generate", "", "-m", str(tiny_folder), "--max-new-tokens", "4", "--seed", "0")
    assert r.returncode == 0, r.stderr


def test_help_is_fast_and_does_not_import_torch():
    code = "import sys, time; t = time.time(); from gpt2kit.cli import build_parser; " \
           "build_parser().format_help(); print('torch' in sys.modules, time.time() - t)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split()
    assert out[0] == "False"
    start = time.time()
    r = run("generate", "--help")
    assert r.returncode == 0 and "--top-p" in r.stdout and "default 50" in r.stdout
    assert time.time() - start < 5  # generous: shared CI machines; the benchmark measures it




def test_eval_reports_loss_and_perplexity(tiny_folder, tiny_model, tmp_path):
    held_out = tmp_path / "held_out.csv"
    held_out.write_text("ID,Joke\n1,I told my wife she was drawing her eyebrows too high. She looked surprised.\n"
                        "2,\"Why do cows wear bells? Because their horns don't work.\"\n", encoding="utf-8")
    r = run("eval", "-m", str(tiny_folder), str(held_out), "--column", "Joke", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    expected = tiny_model.evaluate(held_out, column="Joke")
    assert abs(got["loss"] - expected.nll) < 1e-6 and got["tokens"] == expected.n_tokens
    assert abs(got["perplexity"] - __import__("math").exp(got["loss"])) < 1e-3 * got["perplexity"]


def test_eval_without_column_lists_the_columns(tiny_folder, jokes_csv):
    r = run("eval", "-m", str(tiny_folder), str(jokes_csv))
    one_line_error(r, 1, "ID, Joke", "--column")


def test_finetune_smoke_then_generate(tmp_path, jokes_csv):
    out = tmp_path / "run"
    r = run("finetune", str(jokes_csv), "--column", "Joke", "--from-scratch", "--size", "tiny", "--out", str(out),
            "--max-steps", "2", "--batch-size", "2", "--block-size", "32", "--eval-every", "2",
            "--sample-every", "0", "--cache-dir", str(tmp_path / "cache"))
    assert r.returncode == 0, r.stderr
    assert {"config.json", "model.safetensors", "metrics.jsonl", "loss.png"} <= {p.name for p in out.iterdir()}
    g = run("generate", "", "-m", str(out), "--max-new-tokens", "5", "--seed", "0")
    assert g.returncode == 0, g.stderr
    again = run("finetune", str(jokes_csv), "--column", "Joke", "--out", str(out))
    one_line_error(again, again.returncode, "--resume")
    assert again.returncode != 0


@pytest.mark.parametrize("flags, rank", [(["--lora"], 8), (["--lora", "--lora-rank", "4"], 4)])
def test_finetune_lora_from_the_cli(flags, rank, tiny_folder, tmp_path, jokes_csv):
    """--lora alone (default adapters) and with --lora-* options: a real run, then generation."""
    out = tmp_path / "lora"
    r = run("finetune", str(jokes_csv), "--column", "Joke", "-m", str(tiny_folder), *flags, "--out", str(out),
            "--max-steps", "1", "--batch-size", "2", "--block-size", "32", "--sample-every", "0",
            "--cache-dir", str(tmp_path / "cache"))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert json.loads((out / "adapter_config.json").read_text())["r"] == rank
    assert "in LoRA adapters" in r.stderr
    g = run("generate", "Why", "-m", str(out), "--max-new-tokens", "3", "--seed", "0")
    assert g.returncode == 0, g.stderr


def test_finetune_help_names_no_file_outside_the_repository():
    text = run("finetune", "--help").stdout
    assert "examples:" in text and "../" not in text


@pytest.mark.parametrize("flags, fragment", [
    (["--learning-rate", "0"], "--learning-rate must be greater than 0"),
    (["--learning-rate", "-1"], "--learning-rate must be greater than 0"),
    (["--lora", "--lora-rank", "0"], "--lora-rank must be at least 1"),
    (["--lora", "--lora-dropout", "2"], "--lora-dropout must be in [0, 1), got 2.0"),
    (["--dropout", "2"], "--dropout must be in [0, 1), got 2.0"),
    (["--lora", "--lora-targets", "c_attn,wte"], "--lora-targets must be among"),
])
def test_finetune_bad_options(flags, fragment, tmp_path, capsys, jokes_csv):
    code = main(["finetune", str(jokes_csv), "--column", "Joke", "--out", str(tmp_path / "r"), *flags])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and fragment in lines[-1], lines


def test_every_option_error_names_a_flag_the_command_has():
    """An OptionError's field, shown with flag_of, is a flag of the command whose dataclass raised it."""
    from gpt2kit.cli import flags, generate, serve, training
    from gpt2kit.config import DataConfig, GenerationConfig, LoraConfig, option_fields
    from gpt2kit.server.settings import ServerConfig
    from gpt2kit.training.config import TrainConfig
    commands = [(generate.configure_generate, [(GenerationConfig, "")]),
                (serve.configure_serve, [(ServerConfig, "")]),
                (training.configure_finetune, [(TrainConfig, ""), (DataConfig, ""), (LoraConfig, "lora_")])]
    for configure, configs in commands:
        parser = flags.Parser()
        configure(parser)
        have = {name for action in parser._actions for name in action.option_strings}
        for cls, prefix in configs:
            wanted = {flags.flag_of(prefix + f.name) for f in option_fields(cls) if f.name != "path"}
            assert wanted <= have, (cls.__name__, wanted - have)


@pytest.mark.parametrize("cls_path", ["gpt2kit.config.GenerationConfig", "gpt2kit.config.DataConfig",
                                      "gpt2kit.config.LoraConfig", "gpt2kit.training.config.TrainConfig",
                                      "gpt2kit.server.settings.ServerConfig"])
def test_the_default_a_help_text_states_is_the_fields_default(cls_path):
    """--help shows each option's help text: a "(default X)" there must be the dataclass default."""
    import importlib
    import re

    from gpt2kit.config import option_fields
    module, _, name = cls_path.rpartition(".")
    for f in option_fields(getattr(importlib.import_module(module), name)):
        stated = re.search(r"\(default:? ([\w.+-]+)", f.metadata["help"])  # its first word
        if stated is None or f.default is None or isinstance(f.default, type(dataclasses.MISSING)):
            continue  # no default stated, or one decided at run time (described in words)
        text, value = stated[1], f.default
        if isinstance(value, bool):
            if text in ("on", "off", "true", "false"):  # else described in words
                assert text in (("on", "true") if value else ("off", "false")), (f.name, text)
        elif isinstance(value, (int, float)):
            assert float(text) == value, (f.name, text)
        else:
            assert text == (",".join(value) if isinstance(value, tuple) else value), (f.name, text)


def test_lora_targets_may_be_repeated_or_comma_separated():
    from gpt2kit.cli.flags import build
    from gpt2kit.config import LoraConfig
    cfg = build(LoraConfig, {"targets": ("c_attn,mlp.c_fc", "c_proj")}, prefix="lora_")
    assert cfg.targets == ("c_attn", "mlp.c_fc", "c_proj")


def test_finetune_bad_data(tmp_path, jokes_csv):
    r = run("finetune", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "r"))
    one_line_error(r, 1, "missing.txt")
    r = run("finetune", str(jokes_csv), "--out", str(tmp_path / "r2"))
    one_line_error(r, r.returncode, "ID, Joke", "--column")
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    r = run("finetune", str(jokes_csv), "--column", "Joke", "--out", str(other))
    assert r.returncode != 0 and (other / "mine.txt").read_text() == "keep me"
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
