"""What the benchmark drivers (ablations.py, incremental.py, ...) share: gin-binding parsing,
timestamped log lines, the load average, repeated timings, short config hashes, --quiet redirection
and "is this run trained?"."""
from __future__ import annotations

import contextlib
import hashlib
import json
import time
from pathlib import Path

from cart_jax.core.machine import load_average  # noqa: F401  (the drivers import it from here)


def split_binding(b: str) -> tuple[str, str]:
  if "=" not in b:
    raise ValueError(f"--extra-binding {b!r}: expected NAME=VALUE (a gin binding)")
  name, value = b.split("=", 1)
  return name.strip(), value.strip()


def log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def repeat_seconds(fn, reps: int) -> list[float]:
  """Wall seconds of ``reps`` calls of ``fn()``, one by one, sorted."""
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return sorted(times)


def short_hash(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:8]


@contextlib.contextmanager
def quiet_to(path: Path | None):
  """With a path: stdout/stderr of the block go to that log file (--quiet)."""
  if path is None:
    yield
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "a", encoding="utf-8") as f:
    with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
      yield


def train_done(model_dir: Path, steps: int) -> dict | None:
  p = model_dir / "train_summary.json"
  if not p.exists():
    return None
  try:
    s = json.loads(p.read_text(encoding="utf-8"))
  except (OSError, json.JSONDecodeError):
    return None
  return s if s.get("step", 0) >= steps else None
