"""Paths that may be remote (``gs://``, ``s3://``, ...): the one place that tells them apart.

A TPU pod's MODEL_DIR is a bucket (``gs://bucket/run``): every host sees it, orbax writes its
checkpoints there. ``pathlib.Path("gs://b/run").absolute()`` is ``<cwd>/gs:/b/run``, a local
folder, so a remote path must never go through ``Path``. Here:

* :func:`absolute`: a local path -> absolute ``pathlib.Path`` (as before); a remote one ->
  ``etils.epath.Path``, untouched (no ``absolute()`` / ``resolve()``).
* reads and writes that work on both: :func:`read_text`, :func:`write_text` /
  :func:`write_json` (local: atomic, temporary file + rename, ``core.artefacts``; remote: one
  object upload, which object stores make visible whole or not at all), :func:`walk_files`,
  :func:`size`, :func:`sha256`, :func:`copy_tree` (remote: the files, then ``meta.json`` last:
  the file every reader checks first), :func:`stage` (a remote directory's files copied to a
  local temporary directory once per process, for readers that need a local path: the index
  and the corpus's JSON files are small).

Remote file systems come from ``etils.epath``: TensorFlow's ``gfile`` when TensorFlow is
installed, else fsspec (``gcsfs`` for ``gs://``); neither is needed for local paths. Advisory
locks (``core.artefacts.output_lock``) exist only for local paths; on a bucket the one writer is
process 0 of the one job.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Union

_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")

AnyPath = Union[str, os.PathLike]


def is_remote(p: AnyPath) -> bool:
  """Whether ``p`` is a URI (``gs://...``, ``s3://...``): anything with a ``scheme://``."""
  return bool(_SCHEME.match(os.fspath(p)))


def absolute(p: AnyPath):
  """A local path -> absolute ``pathlib.Path``; a remote one -> ``etils.epath.Path`` as given."""
  if is_remote(p):
    from etils import epath  # pylint: disable=g-import-not-at-top
    return epath.Path(os.fspath(p))
  return Path(p).absolute()


def as_path(p: AnyPath):
  """Like :func:`absolute` without making a local path absolute (``Path(p)``)."""
  return absolute(p) if is_remote(p) else Path(p)


def stage_file(p: AnyPath) -> Path:
  """A local path with the contents of file ``p`` (itself when local; see :func:`stage`)."""
  if not is_remote(p):
    return Path(p)
  parent, name = os.fspath(p).rstrip("/").rsplit("/", 1)
  return stage(parent, files=(name,)) / name


def to_str(p: AnyPath | None) -> str | None:
  """``str`` of a path (None stays None): ``gs://b/x`` keeps both slashes."""
  return None if p is None else os.fspath(p)


def read_text(p: AnyPath) -> str:
  return absolute(p).read_text(encoding="utf-8")


def write_text(p: AnyPath, text: str) -> None:
  """Writes ``text``: locally atomic (temporary + rename); remotely one object upload."""
  if is_remote(p):
    path = absolute(p)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return
  from cart_jax.core.artefacts import atomic_write_text  # pylint: disable=g-import-not-at-top
  atomic_write_text(p, text)


def write_json(p: AnyPath, obj, **dumps_kwargs) -> None:
  write_text(p, json.dumps(obj, indent=2, **dumps_kwargs) + "\n")


def walk_files(directory: AnyPath) -> dict[str, object]:
  """Every file under ``directory``: relative POSIX path -> path (sorted by the relative path)."""
  root = absolute(directory)
  out = {}
  if not is_remote(directory):
    for r, dirs, files in os.walk(root):
      dirs.sort()
      for name in files:
        p = Path(r) / name
        out[p.relative_to(root).as_posix()] = p
    return dict(sorted(out.items()))
  for r, _, files in root.walk():
    r = absolute(os.fspath(r)) if is_remote(os.fspath(r)) else absolute(_rejoin(root, r))
    for name in files:
      p = r / name
      out[_relative(p, root)] = p
  return dict(sorted(out.items()))


def _rejoin(root, r) -> str:
  """fsspec's walk may give ``bucket/dir`` without the scheme: put ``root``'s scheme back."""
  scheme = os.fspath(root).split("://", 1)[0]
  return f"{scheme}://{os.fspath(r).split('://', 1)[-1].lstrip('/')}"


def _relative(p, root) -> str:
  a = os.fspath(p).split("://", 1)[-1].lstrip("/")
  b = os.fspath(root).split("://", 1)[-1].strip("/")
  if not a.startswith(b + "/"):
    raise ValueError(f"{p} is not under {root}")
  return a[len(b) + 1:]


def size(p: AnyPath) -> int:
  if not is_remote(p):
    return Path(p).stat().st_size
  path = absolute(p)
  try:
    return int(path.stat().length)
  except (NotImplementedError, AttributeError):  # a file system without epath's stat (fsspec)
    with path.open("rb") as f:
      f.seek(0, 2)
      return int(f.tell())


def sha256(p: AnyPath, block: int = 1 << 20) -> str:
  h = hashlib.sha256()
  with (absolute(p).open("rb") if is_remote(p) else open(p, "rb")) as f:
    for chunk in iter(lambda: f.read(block), b""):
      h.update(chunk)
  return h.hexdigest()


def copy_tree(src: AnyPath, dst: AnyPath, *, last: str = "meta.json") -> None:
  """Copies the files of directory ``src`` to ``dst`` (either may be remote).

  Local ``dst``: atomically (a temporary sibling renamed into place, ``core.artefacts``).
  Remote ``dst``: file by file with ``last`` written last, so a reader that checks ``last``
  first never reads a half-copied directory.
  """
  files = walk_files(src)
  if not is_remote(dst):
    from cart_jax.core.artefacts import atomic_directory  # pylint: disable=g-import-not-at-top
    with atomic_directory(dst) as tmp:
      for rel, p in files.items():
        out = Path(tmp) / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(_read_bytes(p))
    return
  root = absolute(dst)
  for rel in sorted(files, key=lambda r: r == last):
    out = root / rel
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(_read_bytes(files[rel]))


def _read_bytes(p) -> bytes:
  return absolute(os.fspath(p)).read_bytes() if is_remote(os.fspath(p)) else Path(p).read_bytes()


_STAGED: dict[tuple[str, tuple[str, ...] | None], tuple[Path, list]] = {}


def stage(directory: AnyPath, files: tuple[str, ...] | None = None) -> Path:
  """A local directory with ``directory``'s files (``files``: only these relative paths).

  Local directories are returned as they are. A remote one is copied into a temporary directory
  (removed at exit) for readers that need a local path, once per process while its files (names
  and sizes) stay the same.
  """
  if not is_remote(directory):
    return Path(directory)
  key = (os.fspath(directory), None if files is None else tuple(files))
  src = walk_files(directory) if files is None else {f: absolute(directory) / f for f in files}
  signature = sorted((rel, size(p)) for rel, p in src.items())
  if key not in _STAGED or _STAGED[key][1] != signature:
    import atexit  # pylint: disable=g-import-not-at-top
    import shutil  # pylint: disable=g-import-not-at-top
    local = Path(tempfile.mkdtemp(prefix="cart-staged-"))
    atexit.register(shutil.rmtree, local, True)
    for rel, p in src.items():
      out = local / rel
      out.parent.mkdir(parents=True, exist_ok=True)
      out.write_bytes(_read_bytes(p))
    _STAGED[key] = (local, signature)
  return _STAGED[key][0]
