"""Constrained decoding speed vs corpus size: our trie tables vs a host trie vs a prefix scan.

Run:
  python benchmarks/decode_bench.py --quick --json /tmp/decode_quick.json      # ~2 min, 2-core CPU
  python benchmarks/decode_bench.py --json benchmarks/results/decode_cpu.json \
      --plot benchmarks/results/decode_cpu.png                                 # full sweep

All methods drive the SAME small decoder (2 layers, d=256, 4 heads, MLP 1024, random float32
weights, a real self-attention KV cache, cross-attention to a fixed random encoder output
[batch, 16, 256] that is not copied per beam), the same beam search skeleton and the same
identifiers. Only the constraint differs:

  cart         the trie as arrays (cart_jax.index.trie) + cart_jax.decoding.beam_search
  host_trie    a Python nested-dict trie walked for every beam at every step, called from the jitted
               search through jax.pure_callback (how GENRE / NCI constrain decoding)
  prefix_scan  every step compares every beam's prefix with all N identifiers, in JAX, and scatters
               the next codes of the matches into a mask (how TIGER-style repositories do it)

Each (method, corpus size) runs in its own subprocess with the same environment (thread settings
included). Timing: compile apart (AOT lower+compile), >= 3 warm-up calls, >= 10 timed calls with
jax.block_until_ready; median and spread. A configuration whose single call is too slow to time
in the budget gets fewer repeats (recorded in "n_timed") or is recorded as skipped with a reason.

Identifiers (L = 6): (k, v1, v2, v3, v4, u); k in 256 clusters with skewed sizes (p ~ 1/(i+8)),
v1..v4 uniform in 256 codes, u a counter over colliding (k, v1..v4) (vocabulary 16). The vocabulary
(and so the decoder) is the same for every corpus size.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

LEVEL_SIZES = (256, 256, 256, 256, 256, 16)
ID_LEN = len(LEVEL_SIZES)
D_MODEL, N_HEADS, N_LAYERS, D_MLP, SRC_LEN = 256, 4, 2, 1024, 16
METHODS = ("cart", "host_trie", "prefix_scan")


# ----------------------------------------------------------------------------- corpus

def make_corpus(n: int, seed: int = 0) -> np.ndarray:
  """int32 [n, 6] distinct identifiers, deterministic in (n, seed)."""
  rng = np.random.default_rng(seed)
  p = 1.0 / (np.arange(LEVEL_SIZES[0]) + 8.0)
  k = rng.choice(LEVEL_SIZES[0], size=n, p=p / p.sum())
  v = rng.integers(0, 256, size=(n, 4))
  base = np.concatenate([k[:, None], v], axis=1)  # [n, 5]
  order = np.lexsort(base.T[::-1])
  srt = base[order]
  new = np.ones(n, bool)
  new[1:] = (srt[1:] != srt[:-1]).any(axis=1)
  group = np.cumsum(new) - 1
  u_sorted = np.arange(n) - np.flatnonzero(new)[group]  # rank inside each collision group
  if u_sorted.max() >= LEVEL_SIZES[-1]:
    raise RuntimeError(f"counter {u_sorted.max()} exceeds the u vocabulary {LEVEL_SIZES[-1]}")
  codes = np.empty((n, ID_LEN), np.int32)
  codes[order, :5] = srt
  codes[order, 5] = u_sorted
  return codes


# ----------------------------------------------------------------------------- decoder

def make_decoder(seed: int = 0):
  """Random-weight decoder: returns (params, make_tokens_to_logits, init_cache)."""
  import jax
  import jax.numpy as jnp
  from cart_jax.index.vocab import IdentifierVocab

  vocab_size = IdentifierVocab(LEVEL_SIZES).vocab_size
  dh = D_MODEL // N_HEADS
  rng = np.random.default_rng(seed)

  def w(*shape):
    return jnp.asarray(rng.normal(size=shape) / np.sqrt(shape[0]), jnp.float32)

  params = {
      "emb": w(vocab_size, D_MODEL), "pos": w(ID_LEN, D_MODEL), "out": w(D_MODEL, vocab_size),
      "layers": [{
          "wq": w(D_MODEL, D_MODEL), "wk": w(D_MODEL, D_MODEL), "wv": w(D_MODEL, D_MODEL),
          "wo": w(D_MODEL, D_MODEL), "cq": w(D_MODEL, D_MODEL), "ck": w(D_MODEL, D_MODEL),
          "cv": w(D_MODEL, D_MODEL), "co": w(D_MODEL, D_MODEL),
          "w1": w(D_MODEL, D_MLP), "w2": w(D_MLP, D_MODEL)} for _ in range(N_LAYERS)],
  }

  def rms(x):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)

  def init_cache(batch, beam):
    shape = (batch, beam, N_LAYERS, ID_LEN, N_HEADS, dh)
    return {"k": jnp.zeros(shape, jnp.float32), "v": jnp.zeros(shape, jnp.float32)}

  def make_tokens_to_logits(params, enc_bsd):
    """Encodes the cross-attention keys/values once per query; returns the step function."""
    b, s, _ = enc_bsd.shape
    enc_kv = [(  # per layer: [batch, src, heads, dh], shared by all beams
        (enc_bsd @ lp["ck"]).reshape(b, s, N_HEADS, dh),
        (enc_bsd @ lp["cv"]).reshape(b, s, N_HEADS, dh)) for lp in params["layers"]]

    def tokens_to_logits(tok_bk, cache, step):
      bb, k = tok_bk.shape
      x = params["emb"][tok_bk] + params["pos"][step]  # [batch, beam, d]
      new_k, new_v = cache["k"], cache["v"]
      valid_t = jnp.arange(ID_LEN) <= step  # [T]
      for i, lp in enumerate(params["layers"]):
        h = rms(x)
        q = (h @ lp["wq"]).reshape(bb, k, N_HEADS, dh)  # [batch, beam, heads, dh]
        kk = (h @ lp["wk"]).reshape(bb, k, N_HEADS, dh)
        vv = (h @ lp["wv"]).reshape(bb, k, N_HEADS, dh)
        new_k = jax.lax.dynamic_update_index_in_dim(
            new_k, jax.lax.dynamic_update_index_in_dim(new_k[:, :, i], kk, step, axis=2), i, axis=2)
        new_v = jax.lax.dynamic_update_index_in_dim(
            new_v, jax.lax.dynamic_update_index_in_dim(new_v[:, :, i], vv, step, axis=2), i, axis=2)
        att = jnp.einsum("bkhd,bkthd->bkht", q, new_k[:, :, i]) / np.sqrt(dh)  # [b, beam, h, T]
        att = jax.nn.softmax(jnp.where(valid_t, att, -1e30), axis=-1)
        x = x + jnp.einsum("bkht,bkthd->bkhd", att, new_v[:, :, i]).reshape(bb, k, -1) @ lp["wo"]
        # Cross-attention: the query side has the beam axis, the encoder side does not.
        cq = (rms(x) @ lp["cq"]).reshape(bb, k, N_HEADS, dh)
        ck, cv = enc_kv[i]
        catt = jax.nn.softmax(jnp.einsum("bkhd,bshd->bkhs", cq, ck) / np.sqrt(dh), axis=-1)
        x = x + jnp.einsum("bkhs,bshd->bkhd", catt, cv).reshape(bb, k, -1) @ lp["co"]
        x = x + jax.nn.gelu(rms(x) @ lp["w1"]) @ lp["w2"]
      return rms(x) @ params["out"], {"k": new_k, "v": new_v}  # [batch, beam, vocab]

    return tokens_to_logits

  return params, make_tokens_to_logits, init_cache


# ----------------------------------------------------------------------------- methods

class HostTrie:
  """GENRE-style trie: nested dicts walked from the root for every prefix."""

  def __init__(self, codes: np.ndarray):
    self.root = {}
    for ident in codes.tolist():
      node = self.root
      for c in ident:
        node = node.setdefault(c, {})

  def get(self, prefix):
    node = self.root
    for c in prefix:
      node = node.get(c)
      if node is None:
        return []
    return list(node.keys())


def build_search(method: str, codes: np.ndarray, beam: int, trie_or_host=None):
  """Returns search(params, enc, tables) -> DecodeResult-like (codes, scores)."""
  import jax
  import jax.numpy as jnp
  from cart_jax import decoding

  params, make_t2l, init_cache = make_decoder()
  config = decoding.DecodeConfig(beam, beam)
  offsets = decoding.level_offsets(LEVEL_SIZES)

  if method in ("cart", "unconstrained"):
    def search(params, enc, trie):
      t2l = make_t2l(params, enc)
      cache = init_cache(enc.shape[0], beam)
      if method == "cart":
        r = decoding.beam_search(t2l, cache, trie, config)
      else:
        r = decoding.unconstrained_beam_search(t2l, cache, LEVEL_SIZES, config)
      return r.codes, r.scores
    return params, search

  if method == "decoder_only":
    def search(params, enc, _):
      t2l = make_t2l(params, enc)
      cache = init_cache(enc.shape[0], beam)
      tok = jnp.full((enc.shape[0], beam), 1, jnp.int32)
      acc = jnp.zeros((enc.shape[0], beam), jnp.float32)
      for level in range(ID_LEN):
        logits, cache = t2l(tok, cache, jnp.int32(level))
        acc = acc + jax.nn.log_softmax(logits, -1)[..., 0]
        tok = jnp.full_like(tok, int(offsets[level]))
      return acc, acc
    return params, search

  def allowed_host(prefix_bkl, level):
    host = trie_or_host
    prefix_bkl, level = np.asarray(prefix_bkl), int(level)
    b, k, _ = prefix_bkl.shape
    mask = np.zeros((b, k, LEVEL_SIZES[level]), bool)
    for i in range(b):
      for j in range(k):
        p = prefix_bkl[i, j, :level]
        if level and p[0] < 0:
          continue  # dead beam
        mask[i, j, host.get(p.tolist())] = True
    return mask

  def allowed_scan(prefix_bkl, level, codes_nl):
    n = codes_nl.shape[0]

    def one_query(prefix_kl):  # [beam, L]
      if level == 0:
        match = jnp.ones((beam, n), bool)
      else:
        match = jnp.all(codes_nl[None, :, :level] == prefix_kl[:, None, :level], axis=-1)  # [beam, N]
      nxt = codes_nl[:, level]  # [N]
      allowed = jnp.zeros((beam, LEVEL_SIZES[level]), jnp.int8)
      allowed = allowed.at[jnp.arange(beam)[:, None], nxt[None, :]].max(match.astype(jnp.int8))
      return allowed > 0  # [beam, size_l]

    return jax.lax.map(one_query, prefix_bkl)  # [batch, beam, size_l]

  def search(params, enc, codes_nl):
    t2l = make_t2l(params, enc)
    batch = enc.shape[0]
    state = decoding.BeamState(
        scores=jnp.full((batch, beam), -jnp.inf, jnp.float32).at[:, 0].set(0.0),
        nodes=jnp.zeros((batch, beam), jnp.int32),
        codes=jnp.full((batch, beam, ID_LEN), -1, jnp.int32),
        last_tokens=jnp.full((batch, beam), 1, jnp.int32),
        cache=init_cache(batch, beam))
    for level in range(ID_LEN):
      logits, cache = t2l(state.last_tokens, state.cache, jnp.int32(level))
      state = state.replace(cache=cache)
      logp = jax.nn.log_softmax(logits, -1)  # [batch, beam, vocab]
      off, size = int(offsets[level]), LEVEL_SIZES[level]
      if method == "host_trie":
        allowed = jax.pure_callback(
            allowed_host, jax.ShapeDtypeStruct((batch, beam, size), jnp.bool_), state.codes,
            jnp.int32(level))
      else:
        allowed = allowed_scan(state.codes, level, codes_nl)
      n_par = 1 if level == 0 else beam
      cand = jnp.where(allowed[:, :n_par], state.scores[:, :n_par, None] +
                       logp[:, :n_par, off:off + size], -jnp.inf)  # [batch, parents, size]
      code = jnp.broadcast_to(jnp.arange(size, dtype=jnp.int32), cand.shape)
      state = decoding.select_beams(state, cand, jnp.zeros_like(code), code, level, off, beam)
    return state.codes, state.scores

  return params, search


# ----------------------------------------------------------------------------- worker

def rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def time_calls(fn, args, budget_s: float, max_call_s: float, min_warmup=3, min_timed=10):
  """Warm-up then timed calls; fewer repeats when one call is too slow for the budget."""
  import jax
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  if first > max_call_s:
    return {"skipped": f"one call took {first:.1f} s > {max_call_s:.0f} s limit per call",
            "first_call_s": first}
  n_warm, n_timed = min_warmup, min_timed
  note = None
  if first * (min_warmup - 1 + min_timed) > budget_s:
    n_warm = 1 if first * 4 > budget_s else min_warmup - 1
    n_timed = max(3, int(budget_s / first) - n_warm)
    note = f"slow call ({first:.2f} s): {n_warm + 1} warm-up, {n_timed} timed calls"
  for _ in range(n_warm - 1):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(n_timed):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  times = np.asarray(times)
  out = {"call_ms_p50": 1e3 * float(np.median(times)), "call_ms_min": 1e3 * float(times.min()),
         "call_ms_max": 1e3 * float(times.max()),
         "spread_iqr_pct": 100.0 * float((np.percentile(times, 75) - np.percentile(times, 25))
                                         / np.median(times)),
         "n_warmup": n_warm, "n_timed": n_timed}
  if note:
    out["note"] = note
  return out


def worker(spec: dict) -> None:
  """Runs one (method, n_ids) over the requested batch sizes; prints one JSON line per result."""
  import jax
  import jax.numpy as jnp
  from cart_jax.index.trie import build_trie_timed
  from cart_jax.index.vocab import IdentifierVocab

  method, n, beam = spec["method"], spec["n_ids"], spec["beam"]
  codes = make_corpus(n)
  extra = {}
  if method == "cart":
    trie, stats = build_trie_timed(codes, IdentifierVocab(LEVEL_SIZES))
    tables = trie.to_device()
    extra = {"trie_build_s": stats["build_s"], "trie_memory_bytes": stats["memory_bytes"],
             "max_fanout": stats["max_fanout"]}
    host = None
  elif method == "host_trie":
    rss0 = rss_mb()
    t0 = time.perf_counter()
    host = HostTrie(codes)
    extra = {"trie_build_s": time.perf_counter() - t0, "trie_rss_growth_mb": rss_mb() - rss0}
    tables = jnp.zeros(())
  else:
    host = None
    tables = jax.device_put(jnp.asarray(codes))
    extra = {"table_bytes": int(codes.nbytes)}

  params, search = build_search(method, codes, beam, host)
  variants = [method] + (["unconstrained", "decoder_only"] if method == "cart" else [])
  for batch in spec["batches"]:
    enc = jax.device_put(jnp.asarray(
        np.random.default_rng(batch).normal(size=(batch, SRC_LEN, D_MODEL)), jnp.float32))
    row_ms = {}
    for variant in variants:
      if variant != method:
        params_v, search_v = build_search(variant, codes, beam)
      else:
        params_v, search_v = params, search
      args = (params_v, enc, tables)
      t0 = time.perf_counter()
      compiled = jax.jit(search_v).lower(*args).compile()
      compile_s = time.perf_counter() - t0
      timing = time_calls(compiled, args, spec["budget_s"], spec["max_call_s"])
      rec = {"method": variant, "n_ids": n, "batch": batch, "beam": beam, "compile_s": compile_s,
             **timing}
      if "call_ms_p50" in timing:
        rec["qps"] = batch / (timing["call_ms_p50"] / 1e3)
        rec["step_ms"] = timing["call_ms_p50"] / ID_LEN
        row_ms[variant] = timing["call_ms_p50"]
      if variant == method:
        rec.update(extra)
      rec["peak_rss_mb"] = rss_mb()
      print(json.dumps(rec), flush=True)
    if method == "cart" and len(row_ms) == 3:
      c, u, d = row_ms["cart"], row_ms["unconstrained"], row_ms["decoder_only"]
      print(json.dumps({"kind": "mask_overhead", "n_ids": n, "batch": batch, "beam": beam,
                        "cart_ms": c, "unconstrained_ms": u, "decoder_only_ms": d,
                        "mask_share_vs_unconstrained": (c - u) / c,
                        "search_share_beyond_decoder": (c - d) / c}), flush=True)


# ----------------------------------------------------------------------------- driver

def machine_info() -> dict:
  import jax
  dev = jax.devices()[0]
  return {"platform": platform.platform(), "processor": platform.processor(),
          "cpu_count": os.cpu_count(), "python": platform.python_version(),
          "jax": jax.__version__, "backend": jax.default_backend(),
          "device": getattr(dev, "device_kind", str(dev)), "n_devices": jax.device_count(),
          "float32_matmul_precision": "default (TF32 on NVIDIA GPUs, plain f32 on CPU)"}


def run_worker_subprocess(spec: dict, env: dict, timeout_s: float) -> tuple[list[dict], str | None]:
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
  try:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    out, err = proc.stdout, None if proc.returncode == 0 else (
        f"worker exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
  except subprocess.TimeoutExpired as e:
    out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    err = f"worker exceeded {timeout_s:.0f} s"
  recs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
  return recs, err


def write_atomic(path: str, text: str) -> None:
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_", suffix=os.path.basename(path))
  with os.fdopen(fd, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def plot(report: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  styles = {"cart": "o-", "host_trie": "s--", "prefix_scan": "^:"}
  batches = sorted({r["batch"] for r in report["results"]})
  for method in METHODS:
    for b in batches:
      pts = sorted((r["n_ids"], r["qps"]) for r in report["results"]
                   if r["method"] == method and r["batch"] == b and "qps" in r)
      if pts:
        ax.plot(*zip(*pts), styles[method], label=f"{method}, batch {b}")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("identifiers in the corpus (N)")
  ax.set_ylabel("queries / s")
  ax.set_title(f"Constrained beam search (beam {report['beam']}, L={ID_LEN}), "
               f"{report['machine']['device']}", fontsize=9)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  d = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_", suffix=".png")
  os.close(fd)
  fig.savefig(tmp, dpi=120)
  os.replace(tmp, path)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true", help="1K and 100K identifiers, batch 100 only")
  ap.add_argument("--json", help="where to write the JSON report")
  ap.add_argument("--plot", help="where to write the PNG plot (queries/s vs N)")
  ap.add_argument("--beam", type=int, default=10)
  ap.add_argument("--methods", default=",".join(METHODS))
  ap.add_argument("--n_ids", default=None, help="comma list, overrides the sweep")
  ap.add_argument("--batches", default=None, help="comma list, overrides the sweep")
  ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)

  if args.worker:
    worker(json.loads(args.worker))
    return 0
  if not args.json:
    ap.error("--json PATH is required")
  methods = args.methods.split(",")
  for m in methods:
    if m not in METHODS:
      ap.error(f"--methods: unknown method {m!r}, expected some of {METHODS}")
  ns = [1_000, 100_000] if args.quick else [1_000, 10_000, 100_000, 1_000_000]
  batches = [100] if args.quick else [1, 100]
  if args.n_ids:
    ns = [int(x) for x in args.n_ids.split(",")]
  if args.batches:
    batches = [int(x) for x in args.batches.split(",")]
  budget_s = 8.0 if args.quick else 25.0  # timing budget per (method, N, batch)
  max_call_s = 15.0 if args.quick else 40.0
  worker_timeout_s = 90.0 if args.quick else 300.0

  # Same environment for every method: same thread settings, same device.
  env = dict(os.environ)
  threads = str(os.cpu_count())
  for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    env.setdefault(var, threads)
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + (
      os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")

  t_start = time.perf_counter()
  results, overhead, skipped = [], [], []
  for method in methods:
    for n in ns:
      spec = {"method": method, "n_ids": n, "beam": args.beam, "batches": batches,
              "budget_s": budget_s, "max_call_s": max_call_s}
      if method == "host_trie" and n > 100_000 and args.quick:
        skipped.append({"method": method, "n_ids": n, "reason": "not in --quick"})
        continue
      t0 = time.perf_counter()
      recs, err = run_worker_subprocess(spec, env, worker_timeout_s)
      for r in recs:
        if r.get("kind") == "mask_overhead":
          overhead.append(r)
        elif "skipped" in r:
          skipped.append({"method": r["method"], "n_ids": n, "batch": r["batch"],
                          "reason": r["skipped"]})
        elif r["method"] in METHODS:
          results.append(r)
        else:
          overhead.append({"kind": "variant", **r})
      done = {(r["method"], r["batch"]) for r in recs if "method" in r}
      for b in batches:
        if (method, b) not in done:
          skipped.append({"method": method, "n_ids": n, "batch": b,
                          "reason": err or "no result from worker"})
      print(f"[{time.perf_counter() - t_start:6.1f}s] {method:12s} N={n:>9,d} "
            f"({time.perf_counter() - t0:5.1f}s): " + ", ".join(
                f"b{r['batch']} {r['qps']:.1f} q/s" for r in recs
                if r.get("method") == method and "qps" in r) + (f"  [{err}]" if err else ""),
            flush=True)

  report = {
      "machine": machine_info(), "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
      "quick": args.quick, "beam": args.beam, "id_length": ID_LEN, "level_sizes": list(LEVEL_SIZES),
      "decoder": {"layers": N_LAYERS, "d_model": D_MODEL, "heads": N_HEADS, "d_mlp": D_MLP,
                  "src_len": SRC_LEN, "dtype": "float32", "kv_cache": True},
      "threads_env": {k: env.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                              "MKL_NUM_THREADS", "XLA_FLAGS", "JAX_PLATFORMS")},
      "results": results, "mask_overhead": overhead, "skipped": skipped,
      "wall_s": time.perf_counter() - t_start,
  }
  report["summary"] = summarize(results, overhead)
  write_atomic(args.json, json.dumps(report, indent=1))
  if args.plot:
    plot(report, args.plot)
  print(json.dumps(report["summary"], indent=1))
  return 0


def summarize(results: list[dict], overhead: list[dict]) -> dict:
  """The figures the issue asks for, where the sweep measured them."""
  def qps(method, n, b):
    for r in results:
      if r["method"] == method and r["n_ids"] == n and r["batch"] == b and "qps" in r:
        return r["qps"]
    return None

  s = {}
  for b in sorted({r["batch"] for r in results}):
    ns = sorted({r["n_ids"] for r in results if r["method"] == "cart" and r["batch"] == b})
    if len(ns) >= 2:
      lo, hi = qps("cart", ns[0], b), qps("cart", ns[-1], b)
      s[f"cart_qps_ratio_N{ns[-1]}_vs_N{ns[0]}_batch{b}"] = hi / lo
    for n in ns:
      c, h, p = qps("cart", n, b), qps("host_trie", n, b), qps("prefix_scan", n, b)
      if h:
        s[f"speedup_vs_host_trie_N{n}_batch{b}"] = c / h
      if p:
        s[f"speedup_vs_prefix_scan_N{n}_batch{b}"] = c / p
  for o in overhead:
    if o.get("kind") == "mask_overhead":
      s[f"mask_share_N{o['n_ids']}_batch{o['batch']}"] = o["mask_share_vs_unconstrained"]
  builds = [r for r in results if r["method"] == "cart" and "trie_build_s" in r]
  for r in builds:
    s[f"trie_build_N{r['n_ids']}"] = {"build_s": r["trie_build_s"],
                                      "memory_mb": r["trie_memory_bytes"] / 2**20,
                                      "max_fanout": r["max_fanout"]}
  return s


if __name__ == "__main__":
  sys.exit(main())
