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
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import numpy as np

from cart_jax.index.vocab import PAD_ID, START_ID

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
  """
  batch_size: int = 64
  input_length: int = 32
  caption_rate: float | None = None
  pipeline: str = "numpy"
  seed: int = 0
  cache_encoder_states: bool = True
  state_cache_dir: str | None = None

  def __post_init__(self):
    if self.pipeline not in PIPELINES:
      raise ValueError(f"InputConfig.pipeline must be one of {PIPELINES}, got {self.pipeline!r}")
    if self.batch_size < 1 or self.input_length < 3:
      raise ValueError(f"InputConfig: batch_size >= 1 and input_length >= 3 needed, got "
                       f"{self.batch_size}, {self.input_length}")
    if self.caption_rate is not None and not 0.0 <= self.caption_rate <= 1.0:
      raise ValueError(f"InputConfig.caption_rate must be in [0, 1], got {self.caption_rate}")


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


_TOKENIZER = None


def tokenizer():
  """The WordPiece tokenizer of all-MiniLM-L6-v2 (cached)."""
  global _TOKENIZER
  if _TOKENIZER is None:
    from cart_jax.models.text.tokenizer import WordPieceTokenizer  # pylint: disable=g-import-not-at-top
    _TOKENIZER = WordPieceTokenizer.from_file()
  return _TOKENIZER


def encode_texts(texts: Sequence[str], input_length: int) -> np.ndarray:
  """Texts -> int32 ``[n, input_length]`` WordPiece ids (``[CLS] .. [SEP]``, 0-padded)."""
  ids, _ = tokenizer().encode_batch(texts, input_length)
  return ids


class _Pool:
  """One source of examples walked in per-epoch seeded permutations."""

  def __init__(self, inputs: np.ndarray, targets: np.ndarray, seed: int, salt: int):
    self.inputs, self.targets = inputs, targets  # [n, src], [n, L]
    self.seed, self.salt = seed, salt
    self._perm_cache: dict[int, np.ndarray] = {}

  def __len__(self) -> int:
    return int(self.inputs.shape[0])

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

  def __init__(self, corpus, index, config: InputConfig, captions_file: str | None = None):
    from cart_jax.data.captions import caption_texts  # pylint: disable=g-import-not-at-top
    self.config = config
    row_of = index.row_of()
    missing = [it for it in corpus.item_ids if it not in row_of]
    if missing:
      raise ValueError(f"{len(missing)} corpus items have no identifier in the index "
                       f"(first: {missing[:3]}); rebuild the index for this corpus")
    tokens = index.vocab.codes_to_tokens(index.codes)  # [N, L]

    def pool(texts, salt):
      if not texts:
        return None
      ids = encode_texts([t.text for t in texts], config.input_length)  # [n, src]
      tgt = tokens[np.asarray([row_of[t.item_id] for t in texts])]  # [n, L]
      return _Pool(ids, tgt, config.seed, salt)

    self.queries = pool(corpus.texts(split="train", kind="query"), 0)
    if self.queries is None:
      raise ValueError(f"corpus {corpus.name!r} has no training queries")
    captions = caption_texts(corpus, captions_file)
    rate = config.caption_rate if config.caption_rate is not None else (0.5 if captions else 0.0)
    self.captions = pool(captions, 1) if rate > 0 else None
    if rate > 0 and self.captions is None:
      raise ValueError(f"caption_rate={rate} but corpus {corpus.name!r} has no caption texts")
    self.caption_rate = float(rate)
    self.num_captions_per_batch = int(round(rate * config.batch_size)) if self.captions else 0

  def batch_at(self, step: int) -> dict[str, np.ndarray]:
    """The global batch of training step ``step`` (a pure function of seed and step)."""
    b = self.config.batch_size
    nc = self.num_captions_per_batch
    nq = b - nc
    q_rows = self.queries.rows(step * nq, nq)
    inputs = [self.queries.inputs[q_rows]]
    targets = [self.queries.targets[q_rows]]
    if nc:
      c_rows = self.captions.rows(step * nc, nc)
      inputs.append(self.captions.inputs[c_rows])
      targets.append(self.captions.targets[c_rows])
    return model_features(np.concatenate(inputs), np.concatenate(targets))

  def iterate(self, start_step: int) -> Iterator[dict[str, np.ndarray]]:
    step = start_step
    while True:
      yield self.batch_at(step)
      step += 1

  def token_rows(self) -> np.ndarray:
    """Every training text's token row ``[n, src]`` (queries, then captions if mixed in)."""
    parts = [self.queries.inputs] + ([self.captions.inputs] if self.captions is not None else [])
    return np.concatenate(parts)

  def summary(self) -> dict:
    return {"pipeline": "numpy", "train_queries": len(self.queries),
            "train_captions": len(self.captions) if self.captions else 0,
            "caption_rate": self.caption_rate}


class SeqioPipeline:
  """The SeqIO mixture ``cart_<name>_train`` through ``CartFeatureConverter``.

  Determinism by step: the mixture is shuffled with a fixed seed and the iterator of a run
  resumed at step ``s`` skips ``s`` batches (cheap at the sizes this runs on).
  """

  def __init__(self, corpus_dir: str, index, config: InputConfig, captions_file: str | None = None,
               corpus=None):
    import seqio  # pylint: disable=g-import-not-at-top

    from cart_seqio import tasks as cart_tasks  # pylint: disable=g-import-not-at-top
    from cart_seqio.feature_converters import CartFeatureConverter  # pylint: disable=g-import-not-at-top
    self.config = config
    self.corpus, self.corpus_dir, self.captions_file = corpus, corpus_dir, captions_file
    self.names = cart_tasks.register_index_tasks(corpus_dir, index, caption_rate=config.caption_rate,
                                                 captions_file=captions_file)
    lengths = {"inputs": config.input_length, "targets": index.vocab.id_length}
    self._make = lambda: seqio.get_dataset(
        self.names.train, task_feature_lengths=lengths, dataset_split="train", shuffle=True,
        num_epochs=None, seed=config.seed, use_cached=False,
        feature_converter=CartFeatureConverter()).batch(config.batch_size, drop_remainder=True)

  def iterate(self, start_step: int) -> Iterator[dict[str, np.ndarray]]:
    ds = self._make().skip(start_step)
    keys = ("encoder_input_tokens", "decoder_target_tokens", "decoder_input_tokens",
            "decoder_loss_weights")
    for ex in ds.as_numpy_iterator():
      yield {k: np.asarray(ex[k], np.int32) for k in keys}

  def token_rows(self) -> np.ndarray:
    """The training texts' token rows, tokenised as the SeqIO tasks do (the same WordPiece ids)."""
    from cart_jax.data.captions import caption_texts  # pylint: disable=g-import-not-at-top
    if self.corpus is None:
      from cart_jax.data.corpus import load_corpus  # pylint: disable=g-import-not-at-top
      self.corpus = load_corpus(self.corpus_dir, check_media=False)
    texts = [t.text for t in self.corpus.texts(split="train", kind="query")]
    if self.names.caption_rate:
      texts += [t.text for t in caption_texts(self.corpus, self.captions_file)]
    return encode_texts(texts, self.config.input_length)

  def summary(self) -> dict:
    return {"pipeline": "seqio", "mixture": self.names.train, "caption_rate": self.names.caption_rate}


def make_pipeline(corpus_dir: str, corpus, index, config: InputConfig,
                  captions_file: str | None = None):
  """The pipeline ``config.pipeline`` names (``auto`` resolved)."""
  name = resolve_pipeline(config.pipeline)
  if name == "seqio":
    return SeqioPipeline(str(corpus_dir), index, config, captions_file, corpus=corpus)
  return NumpyPipeline(corpus, index, config, captions_file)
