"""The search batch size chosen per device (cart_jax.inference.searcher.default_batch_size)."""
import types

import numpy as np
import pytest

from cart_jax.inference import searcher as searcher_lib


def test_default_batch_size_per_platform():
  assert searcher_lib.default_batch_size("cpu") == searcher_lib.DEFAULT_BATCH_SIZE["cpu"]
  for accel in ("gpu", "cuda", "tpu", "TPU"):
    assert searcher_lib.default_batch_size(accel) == 1024
  assert searcher_lib.default_batch_size("something-new") == searcher_lib.DEFAULT_BATCH_SIZE["cpu"]
  assert searcher_lib.default_batch_size() == searcher_lib.default_batch_size("cpu")  # tests run on CPU


def _tiny(batch_size):
  from flax import nnx

  from cart_jax.index.vocab import IdentifierVocab
  from cart_jax.models.cart.config import tiny, with_vocab
  from cart_jax.models.cart.network import create_model

  vocab = IdentifierVocab((4, 3, 2))
  codes = np.stack(np.meshgrid(*[np.arange(s) for s in vocab.level_sizes], indexing="ij"), -1).reshape(-1, 3)
  index = types.SimpleNamespace(codes=codes.astype(np.int32), vocab=vocab, n_items=len(codes),
                                item_ids=[f"it{i}" for i in range(len(codes))],
                                prior=lambda: np.zeros(len(codes), np.float32))
  model = create_model(with_vocab(tiny(input_vocab_size=40, num_decoder_layers=1), vocab), seed=1,
                       host_init=True)
  graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
  s = searcher_lib.CartSearcher(graphdef, index, beam_size=6, n_results=6, input_length=5,
                                batch_size=batch_size)
  return s, params, frozen


def test_searcher_without_a_batch_size_takes_the_device_default_and_the_same_results():
  default, params, frozen = _tiny(None)
  assert default.batch_size == searcher_lib.default_batch_size()
  explicit, _, _ = _tiny(3)
  inputs = np.random.RandomState(0).randint(1, 40, (7, 5)).astype(np.int32)  # 7 queries: 3 + 3 + 1 padded
  rows_d, scores_d, _ = default.search_ids(params, frozen, inputs)
  rows_e, scores_e, _ = explicit.search_ids(params, frozen, inputs)
  np.testing.assert_array_equal(rows_d, rows_e)
  np.testing.assert_allclose(scores_d, scores_e, rtol=1e-5, atol=1e-6)
  assert rows_d.shape == (7, 6) and (rows_d >= 0).all()


def test_eval_refuses_a_batch_size_below_one(tmp_path):
  from cart_jax import api
  from cart_jax.core.errors import CartError
  with pytest.raises(CartError, match="--batch-size 0"):
    api.evaluate(tmp_path, batch_size=0)
