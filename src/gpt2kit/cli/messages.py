"""How the CLI shows what the library logs: one line per record on stderr (warnings prefixed),
and while torch.compile works (compile_log.compiling) the elapsed seconds, ticking in place
where stderr is a terminal."""

from __future__ import annotations

import logging
import sys
import threading
import time


class StderrHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self._ticker: _Ticker | None = None

    def emit(self, record: logging.LogRecord) -> None:
        phase = getattr(record, "compile", None)
        if phase == "end" and self._ticker is not None:
            self._ticker.stop()
            self._ticker = None
        prefix = "warning: " if record.levelno >= logging.WARNING else ""
        print(prefix + record.getMessage(), file=sys.stderr, flush=True)
        if phase == "start" and sys.stderr.isatty():
            self._ticker = _Ticker()


class _Ticker:
    """`  12 s` rewritten once a second on stderr's current line until stopped (then erased)."""

    def __init__(self):
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        start = time.perf_counter()
        while not self._done.wait(1.0):
            sys.stderr.write(f"\r  {time.perf_counter() - start:.0f} s")
            sys.stderr.flush()

    def stop(self) -> None:
        self._done.set()
        self._thread.join()
        sys.stderr.write("\r\033[K")


def show_library_messages() -> None:
    """Route the `gpt2kit` loggers' INFO and above to stderr, once per process."""
    logger = logging.getLogger("gpt2kit")
    if not any(isinstance(h, StderrHandler) for h in logger.handlers):
        logger.addHandler(StderrHandler())
    logger.setLevel(logging.INFO)
    logger.propagate = False
