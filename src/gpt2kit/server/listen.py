"""uvicorn's server, saying where to find the API and the playground once its socket listens."""

from __future__ import annotations

import logging

import uvicorn

log = logging.getLogger("gpt2kit.server")


class Server(uvicorn.Server):
    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:  # the port is bound (with --port 0, the one the system chose)
            port = self.servers[0].sockets[0].getsockname()[1] if self.servers else self.config.port
            url = playground_url(self.config.host, port)
            log.info("serving the OpenAI-compatible API at %sv1; open %s for the playground", url, url)


def playground_url(host: str, port: int) -> str:
    """Where a browser on this machine finds the server (a wildcard address is not one)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"
