"""Contrastive training of the built-in dual encoder on a corpus's ``train`` texts only.

Because the MiniLM text tower is frozen, the sentence embeddings of the training texts are
computed once (and cached in the checkpoint directory); each step then runs only the item
tower, the text projection and the temperature:

  batch  = B distinct items that have training texts + one of each item's train texts
  loss   = symmetric InfoNCE over the B x B similarity matrix

Everything is a function of ``DualTrainConfig.seed``: parameter init, the item order of each
epoch (``default_rng([seed, epoch])``), the text picked per item (``default_rng([seed, 1, step])``)
and the augmentation key (``fold_in(seed, step)``), so a resumed run sees the same batches as an
uninterrupted one.

Checkpoints are ``ckpt_<step>.npz`` files (parameters and optimiser state by pytree path, step,
configs) written atomically into ``checkpoint_dir``; the last ``keep_checkpoints`` are kept.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cart_jax.models.dual_encoder import DualEncoder, DualEncoderConfig
from cart_jax.models.towers import registry


@dataclasses.dataclass(frozen=True)
class DualTrainConfig:
  """Attributes:
    steps: optimiser steps.
    batch_size: distinct items (and texts) per step; the in-batch negatives.
    learning_rate, warmup_steps, weight_decay: AdamW with linear warm-up then cosine decay
      (weight decay on matrices/kernels only).
    seed: init, batch order, text choice and augmentation.
    text_kinds: which ``train`` texts to learn from (``query``, ``caption``).
    checkpoint_every: steps between checkpoints (0 = only the final one).
    keep_checkpoints: how many checkpoint files to keep.
  """
  steps: int = 600
  batch_size: int = 256
  learning_rate: float = 2e-3
  warmup_steps: int = 50
  weight_decay: float = 1e-4
  seed: int = 0
  text_kinds: tuple[str, ...] = ("query",)
  checkpoint_every: int = 200
  keep_checkpoints: int = 2

  def __post_init__(self):
    if self.steps < 1 or self.batch_size < 2:
      raise ValueError(f"steps must be >= 1 and batch_size >= 2, got {self.steps}, {self.batch_size}")
    bad = [k for k in self.text_kinds if k not in ("query", "caption")]
    if bad or not self.text_kinds:
      raise ValueError(f"text_kinds must be a non-empty subset of ('query', 'caption'), got {self.text_kinds}")

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=True)


@dataclasses.dataclass
class TrainData:
  """What training reads: media of every corpus item, features of the train texts."""
  media: np.ndarray  # [N, ...] tower input of item row i
  text_features: np.ndarray  # float32 [T, text_dim]
  text_item_rows: np.ndarray  # int32 [T] item row of each text
  seconds_media: float = 0.0
  seconds_text: float = 0.0


@dataclasses.dataclass
class TrainResult:
  steps: int
  start_step: int
  losses: list[float]
  accuracies: list[float]
  logit_scale: float
  batch_size: int
  seconds_train: float
  seconds_compile: float


# ----------------------------------------------------------------------------- data


def training_texts(corpus, kinds: Sequence[str]) -> tuple[list[str], np.ndarray]:
  """``train`` texts of the given kinds and their item rows (never ``val``/``test``)."""
  texts, rows = [], []
  for kind in kinds:
    t, r = corpus.pairs("train", kind)
    texts += t
    rows.append(r)
  return texts, (np.concatenate(rows) if rows else np.zeros((0,), np.int32)).astype(np.int32)


def _features_key(texts: Sequence[str], encoder_id: str) -> str:
  h = hashlib.sha256(encoder_id.encode())
  for t in texts:
    h.update(t.encode("utf-8") + b"\x00")
  return h.hexdigest()


def text_features(texts: Sequence[str], text_encoder, cache_path: str | os.PathLike | None = None,
                  progress: Callable[[int], None] | None = None) -> np.ndarray:
  """Frozen text-tower features of ``texts``; reused from ``cache_path`` when the texts match."""
  key = _features_key(texts, getattr(text_encoder, "cache_id", type(text_encoder).__name__))
  if cache_path is not None and Path(cache_path).is_file():
    with np.load(cache_path, allow_pickle=False) as z:
      if "key" in z and str(z["key"]) == key and z["features"].shape[0] == len(texts):
        if progress is not None:
          progress(len(texts))
        return np.asarray(z["features"], np.float32)
  feats = np.asarray(text_encoder.encode(texts, progress=progress), np.float32)
  if cache_path is not None:
    _atomic_savez(cache_path, features=feats, key=np.asarray(key))
  return feats


def prepare_training_data(corpus, tower_config, text_encoder, kinds: Sequence[str] = ("query",),
                          cache_dir: str | os.PathLike | None = None,
                          progress: Callable[[str, int], Callable[[int], None]] | None = None) -> TrainData:
  """Reads every item's media and the frozen features of the ``train`` texts of ``kinds``.

  ``progress(description, total)`` may return a per-unit callback (a progress bar).
  """
  texts, rows = training_texts(corpus, kinds)
  if not texts:
    raise ValueError(f"corpus {corpus.name!r} has no train texts of kind(s) {list(kinds)}")
  t0 = time.perf_counter()
  paths = [corpus.media_path(it) for it in corpus.items]
  media = registry.load_media(paths, tower_config,
                            progress("reading media", len(paths)) if progress else None)
  t1 = time.perf_counter()
  cache = Path(cache_dir) / "text_features.npz" if cache_dir is not None else None
  feats = text_features(texts, text_encoder, cache,
                        progress("encoding train texts", len(texts)) if progress else None)
  t2 = time.perf_counter()
  return TrainData(media, feats, rows, seconds_media=t1 - t0, seconds_text=t2 - t1)


def batch_rows(data_item_rows: np.ndarray, batch_size: int, seed: int, step: int
               ) -> tuple[np.ndarray, np.ndarray]:
  """(text indices [B], item rows [B]) of ``step``: B distinct items, one train text each."""
  order = np.argsort(data_item_rows, kind="stable")  # texts grouped by item
  items, starts, counts = np.unique(data_item_rows[order], return_index=True, return_counts=True)
  per_epoch = len(items) // batch_size
  epoch, pos = divmod(step, per_epoch)
  perm = np.random.default_rng([seed, 0, epoch]).permutation(len(items))
  chosen = perm[pos * batch_size:(pos + 1) * batch_size]  # [B] indices into items
  pick = np.random.default_rng([seed, 1, step]).integers(0, counts[chosen])  # [B]
  text_idx = order[starts[chosen] + pick]  # [B]
  return text_idx.astype(np.int32), items[chosen].astype(np.int32)


# ----------------------------------------------------------------------------- model state


def init_model(config: DualEncoderConfig, seed: int) -> DualEncoder:
  return DualEncoder(config, rngs=nnx.Rngs(params=seed))


@functools.lru_cache(maxsize=16)
def make_optimizer(config: DualTrainConfig) -> optax.GradientTransformation:
  """AdamW + warm-up/cosine schedule (cached per config, so jitted steps are reused)."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, config.learning_rate, min(config.warmup_steps, max(config.steps - 1, 1)),
      max(config.steps, 2), end_value=config.learning_rate * 0.05)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  return optax.adamw(schedule, weight_decay=config.weight_decay, mask=decay_mask)


def _flat(tree, prefix: str) -> dict[str, np.ndarray]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {prefix + jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def _unflat(template, arrays, prefix: str, source: str):
  leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
  out = []
  for path, leaf in leaves:
    key = prefix + jax.tree_util.keystr(path)
    if key not in arrays:
      raise ValueError(f"{source}: missing array {key!r} (written by a different model version?)")
    arr = arrays[key]
    if tuple(arr.shape) != tuple(np.shape(leaf)):
      raise ValueError(f"{source}: {key} has shape {tuple(arr.shape)}, expected {tuple(np.shape(leaf))}")
    out.append(jnp.asarray(arr, dtype=leaf.dtype if hasattr(leaf, "dtype") else None))
  return jax.tree_util.tree_unflatten(treedef, out)


def _atomic_savez(path: str | os.PathLike, **arrays) -> None:
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=".npz", dir=path.parent)
  os.close(fd)
  try:
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def save_model(path: str | os.PathLike, model: DualEncoder) -> None:
  """Trained parameters + config in one ``.npz`` (atomic)."""
  _, params = nnx.split(model)
  _atomic_savez(path, __config__=np.asarray(model.config.to_json()), **_flat(params, "params"))


def load_model(path: str | os.PathLike) -> DualEncoder:
  """Inverse of :func:`save_model` (raises ValueError naming the file on any mismatch)."""
  path = Path(path)
  if not path.is_file():
    raise ValueError(f"{path}: dual-encoder model file not found")
  with np.load(path, allow_pickle=False) as z:
    arrays = dict(z)
  if "__config__" not in arrays:
    raise ValueError(f"{path}: not a dual-encoder model file (no __config__)")
  config = DualEncoderConfig.from_json(str(arrays["__config__"]))
  model = nnx.eval_shape(lambda: init_model(config, 0))
  graphdef, params = nnx.split(model)
  return nnx.merge(graphdef, _unflat(params, arrays, "params", str(path)))


def checkpoint_steps(directory: str | os.PathLike) -> list[int]:
  steps = []
  for p in glob.glob(os.path.join(directory, "ckpt_*.npz")):
    m = re.fullmatch(r"ckpt_(\d+)\.npz", os.path.basename(p))
    if m:
      steps.append(int(m.group(1)))
  return sorted(steps)


def _save_checkpoint(directory, step, params, opt_state, model_config, train_config, keep):
  _atomic_savez(os.path.join(directory, f"ckpt_{step:08d}.npz"),
                __step__=np.asarray(step), __config__=np.asarray(model_config.to_json()),
                __train_config__=np.asarray(train_config.to_json()),
                **_flat(params, "params"), **_flat(opt_state, "opt"))
  for old in checkpoint_steps(directory)[:-keep]:
    os.unlink(os.path.join(directory, f"ckpt_{old:08d}.npz"))


def _restore_checkpoint(directory, params, opt_state, model_config, train_config):
  steps = checkpoint_steps(directory)
  if not steps:
    return None
  path = os.path.join(directory, f"ckpt_{steps[-1]:08d}.npz")
  with np.load(path, allow_pickle=False) as z:
    arrays = dict(z)
  for key, want in (("__config__", model_config.to_json()), ("__train_config__", train_config.to_json())):
    found = str(arrays.get(key, ""))
    if found != want:
      raise ValueError(f"{path}: checkpoint was written with a different {key.strip('_')} "
                       f"({found}) than this run's ({want}); use another checkpoint directory "
                       "or start fresh (cart embed --no-resume)")
  return (int(arrays["__step__"]), _unflat(params, arrays, "params", path),
          _unflat(opt_state, arrays, "opt", path))


# ----------------------------------------------------------------------------- training


def train_dual_encoder(data: TrainData, model_config: DualEncoderConfig, config: DualTrainConfig,
                       *, checkpoint_dir: str | os.PathLike | None = None, resume: bool = True,
                       progress: Callable[[str, int], object] | None = None
                       ) -> tuple[DualEncoder, TrainResult]:
  """Trains (or resumes) the dual encoder; returns the model and the loss curve.

  ``progress(description, total)`` may return an object with ``update(n)`` and
  ``set_postfix_str(s)`` (a tqdm bar).
  """
  num_items_with_text = len(np.unique(data.text_item_rows))
  batch_size = min(config.batch_size, num_items_with_text)
  if batch_size < 2:
    raise ValueError(f"only {num_items_with_text} item(s) have train texts; need at least 2")
  if data.text_features.shape[1] != model_config.text_dim:
    raise ValueError(f"text features have dimension {data.text_features.shape[1]}, model expects "
                     f"{model_config.text_dim}")
  model = init_model(model_config, config.seed)
  graphdef, params = nnx.split(model)
  tx = make_optimizer(config)
  opt_state = tx.init(params)
  start = 0
  if checkpoint_dir is not None and resume:
    restored = _restore_checkpoint(checkpoint_dir, params, opt_state, model_config, config)
    if restored is not None:
      start, params, opt_state = restored

  media = jnp.asarray(data.media)  # [N, ...] on device once
  feats = jnp.asarray(data.text_features)  # [T, text_dim]
  seed = jnp.int32(config.seed)

  losses, accs = [], []
  bar = progress("training dual encoder", config.steps) if progress else None
  if bar is not None and start:
    bar.update(start)
  compile_s, t0 = 0.0, time.perf_counter()
  for step in range(start, config.steps):
    text_idx, item_idx = batch_rows(data.text_item_rows, batch_size, config.seed, step)
    ts = time.perf_counter()
    params, opt_state, loss, aux = _train_step(graphdef, tx, params, opt_state, media, feats,
                                               text_idx, item_idx, seed, jnp.int32(step))
    losses.append(float(loss))
    accs.append(float(aux["accuracy"]))
    if step == start:
      compile_s = time.perf_counter() - ts
    if bar is not None:
      bar.update(1)
      bar.set_postfix_str(f"loss {losses[-1]:.3f} acc {accs[-1]:.2f} "
                          f"scale {float(aux['logit_scale']):.1f}")
    done = step + 1
    if checkpoint_dir is not None and (done == config.steps or
                                       (config.checkpoint_every and done % config.checkpoint_every == 0)):
      _save_checkpoint(checkpoint_dir, done, params, opt_state, model_config, config,
                       config.keep_checkpoints)
  seconds = time.perf_counter() - t0
  model = nnx.merge(graphdef, params)
  return model, TrainResult(steps=config.steps, start_step=start, losses=losses, accuracies=accs,
                            logit_scale=float(model.logit_scale()), batch_size=batch_size,
                            seconds_train=seconds, seconds_compile=compile_s)


@functools.partial(jax.jit, static_argnames=("graphdef", "tx"))
def _train_step(graphdef, tx, params, opt_state, media, feats, text_idx, item_idx, seed, step):
  """One AdamW step on the InfoNCE loss of the pairs (feats[text_idx[b]], media[item_idx[b]])."""
  def loss_fn(p):
    m = nnx.merge(graphdef, p)
    rngs = nnx.Rngs(augment=jax.random.fold_in(jax.random.key(seed), step))
    return m(feats[text_idx], media[item_idx], train=True, rngs=rngs)  # [B, ...] rows aligned
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss, aux


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _embed_items(graphdef, params, x):
  return nnx.merge(graphdef, params).embed_items(x)  # [B, d]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _embed_text(graphdef, params, x):
  return nnx.merge(graphdef, params).embed_text(x)  # [B, d]


def embed_items(model: DualEncoder, media: np.ndarray, batch_size: int = 256,
                progress: Callable[[int], None] | None = None) -> np.ndarray:
  """Unit-norm item embeddings ``float32 [N, embed_dim]`` in row order (fixed batch shape)."""
  graphdef, params = nnx.split(model)
  n = media.shape[0]
  bs = min(batch_size, n)
  out = np.zeros((n, model.config.embed_dim), np.float32)
  for s in range(0, n, bs):
    chunk = np.asarray(media[s:s + bs])
    k = chunk.shape[0]
    if k < bs:
      chunk = np.concatenate([chunk, np.zeros((bs - k,) + chunk.shape[1:], chunk.dtype)])
    out[s:s + k] = np.asarray(_embed_items(graphdef, params, chunk))[:k]
    if progress is not None:
      progress(k)
  return out


def embed_text_features(model: DualEncoder, features: np.ndarray, batch_size: int = 1024) -> np.ndarray:
  """Frozen-encoder features ``[Q, text_dim]`` -> unit-norm query embeddings ``[Q, embed_dim]``."""
  graphdef, params = nnx.split(model)
  q = features.shape[0]
  out = np.zeros((q, model.config.embed_dim), np.float32)
  bs = min(batch_size, max(q, 1))
  for s in range(0, q, bs):
    chunk = np.asarray(features[s:s + bs], np.float32)
    k = chunk.shape[0]
    if k < bs:
      chunk = np.concatenate([chunk, np.zeros((bs - k, chunk.shape[1]), np.float32)])
    out[s:s + k] = np.asarray(_embed_text(graphdef, params, chunk))[:k]
  return out
