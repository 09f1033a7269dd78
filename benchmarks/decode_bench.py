"""Constrained decoding speed vs corpus size: our trie tables vs a host trie vs a prefix scan.

Run:
  python benchmarks/decode_bench.py --quick --json /tmp/decode_quick.json      # ~2 min, 2-core CPU
  python benchmarks/decode_bench.py --json benchmarks/results/decode_cpu.json \
      --plot benchmarks/results/decode_cpu.png                                 # full sweep

Two decoders, both with the same step interface (cart_jax.inference.decoding.TokensToLogits):
  small  2 layers, d=256, 4 heads, MLP 1024, random float32 weights, a real self-attention KV cache
         and cross-attention to a fixed random encoder output [batch, 16, 256] that is not copied
         per beam: the end-to-end cost of a query (default in --quick).
  stub   table lookups (near-free model): what is left is the cost of the search and the
         constraint, which is what the methods differ in.
All methods run the same search skeleton on the same identifiers; only the constraint differs:

  cart         the trie as arrays (cart_jax.index.trie) + cart_jax.inference.decoding.beam_search
  host_trie    a Python nested-dict trie walked for every beam at every step, called from the jitted
               search through jax.pure_callback (how GENRE / NCI constrain decoding)
  prefix_scan  every step compares every beam's prefix with all N identifiers, in JAX, and scatters
               the next codes of the matches into a mask (how TIGER-style repositories do it)

Mask overhead (full sweep, smallest and largest N): in the cart process the same decoder also runs
an unconstrained beam search (every code of the level allowed, same top-k and cache reordering),
timed interleaved with the constrained search; the share is (cart - unconstrained) / cart.

Each method runs in its own subprocess with the same environment (thread settings included).
Timing: compile apart (AOT lower+compile), >= 3 warm-up calls, >= 10 timed calls with
jax.block_until_ready; median and spread. All call kinds of one (decoder, batch) - every method,
corpus size and variant - are timed round-robin in lockstep across the method processes (one call
at a time, in a new random order each round; calls under 0.25 s are preceded by an untimed call),
so that methods, corpus sizes and variants share the same background load of a shared machine.
A call kind too slow for the time budget gets fewer repeats and leaves the rounds early (recorded
in "n_warmup"/"n_timed"/"note") or is recorded under "skipped" with the reason (prefix_scan is predicted linearly in N from
N=100K). The 1-minute load average is logged with every row.

Identifiers (L = 6): (k, v1, v2, v3, v4, u); k in 256 clusters with skewed sizes (p ~ 1/(i+8)),
v1..v4 uniform in 256 codes, u a counter over colliding (k, v1..v4) (vocabulary 16). The vocabulary
(and so the decoder) is the same for every corpus size; the trie's per-level fan-out is not
(reported as "max_fanout").
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import resource
import subprocess
import sys
import threading
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
  from cart_jax.index.identifiers import assign_counters  # the prefix-DB counter of build-ids
  u = assign_counters(base)  # [n] rank among rows with the same prefix
  if u.max() >= LEVEL_SIZES[-1]:
    raise RuntimeError(f"counter {u.max()} exceeds the u vocabulary {LEVEL_SIZES[-1]}")
  codes = np.concatenate([base, u[:, None]], axis=1).astype(np.int32)  # [n, L]
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


def make_stub_decoder(seed: int = 1):
  """Near-free model (table lookups) with the same interface: isolates the constraint's cost.

  logits = table[last_token] + pos_bias[step] + query_bias(encoder output) + hash term; the cache
  holds a rolling hash of the prefix (so reordering it matters) with leading [batch, beam].
  """
  import jax.numpy as jnp
  from cart_jax.index.vocab import IdentifierVocab

  vocab_size = IdentifierVocab(LEVEL_SIZES).vocab_size
  rng = np.random.default_rng(seed)
  params = {"table": jnp.asarray(rng.normal(size=(vocab_size, vocab_size)), jnp.float32),
            "pos": jnp.asarray(rng.normal(size=(ID_LEN, vocab_size)), jnp.float32),
            "proj": jnp.asarray(rng.normal(size=(D_MODEL, vocab_size)) * 0.1, jnp.float32)}

  def init_cache(batch, beam):
    return {"hash": jnp.zeros((batch, beam), jnp.int32)}

  def make_tokens_to_logits(params, enc_bsd):
    query_bias = enc_bsd.mean(axis=1) @ params["proj"]  # [batch, vocab], once per query

    def tokens_to_logits(tok_bk, cache, step):
      h = cache["hash"] * 31 + tok_bk
      hash_term = 0.01 * (h % 7).astype(jnp.float32)[..., None]  # [batch, beam, 1]
      logits = params["table"][tok_bk] + params["pos"][step] + query_bias[:, None] + hash_term
      return logits, {"hash": h}  # [batch, beam, vocab]

    return tokens_to_logits

  return params, make_tokens_to_logits, init_cache


# ----------------------------------------------------------------------------- methods

HOST_TRIES = {}  # corpus size -> HostTrie; the callback picks one by an operand at run time


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


def build_search(method: str, beam: int, decoder: str = "small"):
  """Returns (params, search) with search(params, enc, tables) -> (codes, scores)."""
  import jax
  import jax.numpy as jnp
  from cart_jax.inference import decoding

  params, make_t2l, init_cache = make_decoder() if decoder == "small" else make_stub_decoder()
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

  def allowed_host(prefix_bkl, level, n_ids):
    host = HOST_TRIES[int(n_ids)]
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
            jnp.int32(level), codes_nl)  # codes_nl: here the corpus size (int32 scalar)
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


def summarize_times(ts: list[float]) -> dict:
  ts = np.asarray(ts)
  return {"call_ms_p50": 1e3 * float(np.median(ts)), "call_ms_min": 1e3 * float(ts.min()),
          "call_ms_max": 1e3 * float(ts.max()),
          "spread_iqr_pct": 100.0 * float((np.percentile(ts, 75) - np.percentile(ts, 25))
                                          / np.median(ts))}


def worker(spec: dict) -> None:
  """One method's process: builds its tables, compiles and warms every call kind, then times calls
  on request.

  Protocol (JSON lines on stdout, requests on stdin): prints one {"kind": "key", ...} line per call
  kind (method/variant, decoder, N, batch) with its compile time and first-call time (or the reason
  it is skipped), then {"kind": "ready"}; afterwards every stdin line "<key id>" runs that call once
  and answers {"kind": "time", "id": ..., "s": ...}; "quit" or end of input exits.
  """
  import jax
  import jax.numpy as jnp
  from cart_jax.index.trie import build_trie_timed
  from cart_jax.index.vocab import IdentifierVocab

  def emit(rec):
    sys.stdout.write(json.dumps(rec) + "\n")
    sys.stdout.flush()

  method, beam = spec["method"], spec["beam"]
  tables, extra = {}, {}
  for n in spec["n_ids"]:
    codes = make_corpus(n)
    if method == "cart":
      trie, stats = build_trie_timed(codes, IdentifierVocab(LEVEL_SIZES))
      tables[n] = trie.to_device()
      extra[n] = {"trie_build_s": stats["build_s"], "trie_memory_bytes": stats["memory_bytes"],
                  "max_fanout": stats["max_fanout"], "num_nodes": stats["num_nodes"]}
    elif method == "host_trie":
      rss0 = rss_mb()
      t0 = time.perf_counter()
      HOST_TRIES[n] = HostTrie(codes)
      extra[n] = {"trie_build_s": time.perf_counter() - t0, "trie_rss_growth_mb": rss_mb() - rss0}
      tables[n] = jnp.int32(n)
    else:
      tables[n] = jax.device_put(jnp.asarray(codes))
      extra[n] = {"table_bytes": int(codes.nbytes)}

  calls, first = {}, {}
  compiled_by_shape = {}
  for decoder in spec["decoders"]:
    for batch in spec["batches"]:
      enc = jax.device_put(jnp.asarray(
          np.random.default_rng(batch).normal(size=(batch, SRC_LEN, D_MODEL)), jnp.float32))
      for n in spec["n_ids"]:
        variants = [method]
        if method == "cart" and decoder == "small" and n in spec["overhead_n"]:
          variants += spec["overhead_variants"]
        for variant in variants:
          key = {"id": len(calls) + len(first), "method": variant, "decoder": decoder, "n_ids": n,
                 "batch": batch, "beam": beam}
          if variant == method:
            key.update(extra[n])
          # prefix_scan is linear in N: predict from the previous corpus size, skip if too slow.
          prev = first.get((variant, decoder, batch))
          if method == "prefix_scan" and prev:
            m, t = prev
            if t is None:
              emit({"kind": "key", **key, "skipped": "a smaller corpus was already too slow"})
              first[(variant, decoder, batch)] = (n, None)
              continue
            # Only from N >= 100K, where the scan (not the decoder) dominates the call.
            if m >= 100_000 and t * n / m > spec["max_call_s"]:
              emit({"kind": "key", **key, "skipped": (
                  f"predicted {t * n / m:.0f} s per call (linear in N from {t:.1f} s at N={m}) "
                  f"> {spec['max_call_s']:.0f} s limit per call")})
              first[(variant, decoder, batch)] = (n, None)
              continue
          params, search = build_search(variant, beam, decoder)
          args = (params, enc, tables[n])
          shape_key = (variant, decoder, batch, jax.tree_util.tree_structure(args[2]),
                       tuple(x.shape for x in jax.tree_util.tree_leaves(args[2])))
          if shape_key in compiled_by_shape:  # same program (host_trie: N is an operand)
            compiled, compile_s = compiled_by_shape[shape_key], 0.0
          else:
            t0 = time.perf_counter()
            compiled = jax.jit(search).lower(*args).compile()
            compile_s = time.perf_counter() - t0
            compiled_by_shape[shape_key] = compiled
          t0 = time.perf_counter()
          jax.block_until_ready(compiled(*args))
          first_s = time.perf_counter() - t0
          key.update(compile_s=compile_s, first_call_s=first_s, peak_rss_mb=rss_mb())
          if first_s > spec["max_call_s"]:
            key["skipped"] = f"one call took {first_s:.1f} s > {spec['max_call_s']:.0f} s limit"
            first[(variant, decoder, batch)] = (n, None)
          else:
            calls[key["id"]] = (compiled, args)
            first[(variant, decoder, batch)] = (n, first_s)
          emit({"kind": "key", **key})
  emit({"kind": "ready", "peak_rss_mb": rss_mb()})
  for line in sys.stdin:
    line = line.strip()
    if not line or line == "quit":
      break
    key_id, pre = (int(x) for x in line.split())
    fn, args = calls[key_id]
    if pre:  # an untimed call first: wakes this idle process's threads and caches
      jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    emit({"kind": "time", "id": key_id, "s": time.perf_counter() - t0})


def machine_info() -> dict:
  import jax
  dev = jax.devices()[0]
  return {"platform": platform.platform(), "processor": platform.processor(),
          "cpu_count": os.cpu_count(), "python": platform.python_version(),
          "jax": jax.__version__, "backend": jax.default_backend(),
          "device": getattr(dev, "device_kind", str(dev)), "n_devices": jax.device_count(),
          "float32_matmul_precision": "default (TF32 on NVIDIA GPUs, plain f32 on CPU)",
          "load_avg_at_start": os.getloadavg()}


class WorkerProcess:
  """A running worker: JSON lines from its stdout through a queue (so reads can time out)."""

  def __init__(self, spec: dict, env: dict):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    self.method = spec["method"]
    self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
    self.lines = queue.Queue()
    self.stderr_tail = []
    threading.Thread(target=self._pump_out, daemon=True).start()
    threading.Thread(target=self._pump_err, daemon=True).start()

  def _pump_out(self):
    for line in self.proc.stdout:
      if line.startswith("{"):
        self.lines.put(json.loads(line))
    self.lines.put(None)

  def _pump_err(self):
    for line in self.proc.stderr:
      self.stderr_tail = (self.stderr_tail + [line.rstrip()])[-3:]

  def read(self, timeout_s: float) -> dict:
    try:
      rec = self.lines.get(timeout=timeout_s)
    except queue.Empty:
      raise RuntimeError(f"{self.method} worker sent nothing for {timeout_s:.0f} s") from None
    if rec is None:
      self.proc.wait()
      raise RuntimeError(f"{self.method} worker exited {self.proc.returncode}: "
                         f"{self.stderr_tail}")
    return rec

  def run(self, key_id: int, timeout_s: float, pre: bool = False) -> float:
    self.proc.stdin.write(f"{key_id} {int(pre)}\n")
    self.proc.stdin.flush()
    rec = self.read(timeout_s)
    return rec["s"]

  def close(self):
    try:
      if self.proc.poll() is None:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        self.proc.wait(timeout=30)
    except (OSError, subprocess.TimeoutExpired):
      pass
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait()



def plot(report: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  decoders = [d for d in ("small", "stub") if any(r["decoder"] == d for r in report["results"])]
  fig, axes = plt.subplots(1, len(decoders), figsize=(6.2 * len(decoders), 4.4), squeeze=False)
  colors = {"cart": "tab:blue", "host_trie": "tab:orange", "prefix_scan": "tab:green"}
  marks = {1: "o--", 100: "s-"}
  titles = {"small": "2-layer d=256 decoder with KV cache (end to end)",
            "stub": "table-lookup stub decoder (cost of the constraint)"}
  for ax, decoder in zip(axes[0], decoders):
    for method in METHODS:
      for b in sorted({r["batch"] for r in report["results"]}):
        pts = sorted((r["n_ids"], r["qps"]) for r in report["results"] if r["method"] == method
                     and r["batch"] == b and r["decoder"] == decoder and "qps" in r)
        if pts:
          ax.plot(*zip(*pts), marks.get(b, "^-"), color=colors[method],
                  label=f"{method}, batch {b}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("identifiers in the corpus (N)")
    ax.set_ylabel("queries / s")
    ax.set_title(titles.get(decoder, decoder), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
  m = report["machine"]
  fig.suptitle(f"Constrained beam search, beam {report['beam']}, L={ID_LEN} - {m['device']} "
               f"({m['backend']}, {m['cpu_count']} CPUs)", fontsize=10)
  fig.tight_layout()
  from cart_jax.core.artefacts import atomic_write_via  # here: workers may import another cart_jax
  atomic_write_via(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true", help="1K and 100K identifiers, batch 100 only")
  ap.add_argument("--json", help="where to write the JSON report")
  ap.add_argument("--plot", help="where to write the PNG plot (queries/s vs N)")
  ap.add_argument("--beam", type=int, default=10)
  ap.add_argument("--methods", default=",".join(METHODS))
  ap.add_argument("--decoders", default=None,
                  help="small: 2-layer KV-cached decoder; stub: table lookups (constraint cost)")
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
  decoders = (args.decoders or ("small" if args.quick else "small,stub")).split(",")
  for d in decoders:
    if d not in ("small", "stub"):
      ap.error(f"--decoders: unknown decoder {d!r}, expected small and/or stub")
  ns = [1_000, 100_000] if args.quick else [1_000, 10_000, 100_000, 1_000_000]
  batches = [100] if args.quick else [1, 100]
  if args.n_ids:
    ns = [int(x) for x in args.n_ids.split(",")]
  if args.batches:
    batches = [int(x) for x in args.batches.split(",")]
  spec_common = {
      "beam": args.beam, "batches": batches, "decoders": decoders,
      "max_call_s": 15.0,
      # Mask overhead (extra compiles) only in the full sweep, at the smallest and largest N.
      "overhead_n": [] if args.quick else [min(ns), max(ns)],
      "overhead_variants": ["unconstrained"],
  }
  # Timing budget per call kind (method/variant, N) for each decoder: slower calls get fewer
  # repeats (recorded).
  budget_s = {"small": 3.0, "stub": 3.0} if args.quick else {"small": 36.0, "stub": 4.0}
  setup_timeout_s = 120.0 if args.quick else 600.0  # per line while a worker compiles
  call_timeout_s = 3 * spec_common["max_call_s"] + 30.0
  short_call_s = 0.25

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
  keys = []  # (worker, key record)
  workers = []
  try:
    # 1. Start the methods one after the other (compiles do not overlap), keep them alive.
    for method in methods:
      w = WorkerProcess({"method": method, "n_ids": ns, **spec_common}, env)
      workers.append(w)
      try:
        while True:
          rec = w.read(setup_timeout_s)
          if rec["kind"] == "ready":
            break
          if "skipped" in rec:
            skipped.append(rec)
          else:
            keys.append((w, rec))
          print(f"  [{time.perf_counter() - t_start:6.1f}s] {rec['method']:13s} "
                f"{rec['decoder']:5s} N={rec['n_ids']:>9,d} b{rec['batch']:<4d} " + (
                    f"skipped: {rec['skipped']}" if "skipped" in rec else
                    f"compile {rec['compile_s']:5.1f}s, first call {rec['first_call_s']:.3f}s"),
                flush=True)
      except RuntimeError as e:
        print(f"  {method}: {e}", flush=True)
        keys = [(kw, k) for kw, k in keys if kw is not w]
        for n in ns:
          for d in decoders:
            for b in batches:
              skipped.append({"method": method, "decoder": d, "n_ids": n, "batch": b,
                              "skipped": f"worker failed during setup: {e}"})
        w.close()
        workers.remove(w)

    # 2. Time every call kind of one (decoder, batch) group round-robin ACROSS the processes, so
    #    all methods, corpus sizes and variants share the same background load.
    times = {id(k): [] for _, k in keys}
    for decoder in decoders:
      for batch in batches:
        group = [(w, k) for w, k in keys if k["decoder"] == decoder and k["batch"] == batch]
        if not group:
          continue
        # Per call kind: 2 more warm-ups and 10 timed calls, fewer when its calls are too slow
        # for the budget (then it drops out of the later rounds; the others go on).
        plan = {}
        for _, k in group:
          f = k["first_call_s"]
          if f * 12 <= budget_s[decoder]:
            plan[id(k)] = (2, 10, None)
          else:
            n_warm = 1 if f * 5 > budget_s[decoder] else 2
            n_timed = max(3, int(budget_s[decoder] / f) - n_warm)
            plan[id(k)] = (n_warm, n_timed,
                           f"slow call ({f:.2f} s): {n_warm + 1} warm-up, {n_timed} timed calls")
        made = {id(k): 0 for _, k in group}
        dead = set()
        order_rng = np.random.default_rng(0)
        while any(made[id(k)] < plan[id(k)][0] + plan[id(k)][1] and w not in dead
                  for w, k in group):
          for j in order_rng.permutation(len(group)):  # a new order every round
            w, k = group[j]
            n_warm, n_timed, _ = plan[id(k)]
            if w in dead or made[id(k)] >= n_warm + n_timed:
              continue
            try:
              # Short calls get an untimed call just before (the process was idle meanwhile).
              t = w.run(k["id"], call_timeout_s, pre=k["first_call_s"] < short_call_s)
            except RuntimeError as e:
              print(f"  {w.method}: {e}", flush=True)
              dead.add(w)
              continue
            if made[id(k)] >= n_warm:
              times[id(k)].append(t)
            made[id(k)] += 1
        for w, k in group:
          ts = times[id(k)]
          if len(ts) < 3:
            skipped.append({**k, "skipped": f"only {len(ts)} timed calls (worker failed)"})
            continue
          rec = {kk: v for kk, v in k.items() if kk not in ("kind", "id")}
          n_warm, _, note = plan[id(k)]
          rec.update(summarize_times(ts), n_warmup=n_warm + 1, n_timed=len(ts))
          if note:
            rec["note"] = note
          rec["qps"] = batch / (rec["call_ms_p50"] / 1e3)
          rec["step_ms"] = rec["call_ms_p50"] / ID_LEN
          rec["load_avg_1m"] = os.getloadavg()[0]
          (results if rec["method"] in METHODS else overhead).append(
              rec if rec["method"] in METHODS else {"kind": "variant", **rec})
          print(f"  [{time.perf_counter() - t_start:6.1f}s] {rec['method']:13s} {decoder:5s} "
                f"N={rec['n_ids']:>9,d} b{batch:<4d} {rec['qps']:10.1f} q/s "
                f"({rec['call_ms_p50']:.1f} ms/call, IQR {rec['spread_iqr_pct']:.0f}%)",
                flush=True)
  finally:
    for w in workers:
      w.close()

  # 3. Mask overhead: constrained vs unconstrained (vs decoder only), same process, interleaved.
  by = {(r["method"], r["decoder"], r["n_ids"], r["batch"]): r["call_ms_p50"]
        for r in results + [o for o in overhead if o.get("kind") == "variant"]}
  for (m, d, n, b), c in sorted(by.items()):
    if m == "cart" and ("unconstrained", d, n, b) in by:
      u, dec = by[("unconstrained", d, n, b)], by.get(("decoder_only", d, n, b))
      overhead.append({"kind": "mask_overhead", "decoder": d, "n_ids": n, "batch": b,
                       "beam": args.beam, "cart_ms": c, "unconstrained_ms": u,
                       "decoder_only_ms": dec, "mask_share_vs_unconstrained": (c - u) / c,
                       "search_share_beyond_decoder": None if dec is None else (c - dec) / c})
      print(f"  mask overhead {d} N={n:,} b{b}: cart {c:.1f} ms, unconstrained {u:.1f} ms, "
            f"decoder only " + ("-" if dec is None else f"{dec:.1f} ms"), flush=True)
  skipped = [{k: r[k] for k in ("method", "decoder", "n_ids", "batch", "skipped")}
             for r in skipped]

  report = {
      "machine": machine_info(),
      "command": " ".join(["python", os.path.relpath(__file__)] + (argv or sys.argv[1:])),
      "quick": args.quick, "beam": args.beam, "id_length": ID_LEN, "level_sizes": list(LEVEL_SIZES),
      "decoders": {
          "small": {"layers": N_LAYERS, "d_model": D_MODEL, "heads": N_HEADS, "d_mlp": D_MLP,
                    "src_len": SRC_LEN, "dtype": "float32", "kv_cache": True},
          "stub": "logits = table[last token] + position + query bias + prefix-hash term"},
      "threads_env": {k: env.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                              "MKL_NUM_THREADS", "XLA_FLAGS", "JAX_PLATFORMS")},
      "results": results, "mask_overhead": overhead, "skipped": skipped,
      "wall_s": time.perf_counter() - t_start,
  }
  report["summary"] = summarize(results, overhead)
  from cart_jax.core.artefacts import atomic_write_text
  atomic_write_text(args.json, json.dumps(report, indent=1))
  if args.plot:
    plot(report, args.plot)
  print(json.dumps(report["summary"], indent=1))
  print(f"wrote {args.json} in {report['wall_s']:.0f} s")
  return 0


def summarize(results: list[dict], overhead: list[dict]) -> dict:
  """The figures the issue asks for, where the sweep measured them."""
  def qps(method, decoder, n, b):
    for r in results:
      if (r["method"], r["decoder"], r["n_ids"], r["batch"]) == (method, decoder, n, b):
        return r.get("qps")
    return None

  s = {}
  for decoder in sorted({r["decoder"] for r in results}):
    for b in sorted({r["batch"] for r in results}):
      ns = sorted({r["n_ids"] for r in results
                   if r["method"] == "cart" and r["batch"] == b and r["decoder"] == decoder})
      if len(ns) >= 2:
        s[f"{decoder}/cart_qps_N{ns[-1]}_over_N{ns[0]}_b{b}"] = (
            qps("cart", decoder, ns[-1], b) / qps("cart", decoder, ns[0], b))
      for n in ns:
        c = qps("cart", decoder, n, b)
        for other in ("host_trie", "prefix_scan"):
          o = qps(other, decoder, n, b)
          if o:
            s[f"{decoder}/speedup_vs_{other}_N{n}_b{b}"] = c / o
  for o in overhead:
    if o.get("kind") == "mask_overhead":
      s[f"{o['decoder']}/mask_share_of_decode_N{o['n_ids']}_b{o['batch']}"] = (
          o["mask_share_vs_unconstrained"])
  for r in results:
    if r["method"] == "cart" and "trie_build_s" in r and r["n_ids"] == max(
        x["n_ids"] for x in results if x["method"] == "cart"):
      s[f"trie_build_N{r['n_ids']}"] = {"build_s": r["trie_build_s"],
                                        "memory_mb": r["trie_memory_bytes"] / 2**20,
                                        "max_fanout": r["max_fanout"]}
  return s


if __name__ == "__main__":
  sys.exit(main())
