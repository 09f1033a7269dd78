"""Corpus protocols that model data a recipe was never tuned for (any corpus, any modality).

Each protocol rewrites a corpus's ``texts.jsonl`` in place (atomically, :func:`rewrite_texts`)
and lists the items it affected, one id a line, in ``affected_items.txt`` beside it, so
``cart eval --items`` and ``cart baseline --items`` score those items' own test queries:

* ``captions-only`` (``--captions-only-items F``): a share ``F`` of the items that have a
  ``test`` query lose every ``train``/``val`` query and are known only through keyword captions
  (``kind=caption, split=train``, ``source=protocol:keywords``): tags or file-name-like words a
  data set module derives from the item (its ``keyword_captions(item_id)``), as a custom corpus
  whose items carry only tags or file names would have.
* ``textless`` (``--textless-items F``): a share ``F`` of the items that have a ``test`` query
  lose every ``train``/``val`` text (queries and captions): their only link is their media, as
  in Clotho's protocol where evaluation clips have no training caption.
* ``no-val`` (``--no-val``): every ``val`` text is dropped (a corpus with only train/test).

Items are chosen by a hash of their id (:func:`held_out_rank`), so the choice does not depend on
the corpus order and a larger share keeps every item of a smaller one. ``test`` texts are never
touched: the held-out items' test queries are the queries the protocol is judged on.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Sequence

from cart_jax.core.errors import CartError
from cart_jax.data.corpus import Corpus, Text, load_corpus, rewrite_texts

AFFECTED_FILE = "affected_items.txt"
PROTOCOLS = ("captions-only", "textless", "no-val")
KEYWORD_SOURCE = "protocol:keywords"


def check_share(value, flag: str) -> float:
  """``value`` as a float in (0, 1); CartError naming ``flag`` otherwise."""
  try:
    share = float(value)
  except (TypeError, ValueError):
    share = float("nan")
  if not 0.0 < share < 1.0:
    raise CartError(f"{flag}: expected a share in (0, 1) of the items that have a test query, "
                    f"got {value!r}")
  return share


def held_out_rank(item_id: str, protocol: str) -> float:
  """Deterministic position of an item in [0, 1): held out at share F iff below F."""
  h = hashlib.sha256(f"{protocol}\x00{item_id}".encode()).digest()
  return int.from_bytes(h[:8], "big") / 2.0 ** 64


def held_out_items(corpus: Corpus, share: float, protocol: str) -> list[str]:
  """Ids (corpus order) of the items with a ``test`` query whose rank is below ``share``.

  At least one item when any item has a test query, and never every item that has training
  queries (the model needs some)."""
  tested = {t.item_id for t in corpus.texts(split="test", kind="query")}
  eligible = [i for i in corpus.item_ids if i in tested]
  chosen = [i for i in eligible if held_out_rank(i, protocol) < share]
  if not chosen and eligible:
    chosen = [min(eligible, key=lambda i: held_out_rank(i, protocol))]
  trained = {t.item_id for t in corpus.texts(split="train", kind="query")}
  if trained and trained <= set(chosen):
    raise CartError(f"{protocol} share {share}: every item with training queries would be held "
                    f"out; use a smaller share")
  return chosen


def apply_protocol(corpus_dir: str | os.PathLike, protocol: str, share: float = 0.0,
                   keyword_captions: Callable[[str], Sequence[str]] | None = None) -> dict:
  """Rewrites ``corpus_dir``'s texts for ``protocol``; returns a summary (counts, affected items).

  Args:
    protocol: one of :data:`PROTOCOLS`.
    share: captions-only / textless: the share of the items with a test query to hold out.
    keyword_captions: captions-only: item id -> its keyword captions (at least one per item).
  """
  if protocol not in PROTOCOLS:
    raise CartError(f"unknown protocol {protocol!r}; expected one of {list(PROTOCOLS)}")
  root = Path(corpus_dir)
  corpus = load_corpus(root, check_media=False)
  before = len(corpus.all_texts)
  affected: list[str] = []
  added = 0
  if protocol == "no-val":
    texts = [t for t in corpus.all_texts if t.split != "val"]
  else:
    flag = "--captions-only-items" if protocol == "captions-only" else "--textless-items"
    share = check_share(share, flag)
    if protocol == "captions-only" and keyword_captions is None:
      raise CartError(f"{flag}: corpus {corpus.name!r} has no keyword captions to fall back on "
                      f"(its data set module defines no keyword_captions)")
    affected = held_out_items(corpus, share, protocol)
    held = set(affected)
    # Only test texts stay for held-out items (queries and captions alike).
    texts = [t for t in corpus.all_texts if t.item_id not in held or t.split == "test"]
    if protocol == "captions-only":  # keyword captions stand in for what was removed
      for item in affected:
        words = [w for w in keyword_captions(item) if w and w.strip()]
        if not words:
          raise CartError(f"{flag}: no keyword caption for item {item!r}")
        texts += [Text(item, w, "train", "caption", KEYWORD_SOURCE) for w in words]
        added += len(words)
  rewrite_texts(root, texts)
  out = {"protocol": protocol, "share": share, "affected_items": len(affected),
         "texts_before": before, "texts_after": len(texts), "keyword_captions": added}
  if protocol != "no-val":  # the held-out items, for `--items` evaluations
    tmp = root / f".{AFFECTED_FILE}.tmp-{os.getpid()}"
    tmp.write_text("".join(i + "\n" for i in affected), encoding="utf-8")
    os.replace(tmp, root / AFFECTED_FILE)
    out["affected_items_file"] = str(root / AFFECTED_FILE)
  return out
