"""Several LoRA adapters on one server: tokens/s of requests for the base, one adapter, or a mix.

    python benchmarks/bench_adapters.py                  # 124M shape, 16 clients, 2 adapters
    python benchmarks/bench_adapters.py --size tiny --requests 1

Random weights of a GPT-2 shape and two random LoRA adapters of it ("attn": rank 8 on c_attn;
"all": rank 16 on c_attn, c_proj, c_fc) are served by one `python -m gpt2kit serve --lora ...`
on loopback. Each mode sends --clients streams at once, --requests each, one after another:
"base" (every client asks the base), "attn" and "all" (every client asks that adapter), and
"mixed" (clients take base, attn, all in turn: rows of all three share the batch). Modes are
interleaved over --rounds rounds (the machine is shared: compare ratios, not absolute numbers).
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
from bench_serve import build_model_folder, free_port, one_request, stop_server, wait_healthy
from machine import machine_header

ADAPTERS = {"attn": (8, ("c_attn",)), "all": (16, ("c_attn", "c_proj", "c_fc"))}
MODES = {"base": ["base"], "attn": ["attn"], "all": ["all"], "mixed": ["base", "attn", "all"]}
PROMPT = "The old lighthouse keeper climbed the stairs one last time, carrying a lamp and a letter"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="gpt2", help="shape preset (default gpt2 = 124M; tiny for a check)")
    p.add_argument("--clients", type=int, default=16, help="concurrent streams (default 16)")
    p.add_argument("--requests", type=int, default=2, help="requests per client per mode (default 2)")
    p.add_argument("--max-tokens", type=int, default=32, help="new tokens per request (default 32)")
    p.add_argument("--rounds", type=int, default=2, help="times each mode runs, interleaved (default 2)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take")
    return p.parse_args()


def write_adapters(base: Path, root: Path) -> dict[str, Path]:
    """Random adapters of the model in `base` (B not zero, so they change what it computes)."""
    import torch

    from gpt2kit.checkpoints import load_model
    from gpt2kit.config import LoraConfig
    from gpt2kit.lora import apply_lora, save_adapter
    folders = {}
    for k, (name, (rank, targets)) in enumerate(ADAPTERS.items()):
        model = load_model(str(base), torch.device("cpu"), torch.float32).model
        cfg = LoraConfig(rank=rank, alpha=2 * rank, targets=targets)
        apply_lora(model, cfg)
        torch.manual_seed(k)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if pname.endswith("lora_B.weight"):
                    p.normal_(0, 0.02)
        save_adapter(model, cfg, root / name, base=str(base))
        folders[name] = root / name
    return folders


async def run_mode(args, url: str, models: list[str]) -> tuple[int, float]:
    """(tokens generated, seconds) for --clients streams, client c asking models[c % len]."""
    limits = httpx.Limits(max_connections=args.clients + 1)
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits) as client:
        t0 = time.perf_counter()

        async def loop(c: int) -> int:
            tokens = 0
            for r in range(args.requests):
                body = {"model": models[c % len(models)], "prompt": PROMPT, "max_tokens": args.max_tokens,
                        "temperature": 1.0, "seed": c * 1000 + r, "stream": True, "ignore_eos": True,
                        "stream_options": {"include_usage": True}}
                rec = await one_request(client, url, body, t0, args.timeout)
                if rec.error:
                    raise SystemExit(f"error: a request failed: {rec.error}")
                tokens += rec.tokens
            return tokens

        tokens = sum(await asyncio.gather(*(loop(c) for c in range(args.clients))))
        return tokens, time.perf_counter() - t0


def main():
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the server
    with tempfile.TemporaryDirectory(prefix="bench_adapters-") as tmp:
        folder, log_path = Path(tmp) / "model", Path(tmp) / "server.log"
        build_model_folder(args.size, folder)
        adapters = write_adapters(folder, Path(tmp))
        port = free_port()
        cmd = [sys.executable, "-m", "gpt2kit", "serve", "-m", str(folder), "--device", "cpu", "--port", str(port),
               "--served-model-name", "base", "--shutdown-timeout", "2"]
        cmd += [arg for name, path in adapters.items() for arg in ("--lora", f"{name}={path}")]
        proc = subprocess.Popen(cmd, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        results: dict[str, list[float]] = {name: [] for name in MODES}
        try:
            wait_healthy(proc, url, log_path, 240)
            warm_up = argparse.Namespace(**{**vars(args), "clients": 3, "requests": 1})  # first calls, untimed
            asyncio.run(run_mode(warm_up, url, MODES["mixed"]))
            for k in range(args.rounds):
                for name in (list(MODES) if k % 2 == 0 else list(MODES)[::-1]):
                    print(f"round {k + 1}: {name} ...", file=sys.stderr, flush=True)
                    tokens, seconds = asyncio.run(run_mode(args, url, MODES[name]))
                    results[name].append(tokens / seconds)
        finally:
            stop_server(proc)
    print(machine_header(os.cpu_count() or 1))
    print(f"\nLoRA adapters on one server, {args.size} shape, random weights, cpu float32, {args.clients} "
          f"streams at once x {args.requests} requests, {args.max_tokens} new tokens; shared machine, modes interleaved")
    print("| mode | tokens/s per round | vs base |")
    print("| --- | --- | --- |")
    base = sum(results["base"]) / len(results["base"])
    for name, values in results.items():
        mean = sum(values) / len(values)
        print(f"| {name} | {' / '.join(f'{v:.1f}' for v in values)} | {mean / base:.2f}x |")
    print(f"\ncommand: python {shlex.join(sys.argv)}")
    print(f"server:  {shlex.join(['python', *cmd[1:]])}")


if __name__ == "__main__":
    main()
