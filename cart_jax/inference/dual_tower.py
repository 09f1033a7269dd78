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

The baseline ``cart baseline`` runs (:func:`cart_jax.jobs.baseline.baseline_job`): each query text through the text
tower (:func:`query_encoder`), then a searcher over every item embedding, scored by the one
evaluator (:func:`evaluate_dual_tower`, :mod:`cart_jax.inference.evaluation`).
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from cart_jax.core.errors import CartError

METHODS = ("jax", "faiss-flat", "faiss-ivf")


def _check(items: np.ndarray, k: int) -> None:
  if items.ndim != 2 or items.shape[0] == 0:
    raise CartError(f"item embeddings must be a non-empty [N, d] array, found shape {items.shape}")
  if not 1 <= k <= items.shape[0]:
    raise CartError(f"k must be in [1, N={items.shape[0]}], got {k}")


def _check_queries(queries: np.ndarray, d: int) -> None:
  if queries.ndim != 2 or queries.shape[1] != d:
    raise CartError(f"queries must be [Q, {d}], found shape {queries.shape}")


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
    dtype: item and query dtype on the device (``bfloat16`` halves memory); scores are float32.
  """
  k: int = 10
  chunk_size: int | None = 65536
  query_batch: int = 256
  dtype: str = "float32"


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
      raise CartError(f"chunk_size {chunk} must be >= k {config.k}")
    num_chunks = math.ceil(n / chunk)
    padded = np.zeros((num_chunks * chunk, d), np.float32)
    padded[:n] = items
    self.items = jax.device_put(padded.reshape(num_chunks, chunk, d)).astype(config.dtype)  # [chunks, chunk, d]
    self.config = config
    self.n, self.d, self.chunk = n, d, chunk
    k = config.k

    @jax.jit
    def search(chunks, queries):  # [num_chunks, chunk, d], [B, d]
      b = queries.shape[0]

      def step(carry, inp):
        best_s, best_r = carry  # [B, k] each
        c_idx, block = inp  # scalar, [chunk, d]
        s = jnp.einsum("bd,nd->bn", queries.astype(block.dtype), block,
                       precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)  # [B, chunk]
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


def default_nlist(n: int) -> int:
  """IVF cells for ``n`` items when none are given: about ``4 sqrt(n)``, at most ``n / 39``."""
  return max(1, min(int(4 * math.sqrt(n)), n // 39))


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
      nlist = config.nlist or default_nlist(n)
      if not 1 <= nlist <= n:
        raise CartError(f"nlist must be in [1, N={n}], got {nlist}")
      quantizer = faiss.IndexFlatIP(d)
      self.index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
      self.index.cp.seed = config.seed
      self.index.train(items)
      self.index.nprobe = min(config.nprobe, nlist)
      self._quantizer = quantizer  # keep alive
      self.nlist = nlist
    else:
      raise CartError(f"unknown FAISS index {config.index!r}; expected flat or ivf")
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
  raise CartError(f"unknown search method {method!r}; expected one of {METHODS}")


class DualTowerRanker:
  """A :class:`cart_jax.inference.evaluation.Ranker`: query encoder, then top-k over the items.

  ``encode(texts, progress)`` maps query texts to ``[Q, d]`` vectors (MiniLM + the dual
  encoder's projection, or rows given in advance); ``text_encoder`` (when there is one) is warmed
  up on every length bucket the texts need. After :meth:`rank`, ``queries`` holds the query
  vectors and ``encode_seconds`` / ``search_seconds`` the two parts of the timed pass.
  """

  def __init__(self, searcher, encode: Callable[..., np.ndarray], text_encoder=None):
    self.searcher, self.encode, self.text_encoder = searcher, encode, text_encoder
    self.k = searcher.config.k
    self.queries, self.encode_seconds, self.search_seconds = None, 0.0, 0.0

  def warm_up(self, texts: Sequence[str]) -> float:
    t0 = time.perf_counter()
    if self.text_encoder is not None:
      self.text_encoder.warm_up([len(r) for r in self.text_encoder.tokenize(texts)])
    self.searcher.search(self.encode(texts[:1]))
    return time.perf_counter() - t0

  def rank(self, texts: Sequence[str], progress=None) -> tuple[np.ndarray, np.ndarray]:
    t0 = time.perf_counter()
    self.queries = np.asarray(self.encode(texts, progress), np.float32)  # [Q, d]
    t1 = time.perf_counter()
    scores, rows = self.searcher.search(self.queries)
    self.encode_seconds, self.search_seconds = t1 - t0, time.perf_counter() - t1
    return rows, scores


def query_encoder(embeddings_path: str | os.PathLike, dim: int, *, model: str | os.PathLike | None = None,
                  text_batch: int = 128) -> tuple[Callable[..., np.ndarray], object, str]:
  """The query side of ``cart embed``'s dual encoder: ``(encode, text_encoder, description)``.

  ``model`` (default: the ``E.model.npz`` next to the embeddings) projects MiniLM sentence
  embeddings into the items' space; without a model file, 384-d items are searched with plain
  MiniLM embeddings.

  Raises:
    CartError: ``model`` missing, of another dimension, or no query encoder at all.
  """
  from cart_jax.data.embeddings import embedding_files  # pylint: disable=g-import-not-at-top
  from cart_jax.models.text.encoder import MiniLMTextEncoder  # pylint: disable=g-import-not-at-top
  model_path = Path(model) if model else embedding_files(embeddings_path).model
  if model and not model_path.is_file():
    raise CartError(f"--model {model_path}: no such file")
  if model_path.is_file():
    from cart_jax.models.dual_encoder import embed_text_features, load_model  # pylint: disable=g-import-not-at-top
    dual = load_model(model_path)
    if dual.config.embed_dim != dim:
      raise CartError(f"{model_path}: model embeds into {dual.config.embed_dim} dimensions, "
                      f"{embeddings_path} has {dim}")
    project, side = (lambda f: embed_text_features(dual, f)), f"minilm+projection ({model_path.name})"
  elif dim == 384:
    project, side = (lambda f: f), "minilm"
  else:
    raise CartError(f"{embeddings_path}: no query encoder: {model_path.name} not found and the items "
                    f"are {dim}-d (not MiniLM's 384); pass --model or --query-embeddings")
  text_encoder = MiniLMTextEncoder(batch_size=text_batch)
  return (lambda texts, progress=None: project(text_encoder.encode(texts, progress))), text_encoder, side


def evaluate_dual_tower(items: np.ndarray, texts: Sequence[str], targets, encode, *,
                        text_encoder=None, method: str = "jax", k: int = 10,
                        chunk_size: int | None = 65536, query_batch: int = 256,
                        nlist: int | None = None, nprobe: int = 8, agreement: str | None = None,
                        progress: bool = False) -> dict:
  """The dual tower through the one evaluator: R@1/5/10, MRR@10, queries/s over ``texts``.

  Args:
    items: ``[N, d]`` item embeddings; targets: ``[Q]`` item rows of the query texts.
    encode: ``encode(texts, progress=None) -> [Q, d]`` (see :func:`query_encoder`).
    text_encoder: the MiniLM encoder inside ``encode``, warmed up before the timed pass.
    method: ``jax`` (chunk_size, query_batch), ``faiss-flat`` or ``faiss-ivf`` (nlist, nprobe).
    agreement: also search with this method and report how often the top-k lists agree.

  Returns:
    the evaluator's metrics (:func:`cart_jax.inference.evaluation.evaluate_ranker`) plus
    ``qps_search_only``, ``seconds_by_stage``, ``faiss_ivf`` and ``agreement`` when asked.
  """
  from cart_jax.inference.evaluation import evaluate_ranker, ranking_metrics  # pylint: disable=g-import-not-at-top
  options = {"chunk_size": chunk_size, "query_batch": query_batch, "nlist": nlist, "nprobe": nprobe}
  ranker = DualTowerRanker(searcher_for(method, items, k, **options), encode, text_encoder)
  out, rows, scores = evaluate_ranker(ranker, texts, targets, progress=progress,
                                      desc=f"dual tower ({method})")
  out["qps_search_only"] = len(texts) / max(ranker.search_seconds, 1e-9)
  out["seconds_by_stage"] = {"encode_queries": ranker.encode_seconds, "search": ranker.search_seconds}
  if getattr(ranker.searcher, "nlist", None):
    out["faiss_ivf"] = {"nlist": ranker.searcher.nlist, "nprobe": ranker.searcher.index.nprobe}
  if agreement:
    o_scores, o_rows = searcher_for(agreement, items, k, **options).search(ranker.queries)
    out["agreement"] = {
        "method": agreement,
        "top1_equal": float(np.mean(rows[:, 0] == o_rows[:, 0])),
        "topk_lists_equal": float(np.mean(np.all(rows == o_rows, axis=1))),
        "topk_sets_equal": float(np.mean([set(a) == set(b) for a, b in zip(rows, o_rows)])),
        "max_abs_score_diff": float(np.max(np.abs(scores - o_scores))),
        # Lists that differ only where items tie (pixel-identical media embed identically):
        "topk_scores_equal_1e-5": float(np.mean(np.all(np.abs(scores - o_scores) <= 1e-5, axis=1))),
        **{f"other_{key}": v for key, v in ranking_metrics(o_rows, targets, k).items()},
    }
  return out


def check_search_options(*, chunk_size: int | None = 65536, query_batch: int = 256,
                         text_batch: int = 128, nlist: int | None = None, nprobe: int = 8) -> None:
  """Batch and index sizes in range (``cart baseline``'s flags), before any work.

  ``--batch-size 0`` used to fail in ``range()``, a negative one to search nothing and report
  recall 0; ``--chunk-size 0`` and ``--nlist 0`` silently meant "the default", ``--nprobe 0`` failed
  inside FAISS. Raises CartError naming the flag.
  """
  for flag, value, low in (("--chunk-size", chunk_size, 1), ("--batch-size", query_batch, 1),
                           ("--text-batch", text_batch, 1), ("--nlist", nlist, 1),
                           ("--nprobe", nprobe, 1)):
    if value is None and flag in ("--chunk-size", "--nlist"):
      continue
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
      raise CartError(f"{flag} must be an integer >= {low}, got {value!r}")


def searcher_for(method: str, items: np.ndarray, k: int, *, chunk_size: int | None = 65536,
                 query_batch: int = 256, nlist: int | None = None, nprobe: int = 8):
  """:func:`make_searcher` with the options of ``method`` picked from all of them.

  Raises:
    CartError: an unknown method, bad options, or FAISS not installed.
  """
  if method == "jax":
    options = {"chunk_size": chunk_size, "query_batch": query_batch}
  elif method == "faiss-ivf":
    options = {"nlist": nlist, "nprobe": nprobe}
  else:
    options = {}
  try:
    return make_searcher(method, items, k, **options)
  except ImportError as e:
    raise CartError(str(e)) from None
