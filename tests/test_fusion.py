"""Coarse and fine fusion against plain numpy re-implementations of the paper's formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cart_jax.models.cart.config import tiny
from cart_jax.models.cart.fusion import CoarseProjection, FineFusion, FineKeyValue, FusedCrossAttention
from cart_jax.models.cart.layers import MultiHeadAttention, init_on_host

B, K, T, SRC, S = 2, 3, 2, 5, 3  # batch, beam, decoder length, source length, encoder layers


def _np(v):
  return np.asarray(v.get_value(), np.float64)


def _softmax(x, axis=-1):
  e = np.exp(x - x.max(axis, keepdims=True))
  return e / e.sum(axis, keepdims=True)


def _np_attention(h, wq, wk, wv, wo, enc, bias):
  """h [b, k, t, d]; enc [b, src, d]; per-head softmax attention, numpy float64."""
  q = np.einsum("bktd,dhe->bkthe", h, wq) / np.sqrt(wq.shape[-1])
  k = np.einsum("bsd,dhe->bshe", enc, wk)
  v = np.einsum("bsd,dhe->bshe", enc, wv)
  p = _softmax(np.einsum("bkthe,bshe->bkhts", q, k) + bias)
  return np.einsum("bkhts,bshe,hed->bktd", p, v, wo)


def _data(d, seed=0):
  rs = np.random.RandomState(seed)
  h = rs.randn(B, K, T, d).astype(np.float32)
  layers = rs.randn(B, S, SRC, d).astype(np.float32)
  mask = np.ones((B, SRC), bool)
  mask[1, 3:] = False
  bias = np.where(mask, 0.0, -1e9)[:, None, None, None, :].astype(np.float32)
  return h, layers, bias


def _module(cls, *args, seed=0, **kw):
  return init_on_host(nnx.eval_shape(lambda: cls(*args, rngs=nnx.Rngs(0), **kw)), seed)


def test_coarse_projection_is_concat_then_affine():
  d = 8
  proj = _module(CoarseProjection, S, d, d)
  proj.proj.bias.set_value(jnp.linspace(-1, 1, d))
  _, layers, _ = _data(d)
  z = np.asarray(proj(jnp.asarray(layers)))
  concat = np.concatenate([layers[:, i] for i in range(S)], axis=-1)  # [b, src, S*d]: [E_1; ...; E_S]
  want = concat @ _np(proj.proj.kernel) + _np(proj.proj.bias)
  assert z.shape == (B, SRC, d)
  np.testing.assert_allclose(z, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weighting", ["softmax", "sigmoid"])
def test_fine_fusion_is_alpha_weighted_sum_of_per_layer_cross_attention(weighting):
  cfg = tiny(num_encoder_layers=S, fine_weighting=weighting, d_model=8, num_heads=2, head_dim=4,
             dropout_rate=0.0)
  fine = _module(FineFusion, cfg, own_kv=True)
  fine.alpha_logits.set_value(jnp.asarray([0.5, -1.0, 2.0]))
  h, layers, bias = _data(cfg.d_model)
  k, v = fine.kv(jnp.asarray(layers))
  out, alpha = fine(jnp.asarray(h), k, v, jnp.asarray(bias), None)
  logits = np.array([0.5, -1.0, 2.0])
  want_alpha = _softmax(logits) if weighting == "softmax" else 1 / (1 + np.exp(-logits))
  np.testing.assert_allclose(np.asarray(alpha), want_alpha, rtol=1e-6)
  want = sum(want_alpha[i] * _np_attention(h, _np(fine.query.kernel), _np(fine.kv.key)[i], _np(fine.kv.value)[i],
                                           _np(fine.out.kernel), layers[:, i], bias)
             for i in range(S))
  assert out.shape == (B, K, T, cfg.d_model)
  np.testing.assert_allclose(np.asarray(out), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fusion,shared", [("none", True), ("coarse", True), ("both", True), ("both", False)])
def test_fused_cross_attention_matches_formula(fusion, shared):
  cfg = tiny(num_encoder_layers=S, fusion=fusion, d_model=8, num_heads=2, head_dim=4, dropout_rate=0.0,
             fine_shared_kv=shared)
  block = _module(FusedCrossAttention, cfg, seed=1)
  h, layers, bias = _data(cfg.d_model, seed=1)
  z = np.random.RandomState(2).randn(B, SRC, cfg.d_model).astype(np.float32)
  kv = block.precompute(jnp.asarray(layers), jnp.asarray(z) if fusion != "none" else None)
  experts = None
  if fusion == "both" and shared:  # the network's experts, shared by all decoder layers
    experts = _module(FineKeyValue, S, cfg.d_model, 2, 4, seed=3)
    assert "fine_k" not in kv and block.fine.kv is None
    out, aux = block(jnp.asarray(h), kv, jnp.asarray(bias), None, experts(jnp.asarray(layers)))
  else:
    out, aux = block(jnp.asarray(h), kv, jnp.asarray(bias), None)

  def attn(m, enc):
    return _np_attention(h, _np(m.query.kernel), _np(m.key.kernel), _np(m.value.kernel), _np(m.out.kernel),
                         enc, bias)
  if fusion == "none":  # standard cross-attention to the LAST encoder layer
    want = attn(block.cross, layers[:, -1])
  else:
    c = attn(block.coarse, z)
    want = c / (1 + np.exp(-(c @ _np(block.coarse_gate.kernel))))  # c * sigmoid(W_g c)
    if fusion == "both":
      kv_module = experts if shared else block.fine.kv
      f = sum(float(np.asarray(aux["alpha"])[i]) * _np_attention(
          h, _np(block.fine.query.kernel), _np(kv_module.key)[i], _np(kv_module.value)[i],
          _np(block.fine.out.kernel), layers[:, i], bias) for i in range(S))
      want = want + f
  np.testing.assert_allclose(np.asarray(out), want, rtol=1e-4, atol=1e-5)
  assert ("alpha" in aux) == (fusion == "both")


def test_cross_attention_broadcasts_over_beams_without_tiling():
  d = 8
  mha = _module(MultiHeadAttention, d, 2, 4, dropout_rate=0.0)
  h, layers, bias = _data(d)
  q = mha.project_query(jnp.asarray(h))
  k, v = mha.project_kv(jnp.asarray(layers[:, 0]))  # [b, src, heads, kv]: no beam axis
  shared = mha.cross_attend(q, k, v, jnp.asarray(bias), None)
  tiled_k = jnp.broadcast_to(k[:, None], (B, K) + k.shape[1:])  # the copy we avoid
  tiled_v = jnp.broadcast_to(v[:, None], (B, K) + v.shape[1:])
  tiled = mha.self_attend(q, tiled_k, tiled_v, jnp.asarray(bias), None)
  np.testing.assert_allclose(np.asarray(shared), np.asarray(tiled), rtol=1e-5, atol=1e-6)
  # padded source positions get no attention: changing them changes nothing
  layers2 = layers.copy()
  layers2[1, 0, 3:] += 10.0
  k2, v2 = mha.project_kv(jnp.asarray(layers2[:, 0]))
  np.testing.assert_allclose(np.asarray(mha.cross_attend(q, k2, v2, jnp.asarray(bias), None)),
                             np.asarray(shared), atol=1e-5)
  assert jax.tree.leaves(k)[0].shape == (B, SRC, 2, 4)
