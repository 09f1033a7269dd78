"""What the benchmark drivers (ablations.py, incremental.py) share: gin-binding parsing, timestamped
log lines, the load average, short config hashes, --quiet redirection and "is this run trained?"."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path


def split_binding(b: str) -> tuple[str, str]:
  if "=" not in b:
    raise ValueError(f"--extra-binding {b!r}: expected NAME=VALUE (a gin binding)")
  name, value = b.split("=", 1)
  return name.strip(), value.strip()


def log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_average() -> float | None:
  try:
    return round(os.getloadavg()[0], 2)
  except OSError:
    return None


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
