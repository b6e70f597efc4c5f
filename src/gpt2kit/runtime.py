"""Every device and dtype decision in one place, so the CPU and CUDA paths cannot drift apart:
device and dtype resolution, training precision (autocast, loss scaling), seeded generators.
(The kernels these choices lead to live in kernels/.)

"auto" means: CUDA when present, else CPU. For inference weights: bfloat16 on a CUDA device that
supports it (float16 on older GPUs), float32 on CPU (the documented parity with transformers'
float32 logits). For training: float32 weights and optimizer state with bfloat16 autocast on a CUDA
device or a CPU with native bfloat16 arithmetic (AVX512-BF16 or AMX, where its products run ~4x
float32's), float16 with loss scaling on older GPUs, plain float32 on other CPUs (bfloat16 emulated
in software would only be slower).
"""

from __future__ import annotations

import argparse
import contextlib
import functools

import torch

from .errors import DeviceError

DEVICES = ("auto", "cpu", "cuda")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device for `name` ("auto", "cpu", "cuda" or "cuda:N"), checked to exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name} was requested but no CUDA GPU is available here; "
                              "use --device cpu (or auto)")
        try:
            device = torch.device(name)
        except RuntimeError:
            raise DeviceError(f"--device {name!r} is not a valid device; use cuda or cuda:N") from None
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) here")
        return device
    raise DeviceError(f"--device must be one of {', '.join(DEVICES)} (or cuda:N), got {name!r}")


def device_option(name: str) -> str:
    """An argparse `type` for a --device option (the benchmark scripts): `name` if
    resolve_device accepts it on this machine, else argparse's one-line usage error."""
    try:
        resolve_device(name)
    except DeviceError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return name


def resolve_dtype(name: str | torch.dtype, device: torch.device) -> torch.dtype:
    """The parameter dtype for `name` ("auto", "float32", "bfloat16", "float16") on `device`."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in DTYPES:
        raise DeviceError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
    if device.type == "cpu" and DTYPES[name] == torch.float16:
        raise DeviceError("--dtype float16 is not supported on CPU (too slow and inaccurate there); "
                          "use float32 or bfloat16")
    return DTYPES[name]


# ---- what this CPU's matrix engines can do (torch's own probes: right on any OS) -------------

NATIVE_BFLOAT16 = ("amx", "avx512_bf16")


@functools.cache
def cpu_bfloat16() -> str | None:
    """How this CPU runs oneDNN's bfloat16 matrix products: "amx" (tile units: a 512-row product
    ~4x float32's on this project's CPUs), "avx512_bf16" (native dot products), "emulated"
    (converted on the vector units: correct, slower than float32), or None (oneDNN has no
    bfloat16 kernels here)."""
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return None
    if not cpu_has("_is_avx512_bf16_supported"):
        return "emulated"
    return "amx" if cpu_has("_is_amx_tile_supported") else "avx512_bf16"


def cpu_has_bf16() -> bool:
    """Native bfloat16 products here: where bfloat16 is faster than float32, not slower."""
    return cpu_bfloat16() in NATIVE_BFLOAT16


def cpu_has(probe: str) -> bool:
    """torch.cpu's private feature probe `probe` (e.g. "_is_vnni_supported"); absent means no."""
    return getattr(torch.cpu, probe, lambda: False)()


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    """A private random stream: sampling never touches (or depends on) the global RNG."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


# --- training precision ---------------------------------------------------------------------

def precision(name: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether to scale the loss). Weights and AdamW stay float32.
    "auto" is bfloat16 autocast on CUDA and on CPUs with native bfloat16 (`cpu_has_bf16`), plain
    float32 on other CPUs, float16 with loss scaling on GPUs without bfloat16 (fp16's narrow
    range underflows small gradients)."""
    if name == "auto":
        name = auto_training_dtype(device)
    dtype = resolve_dtype(name, device)
    return (None, False) if dtype == torch.float32 else (dtype, dtype == torch.float16)


def auto_training_dtype(device: torch.device) -> str:
    """What `--dtype auto` trains in on `device` (see `precision`)."""
    if device.type == "cpu":
        return "bfloat16" if cpu_has_bf16() else "float32"
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
