"""The fast decode paths (issue 8) give the same answers as the plain ones.

* step 0 on one beam (``DecodeConfig.single_beam_first_step``) == step 0 on every beam;
* heads-major shared keys/values with the experts' weights folded in == per-group attention sum;
* one-step attention to the KV cache == ``self_attend`` with ``t = 1``;
* a bfloat16 model finds the float32 model's top identifier for most queries.
"""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cart_jax.inference.decoding import DecodeConfig, beam_search
from cart_jax.index.trie import build_trie
from cart_jax.index.vocab import IdentifierVocab
from cart_jax.models.cart.config import tiny, with_vocab
from cart_jax.models.cart.layers import MultiHeadAttention, heads_major, shared_kv_attention
from cart_jax.models.cart.network import create_model

VOCAB = IdentifierVocab((8, 6, 4))
SRC = 9


def _codes(n=40, seed=0):
  rng = np.random.default_rng(seed)
  codes = np.stack([rng.integers(0, s, 4 * n) for s in VOCAB.level_sizes], 1)
  return np.unique(codes, axis=0)[:n]


def _search_fn(graphdef, config, beam):
  @jax.jit
  def search(state, inputs, trie):
    m = nnx.merge(graphdef, state)
    cache = m.init_cache(inputs.shape[0], beam, VOCAB.id_length)
    return beam_search(m.tokens_to_logits_fn(m.encode(inputs)), cache, trie, config)
  return search


def _inputs(batch, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, 200, (batch, SRC)).astype(np.int32)
  ids[:, 6:] *= rng.integers(0, 2, (batch, 1))  # some padded queries
  return jnp.asarray(ids)


def test_single_beam_first_step_gives_identical_results():
  cfg = with_vocab(tiny(input_vocab_size=256, dropout_rate=0.0, num_encoder_layers=1,
                        num_decoder_layers=1), VOCAB)
  graphdef, state = nnx.split(create_model(cfg, seed=1, host_init=True))
  trie = build_trie(_codes(), VOCAB, device_put=True)
  inputs = _inputs(5)
  one = _search_fn(graphdef, DecodeConfig(6, 6, single_beam_first_step=True), 6)(state, inputs, trie)
  all_ = _search_fn(graphdef, DecodeConfig(6, 6, single_beam_first_step=False), 6)(state, inputs, trie)
  np.testing.assert_array_equal(np.asarray(one.rows), np.asarray(all_.rows))
  np.testing.assert_allclose(np.asarray(one.scores), np.asarray(all_.scores), rtol=1e-5, atol=1e-5)
  assert np.asarray(one.valid).all() and len(set(np.asarray(one.rows)[0].tolist())) == 6


def test_shared_kv_attention_with_group_weights_is_weighted_sum_of_groups():
  rng = np.random.default_rng(0)
  b, beam, t, h, d, groups, src = 2, 3, 2, 2, 4, 3, 5
  q = jnp.asarray(rng.standard_normal((b, beam, t, h, d)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((b, h, groups * src, d)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((b, h, groups * src, d)), jnp.float32)
  bias = np.zeros((b, 1, 1, 1, src), np.float32)
  bias[1, ..., 3:] = -1e9  # padded source positions of query 1
  w = jnp.asarray([0.2, 0.5, 0.3])
  got = shared_kv_attention(q, k, v, jnp.asarray(bias), num_groups=groups, group_weights=w)
  want = 0.0
  for g in range(groups):
    kg, vg = k[:, :, g * src:(g + 1) * src], v[:, :, g * src:(g + 1) * src]  # [b, h, src, d]
    s = jnp.einsum("bkthd,bhsd->bkhts", q, kg) + bias  # [b, beam, h, t, src]
    want = want + w[g] * jnp.einsum("bkhts,bhsd->bkthd", jax.nn.softmax(s, -1), vg)
  assert got.shape == (b, beam, t, h, d)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_heads_major_cross_attention_equals_plain_cross_attention():
  mha = MultiHeadAttention(8, 2, 4, dropout_rate=0.0, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(1)
  h = jnp.asarray(rng.standard_normal((2, 3, 1, 8)), jnp.float32)
  enc = jnp.asarray(rng.standard_normal((2, 5, 8)), jnp.float32)
  bias = jnp.zeros((2, 1, 1, 1, 5)).at[0, ..., 4].set(-1e9)
  q = mha.project_query(h)
  k, v = mha.project_kv(enc)  # [b, src, heads, kv]
  plain = mha.cross_attend(q, k, v, bias, None)
  fast = mha.cross_attend_heads_major(q, heads_major(k), heads_major(v), bias, None)
  np.testing.assert_allclose(np.asarray(fast), np.asarray(plain), rtol=1e-5, atol=1e-6)


def test_attend_cache_one_step_equals_self_attend():
  mha = MultiHeadAttention(8, 2, 4, dropout_rate=0.0, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(2)
  q = jnp.asarray(rng.standard_normal((2, 3, 1, 2, 4)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((2, 3, 6, 2, 4)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((2, 3, 6, 2, 4)), jnp.float32)
  bias = jnp.asarray(rng.standard_normal((1, 1, 2, 1, 6)), jnp.float32).at[..., 4:].set(-1e9)
  np.testing.assert_allclose(np.asarray(mha.attend_cache_one_step(q, k, v, bias, None)),
                             np.asarray(mha.self_attend(q, k, v, bias, None)), rtol=1e-5, atol=1e-6)


def test_bf16_search_mostly_finds_the_float32_top1():
  cfg = with_vocab(tiny(input_vocab_size=256, dropout_rate=0.0, num_encoder_layers=1, num_decoder_layers=1), VOCAB)
  graphdef, state = nnx.split(create_model(cfg, seed=2, host_init=True))
  graphdef16, _ = nnx.split(create_model(cfg.replace(dtype="bfloat16"), seed=2, host_init=True))
  trie = build_trie(_codes(), VOCAB, device_put=True)
  inputs = _inputs(24, seed=3)
  dc = DecodeConfig(4, 4)
  r32 = _search_fn(graphdef, dc, 4)(state, inputs, trie)
  r16 = _search_fn(graphdef16, dc, 4)(state, inputs, trie)  # same float32 params, bf16 compute
  top32, top16 = np.asarray(r32.rows)[:, 0], np.asarray(r16.rows)[:, 0]
  agree = float((top32 == top16).mean())
  assert agree >= 0.75, f"bf16 top-1 agrees with float32 on {agree:.0%} of queries"
  assert np.asarray(r16.valid).all()
  assert np.abs(np.asarray(r16.scores) - np.asarray(r32.scores)).max() < 0.5
