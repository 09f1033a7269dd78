"""Item embedding files: ``E.npy`` and its sidecars, reading, aligning and writing them.

``cart embed --out E.npy`` writes (:func:`cart_jax.jobs.embed.embed`, through
:func:`write_embeddings`), next to each other (:func:`embedding_files`, the one place their names
are derived):
  E.npy         float32 [N, d], rows in the corpus's item order
  E.ids.txt     one item id per line (row order)
  E.meta.json   encoder, dimension, corpus, content hash, summary (:func:`read_meta`)
  E.model.npz   (built-in encoder) the trained item tower + text projection

The jobs that compute them (:mod:`cart_jax.jobs.embed`, configured by :class:`BuiltinEmbedOptions`,
:class:`ModelEmbedOptions` and :class:`PrecomputedEmbedOptions` here): the built-in encoder trains
the dual encoder of :mod:`cart_jax.train.dual_encoder` and embeds every item; a dual encoder trained
before (an ``E.model.npz``) only encodes the items (new items land in the space of that model's
earlier ``E.npy``); precomputed embeddings (ImageBind, CLIP, CLAP...) are aligned to the corpus's
items.

Accepted precomputed inputs:

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
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from cart_jax.core.errors import CartError
from cart_jax.index.inputs import (NPY_READ_ERRORS, InputError, check_ids, check_is_array,
                                   load_item_ids, validate_embeddings)

IDS_KEYS = ("ids", "item_ids")
META_FORMAT = "cart-embeddings"
META_VERSION = 1


@dataclasses.dataclass(frozen=True)
class EmbeddingFiles:
  """``E.npy`` and the sidecars next to it (see the module docstring)."""
  embeddings: Path
  ids: Path
  meta: Path
  model: Path

  def existing(self) -> list[Path]:
    return [p for p in dataclasses.astuple(self) if p.exists()]


def embedding_files(embeddings_path: str | os.PathLike) -> EmbeddingFiles:
  """``E.npy`` (or ``E.npz``) -> ``E.npy``, ``E.ids.txt``, ``E.meta.json``, ``E.model.npz``."""
  p = Path(embeddings_path)
  stem = p.with_name(p.stem)
  return EmbeddingFiles(embeddings=p, ids=Path(f"{stem}.ids.txt"), meta=Path(f"{stem}.meta.json"),
                        model=Path(f"{stem}.model.npz"))


def read_meta(embeddings_path: str | os.PathLike) -> dict:
  """``E.meta.json`` of ``E.npy`` (``{}`` when absent or unreadable: embeddings made elsewhere)."""
  path = embedding_files(embeddings_path).meta
  if not path.is_file():
    return {}
  try:
    meta = json.loads(path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError, OSError):
    return {}
  return meta if isinstance(meta, dict) else {}


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

  Values: :func:`cart_jax.index.inputs.validate_embeddings` (as float32: finite, not huge); ids:
  the one id rule (:func:`cart_jax.data.corpus.check_item_id`), whether from a file or a ``.npz``.

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
    except NPY_READ_ERRORS as e:
      raise InputError(f"{path}: not a readable .npz file ({e})") from e
  else:
    try:
      arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except NPY_READ_ERRORS as e:
      raise InputError(f"{path}: not a readable .npy file ({e})") from e
    check_is_array(arr, path)
  validate_embeddings(arr, source=str(path))
  if ids is None:
    if ids_path is None:
      ids_path = embedding_files(path).ids
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


@dataclasses.dataclass(frozen=True)
class BuiltinEmbedOptions:
  """The built-in dual encoder: a frozen MiniLM text tower + an item tower trained with InfoNCE.

  Attributes:
    item_encoder: ``scratch`` (the modality's tower, trained from the media) or a pretrained
      network whose frozen features feed a trained head: ``pretrained`` (the modality's default),
      ``efficientnet-lite0`` (image, video) or ``aisfx`` (audio); see
      :mod:`cart_jax.models.pretrained.encoders`.
    head_steps: training steps when ``item_encoder`` is pretrained (``steps`` is the scratch
      tower's). The head trains on cached features, so a step costs a small fraction of a scratch
      tower's step; measured on val (dual tower R@1, emoji / instruments): 300 steps 0.696 /
      0.686, 1,000 0.760 / 0.690, 2,000 0.772 / 0.711.
    steps, batch_size, lr, seed: training (``batch_size`` items per step, peak learning rate).
    dim: embedding dimension.
    captions: also train on the train captions (default: train queries only).
    max_shift: augmentation, random translation up to this many pixels (``None``: the tower's 0).
    text_batch: MiniLM batch size.
    checkpoint_dir: default ``E.ckpt`` next to ``E.npy``; a run interrupted there resumes.
    checkpoint_every: steps between checkpoints (0: only at the end).
    resume: ``False`` starts afresh, whatever ``checkpoint_dir`` holds.
  """
  steps: int = 600
  batch_size: int = 256
  lr: float = 2e-3
  seed: int = 0
  dim: int = 256
  captions: bool = False
  max_shift: int | None = None
  text_batch: int = 128
  checkpoint_dir: str | None = None
  checkpoint_every: int = 200
  resume: bool = True
  item_encoder: str = "scratch"
  head_steps: int = 2000

  def training_steps(self) -> int:
    """The steps this run trains: ``head_steps`` on pretrained features, else ``steps``."""
    return self.steps if self.item_encoder == "scratch" else self.head_steps


@dataclasses.dataclass(frozen=True)
class PrecomputedEmbedOptions:
  """Embeddings computed elsewhere: ``path`` (.npy/.npz) and its ids (see :func:`load_aligned`)."""
  path: str
  ids: str | None = None
  key: str | None = None
  ids_key: str | None = None
  allow_extra_ids: bool = False
  expect_dim: int | None = None


@dataclasses.dataclass(frozen=True)
class ModelEmbedOptions:
  """Encode only: the items through the item tower of an already-trained built-in dual encoder.

  Attributes:
    model: an ``E.model.npz`` that ``cart embed`` wrote next to an earlier ``E.npy``; the rows
      land in that model's space (new items next to the old ones, e.g. for ``cart index add``).
    batch_size: items per forward pass.
    expect_dim: fail unless the model's embedding dimension is this (e.g. the run index's).
  """
  model: str
  batch_size: int = 256
  expect_dim: int | None = None


@dataclasses.dataclass
class EmbedResult:
  """What :func:`embed` wrote (``files``) and its JSON summary."""
  files: EmbeddingFiles
  summary: dict

  @property
  def path(self) -> Path:
    return self.files.embeddings


def check_builtin_options(options: BuiltinEmbedOptions) -> None:
  """Every option in its range, before any training (raises CartError naming the flag)."""
  o = options
  for flag, value, low in (("--steps", o.steps, 1), ("--head-steps", o.head_steps, 1),
                           ("--batch-size", o.batch_size, 2),
                           ("--dim", o.dim, 1), ("--text-batch", o.text_batch, 1),
                           ("--checkpoint-every", o.checkpoint_every, 0),
                           ("--max-shift", 0 if o.max_shift is None else o.max_shift, 0)):
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
      raise CartError(f"{flag} must be an integer >= {low}, got {value!r}")
  if not (isinstance(o.lr, (int, float)) and math.isfinite(o.lr) and o.lr > 0):
    raise CartError(f"--lr must be a finite number > 0, got {o.lr!r}")


def write_embeddings(files: EmbeddingFiles, item_ids: Sequence[str], embeddings: np.ndarray,
                     summary: dict, *, model=None) -> None:
  """Writes ``E.npy``, ``E.ids.txt``, ``E.meta.json`` (and ``E.model.npz`` when ``model``).

  Every file goes to a temporary name first, then all are renamed into place; a stale model of an
  earlier built-in run is removed when ``model`` is None (it must not pair with these rows). The
  float32 rows are validated first (:func:`validate_embeddings`: a diverged training, ``--lr nan``,
  writes nothing). Files get the permissions the umask gives (``mkstemp`` would leave 0600).

  Raises:
    InputError: non-finite or huge values (nothing is written then).
  """
  from cart_jax.index.inputs import content_hash  # pylint: disable=g-import-not-at-top
  embeddings = np.ascontiguousarray(embeddings, np.float32)
  validate_embeddings(embeddings, source=f"embeddings computed for {files.embeddings}")
  meta = {"format": META_FORMAT, "version": META_VERSION, "encoder": summary["encoder"],
          "num_items": int(embeddings.shape[0]), "dim": int(embeddings.shape[1]),
          "corpus": summary["corpus"], "content_hash": content_hash(embeddings, list(item_ids)),
          "model": files.model.name if model is not None else None,
          "summary": {k: v for k, v in summary.items() if k != "files"}}
  files.embeddings.parent.mkdir(parents=True, exist_ok=True)
  targets = {"embeddings": files.embeddings, "ids": files.ids, "meta": files.meta}
  if model is not None:
    targets["model"] = files.model
  umask = os.umask(0)
  os.umask(umask)
  temps = {}
  try:
    for key, path in targets.items():
      fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent,
                                 suffix=".npz" if key == "model" else "")
      os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
      os.close(fd)
      temps[key] = tmp
      if key == "embeddings":
        with open(tmp, "wb") as f:
          np.save(f, embeddings)
      elif key == "ids":
        Path(tmp).write_text("".join(f"{i}\n" for i in item_ids), encoding="utf-8")
      elif key == "meta":
        Path(tmp).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
      else:
        from cart_jax.models.dual_encoder import save_model  # pylint: disable=g-import-not-at-top
        save_model(tmp, model)
    for key in ("model", "ids", "embeddings", "meta"):
      if key in temps:
        os.replace(temps.pop(key), targets[key])
    if model is None and files.model.exists():
      files.model.unlink()
  finally:
    for tmp in temps.values():
      if os.path.exists(tmp):
        os.unlink(tmp)
