"""``cart index``: add items to, or remove items from, a trained run without retraining it.

  cart index add --model-dir RUN --corpus NEW_CORPUS --embeddings NEW_E.npy [--steps N]
  cart index remove --model-dir RUN --ids REMOVED.txt

``add``: the new items (every id new to the run) get identifiers from the run's own K-Means and
RQ-VAE (existing identifiers never change, removed ones are never reused), the decoder is
fine-tuned briefly on their training texts mixed with a replay sample of the old items'
(``--replay-ratio`` of every batch), and their media and texts join the run's corpus, so
``cart eval`` / ``cart search`` see old and new items together. ``NEW_E.npy`` must come from the
same item encoder as the run's index (same dimension), aligned by ids (``NEW_E.ids.txt`` or
``--item-ids``) to the new corpus's items. ``--steps 0`` only gives identifiers (no training).
If a new identifier needs a counter the index did not have, the decoder's output vocabulary grows
by those tokens (appended; no existing token moves).

``remove``: the items leave the trie at once (no training); their identifiers are kept as
tombstones and never given to another item; their texts leave the run's corpus.

Each change writes a new version of the run (``MODEL_DIR/versions/<n>/``: index, corpus,
checkpoint, re-ranker) and switches ``run.json`` to it only once it is complete: a kill leaves
the run at its previous version. A run changed this way is not trained further by ``cart train``.

Defaults (measured by benchmarks/incremental.py; docs/incremental.md):
``--replay-ratio 0.5``; ``--steps`` auto: as many passes over the new texts as the run made over
its own, at most 18% of its training steps (an add then takes about a fifth of a retraining);
``--lr`` the run's peak learning rate. Library: ``cart_jax.api.index_add``,
``cart_jax.api.index_remove`` (``cart_jax.jobs.index_update``).
"""
from __future__ import annotations

import argparse

from cart_jax.cli import output
from cart_jax.cli.commands import float_in, int_at_least, positive_float


def register(subparsers, name: str, help_text: str) -> argparse.ArgumentParser:
  from cart_jax.cli.commands.eval import add_model_dir_flag  # pylint: disable=g-import-not-at-top
  from cart_jax.jobs import index_update as incremental  # pylint: disable=g-import-not-at-top  (no jax import)
  p = subparsers.add_parser(name, help=help_text, description=__doc__,
                            formatter_class=output.HelpFormatter)
  sub = p.add_subparsers(dest="index_command", metavar="ACTION")
  sub.required = True
  F = output.HelpFormatter  # pylint: disable=invalid-name

  add = sub.add_parser("add", formatter_class=F, help="add the items of a corpus to a trained run")
  add_model_dir_flag(add)
  add.add_argument("--corpus", required=True, help="corpus of the new items (with their texts)")
  add.add_argument("--embeddings", required=True, metavar="NEW_E.npy",
                   help="the new items' embeddings, from the run's item encoder")
  output.add_argument(add, "--item-ids", "--ids", dest="item_ids", default=None,
                      help="ids of the embedding rows, one per line (default: NEW_E.ids.txt)")
  add.add_argument("--steps", type=int_at_least(0), default=None,
                   help="fine-tuning steps (default: auto, at most 18%% of the run's; 0: none)")
  add.add_argument("--replay-ratio", type=float_in(0.0, 1.0, high_open=True), default=incremental.DEFAULT_REPLAY_RATIO,
                   help="share of each batch from the old items' training texts (default "
                        f"{incremental.DEFAULT_REPLAY_RATIO})")
  add.add_argument("--balance-tail", type=float_in(0.0, 1.0), default=incremental.DEFAULT_BALANCE_TAIL,
                   help="share of the fine-tune's last steps whose batches hold old and new texts "
                        "in the corpus's own proportion: keeps more of the old items' recall, "
                        "finds fewer new ones (default "
                        f"{incremental.DEFAULT_BALANCE_TAIL}; docs/incremental.md)")
  add.add_argument("--distill", type=float_in(0.0), default=incremental.DEFAULT_DISTILL,
                   help="weight of the distillation from the run before the add on the replayed "
                        "old texts (its whole output distribution as a target; 0: none; default "
                        f"{incremental.DEFAULT_DISTILL})")
  add.add_argument("--new-item-prior", default=incremental.DEFAULT_NEW_ITEM_PRIOR,
                   metavar="auto|none|X",
                   help="the new items' log-prior offset at decode time: auto = their share of "
                        "the corpus's texts against their share of the fine-tune's batches; none; "
                        f"or a number <= 0 (default {incremental.DEFAULT_NEW_ITEM_PRIOR})")
  add.add_argument("--pseudo-queries", type=int_at_least(0),
                   default=incremental.DEFAULT_PSEUDO_QUERIES,
                   help="pseudo-queries for each new item that has no training text (the nearest "
                        "training texts in the dual tower's space; needs NEW_E.model.npz): finds "
                        "such items, at a cost to the old ones (docs/incremental.md); default "
                        f"{incremental.DEFAULT_PSEUDO_QUERIES}: none")
  add.add_argument("--lr", type=positive_float, default=None,
                   help="peak learning rate (default: the run's)")
  add.add_argument("--batch-size", type=int_at_least(1), default=None,
                   help="examples per step (default: the run's)")
  add.add_argument("--seed", type=int, default=0, help="sampling and dropout seed (default 0)")
  _keep_flag(add, incremental.DEFAULT_KEEP_VERSIONS)
  output.add_output_flags(add)
  add.set_defaults(func=run)

  rem = sub.add_parser("remove", formatter_class=F, help="remove items from a trained run")
  add_model_dir_flag(rem)
  rem.add_argument("--ids", required=True, metavar="FILE",
                   help="item ids to remove, one per line (each an item of the run)")
  _keep_flag(rem, incremental.DEFAULT_KEEP_VERSIONS)
  output.add_output_flags(rem)
  rem.set_defaults(func=run)
  return p


def _keep_flag(p: argparse.ArgumentParser, default: int) -> None:
  p.add_argument("--keep-versions", type=int_at_least(1), default=default,
                 help=f"versions under MODEL_DIR/versions/ kept, the new one included (default "
                      f"{default}; version 1, the trained run, is always kept)")


def run(args) -> int:
  from cart_jax import api  # pylint: disable=g-import-not-at-top
  with output.logs_to_stderr(args):
    if args.index_command == "add":
      summary = api.index_add(args.model_dir, args.corpus, args.embeddings, item_ids=args.item_ids,
                              steps=args.steps, replay_ratio=args.replay_ratio,
                              balance_tail=args.balance_tail, distill=args.distill,
                              new_item_prior=args.new_item_prior,
                              pseudo_queries=args.pseudo_queries,
                              learning_rate=args.lr, batch_size=args.batch_size, seed=args.seed,
                              keep_versions=args.keep_versions, verify=args.verify,
                              progress=not args.quiet)
    else:
      summary = api.index_remove(args.model_dir, args.ids, keep_versions=args.keep_versions,
                                 verify=args.verify)
  doc = dict(summary)
  if doc.get("fine_tune"):
    doc["fine_tune"] = {k: v for k, v in doc["fine_tune"].items() if k != "history"}
  what = (f"added {doc['added']}" if doc["action"] == "add" else f"removed {doc['removed']}")
  text = (f"{what} items: {args.model_dir} is at version {doc['version']} ({doc['num_items']} "
          f"items, step {doc['step']}); previous version {doc['previous_version']} kept until "
          f"pruned ({doc.get('pruned_versions') or 'none pruned'})")
  output.emit(args, doc, text)
  return 0
