"""Constrained beam search against brute force on tiny tries, with prefix-dependent stub models."""
import subprocess
import sys

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cart_jax.inference.decoding import (DecodeConfig, beam_search, level_offsets, score_tokens,
                               unconstrained_beam_search)
from cart_jax.index.trie import build_trie
from cart_jax.index.vocab import PAD_ID, START_ID, IdentifierVocab


class StubModel:
  """A decoder stand-in whose logits depend on the query and on the WHOLE prefix.

  logits(step, prefix) = table[step, last_token] + query_bias[b] + w . hist_features
                         + 0.5 * sin(hash(prefix))
  The cache holds the token history (a KV-cache-like buffer written at position ``step``) and a
  rolling hash of the prefix, so a beam whose cache is not reordered with it gets wrong logits.
  ``logits_from_history`` computes the same logits from the full token history with no cache.
  """

  def __init__(self, vocab_size, id_length, batch, seed):
    rng = np.random.default_rng(seed)
    self.vocab_size, self.id_length = vocab_size, id_length
    self.table = jnp.asarray(rng.normal(size=(id_length, vocab_size, vocab_size)), jnp.float32)
    self.query_bias = jnp.asarray(rng.normal(size=(batch, vocab_size)), jnp.float32)
    self.hist_w = jnp.asarray(rng.normal(size=(id_length + 1, vocab_size)) * 0.3, jnp.float32)
    self.freq = jnp.asarray(rng.uniform(0.1, 1.0, size=(vocab_size,)), jnp.float32)

  def init_cache(self, batch, beam):
    return {"hist": jnp.zeros((batch, beam, self.id_length + 1), jnp.int32),
            "hash": jnp.zeros((batch, beam), jnp.int32)}

  def _logits(self, tok_bk, hist_bkt, hash_bk, step):
    # hist_bkt: tokens at positions 0..step (position 0 = START), zeros after.
    pos = jnp.arange(self.id_length + 1)
    feat = jnp.where(pos <= step, (hist_bkt * (pos + 1)) % 7, 0).astype(jnp.float32)  # [b, k, T]
    hist_term = jnp.einsum("bkt,tv->bkv", feat, self.hist_w)  # [b, k, V]
    hash_term = 0.5 * jnp.sin((hash_bk % 1009)[..., None].astype(jnp.float32) * self.freq)
    return self.table[step][tok_bk] + self.query_bias[:, None, :] + hist_term + hash_term

  def tokens_to_logits(self, tok_bk, cache, step):
    hist = cache["hist"].at[:, :, step].set(tok_bk)  # [b, k, T]
    h = cache["hash"] * 31 + tok_bk + 7  # rolling hash of the prefix
    return self._logits(tok_bk, hist, h, step), {"hist": hist, "hash": h}

  def logits_from_history(self, hist_bkt, step):
    """No cache: recompute everything from the tokens at positions 0..step."""
    h = jnp.zeros(hist_bkt.shape[:2], jnp.int32)
    for t in range(step + 1):
      h = h * 31 + hist_bkt[:, :, t] + 7
    masked = jnp.where(jnp.arange(hist_bkt.shape[-1]) <= step, hist_bkt, 0)
    return self._logits(hist_bkt[:, :, step], masked, h, step)


def random_codes(rng, n, sizes):
  total = int(np.prod(sizes))
  flat = rng.choice(total, size=min(n, total), replace=False)
  return np.stack(np.unravel_index(flat, sizes), axis=1).astype(np.int32)


def run_search(model, trie, config, batch):
  fn = jax.jit(lambda cache, t: beam_search(model.tokens_to_logits, cache, t, config))
  res = fn(model.init_cache(batch, config.beam_size), trie)
  return jax.tree_util.tree_map(np.asarray, res)


def exhaustive_scores(model, codes, sizes, batch):
  """float [batch, N]: exact log-prob of every identifier, teacher forced."""
  toks = jnp.asarray(codes + level_offsets(sizes))  # [N, L]
  toks = jnp.broadcast_to(toks, (batch,) + toks.shape)  # [batch, N, L]
  return np.asarray(score_tokens(model.tokens_to_logits, model.init_cache(batch, codes.shape[0]),
                                 toks))


def check_results_valid(res, codes, sizes, n_expected_valid):
  """Every valid result is a real identifier with consistent codes/tokens/rows; no duplicates."""
  off = level_offsets(sizes)
  for b in range(res.rows.shape[0]):
    valid = res.valid[b]
    assert valid.sum() == n_expected_valid
    assert np.all(valid[:n_expected_valid])  # valid results come first
    rows = res.rows[b][valid]
    assert len(set(rows.tolist())) == len(rows)  # no duplicates
    np.testing.assert_array_equal(res.codes[b][valid], codes[rows])
    np.testing.assert_array_equal(res.tokens[b][valid], codes[rows] + off)
    assert np.all(np.diff(res.scores[b][valid]) <= 1e-6)  # best first
    # Invalid filler: never a made-up identifier.
    assert np.all(res.rows[b][~valid] == -1)
    assert np.all(res.codes[b][~valid] == -1)
    assert np.all(res.tokens[b][~valid] == PAD_ID)
    assert np.all(np.isneginf(res.scores[b][~valid]))


def check_exact_top_k(res, exhaustive, n_results):
  n = exhaustive.shape[1]
  k = min(n_results, n)
  for b in range(exhaustive.shape[0]):
    order = np.argsort(-exhaustive[b], kind="stable")[:k]
    np.testing.assert_array_equal(res.rows[b][:k], order)
    np.testing.assert_allclose(res.scores[b][:k], exhaustive[b][order], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed,n,sizes,beam,n_results", [
    (0, 12, (3, 4, 2), 12, 12),  # beam == N
    (1, 20, (4, 3, 3, 2), 32, 10),  # beam > N, fewer results
    (2, 7, (7,), 8, 8),  # one level: the dense table alone
    (3, 30, (2, 6, 5), 40, 40),  # beam > N: 10 invalid results
])
def test_exact_top_k_when_beam_covers_all_identifiers(seed, n, sizes, beam, n_results):
  rng = np.random.default_rng(seed)
  codes = random_codes(rng, n, sizes)
  trie = build_trie(codes, IdentifierVocab(sizes), device_put=True)
  batch = 3
  model = StubModel(IdentifierVocab(sizes).vocab_size, len(sizes), batch, seed)
  res = run_search(model, trie, DecodeConfig(beam, n_results), batch)
  check_results_valid(res, codes, sizes, min(n_results, n))
  check_exact_top_k(res, exhaustive_scores(model, codes, sizes, batch), n_results)
  # Queries differ, so their rankings should too (the stub depends on the query).
  assert not np.array_equal(res.rows[0], res.rows[1]) or not np.array_equal(res.rows[1], res.rows[2])


@pytest.mark.parametrize("seed,n,sizes", [(4, 12, (3, 4, 2)), (5, 7, (7,))])
def test_leaf_bias_is_each_items_log_prior_added_to_its_score(seed, n, sizes):
  """With a per-item log-prior (``SemanticIndex.log_prior``) the exact top-k is the top-k of
  score + prior: the bias moves the biased items and leaves every other score as it was."""
  rng = np.random.default_rng(seed)
  codes = random_codes(rng, n, sizes)
  vocab = IdentifierVocab(sizes)
  batch = 3
  model = StubModel(vocab.vocab_size, len(sizes), batch, seed)
  exact = exhaustive_scores(model, codes, sizes, batch)  # [batch, N]
  bias = np.zeros(n, np.float32)
  top = np.argmax(exact, axis=1)
  bias[top] = -50.0  # every query's best item pushed below the rest
  bias[1] = min(bias[1], -0.7)
  plain = run_search(model, build_trie(codes, vocab, device_put=True), DecodeConfig(n, n), batch)
  biased_trie = build_trie(codes, vocab, device_put=True, leaf_bias=bias)
  assert biased_trie.node_bias is not None and len(biased_trie.node_bias) == len(sizes)
  # each node's bound is the best offset below it; at the leaves, the items' own
  np.testing.assert_array_equal(np.asarray(biased_trie.node_bias[-1]),
                                bias[np.asarray(biased_trie.leaf_row)])
  res = run_search(model, biased_trie, DecodeConfig(n, n), batch)
  check_results_valid(res, codes, sizes, n)
  check_exact_top_k(res, exact + bias[None, :], n)
  for b in range(batch):
    assert res.rows[b][0] != top[b] and plain.rows[b][0] == top[b]
  # all-zero offsets are no bias at all: the same tables as without
  assert build_trie(codes, vocab, leaf_bias=np.zeros(n)).node_bias is None
  with pytest.raises(ValueError, match="leaf_bias"):
    build_trie(codes, vocab, leaf_bias=np.full(n + 1, -1.0))


def test_narrow_prefixes_fewer_children_than_beam():
  # Root has 2 children; one subtree is a single chain. Beam 6 > any node's fan-out.
  codes = np.array([[0, 0, 0], [0, 0, 1], [0, 1, 0], [1, 2, 3]], np.int32)
  sizes = (2, 3, 4)
  trie = build_trie(codes, IdentifierVocab(sizes))
  assert trie.max_fanout == (2, 2, 2)
  model = StubModel(IdentifierVocab(sizes).vocab_size, 3, 2, 5)
  res = run_search(model, trie, DecodeConfig(6, 6), 2)
  check_results_valid(res, codes, sizes, 4)
  check_exact_top_k(res, exhaustive_scores(model, codes, sizes, 2), 6)


def test_single_identifier_corpus():
  codes = np.array([[3, 0, 2]], np.int32)
  sizes = (4, 2, 3)
  trie = build_trie(codes, IdentifierVocab(sizes))
  model = StubModel(IdentifierVocab(sizes).vocab_size, 3, 2, 1)
  res = run_search(model, trie, DecodeConfig(4, 3), 2)
  check_results_valid(res, codes, sizes, 1)
  np.testing.assert_array_equal(res.rows[:, 0], [0, 0])
  np.testing.assert_allclose(res.scores[:, 0], exhaustive_scores(model, codes, sizes, 2)[:, 0],
                             rtol=1e-5)
  assert np.all(res.scores[:, 0] < 0)


def test_beam_smaller_than_corpus_results_are_valid_and_scored_consistently():
  rng = np.random.default_rng(7)
  sizes = (6, 6, 6, 3)
  codes = random_codes(rng, 300, sizes)
  trie = build_trie(codes, IdentifierVocab(sizes))
  model = StubModel(IdentifierVocab(sizes).vocab_size, 4, 4, 7)
  res = run_search(model, trie, DecodeConfig(5, 5), 4)
  check_results_valid(res, codes, sizes, 5)
  exhaustive = exhaustive_scores(model, codes, sizes, 4)
  # Each returned score is the true log-prob of the returned identifier.
  np.testing.assert_allclose(res.scores, np.take_along_axis(exhaustive, res.rows, 1), rtol=1e-5,
                             atol=1e-5)
  # Beam search is approximate, but never better than the exact optimum.
  assert np.all(res.scores[:, 0] <= exhaustive.max(1) + 1e-5)


def test_cached_decoding_equals_recompute_without_cache():
  rng = np.random.default_rng(11)
  sizes = (5, 4, 4, 3)
  codes = random_codes(rng, 120, sizes)
  batch, beam = 2, 6
  trie = build_trie(codes, IdentifierVocab(sizes))
  model = StubModel(IdentifierVocab(sizes).vocab_size, 4, batch, 11)
  res = run_search(model, trie, DecodeConfig(beam, beam), batch)
  # Recompute every result's score from its full token history, step by step, no cache.
  toks = jnp.asarray(res.tokens)  # [batch, beam, L]
  hist = jnp.concatenate([jnp.full((batch, beam, 1), START_ID, jnp.int32), toks], axis=-1)
  total = np.zeros((batch, beam), np.float32)
  for step in range(len(sizes)):
    logits = model.logits_from_history(hist, step)  # [batch, beam, V]
    logp = jax.nn.log_softmax(logits, -1)
    total += np.asarray(jnp.take_along_axis(logp, toks[:, :, step, None], -1)[..., 0])
  np.testing.assert_allclose(res.scores, total, rtol=1e-5, atol=1e-5)


def test_cache_reordering_is_needed():
  """A search that forgets to reorder the cache would give different scores: the stub sees it."""
  rng = np.random.default_rng(3)
  sizes = (4, 4, 4)
  codes = random_codes(rng, 40, sizes)
  model = StubModel(IdentifierVocab(sizes).vocab_size, 3, 1, 3)
  toks = jnp.asarray((codes + level_offsets(sizes))[None])  # [1, N, L]
  good = score_tokens(model.tokens_to_logits, model.init_cache(1, 40), toks)
  shuffled_hist = jnp.asarray(rng.permutation(np.asarray(toks[0]))[None])
  # Same last tokens, other prefixes in the cache at the last step -> other logits.
  cache = {"hist": jnp.concatenate([jnp.full((1, 40, 1), START_ID), shuffled_hist], -1),
           "hash": jnp.asarray(rng.integers(0, 1000, (1, 40)), jnp.int32)}
  a, _ = model.tokens_to_logits(toks[:, :, 1], model.tokens_to_logits(
      jnp.full((1, 40), START_ID), model.init_cache(1, 40), 0)[1], 1)
  b, _ = model.tokens_to_logits(toks[:, :, 1], cache, 1)
  assert float(jnp.abs(a - b).max()) > 0.1
  assert np.all(np.isfinite(np.asarray(good)))


@hypothesis.settings(max_examples=8, deadline=None, derandomize=True,
                     suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(
    sizes=st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple),
    n_frac=st.floats(0.05, 1.0),
    beam=st.integers(1, 9),
    n_results_frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16))
def test_property_random_tries(sizes, n_frac, beam, n_results_frac, seed):
  rng = np.random.default_rng(seed)
  total = int(np.prod(sizes))
  n = max(1, int(round(n_frac * total)))
  codes = random_codes(rng, n, sizes)
  n_results = 1 + int(n_results_frac * (beam - 1))
  batch = 2
  trie = build_trie(codes, IdentifierVocab(sizes))
  model = StubModel(IdentifierVocab(sizes).vocab_size, len(sizes), batch, seed)
  res = run_search(model, trie, DecodeConfig(beam, n_results), batch)
  check_results_valid(res, codes, sizes, min(n_results, n))
  exhaustive = exhaustive_scores(model, codes, sizes, batch)
  valid_rows = np.where(res.valid, res.rows, 0)
  np.testing.assert_allclose(np.where(res.valid, res.scores, 0),
                             np.where(res.valid, np.take_along_axis(exhaustive, valid_rows, 1), 0),
                             rtol=1e-5, atol=1e-5)
  if beam >= n:
    check_exact_top_k(res, exhaustive, n_results)


def test_full_trie_equals_unconstrained_search():
  sizes = (3, 4, 3)
  codes = random_codes(np.random.default_rng(0), 36, sizes)  # every identifier exists
  model = StubModel(IdentifierVocab(sizes).vocab_size, 3, 2, 2)
  config = DecodeConfig(5, 5)
  res = run_search(model, build_trie(codes, IdentifierVocab(sizes)), config, 2)
  free = jax.jit(lambda c: unconstrained_beam_search(model.tokens_to_logits, c, sizes, config))(
      model.init_cache(2, 5))
  np.testing.assert_array_equal(res.codes, np.asarray(free.codes))
  np.testing.assert_allclose(res.scores, np.asarray(free.scores), rtol=1e-6)
  assert np.all(np.asarray(free.rows) == -1)


def test_config_and_cache_validation():
  with pytest.raises(ValueError, match="beam_size"):
    DecodeConfig(0, 1)
  with pytest.raises(ValueError, match="n_results"):
    DecodeConfig(4, 5)
  sizes = (2, 2)
  trie = build_trie(np.array([[0, 1], [1, 0]]), IdentifierVocab(sizes))
  model = StubModel(IdentifierVocab(sizes).vocab_size, 2, 1, 0)
  with pytest.raises(ValueError, match=r"beam=4.*shape \(1, 3"):
    beam_search(model.tokens_to_logits, model.init_cache(1, 3), trie, DecodeConfig(4, 2))
  with pytest.raises(ValueError, match="batch_size"):
    beam_search(model.tokens_to_logits, {}, trie, DecodeConfig(2, 2))
  # A trie whose level sizes do not match the model's vocabulary is refused, not misdecoded.
  small_trie = build_trie(np.array([[0, 1], [1, 0]]))  # inferred sizes (2, 2): vocab 6
  other = StubModel(IdentifierVocab((2, 3)).vocab_size, 2, 1, 0)
  with pytest.raises(ValueError, match=r"vocab=6"):
    beam_search(other.tokens_to_logits, other.init_cache(1, 2), small_trie, DecodeConfig(2, 2))


def test_core_modules_do_not_import_gin_or_tensorflow():
  code = (
      "import sys\n"
      "class Block:\n"
      "  def find_spec(self, name, path=None, target=None):\n"
      "    if name.split('.')[0] in ('gin', 'tensorflow', 'seqio'):\n"
      "      raise ImportError('blocked ' + name)\n"
      "sys.meta_path.insert(0, Block())\n"
      "import cart_jax.inference.decoding, cart_jax.index.trie\n"
      "print('ok')\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "ok"
