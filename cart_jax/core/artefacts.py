"""Atomic writes and content hashes for on-disk artefacts (index directories, JSON, npy).

An artefact directory is written into a temporary sibling and renamed into place
only once complete, so readers never see a half-written directory and a failed
build leaves nothing behind (an existing artefact at the target stays intact
until the new one is complete).

Writers that are safe together:

* **One writer per output.** :func:`output_lock` holds an advisory ``fcntl.flock`` on
  ``.NAME.lock`` beside the output ``NAME`` (the file records the holder's pid, host and start
  time), ``NAME`` being the output's real path (:func:`real_output`): a writer of a symbolic link
  and one of its target take the same lock. :func:`atomic_directory` holds it while its block
  builds the new directory and while it swaps it in, so the swap cannot race another writer's; a
  second writer gets
  :class:`OutputLockedError` naming the holder (or, with ``wait=True``, waits for it). The
  kernel releases the lock when its holder dies, so a killed writer's lock is taken over by the
  next run; the lock file is removed on release. Locks are re-entrant within a thread
  (``output_lock(out)`` around a whole build, then ``atomic_directory(out)`` inside it).
* **The swap.** The new directory and the old one are exchanged in one ``renameat2(...,
  RENAME_EXCHANGE)`` where the kernel and filesystem have it (Linux), so the target never goes
  missing; elsewhere the old one is moved aside first (``.NAME.old-*``) and back on failure.
* **Outputs named through a symbolic link are written through it.** Every writer here works on
  the real path of its output (links resolved, the output's own included): the link stays a
  link and its target gets the new content; it is never replaced by a directory or a file.
* **Litter from killed writers.** Temporary names carry their creator's pid and host
  (``.NAME.tmp-PID.HOST-XXXXXXXX``, ``.NAME.old-PID.HOST-XXXXXXXX``); every atomic write first
  removes such siblings of its target whose creator (on this host) is dead, never a live
  process's.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from cart_jax.core.errors import CartError

try:
  import fcntl
except ImportError:  # not POSIX (Windows is not a target): per-process locks only
  fcntl = None


class OutputLockedError(CartError):
  """Another writer (named by pid) is writing the same output."""


# ---- temporary names that say who made them
_HOST = hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def _owner_tag() -> str:
  return f"{os.getpid()}.{_HOST}"


def _split(target: str | os.PathLike) -> tuple[Path, str]:
  """(parent, name) of an output path; ``.``, ``..`` and ``dir/`` name the directory itself."""
  target = Path(target)
  if target.name in ("", ".", ".."):
    target = Path(os.path.abspath(target))
  return (target.parent if str(target.parent) else Path(".")), target.name


def _pid_alive(pid: int) -> bool:
  if pid == os.getpid():
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except (PermissionError, OverflowError, ValueError):  # another user's process, or not a pid
    return True
  return True


def _remove(path: Path) -> None:
  """Removes a file, link or directory tree; what cannot be removed stays (never raises)."""
  if path.is_dir() and not path.is_symlink():
    shutil.rmtree(path, ignore_errors=True)
  else:
    with contextlib.suppress(OSError):
      path.unlink()


def clean_stale(parent: str | os.PathLike, *names: str) -> list[Path]:
  """Removes ``parent/.NAME.tmp-*`` / ``.NAME.old-*`` left by dead writers; returns them.

  Only names that carry a pid and this host's tag, and whose pid no longer runs: another live
  process's temporary, one from another host sharing the directory, or one in the old untagged
  format (which cannot say who made it) is left alone.
  """
  alternatives = "|".join(re.escape(name) for name in names)
  pattern = re.compile(rf"\.(?:{alternatives})\.(?:tmp|old)-(\d+)\.([0-9a-f]{{8}})-")
  removed = []
  try:
    entries = list(os.scandir(parent))
  except OSError:
    return removed
  for entry in entries:
    m = pattern.match(entry.name)
    if m is None or m.group(2) != _HOST or int(m.group(1)) <= 0 or _pid_alive(int(m.group(1))):
      continue
    path = Path(entry.path)
    _remove(path)
    removed.append(path)
  return removed


def _umask() -> int:
  """The process umask, read without changing it when /proc allows (os.umask is process-wide:
  setting it even briefly would race other threads' file creation)."""
  with contextlib.suppress(OSError, ValueError):
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  with _umask_guard:
    umask = os.umask(0)
    os.umask(umask)
  return umask


_umask_guard = threading.Lock()


# ---- the output lock
def real_output(target: str | os.PathLike) -> Path:
  """The real path of an output: every symbolic link on the way resolved, the output's own
  included (what exists of it; the rest as given). Locks and swaps work on it."""
  return Path(os.path.realpath(target))


def lock_path(target: str | os.PathLike) -> Path:
  """The lock file of an output: ``.NAME.lock`` beside ``NAME``, its real path."""
  parent, name = _split(real_output(target))
  return parent / f".{name}.lock"


class _Held:
  """This process's hold on one lock file: a thread lock (re-entrant) + the flock'd fd."""

  def __init__(self):
    self.thread_lock = threading.RLock()
    self.depth = 0
    self.fd = None
    self.pid = None


_held: dict[str, _Held] = {}
_held_guard = threading.Lock()


def _after_fork_in_child() -> None:
  """A forked child does not hold its parent's locks: it closes its copies of their fds (the
  parent keeps the lock) and never unlinks the parent's lock files."""
  global _held, _held_guard
  for held in _held.values():
    if held.fd is not None:
      with contextlib.suppress(OSError):
        os.close(held.fd)
      held.fd = None
  _held, _held_guard = {}, threading.Lock()


if hasattr(os, "register_at_fork"):
  os.register_at_fork(after_in_child=_after_fork_in_child)


def _holder(path: Path) -> tuple[int | None, str | None, float | None]:
  """(pid, host tag, start time) written in a lock file; Nones where unknown."""
  for attempt in range(20):  # the holder writes them just after it gets the lock
    with contextlib.suppress(OSError, UnicodeDecodeError):
      fields = path.read_text(encoding="utf-8").split()
      if len(fields) >= 3:
        with contextlib.suppress(ValueError):
          return int(fields[0]), fields[1], float(fields[2])
    if attempt < 19:
      time.sleep(0.005)
  return None, None, None


def _locked_error(target, path: Path) -> OutputLockedError:
  pid, host, since = _holder(path)
  if pid is None:
    who = "another process (its pid is not recorded)"
  else:
    who = f"pid {pid}" + ("" if host == _HOST else " on another host")
  when = "" if since is None else time.strftime(" (since %Y-%m-%d %H:%M:%S)", time.localtime(since))
  real = real_output(target)
  via = "" if real == Path(os.path.abspath(target)) else f" (real path {real})"
  return OutputLockedError(f"{target} is being written by {who}{when}{via}; wait for it or remove "
                           f"{path} if that process is gone")


def _open_lock(path: Path) -> int:
  try:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
  except PermissionError:  # another user's lock file: flock needs no write access
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def _flock(path: Path, target, wait: bool) -> int:
  """Opens and flocks ``path``; the fd of the file that is still at ``path`` once locked."""
  while True:
    fd = _open_lock(path)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
      try:
        current = os.path.samestat(os.fstat(fd), os.stat(path))
      except FileNotFoundError:
        current = False
    except BlockingIOError:
      os.close(fd)
      raise _locked_error(target, path) from None
    except BaseException:
      os.close(fd)
      raise
    if current:
      break
    os.close(fd)  # its holder removed it on release: lock the file now at ``path``
  with contextlib.suppress(OSError):
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {_HOST} {time.time():.3f}\n".encode(), 0)
  return fd


def _unflock(path: Path, fd: int) -> None:
  with contextlib.suppress(OSError):
    if os.path.samestat(os.fstat(fd), os.stat(path)):
      os.unlink(path)  # while still locked: a waiter then finds it gone and retries (_flock)
  os.close(fd)


@contextlib.contextmanager
def output_lock(target: str | os.PathLike, *, wait: bool = False) -> Iterator[Path]:
  """Holds the advisory lock of the output ``target`` (a directory or file) for the block.

  Raises :class:`OutputLockedError` ("TARGET is being written by pid N (since TIME); ...")
  if another process, or another thread of this one, holds it; ``wait=True`` waits instead.
  Re-entrant within a thread. The lock is the one of ``target``'s real path (:func:`lock_path`).
  Yields the lock file's path.
  """
  path = lock_path(target)
  path.parent.mkdir(parents=True, exist_ok=True)
  key = os.path.abspath(path)
  with _held_guard:
    held = _held.setdefault(key, _Held())
  if not held.thread_lock.acquire(blocking=wait):
    raise _locked_error(target, path)
  try:
    if held.depth == 0:
      held.fd = _flock(path, target, wait) if fcntl is not None else None
      held.pid = os.getpid()
    held.depth += 1
    try:
      yield path
    finally:
      if held.pid == os.getpid():  # not in a forked child (see _after_fork_in_child)
        held.depth -= 1
        if held.depth == 0 and held.fd is not None:
          fd, held.fd = held.fd, None
          _unflock(path, fd)
  finally:
    with contextlib.suppress(RuntimeError):  # a forked child's copy of another thread's hold
      held.thread_lock.release()


# ---- atomic writes
def _exchange(a: Path, b: Path) -> bool:
  """Swaps two paths in one step (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
  func = _renameat2()
  if func is None:
    return False
  at_fdcwd = -100
  if func(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), 2) == 0:  # 2: RENAME_EXCHANGE
    return True
  err = ctypes.get_errno()
  if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
    return False
  raise OSError(err, os.strerror(err), str(a), None, str(b))


_RENAMEAT2 = []


def _renameat2():
  if not _RENAMEAT2:
    func = None
    if sys.platform.startswith("linux"):
      with contextlib.suppress(OSError, AttributeError):
        func = ctypes.CDLL(None, use_errno=True).renameat2
        func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                         ctypes.c_uint]
        func.restype = ctypes.c_int
    _RENAMEAT2.append(func)
  return _RENAMEAT2[0]


def _swap_in(tmp: Path, target: Path, parent: Path, name: str) -> None:
  """Puts the complete directory ``tmp`` at ``target``; the previous target is removed."""
  if os.path.lexists(target) and _exchange(tmp, target):
    _remove(tmp)  # now the previous target
    return
  old = None
  if os.path.lexists(target):
    old = Path(tempfile.mkdtemp(prefix=f".{name}.old-{_owner_tag()}-", dir=parent))
    os.rmdir(old)
    os.replace(target, old)
  try:
    os.replace(tmp, target)
  except BaseException:
    if old is not None:
      os.replace(old, target)
    raise
  if old is not None:
    _remove(old)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, *, wait: bool = False) -> Iterator[Path]:
  """Yield a temporary directory that replaces ``target`` when the block succeeds.

  The block runs under :func:`output_lock` of ``target``: a concurrent writer of the same
  target raises :class:`OutputLockedError` (``wait=True``: waits for it, e.g. for caches that
  any process may fill). Dead writers' temporaries beside ``target`` are removed first.
  A ``target`` that is a symbolic link is written through: its real path is replaced, the link
  stays (:func:`real_output`).
  """
  parent, name = _split(real_output(target))
  target = parent / name
  parent.mkdir(parents=True, exist_ok=True)
  with output_lock(target, wait=wait):
    clean_stale(parent, name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-{_owner_tag()}-", dir=parent))
    try:
      os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
      yield tmp
      _swap_in(tmp, target, parent, name)
    except BaseException:
      _remove(tmp)
      raise


def _special_file(path: str | os.PathLike) -> bool:
  """Whether ``path`` (links followed) is there and neither a regular file nor a directory: a
  device (``/dev/null``), a FIFO, ``/dev/stdout``'s pipe. Such an output is written into, never
  replaced (a rename onto ``/dev/null`` would make it a regular file for the whole machine)."""
  try:
    mode = os.stat(path).st_mode
  except (OSError, ValueError):
    return False
  return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  """Write ``text`` to ``path`` via a temporary file in the same directory + rename.

  A ``path`` that is a symbolic link is written through (its real path is replaced); one that is
  a device, FIFO or pipe (``--json /dev/null``, ``/dev/stdout``) is written into directly.
  """
  if _special_file(path):
    with open(path, "w", encoding="utf-8") as f:
      f.write(text)
    return
  path = real_output(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  clean_stale(path.parent, path.name, path.stem)  # atomic_write_via's temporaries too
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{_owner_tag()}-", dir=path.parent)
  try:
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
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
  format sniffing works); it is renamed onto ``path`` only if ``write`` returns. A ``path``
  that is a symbolic link is written through (its real path is replaced); one that is a device,
  FIFO or pipe is given to ``write`` itself.
  """
  if _special_file(path):
    write(os.fspath(path))
    return
  path = real_output(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  clean_stale(path.parent, path.name, path.stem)  # atomic_write_text's temporaries too
  fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.tmp-{_owner_tag()}-", suffix=path.suffix,
                             dir=path.parent)
  os.close(fd)
  try:
    write(tmp)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
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
