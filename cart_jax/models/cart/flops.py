"""Analytic FLOPs of answering one query: encode once, then ``id_length`` cached decode steps x beams.

Counting rules (a multiply-add is 2 FLOPs; norms, softmax, GELU and the beam
search's top-k are left out, they are O(activations) not O(params)):

* every matmul with a weight of ``P`` parameters costs ``2 P`` per token it is applied to;
* attention costs ``4 * keys * heads * head_dim`` per query token (scores + weighted sum);
* the encoder runs once on ``src_len`` tokens; the encoder-side keys/values of
  every decoder cross-attention (and the coarse projection ``Z``) are computed once
  per query, not per beam or step;
* each decode step runs the decoder on one token per beam; self-attention reads
  the whole ``id_length`` cache (future slots are masked, as implemented), cross
  attention reads ``src_len`` keys once (``none``/``coarse``) or once per encoder
  layer (``fine``), and the logits projection covers the whole identifier vocabulary.

:func:`measured_flops` cross-checks the analytic count with XLA's cost analysis of
the compiled computation (which also counts element-wise ops, so it is a bit higher).
"""
from __future__ import annotations

from cart_jax.models.cart.config import ModelConfig


def flops_per_query(c: ModelConfig, *, src_len: int = 32, beam: int = 10, id_length: int = 6) -> dict:
  """Analytic FLOPs of one query, split into encoder / fusion precompute / decoder."""
  n = src_len
  attn = c.num_heads * c.head_dim  # A
  d = c.d_model
  s = c.num_fused_layers
  if c.encoder == "t5":
    per_token = 2 * (4 * d * attn + 3 * d * c.d_ff) + 4 * n * attn
    encoder = n * c.num_encoder_layers * per_token
  else:
    from cart_jax.models.text.minilm import MiniLMConfig
    m = MiniLMConfig()
    w, a = m.hidden_size, m.num_heads * m.head_dim
    per_token = 2 * (4 * w * a + 2 * w * m.intermediate_size) + 4 * n * a
    encoder = n * m.num_layers * per_token
    if w != d:
      encoder += 2 * n * s * w * d  # shared MiniLM -> d_model projection of every layer
  # once per query: coarse projection Z and every decoder layer's cross keys/values
  kv_one = 2 * n * 2 * d * attn  # k and v of one source sequence
  precompute = 0
  if c.uses_coarse:
    precompute += 2 * n * (s * d) * d
  per_layer_pre = 0
  if c.fusion == "none":
    per_layer_pre += kv_one
  if c.uses_coarse:
    per_layer_pre += kv_one
  if c.uses_fine and not c.fine_shared_kv:
    per_layer_pre += s * kv_one
  precompute += c.num_decoder_layers * per_layer_pre
  if c.uses_fine and c.fine_shared_kv:
    precompute += s * kv_one  # the experts' keys/values, shared by all decoder layers
  # per decode step, per beam (one token)
  layer = 2 * 4 * d * attn + 4 * id_length * attn + 2 * 3 * d * c.d_ff  # self-attn + MLP
  if c.fusion == "none":
    layer += 2 * 2 * d * attn + 4 * n * attn
  if c.uses_coarse:
    layer += 2 * 2 * d * attn + 4 * n * attn + 2 * d * d  # q, o, attention, gate
  if c.uses_fine:
    layer += 2 * 2 * d * attn + s * 4 * n * attn + 2 * s * attn  # q, o, S attentions, alpha mix
  token = c.num_decoder_layers * layer + 2 * d * c.output_vocab_size
  decoder = id_length * beam * token
  return {"encoder": int(encoder), "fusion_precompute": int(precompute), "decoder": int(decoder),
          "total": int(encoder + precompute + decoder),
          "assumptions": {"src_len": src_len, "beam": beam, "id_length": id_length}}


def measured_flops(c: ModelConfig, *, src_len: int = 32, beam: int = 10, id_length: int = 6) -> float:
  """XLA cost analysis of ``encode`` + ``id_length`` unrolled cached steps for one query.

  Compiled from abstract shapes (no parameters are materialised).
  """
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from cart_jax.models.cart.network import CARTNetwork

  abstract = nnx.eval_shape(lambda: CARTNetwork(c, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)

  def answer(state, inputs):
    model = nnx.merge(graphdef, state)
    enc = model.encode(inputs)
    cache = model.init_cache(1, beam, id_length)
    step_fn = model.tokens_to_logits_fn(enc)
    tokens = jnp.ones((1, beam), jnp.int32)
    total = jnp.zeros((1, beam, c.output_vocab_size))
    for t in range(id_length):
      logits, cache = step_fn(tokens, cache, jnp.int32(t))
      tokens = jnp.argmax(logits, -1).astype(jnp.int32)
      total = total + logits
    return total

  inputs = jax.ShapeDtypeStruct((1, src_len), jnp.int32)
  compiled = jax.jit(answer).lower(state, inputs).compile()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get("flops", float("nan")))


def dual_tower_query_flops(*, src_len: int = 32, embed_dim: int = 256) -> int:
  """FLOPs of the dual tower's query side: MiniLM-L6 over ``src_len`` tokens + the text projection.

  The scoring of the items (``2 * N * embed_dim`` per query for exact search) comes on top and grows
  with the corpus; CART's counterpart is :func:`flops_per_query` (plus ``2 * beam * embed_dim`` when
  the beam is re-ranked by the same dual tower).
  """
  from cart_jax.models.text.minilm import MiniLMConfig
  m = MiniLMConfig()
  w, a, n = m.hidden_size, m.num_heads * m.head_dim, src_len
  per_token = 2 * (4 * w * a + 2 * w * m.intermediate_size) + 4 * n * a
  return int(n * m.num_layers * per_token + 2 * w * embed_dim)

