"""A decode step whose shapes do not change from step to step, so torch.compile (and CUDA
graphs) can capture it once.

The eager step (`GPT.forward` over `KVCache.update`) slices the cache to the live rows and to
slots 0..start, so every step has new shapes. Here the shapes are those of the cache: the token
ids of all `capacity` cache rows (rows past the live ones compute garbage nobody reads), the
write slot and each row's padding as tensors, keys and values written in place at the slot, and
attention with a mask (row r sees slots pad[r]..start; its position is start - pad[r], as in
`model.attention_mask`) over a prefix of the slots: on CPU the written ones rounded up to a
multiple of ATTEND_STEP, a length Dynamo compiles symbolically (one graph for every length); on
CUDA all `max_len`, one static shape for the CUDA graphs. It calls the model's own submodules
(`ln_1`, `attn.c_attn`, `attn.c_proj`, `mlp`, `ln_f`, `lm_head`), so modules swapped in for
inference (packed_linear.prepare_for_inference, LoRA) run here too, as long as they are called as
`module(x)`.

Use: `compiled_decode.enable(model)` once, after any module swaps: the compiled step takes the
model's module tree and the shapes of its weights as fixed (it does not re-check them before
each call), and the weights of packed_linear.PackedLinear modules are frozen into the graph at the
first step; after a change, call enable(model) again. Every `RunningBatch` over that model then
decodes with the compiled step (prefill stays eager); `RunningBatch(..., compiled=False)` opts
one batch out. torch.compile runs on the first step of each (rows, max_len) shape; both are
rounded up to powers of two so a long-lived process meets only a few. On CUDA the step runs
under mode="reduce-overhead" (CUDA graphs); on CPU the default mode.

On CPU float32, `gpt2kit.load(compile=True)` keeps the matrices unpacked
(packed_linear.prepare_for_inference(pack=False)): at batch 1 each product is then a kernel Inductor
generates (packed_linear.PackedLinear.forward) and attention over the one query two fused reductions
(`_one_query_attention`); measured (GPT-2 124M) 1.3-1.5x the eager step and ahead of CTranslate2
(benchmarks/RESULTS.md). At larger batches it reads the unpacked matrices through oneDNN.
"""

from __future__ import annotations

import contextlib
import functools
import types

import torch
import torch.nn.functional as F

from ..errors import DeviceError
from ..inference.kv_cache import KVCache
from ..model import GPT
from .compile_log import compiling
from .packed_linear import PackedLinear

ATTRIBUTE = "compiled_decode"  # where enable() leaves the step on the model
RECOMPILE_LIMIT = 64  # compilations of the step per model: cache shapes x dtypes
ATTEND_STEP = 16  # on CPU the step attends over the written slots rounded up to a multiple of this


def enable(model: GPT) -> None:
    """Make every RunningBatch over `model` decode with a compiled fixed-shape step."""
    setattr(model, ATTRIBUTE, CompiledDecode(model))


def attached(model: GPT) -> "CompiledDecode | None":
    """The step `enable` attached to `model`, if any."""
    return getattr(model, ATTRIBUTE, None)


class CompiledDecode:
    """`model`'s decode step, compiled; one compilation per (rows, max_len) cache shape."""

    def __init__(self, model: GPT):
        self.model = model
        self.cuda = next(model.parameters()).device.type == "cuda"
        # packed_linear.PackedLinear's oneDNN op compiles only with its weight frozen into the graph as
        # a constant. Freezing nothing else: Inductor would keep a repacked copy of every plain
        # nn.Linear weight per compilation (measured: +250 MB per shape for GPT-2 124M bfloat16).
        self.freeze = any(isinstance(m, PackedLinear) for m in model.modules())
        # Checks before every call cost ~0.6 ms of the ~7 ms int8 step of GPT-2 124M: Dynamo's
        # guards on the model's module tree and its ~200 tensors, and the compiled code's
        # assertions on their sizes. Both are fixed once enable() has run (module docstring), so
        # those checks are dropped (the cache slabs and token tensors stay guarded). That is
        # sound only if no other model's graphs share the cache: Dynamo keeps compiled graphs
        # per code object, hence a function of this model's own. `self.weights` catches weights
        # moved to another dtype or device.
        self.weights = _weights_key(model)
        self.step = torch.compile(_own_function(decode_step), fullgraph=True, dynamic=False, options={
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
        """A cache for a batch of up to `capacity` rows and `max_len` slots, in this step's
        shapes: `cache_shape`, one spare slot on CPU (see `length`), and on CUDA static addresses
        (CUDA graphs may write into the slabs in place only then; otherwise torch.compile skips
        the graph capture)."""
        rows, slots = self.cache_shape(capacity, max_len)
        cache = KVCache.for_model(self.model, rows, slots, spare_slots=0 if self.cuda else 1)
        if self.cuda:
            for t in cache.k + cache.v:
                torch._dynamo.mark_static_address(t)
        return cache

    def length(self, start: int, max_len: int) -> torch.Tensor | None:
        """What the step attends over when writing slot `start`: on CPU the slots up to `start`
        rounded up to a multiple of ATTEND_STEP (reading all max_len slots cost ~0.6 ms of the
        ~7 ms int8 step of GPT-2 124M at max_len 256); on CUDA all of them (None), in one graph
        shape for the CUDA graphs. The CPU cache's spare slot keeps the attended prefix shorter
        than the slabs, so it is never contiguous: Dynamo would otherwise compile a second graph
        for the prefix that is the whole slab."""
        if self.cuda:
            return None
        written = start + 1
        return _length_carrier(min(max_len, -(-written // ATTEND_STEP) * ATTEND_STEP))  # rounded up

    def __call__(self, cache, tokens: list[int], start: int, pads: list[int]) -> torch.Tensor:
        """Next-token logits (len(tokens), V) float32 after feeding `tokens` (one per live row)
        at slot `start`; rows of the cache past the live ones are fed token 0 and no padding."""
        if _weights_key(self.model) != self.weights:
            raise DeviceError("the model's weights changed dtype or device after "
                              "compiled_decode.enable(model): call enable(model) again")
        device, spare = cache.k[0].device, cache.batch_size - len(tokens)
        idx = torch.tensor(tokens + [0] * spare, device=device)[:, None]  # (rows, 1)
        pad = torch.tensor(pads + [0] * spare, device=device)  # (rows,)
        slot = torch.tensor(start, device=device)  # a tensor, not an int: no recompile per step
        length = self.length(start, cache.max_len)
        if self.cuda:
            torch.compiler.cudagraph_mark_step_begin()
        shape = (cache.batch_size, cache.max_len)
        announce = compiling(f"the decode step for {shape[0]} row{'s' * (shape[0] > 1)} x {shape[1]} positions") \
            if shape not in self.shapes else contextlib.nullcontext()
        try:
            with self.configs[0], self.configs[1], announce:
                logits = self.step(self.model, idx, slot, pad, cache.k, cache.v, length)
            self.shapes.add(shape)
        except torch._dynamo.exc.BackendCompilerFailed as e:  # no C++ compiler (CPU) or Triton (CUDA)
            cause = getattr(e, "inner_exception", None) or e  # str(e) ends in Dynamo's boilerplate
            first = f"{type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause).strip() else ''}"
            raise DeviceError(f"--compile could not compile the decode step ({first}); it needs a C++ "
                              "compiler on CPU or Triton on CUDA: install one, or drop --compile") from None
        logits = logits[:len(tokens)]
        # A copy on CUDA: a CUDA graph's output is overwritten by its next replay.
        return logits.to(torch.float32, copy=self.cuda)


def decode_step(model: GPT, idx, slot, pad, ks: list[torch.Tensor], vs: list[torch.Tensor],
                length: torch.Tensor | None):
    """Logits (B, V) for tokens idx (B, 1) at slot `slot` (0-d) over slabs (B, nh, L, hs),
    attending over the first len(length) slots (all L if None)."""
    n = ks[0].shape[2] if length is None else length.shape[0]
    keys = torch.arange(n, device=idx.device)  # (n,)
    allowed = ((keys >= pad[:, None]) & (keys <= slot))[:, None, None, :]  # (B, 1, 1, n)
    pos = (slot - pad)[:, None]  # (B, 1)
    x = model.transformer.wte(idx) + model.transformer.wpe(pos)  # (B, 1, C)
    for block, k_slab, v_slab in zip(model.transformer.h, ks, vs):
        x = x + _attend(block.attn, block.ln_1(x), slot, allowed, k_slab, v_slab, n)
        x = x + block.mlp(block.ln_2(x))
    return model.lm_head(model.transformer.ln_f(x))[:, 0]


def _attend(attn, x, slot, allowed, k_slab, v_slab, n):
    B, T, C = x.shape
    q, k, v = attn.c_attn(x).split(C, dim=2)
    q, k, v = (t.view(B, T, attn.n_head, C // attn.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, 1, hs)
    # In place at a slot tensor: one kernel writing B*nh*hs values, the same graph every step.
    # (Under autocast k, v may be narrower than the cache; index_copy_ does not convert.)
    k_slab.index_copy_(2, slot.view(1), k.to(k_slab.dtype))
    v_slab.index_copy_(2, slot.view(1), v.to(v_slab.dtype))
    k_slab, v_slab = k_slab.narrow(2, 0, n), v_slab.narrow(2, 0, n)  # no clamping: size n, symbolic
    if q.device.type == "cpu":
        y = _one_query_attention(q, k_slab, v_slab, allowed)
    else:  # CUDA: SDPA's fused kernels
        y = F.scaled_dot_product_attention(q, k_slab, v_slab, attn_mask=allowed)  # (B, nh, 1, hs)
    return attn.c_proj(y.transpose(1, 2).reshape(B, T, C))


def _one_query_attention(q, k_slab, v_slab, allowed):
    """SDPA for one query per row, written as broadcasts and reductions that Inductor fuses into
    two passes over the slabs. On CPU, SDPA's flash kernel took about twice as long for 12 heads
    of one query over 256 slots (GPT-2 124M): 126-165 against 87-105 us per compiled call."""
    scores = (q * k_slab).sum(-1, keepdim=True) * q.shape[-1] ** -0.5  # (B, nh, L, 1)
    scores = scores.masked_fill(~allowed.transpose(-1, -2), float("-inf"))
    return (scores.softmax(dim=2) * v_slab).sum(2, keepdim=True)  # (B, nh, 1, hs)


@functools.cache
def _length_carrier(n: int) -> torch.Tensor:
    """A tensor whose size (not content) is the number of slots to attend over. Dynamo traces
    its size as a symbol, so one compilation serves every length; an int argument would compile
    once per value, and marking views of the 2 * n_layer slabs dynamic costs ~18 us each per call."""
    carrier = torch.empty(n, dtype=torch.uint8)
    if n > 1:  # Dynamo keeps sizes 0 and 1 static
        torch._dynamo.mark_dynamic(carrier, 0)
    return carrier


def _own_function(f):
    """A copy of f with a code object of its own (so its own Dynamo cache)."""
    return types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)


def _weights_key(model: GPT) -> tuple:
    weight = model.transformer.wpe.weight  # never quantized or packed; moves with the rest
    return weight.dtype, weight.device, model.transformer.wte.weight.shape


def _power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()
