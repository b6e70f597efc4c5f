"""An OpenAI-compatible completions server with continuous batching and a browser playground.

    gpt2kit serve -m runs/jokes --port 8000

FastAPI and uvicorn are imported here, at the edge: the rest of gpt2kit never needs them.
"""

from __future__ import annotations

import logging

from ..errors import Gpt2kitError
from .settings import ServerConfig


def serve(model_spec: str, settings: ServerConfig | None = None, device: str = "auto",
          dtype: str = "auto", quantize: str | None = None, compile: bool = False) -> None:
    """Load a model (as `gpt2kit.load` takes it) and serve it until SIGINT/SIGTERM (in-flight
    requests get `settings.shutdown_timeout` seconds to finish)."""
    settings = settings or ServerConfig()
    try:
        import uvicorn
    except ImportError:
        raise Gpt2kitError('the server needs FastAPI and uvicorn: pip install -e ".[serve]" in the '
                           "gpt2kit folder (or pip install fastapi uvicorn)") from None
    from ..api import load
    from .app import create_app
    from .listen import bound_native_caches
    bound_native_caches()  # before the model's first oneDNN product: RSS stays flat under load
    model = load(model_spec, device=device, dtype=dtype, quantize=quantize, compile=compile,
                 chat_template=settings.chat_template)
    app = create_app(model, settings, served=model_spec)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    from .listen import HTTPProtocol, Server
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info",
                            timeout_graceful_shutdown=settings.shutdown_timeout, http=HTTPProtocol)
    Server(config).run()  # as uvicorn.run(app, ...) does; a failed start exits inside run()


__all__ = ["ServerConfig", "serve"]
