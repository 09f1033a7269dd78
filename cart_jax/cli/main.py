"""The ``cart`` console script: thin. Parses flags, then calls one command module.

Each subcommand lives in ``cart_jax/cli/commands/<module>.py`` and exposes
``register(subparsers) -> argparse.ArgumentParser`` (which sets ``func``).
Modules are imported only when listed here, so ``cart --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from cart_jax.core.errors import CartError

# (subcommand name, module under cart_jax.cli.commands, one-line help)
COMMANDS: list[tuple[str, str, str]] = [
    ("build-ids", "build_ids", "build semantic identifiers (K-Means + RQ-VAE + counter) for embeddings"),
    ("data", "data", "corpora: import data sets, prepare the emoji corpus, add captions, validate"),
    ("embed", "embed", "item embeddings of a corpus: built-in dual encoder (MiniLM + item tower) or precomputed"),
    ("baseline", "baseline", "dual-tower baseline: exact/FAISS top-k over item embeddings, R@K, MRR@10, q/s"),
    ("train", "train", "train CART with a gin-configured job (resumes from MODEL_DIR)"),
    ("eval", "eval", "recall (R@1/5/10, MRR@10) and queries/s of a trained CART run"),
    ("search", "search", "the top items a trained CART run generates for a text query"),
    ("model-info", "model_info", "parameter counts per part and FLOPs per query of a model config"),
    ("demo", "demo", "run the main job on the embedded default data set"),
]


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="cart", description="CART: generative cross-modal retrieval in JAX/Flax.")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  sub.required = True
  for name, module, help_text in COMMANDS:
    mod = importlib.import_module(f"cart_jax.cli.commands.{module}")
    mod.register(sub, name, help_text)
  return parser


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    rc = args.func(args)
  except CartError as e:
    print(f"cart {args.command}: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"cart {args.command}: interrupted", file=sys.stderr)
    return 130
  return int(rc or 0)


if __name__ == "__main__":
  sys.exit(main())
