"""The ``cart`` console script: thin. Parses flags, then calls one command module.

Each subcommand lives in ``cart_jax/cli/commands/<module>.py`` and exposes
``register(subparsers) -> argparse.ArgumentParser`` (which sets ``func``).
Modules are imported only when listed here, so ``cart --help`` stays fast.

A user error (:class:`CartError`) is printed as one line ``cart COMMAND: error: MESSAGE``, exit 2;
control characters a message carries from user input (a path, an id, a flag value) are escaped as
``repr`` writes them, so a terminal never interprets them and the message stays one line, whole.

Every command runs with JAX's persistent compilation cache on
(:func:`cart_jax.core.compile_cache.enable_compilation_cache`): a second ``cart search`` loads the
programs the first compiled. ``cart --no-compile-cache COMMAND`` (or ``CART_JAX_COMPILE_CACHE=0``)
turns it off.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from cart_jax.core.errors import CartError
from cart_jax.data.corpus import escape_controls

# (subcommand name, module under cart_jax.cli.commands, one-line help)
COMMANDS: list[tuple[str, str, str]] = [
    ("build-ids", "build_ids", "build semantic identifiers (K-Means + RQ-VAE + counter) for embeddings"),
    ("data", "data", "corpora: import data sets, prepare the emoji corpus, add captions, validate"),
    ("embed", "embed", "item embeddings of a corpus: built-in dual encoder (MiniLM + item tower) or precomputed"),
    ("baseline", "baseline", "dual-tower baseline: exact/FAISS top-k over item embeddings, R@K, MRR@10, q/s"),
    ("train", "train", "train CART with a gin-configured job (resumes from MODEL_DIR)"),
    ("eval", "eval", "recall (R@1/5/10, MRR@10) and queries/s of a trained CART run"),
    ("search", "search", "the top items a trained CART run generates for a text query"),
    ("export", "export", "a trained run's search as a jax.export program that runs without the model code"),
    ("serve", "serve", "serve a trained run over HTTP: micro-batched search, a search page, media"),
    ("index", "index", "add items to or remove items from a trained run, without retraining it"),
    ("model-info", "model_info", "parameter counts per part and FLOPs per query of a model config"),
    ("demo", "demo", "run the main job on the embedded default data set"),
]


class _Parser(argparse.ArgumentParser):
  """argparse's parser; its error messages (which may echo an argument) are escaped too."""

  def error(self, message: str):
    super().error(escape_controls(message))


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(
      prog="cart", description="CART: generative cross-modal retrieval in JAX/Flax.")
  parser.add_argument("--no-compile-cache", action="store_true",
                      help="do not use the persistent JAX compilation cache (also: "
                           "CART_JAX_COMPILE_CACHE=0; default dir: $CART_JAX_CACHE_DIR, else "
                           "~/.cache/cart-jax/jax)")
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
    _compile_cache(args)
    rc = args.func(args)
  except CartError as e:
    print(f"cart {args.command}: error: {escape_controls(str(e))}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"cart {args.command}: interrupted", file=sys.stderr)
    return 130
  return int(rc or 0)


def _compile_cache(args) -> None:
  """The persistent compilation cache for this command (off with ``--no-compile-cache``)."""
  from cart_jax.core import compile_cache  # pylint: disable=g-import-not-at-top
  if args.no_compile_cache:
    os.environ[compile_cache.ENV_SWITCH] = "0"  # also for a command that enables it itself
    return
  compile_cache.enable_compilation_cache(model_dir=getattr(args, "model_dir", None))


if __name__ == "__main__":
  sys.exit(main())
