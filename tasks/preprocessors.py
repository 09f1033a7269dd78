"""SeqIO preprocessors for CART tasks (inputs: a text; targets: an identifier).

Task examples, as the corpus sources yield them::

  {"inputs": "grinning face", "targets": "3 17 0 2",   # level-local codes, space separated
   "item_id": "1F600", "kind": "query"}

``seqio.preprocessors.tokenize`` turns ``inputs`` into sub-word ids (the input vocabulary) and
``targets`` into identifier token ids (``IdentifierVocabulary``, which validates the codes);
:func:`finalize_inputs` then trims the inputs so the special tokens survive: ``[CLS] .. [SEP]``
for WordPiece (what MiniLM expects) or ``.. EOS`` for bytes.
"""
from __future__ import annotations

from typing import Mapping

import seqio
import tensorflow as tf


def finalize_inputs(dataset: tf.data.Dataset, sequence_length: Mapping[str, int] | None,
                    output_features: Mapping[str, seqio.Feature]) -> tf.data.Dataset:
  """Trims ``inputs`` to ``sequence_length["inputs"]`` including its special tokens.

  WordPiece (a vocabulary with ``cls_id``): ``[CLS] ids[:n-2] [SEP]``. Otherwise (bytes):
  ``ids[:n-1] EOS``. Without a sequence length nothing is trimmed.
  """
  vocab = output_features["inputs"].vocabulary
  max_len = None if sequence_length is None else sequence_length.get("inputs")
  cls_id = getattr(vocab, "cls_id", None)
  eos_id = vocab.eos_id

  @seqio.map_over_dataset
  def fn(ex):
    ids = tf.cast(ex["inputs"], tf.int32)  # [n]
    if cls_id is not None:
      if max_len is not None:
        ids = ids[:max_len - 2]
      ids = tf.concat([[cls_id], ids, [eos_id]], axis=0)  # [n + 2]
    else:
      if max_len is not None:
        ids = ids[:max_len - 1]
      ids = tf.concat([ids, [eos_id]], axis=0)  # [n + 1]
    return {**ex, "inputs": ids}

  return fn(dataset)
