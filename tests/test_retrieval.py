"""Dual-tower search: JAX exact top-k (chunked, running merge) vs a numpy reference; FAISS."""
import numpy as np
import pytest

from cart_jax.inference import dual_tower as retrieval


def numpy_top_k(queries, items, k):
  """Reference: full score matrix, stable sort of -score (ties -> lower row first)."""
  scores = queries.astype(np.float64) @ items.astype(np.float64).T  # [Q, N]
  rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(scores, rows, axis=1), rows


def _data(n=103, d=16, q=37, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((q, d)).astype(np.float32),
          rng.standard_normal((n, d)).astype(np.float32))


@pytest.mark.parametrize("chunk", [None, 10, 64, 103, 1000])
def test_exact_equals_numpy_across_chunk_boundaries(chunk):
  queries, items = _data()
  s = retrieval.ExactSearcher(items, retrieval.ExactSearchConfig(k=10, chunk_size=chunk, query_batch=16))
  scores, rows = s.search(queries)  # 37 queries: 3 batches, the last padded
  ref_scores, ref_rows = numpy_top_k(queries, items, 10)
  np.testing.assert_array_equal(rows, ref_rows)
  np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)
  assert rows.dtype == np.int32 and scores.shape == (37, 10)


def test_best_items_in_the_padded_last_chunk_and_k_equals_n():
  queries, items = _data(n=25, q=5)
  items[24] = queries[0] * 10  # the best match of query 0 sits in the padded last chunk
  s = retrieval.ExactSearcher(items, retrieval.ExactSearchConfig(k=8, chunk_size=8))
  _, rows = s.search(queries)
  assert rows[0, 0] == 24
  np.testing.assert_array_equal(rows, numpy_top_k(queries, items, 8)[1])
  _, rows_all = retrieval.ExactSearcher(items, retrieval.ExactSearchConfig(k=25, chunk_size=25)).search(queries)
  np.testing.assert_array_equal(np.sort(rows_all, axis=1), np.tile(np.arange(25), (5, 1)))  # no padding row


def test_ties_break_toward_the_lower_row_across_chunks():
  items = np.zeros((12, 4), np.float32)
  items[[2, 5, 9, 11]] = [1, 0, 0, 0]  # four equal best items in three different chunks
  s = retrieval.ExactSearcher(items, retrieval.ExactSearchConfig(k=3, chunk_size=4))
  _, rows = s.search(np.array([[1, 0, 0, 0]], np.float32))
  assert rows[0].tolist() == [2, 5, 9]


def test_faiss_flat_equals_exact_and_ivf_with_all_cells_too():
  queries, items = _data(n=400, d=8, q=20, seed=1)
  ref_scores, ref_rows = numpy_top_k(queries, items, 10)
  f_scores, f_rows = retrieval.make_searcher("faiss-flat", items, 10).search(queries)
  np.testing.assert_array_equal(f_rows, ref_rows)
  np.testing.assert_allclose(f_scores, ref_scores, rtol=1e-4, atol=1e-4)
  ivf = retrieval.make_searcher("faiss-ivf", items, 10, nlist=8, nprobe=8)  # visits every cell
  assert ivf.nlist == 8
  np.testing.assert_array_equal(ivf.search(queries)[1], ref_rows)


def test_bad_inputs():
  queries, items = _data(n=20, q=2)
  with pytest.raises(ValueError, match="k must be in"):
    retrieval.ExactSearcher(items, retrieval.ExactSearchConfig(k=21))
  with pytest.raises(ValueError, match="chunk_size 4 must be >= k 10"):
    retrieval.ExactSearcher(items, retrieval.ExactSearchConfig(k=10, chunk_size=4))
  with pytest.raises(ValueError, match=r"queries must be \[Q, 16\]"):
    retrieval.ExactSearcher(items, retrieval.ExactSearchConfig(k=5)).search(queries[:, :3])
  with pytest.raises(ValueError, match="unknown search method"):
    retrieval.make_searcher("hnsw", items, 5)
  with pytest.raises(ValueError, match="non-empty"):
    retrieval.make_searcher("faiss-flat", np.zeros((0, 4), np.float32), 1)
