"""Retrieval metrics shared by the dual-tower baseline and CART's evaluation.

``ranked[q]`` is the ranked list of item rows returned for query ``q`` (best first; ``-1``
marks an empty slot when a method returned fewer than ``k`` items). A query's relevant items
are one target row or a set of rows.

* ``r@K``  = share of queries with a relevant item among their first K results.
* ``mrr@K`` = mean over queries of ``1 / rank`` of the first relevant result within the first K
  (0 when there is none).

Pure numpy: no JAX import, so evaluation code on any side can use it.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


def first_relevant_rank(ranked_item_rows, targets) -> np.ndarray:
  """0-based position of the first relevant item in each ranked list; ``-1`` if absent.

  Args:
    ranked_item_rows: int ``[Q, k]`` item rows, best first (``-1`` = empty slot).
    targets: int ``[Q]`` (one relevant row per query) or a sequence of ``Q`` iterables of rows.

  Returns:
    int ``[Q]``.
  """
  ranked = np.asarray(ranked_item_rows)
  if ranked.ndim != 2:
    raise ValueError(f"ranked_item_rows must be [queries, k], found shape {ranked.shape}")
  q = ranked.shape[0]
  if isinstance(targets, np.ndarray) and targets.dtype != object:
    if targets.shape != (q,):
      raise ValueError(f"targets must be [queries] = [{q}], found shape {targets.shape}")
    hits = ranked == targets[:, None]  # [Q, k]
  else:
    targets = list(targets)
    if len(targets) != q:
      raise ValueError(f"{len(targets)} target entries for {q} ranked lists")
    if all(np.isscalar(t) for t in targets):
      return first_relevant_rank(ranked, np.asarray(targets))
    hits = np.zeros(ranked.shape, bool)
    for i, rel in enumerate(targets):
      rel = {int(r) for r in (rel if isinstance(rel, Iterable) else [rel])}
      hits[i] = [int(r) in rel for r in ranked[i]]
  hits &= ranked >= 0
  any_hit = hits.any(axis=1)  # [Q]
  return np.where(any_hit, np.argmax(hits, axis=1), -1)


def retrieval_metrics(ranked_item_rows, targets, ks: Sequence[int] = (1, 5, 10),
                      mrr_k: int = 10) -> dict:
  """``r@K`` for each K in ``ks`` and ``mrr@{mrr_k}`` (floats in [0, 1]) plus ``num_queries``.

  These are the one spelling of the metric keys in every JSON ``cart`` writes.

  Raises ValueError when a K exceeds the number of ranked columns (that K cannot be measured).
  """
  ranked = np.asarray(ranked_item_rows)
  rank = first_relevant_rank(ranked, targets)  # [Q]
  k_avail = ranked.shape[1]
  for k in tuple(ks) + (mrr_k,):
    if k < 1 or k > k_avail:
      raise ValueError(f"cannot measure @{k} from ranked lists of length {k_avail}")
  q = max(len(rank), 1)
  found = rank >= 0
  out = {f"r@{k}": float(np.sum(found & (rank < k)) / q) for k in ks}
  rr = np.where(found & (rank < mrr_k), 1.0 / np.maximum(rank + 1.0, 1.0), 0.0)  # [Q]
  out[f"mrr@{mrr_k}"] = float(np.sum(rr) / q)
  out["num_queries"] = int(len(rank))
  return out
