"""``cart serve``: a trained run behind HTTP, with micro-batching and a search page.

  cart serve --model-dir /tmp/cart_emoji --port 8080        # then open http://127.0.0.1:8080/

  from cart_jax import serve
  server = serve.make_server("/tmp/cart_emoji", serve.ServeConfig(port=8080))
  server.run()                                              # blocks; SIGTERM drains and returns

Three rooms: :mod:`.engine` (the loaded run, the jitted search compiled for a few batch sizes,
results as dicts), :mod:`.batcher` (the bounded queue and the worker that gathers requests into
batches), :mod:`.app` (the Starlette routes, request validation, the page and media). uvicorn runs the
app; on SIGTERM (or Ctrl-C) it stops accepting connections, lets in-flight requests finish, then
the batcher answers whatever is still queued, and :meth:`Server.run` returns (``cart serve``
exits 0).
"""
from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from typing import Callable, Sequence

from cart_jax.serve.engine import (DEFAULT_BATCH_SIZES, Query, SearchEngine, ServeError,
                                   compiled_batch_sizes)

__all__ = ["ServeConfig", "Server", "make_server", "SearchEngine", "Query", "ServeError",
           "compiled_batch_sizes", "DEFAULT_BATCH_SIZES"]


@dataclasses.dataclass(frozen=True)
class ServeConfig:
  """How ``cart serve`` serves.

  Attributes:
    host, port: where to listen (``port=0``: any free port; :attr:`Server.port` tells).
    beam: beam size and the most results a request may ask for (``k``).
    max_batch: most queries per search call.
    max_wait_ms: how long a request waits for others to join its batch.
    queue_size: most requests waiting; one more gets 503.
    batch_sizes: compiled batch sizes (default 1, 4, 16, ... below ``max_batch``, and it).
    warm_modalities: also compile each modality's restricted search at start-up.
    max_query_chars: longest query accepted (413 beyond).
    graceful_timeout_s: on SIGTERM, how long in-flight requests may take to finish.
    access_log: uvicorn's one line per request.
    media_roots: directories outside the corpus whose media ``/media`` may serve (roots the
      corpus declares there are not served from unless named here).
  """
  host: str = "127.0.0.1"
  port: int = 8080
  beam: int = 10
  max_batch: int = 16
  max_wait_ms: float = 5.0
  queue_size: int = 256
  batch_sizes: Sequence[int] | None = None
  warm_modalities: bool = False
  max_query_chars: int = 1000
  graceful_timeout_s: float = 30.0
  access_log: bool = False
  media_roots: Sequence[str] = ()

  def check(self) -> None:
    """Raises ServeError naming the flag of a setting that cannot work."""
    if not 0 <= self.port <= 65535:
      raise ServeError(f"--port {self.port}: must be in 0..65535")
    if self.beam < 1:
      raise ServeError(f"--beam {self.beam}: must be >= 1")
    if self.max_wait_ms < 0:
      raise ServeError(f"--max-wait-ms {self.max_wait_ms}: must be >= 0")
    if self.queue_size < 1:
      raise ServeError(f"--queue-size {self.queue_size}: must be >= 1")
    if self.max_query_chars < 1:
      raise ServeError(f"--max-query-chars {self.max_query_chars}: must be >= 1")
    compiled_batch_sizes(self.max_batch, self.batch_sizes)


class Server:
  """A warmed-up engine, its app and a uvicorn server (:func:`make_server`)."""

  def __init__(self, engine: SearchEngine, config: ServeConfig, log: Callable[[str], None] = print):
    import uvicorn  # pylint: disable=g-import-not-at-top

    from cart_jax.serve.app import create_app  # pylint: disable=g-import-not-at-top
    self.engine = engine
    self.config = config
    self.log = log
    self.app = create_app(engine, max_batch=config.max_batch, max_wait_ms=config.max_wait_ms,
                          queue_size=config.queue_size, max_query_chars=config.max_query_chars)
    self.uvicorn = uvicorn.Server(uvicorn.Config(
        self.app, host=config.host, port=config.port, log_level="info",
        access_log=config.access_log, timeout_graceful_shutdown=config.graceful_timeout_s,
        lifespan="on"))

  @property
  def port(self) -> int | None:
    """The port listened on (the real one when ``port=0``), once started."""
    for s in getattr(self.uvicorn, "servers", []) or []:
      for sock in s.sockets:
        return sock.getsockname()[1]
    return None

  def run(self) -> None:
    """Serves until SIGTERM/SIGINT, then drains (see the package docstring) and returns.

    uvicorn re-raises the signal it caught once it has shut down, to the handler that was
    installed before it started; that handler (ours, here) only notes it, so a drained
    shutdown returns normally (exit 0) instead of dying of the signal.
    """
    caught = []
    previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, lambda s, f: caught.append(s))
    try:
      self.uvicorn.run()
    finally:
      for sig, handler in previous.items():
        signal.signal(sig, handler)
    if caught:
      self.log(f"stopped by {signal.Signals(caught[0]).name}: in-flight requests answered")


def make_server(model_dir: str | os.PathLike, config: ServeConfig = ServeConfig(), *,
                step: int | None = None, rerank: bool = False, rerank_weight: float | None = None,
                embeddings: str | os.PathLike | None = None, verify: bool = True,
                log: Callable[[str], None] = print) -> Server:
  """Loads MODEL_DIR once, compiles its search for every batch size (a log line each) -> Server."""
  config.check()
  try:
    import starlette  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    import uvicorn  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise ServeError(f"cart serve needs the `serve` extra ({e.name} is not installed): "
                     "pip install 'cart-jax[serve]'") from None
  t0 = time.perf_counter()
  sizes = compiled_batch_sizes(config.max_batch, config.batch_sizes)
  engine = SearchEngine.from_run(model_dir, step=step, beam=config.beam, batch_sizes=sizes,
                                 rerank=rerank, rerank_weight=rerank_weight,
                                 embeddings=embeddings, verify=verify,
                                 media_roots=config.media_roots, log=log)
  log(f"loaded {model_dir} (step {engine.loaded.step}, {engine.index.n_items} items"
      f"{', re-ranked' if engine.reranker is not None else ''}) in {time.perf_counter() - t0:.2f} s")
  modalities = [None] + (sorted(engine.modalities) if config.warm_modalities and
                         len(engine.modalities) > 1 else [])
  engine.warm_up(log, modalities)
  log(f"ready in {time.perf_counter() - t0:.2f} s: http://{config.host}:{config.port}/ "
      f"(max batch {config.max_batch}, max wait {config.max_wait_ms:g} ms, queue {config.queue_size})")
  return Server(engine, config, log)
