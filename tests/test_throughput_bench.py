"""benchmarks/throughput.py: its pure helpers (no timing is asserted; benchmarks are not tests)."""
import importlib.util
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from cart_jax.inference.decoding import DecodeConfig, beam_search
from cart_jax.index.trie import build_trie
from cart_jax.index.vocab import IdentifierVocab

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "throughput.py")


def _bench():
  spec = importlib.util.spec_from_file_location("throughput_bench", SCRIPT)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


tp = _bench()


def test_codes_are_unique_and_in_range():
  codes = tp.make_codes(20_000, seed=1)
  assert codes.shape == (20_000, tp.ID_LEN) and codes.dtype == np.int32
  assert len(np.unique(codes, axis=0)) == 20_000
  assert (codes >= 0).all() and (codes < np.asarray(tp.LEVEL_SIZES)).all()
  # skewed clusters: the most popular k holds several times the least popular's share
  counts = np.bincount(codes[:, 0], minlength=256)
  assert counts.max() > 5 * max(counts.min(), 1)
  np.testing.assert_array_equal(codes, tp.make_codes(20_000, seed=1))


def test_crossover_interpolates_log_log():
  cart = {1_000: 10.0, 10_000: 10.0, 100_000: 10.0, 1_000_000: 10.0}
  dual = {1_000: 100.0, 10_000: 40.0, 100_000: 5.0, 1_000_000: 0.5}
  c = tp.crossover(cart, dual)
  # ratio 0.25 at 10K and 2 at 100K: log-linear root at 10K * 10**(log 4 / log 8)
  assert c["status"] == "crossed"
  assert math.isclose(c["n"], 10_000 * 10 ** (math.log(4) / math.log(8)), rel_tol=1e-9)
  assert tp.crossover(cart, {n: 2 * q for n, q in cart.items()})["n"] is None
  assert "none in range" in tp.crossover(cart, {n: 2 * q for n, q in cart.items()})["status"]
  fast = tp.crossover(cart, {n: 0.5 * q for n, q in cart.items()})
  assert fast["n"] == 1_000 and "every measured N" in fast["status"]


def test_predict_call_s_scales_with_batch_then_n():
  done = {(1000, 1): 0.1, (1000, 100): 2.0}
  assert tp.predict_call_s(done, 1000, 1000) == pytest.approx(20.0)
  assert tp.predict_call_s(done, 10_000, 100) == pytest.approx(20.0)  # dual tower: linear in N
  assert tp.predict_call_s(done, 10_000, 100, flat_in_n=True) == pytest.approx(2.0)  # CART
  assert tp.predict_call_s(done, 10_000, 1000, flat_in_n=True) == pytest.approx(20.0)
  assert tp.predict_call_s(done, 10_000, 1) == pytest.approx(1.0)
  # the query tower's share (1.5 s of the 2 s) does not grow with N
  assert tp.predict_call_s(done, 10_000, 100, fixed_s={100: 1.5}) == pytest.approx(1.5 + 0.5 * 10)
  assert tp.predict_call_s({}, 10, 1) is None
  assert tp.predict_call_s({(1000, 1): 0.5}, 1000, 100) is None  # batch 1 is latency, not throughput
  # once a cheaper cell was skipped, the dearer ones are too
  assert tp.predict_call_s({}, 10_000, 1000, skipped={(10_000, 100)}) == math.inf
  assert tp.predict_call_s({}, 10_000, 100, skipped={(1000, 100)}) == math.inf
  assert tp.predict_call_s({}, 10_000, 100, skipped={(1000, 100)}, flat_in_n=True) is None


def test_ivf_nlist_and_flops():
  assert tp.ivf_nlist(1_000) == 25 and tp.ivf_nlist(1_000_000) == 1024
  assert tp.dual_flops("dual_jax", 1_000_000, 0) == 2 * 384 * 1024 + 2 * 1_000_000 * 1024
  ivf = tp.dual_flops("faiss_ivf", 1_000_000, 0)
  assert ivf == int(2 * 384 * 1024 + 2 * 1024 * 1024 + 2 * 8 * (1_000_000 / 1024) * 1024)


def test_bucketed_trie_gives_the_same_search_results():
  """Padding the tables (one compiled search for every N) changes no result."""
  vocab = IdentifierVocab(tp.LEVEL_SIZES)
  codes = tp.make_codes(3_000, seed=2)
  trie = build_trie(codes, vocab)
  padded = tp.bucket_trie(trie, tp.trie_capacity(50_000), tp.LEVEL_SIZES)
  assert padded.num_nodes == (1,) + tp.trie_capacity(50_000)
  assert padded.max_fanout == tp.LEVEL_SIZES
  other = tp.bucket_trie(build_trie(tp.make_codes(900, seed=3), vocab), tp.trie_capacity(50_000),
                         tp.LEVEL_SIZES)
  assert jax.tree.structure(padded) == jax.tree.structure(other)  # same program serves both
  assert [x.shape for x in jax.tree.leaves(padded)] == [x.shape for x in jax.tree.leaves(other)]
  with pytest.raises(ValueError, match="capacity"):
    tp.bucket_trie(trie, tp.trie_capacity(1_000), tp.LEVEL_SIZES)

  rng = np.random.default_rng(0)
  table = rng.standard_normal((vocab.vocab_size, vocab.vocab_size)).astype(np.float32)

  def t2l(tok, cache, step):  # a Markov stub model: logits depend on the previous token
    return jax.numpy.asarray(table)[tok] + 0.1 * step, cache

  def run(t):
    dc = DecodeConfig(5, 5)
    return jax.jit(lambda t: beam_search(t2l, {}, t, dc, batch_size=1))(jax.device_put(t))
  a, b = run(trie), run(padded)
  np.testing.assert_array_equal(np.asarray(a.rows), np.asarray(b.rows))
  np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))
  rows = np.asarray(a.rows)[0]
  assert (rows >= 0).all()
  np.testing.assert_array_equal(np.asarray(a.codes)[0], codes[rows])


def test_gpu_mode_fails_clearly_without_a_gpu(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, SCRIPT, "--device", "gpu", "--json", str(tmp_path / "r.json")],
                       env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2
  assert "--device gpu but JAX sees no GPU" in out.stderr
  assert not (tmp_path / "r.json").exists()
  bad = subprocess.run([sys.executable, SCRIPT, "--device", "gpu", "--methods", "cart,faiss_flat"],
                       env=env, capture_output=True, text=True, timeout=60)
  assert bad.returncode == 2 and "run on the CPU only" in bad.stderr
