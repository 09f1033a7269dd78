"""Retrieval with a trained CART network: text -> constrained beam search -> item rows.

:class:`CartSearcher` wraps one jitted function ``(params, frozen, input_ids) -> DecodeResult``
that encodes a batch of queries once and runs :func:`cart_jax.inference.decoding.beam_search` over the
index's trie (rows are rows of ``SemanticIndex.codes``). Queries are processed in fixed-size
batches (the last one padded) so one compiled program serves any number of queries.

**Restricting by modality.** Over a mixed index (images, audio and video in one index, see
``cart data merge``) a query can be limited to one modality: :meth:`CartSearcher.restrict`
returns a searcher whose trie holds only that modality's identifiers (:func:`subset_trie`), so
the beam search can generate nothing else. The sub-trie's leaves point at *global* index rows,
so results need no remapping. Tries are built once per modality and shared by all restricted
views; ``jax.jit`` compiles one program per trie shape (the fan-outs are static).

**Query embedding and re-ranking.** With a MiniLM encoder the same jitted call can also return each
query's all-MiniLM-L6-v2 sentence embedding (masked mean of the last layer's states, L2-normalised:
what the dual tower's text side starts from), at no extra encoder pass:
:meth:`CartSearcher.search_beams`. ``search_ids``/``search_texts`` take a
:class:`cart_jax.inference.rerank.Reranker`: every beam result is then re-scored on the host by the
dual tower's query-item cosine and re-sorted (``cart eval --rerank``).

**On every device.** With a ``mesh`` (the trainer's, or :func:`cart_jax.runs.restore.load_run`'s:
all devices of all processes) a batch is placed with each process filling only its own shards
and results come back through ``partitioning.global_to_host`` (a gather across processes
where needed, never ``np.asarray`` of an array other processes hold).
"""
from __future__ import annotations

import copy
import dataclasses
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cart_jax import partitioning
from cart_jax.core.errors import CartError
from cart_jax.inference.decoding import DecodeConfig, beam_search
from cart_jax.index.trie import TrieTables, build_trie
from cart_jax.runs.layout import RunError
from cart_jax.runs.restore import LoadedRun, NonFiniteError  # noqa: F401  (raised here too)

if TYPE_CHECKING:
  from cart_jax.inference.rerank import Reranker


# Queries per compiled search call when the caller gives none, per device (a mesh multiplies it by
# its data axis). CPU: 64. benchmarks/search_batch.py (random identifiers, L = 5, N = 100K) peaks
# at 16 (301 q/s against 272 at 64), but `cart eval` of the emoji demo run (L = 4, 3,944 queries)
# runs faster at 64 (372.5 / 337.1 q/s against 351.5 / 306.0 at 16, alternating runs): the default
# stays where the real run is faster. Accelerators: 1024, the batch at which the throughput goals
# are set (a few hundred queries keep a GPU's or TPU core's matrix units busy).
DEFAULT_BATCH_SIZE = {"cpu": 64, "gpu": 1024, "cuda": 1024, "rocm": 1024, "tpu": 1024}


def default_batch_size(platform: str | None = None) -> int:
  """Queries per search call, per device, for ``platform`` (default: JAX's default backend)."""
  platform = (platform or jax.default_backend()).lower()
  return DEFAULT_BATCH_SIZE.get(platform, DEFAULT_BATCH_SIZE["cpu"])


class ModalityError(CartError):
  """A search was restricted to a modality the index does not hold (the message lists those it does)."""


@dataclasses.dataclass
class Beams:
  """Every beam of a search (best first by log-probability), and the queries' sentence embeddings.

  Attributes:
    rows: int32 [Q, beam] index rows; -1 where fewer than ``beam`` identifiers exist.
    scores: float32 [Q, beam] identifier log-probabilities; -inf where ``rows`` is -1.
    codes: int32 [Q, beam, L] level-local codes (-1 where invalid).
    query_embedding: float32 [Q, 384] MiniLM sentence embeddings (unit norm), or None.
  """
  rows: np.ndarray
  scores: np.ndarray
  codes: np.ndarray
  query_embedding: np.ndarray | None


def subset_trie(codes: np.ndarray, rows: np.ndarray, vocab=None, device_put: bool = False,
                leaf_bias: np.ndarray | None = None) -> TrieTables:
  """The trie of ``codes[rows]`` whose leaves point at the *global* rows (rows of ``codes``).

  Args:
    codes: int [N, L] all identifiers of the index.
    rows: int [n] the rows to keep (distinct, any order).
    vocab: the index's IdentifierVocab (same level sizes as the full trie, so the model's logits fit).
    device_put: commit the tables to the default device.
    leaf_bias: optional float [N] log-prior offset per row of ``codes`` (``SemanticIndex.prior()``).
  """
  rows = np.asarray(rows, np.int64)  # [n]
  if rows.ndim != 1 or rows.size == 0:
    raise ValueError(f"subset_trie: need a non-empty 1-D array of rows, got shape {rows.shape}")
  if len(np.unique(rows)) != rows.size:
    raise ValueError("subset_trie: rows must be distinct")
  codes = np.asarray(codes)
  if rows.min() < 0 or rows.max() >= codes.shape[0]:
    raise ValueError(f"subset_trie: rows out of range [0, {codes.shape[0]})")
  bias = None if leaf_bias is None else np.asarray(leaf_bias, np.float32)[rows]
  sub = build_trie(codes[rows], vocab, leaf_bias=bias)  # leaf_row: rows of codes[rows]  [n]
  sub = sub.replace(leaf_row=rows[np.asarray(sub.leaf_row)].astype(np.int32))  # -> global rows [n]
  return sub.to_device() if device_put else sub


def index_modalities(index, corpus) -> np.ndarray:
  """Modality (str) of every index row, from the corpus's items: ``[N]`` in ``index.item_ids`` order."""
  missing = [i for i in index.item_ids if i not in corpus]
  if missing:
    raise CartError(f"{len(missing)} index item(s) are not items of corpus {corpus.name!r}, e.g. "
                    f"{missing[:3]}: the index was not built from this corpus")
  return np.asarray([corpus.item_modality(i) for i in index.item_ids])


class CartSearcher:
  """Constrained beam search over an index for a network given as (graphdef, params, frozen).

  Args:
    graphdef: the network's graph definition (``nnx.split``).
    index: the SemanticIndex (codes, vocab, item ids).
    beam_size, n_results: decode settings.
    input_length: query token length.
    batch_size: queries per compiled call (with a mesh: rounded up to a multiple of its data axis);
      None: :func:`default_batch_size` per device (times the mesh's data axis).
    mesh: optional mesh the search runs on: each query batch is split over its ``data`` axis (every
      device searches its queries), the trie is replicated on it, and the results are gathered
      whole on every process (a mesh spanning several processes works; every process must then
      run the same searches). The parameters must live on this mesh. None: one device.
    item_modalities: optional modality (str) per index row (:func:`index_modalities`); needed by
      :meth:`restrict`.
    check_finite: raise :class:`NonFiniteError` when a search gives a NaN or +inf score
      (such a beam is dropped as invalid: the query would silently get fewer or no results).
      On for a loaded run (:func:`searcher_for_run`); off for the
      validation inside training, where a diverging run is logged, not stopped.
  """

  def __init__(self, graphdef, index, *, beam_size: int = 10, n_results: int = 10,
               input_length: int = 32, batch_size: int | None = None, mesh=None,
               item_modalities: Sequence[str] | None = None, check_finite: bool = False):
    self.graphdef = graphdef
    self.check_finite = bool(check_finite)
    self.index = index
    self.input_length = int(input_length)
    if batch_size is None:
      per_device = default_batch_size()
      batch_size = per_device * (mesh.shape[partitioning.DATA] if mesh is not None else 1)
    self.batch_size = int(batch_size)
    self.mesh = mesh
    self.decode_config = DecodeConfig(beam_size=beam_size, n_results=n_results)
    self.modality: str | None = None  # None: the whole index
    self.item_modalities = None
    if item_modalities is not None:
      self.item_modalities = np.asarray(item_modalities)  # [N]
      if self.item_modalities.shape != (index.n_items,):
        raise ValueError(f"item_modalities: {self.item_modalities.shape[0]} entries for an index of "
                         f"{index.n_items} items")
    if mesh is not None:  # queries are split over the data axis: a batch fills it evenly
      n_data = mesh.shape[partitioning.DATA]
      self.batch_size = -(-self.batch_size // n_data) * n_data
    self.trie = self._place(build_trie(np.asarray(index.codes), index.vocab,
                                       leaf_bias=index.prior()))
    self._tries: dict[str | None, TrieTables] = {None: self.trie}  # shared by restricted views
    id_length = index.vocab.id_length
    config = self.decode_config

    def search(params, frozen, inputs, trie, n_results, with_embedding):  # inputs int32 [b, src]
      model = nnx.merge(graphdef, params, frozen)
      mask = inputs != 0  # [b, src]
      states = model.encoder_states(inputs, mask)  # [b, S, src, width]: the encoder runs once
      step_fn = model.tokens_to_logits_fn(model.encode_states(states, mask))
      cache = model.init_cache(inputs.shape[0], config.beam_size, id_length)  # [b, beam, ...]
      res = beam_search(step_fn, cache, trie, dataclasses.replace(config, n_results=n_results))
      if not with_embedding:
        return res, None
      if model.config.encoder != "minilm":
        raise ValueError(f"the query sentence embedding needs a MiniLM encoder; this network's "
                         f"encoder is {model.config.encoder!r}")
      from cart_jax.models.text.minilm import mean_pool  # pylint: disable=g-import-not-at-top
      pooled = mean_pool(states[:, -1].astype(jnp.float32), mask)  # [b, 384] last MiniLM layer
      emb = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
      return res, emb

    self._search = jax.jit(search, static_argnames=("n_results", "with_embedding"))

  def available_modalities(self) -> dict[str, int]:
    """``{modality: number of index items}`` (empty when no item modalities were given)."""
    if self.item_modalities is None:
      return {}
    names, counts = np.unique(self.item_modalities, return_counts=True)
    return {str(m): int(c) for m, c in zip(names, counts)}

  def trie_for(self, modality: str | None) -> TrieTables:
    """The trie of the whole index (``None``) or of one modality's items (built once, cached)."""
    if modality not in self._tries:
      available = self.available_modalities()
      if modality not in available:
        listed = ", ".join(f"{m} ({n} items)" for m, n in available.items()) or "none known"
        raise ModalityError(f"modality {modality!r} is not in this index; available: {listed}")
      rows = np.flatnonzero(self.item_modalities == modality)  # [n_modality] global rows
      self._tries[modality] = self._place(subset_trie(np.asarray(self.index.codes), rows,
                                                      self.index.vocab,
                                                      leaf_bias=self.index.prior()))
    return self._tries[modality]

  def _place(self, trie: TrieTables) -> TrieTables:
    """The trie's tables on the device (no mesh) or replicated over every device of the mesh
    (each process placing its own copies: right when the mesh spans several processes)."""
    if self.mesh is None:
      return trie.to_device()
    replicated = jax.sharding.NamedSharding(self.mesh, jax.P())
    return jax.tree.map(lambda x: partitioning.host_to_global(np.asarray(x), replicated), trie)

  def restrict(self, modality: str | None) -> "CartSearcher":
    """A view of this searcher that only generates identifiers of ``modality`` (None: all).

    The view shares the compiled search function and the trie cache; rows it returns are rows
    of the whole index. Raises ModalityError listing the modalities present.
    """
    self.trie_for(modality)  # validates and builds once
    view = copy.copy(self)
    view.modality = modality
    view.trie = self._tries[modality]
    return view

  def _run(self, params, frozen, input_ids: np.ndarray, n_results: int, with_embedding: bool,
           progress: Callable[[int], None] | None = None):
    """Fixed-size batches through the jitted search: (rows, scores, codes, embedding or None).

    ``progress(n)`` is called after each batch with its number of queries.
    """
    q = input_ids.shape[0]
    b = self.batch_size
    rows, scores, codes, embs = [], [], [], []
    for start in range(0, q, b):
      chunk = input_ids[start:start + b]
      n = chunk.shape[0]
      if n < b:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], b - n, axis=0)])  # [b, src]
      if self.mesh is not None:
        # The batch is split over the data axis (every device searches its queries); every
        # process holds the whole host batch and places its own rows, and the results come back
        # whole on every process (global_to_host: a gather across processes where needed).
        queries = jax.sharding.NamedSharding(self.mesh, jax.P(partitioning.DATA))
        with jax.set_mesh(self.mesh):
          res, emb = self._search(params, frozen, partitioning.host_to_global(chunk, queries),
                                  self.trie, n_results, with_embedding)
          res, emb = partitioning.global_to_host((res, emb))
      else:
        res, emb = self._search(params, frozen, jnp.asarray(chunk), self.trie, n_results, with_embedding)
      valid = np.asarray(res.valid)[:n]
      raw = np.asarray(res.scores)[:n]  # [n, k]; NaN / +inf: not valid, so never shown
      if self.check_finite:
        _check_scores(raw, valid)
      rows.append(np.where(valid, np.asarray(res.rows)[:n], -1))
      scores.append(np.where(valid, raw, -np.inf))
      codes.append(np.asarray(res.codes)[:n])
      if with_embedding:
        embs.append(np.asarray(emb, np.float32)[:n])
      if progress is not None:
        progress(n)
    if not rows:
      k, L = n_results, self.index.vocab.id_length
      return (np.zeros((0, k), np.int32), np.zeros((0, k), np.float32), np.zeros((0, k, L), np.int32),
              np.zeros((0, 384), np.float32) if with_embedding else None)
    return (np.concatenate(rows), np.concatenate(scores), np.concatenate(codes),
            np.concatenate(embs) if with_embedding else None)

  def search_beams(self, params, frozen, input_ids: np.ndarray, *, with_embedding: bool = True,
                   progress: Callable[[int], None] | None = None) -> Beams:
    """All ``beam_size`` results per query and (by default) the queries' MiniLM sentence embeddings.

    The embedding comes out of the same jitted call as the beam search (the encoder runs once):
    ``mean_pool(states[:, -1], mask)`` L2-normalised, i.e. ``minilm.sentence_embedding`` of the
    query. Needs a MiniLM encoder (ValueError otherwise). ``progress(n)``: after each batch.
    """
    rows, scores, codes, emb = self._run(params, frozen, input_ids, self.decode_config.beam_size,
                                         with_embedding, progress)
    return Beams(rows=rows, scores=scores, codes=codes, query_embedding=emb)

  def search_ids(self, params, frozen, input_ids: np.ndarray, rerank: "Reranker | None" = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``input_ids int32 [Q, src]`` -> (rows int32 [Q, n], scores float32 [Q, n], codes [Q, n, L]).

    Rows are ``-1`` (and scores ``-inf``) where fewer than ``n`` identifiers exist. With
    ``rerank``, all ``beam_size`` results are re-scored by the dual tower's cosine and re-sorted
    (:meth:`Reranker.rerank`); the first ``n`` of that order come back, with their combined scores
    (``logp + weight * cos``; the cosine alone for the cosine-only weight).
    """
    n = self.decode_config.n_results
    if rerank is None:
      rows, scores, codes, _ = self._run(params, frozen, input_ids, n, False)
      return rows, scores, codes
    beams = self.search_beams(params, frozen, input_ids)
    out = rerank.rerank(beams.rows, beams.scores, beams.query_embedding)
    codes = np.take_along_axis(beams.codes, out.order[:, :, None], axis=1)  # [Q, beam, L]
    return out.rows[:, :n], out.scores[:, :n].astype(np.float32), codes[:, :n]

  def search_texts(self, params, frozen, texts: Sequence[str], rerank: "Reranker | None" = None):
    """Tokenises ``texts`` and searches them (see :meth:`search_ids`)."""
    from cart_jax.models.text.tokenizer import encode_texts  # pylint: disable=g-import-not-at-top
    return self.search_ids(params, frozen, encode_texts(list(texts), self.input_length), rerank)

  def warm_up(self, params, frozen, *, beams: bool = False) -> float:
    """Compiles the search program (``beams``: the one of :meth:`search_beams`); returns seconds."""
    t0 = time.perf_counter()
    dummy = np.zeros((1, self.input_length), np.int32)
    dummy[:, 0] = 101
    if beams:
      self.search_beams(params, frozen, dummy)
    else:
      self.search_ids(params, frozen, dummy)
    return time.perf_counter() - t0


def _check_scores(raw: np.ndarray, valid: np.ndarray) -> None:
  """Raises :class:`NonFiniteError` for a query whose scores (float [n, k]) hold a NaN or a +inf,
  or that kept no identifier at all (``valid`` bool [n, k]): over a non-empty trie, finite
  log-probabilities always leave one; NaN logits end as -inf, every beam dead."""
  bad = (np.isnan(raw) | np.isposinf(raw)).any(axis=1) | ~valid.any(axis=1)  # [n]
  if bad.any():
    raise NonFiniteError(
        f"the search gave non-finite scores (NaN or inf; no identifier with a finite score) for "
        f"{int(bad.sum())} of the {raw.shape[0]} queries of a batch: the run's parameters are "
        "corrupt or overflow (a checkpoint loaded with --no-verify or written before manifests, or "
        "a diverged training); no results are given")


def describe(index, rows: np.ndarray, scores: np.ndarray, corpus=None) -> list[dict[str, Any]]:
  """One query's results as dicts: rank, item id, identifier codes, score, modality, media path."""
  out = []
  for rank, (r, s) in enumerate(zip(rows, scores)):
    if r < 0:
      continue
    item = index.item_ids[int(r)]
    d = {"rank": rank + 1, "item_id": item,
         "identifier": [int(c) for c in index.codes[int(r)]], "score": float(s)}
    if corpus is not None and item in corpus:
      d["modality"] = corpus.item_modality(item)
      d["media"] = str(corpus.media_path(item))
    out.append(d)
  return out


def searcher_for_run(r: LoadedRun, *, beam_size: int, n_results: int, batch_size: int | None,
                     modality: str | None = None):
  """A CartSearcher over the run's index; item modalities from the run's corpus (when loaded).

  With ``modality`` the searcher only generates identifiers of that modality's items; an unknown
  modality raises ``ModalityError`` listing the index's modalities.
  """
  modalities = None
  if r.corpus is not None:
    try:
      modalities = index_modalities(r.index, r.corpus)
    except ValueError as e:
      if modality is not None:  # restricting needs every row's modality
        raise RunError(f"{r.model_dir}: cannot restrict by modality: {e}") from None
  searcher = CartSearcher(r.graphdef, r.index, beam_size=beam_size, n_results=n_results,
                          input_length=r.input_length, batch_size=batch_size,
                          item_modalities=modalities, mesh=getattr(r, "mesh", None),
                          check_finite=True)
  return searcher.restrict(modality) if modality is not None else searcher
