"""Micro-batching: concurrent requests gathered into one call of the jitted search.

Requests go into a bounded ``asyncio.Queue`` (:meth:`MicroBatcher.submit`); a full queue refuses at
once (:class:`QueueFull`: HTTP 503), so overload never becomes an unbounded backlog. One worker
task takes the first waiting request, then gathers more until the batch holds ``max_batch``
queries or ``max_wait`` has passed since it took the first, and runs the batch in a worker thread
(``run_batch``; the event loop keeps accepting and answering requests meanwhile). While a batch
runs, new requests queue up, so under load batches fill without waiting. A request whose queries
would overflow the batch is kept for the next one, never split.

:meth:`MicroBatcher.stop` (server shutdown) refuses new requests and lets the worker finish every
request already queued before it ends: a SIGTERM drains, it does not drop.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import threading
import time
from typing import Any, Callable, Sequence

from cart_jax.core.errors import ConfigError


class QueueFull(Exception):
  """The request queue is full (or the server is shutting down): answer 503."""


@dataclasses.dataclass
class _Pending:
  queries: Sequence[Any]
  future: asyncio.Future
  enqueued: float


class Metrics:
  """Counters and a window of latencies for ``GET /metrics`` (updated on the event loop thread)."""

  def __init__(self, window: int = 10_000):
    self.started = time.time()
    self.requests = collections.Counter()  # endpoint -> count
    self.responses = collections.Counter()  # status code -> count
    self.rejected = 0  # 503: queue full or shutting down
    self.in_flight = 0  # /search requests being handled
    self.queries = 0  # queries searched
    self.batches = 0
    self.batch_sizes = collections.Counter()  # queries per executed batch -> count
    self.padded_sizes = collections.Counter()  # compiled batch size it ran at -> count
    self.latencies_ms: collections.deque = collections.deque(maxlen=window)  # /search, end to end
    self.batch_ms: collections.deque = collections.deque(maxlen=window)  # search call per batch
    self._lock = threading.Lock()

  def record_batch(self, n: int, padded: int, seconds: float) -> None:
    with self._lock:
      self.batches += 1
      self.queries += n
      self.batch_sizes[n] += 1
      self.padded_sizes[padded] += 1
      self.batch_ms.append(seconds * 1e3)

  def snapshot(self, queue_depth: int) -> dict:
    with self._lock:
      return {
          "uptime_s": round(time.time() - self.started, 3),
          "requests": dict(self.requests), "responses": {str(k): v for k, v in sorted(self.responses.items())},
          "errors": sum(v for k, v in self.responses.items() if k >= 400),
          "rejected_503": self.rejected, "queries": self.queries, "batches": self.batches,
          "batch_size_histogram": {str(k): v for k, v in sorted(self.batch_sizes.items())},
          "padded_batch_size_histogram": {str(k): v for k, v in sorted(self.padded_sizes.items())},
          "latency_ms": percentiles(self.latencies_ms),
          "batch_search_ms": percentiles(self.batch_ms),
          "queue_depth": queue_depth, "in_flight": self.in_flight,
      }


def percentiles(values) -> dict:
  """``{"count", "p50", "p90", "p99", "max"}`` of a window of values (None when empty)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  v = np.asarray(list(values), np.float64)
  if v.size == 0:
    return {"count": 0, "p50": None, "p90": None, "p99": None, "max": None}
  p50, p90, p99 = np.percentile(v, [50, 90, 99])
  return {"count": int(v.size), "p50": round(float(p50), 3), "p90": round(float(p90), 3),
          "p99": round(float(p99), 3), "max": round(float(v.max()), 3)}


class MicroBatcher:
  """Gathers submitted queries into batches for ``run_batch`` (see the module docstring).

  Args:
    run_batch: ``run_batch(queries) -> results`` (one per query, in order), run in a thread.
    max_batch: most queries per batch (a single request with more runs alone).
    max_wait_s: how long the first request of a batch waits for others.
    queue_size: most requests waiting (not counting the batch being searched).
    padded_size: ``padded_size(n)`` the compiled size a batch of n runs at (for the metrics).
    metrics: where batch sizes and timings go.
  """

  def __init__(self, run_batch: Callable[[list], list], *, max_batch: int, max_wait_s: float,
               queue_size: int, padded_size: Callable[[int], int] = lambda n: n,
               metrics: Metrics | None = None):
    if max_batch < 1 or queue_size < 1 or max_wait_s < 0:
      raise ConfigError(f"max_batch {max_batch}, queue_size {queue_size} must be >= 1 and "
                       f"max_wait_s {max_wait_s} >= 0")
    self.run_batch = run_batch
    self.max_batch = max_batch
    self.max_wait_s = max_wait_s
    self.queue_size = queue_size
    self.padded_size = padded_size
    self.metrics = metrics or Metrics()
    self._queue: asyncio.Queue | None = None
    self._worker: asyncio.Task | None = None
    self._closing = False
    self._held: _Pending | None = None  # taken from the queue, waits for the next batch
    # One thread: batches run one after another, never two searches at once.
    self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="search")

  @property
  def depth(self) -> int:
    return (self._queue.qsize() if self._queue is not None else 0) + (self._held is not None)

  async def start(self) -> None:
    self._queue = asyncio.Queue(maxsize=self.queue_size)
    self._closing = False
    self._worker = asyncio.create_task(self._run(), name="micro-batcher")

  async def stop(self) -> None:
    """Refuses new requests, answers every queued one, then ends the worker."""
    self._closing = True
    if self._queue is not None and self._worker is not None and not self._worker.done():
      await self._queue.join()
      self._worker.cancel()
      try:
        await self._worker
      except asyncio.CancelledError:
        pass
    self._executor.shutdown(wait=True)

  async def submit(self, queries: Sequence[Any]) -> list:
    """Queues ``queries`` (one request) and waits for their results; QueueFull when full."""
    if self._queue is None or self._closing:
      raise QueueFull("the server is shutting down")
    fut = asyncio.get_running_loop().create_future()
    try:
      self._queue.put_nowait(_Pending(list(queries), fut, time.perf_counter()))
    except asyncio.QueueFull:
      raise QueueFull(f"the request queue is full ({self.queue_size} requests waiting); "
                      "retry later") from None
    return await fut

  async def _next(self, timeout: float | None) -> _Pending | None:
    """The held request, else the next queued one (None after ``timeout`` seconds)."""
    if self._held is not None:
      p, self._held = self._held, None
      return p
    if timeout is None:
      return await self._queue.get()
    if timeout <= 0:
      try:
        return self._queue.get_nowait()
      except asyncio.QueueEmpty:
        return None
    try:
      return await asyncio.wait_for(self._queue.get(), timeout)
    except asyncio.TimeoutError:
      return None

  async def _run(self) -> None:
    loop = asyncio.get_running_loop()
    while True:
      first = await self._next(None)
      batch, n = [first], len(first.queries)
      deadline = loop.time() + self.max_wait_s
      while n < self.max_batch:
        p = await self._next(deadline - loop.time())
        if p is None:
          break
        if n + len(p.queries) > self.max_batch:
          self._held = p  # first of the next batch (already counted as taken from the queue)
          break
        batch.append(p)
        n += len(p.queries)
      flat = [q for p in batch for q in p.queries]
      t0 = time.perf_counter()
      try:
        results = await loop.run_in_executor(self._executor, self.run_batch, flat)
      except Exception as e:  # pylint: disable=broad-except  (each waiting request gets it)
        for p in batch:
          if not p.future.done():
            p.future.set_exception(e)
      else:
        self.metrics.record_batch(n, self.padded_size(n), time.perf_counter() - t0)
        start = 0
        for p in batch:
          if not p.future.done():  # a client that went away cancelled its future
            p.future.set_result(results[start:start + len(p.queries)])
          start += len(p.queries)
      finally:
        for _ in batch:
          self._queue.task_done()
