"""K-Means in JAX: greedy k-means++ initialisation and Lloyd iterations, data-parallel.

Everything runs inside one ``jax.jit``: initialisation is a ``lax.fori_loop`` over
clusters, Lloyd iterations a ``lax.while_loop`` with a tolerance and an iteration
cap. Points are sharded over the mesh axis ``data`` with ``jax.shard_map``; every
device works on its own rows, in chunks whose ``[chunk, K]`` distance block stays
under ``KMeansConfig.max_block_elements``, and the per-cluster sums, counts and
inertia are ``psum``-reduced across devices. Accumulation is float32 whatever the
input dtype. Results do not depend on the number of devices beyond float rounding.

Empty clusters are re-seeded with the points farthest from their centroid (as
scikit-learn does), so every cluster keeps at least one point when N >= K.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cart_jax.core.errors import ConfigError

DATA_AXIS = "data"


@dataclasses.dataclass(frozen=True)
class KMeansConfig:
  """Configuration of :func:`kmeans`.

  Attributes:
    n_clusters: K.
    max_iters: cap on Lloyd iterations.
    tol: relative tolerance (scikit-learn's definition): stop when the squared
      centroid shift summed over clusters is <= tol * mean per-feature variance.
      ``0`` runs exactly ``max_iters`` iterations.
    n_local_trials: candidates per k-means++ step (greedy k-means++); ``None``
      uses scikit-learn's ``2 + floor(log K)``.
    max_block_elements: budget for one ``[chunk, K]`` distance block.
    init_sample_per_cluster: k-means++ runs on a uniform random subset of
      ``init_sample_per_cluster * K`` points (all points if fewer); Lloyd
      iterations always use every point. ``None`` initialises on all points.
  """
  n_clusters: int
  max_iters: int = 100
  tol: float = 1e-4
  n_local_trials: int | None = None
  max_block_elements: int = 1 << 22
  init_sample_per_cluster: int | None = 256

  def trials(self) -> int:
    if self.n_local_trials is not None:
      return max(1, int(self.n_local_trials))
    return 2 + int(math.log(self.n_clusters))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KMeansResult:
  centroids: jax.Array  # [K, d] float32
  labels: jax.Array     # [N] int32
  inertia: jax.Array    # [] float32: sum of squared distances to the assigned centroid
  n_iter: jax.Array     # [] int32: Lloyd iterations run
  counts: jax.Array     # [K] float32: points per cluster


def _sq_dists(x_cd: jax.Array, c_kd: jax.Array, c_sq_k: jax.Array) -> jax.Array:
  """Squared Euclidean distances ``[chunk, K]`` by matmul, clamped at 0."""
  x_sq = jnp.sum(x_cd * x_cd, axis=-1, keepdims=True)  # [chunk, 1]
  cross = jnp.matmul(x_cd, c_kd.T, precision=jax.lax.Precision.HIGHEST)  # [chunk, K]
  return jnp.maximum(x_sq - 2.0 * cross + c_sq_k[None, :], 0.0)


def _chunked(x_nd: jax.Array, chunk: int) -> jax.Array:
  """``[n, d] -> [n // chunk, chunk, d]`` (n is a multiple of chunk by construction)."""
  n, d = x_nd.shape
  return x_nd.reshape(n // chunk, chunk, d)


def _assign_local(x_nd, w_n, c_kd, chunk):
  """Nearest centroid of each local point, chunk by chunk.

  Returns labels [n] int32, min squared distance [n], per-cluster weighted sums
  [K, d], counts [K] and weighted inertia [] — all local to this device.
  """
  k, d = c_kd.shape
  c_sq = jnp.sum(c_kd * c_kd, axis=-1)  # [K]

  def body(carry, xs):
    sums_kd, counts_k = carry
    x_cd, w_c = xs  # [chunk, d], [chunk]
    d2_ck = _sq_dists(x_cd, c_kd, c_sq)  # [chunk, K]
    lab_c = jnp.argmin(d2_ck, axis=-1).astype(jnp.int32)  # [chunk]
    mind_c = jnp.take_along_axis(d2_ck, lab_c[:, None], axis=-1)[:, 0]  # [chunk]
    sums_kd = sums_kd + jax.ops.segment_sum(x_cd * w_c[:, None], lab_c, num_segments=k)  # [K, d]
    counts_k = counts_k + jax.ops.segment_sum(w_c, lab_c, num_segments=k)  # [K]
    return (sums_kd, counts_k), (lab_c, mind_c)

  init = (jnp.zeros((k, d), jnp.float32), jnp.zeros((k,), jnp.float32))
  (sums, counts), (labels, mind) = jax.lax.scan(
      body, init, (_chunked(x_nd, chunk), w_n.reshape(-1, chunk)))
  labels = labels.reshape(-1)
  mind = mind.reshape(-1)
  inertia = jnp.sum(mind * w_n)
  return labels, mind, sums, counts, inertia


def _pick_weighted(x_nd, w_n, u_t, axis_name):
  """Sample rows with probability proportional to ``w_n`` (global over devices).

  ``u_t`` [T] are uniforms in [0, 1) shared by all devices. Each device owns a
  contiguous slice of the global rows; the owner contributes the chosen row and a
  ``psum`` gives every device the same ``[T, d]`` result.
  """
  local_total = jnp.sum(w_n)
  totals = jax.lax.all_gather(local_total, axis_name)  # [D]
  me = jax.lax.axis_index(axis_name)
  start = jnp.sum(jnp.where(jnp.arange(totals.shape[0]) < me, totals, 0.0))
  grand = jnp.sum(totals)
  target_t = u_t * grand  # [T] position in the global cumulative weight
  cum_n = start + jnp.cumsum(w_n)  # [n] global cumulative weight at each local row
  # First local row whose cumulative weight exceeds the target.
  idx_t = jnp.searchsorted(cum_n, target_t, side="right")  # [T]
  idx_t = jnp.minimum(idx_t, w_n.shape[0] - 1)
  owner_t = (target_t >= start) & (target_t < start + local_total)  # [T]
  # The last device also owns targets rounding past the grand total.
  owner_t = owner_t | ((me == totals.shape[0] - 1) & (target_t >= grand))
  rows_td = jnp.where(owner_t[:, None], x_nd[idx_t], 0.0)  # [T, d]
  n_owners = jax.lax.psum(owner_t.astype(jnp.float32), axis_name)  # [T]
  return jax.lax.psum(rows_td, axis_name) / jnp.maximum(n_owners, 1.0)[:, None]


def _kmeans_pp(x_nd, w_n, key, k, trials, chunk, axis_name):
  """Greedy k-means++ (Arthur & Vassilvitskii; scikit-learn's variant with local trials)."""
  n, d = x_nd.shape

  def d2_to(c_td):  # [T, d] -> [T, n] squared distances of local points to T candidates
    c_sq = jnp.sum(c_td * c_td, axis=-1)
    def one_chunk(x_cd):
      return _sq_dists(x_cd, c_td, c_sq).T  # [T, chunk]
    out = jax.lax.map(one_chunk, _chunked(x_nd, chunk))  # [n_chunks, T, chunk]
    return jnp.transpose(out, (1, 0, 2)).reshape(c_td.shape[0], n)

  key0, key_loop = jax.random.split(key)
  first = _pick_weighted(x_nd, w_n, jax.random.uniform(key0, (1,)), axis_name)  # [1, d]
  min_d2 = d2_to(first)[0]  # [n]
  cents = jnp.zeros((k, d), jnp.float32).at[0].set(first[0])

  def body(i, carry):
    cents, min_d2 = carry
    u = jax.random.uniform(jax.random.fold_in(key_loop, i), (trials,))
    cand_td = _pick_weighted(x_nd, w_n * min_d2, u, axis_name)  # [T, d]
    new_d2_tn = jnp.minimum(min_d2[None, :], d2_to(cand_td))  # [T, n]
    pot_t = jax.lax.psum(jnp.sum(new_d2_tn * w_n[None, :], axis=-1), axis_name)  # [T]
    best = jnp.argmin(pot_t)
    return cents.at[i].set(cand_td[best]), new_d2_tn[best]

  cents, _ = jax.lax.fori_loop(1, k, body, (cents, min_d2))
  return cents


def _reseed_empty(cents_kd, counts_k, x_nd, w_n, mind_n, axis_name):
  """Move empty clusters onto the globally farthest points (largest distance first)."""
  k = cents_kd.shape[0]
  n_local = x_nd.shape[0]
  m = min(k, n_local)
  far_d, far_i = jax.lax.top_k(jnp.where(w_n > 0, mind_n, -1.0), m)  # [m]
  all_d = jax.lax.all_gather(far_d, axis_name).reshape(-1)  # [D*m]
  all_x = jax.lax.all_gather(x_nd[far_i], axis_name).reshape(-1, x_nd.shape[1])  # [D*m, d]
  _, order = jax.lax.top_k(all_d, min(k, all_d.shape[0]))
  cand_kd = all_x[order]  # [<=K, d] farthest points, best first
  empty_k = counts_k <= 0
  rank_k = jnp.cumsum(empty_k) - 1  # r-th empty cluster takes the r-th farthest point
  rank_k = jnp.clip(rank_k, 0, cand_kd.shape[0] - 1)
  return jnp.where(empty_k[:, None], cand_kd[rank_k], cents_kd)


def _kmeans_shard(x_nd, w_n, xs_nd, ws_n, key, tol_abs, *, cfg: KMeansConfig, chunk: int,
                  init_chunk: int, axis_name):
  x_nd = x_nd.astype(jnp.float32)
  w_n = w_n.astype(jnp.float32)
  k = cfg.n_clusters
  cents = _kmeans_pp(xs_nd.astype(jnp.float32), ws_n.astype(jnp.float32), key, k, cfg.trials(),
                     init_chunk, axis_name)

  def lloyd(cents):
    labels, mind, sums, counts, inertia = _assign_local(x_nd, w_n, cents, chunk)
    sums = jax.lax.psum(sums, axis_name)
    counts = jax.lax.psum(counts, axis_name)
    inertia = jax.lax.psum(inertia, axis_name)
    new = jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], cents)
    new = _reseed_empty(new, counts, x_nd, w_n, mind, axis_name)
    return new, inertia

  def cond(state):
    it, _, shift, _ = state
    keep_going = shift > tol_abs
    return (it < cfg.max_iters) & keep_going

  def body(state):
    it, cents, _, _ = state
    new, inertia = lloyd(cents)
    shift = jnp.sum((new - cents) ** 2)
    return it + 1, new, shift, inertia

  init = (jnp.int32(0), cents, jnp.float32(jnp.inf), jnp.float32(jnp.inf))
  n_iter, cents, _, _ = jax.lax.while_loop(cond, body, init)
  labels, _, _, counts, inertia = _assign_local(x_nd, w_n, cents, chunk)
  counts = jax.lax.psum(counts, axis_name)
  inertia = jax.lax.psum(inertia, axis_name)
  return cents, labels, inertia, n_iter, counts


def data_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D mesh over all (or the given) devices with axis ``data``."""
  devices = list(jax.devices() if devices is None else devices)
  return jax.sharding.Mesh(np.asarray(devices), (DATA_AXIS,))


def _chunk_for(n_local: int, k: int, budget: int) -> int:
  chunk = max(1, budget // max(k, 1))
  return int(min(chunk, max(1, n_local)))


@functools.lru_cache(maxsize=32)
def _compiled(cfg: KMeansConfig, chunk: int, init_chunk: int, mesh: jax.sharding.Mesh):
  fn = functools.partial(_kmeans_shard, cfg=cfg, chunk=chunk, init_chunk=init_chunk,
                         axis_name=DATA_AXIS)
  rows, vec = P(DATA_AXIS, None), P(DATA_AXIS)
  sharded = jax.shard_map(
      fn, mesh=mesh,
      in_specs=(rows, vec, rows, vec, P(), P()),
      out_specs=(P(), vec, P(), P(), P()),
      check_vma=False)
  return jax.jit(sharded)


def _pad_rows(x: np.ndarray, w: np.ndarray, n_dev: int, k: int, budget: int):
  """Pad to ``n_dev * n_local`` rows with n_local a multiple of the chunk; returns chunk too."""
  n, d = x.shape
  n_local = -(-n // n_dev)
  chunk = _chunk_for(n_local, k, budget)
  n_local = -(-n_local // chunk) * chunk
  xp = np.zeros((n_local * n_dev, d), np.float32)
  xp[:n] = x
  wp = np.zeros((n_local * n_dev,), np.float32)
  wp[:n] = w
  return xp, wp, chunk


def kmeans(x, key: jax.Array, config: KMeansConfig, *, weights=None,
           mesh: jax.sharding.Mesh | None = None) -> KMeansResult:
  """Cluster ``x`` ``[N, d]`` into ``config.n_clusters`` clusters.

  Args:
    x: points, any float dtype (accumulated in float32).
    key: PRNG key; the result is a deterministic function of (x, key, config).
    config: :class:`KMeansConfig`.
    weights: optional ``[N]`` non-negative sample weights (0 = ignore the row).
    mesh: mesh with a ``data`` axis to shard points over (default: all devices).

  Raises:
    ValueError: on bad shapes, non-finite values or fewer points than clusters.
  """
  x = np.asarray(x) if not isinstance(x, jax.Array) else x
  if x.ndim != 2:
    raise ValueError(f"kmeans expects points of rank 2 [N, d], got shape {tuple(x.shape)}")
  n, d = x.shape
  k = int(config.n_clusters)
  w = np.ones((n,), np.float32) if weights is None else np.asarray(weights, np.float32)
  if w.shape != (n,):
    raise ValueError(f"weights must have shape ({n},), got {w.shape}")
  n_real = int(np.count_nonzero(w > 0))
  if k < 1 or n_real < k:
    raise ConfigError(f"need at least as many points as clusters: {n_real} points, {k} clusters")
  mesh = mesh or data_mesh()
  n_dev = mesh.shape[DATA_AXIS]
  x32 = np.asarray(x, np.float32)
  if not np.isfinite(x32).all():
    raise ValueError("kmeans input contains NaN or inf")
  xf, wf, chunk = _pad_rows(x32, w, n_dev, k, config.max_block_elements)
  # k-means++ on a random subset (same subset whatever the device count).
  real = np.flatnonzero(w > 0)
  n_init = n_real if config.init_sample_per_cluster is None else min(
      n_real, config.init_sample_per_cluster * k)
  if n_init < n_real:
    seed = int(np.asarray(jax.random.key_data(key)).ravel()[-1])
    pick = np.sort(np.random.default_rng(seed).choice(real, size=n_init, replace=False))
  else:
    pick = real
  xs, ws, init_chunk = _pad_rows(x32[pick], w[pick], n_dev, k,
                                 config.max_block_elements)
  mean_var = float(np.mean(np.var(x32[real], axis=0)))
  tol_abs = np.float32(config.tol * mean_var)
  rows, vec = NamedSharding(mesh, P(DATA_AXIS, None)), NamedSharding(mesh, P(DATA_AXIS))
  out = _compiled(config, chunk, init_chunk, mesh)(
      jax.device_put(xf, rows), jax.device_put(wf, vec), jax.device_put(xs, rows),
      jax.device_put(ws, vec), key, tol_abs)
  cents, labels, inertia, n_iter, counts = out
  return KMeansResult(centroids=cents, labels=labels[:n], inertia=inertia,
                      n_iter=n_iter, counts=counts)


@functools.partial(jax.jit, static_argnames=("chunk",))
def _predict(x, c, chunk):
  labels, mind, _, _, _ = _assign_local(x, jnp.ones(x.shape[:1], jnp.float32), c, chunk)
  return labels, mind


def predict(x, centroids, *, max_block_elements: int = 1 << 22):
  """Nearest centroid (labels int32 [N], squared distance [N]) for new points, chunked."""
  x = np.asarray(x, np.float32)
  c = jnp.asarray(centroids, jnp.float32)
  n = x.shape[0]
  chunk = _chunk_for(n, c.shape[0], max_block_elements)
  n_pad = -(-n // chunk) * chunk
  xp = np.zeros((n_pad, x.shape[1]), np.float32)
  xp[:n] = x
  labels, mind = _predict(jnp.asarray(xp), c, chunk)
  return np.asarray(labels[:n]), np.asarray(mind[:n])
