"""Embeddings computed elsewhere (ImageBind, CLIP, CLAP...), aligned to a corpus's items.

Accepted inputs:

* ``E.npy`` (memory-mapped) ``[M, d]`` float, with its ids in a text file (one per line, row
  order): ``--ids FILE``, or by default the sidecar ``E.ids.txt`` that ``cart embed`` writes;
* ``E.npz`` with the embeddings under ``key`` (default ``embeddings``, or the only float array)
  and the ids under ``ids_key`` (default ``ids`` or ``item_ids``), or an ids file.

:func:`load_aligned` validates and reorders to the corpus's item order: ids must be unique and
as many as the rows, every corpus item must have a row (missing ids are an error) and, unless
``allow_extra``, every row must be a corpus item (extra ids are an error); values must be finite;
the dimension must match ``expected_dim`` when given. When the file is already in corpus order
the memory map is returned as is (no copy).
"""
from __future__ import annotations

import dataclasses
import os
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np

from cart_jax.index.inputs import InputError, check_ids, load_item_ids, validate_embeddings

IDS_KEYS = ("ids", "item_ids")


def sidecar_ids_path(embeddings_path: str | os.PathLike) -> Path:
  """``E.npy`` -> ``E.ids.txt`` (what ``cart embed`` writes next to the embeddings)."""
  p = Path(embeddings_path)
  return p.with_name(p.stem + ".ids.txt")


@dataclasses.dataclass
class AlignedEmbeddings:
  embeddings: np.ndarray  # [N, d] in corpus item order (a memmap when no reordering was needed)
  item_ids: list[str]  # the corpus's item ids, row order
  source: str
  reordered: bool
  extra_ids: int  # rows in the file that are not corpus items (dropped; only with allow_extra)


def read_embeddings_with_ids(path: str | os.PathLike, ids_path: str | os.PathLike | None = None,
                             key: str | None = None, ids_key: str | None = None
                             ) -> tuple[np.ndarray, list[str]]:
  """Reads ``[M, d]`` embeddings (``.npy`` memory-mapped) and their ``M`` row ids, validated.

  Raises:
    InputError naming the file and what was expected versus found.
  """
  path = Path(path)
  if not path.is_file():
    raise InputError(f"{path}: no such file")
  ids = None
  if path.suffix == ".npz":
    try:
      with np.load(path, allow_pickle=False) as z:
        names = list(z.keys())
        id_name = ids_key or next((n for n in IDS_KEYS if n in names), None)
        if ids_key is not None and ids_key not in names:
          raise InputError(f"{path}: no array {ids_key!r} for the ids; found arrays {names}")
        floats = [n for n in names if n != id_name and z[n].dtype.kind == "f"]
        name = key or ("embeddings" if "embeddings" in names else (floats[0] if len(floats) == 1 else None))
        if name is None or name not in names:
          raise InputError(f"{path}: choose the embeddings array with a key; found arrays {names}")
        arr = z[name]
        if id_name is not None and ids_path is None:
          raw = z[id_name]
          if raw.ndim != 1 or raw.dtype.kind not in "UO":
            raise InputError(f"{path}: ids array {id_name!r} must be a 1-D string array, found "
                             f"{raw.dtype} of shape {raw.shape}")
          ids = [str(x) for x in raw.tolist()]
          check_ids(ids, arr.shape[0] if arr.ndim else -1, source=f"{path}[{id_name}]")
    except InputError:
      raise
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
      raise InputError(f"{path}: not a readable .npz file ({e})") from e
  else:
    try:
      arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
      raise InputError(f"{path}: not a readable .npy file ({e})") from e
  validate_embeddings(arr, source=str(path))
  if ids is None:
    if ids_path is None:
      ids_path = sidecar_ids_path(path)
      if not ids_path.is_file():
        raise InputError(f"{path}: no item ids: pass an ids file (one id per line, row order), "
                         f"put them next to it as {ids_path.name}, or store them in a .npz "
                         f"under {IDS_KEYS[0]!r}")
    ids = load_item_ids(ids_path)
    check_ids(ids, arr.shape[0], source=f"{ids_path} (ids of {path.name})")
  return arr, ids


def align(arr: np.ndarray, ids: Sequence[str], corpus_ids: Sequence[str], *, source: str = "embeddings",
          allow_extra: bool = False) -> AlignedEmbeddings:
  """Reorders rows ``arr[i] <-> ids[i]`` to ``corpus_ids`` order (validated, see module doc)."""
  pos = {item: i for i, item in enumerate(ids)}
  missing = [c for c in corpus_ids if c not in pos]
  if missing:
    raise InputError(f"{source}: {len(missing)} corpus item(s) have no embedding, e.g. "
                     f"{missing[:3]} ({len(ids)} rows for {len(corpus_ids)} corpus items)")
  corpus_set = set(corpus_ids)
  extra = [i for i in ids if i not in corpus_set]
  if extra and not allow_extra:
    raise InputError(f"{source}: {len(extra)} id(s) are not corpus items, e.g. {extra[:3]} "
                     "(pass --allow-extra-ids to drop them)")
  order = np.asarray([pos[c] for c in corpus_ids], np.int64)  # [N]
  in_order = len(ids) == len(corpus_ids) and bool(np.all(order == np.arange(len(order))))
  out = arr if in_order else np.asarray(arr[np.sort(order)])[np.argsort(np.argsort(order))]
  return AlignedEmbeddings(out, list(corpus_ids), source, not in_order, len(extra))


def load_aligned(path: str | os.PathLike, corpus_ids: Sequence[str], *,
                 ids_path: str | os.PathLike | None = None, key: str | None = None,
                 ids_key: str | None = None, expected_dim: int | None = None,
                 allow_extra: bool = False) -> AlignedEmbeddings:
  """Reads and validates precomputed embeddings and aligns them to ``corpus_ids``."""
  arr, ids = read_embeddings_with_ids(path, ids_path, key, ids_key)
  if expected_dim is not None and arr.shape[1] != expected_dim:
    raise InputError(f"{path}: embeddings have dimension {arr.shape[1]}, expected {expected_dim}")
  return align(arr, ids, corpus_ids, source=str(path), allow_extra=allow_extra)
