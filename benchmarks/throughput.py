"""End-to-end retrieval throughput: CART (generative, beam 10) vs the dual tower, 1K to 1M items.

Run:
  python benchmarks/throughput.py --quick --json /tmp/tp_quick.json --plot /tmp/tp_quick.png   # < 3 min
  python benchmarks/throughput.py --json benchmarks/results/throughput_cpu.json \
      --plot benchmarks/results/throughput_cpu.png                                            # 2-core CPU
  python benchmarks/throughput.py --device gpu --json benchmarks/results/throughput_gpu.json \
      --plot benchmarks/results/throughput_gpu.png                                            # 1 GPU, < 5 min
  python benchmarks/throughput.py --compare_src /tmp/before --json benchmarks/results/throughput_cart_before_after_cpu.json
      # CART only, the cart_jax tree in /tmp/before vs this checkout, interleaved rounds

What one "query" is, on both sides (query text in, top-10 item rows out on the host):
  text --WordPiece (host, pure Python)--> int32 [B, 32] --> device program --> top-10 rows on host.
  The tokenizer is the same for both sides and is timed apart (``tokenize_ms_p50`` per batch,
  ``qps_incl_tokenize``); ``qps`` / ``p50_ms`` / ``p95_ms`` are ids-in -> rows-out-on-host.

Methods (each in its own subprocess, the same thread settings for all); the searchers are the
library's, built as ``cart eval`` and ``cart baseline`` build them:
  cart        CART ``minilm_small`` (MiniLM-L6 encoder, all 6 layers fused, 6-layer decoder d=384),
              random weights, searched by ``cart_jax.inference.searcher.CartSearcher`` (encoder once
              + constrained beam search, beam 10, 10 results) over the trie of the N identifiers; one
              searcher (trie and compiled program) per (N, batch), compile time reported per cell.
  dual_jax    the same MiniLM text tower (mean pool, L2) -> random projection 384 -> 1024, L2 ->
              ``cart_jax.inference.dual_tower.ExactSearcher`` (``cart baseline --method jax``): exact
              inner-product top-10 over N x 1024 item embeddings, chunks of 65536 rows (GPU 131072),
              ``query_batch`` = the batch; query tower and search are two jitted programs back to back.
  faiss_flat  the same query tower, then ``FaissSearcher`` flat (``cart baseline --method faiss-flat``,
              ``faiss.IndexFlatIP``, exact; CPU only).
  faiss_ivf   the same query tower, then ``FaissSearcher`` IVF (``cart baseline --method faiss-ivf``):
              ``IndexIVFFlat`` (inner product) with the library's nlist = min(4 sqrt(N), N / 39) and
              nprobe = 8, k-means on all N items (CPU only).

Identifiers (L = 5, the paper's shape with M = 3): (k, v1, v2, v3, u); k in K = 256 clusters with
skewed sizes (p ~ 1/(i + 8), like K-Means on real embeddings), v1..v3 uniform in C = 256 codes, u a
counter over colliding (k, v1..v3) (vocabulary 16). Random codes made unique, not learnt ones: the
search cost depends on the trie's shape (fan-out per level, recorded as ``max_fanout``), not on
what the codes mean. The decoder vocabulary (2 + 4 x 256 + 16 = 1042) is the same for every N.
Item embeddings: random normal, L2-normalised, float32 on the host, the same for every dual-tower
method (on the device in bfloat16 with ``--precision bf16``: ``ExactSearchConfig.dtype``).

Timing: the program is compiled ahead of time (``lower().compile()``, ``compile_s``), then warm-up
calls (3, or 1 when a call takes over 1 s), then timed calls with ``jax.block_until_ready`` until the
per-cell budget is spent (at least ``min_timed``, at most 20); p50 / p95 / min / max of the timed
calls, and the median process CPU time per call (``cpu_ms_p50``, all threads: the work done, less
sensitive than wall time to other jobs on a shared machine). A cell whose predicted call time
(``predict_call_s``: linear in B from a batch > 1, linear in N for the dual tower, flat in N for
CART) exceeds ``max_call_s`` is not run and is listed under ``skipped`` with the reason. The 1-minute load average is logged before and after each method and
with every row.

FLOPs per query (multiply-add = 2): CART from ``cart_jax.models.cart.flops.flops_per_query`` (src 32,
beam 10, L 5), less the 9 of 10 beams that step 0 no longer runs where the decoder has
``single_beam_first_step``; dual tower = MiniLM encoder (same counting rules) + 2 x 384 x 1024 projection
+ 2 x N x 1024 (exact) or 2 x nlist x 1024 + 2 x nprobe x (N / nlist) x 1024 (IVF, expected).
``achieved_tflops = flops_per_query * qps / 1e12``; ``peak_fraction`` divides by the device's
peak (CPU: a 2048^3 float32 matmul measured in the same run; GPU: the card's nominal dense peak for
the precision, and the measured matmul too).

Crossover N: for each dual-tower method and batch, the N where CART's queries/s passes it,
interpolated log-log between measured N ("none in range" if CART is slower at every N, "<= 1K" if
faster at every N).

``--device gpu``: the same script on one accelerator; bf16 by default (CART decoder activations and
weights, item embeddings and queries; the MiniLM towers stay float32 = TF32 on both sides), FAISS
skipped (a CPU library), shorter per-cell budgets so the whole run stays under 5 minutes.
It fails with a clear message when JAX sees no GPU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import types

import numpy as np

LEVEL_SIZES = (256, 256, 256, 256, 16)
ID_LEN = len(LEVEL_SIZES)
SRC_LEN = 32
ITEM_DIM = 1024
TOP_K = 10
METHODS = ("cart", "dual_jax", "faiss_flat", "faiss_ivf")
SEARCH_METHOD = {"dual_jax": "jax", "faiss_flat": "faiss-flat", "faiss_ivf": "faiss-ivf"}  # cart baseline --method
CPU_ONLY = ("faiss_flat", "faiss_ivf")
N_ALL = (1_000, 10_000, 100_000, 1_000_000)
B_ALL = (1, 100, 1000)
ROW_TAG = "@@ROW "
# Nominal dense peaks (TFLOP/s) by device kind substring: (bf16, tf32).
GPU_PEAKS = {"H100": (989.0, 494.0), "H200": (989.0, 494.0), "A100": (312.0, 156.0),
             "L4": (121.0, 60.0), "V100": (125.0, 15.7)}


# ----------------------------------------------------------------------------- pure helpers

def make_codes(n: int, seed: int = 0) -> np.ndarray:
  """int32 [n, 5] distinct identifiers (k, v1, v2, v3, u), deterministic in (n, seed)."""
  rng = np.random.default_rng(seed)
  p = 1.0 / (np.arange(LEVEL_SIZES[0]) + 8.0)
  k = rng.choice(LEVEL_SIZES[0], size=n, p=p / p.sum())
  v = rng.integers(0, LEVEL_SIZES[1], size=(n, ID_LEN - 2))
  base = np.concatenate([k[:, None], v], axis=1)  # [n, L-1]
  from cart_jax.index.identifiers import assign_counters  # the prefix-DB counter of build-ids
  u = assign_counters(base)  # [n] rank among rows with the same prefix
  if u.max() >= LEVEL_SIZES[-1]:
    raise RuntimeError(f"counter {u.max()} exceeds the u vocabulary {LEVEL_SIZES[-1]}")
  codes = np.concatenate([base, u[:, None]], axis=1).astype(np.int32)  # [n, L]
  return codes


def make_items(n: int, seed: int = 0, block: int = 65536) -> np.ndarray:
  """float32 [n, 1024] random unit-norm item embeddings, deterministic in (n, seed)."""
  parts = []
  for i, s in enumerate(range(0, n, block)):
    x = np.random.default_rng([seed, i]).standard_normal((min(block, n - s), ITEM_DIM), np.float32)
    parts.append(x / np.linalg.norm(x, axis=1, keepdims=True))
  return np.concatenate(parts)


def dual_searcher(method: str, items: np.ndarray, batch: int, *, dtype: str = "float32",
                  chunk_size: int = 65536):
  """The library searcher ``cart baseline --method`` builds for a dual-tower ``method``.

  FAISS keeps the library's defaults (IVF nlist ~ 4 sqrt N, nprobe 8, as ``cart baseline``); the
  exact JAX searcher gets ``query_batch = batch`` (no padded queries), ``chunk_size`` and ``dtype``
  through its config.
  """
  from cart_jax.inference.dual_tower import make_searcher  # pylint: disable=g-import-not-at-top
  if method == "dual_jax":
    return make_searcher("jax", items, TOP_K, chunk_size=chunk_size, query_batch=batch, dtype=dtype)
  return make_searcher(SEARCH_METHOD[method], items, TOP_K)


def dual_flops(n: int, encoder_flops: int, nlist: int | None = None, nprobe: int = 0) -> int:
  """Query tower + exact search over ``n`` items, or (with ``nlist``) the expected IVF search."""
  tower = encoder_flops + 2 * 384 * ITEM_DIM
  if nlist is None:
    return int(tower + 2 * n * ITEM_DIM)
  return int(tower + 2 * nlist * ITEM_DIM + 2 * nprobe * (n / nlist) * ITEM_DIM)


def crossover(cart: dict[int, float], dual: dict[int, float]) -> dict:
  """Where CART's queries/s passes a dual-tower method's (log-log interpolation in N).

  Args:
    cart, dual: N -> queries/s at one batch size.
  Returns:
    {"n": float | None, "status": str, "ratio": {N: cart / dual}}.
  """
  ns = sorted(set(cart) & set(dual))
  ratio = {n: cart[n] / dual[n] for n in ns}
  if not ns:
    return {"n": None, "status": "no common N measured", "ratio": {}}
  out = {"ratio": {str(n): round(r, 4) for n, r in ratio.items()}}
  if ratio[ns[0]] >= 1.0:
    return {"n": float(ns[0]), "status": f"CART faster at every measured N (from <= {ns[0]})", **out}
  for a, b in zip(ns[:-1], ns[1:]):
    if ratio[a] < 1.0 <= ratio[b]:
      la, lb = math.log(ratio[a]), math.log(ratio[b])
      frac = (0.0 - la) / (lb - la)
      n_star = math.exp(math.log(a) + frac * (math.log(b) - math.log(a)))
      return {"n": float(n_star), "status": "crossed", **out}
  return {"n": None, "status": f"none in range (CART/dual = {ratio[ns[-1]]:.3g} at N={ns[-1]})", **out}


def predict_call_s(done: dict[tuple[int, int], float], n: int, b: int, *, flat_in_n: bool = False,
                   skipped: set[tuple[int, int]] = frozenset(),
                   fixed_s: dict[int, float] | None = None) -> float | None:
  """Upper-bound guess of one call's seconds at (N, B) from measured cells; inf if a cheaper cell
  was already skipped; None when nothing measured says anything.

  Time is taken linear in B (from a batch > 1: batch 1 is latency-bound) and, for the dual tower,
  linear in N beyond ``fixed_s[b]`` (the measured query-tower seconds at batch b, which do not grow
  with N); CART's (``flat_in_n``) does not depend on N.
  """
  if any(nn == n and bb < b for (nn, bb) in skipped):
    return math.inf
  if not flat_in_n and any(bb == b and nn < n for (nn, bb) in skipped):
    return math.inf
  same_n = [bb for (nn, bb) in done if nn == n and 1 < bb < b]
  if same_n:
    bb = max(same_n)
    return done[(n, bb)] * b / bb
  if flat_in_n:
    same_b = [done[(nn, bb)] for (nn, bb) in done if bb == b]
    if same_b:
      return max(same_b)
    smaller = [(bb, done[(nn, bb)]) for (nn, bb) in done if 1 < bb < b]
    if smaller:
      bb, t = max(smaller)
      return t * b / bb
    return None
  smaller_n = [nn for (nn, bb) in done if bb == b and nn < n]
  if smaller_n:
    nn = max(smaller_n)
    fixed = min((fixed_s or {}).get(b, 0.0), done[(nn, b)])
    return fixed + (done[(nn, b)] - fixed) * n / nn
  return None


def make_texts(b: int, seed: int = 0) -> list[str]:
  """``b`` synthetic English-like queries of 8-20 words (deterministic)."""
  words = ("a photo of the small red dog cat running jumping on grass beach near water at night "
           "sunset city street with two people man woman child playing ball guitar piano bird "
           "flying over mountain snow tree forest car bus train station smiling face holding cup "
           "coffee blue green yellow old new big happy sad sound music video clip of loud quiet").split()
  rng = np.random.default_rng(seed)
  return [" ".join(rng.choice(words, size=int(rng.integers(8, 21)))) for _ in range(b)]



# ----------------------------------------------------------------------------- worker side

def _emit(rec: dict) -> None:
  sys.stdout.write(ROW_TAG + json.dumps(rec) + "\n")
  sys.stdout.flush()


def _log(msg: str) -> None:
  sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {msg}\n")
  sys.stderr.flush()


def _time_calls(call, budget_s: float, min_timed: int, max_timed: int = 20) -> dict:
  """Warm-up then timed calls of ``call`` (which blocks until its result is on the host)."""
  t0 = time.perf_counter()
  call()
  first = time.perf_counter() - t0
  n_warmup = 1
  while n_warmup < 3 and first < 1.0:
    call()
    n_warmup += 1
  n_timed = int(min(max_timed, max(min_timed, budget_s // max(first, 1e-6))))
  times, cpu = [], []
  for _ in range(n_timed):
    c0 = time.process_time()
    t0 = time.perf_counter()
    call()
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  times = np.asarray(times)
  return {"p50_s": float(np.median(times)), "p95_s": float(np.percentile(times, 95)),
          "min_s": float(times.min()), "max_s": float(times.max()), "n_warmup": n_warmup,
          "n_timed": n_timed, "cpu_s": float(np.median(cpu))}


def _tokenize_timing(tokenizer, b: int, reps: int = 3) -> tuple[np.ndarray, float]:
  texts = make_texts(b, seed=b)
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    ids, _ = tokenizer.encode_batch(texts, SRC_LEN)
    times.append(time.perf_counter() - t0)
  return ids, float(np.median(times))


def _machine_facts() -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  facts = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
           "jax": jax.__version__, "backend": jax.default_backend(), "device": dev.device_kind,
           "n_devices": jax.device_count()}
  # Measured matmul peak of this device (same thread settings as the methods).
  on_gpu = facts["backend"] != "cpu"
  size = 8192 if on_gpu else 2048
  peaks = {}
  for name, dt in (("float32", jnp.float32), ("bf16", jnp.bfloat16)):
    a = jnp.ones((size, size), dt)
    f = jax.jit(lambda x: x @ x)
    jax.block_until_ready(f(a))
    times = []
    for _ in range(5):
      t0 = time.perf_counter()
      jax.block_until_ready(f(a))
      times.append(time.perf_counter() - t0)
    peaks[name] = 2 * size ** 3 / float(np.median(times)) / 1e12
  facts["measured_matmul_tflops"] = {k: round(v, 4) for k, v in peaks.items()}
  nominal = None
  for key, (bf16, tf32) in GPU_PEAKS.items():
    if on_gpu and key in dev.device_kind:
      nominal = {"bf16": bf16, "float32": tf32}
  facts["nominal_peak_tflops"] = nominal
  return facts


def _query_tower(seed: int):
  """MiniLM (random weights) + projection 384 -> 1024: returns (state, proj, encode_fn)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from cart_jax.models.cart.layers import init_on_host  # pylint: disable=g-import-not-at-top
  from cart_jax.models.text.minilm import MiniLMEncoder, sentence_embedding  # pylint: disable=g-import-not-at-top

  encoder = init_on_host(nnx.eval_shape(lambda: MiniLMEncoder(rngs=nnx.Rngs(0))), seed)
  graphdef, state = nnx.split(encoder)
  proj = jnp.asarray(np.random.default_rng(seed).standard_normal((384, ITEM_DIM), np.float32) / np.sqrt(384))

  def encode(state, proj, ids):  # ids int32 [B, src]
    emb = sentence_embedding(nnx.merge(graphdef, state), ids, ids != 0)  # [B, 384]
    q = emb @ proj  # [B, 1024]
    return q / jnp.maximum(jnp.linalg.norm(q, axis=-1, keepdims=True), 1e-12)

  return state, proj, jax.jit(encode)


def worker(spec: dict) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from cart_jax.models.cart import config as mcfg  # pylint: disable=g-import-not-at-top
  from cart_jax.models.cart.flops import flops_per_query  # pylint: disable=g-import-not-at-top
  from cart_jax.models.text.tokenizer import WordPieceTokenizer  # pylint: disable=g-import-not-at-top

  method = spec["method"]
  if method == "probe":
    _emit({"kind": "machine", **_machine_facts()})
    return
  bf16 = spec["precision"] == "bf16"
  ns, batches = spec["n_items"], spec["batches"]
  tokenizer = WordPieceTokenizer.from_file()
  token_cache = {b: _tokenize_timing(tokenizer, b) for b in batches}  # b -> (ids, seconds)
  cart_cfg = mcfg.minilm_small(output_vocab_size=2 + sum(LEVEL_SIZES), dropout_rate=0.0,
                               dtype="bfloat16" if bf16 else "float32")
  cart_flops = flops_per_query(cart_cfg, src_len=SRC_LEN, beam=spec["beam"], id_length=ID_LEN)
  from cart_jax.inference.decoding import DecodeConfig  # pylint: disable=g-import-not-at-top
  if getattr(DecodeConfig(), "single_beam_first_step", False):  # step 0 runs one beam, not `beam`
    dec = cart_flops["decoder"]
    cart_flops["total"] -= int(dec * (spec["beam"] - 1) / (ID_LEN * spec["beam"]))
  done: dict[tuple[int, int], float] = {}

  skipped: set[tuple[int, int]] = set()
  tower_s: dict[int, float] = {}  # dual tower: query-tower seconds per batch (do not grow with N)

  def skip(n, b) -> bool:
    pred = predict_call_s(done, n, b, flat_in_n=method == "cart", skipped=skipped, fixed_s=tower_s)
    if pred is not None and pred > spec["max_call_s"]:
      skipped.add((n, b))
      why = ("a smaller batch or N was already skipped" if math.isinf(pred) else
             f"predicted {pred:.1f} s per call")
      _emit({"kind": "skipped", "method": method, "n_items": n, "batch": b,
             "reason": f"{why} > max_call_s {spec['max_call_s']} s"})
      return True
    return False

  def run_cell(n, b, call, compile_s, flops, extra):
    load_before = os.getloadavg()[0]
    t = _time_calls(call, spec["budget_s"], spec["min_timed"])
    done[(n, b)] = t["p50_s"]
    tok_s = token_cache[b][1]
    qps = b / t["p50_s"]
    row = {"kind": "row", "method": method, "variant": spec.get("variant", "current"),
           "n_items": n, "batch": b, "qps": qps, "p50_ms": 1e3 * t["p50_s"], "p95_ms": 1e3 * t["p95_s"],
           "min_ms": 1e3 * t["min_s"], "max_ms": 1e3 * t["max_s"], "n_warmup": t["n_warmup"],
           "n_timed": t["n_timed"], "cpu_ms_p50": 1e3 * t["cpu_s"], "qps_cpu": b / t["cpu_s"], "compile_s": compile_s, "flops_per_query": int(flops),
           "achieved_tflops": flops * qps / 1e12, "tokenize_ms_p50": 1e3 * tok_s,
           "qps_incl_tokenize": b / (t["p50_s"] + tok_s), "precision": spec["precision"],
           "load1_before": load_before, "load1_after": os.getloadavg()[0], **extra}
    _log(f"{method} N={n} B={b}: {qps:.1f} q/s (p50 {row['p50_ms']:.1f} ms, {t['n_timed']} calls)")
    _emit(row)

  if method == "cart":
    from cart_jax.index.vocab import IdentifierVocab  # pylint: disable=g-import-not-at-top
    from cart_jax.inference.searcher import CartSearcher  # pylint: disable=g-import-not-at-top
    from cart_jax.models.cart.network import create_model  # pylint: disable=g-import-not-at-top

    vocab = IdentifierVocab(LEVEL_SIZES)
    model = create_model(cart_cfg, seed=spec["seed"], host_init=True)
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    if bf16:  # decoder-side weight matrices stored in bf16 (the MiniLM encoder stays float32)
      params = jax.tree_util.tree_map_with_path(
          lambda p, x: x.astype(jnp.bfloat16) if x.ndim >= 2 and str(p[0]).find("encoder") < 0 else x,
          params)
    for n in ns:
      index = types.SimpleNamespace(codes=make_codes(n, spec["seed"]), vocab=vocab, n_items=n)
      for b in batches:
        if skip(n, b):
          continue
        searcher = None  # the previous cell's trie and program go first
        t0 = time.perf_counter()
        searcher = CartSearcher(graphdef, index, beam_size=spec["beam"], n_results=TOP_K,
                                input_length=SRC_LEN, batch_size=b)
        build_s = time.perf_counter() - t0
        compile_s = searcher.warm_up(params, frozen)
        _log(f"cart N={n} B={b}: compiled in {compile_s:.1f} s")

        def call(searcher=searcher, ids_np=token_cache[b][0]):
          return searcher.search_ids(params, frozen, ids_np)[0]

        run_cell(n, b, call, compile_s, cart_flops["total"],
                 {"max_fanout": [int(f) for f in searcher.trie.max_fanout],
                  "trie_build_s": round(build_s, 3), "compile_shared_across_n": False})
    return

  # dual tower
  enc_flops = flops_per_query(mcfg.minilm_small(), src_len=SRC_LEN)["encoder"]
  tower_state, proj, encode = _query_tower(spec["seed"])
  enc_compiled, enc_compile_s = {}, {}
  for b in batches:
    t0 = time.perf_counter()
    enc_compiled[b] = encode.lower(tower_state, proj, jax.ShapeDtypeStruct((b, SRC_LEN), jnp.int32)).compile()
    enc_compile_s[b] = time.perf_counter() - t0
    ids_dev = jnp.asarray(token_cache[b][0])
    jax.block_until_ready(enc_compiled[b](tower_state, proj, ids_dev))
    t0 = time.perf_counter()
    jax.block_until_ready(enc_compiled[b](tower_state, proj, ids_dev))
    tower_s[b] = time.perf_counter() - t0
  for n in ns:
    items = make_items(n, spec["seed"])
    searcher = None
    for b in batches:
      if skip(n, b):
        continue
      if searcher is None or method == "dual_jax":  # the JAX searcher's query batch is b
        searcher = None  # the previous batch's device copy goes first
        t0 = time.perf_counter()
        searcher = dual_searcher(method, items, b, dtype="bfloat16" if bf16 else "float32",
                                 chunk_size=spec["max_chunk"])
        build_s = time.perf_counter() - t0
        search_compile_s = searcher.warm_up()
      extra = {"build_s": round(build_s, 2)}
      nlist = getattr(searcher, "nlist", None)
      if nlist:
        extra.update(nlist=nlist, nprobe=int(searcher.index.nprobe))
      if method == "dual_jax":
        extra["chunk"] = searcher.chunk
      enc_fn = enc_compiled[b]

      def call(enc_fn=enc_fn, ids_np=token_cache[b][0], searcher=searcher):
        return searcher.search(np.asarray(enc_fn(tower_state, proj, jnp.asarray(ids_np))))[1]

      run_cell(n, b, call, enc_compile_s[b] + search_compile_s,
               dual_flops(n, enc_flops, nlist, extra.get("nprobe", 0)), extra)
    del items, searcher


# ----------------------------------------------------------------------------- parent side

def run_worker(spec: dict, env: dict, timeout_s: float) -> list[dict]:
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
  try:
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=None, text=True, timeout=timeout_s)
  except subprocess.TimeoutExpired as e:
    out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    recs = [json.loads(line[len(ROW_TAG):]) for line in out.splitlines() if line.startswith(ROW_TAG)]
    return recs + [{"kind": "skipped", "method": spec["method"], "n_items": None, "batch": None,
                    "reason": f"worker timed out after {timeout_s:.0f} s (cells after the last row not run)"}]
  recs = [json.loads(line[len(ROW_TAG):]) for line in proc.stdout.splitlines() if line.startswith(ROW_TAG)]
  if proc.returncode != 0:
    recs.append({"kind": "error", "method": spec["method"],
                 "reason": f"worker exited with status {proc.returncode} (see its stderr above)"})
  return recs


def summarise(rows: list[dict], peak: dict | None) -> dict:
  """Crossover N per dual method and batch; CART's flatness and achieved fraction of the peak.

  Everything is computed twice: from wall time (``qps``) and from process CPU time
  (``qps_cpu = B / cpu time per call``; the work done, steadier than wall time when other jobs
  share the machine).
  """
  cart = [r for r in rows if r["method"] == "cart"]
  out = {"crossover": {}, "crossover_cpu_time": {}, "cart_peak_fraction": {}}
  for method in sorted({r["method"] for r in rows} - {"cart"}):
    for b in sorted({r["batch"] for r in rows}):
      for key, field in (("crossover", "qps"), ("crossover_cpu_time", "qps_cpu")):
        c = {r["n_items"]: r[field] for r in cart if r["batch"] == b and field in r}
        d = {r["n_items"]: r[field] for r in rows if r["method"] == method and r["batch"] == b and field in r}
        if c and d:
          out[key][f"{method}@B{b}"] = crossover(c, d)
  if peak:
    for r in cart:
      out["cart_peak_fraction"][f"N{r['n_items']}@B{r['batch']}"] = round(r["achieved_tflops"] / peak["tflops"], 4)
    out["peak_used"] = peak
  for key, field in (("cart_flatness", "qps"), ("cart_flatness_cpu_time", "qps_cpu")):
    flat = {}
    for b in sorted({r["batch"] for r in cart}):
      q = {r["n_items"]: r[field] for r in cart if r["batch"] == b and field in r}
      if len(q) >= 2:
        flat[f"B{b}"] = {"min_over_max": round(min(q.values()) / max(q.values()), 3),
                         "within_10pct": min(q.values()) >= 0.9 * max(q.values())}
    out[key] = flat
  return out


def plot(report: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  colors = {"cart": "tab:blue", "dual_jax": "tab:red", "faiss_flat": "tab:orange", "faiss_ivf": "tab:green"}
  styles = {1: "o:", 100: "s-", 1000: "^--"}
  fig, ax = plt.subplots(figsize=(7.5, 5.0))
  rows = report["results"]
  for method in METHODS:
    for b in sorted({r["batch"] for r in rows}):
      pts = sorted((r["n_items"], r["qps"]) for r in rows if r["method"] == method and r["batch"] == b)
      if pts:
        ax.plot(*zip(*pts), styles.get(b, "x-"), color=colors[method], label=f"{method}, batch {b}")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("candidates N")
  ax.set_ylabel("queries / s (ids in -> top-10 rows out)")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  m = report["machine"]
  loads = [r["load1_before"] for r in rows if "load1_before" in r]
  load = f", 1-min load {min(loads):.1f}-{max(loads):.1f}" if loads else ""
  ax.set_title(f"CART minilm_small (beam 10) vs dual tower (MiniLM + d=1024 top-10)\n"
               f"{m['device']} ({m['backend']}, {m['cpu_count']} CPUs{load}), "
               f"{report['settings']['precision']}", fontsize=9)
  fig.tight_layout()
  from cart_jax.core.artefacts import atomic_write_via  # here: workers may import another cart_jax
  atomic_write_via(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))


def _table(rows: list[dict]) -> str:
  lines = ["| method | N | B | q/s | p50 ms | p95 ms | CPU ms/call | compile s | GFLOP/q | TFLOP/s |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in sorted(rows, key=lambda r: (METHODS.index(r["method"]), r["batch"], r["n_items"])):
    lines.append(f"| {r['method']} | {r['n_items']:,} | {r['batch']} | {r['qps']:,.1f} | {r['p50_ms']:.1f} | "
                 f"{r['p95_ms']:.1f} | {r.get('cpu_ms_p50', float('nan')):.0f} | {r['compile_s']:.1f} | "
                 f"{r['flops_per_query'] / 1e9:.2f} | {r['achieved_tflops']:.4f} |")
  return "\n".join(lines)


def _print_crossovers(report: dict) -> None:
  for key in ("crossover", "crossover_cpu_time"):
    for k, v in report["summary"].get(key, {}).items():
      print(f"{key} {k}: {v['status']}" + (f", N* = {v['n']:,.0f}" if v["n"] else ""))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--json", help="where to write the JSON report")
  ap.add_argument("--plot", help="where to write the PNG plot (queries/s vs N, log-log)")
  ap.add_argument("--quick", action="store_true",
                  help="N in {1K, 100K}, batch in {1, 100}, short budgets (< 3 min on 2 cores)")
  ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
  ap.add_argument("--precision", choices=("float32", "bf16"), default=None,
                  help="default: float32 on CPU, bf16 on GPU")
  ap.add_argument("--methods", default=None, help=f"comma list of {METHODS}")
  ap.add_argument("--n_items", default=None, help="comma list, overrides the sweep")
  ap.add_argument("--batches", default=None, help="comma list, overrides the sweep")
  ap.add_argument("--beam", type=int, default=10)
  ap.add_argument("--budget_s", type=float, default=None, help="timed seconds per cell")
  ap.add_argument("--max_call_s", type=float, default=None, help="skip cells predicted slower than this")
  ap.add_argument("--compare_src", default=None,
                  help="CART before/after: a directory holding an older cart_jax package; runs CART "
                       "from it and from this checkout in alternating rounds")
  ap.add_argument("--rounds", type=int, default=2, help="rounds of the --compare_src comparison")
  ap.add_argument("--from_json", default=None,
                  help="re-summarise (crossovers, flatness) and re-plot an existing report; measures nothing")
  ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.worker:
    worker(json.loads(args.worker))
    return 0
  if args.from_json:
    with open(args.from_json) as f:
      report = json.load(f)
    for r in report["results"]:
      if "cpu_ms_p50" in r:
        r["qps_cpu"] = r["batch"] / (r["cpu_ms_p50"] / 1e3)
    report["summary"] = summarise(report["results"], report.get("summary", {}).get("peak_used"))
    text = json.dumps(report, indent=1, default=float)
    from cart_jax.core.artefacts import atomic_write_text
    atomic_write_text(args.json or args.from_json, text + "\n")
    if args.plot:
      plot(report, args.plot)
    print(_table(report["results"]))
    _print_crossovers(report)
    return 0

  gpu = args.device == "gpu"
  precision = args.precision or ("bf16" if gpu else "float32")
  if args.quick:
    ns, batches = (1_000, 100_000), (1, 100)
  else:
    ns, batches = N_ALL, B_ALL
  if args.n_items:
    ns = tuple(int(float(x)) for x in args.n_items.split(","))
  if args.batches:
    batches = tuple(int(x) for x in args.batches.split(","))
  methods = tuple(args.methods.split(",")) if args.methods else (
      ("cart", "dual_jax") if gpu else METHODS)
  if args.compare_src:
    methods = ("cart",)
  bad = [m for m in methods if m not in METHODS]
  if bad:
    ap.error(f"--methods: unknown {bad}; expected some of {METHODS}")
  if gpu and any(m in CPU_ONLY for m in methods):
    ap.error(f"--device gpu: {sorted(set(methods) & set(CPU_ONLY))} run on the CPU only; leave them out")
  if any(n < 100 or n > 10_000_000 for n in ns) or any(b < 1 for b in batches):
    ap.error(f"--n_items must be in [100, 1e7] and --batches >= 1, got {ns} / {batches}")
  budget_s = args.budget_s or (1.0 if gpu else (2.0 if args.quick else 6.0))
  max_call_s = args.max_call_s or (5.0 if gpu else (8.0 if args.quick else 15.0))

  env = dict(os.environ)
  threads = str(os.cpu_count())
  for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    env.setdefault(var, threads)
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  if not gpu:
    env["JAX_PLATFORMS"] = "cpu"
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")

  t_start = time.perf_counter()
  probe = run_worker({"method": "probe"}, env, 300)
  machine = next((r for r in probe if r.get("kind") == "machine"), None)
  if machine is None:
    print("error: the probe subprocess could not start JAX (see its stderr above)", file=sys.stderr)
    return 2
  machine.pop("kind")
  if gpu and machine["backend"] not in ("gpu", "cuda", "rocm"):
    print(f"error: --device gpu but JAX sees no GPU (backend {machine['backend']!r}, device "
          f"{machine['device']!r}); run on a machine with a GPU and jax[cuda12], or use --device cpu",
          file=sys.stderr)
    return 2
  machine["load_avg_at_start"] = list(os.getloadavg())
  spec_common = {"n_items": list(ns), "batches": list(batches), "beam": args.beam, "precision": precision,
                 "budget_s": budget_s, "max_call_s": max_call_s, "min_timed": 3 if (gpu or not args.quick) else 2,
                 "seed": 0, "max_chunk": 131072 if gpu else 65536}
  worker_timeout = 290.0 if gpu else (600.0 if args.quick else 1500.0)

  runs = []  # (method, variant, env)
  if args.compare_src:
    src = os.path.abspath(args.compare_src)
    if not os.path.isfile(os.path.join(src, "cart_jax", "inference", "searcher.py")):
      ap.error(f"--compare_src {src}: expected a directory with cart_jax/inference/searcher.py inside")
    env_before = dict(env, PYTHONPATH=src + os.pathsep + env["PYTHONPATH"])
    for r in range(args.rounds):  # ABBA order: a drifting background load favours neither side
      pair = [("cart", "before", env_before), ("cart", "after", env)]
      runs += pair if r % 2 == 0 else pair[::-1]
  else:
    runs = [(m, "current", env) for m in methods]

  rows, skipped, errors, loads = [], [], [], []
  for i, (method, variant, wenv) in enumerate(runs):
    before = list(os.getloadavg())
    print(f"== {method} ({variant}), load {before[0]:.2f}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    recs = run_worker({**spec_common, "method": method, "variant": variant}, wenv, worker_timeout)
    for r in recs:
      kind = r.pop("kind")
      if args.compare_src:
        r["round"] = i // 2
      (rows if kind == "row" else skipped if kind == "skipped" else errors).append(r)
    loads.append({"method": method, "variant": variant, "load_before": before,
                  "load_after": list(os.getloadavg()), "wall_s": round(time.perf_counter() - t0, 1)})

  peak = None
  if machine["backend"] == "cpu":
    key = "bf16" if precision == "bf16" else "float32"
    peak = {"tflops": machine["measured_matmul_tflops"][key],
            "what": f"measured {key} 2048^3 matmul on this CPU, same thread settings"}
  elif machine.get("nominal_peak_tflops"):
    key = "bf16" if precision == "bf16" else "float32"
    peak = {"tflops": machine["nominal_peak_tflops"][key], "what": f"nominal dense {key} peak of {machine['device']}"}
  report = {
      "machine": machine,
      "command": " ".join([os.path.basename(sys.executable), "benchmarks/throughput.py"] + list(argv or sys.argv[1:])),
      "settings": {
          "precision": precision, "precision_note": (
              "float32 everywhere (CPU)" if precision == "float32" and not gpu else
              "float32 matmuls run as TF32 on NVIDIA GPUs" if precision == "float32" else
              "bf16: CART decoder weights/activations, item embeddings, queries; MiniLM towers float32"),
          "beam": args.beam, "top_k": TOP_K, "id_length": ID_LEN, "level_sizes": list(LEVEL_SIZES),
          "src_len": SRC_LEN, "item_dim": ITEM_DIM, "cart_model": "minilm_small (random weights)",
          "codes": "random unique (k skewed over 256, v1..v3 uniform over 256, u counter < 16)",
          "ivf": "cart baseline --method faiss-ivf: nlist = min(4 sqrt N, N/39), nprobe 8, k-means on all N items",
          "timing": "ids in -> top-10 rows on host; tokenisation timed apart (tokenize_ms_p50)",
          "budget_s": budget_s, "max_call_s": max_call_s, "n_items": list(ns), "batches": list(batches),
          "threads_env": {k: env.get(k) for k in ("OMP_NUM_THREADS", "XLA_FLAGS", "JAX_PLATFORMS")}},
      "results": rows, "skipped": skipped, "errors": errors, "load_per_method": loads,
      "wall_s": round(time.perf_counter() - t_start, 1)}
  if args.compare_src:
    cmp = {}
    for (n, b) in sorted({(r["n_items"], r["batch"]) for r in rows}):
      q = {v: [r["qps"] for r in rows if r["variant"] == v and r["n_items"] == n and r["batch"] == b]
           for v in ("before", "after")}
      if q["before"] and q["after"]:
        mb, ma = statistics.median(q["before"]), statistics.median(q["after"])
        cpu = {v: statistics.median([r["cpu_ms_p50"] for r in rows if r["variant"] == v and
                                     r["n_items"] == n and r["batch"] == b]) for v in ("before", "after")}
        cmp[f"N{n}@B{b}"] = {"before_qps": [round(x, 2) for x in q["before"]],
                             "after_qps": [round(x, 2) for x in q["after"]],
                             "speedup_of_medians": round(ma / mb, 3),
                             "before_cpu_ms_per_call": round(cpu["before"], 1),
                             "after_cpu_ms_per_call": round(cpu["after"], 1),
                             "cpu_time_ratio_before_over_after": round(cpu["before"] / cpu["after"], 3)}
    report["before_after"] = cmp
    report["compare_src"] = os.path.abspath(args.compare_src)
  else:
    report["summary"] = summarise(rows, peak)
  text = json.dumps(report, indent=1, default=float)
  if args.json:
    from cart_jax.core.artefacts import atomic_write_text
    atomic_write_text(args.json, text + "\n")
  if args.plot and not args.compare_src and rows:
    plot(report, args.plot)
  print(_table(rows) if not args.compare_src else json.dumps(report["before_after"], indent=1))
  if not args.compare_src:
    _print_crossovers(report)
  for s in skipped:
    print(f"skipped {s['method']} N={s['n_items']} B={s['batch']}: {s['reason']}")
  for e in errors:
    print(f"ERROR {e['method']}: {e['reason']}", file=sys.stderr)
  print(f"wall {report['wall_s']:.0f} s", file=sys.stderr)
  return 1 if errors else 0


if __name__ == "__main__":
  sys.exit(main())
