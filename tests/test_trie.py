"""Trie tables: vectorised build equals a Python dict trie; layout, validation, device placement."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cart_jax.index.trie import build_trie, build_trie_timed
from cart_jax.index.vocab import IdentifierVocab


def dict_trie(codes):
  """Reference: nested dicts {code: subtree}, leaves are rows."""
  root = {}
  for row, ident in enumerate(codes.tolist()):
    node = root
    for c in ident[:-1]:
      node = node.setdefault(c, {})
    node[ident[-1]] = row
  return root


def random_unique_codes(rng, n, sizes):
  total = int(np.prod(sizes))
  flat = rng.choice(total, size=min(n, total), replace=False)
  return np.stack(np.unravel_index(flat, sizes), axis=1).astype(np.int32)


@pytest.mark.parametrize("seed,n,sizes", [
    (0, 1, (4, 3, 2)),
    (1, 7, (3,)),
    (2, 30, (3, 4, 2)),
    (3, 200, (5, 6, 4, 3)),
    (4, 64, (2, 2, 2, 2, 2, 2)),  # complete binary trie
    (5, 50, (8, 1, 7, 2)),  # a level with a single code
])
def test_build_equals_dict_reference(seed, n, sizes):
  rng = np.random.default_rng(seed)
  codes = random_unique_codes(rng, n, sizes)
  trie = build_trie(codes, IdentifierVocab(sizes))
  assert trie.to_nested_dict() == dict_trie(codes)
  assert trie.num_nodes[0] == 1 and trie.num_nodes[-1] == codes.shape[0]
  for d in range(1, len(sizes) + 1):
    assert trie.num_nodes[d] == len({tuple(r) for r in codes[:, :d].tolist()})
  # Max fan-out per depth against a counter over prefixes.
  for d in range(len(sizes)):
    fan = {}
    for r in codes.tolist():
      fan.setdefault(tuple(r[:d]), set()).add(r[d])
    assert trie.max_fanout[d] == max(len(v) for v in fan.values())


def test_exact_tables_small():
  codes = np.array([[2, 1], [0, 1], [0, 0], [2, 3]], np.int32)
  trie = build_trie(codes, IdentifierVocab((3, 4)))
  np.testing.assert_array_equal(trie.root_child, [0, -1, 1])
  np.testing.assert_array_equal(trie.row_starts_at(1), [0, 2, 4])
  np.testing.assert_array_equal(trie.codes_at(1), [0, 2])
  np.testing.assert_array_equal(trie.codes_at(2), [0, 1, 1, 3])
  np.testing.assert_array_equal(trie.leaf_row, [2, 1, 0, 3])
  assert trie.max_fanout == (2, 2)
  assert trie.num_nodes == (1, 2, 4)
  assert trie.level_sizes == (3, 4)
  # 3 root + 3 row starts + 2 + 4 node codes + 4 leaves, int32.
  assert trie.memory_bytes() == 4 * (3 + 3 + 2 + 4 + 4)


def test_duplicates_are_rejected_naming_rows():
  codes = np.array([[0, 1], [1, 1], [0, 1]])
  with pytest.raises(ValueError, match=r"rows 0 and 2"):
    build_trie(codes)


@pytest.mark.parametrize("codes,vocab,msg", [
    (np.zeros((3,), np.int32), None, "2-D"),
    (np.zeros((0, 2), np.int32), None, "at least one"),
    (np.array([[0.5, 1.0]]), None, "integers"),
    (np.array([[0, -1]]), None, "negative"),
    (np.array([[0, 4]]), IdentifierVocab((2, 4)), r"out of range \[0, 4\) for level 1"),
    (np.array([[0, 1, 0]]), IdentifierVocab((2, 4)), "length 3"),
])
def test_bad_input_errors(codes, vocab, msg):
  with pytest.raises(ValueError, match=msg):
    build_trie(codes, vocab)


def test_vocab_larger_than_codes_keeps_level_sizes():
  codes = np.array([[1, 0]], np.int32)
  trie = build_trie(codes, IdentifierVocab((5, 7)))
  assert trie.level_sizes == (5, 7)
  np.testing.assert_array_equal(trie.root_child, [-1, 0, -1, -1, -1])
  # Without a vocabulary the smallest one holding the codes is used.
  assert build_trie(codes).level_sizes == (2, 1)


def test_device_placement_and_jit_pytree():
  rng = np.random.default_rng(0)
  codes = random_unique_codes(rng, 40, (4, 4, 4))
  trie = build_trie(codes, device_put=True)
  assert isinstance(trie.leaf_row, jax.Array)
  mesh = jax.make_mesh((1,), ("data",))
  trie2 = build_trie(codes).to_device(mesh=mesh)
  assert trie2.leaf_row.sharding.is_fully_replicated

  @jax.jit
  def n_children_of_first(t):
    rs = t.row_starts_at(1)
    return rs[1] - rs[0], t.max_fanout[1]  # static metadata survives jit

  count, fan = n_children_of_first(trie2)
  first = codes[codes[:, 0] == codes[:, 0].min()]
  assert int(count) == len(set(first[:, 1].tolist()))
  assert fan == trie.max_fanout[1]
  assert jnp.asarray(count).dtype == jnp.int32


def test_build_is_vectorised_large_input():
  # 200K identifiers of length 6 (kept modest for the shared CI machine); checks the tables,
  # not the time (speed is measured by benchmarks/decode_bench.py).
  rng = np.random.default_rng(0)
  n = 200_000
  codes = np.concatenate([rng.integers(0, 64, (n, 5)), np.zeros((n, 1))], axis=1).astype(np.int32)
  codes = np.unique(codes, axis=0)
  codes = codes[rng.permutation(codes.shape[0])]
  trie, stats = build_trie_timed(codes)
  assert stats["num_identifiers"] == codes.shape[0]
  assert stats["memory_bytes"] <= 8 * 6 * codes.shape[0] + 4 * 64
  # Spot check 100 random identifiers by walking the tables.
  for row in rng.choice(codes.shape[0], 100, replace=False):
    node = int(trie.root_child[codes[row, 0]])
    for d in range(1, 6):
      lo, hi = trie.row_starts_at(d)[node], trie.row_starts_at(d)[node + 1]
      kids = np.asarray(trie.codes_at(d + 1)[lo:hi])
      assert np.all(np.diff(kids) > 0)  # children sorted by code, distinct
      node = int(lo + np.searchsorted(kids, codes[row, d]))
      assert trie.codes_at(d + 1)[node] == codes[row, d]
    assert trie.leaf_row[node] == row


def test_wide_levels_use_the_general_sort():
  # 4 levels of 2**20 codes: 80 bits do not pack into one int64 key, np.lexsort path.
  rng = np.random.default_rng(9)
  codes = np.unique(rng.integers(0, 2**20, (300, 4)), axis=0).astype(np.int32)
  codes[::7, 0] = codes[0, 0]  # shared prefixes
  codes = np.unique(codes, axis=0)
  codes = codes[rng.permutation(codes.shape[0])]
  trie = build_trie(codes, IdentifierVocab((2**20,) * 4))
  assert trie.to_nested_dict() == dict_trie(codes)
  assert trie.max_fanout[0] == len(set(codes[:, 0].tolist()))
