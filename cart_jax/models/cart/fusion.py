"""CART's coarse-to-fine fusion of ALL encoder layers into the decoder.

Given the encoder's layer outputs ``E_1..E_S`` (each ``[batch, src, d]``):

* **coarse**: ``Z = W [E_1; ...; E_S] + b`` (features concatenated, projected once
  per query by :class:`CoarseProjection`); each decoder layer cross-attends to
  ``Z`` and gates the result with a self-gated sigmoid ``c * sigmoid(W_g c)``.
* **fine**: each decoder layer cross-attends to every ``E_i`` separately (an
  "expert" per encoder layer, with its own key/value projections and a shared
  query/output projection) and mixes the S results with learnable weights
  ``alpha_i`` (``softmax`` over layers, or an independent ``sigmoid`` each).
  By default (``fine_shared_kv``) the experts' key/value projections are shared by
  all decoder layers (:class:`FineKeyValue`, computed once per query); each decoder
  layer keeps its own query/output projections and ``alpha``. Per-decoder-layer
  expert K/V would cost ``num_decoder_layers x S`` projections: 170 M of ``base``'s
  parameters and 4x its per-query precompute FLOPs.
  Because the output projection is linear, mixing happens before it:
  ``O(sum_i alpha_i attn_i) = sum_i alpha_i O(attn_i)``.
* the coarse and fine outputs are added; the decoder layer adds the sum to its
  residual stream, which feeds the next layer.
* ``none``: standard T5 cross-attention to the last encoder layer ``E_S``.

Encoder-side keys/values depend only on the query, so :meth:`FusedCrossAttention.precompute`
computes them ONCE per query (at encode time); the per-step call only projects
the decoder queries. Keys/values have no beam axis (the beams fold into the rows of the
query side of :func:`~cart_jax.models.cart.layers.shared_kv_attention`, never tiled) and are stored
heads-major, ``[b, heads, src, kv]`` (fine: ``[b, heads, S * src, kv]``, the S experts side by
side), the layout the per-step matmuls read without a transpose. Diagnostics (``alpha``) are
returned, not printed.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from cart_jax.models.cart.config import ModelConfig
from cart_jax.models.cart.layers import (Dense, MultiHeadAttention, const_param, fan_in_std, heads_major,
                                   normal_param, shared_kv_attention)
from cart_jax.partitioning import with_logical_constraint


class CoarseProjection(nnx.Module):
  """``Z = W [E_1; ...; E_S] + b``: all encoder layers concatenated on features, projected to d."""

  def __init__(self, num_layers: int, width: int, d_model: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.proj = Dense((num_layers * width,), (d_model,), ("fused_embed", "embed"), use_bias=True,
                      dtype=dtype, rngs=rngs)

  def __call__(self, layers: jax.Array) -> jax.Array:
    """``layers [batch, S, src, width]`` -> ``Z [batch, src, d_model]``."""
    b, s_layers, src, width = layers.shape
    concat = jnp.transpose(layers, (0, 2, 1, 3)).reshape(b, src, s_layers * width)  # [b, src, S*w]
    return self.proj(concat)


class FineKeyValue(nnx.Module):
  """Per-encoder-layer ("expert") key/value projections: ``E_i -> (K_i, V_i)`` for i = 1..S."""

  def __init__(self, num_layers: int, d_model: int, num_heads: int, head_dim: int, *, dtype=jnp.float32,
               rngs: nnx.Rngs):
    shape = (num_layers, d_model, num_heads, head_dim)
    axes = ("layers", "embed", "heads", "kv")
    self.key = normal_param(rngs, fan_in_std((d_model,), 1), shape, axes)
    self.value = normal_param(rngs, fan_in_std((d_model,), 1), shape, axes)
    self.dtype = dtype

  def __call__(self, layers: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``layers [b, S, src, d]`` -> keys, values heads-major ``[b, heads, S * src, kv]``.

    Position ``i * src + s`` holds expert (encoder layer) ``i``'s key/value of source token ``s``.
    """
    x = layers.astype(self.dtype)
    b, s_layers, src, _ = x.shape
    k = jnp.einsum("bLsd,Ldhk->bhLsk", x, self.key.get_value().astype(self.dtype))  # [b, h, S, src, kv]
    v = jnp.einsum("bLsd,Ldhk->bhLsk", x, self.value.get_value().astype(self.dtype))
    h, dk = k.shape[1], k.shape[-1]
    return k.reshape(b, h, s_layers * src, dk), v.reshape(b, h, s_layers * src, dk)


class FineFusion(nnx.Module):
  """Cross-attention to each encoder layer separately, mixed by learnable ``alpha``.

  Keys/values come from a :class:`FineKeyValue`: the network's single shared one
  (``config.fine_shared_kv``, default) or this layer's own (``own_kv=True``).
  """

  def __init__(self, config: ModelConfig, *, own_kv: bool = False, dtype=jnp.float32, rngs: nnx.Rngs):
    c = config
    s = c.num_fused_layers
    self.query = Dense((c.d_model,), (c.num_heads, c.head_dim), ("embed", "heads", "kv"),
                       dtype=dtype, rngs=rngs)
    self.kv = (FineKeyValue(s, c.d_model, c.num_heads, c.head_dim, dtype=dtype, rngs=rngs)
               if own_kv else None)
    self.out = Dense((c.num_heads, c.head_dim), (c.d_model,), ("heads", "kv", "embed"),
                     dtype=dtype, rngs=rngs)
    # alpha logits: zeros = uniform weights at init (1/S for softmax, 1/2 for sigmoid).
    self.alpha_logits = const_param(0.0, (s,), ("layers",))
    self.weighting = c.fine_weighting
    self.head_dim = c.head_dim
    self.dropout_rate = c.dropout_rate
    self.dtype = dtype

  def alpha(self) -> jax.Array:
    """``[S]`` mixing weights of the encoder layers."""
    logits = self.alpha_logits.get_value()
    return jax.nn.softmax(logits) if self.weighting == "softmax" else jax.nn.sigmoid(logits)

  def __call__(self, h: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array,
               rngs: nnx.Rngs | None) -> tuple[jax.Array, jax.Array]:
    """``h [b, beam, t, d]``; k/v ``[b, heads, S * src, kv]`` (:class:`FineKeyValue`);
    bias ``[b, 1, 1, 1, src]``.

    ``sum_i alpha_i attention_i`` is computed as one attention whose per-expert softmax
    probabilities are scaled by ``alpha_i`` (the same sum, one value matmul instead of S).
    """
    q = self.query(h) * (1.0 / math.sqrt(self.head_dim))  # [b, beam, t, heads, kv]
    alpha = self.alpha()  # [S]
    mixed = shared_kv_attention(q, k, v, bias, num_groups=alpha.shape[0], group_weights=alpha,
                                dropout_rate=self.dropout_rate, rngs=rngs)  # [b, beam, t, heads, kv]
    return self.out(mixed), alpha


class FusedCrossAttention(nnx.Module):
  """The cross-attention block of one decoder layer under ``config.fusion``."""

  def __init__(self, config: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    c = config
    self.fusion = c.fusion
    if c.fusion == "none":
      self.cross = MultiHeadAttention(c.d_model, c.num_heads, c.head_dim, dropout_rate=c.dropout_rate,
                                      dtype=dtype, rngs=rngs)
    if c.uses_coarse:
      self.coarse = MultiHeadAttention(c.d_model, c.num_heads, c.head_dim,
                                       dropout_rate=c.dropout_rate, dtype=dtype, rngs=rngs)
      self.coarse_gate = Dense((c.d_model,), (c.d_model,), ("embed", "embed"), dtype=dtype, rngs=rngs)
    if c.uses_fine:
      self.fine = FineFusion(c, own_kv=not c.fine_shared_kv, dtype=dtype, rngs=rngs)

  def precompute(self, layers: jax.Array, z: jax.Array | None) -> dict[str, jax.Array]:
    """Encoder-side keys/values for this decoder layer, once per query.

    Args:
      layers: ``[b, S, src, d]`` all encoder layer outputs.
      z: ``[b, src, d]`` coarse fusion input (None unless coarse fusion is on).
    Returns:
      dict of heads-major arrays with leading axis ``batch`` (no beam axis):
      ``k``/``v``, ``coarse_k``/``coarse_v`` ``[b, heads, src, kv]``; ``fine_k``/``fine_v``
      ``[b, heads, S * src, kv]``.
    """
    kv = {}
    if self.fusion == "none":
      kv["k"], kv["v"] = map(heads_major, self.cross.project_kv(layers[:, -1]))  # [b, heads, src, kv]
    if self.fusion in ("coarse", "both"):
      kv["coarse_k"], kv["coarse_v"] = map(heads_major, self.coarse.project_kv(z))  # [b, heads, src, kv]
    if self.fusion in ("fine", "both"):
      if self.fine.kv is not None:  # this layer's own experts; shared ones live in EncodedQuery
        kv["fine_k"], kv["fine_v"] = self.fine.kv(layers)  # [b, heads, S*src, kv]
    return {name: with_logical_constraint(a, ("batch", "heads", "length", "kv")) for name, a in kv.items()}

  def __call__(self, h: jax.Array, kv: dict[str, jax.Array], bias: jax.Array,
               rngs: nnx.Rngs | None, shared_fine_kv: tuple[jax.Array, jax.Array] | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``h [b, beam, t, d]`` (normed decoder stream) -> (update ``[b, beam, t, d]``, aux).

    ``shared_fine_kv``: the network's fine keys/values ``[b, heads, S * src, kv]`` shared by
    all decoder layers (``fine_shared_kv``); ignored when this layer owns its experts.
    """
    aux = {}
    if self.fusion == "none":
      out = self.cross.cross_attend_heads_major(self.cross.project_query(h), kv["k"], kv["v"], bias, rngs)
      return out, aux
    out = jnp.zeros_like(h)
    if self.fusion in ("coarse", "both"):
      c = self.coarse.cross_attend_heads_major(self.coarse.project_query(h), kv["coarse_k"],
                                               kv["coarse_v"], bias, rngs)  # [b, beam, t, d]
      out = out + c * jax.nn.sigmoid(self.coarse_gate(c))  # self-gated sigmoid
    if self.fusion in ("fine", "both"):
      fine_k, fine_v = (kv["fine_k"], kv["fine_v"]) if "fine_k" in kv else shared_fine_kv
      f, alpha = self.fine(h, fine_k, fine_v, bias, rngs)
      out = out + f
      aux["alpha"] = alpha
    return out, aux
