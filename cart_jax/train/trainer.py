"""CART's trainer, in t5x's shape: pure step functions and a thin ``train(*, ...)``.

* :func:`create_train_state`: the network is created already sharded on the mesh
  (``nnx.eval_shape`` -> jitted init with ``out_shardings``, in ``partitioning.create_sharded``);
  a pretrained MiniLM encoder is loaded; the optimizer state is initialised by a jitted
  ``tx.init`` (sharded like the parameters it mirrors).
* :func:`make_train_step`: one jitted, state-donating step: CE (+ R-Drop KL) loss, AdamW
  update, metrics (loss, CE, KL, token accuracy, learning rate, gradient norm). Dropout keys
  are ``fold_in(seed, step)``, so a resumed run draws the same masks as an uninterrupted one.
* :func:`train`: batches by step from the input pipeline through the shared loop
  (:mod:`cart_jax.core.loop`: metrics pulled only when logged, periodic checkpoints), validation
  recall through constrained decoding, TensorBoard + console.

The state is split ``(graphdef, params, frozen)``: ``params`` are the trainable parameters
(``network.trainable_filter``; a frozen encoder is not among them), ``frozen`` the rest. Both are
plain nested dicts of arrays (``nnx.to_pure_dict``) so orbax and optax see ordinary pytrees.

No gin here: ``cart_jax/cli/gin_bridge.py`` makes these configurable at the edge.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cart_jax.core.errors import ConfigError
from cart_jax.models.cart import losses
from cart_jax.models.cart.config import ModelConfig
from cart_jax.models.cart.network import (CARTNetwork, create_model, load_pretrained_encoder,
                                          shift_right, trainable_filter)
from cart_jax import partitioning
from cart_jax.partitioning import maybe_initialize_distributed  # noqa: F401  (its old home)
from cart_jax.core import loop


IDENTIFIER_INITS = ("none", "embed", "embed+output")
# ``validation(graphdef, mesh) -> score(params, frozen, warm_up) -> metrics``: what ``train`` calls
# every ``eval_every`` steps (the search itself lives in inference/, built by the job).
Validation = Callable[[Any, jax.sharding.Mesh], Callable[[Any, Any, bool], dict]]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """How CART is trained.

  Attributes:
    num_steps: optimizer steps in total (a resumed run continues up to this).
    learning_rate: peak learning rate.
    warmup_steps: linear warm-up from 0.
    decay: ``cosine`` (to ``end_lr_fraction`` x peak at ``num_steps``), ``linear`` or ``constant``.
    end_lr_fraction: final learning rate as a fraction of the peak.
    weight_decay: AdamW decoupled weight decay.
    b1, b2: Adam moments.
    grad_clip: global-norm clipping (0 = none).
    omega: R-Drop KL weight (0 = the "w/o R-Drop KL" ablation: CE only, one pass).
    seed: parameter init and dropout seed.
    log_every: console/TensorBoard metrics every this many steps.
    checkpoint_every: save every this many steps (and always at the end); 0 = only at the end.
    keep_checkpoints: checkpoints kept (keep-N).
    eval_every: validation recall every this many steps (0 = never during training).
    eval_queries: validation queries used for it (the first n of the split).
    eval_split: split of the validation queries.
    beam_size: beams of the constrained search in validation (and the default for eval).
    mesh_data, mesh_model: mesh shape; ``-1`` fills with the remaining devices.
    identifier_init: ``none``; ``embed``: the decoder's identifier token embeddings start from the
      index's K-Means centroids / RQ-VAE codebook vectors, projected to ``d_model``
      (:mod:`cart_jax.models.cart.identifier_init`); ``embed+output``: the output projection too.
  """
  num_steps: int = 1000
  learning_rate: float = 1e-3
  warmup_steps: int = 100
  decay: str = "cosine"
  end_lr_fraction: float = 0.1
  weight_decay: float = 0.01
  b1: float = 0.9
  b2: float = 0.98
  grad_clip: float = 1.0
  omega: float = 1.0
  seed: int = 0
  log_every: int = 50
  checkpoint_every: int = 500
  keep_checkpoints: int = 3
  eval_every: int = 0
  eval_queries: int = 256
  eval_split: str = "val"
  beam_size: int = 10
  mesh_data: int = -1
  mesh_model: int = 1
  identifier_init: str = "none"

  def __post_init__(self):
    if self.identifier_init not in IDENTIFIER_INITS:
      raise ConfigError(f"TrainConfig.identifier_init must be one of {IDENTIFIER_INITS}, got "
                       f"{self.identifier_init!r}")
    if self.num_steps < 1:
      raise ConfigError(f"TrainConfig.num_steps must be >= 1, got {self.num_steps}")
    if self.decay not in ("cosine", "linear", "constant"):
      raise ConfigError(f"TrainConfig.decay must be cosine|linear|constant, got {self.decay!r}")
    if self.omega < 0:
      raise ConfigError(f"TrainConfig.omega must be >= 0, got {self.omega}")


@flax.struct.dataclass
class TrainState:
  """What the train step updates (donated): step, trainable params, optimizer state."""
  step: jax.Array
  params: Any
  opt_state: Any


def learning_rate_schedule(c: TrainConfig) -> optax.Schedule:
  warmup = max(0, min(c.warmup_steps, c.num_steps - 1))
  end = c.learning_rate * c.end_lr_fraction
  rest = max(1, c.num_steps - warmup)
  if c.decay == "cosine":
    decay = optax.cosine_decay_schedule(c.learning_rate, rest, alpha=c.end_lr_fraction)
  elif c.decay == "linear":
    decay = optax.linear_schedule(c.learning_rate, end, rest)
  else:
    decay = optax.constant_schedule(c.learning_rate)
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, c.learning_rate, warmup), decay], [warmup])


def make_optimizer(c: TrainConfig) -> optax.GradientTransformation:
  """AdamW with warm-up + decay, global-norm clipping; no weight decay on 1-D params (norms)."""
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  parts = [optax.clip_by_global_norm(c.grad_clip)] if c.grad_clip > 0 else []
  parts.append(optax.adamw(learning_rate_schedule(c), b1=c.b1, b2=c.b2,
                           weight_decay=c.weight_decay, mask=decay_mask))
  return optax.chain(*parts)


def make_mesh(c: TrainConfig) -> jax.sharding.Mesh:
  return partitioning.make_mesh(c.mesh_data, c.mesh_model)


def create_train_state(model_config: ModelConfig, c: TrainConfig, mesh: jax.sharding.Mesh,
                       tx: optax.GradientTransformation, *, load_pretrained: bool = True):
  """``(graphdef, TrainState, frozen)``, all arrays already placed on ``mesh``."""
  model = create_model(model_config, seed=c.seed, mesh=mesh)
  if model_config.encoder == "minilm" and load_pretrained:
    load_pretrained_encoder(model)
    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, partitioning.shard_state(state, mesh))
  graphdef, trainable, frozen = nnx.split(model, trainable_filter(model_config), ...)
  params = nnx.to_pure_dict(trainable)
  frozen = nnx.to_pure_dict(frozen)
  with jax.set_mesh(mesh):
    opt_state = jax.jit(tx.init)(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), jax.sharding.NamedSharding(mesh, jax.P()))
  return graphdef, TrainState(step=step, params=params, opt_state=opt_state), frozen


def abstract_model(model_config: ModelConfig):
  """``(graphdef, abstract params, abstract frozen)`` without allocating anything."""
  model = nnx.eval_shape(lambda: CARTNetwork(model_config, rngs=nnx.Rngs(0)))
  graphdef, trainable, frozen = nnx.split(model, trainable_filter(model_config), ...)
  return graphdef, nnx.to_pure_dict(trainable), nnx.to_pure_dict(frozen)


def loss_fn(graphdef, params, frozen, batch, *, omega: float, dropout_rng, distill: float = 0.0):
  model = nnx.merge(graphdef, params, frozen)
  return losses.compute_loss(model, batch, omega=omega, dropout_rng=dropout_rng, distill=distill)


def teacher_logp(graphdef, teacher, frozen, batch, rows: int) -> jax.Array:
  """The teacher network's log-probabilities for the batch's last ``rows`` rows, no dropout and no
  gradient: float32 ``[rows, L, V]`` (``losses`` distillation)."""
  model = nnx.merge(graphdef, teacher, frozen)
  last = lambda k: None if batch.get(k) is None else batch[k][-rows:]
  inputs = last("inputs")
  mask = last("input_mask")
  dec = last("decoder_inputs")
  logits, _ = model(inputs, dec if dec is not None else shift_right(last("targets")),
                    mask if mask is not None else inputs != 0, rngs=None, states=last("states"))
  return jax.lax.stop_gradient(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))


def train_step(graphdef, tx: optax.GradientTransformation, c: TrainConfig,
               state: TrainState, frozen, batch, teacher=None, *, distill: float = 0.0,
               distill_rows: int = 0) -> tuple[TrainState, dict]:
  """One optimizer step (pure). ``batch``: ``inputs``, ``targets``, ``decoder_inputs``.

  ``teacher`` (params of the same network; ``cart index add``): its log-probabilities for the
  batch's last ``distill_rows`` rows become the distillation targets, weighted ``distill``.
  """
  dropout_rng = jax.random.fold_in(jax.random.key(c.seed + 1), state.step)
  if teacher is not None and distill_rows > 0:
    batch = dict(batch, teacher_logp=teacher_logp(graphdef, teacher, frozen, batch, distill_rows))
  grad_fn = jax.value_and_grad(
      lambda p: loss_fn(graphdef, p, frozen, batch, omega=c.omega, dropout_rng=dropout_rng,
                        distill=distill),
      has_aux=True)
  (loss, aux), grads = grad_fn(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": loss, "ce": aux["ce"], "kl": aux["kl"], "token_accuracy": aux["token_accuracy"],
             **({"distill_kl": aux["distill_kl"]} if "teacher_logp" in batch else {}),
             "grad_norm": optax.global_norm(grads),
             "learning_rate": learning_rate_schedule(c)(state.step)}
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def make_train_step(graphdef, tx, c: TrainConfig) -> Callable:
  """The jitted step; the state (argument 0) is donated."""
  return jax.jit(lambda state, frozen, batch: train_step(graphdef, tx, c, state, frozen, batch),
                 donate_argnums=(0,))


def make_distill_step(graphdef, tx, c: TrainConfig, *, distill: float, rows: int) -> Callable:
  """The jitted step with a teacher: ``step(state, frozen, batch, teacher)`` (state donated)."""
  return jax.jit(lambda state, frozen, batch, teacher: train_step(
      graphdef, tx, c, state, frozen, batch, teacher, distill=distill, distill_rows=rows),
                 donate_argnums=(0,))


def shard_batch(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh, *,
                global_batch: int | None = None) -> dict[str, jax.Array]:
  """A batch -> arrays sharded over ``data``, each process contributing only its rows.

  ``global_batch=None``: ``batch`` is the whole global batch (every process holds it; each
  places its own rows). Else ``batch`` holds only this process's rows
  (:func:`cart_jax.partitioning.process_slice` of ``global_batch``), as a sharded input
  pipeline builds them.
  """
  sharding = jax.sharding.NamedSharding(mesh, jax.P(partitioning.DATA))
  n_data = mesh.shape[partitioning.DATA]
  out = {}
  for k, v in batch.items():
    total = v.shape[0] if global_batch is None else int(global_batch)
    if total % n_data:
      raise ValueError(f"global batch {total} is not divisible by the data axis ({n_data})")
    rows = partitioning.process_slice(total, sharding)
    local = v[rows] if global_batch is None else v
    if local.shape[0] != rows.stop - rows.start:
      raise ValueError(f"{k}: {local.shape[0]} rows given, this process holds {rows.stop - rows.start} "
                       f"of the global batch {total}")
    out[k] = partitioning.process_local_to_global(local, sharding, (total,) + v.shape[1:])
  return out


# --------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class TrainResult:
  graphdef: Any
  state: TrainState
  frozen: Any
  start_step: int
  history: list[dict]
  validation: list[dict]
  seconds: float
  compile_seconds: float
  state_cache: dict | None = None


def uses_state_cache(model_config: ModelConfig) -> bool:
  """Whether the encoder's states are a fixed function of the tokens (so they can be cached)."""
  return model_config.freeze_encoder and model_config.encoder == "minilm"


def build_state_cache(graphdef, params, frozen, model_config: ModelConfig, token_rows: np.ndarray, *,
                      root=None, progress: bool = True, log: Callable[[str], None] = print):
  """The frozen encoder's states of every training text (``state_cache.load_or_build``).

  States are computed by the network's own (frozen) encoder, jitted once per length bucket; the
  cache key covers the token rows, the encoder's weights and the layers fusion reads. Texts a
  batch holds that the cache lacks (e.g. a different tokenisation upstream) are encoded on the fly.
  """
  from cart_jax.train import state_cache  # pylint: disable=g-import-not-at-top

  # Every process builds (or reuses) the whole cache on its own first device, with no
  # collective: the frozen weights are copied there (a per-host cache, like a per-host input
  # pipeline; on one host every process finds the one a first process wrote).
  params, frozen = partitioning.local_copy((params, frozen))

  @jax.jit
  def encode(params, frozen, ids, mask):
    return nnx.merge(graphdef, params, frozen).encoder_states(ids, mask)  # [b, S, L, width]

  layers = state_cache.fused_layers(model_config)
  cache = state_cache.load_or_build(
      token_rows, fingerprint=state_cache.encoder_fingerprint(frozen), layers=layers,
      encode=lambda ids, mask: encode(params, frozen, ids, mask), root=root, progress=progress,
      log=log)
  cache.encode_missing = lambda ids: np.asarray(
      encode(params, frozen, ids, ids != 0))[:, list(layers)]
  return cache


def train(*, model_config: ModelConfig, train_config: TrainConfig, pipeline, index,
          checkpoint_dir: str | os.PathLike | None, metrics_dir: str | os.PathLike | None = None,
          validation: Validation | None = None,
          progress: bool = True, stop_after: int | None = None, log: Callable[[str], None] = print,
          mesh: jax.sharding.Mesh | None = None, cache_encoder_states: bool = True,
          state_cache_dir: str | os.PathLike | None = None) -> TrainResult:
  """Trains (or resumes) CART up to ``train_config.num_steps``.

  Args:
    model_config: the network (``output_vocab_size`` must match ``index.vocab``).
    train_config: optimizer, loop and mesh settings.
    pipeline: an input pipeline with ``iterate(start_step)`` yielding model-feature batches (and,
      optionally, ``iterate_rows(start_step, rows)`` yielding only this process's rows of each).
    index: the SemanticIndex (for validation decoding).
    checkpoint_dir: orbax directory (None = no checkpoints, no resume).
    metrics_dir: where ``tensorboard/`` and ``metrics.jsonl`` go (None = console only).
    validation: scored every ``eval_every`` steps: ``validation(graphdef, mesh)`` gives
      ``score(params, frozen, warm_up) -> metrics`` (``r@1``, ``r@10``, ``num_queries``, ...); built
      by the job (:func:`cart_jax.inference.evaluation.validation`), so training needs no search.
    stop_after: stop (after saving a checkpoint) once this many steps ran in this call (tests;
      ``train_job.stop_after``: a run in time slices, the next launch resumes).
    cache_encoder_states: with a frozen pretrained encoder, compute its states once per training
      text (``pipeline.token_rows()``) and feed them to the step instead of tokens.
    state_cache_dir: root of those caches (None: ``state_cache.default_root()``).
  """
  from cart_jax.train.input_pipeline import to_loss_batch  # pylint: disable=g-import-not-at-top

  c = train_config
  mesh = _checked_mesh(model_config, c, index, pipeline, mesh)
  ckpt = _open_checkpointer(checkpoint_dir, c, log)
  tx = make_optimizer(c)
  graphdef, state, frozen = create_train_state(model_config, c, mesh, tx)
  state = _identifier_init(state, model_config, c, index, log)  # a restored checkpoint overwrites it
  state, frozen, start = _restore(ckpt, state, frozen, log)
  cache = None
  if cache_encoder_states and uses_state_cache(model_config) and start < c.num_steps:
    cache = build_state_cache(graphdef, state.params, frozen, model_config, pipeline.token_rows(),
                              root=state_cache_dir, progress=progress, log=log)
  step_fn = make_train_step(graphdef, tx, c)
  # Lines of steps after the checkpoint (a run killed between a log and its next save) are
  # dropped: the resumed run writes those steps again, so each step stays one line.
  writer = loop.MetricWriter(metrics_dir, resume_step=start)  # a gs:// path stays one
  score = None
  if validation is not None and c.eval_every > 0:
    score = validation(graphdef, mesh)
  bar = None
  if progress and jax.process_index() == 0 and start < c.num_steps:
    bar = loop.tqdm_bar(c.num_steps, start, "train")
  say = bar.write if bar is not None else log
  val_history = []
  it, global_batch = _batches(pipeline, mesh, start)

  def one_step(step: int, state: TrainState) -> tuple[TrainState, dict]:
    del step  # the pipeline yields batches in step order
    host_batch = to_loss_batch(next(it))
    if cache is not None:
      host_batch["states"] = cache.lookup(host_batch["inputs"])  # [b, S, src, width] float16
    return step_fn(state, frozen, shard_batch(host_batch, mesh, global_batch=global_batch))

  def on_step(done: int, m: dict | None) -> None:
    if bar is not None:
      bar.update(1)
      if m is not None:
        bar.set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m['token_accuracy']:.3f}",
                        sps=f"{m['steps_per_second']:.1f}")
    elif m is not None:
      log(f"step {done}: loss {m['loss']:.4f} token_accuracy {m['token_accuracy']:.3f} "
          f"{m['steps_per_second']:.2f} steps/s")

  def validate(done: int, state: TrainState) -> None:
    res = score(state.params, frozen, not val_history)
    val_history.append({"step": done, **res})
    writer.write(done, {f"val/{k}": res[k] for k in ("r@1", "r@10", "mrr@10", "qps") if k in res})
    say(f"step {done}: {c.eval_split} r@1 {res['r@1']:.3f} r@10 {res.get('r@10', float('nan')):.3f} "
        f"({res['num_queries']} queries)")

  try:
    with jax.set_mesh(mesh):
      out = loop.run(one_step, state, start=start, num_steps=c.num_steps, log_every=c.log_every,
                     on_step=on_step, writer=writer, checkpointer=ckpt,
                     checkpoint_items=lambda s: {"params": s.params, "opt_state": s.opt_state,
                                                 "frozen": frozen},
                     evaluate=validate if score is not None else None, eval_every=c.eval_every,
                     stop_after=stop_after, log=say)
  finally:
    if bar is not None:
      bar.close()
    if ckpt is not None:
      ckpt.close()
    writer.close()
  return TrainResult(graphdef=graphdef, state=out.state, frozen=frozen, start_step=start,
                     history=out.history, validation=val_history, seconds=out.seconds,
                     compile_seconds=out.compile_seconds, state_cache=_cache_info(cache))


def _checked_mesh(model_config: ModelConfig, c: TrainConfig, index, pipeline, mesh):
  """``mesh`` (default: ``make_mesh(c)``), once the model's output vocabulary is found to be the
  index's and the batch to split over the mesh's data axis."""
  if model_config.output_vocab_size != index.vocab.vocab_size:
    raise ValueError(f"model output_vocab_size {model_config.output_vocab_size} != index vocabulary "
                     f"{index.vocab.vocab_size} (use model.config.with_vocab)")
  mesh = mesh or make_mesh(c)
  n_data = mesh.shape[partitioning.DATA]
  if getattr(getattr(pipeline, "config", None), "batch_size", 0) % n_data:
    from cart_jax.core.errors import CartError  # pylint: disable=g-import-not-at-top
    raise CartError(f"InputConfig.batch_size {pipeline.config.batch_size} is not divisible by the "
                    f"mesh's data axis ({n_data} devices): use a multiple of {n_data}")
  return mesh


def _open_checkpointer(checkpoint_dir, c: TrainConfig, log: Callable[[str], None]):
  """The run's Checkpointer (None without ``checkpoint_dir``): interrupted saves dropped, the
  latest step verified against its manifest."""
  from cart_jax.core.checkpointing import Checkpointer  # pylint: disable=g-import-not-at-top
  if checkpoint_dir is None:
    return None
  ckpt = Checkpointer(checkpoint_dir, keep=c.keep_checkpoints, save_every=c.checkpoint_every)
  try:
    for dropped in ckpt.drop_interrupted():
      log(f"dropped checkpoint step {dropped} of {ckpt.directory}: its save was interrupted before "
          "its manifest was written (the resumed run redoes it)")
    if ckpt.latest_step() is not None:
      # Checked against its manifest before anything is built: a corrupt checkpoint is a
      # CheckpointIntegrityError at once (the restore does not hash it again).
      ckpt.verify(ckpt.latest_step())
  except BaseException:
    ckpt.close()
    raise
  return ckpt


def _identifier_init(state: TrainState, model_config: ModelConfig, c: TrainConfig, index,
                     log: Callable[[str], None]) -> TrainState:
  """``TrainConfig.identifier_init``: decoder rows initialised from the index (or ``state``)."""
  if c.identifier_init == "none":
    return state
  from cart_jax.models.cart.identifier_init import init_decoder_from_identifiers  # pylint: disable=g-import-not-at-top
  params, info = init_decoder_from_identifiers(state.params, index, d_model=model_config.d_model,
                                               seed=c.seed, output=c.identifier_init == "embed+output")
  log(f"identifier init ({c.identifier_init}): {info['rows_set']} token rows from the index")
  return state.replace(params=params)


def _restore(ckpt, state: TrainState, frozen, log: Callable[[str], None]):
  """``(state, frozen, start_step)``: from the latest checkpoint, else as given at step 0."""
  if ckpt is None or ckpt.latest_step() is None:
    return state, frozen, 0
  restored, meta = ckpt.restore({"params": state.params, "opt_state": state.opt_state,
                                 "frozen": frozen})
  start = int(meta["step"])
  state = TrainState(step=jax.device_put(jnp.asarray(start, jnp.int32), state.step.sharding),
                     params=restored["params"], opt_state=restored["opt_state"])
  log(f"resumed from {ckpt.directory}/{ckpt.latest_step()} (step {start})")
  return state, restored["frozen"], start


def _batches(pipeline, mesh, start: int):
  """``(iterator of host batches from step start, global batch size or None)``. Each process
  builds only its rows of every global batch where the pipeline can (``iterate_rows``); else it
  builds the whole batch and keeps its rows (``shard_batch``, global size None)."""
  if not hasattr(pipeline, "iterate_rows"):
    return pipeline.iterate(start), None
  global_batch = int(pipeline.config.batch_size)
  rows = partitioning.process_slice(
      global_batch, jax.sharding.NamedSharding(mesh, jax.P(partitioning.DATA)))
  return pipeline.iterate_rows(start, rows), global_batch


def _cache_info(cache) -> dict | None:
  """The encoder-state cache in the training summary (None: no cache)."""
  if cache is None:
    return None
  return {"directory": str(cache.directory), "texts": cache.num_texts,
          "layers": cache.num_layers, "mib": round(cache.nbytes / 2**20, 1),
          "build_seconds": cache.meta.get("seconds"), "misses": cache.misses}
