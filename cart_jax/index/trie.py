"""The identifier trie as arrays: a dense first level plus one CSR table per deeper level.

Constrained decoding never walks pointers. The trie of all identifiers (codes ``int32 [N, L]``)
is flattened, level by level, into a few flat integer arrays (the STATIC layout,
arXiv 2602.22647):

* **Nodes** are numbered per depth. Depth ``d`` holds one node per distinct prefix of length
  ``d`` (depth 0 is the root, depth ``L`` are the leaves, one per identifier). Because the
  identifiers are sorted lexicographically first, the children of any node are a *contiguous*
  run of node ids at the next depth, in increasing code order.
* **Level 0 is dense**: ``root_child[c]`` is the depth-1 node reached by code ``c`` from the root,
  or ``-1`` when no identifier starts with ``c``. The first decode step masks the level-0
  vocabulary with ``root_child >= 0``.
* **Deeper levels are CSR**: for a node ``n`` at depth ``d >= 1`` its children are the depth-``d+1``
  nodes ``row_start[d][n] .. row_start[d][n + 1] - 1`` and the code that leads to child ``m`` is
  ``node_code[d + 1][m]``. The child node id *is* the CSR column index, so no separate column array
  is stored.
* **Leaves** (depth ``L``) map to the row of the identifier in ``codes``: ``leaf_row[m]``.
* **Node bias** (optional): a log-probability offset per item (an item's decode-time prior,
  ``SemanticIndex.log_prior``) is stored per depth: ``node_bias[d - 1][m]`` is the largest offset
  of the items under node ``m`` of depth ``d`` (at depth ``L``: the item's own). The search adds to
  a beam the change of that bound at each step, so a finished identifier scores its log-probability
  plus its item's offset, and a prefix scores its log-probability plus the best offset below it
  (a prefix under which every item is penalised is penalised already, and leaves the beam to one
  that can still reach an unpenalised item). ``None`` (no offsets) keeps the plain search.

Each level has a static maximum fan-out ``max_fanout[d]`` (the largest number of children of any
node at depth ``d``). A decode step at depth ``d`` gathers, for every beam, the ``max_fanout[d]``
slots ``row_start[d][n] + arange(max_fanout[d])`` and masks the slots past the node's real
child count: one vectorised gather whose size depends on the fan-out, never on ``N``.

Fan-out is whatever the data gives. With ``K`` coarse clusters and codebooks of size ``C``,
``max_fanout[0] <= K`` and ``max_fanout[d] <= C`` for the fine levels; the last level (the counter
``u`` that separates colliding identifiers) has a fan-out equal to the largest collision group,
which can be large for a badly balanced index. The per-step cost of the search is proportional to
``beam * max_fanout[d]``, so a large counter fan-out shows up here (see ``TrieTables.summary``).

Memory: ``sum_d (num_nodes[d] + 1) * 4`` bytes for the row starts plus ``4`` bytes per node for its
code plus ``4 * N`` for ``leaf_row`` -- about ``8 * L * N`` bytes at most (under 48 MB for 1M
identifiers of length 6).
"""
from __future__ import annotations

import time
from typing import Any

import flax.struct
import jax
import numpy as np

from cart_jax.index.vocab import IdentifierVocab


@flax.struct.dataclass
class TrieTables:
  """The trie of all identifiers, as device arrays (a pytree).

  Attributes:
    root_child: int32 [level_sizes[0]]: depth-1 node reached by each level-0 code, -1 if none.
    row_start: tuple over depth d = 1..L-1 of int32 [num_nodes[d] + 1]: CSR row pointers; the
      children of node n at depth d are depth-(d+1) nodes row_start[d-1][n] .. row_start[d-1][n+1]-1.
      (Index ``row_start[d - 1]`` holds depth ``d``; use ``row_starts_at(d)``.)
    node_code: tuple over depth d = 1..L of int32 [num_nodes[d]]: the level-(d-1) code on the
      edge into each node. (Index ``node_code[d - 1]`` holds depth ``d``; use ``codes_at(d)``.)
    leaf_row: int32 [N]: row in the original ``codes`` of each leaf (depth-L node).
    level_sizes: static, the vocabulary size of each level.
    num_nodes: static, number of nodes at depth 0..L (``num_nodes[0] == 1``, ``num_nodes[L] == N``).
    max_fanout: static, largest child count of a node at depth 0..L-1.
    node_bias: None, or a tuple over depth d = 1..L of float32 [num_nodes[d]]: the largest
      log-prior offset of the items under each node (at depth L: the item's own offset).
  """
  root_child: jax.Array
  row_start: tuple[jax.Array, ...]
  node_code: tuple[jax.Array, ...]
  leaf_row: jax.Array
  level_sizes: tuple[int, ...] = flax.struct.field(pytree_node=False)
  num_nodes: tuple[int, ...] = flax.struct.field(pytree_node=False)
  max_fanout: tuple[int, ...] = flax.struct.field(pytree_node=False)
  node_bias: tuple[jax.Array, ...] | None = None

  @property
  def id_length(self) -> int:
    return len(self.level_sizes)

  @property
  def num_identifiers(self) -> int:
    return self.num_nodes[-1]

  def row_starts_at(self, depth: int):
    """CSR row pointers of the nodes at ``depth`` (1 <= depth <= L-1), [num_nodes[depth] + 1]."""
    return self.row_start[depth - 1]

  def codes_at(self, depth: int):
    """Code on the edge into each node at ``depth`` (1 <= depth <= L), [num_nodes[depth]]."""
    return self.node_code[depth - 1]

  def memory_bytes(self) -> int:
    """Bytes held by the tables (all leaves of the pytree)."""
    return int(sum(x.nbytes for x in jax.tree_util.tree_leaves(self)))

  def summary(self) -> dict[str, Any]:
    """Diagnostics: sizes, fan-out per level and memory (JSON-friendly)."""
    return {
        "num_identifiers": self.num_identifiers,
        "id_length": self.id_length,
        "level_sizes": list(self.level_sizes),
        "num_nodes": list(self.num_nodes),
        "max_fanout": list(self.max_fanout),
        "memory_bytes": self.memory_bytes(),
    }

  def to_device(self, sharding: jax.sharding.Sharding | None = None,
                mesh: jax.sharding.Mesh | None = None) -> "TrieTables":
    """Places the tables on device, replicated.

    Args:
      sharding: an explicit sharding for every leaf (normally fully replicated).
      mesh: alternatively a mesh; the tables are replicated over all its devices.
    """
    if sharding is None and mesh is not None:
      sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.device_put(self, sharding)

  def to_nested_dict(self) -> dict:
    """The trie as nested Python dicts ``{code: subtree}``, leaves are item rows (for tests/debug)."""
    root_child = np.asarray(self.root_child)
    row_start = [np.asarray(x) for x in self.row_start]
    node_code = [np.asarray(x) for x in self.node_code]
    leaf_row = np.asarray(self.leaf_row)
    depth_l = self.id_length

    def subtree(depth: int, node: int):
      if depth == depth_l:
        return int(leaf_row[node])
      lo, hi = row_start[depth - 1][node], row_start[depth - 1][node + 1]
      return {int(node_code[depth][m]): subtree(depth + 1, m) for m in range(lo, hi)}

    return {int(c): subtree(1, int(n)) for c, n in enumerate(root_child) if n >= 0}


def _validate_codes(codes: np.ndarray, level_sizes: tuple[int, ...] | None) -> np.ndarray:
  codes = np.asarray(codes)
  if codes.ndim != 2:
    raise ValueError(f"identifier codes must be a 2-D array [N, L], got shape {codes.shape}")
  if codes.shape[0] < 1 or codes.shape[1] < 1:
    raise ValueError(f"identifier codes must hold at least one identifier of length >= 1, "
                     f"got shape {codes.shape}")
  if not np.issubdtype(codes.dtype, np.integer):
    raise ValueError(f"identifier codes must be integers, got dtype {codes.dtype}")
  if codes.min() < 0:
    idx = tuple(int(i) for i in np.argwhere(codes < 0)[0])
    raise ValueError(f"negative code {int(codes[idx])} at (row, level) {idx}")
  if level_sizes is not None:
    if len(level_sizes) != codes.shape[1]:
      raise ValueError(f"identifier length {codes.shape[1]} != vocabulary's {len(level_sizes)}")
    bad = codes >= np.asarray(level_sizes)
    if bad.any():
      idx = tuple(int(i) for i in np.argwhere(bad)[0])
      raise ValueError(f"code {int(codes[idx])} at (row, level) {idx} out of range "
                       f"[0, {level_sizes[idx[1]]}) for level {idx[1]}")
  if codes.max() > np.iinfo(np.int32).max:
    raise ValueError("codes do not fit in int32")
  return codes.astype(np.int32, copy=False)


def _lexicographic_order(codes: np.ndarray, level_sizes: tuple[int, ...]) -> np.ndarray:
  """int32 [N]: row order sorting the identifiers lexicographically (stable)."""
  bits = [max(1, int(s - 1).bit_length()) for s in level_sizes]
  if sum(bits) <= 63:
    # Fast path: pack each identifier into one int64 key (level 0 in the high bits).
    key = np.zeros(codes.shape[0], np.int64)
    for col, b in enumerate(bits):  # loop over levels, not items
      key = (key << b) | codes[:, col].astype(np.int64)
    return np.argsort(key, kind="stable").astype(np.int32)
  # np.lexsort sorts by the LAST key first, so pass the columns reversed.
  return np.lexsort(codes.T[::-1]).astype(np.int32)


def build_trie(codes: np.ndarray, vocab: IdentifierVocab | None = None,
               device_put: bool = False, leaf_bias: np.ndarray | None = None) -> TrieTables:
  """Builds the trie tables from identifier codes, vectorised (no Python loop over items).

  Args:
    codes: int [N, L] level-local codes; row i is the identifier of item i. Rows must be distinct.
    vocab: the identifier vocabulary (gives the level sizes and validates the codes); if None the
      smallest vocabulary holding ``codes`` is used.
    device_put: if True, the returned tables are committed to the default device; otherwise they
      stay numpy arrays (call ``to_device``).
    leaf_bias: optional float [N]: row i's log-prior offset (``SemanticIndex.prior()``); all zeros
      or None: no bias (the tables carry ``node_bias=None``).

  Returns:
    TrieTables.

  Raises:
    ValueError: codes of the wrong shape/dtype, out of the vocabulary's range, or duplicate rows.
  """
  level_sizes = vocab.level_sizes if vocab is not None else None
  codes = _validate_codes(codes, level_sizes)
  if level_sizes is None:
    level_sizes = IdentifierVocab.from_codes(codes).level_sizes
  n, depth_l = codes.shape

  order = _lexicographic_order(codes, level_sizes)  # [N]
  srt = codes[order]  # [N, L]
  # new_prefix[i, l]: sorted row i starts a new distinct prefix of length l+1.
  differs = np.empty((n, depth_l), dtype=bool)
  differs[0] = True
  np.not_equal(srt[1:], srt[:-1], out=differs[1:])
  new_prefix = np.logical_or.accumulate(differs, axis=1)  # [N, L]
  if not new_prefix[:, -1].all():
    dup = int(np.flatnonzero(~new_prefix[:, -1])[0])
    a, b = sorted((int(order[dup - 1]), int(order[dup])))
    raise ValueError(f"duplicate identifiers: rows {a} and {b} both have codes {srt[dup].tolist()} "
                     f"({int((~new_prefix[:, -1]).sum())} duplicate rows in all); every identifier "
                     "must be unique (the counter level u exists to make them so)")

  num_nodes = [1]
  node_code = []  # depth 1..L
  row_start = []  # depth 1..L-1
  max_fanout = []
  starts_prev = None  # sorted-row index where each node of the previous depth begins
  for d in range(1, depth_l + 1):  # loop over levels only (L iterations), vectorised inside
    starts = np.flatnonzero(new_prefix[:, d - 1])  # [num_nodes_d]
    num_nodes.append(int(starts.size))
    node_code.append(srt[starts, d - 1].astype(np.int32))
    if d == 1:
      root_child = np.full((level_sizes[0],), -1, np.int32)
      root_child[node_code[0]] = np.arange(starts.size, dtype=np.int32)
      max_fanout.append(int(starts.size))
    else:
      # Parent (depth d-1 node) of each depth-d node: how many depth-(d-1) nodes began at or
      # before this node's first row, minus one.
      parent = np.searchsorted(starts_prev, starts, side="right") - 1  # [num_nodes_d]
      counts = np.bincount(parent, minlength=starts_prev.size)  # [num_nodes_{d-1}]
      rs = np.zeros((starts_prev.size + 1,), np.int32)
      np.cumsum(counts, out=rs[1:])
      row_start.append(rs)
      max_fanout.append(int(counts.max()))
    starts_prev = starts
  bias = None
  if leaf_bias is not None and np.asarray(leaf_bias).any():
    leaf_bias = np.asarray(leaf_bias, np.float32)
    if leaf_bias.shape != (n,) or not np.isfinite(leaf_bias).all():
      raise ValueError(f"leaf_bias: need finite float [{n}], got shape {leaf_bias.shape}")
    by_leaf = leaf_bias[order]  # [N] in sorted order: a depth-d node is a run of sorted rows
    bias = tuple(np.maximum.reduceat(by_leaf, np.flatnonzero(new_prefix[:, d - 1])).astype(np.float32)
                 for d in range(1, depth_l + 1))
  # Leaves are the sorted rows themselves (all identifiers are distinct).
  tables = TrieTables(
      root_child=root_child,
      row_start=tuple(row_start),
      node_code=tuple(node_code),
      leaf_row=order,
      level_sizes=tuple(int(s) for s in level_sizes),
      num_nodes=tuple(num_nodes),
      max_fanout=tuple(max_fanout),
      node_bias=bias)
  return tables.to_device() if device_put else tables


def build_trie_timed(codes: np.ndarray, vocab: IdentifierVocab | None = None
                     ) -> tuple[TrieTables, dict[str, Any]]:
  """``build_trie`` plus a diagnostics dict (build seconds, fan-out, memory)."""
  t0 = time.perf_counter()
  tables = build_trie(codes, vocab)
  stats = tables.summary()
  stats["build_s"] = time.perf_counter() - t0
  return tables, stats
