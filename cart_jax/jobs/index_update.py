"""Adding items to and removing items from a trained run, without retraining (``cart index``).

The job; the fine-tune it runs is :mod:`cart_jax.train.fine_tune`.

  cart index add --model-dir RUN --corpus NEW_CORPUS --embeddings NEW_E.npy [--steps N]
  cart index remove --model-dir RUN --ids REMOVED.txt

**add** (:func:`add_items`):

1. The new items get identifiers from the run's own K-Means centroids and RQ-VAE
   (:meth:`SemanticIndex.assign`): every existing identifier stays as it is, and no identifier of
   a removed item is given out again (tombstones, below).
2. If a new identifier needs a larger counter ``u`` than the index had, the counter level grows.
   It is the last level of the decoder vocabulary, so its new tokens are appended after every
   existing token: no existing token id moves. The decoder's token table and output projection
   grow by the same rows / columns, each started at the mean of the existing counter tokens'
   (:func:`grow_output_vocab`); the model config's ``output_vocab_size`` follows.
3. The decoder is fine-tuned briefly, from the run's newest checkpoint with a fresh optimizer, on
   the new items' training texts mixed with a replay sample of the old items' (experience replay:
   every batch holds ``round(replay_ratio * batch)`` old texts, the rest new ones). The new items'
   texts are their ``train`` queries, plus their ``train`` captions when the run trained on
   captions or the item has no training query. The replay texts are a seeded sample of the run's
   own training texts (queries, and captions when it trained on them), only as many as the steps
   can show. The frozen encoder's states come from the shared state cache as in ``cart train``.
4. The new items' media and texts join the run's corpus in a new corpus directory (the run's items
   keep their media paths; the new ones go under ``media/added-v<n>/``; media are symbolic links to
   the real files, so nothing is copied), so ``cart eval`` / ``cart search`` see old and new items.
5. If the run has a re-ranker (``rerank/``), its item rows are extended with the new embeddings
   (L2-normalised, as ``cart embed`` writes them) when their dimension matches, else dropped with
   a note (``cart eval --rerank --embeddings`` rebuilds it).

**remove** (:func:`remove_items`): the items' rows leave the index and become tombstones
(``removed_codes.npy`` / ``removed_item_ids.txt`` in the index, never assigned again); they leave
the trie at once, so search and eval can no longer generate them; their texts leave the run's
corpus. No training: the new version's checkpoint is the current one, hard-linked.

**Versions and atomicity.** A run starts at version 1 (``index/``, ``checkpoints/``, ``rerank/``,
the corpus it was trained on). Each add or remove writes version ``n + 1`` as one directory::

  MODEL_DIR/versions/<n>/
    index/          the SemanticIndex of this version (tombstones included)
    corpus/         the run's corpus at this version (media linked to the real files)
    checkpoints/    one checkpoint step (manifest-verified as ever)
    rerank/         the re-ranker's rows for this index (when the run has one)
    update.json     what the add/remove did (the summary it returned)

``versions/<n>/`` is built in ``versions/.<n>.partial`` and renamed into place complete, and only
then does ``run.json`` switch to it (one atomic file replace: ``index_version``, ``index_dir``,
``checkpoint_dir``, ``rerank_dir``, ``corpus_dir`` with its ``corpus_sha256``, ``corpus_sources``
(the corpora its media come from: the run's own and each add's), ``model_config``). A kill at any
moment before that replace leaves ``run.json`` naming the previous version, whose files nothing
touched: the run stays usable as it was, and the next ``add``/``remove`` removes what the dead
writer left and writes the version again. On a local disk the whole operation holds MODEL_DIR's
output lock (the one ``cart train`` holds). Version 1 is never deleted; of ``versions/<n>/``, the
newest ``keep_versions`` (current included) are kept.

**Any file system, any number of processes.** MODEL_DIR goes through :mod:`cart_jax.core.paths`:
on a bucket (``gs://...``) there is no rename, so version ``n`` is written in ``versions/<n>/``
itself (nothing reads it until ``run.json``, one object upload, names it), and its corpus holds
the JSON files only (each item keeps the media path of the corpus it came from, named in
``corpus_sources``). In a multi-process launch (``launch/multi_gpu.sh index add ...``) every
process loads the run and runs the fine-tune (collective); the checkpoint is saved by all of them
together (orbax), every other file and ``run.json`` by process 0, with barriers between the steps
(:class:`_Version`).
A changed run cannot be trained further with ``cart train`` (it refuses; train a new MODEL_DIR on
``corpus_dir``).

**Defaults** (measured: ``benchmarks/incremental.py``, README "Adding and removing items").

* ``replay_ratio = 0.5``: half of every batch is old texts. Experience replay commonly mixes
  equal-size batches of new and stored examples (Chaudhry et al. 2019, "On Tiny Episodic
  Memories in Continual Learning"); DSI++ (Mehta et al. 2023) also found that continuing to
  train on new documents alone makes a generative retriever forget the old ones. Measured on emoji
  (20% of the items added): without replay the old items' R@1 falls from 0.81 to 0.16; more replay
  (0.7, 0.75) keeps more of it but learns the new items far worse in the same steps, and so does a
  lower learning rate (a quarter of the run's peak: new R@1 0.50 instead of 0.76).
* ``steps = None`` (auto): the new texts get as many passes as the run gave its own training
  texts (``run_steps * batch / old_texts`` passes), capped at 18% of the run's steps and at least
  ``min(20, cap)``. The cap keeps an add within a fifth of a full retraining's wall time: loading
  the run, assigning identifiers, the state cache and compiling take the other ~2% at the demo's
  size.
* ``learning_rate = None``: the run's peak learning rate, 10% warm-up, cosine decay to the run's
  end fraction; R-Drop weight, batch size and dropout as the run trained.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from cart_jax.core.artefacts import output_lock
from cart_jax.train.fine_tune import (IndexUpdateError, ReplayBatches, auto_steps, fine_tune,
                                      grow_output_vocab, new_item_log_prior, new_item_texts,
                                      run_caption_rate)

VERSIONS_SUBDIR = "versions"
UPDATE_FILE = "update.json"
ADDED_MEDIA = "added-v{version}"  # under the corpus's media/ directory
DEFAULT_REPLAY_RATIO = 0.5
DEFAULT_KEEP_VERSIONS = 2
DEFAULT_BALANCE_TAIL = 0.0
DEFAULT_DISTILL = 0.1
DEFAULT_NEW_ITEM_PRIOR = "none"
DEFAULT_PSEUDO_QUERIES = 0  # off: they cost the old items (docs/incremental.md)

__all__ = ["IndexUpdateError", "add_items", "remove_items", "read_remove_ids"]


def _with_pseudo_queries(new_texts: list, textless: list[str], new_corpus, old_corpus, embeddings,
                         item_ids, k: int, run: dict,
                         log: Callable[[str], None]) -> tuple[list, dict]:
  """``new_texts`` plus ``k`` pseudo-queries for each of the ``textless`` new items; a summary."""
  from types import SimpleNamespace  # pylint: disable=g-import-not-at-top

  from cart_jax.data.embeddings import embedding_files  # pylint: disable=g-import-not-at-top
  from cart_jax.jobs import pseudo_queries as pq  # pylint: disable=g-import-not-at-top
  from cart_jax.train import state_cache  # pylint: disable=g-import-not-at-top
  model = embedding_files(embeddings).model
  if not Path(model).is_file():
    log(f"note: {len(textless)} new item(s) have no training text (e.g. {textless[:3]}) and get no "
        f"pseudo-queries: those need the dual tower {model} beside {embeddings} (`cart embed` "
        "writes it); they get identifiers only")
    return new_texts, {"textless_items": len(textless), "pseudo_queries": 0,
                       "skipped": f"no {Path(model).name}"}
  candidates = [t.text for c in (old_corpus, new_corpus) for t in c.texts(split="train")]
  root = run.get("input_config", {}).get("state_cache_dir")
  root = Path(root) if root else state_cache.default_root()
  pseudo, summary = pq.pseudo_queries(
      new_corpus, SimpleNamespace(item_ids=list(new_corpus.item_ids)), embeddings, k,
      items=textless, candidates=candidates, ids_path=item_ids,
      cache_dir=root.parent / "pseudo_text_features", log=log)
  return list(new_texts) + pseudo, summary


def _check_prior(value) -> str | float:
  if isinstance(value, str):
    if value in ("auto", "none"):
      return value
    try:
      value = float(value)
    except ValueError:
      raise IndexUpdateError(f"--new-item-prior {value!r}: 'auto', 'none' or a number <= 0") from None
  if not (isinstance(value, (int, float)) and math.isfinite(value) and value <= 0):
    raise IndexUpdateError(f"--new-item-prior {value!r}: 'auto', 'none' or a number <= 0")
  return float(value)


# --------------------------------------------------------------------------- the run's versions


def _check_run_dir(model_dir) -> None:
  from cart_jax.runs.layout import RUN_FILE, RunError  # pylint: disable=g-import-not-at-top
  if not model_dir.is_dir():
    raise RunError(f"{model_dir}: no such directory (a MODEL_DIR written by `cart train`)")
  if not (model_dir / RUN_FILE).is_file():
    raise RunError(f"{model_dir}: not a CART model directory (no {RUN_FILE}; train one with "
                   "`cart train`)")


class _Version:
  """Where version ``n`` is built, and how it becomes the run's (module docstring, "Versions").

  Every process calls every method (the fine-tune and the checkpoint's save are collective); only
  process 0 writes files, the others wait at the barriers. On a local disk the version is built in
  ``versions/.<n>.partial`` and renamed into place whole; a bucket (``gs://``) has no rename, so
  it is built in ``versions/<n>/`` itself, which nothing reads until ``run.json`` names it.
  """

  def __init__(self, model_dir, version: int):
    from cart_jax import partitioning  # pylint: disable=g-import-not-at-top
    from cart_jax.core import paths  # pylint: disable=g-import-not-at-top
    self.remote = paths.is_remote(model_dir)
    self.final = model_dir / VERSIONS_SUBDIR / str(version)
    self.build = self.final if self.remote else model_dir / VERSIONS_SUBDIR / f".{version}.partial"
    self.primary = partitioning.is_primary()
    self._sync = partitioning.sync

  def start(self) -> None:
    """Removes what a dead writer left of this version (``run.json`` never named it)."""
    if self.primary:
      for d in dict.fromkeys([self.build, self.final]):
        _rmtree(d)
      self.build.mkdir(parents=True)
    self._sync("cart-index:start")

  @contextlib.contextmanager
  def part(self, name: str) -> Iterator[Path]:
    """Process 0: a local directory to write ``<it>/<name>`` in; it becomes the version's
    ``name`` (on a bucket: uploaded file by file, ``meta.json`` last)."""
    if not self.remote:
      yield Path(self.build)
      return
    from cart_jax.core import paths  # pylint: disable=g-import-not-at-top
    tmp = Path(tempfile.mkdtemp(prefix="cart-index-"))
    try:
      yield tmp
      paths.copy_tree(tmp / name, self.build / name)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)

  def write_json(self, name: str, obj) -> None:
    from cart_jax.core import paths  # pylint: disable=g-import-not-at-top
    if self.primary:
      paths.write_json(self.build / name, obj)

  def commit(self) -> None:
    """The version complete in ``versions/<n>/`` (a rename on a local disk)."""
    self._sync("cart-index:built")
    if self.primary and not self.remote:
      os.replace(self.build, self.final)
    self._sync("cart-index:committed")

  def discard(self) -> None:
    if self.primary:
      for d in dict.fromkeys([self.build, self.final]):
        _rmtree(d)


def _rmtree(d) -> None:
  """Removes directory ``d`` (local or remote) if it is there."""
  if isinstance(d, Path):
    shutil.rmtree(d, ignore_errors=True)
  elif d.exists():
    d.rmtree()


def _version_rel(version: int, part: str) -> str:
  return f"{VERSIONS_SUBDIR}/{version}/{part}"


def _write_corpus(out: Path, old, new, version: int, drop: set[str], action: str, source: str | None,
                  with_media: bool = True):
  """The run's corpus at a new version: ``old`` minus ``drop``, plus ``new``'s items and texts.

  ``with_media=False`` (a run or a corpus on a bucket): the corpus's JSON files only, every item
  keeping the media path of the corpus it came from (``run.json``'s ``corpus_sources``)."""
  from cart_jax.data.corpus import MEDIA_DIR, MIXED, Item, is_within, write_corpus  # pylint: disable=g-import-not-at-top
  if not with_media:
    return _write_corpus_texts(out, old, new, version, drop, action, source)
  items, media, roots = [], {}, []
  for corpus in (old, new):
    if corpus is not None:
      roots += [corpus.root.resolve(), *corpus.media_roots]
  for it in old.items:
    if it.id not in drop:
      items.append(it)
      media[it.id] = Path(old.media_path(it)).resolve()
  texts = [t for t in old.all_texts if t.item_id not in drop]
  if new is not None:
    taken = {it.media for it in items}
    folder = Path(MEDIA_DIR) / ADDED_MEDIA.format(version=version)
    for it in new.items:
      parts = Path(it.media).parts
      rel = Path(*parts[1:]) if parts[0] == MEDIA_DIR and len(parts) > 1 else Path(*parts)
      path = (folder / rel).as_posix()
      if path in taken:
        raise IndexUpdateError(f"{new.root}: media path {path} of item {it.id!r} is taken in the run's "
                               "corpus")
      items.append(Item(it.id, it.modality, path))
      media[it.id] = Path(new.media_path(it)).resolve()
    texts += list(new.all_texts)
  # Only the roots some media file lies in: a version's corpus (versions/<n>/corpus, pruned later)
  # holds links, never the files themselves, so it is no root of the next version.
  roots = [r for r in dict.fromkeys(roots)
           if any(is_within(str(src), str(r)) for src in media.values())]
  modalities = {it.modality for it in items}
  modality = next(iter(modalities)) if len(modalities) == 1 else MIXED
  meta = _history_meta(old, version, action, source)
  return write_corpus(out, old.name, modality, items, texts, media_sources=media,
                      media_mode="symlink", meta=meta, media_roots=roots)


def _history_meta(old, version: int, action: str, source: str | None) -> dict:
  meta = dict(old.meta)
  history = list(meta.get("cart_index", {}).get("history", [])) if isinstance(
      meta.get("cart_index"), dict) else []
  history.append({"version": version, "action": action, "source": source,
                  "base": str(old.root)})
  meta["cart_index"] = {"version": version, "history": history}
  return meta


def _write_corpus_texts(out: Path, old, new, version: int, drop: set[str], action: str,
                        source: str | None):
  from cart_jax.data.corpus import MIXED, write_corpus  # pylint: disable=g-import-not-at-top
  items = [it for it in old.items if it.id not in drop] + (list(new.items) if new is not None else [])
  taken: dict[str, str] = {}
  for it in items:
    if it.media in taken:
      raise IndexUpdateError(f"{new.root if new is not None else old.root}: media path {it.media} of "
                             f"item {it.id!r} is also item {taken[it.media]!r}'s in the run's corpus")
    taken[it.media] = it.id
  texts = [t for t in old.all_texts if t.item_id not in drop]
  texts += list(new.all_texts) if new is not None else []
  modalities = {it.modality for it in items}
  modality = next(iter(modalities)) if len(modalities) == 1 else MIXED
  return write_corpus(out, old.name, modality, items, texts, check_media=False,
                      meta=_history_meta(old, version, action, source))


def _link_checkpoint(src, dst) -> str:
  """Copies a checkpoint step directory with hard links (a copy where linking fails, a file by
  file copy, manifest last, on a bucket); returns the mode."""
  from cart_jax.core import paths  # pylint: disable=g-import-not-at-top
  from cart_jax.core.checkpointing import MANIFEST  # pylint: disable=g-import-not-at-top
  if not (isinstance(src, Path) and isinstance(dst, Path)):
    paths.copy_tree(src, dst, last=MANIFEST)
    return "copy"
  dst.parent.mkdir(parents=True, exist_ok=True)
  try:
    shutil.copytree(src, dst, copy_function=os.link)
    return "hardlink"
  except OSError:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    return "copy"


def _reranker_for(model_dir: Path, old_ids: Sequence[str], new_ids: Sequence[str],
                  keep_rows: np.ndarray | None = None, add_rows: np.ndarray | None = None,
                  log: Callable[[str], None] = print):
  """The run's re-ranker carried to the new index (or None, with the reason as a string)."""
  from cart_jax.core import paths  # pylint: disable=g-import-not-at-top
  from cart_jax.inference import rerank  # pylint: disable=g-import-not-at-top
  from cart_jax.runs.layout import RUN_FILE, run_subdir  # pylint: disable=g-import-not-at-top
  local = None
  if paths.is_remote(model_dir):  # its files, read from a local copy
    import json  # pylint: disable=g-import-not-at-top
    run = json.loads((model_dir / RUN_FILE).read_text())
    d = run_subdir(model_dir, run, "rerank_dir", rerank.SUBDIR)
    if not (d / rerank.META_FILE).exists():
      return None, "the run has no re-ranker"
    local = paths.stage(d)
  elif not rerank.exists(model_dir):
    return None, "the run has no re-ranker"
  try:
    r = rerank.load(model_dir, old_ids, rerank_dir=local)
  except rerank.RerankError as e:
    log(f"re-ranker not carried over: {e}")
    return None, f"not carried over: {e}"
  items = r.items if keep_rows is None else r.items[keep_rows]
  if add_rows is not None:
    add = np.asarray(add_rows, np.float32)
    if add.shape[1] != r.dim:
      why = (f"the new embeddings have dimension {add.shape[1]}, the re-ranker's item rows "
             f"{r.dim}: rebuild it with `cart eval --rerank --embeddings E.npy`")
      log(f"re-ranker dropped: {why}")
      return None, f"dropped: {why}"
    add = add / np.maximum(np.linalg.norm(add, axis=1, keepdims=True), 1e-12)
    items = np.concatenate([items, add])
  out = dataclasses.replace(r, items=items, item_ids_sha256=rerank.ids_fingerprint(list(new_ids)))
  return out, "extended" if add_rows is not None else "rows removed"


def _switch(model_dir, run: dict, version: int, model_config: dict, entry: dict) -> dict:
  """Points ``run.json`` at ``versions/<version>/`` (one atomic replace, or one object upload on a
  bucket; process 0); returns the new run.

  ``rerank_dir`` always names the version's ``rerank/``: when the run has no re-ranker it is
  absent, and ``cart eval --rerank`` says how to build one (never the previous version's rows).
  """
  from cart_jax import partitioning  # pylint: disable=g-import-not-at-top
  from cart_jax.core import paths  # pylint: disable=g-import-not-at-top
  from cart_jax.runs.layout import CORPUS_HASHES, RUN_FILE, corpus_hashes  # pylint: disable=g-import-not-at-top
  new = dict(run)
  corpus_dir = model_dir / _version_rel(version, "corpus")
  # The corpora the user named (cart train's, then each add's): the version's corpus links to
  # their media, and `cart serve` serves media from them (engine.SearchEngine).
  sources = list(run.get("corpus_sources") or [run["corpus_dir"]])
  sources += [entry["source"]] if entry.get("source") else []
  new.update({"index_version": version, "index_dir": _version_rel(version, "index"),
              "checkpoint_dir": _version_rel(version, "checkpoints"),
              "rerank_dir": _version_rel(version, "rerank"),
              "corpus_dir": os.fspath(corpus_dir), CORPUS_HASHES: corpus_hashes(corpus_dir),
              "corpus_sources": list(dict.fromkeys(sources)),
              "model_config": model_config,
              "index_history": list(run.get("index_history", [])) + [entry]})
  if partitioning.is_primary():
    paths.write_json(model_dir / RUN_FILE, new)
  partitioning.sync("cart-index:switched")
  return new


def _prune(model_dir, current: int, keep: int) -> list[int]:
  """Deletes ``versions/<n>/`` older than the newest ``keep`` (version 1 is never deleted)."""
  from cart_jax import partitioning  # pylint: disable=g-import-not-at-top
  root = model_dir / VERSIONS_SUBDIR
  if not root.is_dir():
    return []
  old = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and int(p.name) <= current - keep)
  if partitioning.is_primary():
    for n in old:
      try:
        _rmtree(root / str(n))
      except OSError:
        pass
  return old


def _tidy_versions_dir(model_dir) -> None:
  """Removes an empty ``versions/`` left by a failed first update (the run is as it was)."""
  if isinstance(model_dir, Path):
    try:
      (model_dir / VERSIONS_SUBDIR).rmdir()
    except OSError:
      pass


def _check_keep(keep_versions: int) -> None:
  if not isinstance(keep_versions, int) or keep_versions < 1:
    raise IndexUpdateError(f"--keep-versions {keep_versions}: must be >= 1 (the current version)")


# --------------------------------------------------------------------------- add


def add_items(model_dir: str | os.PathLike, corpus_dir: str | os.PathLike,
              embeddings: str | os.PathLike, *, item_ids: str | os.PathLike | None = None,
              steps: int | None = None, replay_ratio: float = DEFAULT_REPLAY_RATIO,
              learning_rate: float | None = None, batch_size: int | None = None, seed: int = 0,
              balance_tail: float = DEFAULT_BALANCE_TAIL, distill: float = DEFAULT_DISTILL,
              new_item_prior: str | float = DEFAULT_NEW_ITEM_PRIOR,
              pseudo_queries: int = DEFAULT_PSEUDO_QUERIES,
              keep_versions: int = DEFAULT_KEEP_VERSIONS, verify: bool = True,
              progress: bool = True, log: Callable[[str], None] = print,
              _before_switch: Callable[[Path], None] | None = None) -> dict:
  """Adds the items of ``corpus_dir`` to a trained run (``cart index add``; module docstring).

  Args:
    model_dir: a MODEL_DIR written by ``cart train`` (or changed by an earlier add/remove); local
      or on a bucket (``gs://``). In a multi-process launch every process calls this (the
      fine-tune is collective); process 0 writes.
    corpus_dir: a corpus of the new items (every id new to the run), with their texts (local or
      remote; a remote one, or a run on a bucket, gives a version corpus of JSON files only: the
      media stay in the corpora ``run.json``'s ``corpus_sources`` names).
    embeddings: the new items' embeddings ``E.npy`` from the same item encoder as the run's index
      (its dimension), aligned by ids (``E.ids.txt``, or ``item_ids``) to the corpus's items: every
      item needs a row, no extra rows.
    steps: fine-tuning steps (None: auto, see the module docstring; 0: identifiers and trie only).
    replay_ratio: share of each batch drawn from the old items' training texts, in [0, 1).
    learning_rate: peak learning rate (None: the run's).
    batch_size: examples per step (None: the run's).
    seed: sampling and dropout seed of the fine-tune.
    distill: weight of the distillation from the run before the add on the replayed texts (0: none).
    new_item_prior: the new items' decode-time log-prior offset: ``"auto"`` (their share of the
      corpus's texts against their share of the fine-tune's batches, :func:`new_item_log_prior`),
      ``"none"`` (0) or a number <= 0.
    pseudo_queries: new items with no training text at all get this many pseudo-queries (the
      nearest training texts in the dual tower's space, :mod:`cart_jax.jobs.pseudo_queries`;
      needs ``E.model.npz`` beside ``embeddings``); 0 (default): such items are only given
      identifiers. They are old items' texts relabelled, so they cost the old items recall
      (measured: docs/incremental.md).
    keep_versions: versions under ``versions/`` kept, the new one included (version 1 always).
    verify: check the run's checkpoint against its manifest before reading it.
    _before_switch: tests only: called with the complete version directory before ``run.json``
      switches to it.

  Returns:
    The summary (also ``versions/<n>/update.json``): ``version``, ``added``, ``num_items``,
    ``step``, ``output_vocab_size``, ``vocab_grew_by``, ``fine_tune`` (steps, texts, seconds,
    last metrics; None with ``steps=0``), ``rerank``, the version's directories, ``seconds`` and
    ``stage_seconds``.

  Raises:
    CartError naming the input (a missing or index-less run, an id already in the run, embeddings
    of another dimension or not aligned to the corpus, bad flags, a locked MODEL_DIR); nothing is
    changed then.
  """
  from cart_jax import partitioning  # pylint: disable=g-import-not-at-top
  from cart_jax.core import paths  # pylint: disable=g-import-not-at-top
  from cart_jax.train import trainer  # pylint: disable=g-import-not-at-top

  t0 = time.perf_counter()
  opts = _AddOptions(steps=steps, replay_ratio=replay_ratio, learning_rate=learning_rate,
                     batch_size=batch_size, seed=seed, balance_tail=balance_tail, distill=distill,
                     new_item_prior=_check_prior(new_item_prior), pseudo_queries=pseudo_queries)
  opts.check()
  _check_keep(keep_versions)
  trainer.maybe_initialize_distributed()
  if not partitioning.is_primary():
    log = lambda line: None  # noqa: E731  one copy of each line, from process 0
  model_dir = paths.absolute(model_dir)  # gs://... stays a URI
  _check_run_dir(model_dir)
  with _writer_lock(model_dir):
    plan = _plan_add(model_dir, corpus_dir, embeddings, item_ids, opts, verify, log, t0)
    version = _Version(model_dir, plan.new_version)
    try:
      version.start()
      summary = _build_added_version(plan, version, opts, progress, log)
      version.commit()
      if _before_switch is not None and version.primary:
        _before_switch(version.final)
      t1 = time.perf_counter()
      _switch(model_dir, plan.run, plan.new_version, plan.new_config.to_dict(),
              {"version": plan.new_version, "action": "add", "items": plan.added,
               "source": os.fspath(plan.corpus_dir), "time": time.time()})
    except BaseException:
      version.discard()
      raise
    finally:
      _tidy_versions_dir(model_dir)
    summary["pruned_versions"] = _prune(model_dir, plan.new_version, keep_versions)
    plan.stages["switch"] = time.perf_counter() - t1
  summary["seconds"] = time.perf_counter() - t0
  summary["stage_seconds"] = plan.stages
  ft_info = summary["fine_tune"]
  log(f"version {plan.new_version}: {summary['num_items']} items, step {summary['step']}"
      + (f", fine-tune loss {ft_info['last_metrics']['loss']:.3f}"
         if ft_info and ft_info.get("last_metrics") else "")
      + f" ({summary['seconds']:.1f} s)")
  return summary


@dataclasses.dataclass
class _AddOptions:
  """``add_items``'s training options, checked (each error names its flag)."""
  steps: int | None
  replay_ratio: float
  learning_rate: float | None
  batch_size: int | None
  seed: int
  balance_tail: float
  distill: float
  new_item_prior: str | float
  pseudo_queries: int

  def check(self) -> None:
    if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 0):
      raise IndexUpdateError(f"--steps {self.steps}: must be >= 0 (0: no fine-tuning)")
    if not (isinstance(self.replay_ratio, (int, float)) and 0.0 <= self.replay_ratio < 1.0):
      raise IndexUpdateError(f"--replay-ratio {self.replay_ratio}: must be in [0, 1) (some of every "
                             "batch must be new texts)")
    if not (isinstance(self.balance_tail, (int, float)) and 0.0 <= self.balance_tail <= 1.0):
      raise IndexUpdateError(f"--balance-tail {self.balance_tail}: must be in [0, 1] (a share of "
                             "the steps)")
    if not (isinstance(self.distill, (int, float)) and math.isfinite(self.distill)
            and self.distill >= 0):
      raise IndexUpdateError(f"--distill {self.distill}: must be a finite number >= 0 (0: none)")
    if not (isinstance(self.pseudo_queries, int) and self.pseudo_queries >= 0):
      raise IndexUpdateError(f"--pseudo-queries {self.pseudo_queries}: must be an integer >= 0")
    if self.learning_rate is not None and not (math.isfinite(self.learning_rate)
                                               and self.learning_rate > 0):
      raise IndexUpdateError(f"--lr {self.learning_rate}: must be a finite number > 0")
    if self.batch_size is not None and self.batch_size < 1:
      raise IndexUpdateError(f"--batch-size {self.batch_size}: must be >= 1")


@contextlib.contextmanager
def _writer_lock(model_dir) -> Iterator[None]:
  """MODEL_DIR's output lock, held by process 0 on a local disk (a bucket has no locks: the one
  writer is process 0 of the one job)."""
  from cart_jax import partitioning  # pylint: disable=g-import-not-at-top
  if isinstance(model_dir, Path) and partitioning.is_primary():
    with output_lock(model_dir):
      yield
  else:
    yield


@dataclasses.dataclass
class _AddPlan:
  """What an add will do, decided before anything is written."""
  model_dir: object
  corpus_dir: object
  embeddings: str
  loaded: object
  run: dict
  index: object
  new_index: object
  new_codes: np.ndarray
  emb: np.ndarray
  new_corpus: object
  new_config: object
  new_texts: list
  old_texts: list
  pseudo_summary: dict | None
  batch_size: int
  num_old: int
  steps: int
  learning_rate: float
  prior: float
  new_version: int
  with_media: bool
  stages: dict

  @property
  def added(self) -> int:
    return len(self.new_codes)


def _plan_add(model_dir, corpus_dir, embeddings, item_ids, opts: _AddOptions, verify: bool,
              log: Callable[[str], None], t0: float) -> _AddPlan:
  """Loads the run and the new items, gives them identifiers and decides the fine-tune."""
  from cart_jax.core import paths  # pylint: disable=g-import-not-at-top
  from cart_jax.data.captions import caption_texts  # pylint: disable=g-import-not-at-top
  from cart_jax.data.corpus import CorpusFormatError, ITEMS_FILE, load_corpus  # pylint: disable=g-import-not-at-top
  from cart_jax.data.embeddings import align, embedding_files, read_embeddings_with_ids  # pylint: disable=g-import-not-at-top
  from cart_jax.index.inputs import InputError  # pylint: disable=g-import-not-at-top
  from cart_jax.runs.layout import CORPUS_FILES  # pylint: disable=g-import-not-at-top
  from cart_jax.runs.restore import load_run  # pylint: disable=g-import-not-at-top
  from cart_jax.models.cart.config import with_vocab  # pylint: disable=g-import-not-at-top

  loaded = load_run(model_dir, verify=verify)
  run, index, old_corpus = loaded.run, loaded.index, loaded.corpus
  corpus_dir = paths.absolute(corpus_dir)
  remote_corpus = paths.is_remote(corpus_dir)
  local_corpus = paths.stage(corpus_dir, CORPUS_FILES) if remote_corpus else corpus_dir
  new_corpus = load_corpus(local_corpus, check_media=not remote_corpus)
  in_index = set(index.item_ids)
  clash = [i for i in new_corpus.item_ids if i in old_corpus or i in in_index]
  if clash:
    raise CorpusFormatError(f"{corpus_dir / ITEMS_FILE}: {len(clash)} item id(s) already in the "
                            f"run {model_dir}, e.g. {clash[:3]}: an item is added once (remove it "
                            "first with `cart index remove` to give it a new identifier)")
  arr, ids = read_embeddings_with_ids(embeddings, item_ids)
  if arr.shape[1] != index.embedding_dim:
    raise InputError(f"{embeddings}: embeddings have dimension {arr.shape[1]}, the run's index was "
                     f"built from {index.embedding_dim}-dimensional ones (embed the new items "
                     "with the same item encoder)")
  ids_src = item_ids or embedding_files(embeddings).ids
  emb = np.asarray(align(arr, ids, new_corpus.item_ids,
                         source=f"{embeddings} (ids {ids_src}) vs {corpus_dir}").embeddings,
                   np.float32)
  new_index, new_codes = index.assign(emb, new_corpus.item_ids)
  new_config = with_vocab(loaded.model_config, new_index.vocab)
  stages = {"load_and_assign": time.perf_counter() - t0}

  # Training texts and the steps.
  rate = run_caption_rate(run, old_corpus, run.get("captions_file"))
  new_texts = new_item_texts(new_corpus, with_captions=rate > 0)
  old_texts = list(old_corpus.texts(split="train", kind="query"))
  if rate > 0:
    old_texts += caption_texts(old_corpus, run.get("captions_file"))
  pseudo_summary = None
  have = {t.item_id for t in new_texts}
  textless = [i for i in new_corpus.item_ids if i not in have]
  if opts.steps != 0 and textless and opts.pseudo_queries > 0:
    new_texts, pseudo_summary = _with_pseudo_queries(
        new_texts, textless, new_corpus, old_corpus, embeddings, item_ids, opts.pseudo_queries, run,
        log)
  elif opts.steps != 0 and textless and len(textless) < len(new_corpus.item_ids):
    log(f"note: {len(textless)} new item(s) have no training text (e.g. {textless[:3]}): they get "
        "identifiers only (--pseudo-queries K trains them on the K nearest training texts, at a "
        "cost to the old items)")
  b = int(opts.batch_size or run.get("input_config", {}).get("batch_size", 64))
  num_old = int(round(opts.replay_ratio * b)) if old_texts else 0
  if num_old >= b:
    raise IndexUpdateError(f"--replay-ratio {opts.replay_ratio} with --batch-size {b} leaves no new "
                           "text in a batch")
  run_steps = int(run.get("train_config", {}).get("num_steps", 1000))
  steps = opts.steps
  if steps is None:
    steps = auto_steps(run_steps, b, len(old_texts), len(new_texts), b - num_old)
  if steps > 0 and not new_texts:
    raise CorpusFormatError(f"{corpus_dir}: the new items have no train queries or captions to "
                            "fine-tune on, and no pseudo-queries (they need the dual tower "
                            "NEW_E.model.npz beside the embeddings, and --pseudo-queries > 0); "
                            "add them with --steps 0 (identifiers only) or give them training "
                            "texts")
  lr = float(opts.learning_rate or run.get("train_config", {}).get("learning_rate", 1e-3))
  prior = new_item_log_prior(opts.new_item_prior, steps, b - num_old, b, len(new_texts),
                             len(old_texts))
  if prior:
    new_index = new_index.with_prior(np.arange(index.n_items, new_index.n_items), prior)
  version = int(run.get("index_version", 1))
  with_media = not (paths.is_remote(model_dir) or remote_corpus
                    or paths.is_remote(run["corpus_dir"]))
  log(f"adding {len(new_corpus.items)} items to {model_dir} (version {version} -> {version + 1}); "
      f"counter level {index.vocab.level_sizes[-1]} -> {new_index.vocab.level_sizes[-1]} codes; "
      f"fine-tuning {steps} steps on {len(new_texts)} new texts"
      + (f" + replayed old texts ({num_old} of {b} per batch)" if steps and num_old else ""))
  return _AddPlan(model_dir=model_dir, corpus_dir=corpus_dir, embeddings=os.fspath(embeddings),
                  loaded=loaded, run=run, index=index, new_index=new_index, new_codes=new_codes,
                  emb=emb, new_corpus=new_corpus, new_config=new_config, new_texts=new_texts,
                  old_texts=old_texts, pseudo_summary=pseudo_summary, batch_size=b,
                  num_old=num_old, steps=steps, learning_rate=lr, prior=prior,
                  new_version=version + 1, with_media=with_media, stages=stages)


def _fine_tune_added(plan: _AddPlan, opts: _AddOptions, progress: bool,
                     log: Callable[[str], None]) -> tuple[dict, dict, dict | None]:
  """The grown parameters, fine-tuned on new texts + replayed old ones: (params, frozen, info)."""
  from cart_jax.models.text.tokenizer import encode_texts  # pylint: disable=g-import-not-at-top
  params, grew = grow_output_vocab(plan.loaded.params, plan.index.vocab, plan.new_index.vocab)
  plan.stages["vocab_grew_by"] = grew
  frozen = plan.loaded.frozen
  if plan.steps <= 0:
    return params, frozen, None
  steps, b, num_old = plan.steps, plan.batch_size, plan.num_old
  tokens = plan.new_index.vocab.codes_to_tokens(plan.new_index.codes)  # [N, L]
  row_of = plan.new_index.row_of()

  def encoded(texts):
    return (encode_texts([t.text for t in texts], plan.loaded.input_length),
            tokens[np.asarray([row_of[t.item_id] for t in texts], np.int64)])

  old_texts = plan.old_texts
  tail_steps = int(round(opts.balance_tail * steps)) if num_old else 0
  share_old = len(old_texts) / (len(old_texts) + len(plan.new_texts))
  tail_num_old = min(b - 1, max(num_old, int(round(share_old * b))))
  need = (steps - tail_steps) * num_old + tail_steps * tail_num_old
  sample = replay_sample(old_texts, need, opts.seed) if num_old else old_texts
  batches = ReplayBatches(encoded(plan.new_texts), encoded(sample) if num_old else None, b,
                          opts.replay_ratio, opts.seed,
                          tail_from=(steps - tail_steps) if tail_steps else None,
                          tail_num_old=tail_num_old)
  tuned = fine_tune(model_config=plan.new_config, run=plan.run, params=params, frozen=frozen,
                    batches=batches, steps=steps, learning_rate=plan.learning_rate, seed=opts.seed,
                    distill=float(opts.distill), progress=progress, log=log)
  info = {**tuned.info, "new_texts": len(plan.new_texts),
          "replay_texts": len(sample) if num_old else 0, "replay_ratio": opts.replay_ratio,
          "old_texts": len(old_texts),
          "balance_tail": {"steps": tail_steps, "replay_per_batch": tail_num_old},
          "pseudo_queries": plan.pseudo_summary}
  return tuned.params, tuned.frozen, info


def replay_sample(old_texts: list, need: int, seed: int) -> list:
  """The old texts a fine-tune replays (the batches walk them in seeded epochs): all of them when
  the steps show at least as many rows, else a seeded uniform sample of ``need``."""
  if len(old_texts) <= need:
    return list(old_texts)
  pick = np.random.default_rng([seed, 7]).choice(len(old_texts), need, replace=False)
  return [old_texts[i] for i in np.sort(pick)]


def _build_added_version(plan: _AddPlan, version: _Version, opts: _AddOptions, progress: bool,
                         log: Callable[[str], None]) -> dict:
  """Writes ``versions/<n>/`` of an add (not yet the run's); returns the summary."""
  model_dir, new_version = plan.model_dir, plan.new_version
  t1 = time.perf_counter()
  if version.primary:
    with version.part("index") as d:
      plan.new_index.save(d / "index")
    with version.part("corpus") as d:
      _write_corpus(d / "corpus", plan.loaded.corpus, plan.new_corpus, new_version, set(), "add",
                    os.fspath(plan.corpus_dir), with_media=plan.with_media)
  plan.stages["index_and_corpus"] = time.perf_counter() - t1
  t1 = time.perf_counter()
  params, frozen, ft_info = _fine_tune_added(plan, opts, progress, log)
  grew = plan.stages.pop("vocab_grew_by")
  plan.stages["fine_tune"] = time.perf_counter() - t1
  t1 = time.perf_counter()
  step = plan.loaded.step + plan.steps
  _save_checkpoint(version.build / "checkpoints", step, params, frozen,
                   {"index_version": new_version, "base_step": plan.loaded.step,
                    "added": plan.added})
  rerank_note = None
  if version.primary:
    reranker, rerank_note = _reranker_for(model_dir, plan.index.item_ids, plan.new_index.item_ids,
                                          add_rows=plan.emb, log=log)
    if reranker is not None:
      from cart_jax.inference import rerank  # pylint: disable=g-import-not-at-top
      with version.part(rerank.SUBDIR) as d:
        rerank.save(reranker, d)
  plan.stages["save"] = time.perf_counter() - t1
  summary = {
      "action": "add", "model_dir": os.fspath(model_dir), "version": new_version,
      "previous_version": new_version - 1, "added": plan.added,
      "num_items": plan.new_index.n_items,
      "removed_total": len(plan.new_index.removed_item_ids), "corpus": os.fspath(plan.corpus_dir),
      "embeddings": str(Path(plan.embeddings).absolute()), "step": step,
      "base_step": plan.loaded.step, "level_sizes": list(plan.new_index.vocab.level_sizes),
      "output_vocab_size": plan.new_config.output_vocab_size, "vocab_grew_by": grew,
      "fine_tune": ft_info, "rerank": rerank_note,
      "new_item_prior": {"mode": opts.new_item_prior, "log_prior": plan.prior},
      "index_dir": os.fspath(model_dir / _version_rel(new_version, "index")),
      "checkpoint_dir": os.fspath(model_dir / _version_rel(new_version, "checkpoints")),
      "corpus_dir": os.fspath(model_dir / _version_rel(new_version, "corpus")),
  }
  version.write_json(UPDATE_FILE, _without_history(summary))
  return summary


def _without_history(summary: dict) -> dict:
  out = dict(summary)
  if out.get("fine_tune"):
    out["fine_tune"] = {k: v for k, v in out["fine_tune"].items() if k != "history"}
  return out


def _save_checkpoint(directory: Path, step: int, params, frozen, meta: dict) -> None:
  import jax  # pylint: disable=g-import-not-at-top

  from cart_jax.core.checkpointing import Checkpointer  # pylint: disable=g-import-not-at-top
  # Grown numpy leaves (steps=0) become arrays like the rest: replicated on every device of every
  # process (the save is collective; every process holds the same values).
  everywhere = jax.sharding.NamedSharding(jax.sharding.Mesh(np.asarray(jax.devices()), ("all",)),
                                          jax.sharding.PartitionSpec())
  params = jax.tree.map(lambda x: x if isinstance(x, jax.Array) else jax.device_put(x, everywhere),
                        params)
  ckpt = Checkpointer(directory, keep=1)
  try:
    ckpt.save(step, {"params": params, "frozen": frozen}, dict(meta, time=time.time()))
  finally:
    ckpt.close()


# --------------------------------------------------------------------------- remove


def read_remove_ids(ids: str | os.PathLike | Sequence[str], index, model_dir: Path) -> list[str]:
  """The ids to remove, each an item of the run's index (errors name the file and line)."""
  from cart_jax.data.corpus import check_item_id, read_id_lines  # pylint: disable=g-import-not-at-top
  if isinstance(ids, (str, os.PathLike)):
    path = Path(ids)
    entries = [(f"{path}:{i}", check_item_id(item, f"{path}:{i}", IndexUpdateError))
               for i, item in read_id_lines(path, IndexUpdateError, what="ids to remove")]
    if not entries:
      raise IndexUpdateError(f"{path}: no item ids")
  else:
    entries = [(f"id #{i + 1}", check_item_id(item, f"id #{i + 1}", IndexUpdateError))
               for i, item in enumerate(ids)]
    if not entries:
      raise IndexUpdateError("no item ids to remove")
  live = set(index.item_ids)
  removed = set(index.removed_item_ids)
  seen: dict[str, str] = {}
  for where, item in entries:
    if item in seen:
      raise IndexUpdateError(f"{where}: {item!r} is listed twice (first at {seen[item]})")
    seen[item] = where
    if item not in live:
      what = "was already removed" if item in removed else "is not an item"
      raise IndexUpdateError(f"{where}: {item!r} {what} of the run {model_dir}'s index")
  if len(seen) >= index.n_items:
    raise IndexUpdateError(f"removing all {index.n_items} items of {model_dir} would leave an empty "
                           "index")
  return [item for _, item in entries]


def remove_items(model_dir: str | os.PathLike, ids: str | os.PathLike | Sequence[str], *,
                 keep_versions: int = DEFAULT_KEEP_VERSIONS, verify: bool = True,
                 log: Callable[[str], None] = print,
                 _before_switch: Callable[[Path], None] | None = None) -> dict:
  """Removes items from a trained run (``cart index remove``; module docstring). No training.

  Args:
    model_dir: a MODEL_DIR.
    ids: a file of item ids (one per line, the one id rule) or a sequence of ids; each must be an
      item of the run's index.
    keep_versions, verify, _before_switch: as :func:`add_items`.

  Returns:
    The summary (also ``versions/<n>/update.json``): ``version``, ``removed``, ``num_items``,
    ``removed_total``, ``rerank``, the version's directories, ``seconds``.

  Raises:
    CartError naming the input (an unknown or repeated id, all items, a run without an index, a
    locked MODEL_DIR); nothing is changed then.
  """
  from cart_jax import partitioning  # pylint: disable=g-import-not-at-top
  from cart_jax.core import paths  # pylint: disable=g-import-not-at-top
  from cart_jax.runs.layout import CHECKPOINT_SUBDIR, run_subdir  # pylint: disable=g-import-not-at-top
  from cart_jax.runs.restore import load_run  # pylint: disable=g-import-not-at-top
  from cart_jax.train import trainer  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  _check_keep(keep_versions)
  trainer.maybe_initialize_distributed()
  if not partitioning.is_primary():
    log = lambda line: None  # noqa: E731
  model_dir = paths.absolute(model_dir)
  _check_run_dir(model_dir)
  with _writer_lock(model_dir):
    loaded = load_run(model_dir, verify=verify)
    run, index = loaded.run, loaded.index
    gone = read_remove_ids(ids, index, model_dir)
    new_index = index.remove(gone)
    new_version = int(run.get("index_version", 1)) + 1
    ckpt_src = run_subdir(model_dir, run, "checkpoint_dir", CHECKPOINT_SUBDIR) / str(loaded.step)
    gone_set = set(gone)
    keep_rows = np.asarray([i not in gone_set for i in index.item_ids], bool)
    version = _Version(model_dir, new_version)
    with_media = not (paths.is_remote(model_dir) or paths.is_remote(run["corpus_dir"]))
    try:
      version.start()
      link = rerank_note = None
      if version.primary:
        with version.part("index") as d:
          new_index.save(d / "index")
        with version.part("corpus") as d:
          _write_corpus(d / "corpus", loaded.corpus, None, new_version, gone_set, "remove", None,
                        with_media=with_media)
        link = _link_checkpoint(ckpt_src, version.build / "checkpoints" / str(loaded.step))
        reranker, rerank_note = _reranker_for(model_dir, index.item_ids, new_index.item_ids,
                                              keep_rows=keep_rows, log=log)
        if reranker is not None:
          from cart_jax.inference import rerank  # pylint: disable=g-import-not-at-top
          with version.part(rerank.SUBDIR) as d:
            rerank.save(reranker, d)
      summary = {
          "action": "remove", "model_dir": os.fspath(model_dir), "version": new_version,
          "previous_version": new_version - 1, "removed": len(gone),
          "num_items": new_index.n_items, "removed_total": len(new_index.removed_item_ids),
          "step": loaded.step, "checkpoint": link, "rerank": rerank_note,
          "index_dir": os.fspath(model_dir / _version_rel(new_version, "index")),
          "checkpoint_dir": os.fspath(model_dir / _version_rel(new_version, "checkpoints")),
          "corpus_dir": os.fspath(model_dir / _version_rel(new_version, "corpus")),
      }
      version.write_json(UPDATE_FILE, summary)
      version.commit()
      if _before_switch is not None and version.primary:
        _before_switch(version.final)
      _switch(model_dir, run, new_version, loaded.model_config.to_dict(),
              {"version": new_version, "action": "remove", "items": len(gone), "time": time.time()})
    except BaseException:
      version.discard()
      raise
    finally:
      _tidy_versions_dir(model_dir)
    summary["pruned_versions"] = _prune(model_dir, new_version, keep_versions)
  summary["seconds"] = time.perf_counter() - t0
  log(f"version {new_version}: removed {len(gone)} items, {new_index.n_items} left "
      f"({summary['seconds']:.1f} s)")
  return summary
