"""benchmarks/throughput.py: its pure helpers and its searchers, which are the library's (no timing is
asserted; benchmarks are not tests)."""
import importlib.util
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from cart_jax.inference.dual_tower import ExactSearcher, FaissSearcher, make_searcher

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


def test_dual_flops():
  assert tp.dual_flops(1_000_000, 0) == 2 * 384 * 1024 + 2 * 1_000_000 * 1024
  ivf = tp.dual_flops(1_000_000, 0, nlist=4000, nprobe=8)
  assert ivf == int(2 * 384 * 1024 + 2 * 4000 * 1024 + 2 * 8 * (1_000_000 / 4000) * 1024)


def test_items_are_unit_norm_and_deterministic():
  items = tp.make_items(700, seed=3, block=256)
  assert items.shape == (700, tp.ITEM_DIM) and items.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(items, axis=1), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(items, tp.make_items(700, seed=3, block=256))


def test_dual_tower_uses_the_library_searchers():
  """The benchmark times the searchers `cart baseline` runs: same rows, same IVF settings."""
  rng = np.random.default_rng(0)
  items = rng.standard_normal((3_000, 64)).astype(np.float32)
  queries = rng.standard_normal((37, 64)).astype(np.float32)
  exact = tp.dual_searcher("dual_jax", items, 37, chunk_size=1024)
  assert isinstance(exact, ExactSearcher) and exact.config.query_batch == 37
  want = make_searcher("jax", items, tp.TOP_K)  # cart baseline --method jax
  np.testing.assert_array_equal(exact.search(queries)[1], want.search(queries)[1])
  flat = tp.dual_searcher("faiss_flat", items, 37)
  assert isinstance(flat, FaissSearcher)
  np.testing.assert_array_equal(flat.search(queries)[1], want.search(queries)[1])
  ivf = tp.dual_searcher("faiss_ivf", items, 37)
  base = make_searcher("faiss-ivf", items, tp.TOP_K)  # cart baseline --method faiss-ivf defaults
  assert (ivf.nlist, ivf.index.nprobe) == (base.nlist, base.index.nprobe) == (76, 8)
  np.testing.assert_array_equal(ivf.search(queries)[1], base.search(queries)[1])


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
