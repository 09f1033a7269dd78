"""``cart train``: train CART with a gin-configured job (t5x style).

  cart train --gin_file=gin_configs/experiments/emoji_demo.gin --gin.MODEL_DIR=/tmp/cart_emoji
  cart train --gin_file=gin_configs/experiments/emoji_demo.gin --gin.MODEL_DIR=/tmp/cart_emoji \\
      --gin.TrainConfig.num_steps=4000 --gin.ModelConfig.fusion="'none'"

The experiment file includes a model (gin_configs/models/) and the train run
(gin_configs/runs/train.gin) and sets CORPUS_DIR / INDEX_DIR. Running it again on the same
MODEL_DIR resumes from the newest checkpoint. MODEL_DIR layout: see cart_jax/inference/runs.py
(run.json, config.gin, index/, checkpoints/, tensorboard/, metrics.jsonl, train_summary.json).
Multi-host: launched by launch/tpu_vm.sh or launch/multi_gpu.sh, jax.distributed is initialised
from the environment.
"""
from __future__ import annotations

import argparse


def add_gin_flags(p: argparse.ArgumentParser) -> None:
  """``--gin_file F`` (repeatable) and ``--gin.NAME=VALUE`` bindings (collected into
  ``args.gin_bindings``; argparse itself cannot declare a wildcard option)."""
  p.add_argument("--gin-file", "--gin_file", dest="gin_file", action="append", default=[],
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
                            formatter_class=argparse.RawDescriptionHelpFormatter)
  add_gin_flags(p)
  p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
  p.add_argument("--json", default=None, metavar="PATH", help="write the training summary here")
  p.set_defaults(func=run)
  return p


def run(args) -> int:
  import json

  import gin

  from cart_jax.cli import gin_config as cli_gin
  from cart_jax.core.errors import CartError
  from cart_jax.data.corpus import CorpusFormatError
  from cart_jax.index.inputs import InputError
  from cart_jax.inference.runs import RunError

  if not args.gin_file:
    raise CartError("--gin_file is required (e.g. gin_configs/experiments/emoji_demo.gin)")
  try:
    cli_gin.parse(args.gin_file, args.gin_bindings)
  except (ValueError, OSError, gin.config.ParseError if hasattr(gin.config, "ParseError") else ValueError) as e:
    raise CartError(f"gin: {e}") from None
  try:
    summary = cli_gin.run_train(progress=args.progress)
  except (RunError, CorpusFormatError, InputError, FileNotFoundError) as e:
    raise CartError(str(e)) from None
  except TypeError as e:
    if "missing" in str(e) and "argument" in str(e):
      raise CartError(f"gin config incomplete: {e} (bind it, e.g. --gin.MODEL_DIR=/tmp/run)") from None
    raise
  text = json.dumps(summary, indent=2, default=str)
  print(text)
  if args.json:
    from cart_jax.core.artefacts import atomic_write_json
    atomic_write_json(args.json, json.loads(text))
  return 0
