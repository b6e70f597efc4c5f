"""Continuous batching: one thread owns the model and decodes every running request together.

Requests (jobs) wait in a bounded FIFO queue; between decoding steps, waiting rows join the
running batch as slots free up, and finished or cancelled rows leave it (see RunningBatch). So a
request never waits for a whole batch to finish, and a client that goes away stops costing
compute within one step. Events cross to the asyncio side through each job's own queue.

A failure inside a step (the model raising, say) fails the jobs in the batch with an error event
and the scheduler goes on with an empty batch: one bad step never takes the server down.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..inference.adapters import AdapterRows
from ..inference.generate import Event, Row, feed_tokens, take_tokens
from ..inference.prefix_cache import PrefixCache
from ..inference.running_batch import Decoder, RunningBatch
from ..tokenizer import Tokenizer

log = logging.getLogger("gpt2kit.server")


class QueueFull(Exception):
    """More requests are waiting than the server allows."""


class JobFailed(Exception):
    """The job's rows were dropped: the model failed, or the server is shutting down."""


@dataclass(eq=False)
class Job:
    """One request's rows, and the queue its events are delivered to (on the event loop)."""

    rows: list[Row]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    first: int = 0  # rows are numbered first, first + 1, ... across the whole server
    cancelled: bool = False
    started: bool = False
    unfinished: int = 0
    queued: float = field(default_factory=time.perf_counter)  # when it was submitted (metrics)

    def deliver(self, item: Event | JobFailed | None) -> None:
        """Called from the scheduler thread: an event, a failure, or None when all rows are done."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


class Scheduler:
    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, max_batch: int, max_queue: int,
                 decoder: Decoder | None = None, prefix_cache: PrefixCache | None = None,
                 adapters: AdapterRows | None = None,
                 on_step: Callable[[list[Row], list[float]], None] | None = None):
        self.model = model
        self.on_step = on_step  # told after each step: the rows that got a token, their jobs' queue times
        self.decoder = decoder  # each decode step's (None: the model's forward, eagerly)
        self.prefix_cache = prefix_cache  # outlives batches: kept blocks depend on tokens only
        self.adapters = adapters  # LoRA adapters served beside the base (row.adapter picks one)
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._waiting: deque[Job] = deque()
        self._running: dict[int, Job] = {}  # row index -> job, for rows in the batch
        self._next_index = 0
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="gpt2kit-scheduler", daemon=True)

    # --- the asyncio side -------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, rows: list[Row]) -> Job:
        """Queue a request's rows; raises QueueFull when `max_queue` requests already wait."""
        job = Job(rows, asyncio.get_running_loop(), unfinished=len(rows))
        with self._wake:
            job.first = self._next_index
            self._next_index += len(rows)
            for k, row in enumerate(rows):  # event.row - job.first is then the row's place in the job
                row.index = job.first + k
            if self._stopping:
                raise JobFailed("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(job)
            self._wake.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Drop a job (its client went away): before it starts, or at the next step."""
        with self._wake:
            job.cancelled = True
            self._wake.notify()

    def stop(self) -> None:
        """Fail what is still queued or running and end the thread."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)

    @property
    def load(self) -> dict:
        return {"running": len(self._running), "waiting": len(self._waiting)}

    # --- the scheduler thread ---------------------------------------------------------------

    def _run(self) -> None:
        batch = self._new_batch()
        with torch.inference_mode():
            while True:
                with self._wake:
                    if self._stopping:
                        break
                    self._drop_cancelled(batch)
                    joining = self._admit(batch)
                    if not batch.rows and not joining:
                        self._wake.wait()
                        continue
                try:
                    if joining:
                        batch.join(joining, [row.prompt for row in joining],
                                   adapters=[row.adapter for row in joining])
                    rows = list(batch.rows)
                    events = take_tokens(batch, self.tokenizer)
                    if self.on_step is not None:
                        self.on_step(rows, [self._running[row.index].queued for row in rows])
                    self._dispatch(events)
                    feed_tokens(batch)
                except Exception as e:  # never let one bad step end the server
                    log.exception("decoding step failed")
                    self._fail_all(f"generation failed ({type(e).__name__}: {e})")
                    batch = self._new_batch()
        self._fail_all("the server is shutting down")

    def _new_batch(self) -> RunningBatch[Row]:
        return RunningBatch(self.model, self.max_batch, decoder=self.decoder, prefix_cache=self.prefix_cache,
                            adapters=self.adapters)

    def _admit(self, batch: RunningBatch[Row]) -> list[Row]:
        """Rows of waiting jobs that fit in the free slots, oldest first (a job may start partly)."""
        joining: list[Row] = []
        free = batch.free
        while self._waiting and free > len(joining):
            job = self._waiting[0]
            if job.cancelled:
                self._waiting.popleft()
                continue
            pending = [row for row in job.rows if row.index not in self._running]
            take = pending[:free - len(joining)]
            for row in take:
                self._running[row.index] = job
            joining += take
            job.started = True
            if len(take) == len(pending):
                self._waiting.popleft()
        return joining

    def _drop_cancelled(self, batch: RunningBatch[Row]) -> None:
        gone = [row for row in batch.rows if self._running[row.index].cancelled]
        if gone:
            batch.leave(gone)
            for row in gone:
                del self._running[row.index]

    def _dispatch(self, events: list[Event]) -> None:
        for event in events:
            job = self._running.get(event.row)
            if job is None:
                continue
            job.deliver(event)
            if event.completion is not None:
                del self._running[event.row]
                job.unfinished -= 1
                if job.unfinished == 0:
                    job.deliver(None)

    def _fail_all(self, message: str) -> None:
        with self._wake:
            jobs = {id(job): job for job in self._running.values()}
            if self._stopping:
                jobs.update({id(job): job for job in self._waiting})
                self._waiting.clear()
            self._running.clear()
            for job in jobs.values():
                job.cancelled = True  # rows of it still queued must not start
        for job in jobs.values():
            job.deliver(JobFailed(message))
