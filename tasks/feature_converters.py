"""Feature converter from CART task features to the model's features.

Task features: ``inputs`` int32 [<= input_len] (with its special tokens) and ``targets`` int32
[L] (identifier tokens, exactly L: identifiers have no EOS and no padding). Model features::

  encoder_input_tokens   int32 [input_len]  inputs, right-padded with 0
  decoder_target_tokens  int32 [L]          the identifier tokens
  decoder_input_tokens   int32 [L]          [START_ID, targets[:-1]] (teacher forcing)
  decoder_loss_weights   int32 [L]          1 at every non-padding target position

No packing: each example is one query (retrieval batches are per query).
"""
from __future__ import annotations

from typing import Mapping

import seqio
import tensorflow as tf

from cart_jax.index.vocab import PAD_ID, START_ID

_Spec = seqio.FeatureConverter.FeatureSpec


class CartFeatureConverter(seqio.FeatureConverter):
  """``inputs``/``targets`` -> encoder/decoder features with a START_ID-shifted decoder input."""

  TASK_FEATURES = {"inputs": _Spec(dtype=tf.int32), "targets": _Spec(dtype=tf.int32)}
  MODEL_FEATURES = {
      "encoder_input_tokens": _Spec(dtype=tf.int32),
      "decoder_target_tokens": _Spec(dtype=tf.int32),
      "decoder_input_tokens": _Spec(dtype=tf.int32),
      "decoder_loss_weights": _Spec(dtype=tf.int32),
  }
  PACKING_FEATURE_DTYPES = {}

  def __init__(self, pack: bool = False, **kwargs):
    if pack:
      raise ValueError("CartFeatureConverter does not pack (one query per example)")
    kwargs.setdefault("bos_id", START_ID)
    super().__init__(pack=False, **kwargs)

  def _convert_features(self, ds: tf.data.Dataset,
                        task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
    id_len = int(task_feature_lengths["targets"])

    def convert(ex):
      targets = tf.cast(ex["targets"], tf.int32)  # [L]
      with tf.control_dependencies([tf.debugging.assert_equal(
          tf.size(targets), id_len, message="identifier length != task_feature_lengths['targets']")]):
        targets = tf.identity(targets)
      decoder_inputs = tf.concat([[self.bos_id], targets[:-1]], axis=0)  # [L]
      out = {
          "encoder_input_tokens": tf.cast(ex["inputs"], tf.int32),
          "decoder_target_tokens": targets,
          "decoder_input_tokens": decoder_inputs,
          "decoder_loss_weights": tf.cast(targets != PAD_ID, tf.int32),  # [L]
      }
      out.update({k: ex[k] for k in self._passthrough_features})
      return out

    ds = ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)
    return seqio.utils.trim_and_pad_dataset(ds, self.get_model_feature_lengths(task_feature_lengths))

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> Mapping[str, int]:
    inputs, targets = task_feature_lengths["inputs"], task_feature_lengths["targets"]
    return {"encoder_input_tokens": inputs, "decoder_target_tokens": targets,
            "decoder_input_tokens": targets, "decoder_loss_weights": targets}
