"""The item tower on frozen pretrained features (LiT-style: the pretrained network is locked).

``cart embed --encoder efficientnet-lite0`` (or ``aisfx``, or ``pretrained``: the modality's
default) puts a pretrained network (:mod:`cart_jax.models.pretrained.encoders`) in front of the
dual encoder. Its features are computed once per item and cached
(:func:`cart_jax.models.pretrained.encoders.features_of_files`); this tower is the small
trainable head on top, trained with the text projection by the same InfoNCE loss::

  image / audio: features [B, F] -> LayerNorm -> Linear(hidden_dim) -> GELU -> Linear(out_dim)
  video:         features [B, T, F] -> per-frame LayerNorm + Linear(frame_dim) -> concat(frames,
                 frame differences) -> flatten over time -> the same MLP head

Video keeps frame order for the reason ``towers/video.py`` gives ("moving left" and "moving
right" are the same frames reversed). The tower's "media" are the features, so the registry's
``load_media`` for this config computes (or reads) them.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from cart_jax.core.errors import CartError


@dataclasses.dataclass(frozen=True)
class FeatureTowerConfig:
  """A trainable head on frozen pretrained features.

  Attributes:
    modality: the corpus's modality (image, audio or video).
    encoder: the pretrained network (a name in ``pretrained.encoders.ENCODERS``).
    feature_shape: the frozen features of one item (``(F,)``, or ``(T, F)`` for video).
    frame_dim: video: each frame's projection before flattening over time.
    hidden_dim, out_dim: the MLP head; ``out_dim`` is the embedding size.
    dropout: on the features during training (0 = off).
  """
  modality: str = "image"
  encoder: str = "efficientnet-lite0"
  feature_shape: tuple[int, ...] = (1280,)
  frame_dim: int = 128
  hidden_dim: int = 512
  out_dim: int = 256
  dropout: float = 0.0

  def __post_init__(self):
    if len(self.feature_shape) not in (1, 2) or min(self.feature_shape) < 1:
      raise CartError(f"feature_shape must be (F,) or (T, F) with positive sizes, got "
                      f"{self.feature_shape}")
    if min(self.frame_dim, self.hidden_dim, self.out_dim) < 1 or not 0 <= self.dropout < 1:
      raise CartError(f"bad FeatureTowerConfig {self}")


class FeatureTower(nnx.Module):
  """``float32 [B, *feature_shape]`` -> ``[B, out_dim]`` (see :class:`FeatureTowerConfig`)."""

  def __init__(self, config: FeatureTowerConfig, *, rngs: nnx.Rngs):
    self.config = config
    shape = config.feature_shape
    if len(shape) == 2:
      t, f = shape
      self.frame_norm = nnx.LayerNorm(f, rngs=rngs)
      self.frame_proj = nnx.Linear(f, config.frame_dim, rngs=rngs)
      flat = (2 * t - 1) * config.frame_dim
    else:
      flat = shape[0]
    self.norm = nnx.LayerNorm(flat, rngs=rngs)
    self.hidden = nnx.Linear(flat, config.hidden_dim, rngs=rngs)
    self.out = nnx.Linear(config.hidden_dim, config.out_dim, rngs=rngs)

  def __call__(self, features: jax.Array, *, train: bool = False,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    c = self.config
    x = features.astype(jnp.float32)  # [B, F] or [B, T, F]
    if train and c.dropout > 0 and rngs is not None:
      keep = jax.random.bernoulli(rngs.augment(), 1.0 - c.dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - c.dropout), 0.0)
    if x.ndim == 3:
      x = self.frame_proj(self.frame_norm(x))  # [B, T, frame_dim]
      x = jnp.concatenate([x, x[:, 1:] - x[:, :-1]], axis=1)  # [B, 2T-1, frame_dim]
    x = x.reshape(x.shape[0], -1)  # [B, flat]
    x = jax.nn.gelu(self.hidden(self.norm(x)))  # [B, hidden]
    return self.out(x)  # [B, out_dim]
