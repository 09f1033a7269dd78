"""Reading and validating item embeddings and item ids (``.npy`` / ``.npz`` / ids file).

Every problem is reported as :class:`InputError` naming the file and what was
expected versus found; nothing here writes to disk.

:func:`validate_embeddings` is the one validation point of embedding values: it checks the
float32 values the consumers compute with (``build-ids``, ``cart baseline``, ``cart embed
--encoder precomputed``, ``cart data merge`` all cast to float32 after it), not the values as
stored, so a float64 ``1e300`` that becomes ``inf`` in float32 is refused, and so is a magnitude
whose square overflows float32 in a distance computation (:data:`MAX_ABS_VALUE`). Ids follow the
one rule of :func:`cart_jax.core.ids.check_item_id`.
"""
from __future__ import annotations

import hashlib
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np

from cart_jax.core.errors import CartError
from cart_jax.core.ids import check_item_id, read_id_lines


class InputError(CartError):
  """Bad user input (file, shape, dtype, values, ids)."""


_FLOAT_KINDS = ("f",)
# Errors numpy raises on a damaged .npy/.npz (bad header, truncated data, corrupt zip member).
NPY_READ_ERRORS = (ValueError, OSError, zipfile.BadZipFile, EOFError, zlib.error, KeyError)

# Largest |value| accepted in an embedding. The largest intermediate downstream is K-Means'
# inertia, a float32 sum over every value of a squared difference of two values, each term up to
# (2 x 1e12)^2 = 4e24: float32 (max 3.4e38) holds it for up to 8e13 values (N x d), a hundred
# times more than any index this code builds; distances, norms and dot products of one row are
# far smaller. Real embeddings are O(1) (L2-normalised) to O(100); 1e12 can only be garbage. A
# float32 1e30 passed the old finiteness check and gave NaN inertia and empty clusters.
MAX_ABS_VALUE = 1e12
FLOAT32_MAX = float(np.finfo(np.float32).max)


def load_embeddings(path: str | os.PathLike, key: str | None = None) -> np.ndarray:
  """Load ``[N, d]`` float embeddings; ``.npy`` is memory-mapped.

  For ``.npz``, ``key`` names the array (default: ``embeddings``, or the only array).
  """
  path = Path(path)
  if not path.exists():
    raise InputError(f"{path}: no such file")
  try:
    if path.suffix == ".npz":
      with np.load(path, allow_pickle=False) as z:
        names = list(z.keys())
        name = key or ("embeddings" if "embeddings" in names else (names[0] if len(names) == 1 else None))
        if name is None or name not in names:
          raise InputError(f"{path}: choose the embeddings array with a key; found arrays {names}")
        arr = z[name]
    else:
      arr = np.load(path, mmap_mode="r", allow_pickle=False)
  except InputError:
    raise
  except NPY_READ_ERRORS as e:
    raise InputError(f"{path}: not a readable .npy/.npz file ({e})") from e
  check_is_array(arr, path)
  validate_embeddings(arr, source=str(path))
  return arr


def check_is_array(arr, path: str | os.PathLike) -> None:
  """``np.load`` of a non-``.npz`` name can return an archive: refuse it, naming the file."""
  if isinstance(arr, np.lib.npyio.NpzFile):
    arr.close()
    raise InputError(f"{path}: is an .npz archive, not an .npy array (name it .npz and choose "
                     "the array with a key)")


def validate_embeddings(arr: np.ndarray, source: str = "embeddings", chunk: int = 65536) -> None:
  """Rank 2, floating dtype, at least one row; every value finite and |x| <= MAX_ABS_VALUE.

  Values are checked as float32, the dtype every consumer computes in (the module docstring), in
  chunks of rows (a memory map is never read whole). The message names the first bad row.
  """
  if arr.ndim != 2:
    raise InputError(f"{source}: expected a rank-2 array [N, d], found shape {tuple(arr.shape)}")
  if arr.dtype.kind not in _FLOAT_KINDS:
    raise InputError(f"{source}: expected a floating dtype (float16/32/64), found {arr.dtype}")
  if arr.shape[0] == 0 or arr.shape[1] == 0:
    raise InputError(f"{source}: empty array of shape {tuple(arr.shape)}")
  for s in range(0, arr.shape[0], chunk):
    stored = np.asarray(arr[s:s + chunk])
    with np.errstate(over="ignore", invalid="ignore"):
      used = stored.astype(np.float32)  # the values the consumers compute with
    bad = ~(np.abs(used) <= MAX_ABS_VALUE)  # NaN compares False: caught too
    if bad.any():
      r, c = (int(i) for i in np.argwhere(bad)[0])
      value = stored[r, c]
      at = f"at row {s + r}, column {c}"
      if not np.isfinite(value):
        raise InputError(f"{source}: non-finite value {value} {at}")
      if not np.isfinite(used[r, c]):
        raise InputError(f"{source}: value {float(value):.6g} {at} overflows float32 (largest "
                         f"{FLOAT32_MAX:.4g}; the embeddings are used as float32)")
      raise InputError(f"{source}: |value| {float(value):.6g} {at} is above {MAX_ABS_VALUE:.0e}, "
                       "the largest magnitude accepted (its square overflows float32 in K-Means' "
                       "distance sums; real embeddings are O(1)-O(100))")


def load_item_ids(path: str | os.PathLike) -> list[str]:
  """One id per line, exactly as written (``E.ids.txt``, ``--item-ids``).

  Lines end at ``\\n`` (or ``\\r\\n``) only; a UTF-8 BOM at the start of the file is stripped.
  Every id follows :func:`cart_jax.core.ids.check_item_id` (so blank lines, surrounding
  whitespace or a ``\\u2028`` inside a line are errors, not silently stripped or split);
  duplicates are errors. Messages name the file and line.
  """
  path = Path(path)
  ids, seen = [], {}
  for i, item in read_id_lines(path, InputError):
    check_item_id(item, f"{path}:{i}", InputError)
    if item in seen:
      raise InputError(f"{path}:{i}: duplicate item id {item!r} (first on line {seen[item]})")
    seen[item] = i
    ids.append(item)
  return ids


def check_ids(ids: list[str], n: int, source: str = "item ids") -> list[str]:
  """``n`` ids, each following the id rule (``check_item_id``), no duplicates."""
  if len(ids) != n:
    raise InputError(f"{source}: {len(ids)} ids for {n} embeddings (counts must match)")
  seen = set()
  for i, item in enumerate(ids):
    check_item_id(item, f"{source}: row {i}", InputError)
    if item in seen:
      raise InputError(f"{source}: duplicate item id {item!r} at position {i}")
    seen.add(item)
  return ids


def content_hash(embeddings: np.ndarray, ids: list[str], chunk: int = 65536) -> str:
  """sha256 of the embeddings (as float32, C order) and the ids: ties an index to its inputs."""
  h = hashlib.sha256()
  h.update(f"{embeddings.shape[0]}x{embeddings.shape[1]}\n".encode())
  for s in range(0, embeddings.shape[0], chunk):
    h.update(np.ascontiguousarray(embeddings[s:s + chunk], dtype=np.float32).tobytes())
  h.update("\n".join(ids).encode("utf-8"))
  return "sha256:" + h.hexdigest()
