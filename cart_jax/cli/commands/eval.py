"""``cart eval``: recall of a trained CART run on a split's queries.

  cart eval --model_dir /tmp/cart_emoji --split test --json /tmp/cart_emoji/eval_test.json

Constrained beam search (beam 10) over every ``--split`` query (``kind=query``) of the corpus the
run was trained on (``MODEL_DIR/run.json``), against the run's own index copy. Reports R@1, R@5,
R@10, MRR@10 (cart_jax.inference.metrics, as the dual-tower baseline) and queries/s: one timed pass after a
warm-up that compiled the search (tokenisation + encoder + beam search included; compile time
reported apart). Settings may also come from gin (gin_configs/runs/eval.gin, EvalConfig.*).

``--modality image|audio|video`` (an index over several modalities, from ``cart data merge``):
only the queries whose target item has that modality, searched against the trie of that
modality's identifiers; ``unrestricted`` then reports the same queries over the whole index and
how many of its top-1 results were items of another modality.

  cart eval --model_dir /tmp/cart_mixed --split test --modality audio

``--rerank`` (a run with a MiniLM encoder): also CART + re-ranking, i.e. the same beams (all
``--beam`` of them) re-sorted by ``logp + weight * cos``, the dual tower's query-item cosine
(GENIUS-style re-ranking; ``beam`` dot products per query, whatever the number of items). One
search pass serves both rows; ``rerank`` in the JSON holds R@k, MRR@10, queries/s (search + host
re-ranking) and the weight. The re-ranker lives in ``MODEL_DIR/rerank/`` (``cart train`` builds it
when EMBEDDINGS is set); ``--embeddings E.npy`` (the ``cart embed`` output, with ``E.model.npz``)
builds it, tunes the weight on ``val`` and stores it in the run. ``--rerank-weight W`` (a number
or ``cosine``) overrides the stored weight.

  cart eval --model_dir /tmp/cart_emoji --rerank --embeddings emb/emoji.npy   # first time
  cart eval --model_dir /tmp/cart_emoji --rerank
"""
from __future__ import annotations

import argparse


def add_rerank_flags(p: argparse.ArgumentParser, rerank_help: str) -> None:
  """``--rerank``, ``--rerank-weight``, ``--embeddings``: shared by ``cart eval`` and ``cart search``."""
  p.add_argument("--rerank", action="store_true", help=rerank_help)
  p.add_argument("--rerank-weight", default=None, metavar="W",
                 help="re-rank weight (a number >= 0 or 'cosine'; default: the run's tuned one)")
  p.add_argument("--embeddings", default=None, metavar="E.npy",
                 help="build the run's re-ranker from these `cart embed` outputs (weight tuned on "
                      "val, stored in MODEL_DIR/rerank/); implies --rerank")


def register(subparsers, name: str, help_text: str) -> argparse.ArgumentParser:
  from cart_jax.cli.commands.train import add_gin_flags
  p = subparsers.add_parser(name, help=help_text, description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model-dir", "--model_dir", dest="model_dir", required=True, help="a MODEL_DIR written by cart train")
  p.add_argument("--split", choices=("train", "val", "test"), default=None, help="default test")
  p.add_argument("--beam", type=int, default=None, help="beam size (default 10)")
  p.add_argument("--batch", type=int, default=None, help="queries per compiled call (default 64)")
  p.add_argument("--limit", type=int, default=None, help="only the first N queries")
  p.add_argument("--modality", default=None, metavar="MODALITY",
                 help="only queries of items of this modality, against that modality's trie")
  p.add_argument("--items", default=None, metavar="FILE",
                 help="only the queries of these items (ids one per line, e.g. the corpus's "
                      "unseen_items.txt); the whole index is still searched")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  add_rerank_flags(p, "also report CART + dual-tower re-ranking of the same beams")
  p.add_argument("--json", default=None, metavar="PATH", help="write the metrics here")
  add_gin_flags(p)
  p.set_defaults(func=run)
  return p


def run(args) -> int:
  import json

  from cart_jax.core.errors import CartError
  from cart_jax.data.corpus import CorpusFormatError
  from cart_jax.index.inputs import InputError
  from cart_jax.inference.evaluation import eval_job
  from cart_jax.inference.runs import RunError
  from cart_jax.inference.searcher import ModalityError

  split, beam, batch, limit = "test", 10, 64, None
  if args.gin_file or args.gin_bindings:
    from cart_jax.cli import gin_config as cli_gin
    try:
      cli_gin.parse(args.gin_file, args.gin_bindings)
    except (ValueError, OSError) as e:
      raise CartError(f"gin: {e}") from None
    ec = cli_gin.eval_config()
    split, beam, batch, limit = ec.split, ec.beam_size, ec.batch_size, ec.limit
  split = args.split or split
  beam = args.beam or beam
  batch = args.batch or batch
  limit = args.limit if args.limit is not None else limit
  if beam < 10:
    raise CartError(f"--beam {beam}: R@10 and MRR@10 need a beam of at least 10")
  rerank = bool(args.rerank or args.embeddings or args.rerank_weight is not None)
  weight = None
  if args.rerank_weight is not None:
    from cart_jax.inference.rerank import RerankError, parse_weight
    try:
      weight = parse_weight(args.rerank_weight)
    except RerankError as e:
      raise CartError(f"--rerank-weight: {e}") from None
  import sys
  items, loaded = None, None
  if args.items is not None:
    from cart_jax.data.corpus import read_item_ids
    from cart_jax.inference.runs import load_run
    try:
      loaded = load_run(args.model_dir, args.step)
      items = read_item_ids(args.items, loaded.corpus)
    except (RunError, CorpusFormatError) as e:
      raise CartError(str(e)) from None
  try:
    summary = eval_job(args.model_dir, split=split, beam_size=beam, batch_size=batch, limit=limit,
                       step=args.step, modality=args.modality, rerank=rerank, rerank_weight=weight,
                       embeddings=args.embeddings, log=lambda m: print(m, file=sys.stderr),
                       items=items, loaded=loaded)
  except ModalityError as e:
    raise CartError(f"--modality {args.modality}: {e}") from None
  except (RunError, CorpusFormatError, InputError, FileNotFoundError) as e:
    raise CartError(str(e)) from None
  print(json.dumps(summary, indent=2))
  if "rerank" in summary:  # side by side, on stderr (stdout stays one JSON document)
    rr = summary["rerank"]
    print(f"{'method':<14} {'R@1':>7} {'R@5':>7} {'R@10':>7} {'MRR@10':>7} {'queries/s':>10}", file=sys.stderr)
    for name, m in (("CART", summary), ("CART + rerank", rr)):
      print(f"{name:<14} {m['r@1']:>7.3f} {m['r@5']:>7.3f} {m['r@10']:>7.3f} {m['mrr@10']:>7.3f} "
            f"{m['qps']:>10.1f}", file=sys.stderr)
    print(f"re-rank weight {rr['weight']}; top-1 changed for {rr['top1_changed']:.1%} of the queries",
          file=sys.stderr)
  if args.json:
    from cart_jax.core.artefacts import atomic_write_json
    atomic_write_json(args.json, summary)
  return 0
