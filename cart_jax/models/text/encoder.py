"""The text tower's frozen part: all-MiniLM-L6-v2 sentence embeddings, batched and bucketed.

``MiniLMTextEncoder.encode(texts) -> float32 [n, 384]`` (L2-normalised, as sentence-transformers).
Texts are tokenised on the host, grouped by length into a few padded shapes (powers of two up to
``max_length``) with a fixed batch size, so XLA compiles at most one program per bucket. The
order of the output rows is the order of ``texts``.
"""
from __future__ import annotations

import functools
import os
import time
from typing import Callable, Sequence

import jax
import numpy as np
from flax import nnx

MINILM_DIM = 384


def length_buckets(max_length: int, smallest: int = 8) -> tuple[int, ...]:
  """Padded lengths ``smallest, 2*smallest, ...`` up to ``max_length`` (included)."""
  out, b = [], smallest
  while b < max_length:
    out.append(b)
    b *= 2
  return tuple(out) + (max_length,)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _sentence_embedding(graphdef, state, ids, mask):
  from cart_jax.models.text.minilm import sentence_embedding  # pylint: disable=g-import-not-at-top
  return sentence_embedding(nnx.merge(graphdef, state), ids, mask)  # [b, 384]


class MiniLMTextEncoder:
  """Frozen MiniLM sentence encoder (host tokenizer + one jitted program per length bucket)."""

  dim = MINILM_DIM

  def __init__(self, minilm_dir: str | os.PathLike | None = None, *, batch_size: int = 128,
               max_length: int = 64):
    from cart_jax.models.cart.layers import init_on_host  # pylint: disable=g-import-not-at-top
    from cart_jax.models.text.minilm import MiniLMEncoder, load_minilm_weights  # pylint: disable=g-import-not-at-top
    from cart_jax.models.text.tokenizer import WordPieceTokenizer  # pylint: disable=g-import-not-at-top

    self.tokenizer = WordPieceTokenizer.from_file(
        None if minilm_dir is None else os.path.join(minilm_dir, "vocab.txt"))
    encoder = nnx.eval_shape(lambda: MiniLMEncoder(rngs=nnx.Rngs(0)))
    encoder = load_minilm_weights(init_on_host(encoder), minilm_dir)
    self.graphdef, self.state = nnx.split(encoder)
    from cart_jax.models.text.minilm import default_minilm_dir  # pylint: disable=g-import-not-at-top
    weights = os.path.join(minilm_dir or default_minilm_dir(), "model.safetensors")
    self.cache_id = f"minilm:{os.path.getsize(weights)}:{max_length}"
    self.batch_size = batch_size
    self.max_length = max_length
    self.buckets = length_buckets(max_length)
    self.compile_seconds = 0.0
    self._compiled: set[int] = set()

  def _embed(self, state, ids, mask):
    return _sentence_embedding(self.graphdef, state, ids, mask)

  def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
    return [self.tokenizer.encode(t, self.max_length) for t in texts]

  def encode(self, texts: Sequence[str], progress: Callable[[int], None] | None = None) -> np.ndarray:
    """``texts`` -> ``float32 [len(texts), 384]`` L2-normalised sentence embeddings."""
    return self.encode_tokens(self.tokenize(texts), progress)

  def encode_tokens(self, rows: Sequence[Sequence[int]],
                    progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Token id lists (with [CLS]/[SEP]) -> embeddings, in input order."""
    out = np.zeros((len(rows), self.dim), np.float32)  # [n, 384]
    bucket_of = np.searchsorted(np.asarray(self.buckets), [len(r) for r in rows])  # [n]
    bs = self.batch_size
    for b_idx, length in enumerate(self.buckets):
      sel = np.flatnonzero(bucket_of == b_idx)
      for s in range(0, len(sel), bs):
        chunk = sel[s:s + bs]
        ids = np.full((bs, length), self.tokenizer.pad_id, np.int32)  # [bs, length]
        mask = np.zeros((bs, length), bool)
        for j, r in enumerate(chunk):
          ids[j, :len(rows[r])] = rows[r]
          mask[j, :len(rows[r])] = True
        mask[len(chunk):, 0] = True  # padding rows: one visible token, output discarded
        t0 = time.perf_counter()
        emb = np.asarray(self._embed(self.state, ids, mask))
        if length not in self._compiled:
          self._compiled.add(length)
          self.compile_seconds += time.perf_counter() - t0  # first call of a bucket: compile + run
        out[chunk] = emb[:len(chunk)]
        if progress is not None:
          progress(len(chunk))
    return out

  def warm_up(self, lengths: Sequence[int]) -> float:
    """Compiles the buckets needed for token rows of these lengths; returns seconds spent."""
    t0 = time.perf_counter()
    for b_idx in sorted(set(np.searchsorted(np.asarray(self.buckets), list(lengths)).tolist())):
      length = self.buckets[b_idx]
      if length in self._compiled:
        continue
      ids = np.zeros((self.batch_size, length), np.int32)
      mask = np.ones((self.batch_size, length), bool)
      jax.block_until_ready(self._embed(self.state, ids, mask))
      self._compiled.add(length)
    dt = time.perf_counter() - t0
    self.compile_seconds += dt
    return dt
