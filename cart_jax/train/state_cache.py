"""Frozen-encoder states computed once per training text, kept in a memory-mapped cache.

With a frozen pretrained encoder (``ModelConfig.freeze_encoder``, MiniLM) the layer states that
fusion reads are a pure function of a text's tokens. Recomputing them in every training step is
what made ``minilm_small`` train at ~0.6 steps/s on a 2-core CPU; here they are computed once for
every distinct training text (queries and captions), in length-bucketed batches with a progress
bar, and the jitted train step takes states, not tokens (GENIUS, CVPR 2025, does the same with
cached frozen-encoder features).

Layout of one cache directory (``<root>/<key[:24]>/``)::

  meta.json     format, version, key, dtype, shapes, layers kept, sha256 of every file
  tokens.npy    int32 [n, src]        the distinct token rows (0-padded), row i <-> text i
  offsets.npy   int64 [n + 1]         text i's tokens are rows offsets[i]:offsets[i+1] of states
  states.f16    float16 [T, S, width] raw encoder states of every real (non-padding) token

Only what fusion reads is stored: the real tokens (padding trimmed: padded positions are masked
everywhere downstream, and a masked encoder's states at real positions do not depend on the
padding), the layers the fusion mode reads, in half precision. The emoji corpus's 7.6K training
queries take ~0.25 GB; with its 50K captions ~2 GB.

**Size cap.** The caches under one root are kept to ``$CART_CACHE_MAX_GB`` (default 8 GB; 0 or
less: no cap). After a new cache is written, the least recently used others (by when a run last
reused or built them) are deleted until the total fits; the one just built is never deleted, and
one another process holds the lock of is skipped. Without the cap every new set of training texts
or encoder weights added a cache for good (a machine that trained many runs held 17 of them, 5 GB).

The key is a SHA-256 of the token rows (so of the texts and the tokenizer), the encoder weights
(every array of the frozen encoder, bytes and paths), the layers kept and the dtype: ablations and
reruns on the same texts reuse one cache; any change builds a new one. A cache whose files do not
match their recorded hashes is rebuilt (with a log line), never used. The directory is written
atomically (temporary sibling, then rename).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from cart_jax.core.errors import CartError

FORMAT = "cart-encoder-states"
VERSION = 1
STATE_DTYPE = np.float16
ENV_DIR = "CART_CACHE_DIR"
ENV_MAX_GB = "CART_CACHE_MAX_GB"
DEFAULT_MAX_GB = 8.0


class StateCacheError(CartError):
  """A state cache that cannot be used (shape mismatch, a text it does not hold...)."""


def default_root() -> Path:
  """``$CART_CACHE_DIR/encoder_states`` or ``~/.cache/cart-jax/encoder_states``."""
  base = os.environ.get(ENV_DIR) or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "cart-jax")
  return Path(base) / "encoder_states"


def max_bytes() -> int | None:
  """The cap on all caches under one root, from ``$CART_CACHE_MAX_GB`` (None: no cap)."""
  raw = os.environ.get(ENV_MAX_GB, "").strip()
  if not raw:
    return int(DEFAULT_MAX_GB * 2**30)
  try:
    gb = float(raw)
  except ValueError:
    raise StateCacheError(f"${ENV_MAX_GB}={raw!r}: expected a number of GB (0 or less: no cap)") from None
  return None if gb <= 0 else int(gb * 2**30)


def _cache_bytes(directory: Path) -> int:
  return sum(f.stat().st_size for f in directory.iterdir() if f.is_file())


def prune(root: Path, keep: Path, limit: int | None, log: Callable[[str], None] = print) -> list[Path]:
  """Deletes the least recently used caches under ``root`` until all of them total at most
  ``limit`` bytes; ``keep`` is never deleted, nor a cache whose lock another process holds.

  "Used" is the modification time of a cache's ``meta.json``: set when it is built, touched when a
  run reuses it. Returns the deleted directories.
  """
  from cart_jax.core.artefacts import OutputLockedError, output_lock  # pylint: disable=g-import-not-at-top
  if limit is None or not root.is_dir():
    return []
  entries = []
  for d in root.iterdir():
    if d.name.startswith(".") or not d.is_dir() or not (d / "meta.json").is_file():
      continue  # lock files, temporary directories being written
    try:  # only this module's caches: a root shared with other files loses nothing else
      if json.loads((d / "meta.json").read_text(encoding="utf-8")).get("format") != FORMAT:
        continue
      entries.append(((d / "meta.json").stat().st_mtime, _cache_bytes(d), d))
    except (OSError, ValueError, AttributeError):
      continue
  total = sum(size for _, size, _ in entries)
  removed = []
  for _, size, d in sorted(entries, key=lambda e: e[0]):
    if total <= limit:
      break
    if d.resolve() == keep.resolve():
      continue
    try:
      with output_lock(d, wait=False):
        trash = d.with_name(f".{d.name}.evicted-{os.getpid()}")
        os.rename(d, trash)  # gone for readers at once; the files go next
        shutil.rmtree(trash, ignore_errors=True)
    except (OutputLockedError, OSError):
      continue
    try:
      (d.parent / f".{d.name}.lock").unlink()
    except OSError:
      pass
    total -= size
    removed.append(d)
    log(f"encoder states: deleted the least recently used cache {d} ({size / 2**20:.0f} MiB) to keep "
        f"{root} under {limit / 2**30:g} GB (${ENV_MAX_GB})")
  return removed


def fused_layers(model_config) -> tuple[int, ...]:
  """Indices of the encoder layers fusion reads: all of them, or the last one for ``fusion=none``."""
  s = model_config.num_fused_layers
  return (s - 1,) if model_config.fusion == "none" else tuple(range(s))


def encoder_fingerprint(frozen: dict) -> str:
  """SHA-256 over the frozen encoder's arrays (paths, shapes, dtypes, bytes)."""
  import jax  # pylint: disable=g-import-not-at-top
  h = hashlib.sha256()
  leaves = jax.tree_util.tree_flatten_with_path(frozen.get("encoder", frozen))[0]
  for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    a = np.asarray(jax.device_get(leaf))
    h.update(f"{jax.tree_util.keystr(path)}|{a.shape}|{a.dtype}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def unique_rows(token_rows: np.ndarray) -> np.ndarray:
  """Distinct token rows ``[n, src]``, in a canonical (sorted) order."""
  rows = np.ascontiguousarray(np.asarray(token_rows, np.int32))
  if rows.ndim != 2:
    raise StateCacheError(f"token rows must be [n, src], got shape {rows.shape}")
  return np.unique(rows, axis=0) if len(rows) else rows


def cache_key(rows: np.ndarray, fingerprint: str, layers: Sequence[int]) -> str:
  h = hashlib.sha256()
  h.update(f"{FORMAT}:{VERSION}|{np.dtype(STATE_DTYPE).name}|{tuple(layers)}|{rows.shape}|{fingerprint}".encode())
  h.update(np.ascontiguousarray(rows, np.int32).tobytes())
  return h.hexdigest()


class StateCache:
  """Read side: ``lookup(tokens [b, src]) -> float16 [b, S, src, width]``, zero at padding."""

  def __init__(self, directory: Path, meta: dict, tokens: np.ndarray, offsets: np.ndarray,
               states: np.ndarray):
    self.directory, self.meta = directory, meta
    self.tokens, self.offsets, self.states = tokens, offsets, states  # [n, src], [n+1], [T, S, w]
    self.src = int(tokens.shape[1])
    self._row_of = {r.tobytes(): i for i, r in enumerate(tokens)}
    self.misses = 0
    self.encode_missing: Callable[[np.ndarray], np.ndarray] | None = None

  @property
  def num_texts(self) -> int:
    return int(self.tokens.shape[0])

  @property
  def num_layers(self) -> int:
    return int(self.states.shape[1])

  @property
  def width(self) -> int:
    return int(self.states.shape[2])

  @property
  def nbytes(self) -> int:
    return int(self.states.nbytes)

  def lookup(self, tokens: np.ndarray) -> np.ndarray:
    """States of a batch of token rows (each must be one of the cached texts)."""
    tokens = np.ascontiguousarray(np.asarray(tokens, np.int32))
    b, src = tokens.shape
    if src != self.src:
      raise StateCacheError(f"{self.directory}: batch tokens have length {src}, the cache {self.src} "
                            f"(input_length changed: the cache is keyed by it and is rebuilt)")
    out = np.zeros((b, self.num_layers, src, self.width), STATE_DTYPE)  # [b, S, src, w]
    missing = []
    for i in range(b):
      j = self._row_of.get(tokens[i].tobytes())
      if j is None:
        missing.append(i)
        continue
      lo, hi = self.offsets[j], self.offsets[j + 1]
      out[i, :, :hi - lo] = np.swapaxes(self.states[lo:hi], 0, 1)  # [S, len, w]
    if missing:
      if self.encode_missing is None:
        raise StateCacheError(f"{self.directory}: {len(missing)} training text(s) of this batch are "
                              f"not in the encoder-state cache (first tokens {tokens[missing[0]][:8]}...)")
      self.misses += len(missing)
      out[missing] = self.encode_missing(tokens[missing]).astype(STATE_DTYPE)
    return out


def _sha(path: Path) -> str:
  from cart_jax.core.artefacts import sha256_file  # pylint: disable=g-import-not-at-top
  return sha256_file(path)


def _open(directory: Path, key: str) -> StateCache:
  """Opens and verifies a cache directory; raises StateCacheError on any mismatch."""
  try:
    meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
  except (OSError, json.JSONDecodeError) as e:
    raise StateCacheError(f"{directory / 'meta.json'}: unreadable ({e})") from None
  if meta.get("format") != FORMAT or meta.get("version") != VERSION or meta.get("key") != key:
    raise StateCacheError(f"{directory}: format/version/key do not match this run")
  for name, digest in meta.get("sha256", {}).items():
    if not (directory / name).is_file() or _sha(directory / name) != digest:
      raise StateCacheError(f"{directory / name}: missing or its content changed (sha256 mismatch)")
  tokens = np.load(directory / "tokens.npy", allow_pickle=False)
  offsets = np.load(directory / "offsets.npy", allow_pickle=False)
  shape = tuple(meta["states_shape"])
  if offsets.shape != (tokens.shape[0] + 1,) or int(offsets[-1]) != shape[0]:
    raise StateCacheError(f"{directory}: offsets do not match the states ({offsets.shape}, {shape})")
  states = np.memmap(directory / "states.f16", dtype=STATE_DTYPE, mode="r", shape=shape)
  return StateCache(directory, meta, tokens, offsets, states)


def length_buckets(src: int) -> tuple[int, ...]:
  out, b = [], 8
  while b < src:
    out.append(b)
    b *= 2
  return tuple(out) + (src,)


def build(directory: Path, rows: np.ndarray, key: str, layers: Sequence[int],
          encode: Callable[[np.ndarray, np.ndarray], np.ndarray], *, batch_size: int = 256,
          progress: bool = True, log: Callable[[str], None] = print) -> StateCache:
  """Computes the states of every row (length-bucketed batches) and writes the cache atomically.

  ``encode(ids int32 [b, L], mask bool [b, L]) -> float [b, S_all, L, width]`` runs the encoder.
  """
  from cart_jax.core.artefacts import atomic_directory  # pylint: disable=g-import-not-at-top
  n, src = rows.shape
  lengths = (rows != 0).sum(axis=1).astype(np.int64)  # [n] real tokens ([CLS] .. [SEP])
  offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)  # [n + 1]
  total = int(offsets[-1])
  buckets = length_buckets(src)
  bucket_of = np.searchsorted(np.asarray(buckets), lengths)  # [n]
  bar = None
  if progress:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=n, desc="encoder states (once per text)", unit="text", file=sys.stderr,
               dynamic_ncols=True)
  t0 = time.perf_counter()
  width = None
  # wait=True: a shared cache; a second run building the same key waits for the first
  with atomic_directory(directory, wait=True) as tmp:
    states = None
    for bi, length in enumerate(buckets):
      sel = np.flatnonzero(bucket_of == bi)
      for s in range(0, len(sel), batch_size):
        chunk = sel[s:s + batch_size]
        ids = np.zeros((batch_size, length), np.int32)  # fixed shape per bucket: one compile each
        ids[:len(chunk)] = rows[chunk, :length]
        ids[len(chunk):, 0] = rows[0, 0] if n else 101  # padding rows: one visible token, discarded
        out = np.asarray(encode(ids, ids != 0))[:len(chunk)][:, list(layers)]  # [c, S, length, w]
        if states is None:
          width = out.shape[-1]
          states = np.memmap(tmp / "states.f16", mode="w+", dtype=STATE_DTYPE,
                             shape=(total, len(layers), width))
        for j, r in enumerate(chunk):
          states[offsets[r]:offsets[r + 1]] = np.swapaxes(out[j, :, :lengths[r]], 0, 1)
        if bar is not None:
          bar.update(len(chunk))
    if bar is not None:
      bar.close()
    if states is None:
      raise StateCacheError("no training texts to encode")
    states.flush()
    del states
    np.save(tmp / "tokens.npy", rows)
    np.save(tmp / "offsets.npy", offsets)
    meta = {"format": FORMAT, "version": VERSION, "key": key, "dtype": np.dtype(STATE_DTYPE).name,
            "layers": list(layers), "states_shape": [total, len(layers), int(width)],
            "num_texts": int(n), "input_length": int(src), "seconds": time.perf_counter() - t0,
            "sha256": {f: _sha(tmp / f) for f in ("tokens.npy", "offsets.npy", "states.f16")}}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
  log(f"encoder states of {n} texts cached in {directory} "
      f"({total * len(layers) * int(width) * 2 / 2**20:.0f} MiB, {meta['seconds']:.0f} s)")
  return _open(directory, key)


def load_or_build(token_rows: np.ndarray, *, fingerprint: str, layers: Sequence[int],
                  encode: Callable[[np.ndarray, np.ndarray], np.ndarray],
                  root: str | os.PathLike | None = None, batch_size: int = 256, progress: bool = True,
                  log: Callable[[str], None] = print) -> StateCache:
  """The cache of these token rows under ``root`` (default :func:`default_root`): reused when its
  key and file hashes match, else (re)built."""
  rows = unique_rows(token_rows)
  key = cache_key(rows, fingerprint, layers)
  limit = max_bytes()  # a bad $CART_CACHE_MAX_GB fails before any work
  base = Path(root) if root is not None else default_root()
  directory = base / key[:24]
  from cart_jax.core.artefacts import output_lock  # pylint: disable=g-import-not-at-top

  def reuse():
    if (directory / "meta.json").exists():
      try:
        cache = _open(directory, key)
        log(f"encoder states: reusing {directory} ({cache.num_texts} texts)")
        try:
          os.utime(directory / "meta.json")  # recently used: the last to be deleted by the size cap
        except OSError:
          pass
        return cache
      except (StateCacheError, OSError, ValueError, KeyError) as e:
        log(f"encoder states: {e}; rebuilding the cache")
    return None

  cache = reuse()
  if cache is not None:
    return cache
  directory.parent.mkdir(parents=True, exist_ok=True)
  # Another process (e.g. a second process of a multi-host job on this machine) building the same
  # cache holds its lock: wait for it, then use what it wrote instead of building it again.
  with output_lock(directory, wait=True):
    cache = reuse()
    if cache is not None:
      return cache
    cache = build(directory, rows, key, layers, encode, batch_size=batch_size, progress=progress,
                  log=log)
  prune(base, directory, limit, log)
  return cache
