"""Constrained beam search over the identifier trie, fused with the decoder's KV cache.

The search always runs exactly ``L`` steps (identifiers are fixed length, no EOS). The loop over
levels is unrolled in Python because every level has its own static fan-out (and its own trie
tables); inside a step everything is a fixed-shape array op:

  step l, every beam sits on a trie node at depth l
    logits_bkv, cache = tokens_to_logits(last_tokens_bk, cache, l)        # the model, KV-cached
    logp_bkv          = log_softmax(logits_bkv)                           # over the whole vocab
    children_bkf      = row_start[node] + arange(max_fanout[l])          # CSR slots, padded
    cand_bkf          = score_bk + logp_bkv[offsets[l] + code[children]]  # only real children
    top-k over beam x fanout -> new beams, parent index
    reorder cache leaves, trie nodes and prefixes by parent

Step 0 uses the dense level-0 table (one live beam, the others start at -inf so no beam is
duplicated). Before step 0 every beam holds the same start token and an empty cache, so by
default (``DecodeConfig.single_beam_first_step``) the model runs step 0 on ONE beam (cache leaves
sliced to ``[batch, 1, ...]``) and the select step broadcasts its cache to all beams: the same
results for ``1/beam`` of step 0's model cost (about 18% of the decoder at L = 5, beam 10).
The per-step cost depends on ``beam * max_fanout[l]``, never on the number of
identifiers ``N``. Encoder outputs are not part of the state: the model closes over them.

Contract of the model step (``CARTNetwork.tokens_to_logits_fn`` in cart_jax/models/cart/network.py makes one):
  ``logits_bkv, new_cache = tokens_to_logits(tokens_bk, cache, step)``; every cache leaf has
  leading axes ``[batch, beam, ...]``. With ``single_beam_first_step`` the step-0 call gets
  ``beam = 1`` (a model that cannot take another beam width sets it to False).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from cart_jax.core.errors import CartError
from cart_jax.index.trie import TrieTables
from cart_jax.index.vocab import NUM_RESERVED, PAD_ID, START_ID

Cache = Any
TokensToLogits = Callable[[jax.Array, Cache, jax.Array], tuple[jax.Array, Cache]]
NEG_INF = -np.inf


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  """Beam search settings.

  Attributes:
    beam_size: number of beams kept per query at every step.
    n_results: number of identifiers returned per query (<= beam_size); they are the best beams
      after the last step, best first.
    single_beam_first_step: run the model's step 0 on one beam and broadcast its cache (all
      beams are identical before step 0); same results, less compute.
  """
  beam_size: int = 10
  n_results: int = 10
  single_beam_first_step: bool = True

  def __post_init__(self):
    if self.beam_size < 1:
      raise CartError(f"DecodeConfig.beam_size must be >= 1, got {self.beam_size}")
    if not 1 <= self.n_results <= self.beam_size:
      raise CartError(f"DecodeConfig.n_results must be in [1, beam_size={self.beam_size}], "
                      f"got {self.n_results}")


@flax.struct.dataclass
class BeamState:
  """Search state after a step (all leaves have leading axes [batch, beam]).

  Attributes:
    scores: float32 [batch, beam] summed log-probs; -inf marks a dead beam (no valid path).
    nodes: int32 [batch, beam] trie node at the current depth (0 for dead beams).
    codes: int32 [batch, beam, L] level-local codes chosen so far (-1 where not yet chosen/dead).
    last_tokens: int32 [batch, beam] global token id chosen at the previous step.
    cache: the decoder cache pytree, reordered along the beam axis.
  """
  scores: jax.Array
  nodes: jax.Array
  codes: jax.Array
  last_tokens: jax.Array
  cache: Cache


@flax.struct.dataclass
class DecodeResult:
  """Top identifiers per query, best first.

  Attributes:
    codes: int32 [batch, n_results, L] level-local codes; -1 for invalid results.
    tokens: int32 [batch, n_results, L] global token ids; PAD_ID for invalid results.
    scores: float32 [batch, n_results] log-probability of each identifier; -inf for invalid.
    rows: int32 [batch, n_results] row of the identifier in the index's codes; -1 for invalid.
    valid: bool [batch, n_results] False where fewer than n_results identifiers exist.
  """
  codes: jax.Array
  tokens: jax.Array
  scores: jax.Array
  rows: jax.Array
  valid: jax.Array


def level_offsets(level_sizes: tuple[int, ...]) -> np.ndarray:
  """int32 [L]: first global token id of each level (same layout as IdentifierVocab.offsets)."""
  return (NUM_RESERVED + np.concatenate([[0], np.cumsum(level_sizes)[:-1]])).astype(np.int32)


def _cache_batch_size(cache: Cache) -> int | None:
  leaves = jax.tree_util.tree_leaves(cache)
  return int(leaves[0].shape[0]) if leaves else None


def gather_beams(tree: Any, parent_bk: jax.Array) -> Any:
  """Reorders every leaf of ``tree`` along the beam axis (axis 1) by ``parent_bk`` int32 [batch, beam]."""
  def take(x):
    idx = parent_bk.reshape(parent_bk.shape + (1,) * (x.ndim - 2))  # [batch, beam, 1...]
    return jnp.take_along_axis(x, idx, axis=1, mode="clip")
  return jax.tree_util.tree_map(take, tree)


def _top_k_padded(cand_bm: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """``lax.top_k`` over the last axis that tolerates fewer than ``k`` candidates (pads with -inf)."""
  m = cand_bm.shape[-1]
  if m < k:
    pad = jnp.full(cand_bm.shape[:-1] + (k - m,), NEG_INF, cand_bm.dtype)
    cand_bm = jnp.concatenate([cand_bm, pad], axis=-1)  # [batch, k]
  return jax.lax.top_k(cand_bm, k)


def select_beams(state: BeamState, cand_bkf: jax.Array, child_bkf: jax.Array, code_bkf: jax.Array,
                 level: int, offset: int, beam: int) -> BeamState:
  """Top-k over beam x candidates, then reorders the state by parent beam.

  Args:
    state: the state before the step (cache already advanced by the model call).
    cand_bkf: float32 [batch, parents, fanout] candidate scores, -inf where not allowed;
      ``parents`` is 1 at step 0 (only beam 0 is live) and ``beam`` afterwards.
    child_bkf: int32 [batch, parents, fanout] trie node each candidate leads to.
    code_bkf: int32 [batch, parents, fanout] level-local code of each candidate.
    level: the level decided by this step.
    offset: first global token id of ``level``.
    beam: beam width.
  """
  batch, n_parents, fanout = cand_bkf.shape
  flat_scores, flat_idx = _top_k_padded(cand_bkf.reshape(batch, n_parents * fanout), beam)
  # Padded slots (only possible when n_parents * fanout < beam) point past the end: clip them.
  flat_idx = jnp.minimum(flat_idx, n_parents * fanout - 1)  # [batch, beam]
  alive = flat_scores > NEG_INF  # [batch, beam]
  parent = flat_idx // fanout  # [batch, beam]
  child = jnp.take_along_axis(child_bkf.reshape(batch, -1), flat_idx, axis=1)  # [batch, beam]
  code = jnp.take_along_axis(code_bkf.reshape(batch, -1), flat_idx, axis=1)  # [batch, beam]
  child = jnp.where(alive, child, 0)
  code = jnp.where(alive, code, -1)
  if n_parents == beam:
    cache = gather_beams(state.cache, parent)
    codes = gather_beams(state.codes, parent)  # [batch, beam, L]
  else:  # step 0: one parent (beam 0) for all new beams; the cache may hold that beam only
    cache = jax.tree_util.tree_map(
        lambda x: jnp.broadcast_to(x[:, :1], (batch, beam) + x.shape[2:]), state.cache)
    codes = state.codes
  codes = codes.at[:, :, level].set(code)  # [batch, beam, L]
  codes = jnp.where(alive[:, :, None], codes, -1)
  return BeamState(
      scores=flat_scores,
      nodes=child,
      codes=codes,
      last_tokens=jnp.where(alive, code + offset, PAD_ID).astype(jnp.int32),
      cache=cache)


def _initial_state(batch: int, beam: int, depth_l: int, cache: Cache) -> BeamState:
  """One live beam per query (score 0), the others -inf so step 0 yields no duplicates."""
  return BeamState(
      scores=jnp.full((batch, beam), NEG_INF, jnp.float32).at[:, 0].set(0.0),  # [batch, beam]
      nodes=jnp.zeros((batch, beam), jnp.int32),  # [batch, beam] trie node of each beam
      codes=jnp.full((batch, beam, depth_l), -1, jnp.int32),  # [batch, beam, L]
      last_tokens=jnp.full((batch, beam), START_ID, jnp.int32),  # [batch, beam]
      cache=cache)


def _model_step(tokens_to_logits: TokensToLogits, state: BeamState, level: int,
                config: DecodeConfig) -> tuple[jax.Array, Cache]:
  """The model call of one step; at step 0 optionally on beam 0 only (logits [batch, 1, vocab])."""
  if level == 0 and config.single_beam_first_step:
    cache0 = jax.tree_util.tree_map(lambda x: x[:, :1], state.cache)  # [batch, 1, ...]
    return tokens_to_logits(state.last_tokens[:, :1], cache0, jnp.int32(0))
  return tokens_to_logits(state.last_tokens, state.cache, jnp.int32(level))


def beam_search(tokens_to_logits: TokensToLogits, cache: Cache, trie: TrieTables,
                config: DecodeConfig, *, batch_size: int | None = None) -> DecodeResult:
  """Constrained beam search: returns the best ``n_results`` identifiers that exist in ``trie``.

  Pure and jittable (close over ``tokens_to_logits`` and ``config``; pass ``cache`` and ``trie``
  as arguments, the trie's fan-outs are static pytree metadata).

  Args:
    tokens_to_logits: the model step, see the module docstring.
    cache: initial decoder cache; every leaf [batch, beam, ...] with beam == config.beam_size.
    trie: the identifier trie (``build_trie``), on device.
    config: beam width and number of results.
    batch_size: needed only when the cache has no leaves.

  Returns:
    DecodeResult with [batch, n_results] results, best first. Results past the number of
    identifiers reachable are marked invalid (row -1, score -inf, codes -1), never filled with a
    made-up identifier. Valid results of one query are distinct identifiers.
  """
  beam = config.beam_size
  depth_l = trie.id_length
  offsets = level_offsets(trie.level_sizes)
  vocab_size = NUM_RESERVED + sum(trie.level_sizes)
  batch = batch_size if batch_size is not None else _cache_batch_size(cache)
  if batch is None:
    raise ValueError("beam_search: the cache has no leaves, pass batch_size")
  for leaf in jax.tree_util.tree_leaves(cache):
    if leaf.shape[:2] != (batch, beam):
      raise ValueError(f"beam_search: every cache leaf needs leading axes [batch={batch}, "
                       f"beam={beam}], found a leaf of shape {leaf.shape}")

  state = _initial_state(batch, beam, depth_l, cache)

  for level in range(depth_l):  # static trip count L; each level has its own static fan-out
    logits_bkv, new_cache = _model_step(tokens_to_logits, state, level, config)
    beams_run = 1 if level == 0 and config.single_beam_first_step else beam
    if logits_bkv.shape != (batch, beams_run, vocab_size):
      raise ValueError(f"beam_search: tokens_to_logits returned logits of shape {logits_bkv.shape}, "
                       f"expected [batch={batch}, beam={beams_run}, vocab={vocab_size}] for the trie's "
                       f"level sizes {trie.level_sizes} (build the trie with the model's "
                       "IdentifierVocab)")
    state = state.replace(cache=new_cache)
    logp_bkv = jax.nn.log_softmax(logits_bkv.astype(jnp.float32), axis=-1)  # [batch, beam, vocab]
    off = int(offsets[level])
    if level == 0:
      # Dense first level: one live beam (beam 0) looks at every level-0 code.
      size0 = trie.level_sizes[0]
      logp_bc = logp_bkv[:, 0, off:off + size0]  # [batch, K]
      valid_c = trie.root_child >= 0  # [K]
      cand = jnp.where(valid_c[None, :], logp_bc, NEG_INF)[:, None, :]  # [batch, 1, K]
      child = jnp.broadcast_to(trie.root_child[None, None, :], cand.shape)  # [batch, 1, K]
      code = jnp.broadcast_to(jnp.arange(size0, dtype=jnp.int32)[None, None, :], cand.shape)
    else:
      fanout = trie.max_fanout[level]
      row_start = trie.row_starts_at(level)  # [num_nodes_l + 1]
      next_code = trie.codes_at(level + 1)  # [num_nodes_{l+1}]
      start = row_start[state.nodes]  # [batch, beam]
      count = row_start[state.nodes + 1] - start  # [batch, beam]
      slot = jnp.arange(fanout, dtype=jnp.int32)  # [fanout]
      alive = state.scores > NEG_INF  # [batch, beam]
      valid = (slot[None, None, :] < count[:, :, None]) & alive[:, :, None]  # [batch, beam, fanout]
      child = jnp.where(valid, start[:, :, None] + slot, 0)  # [batch, beam, fanout]
      code = next_code[child]  # [batch, beam, fanout]
      logp = jnp.take_along_axis(logp_bkv, code + off, axis=-1)  # [batch, beam, fanout]
      cand = jnp.where(valid, state.scores[:, :, None] + logp, NEG_INF)  # [batch, beam, fanout]
    if trie.node_bias is not None:  # item priors: the change of the best offset below the beam
      step_bias = trie.node_bias[level][jnp.maximum(child, 0)]  # [batch, beam|1, fanout]
      if level > 0:
        step_bias = step_bias - trie.node_bias[level - 1][state.nodes][:, :, None]
      cand = jnp.where(cand > NEG_INF, cand + step_bias, NEG_INF)
    state = select_beams(state, cand, child, code, level, off, beam)

  n = config.n_results
  scores = state.scores[:, :n]  # [batch, n]  (top_k output is sorted, best first)
  valid = scores > NEG_INF  # [batch, n]
  codes = jnp.where(valid[:, :, None], state.codes[:, :n], -1)  # [batch, n, L]
  tokens = jnp.where(valid[:, :, None], codes + jnp.asarray(offsets), PAD_ID)  # [batch, n, L]
  rows = jnp.where(valid, trie.leaf_row[state.nodes[:, :n]], -1)  # [batch, n]
  return DecodeResult(codes=codes, tokens=tokens.astype(jnp.int32), scores=scores, rows=rows,
                      valid=valid)


def unconstrained_beam_search(tokens_to_logits: TokensToLogits, cache: Cache,
                              level_sizes: tuple[int, ...], config: DecodeConfig, *,
                              batch_size: int | None = None) -> DecodeResult:
  """The same search without the trie: every code of level l is allowed at step l.

  Results may be identifiers that do not exist (``rows`` is -1 throughout). Used to measure what
  the trie constraint costs on top of the decoder and the top-k.
  """
  beam = config.beam_size
  depth_l = len(level_sizes)
  offsets = level_offsets(level_sizes)
  batch = batch_size if batch_size is not None else _cache_batch_size(cache)
  if batch is None:
    raise ValueError("unconstrained_beam_search: the cache has no leaves, pass batch_size")
  state = _initial_state(batch, beam, depth_l, cache)
  for level in range(depth_l):
    logits_bkv, new_cache = _model_step(tokens_to_logits, state, level, config)
    state = state.replace(cache=new_cache)
    logp_bkv = jax.nn.log_softmax(logits_bkv.astype(jnp.float32), axis=-1)  # [batch, beam, vocab]
    off, size = int(offsets[level]), level_sizes[level]
    n_parents = 1 if level == 0 else beam
    logp = logp_bkv[:, :n_parents, off:off + size]  # [batch, parents, size]
    cand = state.scores[:, :n_parents, None] + logp  # [batch, parents, size]
    code = jnp.broadcast_to(jnp.arange(size, dtype=jnp.int32), cand.shape)  # [batch, parents, size]
    state = select_beams(state, cand, jnp.zeros_like(code), code, level, off, beam)
  n = config.n_results
  scores = state.scores[:, :n]
  valid = scores > NEG_INF
  codes = jnp.where(valid[:, :, None], state.codes[:, :n], -1)
  tokens = jnp.where(valid[:, :, None], codes + jnp.asarray(offsets), PAD_ID)
  return DecodeResult(codes=codes, tokens=tokens.astype(jnp.int32), scores=scores,
                      rows=jnp.full_like(state.nodes[:, :n], -1), valid=valid)


def score_tokens(tokens_to_logits: TokensToLogits, cache: Cache, tokens_bkl: jax.Array) -> jax.Array:
  """Teacher-forced log-probability of given identifiers: float32 [batch, k].

  Args:
    tokens_to_logits: the model step.
    cache: initial cache with leaves [batch, k, ...].
    tokens_bkl: int32 [batch, k, L] global token ids of the identifiers to score.

  Returns:
    The sum over the L steps of log_softmax(logits)[token] (the score beam search assigns).
  """
  depth_l = tokens_bkl.shape[-1]
  total = jnp.zeros(tokens_bkl.shape[:2], jnp.float32)  # [batch, k]
  prev = jnp.full(tokens_bkl.shape[:2], START_ID, jnp.int32)  # [batch, k]
  for level in range(depth_l):
    logits_bkv, cache = tokens_to_logits(prev, cache, jnp.int32(level))
    logp_bkv = jax.nn.log_softmax(logits_bkv.astype(jnp.float32), axis=-1)  # [batch, k, vocab]
    tok = tokens_bkl[:, :, level]  # [batch, k]
    total = total + jnp.take_along_axis(logp_bkv, tok[:, :, None], axis=-1)[:, :, 0]
    prev = tok
  return total
