"""Dual-tower retrieval: exact inner-product top-k over all item embeddings.

* :class:`ExactSearcher` (JAX): ``scores = q @ C.T`` and ``lax.top_k``. The corpus is split
  into fixed-size chunks ``[num_chunks, chunk, d]`` (the last padded, its padding scored
  ``-inf``); a ``lax.scan`` over chunks keeps a running top-k ``[Q, k]`` and merges each chunk's
  top-k into it, so memory is ``Q x chunk`` whatever N is. Queries go in fixed-size batches
  (the last padded), so one program serves any number of queries.
  Ties break toward the lower item row (as a stable sort of ``-score`` would).
* :class:`FaissSearcher`: ``faiss.IndexFlatIP`` (exact) or ``IndexIVFFlat`` with inner product
  (approximate; ``nlist`` cells, ``nprobe`` visited), from ``faiss-cpu``.

Both return ``(scores float32 [Q, k], rows int32 [Q, k])``, best first.
"""
from __future__ import annotations

import dataclasses
import math
import time

import numpy as np

METHODS = ("jax", "faiss-flat", "faiss-ivf")


def _check(items: np.ndarray, k: int) -> None:
  if items.ndim != 2 or items.shape[0] == 0:
    raise ValueError(f"item embeddings must be a non-empty [N, d] array, found shape {items.shape}")
  if not 1 <= k <= items.shape[0]:
    raise ValueError(f"k must be in [1, N={items.shape[0]}], got {k}")


def _check_queries(queries: np.ndarray, d: int) -> None:
  if queries.ndim != 2 or queries.shape[1] != d:
    raise ValueError(f"queries must be [Q, {d}], found shape {queries.shape}")


def merge_top_k(scores_a, rows_a, scores_b, rows_b, k: int):
  """Top-k of the union of two top-k lists ``[Q, ka]`` and ``[Q, kb]`` (``a`` wins ties)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  scores = jnp.concatenate([scores_a, scores_b], axis=1)  # [Q, ka + kb]
  rows = jnp.concatenate([rows_a, rows_b], axis=1)  # [Q, ka + kb]
  top, pos = jax.lax.top_k(scores, k)  # [Q, k]
  return top, jnp.take_along_axis(rows, pos, axis=1)


@dataclasses.dataclass(frozen=True)
class ExactSearchConfig:
  """Attributes:
    k: results per query.
    chunk_size: items scored per scan step (``None``: all N in one chunk).
    query_batch: queries per call of the compiled program.
  """
  k: int = 10
  chunk_size: int | None = 65536
  query_batch: int = 256


class ExactSearcher:
  """Exact top-k with JAX (chunked matmul + ``lax.top_k`` + running merge)."""

  def __init__(self, items: np.ndarray, config: ExactSearchConfig = ExactSearchConfig()):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

    items = np.asarray(items, np.float32)
    _check(items, config.k)
    n, d = items.shape
    chunk = min(config.chunk_size or n, n)
    if chunk < config.k:
      raise ValueError(f"chunk_size {chunk} must be >= k {config.k}")
    num_chunks = math.ceil(n / chunk)
    padded = np.zeros((num_chunks * chunk, d), np.float32)
    padded[:n] = items
    self.items = jax.device_put(padded.reshape(num_chunks, chunk, d))  # [num_chunks, chunk, d]
    self.config = config
    self.n, self.d, self.chunk = n, d, chunk
    k = config.k

    @jax.jit
    def search(chunks, queries):  # [num_chunks, chunk, d], [B, d]
      b = queries.shape[0]

      def step(carry, inp):
        best_s, best_r = carry  # [B, k] each
        c_idx, block = inp  # scalar, [chunk, d]
        s = jnp.einsum("bd,nd->bn", queries, block,
                       precision=jax.lax.Precision.HIGHEST)  # [B, chunk]
        rows = c_idx * chunk + jnp.arange(chunk, dtype=jnp.int32)  # [chunk]
        s = jnp.where(rows[None, :] < n, s, -jnp.inf)  # padding never wins
        top_s, pos = jax.lax.top_k(s, k)  # [B, k]
        return merge_top_k(best_s, best_r, top_s, rows[pos], k), None

      init = (jnp.full((b, k), -jnp.inf, jnp.float32), jnp.full((b, k), -1, jnp.int32))
      (scores, rows), _ = jax.lax.scan(
          step, init, (jnp.arange(num_chunks, dtype=jnp.int32), chunks))
      return scores, rows

    self._search = search

  def search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``queries [Q, d]`` -> ``(scores [Q, k], rows [Q, k])``."""
    queries = np.asarray(queries, np.float32)
    _check_queries(queries, self.d)
    q, bs, k = queries.shape[0], self.config.query_batch, self.config.k
    scores = np.zeros((q, k), np.float32)
    rows = np.zeros((q, k), np.int32)
    for s in range(0, q, bs):
      batch = queries[s:s + bs]
      m = batch.shape[0]
      if m < bs:
        batch = np.concatenate([batch, np.zeros((bs - m, self.d), np.float32)])
      sc, rw = self._search(self.items, batch)
      scores[s:s + m] = np.asarray(sc)[:m]
      rows[s:s + m] = np.asarray(rw)[:m]
    return scores, rows

  def warm_up(self) -> float:
    """Compiles the search program; returns seconds."""
    t0 = time.perf_counter()
    self.search(np.zeros((1, self.d), np.float32))
    return time.perf_counter() - t0


@dataclasses.dataclass(frozen=True)
class FaissConfig:
  """Attributes:
    k: results per query.
    index: ``flat`` (``IndexFlatIP``, exact) or ``ivf`` (``IndexIVFFlat``, inner product).
    nlist: IVF cells (``None``: about ``4 sqrt(N)``, at most N / 39 so k-means has data).
    nprobe: IVF cells visited per query.
    seed: IVF k-means seed.
  """
  k: int = 10
  index: str = "flat"
  nlist: int | None = None
  nprobe: int = 8
  seed: int = 0


class FaissSearcher:
  """FAISS inner-product search (``faiss-cpu``)."""

  def __init__(self, items: np.ndarray, config: FaissConfig = FaissConfig()):
    try:
      import faiss  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError("FAISS search needs the PyPI package faiss-cpu "
                        "(pip install 'cart-jax[bench]')") from e
    items = np.ascontiguousarray(items, np.float32)
    _check(items, config.k)
    n, d = items.shape
    self.config, self.d = config, d
    if config.index == "flat":
      self.index = faiss.IndexFlatIP(d)
      self.nlist = None
    elif config.index == "ivf":
      nlist = config.nlist or max(1, min(int(4 * math.sqrt(n)), n // 39))
      if not 1 <= nlist <= n:
        raise ValueError(f"nlist must be in [1, N={n}], got {nlist}")
      quantizer = faiss.IndexFlatIP(d)
      self.index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
      self.index.cp.seed = config.seed
      self.index.train(items)
      self.index.nprobe = min(config.nprobe, nlist)
      self._quantizer = quantizer  # keep alive
      self.nlist = nlist
    else:
      raise ValueError(f"unknown FAISS index {config.index!r}; expected flat or ivf")
    self.index.add(items)

  def search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    queries = np.ascontiguousarray(queries, np.float32)
    _check_queries(queries, self.d)
    scores, rows = self.index.search(queries, self.config.k)
    return scores.astype(np.float32), rows.astype(np.int32)

  def warm_up(self) -> float:
    return 0.0


def make_searcher(method: str, items: np.ndarray, k: int, **options):
  """``jax`` | ``faiss-flat`` | ``faiss-ivf`` searcher over ``items [N, d]``."""
  if method == "jax":
    return ExactSearcher(items, ExactSearchConfig(k=k, **options))
  if method == "faiss-flat":
    return FaissSearcher(items, FaissConfig(k=k, index="flat", **options))
  if method == "faiss-ivf":
    return FaissSearcher(items, FaissConfig(k=k, index="ivf", **options))
  raise ValueError(f"unknown search method {method!r}; expected one of {METHODS}")
