"""The network's cached step function drives the constrained beam search (cart_jax.inference.decoding).

With a beam as wide as the corpus the search is exhaustive, so its ranking and scores must equal
the teacher-forced (uncached) log-probabilities of every identifier, ranked by brute force.
"""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cart_jax.inference.decoding import DecodeConfig, beam_search
from cart_jax.index.trie import build_trie
from cart_jax.index.vocab import IdentifierVocab
from cart_jax.models.cart.config import tiny, with_vocab
from cart_jax.models.cart.network import create_model, shift_right


def test_beam_search_over_network_equals_brute_force():
  vocab = IdentifierVocab((3, 3, 2))
  rs = np.random.RandomState(0)
  all_codes = np.stack(np.meshgrid(*[np.arange(s) for s in vocab.level_sizes], indexing="ij"), -1).reshape(-1, 3)
  codes = all_codes[np.sort(rs.choice(len(all_codes), 11, replace=False))]  # N = 11 identifiers
  n = len(codes)
  trie = build_trie(codes, vocab, device_put=True)
  cfg = with_vocab(tiny(input_vocab_size=40, num_decoder_layers=2, fusion="both"), vocab)
  model = create_model(cfg, seed=4, host_init=True)
  graphdef, state = nnx.split(model)
  inputs = jnp.asarray(rs.randint(1, 40, (2, 5)), jnp.int32).at[1, 3:].set(0)
  beam = 12  # >= N: exhaustive
  config = DecodeConfig(beam_size=beam, n_results=beam)

  @jax.jit
  def search(state, inputs, trie):
    m = nnx.merge(graphdef, state)
    step_fn = m.tokens_to_logits_fn(m.encode(inputs))  # encode once
    return beam_search(step_fn, m.init_cache(inputs.shape[0], beam, vocab.id_length), trie, config)

  @jax.jit
  def brute_force(state, inputs, tokens):
    m = nnx.merge(graphdef, state)
    flat_in = jnp.repeat(inputs, n, axis=0)  # [b*N, src]
    flat_tok = jnp.tile(tokens, (inputs.shape[0], 1))  # [b*N, L]
    logits, _ = m(flat_in, shift_right(flat_tok))  # teacher forcing, no cache
    logp = jax.nn.log_softmax(logits, -1)
    score = jnp.take_along_axis(logp, flat_tok[..., None], -1)[..., 0].sum(-1)
    return score.reshape(inputs.shape[0], n)

  result = search(state, inputs, trie)
  scores = np.asarray(brute_force(state, inputs, jnp.asarray(vocab.codes_to_tokens(codes))))
  valid = np.asarray(result.valid)
  assert valid.sum(1).tolist() == [n, n]  # exactly the N identifiers that exist, no more
  for q in range(2):
    order = np.argsort(-scores[q], kind="stable")
    rows = np.asarray(result.rows[q])[valid[q]]
    np.testing.assert_allclose(np.asarray(result.scores[q])[valid[q]], scores[q][order], atol=1e-4)
    np.testing.assert_array_equal(np.sort(rows), np.arange(n))
    np.testing.assert_allclose(scores[q][rows], scores[q][order], atol=1e-4)  # same ranking (ties aside)
  assert np.ptp(scores) > 0.1  # the queries are scored differently by a non-trivial model
