"""``cart data``: build corpora (import a data set's files, prepare the embedded ``emoji``),
add a captioner's output, and validate/summarise a corpus.

  cart data import karpathy dataset_flickr30k.json --media-root flickr30k-images --out corpora/f30k
  cart data import clotho CLOTHO_DIR --media-root CLOTHO_AUDIO --out corpora/clotho
  cart data prepare emoji --out corpora/emoji
  cart data add-captions --corpus corpora/f30k --captions blip2_captions.jsonl
  cart data info corpora/emoji
  cart data merge corpora/emoji corpora/instruments --out corpora/mixed \\
      --embeddings emb/emoji.npy emb/instruments.npy

Every action prints its JSON summary; ``--json PATH`` also writes it (``-``: stdout only).
Library: ``cart_jax.api.prepare``, ``data_import``, ``add_captions``, ``data_merge``, ``data_info``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from cart_jax.api import DATASETS
from cart_jax.cli import output

FORMATS = ("karpathy", "clotho", "audiocaps", "msrvtt", "msvd")


def register(subparsers, name: str, help_text: str) -> argparse.ArgumentParser:
  p = subparsers.add_parser(name, help=help_text, description=__doc__,
                            formatter_class=output.HelpFormatter)
  F = output.HelpFormatter  # pylint: disable=invalid-name
  sub = p.add_subparsers(dest="data_command", metavar="ACTION")
  sub.required = True

  imp = sub.add_parser("import", formatter_class=F,
                       help="convert a data set's annotation files to a corpus directory")
  imp.add_argument("format", choices=FORMATS, help="source format")
  imp.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="annotation file(s), or for clotho/audiocaps a directory holding them")
  imp.add_argument("--out", required=True, help="corpus directory to create")
  imp.add_argument("--media-root", default=None,
                   help="directory of the media files (default: the first SOURCE's directory)")
  imp.add_argument("--media-pattern", default=None,
                   help="file name of an item's media under --media-root (audiocaps: "
                        "'{youtube_id}_{start_time}.wav', msrvtt: '{video_id}.mp4', "
                        "msvd: '{video_id}.avi')")
  imp.add_argument("--media", dest="media_mode", choices=("symlink", "copy", "hardlink"),
                   default="symlink", help="how media enter the corpus (default: symlink)")
  imp.add_argument("--name", default=None, help="corpus name (default: from the format)")
  imp.add_argument("--skip-missing-media", action="store_true",
                   help="drop items whose media file is missing instead of failing")
  imp.add_argument("--split-list", action="append", default=[], metavar="SPLIT=FILE",
                   help="msvd: ids of one split, one per line (repeat for train, val, test)")
  imp.add_argument("--mapping", default=None,
                   help="msvd: youtube_mapping.txt; gives the standard 1200/100/670 split")
  imp.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
  output.add_output_flags(imp)
  imp.set_defaults(func=run)

  prep = sub.add_parser("prepare", formatter_class=F,
                        help="build an embedded offline corpus (" + ", ".join(DATASETS) + ")")
  prep.add_argument("dataset", choices=tuple(DATASETS),
                    help="emoji: text-image; instruments: text-audio; emoji-motion: text-video")
  prep.add_argument("--out", required=True, help="corpus directory to create")
  prep.add_argument("--limit", type=int, default=None,
                    help="smoke runs: only the first N items (emoji-motion: N emoji, 11 clips each)")
  prep.add_argument("--size", type=int, default=None,
                    help="image/frame side in pixels (emoji: 64, emoji-motion: 48; "
                         "instruments: not applicable)")
  prep.add_argument("--no-templates", dest="templates", action="store_false",
                    help="no templated English wordings ('<name> emoji', '<name> icon')")
  prep.add_argument("--unseen-items", type=output.unseen_fraction, default=0.0, metavar="FRACTION",
                    help="emoji: this share in [0, 1) of the items (hash of the id) gets no "
                         "training query, only English captions, as in CART's protocol "
                         "(default 0)")
  prep.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
  output.add_output_flags(prep)
  prep.set_defaults(func=run)

  cap = sub.add_parser("add-captions", formatter_class=F,
                       help="add a captioner's JSONL output as caption texts")
  cap.add_argument("--corpus", required=True, help="corpus directory")
  cap.add_argument("--captions", required=True, help='JSONL: {"item_id": ..., "text": ...} per line')
  cap.add_argument("--replace", action="store_true", help="drop the existing caption texts first")
  cap.add_argument("--source", default=None, help="provenance tag (default 'captioner')")
  output.add_output_flags(cap)
  cap.set_defaults(func=run)

  mrg = sub.add_parser("merge", formatter_class=F,
                       help="merge corpora of any modalities into one corpus (header 'mixed' "
                            "when they differ), with their embeddings")
  mrg.add_argument("corpora", nargs="+", metavar="CORPUS", help="two or more corpus directories")
  mrg.add_argument("--out", required=True, help="merged corpus directory to create")
  mrg.add_argument("--embeddings", nargs="+", default=None, metavar="E.npy",
                   help="one embeddings file per CORPUS, same order and dimension (ids from the "
                        "E.ids.txt that cart embed writes); written merged, rows L2-normalised, "
                        "as OUT/embeddings.npy + OUT/embeddings.ids.txt for cart build-ids")
  mrg.add_argument("--names", nargs="+", default=None, metavar="NAME",
                   help="per CORPUS, the name that prefixes colliding ids and names its media "
                        "folder (default: each corpus's own name)")
  mrg.add_argument("--name", default=None, help="merged corpus name (default: NAMEs joined by '+')")
  mrg.add_argument("--prefix", action="store_true",
                   help="prefix every item id with '<name>:' (default: only ids that collide)")
  mrg.add_argument("--media", dest="media_mode", choices=("symlink", "copy", "hardlink"),
                   default="symlink", help="how media enter the merged corpus (default: symlink)")
  mrg.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
  output.add_output_flags(mrg)
  mrg.set_defaults(func=run)

  info = sub.add_parser("info", formatter_class=F,
                        help="validate a corpus (every image decoded) and print its counts and "
                             "leak check")
  info.add_argument("corpus", help="corpus directory")
  output.add_output_flags(info)
  info.set_defaults(func=run)
  return p


def _parse_split_lists(values: list[str]) -> dict[str, Path] | None:
  from cart_jax.core.errors import CartError
  out = {}
  for v in values:
    if "=" not in v:
      raise CartError(f"--split-list {v!r}: expected SPLIT=FILE")
    split, path = v.split("=", 1)
    out[split] = Path(path)
  return out or None


def run(args) -> int:
  from cart_jax import api
  from cart_jax.core.errors import CartError

  out = getattr(args, "out", None)
  if out is not None and Path(out).exists() and not args.overwrite:
    raise CartError(f"--out {out} already exists (pass --overwrite to replace it)")
  rc = 0
  with output.logs_to_stderr(args):
    if args.data_command == "import":
      summary = api.data_import(args.format, args.sources, args.out, media_root=args.media_root,
                                media_mode=args.media_mode, overwrite=args.overwrite,
                                name=args.name, media_pattern=args.media_pattern,
                                skip_missing_media=args.skip_missing_media,
                                split_lists=_parse_split_lists(args.split_list),
                                mapping=args.mapping).summary
    elif args.data_command == "prepare":
      summary = api.prepare(args.dataset, args.out, limit=args.limit, size=args.size,
                            templates=args.templates, unseen_items=args.unseen_items,
                            overwrite=args.overwrite).summary
    elif args.data_command == "add-captions":
      summary = api.add_captions(args.corpus, args.captions, replace=args.replace,
                                 source=args.source).summary
    elif args.data_command == "merge":
      summary = api.data_merge(args.corpora, args.out, embeddings=args.embeddings,
                               names=args.names, name=args.name, prefix=args.prefix,
                               media_mode=args.media_mode, overwrite=args.overwrite).summary
    else:  # info (argparse allows nothing else)
      summary = api.data_info(args.corpus)
      rc = 1 if summary["leaks"] else 0
  output.emit(args, summary, ensure_ascii=False)
  return rc
