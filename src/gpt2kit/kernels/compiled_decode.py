"""Decoding with the model's own forward compiled once over shapes that do not change from step to
step (gpt-fast's approach), so torch.compile (and CUDA graphs) capture it once.

The eager step slices the cache to the live rows and the written slots, so every step has new
shapes. Here the shapes are those of the cache: the token ids of all its rows (rows past the live
ones compute garbage nobody reads), the write slot and each row's padding as tensors, keys and
values written in place, and attention over a prefix of the slots (`Positions.keys`): on CPU the
written ones rounded up to a multiple of ATTEND_STEP, a length Dynamo compiles symbolically (one
graph for every length); on CUDA all of them, one static shape for the CUDA graphs.

`CompiledDecoder(model)` is a `running_batch.Decoder`: the API builds one for `load(compile=True)`
and hands it to every RunningBatch (prefill stays eager). It compiles `GPT.forward` itself, so
whatever modules are swapped in (packed linears, int8, LoRA) run here too; they must be in place
before the first step, since the compiled step takes the model's module tree and its weights'
shapes as fixed (they are not re-checked before each call). torch.compile runs on the first step
of each (rows, max_len) cache shape; both are rounded up to powers of two so a long-lived process
meets only a few. On CUDA the step runs under mode="reduce-overhead" (CUDA graphs).

On CPU (float32 and bfloat16), `load(compile=True)` keeps the matrices unpacked
(packed_linear.prepare_for_inference(pack=False)): at batch 1 each product is then a kernel
Inductor generates (packed_linear.PackedLinear.forward), and attention over the one query two
fused reductions (`OneQueryAttention`, swapped in for each block's `attn.core`); at larger batches
it reads the unpacked matrices through oneDNN. Measured on GPT-2 124M, float32, 2 threads
(benchmarks/RESULTS.md, 2026-12-06): as fast as the eager step at batch 1, 0.9x at batch 8;
with int8 x int8 products (kernels/int8.py) 1.45x the eager int8 step at batch 8.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from ..errors import DeviceError
from ..inference.kv_cache import KVCache
from ..model import GPT, Positions
from .argmax import fast_argmax
from .compile_log import compiling
from .one_query_attention import use_one_query_attention
from .packed_linear import PackedLinear

RECOMPILE_LIMIT = 64  # compilations of the step per model: cache shapes x dtypes
ATTEND_STEP = 16  # on CPU the step attends over the written slots rounded up to a multiple of this


class CompiledDecoder:
    """`model`'s forward for one token per row, compiled; one compilation per cache shape."""

    def __init__(self, model: GPT):
        self.model = model
        self.argmax = fast_argmax  # the sampling chain's (running_batch.Decoder)
        self.cuda = model.transformer.wpe.weight.device.type == "cuda"
        use_one_query_attention(model)  # CPU only
        # PackedLinear's oneDNN op compiles only with its weight frozen into the graph as a
        # constant. Freezing nothing else: Inductor would keep a repacked copy of every plain
        # nn.Linear weight per compilation (measured: +250 MB per shape for GPT-2 124M bfloat16).
        self.freeze = any(isinstance(m, PackedLinear) for m in model.modules())
        # Checks before every call cost ~0.6 ms of the ~7 ms int8 step of GPT-2 124M: Dynamo's
        # guards on the model's module tree and its ~200 tensors, and the compiled code's
        # assertions on their sizes. Both are fixed once the decoder exists (module docstring),
        # so those checks are dropped (the cache and token tensors stay guarded). That is sound
        # only if no other model's graphs share the cache: Dynamo keeps compiled graphs per code
        # object, hence a function of this decoder's own. `self.weights` catches weights moved
        # to another dtype or device.
        self.weights = _weights_key(model)
        self.step = torch.compile(_own_step(), fullgraph=True, dynamic=False, options={
            "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
            "size_asserts": False,
            "triton.cudagraphs": self.cuda})  # mode="reduce-overhead" on CUDA
        # Set around each call, as Dynamo reads them while tracing (compile options reach
        # Inductor only). Each (rows, max_len) shape and dtype is one more compilation of the
        # step; past Dynamo's default limit of 8, fullgraph=True would fail the step.
        self.configs = (torch._inductor.config.patch(freezing=self.freeze),
                        torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT))
        self.shapes: set[tuple[int, int]] = set()  # cache shapes compiled so far

    def cache_shape(self, capacity: int, max_len: int | None) -> tuple[int, int]:
        """The (rows, max_len) of the cache to allocate for a batch: rounded up to powers of two
        (within the context window) so that batches of nearby sizes share one compilation."""
        n_ctx = self.model.config.n_positions
        return _power_of_two(capacity), min(n_ctx, _power_of_two(max_len or n_ctx))

    def new_cache(self, capacity: int, max_len: int | None) -> KVCache:
        """A cache in `cache_shape`; on CUDA at static addresses (CUDA graphs may write into
        it in place only then; otherwise torch.compile skips the graph capture)."""
        cache = KVCache.for_model(self.model, *self.cache_shape(capacity, max_len))
        if self.cuda:
            for t in cache.tensors():
                torch._dynamo.mark_static_address(t)
        return cache

    def keys(self, start: int, max_len: int, device: torch.device) -> torch.Tensor:
        """The slots the step attends over when writing slot `start`: on CPU those up to `start`
        rounded up to a multiple of ATTEND_STEP (reading all max_len slots cost ~0.6 ms of the
        ~7 ms int8 step of GPT-2 124M at max_len 256), on CUDA all of them, one shape for the
        CUDA graphs."""
        if self.cuda:
            return _key_slots(max_len, str(device), dynamic=False)
        return _key_slots(min(max_len, -(-(start + 1) // ATTEND_STEP) * ATTEND_STEP), str(device), dynamic=True)

    def __call__(self, cache: KVCache, tokens: list[int], start: int, pads: list[int]) -> torch.Tensor:
        if _weights_key(self.model) != self.weights:
            raise DeviceError("the model's weights changed dtype or device after its compiled "
                              "decoder was made: make a new CompiledDecoder")
        device, spare = cache.device, cache.batch_size - len(tokens)
        idx = torch.tensor(tokens + [0] * spare, device=device)[:, None]  # (rows, 1)
        pad = torch.tensor(pads + [0] * spare, device=device)  # (rows,)
        slot = torch.tensor([start], device=device)  # a tensor, not an int: no recompile per step
        shape = (cache.batch_size, cache.max_len)
        announce = contextlib.nullcontext() if shape in self.shapes else compiling(
            f"the decode step for {shape[0]} row{'s' * (shape[0] > 1)} x {shape[1]} positions")
        if self.cuda:
            torch.compiler.cudagraph_mark_step_begin()
        try:
            with self.configs[0], self.configs[1], announce:
                logits = self.step(self.model, idx, cache.k, cache.v, slot, self.keys(start, cache.max_len, device), pad)
            self.shapes.add(shape)
        except torch._dynamo.exc.BackendCompilerFailed as e:  # no C++ compiler (CPU) or Triton (CUDA)
            cause = getattr(e, "inner_exception", None) or e  # str(e) ends in Dynamo's boilerplate
            first = f"{type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause).strip() else ''}"
            raise DeviceError(f"--compile could not compile the decode step ({first}); it needs a C++ "
                              "compiler on CPU or Triton on CUDA: install one, or drop --compile") from None
        logits = logits[:len(tokens)]
        # A copy on CUDA: a CUDA graph's output is overwritten by its next replay.
        return logits.to(torch.float32, copy=self.cuda)


def decode_step(model: GPT, idx, k, v, slot, keys, pad) -> torch.Tensor:
    """Logits (B, V) of the model's forward for tokens idx (B, 1) written at `slot` of the cache
    (k, v: lists of per-layer tensors, each its own graph input), attending over slots `keys`."""
    if torch.compiler.is_compiling():  # what the model's size checks need of an unbacked length
        torch._check(keys.shape[0] <= k[0].shape[2])
    return model(idx, KVCache(k, v), Positions(slot, keys, pad), last_only=True)[:, 0]


def _own_step():
    """A copy of decode_step with a code object of its own (so its own Dynamo cache)."""
    f = decode_step
    return type(f)(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)


@functools.cache
def _key_slots(n: int, device: str, dynamic: bool) -> torch.Tensor:
    """Slots 0..n-1. Dynamo traces a dynamic one's size as a symbol, so one compilation serves
    every length (an int argument would compile once per value). Unbacked: a size Dynamo may not
    specialize on its first value, so the length that is the whole cache (a view equal to the
    slab) needs no second graph; decode_step tells it the bound the model's checks rely on."""
    keys = torch.arange(n, device=device)
    if dynamic and n > 1:  # Dynamo keeps sizes 0 and 1 static
        torch._dynamo.decorators.mark_unbacked(keys, 0)
    return keys


def _weights_key(model: GPT) -> tuple:
    weight = model.transformer.wpe.weight  # never quantized or packed; moves with the rest
    return weight.dtype, weight.device, model.transformer.wte.weight.shape


def _power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()
