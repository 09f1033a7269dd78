"""``cart model-info``: parameter counts per part and FLOPs per query of a model config.

  cart model-info --config small --json /tmp/small.json
  cart model-info --config small --encoder minilm --fusion none --cost-analysis
  cart model-info --config minilm_frozen --src-len 24 --vocab-size 216 --id-length 4

Parameters are counted from ``nnx.eval_shape`` (nothing is allocated). FLOPs are
analytic (see ``cart_jax.models.cart.flops``) for one query of ``--src-len`` tokens,
``--beam`` beams and ``--id-length`` decode steps; ``--cost-analysis`` adds XLA's
count of the compiled encode + cached steps as a cross-check.
"""
from __future__ import annotations

import argparse

from cart_jax.cli import output

PRESET_NAMES = ("tiny", "small", "base", "minilm_small", "minilm_frozen")


def register(subparsers, name: str, help_text: str) -> argparse.ArgumentParser:
  p = subparsers.add_parser(name, help=help_text, description=__doc__,
                            formatter_class=output.HelpFormatter)
  p.add_argument("--config", default="small", choices=PRESET_NAMES, help="model preset")
  p.add_argument("--encoder", choices=("t5", "minilm"), default=None,
                 help="override the preset's encoder (minilm = pretrained all-MiniLM-L6-v2)")
  p.add_argument("--fusion", choices=("none", "coarse", "fine", "both"), default=None,
                 help="override the preset's fusion mode")
  output.add_argument(p, "--vocab-size", "--vocab_size", dest="vocab_size", type=int, default=None,
                      help="identifier vocabulary size (default: the preset's 1314 = 2 + 5*256 + 32)")
  output.add_argument(p, "--src-len", "--src_len", dest="src_len", type=int, default=32,
                      help="query length in tokens")
  p.add_argument("--beam", type=int, default=10, help="beam size")
  output.add_argument(p, "--id-length", "--id_length", dest="id_length", type=int, default=6,
                      help="identifier length (decode steps)")
  output.add_argument(p, "--cost-analysis", "--cost_analysis", dest="cost_analysis",
                      action="store_true", help="also compile encode + steps and report XLA's FLOP count")
  p.add_argument("--embed-dim", dest="embed_dim", type=int, default=256,
                 help="dual tower's embedding size, for its query-side FLOPs and the re-ranking cost")
  output.add_output_flags(p, "the summary")
  p.set_defaults(func=run)
  return p


def build_info(args) -> dict:
  from cart_jax import api
  return api.model_info(args.config, encoder=args.encoder, fusion=args.fusion,
                        vocab_size=args.vocab_size, src_len=args.src_len, beam=args.beam,
                        id_length=args.id_length, embed_dim=args.embed_dim,
                        cost_analysis=args.cost_analysis)


def run(args) -> int:
  info = build_info(args)
  p, f = info["parameters"], info["flops_per_query"]
  cfg = info["model_config"]
  lines = [f"model {args.config}: encoder={cfg['encoder']} fusion={cfg['fusion']} "
           f"d_model={cfg['d_model']} vocab={cfg['output_vocab_size']}"]
  lines += [f"  params {k:<11} {p[k]:>13,}" for k in ("embeddings", "encoder", "fusion", "decoder", "total")]
  a = f["assumptions"]
  lines.append(f"  FLOPs/query (src {a['src_len']}, beam {a['beam']}, id length {a['id_length']}): "
               f"{f['total'] / 1e9:.3f} GFLOP (encoder {f['encoder'] / 1e9:.3f}, "
               f"fusion precompute {f['fusion_precompute'] / 1e9:.3f}, decoder {f['decoder'] / 1e9:.3f})")
  lines.append(f"  dual tower query side (MiniLM + projection to {args.embed_dim}): "
               f"{info['dual_tower_query_flops'] / 1e9:.3f} GFLOP, plus 2 x N x {args.embed_dim} to "
               f"score N items; re-ranking the beam: {info['rerank_flops'] / 1e3:.1f} kFLOP")
  if "xla_cost_analysis_flops" in info:
    lines.append(f"  XLA cost analysis: {info['xla_cost_analysis_flops'] / 1e9:.3f} GFLOP "
                 f"({info['xla_over_analytic']:.3f} x analytic)")
  output.emit(args, info, "\n".join(lines))
  return 0
