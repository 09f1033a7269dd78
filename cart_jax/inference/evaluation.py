"""One evaluator interface: R@1, R@5, R@10, MRR@10 and queries/s of a ranker on a split's queries.

A *ranker* maps query texts to ranked item rows (:class:`Ranker`): CART's constrained beam search
(:class:`CartRanker`), the dual tower's exact/FAISS search
(:class:`cart_jax.inference.dual_tower.DualTowerRanker`). :func:`evaluate_ranker` warms it up
(compilation timed apart), runs one timed pass over every query and scores the rows against the
targets with :mod:`cart_jax.inference.metrics`; every caller (``cart eval``, ``cart baseline``,
the demo, the trainer's validation) gets the same dict with one key spelling:
``r@1``, ``r@5``, ``r@10``, ``mrr@10`` (those the ranker's ``k`` allows), ``num_queries``,
``qps``, ``seconds`` and ``compile_seconds``. CART + re-ranking
(:func:`cart_jax.inference.rerank.evaluate_with_rerank`) scores its rows with
:func:`ranking_metrics`, the same keys.

:func:`eval_job` evaluates a trained run (MODEL_DIR) on a split.
"""
from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

import numpy as np

from cart_jax.core.errors import CartError
from cart_jax.inference.metrics import retrieval_metrics

if TYPE_CHECKING:
  from cart_jax.inference.runs import LoadedRun

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
    from cart_jax.train.input_pipeline import encode_texts  # pylint: disable=g-import-not-at-top
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


def eval_job(model_dir: str, *, split: str = "test", beam_size: int = 10, batch_size: int | None = None,
             limit: int | None = None, step: int | None = None, loaded: LoadedRun | None = None,
             modality: str | None = None, rerank: bool = False, rerank_weight: float | None = None,
             embeddings: str | None = None, log: Callable[[str], None] = print,
             items: set[str] | None = None, progress: bool = False) -> dict:
  """R@1/5/10, MRR@10 and queries/s of a trained run on a split's queries.

  With ``modality`` (image/audio/video): only the queries whose target item has that modality,
  searched against the trie of that modality's identifiers. The summary then also holds
  ``unrestricted``: the same queries searched over the whole index (R@k, and how many top-1
  results were items of another modality -- what the restriction removes).

  With ``items`` (a set of item ids): only the queries whose target is one of them (the whole
  index is still searched); e.g. the unseen items of ``cart data prepare emoji --unseen-items``.

  ``progress``: a bar on stderr over the timed pass.

  With ``rerank``: ``summary["rerank"]`` holds CART + dual-tower re-ranking (R@k, MRR@10, qps,
  weight) of the same beams as CART alone (one search pass, re-sorted on the host), with the run's
  ``rerank/`` re-ranker (or one built from ``embeddings``, its weight tuned on val and stored in the
  run: :mod:`cart_jax.inference.rerank`); ``rerank_weight`` overrides the stored weight.
  """
  from cart_jax.inference import rerank as rerank_lib  # pylint: disable=g-import-not-at-top
  from cart_jax.inference.runs import RunError, load_run, searcher_for_run  # pylint: disable=g-import-not-at-top
  r = loaded or load_run(model_dir, step)
  reranker = None
  if rerank:
    try:
      reranker = rerank_lib.reranker_for_run(r, embeddings=embeddings, weight=rerank_weight, log=log)
    except rerank_lib.RerankError as e:
      raise RunError(str(e)) from None
  full = searcher_for_run(r, beam_size=beam_size, n_results=min(10, beam_size),
                          batch_size=batch_size)
  searcher = full.restrict(modality) if modality is not None else full
  texts, targets = split_queries(r.corpus, r.index, split,
                                            None if modality is not None else limit)
  if modality is not None:
    keep = full.item_modalities[targets] == modality  # [Q]
    texts = [t for t, k in zip(texts, keep) if k]
    targets = targets[keep]
    if limit is not None:
      texts, targets = texts[:limit], targets[:limit]
  if items is not None:  # only the queries whose target is one of these items
    keep = np.asarray([r.index.item_ids[int(t)] in items for t in targets], bool)  # [Q]
    texts, targets = [t for t, k in zip(texts, keep) if k], targets[keep]
  if not texts:
    what = f"'{split}' queries" + (f" of {modality} items" if modality is not None else "") + \
        (" of the listed items" if items is not None else "")
    raise RunError(f"{r.run['corpus_dir']}: no {what}")
  rr_metrics = None
  if reranker is None:
    metrics, rows, _ = evaluate(searcher, r.params, r.frozen, texts, targets, progress=progress)
  else:
    metrics, rr_metrics, rows, _ = rerank_lib.evaluate_with_rerank(searcher, r.params, r.frozen, texts,
                                                                   targets, reranker, progress=progress)
  summary = {"model_dir": str(r.model_dir), "step": r.step, "split": split, **metrics,
             "num_items": r.index.n_items, "corpus_dir": r.run["corpus_dir"]}
  if rr_metrics is not None:
    summary["rerank"] = rr_metrics
  if full.item_modalities is not None:
    summary["index_modalities"] = full.available_modalities()
  if len(summary.get("index_modalities", ())) > 1:
    summary["top1_wrong_modality"] = _wrong_modality(full.item_modalities, rows[:, 0], targets)
    if modality is None:  # a mixed index searched whole: the same numbers per target modality
      summary["by_modality"] = _by_modality(full.item_modalities, rows, targets)
  if modality is not None:
    summary["modality"] = modality
    summary["num_items_searched"] = int(np.sum(full.item_modalities == modality))
    un_metrics, un_rows, _ = evaluate(full, r.params, r.frozen, texts, targets)
    summary["unrestricted"] = {
        **{k: un_metrics[k] for k in ("r@1", "r@5", "r@10", "mrr@10") if k in un_metrics},
        "top1_wrong_modality": _wrong_modality(full.item_modalities, un_rows[:, 0], targets)}
  return summary


def _by_modality(item_modalities, rows, targets) -> dict:
  """R@k, MRR and top-1 of another modality, for the queries of each target modality."""
  out = {}
  target_mod = item_modalities[targets]  # [Q]
  for m in np.unique(target_mod):
    sel = target_mod == m  # [Q]
    out[str(m)] = {**ranking_metrics(rows[sel], targets[sel]), "num_queries": int(sel.sum()),
                   "top1_wrong_modality": _wrong_modality(item_modalities, rows[sel, 0], targets[sel])}
  return out


def _wrong_modality(item_modalities, top1_rows, targets) -> dict:
  """How many top-1 results (rows, -1 = none) are items of another modality than the target."""
  top1_rows = np.asarray(top1_rows)
  found = top1_rows >= 0  # [Q]
  wrong = found & (item_modalities[np.where(found, top1_rows, 0)] != item_modalities[targets])
  return {"count": int(wrong.sum()), "of": int(len(targets)),
          "rate": float(wrong.mean()) if len(targets) else 0.0}
