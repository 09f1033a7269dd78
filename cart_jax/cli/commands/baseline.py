"""``cart baseline``: the dual-tower baseline CART is measured against.

  cart baseline --corpus corpora/emoji --embeddings emb/emoji.npy --split test --json base.json
  cart baseline ... --method faiss-flat      # or faiss-ivf [--nlist 64 --nprobe 8]
  cart baseline ... --agreement faiss-flat   # also check top-k against another method

Each ``--split`` query text (``kind=query``) goes through the text tower (MiniLM + the
projection of ``E.model.npz`` written by ``cart embed``), then an exhaustive top-k search over
every item embedding. Reports R@1, R@5, R@10, MRR@10 (``cart_jax.inference.metrics``) and queries/s with
query encoding included (compilation excluded and reported apart).

Query side, in order: ``--query-embeddings Q.npy`` (rows = the split's query texts in corpus
order; queries/s then counts search only), ``--model`` (default: the ``E.model.npz`` next to the
embeddings), or plain MiniLM sentence embeddings when the items are 384-d and no model exists.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path


def register(subparsers, name: str, help_text: str) -> argparse.ArgumentParser:
  p = subparsers.add_parser(name, help=help_text, description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--corpus", required=True, help="corpus directory")
  p.add_argument("--embeddings", required=True, help="item embeddings (.npy/.npz) from cart embed")
  p.add_argument("--ids", default=None, help="ids of the embedding rows (default: <E>.ids.txt)")
  p.add_argument("--model", default=None, help="dual-encoder model (default: <E>.model.npz)")
  p.add_argument("--query-embeddings", default=None,
                 help="precomputed query embeddings [num queries of the split, d] (.npy)")
  p.add_argument("--split", choices=("train", "val", "test"), default="test")
  p.add_argument("--items", default=None, metavar="FILE",
                 help="only the queries of these items (ids one per line); all items are searched")
  p.add_argument("--method", choices=("jax", "faiss-flat", "faiss-ivf"), default="jax")
  p.add_argument("-k", type=int, default=10, help="results per query (>= 10 for R@10/MRR@10)")
  p.add_argument("--chunk-size", type=int, default=65536, help="jax: items per scan step")
  p.add_argument("--query-batch", type=int, default=256, help="jax: queries per compiled call")
  p.add_argument("--text-batch", type=int, default=128, help="MiniLM batch size")
  p.add_argument("--nlist", type=int, default=None, help="faiss-ivf: cells (default ~4 sqrt N)")
  p.add_argument("--nprobe", type=int, default=8, help="faiss-ivf: cells visited (default 8)")
  p.add_argument("--agreement", choices=("jax", "faiss-flat", "faiss-ivf"), default=None,
                 help="also search with this method and report how often the top-k lists agree")
  p.add_argument("--json", default=None, help="write a JSON summary here")
  p.set_defaults(func=run)
  return p


def _searcher(method, items, k, args):
  from cart_jax.inference import dual_tower as retrieval  # pylint: disable=g-import-not-at-top
  if method == "jax":
    return retrieval.make_searcher(method, items, k, chunk_size=args.chunk_size,
                                   query_batch=args.query_batch)
  if method == "faiss-ivf":
    return retrieval.make_searcher(method, items, k, nlist=args.nlist, nprobe=args.nprobe)
  return retrieval.make_searcher(method, items, k)


def _read_meta(embeddings: Path) -> dict:
  from cart_jax.cli.commands.embed import sidecars  # pylint: disable=g-import-not-at-top
  path = sidecars(embeddings)["meta"]
  if not path.is_file():
    return {}
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError:
    return {}


def run(args) -> int:
  import numpy as np  # pylint: disable=g-import-not-at-top

  from cart_jax.core.errors import CartError
  from cart_jax.data.corpus import CorpusFormatError, load_corpus
  from cart_jax.data.embeddings import load_aligned
  from cart_jax.index.inputs import InputError
  from cart_jax.inference.metrics import retrieval_metrics

  if args.k < 10:
    raise CartError(f"-k {args.k}: R@10 and MRR@10 need at least 10 results per query")
  try:
    corpus = load_corpus(args.corpus, check_media=False)
  except CorpusFormatError as e:
    raise CartError(str(e)) from None
  emb_path = Path(args.embeddings)
  try:
    aligned = load_aligned(emb_path, corpus.item_ids, ids_path=args.ids)
  except InputError as e:
    raise CartError(str(e)) from None
  items = np.asarray(aligned.embeddings, np.float32)  # [N, d]
  n, d = items.shape
  if args.k > n:
    raise CartError(f"-k {args.k} is more than the {n} items")
  texts, targets = corpus.pairs(args.split, "query")
  if args.items is not None:
    from cart_jax.data.corpus import read_item_ids  # pylint: disable=g-import-not-at-top
    try:
      keep_ids = read_item_ids(args.items, corpus)
    except CorpusFormatError as e:
      raise CartError(str(e)) from None
    ids = corpus.item_ids
    keep = np.asarray([ids[int(t)] in keep_ids for t in targets], bool)  # [Q]
    texts, targets = [t for t, k in zip(texts, keep) if k], np.asarray(targets)[keep]
  if not texts:
    raise CartError(f"{args.corpus}: no '{args.split}' query texts" +
                   (f" of the items in {args.items}" if args.items else ""))
  meta = _read_meta(emb_path)

  # Query encoder: a function texts -> [Q, d] (None when the query embeddings are given).
  encode, query_side = None, None
  if args.query_embeddings:
    try:
      qe = np.load(args.query_embeddings, allow_pickle=False)
    except (OSError, ValueError) as e:
      raise CartError(f"{args.query_embeddings}: not a readable .npy file ({e})") from None
    if qe.ndim != 2 or qe.shape != (len(texts), d):
      raise CartError(f"{args.query_embeddings}: expected shape [{len(texts)}, {d}] (the "
                     f"'{args.split}' query texts x item dimension), found {qe.shape}")
    if not np.isfinite(qe).all():
      raise CartError(f"{args.query_embeddings}: non-finite values")
    query_side = "precomputed"
  else:
    from cart_jax.cli.commands.embed import sidecars  # pylint: disable=g-import-not-at-top
    model_path = Path(args.model) if args.model else sidecars(emb_path)["model"]
    if args.model and not model_path.is_file():
      raise CartError(f"--model {model_path}: no such file")
    from cart_jax.models.text.encoder import MiniLMTextEncoder  # pylint: disable=g-import-not-at-top
    if model_path.is_file():
      from cart_jax.train.dual_encoder import embed_text_features, load_model  # pylint: disable=g-import-not-at-top
      try:
        model = load_model(model_path)
      except ValueError as e:
        raise CartError(str(e)) from None
      if model.config.embed_dim != d:
        raise CartError(f"{model_path}: model embeds into {model.config.embed_dim} dimensions, "
                       f"{emb_path} has {d}")
      project = lambda f: embed_text_features(model, f)
      query_side = f"minilm+projection ({model_path.name})"
    elif d == 384:
      project = lambda f: f
      query_side = "minilm"
    else:
      raise CartError(f"{emb_path}: no query encoder: {model_path.name} not found and the items "
                     f"are {d}-d (not MiniLM's 384); pass --model or --query-embeddings")
    text_encoder = MiniLMTextEncoder(batch_size=args.text_batch)

    def encode(batch_texts):
      return project(text_encoder.encode(batch_texts))

  try:
    searcher = _searcher(args.method, items, args.k, args)
  except (ImportError, ValueError) as e:
    raise CartError(str(e)) from None

  # Warm-up: compile every MiniLM length bucket and projection/search program used below.
  t0 = time.perf_counter()
  if encode is not None:
    text_encoder.warm_up([len(r) for r in text_encoder.tokenize(texts)])
    searcher.search(encode(texts[:1]))
  else:
    searcher.search(qe[:1])
  compile_s = time.perf_counter() - t0

  # Timed pass over all queries: encoding (tokenise + MiniLM + projection) + search.
  t0 = time.perf_counter()
  queries = encode(texts) if encode is not None else np.asarray(qe, np.float32)
  t1 = time.perf_counter()
  scores, rows = searcher.search(queries)
  t2 = time.perf_counter()
  metrics = retrieval_metrics(rows, targets, ks=(1, 5, 10), mrr_k=10)
  q = len(texts)
  summary = {
      "corpus": str(args.corpus), "embeddings": str(emb_path), "split": args.split,
      "method": args.method, "k": args.k, "num_queries": q, "num_items": n, "dim": d,
      "query_encoder": query_side, "item_encoder": meta.get("encoder"),
      **{k: v for k, v in metrics.items() if k != "num_queries"},
      "queries_per_second": q / (t2 - t0),
      "queries_per_second_search_only": q / max(t2 - t1, 1e-9),
      "seconds": {"encode_queries": t1 - t0, "search": t2 - t1, "total": t2 - t0,
                  "compile_warmup": compile_s},
      "timing_note": ("one timed pass over all queries after a warm-up that compiled every "
                      "shape; query encoding included" if encode is not None else
                      "query embeddings were given: search only"),
      "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                  "jax_backend": _backend()},
  }
  if getattr(searcher, "nlist", None):
    summary["faiss_ivf"] = {"nlist": searcher.nlist, "nprobe": searcher.index.nprobe}
  if args.agreement:
    try:
      other = _searcher(args.agreement, items, args.k, args)
    except (ImportError, ValueError) as e:
      raise CartError(str(e)) from None
    o_scores, o_rows = other.search(queries)
    summary["agreement"] = {
        "method": args.agreement,
        "top1_equal": float(np.mean(rows[:, 0] == o_rows[:, 0])),
        "topk_lists_equal": float(np.mean(np.all(rows == o_rows, axis=1))),
        "topk_sets_equal": float(np.mean([set(a) == set(b) for a, b in zip(rows, o_rows)])),
        "max_abs_score_diff": float(np.max(np.abs(scores - o_scores))),
        # Lists that differ only where items tie (pixel-identical media embed identically):
        "topk_scores_equal_1e-5": float(np.mean(np.all(np.abs(scores - o_scores) <= 1e-5, axis=1))),
        **{f"other_{k}": v for k, v in retrieval_metrics(o_rows, targets).items()
           if k != "num_queries"},
    }
  print(json.dumps(summary, indent=2))
  if args.json:
    from cart_jax.core.artefacts import atomic_write_json  # pylint: disable=g-import-not-at-top
    atomic_write_json(args.json, summary)
  return 0


def _backend() -> str:
  import jax  # pylint: disable=g-import-not-at-top
  return f"{jax.default_backend()} ({jax.devices()[0].device_kind})"
