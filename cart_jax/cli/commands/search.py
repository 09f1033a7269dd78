"""``cart search``: the top items a trained CART run generates for a text query.

  cart search --model_dir /tmp/cart_emoji "smiling cat" -k 5
  cart search --model_dir /tmp/cart_mixed --modality audio "a piano"   # a mixed index, audio only

Encodes the query once, runs the constrained beam search over the run's index and prints each
result's rank, item id, identifier (k, v1..vM, u), log-probability, modality and media path.
``--modality`` restricts the search to the trie of that modality's identifiers (an index over
several modalities, built from ``cart data merge``): nothing else can be generated.

``--rerank`` (a run with a MiniLM encoder and a ``MODEL_DIR/rerank/`` re-ranker, see ``cart eval
--rerank``): all ``--beam`` results are re-sorted by ``logp + weight * cos`` (the dual tower's
query-item cosine); each result then shows its log-probability, cosine and combined score.
``--rerank-weight W`` overrides the run's weight; ``--embeddings E.npy`` builds the re-ranker first.

  cart search --model_dir /tmp/cart_emoji --rerank "smiling cat" -k 5
"""
from __future__ import annotations

import argparse


def register(subparsers, name: str, help_text: str) -> argparse.ArgumentParser:
  p = subparsers.add_parser(name, help=help_text, description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model-dir", "--model_dir", dest="model_dir", required=True, help="a MODEL_DIR written by cart train")
  p.add_argument("query", nargs="+", help="query text(s); each is searched separately")
  p.add_argument("-k", type=int, default=10, help="results per query (default 10)")
  p.add_argument("--beam", type=int, default=None, help="beam size (default max(k, 10))")
  p.add_argument("--modality", default=None, metavar="MODALITY",
                 help="only items of this modality (image, audio or video; must be in the index)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  from cart_jax.cli.commands.eval import add_rerank_flags  # pylint: disable=g-import-not-at-top
  add_rerank_flags(p, "re-sort the beam by the dual tower's cosine (the run's rerank/ weight)")
  p.add_argument("--json", default=None, metavar="PATH", help="write the results here")
  p.set_defaults(func=run)
  return p


def run(args) -> int:
  import json

  from cart_jax.core.errors import CartError
  from cart_jax.inference.runs import RunError, load_run, searcher_for_run
  from cart_jax.inference.searcher import ModalityError, describe

  if args.k < 1:
    raise CartError(f"-k {args.k}: must be >= 1")
  beam = args.beam or max(args.k, 10)
  if beam < args.k:
    raise CartError(f"--beam {beam} is smaller than -k {args.k}")
  try:
    r = load_run(args.model_dir, args.step)
  except (RunError, FileNotFoundError) as e:
    raise CartError(str(e)) from None
  try:
    searcher = searcher_for_run(r, beam_size=beam, n_results=args.k,
                                batch_size=max(1, len(args.query)), modality=args.modality)
  except ModalityError as e:
    raise CartError(f"--modality {args.modality}: {e}") from None
  except RunError as e:
    raise CartError(str(e)) from None
  reranker = None
  if args.rerank or args.embeddings or args.rerank_weight is not None:
    import sys

    from cart_jax.inference import rerank as rerank_lib
    try:
      weight = None if args.rerank_weight is None else rerank_lib.parse_weight(args.rerank_weight)
      reranker = rerank_lib.reranker_for_run(r, embeddings=args.embeddings, weight=weight,
                                             log=lambda m: print(m, file=sys.stderr))
    except rerank_lib.RerankError as e:
      raise CartError(str(e)) from None
  if reranker is None:
    rows, scores, _ = searcher.search_texts(r.params, r.frozen, args.query)
    logps, coss = scores, None
  else:
    from cart_jax.train.input_pipeline import encode_texts
    beams = searcher.search_beams(r.params, r.frozen, encode_texts(args.query, searcher.input_length))
    res = reranker.rerank(beams.rows, beams.scores, beams.query_embedding)
    rows, scores = res.rows[:, :args.k], res.scores[:, :args.k]
    logps, coss = res.logp[:, :args.k], res.cos[:, :args.k]
  out = []
  for i, (q, rr, ss) in enumerate(zip(args.query, rows, scores)):
    results = describe(r.index, rr, ss, r.corpus)
    if coss is not None:
      for d in results:
        d["logp"], d["cos"] = float(logps[i, d["rank"] - 1]), float(coss[i, d["rank"] - 1])
    out.append({"query": q, "results": results})
    print(f"query: {q}")
    for d in results:
      score = (f"logp={d['score']:.3f}" if coss is None else
               f"score={d['score']:.3f} (logp={d['logp']:.3f} cos={d['cos']:.3f})")
      print(f"  {d['rank']:>3}  {d['item_id']:<16} id={tuple(d['identifier'])}  "
            f"{score}  {d.get('modality', '')}  {d.get('media', '')}")
  if args.json:
    from cart_jax.core.artefacts import atomic_write_json
    doc = {"model_dir": str(r.model_dir), "step": r.step, "modality": args.modality, "queries": out}
    if reranker is not None:
      doc["rerank_weight"] = rerank_lib.weight_to_json(reranker.weight)
    atomic_write_json(args.json, doc)
  return 0
