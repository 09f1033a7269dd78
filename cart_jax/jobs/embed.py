"""``cart embed``: item embeddings of a corpus, written as ``E.npy`` and its sidecars
(:mod:`cart_jax.data.embeddings`, the file format and the options).

:func:`embed_builtin` trains the built-in dual encoder (:mod:`cart_jax.train.dual_encoder`) and
embeds every item; :func:`embed_with_model` only encodes the items with a dual encoder trained
before (an ``E.model.npz``: new items land in the space of that model's earlier ``E.npy``);
:func:`align_precomputed` takes embeddings computed elsewhere (ImageBind, CLIP, CLAP...) and aligns
them to the corpus's items.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from cart_jax.core.errors import CartError
from cart_jax.data.corpus import load_corpus
from cart_jax.data.embeddings import (BuiltinEmbedOptions, EmbeddingFiles, EmbedResult,
                                      ModelEmbedOptions, PrecomputedEmbedOptions,
                                      check_builtin_options, embedding_files, load_aligned,
                                      read_meta, write_embeddings)
from cart_jax.models.dual_encoder import DualEncoderConfig
from cart_jax.models.text.encoder import MiniLMTextEncoder
from cart_jax.models.towers import registry
from cart_jax.train import dual_encoder as train_dual


def embed(corpus_dir: str | os.PathLike, out: str | os.PathLike,
          options: BuiltinEmbedOptions | ModelEmbedOptions | PrecomputedEmbedOptions
          = BuiltinEmbedOptions(), *, overwrite: bool = False, progress: bool = True
          ) -> EmbedResult:
  """Item embeddings of a corpus, written as ``out`` (``E.npy``) and its sidecars.

  ``options``: train the built-in dual encoder (and write its ``E.model.npz``), encode with one
  trained before (:class:`ModelEmbedOptions`; its model is written next to ``out`` too), or align
  embeddings computed elsewhere.

  Raises:
    CartError: ``out`` is not a ``.npy`` name, its files exist (without ``overwrite``), the corpus
      or the precomputed embeddings are invalid, the corpus has no built-in item tower, or the
      model is unreadable, of another modality or of another dimension than ``expect_dim``.
  """
  files = embedding_files(out)
  if files.embeddings.suffix != ".npy":
    raise CartError(f"--out {out}: expected a .npy file name")
  existing = files.existing()
  if existing and not overwrite:
    raise CartError(f"--out: {', '.join(map(str, existing))} already exist(s) (pass --overwrite "
                    "to replace)")
  builtin = isinstance(options, (BuiltinEmbedOptions, ModelEmbedOptions))
  if isinstance(options, ModelEmbedOptions) and Path(options.model).absolute() == \
      files.model.absolute():
    raise CartError(f"--model {options.model} is the model file --out {out} would write; pass "
                    "another --out")
  corpus = load_corpus(corpus_dir, check_media=builtin)
  t0 = time.perf_counter()
  if isinstance(options, ModelEmbedOptions):
    summary, emb, model = embed_with_model(corpus, str(corpus_dir), options, progress=progress)
  elif builtin:
    summary, emb, model = embed_builtin(corpus, str(corpus_dir), options, files, progress=progress)
  else:
    (summary, emb), model = align_precomputed(corpus, str(corpus_dir), options), None
  summary["seconds_total"] = time.perf_counter() - t0
  write_embeddings(files, corpus.item_ids, emb, summary, model=model)
  summary["files"] = {k: str(v) for k, v in dataclasses.asdict(files).items()
                      if k != "model" or model is not None}
  return EmbedResult(files=files, summary=summary)


def align_precomputed(corpus, corpus_dir: str, options: PrecomputedEmbedOptions
                      ) -> tuple[dict, np.ndarray]:
  """Aligns ``options.path`` to the corpus: (summary, embeddings [N, d] in corpus item order)."""
  if not options.path:
    raise CartError("--encoder precomputed needs --precomputed FILE (.npy or .npz)")
  al = load_aligned(options.path, corpus.item_ids, ids_path=options.ids, key=options.key,
                    ids_key=options.ids_key, expected_dim=options.expect_dim,
                    allow_extra=options.allow_extra_ids)
  return {"encoder": "precomputed", "source": str(options.path), "corpus": corpus_dir,
          "num_items": len(corpus.items), "dim": int(al.embeddings.shape[1]),
          "reordered": al.reordered, "extra_ids_dropped": al.extra_ids}, al.embeddings


def embed_builtin(corpus, corpus_dir: str, options: BuiltinEmbedOptions, files: EmbeddingFiles, *,
                  progress: bool = True) -> tuple[dict, np.ndarray, object]:
  """Trains the built-in dual encoder on the corpus and embeds every item.

  Returns:
    (summary, embeddings float32 [N, d] L2-normalised, the trained DualEncoder).
  """
  if corpus.modality == "mixed":
    raise CartError(
        f"{corpus_dir} is a mixed corpus ({corpus.modality_counts()}): the built-in encoder trains "
        "one tower per modality; embed each source corpus with the same --dim, then "
        "`cart data merge ... --embeddings A.npy B.npy` (or use --encoder precomputed)")
  if not registry.has_tower(corpus.modality):
    raise CartError(f"corpus modality {corpus.modality!r}: no built-in item tower; use --encoder "
                    "precomputed")
  check_builtin_options(options)
  tower = registry.default_config(corpus.modality, encoder=options.item_encoder,
                                  out_dim=options.dim, max_shift=options.max_shift)
  model_config = DualEncoderConfig(tower=tower)
  kinds = ("query", "caption") if options.captions else ("query",)
  train_config = train_dual.DualTrainConfig(
      steps=options.training_steps(), batch_size=options.batch_size, learning_rate=options.lr,
      seed=options.seed, text_kinds=kinds, checkpoint_every=options.checkpoint_every)
  ckpt = (Path(options.checkpoint_dir) if options.checkpoint_dir else
          Path(f"{files.embeddings.with_suffix('')}.ckpt"))
  bars = []

  def bar(desc: str, total: int):
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    b = tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=True)
    bars.append(b)
    return b

  make_bar = bar if progress else None
  try:
    t0 = time.perf_counter()
    text_encoder = MiniLMTextEncoder(batch_size=options.text_batch)
    t_load = time.perf_counter() - t0
    data = train_dual.prepare_training_data(
        corpus, tower, text_encoder, kinds, cache_dir=ckpt,
        progress=(lambda d, n: bar(d, n).update) if progress else None)
    model, result = train_dual.train_dual_encoder(data, model_config, train_config,
                                                  checkpoint_dir=ckpt, resume=options.resume,
                                                  progress=make_bar)
    t1 = time.perf_counter()
    emb = train_dual.embed_items(model, data.media, progress=(
        bar("embedding items", len(corpus.items)).update if progress else None))
    t_embed = time.perf_counter() - t1
  finally:
    for b in bars:
      b.close()
  losses = result.losses
  summary = {
      "encoder": "builtin", "item_encoder": getattr(tower, "encoder", "scratch"),
      "corpus": corpus_dir, "num_items": len(corpus.items),
      "dim": int(emb.shape[1]), "model_config": json.loads(model_config.to_json()),
      "train_config": json.loads(train_config.to_json()),
      "train_texts": int(len(data.text_item_rows)), "train_text_kinds": list(kinds),
      "items_with_train_texts": int(len(np.unique(data.text_item_rows))),
      "batch_size": result.batch_size, "resumed_from_step": result.start_step,
      "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
      "loss_last_50_mean": float(np.mean(losses[-50:])) if losses else None,
      "accuracy_last_50_mean": float(np.mean(result.accuracies[-50:])) if losses else None,
      "logit_scale": result.logit_scale,
      "seconds": {"load_minilm": t_load, "read_media": data.seconds_media,
                  "encode_train_texts": data.seconds_text,
                  "minilm_compile": text_encoder.compile_seconds,
                  "train": result.seconds_train, "train_compile": result.seconds_compile,
                  "embed_items": t_embed},
      "checkpoint_dir": str(ckpt),
  }
  return summary, emb, model


def embed_with_model(corpus, corpus_dir: str, options: ModelEmbedOptions, *,
                     progress: bool = True) -> tuple[dict, np.ndarray, object]:
  """Encodes every item with the item tower of ``options.model`` (no training).

  The media are read exactly as :func:`embed_builtin` reads them for that tower, so a corpus
  embedded with the model trained on it gets the rows of its own ``E.npy`` back.

  Returns:
    (summary, embeddings float32 [N, d] L2-normalised, the loaded DualEncoder).
  """
  b = options.batch_size
  if not isinstance(b, int) or isinstance(b, bool) or b < 1:
    raise CartError(f"--batch-size must be an integer >= 1, got {b!r}")
  model = train_dual.load_model(options.model)  # DualEncoderError naming the file
  tower = model.config.tower
  dim = int(model.config.embed_dim)
  if corpus.modality == "mixed":
    raise CartError(f"{corpus_dir} is a mixed corpus ({corpus.modality_counts()}): --model "
                    f"{options.model} is one {tower.modality} item tower; embed each source corpus "
                    "with its own modality's model")
  if corpus.modality != tower.modality:
    raise CartError(f"--model {options.model} is a {tower.modality} item tower; {corpus_dir} is a "
                    f"{corpus.modality} corpus (use the E.model.npz of a {corpus.modality} "
                    "embedding)")
  if options.expect_dim is not None and dim != options.expect_dim:
    raise CartError(f"--model {options.model}: its embeddings have dimension {dim}, expected "
                    f"{options.expect_dim} (--expect-dim)")
  bars = []

  def bar(desc: str, total: int):
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    bb = tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=True)
    bars.append(bb)
    return bb.update

  try:
    t0 = time.perf_counter()
    paths = [corpus.media_path(it) for it in corpus.items]
    media = registry.load_media(paths, tower, bar("reading media", len(paths)) if progress else None)
    t1 = time.perf_counter()
    emb = train_dual.embed_items(model, media, batch_size=b, progress=(
        bar("embedding items", len(paths)) if progress else None))
    t2 = time.perf_counter()
  finally:
    for bb in bars:
      bb.close()
  summary = {
      "encoder": "builtin", "mode": "encode-only", "model": str(options.model),
      "corpus": corpus_dir, "num_items": len(corpus.items), "dim": int(emb.shape[1]),
      "model_config": json.loads(model.config.to_json()),
      "model_meta": _model_source(options.model),
      "seconds": {"read_media": t1 - t0, "embed_items": t2 - t1},
  }
  return summary, emb, model


def _model_source(model_path: str | os.PathLike) -> dict | None:
  """What the ``E.meta.json`` next to ``E.model.npz`` says of the model's training (or None)."""
  path = Path(model_path)
  suffix = ".model.npz"
  if not path.name.endswith(suffix):
    return None
  meta = read_meta(path.with_name(path.name[:-len(suffix)] + ".npy"))
  if not meta:
    return None
  return {"corpus": meta.get("corpus"), "num_items": meta.get("num_items"),
          "content_hash": meta.get("content_hash"),
          "train_config": meta.get("summary", {}).get("train_config")}
