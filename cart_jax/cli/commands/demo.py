"""``cart demo``: the whole system on a built-in corpus, next to the dual-tower baseline.

  cart demo [--modality image|audio|video] [--json PATH] [--full] [--workdir DIR]

``--modality`` picks the built-in data set: image -> ``emoji`` (default), audio ->
``instruments`` (General MIDI clips rendered by fluidsynth + freedesktop event sounds),
video -> ``emoji-motion`` (emoji sprites moving, zooming, rotating, fading). The steps below
are the image demo's; the audio and video demos run the same five steps with their data set's
recipe (``DEMO_RECIPE`` in its module: embed steps, identifier shape, gin experiment).

Library: ``cart_jax.cli.recipes.run_demo`` (the same library calls as the
commands named below). Steps:
  1. prepare the emoji corpus (``cart data prepare emoji``): 3,944 rendered emoji, English
     queries split train/val/test by wording, captions in 13 other languages;
  2. train the item encoder (``cart embed``): image tower vs frozen MiniLM text tower, InfoNCE;
  3. build identifiers (``cart build-ids``): K-Means K=64 + RQ-VAE M=2 x C=64 + counter;
  4. train CART (``cart train --gin-file gin_configs/experiments/emoji_demo.gin``: the frozen
     pretrained MiniLM, its states cached once per training text, + a small fused decoder;
     ``--full``: ``emoji_cart.gin``, with R-Drop, captions, 2x the steps, and a longer item
     encoder trained on the same texts);
  5. evaluate CART (``cart eval --rerank``) and the dual tower (``cart baseline``) on the same
     ``test`` queries, print one table and one worked example (query -> generated identifier ->
     item).

Re-ranking: training gets ``EMBEDDINGS`` (the item encoder's output), so with a MiniLM-encoder
model it also builds ``MODEL_DIR/rerank/`` and tunes its weight on ``val``; the table then has a
``CART + rerank`` row: CART's own beams re-sorted by ``logp + weight * cos`` (the dual tower's
query-item cosine), from the same search pass as the ``CART`` row. A model without a MiniLM
encoder has no such row (``cart_rerank`` is null and ``rerank_note`` says why).

JSON (``--json PATH``, ``-``: on stdout, the stage lines and table then go to stderr): {"cart":
{"r@1", "r@5", "r@10", "mrr@10", "qps"}, "cart_rerank": {... , "weight"} or null, "dual_tower":
{...}, "n_items", "n_test_queries", "seconds", "stage_seconds", ...}. Logs of every step go to
``WORKDIR/logs/``; ``--quiet`` prints only the results.
"""
from __future__ import annotations

import argparse

from cart_jax.cli import output
from cart_jax.cli.commands import int_at_least

MODALITIES = ("image", "audio", "video")


def register(sub, name: str, help_text: str) -> argparse.ArgumentParser:
  p = sub.add_parser(name, help=help_text, description=__doc__, formatter_class=output.HelpFormatter)
  p.add_argument("--modality", choices=MODALITIES, default="image",
                 help="built-in data set: image = emoji (default), audio = instruments, "
                      "video = emoji-motion")
  p.add_argument("--full", action="store_true",
                 help="the full CART recipe (R-Drop, captions, 2,000 steps) and a longer item "
                      "encoder trained on the same texts")
  p.add_argument("--workdir", default=None,
                 help="keep everything here (default: a new temporary directory); steps whose "
                      "outputs already exist there are reused")
  p.add_argument("--no-templates", action="store_true",
                 help="image: the strict emoji split, without templated training wordings "
                      "('<name> emoji', '<name> icon')")
  p.add_argument("--unseen-items", type=output.unseen_fraction, default=0.0, metavar="F",
                 help="image: a share F of the items has no training query, only captions (the "
                      "paper's protocol); CART and the dual tower both train on the captions, and "
                      "recall is also reported on those items' test queries")
  p.add_argument("--captions-only-items", type=_share("--captions-only-items"), default=0.0,
                 metavar="F",
                 help="audio (data sets with keyword captions): a share F of the items with a test "
                      "query is known only through keyword captions (tags, file name); both methods "
                      "train on them, and recall is also reported on those items' test queries")
  p.add_argument("--textless-items", type=_share("--textless-items"), default=0.0, metavar="F",
                 help="any modality: a share F of the items with a test query has no training text "
                      "at all (their only link is their media); recall is also reported on those "
                      "items' test queries")
  p.add_argument("--no-val", action="store_true",
                 help="any modality: drop the val split (the re-rank weight is then tuned on "
                      "held-out training queries)")
  p.add_argument("--item-encoder", choices=ITEM_ENCODERS, default=None,
                 help="the dual encoder's item side, for both methods (CART's identifiers and "
                      "re-ranker come from it): scratch (a tower trained from the media), "
                      "pretrained (the modality's pretrained network: efficientnet-lite0 for "
                      "image and video frames, aisfx for audio, frozen, with a trained head) or "
                      "a network by name (default: the recipe's)")
  p.add_argument("--limit", type=int_at_least(1), default=None,
                 help="smoke runs: only the first N items (video: N emoji, 11 clips each)")
  p.add_argument("--embed-steps", type=int_at_least(1), default=None,
                 help="override the item encoder's steps")
  p.add_argument("--train-steps", type=int_at_least(1), default=None,
                 help="override CART's training steps")
  output.add_output_flags(p, "the JSON summary")
  p.set_defaults(func=run)
  return p


ITEM_ENCODERS = ("scratch", "pretrained", "efficientnet-lite0", "aisfx")


def _share(flag: str):
  """argparse type of a protocol share in (0, 1)."""
  def parse(value: str) -> float:
    from cart_jax.core.errors import CartError
    from cart_jax.data.protocols import check_share
    try:
      return check_share(value, flag)
    except CartError as e:
      raise argparse.ArgumentTypeError(str(e).replace(f"{flag}: ", "", 1)) from None
  return parse


def run(args) -> int:
  from cart_jax.cli import recipes
  stream = output.text_stream(args)
  log = (lambda m: None) if args.quiet else (lambda m: print(m, file=stream, flush=True))
  result = recipes.run_demo(recipes.recipe_for(args.modality, args.full), workdir=args.workdir,
                            limit=args.limit, embed_steps=args.embed_steps,
                            train_steps=args.train_steps, no_templates=args.no_templates,
                            unseen_items=args.unseen_items,
                            captions_only_items=args.captions_only_items,
                            textless_items=args.textless_items, no_val=args.no_val,
                            item_encoder=args.item_encoder, log=log)
  output.emit(args, result.summary, recipes.report(result.summary))
  return 0
