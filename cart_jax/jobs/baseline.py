"""``cart baseline``: the dual-tower baseline (exact or FAISS search over ``cart embed`` item vectors)
of a corpus's queries, with the evaluator's metrics (the searchers are
:mod:`cart_jax.inference.dual_tower`)."""
from __future__ import annotations

import os
import platform

import jax
import numpy as np

from cart_jax.core.errors import CartError
from cart_jax.data.corpus import load_corpus, read_item_ids
from cart_jax.data.embeddings import load_aligned, read_meta
from cart_jax.inference.dual_tower import check_search_options, evaluate_dual_tower, query_encoder


def baseline_job(corpus_dir: str | os.PathLike, embeddings: str | os.PathLike, *,
                 ids: str | os.PathLike | None = None, model: str | os.PathLike | None = None,
                 query_embeddings: str | os.PathLike | None = None, split: str = "test",
                 items: str | os.PathLike | None = None, method: str = "jax", k: int = 10,
                 chunk_size: int | None = 65536, query_batch: int = 256, text_batch: int = 128,
                 nlist: int | None = None, nprobe: int = 8, agreement: str | None = None,
                 progress: bool = False) -> dict:
  """The dual-tower baseline of a corpus's ``split`` queries over ``embeddings`` (``cart embed``).

  Query side, in order: ``query_embeddings`` (``.npy``, rows = the split's query texts in corpus
  order; queries/s then counts search only), ``model`` (default ``E.model.npz``), or plain MiniLM
  sentence embeddings for 384-d items. ``items``: a file of item ids; only their queries are
  scored (every item is searched).

  Returns:
    the JSON summary of ``cart baseline``: the evaluator's metrics (``r@1`` ... ``qps``) plus
    ``qps_search_only``, timings, the query/item encoders and the machine.

  Raises:
    CartError: any input problem (corpus, embeddings, ids, query embeddings, model, k).
  """
  if k < 10:
    raise CartError(f"-k {k}: R@10 and MRR@10 need at least 10 results per query")
  check_search_options(chunk_size=chunk_size, query_batch=query_batch, text_batch=text_batch,
                       nlist=nlist, nprobe=nprobe)
  corpus = load_corpus(corpus_dir, check_media=False)
  # load_aligned validated the values as float32 (finite, not huge): this cast is that one.
  vectors = np.asarray(load_aligned(embeddings, corpus.item_ids, ids_path=ids).embeddings,
                       np.float32)  # [N, d]
  n, d = vectors.shape
  if k > n:
    raise CartError(f"-k {k} is more than the {n} items")
  texts, targets = corpus.pairs(split, "query")
  if items is not None:
    keep_ids = read_item_ids(items, corpus)
    keep = np.asarray([corpus.item_ids[int(t)] in keep_ids for t in targets], bool)  # [Q]
    texts, targets = [t for t, x in zip(texts, keep) if x], np.asarray(targets)[keep]
  if not texts:
    raise CartError(f"{corpus_dir}: no '{split}' query texts" +
                    (f" of the items in {items}" if items else ""))
  text_encoder = None
  if query_embeddings:
    qe = _read_query_embeddings(query_embeddings, len(texts), d, split)
    encode, side = (lambda batch, progress=None: qe[:len(batch)]), "precomputed"
  else:
    encode, text_encoder, side = query_encoder(embeddings, d, model=model, text_batch=text_batch)
  metrics = evaluate_dual_tower(vectors, texts, targets, encode, text_encoder=text_encoder,
                                method=method, k=k, chunk_size=chunk_size, query_batch=query_batch,
                                nlist=nlist, nprobe=nprobe, agreement=agreement, progress=progress)
  return {
      "corpus": str(corpus_dir), "embeddings": str(embeddings), "split": split, "method": method,
      "k": k, "num_items": n, "dim": d, "query_encoder": side,
      "item_encoder": read_meta(embeddings).get("encoder"), **metrics,
      "timing_note": ("one timed pass over all queries after a warm-up that compiled every "
                      "shape; query encoding included" if text_encoder is not None else
                      "query embeddings were given: search only"),
      "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                  "jax_backend": f"{jax.default_backend()} ({jax.devices()[0].device_kind})"},
  }


def _read_query_embeddings(path, num_texts: int, dim: int, split: str) -> np.ndarray:
  """``[num_texts, dim]`` query embeddings from an ``.npy`` file, validated as float32.

  The values are checked after the cast to float32, the dtype searched with
  (:func:`cart_jax.index.inputs.validate_embeddings`): a float64 1e300 is an error, not ``inf``.
  """
  from cart_jax.index.inputs import NPY_READ_ERRORS, check_is_array, validate_embeddings  # pylint: disable=g-import-not-at-top
  try:
    qe = np.load(path, allow_pickle=False)
  except NPY_READ_ERRORS as e:
    raise CartError(f"{path}: not a readable .npy file ({e})") from None
  check_is_array(qe, path)
  if qe.ndim != 2 or qe.shape != (num_texts, dim):
    raise CartError(f"{path}: expected shape [{num_texts}, {dim}] (the '{split}' query texts x "
                    f"item dimension), found {qe.shape}")
  validate_embeddings(qe, source=str(path))
  return np.asarray(qe, np.float32)
