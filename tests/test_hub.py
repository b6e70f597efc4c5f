"""Hub downloads against a stand-in hub on 127.0.0.1 (tests/hub_server.py), never the real one.

gpt2kit runs in a subprocess because huggingface_hub reads HF_ENDPOINT, HF_HOME and
HF_HUB_OFFLINE when it is imported. The subprocess refuses any connection off this machine.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from helpers_checkpoints import IDS, hf_logits, save_bin, tiny_hf
from hub_server import FakeHub

TOL = 1e-4

CHILD = r"""
import ipaddress, json, socket, sys
_connect = socket.socket.connect
def _loopback_only(self, address):
    host = address[0] if isinstance(address, tuple) else None
    if host is not None and host != "localhost" and not ipaddress.ip_address(host).is_loopback:
        raise RuntimeError(f"tried to reach {address} off this machine")
    return _connect(self, address)
socket.socket.connect = _loopback_only

import torch
from gpt2kit.checkpoints import load_model
from gpt2kit.errors import Gpt2kitError
ids = json.loads(sys.argv[2])
for spec, revision in json.loads(sys.argv[1]):  # one result line per load, in order
    try:
        loaded = load_model(spec, torch.device("cpu"), torch.float32, revision=revision)
    except Gpt2kitError as e:
        print(json.dumps({"error": str(e), "type": type(e).__name__}), flush=True)
        continue
    with torch.no_grad():
        logits = loaded.model(torch.tensor(ids))
    print(json.dumps({"logits": logits.tolist(), "source": loaded.source}), flush=True)
"""


@pytest.fixture(scope="module")
def ref():
    return tiny_hf()


@pytest.fixture(scope="module")
def hub(ref, tmp_path_factory):
    """The stand-in hub with `gpt2` (safetensors, plus files that must not be fetched),
    `user/bin-only` (pickle weights only) and `user/sharded` (safetensors shards)."""
    st = tmp_path_factory.mktemp("hub-gpt2")
    ref.save_pretrained(st)
    (st / "vocab.json").write_text("{}")
    (st / "flax_model.msgpack").write_bytes(b"not wanted")
    (st / "onnx").mkdir()
    (st / "onnx" / "model.safetensors").write_bytes(b"not wanted")
    save_bin(ref, st)  # a pytorch_model.bin beside the safetensors: must not be downloaded
    fake = FakeHub()
    fake.add_folder("gpt2", st)
    fake.add_folder("user/bin-only", save_bin(ref, tmp_path_factory.mktemp("hub-bin")))
    sharded = tmp_path_factory.mktemp("hub-sharded")
    ref.save_pretrained(sharded, max_shard_size="40KB")
    fake.add_folder("user/sharded", sharded)
    fake.start()
    yield fake
    fake.stop()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def run_all(jobs: list[tuple[str, str | None]], endpoint: str, home, *, offline=False) -> list[dict]:
    """Load each (spec, revision) in turn in one fresh Python process with this hub setup."""
    proxies = ("http_proxy", "https_proxy", "all_proxy")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE_")) and k.lower() not in proxies}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(home), HF_HUB_DISABLE_PROGRESS_BARS="1",
               HF_HUB_DISABLE_TELEMETRY="1", NO_PROXY="127.0.0.1,localhost",
               HF_HUB_OFFLINE="1" if offline else "0")
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(jobs), json.dumps(IDS)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(results) == len(jobs), proc.stderr
    return results


def run(spec: str, endpoint: str, home, *, offline=False) -> dict:
    return run_all([(spec, None)], endpoint, home, offline=offline)[0]


def assert_matches(result: dict, ref) -> None:
    assert "logits" in result, result
    assert (torch.tensor(result["logits"]) - hf_logits(ref)).abs().max() < TOL


def test_download_then_cache_hit_then_offline(hub, ref, tmp_path):
    hub.fail_downloads = 500  # the hub breaks mid-download: a clear error, no poisoned cache
    try:
        failed = run("gpt2", hub.url, tmp_path)
    finally:
        hub.fail_downloads = None
    assert failed["error"] == f"the Hugging Face hub at {hub.url} refused to serve 'gpt2' (HTTP 500)"

    hub.requests.clear()
    first = run("gpt2", hub.url, tmp_path)
    assert_matches(first, ref)
    assert first["source"].startswith("hub: gpt2 (revision ")
    fetched = sorted(p.rsplit("/", 1)[-1] for p in hub.file_downloads())
    assert fetched == ["config.json", "generation_config.json", "model.safetensors", "vocab.json"]

    hub.requests.clear()
    second = run("gpt2", hub.url, tmp_path)
    assert second["logits"] == first["logits"]
    assert hub.file_downloads() == []  # a cache hit: only the revision lookup reaches the hub

    offline = run("gpt2", closed_port_url(), tmp_path, offline=True)
    assert offline["logits"] == first["logits"]


def test_layouts_and_errors_from_one_hub(hub, ref, tmp_path):
    hub.requests.clear()
    path_like, bin_only, sharded, unknown, bad_revision = run_all(
        [("./gpt2", None), ("user/bin-only", None), ("user/sharded", None),
         ("nobody/no-such-model", None), ("gpt2", "v9")], hub.url, tmp_path)

    # A path-like spec fails at once; the hub's first request comes from the next load.
    assert path_like["error"].startswith("no such file or folder: ./gpt2")
    assert hub.requests[0] == ("GET", "/api/models/user/bin-only/revision/main")

    # Pickle weights are fetched only because this repo has no safetensors. Shards sit in the
    # cache as symlinks into ../../blobs, so shard paths are checked without resolving links.
    assert_matches(bin_only, ref)
    assert_matches(sharded, ref)

    assert unknown == {"type": "HubError", "error": (
        "model 'nobody/no-such-model' was not found on the Hugging Face hub "
        "(check the name, or pass a local folder path)")}
    assert bad_revision["error"] == "revision 'v9' of model 'gpt2' was not found on the Hugging Face hub"


def test_hub_unreachable(tmp_path):
    url = closed_port_url()
    result = run("gpt2", url, tmp_path)
    assert result["error"].startswith(f"could not reach the Hugging Face hub at {url} "
                                      "to download 'gpt2' (no network?); ")


def test_offline_and_not_cached(hub, tmp_path):
    hub.requests.clear()
    result = run("gpt2", hub.url, tmp_path, offline=True)
    assert result["error"].startswith("gpt2 is not in the local cache and offline mode is on")
    assert hub.requests == []
