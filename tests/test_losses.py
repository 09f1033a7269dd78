"""CE + omega * bidirectional KL (R-Drop): numpy references, padding, omega = 0 skips pass two."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cart_jax.index.vocab import PAD_ID, IdentifierVocab
from cart_jax.models.cart.config import tiny, with_vocab
from cart_jax.models.cart.losses import (bidirectional_kl, compute_loss, distillation_kl,
                                         token_cross_entropy)
from cart_jax.models.cart.network import create_model, shift_right

VOCAB = IdentifierVocab((4, 3, 2))


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_token_cross_entropy_matches_numpy_and_ignores_padding():
  rs = np.random.RandomState(0)
  logits = rs.randn(3, 4, 7).astype(np.float32)
  targets = rs.randint(2, 7, (3, 4))
  targets[2, 2:] = PAD_ID
  mask = targets != PAD_ID
  ce, acc = token_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  nll = -np.take_along_axis(_log_softmax(logits), targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(float(ce), nll[mask].mean(), rtol=1e-6)
  np.testing.assert_allclose(float(acc), (logits.argmax(-1) == targets)[mask].mean(), rtol=1e-6)
  logits2 = logits.copy()
  logits2[2, 2:] = 100 * rs.randn(2, 7)  # garbage at padded positions changes nothing
  ce2, _ = token_cross_entropy(jnp.asarray(logits2), jnp.asarray(targets), jnp.asarray(mask))
  assert float(ce2) == pytest.approx(float(ce), rel=1e-6)


def test_bidirectional_kl_matches_numpy():
  rs = np.random.RandomState(1)
  a, b = rs.randn(2, 3, 5).astype(np.float32), rs.randn(2, 3, 5).astype(np.float32)
  mask = np.array([[1, 1, 0], [1, 0, 0]], bool)
  la, lb = _log_softmax(a), _log_softmax(b)
  kl_ab = (np.exp(la) * (la - lb)).sum(-1)
  kl_ba = (np.exp(lb) * (lb - la)).sum(-1)
  want = (0.5 * (kl_ab + kl_ba))[mask].mean()
  got = bidirectional_kl(jnp.asarray(a), jnp.asarray(b), jnp.asarray(mask))
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  assert float(bidirectional_kl(jnp.asarray(b), jnp.asarray(a), jnp.asarray(mask))) == pytest.approx(float(got))
  assert float(bidirectional_kl(jnp.asarray(a), jnp.asarray(a), jnp.asarray(mask))) == pytest.approx(0.0, abs=1e-7)


def test_distillation_kl_matches_numpy_and_is_zero_at_the_teacher():
  rs = np.random.RandomState(2)
  s, t = rs.randn(2, 3, 5).astype(np.float32), rs.randn(2, 3, 5).astype(np.float32)
  mask = np.array([[1, 1, 0], [1, 0, 1]], bool)
  ls, lt = _log_softmax(s), _log_softmax(t)
  want = (np.exp(lt) * (lt - ls)).sum(-1)[mask].mean()
  got = distillation_kl(jnp.asarray(s), jnp.asarray(lt), jnp.asarray(mask))
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  assert float(distillation_kl(jnp.asarray(t), jnp.asarray(lt), jnp.asarray(mask))) == pytest.approx(
      0.0, abs=1e-6)


def _batch(seed=0):
  rs = np.random.RandomState(seed)
  inputs = rs.randint(1, 40, (4, 6)).astype(np.int32)
  inputs[3, 4:] = 0
  codes = np.stack([rs.randint(0, s, 4) for s in VOCAB.level_sizes], -1)
  targets = VOCAB.codes_to_tokens(codes)
  targets[1, 2] = PAD_ID  # a padded target position
  return {"inputs": jnp.asarray(inputs), "targets": jnp.asarray(targets)}


def test_compute_loss_rdrop_and_omega_zero():
  cfg = with_vocab(tiny(input_vocab_size=40, num_decoder_layers=1, dropout_rate=0.2), VOCAB)
  model = create_model(cfg, seed=0, host_init=True)
  graphdef, state = nnx.split(model)
  batch = _batch()

  @jax.jit
  def losses(state, batch, key):
    m = nnx.merge(graphdef, state)
    rdrop = compute_loss(m, batch, omega=0.7, dropout_rng=key)
    plain = compute_loss(m, batch, omega=0.0, dropout_rng=key)
    logits, _ = m(batch["inputs"], shift_right(batch["targets"]), rngs=nnx.Rngs(dropout=key))
    mask = batch["targets"] != PAD_ID
    one_pass_ce, _ = token_cross_entropy(logits, batch["targets"], mask)
    evaluation = compute_loss(m, batch, omega=0.7, dropout_rng=None)
    return rdrop, plain, one_pass_ce, evaluation

  key = jax.random.key(0, impl="rbg")
  (loss, aux), (loss0, aux0), one_pass_ce, (loss_eval, aux_eval) = losses(state, batch, key)
  assert float(aux["kl"]) > 1e-4  # two dropout masks -> two different distributions
  np.testing.assert_allclose(float(loss), float(aux["ce"]) + 0.7 * float(aux["kl"]), rtol=1e-6)
  # omega = 0: exactly one forward pass with the same dropout stream, loss = CE, KL = 0
  assert float(aux0["kl"]) == 0.0 and float(loss0) == pytest.approx(float(aux0["ce"]))
  np.testing.assert_allclose(float(loss0), float(one_pass_ce), rtol=1e-6)
  assert int(aux["num_tokens"]) == 4 * VOCAB.id_length - 1
  assert 0.0 <= float(aux["token_accuracy"]) <= 1.0
  assert aux["fusion_alpha"].shape == (1, cfg.num_fused_layers)
  # no dropout RNG = evaluation: deterministic single pass, no KL
  assert float(aux_eval["kl"]) == 0.0 and float(loss_eval) == pytest.approx(float(aux_eval["ce"]))
  assert abs(float(aux_eval["ce"]) - float(aux["ce"])) > 1e-4
  # the R-Drop loss is differentiable and its gradient is finite
  grads = jax.jit(jax.grad(lambda st: compute_loss(nnx.merge(graphdef, st), batch, omega=0.7,
                                                   dropout_rng=key)[0]))(state)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_compute_loss_distills_the_last_rows_towards_a_teacher():
  cfg = with_vocab(tiny(input_vocab_size=40, num_decoder_layers=1, dropout_rate=0.0), VOCAB)
  graphdef, state = nnx.split(create_model(cfg, seed=0, host_init=True))
  _, other = nnx.split(create_model(cfg, seed=1, host_init=True))
  batch = _batch()

  @jax.jit
  def run(state, teacher_state):
    def teacher_logp(st, rows):
      logits, _ = nnx.merge(graphdef, st)(batch["inputs"][-rows:], shift_right(batch["targets"][-rows:]))
      return jax.nn.log_softmax(logits, axis=-1)
    m = nnx.merge(graphdef, state)
    plain, _ = compute_loss(m, batch, omega=0.0, dropout_rng=None)
    own = compute_loss(m, dict(batch, teacher_logp=teacher_logp(state, 2)), omega=0.0,
                       dropout_rng=None, distill=3.0)
    tl = teacher_logp(teacher_state, 2)
    other_loss = compute_loss(m, dict(batch, teacher_logp=tl), omega=0.0, dropout_rng=None,
                              distill=3.0)
    logits, _ = m(batch["inputs"], shift_right(batch["targets"]))
    want = distillation_kl(logits[-2:], tl, batch["targets"][-2:] != PAD_ID)
    return plain, own, other_loss, want

  plain, (loss, aux), (loss2, aux2), want = run(state, other)
  # the model as its own teacher: nothing to learn, the loss is the CE
  assert float(aux["distill_kl"]) == pytest.approx(0.0, abs=1e-6)
  assert float(loss) == pytest.approx(float(plain), rel=1e-6)
  # another network as the teacher of the last 2 rows: loss = CE + 3 x KL(teacher || student)
  assert float(want) > 1e-3 and float(aux2["distill_kl"]) == pytest.approx(float(want), rel=1e-5)
  assert float(loss2) == pytest.approx(float(plain) + 3.0 * float(want), rel=1e-5)
