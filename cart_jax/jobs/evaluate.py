"""``cart eval``: R@1/5/10, MRR@10 and queries/s of a trained run (MODEL_DIR) on a split's queries."""
from __future__ import annotations

import os
from typing import Callable

import numpy as np

from cart_jax.inference.evaluation import evaluate, evaluate_with_rerank, ranking_metrics, split_queries
from cart_jax.runs.layout import RunError
from cart_jax.runs.restore import LoadedRun, load_run


def eval_job(model_dir: str, *, split: str = "test", beam_size: int = 10, batch_size: int | None = None,
             limit: int | None = None, step: int | None = None, loaded: LoadedRun | None = None,
             modality: str | None = None, rerank: bool = False, rerank_weight: float | None = None,
             embeddings: str | None = None, log: Callable[[str], None] = print,
             items: set[str] | str | os.PathLike | None = None, progress: bool = False,
             verify: bool = True) -> dict:
  """R@1/5/10, MRR@10 and queries/s of a trained run on a split's queries.

  With ``modality`` (image/audio/video): only the queries whose target item has that modality,
  searched against the trie of that modality's identifiers. The summary then also holds
  ``unrestricted``: the same queries searched over the whole index (R@k, and how many top-1
  results were items of another modality -- what the restriction removes).

  With ``items`` (a set of item ids, or a file of them checked against the run's corpus): only
  the queries whose target is one of them (the whole index is still searched); e.g. the unseen
  items of ``cart data prepare emoji --unseen-items``.

  ``progress``: a bar on stderr over the timed pass.

  With ``rerank``: ``summary["rerank"]`` holds CART + dual-tower re-ranking (R@k, MRR@10, qps,
  weight) of the same beams as CART alone (one search pass, re-sorted on the host), with the run's
  ``rerank/`` re-ranker (or one built from ``embeddings``, its weight tuned on val and stored in the
  run: :mod:`cart_jax.jobs.rerank`); ``rerank_weight`` overrides the stored weight.
  """
  from cart_jax.inference import rerank as rerank_lib  # pylint: disable=g-import-not-at-top
  from cart_jax.inference.searcher import searcher_for_run  # pylint: disable=g-import-not-at-top
  from cart_jax.jobs.rerank import reranker_for_run  # pylint: disable=g-import-not-at-top
  r = loaded or load_run(model_dir, step, verify=verify)
  if items is not None and not isinstance(items, set):
    from cart_jax.data.corpus import read_item_ids  # pylint: disable=g-import-not-at-top
    items = read_item_ids(items, r.corpus)
  reranker = None
  if rerank:
    try:
      reranker = reranker_for_run(r, embeddings=embeddings, weight=rerank_weight, log=log)
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
    metrics, rr_metrics, rows, _ = evaluate_with_rerank(searcher, r.params, r.frozen, texts, targets,
                                                         reranker, progress=progress)
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
