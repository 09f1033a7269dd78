"""T5.1.1 building blocks in Flax NNX: RMSNorm, projections, gated-GELU MLP, attention.

Conventions:
  * every parameter is an ``nnx.Param`` carrying ``logical_axes`` metadata (see
    ``cart_jax.partitioning``); no biases anywhere (T5.1.1) except where a caller
    asks for one (the coarse-fusion projection ``W [E_1; ...; E_S] + b``);
  * the decoder stream always has a beam axis: ``[batch, beam, length, d]``
    (teacher forcing uses ``beam = 1``), so training and cached decoding share one
    code path and encoder-side keys/values broadcast over beams without copies;
  * dropout is functional: pass ``rngs=nnx.Rngs(dropout=key)`` to train, ``None``
    to run deterministically. Modules hold no RNG state.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from cart_jax.partitioning import with_logical_constraint

NEG_INF = -1e9  # additive mask value; finite so fully-masked rows stay NaN-free


def normal_param(rngs: nnx.Rngs, std: float, shape: Sequence[int],
                 logical_axes: Sequence[str | None]) -> nnx.Param:
  """``std * N(0, 1)`` parameter with its logical axis names (and ``init_std`` for host init)."""
  if len(shape) != len(logical_axes):
    raise ValueError(f"shape {tuple(shape)} vs logical axes {tuple(logical_axes)}")
  value = std * jax.random.normal(rngs.params(), tuple(shape), jnp.float32)
  return nnx.Param(value, logical_axes=tuple(logical_axes), init_std=float(std))


def const_param(value: float, shape: Sequence[int], logical_axes: Sequence[str | None]) -> nnx.Param:
  """Constant-initialised parameter (norm scales, biases, fusion logits)."""
  if len(shape) != len(logical_axes):
    raise ValueError(f"shape {tuple(shape)} vs logical axes {tuple(logical_axes)}")
  return nnx.Param(jnp.full(tuple(shape), value, jnp.float32), logical_axes=tuple(logical_axes),
                   init_const=float(value))


def fan_in_std(shape: Sequence[int], num_in_dims: int, scale: float = 1.0) -> float:
  """Variance scaling: ``sqrt(scale / fan_in)`` with fan-in the product of the input dims.

  Plain normal, not truncated: the model is small and XLA compiles it faster on CPU.
  """
  return math.sqrt(scale / math.prod(shape[:num_in_dims]))


def init_on_host(module: nnx.Module, seed: int = 0) -> nnx.Module:
  """Fills every parameter of a (possibly abstract, ``nnx.eval_shape``) module with numpy.

  Same distributions as the jitted constructor (from the ``init_std`` / ``init_const``
  metadata), different draws. For tests and CPU tools: XLA spends seconds
  compiling one RNG kernel per parameter, numpy spends microseconds.
  """
  import numpy as np

  rng = np.random.default_rng(seed)
  graphdef, state = nnx.split(module)
  for path, var in nnx.to_flat_state(state):
    meta = var.get_metadata()
    shape = tuple(var.get_value().shape)
    if "init_std" in meta:
      value = meta["init_std"] * rng.standard_normal(shape, dtype=np.float32)
    elif "init_const" in meta:
      value = np.full(shape, meta["init_const"], np.float32)
    elif isinstance(var, nnx.Param):
      raise ValueError(f"parameter {path} has no init metadata")
    else:
      continue
    var.set_value(jnp.asarray(value))
  return nnx.merge(graphdef, state)


def dropout(x: jax.Array, rate: float, rngs: nnx.Rngs | None) -> jax.Array:
  """Inverted dropout; identity when ``rngs`` is None (deterministic) or ``rate == 0``."""
  if rngs is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rngs.dropout(), 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class RMSNorm(nnx.Module):
  """T5 layer norm: scale only, no mean subtraction, no bias."""

  def __init__(self, dim: int, *, epsilon: float = 1e-6, dtype=jnp.float32, rngs: nnx.Rngs):
    del rngs
    self.scale = const_param(1.0, (dim,), ("embed",))
    self.epsilon = epsilon
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(var + self.epsilon)
    return (y * self.scale.get_value()).astype(self.dtype)


class Dense(nnx.Module):
  """``y = x . W (+ b)`` contracting the last ``len(in_shape)`` axes of ``x``."""

  def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int],
               logical_axes: Sequence[str | None], *, use_bias: bool = False,
               init_scale: float = 1.0, dtype=jnp.float32, rngs: nnx.Rngs):
    in_shape, out_shape = tuple(in_shape), tuple(out_shape)
    self.num_in = len(in_shape)
    self.kernel = normal_param(rngs, fan_in_std(in_shape, len(in_shape), init_scale), in_shape + out_shape,
                               logical_axes)
    self.bias = const_param(0.0, out_shape, logical_axes[len(in_shape):]) if use_bias else None
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.kernel.get_value().astype(self.dtype)
    n = self.num_in
    y = jax.lax.dot_general(x.astype(self.dtype), kernel,
                            ((tuple(range(x.ndim - n, x.ndim)), tuple(range(n))), ((), ())))
    if self.bias is not None:
      y = y + self.bias.get_value().astype(self.dtype)
    return y


class Embed(nnx.Module):
  """Token embedding table ``[vocab, embed]``."""

  def __init__(self, num_embeddings: int, features: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.embedding = normal_param(rngs, 1.0, (num_embeddings, features), ("vocab", "embed"))
    self.dtype = dtype

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding.get_value(), ids, axis=0).astype(self.dtype)


class GatedGeluMlp(nnx.Module):
  """T5.1.1 MLP: ``wo(gelu(wi_0 x) * wi_1 x)`` with dropout on the hidden layer."""

  def __init__(self, d_model: int, d_ff: int, *, dropout_rate: float, dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.wi_0 = Dense((d_model,), (d_ff,), ("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.wi_1 = Dense((d_model,), (d_ff,), ("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.wo = Dense((d_ff,), (d_model,), ("mlp", "embed"), dtype=dtype, rngs=rngs)
    self.dropout_rate = dropout_rate

  def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
    h = jax.nn.gelu(self.wi_0(x), approximate=True) * self.wi_1(x)  # [..., d_ff]
    h = with_logical_constraint(h, (None,) * (h.ndim - 1) + ("mlp",))
    h = dropout(h, self.dropout_rate, rngs)
    return self.wo(h)


# ----------------------------------------------------------------------------- attention


def relative_position_bucket(relative_position: jax.Array, *, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> jax.Array:
  """T5's bucketing of ``key_pos - query_pos``: exact for small offsets, log-spaced beyond.

  Bidirectional: half the buckets for keys after the query, half for keys before.
  Causal: offsets to future keys all map to bucket 0 (they are masked anyway).
  """
  n = -relative_position  # > 0 when the key lies before the query
  bucket = jnp.zeros_like(relative_position)
  if bidirectional:
    num_buckets //= 2
    bucket = bucket + (n < 0).astype(jnp.int32) * num_buckets
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  n_safe = jnp.maximum(n, 1).astype(jnp.float32)
  log_ratio = jnp.log(n_safe / max_exact) / math.log(max_distance / max_exact)
  large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return bucket + jnp.where(is_small, n, large)


class RelativePositionBias(nnx.Module):
  """Learned per-head scalar bias per relative-position bucket, shared by all layers of a stack."""

  def __init__(self, num_buckets: int, max_distance: int, num_heads: int, *, bidirectional: bool,
               rngs: nnx.Rngs):
    self.rel_embedding = normal_param(rngs, fan_in_std((num_buckets,), 1), (num_buckets, num_heads),
                                      ("relpos_buckets", "heads"))
    self.num_buckets = num_buckets
    self.max_distance = max_distance
    self.bidirectional = bidirectional

  def __call__(self, query_pos: jax.Array, key_pos: jax.Array) -> jax.Array:
    """``query_pos [t]``, ``key_pos [s]`` -> bias ``[heads, t, s]``."""
    rel = key_pos[None, :] - query_pos[:, None]  # [t, s]
    buckets = relative_position_bucket(rel, bidirectional=self.bidirectional,
                                       num_buckets=self.num_buckets, max_distance=self.max_distance)
    bias = jnp.take(self.rel_embedding.get_value(), buckets, axis=0)  # [t, s, heads]
    return jnp.transpose(bias, (2, 0, 1))  # [heads, t, s]


def attention_probs(scores: jax.Array, dropout_rate: float, rngs: nnx.Rngs | None) -> jax.Array:
  probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
  return dropout(probs, dropout_rate, rngs)


def heads_major(x: jax.Array) -> jax.Array:
  """``[b, src, heads, kv] -> [b, heads, src, kv]``: the layout shared keys/values are stored in."""
  return jnp.swapaxes(x, -3, -2)


def shared_kv_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, *,
                        num_groups: int = 1, group_weights: jax.Array | None = None,
                        dropout_rate: float = 0.0, rngs: nnx.Rngs | None = None) -> jax.Array:
  """Attention of a beamed query stream to keys/values shared by all beams (cross attention).

  Keys/values are stored heads-major, ``[b, heads, G * src, kv]`` (``G`` groups of ``src`` keys,
  e.g. one group per encoder layer for fine fusion), computed once per query: the per-step
  work is two batched matmuls over ``(b, heads)`` with the beams and steps folded into the rows,
  and no transpose of the keys/values (the [b, src, heads, kv] layout cost one full copy of them
  per layer and step on CPU). Softmax is taken over each group's ``src`` keys separately; with
  ``group_weights [G]`` the result is ``sum_g w_g attention_g``, folded into the probabilities
  before the value product (one matmul instead of G, same sum).

  Args:
    q: ``[b, beam, t, heads, kv]`` queries (already scaled).
    k, v: ``[b, heads, G * src, kv]``.
    bias: additive mask broadcastable to ``[b, 1, 1, 1, src]`` (padded source positions).
  Returns:
    ``[b, beam, t, heads, kv]`` context (before the output projection).
  """
  b, beam, t, h, dk = q.shape
  n = k.shape[2]
  src = n // num_groups
  qh = jnp.transpose(q, (0, 3, 1, 2, 4)).reshape(b, h, beam * t, dk)  # [b, heads, beam*t, kv]
  scores = jnp.einsum("bhqd,bhnd->bhqn", qh, k)  # [b, heads, beam*t, G*src]
  scores = scores.reshape(b, h, beam * t, num_groups, src) + bias.reshape(bias.shape[0], 1, 1, 1, src)
  probs = attention_probs(scores, dropout_rate, rngs)  # [b, heads, beam*t, G, src] float32
  if group_weights is not None:
    probs = probs * group_weights.astype(probs.dtype)[:, None]
  probs = probs.reshape(b, h, beam * t, n).astype(v.dtype)
  ctx = jnp.einsum("bhqn,bhnd->bhqd", probs, v)  # [b, heads, beam*t, kv]
  return jnp.transpose(ctx.reshape(b, h, beam, t, dk), (0, 2, 3, 1, 4))  # [b, beam, t, heads, kv]


class MultiHeadAttention(nnx.Module):
  """Multi-head attention with separate q/k/v/o projections (no biases).

  The decoder stream has a beam axis; keys/values either carry it too (self
  attention, KV cache per beam) or not (cross attention: ``[batch, src, heads, kv]``
  broadcast over beams by the einsum, never tiled).
  """

  def __init__(self, d_model: int, num_heads: int, head_dim: int, *, dropout_rate: float,
               kv_features: int | None = None, dtype=jnp.float32, rngs: nnx.Rngs):
    kv_features = d_model if kv_features is None else kv_features
    self.query = Dense((d_model,), (num_heads, head_dim), ("embed", "heads", "kv"), dtype=dtype, rngs=rngs)
    self.key = Dense((kv_features,), (num_heads, head_dim), ("embed", "heads", "kv"), dtype=dtype, rngs=rngs)
    self.value = Dense((kv_features,), (num_heads, head_dim), ("embed", "heads", "kv"), dtype=dtype, rngs=rngs)
    self.out = Dense((num_heads, head_dim), (d_model,), ("heads", "kv", "embed"), dtype=dtype, rngs=rngs)
    self.head_dim = head_dim
    self.dropout_rate = dropout_rate

  def project_query(self, x: jax.Array) -> jax.Array:
    """``[..., d] -> [..., heads, kv]``, pre-scaled by ``1/sqrt(head_dim)``."""
    return self.query(x) * (1.0 / math.sqrt(self.head_dim))

  def project_kv(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``[..., d] -> ([..., heads, kv], [..., heads, kv])``."""
    return self.key(x), self.value(x)

  def self_attend(self, q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array,
                  rngs: nnx.Rngs | None) -> jax.Array:
    """q ``[b, k, t, h, d]``, k/v ``[b, k, s, h, d]``, bias broadcastable to ``[b, k, h, t, s]``."""
    return self._attend("bkthd,bkshd->bkhts", "bkhts,bkshd->bkthd", q, k, v, bias, rngs)

  def cross_attend(self, q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array,
                   rngs: nnx.Rngs | None) -> jax.Array:
    """q ``[b, k, t, h, d]``, k/v ``[b, s, h, d]`` (shared by beams), bias ``[b, 1, 1, 1, s]``."""
    return self._attend("bkthd,bshd->bkhts", "bkhts,bshd->bkthd", q, k, v, bias, rngs)

  def _attend(self, scores_eq: str, ctx_eq: str, q: jax.Array, k: jax.Array, v: jax.Array,
              bias: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
    """Scores ``[batch, beam, heads, t, s]`` by ``scores_eq`` plus ``bias``, softmax (dropout),
    then the context ``[batch, beam, t, heads, kv]`` by ``ctx_eq``, projected out."""
    scores = jnp.einsum(scores_eq, q, k) + bias
    probs = attention_probs(scores, self.dropout_rate, rngs).astype(v.dtype)
    return self.out(jnp.einsum(ctx_eq, probs, v))

  def attend_cache_one_step(self, q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array,
                            rngs: nnx.Rngs | None) -> jax.Array:
    """Self-attention of ONE new position per beam to its KV cache (incremental decoding).

    Same result as :meth:`self_attend` with ``t = 1``, computed as element-wise products and
    sums over the short cache in float32 instead of ``batch x beam x heads`` matmuls of one row:
    XLA fuses them into one loop and no longer transposes the whole cache at every step.

    Args:
      q: ``[b, beam, 1, heads, kv]``; k/v: ``[b, beam, T, heads, kv]`` (the cache, new key written).
      bias: broadcastable to ``[b, beam, heads, 1, T]`` (causal mask + relative positions).
    """
    scores = jnp.sum(q.astype(jnp.float32) * k.astype(jnp.float32), axis=-1)  # [b, beam, T, heads]
    scores = jnp.swapaxes(scores, -1, -2)[:, :, :, None, :] + bias  # [b, beam, heads, 1, T]
    probs = attention_probs(scores, self.dropout_rate, rngs)  # [b, beam, heads, 1, T]
    p = jnp.swapaxes(probs[:, :, :, 0, :], -1, -2)[..., None]  # [b, beam, T, heads, 1]
    ctx = jnp.sum(p * v.astype(jnp.float32), axis=2, keepdims=True)  # [b, beam, 1, heads, kv]
    return self.out(ctx.astype(v.dtype))

  def cross_attend_heads_major(self, q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array,
                               rngs: nnx.Rngs | None) -> jax.Array:
    """As :meth:`cross_attend` with k/v stored heads-major ``[b, heads, src, kv]``."""
    return self.out(shared_kv_attention(q, k, v, bias, dropout_rate=self.dropout_rate, rngs=rngs))
