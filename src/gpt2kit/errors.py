"""Typed exceptions raised where user input enters gpt2kit.

Every message names the offending value and, where there is one, the fix. The CLI prints
`error: <message>` (`stopped: ...` for a deliberate stop) on one line and exits non-zero; the server maps the same types to HTTP errors.
"""

from __future__ import annotations


class Gpt2kitError(Exception):
    """Base class of every error gpt2kit raises on purpose."""

    exit_code = 1
    label = "error"  # how the CLI starts the line: `error: <message>`


class Stopped(Gpt2kitError):
    """A run ended early on purpose (Ctrl-C, SIGTERM) with its work saved: not a failure of
    gpt2kit or of the input, so the CLI says `stopped:`, with the signal's exit code."""

    label = "stopped"


class OptionError(Gpt2kitError, ValueError):
    """An option (generation, training, serving) has a bad value.

    `field` is the Python name (`top_p`); the CLI shows it as a flag (`--top-p`) and the server as
    the request parameter, so one validation serves all three.
    """

    exit_code = 2

    def __init__(self, field: str, problem: str):
        self.field = field
        self.problem = problem
        super().__init__(f"{field} {problem}")

    def as_flag(self, flag: str | None = None) -> str:
        return f"{flag or '--' + self.field.replace('_', '-')} {self.problem}"


class CheckpointError(Gpt2kitError):
    """A model could not be found, read or trusted (missing, corrupt, unsafe, wrong architecture)."""


class HubError(CheckpointError):
    """A model id could not be fetched from the Hugging Face hub (unknown id, no network)."""


class TokenizerError(Gpt2kitError, ValueError):
    """Text or token ids that the tokenizer cannot handle (e.g. an id outside the vocabulary)."""


class PromptTooLong(Gpt2kitError, ValueError):
    """A prompt does not fit the model's context window."""

    def __init__(self, n_tokens: int, n_ctx: int):
        self.n_tokens = n_tokens
        self.n_ctx = n_ctx
        super().__init__(
            f"the prompt has {n_tokens} tokens but the model's context is {n_ctx} tokens; "
            f"shorten the prompt to at most {n_ctx - 1} tokens"
        )


class DeviceError(Gpt2kitError):
    """A requested device or dtype is not available here."""


class InputFileError(Gpt2kitError):
    """A file given as input (prompts, data) is missing or unreadable."""
