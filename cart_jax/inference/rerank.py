"""Beam re-ranking with the dual tower (GENIUS, CVPR 2025: "re-ranking the beam").

CART's constrained beam search returns ``beam`` identifiers per query, ordered by their
log-probability. The dual tower (``cart embed``) gives every item a vector ``E[i]`` and every query
``t = normalise(text_proj(minilm(query)))``. Re-ranking re-scores the beam's items by

  ``score = logp + weight * cos(t, E[row])``          (``weight = inf``: the cosine alone, ties by logp)

and re-sorts them. It costs ``beam`` dot products per query whatever the number of items, and the
MiniLM sentence embedding comes out of the same jitted search call as the beams
(:meth:`CartSearcher.search_beams`), so the query is encoded once.

The weight is chosen on the ``val`` split over :data:`DEFAULT_GRID`, maximising R@1 (ties: MRR@10,
then the smaller weight), and stored with the item rows in ``MODEL_DIR/rerank/``::

  MODEL_DIR/rerank/
    items.npy      float32 [N, d] item vectors (unit rows), rows of the run's index (index.item_ids order)
    text_proj.npz  kernel float32 [384, d], bias float32 [d]: the dual tower's text projection
    meta.json      {"format": "cart-rerank", "version": 1, "n_items", "dim", "text_dim", "weight",
                    "item_ids_sha256", "embeddings", "ids", "model", "tuning": {"split", "grid",
                    "num_queries", "beam_size", "results": [{"weight", "r@1", "mrr@10"}, ...],
                    "chosen_by"}}

``weight`` is a number, or ``"cosine"`` for the cosine-only order. The directory is written into a
temporary sibling and renamed into place (:func:`cart_jax.core.artefacts.atomic_directory`).

No gin and no TensorFlow here. Fitting the weight with a trained run, and the re-ranker built after
training, are jobs (:mod:`cart_jax.jobs.rerank`); CART alone and re-ranked from one search pass is
:func:`cart_jax.inference.evaluation.evaluate_with_rerank`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np

from cart_jax.core.errors import CartError

FORMAT = "cart-rerank"
VERSION = 1
SUBDIR = "rerank"
META_FILE = "meta.json"
ITEMS_FILE = "items.npy"
PROJ_FILE = "text_proj.npz"
TEXT_DIM = 384  # all-MiniLM-L6-v2 sentence embedding
COSINE_ONLY = math.inf
DEFAULT_GRID = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, COSINE_ONLY)
TUNE_SPLIT = "val"
# Without a `val` split: the weight is tuned on a held-out share of the training queries
# (:func:`holdout_queries`, taken out of training by ``train_job``), or, where none can be held out,
# set to DEFAULT_WEIGHT: the grid weight of least worst-case loss against each run's own best weight
# over 9 val-tuned runs of the built-in protocols (emoji and instruments; worst loss 0.024 R@1, mean
# 0.012; docs/results.md, "Data it was never tuned for").
HOLDOUT_SPLIT = "train-holdout"
HOLDOUT_SHARE = 0.1  # of the items with >= 2 training queries: one query each held out
HOLDOUT_MAX = 2000
DEFAULT_WEIGHT = 64.0


class RerankError(CartError):
  """A re-ranker that cannot be built, read or used (the message names the file and the fix)."""


# ----------------------------------------------------------------------------- weights


def weight_to_json(weight: float) -> float | str:
  """A weight as stored in JSON: a number, or ``"cosine"`` for the cosine-only order."""
  return "cosine" if math.isinf(weight) else float(weight)


def parse_weight(value) -> float:
  """``"cosine"``/``"cos"``/``"inf"`` -> :data:`COSINE_ONLY`; otherwise a number >= 0."""
  if isinstance(value, str) and value.strip().lower() in ("cosine", "cos", "inf", "infinity"):
    return COSINE_ONLY
  try:
    w = float(value)
  except (TypeError, ValueError):
    raise RerankError(f"re-rank weight {value!r}: expected a number >= 0 or 'cosine'") from None
  if math.isnan(w) or w < 0:
    raise RerankError(f"re-rank weight {value!r}: expected a number >= 0 or 'cosine'")
  return w


def weight_label(weight: float) -> str:
  return "cosine" if math.isinf(weight) else f"{weight:g}"


# ----------------------------------------------------------------------------- combining


def combined_scores(logp: np.ndarray, cos: np.ndarray, weight: float) -> np.ndarray:
  """``logp + weight * cos`` (float64 [Q, beam]); the cosine alone for ``weight = inf``.

  Invalid beam entries (``logp = -inf``, i.e. fewer identifiers than beams) score ``-inf``.
  """
  logp = np.asarray(logp, np.float64)
  cos = np.asarray(cos, np.float64)
  if logp.shape != cos.shape:
    raise ValueError(f"combine: logp {logp.shape} and cos {cos.shape} differ")
  valid = np.isfinite(logp)
  if math.isinf(weight):
    return np.where(valid, cos, -np.inf)
  return np.where(valid, logp + float(weight) * np.where(valid, cos, 0.0), -np.inf)


def combine(logp: np.ndarray, cos: np.ndarray, weight: float) -> np.ndarray:
  """The re-ranked order: int64 [Q, beam] beam positions, best first.

  Args:
    logp: float [Q, beam] identifier log-probabilities (-inf marks an invalid entry).
    cos: float [Q, beam] query-item cosines (ignored where logp is -inf).
    weight: >= 0; 0 keeps the log-probability order, ``inf`` sorts by cosine (ties by logp).

  Ties keep the beam order (stable sort); invalid entries stay last.
  """
  score = combined_scores(logp, cos, weight)  # [Q, beam]
  if math.isinf(weight):
    lp = np.asarray(logp, np.float64)
    # np.lexsort: the last key is the primary one; stable, so full ties keep the beam order.
    return np.lexsort((-lp, -score), axis=-1)
  return np.argsort(-score, axis=-1, kind="stable")


@dataclasses.dataclass
class Reranked:
  """One re-ranking: every array ``[Q, beam]`` in the new order."""
  rows: np.ndarray  # int32, -1 where invalid
  scores: np.ndarray  # float64 combined scores (-inf where invalid)
  logp: np.ndarray  # float32 identifier log-probabilities
  cos: np.ndarray  # float32 query-item cosines (nan where invalid)
  order: np.ndarray  # int64 positions in the original beam


def apply(rows: np.ndarray, logp: np.ndarray, cos: np.ndarray, weight: float) -> Reranked:
  """Re-sorts a beam's ``rows``/``logp``/``cos`` (all [Q, beam]) by :func:`combine`."""
  order = combine(logp, cos, weight)
  take = lambda a: np.take_along_axis(np.asarray(a), order, axis=1)
  return Reranked(rows=take(rows), scores=take(combined_scores(logp, cos, weight)), logp=take(logp),
                  cos=take(cos), order=order)


# ----------------------------------------------------------------------------- tuning


def _r1_mrr(rows: np.ndarray, targets: np.ndarray, k: int) -> tuple[int, float]:
  """(number of top-1 hits, summed reciprocal rank within the first k)."""
  top = rows[:, :k]
  hit = top == np.asarray(targets)[:, None]  # [Q, k]
  found = hit.any(axis=1)
  rank = np.argmax(hit, axis=1)
  return int(np.sum(hit[:, 0])), float(np.sum(np.where(found, 1.0 / (rank + 1.0), 0.0)))


def tune_weight(rows: np.ndarray, logp: np.ndarray, cos: np.ndarray, targets: np.ndarray,
                grid: Sequence[float] = DEFAULT_GRID, mrr_k: int = 10) -> tuple[float, list[dict]]:
  """The grid weight with the best R@1 of the re-ranked beams (ties: MRR@k, then the smaller weight).

  Args:
    rows, logp, cos: [Q, beam] the beams (rows of the index; -1 / -inf where invalid).
    targets: int [Q] the right row per query.
    grid: weights >= 0 (``inf``: cosine only).

  Returns:
    (weight, [{"weight", "r@1", "mrr@10"} per grid weight, in grid order]).
  """
  rows, targets = np.asarray(rows), np.asarray(targets)
  if rows.ndim != 2 or rows.shape[0] != targets.shape[0]:
    raise ValueError(f"tune_weight: rows {rows.shape} vs targets {targets.shape}")
  if not len(grid):
    raise ValueError("tune_weight: empty grid")
  q = max(rows.shape[0], 1)
  k = min(mrr_k, rows.shape[1])
  table, scored = [], []
  for w in grid:
    w = parse_weight(w)
    hits, rr = _r1_mrr(apply(rows, logp, cos, w).rows, targets, k)
    table.append({"weight": weight_to_json(w), "r@1": hits / q, f"mrr@{mrr_k}": rr / q})
    scored.append((w, hits, rr))
  best = None
  for w, hits, rr in sorted(scored, key=lambda t: t[0]):  # ascending: ties keep the smaller weight
    if best is None or hits > best[1] or (hits == best[1] and rr > best[2] + 1e-9):
      best = (w, hits, rr)
  return best[0], table


# ----------------------------------------------------------------------------- no val split


def _holdout_rank(item_id: str, text: str) -> bytes:
  return hashlib.sha256(f"rerank-holdout\x00{item_id}\x00{text}".encode()).digest()


def has_val(corpus) -> bool:
  return bool(corpus.texts(split=TUNE_SPLIT, kind="query"))


def holdout_queries(corpus) -> list:
  """Training queries to tune the re-rank weight on when the corpus has no ``val`` queries.

  Of the items with at least two training queries, a hash-chosen :data:`HOLDOUT_SHARE` (at most
  :data:`HOLDOUT_MAX`, at least one) give up one query each (hash-chosen too), so no item loses
  all its training queries. Deterministic in the corpus alone: ``train_job`` trains without these
  texts and the tuning after training (or a later ``cart eval --rerank --embeddings``) finds the
  same ones. ``[]`` when the corpus has ``val`` queries or no item has two training queries.
  """
  if has_val(corpus):
    return []
  by_item: dict[str, list] = {}
  for t in corpus.texts(split="train", kind="query"):
    by_item.setdefault(t.item_id, []).append(t)
  cands = [min(ts, key=lambda t: _holdout_rank(t.item_id, t.text))
           for ts in by_item.values() if len({t.text for t in ts}) >= 2]
  if not cands:
    return []
  n = min(HOLDOUT_MAX, max(1, math.ceil(HOLDOUT_SHARE * len(cands))))
  cands.sort(key=lambda t: _holdout_rank(t.item_id, ""))
  return cands[:n]


def without_holdout(corpus):
  """``corpus`` without its :func:`holdout_queries` (the corpus itself when there are none)."""
  held = holdout_queries(corpus)
  if not held:
    return corpus, []
  from cart_jax.data.corpus import Corpus  # pylint: disable=g-import-not-at-top
  drop = {(t.item_id, t.text) for t in held}
  kept = [t for t in corpus.all_texts
          if not (t.split == "train" and t.kind == "query" and (t.item_id, t.text) in drop)]
  return Corpus(corpus.name, corpus.modality, corpus.items, kept, root=corpus.root,
                meta=corpus.meta, media_roots=corpus.media_roots), held


# ----------------------------------------------------------------------------- the re-ranker


def ids_fingerprint(item_ids: Sequence[str]) -> str:
  return hashlib.sha256("\n".join(item_ids).encode("utf-8")).hexdigest()


def _l2n(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclasses.dataclass
class Reranker:
  """Dual-tower item rows + text projection + the combination weight.

  Attributes:
    items: float32 [N, d] unit item vectors, row i = ``index.item_ids[i]`` (from :func:`load`: a
      read-only memory map of ``items.npy``; only the rows a search re-ranks are read).
    kernel, bias: float32 [384, d], [d]: ``text_proj`` of the dual tower (``E.model.npz``).
    weight: ``score = logp + weight * cos`` (``inf``: cosine only).
    item_ids_sha256: fingerprint of the index's item ids the rows follow (None: unchecked).
    meta: what :func:`save` writes besides the arrays (paths, tuning).
  """
  items: np.ndarray
  kernel: np.ndarray
  bias: np.ndarray
  weight: float = 1.0
  item_ids_sha256: str | None = None
  meta: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if not (isinstance(self.items, np.memmap) and self.items.dtype == np.float32):  # keep a file-backed map
      self.items = np.asarray(self.items, np.float32)
    self.kernel = np.asarray(self.kernel, np.float32)
    self.bias = np.asarray(self.bias, np.float32)
    if self.items.ndim != 2:
      raise RerankError(f"re-ranker item rows must be [N, d], got shape {self.items.shape}")
    if self.kernel.ndim != 2 or self.kernel.shape[1] != self.items.shape[1]:
      raise RerankError(f"text projection kernel {self.kernel.shape} does not map into the items' "
                        f"{self.items.shape[1]} dimensions")
    if self.bias.shape != (self.kernel.shape[1],):
      raise RerankError(f"text projection bias {self.bias.shape}, expected ({self.kernel.shape[1]},)")
    self.weight = parse_weight(self.weight)

  @property
  def n_items(self) -> int:
    return int(self.items.shape[0])

  @property
  def dim(self) -> int:
    return int(self.items.shape[1])

  @property
  def text_dim(self) -> int:
    return int(self.kernel.shape[0])

  def with_weight(self, weight: float) -> "Reranker":
    return dataclasses.replace(self, weight=parse_weight(weight))

  def embed_queries(self, sentence_embedding: np.ndarray) -> np.ndarray:
    """MiniLM sentence embeddings ``[Q, 384]`` -> dual-tower query vectors ``[Q, d]`` (unit norm)."""
    f = np.asarray(sentence_embedding, np.float32)
    if f.ndim != 2 or f.shape[1] != self.text_dim:
      raise RerankError(f"query features of shape {f.shape}; the text projection takes "
                        f"{self.text_dim}-d MiniLM sentence embeddings")
    return _l2n(f @ self.kernel + self.bias)

  def cosines(self, rows: np.ndarray, sentence_embedding: np.ndarray) -> np.ndarray:
    """float32 [Q, beam] cosine of each query with each of its beam's items (nan where row < 0)."""
    rows = np.asarray(rows)
    if rows.size and rows.max() >= self.n_items:
      raise RerankError(f"beam row {int(rows.max())} out of range: the re-ranker holds "
                        f"{self.n_items} items (built for another index?)")
    t = self.embed_queries(sentence_embedding)  # [Q, d]
    vec = self.items[np.where(rows >= 0, rows, 0)]  # [Q, beam, d]
    cos = np.einsum("qd,qbd->qb", t, vec)  # [Q, beam]
    return np.where(rows >= 0, cos, np.nan).astype(np.float32)

  def rerank(self, rows: np.ndarray, logp: np.ndarray, sentence_embedding: np.ndarray,
             weight: float | None = None) -> Reranked:
    """Re-sorts beams ``rows``/``logp`` [Q, beam] of queries with these MiniLM embeddings [Q, 384]."""
    w = self.weight if weight is None else parse_weight(weight)
    return apply(rows, logp, self.cosines(rows, sentence_embedding), w)


def build(embeddings: str | os.PathLike, item_ids: Sequence[str], *,
          ids_path: str | os.PathLike | None = None, model_path: str | os.PathLike | None = None,
          weight: float = 1.0) -> Reranker:
  """A re-ranker from ``cart embed`` outputs, its rows re-ordered to ``item_ids`` (the index's).

  Args:
    embeddings: ``E.npy`` (or ``.npz``) item vectors.
    item_ids: the index's item ids (``index.item_ids``); each must have a row in ``embeddings``
      (rows of other ids are dropped).
    ids_path: ids of the rows (default: ``E.ids.txt``).
    model_path: the dual tower (default: ``E.model.npz``), for its text projection.

  Raises:
    RerankError naming the file: unreadable embeddings or ids, an index id without a row, no model
    file, a projection whose size does not match the items.
  """
  from cart_jax.data.embeddings import embedding_files, read_embeddings_with_ids  # pylint: disable=g-import-not-at-top
  from cart_jax.index.inputs import InputError  # pylint: disable=g-import-not-at-top

  embeddings = Path(embeddings)
  model_path = Path(model_path) if model_path is not None else embedding_files(embeddings).model
  try:
    arr, ids = read_embeddings_with_ids(embeddings, ids_path)
  except InputError as e:
    raise RerankError(str(e)) from None
  ids_src = ids_path or embedding_files(embeddings).ids
  pos = {item: i for i, item in enumerate(ids)}
  missing = [i for i in item_ids if i not in pos]
  if missing:
    raise RerankError(f"{ids_src}: {len(missing)} item(s) of the run's index have no row in "
                      f"{embeddings.name}, e.g. {missing[:3]} (the index was built from other "
                      f"embeddings?)")
  if not model_path.is_file():
    raise RerankError(f"{model_path}: dual-tower model not found: re-ranking needs the text "
                      f"projection that `cart embed` (built-in encoder) writes next to "
                      f"{embeddings.name}; precomputed embeddings have none")
  from cart_jax.models.dual_encoder import load_model  # pylint: disable=g-import-not-at-top
  try:
    model = load_model(model_path)
  except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
    raise RerankError(f"{model_path}: unreadable dual-tower model ({e})") from None
  kernel = np.asarray(model.text_proj.kernel.get_value(), np.float32)  # [text_dim, d]
  bias = np.asarray(model.text_proj.bias.get_value(), np.float32)  # [d]
  if kernel.shape[0] != TEXT_DIM:
    raise RerankError(f"{model_path}: its text projection takes {kernel.shape[0]}-d features, "
                      f"not MiniLM's {TEXT_DIM}")
  if kernel.shape[1] != arr.shape[1]:
    raise RerankError(f"{model_path}: the text projection embeds into {kernel.shape[1]} dimensions, "
                      f"{embeddings} has {arr.shape[1]}")
  order = np.asarray([pos[i] for i in item_ids], np.int64)  # [N]
  items = _l2n(np.asarray(arr[np.sort(order)])[np.argsort(np.argsort(order))])  # [N, d] index order
  meta = {"embeddings": str(embeddings.absolute()), "ids": str(Path(ids_src).absolute()),
          "model": str(model_path.absolute())}
  return Reranker(items=items, kernel=kernel, bias=bias, weight=weight,
                  item_ids_sha256=ids_fingerprint(item_ids), meta=meta)


def directory(model_dir: str | os.PathLike) -> Path:
  """``MODEL_DIR/rerank``, or the run's current version's (``run.json``'s ``rerank_dir``, written
  by ``cart index add/remove``)."""
  d = Path(model_dir)
  try:
    run = json.loads((d / "run.json").read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError):
    return d / SUBDIR  # no run.json (yet): load_run names a bad one
  if not isinstance(run, dict) or "rerank_dir" not in run:
    return d / SUBDIR
  from cart_jax.runs.layout import run_subdir  # pylint: disable=g-import-not-at-top
  return run_subdir(d, run, "rerank_dir", SUBDIR)


def exists(model_dir: str | os.PathLike) -> bool:
  return (directory(model_dir) / META_FILE).is_file()


def save(reranker: Reranker, model_dir: str | os.PathLike) -> Path:
  """Writes ``MODEL_DIR/rerank/`` atomically (temporary sibling, then rename); returns its path."""
  from cart_jax.core.artefacts import atomic_directory  # pylint: disable=g-import-not-at-top
  target = directory(model_dir)
  meta = {"format": FORMAT, "version": VERSION, "n_items": reranker.n_items, "dim": reranker.dim,
          "text_dim": reranker.text_dim, "weight": weight_to_json(reranker.weight),
          "item_ids_sha256": reranker.item_ids_sha256,
          **{k: v for k, v in reranker.meta.items() if k not in ("format", "version")}}
  with atomic_directory(target) as tmp:
    np.save(tmp / ITEMS_FILE, reranker.items)
    np.savez(tmp / PROJ_FILE, kernel=reranker.kernel, bias=reranker.bias)
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
  return target


def load(model_dir: str | os.PathLike, item_ids: Sequence[str] | None = None, *,
         rerank_dir: str | os.PathLike | None = None) -> Reranker:
  """Reads ``MODEL_DIR/rerank/``; with ``item_ids`` also checks it follows that index's rows.

  ``rerank_dir``: read this directory instead (e.g. a local copy of a remote run's)."""
  d = Path(rerank_dir) if rerank_dir is not None else directory(model_dir)
  meta_path = d / META_FILE
  if not meta_path.is_file():
    raise RerankError(f"{model_dir}: no re-ranker ({meta_path} missing); build one with "
                      f"`cart eval --model-dir {model_dir} --rerank --embeddings E.npy` (E.npy: the "
                      f"`cart embed` output the index was built from, with E.model.npz next to it): "
                      f"the weight is tuned on '{TUNE_SPLIT}' and stored in the run")
  try:
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
    raise RerankError(f"{meta_path}: unreadable re-ranker metadata ({e}); rebuild it with "
                      f"`cart eval --rerank --embeddings E.npy`") from None
  if not isinstance(meta, dict):
    raise RerankError(f"{meta_path}: unreadable re-ranker metadata (not a JSON object); rebuild it "
                      f"with `cart eval --rerank --embeddings E.npy`")
  if meta.get("format") != FORMAT or meta.get("version") != VERSION:
    raise RerankError(f"{meta_path}: format {meta.get('format')!r} v{meta.get('version')}, expected "
                      f"{FORMAT!r} v{VERSION}")
  try:
    # Memory-mapped: a search reads only its beams' rows, so a large index's rows (10M x 256
    # float32 is 10 GB) stay on disk instead of in the process's memory.
    items = np.load(d / ITEMS_FILE, mmap_mode="r", allow_pickle=False)
    with np.load(d / PROJ_FILE, allow_pickle=False) as z:
      kernel, bias = z["kernel"], z["bias"]
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
    raise RerankError(f"{d}: unreadable re-ranker arrays ({e})") from None
  if items.shape != (meta.get("n_items"), meta.get("dim")):
    raise RerankError(f"{d / ITEMS_FILE}: shape {items.shape}, {meta_path} says "
                      f"[{meta.get('n_items')}, {meta.get('dim')}]")
  try:
    weight = parse_weight(meta.get("weight"))
  except RerankError as e:
    raise RerankError(f"{meta_path}: {e}") from None
  r = Reranker(items=items, kernel=kernel, bias=bias, weight=weight,
               item_ids_sha256=meta.get("item_ids_sha256"),
               meta={k: v for k, v in meta.items()
                     if k not in ("format", "version", "n_items", "dim", "text_dim", "weight",
                                  "item_ids_sha256")})
  if item_ids is not None:
    if len(item_ids) != r.n_items or (r.item_ids_sha256 is not None
                                      and r.item_ids_sha256 != ids_fingerprint(item_ids)):
      raise RerankError(f"{d}: built for another index ({r.n_items} items) than the run's "
                        f"({len(item_ids)} items); rebuild it with `cart eval --rerank --embeddings E.npy`")
  return r


# ----------------------------------------------------------------------------- with a run


def check_model(model_config) -> str | None:
  """Raises RerankError unless the network has a MiniLM encoder; returns a caveat or None."""
  if model_config.encoder != "minilm":
    raise RerankError(f"re-ranking needs a CART model with a MiniLM encoder (the query's sentence "
                      f"embedding comes from it); this run's encoder is {model_config.encoder!r}")
  if not model_config.freeze_encoder:
    return ("the encoder was fine-tuned (freeze_encoder=False): query embeddings come from the "
            "trained MiniLM, not the frozen one the dual tower was trained on")
  return None
