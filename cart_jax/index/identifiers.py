"""Semantic identifiers ``(k, v1..vM, u)`` and the on-disk index artefact.

* ``k``: K-Means cluster of the item embedding (coarse token).
* ``v1..vM``: RQ-VAE codes of the residual ``e - centroid[k]`` (fine tokens).
* ``u``: counter from a prefix database: how many earlier items share
  ``(k, v1..vM)``; 0 for the first. Always emitted, so ``L = M + 2``.

Ablations (the paper's Table 4) are switches of :class:`IdentifierConfig`:
``use_kmeans=False`` drops ``k`` and runs the RQ-VAE on the raw embedding
(``L = M + 1``); ``use_rqvae=False`` replaces the RQ-VAE by hierarchical K-Means
(each group of items sharing a prefix is clustered into ``C`` children; groups of
at most ``C`` items take consecutive codes and stop splitting).

:class:`SemanticIndex` is the artefact every later stage consumes: codes
``int32 [N, L]``, item ids, the vocabulary layout, centroids, RQ-VAE parameters,
the config and a hash of the inputs. ``save`` is atomic, ``load`` validates, and
``assign`` gives identifiers to new items without changing existing ones.

Removed items (``remove``, ``cart index remove``) leave the index's rows and become tombstones:
``removed_codes.npy`` (int32 ``[R, L]``) and ``removed_item_ids.txt`` (written only when there
are any). ``assign`` never gives a tombstoned identifier to a new item (the counters of a prefix
continue after every identifier it ever held), so a decoder that still remembers a removed
identifier can only generate what the trie allows, never a new item under an old name.

Integrity of the directory: ``meta.json`` lists the SHA-256 of every other file (``files``) and
``meta.sha256`` holds the SHA-256 of ``meta.json`` itself (``sha256sum -c meta.sha256`` checks
it). :func:`load_index` checks ``meta.json`` against ``meta.sha256``, every listed file against
its hash, and that every file of the directory is listed and every file the config needs is
there: an edited ``meta.json``, a removed entry, an added or a missing file is an
:class:`IndexFormatError` naming the file. An index written before ``meta.sha256`` existed (its
``meta.json`` does not name it in ``integrity``) loads with a warning line on stderr.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from flax import nnx

from cart_jax.index import kmeans as kmeans_lib
from cart_jax.index import rqvae as rqvae_lib
from cart_jax.core.artefacts import atomic_directory, sha256_file
from cart_jax.index.inputs import InputError, check_ids, content_hash, load_item_ids, validate_embeddings
from cart_jax.index.vocab import IdentifierVocab

FORMAT_NAME = "cart-jax-semantic-index"
FORMAT_VERSION = 1
META_FILE = "meta.json"
META_HASH_FILE = "meta.sha256"  # "<sha256 of meta.json>  meta.json", as sha256sum writes it
REMOVED_CODES_FILE = "removed_codes.npy"  # tombstones (see the module docstring)
REMOVED_IDS_FILE = "removed_item_ids.txt"
LOG_PRIOR_FILE = "item_log_prior.npy"  # optional decode-time log-prior per item (module docstring)

ProgressFn = Callable[[str, int, int], None]  # (phase, done, total)


@dataclasses.dataclass(frozen=True)
class IdentifierConfig:
  """How identifiers are built.

  Attributes:
    n_clusters: K, clusters of the coarse token.
    num_levels: M, fine levels.
    codebook_size: C, codes per fine level.
    use_kmeans: False = "w/o K-Means" ablation.
    use_rqvae: False = "w/o RQ-VAE" ablation (hierarchical K-Means).
    kmeans_iters / kmeans_tol: Lloyd cap and tolerance.
    rq_latent_dim, rq_hidden_dims, rq_steps, rq_batch_size, rq_beta, rq_learning_rate:
      RQ-VAE settings (see :class:`cart_jax.index.rqvae.RQVAEConfig`).
    seed: PRNG seed; the index is a deterministic function of (inputs, config).
  """
  n_clusters: int = 256
  num_levels: int = 3
  codebook_size: int = 256
  use_kmeans: bool = True
  use_rqvae: bool = True
  kmeans_iters: int = 100
  kmeans_tol: float = 1e-4
  rq_latent_dim: int = 64
  rq_hidden_dims: tuple[int, ...] = (256, 128)
  rq_steps: int = 1000
  rq_batch_size: int = 1024
  rq_beta: float = 0.25
  rq_learning_rate: float = 3e-3
  seed: int = 0

  @property
  def id_length(self) -> int:
    return self.num_levels + (2 if self.use_kmeans else 1)

  def rq_config(self, input_dim: int) -> rqvae_lib.RQVAEConfig:
    return rqvae_lib.RQVAEConfig(
        input_dim=input_dim, latent_dim=self.rq_latent_dim, hidden_dims=tuple(self.rq_hidden_dims),
        num_levels=self.num_levels, codebook_size=self.codebook_size, beta=self.rq_beta,
        learning_rate=self.rq_learning_rate, steps=self.rq_steps, batch_size=self.rq_batch_size)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["rq_hidden_dims"] = list(self.rq_hidden_dims)
    return d

  @classmethod
  def from_dict(cls, d: dict) -> "IdentifierConfig":
    d = dict(d)
    d["rq_hidden_dims"] = tuple(d.get("rq_hidden_dims", (256, 128)))
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
      raise IndexFormatError(f"unknown identifier config fields {sorted(unknown)}")
    return cls(**d)


# --------------------------------------------------------------------------- counters


def assign_counters(prefixes: np.ndarray, start_counts: dict[bytes, int] | None = None) -> np.ndarray:
  """Counter ``u`` per row: rank of the row among rows with the same prefix (stable order).

  ``start_counts`` maps a prefix (``row.tobytes()`` of int32) to how many items
  already hold it, so new items continue after existing ones.
  """
  prefixes = np.ascontiguousarray(prefixes, dtype=np.int32)
  n = prefixes.shape[0]
  if n == 0:
    return np.zeros((0,), np.int32)
  if prefixes.shape[1] == 0:
    base = 0 if not start_counts else start_counts.get(b"", 0)
    return (base + np.arange(n)).astype(np.int32)
  order = np.lexsort(prefixes.T[::-1])  # stable: equal prefixes keep input order
  sp = prefixes[order]  # [N, L-1]
  new_group = np.ones(n, bool)
  new_group[1:] = np.any(sp[1:] != sp[:-1], axis=1)
  group_start = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
  rank = np.arange(n) - group_start
  if start_counts:
    starts = np.flatnonzero(new_group)
    offsets = np.array([start_counts.get(sp[s].tobytes(), 0) for s in starts], np.int64)
    rank = rank + np.repeat(offsets, np.diff(np.append(starts, n)))
  u = np.empty(n, np.int64)
  u[order] = rank
  return u.astype(np.int32)


def prefix_counts(codes: np.ndarray) -> dict[bytes, int]:
  """The prefix database: prefix -> number of items holding it (= next free counter)."""
  prefixes = np.ascontiguousarray(codes[:, :-1], dtype=np.int32)
  if prefixes.shape[0] == 0:
    return {}
  uniq, counts = np.unique(prefixes, axis=0, return_counts=True)
  nxt = {}
  # next counter = max existing counter + 1 (equals the count when nothing was removed)
  u_max = {}
  for row, u in zip(prefixes, codes[:, -1]):
    key = row.tobytes()
    u_max[key] = max(u_max.get(key, -1), int(u))
  for row, c in zip(uniq, counts):
    key = np.ascontiguousarray(row, np.int32).tobytes()
    nxt[key] = max(int(c), u_max[key] + 1)
  return nxt


def collision_stats(codes: np.ndarray) -> dict:
  prefixes = codes[:, :-1]
  if prefixes.shape[1] == 0:
    uniq_n, counts = 1, np.array([codes.shape[0]])
  else:
    _, inv, counts = np.unique(prefixes, axis=0, return_inverse=True, return_counts=True)
    uniq_n = counts.shape[0]
  shared = counts[counts > 1].sum() if counts.size else 0
  n = max(codes.shape[0], 1)
  return {"collision_rate": float(shared / n), "max_counter": int(codes[:, -1].max(initial=0)),
          "unique_prefixes": int(uniq_n)}


# --------------------------------------------------------------------------- hierarchical K-Means


def _bucket(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def _hier_kmeans(res: np.ndarray, parents: np.ndarray, cfg: IdentifierConfig, key,
                 progress: ProgressFn | None):
  """Hierarchical K-Means over ``num_levels`` levels within parent groups.

  Returns codes [N, M], the centroid table (for every clustered group, its
  prefix (parent codes) and C centroids, per level) and the mean squared residual
  left after each level.
  """
  n, d = res.shape
  c = cfg.codebook_size
  codes = np.zeros((n, cfg.num_levels), np.int32)
  res = res.astype(np.float32).copy()
  tables, mse = [], []
  prefix = parents.reshape(n, -1).astype(np.int32)
  mesh = kmeans_lib.data_mesh(jax.devices()[:1])
  for m in range(cfg.num_levels):
    if prefix.shape[1]:
      uniq, inv = np.unique(prefix, axis=0, return_inverse=True)
      inv = inv.reshape(-1)
    else:
      uniq, inv = np.zeros((1, 0), np.int32), np.zeros(n, np.int64)
    order = np.argsort(inv, kind="stable")
    bounds = np.searchsorted(inv[order], np.arange(uniq.shape[0] + 1))
    grp_prefix, grp_cents = [], []
    for g in range(uniq.shape[0]):
      rows = order[bounds[g]:bounds[g + 1]]
      if rows.size > c:
        size = _bucket(rows.size)
        xg = np.zeros((size, d), np.float32)
        xg[:rows.size] = res[rows]
        wg = np.zeros((size,), np.float32)
        wg[:rows.size] = 1.0
        km = kmeans_lib.kmeans(xg, jax.random.fold_in(key, m * 1_000_003 + g),
                               kmeans_lib.KMeansConfig(c, max_iters=cfg.kmeans_iters, tol=cfg.kmeans_tol),
                               weights=wg, mesh=mesh)
        lab = np.asarray(km.labels)[:rows.size]
        cents = np.asarray(km.centroids)
        codes[rows, m] = lab
        res[rows] -= cents[lab]
        grp_prefix.append(uniq[g])
        grp_cents.append(cents)
      else:  # small group: consecutive codes, no further splitting needed
        codes[rows, m] = np.arange(rows.size)
        res[rows] = 0.0
      if progress is not None:
        progress(f"hierarchical k-means level {m + 1}", g + 1, uniq.shape[0])
    tables.append((np.asarray(grp_prefix, np.int32).reshape(len(grp_prefix), prefix.shape[1]),
                   np.asarray(grp_cents, np.float32).reshape(len(grp_cents), c, d)))
    mse.append(float(np.mean(res.astype(np.float64) ** 2)))
    prefix = np.concatenate([prefix, codes[:, m:m + 1]], axis=1)
  return codes, tables, mse


def _hier_assign(res: np.ndarray, parents: np.ndarray, tables) -> np.ndarray:
  """Codes of new items under a hierarchical K-Means tree (0 in unclustered groups)."""
  n = res.shape[0]
  res = res.astype(np.float32).copy()
  prefix = parents.reshape(n, -1).astype(np.int32)
  codes = np.zeros((n, len(tables)), np.int32)
  for m, (gp, gc) in enumerate(tables):
    lookup = {row.tobytes(): i for i, row in enumerate(np.ascontiguousarray(gp, np.int32))}
    for i in range(n):
      g = lookup.get(np.ascontiguousarray(prefix[i], np.int32).tobytes())
      if g is None:
        res[i] = 0.0
        continue
      d2 = ((gc[g] - res[i][None]) ** 2).sum(-1)
      codes[i, m] = int(d2.argmin())
      res[i] -= gc[g][codes[i, m]]
    prefix = np.concatenate([prefix, codes[:, m:m + 1]], axis=1)
  return codes


# --------------------------------------------------------------------------- the index


@dataclasses.dataclass
class SemanticIndex:
  """Identifiers for a corpus plus everything needed to assign new ones."""
  codes: np.ndarray                     # int32 [N, L] level-local codes
  item_ids: list[str]                   # row i <-> codes[i]
  vocab: IdentifierVocab
  config: IdentifierConfig
  embedding_dim: int
  input_hash: str
  centroids: np.ndarray | None = None   # float32 [K, d] (use_kmeans)
  rqvae_params: dict | None = None      # flat name -> array (use_rqvae)
  residual_scale: float = 1.0           # RQ-VAE input = residual / residual_scale
  hier_tables: list | None = None       # [(group prefixes [G, m], centroids [G, C, d])] (not use_rqvae)
  stats: dict = dataclasses.field(default_factory=dict)
  removed_codes: np.ndarray | None = None  # int32 [R, L] tombstones: identifiers of removed items
  removed_item_ids: list[str] = dataclasses.field(default_factory=list)  # row r <-> removed_codes[r]
  log_prior: np.ndarray | None = None   # float32 [N] decode-time offset per item (None: all 0)

  @property
  def n_items(self) -> int:
    return int(self.codes.shape[0])

  @property
  def id_length(self) -> int:
    return int(self.codes.shape[1])

  def row_of(self) -> dict[str, int]:
    return {item: i for i, item in enumerate(self.item_ids)}

  def prior(self) -> np.ndarray:
    """The decode-time log-prior offset of every row, float32 ``[N]`` (zeros when none is set)."""
    if self.log_prior is None:
      return np.zeros(self.n_items, np.float32)
    return np.asarray(self.log_prior, np.float32)

  def with_prior(self, rows: np.ndarray, values: np.ndarray | float) -> "SemanticIndex":
    """The index with the log-prior offsets of ``rows`` set to ``values`` (finite, <= 0 each)."""
    values = np.broadcast_to(np.asarray(values, np.float32), np.shape(rows))
    if not np.isfinite(values).all() or (values > 0).any():
      raise InputError(f"item log-prior offsets must be finite and <= 0, got {values[:5]}")
    prior = self.prior().copy()
    prior[np.asarray(rows, np.int64)] = values
    return dataclasses.replace(self, log_prior=prior if prior.any() else None)

  # ---- encoding of (new) embeddings into prefixes
  def _prefixes(self, emb: np.ndarray, chunk: int = 65536) -> np.ndarray:
    emb = np.asarray(emb, np.float32)
    parts = []
    if self.config.use_kmeans:
      k, _ = kmeans_lib.predict(emb, self.centroids)
      res = emb - self.centroids[k]
      parts.append(k[:, None].astype(np.int32))
    else:
      k, res = None, emb
    if self.config.use_rqvae:
      model = rqvae_lib.load_state_dict(self.config.rq_config(self.embedding_dim), self.rqvae_params)
      fine = []
      for s in range(0, res.shape[0], chunk):
        fine.append(np.asarray(model.encode_codes(res[s:s + chunk] / self.residual_scale)))
      parts.append(np.concatenate(fine).astype(np.int32))
    else:
      parents = k[:, None] if k is not None else np.zeros((res.shape[0], 0), np.int32)
      parts.append(_hier_assign(res, parents, self.hier_tables))
    return np.concatenate(parts, axis=1)

  def assign(self, embeddings: np.ndarray, item_ids: list[str]) -> tuple["SemanticIndex", np.ndarray]:
    """Identifiers for items not seen at build time; existing identifiers never change.

    Returns the extended index (rows appended) and the new items' codes ``[n, L]``.
    The counter level's size grows if a prefix needs a larger counter (then the
    decoder vocabulary grows too: ``index.vocab`` tells). Tombstoned identifiers (of removed
    items) are never reused: counters continue after them.
    """
    validate_embeddings(np.asarray(embeddings), source="new embeddings")
    if embeddings.shape[1] != self.embedding_dim:
      raise InputError(f"new embeddings have dimension {embeddings.shape[1]}, the index was built "
                       f"for {self.embedding_dim}")
    check_ids(list(item_ids), embeddings.shape[0], source="new item ids")
    clash = set(item_ids) & set(self.item_ids)
    if clash:
      raise InputError(f"item ids already in the index: {sorted(clash)[:5]}")
    prefixes = self._prefixes(embeddings)
    used = self.codes if self.removed_codes is None else np.concatenate([self.codes, self.removed_codes])
    u = assign_counters(prefixes, prefix_counts(used))
    new_codes = np.concatenate([prefixes, u[:, None]], axis=1).astype(np.int32)
    all_codes = np.concatenate([self.codes, new_codes], axis=0)
    sizes = list(self.vocab.level_sizes)
    sizes[-1] = max(sizes[-1], int(u.max(initial=0)) + 1)
    prior = (None if self.log_prior is None else
             np.concatenate([self.prior(), np.zeros(len(item_ids), np.float32)]))
    new = dataclasses.replace(self, codes=all_codes, item_ids=list(self.item_ids) + list(item_ids),
                              vocab=IdentifierVocab(tuple(sizes)), log_prior=prior,
                              stats={**self.stats, **collision_stats(all_codes),
                                     "n_items": int(all_codes.shape[0]), "assigned_after_build": int(
                                         self.stats.get("assigned_after_build", 0) + len(item_ids))})
    return new, new_codes

  def remove(self, item_ids: list[str]) -> "SemanticIndex":
    """The index without ``item_ids``: their rows become tombstones (never assigned again).

    Raises InputError for an id that is not in the index, an id given twice, or removing
    every item (a trie needs at least one identifier). The vocabulary does not shrink.
    """
    item_ids = list(item_ids)
    row_of = self.row_of()
    seen: set[str] = set()
    for i, item in enumerate(item_ids):
      if item not in row_of:
        raise InputError(f"item id {item!r} (#{i + 1} of the ids to remove) is not in the index")
      if item in seen:
        raise InputError(f"item id {item!r} is listed twice among the ids to remove")
      seen.add(item)
    if not item_ids:
      raise InputError("no item ids to remove")
    if len(seen) >= self.n_items:
      raise InputError(f"removing all {self.n_items} items would leave an empty index")
    gone = np.asarray(sorted(row_of[i] for i in item_ids), np.int64)  # [R]
    keep = np.ones(self.n_items, bool)
    keep[gone] = False
    old_removed = (self.removed_codes if self.removed_codes is not None
                   else np.zeros((0, self.id_length), np.int32))
    codes = np.ascontiguousarray(self.codes[keep])
    return dataclasses.replace(
        self, codes=codes, item_ids=[i for i, k in zip(self.item_ids, keep) if k],
        log_prior=None if self.log_prior is None else self.prior()[keep],
        removed_codes=np.concatenate([old_removed, self.codes[gone]]).astype(np.int32),
        removed_item_ids=list(self.removed_item_ids) + [self.item_ids[r] for r in gone],
        stats={**self.stats, **collision_stats(codes), "n_items": int(codes.shape[0]),
               "n_removed": len(self.removed_item_ids) + int(gone.size)})

  # ---- artefact
  def save(self, directory: str | os.PathLike) -> Path:
    """Write the index directory atomically (temporary sibling, then rename)."""
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
      np.save(tmp / "codes.npy", np.ascontiguousarray(self.codes, np.int32))
      (tmp / "item_ids.txt").write_text("\n".join(self.item_ids) + "\n", encoding="utf-8")
      if self.centroids is not None:
        np.save(tmp / "centroids.npy", np.asarray(self.centroids, np.float32))
      if self.rqvae_params is not None:
        np.savez(tmp / "rqvae.npz", **self.rqvae_params)
      if self.hier_tables is not None:
        arrays = {}
        for m, (gp, gc) in enumerate(self.hier_tables):
          arrays[f"prefix_{m}"] = gp
          arrays[f"centroids_{m}"] = gc
        np.savez(tmp / "hierarchical_kmeans.npz", **arrays)
      if self.removed_codes is not None and len(self.removed_codes):
        np.save(tmp / REMOVED_CODES_FILE, np.ascontiguousarray(self.removed_codes, np.int32))
        (tmp / REMOVED_IDS_FILE).write_text("\n".join(self.removed_item_ids) + "\n", encoding="utf-8")
      if self.log_prior is not None and np.asarray(self.log_prior).any():
        np.save(tmp / LOG_PRIOR_FILE, self.prior())
      files = sorted(p.name for p in tmp.iterdir())
      meta = {
          "format": FORMAT_NAME, "version": FORMAT_VERSION,
          "n_items": self.n_items, "id_length": self.id_length,
          "vocab": self.vocab.to_dict(), "embedding_dim": self.embedding_dim,
          "config": self.config.to_dict(), "residual_scale": self.residual_scale,
          "input_hash": self.input_hash, "stats": self.stats,
          "files": {name: sha256_file(tmp / name) for name in files},
          "integrity": META_HASH_FILE,
      }
      (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
      (tmp / META_HASH_FILE).write_text(f"{sha256_file(tmp / META_FILE)}  {META_FILE}\n",
                                        encoding="utf-8")
    return directory

  @classmethod
  def load(cls, directory: str | os.PathLike, embeddings: np.ndarray | None = None) -> "SemanticIndex":
    """Load and validate an index directory (optionally against the embeddings it was built from)."""
    return load_index(directory, embeddings)


class IndexFormatError(InputError):
  """An index directory that is missing, corrupt or from another version."""


_META_KEYS = ("format", "version", "n_items", "id_length", "vocab", "embedding_dim", "config",
              "residual_scale", "input_hash", "files")


def required_files(cfg: IdentifierConfig) -> list[str]:
  """The files an index built with ``cfg`` must have (besides meta.json and meta.sha256)."""
  return (["codes.npy", "item_ids.txt"] + (["centroids.npy"] if cfg.use_kmeans else [])
          + (["rqvae.npz"] if cfg.use_rqvae else ["hierarchical_kmeans.npz"]))


def _check_meta_hash(d: Path, meta_path: Path) -> bool:
  """meta.json against meta.sha256; False when there is no meta.sha256."""
  hash_path = d / META_HASH_FILE
  if not hash_path.exists():
    return False
  try:
    line = hash_path.read_text(encoding="utf-8")
  except (OSError, UnicodeDecodeError) as e:
    raise IndexFormatError(f"{hash_path}: unreadable ({e})") from None
  m = re.fullmatch(r"([0-9a-f]{64}) [ *]" + re.escape(META_FILE) + r"\n?", line)
  if m is None:
    raise IndexFormatError(f"{hash_path}: expected one line '<sha256 hex>  {META_FILE}', found "
                           f"{line[:80]!r}")
  got = sha256_file(meta_path)
  if got != m.group(1):
    raise IndexFormatError(f"{meta_path}: content does not match {META_HASH_FILE} (sha256 "
                           f"{got[:16]}..., expected {m.group(1)[:16]}...): meta.json was edited or "
                           "is corrupt")
  return True


def load_index(directory: str | os.PathLike, embeddings: np.ndarray | None = None) -> SemanticIndex:
  d = Path(directory)
  meta_path = d / META_FILE
  if not meta_path.exists():
    raise IndexFormatError(f"{d}: not an index directory (no meta.json)")
  try:
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise IndexFormatError(f"{meta_path}: unreadable ({e})") from None
  if not isinstance(meta, dict):
    raise IndexFormatError(f"{meta_path}: expected a JSON object, found {type(meta).__name__}")
  if meta.get("format") != FORMAT_NAME:
    raise IndexFormatError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT_NAME!r}")
  if meta.get("version") != FORMAT_VERSION:
    raise IndexFormatError(f"{meta_path}: index format version {meta.get('version')}, this cart-jax "
                           f"reads version {FORMAT_VERSION}; rebuild it with `cart build-ids`")
  hashed = _check_meta_hash(d, meta_path)  # after the version (an older/newer index says so)
  missing = [k for k in _META_KEYS if k not in meta]
  if missing:
    raise IndexFormatError(f"{meta_path}: missing field(s) {missing}")
  if not hashed:
    if meta.get("integrity") == META_HASH_FILE:
      raise IndexFormatError(f"{d / META_HASH_FILE}: missing (meta.json says the index was written "
                             f"with it); the index cannot be verified: rebuild it with `cart build-ids`")
    print(f"warning: {d}: no {META_HASH_FILE} (an index written before cart-jax hashed meta.json): "
          "meta.json itself is not verified", file=sys.stderr)
  files = meta["files"]
  if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
    raise IndexFormatError(f"{meta_path}: 'files' must map file names to sha256 hex digests")
  for entry in sorted(os.listdir(d)):
    if entry not in (META_FILE, META_HASH_FILE) and entry not in files:
      raise IndexFormatError(f"{d / entry}: not listed in meta.json's files (every file of an index "
                             "directory is hashed there: an added file, or an entry removed)")
  for name, digest in files.items():
    p = d / name
    if name in (META_FILE, META_HASH_FILE) or "/" in name or name.startswith("."):
      raise IndexFormatError(f"{meta_path}: 'files' lists {name!r}, not a data file of the index")
    if not p.is_file():
      raise IndexFormatError(f"{p}: missing (meta.json lists it)")
    got = sha256_file(p)
    if got != digest:
      raise IndexFormatError(f"{p}: content does not match meta.json (sha256 {got[:16]}..., expected "
                             f"{digest[:16]}...): the file is corrupt or was modified")
  try:
    cfg = IdentifierConfig.from_dict(meta["config"])
  except IndexFormatError as e:
    raise IndexFormatError(f"{meta_path}: {e}") from None
  for name in required_files(cfg):
    if name not in files:
      raise IndexFormatError(f"{meta_path}: 'files' has no entry for {name}, which this index's "
                             "config needs (an entry and its file removed)")
  vocab = IdentifierVocab.from_dict(meta["vocab"])
  codes = np.load(d / "codes.npy", allow_pickle=False)
  if codes.dtype != np.int32 or codes.ndim != 2:
    raise IndexFormatError(f"{d / 'codes.npy'}: expected int32 [N, L], found {codes.dtype} {codes.shape}")
  n, L = codes.shape
  if n != meta["n_items"] or L != meta["id_length"] or L != vocab.id_length or L != cfg.id_length:
    raise IndexFormatError(f"{d}: codes shape {codes.shape} disagrees with meta.json "
                           f"(n_items {meta['n_items']}, id_length {meta['id_length']}, vocab levels "
                           f"{vocab.id_length})")
  bad = (codes < 0) | (codes >= np.asarray(vocab.level_sizes))
  if bad.any():
    row, lvl = (int(i) for i in np.argwhere(bad)[0])
    raise IndexFormatError(f"{d / 'codes.npy'}: code {int(codes[row, lvl])} at row {row}, level {lvl} "
                           f"out of range [0, {vocab.level_sizes[lvl]})")
  try:
    ids = load_item_ids(d / "item_ids.txt")  # the one id rule, lines split at \n only
    check_ids(ids, n, source=str(d / "item_ids.txt"))
  except InputError as e:
    raise IndexFormatError(str(e)) from e
  if np.unique(codes, axis=0).shape[0] != n:
    raise IndexFormatError(f"{d / 'codes.npy'}: identifiers are not unique")
  centroids = rq = tables = None
  dim = int(meta["embedding_dim"])
  removed, removed_ids = _load_tombstones(d, files, codes, vocab)
  log_prior = None
  if LOG_PRIOR_FILE in files:
    log_prior = np.load(d / LOG_PRIOR_FILE, allow_pickle=False)
    if log_prior.dtype != np.float32 or log_prior.shape != (n,):
      raise IndexFormatError(f"{d / LOG_PRIOR_FILE}: expected float32 [{n}], found "
                             f"{log_prior.dtype} {log_prior.shape}")
    if not np.isfinite(log_prior).all() or (log_prior > 0).any():
      raise IndexFormatError(f"{d / LOG_PRIOR_FILE}: offsets must be finite and <= 0")
  if cfg.use_kmeans:
    centroids = np.load(d / "centroids.npy", allow_pickle=False)
    if centroids.shape != (cfg.n_clusters, dim):
      raise IndexFormatError(f"{d / 'centroids.npy'}: shape {centroids.shape}, expected "
                             f"({cfg.n_clusters}, {dim})")
  if cfg.use_rqvae:
    with np.load(d / "rqvae.npz", allow_pickle=False) as z:
      rq = {k: z[k] for k in z.keys()}
    want = rqvae_lib.state_dict(rqvae_lib.RQVAE(cfg.rq_config(dim), rngs=nnx.Rngs(params=0)))
    for key, arr in want.items():
      if key not in rq or rq[key].shape != arr.shape:
        found = rq[key].shape if key in rq else "missing"
        raise IndexFormatError(f"{d / 'rqvae.npz'}: RQ-VAE parameter {key!r} is {found}, "
                               f"expected shape {arr.shape}")
  else:
    with np.load(d / "hierarchical_kmeans.npz", allow_pickle=False) as z:
      tables = [(z[f"prefix_{m}"], z[f"centroids_{m}"]) for m in range(cfg.num_levels)]
  if embeddings is not None:
    h = content_hash(np.asarray(embeddings), ids[:embeddings.shape[0]])
    if h != meta["input_hash"]:
      raise IndexFormatError(f"{d}: built from other embeddings (input hash {meta['input_hash']}, "
                             f"given {h})")
  return SemanticIndex(codes=codes, item_ids=ids, vocab=vocab, config=cfg, embedding_dim=dim,
                       input_hash=meta["input_hash"], centroids=centroids, rqvae_params=rq,
                       residual_scale=float(meta["residual_scale"]), hier_tables=tables,
                       stats=meta.get("stats", {}), removed_codes=removed, removed_item_ids=removed_ids,
                       log_prior=log_prior)


def _load_tombstones(d: Path, files: dict, codes: np.ndarray, vocab: IdentifierVocab):
  """``(removed codes [R, L] or None, removed ids)`` of an index directory, validated."""
  has = [name in files for name in (REMOVED_CODES_FILE, REMOVED_IDS_FILE)]
  if not any(has):
    return None, []
  if not all(has):
    missing = REMOVED_IDS_FILE if has[0] else REMOVED_CODES_FILE
    raise IndexFormatError(f"{d / missing}: missing (the index has tombstones of removed items; "
                           "their codes and ids go together)")
  removed = np.load(d / REMOVED_CODES_FILE, allow_pickle=False)
  if removed.dtype != np.int32 or removed.ndim != 2 or removed.shape[1] != codes.shape[1]:
    raise IndexFormatError(f"{d / REMOVED_CODES_FILE}: expected int32 [R, {codes.shape[1]}], found "
                           f"{removed.dtype} {removed.shape}")
  if ((removed < 0) | (removed >= np.asarray(vocab.level_sizes))).any():
    raise IndexFormatError(f"{d / REMOVED_CODES_FILE}: a code out of the vocabulary's range")
  if np.unique(np.concatenate([codes, removed]), axis=0).shape[0] != codes.shape[0] + removed.shape[0]:
    raise IndexFormatError(f"{d / REMOVED_CODES_FILE}: a removed identifier is listed twice or is "
                           "still held by an item")
  from cart_jax.core.ids import check_item_id, read_id_lines  # pylint: disable=g-import-not-at-top
  path = d / REMOVED_IDS_FILE
  # An id may be listed twice (removed, added again with a new identifier, removed again).
  ids = [check_item_id(item, f"{path}:{i}", IndexFormatError)
         for i, item in read_id_lines(path, IndexFormatError)]
  if len(ids) != removed.shape[0]:
    raise IndexFormatError(f"{d / REMOVED_IDS_FILE}: {len(ids)} ids for {removed.shape[0]} removed "
                           f"identifiers in {REMOVED_CODES_FILE}")
  return removed, ids


# --------------------------------------------------------------------------- building


def build_index(embeddings: np.ndarray, item_ids: list[str] | None, config: IdentifierConfig,
                progress: ProgressFn | None = None) -> SemanticIndex:
  """Build identifiers for ``embeddings`` ``[N, d]`` (validated) and return the index."""
  t0 = time.perf_counter()
  validate_embeddings(np.asarray(embeddings) if not hasattr(embeddings, "ndim") else embeddings)
  n, d = embeddings.shape
  ids = [str(i) for i in range(n)] if item_ids is None else check_ids(list(item_ids), n)
  if config.use_kmeans and n < config.n_clusters:
    raise InputError(f"fewer items ({n}) than clusters ({config.n_clusters}); lower --clusters")
  if config.num_levels < 1 or config.codebook_size < 1:
    raise InputError("need at least one fine level and one code per level")
  emb = np.asarray(embeddings, np.float32)
  key = jax.random.key(config.seed)
  k_km, k_rq = jax.random.split(key)
  stats: dict = {}
  parts = []
  centroids = None
  if config.use_kmeans:
    if progress:
      progress("k-means", 0, 1)
    km = kmeans_lib.kmeans(emb, k_km, kmeans_lib.KMeansConfig(
        config.n_clusters, max_iters=config.kmeans_iters, tol=config.kmeans_tol))
    labels = np.asarray(km.labels).astype(np.int32)
    centroids = np.asarray(km.centroids, np.float32)
    stats["kmeans_inertia"] = float(km.inertia)
    stats["kmeans_iterations"] = int(km.n_iter)
    stats["kmeans_empty_clusters"] = int((np.asarray(km.counts) == 0).sum())
    residual = emb - centroids[labels]
    parts.append(labels[:, None])
    stats["kmeans_seconds"] = time.perf_counter() - t0
    if progress:
      progress("k-means", 1, 1)
  else:
    labels, residual = None, emb
    stats["kmeans_inertia"] = None
  rq_params, scale, tables = None, 1.0, None
  t1 = time.perf_counter()
  if config.use_rqvae:
    scale = float(np.sqrt(np.mean(residual.astype(np.float64) ** 2)) + 1e-12)
    x = residual / scale
    rq_cfg = config.rq_config(d)
    cb = (lambda i, m: progress("rq-vae", i + 1, rq_cfg.steps)) if progress else None
    res = rqvae_lib.train_rqvae(x, rq_cfg, k_rq, progress=cb)
    diag = rqvae_lib.rqvae_diagnostics(res.model, x)
    parts.append(diag["codes"])
    rq_params = rqvae_lib.state_dict(res.model)
    # MSE in the units of the embeddings (undo the input scaling).
    stats["rq_mse_per_level"] = [float(v) * scale * scale for v in diag["rq_mse_per_level"]]
    stats["codebook_usage_per_level"] = diag["codebook_usage_per_level"]
    stats["perplexity_per_level"] = diag["perplexity_per_level"]
    stats["rq_dead_code_restarts"] = res.restarts
    stats["rq_final_loss"] = res.history[-1]["loss"] if res.history else None
  else:
    parents = labels[:, None] if labels is not None else np.zeros((n, 0), np.int32)
    fine, tables, mse = _hier_kmeans(residual, parents, config, k_rq, progress)
    parts.append(fine)
    stats["rq_mse_per_level"] = mse
    stats["codebook_usage_per_level"] = [
        float(np.unique(fine[:, m]).size / config.codebook_size) for m in range(config.num_levels)]
  stats["fine_levels_seconds"] = time.perf_counter() - t1
  prefixes = np.concatenate(parts, axis=1).astype(np.int32)
  u = assign_counters(prefixes)
  codes = np.concatenate([prefixes, u[:, None]], axis=1).astype(np.int32)
  sizes = ([config.n_clusters] if config.use_kmeans else []) + [config.codebook_size] * config.num_levels
  sizes.append(int(u.max(initial=0)) + 1)
  stats.update(collision_stats(codes))
  stats.update({"n_items": int(n), "id_length": int(codes.shape[1]), "level_sizes": sizes,
                "vocab_size": IdentifierVocab(tuple(sizes)).vocab_size,
                "seconds": time.perf_counter() - t0})
  return SemanticIndex(codes=codes, item_ids=ids, vocab=IdentifierVocab(tuple(sizes)), config=config,
                       embedding_dim=int(d), input_hash=content_hash(emb, ids), centroids=centroids,
                       rqvae_params=rq_params, residual_scale=scale, hier_tables=tables, stats=stats)
