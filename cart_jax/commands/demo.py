"""``cart demo``: the main job on the embedded default data.

Until the end-to-end pipeline (train CART, evaluate against the dual tower) lands,
the demo runs the largest part that works: semantic identifiers for a structured
embedding set, built, saved atomically, reloaded and validated, a new item
assigned, and the summary printed.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def register(sub, name: str, help_text: str) -> argparse.ArgumentParser:
  p = sub.add_parser(name, help=help_text, description=help_text)
  p.add_argument("--n-items", type=int, default=20000, help="items in the generated embedding set (default 20000)")
  p.add_argument("--dim", type=int, default=256, help="embedding dimension (default 256)")
  p.add_argument("--out", default=None, help="where to write the index (default: a temporary directory)")
  p.add_argument("--json", default=None, metavar="PATH", help="write a JSON summary here")
  p.add_argument("--seed", type=int, default=0)
  p.set_defaults(func=run)
  return p


def run(args) -> int:
  import numpy as np
  from cart_jax.commands.build_ids import summary_lines
  from cart_jax.data.synthetic import structured_embeddings
  from cart_jax.index import identifiers

  t0 = time.perf_counter()
  out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="cart-demo-")) / "index"
  print(f"[1/3] generating {args.n_items} x {args.dim} structured embeddings (64 topics x 32 subtopics)")
  emb = structured_embeddings(args.n_items, args.dim, seed=args.seed)
  ids = [f"item{i:06d}" for i in range(args.n_items)]
  cfg = identifiers.IdentifierConfig(n_clusters=64, num_levels=3, codebook_size=64, rq_steps=600,
                                     seed=args.seed)
  print(f"[2/3] building identifiers: K-Means K={cfg.n_clusters}, RQ-VAE M={cfg.num_levels} x "
        f"C={cfg.codebook_size}, counter")
  index = identifiers.build_index(emb, ids, cfg)
  index.save(out)
  loaded = identifiers.load_index(out, emb)
  new_emb = structured_embeddings(3, args.dim, seed=args.seed + 1)
  _, new_codes = loaded.assign(new_emb, ["new0", "new1", "new2"])
  print(f"[3/3] saved, reloaded and validated {out}")
  print("\n".join(summary_lines(index.stats)))
  print(f"  example identifiers (k, v1..vM, u):")
  for i in range(3):
    print(f"    {ids[i]} -> {tuple(int(c) for c in index.codes[i])}")
  for i in range(3):
    print(f"    new{i} (assigned after build) -> {tuple(int(c) for c in new_codes[i])}")
  summary = {**index.stats, "index_dir": str(out), "seconds": time.perf_counter() - t0}
  print(f"done in {summary['seconds']:.1f} s")
  if args.json:
    from cart_jax.index.artefact import atomic_write_json
    atomic_write_json(args.json, summary)
  return 0
