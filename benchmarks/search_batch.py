"""Queries/s of CART's search over the batch size: the per-device default of ``cart eval``.

Run:
  python benchmarks/search_batch.py --json benchmarks/results/search_batch_cpu.json   # ~3 min, 2-core CPU
  python benchmarks/search_batch.py --batches 64,256,1024,4096 --json search_batch_gpu.json   # on a GPU

The accurate recipe's network (``minilm_frozen``: frozen MiniLM-L6, 2-layer fused decoder, random
weights: speed does not depend on them) over the trie of N random identifiers of
``benchmarks/throughput.py`` (L = 5), searched by ``CartSearcher.search_ids`` (token ids in, top-10
rows out on the host), 32 tokens per query, beam 10. Every batch size gets its own compiled program
(compiled before timing); the timed rounds visit the batch sizes in alternating order (forward,
then backward, ...) so a drift in the machine's load touches every size alike. Each round times
``--queries`` queries (whole batches) per size; the report keeps the median q/s over rounds, the
process CPU seconds per query, and the load average.

``knee``: the smallest batch whose median q/s is within ``--within`` (default 5%) of the best:
more queries per call than that buy latency, not throughput. A candidate for
``cart_jax.inference.searcher.DEFAULT_BATCH_SIZE`` on this device; check it against ``cart eval
--batch-size`` on a real run before changing the default (on the 2-core CPU the knee here is 16, but
the emoji demo run's ``cart eval`` is faster at 64, so the default stayed 64).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import types


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batches", default="1,8,16,32,64,128,256,512", help="comma list of batch sizes")
  ap.add_argument("--n_items", type=int, default=100_000)
  ap.add_argument("--queries", type=int, default=512, help="queries timed per batch size and round")
  ap.add_argument("--rounds", type=int, default=4)
  ap.add_argument("--within", type=float, default=0.05)
  ap.add_argument("--model", default="minilm_frozen")
  ap.add_argument("--json", default=None)
  args = ap.parse_args(argv)
  batches = [int(x) for x in args.batches.split(",")]
  if any(b < 1 for b in batches) or args.queries < 1 or args.rounds < 1:
    ap.error("--batches, --queries and --rounds must be >= 1")

  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import throughput as tp  # pylint: disable=g-import-not-at-top
  from cart_jax.index.vocab import IdentifierVocab  # pylint: disable=g-import-not-at-top
  from cart_jax.inference.searcher import CartSearcher, default_batch_size  # pylint: disable=g-import-not-at-top
  from cart_jax.models.cart import config as mcfg  # pylint: disable=g-import-not-at-top
  from cart_jax.models.cart.network import create_model  # pylint: disable=g-import-not-at-top
  from cart_jax.models.text.tokenizer import WordPieceTokenizer  # pylint: disable=g-import-not-at-top

  cfg = mcfg.get_config(args.model, output_vocab_size=2 + sum(tp.LEVEL_SIZES), dropout_rate=0.0)
  graphdef, params, frozen = nnx.split(create_model(cfg, seed=0, host_init=True), nnx.Param, ...)
  index = types.SimpleNamespace(codes=tp.make_codes(args.n_items), vocab=IdentifierVocab(tp.LEVEL_SIZES),
                                n_items=args.n_items)
  tok = WordPieceTokenizer.from_file()
  searchers, compile_s, ids = {}, {}, {}
  for b in batches:
    q = max(b, (args.queries // b) * b)  # whole batches
    ids[b] = tok.encode_batch(tp.make_texts(q, seed=b), tp.SRC_LEN)[0]
    searchers[b] = CartSearcher(graphdef, index, beam_size=10, n_results=tp.TOP_K,
                                input_length=tp.SRC_LEN, batch_size=b)
    compile_s[b] = round(searchers[b].warm_up(params, frozen), 2)
    searchers[b].search_ids(params, frozen, ids[b][:b])  # one more warm call
    print(f"batch {b}: compiled in {compile_s[b]:.1f} s", file=sys.stderr, flush=True)
  qps = {b: [] for b in batches}
  cpu = {b: [] for b in batches}
  loads = []
  for r in range(args.rounds):
    order = batches if r % 2 == 0 else batches[::-1]
    loads.append(os.getloadavg()[0])
    for b in order:
      c0, t0 = time.process_time(), time.perf_counter()
      searchers[b].search_ids(params, frozen, ids[b])
      wall, used = time.perf_counter() - t0, time.process_time() - c0
      qps[b].append(len(ids[b]) / wall)
      cpu[b].append(1e3 * used / len(ids[b]))
    print(f"round {r}: " + ", ".join(f"B{b} {qps[b][-1]:.0f}" for b in batches), file=sys.stderr, flush=True)
  loads.append(os.getloadavg()[0])
  med = {b: statistics.median(v) for b, v in qps.items()}
  best = max(med.values())
  knee = min(b for b in batches if med[b] >= (1 - args.within) * best)
  report = {
      "command": " ".join(["python", "benchmarks/search_batch.py"] + list(argv or sys.argv[1:])),
      "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "backend": jax.default_backend(),
                  "device": jax.devices()[0].device_kind},
      "settings": {"model": args.model, "n_items": args.n_items, "beam": 10, "src_len": tp.SRC_LEN,
                   "queries_per_round": args.queries, "rounds": args.rounds, "order": "alternating"},
      "results": [{"batch": b, "qps_median": round(med[b], 1), "qps_rounds": [round(x, 1) for x in qps[b]],
                   "cpu_ms_per_query": round(statistics.median(cpu[b]), 3), "compile_s": compile_s[b]}
                  for b in batches],
      "knee": {"batch": knee, "within": args.within, "best_qps": round(best, 1)},
      "library_default": default_batch_size(),
      "load1": {"min": round(min(loads), 2), "max": round(max(loads), 2)}}
  text = json.dumps(report, indent=1)
  if args.json:
    from cart_jax.core.artefacts import atomic_write_text  # pylint: disable=g-import-not-at-top
    atomic_write_text(args.json, text + "\n")
  for row in report["results"]:
    print(f"batch {row['batch']:>5}: {row['qps_median']:8.1f} q/s  {row['cpu_ms_per_query']:.2f} CPU ms/query")
  print(f"knee: batch {knee} (within {args.within:.0%} of the best {best:.1f} q/s); "
        f"library default here: {report['library_default']}; load {report['load1']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
