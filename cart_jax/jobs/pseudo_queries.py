"""Pseudo-queries for items that have no training text at all (DSI++-style, from the shared space).

An item with no training query and no caption (Clotho's protocol: evaluation clips come with no
text; ``cart demo --textless-items``) is reachable by CART only through its identifier, which no
training text ever targets. The dual tower places items and texts in one space: item ``i``'s
vector ``E[i]`` (``cart embed``) and a text's vector ``normalise(text_proj(minilm(text)))``. The
texts nearest to ``E[i]`` are what the dual tower would retrieve ``i`` for; taking the ``k``
nearest training texts as training examples of ``i`` (:func:`pseudo_queries`) lets CART learn to
reach the item through the same wordings, next to their own items. The pseudo-queries are
existing training texts, so the frozen encoder's states of them are cached already.

They go into the input pipeline's queryless pool (:class:`cart_jax.train.input_pipeline.InputConfig`
``pseudo_queries``, ``queryless_rate``). Cost: one MiniLM pass over the candidate texts (cached
next to the state caches, keyed by the texts) and one ``[textless, texts]`` matrix product.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

import numpy as np

from cart_jax.data.corpus import Text

SOURCE = "pseudo:nearest-text"
MAX_CANDIDATES = 200_000  # candidate texts beyond this are subsampled (deterministically)


def textless_items(corpus) -> list[str]:
  """Ids (corpus order) of the items with no ``train`` text of any kind."""
  has_text = {t.item_id for t in corpus.texts(split="train")}
  return [i for i in corpus.item_ids if i not in has_text]


def _feature_cache(cache_dir: str | os.PathLike | None, texts: list[str]) -> Path | None:
  if cache_dir is None:
    return None
  h = hashlib.sha256()
  for t in texts:
    h.update(t.encode("utf-8") + b"\x00")
  return Path(cache_dir) / f"{h.hexdigest()[:24]}.npz"


def pseudo_queries(corpus, index, embeddings: str | os.PathLike, k: int, *,
                   cache_dir: str | os.PathLike | None = None,
                   log: Callable[[str], None] = print, items: list[str] | None = None,
                   candidates: list[str] | None = None,
                   ids_path: str | os.PathLike | None = None) -> tuple[list[Text], dict]:
  """``k`` pseudo-queries per text-less item of ``corpus``; returns (texts, summary).

  Args:
    corpus: the training corpus.
    index: the run's identifier index, or anything with ``item_ids`` (they order the dual tower's
      rows: each needs a row in ``embeddings``).
    embeddings: ``E.npy`` of ``cart embed`` with ``E.model.npz`` (the text projection) beside it.
    k: pseudo-queries per item (0: none).
    cache_dir: where the candidate texts' MiniLM features are kept between runs (None: not kept).
    items: the items to give pseudo-queries (default: the text-less items of ``corpus``).
    candidates: the candidate texts (default: the distinct ``train`` texts of ``corpus``).
    ids_path: ids of the rows of ``embeddings`` (default ``E.ids.txt``).

  The candidates are the distinct ``train`` texts of the corpus (queries and captions). Each
  pseudo-query is a :class:`Text` of kind ``caption`` with source :data:`SOURCE`; nothing is
  written to the corpus.
  """
  items = textless_items(corpus) if items is None else list(items)
  summary = {"textless_items": len(items), "k": int(k), "pseudo_queries": 0}
  if not items or k <= 0:
    return [], summary
  from cart_jax.inference import rerank  # pylint: disable=g-import-not-at-top
  from cart_jax.models.text.encoder import MiniLMTextEncoder  # pylint: disable=g-import-not-at-top
  from cart_jax.train.dual_encoder import text_features  # pylint: disable=g-import-not-at-top

  if candidates is None:
    candidates = [t.text for t in corpus.texts(split="train")]
  candidates = sorted(set(candidates))
  if len(candidates) > MAX_CANDIDATES:
    rng = np.random.default_rng(0)
    candidates = sorted(rng.choice(candidates, MAX_CANDIDATES, replace=False).tolist())
  if not candidates:
    return [], summary
  reranker = rerank.build(embeddings, index.item_ids,  # item rows + the dual tower's text side
                          ids_path=ids_path)
  log(f"pseudo-queries: {len(items)} items without any training text; embedding "
      f"{len(candidates)} candidate texts")
  feats = text_features(candidates, MiniLMTextEncoder(), _feature_cache(cache_dir, candidates))
  t = reranker.embed_queries(feats)  # [T, d] unit
  row_of = {item: r for r, item in enumerate(index.item_ids)}  # once per call, not once per item
  rows = np.asarray([row_of[i] for i in items], np.int64)
  e = np.asarray(reranker.items[rows], np.float32)  # [I, d] unit
  kk = min(int(k), len(candidates))
  out: list[Text] = []
  for s in range(0, len(items), 1024):
    sim = e[s:s + 1024] @ t.T  # [b, T]
    top = np.argpartition(-sim, kk - 1, axis=1)[:, :kk]  # [b, kk]
    order = np.argsort(-np.take_along_axis(sim, top, axis=1), axis=1, kind="stable")
    top = np.take_along_axis(top, order, axis=1)
    for j, item in enumerate(items[s:s + 1024]):
      out += [Text(item, candidates[c], "train", "caption", SOURCE) for c in top[j]]
  summary["pseudo_queries"] = len(out)
  summary["candidates"] = len(candidates)
  return out, summary
