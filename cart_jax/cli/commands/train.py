"""``cart train``: train CART with a gin-configured job (t5x style).

  cart train --gin-file=gin_configs/experiments/emoji_demo.gin --gin.MODEL_DIR=/tmp/cart_emoji
  cart train --gin-file=gin_configs/experiments/emoji_demo.gin --gin.MODEL_DIR=/tmp/cart_emoji \\
      --gin.TrainConfig.num_steps=4000 --gin.ModelConfig.fusion="'none'"

The experiment file includes a model (gin_configs/models/) and the train run
(gin_configs/runs/train.gin) and sets CORPUS_DIR / INDEX_DIR. Running it again on the same
MODEL_DIR resumes from the newest checkpoint. MODEL_DIR layout: see cart_jax/runs/layout.py
(run.json, config.gin, index/, checkpoints/, tensorboard/, metrics.jsonl, train_summary.json).
Multi-host: launched by launch/tpu_vm.sh or launch/multi_gpu.sh, jax.distributed is initialised
from the environment. ``--json -`` prints the summary alone on stdout (logs go to stderr).
Library: ``cart_jax.api.train`` (the configs as dataclasses; gin stays here, in the CLI).
"""
from __future__ import annotations

import argparse

from cart_jax.cli import output


def add_gin_flags(p: argparse.ArgumentParser) -> None:
  """``--gin-file F`` (repeatable; t5x's ``--gin_file`` too) and ``--gin.NAME=VALUE`` bindings
  (collected into ``args.gin_bindings``; argparse itself cannot declare a wildcard option)."""
  output.add_argument(p, "--gin-file", "--gin_file", dest="gin_file", action="append", default=[],
                      help="gin file (repeatable; --gin_file, t5x's spelling, works too)")
  p.set_defaults(gin_bindings=[])
  orig = p.parse_known_args

  def parse_known_args(args=None, namespace=None):
    args = list(args or [])
    gin_args = [a for a in args if a.startswith("--gin.")]
    rest = [a for a in args if not a.startswith("--gin.")]
    ns, extra = orig(rest, namespace)
    ns.gin_bindings = list(getattr(ns, "gin_bindings", None) or []) + [a[len("--gin."):] for a in gin_args]
    return ns, extra

  p.parse_known_args = parse_known_args


def register(subparsers, name: str, help_text: str) -> argparse.ArgumentParser:
  p = subparsers.add_parser(name, help=help_text, description=__doc__,
                            formatter_class=output.HelpFormatter)
  add_gin_flags(p)
  output.add_output_flags(p, "the training summary")
  p.set_defaults(func=run)
  return p


def run(args) -> int:
  from cart_jax.cli import gin_bridge
  from cart_jax.core.errors import CartError

  if not args.gin_file:
    raise CartError("--gin-file is required (e.g. gin_configs/experiments/emoji_demo.gin)")
  with output.logs_to_stderr(args):
    summary = gin_bridge.train(args.gin_file, args.gin_bindings, progress=not args.quiet)
  output.emit(args, summary)
  return 0
