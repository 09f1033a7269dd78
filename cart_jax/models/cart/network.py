"""The CART encoder-decoder: T5.1.1 (or MiniLM) encoder, fused decoder over identifier tokens.

Usage::

  model = CARTNetwork(tiny(output_vocab_size=vocab.vocab_size), rngs=nnx.Rngs(0))
  logits, aux = model(inputs, decoder_inputs, rngs=nnx.Rngs(dropout=key))  # training
  enc = model.encode(inputs)                      # once per query (deterministic)
  cache = model.init_cache(batch, beam, max_len=L)
  step_fn = model.tokens_to_logits_fn(enc)        # the decoding contract:
  logits_bkv, cache = step_fn(tokens_bk, cache, step)

Call ``encode`` / ``tokens_to_logits_fn`` inside the jitted search (e.g. after
``nnx.merge(graphdef, state)`` in the jitted function) so parameters are traced
arguments, not baked-in constants.

Shapes: inputs ``int32 [batch, src]`` (0 = padding); decoder tokens are global
identifier token ids (``PAD_ID = 0``, ``START_ID = 1``); the decoder stream is
``[batch, beam, length, d]`` with ``beam = 1`` under teacher forcing.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx, struct

from cart_jax.core.errors import ConfigError
from cart_jax.models.cart.config import ModelConfig
from cart_jax.models.cart.fusion import CoarseProjection, FineKeyValue, FusedCrossAttention
from cart_jax.models.cart.layers import (NEG_INF, Dense, Embed, GatedGeluMlp, MultiHeadAttention,
                                   RelativePositionBias, RMSNorm, dropout)
from cart_jax.partitioning import with_logical_constraint

START_ID = 1  # mirrors cart_jax.index.vocab.START_ID (no import: the model stays index-free)
Cache = Any
TokensToLogits = Callable[[jax.Array, Cache, jax.Array], tuple[jax.Array, Cache]]

_STREAM = ("batch", "beam", "length", "embed")


@struct.dataclass
class EncodedQuery:
  """Everything the decoder needs from one batch of queries, computed once.

  Attributes:
    cross_kv: per decoder layer, a dict of encoder-side keys/values (leading axis
      ``batch``, NO beam axis), stored heads-major: ``[b, heads, src, kv]`` (``k``/``v``,
      ``coarse_k``/``coarse_v``) and ``[b, heads, S * src, kv]`` (``fine_k``/``fine_v``, only
      with per-layer experts).
    fine_kv: ``(keys, values)`` ``[b, heads, S * src, kv]`` of the fine-fusion experts shared
      by all decoder layers (``fine_shared_kv``), stored once; None otherwise.
    bias: ``[b, 1, 1, 1, src]`` additive mask of padded input positions.
  """
  cross_kv: tuple[dict[str, jax.Array], ...]
  fine_kv: tuple[jax.Array, jax.Array] | None
  bias: jax.Array


def shift_right(targets: jax.Array, start_id: int = START_ID) -> jax.Array:
  """Teacher-forcing decoder inputs: ``[START, t_0, ..., t_{L-2}]`` for targets ``[..., L]``."""
  start = jnp.full(targets.shape[:-1] + (1,), start_id, targets.dtype)
  return jnp.concatenate([start, targets[..., :-1]], axis=-1)


class EncoderLayer(nnx.Module):
  def __init__(self, c: ModelConfig, *, dtype, rngs: nnx.Rngs):
    self.pre_attention_norm = RMSNorm(c.d_model, epsilon=c.layer_norm_epsilon, dtype=dtype, rngs=rngs)
    self.attention = MultiHeadAttention(c.d_model, c.num_heads, c.head_dim,
                                        dropout_rate=c.dropout_rate, dtype=dtype, rngs=rngs)
    self.pre_mlp_norm = RMSNorm(c.d_model, epsilon=c.layer_norm_epsilon, dtype=dtype, rngs=rngs)
    self.mlp = GatedGeluMlp(c.d_model, c.d_ff, dropout_rate=c.dropout_rate, dtype=dtype, rngs=rngs)
    self.dropout_rate = c.dropout_rate

  def __call__(self, x: jax.Array, bias: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
    """``x [b, 1, src, d]`` (beam axis of 1), ``bias [b, 1, heads, src, src]``."""
    h = self.pre_attention_norm(x)
    q = self.attention.project_query(h)
    k, v = self.attention.project_kv(h)
    x = x + dropout(self.attention.self_attend(q, k, v, bias, rngs), self.dropout_rate, rngs)
    x = x + dropout(self.mlp(self.pre_mlp_norm(x), rngs), self.dropout_rate, rngs)
    return with_logical_constraint(x, _STREAM)


class T5Encoder(nnx.Module):
  """T5.1.1 encoder returning every layer's (final-normed) output."""

  def __init__(self, c: ModelConfig, *, dtype, rngs: nnx.Rngs):
    self.token_embedder = Embed(c.input_vocab_size, c.d_model, dtype=dtype, rngs=rngs)
    self.relpos = RelativePositionBias(c.relative_attention_num_buckets,
                                       c.relative_attention_max_distance, c.num_heads,
                                       bidirectional=True, rngs=rngs)
    self.layers = nnx.List([EncoderLayer(c, dtype=dtype, rngs=rngs) for _ in range(c.num_encoder_layers)])
    self.final_norm = RMSNorm(c.d_model, epsilon=c.layer_norm_epsilon, dtype=dtype, rngs=rngs)
    self.dropout_rate = c.dropout_rate

  def __call__(self, tokens: jax.Array, mask: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
    """``tokens, mask [b, src]`` -> ``[b, S, src, d]``.

    The shared final RMSNorm is applied to each layer's residual stream, so every
    ``E_i`` fusion reads lives on the same scale (``E_S`` is exactly T5's output).
    """
    src = tokens.shape[1]
    x = dropout(self.token_embedder(tokens), self.dropout_rate, rngs)[:, None]  # [b, 1, src, d]
    pos = jnp.arange(src)
    bias = self.relpos(pos, pos)[None, None]  # [1, 1, heads, src, src]
    bias = bias + jnp.where(mask, 0.0, NEG_INF)[:, None, None, None, :]  # [b, 1, heads, src, src]
    outs = []
    for layer in self.layers:
      x = layer(x, bias, rngs)
      outs.append(self.final_norm(x[:, 0]))
    return jnp.stack(outs, axis=1)  # [b, S, src, d]


class DecoderLayer(nnx.Module):
  def __init__(self, c: ModelConfig, *, dtype, rngs: nnx.Rngs):
    self.pre_self_attention_norm = RMSNorm(c.d_model, epsilon=c.layer_norm_epsilon, dtype=dtype, rngs=rngs)
    self.self_attention = MultiHeadAttention(c.d_model, c.num_heads, c.head_dim,
                                             dropout_rate=c.dropout_rate, dtype=dtype, rngs=rngs)
    self.pre_cross_attention_norm = RMSNorm(c.d_model, epsilon=c.layer_norm_epsilon, dtype=dtype, rngs=rngs)
    self.cross_attention = FusedCrossAttention(c, dtype=dtype, rngs=rngs)
    self.pre_mlp_norm = RMSNorm(c.d_model, epsilon=c.layer_norm_epsilon, dtype=dtype, rngs=rngs)
    self.mlp = GatedGeluMlp(c.d_model, c.d_ff, dropout_rate=c.dropout_rate, dtype=dtype, rngs=rngs)
    self.dropout_rate = c.dropout_rate

  def __call__(self, x: jax.Array, self_bias: jax.Array, cross_kv: dict[str, jax.Array],
               cross_bias: jax.Array, rngs: nnx.Rngs | None, cache: dict | None = None,
               step: jax.Array | None = None, shared_fine_kv: tuple | None = None
               ) -> tuple[jax.Array, dict | None, dict]:
    """One decoder layer.

    Args:
      x: ``[b, beam, t, d]`` decoder stream.
      self_bias: broadcastable to ``[b, beam, heads, t, keys]`` (causal + relative positions).
      cross_kv: this layer's precomputed encoder keys/values.
      cross_bias: ``[b, 1, 1, 1, src]``.
      rngs: dropout RNGs, None = deterministic.
      cache: ``{"k", "v": [b, beam, max_len, heads, kv]}`` for incremental decoding (t = 1).
      step: position being written into the cache.
      shared_fine_kv: fine-fusion expert keys/values shared by all decoder layers.
    Returns:
      (new x, new cache or None, aux).
    """
    h = self.pre_self_attention_norm(x)
    q = self.self_attention.project_query(h)  # [b, beam, t, heads, kv]
    k, v = self.self_attention.project_kv(h)  # [b, beam, t, heads, kv]
    new_cache = None
    if cache is not None:
      k = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), step, axis=2)
      v = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), step, axis=2)
      new_cache = {"k": k, "v": v}  # [b, beam, max_len, heads, kv]
    if cache is not None and q.shape[2] == 1:  # incremental decoding: one position per beam
      attended = self.self_attention.attend_cache_one_step(q, k, v, self_bias, rngs)
    else:
      attended = self.self_attention.self_attend(q, k, v, self_bias, rngs)
    x = x + dropout(attended, self.dropout_rate, rngs)
    fused, aux = self.cross_attention(self.pre_cross_attention_norm(x), cross_kv, cross_bias, rngs,
                                      shared_fine_kv)
    x = x + dropout(fused, self.dropout_rate, rngs)
    x = x + dropout(self.mlp(self.pre_mlp_norm(x), rngs), self.dropout_rate, rngs)
    return with_logical_constraint(x, _STREAM), new_cache, aux


class CARTNetwork(nnx.Module):
  """Encoder (T5 or MiniLM) + identifier decoder with coarse/fine fusion."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    dtype = jnp.dtype(c.dtype)
    self.dtype = dtype
    if c.encoder == "t5":
      self.encoder = T5Encoder(c, dtype=dtype, rngs=rngs)
      width = c.d_model
      self.encoder_projection = None
    else:
      from cart_jax.models.text.minilm import MiniLMConfig, MiniLMEncoder
      mc = MiniLMConfig()
      self.encoder = MiniLMEncoder(mc, dropout_rate=0.0 if c.freeze_encoder else c.dropout_rate, rngs=rngs)
      width = mc.hidden_size
      # One projection shared by all MiniLM layers (only when widths differ).
      self.encoder_projection = (Dense((width,), (c.d_model,), ("encoder_embed", "embed"), dtype=dtype,
                                       rngs=rngs) if width != c.d_model else None)
    self.coarse_projection = (CoarseProjection(c.num_fused_layers, c.d_model, c.d_model, dtype=dtype,
                                               rngs=rngs) if c.uses_coarse else None)
    self.fine_kv = (FineKeyValue(c.num_fused_layers, c.d_model, c.num_heads, c.head_dim, dtype=dtype,
                                 rngs=rngs) if c.uses_fine and c.fine_shared_kv else None)
    self.decoder_embedder = Embed(c.output_vocab_size, c.d_model, dtype=dtype, rngs=rngs)
    self.decoder_relpos = RelativePositionBias(c.relative_attention_num_buckets,
                                               c.relative_attention_max_distance, c.num_heads,
                                               bidirectional=False, rngs=rngs)
    self.decoder_layers = nnx.List([DecoderLayer(c, dtype=dtype, rngs=rngs)
                                    for _ in range(c.num_decoder_layers)])
    self.decoder_norm = RMSNorm(c.d_model, epsilon=c.layer_norm_epsilon, dtype=dtype, rngs=rngs)
    self.logits_dense = Dense((c.d_model,), (c.output_vocab_size,), ("embed", "vocab"), dtype=dtype,
                              rngs=rngs)

  # --------------------------------------------------------------------------- encoder

  def encoder_states(self, inputs: jax.Array, input_mask: jax.Array | None = None,
                     rngs: nnx.Rngs | None = None) -> jax.Array:
    """``inputs [b, src]`` -> the encoder's raw layer outputs ``[b, S, src, width]``.

    ``width`` is the encoder's own (MiniLM: 384), before the projection to ``d_model``. A frozen
    encoder's states are a pure function of the tokens: training caches them once per text
    (:mod:`cart_jax.train.state_cache`) and feeds them to :meth:`encode_states`.
    """
    mask = inputs != 0 if input_mask is None else input_mask.astype(bool)
    frozen = self.config.freeze_encoder
    layers = self.encoder(inputs, mask, rngs=None if frozen else rngs)
    if frozen:
      layers = jax.lax.stop_gradient(layers)
    return layers

  def project_states(self, states: jax.Array) -> jax.Array:
    """Raw encoder states ``[b, S, src, width]`` -> ``[b, S, src, d_model]`` in the model dtype."""
    layers = states.astype(self.dtype)
    if self.encoder_projection is not None:
      layers = self.encoder_projection(layers)
    return with_logical_constraint(layers.astype(self.dtype), ("batch", "layers", "length", "embed"))

  def encode_layers(self, inputs: jax.Array, input_mask: jax.Array | None = None,
                    rngs: nnx.Rngs | None = None) -> jax.Array:
    """``inputs [b, src]`` -> all encoder layer outputs ``[b, S, src, d_model]``."""
    return self.project_states(self.encoder_states(inputs, input_mask, rngs))

  def encode_states(self, states: jax.Array, mask: jax.Array) -> EncodedQuery:
    """Precomputes every decoder layer's cross-attention keys/values from raw encoder states.

    Args:
      states: ``[b, S, src, width]`` (:meth:`encoder_states`, or a cache of them; any float dtype).
      mask: ``[b, src]`` bool, True at real tokens.
    """
    layers = self.project_states(states)  # [b, S, src, d]
    z = self.coarse_projection(layers) if self.coarse_projection is not None else None  # [b, src, d]
    fine_kv = self.fine_kv(layers) if self.fine_kv is not None else None  # 2 x [b, heads, S*src, kv]
    if fine_kv is not None:
      fine_kv = tuple(with_logical_constraint(a, ("batch", "heads", "length", "kv")) for a in fine_kv)
    cross_kv = tuple(layer.cross_attention.precompute(layers, z) for layer in self.decoder_layers)
    bias = jnp.where(mask.astype(bool), 0.0, NEG_INF).astype(self.dtype)[:, None, None, None, :]  # [b, 1, 1, 1, src]
    return EncodedQuery(cross_kv=cross_kv, fine_kv=fine_kv, bias=bias)

  def encode(self, inputs: jax.Array, input_mask: jax.Array | None = None,
             rngs: nnx.Rngs | None = None) -> EncodedQuery:
    """Runs the encoder once and precomputes every decoder layer's cross-attention keys/values."""
    mask = inputs != 0 if input_mask is None else input_mask.astype(bool)
    return self.encode_states(self.encoder_states(inputs, mask, rngs), mask)

  # --------------------------------------------------------------------------- decoder

  def _decode_stream(self, enc: EncodedQuery, x: jax.Array, self_bias: jax.Array,
                     rngs: nnx.Rngs | None, cache: tuple | None = None, step: jax.Array | None = None):
    x = with_logical_constraint(dropout(x, self.config.dropout_rate, rngs), _STREAM)
    new_cache, alphas = [], []
    for i, layer in enumerate(self.decoder_layers):
      x, layer_cache, aux = layer(x, self_bias, enc.cross_kv[i], enc.bias, rngs,
                                  None if cache is None else cache[i], step, enc.fine_kv)
      new_cache.append(layer_cache)
      if "alpha" in aux:
        alphas.append(aux["alpha"])
    x = dropout(self.decoder_norm(x), self.config.dropout_rate, rngs)
    logits = self.logits_dense(x).astype(jnp.float32)  # [b, beam, t, vocab]
    logits = with_logical_constraint(logits, ("batch", "beam", "length", "vocab"))
    aux = {"fusion_alpha": jnp.stack(alphas)} if alphas else {}  # [decoder_layers, S]
    return logits, (tuple(new_cache) if cache is not None else None), aux

  def decode(self, enc: EncodedQuery, decoder_inputs: jax.Array,
             rngs: nnx.Rngs | None = None) -> tuple[jax.Array, dict]:
    """Teacher forcing: ``decoder_inputs [b, T]`` -> (logits ``[b, T, vocab]`` float32, aux)."""
    t = decoder_inputs.shape[1]
    x = self.decoder_embedder(decoder_inputs)[:, None]  # [b, 1, T, d]
    pos = jnp.arange(t)
    causal = jnp.where(pos[None, :] <= pos[:, None], 0.0, NEG_INF)  # [T, T]
    self_bias = (self.decoder_relpos(pos, pos) + causal)[None, None]  # [1, 1, heads, T, T]
    logits, _, aux = self._decode_stream(enc, x, self_bias.astype(self.dtype), rngs)
    return logits[:, 0], aux

  def __call__(self, inputs: jax.Array, decoder_inputs: jax.Array, input_mask: jax.Array | None = None,
               rngs: nnx.Rngs | None = None, states: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Training / scoring forward: (logits ``[b, T, vocab]``, aux). ``rngs=None`` = no dropout.

    With ``states`` (``[b, S, src, width]``, cached frozen-encoder states of ``inputs``) the
    encoder does not run; ``inputs`` then only supplies the padding mask (``input_mask`` if None).
    """
    mask = inputs != 0 if input_mask is None else input_mask.astype(bool)
    if states is None:
      return self.decode(self.encode(inputs, mask, rngs), decoder_inputs, rngs)
    if not self.config.freeze_encoder:
      raise ConfigError("cached encoder states need freeze_encoder=True (a trained encoder changes them)")
    return self.decode(self.encode_states(states, mask), decoder_inputs, rngs)

  # --------------------------------------------------------------------------- incremental

  def init_cache(self, batch: int, beam: int, max_len: int) -> Cache:
    """Zero self-attention KV cache: per layer ``{"k", "v": [batch, beam, max_len, heads, kv]}``."""
    c = self.config
    shape = (batch, beam, max_len, c.num_heads, c.head_dim)
    return tuple({"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)}
                 for _ in range(c.num_decoder_layers))

  def decode_step(self, enc: EncodedQuery, tokens_bk: jax.Array, cache: Cache,
                  step: jax.Array) -> tuple[jax.Array, Cache]:
    """One cached step: ``tokens_bk [b, beam]`` at position ``step`` -> logits ``[b, beam, vocab]``."""
    max_len = cache[0]["k"].shape[2]
    step = jnp.asarray(step, jnp.int32)
    x = self.decoder_embedder(tokens_bk)[:, :, None]  # [b, beam, 1, d]
    key_pos = jnp.arange(max_len)
    visible = jnp.where(key_pos <= step, 0.0, NEG_INF)  # [max_len]
    self_bias = (self.decoder_relpos(step[None], key_pos) + visible)[None, None]  # [1, 1, heads, 1, max_len]
    logits, new_cache, _ = self._decode_stream(enc, x, self_bias.astype(self.dtype), None, cache, step)
    return logits[:, :, 0], new_cache

  def tokens_to_logits_fn(self, enc: EncodedQuery) -> TokensToLogits:
    """The beam search's step function for these encoded queries (see the decoding contract)."""
    def tokens_to_logits(tokens_bk, cache, step):
      return self.decode_step(enc, tokens_bk, cache, step)
    return tokens_to_logits


def load_pretrained_encoder(model: CARTNetwork, directory: str | None = None) -> CARTNetwork:
  """Fills a MiniLM-encoder network's encoder with the pretrained safetensors (in place)."""
  if model.config.encoder != "minilm":
    raise ValueError(f"load_pretrained_encoder needs encoder='minilm', config has {model.config.encoder!r}")
  from cart_jax.models.text.minilm import load_minilm_weights
  load_minilm_weights(model.encoder, directory if directory is not None else model.config.minilm_dir)
  return model


def trainable_filter(config: ModelConfig):
  """``nnx`` filter of trainable parameters: all ``nnx.Param`` except a frozen encoder's.

  Use with ``nnx.Optimizer(model, tx, wrt=trainable_filter(cfg))`` so a frozen
  encoder gets neither updates nor weight decay (the forward pass also stops its
  gradients with ``jax.lax.stop_gradient``).
  """
  if not config.freeze_encoder:
    return nnx.Param

  def is_trainable(path, value) -> bool:
    return isinstance(value, nnx.Param) and (not path or path[0] != "encoder")
  return is_trainable


def param_groups(state: Any) -> dict[str, int]:
  """Parameter counts per part: embeddings, encoder, fusion, decoder, total.

  * embeddings: input/decoder token tables and the output logits projection;
  * encoder: the encoder stack (T5 layers or MiniLM, without its token table) and
    the MiniLM -> d_model projection;
  * fusion: the coarse projection, the fine experts' key/values, coarse cross-attentions +
    gates and fine cross-attentions (+ alpha); with ``fusion=none`` the plain
    cross-attention counts here too;
  * decoder: the rest of the decoder (self-attention, MLP, norms, relative positions).
  """
  counts = {"embeddings": 0, "encoder": 0, "fusion": 0, "decoder": 0}
  for path, v in nnx.to_flat_state(state):
    if not isinstance(v, nnx.Param):
      continue
    n = int(v.get_value().size)
    names = [str(p) for p in path]
    if names[0] in ("decoder_embedder", "logits_dense") or names[-1] == "word_embeddings" or \
        (names[0] == "encoder" and names[1] == "token_embedder"):
      part = "embeddings"
    elif names[0] in ("encoder", "encoder_projection"):
      part = "encoder"
    elif names[0] in ("coarse_projection", "fine_kv") or "cross_attention" in names:
      part = "fusion"
    else:
      part = "decoder"
    counts[part] += n
  counts["total"] = sum(counts.values())
  return counts


def create_model(config: ModelConfig, seed: int = 0, mesh=None, *, host_init: bool = False) -> CARTNetwork:
  """A freshly initialised network.

  Default: one jitted init whose outputs are born sharded over ``mesh`` (one device
  if None). ``host_init=True`` draws the same distributions with numpy instead
  (no XLA compile of per-parameter RNG kernels; seconds faster on CPU, for tests
  and tools), then places the state on ``mesh`` if given. With ``encoder='minilm'``
  the MiniLM weights stay random until :func:`load_pretrained_encoder`.
  """
  from cart_jax.models.cart.layers import init_on_host
  from cart_jax.partitioning import create_sharded, make_mesh, shard_state

  if host_init:
    model = init_on_host(nnx.eval_shape(lambda: CARTNetwork(config, rngs=nnx.Rngs(0))), seed)
    if mesh is not None:
      graphdef, state = nnx.split(model)
      model = nnx.merge(graphdef, shard_state(state, mesh))
    return model
  if mesh is None:
    mesh = make_mesh(1, 1, devices=[jax.devices()[0]])
  return create_sharded(lambda: CARTNetwork(config, rngs=nnx.Rngs(params=seed)), mesh)
