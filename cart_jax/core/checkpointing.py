"""Checkpoints: the ONE module that talks to orbax.

Used by every trainer (CART's, the dual encoder's; :mod:`cart_jax.core.loop` saves through it).
A checkpoint of step ``s`` is the directory ``<directory>/<s>/`` with one orbax item per pytree
(CART saves ``params``, ``frozen`` and ``opt_state`` into ``MODEL_DIR/checkpoints``; the dual
encoder ``params`` and ``opt_state``) plus ``meta`` (JSON: step, wall time, metrics at save
time, whatever else the trainer records). Items restore onto the shapes, dtypes and shardings of
a template (exact resume); inference restores only ``params`` and ``frozen``.

The directory may be remote (``gs://...``): it stays a URI (:mod:`cart_jax.core.paths`), orbax
writes there itself and the manifests are written and checked through ``etils.epath``. With
several processes (``jax.distributed``) every process saves and restores (orbax's collective
writes); process 0 writes the manifests.

Writes are atomic (orbax finalises a step directory only when complete); ``keep`` bounds how
many are kept. Data-iterator position needs no separate entry: the input pipeline is a pure
function of the step (see ``input_pipeline.py``).

Integrity: once orbax has finished a step (at once for a synchronous save; for an asynchronous
one, when the next save, :meth:`Checkpointer.wait` or :meth:`Checkpointer.close` finds it done),
``<directory>/<s>/manifest.sha256.json`` is written atomically: the size and SHA-256 of every
file of the step. :meth:`Checkpointer.restore` verifies it first (``verify=True``, the default):
every file of the restored items and of ``meta`` is hashed, every file of the step must be listed
and every listed file present with its size. Any difference raises
:class:`CheckpointIntegrityError` naming the step directory, the step and the file, before any
array is read. Each save records in its ``meta`` that it promised a manifest, so a step whose
manifest is missing is one of two things:

* written before cart-jax wrote manifests (no promise in ``meta``): restored with a warning line
  on stderr (older runs keep working);
* a save interrupted between orbax's commit and the manifest (a kill): refused by
  :meth:`restore`; a resumed training run drops such steps (:meth:`Checkpointer.drop_interrupted`)
  and continues from the previous one, which gives the same parameters (the input pipeline is a
  function of the step).

Cost: hashing reads every byte once (one core, ~1.6 GB/s from the page cache). A step of
``gin_configs/models/minilm_small.gin`` (362 MiB: params 148, opt_state 214) verifies in 0.09 s
for eval/search (params + meta hashed, opt_state only sized) and 0.22 s for a resume (all of
it), on the 2-core CPU; ``load_run`` takes 0.84 s instead of 0.73 s. ``verify=False``
(``cart eval/search --no-verify``) skips it; a truncated or garbled JSON file of the step is
still a ``CheckpointIntegrityError``, not a traceback.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import orbax.checkpoint as ocp

from cart_jax.core import paths
from cart_jax.core.errors import CartError

ITEMS = ("params", "frozen", "opt_state")
META = "meta"
MANIFEST = "manifest.sha256.json"
MANIFEST_FORMAT = "cart-checkpoint-manifest"
MANIFEST_VERSION = 1
META_FILE = "metadata"  # orbax's JsonCheckpointHandler writes the meta item as <step>/meta/metadata


class CheckpointIntegrityError(CartError):
  """A checkpoint step whose files do not match its manifest (or that cannot be verified/read)."""


def _stderr(line: str) -> None:
  print(line, file=sys.stderr)


def step_files(step_dir) -> dict[str, Path]:
  """Every file under ``step_dir`` except the manifest: relative POSIX path -> path (sorted).
  ``step_dir`` may be remote (``gs://``: :mod:`cart_jax.core.paths`)."""
  return {rel: p for rel, p in paths.walk_files(step_dir).items() if rel != MANIFEST}


def write_manifest(step_dir: str | os.PathLike, step: int) -> dict:
  """Writes ``step_dir/manifest.sha256.json`` (size + SHA-256 of every file) atomically."""
  step_dir = paths.absolute(step_dir)
  files = {rel: {"bytes": paths.size(p), "sha256": paths.sha256(p)}
           for rel, p in step_files(step_dir).items()}
  manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "step": int(step),
              "files": files}
  paths.write_json(step_dir / MANIFEST, manifest)
  return manifest


def _read_json(path, step_dir, step: int, what: str) -> Any:
  try:
    return json.loads(path.read_bytes().decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointIntegrityError(
        f"{path}: checkpoint step {step} of {step_dir.parent}: {what} is not valid JSON ({e}); "
        "the file is truncated or corrupt") from None


def _promised_manifest(step_dir: Path, step: int) -> bool:
  """Whether the step's ``meta`` says its save wrote a manifest (False when it has no meta)."""
  path = step_dir / META / META_FILE
  if not path.is_file():
    return False
  meta = _read_json(path, step_dir, step, "the checkpoint's meta")
  return isinstance(meta, dict) and meta.get("manifest") == MANIFEST


def verify_step(step_dir: str | os.PathLike, step: int, items: Sequence[str] | None = None, *,
                log: Callable[[str], None] = _stderr) -> bool:
  """Checks a step directory against its manifest; True when verified, False when it has none.

  ``items``: hash only the files of these items (plus ``meta`` and the step's top-level files);
  the files of the other items are checked for presence and size. ``None``: hash everything.
  A step without a manifest whose ``meta`` does not promise one (written before manifests) is
  accepted with a warning through ``log``; one whose ``meta`` promises one raises.

  Raises:
    CheckpointIntegrityError: naming the step directory, the step and the file.
  """
  step_dir = paths.absolute(step_dir)
  where = f"checkpoint step {step} of {step_dir.parent}"
  manifest_path = step_dir / MANIFEST
  if not manifest_path.is_file():
    if _promised_manifest(step_dir, step):
      raise CheckpointIntegrityError(
          f"{manifest_path}: {where}: no {MANIFEST}, although its save wrote the meta that promises "
          "one: the save was interrupted before the manifest was written, so the step cannot be "
          "verified (resume training to redo it, use another --step, or --no-verify to load it "
          "unverified)")
    log(f"warning: {step_dir}: {where} has no {MANIFEST} (written before cart-jax verified "
        "checkpoints): loaded without verification")
    return False
  manifest = _read_json(manifest_path, step_dir, step, MANIFEST)
  listed = manifest.get("files") if isinstance(manifest, dict) else None
  if (not isinstance(listed, dict) or manifest.get("format") != MANIFEST_FORMAT
      or not all(isinstance(v, dict) and isinstance(v.get("sha256"), str)
                 and isinstance(v.get("bytes"), int) for v in listed.values())):
    raise CheckpointIntegrityError(
        f"{manifest_path}: {where}: not a {MANIFEST_FORMAT} manifest (expected 'format' and "
        "'files': {path: {'bytes', 'sha256'}})")
  if manifest.get("step") != int(step):
    raise CheckpointIntegrityError(
        f"{manifest_path}: {where}: the manifest is step {manifest.get('step')}'s, not step {step}'s")
  present = step_files(step_dir)
  for rel in present:
    if rel not in listed:
      raise CheckpointIntegrityError(
          f"{step_dir / rel}: {where}: file not listed in {MANIFEST} (added or renamed after the save)")
  hashed = None if items is None else set(items) | {META}
  for rel, want in sorted(listed.items()):
    p = step_dir / rel
    if rel not in present:
      raise CheckpointIntegrityError(f"{p}: {where}: file missing ({MANIFEST} lists it)")
    size = paths.size(p)
    if size != want["bytes"]:
      raise CheckpointIntegrityError(
          f"{p}: {where}: {size} bytes, {MANIFEST} records {want['bytes']} (truncated or modified)")
    top = rel.split("/", 1)[0]
    if hashed is None or "/" not in rel or top in hashed:
      got = paths.sha256(p)
      if got != want["sha256"]:
        raise CheckpointIntegrityError(
            f"{p}: {where}: content does not match {MANIFEST} (sha256 {got[:16]}..., expected "
            f"{want['sha256'][:16]}...): the file is corrupt or was modified")
  return True


def _first_line(e: Exception) -> str:
  """An error's first line without tensorstore's spec dump (kilobytes of JSON), at most 300 chars."""
  return (str(e).splitlines() or [""])[0].split(" [tensorstore_spec")[0][:300]


class Checkpointer:
  """Periodic saves, keep-N and restore of the newest (or a given) step, with verified manifests."""

  def __init__(self, directory: str | os.PathLike, *, keep: int = 3, save_every: int = 0,
               async_save: bool = False, items: Sequence[str] = ITEMS,
               log: Callable[[str], None] = _stderr):
    self.directory = paths.absolute(directory)  # gs:// stays gs:// (orbax writes there itself)
    self.save_every = int(save_every)
    self.items = tuple(items)
    self.log = log
    self._pending: list[int] = []  # saved steps whose manifest is not written yet (async saves)
    self._verified: dict[int, set[str] | None] = {}  # step -> items hashed (None: all)
    self._legacy: set[int] = set()  # steps from before manifests (warned about once)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep if keep and keep > 0 else None,
        save_interval_steps=1,  # the trainer decides when (see should_save)
        create=True,
        enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=self.items + (META,))

  def step_dir(self, step: int):
    return self.directory / str(int(step))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def should_save(self, step: int, last_step: int) -> bool:
    """Every ``save_every`` steps, and always at the last step."""
    return step == last_step or (self.save_every > 0 and step % self.save_every == 0)

  def save(self, step: int, items: dict[str, Any], meta: dict | None = None, *,
           force: bool = True) -> bool:
    """Saves ``items`` (name -> pytree of arrays, names from ``self.items``) and ``meta`` as ``step``.

    The step's manifest is written once orbax has finished it (at once when saving synchronously).
    """
    unknown = set(items) - set(self.items)
    if unknown:
      raise ValueError(f"unknown checkpoint items {sorted(unknown)}; expected {self.items}")
    # orbax refuses empty pytrees (e.g. no frozen parameters): those are simply not written.
    args = {k: ocp.args.StandardSave(v) for k, v in items.items() if jax.tree.leaves(v)}
    args[META] = ocp.args.JsonSave(dict(meta or {}, step=int(step), manifest=MANIFEST))
    saved = bool(self.manager.save(int(step), args=ocp.args.Composite(**args), force=force))
    self._verified.pop(int(step), None)
    self._legacy.discard(int(step))
    if saved:
      self._pending.append(int(step))
    self._write_manifests()
    return saved

  def _write_manifests(self) -> None:
    """Manifests of the saved steps orbax has finished (all but an in-flight asynchronous one)."""
    if not self._pending:
      return
    in_flight = self._pending[-1:] if self.manager.is_saving_in_progress() else []
    for step in [s for s in self._pending if s not in in_flight]:
      d = self.step_dir(step)
      # keep-N may already have removed it; process 0 writes for all (a shared directory).
      if d.is_dir() and jax.process_index() == 0:
        write_manifest(d, step)
    self._pending = in_flight

  def wait(self) -> None:
    self.manager.wait_until_finished()
    self._write_manifests()

  def verify(self, step: int, items: Sequence[str] | None = None) -> bool:
    """:func:`verify_step` of ``step`` (hashing ``items``' files; None: all), once per item."""
    step = int(step)
    if step in self._verified:
      done = self._verified[step]
      if done is None or (items is not None and set(items) <= done):
        return step not in self._legacy
    if not self.step_dir(step).is_dir():
      raise CheckpointIntegrityError(f"{self.step_dir(step)}: no checkpoint of step {step} in "
                                     f"{self.directory} (steps: {self.all_steps()})")
    ok = verify_step(self.step_dir(step), step, items, log=self.log)
    if ok:
      prev = self._verified.get(step, set())
      self._verified[step] = None if items is None else prev | set(items)
    else:
      self._verified[step] = None  # from before manifests: nothing to check, warned once
      self._legacy.add(step)
    return ok

  def drop_interrupted(self) -> list[int]:
    """Deletes the steps whose save was interrupted before their manifest (a resumed run redoes
    them); returns their numbers. Steps from before manifests (no promise in meta) are kept."""
    dropped = []
    for step in self.all_steps():
      d = self.step_dir(step)
      if step in self._pending or (d / MANIFEST).is_file():
        continue
      try:
        interrupted = _promised_manifest(d, step)
      except CheckpointIntegrityError:
        interrupted = True  # no manifest and a garbled meta: not restorable either
      if interrupted:
        self.manager.delete(step)
        dropped.append(step)
    if dropped:
      self.manager.reload()
    return dropped

  def restore(self, templates: dict[str, Any], step: int | None = None, *,
              verify: bool = True) -> tuple[dict[str, Any], dict]:
    """Restores the items named in ``templates`` (a subset of what was saved) and ``meta`` of
    ``step`` (default: the newest), onto each template's shapes, dtypes and shardings
    (templates may hold arrays or ``jax.ShapeDtypeStruct``).

    ``verify``: check the step's files against its manifest first (module docstring);
    ``CheckpointIntegrityError`` on any difference.
    """
    step = self.latest_step() if step is None else int(step)
    if step is None:
      raise FileNotFoundError(f"{self.directory}: no checkpoint")
    args = {k: ocp.args.StandardRestore(jax.tree.map(_abstract, v))
            for k, v in templates.items() if jax.tree.leaves(v)}
    verified = self.verify(step, sorted(args)) if verify else False
    args[META] = ocp.args.JsonRestore()
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(**args))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:  # with verify=False: a garbled file
      raise CheckpointIntegrityError(
          f"{self.step_dir(step)}: checkpoint step {step} of {self.directory}: a JSON file of the step "
          f"is truncated or corrupt ({type(e).__name__}: {e})") from None
    except ValueError as e:
      if verified:  # the files are as saved: not corruption, a bug or a mismatched template
        raise
      # tensorstore's DATA_LOSS and the like: an unverified step (--no-verify, or from before
      # manifests) whose array files do not decode
      raise CheckpointIntegrityError(
          f"{self.step_dir(step)}: checkpoint step {step} of {self.directory}: an array file of the "
          f"step cannot be read ({_first_line(e)}); the step is corrupt (it was not "
          "verified: --no-verify, or written before manifests)") from None
    meta = dict(out[META] or {})
    meta.pop("manifest", None)
    return {k: out[k] if k in args else v for k, v in templates.items()}, meta

  def delete_all(self) -> None:
    """Removes every checkpoint (a run that starts afresh in a used directory)."""
    for step in self.all_steps():
      self.manager.delete(step)
    self._verified.clear()
    self._legacy.clear()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self._write_manifests()
    self.manager.close()


def _abstract(x):
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  sharding = getattr(x, "sharding", None)
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
