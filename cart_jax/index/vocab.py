"""The identifier vocabulary: one small decoder vocabulary with a token range per level.

An identifier is a fixed-length tuple of level-local codes ``(k, v1..vM, u)``.
Level ``l`` owns the contiguous token range ``[offsets[l], offsets[l] + sizes[l])``
of the decoder vocabulary; ids ``0`` and ``1`` are reserved for padding and the
decoder start token. There is no EOS: every identifier has exactly ``L`` tokens.

This module is pure numpy (no JAX, no TensorFlow) so the SeqIO vocabulary, the
trie and the decoder can all share it.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

PAD_ID = 0
START_ID = 1
NUM_RESERVED = 2


@dataclasses.dataclass(frozen=True)
class IdentifierVocab:
  """Token layout of identifiers with per-level vocabularies.

  Attributes:
    level_sizes: number of distinct codes at each level, ``len == L``.
  """
  level_sizes: tuple[int, ...]

  def __post_init__(self):
    sizes = tuple(int(s) for s in self.level_sizes)
    if not sizes:
      raise ValueError("IdentifierVocab needs at least one level")
    if any(s < 1 for s in sizes):
      raise ValueError(f"every level needs at least one code, got sizes {sizes}")
    object.__setattr__(self, "level_sizes", sizes)

  @property
  def id_length(self) -> int:
    return len(self.level_sizes)

  @property
  def offsets(self) -> np.ndarray:
    """int32 [L]: first token id of each level."""
    return (NUM_RESERVED + np.concatenate([[0], np.cumsum(self.level_sizes)[:-1]])).astype(np.int32)

  @property
  def vocab_size(self) -> int:
    return NUM_RESERVED + int(sum(self.level_sizes))

  def codes_to_tokens(self, codes: np.ndarray) -> np.ndarray:
    """Level-local codes ``[..., L]`` -> global token ids ``[..., L]``; validates ranges."""
    codes = np.asarray(codes)
    if codes.shape[-1] != self.id_length:
      raise ValueError(f"identifier length {codes.shape[-1]} != vocabulary's {self.id_length}")
    sizes = np.asarray(self.level_sizes)
    bad = (codes < 0) | (codes >= sizes)
    if bad.any():
      idx = tuple(int(i) for i in np.argwhere(bad)[0])
      lvl = idx[-1]
      raise ValueError(f"code {int(codes[idx])} at {idx} out of range [0, {sizes[lvl]}) for level {lvl}")
    return (codes + self.offsets).astype(np.int32)

  def tokens_to_codes(self, tokens: np.ndarray) -> np.ndarray:
    """Global token ids ``[..., L]`` -> level-local codes; rejects tokens outside their level's range."""
    tokens = np.asarray(tokens)
    if tokens.shape[-1] != self.id_length:
      raise ValueError(f"token sequence length {tokens.shape[-1]} != identifier length {self.id_length}")
    codes = tokens - self.offsets
    sizes = np.asarray(self.level_sizes)
    bad = (codes < 0) | (codes >= sizes)
    if bad.any():
      idx = tuple(int(i) for i in np.argwhere(bad)[0])
      raise ValueError(f"token {int(tokens[idx])} at {idx} is not a level-{idx[-1]} token "
                       f"(expected [{self.offsets[idx[-1]]}, {self.offsets[idx[-1]] + sizes[idx[-1]]}))")
    return codes.astype(np.int32)

  def to_dict(self) -> dict:
    return {"level_sizes": list(self.level_sizes), "pad_id": PAD_ID, "start_id": START_ID}

  @classmethod
  def from_dict(cls, d: dict) -> "IdentifierVocab":
    return cls(tuple(d["level_sizes"]))

  @classmethod
  def from_codes(cls, codes: np.ndarray, min_sizes: Sequence[int] | None = None) -> "IdentifierVocab":
    """Smallest vocabulary that holds ``codes`` (optionally at least ``min_sizes`` per level)."""
    codes = np.asarray(codes)
    sizes = codes.max(axis=0) + 1 if codes.size else np.ones(codes.shape[-1], np.int64)
    if min_sizes is not None:
      sizes = np.maximum(sizes, np.asarray(min_sizes))
    return cls(tuple(int(s) for s in sizes))
