"""Cold start: whole processes, from the interpreter's start to 20 generated tokens, gpt2kit vs
transformers on the same random GPT-2 weights (safetensors), in one run; and `gpt2kit --help`.

    python benchmarks/bench_coldstart.py                 # 124M shape, 5 interleaved rounds
    python benchmarks/bench_coldstart.py --device cuda

Each measurement is a fresh `python -c` process: import the library, load the folder (and its
tokenizer), encode a prompt, generate 20 tokens greedily, print them. The OS file cache is warm
for both (one unmeasured round first), as it is for anyone who runs a model twice. The table
shows wall seconds, median (min-max), and the ratio of medians; it also reports the memory the
model and its use added to each process (resident memory at the end minus resident memory after
the imports) over the weight bytes. Two floor rows bound what any loader could reach: a process
that only imports torch, and one that also decodes the 20 tokens with gpt2kit's model on weights
already in memory (zeros: no file, no tokenizer; packed as gpt2kit.load packs).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpt2kit.runtime import device_option

PROGRAMS = {
    "gpt2kit": """
import gpt2kit, torch
{rss}
model = gpt2kit.load({folder!r}, device={device!r})
print(model.generate("Hello, my name is", max_new_tokens=20, temperature=0, stop_at_eos=False)[0])
""",
    "transformers": """
import torch, transformers
{rss}
tokenizer = transformers.AutoTokenizer.from_pretrained({folder!r})
model = transformers.AutoModelForCausalLM.from_pretrained({folder!r}).to({device!r}).eval()
ids = tokenizer("Hello, my name is", return_tensors="pt").input_ids.to({device!r})
with torch.inference_mode():
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20,
                         min_new_tokens=20, do_sample=False, pad_token_id=0)
print(tokenizer.decode(out[0, ids.shape[1]:]))
""",
    "gpt2kit --help": None,
    # What no loader can save: the torch import, and the 20 tokens on weights already in memory
    # (zeros: no file, no tokenizer), packed for oneDNN as gpt2kit.load does (0.2 s that more
    # than pays for itself over 20 tokens).
    "floor: import torch": "import torch\n{rss}\n",
    "floor: import torch + 20 tokens": """
import torch
from gpt2kit.checkpoints.hf import meta_model
from gpt2kit.config import ModelConfig
from gpt2kit.inference.running_batch import RunningBatch
from gpt2kit.kernels.packed_linear import prepare_for_inference
{rss}
model = meta_model(ModelConfig.preset({size!r}))
zeros = {{k: torch.zeros(v.shape, device={device!r}) for k, v in model.state_dict().items() if k != "lm_head.weight"}}
model.load_state_dict(zeros, strict=False, assign=True)
model.tie_weights()
prepare_for_inference(model.eval())
with torch.inference_mode():
    batch = RunningBatch(model, 1, max_len=32)
    batch.join([0], [[15496, 11, 616, 1438, 318]])  # "Hello, my name is"
    for _ in range(19):
        batch.decode([int(batch.logits[0].argmax())])
""",
}
RSS = "print('VmRSS', [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmRSS')][0])"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="gpt2", help="model shape preset (default gpt2 = 124M)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu", type=device_option)
    return p.parse_args()


def run(name: str, folder: str, device: str, size: str) -> tuple[float, int | None]:
    """(wall seconds, kB resident at the end minus after the imports, or None) of one process."""
    if PROGRAMS[name] is None:
        cmd = [sys.executable, "-m", "gpt2kit", "--help"]
    else:
        cmd = [sys.executable, "-c", PROGRAMS[name].format(folder=folder, device=device, size=size, rss=RSS) + RSS]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{name} failed:\n{done.stderr[-2000:]}")
    rss = [int(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("VmRSS")]
    return seconds, rss[1] - rss[0] if rss else None


def main():
    args = parse_args()
    import torch
    import transformers

    import gpt2kit
    from gpt2kit.config import ModelConfig
    shape = ModelConfig.preset(args.size)
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        hf_cfg = transformers.GPT2Config(n_layer=shape.n_layer, n_head=shape.n_head, n_embd=shape.n_embd)
        transformers.GPT2LMHeadModel(hf_cfg).save_pretrained(folder)
        gpt2kit.Tokenizer.default().save(folder)
        weight_kb = (Path(folder) / "model.safetensors").stat().st_size / 1024
        for name in PROGRAMS:  # warm the file cache and the interpreter's bytecode caches
            run(name, folder, args.device, args.size)
        results = {name: [] for name in PROGRAMS}
        for _ in range(args.repeats):
            for name in PROGRAMS:
                results[name].append(run(name, folder, args.device, args.size))
    print(f"\ncold start, {args.size} shape, {args.device}: wall seconds per process, median of "
          f"{args.repeats} (min-max); resident memory added after the imports, over the weights' "
          f"{weight_kb / 1024:.0f} MB")
    print("| program | seconds | speed vs transformers | added memory / weights |\n| --- | --- | --- | --- |")
    base = statistics.median(s for s, _ in results["transformers"])
    for name, runs in results.items():
        secs = [s for s, _ in runs]
        added = [kb for _, kb in runs if kb is not None]
        memory = f"{statistics.median(added) / weight_kb:.2f}x" if added else "-"
        print(f"| {name} | {statistics.median(secs):.2f} ({min(secs):.2f}-{max(secs):.2f}) | "
              f"{base / statistics.median(secs):.2f}x | {memory} |")


if __name__ == "__main__":
    main()
