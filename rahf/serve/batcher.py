"""Dynamic batching: items from concurrent requests share forward passes, run in one worker thread.

Requests put their (already decoded) images on a bounded queue and get a
:class:`concurrent.futures.Future` for their results. One worker thread takes the oldest item and
every queued item with the same decode mode, up to ``max_batch``; when fewer are waiting it waits
until ``max_wait_ms`` after the oldest item arrived for more to come. Each batch is one
``RAHFScorer.score`` call, and its results go back to their requests in order. The queue holds at
most ``max_queue`` items: a request that does not fit is refused (:class:`QueueFull`) with an
estimate of when it would, never queued without bound.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Optional, Sequence

from PIL import Image

log = logging.getLogger("rahf.serve")


class QueueFull(Exception):
    """The queue cannot take the request now; ``retry_after`` is a wait estimate in whole seconds."""

    def __init__(self, retry_after: int, depth: int, limit: int):
        self.retry_after, self.depth, self.limit = retry_after, depth, limit
        super().__init__(f"the queue holds {depth} of at most {limit} items; retry in about {retry_after} s")


class Closed(Exception):
    """The batcher is shutting down and takes no new work."""


@dataclass
class _Request:
    future: Future
    results: list
    remaining: int


@dataclass
class _Item:
    request: _Request
    index: int
    image: Image.Image
    prompt: str
    decode: Optional[str]
    enqueued: float = field(default_factory=time.monotonic)


class Batcher:
    """Runs ``scorer.score`` on batches gathered from concurrent :meth:`submit` calls.

    ``lock`` is held while the model runs; other code that uses the same scorer in this process
    takes it too. ``score_kwargs`` are passed to every ``scorer.score`` call."""

    def __init__(self, scorer, max_batch: int = 32, max_wait_ms: float = 10.0, max_queue: int = 256):
        if max_batch < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and max_wait_ms >= 0")
        self.scorer = scorer
        self.max_batch = int(max_batch)
        self.max_wait = float(max_wait_ms) / 1000.0
        self.max_queue = int(max_queue)
        self.lock = threading.Lock()
        self._cv = threading.Condition()
        self._queue: deque[_Item] = deque()
        self._per_mode: dict[Optional[str], int] = {}
        self._closing = False
        self._in_flight = 0
        self._rate: Optional[float] = None  # items/s, exponential moving average over batches
        self.batches = 0  # forward passes run
        self.items_done = 0
        self.largest_batch = 0
        self._thread = threading.Thread(target=self._run, name="rahf-serve-model", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------------------- state
    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def retry_after(self, extra: int = 0) -> int:
        """Seconds until ``extra`` more items would likely fit (at least 1, at most 60)."""
        backlog = len(self._queue) + self._in_flight + extra - self.max_queue
        rate = self._rate or float(self.max_batch)
        return int(min(60, max(1, math.ceil(max(backlog, self.max_batch) / rate))))

    # ---------------------------------------------------------------------------- submit
    def submit(self, images: Sequence[Image.Image], prompts: Sequence[str], decode: Optional[str]) -> Future:
        """Queue one request's items; the future's result is the list of ``ScoreResult`` in order.

        Raises :class:`QueueFull` when the items do not fit, :class:`Closed` after :meth:`close`."""
        if len(images) != len(prompts) or not images:
            raise ValueError("give one prompt per image, and at least one image")
        fut: Future = Future()
        req = _Request(fut, [None] * len(images), len(images))
        with self._cv:
            if self._closing:
                raise Closed("the server is shutting down")
            if len(self._queue) + len(images) > self.max_queue:
                raise QueueFull(self.retry_after(len(images)), len(self._queue), self.max_queue)
            now = time.monotonic()
            for i, (im, p) in enumerate(zip(images, prompts)):
                self._queue.append(_Item(req, i, im, p, decode, now))
            self._per_mode[decode] = self._per_mode.get(decode, 0) + len(images)
            self._cv.notify_all()
        return fut

    # ---------------------------------------------------------------------------- worker
    def _take(self) -> list[_Item]:
        """Under the condition: wait for work, then take one batch (oldest item's mode). [] = stop."""
        while not self._queue:
            if self._closing:
                return []
            self._cv.wait()
        mode = self._queue[0].decode
        deadline = self._queue[0].enqueued + self.max_wait
        while not self._closing and self._per_mode.get(mode, 0) < self.max_batch:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._cv.wait(left)
        batch, keep = [], deque()
        while self._queue:
            item = self._queue.popleft()
            if item.decode == mode and len(batch) < self.max_batch:
                batch.append(item)
            else:
                keep.append(item)
                if len(batch) >= self.max_batch:
                    break
        keep.extend(self._queue)
        self._queue = keep
        self._per_mode[mode] -= len(batch)
        self._in_flight = len(batch)
        return batch

    def _run(self) -> None:
        while True:
            with self._cv:
                batch = self._take()
            if not batch:
                return
            live = [it for it in batch if not it.request.future.cancelled()]
            t0 = time.perf_counter()
            try:
                if live:
                    with self.lock:
                        results = self.scorer.score([it.image for it in live], [it.prompt for it in live],
                                                    batch_size=len(live), decode=live[0].decode)
            except BaseException as e:  # noqa: BLE001 - the error goes back to every request in the batch
                log.exception("scoring a batch of %d items failed", len(live))
                for it in live:
                    if not it.request.future.done():
                        it.request.future.set_exception(e)
            else:
                for it, res in zip(live, results):
                    req = it.request
                    req.results[it.index] = res
                    req.remaining -= 1
                    if req.remaining == 0 and not req.future.done():
                        req.future.set_result(req.results)
                dt = time.perf_counter() - t0
                if live and dt > 0:
                    r = len(live) / dt
                    self._rate = r if self._rate is None else 0.8 * self._rate + 0.2 * r
                self.batches += 1
                self.items_done += len(live)
                self.largest_batch = max(self.largest_batch, len(live))
            finally:
                with self._cv:
                    self._in_flight = 0

    # ---------------------------------------------------------------------------- shutdown
    def close(self, timeout: Optional[float] = None) -> bool:
        """Stop taking work, finish every queued item, stop the worker. True if it stopped in time."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        self._thread.join(timeout)
        return not self._thread.is_alive()
