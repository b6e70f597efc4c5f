"""Soak the server: many clients for a bounded time, a mix of valid, malformed and abandoned
requests; prints requests by status, latency percentiles and the server's resident memory.

    python benchmarks/soak_server.py                          # 90 s, 24 clients, 2-layer tiny shape
    python benchmarks/soak_server.py --seconds 1800           # the 30-minute soak of issue 17
    python benchmarks/soak_server.py --seconds 20 --json out.json   # what the slow test runs

Random weights of a small GPT-2 shape are saved as a Hugging Face folder and served by
`python -m gpt2kit serve` in a subprocess on loopback (nothing else is contacted). Each client
loops until --seconds have passed (or --max-requests were sent in all), drawing each request:
valid non-streamed and streamed completions with seeds; with probability --malformed a bad body
(broken JSON, wrong types, NaN, huge n, out-of-vocabulary token ids, a 200 KB prompt, 500 stop
strings, logprobs 1000); with probability --disconnect a stream it abandons after two chunks.
The server's RSS (/proc/PID/status) is sampled every --rss-every seconds: reported at the start
(after one request), at the end of the warm-up, at the end, and its maximum after the warm-up.
A seeded request is sent alone first and again under load: the texts must match. Exit status 1
if any request got a 5xx, a seeded text differed, or the server did not stop cleanly on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from bench_serve import fail, free_port, percentile, server_complaints, stop_server, wait_healthy
from machine import machine_header

PROMPT = "The old lighthouse keeper climbed the stairs one last time, carrying a lamp and a letter"
SEEDED = {"prompt": PROMPT, "max_tokens": 24, "seed": 1234, "temperature": 1.0, "ignore_eos": True}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=90.0, help="time clients send requests (default 90)")
    p.add_argument("--max-requests", type=int, default=1_000_000, help="stop after this many (default 1e6)")
    p.add_argument("--clients", type=int, default=24, help="concurrent clients (default 24)")
    p.add_argument("--warmup", type=float, default=None,
                   help="seconds before the 'after warm-up' RSS (default: a sixth of --seconds)")
    p.add_argument("--size", default="tiny", help="shape preset (default tiny)")
    p.add_argument("--layers", type=int, default=2, help="its number of layers (default 2)")
    p.add_argument("--max-tokens", type=int, default=32, help="new tokens per valid request (default 32)")
    p.add_argument("--malformed", type=float, default=0.3, help="share of bad bodies (default 0.3)")
    p.add_argument("--disconnect", type=float, default=0.05, help="share of abandoned streams (default 0.05)")
    p.add_argument("--rss-every", type=float, default=2.0, help="seconds between RSS samples (default 2)")
    p.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                   help="an environment variable for the server only (e.g. MALLOC_ARENA_MAX=2); repeatable")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a request may take (default 120)")
    p.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = p.parse_args()
    if args.clients < 1 or args.seconds <= 0 or args.max_requests < 1:
        p.error("--clients, --seconds and --max-requests must be positive")
    if not all("=" in item for item in args.server_env):
        p.error("--server-env takes NAME=VALUE")
    args.warmup = args.seconds / 6 if args.warmup is None else args.warmup
    return args


# --- the server ---------------------------------------------------------------------------------

def build_model_folder(size: str, layers: int, folder: Path) -> None:
    import torch

    import gpt2kit
    from gpt2kit.checkpoints.hf import save_hf
    from gpt2kit.config import ModelConfig
    torch.manual_seed(0)
    save_hf(gpt2kit.GPT(ModelConfig.preset(size, n_layer=layers)), folder, tokenizer=gpt2kit.Tokenizer.default())


def start_server(args, folder: Path, port: int, log) -> tuple[subprocess.Popen, list[str]]:
    cmd = [sys.executable, "-m", "gpt2kit", "serve", "-m", str(folder), "--device", "cpu",
           "--port", str(port), "--shutdown-timeout", "5"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **dict(item.split("=", 1) for item in args.server_env)}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    return proc, cmd


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


# --- the requests -------------------------------------------------------------------------------

def valid_body(rng: random.Random, args) -> dict:
    return {"prompt": PROMPT[:rng.randrange(5, len(PROMPT))], "max_tokens": rng.randint(1, args.max_tokens),
            "seed": rng.randrange(2**31), "temperature": rng.choice([0.0, 0.7, 1.0]),
            "stream": rng.random() < 0.5, "logprobs": rng.choice([None, None, 3])}


MALFORMED = [  # (name, body: raw bytes or a JSON value)
    ("broken json", b'{"prompt": "Hi", "max_tokens":'),
    ("not an object", b"[1, 2, 3]"),
    ("wrong type", {"prompt": "Hi", "max_tokens": "ten"}),
    ("NaN", b'{"prompt": "Hi", "temperature": NaN}'),
    ("huge n", {"prompt": "Hi", "n": 10**6}),
    ("out-of-vocabulary ids", {"prompt": [50257, -1, 2**40]}),
    ("200 KB prompt", {"prompt": "a " * 100_000}),
    ("500 stop strings", {"prompt": "Hi", "stop": [f"s{i}" for i in range(500)]}),
    ("logprobs 1000", {"prompt": "Hi", "logprobs": 1000}),
    ("unknown model", {"prompt": "Hi", "model": "gpt-9"}),
]


@dataclass
class Record:
    kind: str
    status: int | str  # HTTP status, or "disconnected" / "timeout" / "transport error"
    seconds: float


@dataclass
class Soak:
    records: list[Record] = field(default_factory=list)
    rss: list[tuple[float, float]] = field(default_factory=list)  # (seconds since start, MB)
    five_xx: list[str] = field(default_factory=list)


async def send(client: httpx.AsyncClient, url: str, body, abandon: bool) -> int | str:
    """POST `body`; a streamed answer is read to its end (or to its second chunk if `abandon`)."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with client.stream("POST", f"{url}/v1/completions", content=content,
                             headers={"content-type": "application/json"}) as r:
        if abandon and r.status_code == 200:
            chunks = 0
            async for line in r.aiter_lines():
                chunks += line.startswith("data: ")
                if chunks == 2:
                    return "disconnected"  # leaving the block closes the connection mid-stream
        await r.aread()
        if r.status_code >= 500:
            raise ServerError(f"{r.status_code}: {r.text[:200]}")
        return r.status_code


class ServerError(Exception):
    pass


async def one(client: httpx.AsyncClient, url: str, rng: random.Random, args, soak: Soak) -> None:
    roll = rng.random()
    if roll < args.malformed:
        kind, body = rng.choice(MALFORMED)
        abandon = False
    else:
        kind, body = "valid", valid_body(rng, args)
        abandon = roll < args.malformed + args.disconnect
        body["stream"] = body["stream"] or abandon
        kind = "abandoned stream" if abandon else "valid stream" if body["stream"] else "valid"
    start = time.perf_counter()
    try:
        status = await send(client, url, body, abandon)
    except ServerError as e:
        soak.five_xx.append(f"{kind}: {e}")
        status = int(str(e)[:3])
    except httpx.TimeoutException:
        status = "timeout"
    except httpx.TransportError:
        status = "transport error"
    soak.records.append(Record(kind, status, time.perf_counter() - start))


async def run(args, url: str, pid: int) -> tuple[Soak, str]:
    soak, t0, sent = Soak(), time.monotonic(), itertools.count()
    limits = httpx.Limits(max_connections=args.clients + 2)
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits) as client:

        async def loop(k: int) -> None:
            rng = random.Random(k)
            while time.monotonic() - t0 < args.seconds and next(sent) < args.max_requests:
                await one(client, url, rng, args, soak)

        async def watch() -> None:
            while True:
                soak.rss.append((time.monotonic() - t0, rss_mb(pid)))
                await asyncio.sleep(args.rss_every)

        watcher = asyncio.create_task(watch())
        clients = [asyncio.create_task(loop(k)) for k in range(args.clients)]
        await asyncio.sleep(min(args.seconds / 2, 5))
        under_load = await seeded_text(client, url)
        await asyncio.gather(*clients)
        watcher.cancel()
        soak.rss.append((time.monotonic() - t0, rss_mb(pid)))
    return soak, under_load


async def seeded_text(client: httpx.AsyncClient, url: str) -> str:
    r = await client.post(f"{url}/v1/completions", json=SEEDED)
    return r.json()["choices"][0]["text"]


# --- the report ---------------------------------------------------------------------------------

def summary(args, soak: Soak, alone: str, under_load: str, start_rss: float, exit_code) -> dict:
    latency = [r.seconds for r in soak.records if r.kind.startswith("valid") and r.status == 200]
    warm = [mb for t, mb in soak.rss if t >= args.warmup]
    after_warmup = warm[0] if warm else soak.rss[-1][1]
    return {
        "requests": len(soak.records),
        "by_status": dict(Counter(str(r.status) for r in soak.records).most_common()),
        "by_kind": dict(Counter(f"{r.kind} -> {r.status}" for r in soak.records).most_common()),
        "five_xx": soak.five_xx[:20],
        "latency_s": {"p50": percentile(latency, 50), "p99": percentile(latency, 99)},
        "rss_mb": {"start": start_rss, "after_warmup": after_warmup, "end": soak.rss[-1][1],
                   "max_after_warmup": max(warm, default=after_warmup)},
        "rss_growth_after_warmup": soak.rss[-1][1] / after_warmup - 1,
        "rss_series": [(round(t, 1), round(mb, 1)) for t, mb in soak.rss],
        "seeded_same_under_load": alone == under_load,
        "sigterm_exit": exit_code,
    }


def print_report(args, s: dict, server_cmd: list[str], complaints: list[str]) -> None:
    print(machine_header(os.cpu_count() or 1))
    print(f"soak: {args.clients} clients, {args.seconds:g} s, {args.size} shape with {args.layers} layers, "
          f"malformed {args.malformed:.0%}, abandoned streams {args.disconnect:.0%}")
    print(f"requests: {s['requests']}; by status: {s['by_status']}")
    for kind, count in s["by_kind"].items():
        print(f"  {kind}: {count}")
    print(f"5xx: {len(s['five_xx'])} {s['five_xx'][:3]}")
    print(f"latency of valid 200s: p50 {s['latency_s']['p50']:.3f} s, p99 {s['latency_s']['p99']:.3f} s")
    rss = s["rss_mb"]
    print(f"server RSS (MB): start {rss['start']:.0f}, after warm-up ({args.warmup:g} s) "
          f"{rss['after_warmup']:.0f}, end {rss['end']:.0f}, max after warm-up {rss['max_after_warmup']:.0f} "
          f"({s['rss_growth_after_warmup']:+.1%} from warm-up to end)")
    print(f"seeded request: same text alone and under load: {s['seeded_same_under_load']}")
    print(f"SIGTERM: exit {s['sigterm_exit']}; server log: {len(complaints)} lines with errors or warnings")
    for line in complaints[:5]:
        print(f"  {line}")
    print(f"command: python {shlex.join(sys.argv)}")
    env = " ".join(args.server_env)
    print(f"server:  {env + ' ' if env else ''}{shlex.join(['python', *server_cmd[1:]])}")


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the server
    with tempfile.TemporaryDirectory(prefix="soak_server-") as tmp:
        folder, log_path = Path(tmp) / "model", Path(tmp) / "server.log"
        build_model_folder(args.size, args.layers, folder)
        url = f"http://127.0.0.1:{(port := free_port())}"
        with open(log_path, "wb") as log:
            proc, server_cmd = start_server(args, folder, port, log)
            try:
                wait_healthy(proc, url, log_path, 180)
                alone = httpx.post(f"{url}/v1/completions", json=SEEDED, timeout=60).json()["choices"][0]["text"]
                start_rss = rss_mb(proc.pid)
                soak, under_load = asyncio.run(run(args, url, proc.pid))
                if httpx.get(f"{url}/health", timeout=10).status_code != 200:
                    fail("the server did not answer /health after the soak", log_path)
            finally:
                stop_server(proc)
        s = summary(args, soak, alone, under_load, start_rss, proc.returncode)
        # Routine 4xx access lines are expected here; only errors and warnings are worth showing.
        complaints = [line for line in server_complaints(log_path) if "HTTP/1.1" not in line]
        print_report(args, s, server_cmd, complaints)
    if args.json:
        args.json.write_text(json.dumps(s, indent=2) + "\n")
    clean = proc.returncode in (0, -signal.SIGTERM)
    return 0 if not s["five_xx"] and s["seeded_same_under_load"] and clean else 1


if __name__ == "__main__":
    sys.exit(main())
