"""Every command line of the README and of `gpt2kit COMMAND --help`'s examples, run as a user would
type it, so that an example can never break unnoticed.

Each line runs through bash in a folder holding the files the examples name (generated jokes,
prompt and text files, a tiny model folder, TensorFlow and nanoGPT checkpoints), with
`HF_ENDPOINT` pointing at a stand-in hub on 127.0.0.1 (hub_server.py) that serves tiny random
models as `gpt2`, `gpt2-medium` and the rest. The README's Python blocks run too, in document
order in the same folder, so its prose and its code form one session. Only installation lines
(`pip install ...`) and the test command are not run: the test environment is the installation. A server example runs
in the background on a free port (the one substitution) until the end of its document.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import tiny_hf_model
from helpers_checkpoints import save_nanogpt
from hub_server import FakeHub
from jokes import make_jokes, write_jokes_csv

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TF_FIXTURE = ROOT / "tests" / "fixtures" / "tf-tiny"
HUB_IDS = ("gpt2", "distilgpt2", "gpt2-medium", "openai-community/gpt2-large")
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.M | re.S)
PORT = re.compile(r"(--port |127\.0\.0\.1:)8000\b")


# ---- the examples ------------------------------------------------------------------------------

def readme_blocks() -> list[tuple[str, str]]:
    """(language, code) of the README's fenced blocks, in order."""
    return FENCE.findall((ROOT / "README.md").read_text(encoding="utf-8"))


def shell_lines(code: str) -> list[str]:
    """The command lines of a shell block, without installation steps."""
    lines = []
    for line in code.replace("\\\n", " ").splitlines():
        line = line.strip()
        if line.startswith("pip install"):
            line = line.partition("&&")[2].strip()  # `pip install ... && gpt2kit ...` runs the rest
        if line and not line.startswith("#") and "pytest" not in line:  # this is the test command
            lines.append(line)
    return lines


def command_of(line: str) -> str:
    """A line without its trailing comment, to tell the README's and --help's copies apart."""
    return line.split("  #")[0].strip()


def help_examples() -> list[str]:
    from gpt2kit.cli import EXAMPLES
    return [line.strip() for text in EXAMPLES.values()
            for line in text.partition("examples:\n")[2].splitlines() if line.strip()]


# ---- the folder a user would have ------------------------------------------------------------

def small_vocab_model(folder: Path, seed: int = 0) -> Path:
    """A tiny random GPT-2 with the TensorFlow fixture's 512-token vocabulary (GPT-2's first 511
    tokens and <|endoftext|>) as its own tokenizer files: with GPT-2's 50,257 tokens the LM head
    would be 99% of every training step, and the README fine-tunes the jokes for 10 epochs (for
    the same reason, no dropout: attention dropout is the slow part of a small model's step).
    6 layers, as distilgpt2 has: the examples pick layer 6."""
    tiny_hf_model(n_layer=6, n_positions=256, vocab_size=512, seed=seed, resid_pdrop=0.0,
                  embd_pdrop=0.0, attn_pdrop=0.0).save_pretrained(folder)
    shutil.copy(TF_FIXTURE / "encoder.json", folder / "vocab.json")
    shutil.copy(TF_FIXTURE / "vocab.bpe", folder / "merges.txt")
    return folder


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The stand-in hub: one tiny random GPT-2 under every name the examples use."""
    folder = small_vocab_model(tmp_path_factory.mktemp("hub-model"))
    fake = FakeHub()
    for repo_id in HUB_IDS:
        fake.add_folder(repo_id, folder)
    fake.start()
    yield fake
    fake.stop()


def make_workspace(folder: Path) -> Path:
    jokes = make_jokes()
    write_jokes_csv(folder / "onelinefun.csv")
    (folder / "prompts.txt").write_text("Why did the\nMy wife and I\n", encoding="utf-8")
    (folder / "texts.txt").write_text("The cat sat on the mat.\nA second line of text.\n", encoding="utf-8")
    for name in ("data.txt", "corpus.txt"):
        (folder / name).write_text("\n".join(jokes[:100]) + "\n", encoding="utf-8")
    (folder / "data.jsonl").write_text("".join(json.dumps({"text": j}) + "\n" for j in jokes[:100]))
    (folder / "chats.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": "Tell me a joke"}, {"role": "assistant", "content": j}]}) + "\n"
        for j in jokes[:100]))
    small_vocab_model(folder / "my-model", seed=1)
    for tf in ("checkpoint/run1", "models/124M"):
        shutil.copytree(TF_FIXTURE, folder / tf)
    save_nanogpt(tiny_hf_model(seed=2), folder / "out" / "ckpt.pt")
    return folder


def user_env(hub: FakeHub, folder: Path) -> dict:
    """A user's environment, with the hub and every cache inside this test's folder."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE_", "GPT2KIT_")) and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(folder / ".hf"), HF_HUB_OFFLINE="0",
               HF_HUB_DISABLE_TELEMETRY="1", NO_PROXY="127.0.0.1,localhost",
               GPT2KIT_CACHE=str(folder / ".cache"), TOKENIZERS_PARALLELISM="false")
    return env


class Session:
    """Runs example lines one after another in one folder, as a user at a terminal would."""

    def __init__(self, folder: Path, env: dict):
        self.folder, self.env, self.port, self.server = folder, env, None, None
        self.seconds: dict[str, float] = {}  # per line, shown when a test fails (or with -s)

    def run(self, line: str, timeout: float = 600) -> subprocess.CompletedProcess | None:
        if self.port is not None:
            line = PORT.sub(rf"\g<1>{self.port}", line)
        if re.match(r"gpt2kit serve\b", line):
            return self.serve(line)
        start = time.perf_counter()
        done = subprocess.run(["bash", "-c", line], cwd=self.folder, env=self.env, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        self.seconds[command_of(line)] = time.perf_counter() - start
        assert done.returncode == 0 and "Traceback" not in done.stderr, \
            f"`{line}` exited {done.returncode}:\n{done.stderr[-3000:]}"
        return done

    def python(self, code: str) -> subprocess.CompletedProcess:
        if self.port is not None:
            code = PORT.sub(rf"\g<1>{self.port}", code)
        return self.run(f"{sys.executable} - <<'PY'\n{code}\nPY")

    def serve(self, line: str) -> None:
        """Start the server in the background on a free port and wait until it answers."""
        assert self.server is None, "one server at a time"
        self.port = free_port()
        line = PORT.sub(rf"\g<1>{self.port}", line)
        if "--port" not in line:
            line += f" --port {self.port}"
        self.server = subprocess.Popen(["bash", "-c", f"exec {line}"], cwd=self.folder, env=self.env,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                       start_new_session=True)
        deadline = time.time() + 120
        while not healthy(self.port):
            assert self.server.poll() is None, f"`{line}` exited:\n{self.server.stderr.read()[-3000:]}"
            assert time.time() < deadline, f"`{line}` did not answer /health within 120 s"
            time.sleep(0.3)

    def stop_server(self) -> None:
        if self.server is None:
            return
        os.killpg(self.server.pid, signal.SIGTERM)
        _, err = self.server.communicate(timeout=60)
        assert "Traceback" not in err, err[-3000:]
        self.server, self.port = None, None


@contextmanager
def session(folder: Path, env: dict):
    s = Session(folder, env)
    try:
        yield s
    finally:
        for line, seconds in sorted(s.seconds.items(), key=lambda item: -item[1])[:8]:
            print(f"{seconds:6.1f} s  {line[:100]}")
        if s.server is not None and s.server.poll() is None:
            s.stop_server()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


# ---- the tests ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def workspace(hub, tmp_path_factory):
    """One folder for the README and then the --help examples, as one user would use it."""
    folder = make_workspace(tmp_path_factory.mktemp("user"))
    with session(folder, user_env(hub, folder)) as s:
        yield s


def test_readme_runs_top_to_bottom(workspace):
    s, ran = workspace, []
    for language, code in readme_blocks():
        if language == "bash":
            for line in shell_lines(code):
                ran.append(line)
                s.run(line)
        elif language == "python":
            ran.append(code.splitlines()[0])
            s.python(code)
    s.stop_server()
    assert any("--lora" in line for line in ran), "the README shows a LoRA fine-tune"
    assert sum(line.startswith("gpt2kit ") for line in ran) >= 15
    for made in ("samples.jsonl", "runs/jokes/model.safetensors", "runs/jokes-lora/adapter_config.json",
                 "runs/jokes-split/metrics.jsonl", "runs/jokes-py/model.safetensors", "jokes.gguf",
                 "out/run1/config.json", "out/nano/model.safetensors", "scores.jsonl", "vectors.npy"):
        assert (s.folder / made).exists(), f"the README's commands should have written {made}"


def test_help_examples_run(workspace):
    """After the README, in the same folder: lines the README has already run are not repeated."""
    s = workspace
    examples = [command_of(line) for line in help_examples()]
    assert len(examples) >= 15
    if not (s.folder / "runs" / "jokes").exists():  # the README test did not get that far
        s.run("gpt2kit finetune onelinefun.csv --column Joke -m gpt2 --out runs/jokes --max-steps 2")
    # `--resume` continues a run: the example's run exists, stopped after one of its steps.
    s.run("gpt2kit finetune data.txt --out runs/x --max-steps 1")
    for line in examples:
        if line in s.seconds and not line.startswith("gpt2kit serve"):
            continue
        s.run(line)
        if line.startswith("gpt2kit serve"):
            s.stop_server()
