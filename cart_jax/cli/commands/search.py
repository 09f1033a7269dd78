"""``cart search``: the top items a trained CART run generates for a text query.

  cart search --model-dir /tmp/cart_emoji "smiling cat" -k 5
  cart search --model-dir /tmp/cart_mixed --modality audio "a piano"   # a mixed index, audio only

Encodes the query once, runs the constrained beam search over the run's index and prints each
result's rank, item id, identifier (k, v1..vM, u), log-probability, modality and media path.
``--modality`` restricts the search to the trie of that modality's identifiers (an index over
several modalities, built from ``cart data merge``): nothing else can be generated.

``--rerank`` (a run with a MiniLM encoder and a ``MODEL_DIR/rerank/`` re-ranker, see ``cart eval
--rerank``): all ``--beam`` results are re-sorted by ``logp + weight * cos`` (the dual tower's
query-item cosine); each result then shows its log-probability, cosine and combined score.
``--rerank-weight W`` overrides the run's weight; ``--embeddings E.npy`` builds the re-ranker first.

  cart search --model-dir /tmp/cart_emoji --rerank "smiling cat" -k 5

``-k`` above the number of items that can be generated (the index's, or the ``--modality``'s) is
clamped to it with a note (a larger beam finds no more items). An empty query is an error.
The checkpoint and the index are verified before loading, as in ``cart eval`` (``--no-verify``
skips hashing the checkpoint).

``--json PATH`` writes the results as JSON (``-``: on stdout, alone). Library: ``cart_jax.api.search``.
"""
from __future__ import annotations

import argparse

from cart_jax.cli import output


def register(subparsers, name: str, help_text: str) -> argparse.ArgumentParser:
  from cart_jax.cli.commands.eval import add_model_dir_flag, add_rerank_flags  # pylint: disable=g-import-not-at-top
  p = subparsers.add_parser(name, help=help_text, description=__doc__,
                            formatter_class=output.HelpFormatter)
  add_model_dir_flag(p)
  p.add_argument("query", nargs="+", help="query text(s); each is searched separately")
  p.add_argument("-k", type=int, default=10,
                 help="results per query (default 10; at most the number of items)")
  p.add_argument("--beam", type=int, default=None, help="beam size (default max(k, 10))")
  p.add_argument("--modality", default=None, metavar="MODALITY",
                 help="only items of this modality (image, audio or video; must be in the index)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  add_rerank_flags(p, "re-sort the beam by the dual tower's cosine (the run's rerank/ weight)")
  output.add_output_flags(p, "the results")
  p.set_defaults(func=run)
  return p


def run(args) -> int:
  from cart_jax.cli.commands.eval import rerank_weight
  from cart_jax.core.errors import CartError
  from cart_jax.data.corpus import escape_controls
  from cart_jax.jobs.search import search_job
  from cart_jax.inference.searcher import ModalityError

  try:
    with output.logs_to_stderr(args):
      doc = search_job(args.model_dir, args.query, k=args.k, beam=args.beam,
                       modality=args.modality, step=args.step, rerank=args.rerank,
                       rerank_weight=rerank_weight(args), embeddings=args.embeddings,
                       verify=args.verify)
  except ModalityError as e:
    raise CartError(f"--modality {args.modality}: {e}") from None
  lines = []
  for q in doc["queries"]:
    lines.append(f"query: {escape_controls(q['query'])}")  # no ESC sequence reaches the terminal
    for d in q["results"]:
      score = (f"logp={d['score']:.3f}" if "cos" not in d else
               f"score={d['score']:.3f} (logp={d['logp']:.3f} cos={d['cos']:.3f})")
      lines.append(f"  {d['rank']:>3}  {d['item_id']:<16} id={tuple(d['identifier'])}  "
                   f"{score}  {d.get('modality', '')}  {d.get('media', '')}")
  output.emit(args, doc, "\n".join(lines))
  return 0
