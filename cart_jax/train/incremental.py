"""Adding items to and removing items from a trained run, without retraining (``cart index``).

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

``versions/<n>/`` is built in a temporary sibling and renamed into place complete
(:func:`cart_jax.core.artefacts.atomic_directory`), and only then does ``run.json`` switch to it
(one atomic file replace: ``index_version``, ``index_dir``, ``checkpoint_dir``, ``rerank_dir``,
``corpus_dir`` with its ``corpus_sha256``, ``corpus_sources`` (the corpora its media link to: the
run's own and each add's), ``model_config``). A kill at any moment before that replace leaves
``run.json`` naming the previous version, whose files nothing touched: the run stays usable as it
was, and the next ``add``/``remove`` removes the dead writer's temporary directory and writes the
version again. The whole operation holds MODEL_DIR's output lock (the one ``cart train`` holds).
Version 1 is never deleted; of ``versions/<n>/``, the newest ``keep_versions`` (current included)
are kept.
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

import dataclasses
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from cart_jax.core.artefacts import atomic_directory, atomic_write_json, output_lock
from cart_jax.core.errors import CartError

VERSIONS_SUBDIR = "versions"
UPDATE_FILE = "update.json"
ADDED_MEDIA = "added-v{version}"  # under the corpus's media/ directory
DEFAULT_REPLAY_RATIO = 0.5
DEFAULT_KEEP_VERSIONS = 2
DEFAULT_BALANCE_TAIL = 0.0
MAX_STEPS_FRACTION = 0.18  # auto steps: at most this share of the run's own training steps
MIN_AUTO_STEPS = 20
EMBED_KEY = ("decoder_embedder", "embedding")  # [vocab, d_model]
OUTPUT_KEY = ("logits_dense", "kernel")        # [d_model, vocab]


class IndexUpdateError(CartError):
  """An add or remove that cannot be done (the message names the input); nothing was changed."""


# --------------------------------------------------------------------------- the decoder vocabulary


def grow_output_vocab(params: dict, old_vocab, new_vocab) -> tuple[dict, int]:
  """``params`` (a pure dict) with the decoder's token table and output projection grown to
  ``new_vocab``; returns ``(params, tokens added)``.

  Only the last level (the counter) may grow: its tokens are the last of the vocabulary, so the
  new ones are appended and no existing token moves. New rows / columns start at the mean of the
  existing counter tokens' rows / columns.
  """
  if tuple(new_vocab.level_sizes) == tuple(old_vocab.level_sizes):
    return params, 0
  old_s, new_s = old_vocab.level_sizes, new_vocab.level_sizes
  if len(old_s) != len(new_s) or old_s[:-1] != new_s[:-1] or new_s[-1] < old_s[-1]:
    raise ValueError(f"only the counter level may grow: {old_s} -> {new_s}")
  grow = new_vocab.vocab_size - old_vocab.vocab_size
  lo, hi = int(old_vocab.offsets[-1]), old_vocab.vocab_size  # the counter tokens
  out = _copy_path(params, EMBED_KEY)
  out = _copy_path(out, OUTPUT_KEY)
  emb = np.asarray(_get(params, EMBED_KEY))  # [V, d]
  ker = np.asarray(_get(params, OUTPUT_KEY))  # [d, V]
  if emb.shape[0] != hi or ker.shape[1] != hi:
    raise ValueError(f"decoder token table {emb.shape} / output projection {ker.shape} do not have "
                     f"the index's {hi} tokens")
  rows = np.repeat(emb[lo:hi].mean(axis=0, keepdims=True), grow, axis=0)  # [grow, d]
  cols = np.repeat(ker[:, lo:hi].mean(axis=1, keepdims=True), grow, axis=1)  # [d, grow]
  _get(out, EMBED_KEY[:-1])[EMBED_KEY[-1]] = np.concatenate([emb, rows]).astype(emb.dtype)
  _get(out, OUTPUT_KEY[:-1])[OUTPUT_KEY[-1]] = np.concatenate([ker, cols], axis=1).astype(ker.dtype)
  return out, grow


def _get(tree: dict, path: Sequence[str]):
  for k in path:
    tree = tree[k]
  return tree


def _copy_path(tree: dict, path: Sequence[str]) -> dict:
  """A shallow copy of ``tree`` with the dicts along ``path`` copied too (the rest shared)."""
  out = dict(tree)
  node = out
  for k in path[:-1]:
    node[k] = dict(node[k])
    node = node[k]
  return out


# --------------------------------------------------------------------------- training texts


class _Stream:
  """Examples of one pool walked in seeded per-epoch permutations (a pure function of position)."""

  def __init__(self, inputs: np.ndarray, targets: np.ndarray, seed: int, salt: int):
    self.inputs, self.targets = inputs, targets  # [n, src], [n, L]
    self.seed, self.salt = seed, salt
    self._perms: dict[int, np.ndarray] = {}

  def __len__(self) -> int:
    return int(self.inputs.shape[0])

  def rows(self, start: int, count: int) -> np.ndarray:
    n = len(self)
    out = np.empty(count, np.int64)
    for j in range(count):
      epoch, pos = divmod(start + j, n)
      if epoch not in self._perms:
        if len(self._perms) > 4:
          self._perms.clear()
        self._perms[epoch] = np.random.default_rng([self.seed, self.salt, epoch]).permutation(n)
      out[j] = self._perms[epoch][pos]
    return out


class ReplayBatches:
  """Fine-tuning batches: ``num_new`` new texts + ``batch - num_new`` replayed old texts per step.

  From step ``tail_from`` on (the balanced tail), ``tail_num_old`` of each batch are old texts
  instead: the old/new proportion of the corpus's own texts, so that the fine-tune ends without
  the head's over-representation of the new items. Deterministic by step (``batch_at(step)``
  depends only on the seed and the step), like the training pipelines.
  """

  def __init__(self, new: tuple[np.ndarray, np.ndarray], old: tuple[np.ndarray, np.ndarray] | None,
               batch_size: int, replay_ratio: float, seed: int, *, tail_from: int | None = None,
               tail_num_old: int | None = None):
    self.new = _Stream(*new, seed, 0)
    self.old = _Stream(*old, seed, 1) if old is not None and len(old[0]) else None
    self.num_old = int(round(replay_ratio * batch_size)) if self.old is not None else 0
    self.num_new = batch_size - self.num_old
    self.tail_from = tail_from
    self.tail_num_old = self.num_old if tail_num_old is None or self.old is None else tail_num_old
    if not 0 <= self.tail_num_old < batch_size:
      raise ValueError(f"tail_num_old {tail_num_old}: must be in [0, {batch_size})")

  def counts_at(self, step: int) -> tuple[int, int, int, int]:
    """(new rows, old rows, first new position, first old position) of step ``step``."""
    if self.tail_from is None or step < self.tail_from:
      return self.num_new, self.num_old, step * self.num_new, step * self.num_old
    head, t = self.tail_from, step - self.tail_from
    n_old = self.tail_num_old
    n_new = self.num_new + self.num_old - n_old
    return n_new, n_old, head * self.num_new + t * n_new, head * self.num_old + t * n_old

  def batch_at(self, step: int) -> dict[str, np.ndarray]:
    from cart_jax.train.input_pipeline import model_features  # pylint: disable=g-import-not-at-top
    n_new, n_old, at_new, at_old = self.counts_at(step)
    r = self.new.rows(at_new, n_new)
    inputs, targets = [self.new.inputs[r]], [self.new.targets[r]]
    if n_old:
      r = self.old.rows(at_old, n_old)
      inputs.append(self.old.inputs[r])
      targets.append(self.old.targets[r])
    return model_features(np.concatenate(inputs), np.concatenate(targets))

  def token_rows(self) -> np.ndarray:
    parts = [self.new.inputs] + ([self.old.inputs] if self.old is not None else [])
    return np.concatenate(parts)


def run_caption_rate(run: dict, corpus, captions_file: str | None) -> float:
  """The share of captions the run trained with (``InputConfig.caption_rate``; None: 0.5 if any)."""
  from cart_jax.data.captions import caption_texts  # pylint: disable=g-import-not-at-top
  rate = run.get("input_config", {}).get("caption_rate")
  if rate is not None:
    return float(rate)
  return 0.5 if caption_texts(corpus, captions_file) else 0.0


def new_item_texts(new_corpus, with_captions: bool) -> list:
  """The new items' training texts: ``train`` queries, and ``train`` captions when the run trained
  on captions or for items that have no training query."""
  queries = new_corpus.texts(split="train", kind="query")
  have_query = {t.item_id for t in queries}
  captions = [t for t in new_corpus.texts(split="train", kind="caption")
              if with_captions or t.item_id not in have_query]
  return queries + captions


def auto_steps(run_steps: int, batch_size: int, old_texts: int, new_texts: int,
               num_new_per_batch: int) -> int:
  """Default fine-tuning steps (module docstring): the run's passes over its texts, applied to the
  new texts, capped at :data:`MAX_STEPS_FRACTION` of the run's steps."""
  cap = max(1, int(round(MAX_STEPS_FRACTION * run_steps)))
  passes = run_steps * batch_size / max(old_texts, 1)
  want = int(math.ceil(passes * new_texts / max(num_new_per_batch, 1)))
  return int(min(max(want, min(MIN_AUTO_STEPS, cap)), cap))


# --------------------------------------------------------------------------- fine-tuning


@dataclasses.dataclass
class FineTuned:
  """What :func:`fine_tune` returns: the network's parts after training and a summary."""
  graphdef: object
  params: dict
  frozen: dict
  info: dict


def fine_tune(*, model_config, run: dict, params: dict, frozen: dict, batches: ReplayBatches,
              steps: int, learning_rate: float, seed: int, progress: bool = True,
              log: Callable[[str], None] = print) -> FineTuned:
  """Trains the decoder ``steps`` steps from ``params`` with a fresh optimizer (trainer's step)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from cart_jax.train import loop, trainer  # pylint: disable=g-import-not-at-top
  from cart_jax.train.input_pipeline import to_loss_batch  # pylint: disable=g-import-not-at-top

  fields = {f.name for f in dataclasses.fields(trainer.TrainConfig)}
  base = trainer.TrainConfig(**{k: v for k, v in run.get("train_config", {}).items() if k in fields})
  tc = dataclasses.replace(base, num_steps=steps, learning_rate=learning_rate,
                           warmup_steps=steps // 10, eval_every=0, checkpoint_every=0,
                           log_every=max(1, min(50, steps)), seed=seed, identifier_init="none")
  graphdef, want_params, want_frozen = trainer.abstract_model(model_config)
  for name, got, want in (("params", params, want_params), ("frozen", frozen, want_frozen)):
    got_s = jax.tree.map(lambda x: tuple(x.shape), got)
    want_s = jax.tree.map(lambda x: tuple(x.shape), want)
    if got_s != want_s:
      raise ValueError(f"fine-tune: the checkpoint's {name} do not fit the model config")
  mesh = trainer.make_mesh(tc)
  from cart_jax.partitioning import DATA  # pylint: disable=g-import-not-at-top
  b = batches.num_new + batches.num_old
  if b % mesh.shape[DATA]:
    raise IndexUpdateError(f"--batch-size {b} is not divisible by the {mesh.shape[DATA]} devices of "
                           "the mesh's data axis")
  replicated = jax.sharding.NamedSharding(mesh, jax.P())
  params = jax.device_put(params, replicated)
  frozen = jax.device_put(frozen, replicated)
  tx = trainer.make_optimizer(tc)
  with jax.set_mesh(mesh):
    opt_state = jax.jit(tx.init)(params)
  state = trainer.TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), replicated),
                             params=params, opt_state=opt_state)
  input_config = run.get("input_config", {})
  cache = None
  if trainer.uses_state_cache(model_config) and input_config.get("cache_encoder_states", True):
    cache = trainer.build_state_cache(graphdef, params, frozen, model_config, batches.token_rows(),
                                      root=input_config.get("state_cache_dir"), progress=progress,
                                      log=log)
  step_fn = trainer.make_train_step(graphdef, tx, tc)
  bar = loop.tqdm_bar(steps, 0, "fine-tune") if progress else None

  def one_step(step: int, state):
    host = to_loss_batch(batches.batch_at(step))
    if cache is not None:
      host["states"] = cache.lookup(host["inputs"])
    return step_fn(state, frozen, trainer.shard_batch(host, mesh))

  def on_step(done: int, m: dict | None) -> None:
    if bar is not None:
      bar.update(1)
      if m is not None:
        bar.set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m['token_accuracy']:.3f}")

  try:
    with jax.set_mesh(mesh):
      out = loop.run(one_step, state, start=0, num_steps=steps, log_every=tc.log_every,
                     on_step=on_step if bar is not None else None, log=None if bar else log)
  finally:
    if bar is not None:
      bar.close()
  info = {"steps": steps, "learning_rate": learning_rate, "warmup_steps": tc.warmup_steps,
          "batch_size": batches.num_new + batches.num_old, "new_per_batch": batches.num_new,
          "replay_per_batch": batches.num_old, "omega": tc.omega, "seconds": out.seconds,
          "compile_seconds": out.compile_seconds,
          "last_metrics": out.history[-1] if out.history else None,
          "history": out.history}
  if cache is not None:
    info["state_cache"] = {"texts": cache.num_texts, "misses": cache.misses,
                           "build_seconds": cache.meta.get("seconds")}
  return FineTuned(graphdef=graphdef, params=out.state.params, frozen=frozen, info=info)


# --------------------------------------------------------------------------- the run's versions


def _check_run_dir(model_dir: Path) -> None:
  import jax  # pylint: disable=g-import-not-at-top

  from cart_jax.inference.runs import RUN_FILE, RunError  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:  # every process would write the same version
    raise IndexUpdateError("cart index runs in one process (jax.process_count() is "
                           f"{jax.process_count()})")
  if not model_dir.is_dir():
    raise RunError(f"{model_dir}: no such directory (a MODEL_DIR written by `cart train`)")
  if not (model_dir / RUN_FILE).is_file():
    raise RunError(f"{model_dir}: not a CART model directory (no {RUN_FILE}; train one with "
                   "`cart train`)")


def _version_rel(version: int, part: str) -> str:
  return f"{VERSIONS_SUBDIR}/{version}/{part}"


def _write_corpus(out: Path, old, new, version: int, drop: set[str], action: str, source: str | None):
  """The run's corpus at a new version: ``old`` minus ``drop``, plus ``new``'s items and texts."""
  from cart_jax.data.corpus import MEDIA_DIR, MIXED, Item, is_within, write_corpus  # pylint: disable=g-import-not-at-top
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
  meta = dict(old.meta)
  history = list(meta.get("cart_index", {}).get("history", [])) if isinstance(
      meta.get("cart_index"), dict) else []
  history.append({"version": version, "action": action, "source": source,
                  "base": str(old.root)})
  meta["cart_index"] = {"version": version, "history": history}
  return write_corpus(out, old.name, modality, items, texts, media_sources=media,
                      media_mode="symlink", meta=meta, media_roots=roots)


def _link_tree(src: Path, dst: Path) -> str:
  """Copies a directory tree with hard links (a copy where linking fails); returns the mode."""
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
  from cart_jax.inference import rerank  # pylint: disable=g-import-not-at-top
  if not rerank.exists(model_dir):
    return None, "the run has no re-ranker"
  try:
    r = rerank.load(model_dir, old_ids)
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


def _switch(model_dir: Path, run: dict, version: int, model_config: dict, entry: dict) -> dict:
  """Points ``run.json`` at ``versions/<version>/`` (one atomic replace); returns the new run.

  ``rerank_dir`` always names the version's ``rerank/``: when the run has no re-ranker it is
  absent, and ``cart eval --rerank`` says how to build one (never the previous version's rows).
  """
  from cart_jax.inference.runs import CORPUS_HASHES, RUN_FILE, corpus_hashes  # pylint: disable=g-import-not-at-top
  new = dict(run)
  corpus_dir = model_dir / _version_rel(version, "corpus")
  # The corpora the user named (cart train's, then each add's): the version's corpus links to
  # their media, and `cart serve` serves media from them (engine.SearchEngine).
  sources = list(run.get("corpus_sources") or [run["corpus_dir"]])
  sources += [entry["source"]] if entry.get("source") else []
  new.update({"index_version": version, "index_dir": _version_rel(version, "index"),
              "checkpoint_dir": _version_rel(version, "checkpoints"),
              "rerank_dir": _version_rel(version, "rerank"),
              "corpus_dir": str(corpus_dir), CORPUS_HASHES: corpus_hashes(corpus_dir),
              "corpus_sources": list(dict.fromkeys(sources)),
              "model_config": model_config,
              "index_history": list(run.get("index_history", [])) + [entry]})
  atomic_write_json(model_dir / RUN_FILE, new)
  return new


def _prune(model_dir: Path, current: int, keep: int) -> list[int]:
  """Deletes ``versions/<n>/`` older than the newest ``keep`` (version 1 is never deleted)."""
  root = model_dir / VERSIONS_SUBDIR
  pruned = []
  if not root.is_dir():
    return pruned
  for p in sorted(root.iterdir()):
    if p.name.isdigit() and int(p.name) <= current - keep and p.is_dir():
      shutil.rmtree(p, ignore_errors=True)
      pruned.append(int(p.name))
  return pruned


def _discard(vdir: Path) -> None:
  """After a failure before ``run.json`` switched: the unreferenced new version goes (a kill
  leaves it, or its temporary, to the next add/remove, which replaces it)."""
  if vdir.is_dir():
    shutil.rmtree(vdir, ignore_errors=True)


def _tidy_versions_dir(model_dir: Path) -> None:
  """Removes an empty ``versions/`` left by a failed first update (the run is as it was)."""
  root = model_dir / VERSIONS_SUBDIR
  try:
    root.rmdir()
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
              balance_tail: float = DEFAULT_BALANCE_TAIL,
              keep_versions: int = DEFAULT_KEEP_VERSIONS, verify: bool = True,
              progress: bool = True, log: Callable[[str], None] = print,
              _before_switch: Callable[[Path], None] | None = None) -> dict:
  """Adds the items of ``corpus_dir`` to a trained run (``cart index add``; module docstring).

  Args:
    model_dir: a MODEL_DIR written by ``cart train`` (or changed by an earlier add/remove).
    corpus_dir: a corpus of the new items (every id new to the run), with their texts.
    embeddings: the new items' embeddings ``E.npy`` from the same item encoder as the run's index
      (its dimension), aligned by ids (``E.ids.txt``, or ``item_ids``) to the corpus's items: every
      item needs a row, no extra rows.
    steps: fine-tuning steps (None: auto, see the module docstring; 0: identifiers and trie only).
    replay_ratio: share of each batch drawn from the old items' training texts, in [0, 1).
    learning_rate: peak learning rate (None: the run's).
    batch_size: examples per step (None: the run's).
    seed: sampling and dropout seed of the fine-tune.
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
  from cart_jax.data.corpus import CorpusFormatError, ITEMS_FILE, load_corpus  # pylint: disable=g-import-not-at-top
  from cart_jax.data.embeddings import align, embedding_files, read_embeddings_with_ids  # pylint: disable=g-import-not-at-top
  from cart_jax.data.captions import caption_texts  # pylint: disable=g-import-not-at-top
  from cart_jax.index.inputs import InputError  # pylint: disable=g-import-not-at-top
  from cart_jax.inference.runs import load_run  # pylint: disable=g-import-not-at-top
  from cart_jax.models.cart.config import with_vocab  # pylint: disable=g-import-not-at-top
  from cart_jax.train.input_pipeline import encode_texts  # pylint: disable=g-import-not-at-top

  t0 = time.perf_counter()
  stages: dict[str, float] = {}
  if steps is not None and (not isinstance(steps, int) or steps < 0):
    raise IndexUpdateError(f"--steps {steps}: must be >= 0 (0: no fine-tuning)")
  if not (isinstance(replay_ratio, (int, float)) and 0.0 <= replay_ratio < 1.0):
    raise IndexUpdateError(f"--replay-ratio {replay_ratio}: must be in [0, 1) (some of every batch "
                           "must be new texts)")
  if not (isinstance(balance_tail, (int, float)) and 0.0 <= balance_tail <= 1.0):
    raise IndexUpdateError(f"--balance-tail {balance_tail}: must be in [0, 1] (a share of the steps)")
  if learning_rate is not None and not (math.isfinite(learning_rate) and learning_rate > 0):
    raise IndexUpdateError(f"--lr {learning_rate}: must be a finite number > 0")
  if batch_size is not None and batch_size < 1:
    raise IndexUpdateError(f"--batch-size {batch_size}: must be >= 1")
  _check_keep(keep_versions)
  model_dir = Path(model_dir).absolute()
  corpus_dir = Path(corpus_dir)
  _check_run_dir(model_dir)
  with output_lock(model_dir):
    loaded = load_run(model_dir, verify=verify)
    run, index, old_corpus = loaded.run, loaded.index, loaded.corpus
    version = int(run.get("index_version", 1))
    new_corpus = load_corpus(corpus_dir, check_media=True)
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
    old_config = loaded.model_config
    new_config = with_vocab(old_config, new_index.vocab)
    stages["load_and_assign"] = time.perf_counter() - t0

    # Training texts and the steps.
    rate = run_caption_rate(run, old_corpus, run.get("captions_file"))
    new_texts = new_item_texts(new_corpus, with_captions=rate > 0)
    old_texts = list(old_corpus.texts(split="train", kind="query"))
    if rate > 0:
      old_texts += caption_texts(old_corpus, run.get("captions_file"))
    b = int(batch_size or run.get("input_config", {}).get("batch_size", 64))
    num_old = int(round(replay_ratio * b)) if old_texts else 0
    if num_old >= b:
      raise IndexUpdateError(f"--replay-ratio {replay_ratio} with --batch-size {b} leaves no new "
                             "text in a batch")
    run_steps = int(run.get("train_config", {}).get("num_steps", 1000))
    if steps is None:
      steps = auto_steps(run_steps, b, len(old_texts), len(new_texts), b - num_old)
    if steps > 0 and not new_texts:
      raise CorpusFormatError(f"{corpus_dir}: the new items have no train queries or captions to "
                              "fine-tune on; add them with --steps 0 (identifiers only) or give "
                              "them training texts")
    lr = float(learning_rate or run.get("train_config", {}).get("learning_rate", 1e-3))
    new_version = version + 1
    vdir = model_dir / VERSIONS_SUBDIR / str(new_version)
    log(f"adding {len(new_corpus.items)} items to {model_dir} (version {version} -> {new_version}); "
        f"counter level {index.vocab.level_sizes[-1]} -> {new_index.vocab.level_sizes[-1]} codes; "
        f"fine-tuning {steps} steps on {len(new_texts)} new texts"
        + (f" + replayed old texts ({num_old} of {b} per batch)" if steps and num_old else ""))
    try:
      with atomic_directory(vdir) as tmp:
        t1 = time.perf_counter()
        new_index.save(tmp / "index")
        _write_corpus(tmp / "corpus", old_corpus, new_corpus, new_version, set(), "add",
                      str(corpus_dir.absolute()))
        stages["index_and_corpus"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        params, grew = grow_output_vocab(loaded.params, index.vocab, new_index.vocab)
        ft_info = None
        frozen = loaded.frozen
        if steps > 0:
          input_length = loaded.input_length
          tokens = new_index.vocab.codes_to_tokens(new_index.codes)  # [N, L]
          row_of = new_index.row_of()

          def encoded(texts):
            return (encode_texts([t.text for t in texts], input_length),
                    tokens[np.asarray([row_of[t.item_id] for t in texts], np.int64)])

          tail_steps = int(round(balance_tail * steps)) if num_old else 0
          share_old = len(old_texts) / (len(old_texts) + len(new_texts))
          tail_num_old = min(b - 1, max(num_old, int(round(share_old * b))))
          need = (steps - tail_steps) * num_old + tail_steps * tail_num_old
          sample = old_texts
          if num_old and len(old_texts) > need:
            pick = np.random.default_rng([seed, 7]).choice(len(old_texts), need, replace=False)
            sample = [old_texts[i] for i in np.sort(pick)]
          batches = ReplayBatches(encoded(new_texts), encoded(sample) if num_old else None, b,
                                  replay_ratio, seed,
                                  tail_from=(steps - tail_steps) if tail_steps else None,
                                  tail_num_old=tail_num_old)
          tuned = fine_tune(model_config=new_config, run=run, params=params, frozen=frozen,
                            batches=batches, steps=steps, learning_rate=lr, seed=seed,
                            progress=progress, log=log)
          params, frozen = tuned.params, tuned.frozen
          ft_info = {**tuned.info, "new_texts": len(new_texts), "replay_texts": len(sample) if num_old else 0,
                     "replay_ratio": replay_ratio, "old_texts": len(old_texts),
                     "balance_tail": {"steps": tail_steps, "replay_per_batch": tail_num_old}}
        stages["fine_tune"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        step = loaded.step + steps
        _save_checkpoint(tmp / "checkpoints", step, params, frozen,
                         {"index_version": new_version, "base_step": loaded.step, "added": len(new_codes)})
        reranker, rerank_note = _reranker_for(model_dir, index.item_ids, new_index.item_ids,
                                              add_rows=emb, log=log)
        if reranker is not None:
          from cart_jax.inference import rerank  # pylint: disable=g-import-not-at-top
          rerank.save(reranker, tmp)
        stages["save"] = time.perf_counter() - t1
        summary = {
            "action": "add", "model_dir": str(model_dir), "version": new_version,
            "previous_version": version, "added": len(new_codes), "num_items": new_index.n_items,
            "removed_total": len(new_index.removed_item_ids), "corpus": str(corpus_dir.absolute()),
            "embeddings": str(Path(embeddings).absolute()), "step": step, "base_step": loaded.step,
            "level_sizes": list(new_index.vocab.level_sizes),
            "output_vocab_size": new_config.output_vocab_size, "vocab_grew_by": grew,
            "fine_tune": ft_info, "rerank": rerank_note,
            "index_dir": str(model_dir / _version_rel(new_version, "index")),
            "checkpoint_dir": str(model_dir / _version_rel(new_version, "checkpoints")),
            "corpus_dir": str(model_dir / _version_rel(new_version, "corpus")),
        }
        atomic_write_json(tmp / UPDATE_FILE, _without_history(summary))
      if _before_switch is not None:
        _before_switch(vdir)
      t1 = time.perf_counter()
      _switch(model_dir, run, new_version, new_config.to_dict(),
              {"version": new_version, "action": "add", "items": len(new_codes),
               "source": str(corpus_dir.absolute()), "time": time.time()})
    except BaseException:
      _discard(vdir)
      raise
    finally:
      _tidy_versions_dir(model_dir)
    summary["pruned_versions"] = _prune(model_dir, new_version, keep_versions)
    stages["switch"] = time.perf_counter() - t1
  summary["seconds"] = time.perf_counter() - t0
  summary["stage_seconds"] = stages
  log(f"version {new_version}: {summary['num_items']} items, step {step}"
      + (f", fine-tune loss {ft_info['last_metrics']['loss']:.3f}"
         if ft_info and ft_info.get("last_metrics") else "")
      + f" ({summary['seconds']:.1f} s)")
  return summary


def _without_history(summary: dict) -> dict:
  out = dict(summary)
  if out.get("fine_tune"):
    out["fine_tune"] = {k: v for k, v in out["fine_tune"].items() if k != "history"}
  return out


def _save_checkpoint(directory: Path, step: int, params, frozen, meta: dict) -> None:
  import jax  # pylint: disable=g-import-not-at-top

  from cart_jax.train.checkpointing import Checkpointer  # pylint: disable=g-import-not-at-top
  ckpt = Checkpointer(directory, keep=1)
  try:  # grown numpy leaves (steps=0) become arrays like the rest
    ckpt.save(step, {"params": jax.device_put(params), "frozen": frozen}, dict(meta, time=time.time()))
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
  from cart_jax.inference.runs import load_run  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  _check_keep(keep_versions)
  model_dir = Path(model_dir).absolute()
  _check_run_dir(model_dir)
  with output_lock(model_dir):
    loaded = load_run(model_dir, verify=verify)
    run, index = loaded.run, loaded.index
    gone = read_remove_ids(ids, index, model_dir)
    new_index = index.remove(gone)
    version = int(run.get("index_version", 1))
    new_version = version + 1
    vdir = model_dir / VERSIONS_SUBDIR / str(new_version)
    from cart_jax.inference.runs import CHECKPOINT_SUBDIR, run_subdir  # pylint: disable=g-import-not-at-top
    ckpt_src = run_subdir(model_dir, run, "checkpoint_dir", CHECKPOINT_SUBDIR) / str(loaded.step)
    gone_set = set(gone)
    keep_rows = np.asarray([i not in gone_set for i in index.item_ids], bool)
    try:
      with atomic_directory(vdir) as tmp:
        new_index.save(tmp / "index")
        _write_corpus(tmp / "corpus", loaded.corpus, None, new_version, gone_set, "remove", None)
        (tmp / "checkpoints").mkdir()
        link = _link_tree(ckpt_src, tmp / "checkpoints" / str(loaded.step))
        reranker, rerank_note = _reranker_for(model_dir, index.item_ids, new_index.item_ids,
                                              keep_rows=keep_rows, log=log)
        if reranker is not None:
          from cart_jax.inference import rerank  # pylint: disable=g-import-not-at-top
          rerank.save(reranker, tmp)
        summary = {
            "action": "remove", "model_dir": str(model_dir), "version": new_version,
            "previous_version": version, "removed": len(gone), "num_items": new_index.n_items,
            "removed_total": len(new_index.removed_item_ids), "step": loaded.step,
            "checkpoint": link, "rerank": rerank_note,
            "index_dir": str(model_dir / _version_rel(new_version, "index")),
            "checkpoint_dir": str(model_dir / _version_rel(new_version, "checkpoints")),
            "corpus_dir": str(model_dir / _version_rel(new_version, "corpus")),
        }
        atomic_write_json(tmp / UPDATE_FILE, summary)
      if _before_switch is not None:
        _before_switch(vdir)
      _switch(model_dir, run, new_version, loaded.model_config.to_dict(),
              {"version": new_version, "action": "remove", "items": len(gone), "time": time.time()})
    except BaseException:
      _discard(vdir)
      raise
    finally:
      _tidy_versions_dir(model_dir)
    summary["pruned_versions"] = _prune(model_dir, new_version, keep_versions)
  summary["seconds"] = time.perf_counter() - t0
  log(f"version {new_version}: removed {len(gone)} items, {new_index.n_items} left "
      f"({summary['seconds']:.1f} s)")
  return summary
