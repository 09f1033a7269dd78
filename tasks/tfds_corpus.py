"""A TensorFlow Datasets builder for the corpus format, so a corpus directory can be read as TFDS.

  from cart_seqio.tfds_corpus import CartCorpus
  builder = CartCorpus(corpus_dir="corpora/emoji", data_dir="/tmp/tfds")
  builder.download_and_prepare()          # reads the corpus; downloads nothing
  ds = builder.as_dataset(split="test")   # {"item_id", "text", "kind", "source", "media"}

One example per text; TFDS splits ``train``/``validation``/``test`` are the corpus splits
``train``/``val``/``test`` (empty splits are left out). ``media`` is the item's media path
relative to the corpus; ``include_media=True`` adds ``media_bytes`` (the file's bytes). The
builder config is named after the corpus and a hash of its files, so several corpora (or
versions of one) can share a ``data_dir``.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import tensorflow as tf
import tensorflow_datasets as tfds

from cart_jax.data.corpus import (CORPUS_FILE, ITEMS_FILE, KINDS, TEXTS_FILE, load_corpus)

TFDS_SPLITS = {"train": "train", "val": "validation", "test": "test"}


def _corpus_hash(root: Path) -> str:
  h = hashlib.sha256()
  for name in (CORPUS_FILE, ITEMS_FILE, TEXTS_FILE):
    h.update((root / name).read_bytes())
  return h.hexdigest()[:10]


class CartCorpus(tfds.core.GeneratorBasedBuilder):
  """Texts of a CART corpus directory with their item ids (and optionally media bytes)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Corpus format version 1."}

  def __init__(self, *, corpus_dir: str | os.PathLike, include_media: bool = False, **kwargs):
    self._corpus_dir = Path(corpus_dir)
    self._corpus = load_corpus(self._corpus_dir)
    self._include_media = include_media
    stem = re.sub(r"[^a-z0-9_]+", "_", self._corpus.name.lower()).strip("_") or "corpus"
    config = tfds.core.BuilderConfig(
        name=f"{stem}_{_corpus_hash(self._corpus_dir)}{'_media' if include_media else ''}",
        description=f"CART corpus {self._corpus.name!r} ({self._corpus.modality}) from "
                    f"{self._corpus_dir}")
    super().__init__(config=config, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    features = {
        "item_id": tfds.features.Text(),
        "text": tfds.features.Text(),
        "kind": tfds.features.ClassLabel(names=list(KINDS)),
        "source": tfds.features.Text(),
        "media": tfds.features.Text(),
    }
    if self._include_media:
      features["media_bytes"] = tfds.features.Tensor(shape=(), dtype=tf.string)
    return tfds.core.DatasetInfo(
        builder=self, description=f"CART corpus {self._corpus.name} ({self._corpus.modality})",
        features=tfds.features.FeaturesDict(features), supervised_keys=("text", "item_id"),
        metadata=tfds.core.MetadataDict(name=self._corpus.name, modality=self._corpus.modality,
                                        num_items=len(self._corpus.items)))

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {TFDS_SPLITS[s]: self._generate_examples(s) for s in TFDS_SPLITS
            if self._corpus.texts(split=s)}

  def _generate_examples(self, split: str):
    media_of = {it.id: it.media for it in self._corpus.items}
    for i, t in enumerate(self._corpus.all_texts):
      if t.split != split:
        continue
      ex = {"item_id": t.item_id, "text": t.text, "kind": t.kind, "source": t.source or "",
            "media": media_of[t.item_id]}
      if self._include_media:
        ex["media_bytes"] = (self._corpus_dir / media_of[t.item_id]).read_bytes()
      yield f"{split}-{i}", ex
