"""Decoder start from the identifier space: token vectors, projection, rows, output columns."""
import jax
import numpy as np
import pytest
from flax import nnx

from cart_jax.index import identifiers as ident
from cart_jax.index.vocab import NUM_RESERVED
from cart_jax.models.cart import identifier_init as ii
from cart_jax.models.cart.config import tiny
from cart_jax.models.cart.network import create_model
from cart_jax.partitioning import make_mesh

SMALL = dict(n_clusters=8, num_levels=2, codebook_size=8, rq_steps=30, rq_batch_size=128,
             rq_latent_dim=8, rq_hidden_dims=(32,))
D_MODEL = 32  # tiny()


@pytest.fixture(scope="module")
def emb():
  return np.random.default_rng(0).standard_normal((200, 16)).astype(np.float32)


@pytest.fixture(scope="module")
def index(emb):
  return ident.build_index(emb, None, ident.IdentifierConfig(**SMALL))


@pytest.fixture(scope="module")
def hier_index(emb):
  return ident.build_index(emb, None, ident.IdentifierConfig(**SMALL, use_rqvae=False))


@pytest.fixture(scope="module")
def nokm_index(emb):
  return ident.build_index(emb, None, ident.IdentifierConfig(**SMALL, use_kmeans=False))


def _params(index, mesh=None):
  model = create_model(tiny(output_vocab_size=index.vocab.vocab_size), host_init=True, mesh=mesh)
  _, params, _ = nnx.split(model, nnx.Param, ...)
  return nnx.to_pure_dict(params)


def _embed(p):
  return np.asarray(p["decoder_embedder"]["embedding"])


def _kernel(p):
  return np.asarray(p["logits_dense"]["kernel"])


def _cos(a):
  a = np.asarray(a, np.float64)
  a = a / np.linalg.norm(a, axis=-1, keepdims=True)
  return a @ a.T


def _level_rows(index, lvl):
  off, size = index.vocab.offsets[lvl], index.vocab.level_sizes[lvl]
  return np.arange(off, off + size)


def test_token_vectors_are_centroids_and_codebooks(index):
  vectors, known = ii.identifier_token_vectors(index)
  d, lat = index.embedding_dim, index.config.rq_latent_dim
  assert vectors.shape == (index.vocab.vocab_size, d + lat) and vectors.dtype == np.float32
  k0 = _level_rows(index, 0)
  np.testing.assert_array_equal(vectors[k0, :d], index.centroids)
  assert not vectors[k0, d:].any()
  cbs = index.rqvae_params["codebooks"]
  for m in range(index.config.num_levels):
    rows = _level_rows(index, 1 + m)
    np.testing.assert_array_equal(vectors[rows, d:], cbs[m])
    assert not vectors[rows, :d].any()
  expect = np.zeros(index.vocab.vocab_size, bool)
  expect[NUM_RESERVED:index.vocab.offsets[-1]] = True  # everything but PAD, START and the counter
  np.testing.assert_array_equal(known, expect)
  assert not vectors[~known].any()


def test_projection_is_an_isometry_or_a_subspace_map():
  p = ii.projection_matrix(24, 32, seed=3)
  assert p.shape == (24, 32)
  np.testing.assert_allclose(p @ p.T, np.eye(24), atol=1e-5)
  q = ii.projection_matrix(40, 32, seed=3)
  assert q.shape == (40, 32)
  np.testing.assert_allclose(q.T @ q, np.eye(32), atol=1e-5)
  np.testing.assert_array_equal(p, ii.projection_matrix(24, 32, seed=3))
  assert not np.allclose(p, ii.projection_matrix(24, 32, seed=4))


def test_level0_rows_are_the_projected_centroids(index):
  params = _params(index)
  new, info = ii.init_decoder_from_identifiers(params, index, d_model=D_MODEL, seed=7)
  rows = _embed(new)[_level_rows(index, 0)]
  # Independent recomputation: centred centroids through the seeded projection (embedding block).
  c = index.centroids.astype(np.float64)
  c = c - c.mean(0)
  p = ii.projection_matrix(index.embedding_dim + index.config.rq_latent_dim, D_MODEL, 7)
  proj = c @ p[:index.embedding_dim].astype(np.float64)
  np.testing.assert_allclose(_cos(rows), _cos(proj), atol=1e-5)
  # Each row is its projected vector up to a positive scale ...
  cos_self = np.sum(rows * proj, 1) / np.linalg.norm(rows, axis=1) / np.linalg.norm(proj, axis=1)
  np.testing.assert_allclose(cos_self, 1.0, atol=1e-5)
  # ... with the RMS of the random table; d_emb = 24 <= 32 so the projection keeps cosines exactly.
  np.testing.assert_allclose(np.sqrt(np.mean(rows ** 2, axis=1)), info["scale"], rtol=1e-5)
  np.testing.assert_allclose(info["scale"], np.sqrt(np.mean(_embed(params) ** 2)), rtol=1e-6)
  np.testing.assert_allclose(_cos(rows), _cos(c), atol=1e-5)
  assert info["rows_per_level"] == [8, 8, 8, 0] and info["rows_set"] == 24
  assert info["output_scale"] is None and info["skipped"] == 0


def test_close_centroids_give_closer_rows_than_far_ones(index):
  new, _ = ii.init_decoder_from_identifiers(_params(index), index, d_model=D_MODEL, seed=0)
  rows = _embed(new)[_level_rows(index, 0)]
  c = index.centroids
  dist = np.linalg.norm(c[:, None] - c[None], axis=-1)
  iu = np.triu_indices(len(c), 1)
  close = tuple(a[np.argmin(dist[iu])] for a in iu)
  far = tuple(a[np.argmax(dist[iu])] for a in iu)
  cos = _cos(rows)
  assert cos[close] > cos[far]
  assert cos[close] > 0 > cos[far]
  # random init rows have no such structure: the effect comes from the identifiers
  before = _cos(_embed(_params(index))[_level_rows(index, 0)])
  assert abs(before[close] - before[far]) < abs(cos[close] - cos[far])


def test_unknown_rows_and_other_params_unchanged(index):
  params = _params(index)
  new, _ = ii.init_decoder_from_identifiers(params, index, d_model=D_MODEL, seed=0)
  _, known = ii.identifier_token_vectors(index)
  assert known.sum() == 24
  np.testing.assert_array_equal(_embed(new)[~known], _embed(params)[~known])
  assert not np.any(np.all(_embed(new)[known] == _embed(params)[known], axis=1))
  np.testing.assert_array_equal(_kernel(new), _kernel(params))  # output=False
  for key in params:
    if key != "decoder_embedder":
      assert new[key] is params[key]
  # the input dict is not modified
  assert params["decoder_embedder"]["embedding"] is not new["decoder_embedder"]["embedding"]


def test_output_true_sets_kernel_columns(index):
  params = _params(index)
  new, info = ii.init_decoder_from_identifiers(params, index, d_model=D_MODEL, seed=0, output=True)
  _, known = ii.identifier_token_vectors(index)
  k_old, k_new = _kernel(params), _kernel(new)
  np.testing.assert_array_equal(k_new[:, ~known], k_old[:, ~known])
  assert not np.any(np.all(k_new[:, known] == k_old[:, known], axis=0))
  # same directions as the embedding rows, at the kernel's own scale
  np.testing.assert_allclose(_cos(k_new[:, known].T), _cos(_embed(new)[known]), atol=1e-5)
  np.testing.assert_allclose(info["output_scale"], np.sqrt(np.mean(k_old ** 2)), rtol=1e-6)
  np.testing.assert_allclose(np.sqrt(np.mean(k_new[:, known] ** 2, axis=0)), info["output_scale"],
                             rtol=1e-5)
  # the embedding table is what output=False gives
  same, _ = ii.init_decoder_from_identifiers(params, index, d_model=D_MODEL, seed=0)
  np.testing.assert_array_equal(_embed(new), _embed(same))


def test_hierarchical_kmeans_index(hier_index):
  vectors, known = ii.identifier_token_vectors(hier_index)
  d = hier_index.embedding_dim
  assert vectors.shape[1] == d
  for m, (_, gc) in enumerate(hier_index.hier_tables):
    rows = _level_rows(hier_index, 1 + m)
    if gc.shape[0]:
      np.testing.assert_allclose(vectors[rows], gc.mean(0), rtol=1e-6)
      assert known[rows].all()
  assert not known[_level_rows(hier_index, hier_index.vocab.id_length - 1)].any()
  params = _params(hier_index)
  new, info = ii.init_decoder_from_identifiers(params, hier_index, d_model=D_MODEL, seed=1, output=True)
  assert info["rows_per_level"][0] == 8 and info["rows_per_level"][-1] == 0
  assert info["rows_set"] == int(known.sum()) and info["d_emb"] == d
  np.testing.assert_array_equal(_embed(new)[~known], _embed(params)[~known])
  assert not np.allclose(_embed(new)[known], _embed(params)[known])


def test_index_without_kmeans(nokm_index):
  assert nokm_index.centroids is None and nokm_index.vocab.id_length == 3
  vectors, known = ii.identifier_token_vectors(nokm_index)
  assert vectors.shape == (nokm_index.vocab.vocab_size, nokm_index.config.rq_latent_dim)
  cbs = nokm_index.rqvae_params["codebooks"]
  for m in range(2):
    np.testing.assert_array_equal(vectors[_level_rows(nokm_index, m)], cbs[m])
  params = _params(nokm_index)
  new, info = ii.init_decoder_from_identifiers(params, nokm_index, d_model=D_MODEL, seed=0, output=True)
  assert info["rows_per_level"] == [8, 8, 0] and info["d_emb"] == 8
  np.testing.assert_array_equal(_embed(new)[~known], _embed(params)[~known])
  rows = _embed(new)[_level_rows(nokm_index, 0)]
  cb = cbs[0].astype(np.float64) - cbs[0].mean(0)
  np.testing.assert_allclose(_cos(rows), _cos(cb), atol=1e-5)


def test_deterministic_in_the_seed(index):
  params = _params(index)
  a, info_a = ii.init_decoder_from_identifiers(params, index, d_model=D_MODEL, seed=5, output=True)
  b, info_b = ii.init_decoder_from_identifiers(params, index, d_model=D_MODEL, seed=5, output=True)
  c, _ = ii.init_decoder_from_identifiers(params, index, d_model=D_MODEL, seed=6, output=True)
  np.testing.assert_array_equal(_embed(a), _embed(b))
  np.testing.assert_array_equal(_kernel(a), _kernel(b))
  assert info_a == info_b
  assert not np.allclose(_embed(a), _embed(c))
  # the geometry within a level does not depend on the seed (exact isometry here)
  r = _level_rows(index, 0)
  np.testing.assert_allclose(_cos(_embed(a)[r]), _cos(_embed(c)[r]), atol=1e-5)


def test_keeps_sharding_and_numpy_inputs(index):
  mesh = make_mesh(1, 1, devices=[jax.devices()[0]])
  params = _params(index, mesh=mesh)
  new, _ = ii.init_decoder_from_identifiers(params, index, d_model=D_MODEL, seed=0, output=True)
  for key, leaf in (("decoder_embedder", "embedding"), ("logits_dense", "kernel")):
    old_a, new_a = params[key][leaf], new[key][leaf]
    assert isinstance(new_a, jax.Array)
    assert new_a.sharding == old_a.sharding and new_a.dtype == old_a.dtype
  # numpy in, numpy out; d_emb = 24 > d_model = 12: a random-subspace projection
  rng = np.random.default_rng(0)
  v = index.vocab.vocab_size
  np_params = {"decoder_embedder": {"embedding": rng.standard_normal((v, 12)).astype(np.float32)},
               "logits_dense": {"kernel": (rng.standard_normal((12, v)) / np.sqrt(12)).astype(np.float32)}}
  out, info = ii.init_decoder_from_identifiers(np_params, index, d_model=12, seed=0, output=True,
                                               scale=0.5)
  assert isinstance(out["decoder_embedder"]["embedding"], np.ndarray)
  assert info["scale"] == 0.5 and info["rows_set"] == 24
  rows = out["decoder_embedder"]["embedding"][_level_rows(index, 1)]
  np.testing.assert_allclose(np.sqrt(np.mean(rows ** 2, axis=1)), 0.5, rtol=1e-5)


def test_rejects_mismatched_shapes(index):
  params = _params(index)
  with pytest.raises(ValueError, match="d_model"):
    ii.init_decoder_from_identifiers(params, index, d_model=16, seed=0)
  small = {"decoder_embedder": {"embedding": np.zeros((5, D_MODEL), np.float32)}}
  with pytest.raises(ValueError, match="rows"):
    ii.init_decoder_from_identifiers(small, index, d_model=D_MODEL, seed=0)
  with pytest.raises(KeyError, match="logits_dense"):
    ii.init_decoder_from_identifiers(small | {"decoder_embedder": params["decoder_embedder"]}, index,
                                     d_model=D_MODEL, seed=0, output=True)
