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
import json
import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from cart_jax.core.errors import CartError
from cart_jax.models.towers import registry
from cart_jax.models.towers.image import ImageTowerConfig


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
