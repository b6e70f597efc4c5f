"""Data-parallel training: two gloo processes on this CPU train the same model as one process
with the same global batch (each optimizer step sees batch_size x grad_accum blocks, split across
the processes), replicated (DDP) or sharded (FSDP); only rank 0 writes the run folder, and a run
stopped and resumed under torchrun continues as if it had never stopped."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gpt2kit.errors import OptionError
from gpt2kit.training import distributed
from gpt2kit.training.config import TrainConfig

SCRIPT = """
import os, signal, sys
from gpt2kit.data.prepare import DataConfig
from gpt2kit.training.loop import TrainingInterrupted, finetune
out, mode, stop_at = sys.argv[1], sys.argv[2], int(sys.argv[3])


def log(record):  # rank 0 alone logs: its SIGINT must stop every process at the same step
    if record["event"] == "train" and record["step"] == stop_at:
        os.kill(os.getpid(), signal.SIGINT)


try:
    if mode.startswith("resume"):  # "resume-ddp" also switches --fsdp off
        changes = dict(fsdp=False) if mode == "resume-ddp" else dict()
        finetune(out=out, resume=True, progress=False, log=log, **changes)
    else:
        finetune(DataConfig(path={data!r}, column="Joke", cache_dir={cache!r}), {model!r}, out=out,
                 max_steps=4, batch_size=4, grad_accum=2, dropout=0.0, learning_rate=1e-3,
                 eval_every=2, eval_batches=2, sample_every=2, save_every=2, device="cpu",
                 dtype="float32", fsdp=mode == "fsdp", progress=False, log=log)  # float32: the
                 # same sums whatever the split (bfloat16 products round per process)
except TrainingInterrupted:
    pass
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_world_from_torchrun_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.from_env() == distributed.World()
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    world = distributed.from_env()
    assert (world.rank, world.world_size, world.local_rank, world.local_world_size) == (3, 4, 1, 2)
    assert world.distributed and not world.is_main


def test_each_process_takes_an_equal_contiguous_share():
    shares = [distributed.share(distributed.World(rank=r, world_size=3), 6) for r in range(3)]
    assert [list(range(6))[s] for s in shares] == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(OptionError, match="must be divisible by the number of processes"):
        distributed.check_batch(distributed.World(rank=0, world_size=3), 4)


def test_single_process_helpers_are_no_ops():
    world = distributed.World()
    x = torch.tensor(2.5)
    assert distributed.mean(world, x) is x
    assert distributed.any_process(world, True, torch.device("cpu")) is True
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap(model, world, torch.device("cpu")) is model
    distributed.barrier(world)


@pytest.fixture(scope="module")
def launch(tmp_path_factory, tiny_folder, jokes_csv):
    """launch(out, mode, processes, stop_at=0): one training run (mode "ddp", "fsdp" or
    "resume") of the script above, in 1 process or under torchrun."""
    tmp = tmp_path_factory.mktemp("distributed")
    script = tmp / "train.py"
    script.write_text(SCRIPT.format(data=str(jokes_csv), cache=str(tmp / "cache"), model=str(tiny_folder)))

    def run(out: Path, mode: str, processes: int, stop_at: int = 0) -> None:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
                    f"--nproc_per_node={processes}", "--master_addr=127.0.0.1", f"--master_port={free_port()}"]
        cmd = [*(torchrun if processes > 1 else [sys.executable]), str(script), str(out), mode, str(stop_at)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def one(launch, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    launch(out, "ddp", 1)
    return out


@pytest.fixture(scope="module")
def two(launch, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two") / "run"
    launch(out, "ddp", 2)
    return out


def records(out: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
            for line in (out / name).read_text().splitlines()]


def assert_same_run(a: Path, b: Path, tolerance: float) -> None:
    """The same metrics lines (rank 0 alone wrote, once per step), losses within `tolerance`,
    the same samples and the same final weights."""
    ra, rb = records(a), records(b)
    assert [sorted(r) for r in ra] == [sorted(r) for r in rb]
    assert [r["step"] for r in rb if "loss" in r] == [1, 2, 3, 4]
    for x, y in zip(ra, rb):
        for key in ("loss", "val_loss", "grad_norm"):
            if key in x:
                assert y[key] == pytest.approx(x[key], abs=tolerance), (x, y)
    samples = records(a, "samples.jsonl")
    assert len(samples) == 2 * 3 and (tolerance or samples == records(b, "samples.jsonl"))
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=tolerance) for k in wa)


def test_two_gloo_processes_match_one_process(one, two):
    assert_same_run(one, two, tolerance=1e-5)
    state = json.loads((two / "checkpoints" / "step-0000004" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["blocks_seen"] == 4 * 4 * 2 and not state["sharded"]


def test_two_processes_resume_as_if_never_stopped(launch, two, tmp_path):
    out = tmp_path / "stopped"
    launch(out, "ddp", 2, stop_at=3)  # SIGINT on rank 0 after step 3: every process stops there
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002", "step-0000003"]
    launch(out, "resume", 2)
    assert_same_run(two, out, tolerance=0.0)


@pytest.mark.slow
def test_fsdp_matches_one_process_resumes_and_saves_a_plain_model(launch, one, tmp_path):
    out = tmp_path / "fsdp"
    launch(out, "fsdp", 2, stop_at=1)
    launch(out, "resume", 2, stop_at=3)  # run.json carries --fsdp; the checkpoint holds whole tensors
    launch(out, "resume-ddp", 2)  # so it resumes unsharded too
    assert_same_run(one, out, tolerance=1e-4)  # reduce-scatter sums in another order than DDP
    sharded, plain = (out / "checkpoints" / name for name in ("step-0000003", "step-0000004"))
    assert json.loads((sharded / "trainer_state.json").read_text())["sharded"]
    assert not json.loads((plain / "trainer_state.json").read_text())["sharded"]
    a, b = (torch.load(folder / "optimizer.pt", weights_only=True) for folder in (sharded, plain))
    assert [g["params"] for g in a["param_groups"]] == [g["params"] for g in b["param_groups"]]
    assert {i: {k: v.shape for k, v in s.items()} for i, s in a["state"].items()} == \
        {i: {k: v.shape for k, v in s.items()} for i, s in b["state"].items()}  # the unsharded layout

    import transformers

    import gpt2kit
    ids = torch.tensor([[50256, 464, 3290, 318]])
    hf = transformers.AutoModelForCausalLM.from_pretrained(sharded).eval()  # saved under FSDP
    assert torch.allclose(gpt2kit.load(sharded, device="cpu").logits(ids), hf(ids).logits, atol=1e-4)


def test_fsdp_with_lora_is_refused_in_one_line():
    with pytest.raises(OptionError) as e:
        TrainConfig(out="x", fsdp=True, lora=True)
    assert e.value.as_flag().startswith("--fsdp cannot be combined with --lora")
