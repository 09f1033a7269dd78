"""The one training loop shape shared by CART, the dual encoder and the RQ-VAE.

:func:`run` calls ``step_fn(step, state) -> (state, metrics)`` for the steps ``start ..
num_steps - 1``. ``metrics`` stay on the device: they are pulled with one ``jax.device_get``
every ``log_every`` steps and at the last step (never per step), then written (TensorBoard +
``metrics.jsonl``), shown on the progress bar and kept in the history. Checkpoints are saved
through :class:`cart_jax.core.checkpointing.Checkpointer` (every ``save_every`` steps and at
the end), each announced by one log line.

The first step is timed on its own (compilation); ``steps_per_second`` of a logged step covers
the steps since the previous log, without the first step and without time spent in ``evaluate``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import jax

if TYPE_CHECKING:
  from cart_jax.core.checkpointing import Checkpointer

Metrics = dict[str, Any]


class MetricWriter:
  """TensorBoard (tensorboardX) + JSONL, on process 0 only; both get the same keys.

  ``metrics.jsonl`` has one line per step: what is written for a step (train metrics, then
  validation) is merged and the line goes out when another step is written, at :meth:`flush`
  (the loop flushes at the end of every step) or at :meth:`close`.

  ``resume_step``: the step a resumed run starts from (0: a fresh start in a used directory).
  Lines of later steps (written before a kill, after the last checkpoint) and a truncated last
  line are dropped, atomically, before appending, and TensorBoard purges its events after that
  step, so a resumed run leaves each step once. ``None``: append to what is there.
  """

  def __init__(self, directory: Path | None, *, resume_step: int | None = None):
    self.tb = None
    self.jsonl = None
    self._remote = None  # metrics.jsonl on a bucket: its lines, rewritten whole per flush
    self._step: int | None = None  # the step of the line being gathered
    self._line: dict[str, float] = {}
    if directory is None or jax.process_index() != 0:
      return
    from cart_jax.core import paths  # pylint: disable=g-import-not-at-top
    directory = paths.absolute(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "metrics.jsonl"
    if paths.is_remote(directory):
      # Object stores cannot append: the file is rewritten whole (one upload) at each flush.
      text = paths.read_text(path) if path.exists() else ""
      self._remote = (path, _kept_lines(text, resume_step))
    elif resume_step is not None and path.exists():
      _truncate_jsonl(path, int(resume_step))
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      if self._remote is not None and not _remote_events_supported(directory):
        raise ImportError("no client for events on this remote file system")
      purge = {"purge_step": int(resume_step) + 1} if resume_step is not None else {}
      self.tb = SummaryWriter(str(directory / "tensorboard"), **purge)
    except ImportError:
      self.tb = None
    if self._remote is None:
      self.jsonl = open(path, "a", encoding="utf-8")

  def write(self, step: int, scalars: dict[str, float]) -> None:
    """Writes ``scalars`` (name -> value; non-finite values are skipped) at ``step``."""
    scalars = {k: float(v) for k, v in scalars.items() if math.isfinite(float(v))}
    if self.tb is not None:
      for k, v in scalars.items():
        self.tb.add_scalar(k, v, step)
      self.tb.flush()
    if self.jsonl is not None or self._remote is not None:
      if self._step is not None and self._step != int(step):
        self.flush()
      self._step = int(step)
      self._line.update(scalars)

  def flush(self) -> None:
    """Writes the gathered line (if any) of the current step."""
    if self._step is not None and self._remote is not None:
      from cart_jax.core import paths  # pylint: disable=g-import-not-at-top
      path, lines = self._remote
      lines.append(json.dumps({"step": self._step, **self._line}))
      paths.write_text(path, "".join(line + "\n" for line in lines))
    if self.jsonl is not None and self._step is not None:
      self.jsonl.write(json.dumps({"step": self._step, **self._line}) + "\n")
      self.jsonl.flush()
    self._step, self._line = None, {}

  def close(self) -> None:
    self.flush()
    if self.tb is not None:
      self.tb.close()
    if self.jsonl is not None:
      self.jsonl.close()


def _remote_events_supported(directory) -> bool:
  """Whether tensorboardX can write events under a remote ``directory``: ``gs://`` needs
  ``google-cloud-storage``, ``s3://`` ``boto3`` (without them metrics.jsonl is still written)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  need = {"gs": "google.cloud.storage", "s3": "boto3"}.get(os.fspath(directory).split("://")[0])
  try:
    return need is not None and importlib.util.find_spec(need) is not None
  except ModuleNotFoundError:
    return False


def _kept_lines(text: str, last_step: int | None) -> list[str]:
  """The lines of ``text`` to keep on resuming at ``last_step``: those of steps <= it (and lines
  without a step; all of them when ``last_step`` is None), without a torn last line."""
  lines = text.split("\n")
  if lines and lines[-1] == "":
    lines.pop()
  elif lines:
    lines.pop()  # no final newline: a line torn by a kill
  kept = []
  for line in lines:
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      kept.append(line)  # not ours to judge; kept as it was
      continue
    if (last_step is not None and isinstance(row, dict) and isinstance(row.get("step"), int)
        and row["step"] > last_step):
      continue
    kept.append(line)
  return kept


def _truncate_jsonl(path: Path, last_step: int) -> None:
  """Keeps the lines of steps <= ``last_step`` (and lines without a step), drops a torn last line."""
  from cart_jax.core.artefacts import atomic_write_text  # pylint: disable=g-import-not-at-top
  text = path.read_text(encoding="utf-8", errors="replace")
  kept = _kept_lines(text, last_step)
  if len(kept) != len(text.split("\n")) - 1 or not text.endswith("\n"):
    atomic_write_text(path, "".join(l + "\n" for l in kept))


@dataclasses.dataclass
class LoopResult:
  """What :func:`run` returns.

  Attributes:
    state: the state after the last step run.
    history: ``{"step": s, **metrics}`` (host floats) of each logged step ``s`` (1-based: steps
      done), or of every step with ``history_every_step``.
    seconds: wall time of the loop.
    compile_seconds: wall time of the first step (compilation + one step).
  """
  state: Any
  history: list[dict]
  seconds: float
  compile_seconds: float


def tqdm_bar(total: int, initial: int, desc: str):
  """A tqdm bar on stderr (process 0 decides whether to make one)."""
  import sys  # pylint: disable=g-import-not-at-top

  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, initial=initial, desc=desc, file=sys.stderr, dynamic_ncols=True)


def run(step_fn: Callable[[int, Any], tuple[Any, Metrics]], state: Any, *, start: int,
        num_steps: int, log_every: int, on_step: Callable[[int, dict | None], None] | None = None,
        writer: MetricWriter | None = None, metric_prefix: str = "train/",
        checkpointer: Checkpointer | None = None,
        checkpoint_items: Callable[[Any], dict[str, Any]] | None = None,
        checkpoint_meta: dict | None = None,
        evaluate: Callable[[int, Any], None] | None = None, eval_every: int = 0,
        history_every_step: bool = False, stop_after: int | None = None,
        log: Callable[[str], None] | None = None) -> LoopResult:
  """Runs ``step_fn`` for steps ``start .. num_steps - 1`` (see the module docstring).

  Args:
    step_fn: ``(step, state) -> (state, metrics)``; ``step`` is 0-based, ``metrics`` a dict of
      device scalars.
    state: the state before step ``start``.
    start: first step to run (a resumed run's checkpoint step).
    num_steps: steps in total.
    log_every: pull, write and show the metrics every this many steps (and at the last step).
    on_step: ``(done, metrics)`` after every step; ``metrics`` are the host floats just pulled
      on a logged step, ``None`` otherwise (drives a progress bar).
    writer: TensorBoard/JSONL writer of the logged metrics (keys ``metric_prefix + name``).
    checkpointer: saves ``checkpoint_items(state)`` when ``checkpointer.should_save`` (and when
      stopping early), with ``checkpoint_meta`` + the last logged metrics as its meta.
    evaluate: ``(done, state)`` every ``eval_every`` steps and at the last step (validation).
    history_every_step: keep every step's metrics in the history (pulled in one transfer per
      log), not only the logged steps'.
    stop_after: stop (after saving a checkpoint) once this many steps ran in this call.
    log: one line per checkpoint saved (and per logged step when ``on_step`` is None).
  """
  last = num_steps
  history: list[dict] = []
  pending: list[tuple[int, Metrics]] = []  # device metrics since the last log
  t_start = time.perf_counter()
  compile_s = 0.0
  window_t, window_n = t_start, 0
  ran = 0
  for step in range(start, num_steps):
    if step == start:
      t0 = time.perf_counter()
      state, metrics = step_fn(step, state)
      jax.block_until_ready(state)
      compile_s = time.perf_counter() - t0
      window_t = time.perf_counter()
    else:
      state, metrics = step_fn(step, state)
      window_n += 1
    ran += 1
    done = step + 1
    if history_every_step:
      pending.append((done, metrics))
    else:
      pending = [(done, metrics)]
    host = None
    if done % log_every == 0 or done == last:
      pulled = jax.device_get([m for _, m in pending])
      elapsed = time.perf_counter() - window_t
      for (s, _), m in zip(pending, pulled):
        history.append({"step": s, **{k: float(v) for k, v in m.items()}})
      host = {k: v for k, v in history[-1].items() if k != "step"}
      host["steps_per_second"] = window_n / elapsed if window_n and elapsed > 0 else float("nan")
      history[-1]["steps_per_second"] = host["steps_per_second"]
      pending = []
      window_t, window_n = time.perf_counter(), 0
      if writer is not None:
        writer.write(done, {metric_prefix + k: v for k, v in host.items()})
      if on_step is None and log is not None:
        log(f"step {done}: " + " ".join(f"{k} {v:.4g}" for k, v in host.items()))
    if on_step is not None:
      on_step(done, host)
    if evaluate is not None and eval_every > 0 and (done % eval_every == 0 or done == last):
      t_eval = time.perf_counter()
      evaluate(done, state)
      window_t += time.perf_counter() - t_eval
    if writer is not None:
      writer.flush()  # this step's line (train + validation metrics), before its checkpoint
    stopping = stop_after is not None and ran >= stop_after
    if checkpointer is not None and (checkpointer.should_save(done, last) or stopping):
      meta = dict(checkpoint_meta or {}, metrics=history[-1] if history else {}, time=time.time())
      checkpointer.save(done, checkpoint_items(state), meta)
      if log is not None:
        log(f"saved checkpoint step {done} to {checkpointer.directory}")
    if stopping:
      break
  return LoopResult(state=state, history=history, seconds=time.perf_counter() - t_start,
                    compile_seconds=compile_s)
