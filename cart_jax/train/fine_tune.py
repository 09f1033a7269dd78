"""Fine-tuning a trained run on new items' texts with a replay of the old ones (``cart index add``).

The training half of :mod:`cart_jax.jobs.index_update`: the decoder's vocabulary grown by new
counter tokens (:func:`grow_output_vocab`), the replay batches (:class:`ReplayBatches`), the
default number of steps (:func:`auto_steps`), the new items' decode-time prior
(:func:`new_item_log_prior`) and the fine-tune itself (:func:`fine_tune`, the trainer's step,
with distillation from the run before the add). Why each default is what it is:
``jobs/index_update.py``'s module docstring and ``docs/incremental.md``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import numpy as np

from cart_jax.core.errors import CartError

MAX_STEPS_FRACTION = 0.18  # auto steps: at most this share of the run's own training steps
MIN_AUTO_STEPS = 20
EMBED_KEY = ("decoder_embedder", "embedding")  # [vocab, d_model]
OUTPUT_KEY = ("logits_dense", "kernel")        # [d_model, vocab]


class IndexUpdateError(CartError):
  """An add or remove that cannot be done (the message names the input); nothing was changed."""


# --------------------------------------------------------------------------- the decoder vocabulary


def grow_output_vocab(params: dict, old_vocab, new_vocab) -> tuple[dict, int]:
  """``params`` (a pure dict) with the decoder's token table and output projection grown to
  ``new_vocab``; returns ``(params, tokens added)``.

  Only the last level (the counter) may grow: its tokens are the last of the vocabulary, so the
  new ones are appended and no existing token moves. New rows / columns start at the mean of the
  existing counter tokens' rows / columns.
  """
  if tuple(new_vocab.level_sizes) == tuple(old_vocab.level_sizes):
    return params, 0
  old_s, new_s = old_vocab.level_sizes, new_vocab.level_sizes
  if len(old_s) != len(new_s) or old_s[:-1] != new_s[:-1] or new_s[-1] < old_s[-1]:
    raise ValueError(f"only the counter level may grow: {old_s} -> {new_s}")
  grow = new_vocab.vocab_size - old_vocab.vocab_size
  lo, hi = int(old_vocab.offsets[-1]), old_vocab.vocab_size  # the counter tokens
  out = _copy_path(params, EMBED_KEY)
  out = _copy_path(out, OUTPUT_KEY)
  emb = np.asarray(_get(params, EMBED_KEY))  # [V, d]
  ker = np.asarray(_get(params, OUTPUT_KEY))  # [d, V]
  if emb.shape[0] != hi or ker.shape[1] != hi:
    raise ValueError(f"decoder token table {emb.shape} / output projection {ker.shape} do not have "
                     f"the index's {hi} tokens")
  rows = np.repeat(emb[lo:hi].mean(axis=0, keepdims=True), grow, axis=0)  # [grow, d]
  cols = np.repeat(ker[:, lo:hi].mean(axis=1, keepdims=True), grow, axis=1)  # [d, grow]
  _get(out, EMBED_KEY[:-1])[EMBED_KEY[-1]] = np.concatenate([emb, rows]).astype(emb.dtype)
  _get(out, OUTPUT_KEY[:-1])[OUTPUT_KEY[-1]] = np.concatenate([ker, cols], axis=1).astype(ker.dtype)
  return out, grow


def _get(tree: dict, path: Sequence[str]):
  for k in path:
    tree = tree[k]
  return tree


def _copy_path(tree: dict, path: Sequence[str]) -> dict:
  """A shallow copy of ``tree`` with the dicts along ``path`` copied too (the rest shared)."""
  out = dict(tree)
  node = out
  for k in path[:-1]:
    node[k] = dict(node[k])
    node = node[k]
  return out


# --------------------------------------------------------------------------- training texts


class _Stream:
  """Examples of one pool walked in seeded per-epoch permutations (a pure function of position)."""

  def __init__(self, inputs: np.ndarray, targets: np.ndarray, seed: int, salt: int):
    self.inputs, self.targets = inputs, targets  # [n, src], [n, L]
    self.seed, self.salt = seed, salt
    self._perms: dict[int, np.ndarray] = {}

  def __len__(self) -> int:
    return int(self.inputs.shape[0])

  def rows(self, start: int, count: int) -> np.ndarray:
    n = len(self)
    out = np.empty(count, np.int64)
    for j in range(count):
      epoch, pos = divmod(start + j, n)
      if epoch not in self._perms:
        if len(self._perms) > 4:
          self._perms.clear()
        self._perms[epoch] = np.random.default_rng([self.seed, self.salt, epoch]).permutation(n)
      out[j] = self._perms[epoch][pos]
    return out


class ReplayBatches:
  """Fine-tuning batches: ``num_new`` new texts + ``batch - num_new`` replayed old texts per step.

  From step ``tail_from`` on (the balanced tail), ``tail_num_old`` of each batch are old texts
  instead: the old/new proportion of the corpus's own texts, so that the fine-tune ends without
  the head's over-representation of the new items. Deterministic by step (``batch_at(step)``
  depends only on the seed and the step), like the training pipelines.
  """

  def __init__(self, new: tuple[np.ndarray, np.ndarray], old: tuple[np.ndarray, np.ndarray] | None,
               batch_size: int, replay_ratio: float, seed: int, *, tail_from: int | None = None,
               tail_num_old: int | None = None):
    self.new = _Stream(*new, seed, 0)
    self.old = _Stream(*old, seed, 1) if old is not None and len(old[0]) else None
    self.num_old = int(round(replay_ratio * batch_size)) if self.old is not None else 0
    self.num_new = batch_size - self.num_old
    self.tail_from = tail_from
    self.tail_num_old = self.num_old if tail_num_old is None or self.old is None else tail_num_old
    if not 0 <= self.tail_num_old < batch_size:
      raise ValueError(f"tail_num_old {tail_num_old}: must be in [0, {batch_size})")

  def counts_at(self, step: int) -> tuple[int, int, int, int]:
    """(new rows, old rows, first new position, first old position) of step ``step``."""
    if self.tail_from is None or step < self.tail_from:
      return self.num_new, self.num_old, step * self.num_new, step * self.num_old
    head, t = self.tail_from, step - self.tail_from
    n_old = self.tail_num_old
    n_new = self.num_new + self.num_old - n_old
    return n_new, n_old, head * self.num_new + t * n_new, head * self.num_old + t * n_old

  def batch_at(self, step: int) -> dict[str, np.ndarray]:
    from cart_jax.train.input_pipeline import model_features  # pylint: disable=g-import-not-at-top
    n_new, n_old, at_new, at_old = self.counts_at(step)
    r = self.new.rows(at_new, n_new)
    inputs, targets = [self.new.inputs[r]], [self.new.targets[r]]
    if n_old:
      r = self.old.rows(at_old, n_old)
      inputs.append(self.old.inputs[r])
      targets.append(self.old.targets[r])
    return model_features(np.concatenate(inputs), np.concatenate(targets))

  def token_rows(self) -> np.ndarray:
    parts = [self.new.inputs] + ([self.old.inputs] if self.old is not None else [])
    return np.concatenate(parts)


def run_caption_rate(run: dict, corpus, captions_file: str | None) -> float:
  """The share of captions the run trained with (``InputConfig.caption_rate``; None: 0.5 if any)."""
  from cart_jax.data.captions import caption_texts  # pylint: disable=g-import-not-at-top
  rate = run.get("input_config", {}).get("caption_rate")
  if rate is not None:
    return float(rate)
  return 0.5 if caption_texts(corpus, captions_file) else 0.0


def new_item_texts(new_corpus, with_captions: bool) -> list:
  """The new items' training texts: ``train`` queries, and ``train`` captions when the run trained
  on captions or for items that have no training query."""
  queries = new_corpus.texts(split="train", kind="query")
  have_query = {t.item_id for t in queries}
  captions = [t for t in new_corpus.texts(split="train", kind="caption")
              if with_captions or t.item_id not in have_query]
  return queries + captions


def auto_steps(run_steps: int, batch_size: int, old_texts: int, new_texts: int,
               num_new_per_batch: int) -> int:
  """Default fine-tuning steps (module docstring): the run's passes over its texts, applied to the
  new texts, capped at :data:`MAX_STEPS_FRACTION` of the run's steps."""
  cap = max(1, int(round(MAX_STEPS_FRACTION * run_steps)))
  passes = run_steps * batch_size / max(old_texts, 1)
  want = int(math.ceil(passes * new_texts / max(num_new_per_batch, 1)))
  return int(min(max(want, min(MIN_AUTO_STEPS, cap)), cap))


def new_item_log_prior(mode: str | float, steps: int, new_per_batch: int, batch_size: int,
                       new_texts: int, old_texts: int) -> float:
  """The new items' decode-time log-prior offset (``SemanticIndex.log_prior``), <= 0.

  ``"auto"``: the fine-tune showed the new items' texts at a share ``f = new_per_batch /
  batch_size`` of every batch, while they are a share ``s = new_texts / (new_texts + old_texts)``
  of the corpus's training texts. A classifier trained under one class balance and used under
  another is corrected by the ratio of the two priors (Saerens et al. 2002, "Adjusting the Outputs
  of a Classifier to New a Priori Probabilities"); with the old items as the other class, the new
  items' scores move by ``log(s / (1 - s)) - log(f / (1 - f))``, the difference of the two
  log-odds (0 when the fine-tune was no more new-heavy than the corpus, or did not run).
  """
  if mode == "none" or steps <= 0 or new_texts <= 0:
    return 0.0
  if not isinstance(mode, str):
    return float(mode)
  if old_texts <= 0 or new_per_batch >= batch_size:
    return 0.0
  s = new_texts / (new_texts + old_texts)
  f = new_per_batch / batch_size
  return float(min(0.0, math.log(s / (1 - s)) - math.log(f / (1 - f))))


# --------------------------------------------------------------------------- fine-tuning


@dataclasses.dataclass
class FineTuned:
  """What :func:`fine_tune` returns: the network's parts after training and a summary."""
  graphdef: object
  params: dict
  frozen: dict
  info: dict


def fine_tune(*, model_config, run: dict, params: dict, frozen: dict, batches: ReplayBatches,
              steps: int, learning_rate: float, seed: int, distill: float = 0.0,
              progress: bool = True, log: Callable[[str], None] = print) -> FineTuned:
  """Trains the decoder ``steps`` steps from ``params`` with a fresh optimizer (trainer's step).

  ``distill > 0``: ``params`` as given (the run before the add, vocabulary grown) stay as a frozen
  teacher, and every batch's replayed old texts add ``distill`` x KL(teacher || student) to the
  loss (``cart_jax.models.cart.losses``).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from cart_jax.core import loop  # pylint: disable=g-import-not-at-top
  from cart_jax.train import trainer  # pylint: disable=g-import-not-at-top
  from cart_jax.train.input_pipeline import to_loss_batch  # pylint: disable=g-import-not-at-top

  fields = {f.name for f in dataclasses.fields(trainer.TrainConfig)}
  base = trainer.TrainConfig(**{k: v for k, v in run.get("train_config", {}).items() if k in fields})
  tc = dataclasses.replace(base, num_steps=steps, learning_rate=learning_rate,
                           warmup_steps=steps // 10, eval_every=0, checkpoint_every=0,
                           log_every=max(1, min(50, steps)), seed=seed, identifier_init="none")
  graphdef, want_params, want_frozen = trainer.abstract_model(model_config)
  for name, got, want in (("params", params, want_params), ("frozen", frozen, want_frozen)):
    got_s = jax.tree.map(lambda x: tuple(x.shape), got)
    want_s = jax.tree.map(lambda x: tuple(x.shape), want)
    if got_s != want_s:
      raise ValueError(f"fine-tune: the checkpoint's {name} do not fit the model config")
  mesh = trainer.make_mesh(tc)
  from cart_jax.partitioning import DATA  # pylint: disable=g-import-not-at-top
  b = batches.num_new + batches.num_old
  if b % mesh.shape[DATA]:
    raise IndexUpdateError(f"--batch-size {b} is not divisible by the {mesh.shape[DATA]} devices of "
                           "the mesh's data axis")
  replicated = jax.sharding.NamedSharding(mesh, jax.P())
  params = jax.device_put(params, replicated)
  frozen = jax.device_put(frozen, replicated)
  tx = trainer.make_optimizer(tc)
  with jax.set_mesh(mesh):
    opt_state = jax.jit(tx.init)(params)
  state = trainer.TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), replicated),
                             params=params, opt_state=opt_state)
  input_config = run.get("input_config", {})
  cache = None
  if trainer.uses_state_cache(model_config) and input_config.get("cache_encoder_states", True):
    cache = trainer.build_state_cache(graphdef, params, frozen, model_config, batches.token_rows(),
                                      root=input_config.get("state_cache_dir"), progress=progress,
                                      log=log)
  step_fn = trainer.make_train_step(graphdef, tx, tc)
  teacher = None
  if distill > 0 and batches.old is not None:
    teacher = jax.tree.map(jnp.copy, params)  # the state's params are donated; the teacher stays
  distill_steps: dict[int, Callable] = {}  # one compiled step per replay row count
  bar = loop.tqdm_bar(steps, 0, "fine-tune") if progress else None

  def one_step(step: int, state):
    host = to_loss_batch(batches.batch_at(step))
    if cache is not None:
      host["states"] = cache.lookup(host["inputs"])
    batch = trainer.shard_batch(host, mesh)
    n_old = batches.counts_at(step)[1]
    if teacher is None or n_old == 0:
      return step_fn(state, frozen, batch)
    if n_old not in distill_steps:
      distill_steps[n_old] = trainer.make_distill_step(graphdef, tx, tc, distill=distill, rows=n_old)
    return distill_steps[n_old](state, frozen, batch, teacher)

  def on_step(done: int, m: dict | None) -> None:
    if bar is not None:
      bar.update(1)
      if m is not None:
        bar.set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m['token_accuracy']:.3f}")

  try:
    with jax.set_mesh(mesh):
      out = loop.run(one_step, state, start=0, num_steps=steps, log_every=tc.log_every,
                     on_step=on_step if bar is not None else None, log=None if bar else log)
  finally:
    if bar is not None:
      bar.close()
  info = {"steps": steps, "learning_rate": learning_rate, "warmup_steps": tc.warmup_steps,
          "batch_size": batches.num_new + batches.num_old, "new_per_batch": batches.num_new,
          "replay_per_batch": batches.num_old, "omega": tc.omega,
          "distill": distill if teacher is not None else 0.0, "seconds": out.seconds,
          "compile_seconds": out.compile_seconds,
          "last_metrics": out.history[-1] if out.history else None,
          "history": out.history}
  if cache is not None:
    info["state_cache"] = {"texts": cache.num_texts, "misses": cache.misses,
                           "build_seconds": cache.meta.get("seconds")}
  return FineTuned(graphdef=graphdef, params=out.state.params, frozen=frozen, info=info)
