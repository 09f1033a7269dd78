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


def test_ivf_cache_round_trips_the_trained_index(tmp_path):
  """A 1M-item IVF takes minutes of k-means: the benchmark trains it once per N and reloads it."""
  rng = np.random.default_rng(1)
  items = rng.standard_normal((2_000, 32)).astype(np.float32)
  queries = rng.standard_normal((9, 32)).astype(np.float32)
  cache = str(tmp_path / "ivf.faiss")
  first = tp.dual_searcher("faiss_ivf", items, 9, ivf_cache=cache)
  assert os.path.exists(cache) and os.path.exists(cache + ".json") and first.build_s > 0
  again = tp.dual_searcher("faiss_ivf", items, 9, ivf_cache=cache)
  assert (again.nlist, again.index.nprobe) == (first.nlist, first.index.nprobe) == (tp.ivf_nlist(2_000), 8)
  assert again.build_s == pytest.approx(first.build_s)  # the training time, not the load time
  np.testing.assert_array_equal(again.search(queries)[1], first.search(queries)[1])


def test_rows_file_is_make_items_on_disk(tmp_path, monkeypatch):
  monkeypatch.setattr(tp, "ITEM_DIM", 16)
  path = tp.rows_file(1_500, 3, str(tmp_path))
  rows = np.load(path, mmap_mode="r")
  np.testing.assert_array_equal(rows, tp.make_items(1_500, 3))
  assert tp.rows_file(1_500, 3, str(tmp_path)) == path  # reused, not rewritten
  assert not [p for p in os.listdir(tmp_path) if p.endswith(".part")]


def test_matched_fraction_is_the_first_nprobe_reaching_cart_rerank():
  q = {"cart_rerank": {"r@10": 0.90},
       "ivf": [{"nprobe": p, "nlist": 100, "r@10": r}
               for p, r in ((1, 0.5), (8, 0.85), (32, 0.899), (64, 0.91), (100, 0.92))]}
  m = tp.matched_fraction(q)
  assert (m["nprobe"], m["fraction"], m["reached"]) == (64, 0.64, True)
  q["cart_rerank"]["r@10"] = 0.95  # above exact search: compared at every cell probed
  m = tp.matched_fraction(q)
  assert (m["nprobe"], m["fraction"], m["reached"]) == (100, 1.0, False)
  assert tp.ivf_nlist(1_000_000) == 4_000 and tp.ivf_nlist(3_944) == 101 and tp.ivf_nlist(50) == 1


def _row(method, n, qps, cpu_ms, batch=100, **kw):
  return {"method": method, "n_items": n, "batch": batch, "qps": qps, "qps_cpu": batch / (cpu_ms / 1e3),
          "cpu_ms_p50": cpu_ms, **kw}


def test_median_rounds_keeps_the_median_round_of_every_cell():
  rows = [_row("cart", 1000, q, 300.0) for q in (250.0, 270.0, 260.0)] + [_row("dual_jax", 1000, 400.0, 250.0)]
  out = {r["method"]: r for r in tp.median_rounds(rows)}
  assert out["cart"]["qps"] == 260.0 and out["cart"]["qps_rounds"] == [250.0, 260.0, 270.0]
  assert out["dual_jax"]["qps_rounds"] == [400.0]


def test_goals_from_rows():
  matched = {"nprobe_at_n": {"1000000": 2535}}
  rows = [_row("cart_rerank", n, 240.0, 730.0) for n in (1_000, 100_000)] + [
      _row("cart_rerank", 1_000_000, 240.0, 790.0),
      _row("dual_jax", 1_000_000, 60.0, 900.0),
      _row("faiss_ivf", 1_000_000, 380.0, 500.0, nprobe=8, nprobe_default=True),
      _row("faiss_ivf", 1_000_000, 20.0, 5000.0, nprobe=2535, nprobe_default=False),
      _row("cart", 10_000_000, 260.0, 700.0, rss_mb=1500.0, rss_peak_mb=1900.0)]
  g = tp.goals(rows, matched)
  assert g["rerank_vs_exact_jax"]["ratio"] == 4.0 and g["rerank_vs_exact_jax"]["met"]
  assert g["rerank_vs_ivf_matched"]["nprobe"] == 2535 and g["rerank_vs_ivf_matched"]["ratio"] == 12.0
  flat = g["cart_rerank_flat_cpu_ms_per_query"]
  assert flat["max_over_min"] == pytest.approx(790 / 730, abs=1e-3) and flat["met"]  # 8.2% apart
  assert g["cart_rss_at_10m_mb"]["met"]
  rows[2] = _row("cart_rerank", 1_000_000, 240.0, 900.0)
  assert not tp.goals(rows, matched)["cart_rerank_flat_cpu_ms_per_query"]["met"]
