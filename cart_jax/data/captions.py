"""Captioner interface: caption-enhancement texts for every candidate (the paper's design 2).

Any captioner (a multimodal model run elsewhere, a human, a script) writes a JSONL file with
one description per line::

  {"item_id": "1F600", "text": "a yellow smiling face"}      # optional: "source": "blip2"

``add_captions`` merges such a file into a corpus as ``kind=caption, split=train`` texts.
``caption_texts`` gives the texts the caption task trains on: a captions file if one is given,
else the corpus's own ``caption`` texts. Either way a caption equal (after
``normalize_text``) to any ``val``/``test`` text is dropped, so held-out queries never leak into
training through captions.
"""
from __future__ import annotations

import os
from pathlib import Path

from cart_jax.data.corpus import (Corpus, CorpusFormatError, Text, check_text, load_corpus,
                                  normalize_text, read_jsonl, rewrite_texts)


def read_captions(path: str | os.PathLike, known_ids=None, source: str | None = None) -> list[Text]:
  """Reads a captions JSONL file into ``kind=caption, split=train`` texts (validated)."""
  path = Path(path)
  out = []
  for lineno, rec in read_jsonl(path):
    where = f"{path}:{lineno}"
    for key in ("item_id", "text"):
      if not isinstance(rec.get(key), str):
        raise CorpusFormatError(f"{where}: field {key!r} missing or not a string")
    src = rec.get("source", source if source is not None else "captioner")
    text = Text(rec["item_id"], " ".join(rec["text"].split()), "train", "caption", str(src))
    check_text(text, where, known_ids)
    out.append(text)
  if not out:
    raise CorpusFormatError(f"{path}: no captions")
  return out


def _filter(corpus: Corpus, captions: list[Text], existing: list[Text]) -> tuple[list[Text], dict]:
  held_out = {normalize_text(t.text) for t in corpus.all_texts if t.split != "train"}
  seen = {(t.item_id, normalize_text(t.text)) for t in existing}
  kept, leak, dup = [], 0, 0
  for t in captions:
    key = normalize_text(t.text)
    if key in held_out:
      leak += 1
    elif (t.item_id, key) in seen:
      dup += 1
    else:
      seen.add((t.item_id, key))
      kept.append(t)
  return kept, {"added": len(kept), "dropped_leak": leak, "dropped_duplicate": dup}


def add_captions(corpus_dir: str | os.PathLike, captions_path: str | os.PathLike, *,
                 replace: bool = False, source: str | None = None) -> tuple[Corpus, dict]:
  """Adds a captioner's output to a corpus (rewrites ``texts.jsonl`` atomically).

  Args:
    corpus_dir: the corpus directory.
    captions_path: JSONL of ``{"item_id", "text"[, "source"]}``.
    replace: drop the corpus's existing ``caption`` texts first.
    source: provenance tag for records without one (default ``captioner``).

  Returns:
    (the updated corpus, {"added", "dropped_leak", "dropped_duplicate", "removed"}).
  """
  corpus = load_corpus(corpus_dir, check_media=False)
  captions = read_captions(captions_path, {it.id for it in corpus.items}, source)
  base = [t for t in corpus.all_texts if not (replace and t.kind == "caption")]
  kept, stats = _filter(corpus, captions, base)
  stats["removed"] = len(corpus.all_texts) - len(base)
  return rewrite_texts(corpus_dir, base + kept), stats


def caption_texts(corpus: Corpus, captions_path: str | os.PathLike | None = None) -> list[Text]:
  """Caption-enhancement training texts: from ``captions_path`` if given, else the corpus's own."""
  if captions_path is None:
    captions = corpus.texts(split="train", kind="caption")
    return _filter(corpus, captions, [])[0]
  captions = read_captions(captions_path, {it.id for it in corpus.items})
  return _filter(corpus, captions, [])[0]
