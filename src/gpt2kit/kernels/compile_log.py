"""Saying what torch.compile is doing while a first run waits for it.

A first `--compile` or `--quantize int8` generation spends up to a minute or two in torch.compile
(C++ code generated and built for this CPU) before the first token: without a word, that looks
like a hang. The library says so through the `gpt2kit` logger (it never prints; the CLI shows
these records on stderr, with the elapsed seconds ticking where stderr is a terminal).
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger("gpt2kit.compile")

# What a first compilation costs on this project's 2-core CPUs (benchmarks/RESULTS.md, cold
# start); torch keeps the generated code in its on-disk cache, so later processes take seconds.
FIRST_RUN = "up to a minute or two the first time on a small CPU; seconds once torch's disk cache has it"


@contextmanager
def compiling(what: str) -> Iterator[None]:
    """Wrap a call that compiles `what`: one record before (`extra` compile="start") and one
    after (compile="end", with the seconds it took)."""
    log.info("compiling %s (%s)", what, FIRST_RUN, extra={"compile": "start"})
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds = time.perf_counter() - start
        log.info("compiled %s in %.0f s", what, seconds, extra={"compile": "end", "seconds": seconds})
