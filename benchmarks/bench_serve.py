"""Continuous batching: tokens/s of the real server under N concurrent streaming clients vs one.

    python benchmarks/bench_serve.py                            # 124M shape, 16 clients, 60 s per mode
    python benchmarks/bench_serve.py --size tiny --seconds 10 --clients 4
    python benchmarks/bench_serve.py --requests 2               # 2 requests per client, no time bound
    python benchmarks/bench_serve.py --device cuda --dtype bfloat16

Random weights of a GPT-2 shape are saved as a Hugging Face folder and served by
`python -m gpt2kit serve` in a subprocess (its own GIL, torch's default threads), on loopback.
After one warm-up request, --clients clients each stream completions in a loop (a fixed short
prompt, --max-tokens new tokens, <|endoftext|> ignored, temperature 1, a distinct seed per
request); then the same requests are sent by one client, one at a time. A client starts requests
until --seconds have passed (or it has sent --requests), and requests in flight then finish, so
a mode's time runs from its start to its last response. Tokens are the server's usage counts of
completed requests (each exactly --max-tokens); chunks are the text events streamed. TTFT is the
time to the first text chunk; "mean running" is the server's batch as sampled from /health.
Absolute numbers on a shared machine are noise; the ratio is the result.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from gpt2kit.runtime import device_option

PROMPT = "The old lighthouse keeper climbed the stairs one last time, carrying a lamp and a letter"
SERVED_NAME = "bench"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="gpt2", help="shape preset (default gpt2 = 124M; tiny for a check)")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    p.add_argument("--seconds", type=float, default=60.0, help="time each mode starts requests (default 60)")
    p.add_argument("--requests", type=int, default=None,
                   help="instead of --seconds: requests per client (the sequential mode sends them all)")
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per request (default 64)")
    p.add_argument("--max-batch", type=int, default=None, help="the server's --max-batch (default: its 16)")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds a request may take, and a stream may stay silent (default 120)")
    p.add_argument("--startup-timeout", type=float, default=180.0, help="seconds to wait for /health")
    p.add_argument("--device", default="cpu", type=device_option, help="the server's --device (default cpu; cuda on a GPU)")
    p.add_argument("--dtype", default="auto", help="the server's --dtype (default auto)")
    args = p.parse_args()
    if args.clients < 1 or args.max_tokens < 1 or (args.requests is not None and args.requests < 1):
        p.error("--clients, --max-tokens and --requests must be at least 1")
    return args


# --- the model and the server -----------------------------------------------------------------

def build_model_folder(size: str, folder: Path) -> int:
    """Save random weights of the `size` shape (with the GPT-2 tokenizer) and check they load;
    returns the prompt's length in tokens."""
    import torch

    import gpt2kit
    from gpt2kit.checkpoints.hf import save_hf
    from gpt2kit.config import ModelConfig
    torch.manual_seed(0)
    save_hf(gpt2kit.GPT(ModelConfig.preset(size)), folder, tokenizer=gpt2kit.Tokenizer.default())
    model = gpt2kit.load(folder, device="cpu")
    return len(model.tokenizer.encode(PROMPT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, folder: Path, port: int, log) -> tuple[subprocess.Popen, list[str]]:
    cmd = [sys.executable, "-m", "gpt2kit", "serve", "-m", str(folder), "--device", args.device,
           "--dtype", args.dtype, "--port", str(port), "--served-model-name", SERVED_NAME, "--shutdown-timeout", "2"]
    if args.max_batch is not None:
        cmd += ["--max-batch", str(args.max_batch)]
    # Its own session: a Ctrl-C here reaches the server only through stop_server.
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return proc, cmd


def wait_healthy(proc: subprocess.Popen, url: str, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            fail(f"the server exited with code {proc.returncode} before answering /health", log_path)
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    fail(f"the server did not answer {url}/health within {timeout:.0f} s", log_path)


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()  # SIGTERM: uvicorn's graceful shutdown, then the scheduler stops
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def log_tail(log_path: Path, lines: int = 30) -> str:
    return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])


def fail(message: str, log_path: Path):
    raise SystemExit(f"error: {message}; the server's log ends with:\n{log_tail(log_path)}")


def server_complaints(log_path: Path) -> list[str]:
    """Log lines that are not routine: errors, tracebacks, warnings and non-200 responses."""
    return [line for line in log_path.read_text(errors="replace").splitlines()
            if any(word in line for word in ("ERROR", "Traceback", "WARNING", "Exception"))
            or ("HTTP/1.1" in line and '" 200' not in line)]


# --- the clients --------------------------------------------------------------------------------

@dataclass
class Record:
    """One request as the client saw it (seconds since the mode started)."""

    start: float
    first: float | None = None  # first text chunk
    end: float | None = None  # [DONE] received
    chunks: int = 0
    tokens: int = 0  # the server's usage.completion_tokens
    error: str | None = None


@dataclass
class Mode:
    clients: int
    records: list[Record] = field(default_factory=list)
    running: list[int] = field(default_factory=list)  # /health samples of the server's batch
    seconds: float = 0.0


async def one_request(client: httpx.AsyncClient, url: str, body: dict, t0: float, timeout: float) -> Record:
    rec = Record(start=time.perf_counter() - t0)
    try:
        async with asyncio.timeout(timeout):
            async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    rec.error = f"HTTP {response.status_code}: {response.text[:200]}"
                    return rec
                await read_events(response, rec, t0)
    except TimeoutError:
        rec.error = f"timeout after {timeout:.0f} s ({rec.chunks} chunks received)"
    except httpx.HTTPError as e:
        rec.error = f"{type(e).__name__}: {e} ({rec.chunks} chunks received)"
    if rec.error is None and rec.end is None:
        rec.error = f"stream ended without [DONE] after {rec.chunks} chunks"
    return rec


async def read_events(response: httpx.Response, rec: Record, t0: float) -> None:
    async for line in response.aiter_lines():
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            rec.end = time.perf_counter() - t0
            return
        event = json.loads(line[len("data: "):])
        if "error" in event:
            rec.error = f"error event: {json.dumps(event['error'])[:200]}"
            return
        if event.get("choices") and event["choices"][0]["text"]:
            rec.chunks += 1
            if rec.first is None:
                rec.first = time.perf_counter() - t0
        if event.get("usage"):
            rec.tokens = event["usage"]["completion_tokens"]


def request_body(seed: int, max_tokens: int) -> dict:
    return {"model": SERVED_NAME, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 1.0,
            "seed": seed, "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}


async def run_mode(args, url: str, clients: int, per_client: int | None) -> Mode:
    """`clients` loops, each sending requests until the time is up (or `per_client` are sent);
    seeds 0, 1, 2, ... in order of sending, so both modes send the same requests."""
    mode, seeds = Mode(clients), itertools.count()
    t0 = time.perf_counter()
    limits = httpx.Limits(max_connections=clients + 1, max_keepalive_connections=clients + 1)
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits) as client:

        async def loop():
            for sent in itertools.count():
                if (per_client is not None and sent >= per_client) or \
                        (per_client is None and time.perf_counter() - t0 >= args.seconds):
                    return
                body = request_body(next(seeds), args.max_tokens)
                rec = await one_request(client, url, body, t0, args.timeout)
                mode.records.append(rec)
                if rec.error and rec.error.startswith("HTTP 503"):
                    await asyncio.sleep(1.0)  # the server's Retry-After

        watcher = asyncio.create_task(watch_load(client, url, mode))
        await asyncio.gather(*(loop() for _ in range(clients)))
        mode.seconds = time.perf_counter() - t0
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    return mode


async def watch_load(client: httpx.AsyncClient, url: str, mode: Mode) -> None:
    while True:
        try:
            mode.running.append((await client.get(f"{url}/health", timeout=5)).json()["running"])
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        await asyncio.sleep(0.5)


async def warm_up(args, url: str, log_path: Path) -> None:
    async with httpx.AsyncClient(timeout=args.timeout) as client:
        rec = await one_request(client, url, request_body(12345, 8), time.perf_counter(), args.timeout)
    if rec.error:
        fail(f"the warm-up request failed: {rec.error}", log_path)


# --- the report -----------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); nan for no values."""
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summarize(mode: Mode, max_tokens: int) -> dict:
    done = [r for r in mode.records if r.error is None]
    short = [r for r in done if r.tokens != max_tokens]
    ttft = [r.first - r.start for r in done if r.first is not None]
    latency = [r.end - r.start for r in done]
    return {
        "done": len(done), "errors": len(mode.records) - len(done), "short": len(short),
        "tok_s": sum(r.tokens for r in done) / mode.seconds,
        "chunks": sum(r.chunks for r in done) / max(len(done), 1),
        "ttft": [percentile(ttft, q) for q in (50, 90)],
        "latency": [percentile(latency, q) for q in (50, 90, 99)],
        "running": sum(mode.running) / max(len(mode.running), 1),
    }


def print_report(args, modes: dict[str, Mode], prompt_tokens: int, server_cmd: list[str],
                 complaints: list[str]) -> None:
    stats = {name: summarize(mode, args.max_tokens) for name, mode in modes.items()}
    bound = f"{args.requests} requests per client" if args.requests else f"{args.seconds:g} s per mode"
    print(f"\nserve, {args.size} shape, random weights, {prompt_tokens}-token prompt, {args.max_tokens} "
          f"new tokens (ignore_eos), temperature 1, cpu float32, server max_batch "
          f"{args.max_batch or 'default (16)'}, torch default threads ({os.cpu_count()} cores), {bound}")
    print("| mode | clients | requests done | errors | tokens/s | chunks/request | TTFT p50 / p90 (s) "
          "| latency p50 / p90 / p99 (s) | mean running |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, s in stats.items():
        print(f"| {name} | {modes[name].clients} | {s['done']} | {s['errors']} | {s['tok_s']:.1f} | "
              f"{s['chunks']:.1f} | {' / '.join(f'{v:.2f}' for v in s['ttft'])} | "
              f"{' / '.join(f'{v:.2f}' for v in s['latency'])} | {s['running']:.1f} |")
    sequential = stats["sequential"]["tok_s"]
    ratio = stats["concurrent"]["tok_s"] / sequential if sequential else float("nan")
    print(f"\nconcurrent / sequential tokens/s: {ratio:.2f}x")
    for name, mode in modes.items():
        errors = Counter(r.error for r in mode.records if r.error)
        if errors or stats[name]["short"]:
            print(f"{name}: {stats[name]['short']} completed requests with a token count other than "
                  f"{args.max_tokens}; errors: {dict(errors)}")
    print(f"server log: {len(complaints)} lines with errors, warnings or non-200 responses")
    for line in complaints[:10]:
        print(f"  {line}")
    print(f"\ncommand: python {shlex.join(sys.argv)}")
    print(f"server:  {shlex.join(['python', *server_cmd[1:]])}")


def main():
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the server
    with tempfile.TemporaryDirectory(prefix="bench_serve-") as tmp:
        folder, log_path = Path(tmp) / "model", Path(tmp) / "server.log"
        prompt_tokens = build_model_folder(args.size, folder)
        url = f"http://127.0.0.1:{(port := free_port())}"
        with open(log_path, "wb") as log:
            proc, server_cmd = start_server(args, folder, port, log)
            try:
                wait_healthy(proc, url, log_path, args.startup_timeout)
                asyncio.run(warm_up(args, url, log_path))
                modes = {}
                for name, clients in (("concurrent", args.clients), ("sequential", 1)):
                    per_client = None if args.requests is None else args.requests * args.clients // clients
                    print(f"{name}: {clients} client(s) ...", file=sys.stderr, flush=True)
                    modes[name] = asyncio.run(run_mode(args, url, clients, per_client))
                if proc.poll() is not None:
                    fail(f"the server exited with code {proc.returncode} during the run", log_path)
            finally:
                stop_server(proc)
        print_report(args, modes, prompt_tokens, server_cmd, server_complaints(log_path))


if __name__ == "__main__":
    main()
