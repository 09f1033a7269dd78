"""Recall of a CART network on a split's queries: R@1, R@5, R@10, MRR@10 and queries/s.

Metrics come from :mod:`cart_jax.inference.metrics` (the module the dual-tower baseline uses too), over
item rows of the index. Queries/s is measured on one timed pass after a warm-up that compiled the
search program; it includes tokenisation, encoding and the constrained beam search.
"""
from __future__ import annotations

import time

import numpy as np

from cart_jax.inference.metrics import retrieval_metrics


def split_queries(corpus, index, split: str, limit: int | None = None) -> tuple[list[str], np.ndarray]:
  """``(texts, target index rows int32 [Q])`` of the split's ``kind=query`` texts (corpus order)."""
  row_of = index.row_of()
  sel = corpus.texts(split=split, kind="query")
  if limit is not None:
    sel = sel[:limit]
  missing = [t.item_id for t in sel if t.item_id not in row_of]
  if missing:
    raise ValueError(f"{len(missing)} {split} queries target items missing from the index "
                     f"(first: {missing[:3]})")
  return [t.text for t in sel], np.asarray([row_of[t.item_id] for t in sel], np.int32)


def evaluate(searcher, params, frozen, texts, targets, *, warm_up: bool = True) -> dict:
  """Runs the searcher over ``texts`` and scores against ``targets`` (index rows)."""
  from cart_jax.train.input_pipeline import encode_texts  # pylint: disable=g-import-not-at-top
  compile_s = searcher.warm_up(params, frozen) if warm_up else 0.0
  t0 = time.perf_counter()
  ids = encode_texts(list(texts), searcher.input_length)  # [Q, src]
  rows, scores, _ = searcher.search_ids(params, frozen, ids)
  seconds = time.perf_counter() - t0
  k = searcher.decode_config.n_results
  ks = tuple(x for x in (1, 5, 10) if x <= k)
  m = retrieval_metrics(rows, targets, ks=ks, mrr_k=min(10, k))
  out = {key.lower(): val for key, val in m.items() if key != "num_queries"}
  out.update({"num_queries": int(len(texts)), "qps": len(texts) / max(seconds, 1e-9),
              "seconds": seconds, "compile_seconds": compile_s,
              "beam_size": searcher.decode_config.beam_size})
  return out, rows, scores
