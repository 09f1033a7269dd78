"""RQ-VAE: level-wise reconstruction, code usage, straight-through gradients, save/load."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cart_jax.data.datasets.synthetic import structured_embeddings
from cart_jax.index import rqvae as rq


@pytest.fixture(scope="module")
def trained():
  x = structured_embeddings(20000, 256, n_topics=64, n_subtopics=64, seed=0)
  x = x / np.sqrt(np.mean(x ** 2))
  cfg = rq.RQVAEConfig(input_dim=256, latent_dim=32, hidden_dims=(128,), num_levels=3,
                       codebook_size=64, steps=300, batch_size=512, learning_rate=3e-3)
  res = rq.train_rqvae(x, cfg, jax.random.key(0))
  return x, cfg, res


def test_reconstruction_error_strictly_decreases_level_by_level(trained):
  x, _, res = trained
  diag = rq.rqvae_diagnostics(res.model, x)
  mse = diag["rq_mse_per_level"]
  assert len(mse) == 3
  assert all(b < a for a, b in zip(mse, mse[1:])), mse
  assert mse[-1] < 0.5 * float(np.mean(x ** 2)), mse  # explains most of the variance


def test_no_level_uses_fewer_than_half_of_its_codes(trained):
  x, _, res = trained
  diag = rq.rqvae_diagnostics(res.model, x)
  assert min(diag["codebook_usage_per_level"]) >= 0.5, diag["codebook_usage_per_level"]
  assert all(p > 8 for p in diag["perplexity_per_level"]), diag["perplexity_per_level"]


def test_training_reduces_loss(trained):
  _, _, res = trained
  assert res.history[-1]["loss"] < res.history[0]["loss"]


def test_state_dict_round_trip(trained):
  x, cfg, res = trained
  flat = rq.state_dict(res.model)
  again = rq.load_state_dict(cfg, flat)
  np.testing.assert_array_equal(np.asarray(again.encode_codes(jnp.asarray(x[:64]))),
                                np.asarray(res.model.encode_codes(jnp.asarray(x[:64]))))
  bad = dict(flat)
  bad["codebooks"] = np.zeros((1, 2, 3), np.float32)
  with pytest.raises(ValueError, match="codebooks"):
    rq.load_state_dict(cfg, bad)


def test_straight_through_gradients_reach_the_encoder_and_codebooks():
  cfg = rq.RQVAEConfig(input_dim=8, latent_dim=4, hidden_dims=(16,), num_levels=2, codebook_size=4)
  model = rq.RQVAE(cfg, rngs=nnx.Rngs(params=0))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(32, 8)), jnp.float32)
  grads = nnx.grad(lambda m: rq.rqvae_loss(m, x)[0])(model)
  enc = np.asarray(grads.encoder.layers[0].kernel[...])
  cbs = np.asarray(grads.codebooks[...])
  assert np.abs(enc).sum() > 0
  assert np.abs(cbs).sum() > 0
