"""``cart embed``: item embeddings of a corpus, for ``cart build-ids`` and ``cart baseline``.

  # built-in dual encoder: frozen MiniLM text tower + an image tower trained on the train texts
  cart embed --corpus corpora/emoji --out emb/emoji.npy
  # the same on a pretrained network's frozen features (EfficientNet-Lite0 for images and video
  # frames, aiSFX for audio; weights installed with the package) + a trained head
  cart embed --corpus corpora/emoji --out emb/emoji.npy --encoder pretrained
  # embeddings computed elsewhere (ImageBind, CLIP...), aligned to the corpus's items
  cart embed --corpus corpora/f30k --out emb/f30k.npy --encoder precomputed \\
      --precomputed clip_images.npy --item-ids clip_image_ids.txt
  # encode only, with an item tower trained before: new items in the space of emb/emoji.npy
  cart embed --corpus corpora/new_emoji --out emb/new_emoji.npy --model emb/emoji.model.npz

Writes, next to ``--out E.npy`` (float32 [N, d], L2-normalised for the built-in encoder, rows in
the corpus's item order):
  E.ids.txt     one item id per line (row order): ``cart build-ids --embeddings E.npy --item-ids E.ids.txt``
  E.meta.json   encoder, dimension, corpus, training summary
  E.model.npz   (built-in) the trained item tower + text projection; ``cart baseline`` encodes
                queries with it
Checkpoints of the built-in training go to ``--checkpoint-dir`` (default ``E.ckpt/``); a run
interrupted there resumes from its last checkpoint. Library: ``cart_jax.api.embed``
(``cart_jax.data.embeddings``).
"""
from __future__ import annotations

import argparse

from cart_jax.cli import output
from cart_jax.cli.commands import int_at_least, positive_float
from cart_jax.core.errors import CartError
from cart_jax.data.embeddings import BuiltinEmbedOptions

BUILTIN_DEFAULTS = BuiltinEmbedOptions()  # the flags' defaults are the library's
ENCODER_CHOICES = ("builtin", "pretrained", "efficientnet-lite0", "aisfx", "precomputed")


def register(subparsers, name: str, help_text: str) -> argparse.ArgumentParser:
  p = subparsers.add_parser(name, help=help_text, description=__doc__,
                            formatter_class=output.HelpFormatter)
  p.add_argument("--corpus", required=True, help="corpus directory")
  p.add_argument("--out", required=True, help="item embeddings to write (.npy)")
  p.add_argument("--encoder", choices=ENCODER_CHOICES, default="builtin",
                 help="builtin: train the dual encoder's item tower from the media; pretrained "
                      "(the modality's default), efficientnet-lite0 (image, video) or aisfx "
                      "(audio): train a head on that network's frozen features (computed once "
                      "per item, cached); precomputed: align embeddings computed elsewhere")
  p.add_argument("--model", default=None, metavar="E.model.npz",
                 help="encode only: embed the items with this trained built-in item tower (the "
                      "E.model.npz of an earlier cart embed) instead of training one; the rows "
                      "share that model's space (written next to --out too); --expect-dim "
                      "checks its dimension, --batch-size is items per forward pass")
  g = p.add_argument_group("precomputed")
  g.add_argument("--precomputed", default=None, help=".npy or .npz of item embeddings")
  output.add_argument(g, "--item-ids", "--ids", dest="item_ids", default=None,
                 help="ids of the --precomputed rows, one per line (default: <P>.ids.txt, or the "
                      "'ids' array of a .npz)")
  g.add_argument("--key", default=None, help=".npz: name of the embeddings array")
  g.add_argument("--ids-key", default=None, help=".npz: name of the ids array")
  g.add_argument("--allow-extra-ids", action="store_true",
                 help="drop rows whose id is not a corpus item instead of failing")
  g.add_argument("--expect-dim", type=int_at_least(1), default=None, help="fail unless the dimension is this")
  b = p.add_argument_group("builtin")
  d = BUILTIN_DEFAULTS
  b.add_argument("--steps", type=int_at_least(1), default=d.steps,
                 help=f"training steps of the builtin tower (default {d.steps})")
  b.add_argument("--head-steps", type=int_at_least(1), default=d.head_steps,
                 help=f"training steps of the head on pretrained features (default "
                      f"{d.head_steps}; a step costs a fraction of a builtin tower's)")
  b.add_argument("--batch-size", type=int_at_least(2), default=d.batch_size,
                 help=f"items per step (default {d.batch_size})")
  b.add_argument("--lr", type=positive_float, default=d.lr, help=f"peak learning rate (default {d.lr:g})")
  b.add_argument("--seed", type=int, default=d.seed)
  b.add_argument("--dim", type=int_at_least(1), default=d.dim, help=f"embedding dimension (default {d.dim})")
  b.add_argument("--captions", action="store_true",
                 help="also train on the train captions (default: train queries only)")
  b.add_argument("--max-shift", type=int_at_least(0), default=None,
                 help="augmentation: random translation up to this many pixels (default 0)")
  b.add_argument("--text-batch", type=int_at_least(1), default=d.text_batch,
                 help=f"MiniLM batch size (default {d.text_batch})")
  b.add_argument("--checkpoint-dir", default=None, help="default: <out without .npy>.ckpt")
  b.add_argument("--checkpoint-every", type=int_at_least(0), default=d.checkpoint_every,
                 help="steps (0: only at the end)")
  b.add_argument("--no-resume", dest="resume", action="store_false",
                 help="ignore existing checkpoints in --checkpoint-dir (they are overwritten)")
  p.add_argument("--overwrite", action="store_true", help="replace --out and its sidecars")
  output.add_output_flags(p, "the JSON summary")
  p.set_defaults(func=run)
  return p


def run(args) -> int:
  from cart_jax import api
  from cart_jax.data import embeddings as emb
  if args.model is not None:
    if args.encoder != "builtin":
      raise CartError(f"--model encodes with that model's own item tower (scratch or pretrained, "
                      f"as it was trained); it does not go with --encoder {args.encoder}")
    options = emb.ModelEmbedOptions(model=args.model, batch_size=args.batch_size,
                                    expect_dim=args.expect_dim)
  elif args.encoder == "precomputed":
    options = emb.PrecomputedEmbedOptions(
        path=args.precomputed, ids=args.item_ids, key=args.key, ids_key=args.ids_key,
        allow_extra_ids=args.allow_extra_ids, expect_dim=args.expect_dim)
  else:
    options = emb.BuiltinEmbedOptions(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, dim=args.dim,
        captions=args.captions, max_shift=args.max_shift, text_batch=args.text_batch,
        checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
        resume=args.resume, item_encoder="scratch" if args.encoder == "builtin" else args.encoder,
        head_steps=args.head_steps)
  with output.logs_to_stderr(args):
    result = api.embed(args.corpus, args.out, options, overwrite=args.overwrite,
                       progress=not args.quiet)
  output.emit(args, result.summary)
  return 0
