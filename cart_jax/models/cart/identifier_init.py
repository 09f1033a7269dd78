"""Start the decoder from the identifier space (GENIUS, CVPR 2025).

A freshly initialised decoder sees its identifier tokens as unrelated random
vectors, although the index already says how they relate: the level-0 token
``k`` stands for the K-Means centroid ``centroid[k]`` and a fine token ``v_m``
for the RQ-VAE codebook vector ``codebooks[m, v_m]``. This module writes that
geometry into the decoder's token table (and, optionally, into the matching
columns of the output projection) so that tokens whose vectors are close start
with similar embeddings.

* :func:`identifier_token_vectors` gives every decoder token its vector in the
  index's own spaces (and which tokens have one at all);
* :func:`projection_matrix` is the fixed seeded map from those spaces to ``d_model``;
* :func:`init_decoder_from_identifiers` writes the projected, rescaled vectors into
  a network's trainable-parameter pure dict (``nnx.to_pure_dict``).

Token vector layout (``d_emb`` columns). Centroids live in the embedding space
(``d = index.embedding_dim``) but RQ-VAE codebooks live in the RQ-VAE's latent space
(``rq_latent_dim``): two unrelated spaces. So the vectors are block-structured:

* columns ``[0, d)``: embedding space, used by the level-0 K-Means centroids and,
  for the hierarchical K-Means ablation (``use_rqvae=False``), by the fine levels
  (their centroids are residual vectors, also in the embedding space);
* columns ``[d, d + latent)`` (only with ``use_rqvae``): the RQ-VAE latent space,
  used by the fine levels' codebook vectors.

Each block is thus mapped by its own rows of the projection, and a block that an
index does not use (no K-Means and RQ-VAE: the embedding block) is left out.

Pure numpy plus the index objects; JAX is only touched to put updated arrays back
on the sharding of the arrays they replace. No gin, no TensorFlow.
"""
from __future__ import annotations

from typing import Any

import numpy as np


EMBED_KEY = ("decoder_embedder", "embedding")   # [vocab, d_model], init N(0, 1)
OUTPUT_KEY = ("logits_dense", "kernel")         # [d_model, vocab], init N(0, 1 / d_model)


# --------------------------------------------------------------------------- token vectors


def _blocks(index) -> tuple[int, int]:
  """(width of the embedding-space block, width of the RQ-VAE latent block)."""
  cfg = index.config
  emb = int(index.embedding_dim) if (cfg.use_kmeans or not cfg.use_rqvae) else 0
  lat = int(cfg.rq_latent_dim) if cfg.use_rqvae else 0
  return emb, lat


def _codebooks(index) -> np.ndarray:
  """RQ-VAE codebooks ``float32 [M, C, latent]`` from the index's flat parameter dict."""
  params = index.rqvae_params
  if params is None or "codebooks" not in params:
    raise ValueError("index has use_rqvae=True but no RQ-VAE 'codebooks' parameter")
  cbs = np.asarray(params["codebooks"], np.float32)
  cfg = index.config
  want = (cfg.num_levels, cfg.codebook_size, cfg.rq_latent_dim)
  if cbs.shape != want:
    raise ValueError(f"RQ-VAE codebooks have shape {cbs.shape}, expected {want}")
  return cbs


def token_levels(vocab) -> np.ndarray:
  """int32 ``[vocab_size]``: the level of every decoder token (-1 for the reserved ids)."""
  levels = np.full(vocab.vocab_size, -1, np.int32)
  for lvl, (off, size) in enumerate(zip(vocab.offsets, vocab.level_sizes)):
    levels[off:off + size] = lvl
  return levels


def identifier_token_vectors(index) -> tuple[np.ndarray, np.ndarray]:
  """Every decoder token's vector in the index's spaces.

  * level-0 token ``k`` (``use_kmeans``): the K-Means centroid ``centroids[k]``;
  * fine token ``v`` of fine level ``m``: the RQ-VAE codebook vector ``codebooks[m, v]``
    (latent space), or, for hierarchical K-Means (``use_rqvae=False``), the mean of code
    ``v``'s centroids over all the groups clustered at that level (no group clustered at
    that level: the level's tokens are unknown);
  * the counter level ``u`` and the reserved ids (PAD, START): unknown.

  Without K-Means (``use_kmeans=False``) level 0 is the first fine level.

  Returns:
    ``vectors float32 [vocab_size, d_emb]`` (block layout: see the module docstring;
    zero rows where unknown) and ``known bool [vocab_size]``.
  """
  cfg = index.config
  vocab = index.vocab
  emb_w, lat_w = _blocks(index)
  vectors = np.zeros((vocab.vocab_size, emb_w + lat_w), np.float32)
  known = np.zeros(vocab.vocab_size, bool)
  offsets, sizes = vocab.offsets, vocab.level_sizes
  level = 0
  if cfg.use_kmeans:
    cents = np.asarray(index.centroids, np.float32)
    if cents.ndim != 2 or cents.shape[1] != index.embedding_dim:
      raise ValueError(f"index centroids have shape {cents.shape}, expected [K, {index.embedding_dim}]")
    n = min(cents.shape[0], sizes[0])
    vectors[offsets[0]:offsets[0] + n, :emb_w] = cents[:n]
    known[offsets[0]:offsets[0] + n] = True
    level = 1
  if cfg.use_rqvae:
    cbs = _codebooks(index)
    for m in range(cfg.num_levels):
      off, n = offsets[level + m], min(cbs.shape[1], sizes[level + m])
      vectors[off:off + n, emb_w:] = cbs[m, :n]
      known[off:off + n] = True
  else:
    tables = index.hier_tables
    if tables is None or len(tables) != cfg.num_levels:
      raise ValueError("index has use_rqvae=False but no hierarchical K-Means table per fine level")
    for m, (_, gc) in enumerate(tables):
      gc = np.asarray(gc, np.float32)
      if gc.shape[0] == 0:  # every group small enough to take consecutive codes: no centroids
        continue
      mean = gc.mean(axis=0)  # [C, d]
      off, n = offsets[level + m], min(mean.shape[0], sizes[level + m])
      vectors[off:off + n, :emb_w] = mean[:n]
      known[off:off + n] = True
  return vectors, known


# --------------------------------------------------------------------------- projection


def projection_matrix(d_emb: int, d_model: int, seed: int) -> np.ndarray:
  """Fixed random orthonormal projection ``float32 [d_emb, d_model]`` drawn from ``seed``.

  ``d_emb <= d_model``: orthonormal rows (``P P^T = I``), so ``x P`` preserves every inner
  product, norm and cosine exactly. ``d_emb > d_model``: orthonormal columns, i.e. the
  coordinates of a uniformly random ``d_model``-dimensional subspace, which preserves
  cosines up to a Johnson-Lindenstrauss distortion of order ``1 / sqrt(d_model)``.
  (QR of a Gaussian matrix with the signs of ``diag(R)`` fixed: Haar distributed.)
  """
  if d_emb < 1 or d_model < 1:
    raise ValueError(f"projection needs positive sizes, got d_emb={d_emb}, d_model={d_model}")
  rng = np.random.default_rng(seed)
  g = rng.standard_normal((max(d_emb, d_model), min(d_emb, d_model)))
  q, r = np.linalg.qr(g)  # q: [max, min], orthonormal columns
  q = q * np.where(np.diag(r) < 0, -1.0, 1.0)[None, :]
  p = q.T if d_emb <= d_model else q  # [d_emb, d_model]
  return np.ascontiguousarray(p, np.float32)


def projected_token_vectors(index, d_model: int, seed: int, *, center: bool = True
                            ) -> tuple[np.ndarray, np.ndarray]:
  """Known tokens' vectors in ``d_model`` dims, before rescaling.

  With ``center``, each level's known vectors have their mean removed first (levels with
  at least two known tokens): sentence embeddings are anisotropic, so raw centroids share
  a large common direction and would start as near-parallel rows; the centred ones keep
  only what tells the tokens of a level apart (distances are unchanged).

  Returns ``projected float32 [vocab_size, d_model]`` (zero where unknown) and ``known``.
  """
  vectors, known = identifier_token_vectors(index)
  vectors = vectors.astype(np.float64)
  if center:
    levels = token_levels(index.vocab)
    for lvl in range(index.vocab.id_length):
      rows = np.flatnonzero(known & (levels == lvl))
      if rows.size >= 2:
        vectors[rows] -= vectors[rows].mean(axis=0, keepdims=True)
  proj = vectors @ projection_matrix(vectors.shape[1], d_model, seed).astype(np.float64)
  proj[~known] = 0.0
  return proj.astype(np.float32), known


# --------------------------------------------------------------------------- writing into params


def _get(params: dict, key: tuple[str, str]):
  try:
    return params[key[0]][key[1]]
  except (KeyError, TypeError) as e:
    raise KeyError(f"params lack {'/'.join(key)} (expected the network's nnx.to_pure_dict of "
                   f"trainable parameters)") from e


def _rms(a) -> float:
  if isinstance(a, np.ndarray):
    return float(np.sqrt(np.mean(np.square(a, dtype=np.float64))))
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return float(jnp.sqrt(jnp.mean(jnp.square(a.astype(jnp.float32)))))


def _set_rows(old, rows: np.ndarray, values: np.ndarray, axis: int):
  """``old`` with ``values`` written at ``rows`` along ``axis``; same type, dtype and sharding."""
  if isinstance(old, np.ndarray):
    new = old.copy()
    if axis == 0:
      new[rows] = values.astype(old.dtype)
    else:
      new[:, rows] = values.T.astype(old.dtype)
    return new
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  vals = jnp.asarray(values if axis == 0 else values.T, old.dtype)
  idx = jnp.asarray(rows, jnp.int32)
  new = old.at[idx].set(vals) if axis == 0 else old.at[:, idx].set(vals)
  return jax.device_put(new, old.sharding)


def init_decoder_from_identifiers(params: dict, index, *, d_model: int, seed: int,
                                  output: bool = False, scale: float | None = None,
                                  center: bool = True) -> tuple[dict, dict[str, Any]]:
  """Writes the identifier geometry into the decoder's token table (and output projection).

  Every known token (level-0 K-Means centroids, fine-level RQ-VAE codebook vectors or
  hierarchical K-Means mean centroids: :func:`identifier_token_vectors`) gets, as its
  decoder embedding row, its vector (centred per level with ``center``) mapped to
  ``d_model`` by the fixed orthonormal projection :func:`projection_matrix` (``seed``),
  rescaled so the row's RMS equals the table's: ``scale`` if given, else the RMS of the
  table as it is (its random init, ``N(0, 1)``: RMS ~1), so the decoder's input scale and
  training dynamics stay those of the random init. Unknown tokens (PAD, START, counter
  level) keep their rows.

  Why a random orthonormal projection rather than PCA: it is data-independent (a token's
  row depends on its own vector only, not on which other tokens the vocabulary holds), it
  is an exact isometry when ``d_emb <= d_model`` and a Johnson-Lindenstrauss map otherwise,
  and it treats the two blocks (embedding space, RQ-VAE latent space) alike, whereas PCA
  over mixed spaces would let whichever level has the largest vectors take the leading
  directions. Only cosines within a level carry meaning; the per-row rescaling removes
  the different norms of centroids and codebook vectors.

  With ``output=True`` the same unit directions also go into the known tokens' columns of
  the output projection ``logits_dense/kernel [d_model, vocab]``, with the column RMS of
  that kernel (its init ``N(0, 1 / d_model)``), so a decoder state close to a token's
  embedding direction scores that token and its neighbours higher from step 0.

  Args:
    params: the network's trainable parameters as a pure nested dict
      (``nnx.to_pure_dict``); numpy or (sharded) JAX arrays. Not modified.
    index: a :class:`cart_jax.index.identifiers.SemanticIndex`.
    d_model: the decoder width (``ModelConfig.d_model``).
    seed: seed of the projection; the result is a deterministic function of
      ``(params, index, d_model, seed, output, scale, center)``.
    output: also initialise the output projection's columns.
    scale: per-entry RMS of the written embedding rows; ``None`` = the table's RMS.
    center: subtract each level's mean vector first (see :func:`projected_token_vectors`).

  Returns:
    ``(new params, info)``: a new dict (only the touched sub-dicts are copied; every array
    keeps its dtype and, for JAX arrays, its sharding) and diagnostics ``info`` with
    ``rows_per_level`` (rows set per identifier level, the counter level's is 0),
    ``rows_set``, ``skipped`` (known tokens whose centred vector was zero: kept random),
    ``scale`` (embedding row RMS used), ``output_scale`` (output column RMS used, None
    without ``output``), ``d_emb``, ``projection`` and ``center``.
  """
  vocab = index.vocab
  table = _get(params, EMBED_KEY)
  if len(table.shape) != 2 or table.shape[1] != d_model:
    raise ValueError(f"decoder_embedder/embedding has shape {tuple(table.shape)}, expected "
                     f"[vocab, d_model={d_model}]")
  if table.shape[0] < vocab.vocab_size:
    raise ValueError(f"decoder token table has {table.shape[0]} rows, the index vocabulary needs "
                     f"{vocab.vocab_size}")
  kernel = None
  if output:
    kernel = _get(params, OUTPUT_KEY)
    if tuple(kernel.shape) != (d_model, table.shape[0]):
      raise ValueError(f"logits_dense/kernel has shape {tuple(kernel.shape)}, expected "
                       f"({d_model}, {table.shape[0]})")

  proj, known = projected_token_vectors(index, d_model, seed, center=center)
  norms = np.linalg.norm(proj.astype(np.float64), axis=1)
  eps = 1e-6 * max(float(norms.max(initial=0.0)), 1e-30)
  settable = known & (norms > eps)
  rows = np.flatnonzero(settable)
  unit = proj[rows].astype(np.float64) / norms[rows, None]  # [n, d_model], unit rows
  # A unit row has RMS 1 / sqrt(d_model): times scale * sqrt(d_model) gives RMS = scale.
  emb_scale = float(scale) if scale is not None else _rms(table)
  new_embed = _set_rows(table, rows, unit * emb_scale * np.sqrt(d_model), axis=0)

  new_params = dict(params)
  new_params[EMBED_KEY[0]] = {**params[EMBED_KEY[0]], EMBED_KEY[1]: new_embed}
  out_scale = None
  if output:
    out_scale = _rms(kernel)
    new_kernel = _set_rows(kernel, rows, unit * out_scale * np.sqrt(d_model), axis=1)
    new_params[OUTPUT_KEY[0]] = {**params[OUTPUT_KEY[0]], OUTPUT_KEY[1]: new_kernel}

  levels = token_levels(vocab)
  info = {
      "rows_per_level": [int(np.sum(settable & (levels == lvl))) for lvl in range(vocab.id_length)],
      "rows_set": int(rows.size),
      "skipped": int(np.sum(known & ~settable)),
      "scale": emb_scale,
      "output_scale": out_scale,
      "d_emb": int(sum(_blocks(index))),
      "projection": "orthonormal",
      "center": bool(center),
  }
  return new_params, info
