"""Data-parallel training: two gloo processes on this CPU train the same model as one process
with the same global batch (each optimizer step sees batch_size x grad_accum blocks, split across
the processes), and only rank 0 writes the run folder."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gpt2kit import distributed
from gpt2kit.errors import OptionError

JOKES = Path(__file__).resolve().parents[2] / "shared" / "data" / "onelinefun.csv"

SCRIPT = """
import sys
from gpt2kit.data import DataConfig
from gpt2kit.train import finetune
finetune(DataConfig(path={data!r}, column="Joke", cache_dir={cache!r}), {model!r}, out=sys.argv[1],
         max_steps=4, batch_size=4, grad_accum=2, dropout=0.0, learning_rate=1e-3, eval_every=2,
         eval_batches=2, sample_every=0, save_every=2, device="cpu", progress=False)
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


def test_two_gloo_processes_match_one_process(tmp_path, tiny_folder):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(SCRIPT.format(data=str(JOKES), cache=str(tmp_path / "cache"),
                                                    model=str(tiny_folder))))
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, str(script), str(one)], check=True, timeout=300)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                "--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    done = subprocess.run([*torchrun, str(script), str(two)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    def records(out: Path) -> list[dict]:
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    a, b = records(one), records(two)
    assert [sorted(r) for r in a] == [sorted(r) for r in b]  # rank 0 alone wrote, once per step
    assert [r["step"] for r in b if "loss" in r] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for key in ("loss", "val_loss", "grad_norm"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], abs=1e-5), (ra, rb)
    wa, wb = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    state = json.loads((two / "checkpoints" / "step-0000004" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["blocks_seen"] == 4 * 4 * 2
