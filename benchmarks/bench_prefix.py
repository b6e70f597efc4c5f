"""Prefix caching: time to first token of requests sharing a long prompt start, cache on vs off.

    python benchmarks/bench_prefix.py                       # 124M shape, 16 requests, 512 + 16 tokens
    python benchmarks/bench_prefix.py --size tiny --prefix 48 --rounds 2

Random weights of a GPT-2 shape are served by two `python -m gpt2kit serve` processes on
loopback, one with `--prefix-cache-mb 0` (off), one with the default cache. Each round sends
--requests streamed requests at once to one server, then the same requests to the other (which
goes first alternates: the machine is shared, so only interleaved ratios mean anything). Every
prompt is the same --prefix token ids followed by --suffix ids of its own (new ones each round),
greedy, <|endoftext|> ignored. Round 1 is "cold" (the cache has not seen the prefix yet: one
request of the burst computes it, the others reuse it); later rounds are "warm". TTFT is the time
from sending a request to its first text chunk. The texts of both servers are compared too.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from bench_serve import (
    Record,
    build_model_folder,
    free_port,
    one_request,
    percentile,
    stop_server,
    wait_healthy,
)
from machine import machine_header

SERVED_NAME = "bench"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="gpt2", help="shape preset (default gpt2 = 124M; tiny for a check)")
    p.add_argument("--requests", type=int, default=16, help="requests sent at once (default 16)")
    p.add_argument("--prefix", type=int, default=512, help="shared prompt start in tokens (default 512)")
    p.add_argument("--suffix", type=int, default=16, help="each request's own tokens after it (default 16)")
    p.add_argument("--max-tokens", type=int, default=4, help="new tokens per request (default 4)")
    p.add_argument("--rounds", type=int, default=3, help="bursts per server (default 3; the first is cold)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take")
    p.add_argument("--startup-timeout", type=float, default=240.0, help="seconds to wait for /health")
    args = p.parse_args()
    if min(args.requests, args.prefix, args.suffix, args.max_tokens, args.rounds) < 1:
        p.error("--requests, --prefix, --suffix, --max-tokens and --rounds must be at least 1")
    return args


def start(folder: Path, port: int, cache_mb: int | None, log) -> tuple[subprocess.Popen, list[str]]:
    cmd = [sys.executable, "-m", "gpt2kit", "serve", "-m", str(folder), "--device", "cpu", "--port", str(port),
           "--served-model-name", SERVED_NAME, "--shutdown-timeout", "2"]
    cmd += [] if cache_mb is None else ["--prefix-cache-mb", str(cache_mb)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return proc, cmd


def prompts(args, round_: int) -> list[list[int]]:
    """The shared prefix (the same every round) and this round's distinct suffixes, as token ids."""
    import torch
    prefix = torch.randint(0, 50000, (args.prefix,), generator=torch.Generator().manual_seed(0)).tolist()
    own = torch.randint(0, 50000, (args.requests, args.suffix), generator=torch.Generator().manual_seed(1 + round_))
    return [prefix + row for row in own.tolist()]


def body(args, ids: list[int], stream: bool) -> dict:
    return {"model": SERVED_NAME, "prompt": ids, "max_tokens": args.max_tokens, "temperature": 0,
            "stream": stream, "ignore_eos": True, **({"stream_options": {"include_usage": True}} if stream else {})}


async def burst(args, url: str, batch: list[list[int]]) -> tuple[list[Record], list[str]]:
    """Send every prompt at once, streamed (timed); then again, not streamed, for the texts."""
    limits = httpx.Limits(max_connections=len(batch) + 1)
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits) as client:
        t0 = time.perf_counter()
        records = await asyncio.gather(*(one_request(client, url, body(args, ids, True), t0, args.timeout)
                                         for ids in batch))
        if failed := [r.error for r in records if r.error]:
            raise SystemExit(f"error: {len(failed)} requests failed, the first: {failed[0]}")
        answers = await asyncio.gather(*(client.post(f"{url}/v1/completions", json=body(args, ids, False))
                                         for ids in batch))
    return records, [a.json()["choices"][0]["text"] for a in answers]


def ttfts(results: tuple[list[Record], list[str]]) -> list[float]:
    return [rec.first - rec.start for rec in results[0]]


def report(args, rounds: list[dict[str, list]], cmds: dict[str, list[str]]) -> None:
    print(machine_header(os.cpu_count() or 1))
    print(f"\nprefix caching, {args.size} shape, random weights, cpu float32, {args.requests} requests "
          f"at once, {args.prefix}-token shared prefix + {args.suffix} tokens each, {args.max_tokens} "
          "new tokens (greedy); shared machine, servers interleaved")
    print("| round | TTFT off p50 / max (s) | TTFT on p50 / max (s) | off / on (p50) | same texts |")
    print("| --- | --- | --- | --- | --- |")
    warm = []
    for k, r in enumerate(rounds):
        off, on = ttfts(r["off"]), ttfts(r["on"])
        ratio = percentile(off, 50) / percentile(on, 50)
        same = sum(a == b for a, b in zip(r["off"][1], r["on"][1]))
        warm += [ratio] if k else []
        print(f"| {k + 1} ({'cold' if k == 0 else 'warm'}) | {percentile(off, 50):.2f} / {max(off):.2f} | "
              f"{percentile(on, 50):.2f} / {max(on):.2f} | {ratio:.1f}x | {same}/{len(off)} |")
    if warm:
        print(f"\nwarm rounds, TTFT p50 off / on: {', '.join(f'{x:.1f}x' for x in warm)}")
    print(f"\ncommand: python {shlex.join(sys.argv)}")
    for name, cmd in cmds.items():
        print(f"server {name}: {shlex.join(['python', *cmd[1:]])}")


def main():
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the servers
    with tempfile.TemporaryDirectory(prefix="bench_prefix-") as tmp:
        folder = Path(tmp) / "model"
        build_model_folder(args.size, folder)
        servers, cmds, urls = {}, {}, {}
        try:
            for name, mb in (("off", 0), ("on", None)):
                log_path = Path(tmp) / f"{name}.log"
                port = free_port()
                servers[name], cmds[name] = start(folder, port, mb, open(log_path, "wb"))
                urls[name] = f"http://127.0.0.1:{port}"
                wait_healthy(servers[name], urls[name], log_path, args.startup_timeout)
            warm_up = [list(range(7))]  # kernels' first calls, outside the timed rounds
            for name in servers:
                asyncio.run(burst(args, urls[name], warm_up))
            rounds = []
            for k in range(args.rounds):
                batch = prompts(args, k)
                order = ("off", "on") if k % 2 == 0 else ("on", "off")
                results = {}
                for name in order:
                    print(f"round {k + 1}: {name} ...", file=sys.stderr, flush=True)
                    results[name] = asyncio.run(burst(args, urls[name], batch))
                rounds.append(results)
        finally:
            for proc in servers.values():
                stop_server(proc)
        report(args, rounds, cmds)


if __name__ == "__main__":
    main()
