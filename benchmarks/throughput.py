"""End-to-end retrieval throughput and memory: CART's accurate recipe (with and without re-ranking)
vs every dual-tower search, 1K to 10M items, with recall on a real corpus next to speed.

Run:
  python benchmarks/throughput.py --quick --json /tmp/tp_quick.json --plot /tmp/tp_quick.png   # < 3 min
  cart demo --workdir /tmp/demo-emoji     # a real corpus + trained run for the recall side (optional)
  python benchmarks/throughput.py --quality_workdir /tmp/demo-emoji \
      --json benchmarks/results/throughput_cpu.json --plot benchmarks/results/throughput_cpu.png  # 2-core CPU
  python benchmarks/throughput.py --device gpu --json benchmarks/results/throughput_gpu.json \
      --plot benchmarks/results/throughput_gpu.png                                            # 1 GPU, < 5 min
  python benchmarks/throughput.py --compare_src /tmp/before --json benchmarks/results/throughput_cart_before_after_cpu.json
      # CART only, the cart_jax tree in /tmp/before vs this checkout, interleaved rounds

What one "query" is, on both sides (query text in, top-10 item rows out on the host):
  text --WordPiece (host)--> int32 [B, 32] --> device program(s) --> top-10 rows on host.
  The tokenizer is the same for both sides and is timed apart (``tokenize_ms_p50`` per batch,
  ``qps_incl_tokenize``); ``qps`` / ``p50_ms`` / ``p95_ms`` are ids-in -> rows-out-on-host.

Methods (each in its own subprocess, the same thread settings for all; CART one process per N so
each N's resident memory is its own); the searchers are the library's, built as ``cart eval`` and
``cart baseline`` build them:
  cart        the accurate recipe's network, ``--cart_model minilm_frozen`` (frozen MiniLM-L6
              encoder, all layers fused into a 2-layer decoder d=256; ``minilm_small``: the earlier
              6-layer d=384 decoder), random weights, searched by
              ``cart_jax.inference.searcher.CartSearcher`` (encoder once + constrained beam search,
              beam 10, 10 results) over the trie of the N identifiers; one searcher (trie and
              compiled program) per (N, batch), compile time reported per cell.
  cart_rerank the same search returning all 10 beams and the query's MiniLM sentence embedding from
              the same call, then ``Reranker.rerank`` (``cart eval --rerank``): the text projection
              384 -> 1024 and the cosine with the beams' item rows, read from an N x 1024 float32
              ``.npy`` memory map as ``rerank.load`` opens ``MODEL_DIR/rerank/items.npy``.
  dual_jax    the same MiniLM text tower (mean pool, L2) -> random projection 384 -> 1024, L2 ->
              ``cart_jax.inference.dual_tower.ExactSearcher`` (``cart baseline --method jax``): exact
              inner-product top-10 over N x 1024 item embeddings, chunks of 65536 rows (GPU 131072),
              ``query_batch`` = the batch; query tower and search are two jitted programs back to back.
  faiss_flat  the same query tower, then ``FaissSearcher`` flat (``cart baseline --method faiss-flat``,
              ``faiss.IndexFlatIP``, exact; CPU only).
  faiss_ivf   the same query tower, then ``FaissSearcher`` IVF (``cart baseline --method faiss-ivf``):
              ``IndexIVFFlat`` (inner product) with the library's nlist = min(4 sqrt(N), N / 39),
              k-means on all N items (trained once per N and kept in ``--scratch``); timed at the
              library's nprobe = 8 at every batch and over an nprobe sweep at ``--sweep_batch``.

Recall next to speed (``--quality_workdir W``, a ``cart demo --workdir W`` directory): R@1/5/10 of
CART and CART + rerank (``cart eval --rerank``), the exact dual tower and FAISS IVF at every nprobe
(``cart baseline``) on W's test queries, with W's own item vectors. The nprobe at which IVF's R@10
first reaches CART + rerank's is carried to every N as the same fraction of nlist (an assumption:
IVF's recall at a given share of cells probed; stated with the results), and the IVF sweep at each
N runs at the real corpus's fractions, so every timed IVF point has a measured recall.

Memory: every row has the process's resident set after its timed calls (``rss_mb``, anonymous and
file-backed parts, peak) and the search structure's bytes (``memory``: CART's trie tables, codes
and network; the dual tower's device matrix or IVF index and the host copy). An N whose item
matrix would not fit twice in the memory available is skipped with that reason.

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
METHODS = ("cart", "cart_rerank", "dual_jax", "faiss_flat", "faiss_ivf")
CART_METHODS = ("cart", "cart_rerank")
SEARCH_METHOD = {"dual_jax": "jax", "faiss_flat": "faiss-flat", "faiss_ivf": "faiss-ivf"}  # cart baseline --method
CPU_ONLY = ("faiss_flat", "faiss_ivf")
N_ALL = (1_000, 10_000, 100_000, 1_000_000, 10_000_000)
NPROBES = (1, 2, 4, 8, 16, 32, 64, 128)  # IVF's recall/speed curve (at the sweep batch)
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


def rows_file(n: int, seed: int, scratch: str) -> str:
  """``make_items(n, seed)`` as an ``.npy`` file in ``scratch`` (written once, block by block, then
  reused): the re-ranking rows as ``cart eval --rerank`` keeps them, ``MODEL_DIR/rerank/items.npy``."""
  path = os.path.join(scratch, f"rows-n{n}-d{ITEM_DIM}-seed{seed}.npy")
  if os.path.exists(path):
    return path
  os.makedirs(scratch, exist_ok=True)
  tmp = path + ".part"
  out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, ITEM_DIM))
  block = 65536
  for i, s in enumerate(range(0, n, block)):
    x = np.random.default_rng([seed, i]).standard_normal((min(block, n - s), ITEM_DIM), np.float32)
    out[s:s + x.shape[0]] = x / np.linalg.norm(x, axis=1, keepdims=True)
  out.flush()
  del out
  os.replace(tmp, path)
  return path


def rss_mb() -> dict:
  """This process's resident memory (MB) from /proc/self/status: total, anonymous, file-backed."""
  out = {}
  try:
    with open("/proc/self/status") as f:
      for line in f:
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
          out[{"VmRSS": "rss_mb", "RssAnon": "rss_anon_mb", "RssFile": "rss_file_mb",
               "VmHWM": "rss_peak_mb"}[key]] = int(rest.split()[0]) / 1024
  except OSError:
    pass
  return out


def mem_available_bytes() -> int | None:
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    return None
  return None


def tree_bytes(tree) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return int(sum(getattr(x, "nbytes", 0) for x in jax.tree_util.tree_leaves(tree)))


def dual_searcher(method: str, items: np.ndarray, batch: int, *, dtype: str = "float32",
                  chunk_size: int = 65536, ivf_cache: str | None = None):
  """The library searcher ``cart baseline --method`` builds for a dual-tower ``method``.

  FAISS keeps the library's defaults (IVF nlist ~ 4 sqrt N, nprobe 8, as ``cart baseline``); the
  exact JAX searcher gets ``query_batch = batch`` (no padded queries), ``chunk_size`` and ``dtype``
  through its config.
  """
  from cart_jax.inference.dual_tower import make_searcher  # pylint: disable=g-import-not-at-top
  if method == "dual_jax":
    return make_searcher("jax", items, TOP_K, chunk_size=chunk_size, query_batch=batch, dtype=dtype)
  if method == "faiss_ivf" and ivf_cache:  # k-means over 1M x 1024 takes minutes: train once per (N, seed)
    import faiss  # pylint: disable=g-import-not-at-top
    from cart_jax.inference.dual_tower import FaissConfig, FaissSearcher  # pylint: disable=g-import-not-at-top
    if os.path.exists(ivf_cache):
      searcher = FaissSearcher.__new__(FaissSearcher)
      searcher.config, searcher.d = FaissConfig(k=TOP_K, index="ivf"), items.shape[1]
      searcher.index = faiss.read_index(ivf_cache)
      searcher.nlist = int(searcher.index.nlist)
      with open(ivf_cache + ".json") as f:
        searcher.build_s = json.load(f)["build_s"]  # k-means + add, when it was trained
      return searcher
    t0 = time.perf_counter()
    searcher = make_searcher("faiss-ivf", items, TOP_K)
    searcher.build_s = time.perf_counter() - t0
    faiss.write_index(searcher.index, ivf_cache + ".part")
    with open(ivf_cache + ".json.part", "w") as f:
      json.dump({"build_s": searcher.build_s, "load1": os.getloadavg()[0]}, f)
    os.replace(ivf_cache + ".json.part", ivf_cache + ".json")
    os.replace(ivf_cache + ".part", ivf_cache)
    return searcher
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


def ivf_nlist(n: int) -> int:
  """The library's IVF cell count for ``n`` items (``FaissConfig.nlist = None``)."""
  from cart_jax.inference.dual_tower import default_nlist  # pylint: disable=g-import-not-at-top
  return default_nlist(n)


def quality_paths(workdir: str) -> dict:
  """The parts of a ``cart demo --workdir W`` directory the quality pass reads."""
  emb = sorted(f for f in os.listdir(os.path.join(workdir, "emb")) if f.endswith(".npy"))
  if not emb or not os.path.isfile(os.path.join(workdir, "cart", "run.json")):
    raise SystemExit(f"--quality_workdir {workdir}: expected a `cart demo --workdir` directory "
                     f"(emb/*.npy, corpus/, cart/run.json)")
  return {"model_dir": os.path.join(workdir, "cart"), "corpus": os.path.join(workdir, "corpus"),
          "embeddings": os.path.join(workdir, "emb", emb[0])}


def quality(spec: dict) -> dict:
  """Recall on a real corpus, as ``cart eval --rerank`` and ``cart baseline`` measure it.

  CART and CART + rerank from the run's test split; the dual tower's exact search (FAISS flat)
  and FAISS IVF at every ``nprobe`` of the sweep (the library's nlist for that N) on the same
  queries with the same item vectors (the run's ``cart embed`` output, whose text tower is what
  the re-ranker uses).
  """
  from cart_jax import api  # pylint: disable=g-import-not-at-top
  paths = quality_paths(spec["quality_workdir"])
  pick = lambda m: {k: m[k] for k in ("r@1", "r@5", "r@10", "mrr@10")}
  ev = api.evaluate(paths["model_dir"], split="test", rerank=True, log=_log)
  with open(os.path.join(paths["corpus"], "corpus.json")) as f:
    corpus_name = json.load(f).get("name", "the real corpus")
  out = {**paths, "corpus_name": corpus_name, "split": "test", "num_items": ev["num_items"],
         "num_queries": ev["num_queries"],
         "cart": pick(ev), "cart_rerank": pick(ev["rerank"]), "rerank_weight": ev["rerank"].get("weight")}
  _log(f"quality: CART R@10 {ev['r@10']:.4f}, + rerank R@10 {ev['rerank']['r@10']:.4f}")
  base = lambda **o: api.baseline(paths["embeddings"], paths["corpus"], split="test", **o)
  out["dual_exact"] = pick(base(method="faiss-flat"))
  nlist = ivf_nlist(out["num_items"])
  sweep = []
  for p in sorted({p for p in spec["nprobes"] if p < nlist} | {nlist}):
    m = base(method="faiss-ivf", nprobe=p)
    sweep.append({"nprobe": p, "nlist": m.get("faiss_ivf", {}).get("nlist", nlist), **pick(m)})
    _log(f"quality: IVF nprobe {p}/{nlist}: R@10 {m['r@10']:.4f}")
  out["ivf"] = sweep
  out["nlist"] = nlist
  return out


def matched_fraction(q: dict) -> dict:
  """The smallest ``nprobe / nlist`` at which IVF's R@10 reaches CART + rerank's on the real corpus."""
  target = q["cart_rerank"]["r@10"]
  for row in q["ivf"]:
    if row["r@10"] >= target:
      return {"target_r@10": target, "nprobe": row["nprobe"], "nlist": row["nlist"],
              "fraction": row["nprobe"] / row["nlist"], "ivf_r@10": row["r@10"], "reached": True}
  last = q["ivf"][-1]
  return {"target_r@10": target, "nprobe": last["nprobe"], "nlist": last["nlist"], "fraction": 1.0,
          "ivf_r@10": last["r@10"], "reached": False}


def worker(spec: dict) -> None:
  import gc  # pylint: disable=g-import-not-at-top
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
  if method == "quality":
    _emit({"kind": "quality", **quality(spec)})
    return
  bf16 = spec["precision"] == "bf16"
  ns, batches = spec["n_items"], spec["batches"]
  tokenizer = WordPieceTokenizer.from_file()
  token_cache = {b: _tokenize_timing(tokenizer, b) for b in batches}  # b -> (ids, seconds)
  cart_cfg = mcfg.get_config(spec["cart_model"], output_vocab_size=2 + sum(LEVEL_SIZES),
                             dropout_rate=0.0, dtype="bfloat16" if bf16 else "float32")
  cart_flops = flops_per_query(cart_cfg, src_len=SRC_LEN, beam=spec["beam"], id_length=ID_LEN)
  from cart_jax.inference.decoding import DecodeConfig  # pylint: disable=g-import-not-at-top
  if getattr(DecodeConfig(), "single_beam_first_step", False):  # step 0 runs one beam, not `beam`
    dec = cart_flops["decoder"]
    cart_flops["total"] -= int(dec * (spec["beam"] - 1) / (ID_LEN * spec["beam"]))
  done: dict[tuple[int, int], float] = {}

  skipped: set[tuple[int, int]] = set()
  tower_s: dict[int, float] = {}  # dual tower: query-tower seconds per batch (do not grow with N)

  def skip_reason(n, b) -> str | None:
    pred = predict_call_s(done, n, b, flat_in_n=method in CART_METHODS, skipped=skipped, fixed_s=tower_s)
    if pred is not None and pred > spec["max_call_s"]:
      return ("a smaller batch or N was already skipped" if math.isinf(pred) else
              f"predicted {pred:.1f} s per call") + f" > max_call_s {spec['max_call_s']} s"
    return None

  def skip(n, b, reason=None) -> bool:
    reason = reason or skip_reason(n, b)
    if reason:
      skipped.add((n, b))
      _emit({"kind": "skipped", "method": method, "n_items": n, "batch": b, "reason": reason})
      return True
    return False

  def skip_every_batch(n) -> bool:
    """True (each batch listed as skipped) when no batch of this N would run: skip its set-up."""
    if all(skip_reason(n, b) for b in batches):
      for b in batches:
        skip(n, b)
      return True
    return False

  def run_cell(n, b, call, compile_s, flops, extra):
    load_before = os.getloadavg()[0]
    t = _time_calls(call, spec["budget_s"], spec["min_timed"])
    done[(n, b)] = t["p50_s"]
    tok_s = token_cache[b][1]
    qps = b / t["p50_s"]
    gc.collect()
    row = {"kind": "row", "method": method, "variant": spec.get("variant", "current"),
           "n_items": n, "batch": b, "qps": qps, "p50_ms": 1e3 * t["p50_s"], "p95_ms": 1e3 * t["p95_s"],
           "min_ms": 1e3 * t["min_s"], "max_ms": 1e3 * t["max_s"], "n_warmup": t["n_warmup"],
           "n_timed": t["n_timed"], "cpu_ms_p50": 1e3 * t["cpu_s"], "qps_cpu": b / t["cpu_s"],
           "compile_s": compile_s, "flops_per_query": int(flops),
           "achieved_tflops": flops * qps / 1e12, "tokenize_ms_p50": 1e3 * tok_s,
           "qps_incl_tokenize": b / (t["p50_s"] + tok_s), "precision": spec["precision"],
           "load1_before": load_before, "load1_after": os.getloadavg()[0], **rss_mb(), **extra}
    _log(f"{method} N={n} B={b}{' nprobe=' + str(extra['nprobe']) if 'nprobe' in extra else ''}: "
         f"{qps:.1f} q/s (p50 {row['p50_ms']:.1f} ms, {t['n_timed']} calls, RSS {row.get('rss_mb', 0):.0f} MB)")
    _emit(row)

  if method in CART_METHODS:
    from cart_jax.index.vocab import IdentifierVocab  # pylint: disable=g-import-not-at-top
    from cart_jax.inference import rerank as rerank_lib  # pylint: disable=g-import-not-at-top
    from cart_jax.inference.searcher import CartSearcher  # pylint: disable=g-import-not-at-top
    from cart_jax.models.cart.network import create_model  # pylint: disable=g-import-not-at-top

    vocab = IdentifierVocab(LEVEL_SIZES)
    model = create_model(cart_cfg, seed=spec["seed"], host_init=True)
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    del model
    if bf16:  # decoder-side weight matrices stored in bf16 (the MiniLM encoder stays float32)
      params = jax.tree_util.tree_map_with_path(
          lambda p, x: x.astype(jnp.bfloat16) if x.ndim >= 2 and str(p[0]).find("encoder") < 0 else x,
          params)
    model_bytes = tree_bytes(params) + tree_bytes(frozen)
    rng = np.random.default_rng(spec["seed"])
    kernel = (rng.standard_normal((rerank_lib.TEXT_DIM, ITEM_DIM)) / np.sqrt(rerank_lib.TEXT_DIM)).astype(np.float32)
    rerank = method == "cart_rerank"
    for n in ns:
      if skip_every_batch(n):
        continue
      gc.collect()
      rss0 = rss_mb()
      index = types.SimpleNamespace(codes=make_codes(n, spec["seed"]), vocab=vocab, n_items=n)
      reranker, rows_s = None, 0.0
      if rerank:  # the rows stay in their file: only the beams' rows are read (rerank.load does the same)
        t0 = time.perf_counter()
        path = rows_file(n, spec["seed"], spec["scratch"])
        rows_s = time.perf_counter() - t0
        reranker = rerank_lib.Reranker(items=np.load(path, mmap_mode="r"), kernel=kernel,
                                       bias=np.zeros(ITEM_DIM, np.float32), weight=1.0)
      searcher = None
      for b in batches:
        if skip(n, b):
          continue
        searcher = None  # the previous cell's trie and program go first
        gc.collect()
        t0 = time.perf_counter()
        searcher = CartSearcher(graphdef, index, beam_size=spec["beam"], n_results=TOP_K,
                                input_length=SRC_LEN, batch_size=b)
        build_s = time.perf_counter() - t0
        compile_s = searcher.warm_up(params, frozen, beams=rerank)
        _log(f"{method} N={n} B={b}: compiled in {compile_s:.1f} s")

        def call(searcher=searcher, ids_np=token_cache[b][0]):
          return searcher.search_ids(params, frozen, ids_np, rerank=reranker)[0]

        trie_bytes = tree_bytes(searcher.trie)
        run_cell(n, b, call, compile_s, cart_flops["total"] + (2 * 384 * ITEM_DIM + 2 * spec["beam"] * ITEM_DIM
                                                               if rerank else 0),
                 {"max_fanout": [int(f) for f in searcher.trie.max_fanout],
                  "trie_build_s": round(build_s, 3), "compile_shared_across_n": False,
                  "memory": {"trie_mb": trie_bytes / 2**20, "codes_mb": index.codes.nbytes / 2**20,
                             "model_mb": model_bytes / 2**20,
                             "rerank_rows_file_mb": (n * ITEM_DIM * 4 / 2**20) if rerank else 0.0,
                             "rss_before_index_mb": rss0.get("rss_mb")},
                  **({"rows_file_s": round(rows_s, 1)} if rerank else {})})
      del index, reranker, searcher
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
    # The item matrix: once on the host (make_items), once more in the searcher (JAX's device copy,
    # FAISS's own storage). Skip an N whose two copies would not fit in the memory available now.
    need = 2 * n * ITEM_DIM * 4
    avail = mem_available_bytes()
    if avail is not None and need > 0.9 * avail:
      for b in batches:
        skip(n, b, f"the {n:,} x {ITEM_DIM} float32 matrix twice (host + index, {need / 2**30:.1f} GiB) "
                   f"does not fit in the {avail / 2**30:.1f} GiB available")
      continue
    if skip_every_batch(n):
      continue
    gc.collect()
    rss0 = rss_mb()
    items = make_items(n, spec["seed"])
    searcher = None
    for b in batches:
      if skip(n, b):
        continue
      if searcher is None or method == "dual_jax":  # the JAX searcher's query batch is b
        searcher = None  # the previous batch's device copy goes first
        gc.collect()
        t0 = time.perf_counter()
        cache = (os.path.join(spec["scratch"], f"ivf-n{n}-d{ITEM_DIM}-seed{spec['seed']}.faiss")
                 if method == "faiss_ivf" else None)
        if cache:
          os.makedirs(spec["scratch"], exist_ok=True)
        searcher = dual_searcher(method, items, b, dtype="bfloat16" if bf16 else "float32",
                                 chunk_size=spec["max_chunk"], ivf_cache=cache)
        build_s = getattr(searcher, "build_s", time.perf_counter() - t0)
        search_compile_s = searcher.warm_up()
      nlist = getattr(searcher, "nlist", None)
      if method == "dual_jax":
        index_bytes = tree_bytes(searcher.items)
      elif nlist:  # IVF-flat: every vector + its id, and the centroids
        index_bytes = n * (ITEM_DIM * 4 + 8) + nlist * ITEM_DIM * 4
      else:
        index_bytes = n * ITEM_DIM * 4
      enc_fn = enc_compiled[b]

      def call(enc_fn=enc_fn, ids_np=token_cache[b][0], searcher=searcher):
        return searcher.search(np.asarray(enc_fn(tower_state, proj, jnp.asarray(ids_np))))[1]

      probes = [None]
      if nlist:
        default = int(searcher.index.nprobe)
        # With a real corpus: its sweep's nprobe / nlist fractions carried to this N.
        sweep = {min(int(p), nlist) for p in spec.get("nprobe_by_n", {}).get(str(n), spec["nprobes"])
                 if p <= nlist or "nprobe_by_n" in spec}
        probes = sorted({default} | (sweep if b == spec["sweep_batch"] else set()))
      for p in probes:
        extra = {"build_s": round(build_s, 2),
                 "memory": {"index_mb": index_bytes / 2**20, "host_matrix_mb": items.nbytes / 2**20,
                            "rss_before_index_mb": rss0.get("rss_mb")}}
        if nlist:
          searcher.index.nprobe = p
          extra.update(nlist=nlist, nprobe=p, nprobe_default=p == default)
        if method == "dual_jax":
          extra["chunk"] = searcher.chunk
        run_cell(n, b, call, enc_compile_s[b] + search_compile_s,
                 dual_flops(n, enc_flops, nlist, p or 0), extra)
        if nlist:
          searcher.index.nprobe = default
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


def median_rounds(rows: list[dict]) -> list[dict]:
  """One row per (method, N, batch, nprobe): the round with the median q/s (the lower middle of an
  even count), with every round's q/s and CPU ms in ``qps_rounds`` / ``cpu_ms_rounds``."""
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    groups.setdefault((r["method"], r["n_items"], r["batch"], r.get("nprobe")), []).append(r)
  out = []
  for g in groups.values():
    g = sorted(g, key=lambda r: r["qps"])
    pick = dict(g[(len(g) - 1) // 2])
    pick["qps_rounds"] = [round(r["qps"], 2) for r in g]
    pick["cpu_ms_rounds"] = [round(r["cpu_ms_p50"], 1) for r in g]
    out.append(pick)
  return out


def default_rows(rows: list[dict]) -> list[dict]:
  """One row per (method, N, batch): IVF at the library's default nprobe (the sweep's other points
  are in ``ivf_curve``)."""
  return [r for r in rows if r.get("nprobe_default", True)]


def goals(rows: list[dict], matched: dict | None, n_goal: int = 1_000_000, b_goal: int = 100) -> dict:
  """Issue 20's CPU goals from the measured rows (wall-clock q/s; CPU-time flatness)."""
  def qps(method, n, b, nprobe=None, field="qps"):
    for r in rows:
      if (r["method"] == method and r["n_items"] == n and r["batch"] == b
          and (nprobe is None and r.get("nprobe_default", True) or r.get("nprobe") == nprobe)):
        return r[field]
    return None
  out = {}
  cr, ex = qps("cart_rerank", n_goal, b_goal), qps("dual_jax", n_goal, b_goal)
  if cr and ex:
    out["rerank_vs_exact_jax"] = {"cart_rerank_qps": round(cr, 1), "dual_jax_qps": round(ex, 1),
                                  "ratio": round(cr / ex, 3), "goal": ">= 3", "met": cr / ex >= 3}
  if matched:
    p = int(matched["nprobe_at_n"].get(str(n_goal), 0))
    iv = qps("faiss_ivf", n_goal, b_goal, nprobe=p)
    if cr and iv:
      out["rerank_vs_ivf_matched"] = {"nprobe": p, "cart_rerank_qps": round(cr, 1), "ivf_qps": round(iv, 1),
                                      "ratio": round(cr / iv, 3), "goal": ">= 0.667", "met": cr / iv >= 1 / 1.5}
  for method in CART_METHODS:
    cpu = {r["n_items"]: r["cpu_ms_p50"] / r["batch"] for r in rows
           if r["method"] == method and r["batch"] == b_goal and r["n_items"] <= n_goal}
    if len(cpu) >= 2:
      out[f"{method}_flat_cpu_ms_per_query"] = {
          "by_n": {str(n): round(v, 3) for n, v in sorted(cpu.items())},
          "max_over_min": round(max(cpu.values()) / min(cpu.values()), 3),
          "goal": "<= 1.10", "met": max(cpu.values()) <= 1.10 * min(cpu.values())}
    big = [r for r in rows if r["method"] == method and r["n_items"] >= 10_000_000 and "rss_mb" in r]
    if big:
      r = max(big, key=lambda r: r["rss_mb"])
      out[f"{method}_rss_at_10m_mb"] = {"rss_mb": round(r["rss_mb"], 1), "peak_rss_mb": round(r.get("rss_peak_mb", 0), 1),
                                        "goal": "< 2048", "met": r["rss_mb"] < 2048}
  return out


def summarise(rows: list[dict], peak: dict | None, matched: dict | None = None) -> dict:
  """Crossover N per CART variant, dual method and batch; CART's flatness, peak fraction, goals.

  Everything is computed twice: from wall time (``qps``) and from process CPU time
  (``qps_cpu = B / cpu time per call``; the work done, steadier than wall time when other jobs
  share the machine). IVF enters the crossovers at the library's default nprobe.
  """
  all_rows, rows = rows, default_rows(rows)
  if matched:  # IVF at the recall of CART + rerank, as a method of its own in the crossovers
    at = matched.get("nprobe_at_n", {})
    rows = rows + [{**r, "method": "faiss_ivf_matched"} for r in all_rows if r["method"] == "faiss_ivf"
                   and r.get("nprobe") is not None and r["nprobe"] == at.get(str(r["n_items"]))]
  out = {"crossover": {}, "crossover_cpu_time": {}, "cart_peak_fraction": {}}
  for cart_method in CART_METHODS:
    cart = [r for r in rows if r["method"] == cart_method]
    for method in sorted({r["method"] for r in rows} - set(CART_METHODS)):
      for b in sorted({r["batch"] for r in rows}):
        for key, field in (("crossover", "qps"), ("crossover_cpu_time", "qps_cpu")):
          c = {r["n_items"]: r[field] for r in cart if r["batch"] == b and field in r}
          d = {r["n_items"]: r[field] for r in rows if r["method"] == method and r["batch"] == b and field in r}
          if c and d:
            out[key][f"{cart_method}_vs_{method}@B{b}"] = crossover(c, d)
    if peak:
      for r in cart:
        out["cart_peak_fraction"][f"{cart_method}:N{r['n_items']}@B{r['batch']}"] = round(
            r["achieved_tflops"] / peak["tflops"], 4)
    for key, field in (("flatness", "qps"), ("flatness_cpu_time", "qps_cpu")):
      flat = {}
      for b in sorted({r["batch"] for r in cart}):
        q = {r["n_items"]: r[field] for r in cart if r["batch"] == b and field in r and r["n_items"] <= 1_000_000}
        if len(q) >= 2:
          flat[f"B{b}"] = {"min_over_max": round(min(q.values()) / max(q.values()), 3),
                           "within_10pct": min(q.values()) >= 0.9 * max(q.values())}
      out.setdefault(key, {})[cart_method] = flat
  if peak:
    out["peak_used"] = peak
  curve = {}
  for r in all_rows:
    if r["method"] == "faiss_ivf" and "nprobe" in r:
      curve.setdefault(f"N{r['n_items']}@B{r['batch']}", []).append(
          {"nprobe": r["nprobe"], "nlist": r["nlist"], "qps": round(r["qps"], 1), "qps_cpu": round(r["qps_cpu"], 1)})
  out["ivf_curve"] = {k: sorted(v, key=lambda x: x["nprobe"]) for k, v in curve.items()}
  out["goals"] = goals(all_rows, matched)
  return out


COLORS = {"cart": "tab:blue", "cart_rerank": "tab:purple", "dual_jax": "tab:red", "faiss_flat": "tab:orange",
          "faiss_ivf": "tab:green"}
LABELS = {"cart": "CART", "cart_rerank": "CART + rerank", "dual_jax": "exact (JAX)",
          "faiss_flat": "FAISS flat", "faiss_ivf": "FAISS IVF (nprobe 8)"}


def _over_n(ax, ylabel: str, title: str) -> None:
  """A log-log panel over the number of candidates N."""
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("candidates N")
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=9)
  ax.grid(True, which="both", alpha=0.3)


def plot(report: dict, path: str) -> None:
  """Three panels: q/s vs N; resident memory vs N; (with a real corpus) R@10 vs q/s at the largest N."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows_all = report["results"]
  rows = default_rows(rows_all)
  quality, matched = report.get("quality"), report.get("ivf_matched")
  sb = report["settings"].get("sweep_batch", 100)
  fig, axes = plt.subplots(1, 3 if quality else 2, figsize=(16 if quality else 11, 5.0))
  ax = axes[0]
  for method in METHODS:
    for b, style in ((sb, "s-"), (1, "o:")):
      pts = sorted((r["n_items"], r["qps"]) for r in rows if r["method"] == method and r["batch"] == b)
      if pts:
        ax.plot(*zip(*pts), style, color=COLORS[method], label=f"{LABELS[method]}, batch {b}")
  if matched:
    pts = sorted((r["n_items"], r["qps"]) for r in rows_all if r["method"] == "faiss_ivf" and r["batch"] == sb
                 and r.get("nprobe") == int(matched["nprobe_at_n"].get(str(r["n_items"]), -1)))
    if pts:
      ax.plot(*zip(*pts), "D--", color="tab:olive",
              label=f"FAISS IVF at R@10 of CART + rerank (nprobe/nlist {matched['fraction']:.2f}), batch {sb}")
  _over_n(ax, "queries / s (token ids in -> top-10 rows out)", "throughput")
  ax.legend(fontsize=6, ncol=2, loc="lower left")
  ax = axes[1]
  for method in METHODS:
    pts = sorted((r["n_items"], r["rss_mb"]) for r in rows if r["method"] == method and r["batch"] == sb and "rss_mb" in r)
    if pts:
      ax.plot(*zip(*pts), "s-", color=COLORS[method], label=LABELS[method])
  no_fit = sorted({r["n_items"] for r in report.get("skipped", []) if "does not fit" in r["reason"]})
  for n in no_fit:
    ax.annotate(f"dual tower at N = {n:,}:\nthe matrix does not fit", (n, 2600), fontsize=6.5, ha="right")
  ax.axhline(2048, color="k", lw=0.8, ls="--")
  ax.text(1_000, 2100, "2 GB", fontsize=7)
  _over_n(ax, "process resident memory, MB (after the timed calls)", "memory")
  ax.legend(fontsize=7)
  if quality:
    ax = axes[2]
    n_big = max(r["n_items"] for r in rows_all if r["method"] == "faiss_ivf") if any(
        r["method"] == "faiss_ivf" for r in rows_all) else max(r["n_items"] for r in rows_all)
    q_at = lambda m: next((r["qps"] for r in rows if r["method"] == m and r["n_items"] == n_big and r["batch"] == sb), None)
    for m, key in (("cart", "cart"), ("cart_rerank", "cart_rerank"), ("dual_jax", "dual_exact"), ("faiss_flat", "dual_exact")):
      if q_at(m):
        ax.plot(q_at(m), quality[key]["r@10"], "*" if m.startswith("cart") else "o", ms=11, color=COLORS[m], label=LABELS[m])
    frac_r10 = {round(q["nprobe"] / q["nlist"], 6): q["r@10"] for q in quality["ivf"]}
    nl = ivf_nlist(n_big)
    pts = []
    for r in rows_all:
      if r["method"] == "faiss_ivf" and r["n_items"] == n_big and r["batch"] == sb and "nprobe" in r:
        f = next((f for f in frac_r10 if max(1, math.ceil(f * nl)) == r["nprobe"]), None)
        if f is not None:
          pts.append((r["qps"], frac_r10[f], r["nprobe"]))
    if pts:
      pts.sort(key=lambda t: t[2])
      ax.plot([p[0] for p in pts], [p[1] for p in pts], "^-", color=COLORS["faiss_ivf"], label="FAISS IVF, nprobe sweep")
      for x, y, p in pts:
        ax.annotate(str(p), (x, y), fontsize=6, xytext=(3, -8), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel(f"queries / s at N = {n_big:,}, batch {sb}")
    ax.set_ylabel(f"R@10 on {quality.get('corpus_name', 'the real corpus')}'s test queries "
                  f"(N = {quality['num_items']:,})")
    ax.set_title("recall next to speed (IVF: recall at the same nprobe/nlist on the real corpus)", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
  m = report["machine"]
  loads = [r["load1_before"] for r in rows_all if "load1_before" in r]
  load = f", 1-min load {min(loads):.1f}-{max(loads):.1f}" if loads else ""
  fig.suptitle(f"CART {report['settings'].get('cart_model', 'minilm_small')} (beam 10) vs the dual tower "
               f"(MiniLM + d={ITEM_DIM}); {m['device']} ({m['backend']}, {m['cpu_count']} CPUs{load}), "
               f"{report['settings']['precision']}", fontsize=9)
  fig.tight_layout()
  from cart_jax.core.artefacts import atomic_write_via  # here: workers may import another cart_jax
  atomic_write_via(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))


def _table(rows: list[dict]) -> str:
  lines = ["| method | N | B | q/s | p50 ms | p95 ms | CPU ms/call | RSS MB | compile s | GFLOP/q | TFLOP/s |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in sorted(rows, key=lambda r: (METHODS.index(r["method"]), r["batch"], r["n_items"], r.get("nprobe", 0))):
    name = r["method"] + (f" (nprobe {r['nprobe']})" if "nprobe" in r else "")
    lines.append(f"| {name} | {r['n_items']:,} | {r['batch']} | {r['qps']:,.1f} | {r['p50_ms']:.1f} | "
                 f"{r['p95_ms']:.1f} | {r.get('cpu_ms_p50', float('nan')):.0f} | {r.get('rss_mb', float('nan')):,.0f} | {r['compile_s']:.1f} | "
                 f"{r['flops_per_query'] / 1e9:.2f} | {r['achieved_tflops']:.4f} |")
  return "\n".join(lines)


def _print_crossovers(report: dict) -> None:
  for key in ("crossover", "crossover_cpu_time"):
    for k, v in report["summary"].get(key, {}).items():
      print(f"{key} {k}: {v['status']}" + (f", N* = {v['n']:,.0f}" if v["n"] else ""))
  for k, v in report["summary"].get("goals", {}).items():
    print(f"goal {k}: {json.dumps(v)}")


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
  ap.add_argument("--rounds", type=int, default=None,
                  help="rounds: of the --compare_src comparison (default 2); otherwise every method's "
                       "workers run this many times (default 1), in alternating order (forward, "
                       "backward, ...), and each cell reports the median round (its q/s of every round "
                       "in qps_rounds): methods compared in one interleaved run")
  ap.add_argument("--from_json", default=None,
                  help="re-summarise (crossovers, flatness) and re-plot an existing report; measures nothing")
  ap.add_argument("--cart_model", default="minilm_frozen",
                  help="CART preset (cart_jax.models.cart.config): minilm_frozen is the accurate "
                       "recipe's network (frozen MiniLM-L6 + a 2-layer fused decoder); minilm_small "
                       "the earlier 6-layer one")
  ap.add_argument("--nprobes", default=",".join(map(str, NPROBES)),
                  help="IVF nprobe sweep, run at --sweep_batch (the library's default nprobe runs at "
                       "every batch)")
  ap.add_argument("--sweep_batch", type=int, default=100)
  ap.add_argument("--quality_workdir", default=None,
                  help="a `cart demo --workdir W` directory (emoji: the image demo): recall of CART, "
                       "CART + rerank, exact and IVF (nprobe sweep) on its test queries; IVF's matched "
                       "nprobe (where its R@10 reaches CART + rerank's) is carried to every N as the same "
                       "fraction of nlist and timed there")
  ap.add_argument("--scratch", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "cart-throughput"),
                  help="where the re-ranking rows files (N x 1024 float32) and trained IVF indexes are "
                       "kept between runs (the 10M rows file is 38 GiB)")
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
    report["summary"] = summarise(report["results"], report.get("summary", {}).get("peak_used"),
                                  report.get("ivf_matched"))
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
    # batch 1000 on a 2-core CPU: minutes per cell; 10M on a GPU: its 38 GiB rows file alone would take
    # minutes of the 5-minute budget (give --n_items to try)
    ns, batches = (N_ALL[:-1], B_ALL) if gpu else (N_ALL, (1, 100))
  if args.n_items:
    ns = tuple(int(float(x)) for x in args.n_items.split(","))
  if args.batches:
    batches = tuple(int(x) for x in args.batches.split(","))
  methods = tuple(args.methods.split(",")) if args.methods else (
      ("cart", "cart_rerank", "dual_jax") if gpu else METHODS)
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
                 "seed": 0, "max_chunk": 131072 if gpu else 65536, "cart_model": args.cart_model,
                 "nprobes": [int(x) for x in args.nprobes.split(",")], "sweep_batch": args.sweep_batch,
                 "scratch": os.path.abspath(args.scratch)}
  quality_rec, matched = None, None
  if args.quality_workdir:
    quality_paths(args.quality_workdir)  # fails early on a wrong directory
    print(f"== quality on {args.quality_workdir}, load {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
    recs = run_worker({**spec_common, "method": "quality", "quality_workdir": os.path.abspath(args.quality_workdir)},
                      env, 1800)
    quality_rec = next((r for r in recs if r.get("kind") == "quality"), None)
    if quality_rec is None:
      print("error: the quality pass failed (see its stderr above)", file=sys.stderr)
      return 2
    quality_rec.pop("kind")
    matched = matched_fraction(quality_rec)
    at_n = lambda f, n: max(1, min(ivf_nlist(n), math.ceil(f * ivf_nlist(n))))
    matched["nprobe_at_n"] = {str(n): at_n(matched["fraction"], n) for n in ns}
    spec_common["nprobe_by_n"] = {str(n): sorted({at_n(q["nprobe"] / q["nlist"], n) for q in quality_rec["ivf"]})
                                  for n in ns}
    print(f"quality: IVF reaches CART + rerank's R@10 {matched['target_r@10']:.4f} at nprobe "
          f"{matched['nprobe']}/{matched['nlist']} (fraction {matched['fraction']:.3f})"
          + ("" if matched["reached"] else " -- it never does; compared at nprobe = nlist"), file=sys.stderr)
  worker_timeout = 290.0 if gpu else (600.0 if args.quick else 3600.0)

  runs = []  # (method, variant, env)
  if args.compare_src:
    src = os.path.abspath(args.compare_src)
    if not os.path.isfile(os.path.join(src, "cart_jax", "inference", "searcher.py")):
      ap.error(f"--compare_src {src}: expected a directory with cart_jax/inference/searcher.py inside")
    env_before = dict(env, PYTHONPATH=src + os.pathsep + env["PYTHONPATH"])
    for r in range(args.rounds or 2):  # ABBA order: a drifting background load favours neither side
      pair = [("cart", "before", env_before, None), ("cart", "after", env, None)]
      runs += pair if r % 2 == 0 else pair[::-1]
  else:
    # CART: one process per N, so each N's resident memory is its own (a process that searched
    # smaller N first keeps their compiled programs and allocator pools).
    once = [(m, "current", env, [n]) for m in methods for n in (ns if m in CART_METHODS else [None])]
    for r in range(args.rounds or 1):
      runs += once if r % 2 == 0 else once[::-1]

  rows, skipped, errors, loads = [], [], [], []
  for i, (method, variant, wenv, only_n) in enumerate(runs):
    before = list(os.getloadavg())
    print(f"== {method} ({variant}), load {before[0]:.2f}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    spec = {**spec_common, "method": method, "variant": variant}
    if only_n and only_n[0] is not None:
      spec["n_items"] = only_n
    recs = run_worker(spec, wenv, worker_timeout)
    for r in recs:
      kind = r.pop("kind")
      if args.compare_src:
        r["round"] = i // 2
      elif args.rounds:
        r["round"] = i // len(once)
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
          "src_len": SRC_LEN, "item_dim": ITEM_DIM, "cart_model": args.cart_model, "cart_weights": "random (speed does not depend on them)",
          "sweep_batch": args.sweep_batch, "rerank_rows": f"N x {ITEM_DIM} float32 .npy, memory-mapped (only the beams' rows are read)",
          "codes": "random unique (k skewed over 256, v1..v3 uniform over 256, u counter < 16)",
          "ivf": "cart baseline --method faiss-ivf: nlist = min(4 sqrt N, N/39), nprobe 8, k-means on all N items",
          "timing": "ids in -> top-10 rows on host; tokenisation timed apart (tokenize_ms_p50)",
          "budget_s": budget_s, "max_call_s": max_call_s, "n_items": list(ns), "batches": list(batches),
          "threads_env": {k: env.get(k) for k in ("OMP_NUM_THREADS", "XLA_FLAGS", "JAX_PLATFORMS")}},
      "quality": quality_rec, "ivf_matched": matched,
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
    if args.rounds and args.rounds > 1:
      report["results_rounds"] = rows
      report["results"] = rows = median_rounds(rows)
    report["summary"] = summarise(rows, peak, matched)
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
