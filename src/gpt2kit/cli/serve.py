"""gpt2kit serve: the OpenAI-compatible server (gpt2kit.server) from the command line."""

from __future__ import annotations

import argparse

from .flags import add_dataclass_flags, add_model_flags, load_options, options_for

SERVE_EXAMPLES = """examples:
  gpt2kit serve -m runs/jokes --port 8000            # then open http://127.0.0.1:8000/
  gpt2kit serve -m gpt2 --host 0.0.0.0 --api-key s3cret --max-batch 8
"""


def configure_serve(p: argparse.ArgumentParser) -> None:
    add_model_flags(p)
    from ..server.settings import ServerConfig
    add_dataclass_flags(p, ServerConfig, "server options")


def run_serve(args: argparse.Namespace) -> int:
    import os

    from ..server import ServerConfig, serve
    options = options_for(ServerConfig, args)
    if "api_key" not in options and os.environ.get("GPT2KIT_API_KEY"):
        options["api_key"] = os.environ["GPT2KIT_API_KEY"]
    serve(args.model, ServerConfig(**options), **load_options(args))
    return 0
