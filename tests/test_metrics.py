"""The shared retrieval metrics on hand-made rankings."""
import numpy as np
import pytest

from cart_jax.inference.metrics import first_relevant_rank, retrieval_metrics

# 4 queries, 10 results each. Targets: 7 at rank 1, 3 at rank 3, 9 at rank 10, 5 absent.
RANKED = np.array([
    [7, 1, 2, 3, 4, 5, 6, 8, 9, 0],
    [0, 1, 3, 2, 4, 5, 6, 7, 8, 9],
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
    [0, 1, 2, 3, 4, 6, 7, 8, 9, 10],
])
TARGETS = np.array([7, 3, 9, 5])


def test_single_target():
  assert first_relevant_rank(RANKED, TARGETS).tolist() == [0, 2, 9, -1]
  m = retrieval_metrics(RANKED, TARGETS)
  assert m["r@1"] == pytest.approx(1 / 4)
  assert m["r@5"] == pytest.approx(2 / 4)
  assert m["r@10"] == pytest.approx(3 / 4)
  assert m["mrr@10"] == pytest.approx((1 + 1 / 3 + 1 / 10 + 0) / 4)
  assert m["num_queries"] == 4


def test_sets_of_relevant_items_take_the_first_hit():
  targets = [{2, 7}, {9, 3}, {42}, [10, 0]]  # first hits at ranks 1, 3, none, 1
  assert first_relevant_rank(RANKED, targets).tolist() == [0, 2, -1, 0]
  m = retrieval_metrics(RANKED, targets, ks=(1, 3))
  assert m["r@1"] == pytest.approx(2 / 4) and m["r@3"] == pytest.approx(3 / 4)
  assert m["mrr@10"] == pytest.approx((1 + 1 / 3 + 0 + 1) / 4)


def test_list_of_ints_equals_array_and_mrr_cutoff():
  assert retrieval_metrics(RANKED, TARGETS.tolist()) == retrieval_metrics(RANKED, TARGETS)
  m = retrieval_metrics(RANKED, TARGETS, ks=(1,), mrr_k=5)  # the rank-10 hit no longer counts
  assert m["mrr@5"] == pytest.approx((1 + 1 / 3) / 4)


def test_empty_slots_never_match():
  ranked = np.array([[-1, -1, 4], [4, -1, -1]])
  assert first_relevant_rank(ranked, np.array([4, -1])).tolist() == [2, -1]


def test_bad_shapes_and_unmeasurable_k():
  with pytest.raises(ValueError, match="length 10"):
    retrieval_metrics(RANKED, TARGETS, ks=(1, 20))
  with pytest.raises(ValueError, match=r"\[queries\]"):
    retrieval_metrics(RANKED, TARGETS[:3])
  with pytest.raises(ValueError, match="3 target entries for 4"):
    retrieval_metrics(RANKED, [{1}, {2}, {3}])
  with pytest.raises(ValueError, match=r"\[queries, k\]"):
    retrieval_metrics(RANKED[0], TARGETS)
