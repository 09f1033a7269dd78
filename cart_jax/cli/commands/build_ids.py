"""``cart build-ids``: semantic identifiers for an embedding file, written as an index directory."""
from __future__ import annotations

import argparse
import json
import sys
import time

EPILOG = """examples:
  cart build-ids --embeddings items.npy --item-ids ids.txt --out runs/index
  cart build-ids --embeddings items.npz --npz-key emb --out runs/index --clusters 128 --levels 2
  cart build-ids --embeddings items.npy --out runs/index_no_rq --no-rqvae --json stats.json
"""


def register(sub, name: str, help_text: str) -> argparse.ArgumentParser:
  p = sub.add_parser(name, help=help_text, description=help_text, epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--embeddings", required=True, help="item embeddings [N, d] (.npy, memory-mapped, or .npz)")
  p.add_argument("--npz-key", default=None, help="array name inside an .npz (default: 'embeddings' or the only one)")
  p.add_argument("--item-ids", default=None, help="text file, one item id per line, aligned with the rows "
                 "(default: row numbers 0..N-1)")
  p.add_argument("--out", required=True, help="index directory to write (replaced atomically)")
  p.add_argument("--clusters", type=int, default=256, help="K, K-Means clusters of the coarse token (default 256)")
  p.add_argument("--levels", type=int, default=3, help="M, fine levels (RQ-VAE codebooks) (default 3)")
  p.add_argument("--codebook-size", type=int, default=256, help="C, codes per fine level (default 256)")
  p.add_argument("--rq-steps", type=int, default=1000, help="RQ-VAE training steps (default 1000)")
  p.add_argument("--rq-latent-dim", type=int, default=64, help="RQ-VAE latent width (default 64)")
  p.add_argument("--seed", type=int, default=0, help="PRNG seed (default 0)")
  g = p.add_mutually_exclusive_group()
  g.add_argument("--no-kmeans", action="store_true", help="ablation: RQ-VAE on the raw embedding, no coarse token")
  g.add_argument("--no-rqvae", action="store_true", help="ablation: hierarchical K-Means for the fine levels")
  p.add_argument("--json", default=None, metavar="PATH", help="write a JSON summary here")
  p.add_argument("--quiet", action="store_true", help="no progress bars")
  p.set_defaults(func=run)
  return p


def _progress(quiet: bool):
  if quiet:
    return None, lambda: None
  from tqdm.auto import tqdm
  bars = {}

  def cb(phase: str, done: int, total: int):
    bar = bars.get(phase)
    if bar is None:
      for other in bars.values():
        other.close()
      bar = bars[phase] = tqdm(total=total, desc=phase, unit="step" if "rq" in phase else "it",
                               leave=False, file=sys.stderr)
    bar.update(done - bar.n)

  def close():
    for bar in bars.values():
      bar.close()

  return cb, close


def summary_lines(stats: dict) -> list[str]:
  def fmt(v):
    if isinstance(v, float):
      return f"{v:.4g}"
    if isinstance(v, list):
      return "[" + ", ".join(fmt(x) for x in v) + "]"
    return str(v)
  keys = ["n_items", "id_length", "level_sizes", "vocab_size", "collision_rate", "max_counter",
          "unique_prefixes", "kmeans_inertia", "kmeans_iterations", "rq_mse_per_level",
          "codebook_usage_per_level", "perplexity_per_level", "seconds"]
  width = max(len(k) for k in keys)
  return [f"  {k:<{width}}  {fmt(stats[k])}" for k in keys if k in stats]


def run(args) -> int:
  from cart_jax.core.errors import CartError
  from cart_jax.index import identifiers, inputs

  t0 = time.perf_counter()
  try:
    emb = inputs.load_embeddings(args.embeddings, key=args.npz_key)
    ids = inputs.load_item_ids(args.item_ids) if args.item_ids else None
    if ids is not None:
      inputs.check_ids(ids, emb.shape[0], source=f"{args.item_ids} vs {args.embeddings}")
    for name in ("clusters", "levels", "codebook_size", "rq_steps", "rq_latent_dim"):
      if getattr(args, name) < 1:
        raise CartError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    cfg = identifiers.IdentifierConfig(
        n_clusters=args.clusters, num_levels=args.levels, codebook_size=args.codebook_size,
        use_kmeans=not args.no_kmeans, use_rqvae=not args.no_rqvae, rq_steps=args.rq_steps,
        rq_latent_dim=args.rq_latent_dim, seed=args.seed)
    cb, close = _progress(args.quiet)
    try:
      index = identifiers.build_index(emb, ids, cfg, progress=cb)
    finally:
      close()
  except inputs.InputError as e:
    raise CartError(str(e)) from e
  index.save(args.out)
  stats = dict(index.stats)
  stats["seconds"] = time.perf_counter() - t0
  stats["out"] = str(args.out)
  print(f"built {index.n_items} identifiers of length {index.id_length} -> {args.out}")
  print("\n".join(summary_lines(stats)))
  if args.json:
    from cart_jax.core.artefacts import atomic_write_json
    atomic_write_json(args.json, stats)
  return 0
