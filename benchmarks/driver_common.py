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


IDS_PREFIX = "IdentifierConfig."  # an --extra-binding of these changes the identifier config


def split_extra(extra: list[str]) -> tuple[list[str], dict]:
  """--extra-binding values -> (gin bindings for training, IdentifierConfig field overrides).

  The drivers build the identifiers themselves, so ``IdentifierConfig.X=V`` bindings change the
  identifier config of every run (``V`` a Python literal) instead of going to gin.
  """
  import ast  # pylint: disable=g-import-not-at-top
  import dataclasses  # pylint: disable=g-import-not-at-top

  from cart_jax.index.identifiers import IdentifierConfig  # pylint: disable=g-import-not-at-top
  fields = {f.name for f in dataclasses.fields(IdentifierConfig)}
  gin, ids = [], {}
  for b in extra:
    name, value = split_binding(b)
    if not name.startswith(IDS_PREFIX):
      gin.append(f"{name}={value}")
      continue
    field = name[len(IDS_PREFIX):]
    if field not in fields:
      raise ValueError(f"--extra-binding {b!r}: IdentifierConfig has no field {field!r}")
    try:
      ids[field] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      raise ValueError(f"--extra-binding {b!r}: the value must be a Python literal") from None
  return gin, ids


def read_report(path: Path, fmt: str, version: int, what: str) -> dict:
  """A driver's JSON report (a fresh one when ``path`` does not exist); CartError naming the file
  when it is unreadable or of another format (``what``: "an ablation report", ...)."""
  from cart_jax.core.errors import CartError  # pylint: disable=g-import-not-at-top
  if not path.exists():
    return {"format": fmt, "version": version, "runs": []}
  try:
    report = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, json.JSONDecodeError) as e:
    raise CartError(f"--json {path}: unreadable ({e}); move it away or pass another --json") from None
  if report.get("format") != fmt or not isinstance(report.get("runs"), list):
    raise CartError(f"--json {path}: not {what} (format {report.get('format')!r}); "
                    "pass another --json")
  return report


def save_figure(fig, path) -> None:
  """``fig`` laid out and written to ``path`` as PNG atomically; the figure is closed."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  from cart_jax.core.artefacts import atomic_write_via  # pylint: disable=g-import-not-at-top
  fig.tight_layout()
  try:
    atomic_write_via(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
  finally:
    plt.close(fig)
