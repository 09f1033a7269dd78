"""Reading and validating item embeddings and item ids (``.npy`` / ``.npz`` / ids file).

Every problem is reported as :class:`InputError` naming the file and what was
expected versus found; nothing here writes to disk.
"""
from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import numpy as np

from cart_jax.core.errors import CartError


class InputError(CartError):
  """Bad user input (file, shape, dtype, values, ids)."""


_FLOAT_KINDS = ("f",)


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
  except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
    raise InputError(f"{path}: not a readable .npy/.npz file ({e})") from e
  validate_embeddings(arr, source=str(path))
  return arr


def validate_embeddings(arr: np.ndarray, source: str = "embeddings", chunk: int = 65536) -> None:
  """Rank 2, floating dtype, at least one row, all values finite (checked in chunks)."""
  if arr.ndim != 2:
    raise InputError(f"{source}: expected a rank-2 array [N, d], found shape {tuple(arr.shape)}")
  if arr.dtype.kind not in _FLOAT_KINDS:
    raise InputError(f"{source}: expected a floating dtype (float16/32/64), found {arr.dtype}")
  if arr.shape[0] == 0 or arr.shape[1] == 0:
    raise InputError(f"{source}: empty array of shape {tuple(arr.shape)}")
  for s in range(0, arr.shape[0], chunk):
    block = np.asarray(arr[s:s + chunk])
    ok = np.isfinite(block)
    if not ok.all():
      r, c = np.argwhere(~ok)[0]
      raise InputError(f"{source}: non-finite value {block[r, c]} at row {s + r}, column {c}")


def load_item_ids(path: str | os.PathLike) -> list[str]:
  """One id per line; blank lines and duplicates are errors (with line numbers)."""
  path = Path(path)
  try:
    lines = path.read_text(encoding="utf-8").splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise InputError(f"{path}: cannot read item ids ({e})") from e
  ids, seen = [], {}
  for i, line in enumerate(lines, start=1):
    item = line.strip()
    if not item:
      if i == len(lines):
        continue
      raise InputError(f"{path}:{i}: empty item id")
    if item in seen:
      raise InputError(f"{path}:{i}: duplicate item id {item!r} (first on line {seen[item]})")
    seen[item] = i
    ids.append(item)
  return ids


def check_ids(ids: list[str], n: int, source: str = "item ids") -> list[str]:
  if len(ids) != n:
    raise InputError(f"{source}: {len(ids)} ids for {n} embeddings (counts must match)")
  seen = set()
  for i, item in enumerate(ids):
    if not item:
      raise InputError(f"{source}: empty item id at position {i}")
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
