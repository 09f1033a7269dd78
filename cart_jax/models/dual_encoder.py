"""The built-in dual encoder: frozen MiniLM text tower + projection, and a trained item tower.

Both sides land in one ``embed_dim`` space, L2-normalised, so a dot product is a cosine:

* text:  ``MiniLM sentence embedding [B, 384] -> Linear -> normalise -> [B, embed_dim]``. MiniLM
  is frozen, so its sentence embeddings are computed once (``text.MiniLMTextEncoder``) and the
  module holds only the projection; ``embed_text`` takes those 384-d features.
* items: ``tower(media) -> normalise -> [B, embed_dim]`` (``towers.registry.make_tower``: image, audio or video).

Trained with symmetric InfoNCE (text->item and item->text cross entropy over the in-batch
items) with a learnable temperature: ``logits = exp(log_scale) * t . i``, ``log_scale``
initialised to ``log(1 / init_temperature)`` and clipped to ``[0, log(max_logit_scale)]``
as in CLIP.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cart_jax.core.artefacts import atomic_write_via
from cart_jax.core.errors import CartError
from cart_jax.models.towers import registry
from cart_jax.models.towers.image import ImageTowerConfig


class DualEncoderError(CartError):
  """A bad dual-encoder setting, corpus or model file (names the file or field)."""


@dataclasses.dataclass(frozen=True)
class DualEncoderConfig:
  """Attributes:
    tower: the item tower's config (``out_dim`` must equal ``embed_dim``).
    text_dim: the frozen text encoder's output size (MiniLM: 384).
    init_temperature, max_logit_scale: InfoNCE temperature init and the CLIP clip.
  """
  tower: ImageTowerConfig = ImageTowerConfig()
  text_dim: int = 384
  init_temperature: float = 0.07
  max_logit_scale: float = 100.0

  def __post_init__(self):
    if not 0 < self.init_temperature <= 1:
      raise CartError(f"init_temperature must be in (0, 1], got {self.init_temperature}")

  @property
  def embed_dim(self) -> int:
    return self.tower.out_dim

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=True)

  @classmethod
  def from_json(cls, s: str) -> "DualEncoderConfig":
    d = json.loads(s)
    d["tower"] = registry.config_from_dict(d["tower"])
    return cls(**d)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class DualEncoder(nnx.Module):
  """Text projection + item tower + learnable InfoNCE temperature."""

  def __init__(self, config: DualEncoderConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.item_tower = registry.make_tower(config.tower, rngs=rngs)
    self.text_proj = nnx.Linear(config.text_dim, config.embed_dim, rngs=rngs)
    self.log_scale = nnx.Param(jnp.asarray(math.log(1.0 / config.init_temperature), jnp.float32))

  def embed_text(self, text_features: jax.Array) -> jax.Array:
    """Frozen text-encoder features ``[B, text_dim]`` -> ``[B, embed_dim]``, unit norm."""
    return l2_normalize(self.text_proj(text_features))

  def embed_items(self, media: jax.Array, *, train: bool = False,
                  rngs: nnx.Rngs | None = None) -> jax.Array:
    """Tower input ``[B, ...]`` -> ``[B, embed_dim]``, unit norm."""
    return l2_normalize(self.item_tower(media, train=train, rngs=rngs))

  def logit_scale(self) -> jax.Array:
    return jnp.exp(jnp.clip(self.log_scale.get_value(), 0.0, math.log(self.config.max_logit_scale)))

  def __call__(self, text_features: jax.Array, media: jax.Array, *, train: bool = False,
               rngs: nnx.Rngs | None = None) -> tuple[jax.Array, dict]:
    """InfoNCE loss of a batch of aligned pairs (row i of both sides belong together)."""
    t = self.embed_text(text_features)  # [B, d]
    i = self.embed_items(media, train=train, rngs=rngs)  # [B, d]
    return info_nce(t, i, self.logit_scale())


def info_nce(text_emb: jax.Array, item_emb: jax.Array, scale: jax.Array) -> tuple[jax.Array, dict]:
  """Symmetric InfoNCE over in-batch negatives; pairs must be distinct items.

  Returns (loss, aux) with the text->item top-1 accuracy and the logit scale.
  """
  logits = scale * jnp.einsum("td,id->ti", text_emb, item_emb)  # [B, B]
  labels = jnp.arange(logits.shape[0])
  loss_t2i = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  loss_i2t = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
  acc = jnp.mean(jnp.argmax(logits, axis=-1) == labels)
  return 0.5 * (loss_t2i + loss_i2t), {"accuracy": acc, "logit_scale": scale,
                                       "loss_t2i": loss_t2i, "loss_i2t": loss_i2t}


# ------------------------------------------------------------------ the model file, embedding


def init_model(config: DualEncoderConfig, seed: int) -> DualEncoder:
  return DualEncoder(config, rngs=nnx.Rngs(params=seed))


def _flat(tree, prefix: str) -> dict[str, np.ndarray]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {prefix + jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def _unflat(template, arrays, prefix: str, source: str):
  leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
  out = []
  for path, leaf in leaves:
    key = prefix + jax.tree_util.keystr(path)
    if key not in arrays:
      raise DualEncoderError(f"{source}: missing array {key!r} (written by a different model version?)")
    arr = arrays[key]
    if tuple(arr.shape) != tuple(np.shape(leaf)):
      raise DualEncoderError(f"{source}: {key} has shape {tuple(arr.shape)}, expected {tuple(np.shape(leaf))}")
    out.append(jnp.asarray(arr, dtype=leaf.dtype if hasattr(leaf, "dtype") else None))
  return jax.tree_util.tree_unflatten(treedef, out)


def save_model(path: str | os.PathLike, model: DualEncoder) -> None:
  """Trained parameters + config in one ``.npz`` (atomic)."""
  _, params = nnx.split(model)
  arrays = {"__config__": np.asarray(model.config.to_json()), **_flat(params, "params")}
  atomic_write_via(path, lambda tmp: np.savez(tmp, **arrays))


def load_model(path: str | os.PathLike) -> DualEncoder:
  """Inverse of :func:`save_model` (raises DualEncoderError naming the file on any mismatch)."""
  path = Path(path)
  if not path.is_file():
    raise DualEncoderError(f"{path}: dual-encoder model file not found")
  from cart_jax.index.inputs import NPY_READ_ERRORS  # pylint: disable=g-import-not-at-top
  try:
    z = np.load(path, allow_pickle=False)
  except NPY_READ_ERRORS as e:
    raise DualEncoderError(f"{path}: not a readable dual-encoder model file ({e})") from None
  if not isinstance(z, np.lib.npyio.NpzFile):  # an .npy array: not a model
    raise DualEncoderError(f"{path}: not a dual-encoder model file (an array, not an .npz)")
  with z:
    arrays = dict(z)
  if "__config__" not in arrays:
    raise DualEncoderError(f"{path}: not a dual-encoder model file (no __config__)")
  config = DualEncoderConfig.from_json(str(arrays["__config__"]))
  model = nnx.eval_shape(lambda: init_model(config, 0))
  graphdef, params = nnx.split(model)
  return nnx.merge(graphdef, _unflat(params, arrays, "params", str(path)))


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
