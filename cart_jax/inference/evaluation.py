"""One evaluator interface: R@1, R@5, R@10, MRR@10 and queries/s of a ranker on a split's queries.

A *ranker* maps query texts to ranked item rows (:class:`Ranker`): CART's constrained beam search
(:class:`CartRanker`), the dual tower's exact/FAISS search
(:class:`cart_jax.inference.dual_tower.DualTowerRanker`). :func:`evaluate_ranker` warms it up
(compilation timed apart), runs one timed pass over every query and scores the rows against the
targets with :mod:`cart_jax.inference.metrics`; every caller (``cart eval``, ``cart baseline``,
the demo, the trainer's validation) gets the same dict with one key spelling:
``r@1``, ``r@5``, ``r@10``, ``mrr@10`` (those the ranker's ``k`` allows), ``num_queries``,
``qps``, ``seconds`` and ``compile_seconds``. CART + re-ranking
(:func:`evaluate_with_rerank`) scores its rows with
:func:`ranking_metrics`, the same keys.

Evaluating a trained run (MODEL_DIR) on a split is a job: :func:`cart_jax.jobs.evaluate.eval_job`.
"""
from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

import numpy as np

from cart_jax.core.errors import CartError
from cart_jax.inference.metrics import retrieval_metrics

if TYPE_CHECKING:
  from cart_jax.inference.rerank import Reranker

Progress = Callable[[int], None]  # called with the number of queries just ranked


class Ranker(Protocol):
  """Query texts -> ranked item rows. ``k``: results per query."""
  k: int

  def warm_up(self, texts: Sequence[str]) -> float:
    """Compiles whatever ranking ``texts`` needs; returns seconds."""

  def rank(self, texts: Sequence[str], progress: Progress | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
    """``texts`` -> ``(rows int32 [Q, k], scores float32 [Q, k])``, best first (-1: no item)."""


def ranking_metrics(rows: np.ndarray, targets, k: int | None = None) -> dict:
  """``r@1``, ``r@5``, ``r@10`` (those <= k) and ``mrr@{min(10, k)}`` of ranked rows ``[Q, k]``."""
  k = rows.shape[1] if k is None else k
  m = retrieval_metrics(rows, targets, ks=tuple(x for x in (1, 5, 10) if x <= k), mrr_k=min(10, k))
  m.pop("num_queries")
  return m


def progress_bar(total: int, desc: str, enabled: bool):
  """A tqdm bar on stderr (``None`` when disabled); ``bar.update`` is a :data:`Progress`."""
  if not enabled:
    return None
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, desc=desc, unit="query", leave=False, file=sys.stderr)


def evaluate_ranker(ranker: Ranker, texts: Sequence[str], targets, *, warm_up: bool = True,
                    progress: bool = False, desc: str = "queries"
                    ) -> tuple[dict, np.ndarray, np.ndarray]:
  """Warm-up, one timed pass over ``texts``, metrics against ``targets`` (rows or sets of rows).

  Returns:
    (metrics, rows [Q, k], scores [Q, k]); metrics as in the module docstring.
  """
  compile_s = ranker.warm_up(texts) if warm_up else 0.0
  bar = progress_bar(len(texts), desc, progress)
  try:
    t0 = time.perf_counter()
    rows, scores = ranker.rank(texts, None if bar is None else bar.update)
    seconds = time.perf_counter() - t0
  finally:
    if bar is not None:
      bar.close()
  out = {**ranking_metrics(rows, targets, ranker.k), "num_queries": int(len(texts)),
         "qps": len(texts) / max(seconds, 1e-9), "seconds": seconds, "compile_seconds": compile_s}
  return out, rows, scores


class CartRanker:
  """A :class:`Ranker` over a CartSearcher: tokenisation + encoder + constrained beam search."""

  def __init__(self, searcher, params, frozen):
    self.searcher, self.params, self.frozen = searcher, params, frozen
    self.k = searcher.decode_config.n_results

  def warm_up(self, texts: Sequence[str]) -> float:
    del texts  # one program serves every batch
    return self.searcher.warm_up(self.params, self.frozen)

  def rank(self, texts: Sequence[str], progress: Progress | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
    from cart_jax.models.text.tokenizer import encode_texts  # pylint: disable=g-import-not-at-top
    ids = encode_texts(list(texts), self.searcher.input_length)  # [Q, src]
    b = self.searcher.batch_size  # the searcher's own batches: the same programs as one call
    rows, scores = [], []
    for start in range(0, max(len(ids), 1), b):
      r, s, _ = self.searcher.search_ids(self.params, self.frozen, ids[start:start + b])
      rows.append(r)
      scores.append(s)
      if progress is not None:
        progress(len(r))
    return np.concatenate(rows), np.concatenate(scores)


def split_queries(corpus, index, split: str, limit: int | None = None) -> tuple[list[str], np.ndarray]:
  """``(texts, target index rows int32 [Q])`` of the split's ``kind=query`` texts (corpus order)."""
  sel = corpus.texts(split=split, kind="query")
  return text_targets(sel if limit is None else sel[:limit], index, split)


def text_targets(sel, index, what: str = "the") -> tuple[list[str], np.ndarray]:
  """``(texts, target index rows int32 [Q])`` of corpus texts ``sel``; CartError naming ``what``
  (a split) when one targets an item the index lacks."""
  row_of = index.row_of()
  missing = [t.item_id for t in sel if t.item_id not in row_of]
  if missing:
    raise CartError(f"{len(missing)} {what} queries target items missing from the index "
                     f"(first: {missing[:3]})")
  return [t.text for t in sel], np.asarray([row_of[t.item_id] for t in sel], np.int32)


def evaluate(searcher, params, frozen, texts, targets, *, warm_up: bool = True,
             progress: bool = False) -> tuple[dict, np.ndarray, np.ndarray]:
  """CART's metrics (:func:`evaluate_ranker` of a :class:`CartRanker`) plus ``beam_size``."""
  out, rows, scores = evaluate_ranker(CartRanker(searcher, params, frozen), texts, targets,
                                      warm_up=warm_up, progress=progress, desc="CART search")
  out["beam_size"] = searcher.decode_config.beam_size
  return out, rows, scores


def validation(index, texts: Sequence[str], targets, *, beam_size: int, input_length: int):
  """Validation during training (``trainer.train(validation=...)``): ``bind(graphdef, mesh)`` builds
  a :class:`CartSearcher` over ``index`` on the trainer's mesh and returns
  ``score(params, frozen, warm_up) -> metrics`` (:func:`evaluate` of ``texts`` / ``targets``)."""
  def bind(graphdef, mesh):
    from cart_jax.inference.searcher import CartSearcher  # pylint: disable=g-import-not-at-top
    searcher = CartSearcher(graphdef, index, beam_size=beam_size, n_results=beam_size,
                            input_length=input_length, mesh=mesh)
    return lambda params, frozen, warm_up: evaluate(searcher, params, frozen, texts, targets,
                                                    warm_up=warm_up)[0]
  return bind


def timed_beams(searcher, params, frozen, texts, progress: bool = False,
                 desc: str = "CART search") -> tuple:
  """(every beam of ``texts``, seconds); ``progress``: a bar on stderr over the batches."""
  from cart_jax.models.text.tokenizer import encode_texts  # pylint: disable=g-import-not-at-top
  bar = progress_bar(len(texts), desc, progress)
  try:
    t0 = time.perf_counter()
    beams = searcher.search_beams(params, frozen, encode_texts(list(texts), searcher.input_length),
                                  progress=None if bar is None else bar.update)
    return beams, time.perf_counter() - t0
  finally:
    if bar is not None:
      bar.close()


def evaluate_with_rerank(searcher, params, frozen, texts, targets, reranker: "Reranker", *,
                         warm_up: bool = True, progress: bool = False
                         ) -> tuple[dict, dict, np.ndarray, np.ndarray]:
  """CART alone and CART + re-ranking from ONE search pass (the same beams, re-sorted on the host).

  Returns:
    (cart metrics, rerank metrics, cart rows [Q, n], re-ranked rows [Q, n]). ``cart`` has the keys
    of :func:`evaluate`; its queries/s times tokenisation + encoder + beam search (the
    sentence embedding comes out of the same call). ``rerank``'s queries/s adds the host
    re-ranking (gather ``beam`` item rows, project the query, ``beam`` dot products, sort).
  """
  from cart_jax.inference import rerank as rerank_lib  # pylint: disable=g-import-not-at-top
  compile_s = searcher.warm_up(params, frozen, beams=True) if warm_up else 0.0
  beams, search_s = timed_beams(searcher, params, frozen, texts, progress, "CART search + rerank")
  t0 = time.perf_counter()
  out = reranker.rerank(beams.rows, beams.scores, beams.query_embedding)
  rerank_s = time.perf_counter() - t0
  n = searcher.decode_config.n_results
  q = len(texts)

  def metrics(rows):
    return ranking_metrics(rows, targets, n)  # the one evaluator's keys (r@1 ... mrr@10)

  cart_rows, rr_rows = beams.rows[:, :n], out.rows[:, :n]
  cart = {**metrics(cart_rows), "num_queries": int(q), "qps": q / max(search_s, 1e-9),
          "seconds": search_s, "compile_seconds": compile_s,
          "beam_size": searcher.decode_config.beam_size}
  top1_changed = float(np.mean(cart_rows[:, 0] != rr_rows[:, 0])) if q else 0.0
  rerank = {**metrics(rr_rows), "qps": q / max(search_s + rerank_s, 1e-9),
            "seconds": search_s + rerank_s, "rerank_seconds": rerank_s,
            "weight": rerank_lib.weight_to_json(reranker.weight), "top1_changed": top1_changed,
            "dim": reranker.dim}
  tuning = reranker.meta.get("tuning")
  if tuning:
    rerank["tuned_on"] = {"split": tuning.get("split"), "num_queries": tuning.get("num_queries"),
                          "val_r@1": tuning.get("val_r@1")}
  return cart, rerank, cart_rows, rr_rows
