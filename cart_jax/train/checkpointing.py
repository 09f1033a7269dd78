"""Checkpoints: the ONE module that talks to orbax.

Used by every trainer (CART's, the dual encoder's; :mod:`cart_jax.train.loop` saves through it).
A checkpoint of step ``s`` is the directory ``<directory>/<s>/`` with one orbax item per pytree
(CART saves ``params``, ``frozen`` and ``opt_state`` into ``MODEL_DIR/checkpoints``; the dual
encoder ``params`` and ``opt_state``) plus ``meta`` (JSON: step, wall time, metrics at save
time, whatever else the trainer records). Items restore onto the shapes, dtypes and shardings of
a template (exact resume); inference restores only ``params`` and ``frozen``.

Writes are atomic (orbax finalises a step directory only when complete); ``keep`` bounds how
many are kept. Data-iterator position needs no separate entry: the input pipeline is a pure
function of the step (see ``input_pipeline.py``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import jax
import orbax.checkpoint as ocp

ITEMS = ("params", "frozen", "opt_state")
META = "meta"


class Checkpointer:
  """Periodic saves, keep-N and restore of the newest (or a given) step."""

  def __init__(self, directory: str | os.PathLike, *, keep: int = 3, save_every: int = 0,
               async_save: bool = False, items: Sequence[str] = ITEMS):
    self.directory = Path(directory).absolute()
    self.save_every = int(save_every)
    self.items = tuple(items)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep if keep and keep > 0 else None,
        save_interval_steps=1,  # the trainer decides when (see should_save)
        create=True,
        enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=self.items + (META,))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def should_save(self, step: int, last_step: int) -> bool:
    """Every ``save_every`` steps, and always at the last step."""
    return step == last_step or (self.save_every > 0 and step % self.save_every == 0)

  def save(self, step: int, items: dict[str, Any], meta: dict | None = None, *,
           force: bool = True) -> bool:
    """Saves ``items`` (name -> pytree of arrays, names from ``self.items``) and ``meta`` as ``step``."""
    unknown = set(items) - set(self.items)
    if unknown:
      raise ValueError(f"unknown checkpoint items {sorted(unknown)}; expected {self.items}")
    # orbax refuses empty pytrees (e.g. no frozen parameters): those are simply not written.
    args = {k: ocp.args.StandardSave(v) for k, v in items.items() if jax.tree.leaves(v)}
    args[META] = ocp.args.JsonSave(dict(meta or {}, step=int(step)))
    return bool(self.manager.save(int(step), args=ocp.args.Composite(**args), force=force))

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def restore(self, templates: dict[str, Any], step: int | None = None) -> tuple[dict[str, Any], dict]:
    """Restores the items named in ``templates`` (a subset of what was saved) and ``meta`` of
    ``step`` (default: the newest), onto each template's shapes, dtypes and shardings
    (templates may hold arrays or ``jax.ShapeDtypeStruct``)."""
    step = self.latest_step() if step is None else int(step)
    if step is None:
      raise FileNotFoundError(f"{self.directory}: no checkpoint")
    args = {k: ocp.args.StandardRestore(jax.tree.map(_abstract, v))
            for k, v in templates.items() if jax.tree.leaves(v)}
    args[META] = ocp.args.JsonRestore()
    out = self.manager.restore(step, args=ocp.args.Composite(**args))
    return {k: out[k] if k in args else v for k, v in templates.items()}, dict(out[META] or {})

  def delete_all(self) -> None:
    """Removes every checkpoint (a run that starts afresh in a used directory)."""
    for step in self.all_steps():
      self.manager.delete(step)

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _abstract(x):
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  sharding = getattr(x, "sharding", None)
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
