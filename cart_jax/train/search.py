"""Retrieval with a trained CART network: text -> constrained beam search -> item rows.

:class:`CartSearcher` wraps one jitted function ``(params, frozen, input_ids) -> DecodeResult``
that encodes a batch of queries once and runs :func:`cart_jax.decoding.beam_search` over the
index's trie (rows are rows of ``SemanticIndex.codes``). Queries are processed in fixed-size
batches (the last one padded) so one compiled program serves any number of queries.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cart_jax.decoding import DecodeConfig, beam_search
from cart_jax.index.trie import build_trie


class CartSearcher:
  """Constrained beam search over an index for a network given as (graphdef, params, frozen)."""

  def __init__(self, graphdef, index, *, beam_size: int = 10, n_results: int = 10,
               input_length: int = 32, batch_size: int = 64, mesh=None):
    self.graphdef = graphdef
    self.index = index
    self.input_length = int(input_length)
    self.batch_size = int(batch_size)
    self.mesh = mesh
    self.decode_config = DecodeConfig(beam_size=beam_size, n_results=n_results)
    self.trie = build_trie(np.asarray(index.codes), index.vocab, device_put=True)
    id_length = index.vocab.id_length
    config = self.decode_config

    def search(params, frozen, inputs, trie):  # inputs int32 [b, src]
      model = nnx.merge(graphdef, params, frozen)
      step_fn = model.tokens_to_logits_fn(model.encode(inputs))  # encode once per query
      cache = model.init_cache(inputs.shape[0], config.beam_size, id_length)  # [b, beam, ...]
      return beam_search(step_fn, cache, trie, config)

    self._search = jax.jit(search)

  def search_ids(self, params, frozen, input_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``input_ids int32 [Q, src]`` -> (rows int32 [Q, n], scores float32 [Q, n], codes [Q, n, L]).

    Rows are ``-1`` (and scores ``-inf``) where fewer than ``n`` identifiers exist.
    """
    q = input_ids.shape[0]
    b = self.batch_size
    rows, scores, codes = [], [], []
    for start in range(0, q, b):
      chunk = input_ids[start:start + b]
      n = chunk.shape[0]
      if n < b:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], b - n, axis=0)])  # [b, src]
      if self.mesh is not None:
        with jax.set_mesh(self.mesh):
          res = self._search(params, frozen, jnp.asarray(chunk), self.trie)
      else:
        res = self._search(params, frozen, jnp.asarray(chunk), self.trie)
      valid = np.asarray(res.valid)[:n]
      rows.append(np.where(valid, np.asarray(res.rows)[:n], -1))
      scores.append(np.where(valid, np.asarray(res.scores)[:n], -np.inf))
      codes.append(np.asarray(res.codes)[:n])
    if not rows:
      k, L = self.decode_config.n_results, self.index.vocab.id_length
      return np.zeros((0, k), np.int32), np.zeros((0, k), np.float32), np.zeros((0, k, L), np.int32)
    return np.concatenate(rows), np.concatenate(scores), np.concatenate(codes)

  def search_texts(self, params, frozen, texts: Sequence[str]):
    from cart_jax.train.input_pipeline import encode_texts  # pylint: disable=g-import-not-at-top
    return self.search_ids(params, frozen, encode_texts(list(texts), self.input_length))

  def warm_up(self, params, frozen) -> float:
    """Compiles the search program; returns the seconds it took."""
    t0 = time.perf_counter()
    dummy = np.zeros((1, self.input_length), np.int32)
    dummy[:, 0] = 101
    self.search_ids(params, frozen, dummy)
    return time.perf_counter() - t0


def describe(index, rows: np.ndarray, scores: np.ndarray, corpus=None) -> list[dict[str, Any]]:
  """One query's results as dicts: rank, item id, identifier codes, score, media path."""
  out = []
  for rank, (r, s) in enumerate(zip(rows, scores)):
    if r < 0:
      continue
    item = index.item_ids[int(r)]
    d = {"rank": rank + 1, "item_id": item,
         "identifier": [int(c) for c in index.codes[int(r)]], "score": float(s)}
    if corpus is not None and item in corpus:
      d["media"] = str(corpus.media_path(item))
    out.append(d)
  return out
