"""Cold start and resident memory (issue 5): what a whole `gpt2kit.load` + generate process
imports, and that loading leaves neither the weights file mapped nor freed heap behind."""

from __future__ import annotations

import subprocess
import sys

from gpt2kit.api import release_free_heap


def test_release_free_heap_is_safe_to_call_anywhere():
    release_free_heap()
    release_free_heap()  # nothing left to give back: still fine


def test_load_and_generate_import_nothing_heavy_and_release_the_file(tiny_folder):
    """A fresh process, as at a cold start: no torch._dynamo (~1 s), no transformers, server or
    hub code on the generate path, and the safetensors file no longer mapped after load."""
    script = f"""
import sys, gpt2kit
model = gpt2kit.load({str(tiny_folder)!r}, device="cpu")
model.generate("Hello", max_new_tokens=3, temperature=0)
heavy = [m for m in ("torch._dynamo", "transformers", "fastapi", "uvicorn", "huggingface_hub")
         if m in sys.modules]
assert not heavy, heavy
try:
    maps = open("/proc/self/maps").read()
except OSError:
    maps = ""
assert {str(tiny_folder / "model.safetensors")!r} not in maps
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-800:]
