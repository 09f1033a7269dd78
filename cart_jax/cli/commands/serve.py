"""``cart serve``: a trained run over HTTP, with micro-batched search and a search page.

  cart serve --model-dir /tmp/cart_emoji                 # http://127.0.0.1:8080/
  cart serve --model-dir /tmp/cart_emoji --rerank --port 9000 --max-batch 32 --max-wait-ms 10

Loads the run once (checkpoint and index verified, as ``cart search``), compiles the search for a
few batch sizes (1, 4, 16, ... up to ``--max-batch``; one log line each with its time), then serves:

  POST /search    {"query": "smiling cat", "k": 5, "modality": "image"}   (k, modality optional)
                  -> {"query", "k", "modality", "step", "results": [{"rank", "id", "identifier",
                     "score", "modality", "media_url", "media_type"}]};
                  {"queries": ["a", "b"], "k": 3} -> {"queries": [{"query", "results"}, ...], ...}
  GET  /          a search page: results as image thumbnails, audio or video players, with the
                  generated identifier and the score of each
  GET  /healthz   {"status": "ok", "step", "num_items", "modalities", "max_k", ...}
  GET  /metrics   requests, errors, the batch size histogram, latency p50/p90/p99
  GET  /media/ID  an item's media file (only the index's items, only image, audio and video
                  types; never a file whose real path leaves the corpus directory, the media roots
                  its corpus.json declares inside it, the corpora the run was built from and the
                  --media-root directories)

Concurrent requests are gathered into one search call of up to ``--max-batch`` queries; the first
request of a batch waits at most ``--max-wait-ms`` for others. At most ``--queue-size`` requests
wait; beyond that a request gets 503 at once. A bad request gets a 4xx with a JSON ``error``
message (bad JSON, a missing, empty or too long query, k outside 1..--beam, an unknown modality,
an unknown field, a content type other than JSON). SIGTERM (or Ctrl-C) stops accepting
connections, answers every request in flight and exits 0.

``--rerank`` re-sorts all ``--beam`` results of each query by the run's dual-tower re-ranker, as
``cart search --rerank``. Library: ``cart_jax.api.make_server``.
"""
from __future__ import annotations

import argparse

from cart_jax.cli import output
from cart_jax.cli.commands import float_in, int_at_least


def _sizes(value: str) -> tuple[int, ...]:
  try:
    sizes = tuple(int(v) for v in value.split(",") if v.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {value!r}") from None
  if not sizes or min(sizes) < 1:
    raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {value!r}")
  return sizes


def register(subparsers, name: str, help_text: str) -> argparse.ArgumentParser:
  from cart_jax.cli.commands.eval import add_model_dir_flag, add_rerank_flags  # pylint: disable=g-import-not-at-top
  p = subparsers.add_parser(name, help=help_text, description=__doc__,
                            formatter_class=output.HelpFormatter)
  add_model_dir_flag(p)
  p.add_argument("--host", default="127.0.0.1",
                 help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
  p.add_argument("--port", type=int_at_least(0), default=8080, help="port (default 8080; 0: any free one)")
  p.add_argument("--beam", type=int_at_least(1), default=10,
                 help="beam size, and the most results (k) a request may ask for (default 10)")
  p.add_argument("--max-batch", type=int_at_least(1), default=16,
                 help="most queries per search call (default 16)")
  p.add_argument("--max-wait-ms", type=float_in(0.0, what="a number of milliseconds"), default=5.0,
                 help="how long a request waits for others to join its batch (default 5)")
  p.add_argument("--queue-size", type=int_at_least(1), default=256,
                 help="most requests waiting; more get 503 (default 256)")
  p.add_argument("--batch-sizes", type=_sizes, default=None, metavar="B1,B2,...",
                 help="batch sizes compiled at start-up (default 1,4,16,... below --max-batch, "
                      "and --max-batch)")
  p.add_argument("--warm-modalities", action="store_true",
                 help="also compile each modality's search at start-up (a mixed index; otherwise "
                      "on its first request)")
  p.add_argument("--access-log", action="store_true", help="log one line per request")
  p.add_argument("--media-root", action="append", default=[], metavar="DIR",
                 help="a directory outside the corpus whose media may be served (repeatable; "
                      "media roots corpus.json declares outside the corpus are served only when "
                      "named here)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  add_rerank_flags(p, "re-sort each query's beam by the dual tower's cosine (the run's rerank/ weight)")
  p.set_defaults(func=run)
  return p


def run(args) -> int:
  import sys  # pylint: disable=g-import-not-at-top

  from cart_jax import api  # pylint: disable=g-import-not-at-top
  from cart_jax.cli.commands.eval import rerank_weight  # pylint: disable=g-import-not-at-top
  from cart_jax.serve import ServeConfig  # pylint: disable=g-import-not-at-top

  def log(line: str) -> None:
    print(f"cart serve: {line}", file=sys.stderr, flush=True)

  config = ServeConfig(host=args.host, port=args.port, beam=args.beam, max_batch=args.max_batch,
                       max_wait_ms=args.max_wait_ms, queue_size=args.queue_size,
                       batch_sizes=args.batch_sizes, warm_modalities=args.warm_modalities,
                       access_log=args.access_log, media_roots=tuple(args.media_root))
  with output.logs_to_stderr(args):
    server = api.make_server(args.model_dir, config, step=args.step, rerank=args.rerank,
                             rerank_weight=rerank_weight(args), embeddings=args.embeddings,
                             verify=args.verify, log=log)
  server.run()
  return 0
