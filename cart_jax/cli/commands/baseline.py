"""``cart baseline``: the dual-tower baseline CART is measured against.

  cart baseline --corpus corpora/emoji --embeddings emb/emoji.npy --split test --json base.json
  cart baseline --corpus corpora/emoji --embeddings emb/emoji.npy --json - --quiet   # JSON on stdout
  cart baseline ... --method faiss-flat      # or faiss-ivf [--nlist 64 --nprobe 8]
  cart baseline ... --agreement faiss-flat   # also check top-k against another method

Each ``--split`` query text (``kind=query``) goes through the text tower (MiniLM + the
projection of ``E.model.npz`` written by ``cart embed``), then an exhaustive top-k search over
every item embedding. Reports r@1, r@5, r@10, mrr@10 and qps (the one evaluator of
``cart_jax.inference.evaluation``, as ``cart eval``) with query encoding included (compilation
excluded and reported apart); library: ``cart_jax.api.baseline``.

Query side, in order: ``--query-embeddings Q.npy`` (rows = the split's query texts in corpus
order; queries/s then counts search only), ``--model`` (default: the ``E.model.npz`` next to the
embeddings), or plain MiniLM sentence embeddings when the items are 384-d and no model exists.
"""
from __future__ import annotations

import argparse

from cart_jax.cli import output
from cart_jax.cli.commands import int_at_least


def register(subparsers, name: str, help_text: str) -> argparse.ArgumentParser:
  p = subparsers.add_parser(name, help=help_text, description=__doc__,
                            formatter_class=output.HelpFormatter)
  p.add_argument("--corpus", required=True, help="corpus directory")
  p.add_argument("--embeddings", required=True, help="item embeddings (.npy/.npz) from cart embed")
  output.add_argument(p, "--item-ids", "--ids", dest="item_ids", default=None,
                 help="ids of the embedding rows (default: <E>.ids.txt)")
  p.add_argument("--model", default=None, help="dual-encoder model (default: <E>.model.npz)")
  p.add_argument("--query-embeddings", default=None,
                 help="precomputed query embeddings [num queries of the split, d] (.npy)")
  p.add_argument("--split", choices=("train", "val", "test"), default="test")
  p.add_argument("--items", default=None, metavar="FILE",
                 help="only the queries of these items (ids one per line); all items are searched")
  p.add_argument("--method", choices=("jax", "faiss-flat", "faiss-ivf"), default="jax")
  p.add_argument("-k", type=int, default=10, help="results per query (>= 10 for R@10/MRR@10)")
  p.add_argument("--chunk-size", type=int_at_least(1), default=65536, help="jax: items per scan step")
  output.add_argument(p, "--batch-size", "--query-batch", dest="batch_size", type=int_at_least(1), default=256,
                 help="jax: queries per compiled call")
  p.add_argument("--text-batch", type=int_at_least(1), default=128, help="MiniLM batch size")
  p.add_argument("--nlist", type=int_at_least(1), default=None, help="faiss-ivf: cells (default ~4 sqrt N)")
  p.add_argument("--nprobe", type=int_at_least(1), default=8, help="faiss-ivf: cells visited (default 8)")
  p.add_argument("--agreement", choices=("jax", "faiss-flat", "faiss-ivf"), default=None,
                 help="also search with this method and report how often the top-k lists agree")
  output.add_output_flags(p, "the JSON summary")
  p.set_defaults(func=run)
  return p


def run(args) -> int:
  from cart_jax import api
  with output.logs_to_stderr(args):
    summary = api.baseline(
        args.embeddings, args.corpus, ids=args.item_ids, model=args.model,
        query_embeddings=args.query_embeddings, split=args.split, items=args.items,
        method=args.method, k=args.k, chunk_size=args.chunk_size, query_batch=args.batch_size,
        text_batch=args.text_batch, nlist=args.nlist, nprobe=args.nprobe, agreement=args.agreement,
        progress=not args.quiet)
  output.emit(args, summary)
  return 0
