"""The re-ranker of a trained run: built from ``cart embed`` outputs, its weight tuned on ``val``
(or held-out training queries), saved in ``MODEL_DIR/rerank/``; what ``train_job`` runs after
training and ``cart eval/search --rerank --embeddings`` run on demand. The scores and the files are
:mod:`cart_jax.inference.rerank`."""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Sequence

from cart_jax.core.errors import CartError
from cart_jax.inference import evaluation, rerank
from cart_jax.inference.searcher import CartSearcher
from cart_jax.runs.restore import load_run


def tune_on_split(reranker: rerank.Reranker, searcher, params, frozen, texts, targets,
                  grid: Sequence[float] = rerank.DEFAULT_GRID, split: str = rerank.TUNE_SPLIT) -> rerank.Reranker:
  """Searches ``texts`` once, picks the weight on their targets; returns the re-ranker with it."""
  if not len(texts):
    raise rerank.RerankError(f"no '{split}' queries to tune the re-rank weight on")
  beams, _ = evaluation.timed_beams(searcher, params, frozen, texts)
  cos = reranker.cosines(beams.rows, beams.query_embedding)
  weight, table = rerank.tune_weight(beams.rows, beams.scores, cos, targets, grid)
  best = next(t for t in table if t["weight"] == rerank.weight_to_json(weight))
  tuning = {"split": split, "num_queries": int(len(texts)), "beam_size": int(beams.rows.shape[1]),
            "grid": [rerank.weight_to_json(rerank.parse_weight(w)) for w in grid], "results": table,
            "chosen_by": "max R@1, ties: max MRR@10, then the smaller weight",
            "val_r@1": best["r@1"], "logp_only_r@1": table[0]["r@1"] if rerank.parse_weight(grid[0]) == 0 else None}
  return dataclasses.replace(reranker, weight=weight, meta={**reranker.meta, "tuning": tuning})


def fit(loaded, embeddings: str | os.PathLike, *, split: str = rerank.TUNE_SPLIT, limit: int | None = None,
        grid: Sequence[float] = rerank.DEFAULT_GRID, beam_size: int = 10, batch_size: int | None = None,
        save_to_run: bool = True, log: Callable[[str], None] = print) -> rerank.Reranker:
  """Builds the re-ranker of a loaded run (``runs.LoadedRun``) from ``cart embed`` outputs, tunes
  its weight on ``split`` (all its queries unless ``limit``) and saves it in ``MODEL_DIR/rerank/``."""
  rerank.check_model(loaded.model_config)
  if loaded.corpus is None:
    raise rerank.RerankError("tuning the re-rank weight needs the run's corpus")
  reranker = rerank.build(embeddings, loaded.index.item_ids)
  if split == rerank.TUNE_SPLIT and not rerank.has_val(loaded.corpus):
    held = rerank.holdout_queries(loaded.corpus) if loaded.run.get("rerank_holdout") else []
    if not held:  # nothing to tune on: the default weight, said so in the tuning record
      reranker = dataclasses.replace(reranker, weight=rerank.DEFAULT_WEIGHT, meta={**reranker.meta, "tuning": {
          "split": None, "num_queries": 0, "chosen_by": (
              f"default weight {rerank.DEFAULT_WEIGHT:g} (no '{rerank.TUNE_SPLIT}' queries and no training queries "
              f"held out for tuning; measured across the built-in sets)"), "results": [],
          "val_r@1": None, "seconds": 0.0}})
      log(f"re-rank weight {rerank.weight_label(rerank.DEFAULT_WEIGHT)}: the default "
          f"(no '{rerank.TUNE_SPLIT}' queries, none "
          f"held out)")
      if save_to_run:
        log(f"saved the re-ranker in {rerank.save(reranker, loaded.model_dir)}")
      return reranker
    split = rerank.HOLDOUT_SPLIT
  try:
    if split == rerank.HOLDOUT_SPLIT:
      texts, targets = evaluation.text_targets(held[:limit] if limit is not None else held,
                                               loaded.index, split)
    else:
      texts, targets = evaluation.split_queries(loaded.corpus, loaded.index, split, limit)
  except CartError as e:
    raise rerank.RerankError(str(e)) from None
  searcher = CartSearcher(loaded.graphdef, loaded.index, beam_size=beam_size,
                          n_results=min(10, beam_size), input_length=loaded.input_length,
                          batch_size=batch_size)
  t0 = time.perf_counter()
  reranker = tune_on_split(reranker, searcher, loaded.params, loaded.frozen, texts, targets, grid, split)
  tuning = reranker.meta["tuning"]
  tuning["seconds"] = round(time.perf_counter() - t0, 2)
  if split == rerank.HOLDOUT_SPLIT:
    tuning["chosen_by"] += (f"; on {len(texts)} training queries held out of training (no "
                            f"'{rerank.TUNE_SPLIT}' split: one query of {rerank.HOLDOUT_SHARE:.0%} of the items "
                            f"with two or more)")
  log(f"re-rank weight {rerank.weight_label(reranker.weight)} (on {tuning['num_queries']} {split} queries: "
      + ", ".join(f"{rerank.weight_label(rerank.parse_weight(t['weight']))}: R@1 {t['r@1']:.3f}"
                  for t in tuning["results"]) + ")")
  if save_to_run:
    path = rerank.save(reranker, loaded.model_dir)
    log(f"saved the re-ranker in {path}")
  return reranker


def reranker_for_run(loaded, *, embeddings: str | os.PathLike | None = None,
                     weight: float | None = None, log: Callable[[str], None] = print) -> rerank.Reranker:
  """The run's stored re-ranker, or (with ``embeddings``) a new one built, tuned and stored.

  ``weight`` overrides the stored weight (not saved).
  """
  rerank.check_model(loaded.model_config)
  if embeddings is not None:
    r = fit(loaded, embeddings, log=log)
  else:
    r = rerank.load(loaded.model_dir, loaded.index.item_ids)
  return r.with_weight(weight) if weight is not None else r


def after_training(model_dir: str | os.PathLike, embeddings: str | os.PathLike | None, *,
                   log: Callable[[str], None] = print) -> dict | None:
  """End of ``train_job``: build the re-ranker, tune its weight on all ``val`` queries, save it.

  Skipped (with the reason in the returned dict) when there is no ``E.model.npz`` next to the
  embeddings, the model has no MiniLM encoder, or the run spans several processes; a bad input
  (ids, dimensions) is reported, not raised: the trained run stays usable.

  Returns:
    None without ``embeddings``; else ``{"weight", "val_r@1": {weight: R@1}, "split", ...}`` or
    ``{"skipped": reason}``.
  """
  if embeddings is None:
    return None
  import jax  # pylint: disable=g-import-not-at-top

  from cart_jax.data.embeddings import embedding_files  # pylint: disable=g-import-not-at-top
  model_path = embedding_files(embeddings).model
  if not model_path.is_file():
    return {"skipped": f"{model_path} not found (precomputed embeddings have no text projection)"}
  if jax.process_count() > 1:
    return {"skipped": "multi-process run: build it afterwards with `cart eval --rerank --embeddings`"}
  try:
    loaded = load_run(model_dir)
    caveat = rerank.check_model(loaded.model_config)
    r = fit(loaded, embeddings, log=log)
  except rerank.RerankError as e:
    log(f"re-ranker not built: {e}")
    return {"skipped": str(e)}
  tuning = r.meta["tuning"]
  out = {"weight": rerank.weight_to_json(r.weight), "split": tuning["split"],
         "num_queries": tuning["num_queries"], "chosen_by": tuning.get("chosen_by"),
         "val_r@1": {rerank.weight_label(rerank.parse_weight(t["weight"])): t["r@1"] for t in tuning["results"]},
         "seconds": tuning["seconds"], "directory": str(rerank.directory(model_dir))}
  if caveat:
    out["caveat"] = caveat
  return out
