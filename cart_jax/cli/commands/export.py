"""``cart export``: a trained run's search as a program that runs with JAX and NumPy only.

  cart export --model-dir /tmp/cart_emoji --out /tmp/emoji.cart-export --batch-size 8 -k 10
  cart export --model-dir /tmp/cart_emoji --out /tmp/emoji.cart-export --platforms cpu,cuda,tpu

Writes OUT, a directory (atomically: all of it or nothing): the search program (query encoder,
CART encoder/decoder and trie-constrained beam search for a fixed ``--batch-size``) serialised
with ``jax.export`` (StableHLO), its inputs (the weights, the trie tables), the identifiers and
item ids, the tokenizer vocabulary, and ``manifest.json`` with a sha256 per file. Run it without
the model's code (no Flax needed)::

  from cart_jax.inference.exported import load_exported   # a self-contained file: copy it along
  load_exported("/tmp/emoji.cart-export").search(["smiling cat"], k=5)

Results are ``cart search``'s (same items and scores, any number of queries, any k up to the
exported ``-k``). ``--platforms`` lowers for other JAX platforms too (default: this machine's).
Library: ``cart_jax.api.export``.
"""
from __future__ import annotations

import argparse

from cart_jax.cli import output
from cart_jax.cli.commands import int_at_least


def register(subparsers, name: str, help_text: str) -> argparse.ArgumentParser:
  from cart_jax.cli.commands.eval import add_model_dir_flag  # pylint: disable=g-import-not-at-top
  p = subparsers.add_parser(name, help=help_text, description=__doc__,
                            formatter_class=output.HelpFormatter)
  add_model_dir_flag(p)
  p.add_argument("--out", required=True, help="the export directory to write")
  output.add_argument(p, "--batch-size", "--batch_size", dest="batch_size", type=int_at_least(1),
                      default=8, help="queries per program call (default 8; the loader pads)")
  p.add_argument("-k", "--k", type=int_at_least(1), default=10,
                 help="results per query the program returns (default 10; at most the items)")
  p.add_argument("--beam", type=int_at_least(1), default=None, help="beam size (default max(k, 10))")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  p.add_argument("--platforms", default=None, metavar="P[,P...]",
                 help="JAX platforms to lower for: cpu, cuda, rocm, tpu (default: this machine's)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  output.add_output_flags(p, "the summary")
  p.set_defaults(func=run)
  return p


def run(args) -> int:
  from cart_jax import api  # pylint: disable=g-import-not-at-top
  platforms = [p for p in args.platforms.split(",") if p.strip()] if args.platforms else None
  with output.logs_to_stderr(args):
    summary = api.export(args.model_dir, args.out, batch_size=args.batch_size, k=args.k,
                         beam=args.beam, step=args.step, platforms=platforms, verify=args.verify,
                         overwrite=args.overwrite)
  mib = 1 << 20
  text = (f"wrote {summary['out']}: step {summary['step']}, {summary['n_items']} items, batch "
          f"{summary['batch_size']} x {summary['input_length']} tokens -> top {summary['n_results']} "
          f"(beam {summary['beam_size']}), for {', '.join(summary['platforms'])}\n"
          f"  program {summary['program_bytes'] / mib:.2f} MiB, arguments "
          f"{summary['arguments_bytes'] / mib:.1f} MiB, total {summary['total_bytes'] / mib:.1f} MiB, "
          f"{summary['seconds']:.1f} s")
  output.emit(args, summary, text)
  return 0
