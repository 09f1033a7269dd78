"""Registers one corpus's SeqIO tasks when imported, from environment variables.

For tools that find tasks by importing a module (``--module_import``), such as SeqIO's cache
job, which preprocesses a large corpus once with Apache Beam::

  CART_SEQIO_CORPUS=gs://b/corpora/coco CART_SEQIO_INDEX=gs://b/runs/coco/index \\
  CART_SEQIO_SOURCE_DIR=gs://b/cart_sources \\
  python -m seqio.scripts.cache_tasks_main --module_import=cart_seqio.registered \\
      --tasks=cart_coco_query,cart_coco_caption --output_cache_dir=gs://b/seqio_cache \\
      --pipeline_options=--runner=DataflowRunner,...

then train with ``InputConfig.pipeline="seqio"``, ``InputConfig.seqio_source_dir`` = the same
source directory, ``InputConfig.use_cached=True`` and ``InputConfig.seqio_cache_dir`` = the cache.

Variables: ``CART_SEQIO_CORPUS`` (corpus directory) and ``CART_SEQIO_INDEX`` (index directory),
both required; ``CART_SEQIO_SOURCE_DIR`` (TFRecord sources: file-backed tasks; unset: in memory),
``CART_SEQIO_CAPTION_RATE``, ``CART_SEQIO_CAPTIONS_FILE``, ``CART_SEQIO_NAME`` (task stem).
Importing this module is the only import of ``cart_seqio`` that registers anything
(``cart_seqio.tasks`` itself registers nothing on import). :data:`NAMES` holds what it registered.
"""
from __future__ import annotations

import os

from cart_jax.core.errors import CartError


def _register():
  env = os.environ
  missing = [v for v in ("CART_SEQIO_CORPUS", "CART_SEQIO_INDEX") if not env.get(v)]
  if missing:
    raise CartError(f"cart_seqio.registered: set {' and '.join(missing)} (the corpus and index "
                    "directories whose tasks to register)")
  from cart_jax.core import paths  # pylint: disable=g-import-not-at-top
  from cart_jax.index.identifiers import load_index  # pylint: disable=g-import-not-at-top
  from cart_seqio import tasks  # pylint: disable=g-import-not-at-top
  corpus = env["CART_SEQIO_CORPUS"]
  if paths.is_remote(corpus):
    corpus = paths.stage(corpus, ("corpus.json", "items.jsonl", "texts.jsonl"))
  rate = env.get("CART_SEQIO_CAPTION_RATE")
  return tasks.register_index_tasks(
      corpus, load_index(paths.stage(env["CART_SEQIO_INDEX"])),
      caption_rate=None if rate in (None, "") else float(rate),
      captions_file=(paths.stage_file(env["CART_SEQIO_CAPTIONS_FILE"])
                     if env.get("CART_SEQIO_CAPTIONS_FILE") else None),
      source_dir=env.get("CART_SEQIO_SOURCE_DIR") or None, name=env.get("CART_SEQIO_NAME") or None)


NAMES = _register()
