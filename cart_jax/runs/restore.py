"""Loading a trained run for inference: ``run.json``, the index copy, the corpus, the parameters.

:func:`load_run` checks everything it reads (:mod:`cart_jax.runs.layout` says what and how);
:func:`restore_for_inference` restores a checkpoint's parameters without the optimizer state,
sharded on a mesh. Used by evaluation, search, export, serving and the index updates alike, so
it sits below both ``train/`` and ``inference/``.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from cart_jax.core import paths
from cart_jax.core.errors import CartError
from cart_jax.runs.layout import (CHECKPOINT_SUBDIR, CORPUS_FILES, INDEX_SUBDIR, RUN_FILE, RUN_FORMAT,
                                  RUN_VERSION, RunError, check_corpus, inference_model_axis,
                                  run_subdir)

if TYPE_CHECKING:
  import jax

  from cart_jax.models.cart.config import ModelConfig


class NonFiniteError(CartError):
  """A run whose parameters, or a search's scores, are not finite (NaN or inf): corrupt
  parameters (a checkpoint loaded unverified) or a diverged training. Never silently empty results."""


@dataclasses.dataclass
class LoadedRun:
  """A trained run ready for inference."""
  model_dir: Path
  run: dict
  model_config: object
  index: object
  corpus: object
  graphdef: object
  params: object
  frozen: object
  step: int
  input_length: int
  mesh: object = None  # the mesh params/frozen live on (all devices, every process: data x model)


def load_run(model_dir: str | os.PathLike, step: int | None = None, *, need_corpus: bool = True,
             verify: bool = True, mesh=None) -> LoadedRun:
  """Reads ``run.json``, the index copy and the newest (or given) checkpoint of a MODEL_DIR.

  ``verify``: check the checkpoint's files against its manifest before reading any array
  (``CheckpointIntegrityError`` naming the step and the file on a mismatch).
  ``mesh``: where the parameters go (default: every device of every process, ``data`` x
  ``model``, the run's ``mesh_model`` where it divides the devices: :func:`inference_model_axis`),
  so :func:`searcher_for_run` splits query batches over all of them. A
  multi-process launch (``jax.distributed``, see ``launch/``) is joined first; then every
  process must call this (the restore is collective).
  """
  from cart_jax.data.corpus import load_corpus  # pylint: disable=g-import-not-at-top
  from cart_jax.index.identifiers import load_index  # pylint: disable=g-import-not-at-top
  from cart_jax.models.cart.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from cart_jax import partitioning  # pylint: disable=g-import-not-at-top

  partitioning.maybe_initialize_distributed()
  d = paths.as_path(model_dir)  # gs://... stays a URI (etils.epath); the index and the corpus's
  run_path = d / RUN_FILE        # JSON files are read from a local copy of a remote directory
  if not d.is_dir():
    raise RunError(f"{d}: no such directory (a MODEL_DIR written by `cart train`)")
  if not run_path.exists():
    raise RunError(f"{d}: not a CART model directory (no {RUN_FILE}; train one with `cart train`)")
  try:
    run = json.loads(run_path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise RunError(f"{run_path}: unreadable JSON ({e})") from None
  if not isinstance(run, dict):
    raise RunError(f"{run_path}: expected a JSON object, found {type(run).__name__}")
  if run.get("format") != RUN_FORMAT or run.get("version") != RUN_VERSION:
    raise RunError(f"{run_path}: format {run.get('format')!r} v{run.get('version')}, expected "
                   f"{RUN_FORMAT!r} v{RUN_VERSION}")
  model_config = ModelConfig(**run["model_config"])
  index = load_index(paths.stage(run_subdir(d, run, "index_dir", INDEX_SUBDIR)))
  corpus = None
  if need_corpus:
    corpus_dir = run["corpus_dir"]
    if not paths.as_path(corpus_dir).exists():
      raise RunError(f"{run_path}: corpus_dir {corpus_dir} does not exist")
    if paths.is_remote(corpus_dir):
      corpus_dir = paths.stage(corpus_dir, CORPUS_FILES)
    check_corpus(run_path, run, corpus_dir)
    corpus = load_corpus(corpus_dir, check_media=False)
  ckpt_dir = run_subdir(d, run, "checkpoint_dir", CHECKPOINT_SUBDIR)
  if not ckpt_dir.exists() or not any(p.name.isdigit() for p in ckpt_dir.iterdir()):
    raise RunError(f"{ckpt_dir}: no checkpoint yet")
  if step is not None and not (ckpt_dir / str(step)).is_dir():
    steps = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
    raise RunError(f"{ckpt_dir}: no checkpoint of step {step} (steps: {steps})")
  if mesh is None:
    mesh = partitioning.make_mesh(-1, inference_model_axis(run))
  graphdef, params, frozen, got_step = restore_for_inference(model_config, ckpt_dir, step, mesh,
                                                             verify=verify)
  check_finite({"params": params, "frozen": frozen},
               f"{ckpt_dir / str(got_step)}: checkpoint step {got_step} of {d}")
  return LoadedRun(model_dir=d, run=run, model_config=model_config, index=index, corpus=corpus,
                   graphdef=graphdef, params=params, frozen=frozen, step=got_step,
                   input_length=int(run["input_config"]["input_length"]), mesh=mesh)


def check_finite(tree, where: str) -> None:
  """Raises ``NonFiniteError`` naming the first floating-point array of ``tree`` (a pytree of
  arrays) that holds a NaN or an infinity, with how many; ``where`` names the checkpoint."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  leaves = [(path, leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
            if jnp.issubdtype(leaf.dtype, jnp.floating)]
  # One compiled program counts every array (one small program per array shape cost seconds of
  # compiling at every load), then one transfer.
  counts = jax.device_get(_count_non_finite(tuple(leaf for _, leaf in leaves)))
  for (path, leaf), bad in zip(leaves, counts):
    bad = int(bad)
    if bad:
      name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
      raise NonFiniteError(
          f"{where}: parameter {name} holds {bad} non-finite value{'s' if bad > 1 else ''} (NaN or "
          f"inf) of {leaf.size}: the checkpoint is corrupt (loaded with --no-verify, or written "
          "before manifests) or the training diverged; nothing is searched")


@functools.lru_cache(maxsize=1)
def _non_finite_counter():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return jax.jit(lambda leaves: [jnp.sum(~jnp.isfinite(x)) for x in leaves])


def _count_non_finite(leaves: tuple) -> list:
  return _non_finite_counter()(leaves)


def restore_for_inference(model_config: "ModelConfig", checkpoint_dir: str | os.PathLike,
                          step: int | None = None, mesh: jax.sharding.Mesh | None = None, *,
                          verify: bool = True):
  """``(graphdef, params, frozen, step)`` from a checkpoint (no optimizer state kept).

  ``mesh``: where the arrays go, sharded by the logical axis rules (replicated over ``data``,
  split over ``model`` where the rules say so); default: this process's first device. On a mesh
  that spans several processes the restore is collective (every process calls it).
  ``verify``: check the step's ``params``/``frozen``/``meta`` files against its manifest first
  (``checkpointing.CheckpointIntegrityError`` on any difference).
  """
  import jax  # pylint: disable=g-import-not-at-top

  from cart_jax import partitioning  # pylint: disable=g-import-not-at-top
  from cart_jax.core.checkpointing import Checkpointer  # pylint: disable=g-import-not-at-top
  mesh = mesh or partitioning.make_mesh(1, 1, devices=[jax.local_devices()[0]])
  graphdef, template = abstract_sharded(model_config, mesh)
  ckpt = Checkpointer(checkpoint_dir, keep=0)
  try:
    restored, meta = ckpt.restore(template, step, verify=verify)
  finally:
    ckpt.close()
  return graphdef, restored["params"], restored["frozen"], int(meta["step"])


def abstract_sharded(model_config: ModelConfig, mesh: jax.sharding.Mesh):
  """``(graphdef, {"params": ..., "frozen": ...})`` of ``jax.ShapeDtypeStruct`` with the rules'
  shardings on ``mesh`` (a restore template; nothing is allocated)."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from cart_jax import partitioning  # pylint: disable=g-import-not-at-top
  from cart_jax.models.cart.network import CARTNetwork, trainable_filter  # pylint: disable=g-import-not-at-top
  model = nnx.eval_shape(lambda: CARTNetwork(model_config, rngs=nnx.Rngs(0)))
  graphdef, trainable, frozen = nnx.split(model, trainable_filter(model_config), ...)

  def template(state):
    shardings = nnx.to_pure_dict(partitioning.state_shardings(state, mesh))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        nnx.to_pure_dict(state), shardings)
  return graphdef, {"params": template(trainable), "frozen": template(frozen)}
