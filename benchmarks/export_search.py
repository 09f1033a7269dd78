"""``cart export``: the exported search against the in-process one (issue 18 item 5).

Run (2-core CPU, ~2 min; builds the run of benchmarks/start_time.py once under --workdir):
  python benchmarks/export_search.py --json benchmarks/results/export_cpu.json
  python benchmarks/export_search.py --model-dir /tmp/cart_emoji_demo --json /tmp/export.json

Measured, on one run (``--model-dir``, or start_time.py's 300-emoji demo-model run):
  export       ``cart_jax.api.export`` (what ``cart export`` calls): seconds; the program's size
               (serialised StableHLO), the arguments' (weights + trie), the directory's
  round trip   the test queries of the run's corpus (up to ``--queries``) through the exported
               program (``load_exported(...).search``) and through ``cart_jax.api.search`` (what
               ``cart search`` calls): same top-k items in the same order, largest score difference
  start        ``load_exported`` + first call (deserialise, compile) against ``load_run`` + the
               searcher's warm-up (restore the checkpoint, compile), in this one process
  latency      one batch of ``--batch-size`` queries, text in -> top-k item ids out (tokenising
               included on both sides), after warm-up: median / p90 over ``--reps`` calls of the
               exported search and of the in-process ``CartSearcher`` built as ``cart search``
               builds it (``searcher_for_run``), same batch size, beam and k
The 1-minute load average is recorded before and after each part.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/export_search.py` from a checkout
  sys.path.insert(0, str(ROOT))

from benchmarks.driver_common import load_average, log, repeat_seconds  # noqa: E402
from benchmarks.start_time import small_run  # noqa: E402


def _timed(fn, reps: int) -> dict:
  times = repeat_seconds(fn, reps)
  return {"median_ms": round(1e3 * statistics.median(times), 3),
          "p90_ms": round(1e3 * times[min(len(times) - 1, int(0.9 * len(times)))], 3),
          "min_ms": round(1e3 * times[0], 3), "reps": reps}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model-dir", default=None, help="a trained run (default: build a small one)")
  ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "cart_start_time"))
  ap.add_argument("--batch-size", type=int, default=8)
  ap.add_argument("-k", type=int, default=10)
  ap.add_argument("--queries", type=int, default=128, help="round-trip queries (test split)")
  ap.add_argument("--reps", type=int, default=30)
  ap.add_argument("--json", default=None)
  args = ap.parse_args()

  from cart_jax import api  # pylint: disable=g-import-not-at-top
  from cart_jax.inference.exported import load_exported  # pylint: disable=g-import-not-at-top
  from cart_jax.runs.restore import load_run  # pylint: disable=g-import-not-at-top
  from cart_jax.inference.searcher import searcher_for_run  # pylint: disable=g-import-not-at-top

  model_dir = Path(args.model_dir) if args.model_dir else small_run(Path(args.workdir))
  tmp = Path(tempfile.mkdtemp(prefix="cart-export-bench-"))
  out = tmp / "search.cart-export"
  doc: dict = {"benchmark": "cart export: exported search vs in-process search",
               "script": "python benchmarks/export_search.py " + " ".join(sys.argv[1:]),
               "model_dir": str(model_dir), "batch_size": args.batch_size, "k": args.k,
               "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                           "python": platform.python_version()}}
  try:
    load0 = load_average()
    summary = api.export(model_dir, out, batch_size=args.batch_size, k=args.k, log=lambda s: None)
    doc["export"] = {k: summary[k] for k in ("seconds", "program_bytes", "arguments_bytes",
                                             "total_bytes", "n_items", "beam_size", "input_length",
                                             "platforms")}
    doc["export"]["load"] = [load0, load_average()]
    log(f"exported in {summary['seconds']:.1f} s: program {summary['program_bytes']} B, "
        f"arguments {summary['arguments_bytes']} B")

    # start: loader vs run
    load0 = load_average()
    t0 = time.perf_counter()
    s = load_exported(out)
    t_load = time.perf_counter() - t0
    s.search(["warm up"], k=args.k)
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    r = load_run(model_dir)
    searcher = searcher_for_run(r, beam_size=s.beam_size, n_results=args.k,
                                batch_size=args.batch_size)
    t_run = time.perf_counter() - t0
    searcher.search_texts(r.params, r.frozen, ["warm up"])
    t_run_first = time.perf_counter() - t0
    doc["start"] = {"exported_load_s": round(t_load, 3), "exported_load_and_first_call_s": round(t_first, 3),
                    "in_process_load_run_s": round(t_run, 3),
                    "in_process_load_and_first_call_s": round(t_run_first, 3),
                    "load": [load0, load_average()]}
    log(f"start: exported {t_first:.2f} s, in-process {t_run_first:.2f} s")

    # round trip
    texts, _ = r.corpus.pairs("test", "query")
    texts = texts[:args.queries]
    load0 = load_average()
    got = s.search(texts, k=args.k)
    ref = api.search(model_dir, texts, k=args.k)
    same_ids = sum(1 for g, f in zip(got, ref)
                   if [d["item_id"] for d in g["results"]] == [d["item_id"] for d in f["results"]])
    diffs = [abs(a["score"] - b["score"]) for g, f in zip(got, ref)
             for a, b in zip(g["results"], f["results"])]
    doc["round_trip"] = {"queries": len(texts), "same_ranked_ids": same_ids,
                         "max_abs_score_diff": float(max(diffs)) if diffs else None,
                         "load": [load0, load_average()]}
    log(f"round trip: {same_ids}/{len(texts)} queries with the same ranked ids, max |score diff| "
        f"{doc['round_trip']['max_abs_score_diff']:.2e}")

    # latency, one batch, warm
    batch = texts[:args.batch_size]
    load0 = load_average()
    exported = _timed(lambda: s.search(batch, k=args.k), args.reps)
    in_process = _timed(lambda: searcher.search_texts(r.params, r.frozen, batch), args.reps)
    exported2 = _timed(lambda: s.search(batch, k=args.k), args.reps)  # again: drift check
    doc["latency_batch"] = {"exported": exported, "in_process": in_process,
                            "exported_again": exported2, "load": [load0, load_average()]}
    log(f"batch of {len(batch)}: exported {exported['median_ms']:.1f} ms (again "
        f"{exported2['median_ms']:.1f}), in-process {in_process['median_ms']:.1f} ms")
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  if args.json:
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
  print(json.dumps({k: doc[k] for k in ("export", "start", "round_trip", "latency_batch")}, indent=2))


if __name__ == "__main__":
  main()
