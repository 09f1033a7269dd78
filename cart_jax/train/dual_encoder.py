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

Training runs in the shared loop (:mod:`cart_jax.core.loop`: metrics pulled from the device
every ``log_every`` steps, not per step). Checkpoints go through the orbax module
(:mod:`cart_jax.core.checkpointing`): ``checkpoint_dir/<step>/`` holds ``params`` and
``opt_state`` with both configs in its meta, written atomically; the last ``keep_checkpoints`` are
kept. The trained model's export is one ``.npz`` (:func:`save_model` / :func:`load_model`), the
file ``cart embed`` writes next to the embeddings and the re-ranker reads.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cart_jax.core.artefacts import atomic_write_via
from cart_jax.models.dual_encoder import (DualEncoder, DualEncoderConfig, DualEncoderError,  # noqa: F401
                                         embed_items, embed_text_features, init_model, load_model,
                                         save_model)
from cart_jax.models.towers import registry
from cart_jax.core import loop


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
      raise DualEncoderError(f"steps must be >= 1 and batch_size >= 2, got {self.steps}, {self.batch_size}")
    bad = [k for k in self.text_kinds if k not in ("query", "caption")]
    if bad or not self.text_kinds:
      raise DualEncoderError(f"text_kinds must be a non-empty subset of ('query', 'caption'), got {self.text_kinds}")

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
    atomic_write_via(cache_path, lambda tmp: np.savez(tmp, features=feats, key=np.asarray(key)))
  return feats


def prepare_training_data(corpus, tower_config, text_encoder, kinds: Sequence[str] = ("query",),
                          cache_dir: str | os.PathLike | None = None,
                          progress: Callable[[str, int], Callable[[int], None]] | None = None) -> TrainData:
  """Reads every item's media and the frozen features of the ``train`` texts of ``kinds``.

  ``progress(description, total)`` may return a per-unit callback (a progress bar).
  """
  texts, rows = training_texts(corpus, kinds)
  if not texts:
    raise DualEncoderError(f"corpus {corpus.name!r} has no train texts of kind(s) {list(kinds)}")
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


@functools.lru_cache(maxsize=16)
def make_optimizer(config: DualTrainConfig) -> optax.GradientTransformation:
  """AdamW + warm-up/cosine schedule (cached per config, so jitted steps are reused)."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, config.learning_rate, min(config.warmup_steps, max(config.steps - 1, 1)),
      max(config.steps, 2), end_value=config.learning_rate * 0.05)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  return optax.adamw(schedule, weight_decay=config.weight_decay, mask=decay_mask)


def _checkpointer(directory: str | os.PathLike, config: DualTrainConfig):
  from cart_jax.core.checkpointing import Checkpointer  # pylint: disable=g-import-not-at-top
  return Checkpointer(directory, keep=config.keep_checkpoints, save_every=config.checkpoint_every,
                      items=("params", "opt_state"))


def checkpoint_steps(directory: str | os.PathLike) -> list[int]:
  """Steps of the checkpoints in ``directory`` (oldest first)."""
  from cart_jax.core.checkpointing import Checkpointer  # pylint: disable=g-import-not-at-top
  ckpt = Checkpointer(directory, keep=0, items=("params", "opt_state"))
  try:
    return sorted(ckpt.all_steps())
  finally:
    ckpt.close()


def _restore_checkpoint(ckpt, params, opt_state, model_config: DualEncoderConfig,
                        train_config: DualTrainConfig):
  """``(step, params, opt_state)`` of the newest checkpoint, or None; refuses other configs."""
  step = ckpt.latest_step()
  if step is None:
    return None
  _, meta = ckpt.restore({}, step)
  where = ckpt.directory / str(step)
  for key, want in (("model_config", model_config.to_json()), ("train_config", train_config.to_json())):
    found = meta.get(key, "")
    if found != want:
      raise DualEncoderError(f"{where}: checkpoint was written with a different {key} ({found}) than this "
                       "run's ({want}); use another checkpoint directory or start fresh "
                       "(cart embed --no-resume)")
  restored, _ = ckpt.restore({"params": params, "opt_state": opt_state}, step)
  return step, restored["params"], restored["opt_state"]


# ----------------------------------------------------------------------------- training


def train_dual_encoder(data: TrainData, model_config: DualEncoderConfig, config: DualTrainConfig,
                       *, checkpoint_dir: str | os.PathLike | None = None, resume: bool = True,
                       progress: Callable[[str, int], object] | None = None, log_every: int = 25,
                       log: Callable[[str], None] | None = None) -> tuple[DualEncoder, TrainResult]:
  """Trains (or resumes) the dual encoder; returns the model and the loss curve.

  ``progress(description, total)`` may return an object with ``update(n)`` and
  ``set_postfix_str(s)`` (a tqdm bar); its postfix shows the metrics every ``log_every`` steps,
  when they are pulled from the device (every step's loss and accuracy land in the result).
  ``resume=False`` deletes the checkpoints already in ``checkpoint_dir``. ``log`` gets one line
  per checkpoint saved.
  """
  num_items_with_text = len(np.unique(data.text_item_rows))
  batch_size = min(config.batch_size, num_items_with_text)
  if batch_size < 2:
    raise DualEncoderError(f"only {num_items_with_text} item(s) have train texts; need at least 2")
  if data.text_features.shape[1] != model_config.text_dim:
    raise DualEncoderError(f"text features have dimension {data.text_features.shape[1]}, model expects "
                     f"{model_config.text_dim}")
  model = init_model(model_config, config.seed)
  graphdef, params = nnx.split(model)
  tx = make_optimizer(config)
  opt_state = tx.init(params)
  start = 0
  ckpt = _checkpointer(checkpoint_dir, config) if checkpoint_dir is not None else None
  try:
    if ckpt is not None and not resume:
      ckpt.delete_all()
    if ckpt is not None:
      for step in ckpt.drop_interrupted():  # killed between orbax's commit and the manifest
        if log is not None:
          log(f"dropped checkpoint step {step} of {checkpoint_dir}: its save was interrupted")
      restored = _restore_checkpoint(ckpt, params, opt_state, model_config, config)
      if restored is not None:
        start, params, opt_state = restored
      elif log is not None and any(Path(checkpoint_dir).glob("ckpt_*.npz")):
        log(f"note: {checkpoint_dir} holds ckpt_*.npz checkpoints of an older cart-jax (before orbax); "
            "they cannot be resumed, so training starts at step 0 (delete them to silence this)")

    media = jnp.asarray(data.media)  # [N, ...] on device once
    feats = jnp.asarray(data.text_features)  # [T, text_dim]
    seed = jnp.int32(config.seed)

    def one_step(step: int, state):
      params, opt_state = state
      text_idx, item_idx = batch_rows(data.text_item_rows, batch_size, config.seed, step)
      params, opt_state, loss, aux = _train_step(graphdef, tx, params, opt_state, media, feats,
                                                 text_idx, item_idx, seed, jnp.int32(step))
      return (params, opt_state), {"loss": loss, "accuracy": aux["accuracy"],
                                   "logit_scale": aux["logit_scale"]}

    bar = progress("training dual encoder", config.steps) if progress else None
    if bar is not None and start:
      bar.update(start)

    def on_step(done: int, m: dict | None) -> None:
      del done
      if bar is not None:
        bar.update(1)
        if m is not None:
          bar.set_postfix_str(f"loss {m['loss']:.3f} acc {m['accuracy']:.2f} "
                              f"scale {m['logit_scale']:.1f}")

    out = loop.run(one_step, (params, opt_state), start=start, num_steps=config.steps,
                   log_every=log_every, on_step=on_step, checkpointer=ckpt,
                   checkpoint_items=lambda st: {"params": st[0], "opt_state": st[1]},
                   checkpoint_meta={"model_config": model_config.to_json(),
                                    "train_config": config.to_json()},
                   history_every_step=True, log=log)
  finally:
    if ckpt is not None:
      ckpt.close()
  model = nnx.merge(graphdef, out.state[0])
  return model, TrainResult(steps=config.steps, start_step=start,
                            losses=[h["loss"] for h in out.history],
                            accuracies=[h["accuracy"] for h in out.history],
                            logit_scale=float(model.logit_scale()), batch_size=batch_size,
                            seconds_train=out.seconds, seconds_compile=out.compile_seconds)


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
