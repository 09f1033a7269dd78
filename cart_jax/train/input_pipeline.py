"""Training batches for CART: (query | caption text) -> identifier tokens.

Two pipelines produce the same model features (see ``tasks/feature_converters.py``)::

  encoder_input_tokens   int32 [batch, input_length]  WordPiece ``[CLS] .. [SEP]``, 0-padded
  decoder_target_tokens  int32 [batch, L]             identifier tokens (global ids)
  decoder_input_tokens   int32 [batch, L]             [START_ID, targets[:-1]]
  decoder_loss_weights   int32 [batch, L]             1 at every non-padding target

* ``numpy`` (:class:`NumpyPipeline`): pure numpy over the corpus format, tokenised once with
  :mod:`cart_jax.models.text.tokenizer`. No TensorFlow: the path on GPU/TPU hosts without TF.
* ``seqio`` (:func:`seqio_pipeline`): the SeqIO tasks of ``tasks/tasks.py`` (the
  caption-enhancement mixture) through ``CartFeatureConverter``.
* ``auto``: ``seqio`` when it imports, else ``numpy``.

Both are **deterministic by step**: ``batch_at(step)`` depends only on (seed, step), so a run
resumed at step ``s`` sees exactly the batches an uninterrupted run sees from ``s`` on (the
iterator position is the step stored in the checkpoint; nothing else needs saving).

The numpy pipeline mixes the two sources like the SeqIO mixture: per batch ``round(rate * B)``
examples come from the caption pool and the rest from the query pool; each pool is walked in a
fresh seeded permutation per epoch (``caption_rate=0`` is the "w/o caption enhancement" ablation).

**Multi-host.** A pipeline with ``iterate_rows(start_step, rows)`` (both do) gives a process only
its rows of each global batch (``partitioning.process_slice``: the rows its devices hold); the
trainer assembles the global batch with ``jax.make_array_from_process_local_data``. The numpy
pipeline tokenises a text the first time one of this process's slices needs it, so no process
tokenises the whole corpus for its batches (the frozen-encoder state cache, when used, still
covers every training text: any of them can land in any slice in a later epoch).
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import numpy as np

from cart_jax.core.errors import ConfigError
from cart_jax.index.vocab import PAD_ID, START_ID
from cart_jax.models.text.tokenizer import encode_texts

PIPELINES = ("auto", "numpy", "seqio")


@dataclasses.dataclass(frozen=True)
class InputConfig:
  """Attributes:
    batch_size: global batch (all hosts together).
    input_length: encoder tokens per text, special tokens included.
    caption_rate: share of each batch drawn from caption-enhancement texts (None = 0.5 when the
      corpus has captions, else 0).
    pipeline: ``auto`` | ``numpy`` | ``seqio``.
    seed: shuffling seed.
    cache_encoder_states: with a frozen pretrained encoder, compute its layer states once per
      training text and train on those (:mod:`cart_jax.train.state_cache`); False runs the
      encoder in every step (the same numbers up to float16 rounding of the states, far slower).
    state_cache_dir: where those caches live (None: ``$CART_CACHE_DIR/encoder_states`` or
      ``~/.cache/cart-jax/encoder_states``).
    seqio_source_dir: ``seqio`` pipeline: None serves the texts from memory; a directory (local
      or ``gs://``) makes the tasks file-backed (TFRecord shards written there once, by process 0;
      ``cart_seqio.tasks.register_corpus_tasks``).
    use_cached: ``seqio`` pipeline: read the tasks' preprocessed cache that
      ``seqio.scripts.cache_tasks_main`` wrote (``--module_import=cart_seqio.registered``).
    seqio_cache_dir: where that cache is (added to SeqIO's global cache directories).
    queryless_rate: share of each batch drawn from the *queryless pool*: the training texts of
      items that have no training query (their captions, and pseudo-queries for items with no
      text at all). None: those items' share of the corpus's items, so an item known only
      through captions (or only through its media) is seen about as often as an item with
      queries, whatever ``caption_rate`` is; 0: no such pool (the recipe before it existed). Its
      rows come out of the ``caption_rate`` rows first, then out of the query rows.
      The numpy pipeline only (the SeqIO pipeline trains on the tasks' texts as they are).
    pseudo_queries: items with no training text at all get this many pseudo-queries when the
      run has the dual tower's embeddings (``EMBEDDINGS``): the training texts nearest to the
      item's embedding in the dual tower's text-item space (:mod:`cart_jax.jobs.pseudo_queries`);
      0: none.
  """
  batch_size: int = 64
  input_length: int = 32
  caption_rate: float | None = None
  pipeline: str = "numpy"
  seed: int = 0
  cache_encoder_states: bool = True
  state_cache_dir: str | None = None
  seqio_source_dir: str | None = None
  use_cached: bool = False
  seqio_cache_dir: str | None = None
  queryless_rate: float | None = None
  pseudo_queries: int = 8

  def __post_init__(self):
    if self.pipeline not in PIPELINES:
      raise ConfigError(f"InputConfig.pipeline must be one of {PIPELINES}, got {self.pipeline!r}")
    if self.batch_size < 1 or self.input_length < 3:
      raise ConfigError(f"InputConfig: batch_size >= 1 and input_length >= 3 needed, got "
                       f"{self.batch_size}, {self.input_length}")
    if self.caption_rate is not None and not 0.0 <= self.caption_rate <= 1.0:
      raise ConfigError(f"InputConfig.caption_rate must be in [0, 1], got {self.caption_rate}")
    if self.queryless_rate is not None and not 0.0 <= self.queryless_rate < 1.0:
      raise ConfigError(f"InputConfig.queryless_rate must be in [0, 1), got {self.queryless_rate}")
    if self.pseudo_queries < 0:
      raise ConfigError(f"InputConfig.pseudo_queries must be >= 0, got {self.pseudo_queries}")


def resolve_pipeline(name: str) -> str:
  if name != "auto":
    return name
  try:
    import seqio  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    return "seqio"
  except ImportError:
    return "numpy"


def model_features(input_ids: np.ndarray, target_tokens: np.ndarray) -> dict[str, np.ndarray]:
  """``input_ids [b, src]``, ``target_tokens [b, L]`` -> the four model features."""
  targets = np.asarray(target_tokens, np.int32)
  decoder_inputs = np.concatenate(
      [np.full((targets.shape[0], 1), START_ID, np.int32), targets[:, :-1]], axis=1)  # [b, L]
  return {
      "encoder_input_tokens": np.asarray(input_ids, np.int32),
      "decoder_target_tokens": targets,
      "decoder_input_tokens": decoder_inputs,
      "decoder_loss_weights": (targets != PAD_ID).astype(np.int32),
  }


def to_loss_batch(features) -> dict:
  """Model features -> the keys ``cart_jax.models.cart.losses.compute_loss`` reads."""
  return {"inputs": features["encoder_input_tokens"], "targets": features["decoder_target_tokens"],
          "decoder_inputs": features["decoder_input_tokens"]}


class _Pool:
  """One source of examples walked in per-epoch seeded permutations.

  Texts are tokenised lazily, each once, when a batch of this process first needs it
  (:meth:`tokens`): a process of a multi-host run tokenises only the texts of its slices.
  """

  def __init__(self, texts: Sequence[str], targets: np.ndarray, seed: int, salt: int,
               input_length: int):
    self.texts = list(texts)
    self.targets = targets  # [n, L]
    self.seed, self.salt = seed, salt
    self.input_length = int(input_length)
    self._perm_cache: dict[int, np.ndarray] = {}
    self._tokens = np.zeros((len(self.texts), self.input_length), np.int32)  # [n, src]
    self._done = np.zeros(len(self.texts), bool)  # [n] rows tokenised so far

  def __len__(self) -> int:
    return len(self.texts)

  def tokens(self, rows) -> np.ndarray:
    """Token rows ``[len(rows), src]`` of the texts ``rows`` (tokenised on first use)."""
    rows = np.asarray(rows, np.int64)
    todo = np.unique(rows[~self._done[rows]])
    if todo.size:
      self._tokens[todo] = encode_texts([self.texts[r] for r in todo], self.input_length)
      self._done[todo] = True
    return self._tokens[rows]

  @property
  def inputs(self) -> np.ndarray:
    """Every text's token row ``[n, src]`` (tokenises all that are not yet)."""
    return self.tokens(np.arange(len(self)))

  def _perm(self, epoch: int) -> np.ndarray:
    if epoch not in self._perm_cache:
      if len(self._perm_cache) > 4:
        self._perm_cache.clear()
      rng = np.random.default_rng([self.seed, self.salt, epoch])
      self._perm_cache[epoch] = rng.permutation(len(self))
    return self._perm_cache[epoch]

  def rows(self, start: int, count: int) -> np.ndarray:
    """Rows of examples ``start .. start + count`` of the endless shuffled stream."""
    n = len(self)
    out = np.empty(count, np.int64)
    for j in range(count):
      pos = start + j
      out[j] = self._perm(pos // n)[pos % n]
    return out


class NumpyPipeline:
  """Deterministic-by-step training batches over a corpus and its index (no TensorFlow)."""

  def __init__(self, corpus, index, config: InputConfig, captions_file: str | None = None,
               pseudo: Sequence = ()):
    from cart_jax.data.captions import caption_texts  # pylint: disable=g-import-not-at-top
    self.config = config
    row_of = index.row_of()
    missing = [it for it in corpus.item_ids if it not in row_of]
    if missing:
      raise ConfigError(f"{len(missing)} corpus items have no identifier in the index "
                       f"(first: {missing[:3]}); rebuild the index for this corpus")
    tokens = index.vocab.codes_to_tokens(index.codes)  # [N, L]

    def pool(texts, salt):
      if not texts:
        return None
      tgt = tokens[np.asarray([row_of[t.item_id] for t in texts])]  # [n, L]
      return _Pool([t.text for t in texts], tgt, config.seed, salt, config.input_length)

    self.queries = pool(corpus.texts(split="train", kind="query"), 0)
    if self.queries is None:
      raise ConfigError(f"corpus {corpus.name!r} has no training queries")
    captions = caption_texts(corpus, captions_file)
    rate = config.caption_rate if config.caption_rate is not None else (0.5 if captions else 0.0)
    self.captions = pool(captions, 1) if rate > 0 else None
    if rate > 0 and self.captions is None:
      raise ConfigError(f"caption_rate={rate} but corpus {corpus.name!r} has no caption texts")
    self.caption_rate = float(rate)
    self.num_captions_per_batch = int(round(rate * config.batch_size)) if self.captions else 0
    # The queryless pool: every training text of the items without a training query, and the
    # pseudo-queries of the items without any training text.
    queried = {t.item_id for t in corpus.texts(split="train", kind="query")}
    sole = [t for t in captions if t.item_id not in queried] + list(pseudo)
    self.queryless_items = len({t.item_id for t in sole})
    qrate = config.queryless_rate
    if qrate is None:
      qrate = self.queryless_items / max(len(corpus.item_ids), 1)
    self.num_queryless_per_batch = int(round(qrate * config.batch_size)) if sole else 0
    # The pool's rows come out of the caption rows first (its texts are captions too), then out of
    # the query rows: the items with queries keep their share of each batch where captions are mixed in.
    self.num_captions_per_batch -= min(self.num_queryless_per_batch, self.num_captions_per_batch)
    if self.num_queryless_per_batch + self.num_captions_per_batch >= config.batch_size:
      raise ConfigError(f"caption_rate {rate} + queryless_rate {qrate:.3f} leave no query rows in a "
                       f"batch of {config.batch_size}")
    self.queryless = pool(sole, 2) if self.num_queryless_per_batch else None
    self.queryless_rate = self.num_queryless_per_batch / config.batch_size
    self.num_pseudo = len(pseudo)

  def batch_at(self, step: int, rows: slice | None = None) -> dict[str, np.ndarray]:
    """The global batch of training step ``step`` (a pure function of seed and step), or only
    its rows ``rows`` (``[start, stop)`` of the global batch: a process's slice). Only the texts
    of those rows are tokenised."""
    b = self.config.batch_size
    nc, nz = self.num_captions_per_batch, self.num_queryless_per_batch
    nq = b - nc - nz
    lo, hi = (0, b) if rows is None else (rows.start or 0, b if rows.stop is None else rows.stop)
    if not 0 <= lo <= hi <= b:
      raise ValueError(f"rows {lo}:{hi} are not rows of a global batch of {b}")
    q_rows = self.queries.rows(step * nq, nq)[min(lo, nq):min(hi, nq)]  # this slice's queries
    inputs = [self.queries.tokens(q_rows)]
    targets = [self.queries.targets[q_rows]]
    if nc:  # rows nq .. nq + nc: captions
      c_rows = self.captions.rows(step * nc, nc)[max(lo - nq, 0):max(min(hi, nq + nc) - nq, 0)]
      inputs.append(self.captions.tokens(c_rows))
      targets.append(self.captions.targets[c_rows])
    if nz:  # the last nz rows: the queryless pool
      z_rows = self.queryless.rows(step * nz, nz)[max(lo - nq - nc, 0):max(hi - nq - nc, 0)]
      inputs.append(self.queryless.tokens(z_rows))
      targets.append(self.queryless.targets[z_rows])
    return model_features(np.concatenate(inputs), np.concatenate(targets))

  def iterate(self, start_step: int) -> Iterator[dict[str, np.ndarray]]:
    step = start_step
    while True:
      yield self.batch_at(step)
      step += 1

  def iterate_rows(self, start_step: int, rows: slice) -> Iterator[dict[str, np.ndarray]]:
    """Like :meth:`iterate`, only the rows ``rows`` of each global batch (a process's slice)."""
    step = start_step
    while True:
      yield self.batch_at(step, rows)
      step += 1

  def token_rows(self) -> np.ndarray:
    """Every training text's token row ``[n, src]`` (queries, then captions if mixed in)."""
    parts = [self.queries.inputs] + ([self.captions.inputs] if self.captions is not None else [])
    if getattr(self, "queryless", None) is not None:
      parts.append(self.queryless.inputs)
    return np.concatenate(parts)

  def summary(self) -> dict:
    return {"pipeline": "numpy", "train_queries": len(self.queries),
            "train_captions": len(self.captions) if self.captions else 0,
            "caption_rate": self.caption_rate,
            "queryless_items": self.queryless_items,
            "queryless_texts": len(self.queryless) if self.queryless is not None else 0,
            "queryless_rate": self.queryless_rate, "pseudo_queries": self.num_pseudo,
            "rows_per_batch": {"query": self.config.batch_size - self.num_captions_per_batch
                                        - self.num_queryless_per_batch,
                               "caption": self.num_captions_per_batch,
                               "queryless": self.num_queryless_per_batch}}


class _TokenPool(_Pool):
  """A :class:`_Pool` of examples tokenised already (by SeqIO)."""

  def __init__(self, inputs: np.ndarray, targets: np.ndarray, seed: int, salt: int):
    super().__init__([""] * len(inputs), targets, seed, salt, inputs.shape[1])
    self._tokens = np.asarray(inputs, np.int32)  # [n, src]
    self._done[:] = True


class SeqioPipeline:
  """The SeqIO tasks ``cart_<name>_query`` / ``_caption`` through ``CartFeatureConverter``.

  Each process reads only its shard of every task's training examples (``seqio.ShardInfo``:
  process index of process count; file-backed tasks shard by file), preprocessed by SeqIO (or
  read from its cache, ``use_cached``), once, into arrays. Batches are then drawn like the numpy
  pipeline's: per global batch ``round(caption_rate * B)`` caption rows and the rest query
  rows, each pool walked in seeded per-epoch permutations, so a batch is a pure function of
  (seed, process, step): a resumed run continues exactly, with no replay of the stream. Each
  process draws only its rows of the global batch from its own shard (with one process: every
  example, as before sharding existed).
  """

  def __init__(self, corpus_dir: str, index, config: InputConfig, captions_file: str | None = None,
               corpus=None):
    import jax  # pylint: disable=g-import-not-at-top
    import seqio  # pylint: disable=g-import-not-at-top

    from cart_jax import partitioning  # pylint: disable=g-import-not-at-top
    from cart_seqio import tasks as cart_tasks  # pylint: disable=g-import-not-at-top
    from cart_seqio.feature_converters import CartFeatureConverter  # pylint: disable=g-import-not-at-top
    self.config = config
    self.corpus, self.corpus_dir, self.captions_file = corpus, corpus_dir, captions_file
    if config.seqio_cache_dir:
      seqio.add_global_cache_dirs([config.seqio_cache_dir])

    def register(write: bool):
      return cart_tasks.register_index_tasks(
          corpus_dir, index, caption_rate=config.caption_rate, captions_file=captions_file,
          source_dir=config.seqio_source_dir, write_sources=write)

    # Process 0 writes file-backed sources (once); the others register after it did.
    if partitioning.is_primary():
      self.names = register(True)
    partitioning.sync("cart-seqio-sources")
    if not partitioning.is_primary():
      self.names = register(False)
    self.caption_rate = float(self.names.caption_rate)
    b = config.batch_size
    self.num_captions_per_batch = int(round(self.caption_rate * b)) if self.names.caption else 0
    lengths = {"inputs": config.input_length, "targets": index.vocab.id_length}
    shard = seqio.ShardInfo(index=jax.process_index(), num_shards=jax.process_count())

    def pool(task: str, salt: int) -> _TokenPool:
      ds = seqio.get_dataset(task, task_feature_lengths=lengths, dataset_split="train", shuffle=False,
                             num_epochs=1, shard_info=shard, use_cached=config.use_cached,
                             seed=config.seed, feature_converter=CartFeatureConverter())
      inputs, targets = [], []
      for ex in ds.as_numpy_iterator():
        inputs.append(np.asarray(ex["encoder_input_tokens"], np.int32))
        targets.append(np.asarray(ex["decoder_target_tokens"], np.int32))
      if not inputs:
        raise ConfigError(f"SeqIO task {task}: no training example in shard {shard.index} of "
                         f"{shard.num_shards}")
      inputs, targets = np.stack(inputs), np.stack(targets)  # [n, src], [n, L]
      # A fixed order whatever order the files were read in (interleaving): sorted by content.
      order = sorted(range(len(inputs)), key=lambda i: (inputs[i].tobytes(), targets[i].tobytes()))
      # Seeds per process: the shards differ, so do their walks.
      return _TokenPool(inputs[order], targets[order], config.seed, salt + 2 * jax.process_index())

    self.queries = pool(self.names.query, 0)
    self.captions = pool(self.names.caption, 1) if self.num_captions_per_batch else None

  def batch_at(self, step: int, rows: slice | None = None) -> dict[str, np.ndarray]:
    """Rows ``rows`` (default: all) of step ``step``'s global batch, from this process's shard.

    Of the rows, those before ``B - round(caption_rate * B)`` are queries, the rest captions; each
    local pool is read as a stream at offset ``step * (its rows per step)``, so every example of
    the shard comes once per local epoch.
    """
    b = self.config.batch_size
    nq = b - self.num_captions_per_batch
    lo, hi = (0, b) if rows is None else (rows.start or 0, b if rows.stop is None else rows.stop)
    if not 0 <= lo <= hi <= b:
      raise ValueError(f"rows {lo}:{hi} are not rows of a global batch of {b}")
    lq = min(hi, nq) - min(lo, nq)  # query rows in this slice
    lc = (hi - lo) - lq  # caption rows
    q_rows = self.queries.rows(step * lq, lq)
    inputs, targets = [self.queries.tokens(q_rows)], [self.queries.targets[q_rows]]
    if lc:
      c_rows = self.captions.rows(step * lc, lc)
      inputs.append(self.captions.tokens(c_rows))
      targets.append(self.captions.targets[c_rows])
    return model_features(np.concatenate(inputs), np.concatenate(targets))

  iterate = NumpyPipeline.iterate
  iterate_rows = NumpyPipeline.iterate_rows
  token_rows = NumpyPipeline.token_rows

  def summary(self) -> dict:
    return {"pipeline": "seqio", "tasks": [self.names.query] + (
        [self.names.caption] if self.captions is not None else []),
            "caption_rate": self.caption_rate, "train_queries": len(self.queries),
            "train_captions": len(self.captions) if self.captions is not None else 0,
            "file_backed": self.config.seqio_source_dir is not None,
            "use_cached": self.config.use_cached}


def make_pipeline(corpus_dir: str, corpus, index, config: InputConfig,
                  captions_file: str | None = None, pseudo: Sequence = ()):
  """The pipeline ``config.pipeline`` names (``auto`` resolved); ``pseudo``: pseudo-query texts
  (:mod:`cart_jax.jobs.pseudo_queries`), for the numpy pipeline's queryless pool."""
  name = resolve_pipeline(config.pipeline)
  if name == "seqio":
    return SeqioPipeline(str(corpus_dir), index, config, captions_file, corpus=corpus)
  return NumpyPipeline(corpus, index, config, captions_file, pseudo=pseudo)
