"""A persistent JAX compilation cache, so the second ``cart search`` / ``eval`` / ``serve`` start
skips compiling.

JAX compiles every jitted program (the search, the checkpoint restore's small programs) on first
use in a process; on CPU the search program alone takes seconds. With
:func:`enable_compilation_cache` JAX writes each compiled executable to a directory, keyed by a
hash of the program, the compile options, the XLA flags and the jax/jaxlib versions, and a later
process loads it instead of compiling again. Nothing else changes: the executable loaded is the one
compiled before (same numbers).

Where (first that is set)::

  enable_compilation_cache(cache_dir=...)     the caller's choice
  $CART_JAX_CACHE_DIR                         this cache only
  $JAX_COMPILATION_CACHE_DIR                  JAX's own setting, when a user has one
  $CART_CACHE_DIR/jax                         cart-jax's cache root (the encoder-state cache's too)
  $XDG_CACHE_HOME/cart-jax/jax, else ~/.cache/cart-jax/jax

If that directory cannot be created or written (a read-only home), ``MODEL_DIR/compile_cache`` is
used when a ``model_dir`` is given and writable, else the cache stays off (one log line says why).
The directory is created private (0700): JAX treats its cache as trusted code, so it must not be
writable by others.

Off: ``CART_JAX_COMPILE_CACHE=0`` (or ``cart --no-compile-cache COMMAND``).
Size: bounded to ``$CART_JAX_CACHE_MAX_BYTES`` (default 2 GiB; least recently used entries are
evicted, which needs the ``filelock`` package; without it the cache is unbounded).

Every ``cart`` command calls :func:`enable_compilation_cache` before it runs
(:mod:`cart_jax.cli.main`); a notebook calls it once before its first search. :func:`stats`
counts this process's cache hits and writes (JAX's monitoring events).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import threading
from pathlib import Path

ENV_DIR = "CART_JAX_CACHE_DIR"
ENV_JAX = "JAX_COMPILATION_CACHE_DIR"  # JAX's own variable: a user's choice is kept
ENV_ROOT = "CART_CACHE_DIR"  # cart-jax's cache root (cart_jax/train/state_cache.py uses it too)
ENV_SWITCH = "CART_JAX_COMPILE_CACHE"  # "0", "false", "no" or "off": no persistent cache
ENV_MAX_BYTES = "CART_JAX_CACHE_MAX_BYTES"
DEFAULT_MAX_BYTES = 2 << 30
MODEL_DIR_SUBDIR = "compile_cache"
# Programs that compile faster than this are not written. JAX's default (1 s) would skip most of
# the small programs of a search start on CPU (checkpoint restore, batching, the host-side
# gathers), whose compiles add up to seconds; loading one entry costs about a millisecond.
MIN_COMPILE_SECS = 0.0

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_enabled_dir: Path | None = None


@dataclasses.dataclass
class CacheStats:
  """This process's persistent-cache traffic since :func:`enable_compilation_cache`.

  Attributes:
    requests: compiles that consulted the cache.
    hits: executables loaded from the cache instead of compiled.
    writes: executables compiled and written to the cache (misses).
    seconds_saved: compile time the hits saved (as JAX recorded it when it compiled them).
  """
  requests: int = 0
  hits: int = 0
  writes: int = 0
  seconds_saved: float = 0.0


_STATS = CacheStats()
_LISTENING = False


def _on_event(event: str, **kwargs) -> None:
  if event == "/jax/compilation_cache/compile_requests_use_cache":
    _STATS.requests += 1
  elif event == "/jax/compilation_cache/cache_hits":
    _STATS.hits += 1
  elif event == "/jax/compilation_cache/cache_misses":
    _STATS.writes += 1


def _on_duration(event: str, duration: float, **kwargs) -> None:
  if event == "/jax/compilation_cache/compile_time_saved_sec":
    _STATS.seconds_saved += float(duration)


def stats() -> CacheStats:
  """A copy of this process's counts (all zero while the cache is off)."""
  return dataclasses.replace(_STATS)


def is_disabled_by_env() -> bool:
  return os.environ.get(ENV_SWITCH, "").strip().lower() in ("0", "false", "no", "off")


def default_cache_dir() -> Path:
  """``$CART_JAX_CACHE_DIR``, else ``$JAX_COMPILATION_CACHE_DIR``, else ``$CART_CACHE_DIR/jax``,
  else ``$XDG_CACHE_HOME`` (or ``~/.cache``) ``/cart-jax/jax``."""
  for name in (ENV_DIR, ENV_JAX):
    if os.environ.get(name):
      return Path(os.environ[name]).expanduser()
  if os.environ.get(ENV_ROOT):
    return Path(os.environ[ENV_ROOT]).expanduser() / "jax"
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return Path(base) / "cart-jax" / "jax"


def _usable(d: Path) -> bool:
  """Creates ``d`` (0700) if needed and checks a file can be written in it."""
  try:
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, probe = tempfile.mkstemp(prefix=".probe-", dir=d)
    os.close(fd)
    os.unlink(probe)
    return True
  except OSError:
    return False


def _max_bytes() -> int:
  raw = os.environ.get(ENV_MAX_BYTES, "").strip()
  if not raw:
    return DEFAULT_MAX_BYTES
  try:
    n = int(raw)
  except ValueError:
    from cart_jax.core.errors import CartError  # pylint: disable=g-import-not-at-top
    raise CartError(f"${ENV_MAX_BYTES}={raw!r}: expected a number of bytes (-1: unbounded)") from None
  return n


def enable_compilation_cache(model_dir: str | os.PathLike | None = None, *,
                             cache_dir: str | os.PathLike | None = None) -> Path | None:
  """Turns on JAX's persistent compilation cache for this process; returns its directory.

  Args:
    model_dir: an existing run directory; used (as ``MODEL_DIR/compile_cache``) only when the
      user cache directory cannot be written.
    cache_dir: use this directory instead of the default (:func:`default_cache_dir`).

  Returns ``None`` (and changes nothing) when ``CART_JAX_COMPILE_CACHE=0`` or no directory is
  writable. Idempotent; call it before the first compilation (programs compiled earlier in the
  process are not written). A second call with another directory switches to it.
  """
  global _enabled_dir, _LISTENING
  if is_disabled_by_env():
    return None
  candidates = [Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()]
  if model_dir is not None and "://" not in str(model_dir) and Path(model_dir).is_dir():
    candidates.append(Path(model_dir) / MODEL_DIR_SUBDIR)  # an existing run only: never create one
  chosen = next((d for d in candidates if _usable(d)), None)
  if chosen is None:
    _log.warning("compilation cache off: cannot write %s", " or ".join(map(str, candidates)))
    return None
  chosen = chosen.resolve()
  with _lock:
    if _enabled_dir == chosen:
      return chosen
    import jax  # pylint: disable=g-import-not-at-top
    from jax.experimental.compilation_cache import compilation_cache as _cc  # pylint: disable=g-import-not-at-top
    max_bytes = _max_bytes()
    if max_bytes > 0:
      try:
        import filelock  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
      except ImportError:  # JAX needs it to evict; without it the cache grows unbounded
        max_bytes = -1
    jax.config.update("jax_compilation_cache_dir", str(chosen))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # no size floor
    jax.config.update("jax_compilation_cache_max_size", max_bytes)
    jax.config.update("jax_enable_compilation_cache", True)
    _cc.reset_cache()  # a cache opened before (another directory) is reopened at the next compile
    if not _LISTENING:
      jax.monitoring.register_event_listener(_on_event)
      jax.monitoring.register_event_duration_secs_listener(_on_duration)
      _LISTENING = True
    _enabled_dir = chosen
  _log.info("JAX compilation cache: %s", chosen)
  return chosen


def enabled_dir() -> Path | None:
  """The directory :func:`enable_compilation_cache` turned on in this process, or ``None``."""
  return _enabled_dir


def cache_entries(d: str | os.PathLike) -> list[Path]:
  """The compiled-executable files in a cache directory (``*-cache``; not lock/atime files)."""
  d = Path(d)
  if not d.is_dir():
    return []
  return sorted(p for p in d.iterdir() if p.is_file() and p.name.endswith("-cache"))
