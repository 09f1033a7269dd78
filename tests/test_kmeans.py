"""K-Means: quality against scikit-learn, determinism, chunking, empty clusters, sharding."""
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from sklearn.cluster import KMeans

from cart_jax.index import kmeans as km


def _blobs(n=3000, d=16, k=20, seed=0):
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(k, d)) * 3.0
  return (centers[rng.integers(0, k, n)] + rng.normal(size=(n, d))).astype(np.float32)


def test_inertia_within_one_percent_of_sklearn_median_over_five_seeds():
  x = _blobs()
  ours, theirs = [], []
  for seed in range(5):
    r = km.kmeans(x, jax.random.key(seed), km.KMeansConfig(20, max_iters=300, tol=1e-4))
    ours.append(float(r.inertia))
    theirs.append(KMeans(20, init="k-means++", n_init=1, random_state=seed).fit(x).inertia_)
  ratio = np.median(ours) / np.median(theirs)
  assert ratio < 1.01, (ours, theirs)


def test_inertia_and_labels_are_consistent():
  x = _blobs(n=1000, k=8)
  r = km.kmeans(x, jax.random.key(0), km.KMeansConfig(8))
  c = np.asarray(r.centroids)
  d2 = ((x[:, None, :] - c[None]) ** 2).sum(-1)
  np.testing.assert_array_equal(np.asarray(r.labels), d2.argmin(1))
  np.testing.assert_allclose(float(r.inertia), d2.min(1).sum(), rtol=1e-4)
  assert np.asarray(r.counts).sum() == 1000


def test_deterministic_under_key_and_differs_across_keys():
  x = _blobs(n=800, k=10)
  cfg = km.KMeansConfig(10)
  a = km.kmeans(x, jax.random.key(3), cfg)
  b = km.kmeans(x, jax.random.key(3), cfg)
  c = km.kmeans(x, jax.random.key(4), cfg)
  np.testing.assert_array_equal(np.asarray(a.centroids), np.asarray(b.centroids))
  assert not np.array_equal(np.asarray(a.centroids), np.asarray(c.centroids))


def test_chunk_budget_does_not_change_the_result():
  x = _blobs(n=777, k=6)
  big = km.kmeans(x, jax.random.key(0), km.KMeansConfig(6, max_block_elements=1 << 22))
  small = km.kmeans(x, jax.random.key(0), km.KMeansConfig(6, max_block_elements=6 * 50))
  np.testing.assert_allclose(np.asarray(big.centroids), np.asarray(small.centroids), atol=1e-4)
  np.testing.assert_array_equal(np.asarray(big.labels), np.asarray(small.labels))


def test_iteration_cap_and_tolerance():
  x = _blobs(n=1000, k=10)
  capped = km.kmeans(x, jax.random.key(0), km.KMeansConfig(10, max_iters=2, tol=0.0))
  assert int(capped.n_iter) == 2
  converged = km.kmeans(x, jax.random.key(0), km.KMeansConfig(10, max_iters=500, tol=1e-4))
  assert 1 <= int(converged.n_iter) < 500


def test_every_cluster_keeps_a_point_when_points_are_few_and_duplicated():
  # 12 distinct points, each repeated; 12 clusters: k-means++ may pick duplicates,
  # reseeding must still leave every cluster non-empty and inertia zero.
  rng = np.random.default_rng(0)
  base = rng.normal(size=(12, 4)).astype(np.float32)
  x = np.repeat(base, 5, axis=0)
  r = km.kmeans(x, jax.random.key(0), km.KMeansConfig(12, max_iters=50))
  assert np.asarray(r.counts).min() >= 1
  assert float(r.inertia) < 1e-4


def test_predict_matches_brute_force():
  x = _blobs(n=500, k=5)
  r = km.kmeans(x, jax.random.key(0), km.KMeansConfig(5))
  q = _blobs(n=123, k=5, seed=1)
  lab, d2 = km.predict(q, r.centroids, max_block_elements=5 * 10)
  ref = ((q[:, None] - np.asarray(r.centroids)[None]) ** 2).sum(-1)
  np.testing.assert_array_equal(lab, ref.argmin(1))
  np.testing.assert_allclose(d2, ref.min(1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bad, msg", [
    (np.zeros((5, 3), np.float32), "at least as many points as clusters"),
    (np.zeros((10,), np.float32), "rank 2"),
])
def test_bad_input(bad, msg):
  with pytest.raises(ValueError, match=msg):
    km.kmeans(bad, jax.random.key(0), km.KMeansConfig(8))


def test_nan_is_rejected():
  x = _blobs(n=100, k=4)
  x[7, 2] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    km.kmeans(x, jax.random.key(0), km.KMeansConfig(4))


SHARDED = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, numpy as np
    from cart_jax.index import kmeans as km
    assert len(jax.devices()) == 8, jax.devices()
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(16, 8)) * 3.0
    x = (centers[rng.integers(0, 16, 2003)] + rng.normal(size=(2003, 8))).astype(np.float32)
    cfg = km.KMeansConfig(16, max_iters=50)
    one = km.kmeans(x, jax.random.key(1), cfg, mesh=km.data_mesh(jax.devices()[:1]))
    eight = km.kmeans(x, jax.random.key(1), cfg, mesh=km.data_mesh())
    assert eight.centroids.sharding.is_fully_replicated
    assert len(eight.labels.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(one.centroids), np.asarray(eight.centroids), atol=1e-4)
    np.testing.assert_array_equal(np.asarray(one.labels), np.asarray(eight.labels))
    np.testing.assert_allclose(float(one.inertia), float(eight.inertia), rtol=1e-5)
    print("SHARDED_OK", int(one.n_iter), int(eight.n_iter))
""")


def test_same_centroids_on_one_and_eight_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "SHARDED_OK" in out.stdout
