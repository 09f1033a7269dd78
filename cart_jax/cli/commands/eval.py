"""``cart eval``: recall of a trained CART run on a split's queries.

  cart eval --model-dir /tmp/cart_emoji --split test --json /tmp/cart_emoji/eval_test.json

Constrained beam search (beam 10) over every ``--split`` query (``kind=query``) of the corpus the
run was trained on (``MODEL_DIR/run.json``), against the run's own index copy. Reports R@1, R@5,
R@10, MRR@10 and queries/s (keys r@1, r@5, r@10, mrr@10, qps: the one evaluator of
cart_jax.inference.evaluation, as ``cart baseline``): one timed pass after a warm-up that compiled
the search (tokenisation + encoder + beam search included; compile time reported apart).
Settings may also come from gin (gin_configs/runs/eval.gin, EvalConfig.*). ``--json -`` prints the
JSON alone on stdout. Library: ``cart_jax.api.evaluate``.

``--modality image|audio|video`` (an index over several modalities, from ``cart data merge``):
only the queries whose target item has that modality, searched against the trie of that
modality's identifiers; ``unrestricted`` then reports the same queries over the whole index and
how many of its top-1 results were items of another modality.

  cart eval --model-dir /tmp/cart_mixed --split test --modality audio

``--rerank`` (a run with a MiniLM encoder): also CART + re-ranking, i.e. the same beams (all
``--beam`` of them) re-sorted by ``logp + weight * cos``, the dual tower's query-item cosine
(GENIUS-style re-ranking; ``beam`` dot products per query, whatever the number of items). One
search pass serves both rows; ``rerank`` in the JSON holds R@k, MRR@10, queries/s (search + host
re-ranking) and the weight. The re-ranker lives in ``MODEL_DIR/rerank/`` (``cart train`` builds it
when EMBEDDINGS is set); ``--embeddings E.npy`` (the ``cart embed`` output, with ``E.model.npz``)
builds it, tunes the weight on ``val`` and stores it in the run. ``--rerank-weight W`` (a number
or ``cosine``) overrides the stored weight.

  cart eval --model-dir /tmp/cart_emoji --rerank --embeddings emb/emoji.npy   # first time
  cart eval --model-dir /tmp/cart_emoji --rerank

Integrity: the checkpoint step is checked against its ``manifest.sha256.json`` (the SHA-256 of
every file, written after the save) and the index copy against ``meta.sha256``/``meta.json``
before anything is loaded; a corrupt, truncated, added or missing file is one error line naming
the file and the step (exit 2), never metrics. A checkpoint from before manifests loads with a
warning. ``--no-verify`` skips hashing the checkpoint (it reads every byte of the restored items
once: 0.09 s for a 148 MiB ``minilm_small`` checkpoint on a 2-core CPU).
"""
from __future__ import annotations

import argparse

from cart_jax.cli import output


def add_rerank_flags(p: argparse.ArgumentParser, rerank_help: str) -> None:
  """``--rerank``, ``--rerank-weight``, ``--embeddings``: shared by ``cart eval`` and ``cart search``."""
  p.add_argument("--rerank", action="store_true", help=rerank_help)
  p.add_argument("--rerank-weight", default=None, metavar="W",
                 help="re-rank weight (a number >= 0 or 'cosine'; default: the run's tuned one)")
  p.add_argument("--embeddings", default=None, metavar="E.npy",
                 help="build the run's re-ranker from these `cart embed` outputs (weight tuned on "
                      "val, stored in MODEL_DIR/rerank/); implies --rerank")


def rerank_weight(args) -> float | None:
  """``--rerank-weight`` parsed (None when not given); a bad value names the flag."""
  if args.rerank_weight is None:
    return None
  from cart_jax.core.errors import CartError
  from cart_jax.inference.rerank import RerankError, parse_weight
  try:
    return parse_weight(args.rerank_weight)
  except RerankError as e:
    raise CartError(f"--rerank-weight: {e}") from None


def add_model_dir_flag(p: argparse.ArgumentParser) -> None:
  output.add_argument(p, "--model-dir", "--model_dir", dest="model_dir", required=True,
                      help="a MODEL_DIR written by cart train")
  p.add_argument("--no-verify", dest="verify", action="store_false",
                 help="do not check the checkpoint against its manifest.sha256.json (faster for "
                      "very large checkpoints; a corrupt file then goes unnoticed)")


def register(subparsers, name: str, help_text: str) -> argparse.ArgumentParser:
  from cart_jax.cli.commands.train import add_gin_flags
  p = subparsers.add_parser(name, help=help_text, description=__doc__,
                            formatter_class=output.HelpFormatter)
  add_model_dir_flag(p)
  p.add_argument("--split", choices=("train", "val", "test"), default=None, help="default test")
  p.add_argument("--beam", type=int, default=None, help="beam size (default 10)")
  output.add_argument(p, "--batch-size", "--batch", dest="batch_size", type=int, default=None,
                      help="queries per compiled call (>= 1; default per device: 64 on CPU, "
                           "1024 on a GPU or TPU, times the number of devices)")
  p.add_argument("--limit", type=int, default=None, help="only the first N queries")
  p.add_argument("--modality", default=None, metavar="MODALITY",
                 help="only queries of items of this modality, against that modality's trie")
  p.add_argument("--items", default=None, metavar="FILE",
                 help="only the queries of these items (ids one per line, e.g. the corpus's "
                      "unseen_items.txt); the whole index is still searched")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  add_rerank_flags(p, "also report CART + dual-tower re-ranking of the same beams")
  output.add_output_flags(p, "the metrics")
  add_gin_flags(p)
  p.set_defaults(func=run)
  return p


def run(args) -> int:
  import sys

  from cart_jax import api
  from cart_jax.core.errors import CartError
  from cart_jax.inference.searcher import ModalityError

  ec = _gin_eval_config(args)
  split = args.split or ec.get("split", "test")
  try:
    with output.logs_to_stderr(args):
      summary = api.evaluate(
          args.model_dir, split=split, beam_size=_given(args.beam, ec.get("beam_size", 10)),
          batch_size=_given(args.batch_size, ec.get("batch_size")),
          limit=_given(args.limit, ec.get("limit")), step=args.step,
          modality=args.modality, items=args.items, rerank=args.rerank,
          rerank_weight=rerank_weight(args), embeddings=args.embeddings, progress=not args.quiet,
          verify=args.verify)
  except ModalityError as e:
    raise CartError(f"--modality {args.modality}: {e}") from None
  output.emit(args, summary)
  if "rerank" in summary and not args.quiet:  # side by side, on stderr (stdout stays one JSON document)
    rr = summary["rerank"]
    print(f"{'method':<14} {'R@1':>7} {'R@5':>7} {'R@10':>7} {'MRR@10':>7} {'queries/s':>10}", file=sys.stderr)
    for name, m in (("CART", summary), ("CART + rerank", rr)):
      print(f"{name:<14} {m['r@1']:>7.3f} {m['r@5']:>7.3f} {m['r@10']:>7.3f} {m['mrr@10']:>7.3f} "
            f"{m['qps']:>10.1f}", file=sys.stderr)
    print(f"re-rank weight {rr['weight']}; top-1 changed for {rr['top1_changed']:.1%} of the queries",
          file=sys.stderr)
  return 0


def _given(flag, default):
  """The flag's value when given (0 included: api.evaluate refuses it), else the default."""
  return flag if flag is not None else default


def _gin_eval_config(args) -> dict:
  """EvalConfig's fields from ``--gin-file``/``--gin.*`` ({} without them; flags win over them)."""
  if not (args.gin_file or args.gin_bindings):
    return {}
  import dataclasses

  from cart_jax.cli import gin_bridge
  from cart_jax.core.errors import CartError
  try:
    gin_bridge.parse(args.gin_file, args.gin_bindings)
  except (ValueError, OSError) as e:  # gin reports a bad file or binding as these
    raise CartError(f"gin: {e}") from None
  return dataclasses.asdict(gin_bridge.eval_config())
