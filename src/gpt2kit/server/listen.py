"""uvicorn's server, saying where to find the API and the playground once its socket listens,
its HTTP protocol, answering requests it cannot parse with OpenAI's error body, and the bound on
torch's CPU kernel caches a long-running server needs."""

from __future__ import annotations

import json
import logging
import os

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from .errors import error_body

log = logging.getLogger("gpt2kit.server")

# What a request uvicorn's parser refuses gets (a malformed request line or header, a header
# over h11's 16 KB limit, a Content-Length that is not a number, a bad chunk size): the parser
# says no more than that, so neither does the message.
BAD_REQUEST = json.dumps(error_body(
    "the HTTP request is malformed (request line, headers or body framing); it was not read",
    "invalid_request_error")).encode()


# torch's CPU products keep compiled kernels in two caches keyed by the operands' shapes: oneDNN's
# primitive cache and ideep's LRU cache, 1,024 entries each by default, each entry holding its own
# scratch buffers (~0.2-0.4 MB measured here). Continuous batching makes many distinct shapes
# (rows x tokens at every prefill, rows at every decode step), so under load the caches kept
# filling for tens of minutes: that, not a leak, was the server's RSS growth (issue 17; Python's
# heap and objects stayed flat). Both read their capacity from the environment once.
NATIVE_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
NATIVE_CACHE_CAPACITY = 64


def bound_native_caches(capacity: int = NATIVE_CACHE_CAPACITY) -> None:
    """Cap both kernel caches of this process at `capacity` entries (a value already in the
    environment wins). Call before the model is loaded: torch creates its first oneDNN primitive
    then, and each cache reads its capacity when it is created."""
    for name in NATIVE_CACHE_VARIABLES:
        os.environ.setdefault(name, str(capacity))


class HTTPProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    """uvicorn's HTTP/1.1 protocol (h11, or httptools when installed, as uvicorn would pick),
    with OpenAI's JSON body instead of the plain text "Invalid HTTP request received." on a 400
    its parser raises before the app sees the request. Passed as `uvicorn.Config(http=...)`."""

    def send_400_response(self, msg: str) -> None:
        # Written raw, as uvicorn's httptools protocol does: the connection is closed right after,
        # so h11's state machine (already in error) is not consulted.
        head = [b"HTTP/1.1 400 Bad Request"]
        head += [name + b": " + value for name, value in self.server_state.default_headers]
        head += [b"content-type: application/json", b"content-length: " + str(len(BAD_REQUEST)).encode(),
                 b"connection: close"]
        self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + BAD_REQUEST)
        self.transport.close()


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
