"""``cart search``: the top items a trained run generates for each query."""
from __future__ import annotations

import os
from typing import Callable, Sequence

from cart_jax.runs.layout import RunError
from cart_jax.runs.restore import LoadedRun, load_run


def search_job(model_dir: str | os.PathLike, queries: Sequence[str], *, k: int = 10,
               beam: int | None = None, modality: str | None = None, step: int | None = None,
               rerank: bool = False, rerank_weight: float | str | None = None,
               embeddings: str | os.PathLike | None = None, verify: bool = True,
               log: Callable[[str], None] = print) -> dict:
  """The top ``k`` items a trained run generates for each query (``cart search``).

  Args:
    k: results per query; more than the items that can be generated (the index's, or the
      modality's) is clamped to that number, with a line through ``log`` (a larger beam could
      not find more items, only cost more).
    beam: beam size (default ``max(k, 10)``; clamped like ``k``).
    modality: only items of this modality (their trie); ``ModalityError`` when not in the index.
    rerank: re-sort all ``beam`` results by ``logp + weight * cos`` (the run's ``rerank/``);
      ``rerank_weight`` overrides its weight, ``embeddings`` builds it first (both imply rerank).
    verify: check the checkpoint against its manifest (``False``: ``cart search --no-verify``).

  Returns:
    ``{"model_dir", "step", "modality", "queries": [{"query", "results": [...]}]}`` (results as
    :func:`cart_jax.inference.searcher.describe`, plus ``logp`` and ``cos`` when re-ranked) and
    ``rerank_weight`` when re-ranked. Empty queries raise ``RunError``.
  """
  from cart_jax.inference import rerank as rerank_lib  # pylint: disable=g-import-not-at-top
  from cart_jax.jobs.rerank import reranker_for_run  # pylint: disable=g-import-not-at-top
  from cart_jax.inference.searcher import describe, searcher_for_run  # pylint: disable=g-import-not-at-top
  queries = list(queries)
  if not queries:
    raise RunError("no query given")
  for i, q in enumerate(queries):
    if not isinstance(q, str) or not q.strip():
      raise RunError(f"query {i + 1} of {len(queries)} is empty ({q!r}): give some words to search for")
  if k < 1:
    raise RunError(f"-k {k}: must be >= 1")
  if beam is not None and beam < 1:
    raise RunError(f"--beam {beam}: must be >= 1")
  if beam is not None and beam < k:
    raise RunError(f"--beam {beam} is smaller than -k {k}")
  r = load_run(model_dir, step, verify=verify)
  searchable = _searchable_items(r, modality)
  if k > searchable:
    log(f"-k {k}: {_items_phrase(searchable, modality)}; showing at most {searchable} results")
    k = searchable
  beam = min(beam or max(k, 10), max(searchable, k))
  searcher = searcher_for_run(r, beam_size=beam, n_results=k, batch_size=max(1, len(queries)),
                              modality=modality)
  reranker = None
  if rerank or embeddings or rerank_weight is not None:
    weight = rerank_lib.parse_weight(rerank_weight) if isinstance(rerank_weight, str) else rerank_weight
    reranker = reranker_for_run(r, embeddings=embeddings, weight=weight, log=log)
  if reranker is None:
    rows, scores, _ = searcher.search_texts(r.params, r.frozen, queries)
    logps, coss = scores, None
  else:
    from cart_jax.models.text.tokenizer import encode_texts  # pylint: disable=g-import-not-at-top
    beams = searcher.search_beams(r.params, r.frozen, encode_texts(list(queries), searcher.input_length))
    res = reranker.rerank(beams.rows, beams.scores, beams.query_embedding)
    rows, scores = res.rows[:, :k], res.scores[:, :k]
    logps, coss = res.logp[:, :k], res.cos[:, :k]
  out = []
  for i, (q, rr, ss) in enumerate(zip(queries, rows, scores)):
    results = describe(r.index, rr, ss, r.corpus)
    if coss is not None:
      for d in results:
        d["logp"], d["cos"] = float(logps[i, d["rank"] - 1]), float(coss[i, d["rank"] - 1])
    out.append({"query": q, "results": results})
  doc = {"model_dir": str(r.model_dir), "step": r.step, "modality": modality, "queries": out}
  if reranker is not None:
    doc["rerank_weight"] = rerank_lib.weight_to_json(reranker.weight)
  return doc


def _searchable_items(r: LoadedRun, modality: str | None) -> int:
  """How many items a search of ``modality`` (None: all) can generate."""
  if modality is None or r.corpus is None:
    return r.index.n_items
  from cart_jax.inference.searcher import index_modalities  # pylint: disable=g-import-not-at-top
  try:
    mods = index_modalities(r.index, r.corpus)
  except ValueError:
    return r.index.n_items  # searcher_for_run names the problem
  n = int((mods == modality).sum())
  return n if n > 0 else r.index.n_items  # an unknown modality: restrict() raises ModalityError


def _items_phrase(n: int, modality: str | None) -> str:
  return f"the index has {n} {modality + ' ' if modality else ''}item{'s' if n != 1 else ''}"
