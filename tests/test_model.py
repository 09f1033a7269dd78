"""CART network: cached decoding == teacher forcing, encode-once shapes, masking, freezing."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cart_jax.index.vocab import START_ID, IdentifierVocab
from cart_jax.models.cart.config import ModelConfig, get_config, tiny, with_vocab
from cart_jax.models.cart.layers import relative_position_bucket
from cart_jax.models.cart.network import (CARTNetwork, create_model, param_groups, shift_right,
                                    trainable_filter)

VOCAB = IdentifierVocab((4, 3, 3, 2))  # L = 4, vocab_size = 14
SRC_LEN = 7
BATCH = 2
BEAM = 3


def _config(**kw) -> ModelConfig:
  """tiny with a 50-token input vocabulary and (unless asked) ONE decoder layer: compile time."""
  kw.setdefault("num_decoder_layers", 1)
  return with_vocab(tiny(input_vocab_size=50, dropout_rate=0.1, **kw), VOCAB)


def _inputs(seed=0):
  rs = np.random.RandomState(seed)
  inputs = rs.randint(1, 50, (BATCH, SRC_LEN)).astype(np.int32)
  inputs[1, 4:] = 0  # padding
  codes = np.stack([rs.randint(0, s, (BATCH, BEAM)) for s in VOCAB.level_sizes], -1)  # [b, k, L]
  return jnp.asarray(inputs), jnp.asarray(VOCAB.codes_to_tokens(codes))  # [b, src], [b, k, L]


def _cached_vs_forced(model: CARTNetwork, inputs, targets, parents=None):
  """Cached step logits and teacher-forced logits, both ``[b, k, L, V]``, from ONE compile.

  With ``parents`` ([b, k]) the cache is reordered by parent beam after step 1
  (as the beam search does) and the tokens of step 2+ follow the parents.
  """
  graphdef, state = nnx.split(model)
  if parents is None:
    parents = jnp.tile(jnp.arange(BEAM, dtype=jnp.int32)[None], (BATCH, 1))
  return _runner(graphdef)(state, inputs, targets, parents)


@functools.lru_cache(maxsize=None)
def _runner(graphdef):
  length = VOCAB.id_length

  @jax.jit
  def run(state, inputs, targets, parents):
    m = nnx.merge(graphdef, state)
    step_fn = m.tokens_to_logits_fn(m.encode(inputs))
    reorder = lambda a: jnp.take_along_axis(a, parents.reshape(parents.shape + (1,) * (a.ndim - 2)), axis=1)

    def body(carry, t):  # a scanned step loop, as the beam search runs it (traced step)
      cache, dec_in = carry
      logits, cache = step_fn(jax.lax.dynamic_index_in_dim(dec_in, t, axis=2, keepdims=False), cache, t)
      written = cache[0]["k"]
      # after step 1 the beam search reorders every cache leaf along axis 1 by parent beam
      cache = jax.tree.map(lambda a: jnp.where(t == 1, reorder(a), a), cache)
      dec_in = jnp.where(t == 1, reorder(dec_in), dec_in)
      return (cache, dec_in), (logits, written)

    carry = (m.init_cache(BATCH, BEAM, length), shift_right(targets))  # dec_in [b, k, L]
    _, (logits, written) = jax.lax.scan(body, carry, jnp.arange(length, dtype=jnp.int32))
    followed = reorder(targets)  # the sequences each final beam actually followed
    flat_inputs = jnp.repeat(inputs, BEAM, axis=0)  # [b*k, src]
    forced, _ = m(flat_inputs, shift_right(followed.reshape(BATCH * BEAM, length)))
    return jnp.moveaxis(logits, 0, 2), forced.reshape(BATCH, BEAM, length, -1), written[0]

  return run


@pytest.mark.parametrize("fusion", ["none", "coarse", "fine", "both"])
def test_cached_steps_equal_teacher_forcing(fusion):
  layers = 2 if fusion == "both" else 1  # a 2-layer cache in the full model
  model = create_model(_config(fusion=fusion, num_decoder_layers=layers), seed=1, host_init=True)
  inputs, targets = _inputs()
  cached, forced, first_cache = _cached_vs_forced(model, inputs, targets)
  assert cached.shape == (BATCH, BEAM, VOCAB.id_length, VOCAB.vocab_size)
  assert float(jnp.std(forced)) > 0.1  # not a degenerate network
  np.testing.assert_allclose(np.asarray(cached), np.asarray(forced), atol=1e-5, rtol=0)
  k0 = first_cache  # layer 0 keys after step 0: only position 0 is written
  assert float(jnp.abs(k0[:, :, 0]).sum()) > 0 and float(jnp.abs(k0[:, :, 1:]).sum()) == 0


def test_cache_reordered_by_parent_beams_follows_parents():
  """Beam search reorders cache leaves on axis 1: later steps must follow the chosen parents."""
  # also covers sigmoid alpha and per-decoder-layer fine experts
  cfg = _config(fusion="both", fine_weighting="sigmoid", fine_shared_kv=False)
  model = create_model(cfg, seed=3, host_init=True)
  inputs, targets = _inputs(1)
  parents = jnp.asarray([[2, 2, 0], [1, 0, 1]], jnp.int32)
  cached, forced, _ = _cached_vs_forced(model, inputs, targets, parents)
  np.testing.assert_allclose(np.asarray(cached[:, :, 2:]), np.asarray(forced[:, :, 2:]), atol=1e-5)
  # and the parents mattered: beams 0 and 1 of query 0 now share a prefix, so step 2 logits differ
  # from the un-reordered run's
  plain, _, _ = _cached_vs_forced(model, inputs, targets)
  assert float(jnp.abs(plain[:, :, 2:] - cached[:, :, 2:]).max()) > 1e-3


def test_encode_once_shapes_and_cache_contract():
  cfg = _config(fusion="both")
  graphdef, state = nnx.split(nnx.eval_shape(lambda: CARTNetwork(cfg, rngs=nnx.Rngs(0))))
  call = lambda method, *args: jax.eval_shape(  # shapes only, no compile
      lambda st, *a: getattr(nnx.merge(graphdef, st), method)(*a), state, *args)
  inputs, _ = _inputs()
  enc = call("encode", inputs)
  s = cfg.num_fused_layers
  assert len(enc.cross_kv) == cfg.num_decoder_layers
  for kv in enc.cross_kv:  # no beam axis anywhere: computed once per query
    assert kv["coarse_k"].shape == (BATCH, cfg.num_heads, SRC_LEN, cfg.head_dim)  # heads-major
    assert "fine_k" not in kv  # the fine experts' keys/values are shared, stored once:
  assert [a.shape for a in enc.fine_kv] == [(BATCH, cfg.num_heads, s * SRC_LEN, cfg.head_dim)] * 2
  assert enc.bias.shape == (BATCH, 1, 1, 1, SRC_LEN)
  cache = nnx.merge(graphdef, state).init_cache(BATCH, BEAM, VOCAB.id_length)
  for leaf in jax.tree.leaves(cache):
    assert leaf.shape[:2] == (BATCH, BEAM) and float(jnp.abs(leaf).sum()) == 0.0
  tokens = jnp.full((BATCH, BEAM), START_ID, jnp.int32)
  logits, new_cache = call("decode_step", enc, tokens, cache, jnp.int32(0))
  assert logits.shape == (BATCH, BEAM, VOCAB.vocab_size) and logits.dtype == jnp.float32
  assert jax.tree.structure(new_cache) == jax.tree.structure(cache)
  assert all(a.shape == b.shape for a, b in zip(jax.tree.leaves(new_cache), jax.tree.leaves(cache)))


def test_padding_is_masked():
  model = create_model(_config(fusion="both"), seed=0, host_init=True)
  inputs, targets = _inputs()
  dec = shift_right(targets[:, 0])
  f = nnx.jit(lambda m, x, d, mk: m(x, d, mk)[0])
  other = inputs.at[1, 4:].set(jnp.asarray([5, 9, 11], jnp.int32))  # garbage under the padding
  mask = inputs != 0
  np.testing.assert_allclose(np.asarray(f(model, inputs, dec, mask)), np.asarray(f(model, other, dec, mask)),
                             atol=1e-5)
  unmasked = f(model, other, dec, jnp.ones_like(mask))  # the mask is what hides them
  assert float(jnp.abs(unmasked[1] - f(model, inputs, dec, mask)[1]).max()) > 1e-4


def test_dropout_only_with_rngs():
  model = create_model(_config(fusion="both"), seed=0, host_init=True)
  inputs, targets = _inputs()
  dec = shift_right(targets[:, 0])
  # rbg keys: XLA compiles their dropout masks ~3x faster on CPU than threefry's
  f = nnx.jit(lambda m, x, d, key: m(x, d, rngs=nnx.Rngs(dropout=key))[0])
  key = lambda i: jax.random.key(i, impl="rbg")
  a, b, a2 = f(model, inputs, dec, key(0)), f(model, inputs, dec, key(1)), f(model, inputs, dec, key(0))
  assert float(jnp.abs(a - b).max()) > 1e-3
  np.testing.assert_array_equal(np.asarray(a), np.asarray(a2))


@pytest.mark.parametrize("weighting,expected", [("softmax", 0.5), ("sigmoid", 0.5)])
def test_fusion_alpha_returned_as_aux(weighting, expected):
  cfg = _config(fusion="fine", fine_weighting=weighting)
  model = create_model(cfg, seed=0, host_init=True)
  inputs, targets = _inputs()
  graphdef, state = nnx.split(model)
  _, aux = jax.eval_shape(lambda st, x, d: nnx.merge(graphdef, st)(x, d), state, inputs,
                          shift_right(targets[:, 0]))
  assert aux["fusion_alpha"].shape == (cfg.num_decoder_layers, cfg.num_fused_layers)
  fine = model.decoder_layers[0].cross_attention.fine
  np.testing.assert_allclose(np.asarray(fine.alpha()), expected)  # zero logits at init; S = 2 layers
  fine.alpha_logits.set_value(jnp.asarray([1.0, -1.0]))
  want = [1 / (1 + np.exp(-2.0)), np.exp(-2.0) / (1 + np.exp(-2.0))] if weighting == "softmax" else \
      [1 / (1 + np.exp(-1.0)), 1 / (1 + np.exp(1.0))]
  np.testing.assert_allclose(np.asarray(fine.alpha()), want, rtol=1e-6)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: CARTNetwork(_config(fusion="none"), rngs=nnx.Rngs(0))))
  _, aux_none = jax.eval_shape(lambda st, x, d: nnx.merge(graphdef, st)(x, d), state, inputs,
                               shift_right(targets[:, 0]))
  assert "fusion_alpha" not in aux_none


def test_fusion_modes_own_the_right_parameters():
  def names(fusion):
    m = nnx.eval_shape(lambda: CARTNetwork(_config(fusion=fusion), rngs=nnx.Rngs(0)))
    return {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(m, nnx.Param))}
  none, coarse, fine, both = (names(f) for f in ("none", "coarse", "fine", "both"))
  assert any("cross_attention/cross/" in n for n in none)
  assert not any("coarse" in n or "fine" in n for n in none)
  assert "coarse_projection/proj/bias" in coarse and not any("/fine/" in n for n in coarse)
  assert "decoder_layers/0/cross_attention/fine/alpha_logits" in fine
  assert "fine_kv/key" in fine and not any("fine/kv" in n for n in fine)  # experts shared by layers
  assert not any("coarse" in n for n in fine)
  assert both == (coarse | fine)


def test_frozen_encoder_gets_no_gradient():
  inputs, targets = _inputs()
  dec = shift_right(targets[:, 0])
  model = create_model(_config(fusion="both", freeze_encoder=True), seed=0, host_init=True)

  def loss(m):
    logits, _ = m(inputs, dec)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
        logits, targets[:, 0, :, None], -1)[..., 0])
  grads = nnx.jit(nnx.grad(loss))(model)
  sq = lambda tree: sum(float(jnp.sum(jnp.square(g))) for g in jax.tree.leaves(tree))
  assert sq(grads["encoder"]) == 0.0  # stop_gradient at the encoder outputs
  assert sq(grads["decoder_layers"]) > 1e-8 and sq(grads["coarse_projection"]) > 1e-8


def test_trainable_filter_skips_frozen_encoder():
  m = nnx.eval_shape(lambda: CARTNetwork(_config(freeze_encoder=True), rngs=nnx.Rngs(0)))
  trainable = nnx.state(m, trainable_filter(m.config))
  paths = [p for p, _ in nnx.to_flat_state(trainable)]
  assert paths and all(p[0] != "encoder" for p in paths)
  assert any(p[0] == "decoder_layers" for p in paths)
  m2 = nnx.eval_shape(lambda: CARTNetwork(_config(), rngs=nnx.Rngs(0)))
  assert any(p[0] == "encoder" for p, _ in nnx.to_flat_state(nnx.state(m2, trainable_filter(m2.config))))


def test_relative_position_buckets_known_values():
  rel = jnp.asarray([0, -1, 1, -7, -8, -100, 100, -1000])
  bi = relative_position_bucket(rel, bidirectional=True, num_buckets=32, max_distance=128)
  # 16 buckets per direction, 8 exact; n=8 -> 8; n=100 -> 8 + floor(8*log(12.5)/log(16)) = 15
  np.testing.assert_array_equal(np.asarray(bi), [0, 1, 17, 7, 8, 15, 31, 15])
  causal = relative_position_bucket(jnp.asarray([0, -1, -15, -16, -31, 3]), bidirectional=False,
                                    num_buckets=32, max_distance=128)
  # 32 buckets, 16 exact; n=31 -> 16 + floor(16*log(31/16)/log(8)) = 21; future -> 0
  np.testing.assert_array_equal(np.asarray(causal), [0, 1, 15, 16, 21, 0])


def test_config_validation_and_presets():
  with pytest.raises(ValueError, match="fusion must be one of"):
    tiny(fusion="late")
  with pytest.raises(ValueError, match="encoder must be one of"):
    tiny(encoder="bert")
  with pytest.raises(ValueError, match="unknown model config"):
    get_config("huge")
  assert get_config("small").d_model == 512 and get_config("base").num_encoder_layers == 12
  assert get_config("minilm_small").num_fused_layers == 6
  assert with_vocab(tiny(), VOCAB).output_vocab_size == 14


def test_param_groups_add_up():
  m = nnx.eval_shape(lambda: CARTNetwork(_config(fusion="both"), rngs=nnx.Rngs(0)))
  groups = param_groups(nnx.state(m))
  total = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(m, nnx.Param)))
  assert groups["total"] == total
  # the tiny decoder embedding + logits: 14 * 32 * 2; input table 50 * 32
  assert groups["embeddings"] == 14 * 32 * 2 + 50 * 32
  assert all(groups[k] > 0 for k in ("encoder", "fusion", "decoder"))
