"""Atomic writes and content hashes for on-disk artefacts (index directories, JSON, npy).

An artefact directory is written into a temporary sibling and renamed into place
only once complete, so readers never see a half-written directory and a failed
build leaves nothing behind (an existing artefact at the target stays intact
until the new one is complete).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
  """Yield a temporary directory that replaces ``target`` when the block succeeds."""
  target = Path(target)
  parent = target.parent if str(target.parent) else Path(".")
  parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  old = None
  if target.exists():
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=parent))
    os.rmdir(old)
    os.replace(target, old)
  try:
    os.replace(tmp, target)
  except BaseException:
    if old is not None:
      os.replace(old, target)
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  """Write ``text`` to ``path`` via a temporary file in the same directory + rename."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
  try:
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


def atomic_write_via(path: str | os.PathLike, write: Callable[[str], None]) -> None:
  """Atomic write for writers that want a file name (``fig.savefig``, ``np.save``...).

  ``write(tmp)`` writes a temporary file in the same directory (its suffix is ``path``'s, so
  format sniffing works); it is renamed onto ``path`` only if ``write`` returns.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.tmp-", suffix=path.suffix, dir=path.parent)
  os.close(fd)
  try:
    write(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


def atomic_write_json(path: str | os.PathLike, obj, **dumps_kwargs) -> None:
  """``json.dumps(obj, indent=2, **dumps_kwargs)`` written atomically (see atomic_write_text)."""
  atomic_write_text(path, json.dumps(obj, indent=2, **dumps_kwargs) + "\n")


def sha256_file(path: str | os.PathLike, block: int = 1 << 20) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(block), b""):
      h.update(chunk)
  return h.hexdigest()
