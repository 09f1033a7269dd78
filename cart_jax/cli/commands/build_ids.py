"""``cart build-ids``: semantic identifiers for an embedding file, written as an index directory.

Library: ``cart_jax.api.build_index``.
"""
from __future__ import annotations

import argparse
import sys

from cart_jax.cli import output

EPILOG = """examples:
  cart build-ids --embeddings items.npy --item-ids ids.txt --out runs/index
  cart build-ids --embeddings items.npz --npz-key emb --out runs/index --clusters 128 --levels 2
  cart build-ids --embeddings items.npy --out runs/index_no_rq --no-rqvae --json stats.json
  cart build-ids --embeddings E.npy --item-ids E.ids.txt --out runs/index --json - --quiet
"""


def register(sub, name: str, help_text: str) -> argparse.ArgumentParser:
  p = sub.add_parser(name, help=help_text, description=help_text, epilog=EPILOG,
                     formatter_class=output.HelpFormatter)
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
  output.add_output_flags(p, "the JSON summary")
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
  from cart_jax import api
  from cart_jax.core.errors import CartError
  from cart_jax.index.identifiers import IdentifierConfig

  for name in ("clusters", "levels", "codebook_size", "rq_steps", "rq_latent_dim"):
    if getattr(args, name) < 1:
      raise CartError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
  cfg = IdentifierConfig(
      n_clusters=args.clusters, num_levels=args.levels, codebook_size=args.codebook_size,
      use_kmeans=not args.no_kmeans, use_rqvae=not args.no_rqvae, rq_steps=args.rq_steps,
      rq_latent_dim=args.rq_latent_dim, seed=args.seed)
  cb, close = _progress(args.quiet)
  try:
    with output.logs_to_stderr(args):
      built = api.build_index(args.embeddings, args.out, cfg, item_ids=args.item_ids,
                              npz_key=args.npz_key, progress=cb)
  finally:
    close()
  text = "\n".join([f"built {built.index.n_items} identifiers of length {built.index.id_length} -> "
                    f"{args.out}"] + summary_lines(built.stats))
  output.emit(args, built.stats, text)
  return 0
