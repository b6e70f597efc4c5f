"""How the server runs: address, access, and the limits that keep one CPU server responsive.

Torch-free, like the other configs, so `gpt2kit serve --help` is instant; the CLI builds its
flags from these fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import CHAT_TEMPLATE_DEFAULT, check_integer
from ..errors import OptionError


@dataclass(frozen=True)
class ServerConfig:
    host: str = field(default="127.0.0.1", metadata={
        "help": "address to listen on (default 127.0.0.1; 0.0.0.0 exposes the server to the network)"})
    port: int = field(default=8000, metadata={"help": "TCP port (default 8000)"})
    api_key: str | None = field(default=None, metadata={
        "help": "require 'Authorization: Bearer KEY' on /v1 requests (default: $GPT2KIT_API_KEY, "
        "else no key)"})
    served_model_name: str | None = field(default=None, metadata={
        "help": "the model id clients send and /v1/models lists (default: the -m argument)"})
    max_batch: int = field(default=16, metadata={
        "help": "sequences decoded together; more requests wait their turn (default 16)"})
    max_queue: int = field(default=64, metadata={
        "help": "requests allowed to wait; beyond it the server answers 503 (default 64)"})
    max_n: int = field(default=16, metadata={"help": "largest n (choices per prompt) (default 16)"})
    max_tokens_limit: int = field(default=4096, metadata={
        "help": "largest max_tokens a request may ask for; without \"slide\" the context window "
        "is the limit anyway (default 4096)"})
    token_budget: int = field(default=16384, metadata={
        "help": "largest total of max_tokens x choices in one request (default 16384)"})
    max_body_bytes: int = field(default=2_000_000, metadata={
        "help": "largest request body; larger ones get 413 (default 2000000)"})
    max_prompt_chars: int = field(default=100_000, metadata={
        "help": "largest prompt in characters, checked before tokenizing (default 100000)"})
    max_stop: int = field(default=4, metadata={"help": "most stop strings per request (default 4)"})
    max_stop_chars: int = field(default=256, metadata={
        "help": "longest stop string in characters (default 256)"})
    prefix_cache_mb: int = field(default=128, metadata={
        "help": "memory for the keys and values of prompt starts, reused by later requests that "
        "start with the same tokens (a system text, few-shot examples); least recently used "
        "first out; 0 turns it off (default 128)"})
    lora: tuple[str, ...] = field(default=(), metadata={
        "help": "NAME=PATH: also serve the LoRA adapter in PATH (a LoRA run or PEFT adapter folder "
        "trained on this model) as model NAME; repeat for several; requests for different ones "
        "share the batch"})
    chat_template: str | None = field(default=None, metadata={
        "help": f"a Jinja chat template file for /v1/chat/completions ({CHAT_TEMPLATE_DEFAULT})"})
    shutdown_timeout: float = field(default=30.0, metadata={
        "help": "seconds in-flight requests get to finish after SIGTERM before they are "
        "cancelled (default 30)"})

    def __post_init__(self):
        if not 0 <= check_integer("port", self.port) <= 65535:
            raise OptionError("port", f"must be in [0, 65535], got {self.port}")
        for name in ("max_batch", "max_queue", "max_n", "max_tokens_limit", "token_budget", "max_body_bytes",
                     "max_prompt_chars", "max_stop", "max_stop_chars"):
            if check_integer(name, getattr(self, name)) < 1:
                raise OptionError(name, f"must be at least 1, got {getattr(self, name)}")
        if check_integer("prefix_cache_mb", self.prefix_cache_mb) < 0:
            raise OptionError("prefix_cache_mb", f"must be at least 0 (0: off), got {self.prefix_cache_mb}")
        if not self.shutdown_timeout >= 0:
            raise OptionError("shutdown_timeout", f"must be at least 0, got {self.shutdown_timeout}")
        self.adapters()  # each --lora is NAME=PATH, names unique
        if self.api_key is not None and not self.api_key:
            raise OptionError("api_key", "must not be empty")

    def adapters(self) -> dict[str, str]:
        """--lora's NAME=PATH entries as {name: path}, in order."""
        found: dict[str, str] = {}
        for entry in self.lora:
            name, eq, path = entry.partition("=")
            if not (eq and name.strip() and path.strip()):
                raise OptionError("lora", f"takes NAME=PATH (a name for the adapter, then its folder), got {entry!r}")
            if name.strip() in found:
                raise OptionError("lora", f"names {name.strip()!r} twice; give each adapter its own name")
            found[name.strip()] = path.strip()
        return found
