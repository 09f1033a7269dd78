"""Start time of ``cart search`` without, then with the persistent compilation cache (issue 18 item 4).

Run (2-core CPU: ~2 min to build the run once, then ~20 s per timed command):
  python benchmarks/start_time.py --json benchmarks/results/start_time_cpu.json
  python benchmarks/start_time.py --model-dir /tmp/cart_emoji_demo --repeats 5 --json /tmp/st.json

What is timed: the wall time of the whole command, from process start to exit, as a user runs it:
  cart search --model-dir RUN "smiling cat" -k 5 --quiet --json -
(``python -m cart_jax.cli.main``: the console script's code). Three kinds of start, interleaved
per repeat so a change in machine load hits all three alike:
  no_cache   ``cart --no-compile-cache search ...``: compiles everything (the state before issue 18)
  first      the cache on, its directory empty: compiles everything and writes the cache
  second     the cache on, filled by ``first``: loads the compiled programs instead
Each repeat has its own fresh cache directory. Every command also reports (through
``compile_cache.stats`` in the same process) how many programs it compiled, loaded and wrote, so
the JSON shows that ``second`` compiled nothing. The 1-minute load average is recorded with
every command.

The run (``--model-dir`` absent): built once under ``--workdir`` and reused: 300 emoji, random
384-d unit item embeddings, identifiers K=16 x 2 levels of 16 codes (+ counter), the demo's model
(``gin_configs/experiments/emoji_demo.gin``: frozen MiniLM-L6 + a 2-layer 256-wide fused decoder)
trained 30 steps. Start-up cost depends on the model and index shapes, not on what was learnt.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/start_time.py` from a checkout
  sys.path.insert(0, str(ROOT))

from benchmarks.driver_common import load_average, log  # noqa: E402

QUERY = "smiling cat"
KINDS = ("no_cache", "first", "second")
# `cart ...` in this fresh process, then the compilation cache's counts on the last line.
WRAPPER = """
import json, sys
from cart_jax.cli.main import main
from cart_jax.core import compile_cache
rc = main(sys.argv[1:])
st = compile_cache.stats()
print(json.dumps({"rc": rc, "requests": st.requests, "hits": st.hits, "writes": st.writes,
                  "seconds_saved": round(st.seconds_saved, 3)}), file=sys.stderr)
"""


def small_run(workdir: Path, *, items: int = 300, steps: int = 30) -> Path:
  """The benchmark's trained run under ``workdir`` (built once, then reused)."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  from cart_jax import api  # pylint: disable=g-import-not-at-top
  from cart_jax.cli import gin_bridge  # pylint: disable=g-import-not-at-top
  from cart_jax.index.identifiers import IdentifierConfig  # pylint: disable=g-import-not-at-top
  run = workdir / "run"
  if (run / "train_summary.json").exists():
    return run
  corpus, index = workdir / "corpus", workdir / "index"
  if not (corpus / "corpus.json").exists():
    api.prepare("emoji", corpus, limit=items, overwrite=True)
  from cart_jax.data.corpus import load_corpus  # pylint: disable=g-import-not-at-top
  item_ids = load_corpus(corpus, check_media=False).item_ids
  emb = np.random.default_rng(0).standard_normal((len(item_ids), 384)).astype(np.float32)
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  workdir.mkdir(parents=True, exist_ok=True)
  np.save(workdir / "E.npy", emb)
  (workdir / "E.ids.txt").write_text("".join(i + "\n" for i in item_ids), encoding="utf-8")
  if not (index / "meta.json").exists():
    api.build_index(workdir / "E.npy", index, IdentifierConfig(n_clusters=16, num_levels=2,
                                                               codebook_size=16, rq_steps=100),
                    item_ids=workdir / "E.ids.txt")
  gin_bridge.train(["gin_configs/experiments/emoji_demo.gin"],
            [f"MODEL_DIR='{run}'", f"CORPUS_DIR='{corpus}'", f"INDEX_DIR='{index}'",
             f"TrainConfig.num_steps={steps}", f"TrainConfig.checkpoint_every={steps}",
             "TrainConfig.warmup_steps=5", "TrainConfig.log_every=10",
             "InputConfig.batch_size=32"], progress=False)
  return run


def timed_search(model_dir: Path, cache_dir: Path, kind: str) -> dict:
  """One ``cart search`` in a fresh process: wall seconds, the cache's counts, the load."""
  env = dict(os.environ, CART_JAX_CACHE_DIR=str(cache_dir))
  env.pop("CART_JAX_COMPILE_CACHE", None)
  flags = ["--no-compile-cache"] if kind == "no_cache" else []
  argv = [sys.executable, "-c", WRAPPER, *flags, "search", "--model-dir", str(model_dir), QUERY,
          "-k", "5", "--quiet", "--json", "-"]
  load_before = load_average()
  t0 = time.perf_counter()
  proc = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=ROOT)
  wall = time.perf_counter() - t0
  if proc.returncode != 0:
    raise SystemExit(f"{kind}: cart search failed:\n{proc.stderr[-3000:]}")
  counts = json.loads(proc.stderr.strip().splitlines()[-1])
  top = json.loads(proc.stdout)["queries"][0]["results"][0]["item_id"]
  return {"kind": kind, "wall_s": round(wall, 3), "load_before": load_before,
          "load_after": load_average(), "top_item": top,
          **{k: counts[k] for k in ("requests", "hits", "writes", "seconds_saved")}}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model-dir", default=None, help="a trained run (default: build a small one)")
  ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "cart_start_time"))
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--json", default=None, help="write the results here")
  args = ap.parse_args()

  t0 = time.perf_counter()
  model_dir = Path(args.model_dir) if args.model_dir else small_run(Path(args.workdir))
  log(f"run: {model_dir} (ready in {time.perf_counter() - t0:.0f} s)")
  runs = []
  with tempfile.TemporaryDirectory(prefix="cart-start-time-") as tmp:
    for rep in range(args.repeats):
      cache = Path(tmp) / f"cache{rep}"
      for kind in KINDS:
        r = timed_search(model_dir, cache, kind)
        r["repeat"] = rep
        if kind != "no_cache":
          r["cache_entries"] = sum(1 for p in cache.iterdir() if p.name.endswith("-cache"))
        runs.append(r)
        log(f"repeat {rep} {kind:>8}: {r['wall_s']:.2f} s  (compiled+written {r['writes']}, "
            f"loaded {r['hits']}, load {r['load_before']} -> {r['load_after']})")
  summary = {}
  for kind in KINDS:
    w = [r["wall_s"] for r in runs if r["kind"] == kind]
    summary[kind] = {"median_s": round(statistics.median(w), 3), "min_s": min(w), "max_s": max(w),
                     "n": len(w)}
  summary["second_vs_no_cache_s"] = round(summary["no_cache"]["median_s"]
                                          - summary["second"]["median_s"], 3)
  run_json = json.loads((model_dir / "run.json").read_text())
  doc = {
      "benchmark": "cart search start time, persistent compilation cache off / empty / filled",
      "command": f"cart search --model-dir RUN {QUERY!r} -k 5 --quiet --json -",
      "script": "python benchmarks/start_time.py " + " ".join(sys.argv[1:]),
      "model_dir": str(model_dir),
      "model": {k: run_json["model_config"].get(k) for k in ("encoder", "d_model",
                                                             "num_decoder_layers", "fusion")},
      "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                  "python": platform.python_version(), "jax": _jax_version()},
      "summary": summary,
      "runs": runs,
  }
  text = json.dumps(doc, indent=2)
  if args.json:
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(text + "\n")
  print(json.dumps(summary, indent=2))


def _jax_version() -> str:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.__version__


if __name__ == "__main__":
  main()
