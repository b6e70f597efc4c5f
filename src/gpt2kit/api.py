"""The Python API: `load` a checkpoint into a `Model`, then generate, stream or read logits."""

from __future__ import annotations

import ctypes
import sys
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch

from .chat import ChatTemplate, Message, choose_template, prompt_ids, template_file
from .checkpoints import LoadedModel, load_model
from .config import EMBED_BATCH_SIZE, POOLS, SCORE_BATCH_SIZE, DataConfig, GenerationConfig, ModelConfig
from .errors import CheckpointError, OptionError, TokenizerError
from .inference import features
from .inference.adapters import AdapterRows, MultiLoraLinear
from .inference.generate import Completion, generate_events
from .inference.running_batch import Decoder, EagerDecoder
from .inference.scoring import Scores, perplexity  # noqa: F401 (perplexity: public, for callers aggregating Scores)
from .kernels.argmax import fast_argmax
from .kernels.compiled_decode import CompiledDecoder
from .kernels.decode_blocks import DecodeBlocks, use_decode_blocks
from .kernels.int8 import Int8Linear
from .kernels.native_decode import NativeDecoder
from .kernels.norm_in_product import fuse_layer_norms, keep_layer_norms_apart
from .kernels.one_query_attention import use_one_query_attention
from .kernels.packed_linear import PackedLinear, prepare_for_inference
from .lora import count_parameters, read_adapter
from .quantize import check_quantize, quantize_int8
from .runtime import resolve_device, resolve_dtype
from .tokenizer import Tokenizer


def load(spec: str | Path, device: str = "auto", dtype: str | torch.dtype = "auto",
         revision: str | None = None, quantize: str | None = None, compile: bool = False,
         chat_template: str | Path | None = None) -> "Model":
    """Load a GPT-2 from a hub id (`gpt2`, `openai-community/gpt2-large`), a Hugging Face-layout
    folder or a single weights file. `device`: auto | cpu | cuda[:N]; `dtype`: auto | float32 |
    bfloat16 | float16 (auto: bfloat16 on CUDA, float32 on CPU), the dtype of the activations
    (and of the weights unless quantized); `quantize`: None or "int8" (int8 weights with a
    scale per output channel; int8 x int8 products with a scale per token on CPUs with VNNI/AMX,
    weight-only elsewhere: see gpt2kit.quantize); `compile`: decode with one torch.compile'd
    fixed-shape step (CUDA graphs on CUDA; see gpt2kit.kernels.compiled_decode): the first
    generation of each batch shape compiles for seconds to a minute, later ones run faster;
    `chat_template`: a Jinja chat template file for `Model.chat` (default: see `Model.chat_template`)."""
    check_quantize(quantize)
    template = None if chat_template is None else template_file(chat_template)  # a bad file fails first
    dev = resolve_device(device)
    loaded = load_model(str(spec), dev, resolve_dtype(dtype, dev), revision=revision)
    n_params = count_parameters(loaded.model).model  # before packing turns them into buffers
    if quantize == "int8":
        quantize_int8(loaded.model)
    else:
        prepare_for_inference(loaded.model, pack=not compile)  # compiled: see PackedLinear.forward
    use_one_query_attention(loaded.model)
    without_dropout(loaded.model)
    if not compile:
        fuse_layer_norms(loaded.model)
        use_decode_blocks(loaded.model)
    decoder = (CompiledDecoder(loaded.model) if compile else NativeDecoder(loaded.model, fast_argmax)
               if isinstance(loaded.model.transformer.h, DecodeBlocks) else EagerDecoder(loaded.model, fast_argmax))
    tokenizer = loaded.load_tokenizer()
    release_free_heap()
    model = Model(loaded, tokenizer, n_params, quantize, decoder)
    model.chat_template = template
    return model


def without_dropout(model: torch.nn.Module) -> None:
    """Replace the model's dropout layers, identities in an inference-only model, by nn.Identity:
    ~2 us less a call, 37 calls a decode step of GPT-2 124M."""
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Dropout):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, torch.nn.Identity())


def keep_gelu_apart(model: torch.nn.Module) -> None:
    """Take the MLP's GELU back out of c_fc's kernel (prepare_for_inference and quantize_int8 fuse
    it), so that a LoRA adapter of c_fc adds its update to the product before the GELU, not after."""
    for block in model.transformer.h:
        fc = block.mlp.c_fc
        if isinstance(fc, (PackedLinear, Int8Linear)) and fc.gelu:
            fc.gelu = False
            block.mlp.act = torch.nn.GELU(approximate="tanh")


def release_free_heap() -> None:
    """Give the C heap's free pages back to the OS. Loading frees copies, packing temporaries and
    the tokenizer files' parsed JSON (~30-110 MB for the 124M model) that glibc would otherwise keep
    resident (issue 5: resident memory). glibc's malloc_trim(0); a no-op elsewhere (macOS, musl)."""
    if not sys.platform.startswith("linux"):
        return
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # absent from musl
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
        trim(0)


class Piece(str):
    """A piece of streamed text, tagged with the (prompt, sample) it belongs to (`Model.stream`)."""

    def __new__(cls, text: str, prompt_index: int = 0, sample_index: int = 0, finish_reason: str | None = None):
        piece = super().__new__(cls, text)
        piece.prompt_index, piece.sample_index, piece.finish_reason = prompt_index, sample_index, finish_reason
        return piece


class Model:
    """A loaded GPT-2 with its tokenizer. Generation options are `GenerationConfig` fields, passed
    as a config object, keyword arguments, or both (keywords win)."""

    def __init__(self, loaded: LoadedModel, tokenizer: Tokenizer, n_params: int, quantize: str | None = None,
                 decoder: Decoder | None = None):
        self.module = loaded.model
        self.decoder = decoder or EagerDecoder(loaded.model)  # one decode step (compiled with compile=True)
        self.n_params = n_params
        self.quantize = quantize
        self.config: ModelConfig = loaded.config
        self.tokenizer = tokenizer
        self.source = loaded.source
        self.loaded = loaded
        self._chat_template: ChatTemplate | None = None  # chosen on first use (chat_template)
        if tokenizer.vocab_size > self.config.vocab_size:
            raise TokenizerError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                                 f"{self.config.vocab_size}; the checkpoint's tokenizer files do not match it")

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    def logits(self, token_ids) -> torch.Tensor:
        """Float32 logits (batch, seq, vocab) for token ids: a list, a list of equal-length lists,
        or a tensor of shape (seq,) or (batch, seq)."""
        idx = features.token_batch(token_ids, self.config, self.device)
        with torch.inference_mode():
            return self.module(idx).float()

    def hidden_states(self, token_ids, layers: Sequence[int] | None = (-1,)) -> list[torch.Tensor]:
        """Float32 hidden states (batch, seq, n_embd) for token ids (as `logits` takes them), one
        tensor per entry of `layers` (None: all n_layer + 1). Numbered as transformers'
        `output_hidden_states` tuple: 0 is the embedding output, i the i-th block's output, and
        n_layer (or -1) the last block's output after the final LayerNorm (`last_hidden_state`)."""
        idx = features.token_batch(token_ids, self.config, self.device)
        return features.hidden_states(self.module, idx, layers)

    def embed(self, texts: str | Sequence[str], pool: str = POOLS[0], layer: int = -1,
              batch_size: int = EMBED_BATCH_SIZE, progress: bool = False) -> torch.Tensor:
        """One float32 vector per text, (len(texts), n_embd) on the CPU: the mean of its tokens'
        hidden states at `layer` (`pool="mean"`) or its last token's (`pool="last"`). Texts are
        encoded as they are (no <|endoftext|> added, as in transformers' feature extraction);
        batches are padded in a way that changes no vector."""
        return features.embed_ids(self.module, self._encode(texts), pool, layer, batch_size, progress)

    def score(self, text: str | Sequence[str], stride: int | None = None, batch_size: int = SCORE_BATCH_SIZE,
              progress: bool = False) -> Scores | list[Scores]:
        """How likely the model finds a text: per-token log-probabilities (the first token
        conditioned on <|endoftext|>), `token_ids`, `total`, mean `nll` and `ppl`. A list of texts
        gives a list of Scores, computed in shared batches. Texts longer than the context are
        scored on sliding windows moved by `stride` tokens (default: half the context), the same
        scoring as `evaluate` and `gpt2kit eval`."""
        from .inference.scoring import score_sequences
        scores = score_sequences(self.module, self._encode(text), self.tokenizer.eos_id, stride,
                                 batch_size, progress)
        return scores[0] if isinstance(text, str) else scores

    def _encode(self, texts: str | Sequence[str]) -> list[list[int]]:
        return self.tokenizer.encode_batch([texts] if isinstance(texts, str) else list(texts))

    def complete(self, prompt: str | Sequence[str], config: GenerationConfig | None = None,
                 **options) -> list[Completion]:
        """Like `generate`, with token ids, finish reason and (optionally) log-probabilities."""
        return self._complete(self._encode_prompts(prompt), _options(config, options))

    def generate(self, prompt: str | Sequence[str], config: GenerationConfig | None = None,
                 **options) -> list[str]:
        """Continuations of one prompt or a batch: `n` texts per prompt, prompt by prompt.
        The prompt itself is not repeated in the result."""
        return [c.text for c in self.complete(prompt, config, **options)]

    def stream(self, prompt: str | Sequence[str], config: GenerationConfig | None = None,
               **options) -> Iterator[Piece]:
        """Yield the continuation piece by piece as it is generated. Each piece is a `str` (so
        `print(piece, end="")` streams one prompt) that also says whose it is: `prompt_index`,
        `sample_index`, and `finish_reason` on the last piece of each (prompt, sample). Several
        prompts or samples are generated together, their pieces interleaved as they come."""
        return self._stream(self._encode_prompts(prompt), _options(config, options))

    @property
    def chat_template(self) -> ChatTemplate:
        """How `chat` turns messages into a prompt (gpt2kit.chat): the template given to `load`
        or set here (a ChatTemplate or a Jinja file's path), else the checkpoint's own, else
        DialoGPT's convention for a DialoGPT checkpoint, else the built-in User:/Assistant: one."""
        if self._chat_template is None:
            self._chat_template = choose_template(None, self.loaded.folder)
        return self._chat_template

    @chat_template.setter
    def chat_template(self, template: ChatTemplate | str | Path | None) -> None:
        self._chat_template = template_file(template) if isinstance(template, (str, Path)) else template

    def chat(self, messages: Sequence[Message | Mapping], config: GenerationConfig | None = None,
             **options) -> list[Completion]:
        """The assistant's next turn in a conversation (`Message`s or {"role", "content"} dicts;
        roles system, user, assistant): `n` completions, rendered with `chat_template`, whose
        stop strings are added to `stop`. The text is the reply alone."""
        ids, cfg = self._chat_prompt(messages, _options(config, options))
        return self._complete([ids], cfg)

    def chat_stream(self, messages: Sequence[Message | Mapping], config: GenerationConfig | None = None,
                    **options) -> Iterator[Piece]:
        """`chat`, piece by piece as `stream` yields them."""
        ids, cfg = self._chat_prompt(messages, _options(config, options))
        return self._stream([ids], cfg)

    def chat_prompt_ids(self, messages: Sequence[Message | Mapping]) -> list[int]:
        """The token ids `chat` continues for `messages` (to measure a conversation's length)."""
        return prompt_ids(self.tokenizer, self.chat_template, messages)

    def _chat_prompt(self, messages, cfg: GenerationConfig) -> tuple[list[int], GenerationConfig]:
        template = self.chat_template
        ids = prompt_ids(self.tokenizer, template, messages)
        return ids, replace(cfg, stop=tuple(dict.fromkeys(cfg.stop + template.stop)))

    def _encode_prompts(self, prompt) -> list[list[int]]:
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise OptionError("prompt", "must be a string or a non-empty list of strings")
        return self.tokenizer.encode_batch(texts)

    def _complete(self, encoded: list[list[int]], cfg: GenerationConfig) -> list[Completion]:
        prompts, samples, indices = _rows(encoded, cfg)
        done: list[Completion | None] = [None] * len(prompts)
        for event in generate_events(self.module, self.tokenizer, prompts, cfg, samples, indices, self.decoder):
            if event.completion is not None:
                done[event.row] = event.completion
        return done

    def _stream(self, encoded: list[list[int]], cfg: GenerationConfig) -> Iterator[Piece]:
        prompts, samples, indices = _rows(encoded, cfg)
        for event in generate_events(self.module, self.tokenizer, prompts, cfg, samples, indices, self.decoder):
            done = event.completion
            if event.text or done is not None:
                yield Piece(event.text, prompt_index=indices[event.row], sample_index=samples[event.row],
                            finish_reason=done.finish_reason if done is not None else None)

    def evaluate(self, data, stride: int | None = None, **data_options) -> Scores:
        """Token-level loss and perplexity of a file's documents (a path or a DataConfig; CSV,
        JSONL, text or a folder, read as fine-tuning reads them), each document followed by
        <|endoftext|>; texts longer than the context are scored with a sliding window moved by
        `stride` tokens (default: half the context)."""
        from .data.prepare import read_documents
        from .inference.scoring import evaluate_documents
        cfg = data if isinstance(data, DataConfig) else DataConfig(path=str(data), **data_options)
        docs = (self.tokenizer.encode(text) for text in read_documents(cfg))
        return evaluate_documents(self.module, docs, self.tokenizer.eos_id, stride=stride)

    def add_adapters(self, folders: dict[str, str | Path]) -> AdapterRows:
        """Serve LoRA adapters (LoRA run or PEFT adapter folders, by name) beside the base weights:
        each layer an adapter targets is wrapped in a MultiLoraLinear (inference/adapters.py), and
        forwards run inside the returned `AdapterRows.use([k, ...])` put batch row r on adapter k
        (the k-th name; -1 the base). Elsewhere the model computes what it did before. Every
        adapter is read and checked against this model before the model is changed."""
        if isinstance(self.decoder, CompiledDecoder):  # its step is traced without per-row adapters
            raise OptionError("lora", "cannot be combined with --compile (compiled decoding); drop one")
        if any(isinstance(m, MultiLoraLinear) for m in self.module.modules()):
            raise OptionError("lora", "adapters were already added to this model; load it again to serve others")
        read = {name: self._read_adapter(name, folder) for name, folder in folders.items()}
        rows = AdapterRows(list(read))
        if any(name.endswith(".c_fc") for _, layers in read.values() for name in layers):
            keep_gelu_apart(self.module)
        if any(name.endswith((".c_attn", ".c_fc")) for _, layers in read.values() for name in layers):
            keep_layer_norms_apart(self.module)  # the adapters' products take normalized inputs
        for k, (cfg, layers) in enumerate(read.values()):
            for name, (a, b) in layers.items():
                layer = self.module.get_submodule(name)
                if not isinstance(layer, MultiLoraLinear):
                    parent, _, child = name.rpartition(".")
                    layer = MultiLoraLinear(layer, rows)
                    setattr(self.module.get_submodule(parent), child, layer)
                dtype = torch.float32 if self.dtype in (torch.float16, torch.bfloat16) else self.dtype  # as LoraLinear
                layer.add(k, a.to(self.device, dtype), b.to(self.device, dtype), cfg.alpha / cfg.rank)
        return rows

    def _read_adapter(self, name: str, folder: str | Path):
        try:
            return read_adapter(folder, self.config)
        except CheckpointError as e:
            raise CheckpointError(f"adapter {name!r}: {e}") from None

    def info(self) -> dict:
        """What this model is: shape, size, dtype, device, tokenizer and where it came from."""
        cfg = self.config
        return {
            "architecture": "GPT-2",
            "source": self.source,
            "format": self.loaded.format,
            "parameters": self.n_params,
            "layers": cfg.n_layer, "heads": cfg.n_head, "embedding": cfg.n_embd,
            "context": cfg.n_positions, "vocab_size": cfg.vocab_size,
            "dtype": str(self.dtype).removeprefix("torch."),
            "stored_dtype": self.loaded.weights_dtype,
            "quantize": self.quantize,
            "device": str(self.device),
            "tokenizer": self.tokenizer.source,
        }


def _options(config: GenerationConfig | None, options: dict) -> GenerationConfig:
    """A config with keyword options over it (keywords win)."""
    return replace(config or GenerationConfig(), **options) if options else (config or GenerationConfig())


def _rows(encoded: list[list[int]], cfg: GenerationConfig) -> tuple[list[list[int]], list[int], list[int]]:
    """One row per (prompt, sample): token ids, sample indices and prompt indices."""
    rows = [(ids, j, i) for i, ids in enumerate(encoded) for j in range(cfg.n)]
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]
