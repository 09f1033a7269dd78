"""``cart embed``: item embeddings of a corpus, for ``cart build-ids`` and ``cart baseline``.

  # built-in dual encoder: frozen MiniLM text tower + an image tower trained on the train texts
  cart embed --corpus corpora/emoji --out emb/emoji.npy
  # embeddings computed elsewhere (ImageBind, CLIP...), aligned to the corpus's items
  cart embed --corpus corpora/f30k --out emb/f30k.npy --encoder precomputed \\
      --precomputed clip_images.npy --ids clip_image_ids.txt

Writes, next to ``--out E.npy`` (float32 [N, d], L2-normalised for the built-in encoder, rows in
the corpus's item order):
  E.ids.txt     one item id per line (row order): ``cart build-ids --embeddings E.npy --item-ids E.ids.txt``
  E.meta.json   encoder, dimension, corpus, training summary
  E.model.npz   (built-in) the trained item tower + text projection; ``cart baseline`` encodes
                queries with it
Checkpoints of the built-in training go to ``--checkpoint-dir`` (default ``E.ckpt/``); a run
interrupted there resumes from its last checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

META_FORMAT = "cart-embeddings"
META_VERSION = 1


def register(subparsers, name: str, help_text: str) -> argparse.ArgumentParser:
  p = subparsers.add_parser(name, help=help_text, description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--corpus", required=True, help="corpus directory")
  p.add_argument("--out", required=True, help="item embeddings to write (.npy)")
  p.add_argument("--encoder", choices=("builtin", "precomputed"), default="builtin",
                 help="train the built-in dual encoder, or align embeddings computed elsewhere")
  g = p.add_argument_group("precomputed")
  g.add_argument("--precomputed", default=None, help=".npy or .npz of item embeddings")
  g.add_argument("--ids", default=None,
                 help="ids of the --precomputed rows, one per line (default: <P>.ids.txt, or the "
                      "'ids' array of a .npz)")
  g.add_argument("--key", default=None, help=".npz: name of the embeddings array")
  g.add_argument("--ids-key", default=None, help=".npz: name of the ids array")
  g.add_argument("--allow-extra-ids", action="store_true",
                 help="drop rows whose id is not a corpus item instead of failing")
  g.add_argument("--expect-dim", type=int, default=None, help="fail unless the dimension is this")
  b = p.add_argument_group("builtin")
  b.add_argument("--steps", type=int, default=600, help="training steps (default 600)")
  b.add_argument("--batch-size", type=int, default=256, help="items per step (default 256)")
  b.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
  b.add_argument("--seed", type=int, default=0)
  b.add_argument("--dim", type=int, default=256, help="embedding dimension (default 256)")
  b.add_argument("--captions", action="store_true",
                 help="also train on the train captions (default: train queries only)")
  b.add_argument("--max-shift", type=int, default=None,
                 help="augmentation: random translation up to this many pixels (default 0)")
  b.add_argument("--text-batch", type=int, default=128, help="MiniLM batch size (default 128)")
  b.add_argument("--checkpoint-dir", default=None, help="default: <out without .npy>.ckpt")
  b.add_argument("--checkpoint-every", type=int, default=200, help="steps (0: only at the end)")
  b.add_argument("--no-resume", dest="resume", action="store_false",
                 help="ignore existing checkpoints in --checkpoint-dir (they are overwritten)")
  p.add_argument("--overwrite", action="store_true", help="replace --out and its sidecars")
  p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
  p.add_argument("--json", default=None, help="write a JSON summary here")
  p.set_defaults(func=run)
  return p


def sidecars(out: str | os.PathLike) -> dict[str, Path]:
  """The files ``cart embed --out E.npy`` writes: embeddings, ids, meta, model."""
  out = Path(out)
  stem = out.with_suffix("") if out.suffix == ".npy" else out
  return {"embeddings": out, "ids": Path(f"{stem}.ids.txt"), "meta": Path(f"{stem}.meta.json"),
          "model": Path(f"{stem}.model.npz")}


def progress_factory(enabled: bool):
  """``progress(description, total)`` -> a tqdm bar (or None when disabled)."""
  if not enabled:
    return None
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  bars = []

  def make(desc: str, total: int):
    bar = tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=True)
    bars.append(bar)
    return bar

  make.close_all = lambda: [b.close() for b in bars]
  return make


def _callback(progress, desc, total):
  """A per-unit ``update(n)`` callback of a new bar (or None)."""
  if progress is None:
    return None
  return progress(desc, total).update


def run(args) -> int:
  from cart_jax.core.errors import CartError
  from cart_jax.data.corpus import CorpusFormatError, load_corpus
  from cart_jax.index.inputs import InputError

  out = Path(args.out)
  if out.suffix != ".npy":
    raise CartError(f"--out {out}: expected a .npy file name")
  files = sidecars(out)
  existing = [str(p) for k, p in files.items() if p.exists()]
  if existing and not args.overwrite:
    raise CartError(f"--out: {', '.join(existing)} already exist(s) (pass --overwrite to replace)")
  try:
    corpus = load_corpus(args.corpus, check_media=args.encoder == "builtin")
  except CorpusFormatError as e:
    raise CartError(str(e)) from None
  t0 = time.perf_counter()
  try:
    if args.encoder == "precomputed":
      summary, arrays = _precomputed(args, corpus)
    else:
      summary, arrays = _builtin(args, corpus, files)
  except (InputError, ValueError, NotImplementedError) as e:
    raise CartError(str(e)) from None
  summary["seconds_total"] = time.perf_counter() - t0
  _write_outputs(files, corpus, summary, arrays)
  summary["files"] = {k: str(v) for k, v in files.items() if k in arrays or k in ("ids", "meta")}
  text = json.dumps(summary, indent=2)
  print(text)
  if args.json:
    from cart_jax.core.artefacts import atomic_write_json  # pylint: disable=g-import-not-at-top
    atomic_write_json(args.json, summary)
  return 0


def _precomputed(args, corpus):
  from cart_jax.core.errors import CartError
  from cart_jax.data.embeddings import load_aligned
  if not args.precomputed:
    raise CartError("--encoder precomputed needs --precomputed FILE (.npy or .npz)")
  al = load_aligned(args.precomputed, corpus.item_ids, ids_path=args.ids, key=args.key,
                    ids_key=args.ids_key, expected_dim=args.expect_dim,
                    allow_extra=args.allow_extra_ids)
  summary = {"encoder": "precomputed", "source": str(args.precomputed), "corpus": str(args.corpus),
             "num_items": len(corpus.items), "dim": int(al.embeddings.shape[1]),
             "reordered": al.reordered, "extra_ids_dropped": al.extra_ids}
  return summary, {"embeddings": al.embeddings}


def _builtin(args, corpus, files):
  import numpy as np  # pylint: disable=g-import-not-at-top

  from cart_jax.models.towers import registry  # pylint: disable=g-import-not-at-top

  from cart_jax.train import dual_encoder as train_dual
  from cart_jax.models.dual_encoder import DualEncoderConfig  # pylint: disable=g-import-not-at-top
  from cart_jax.models.text.encoder import MiniLMTextEncoder  # pylint: disable=g-import-not-at-top

  if corpus.modality == "mixed":
    raise NotImplementedError(
        f"{args.corpus} is a mixed corpus ({corpus.modality_counts()}): the built-in encoder trains "
        "one tower per modality; embed each source corpus with the same --dim, then "
        "`cart data merge ... --embeddings A.npy B.npy` (or use --encoder precomputed)")
  if not registry.has_tower(corpus.modality):
    raise NotImplementedError(
        f"corpus modality {corpus.modality!r}: no built-in item tower; use --encoder precomputed")
  tower = registry.default_config(corpus.modality, out_dim=args.dim, max_shift=args.max_shift)
  model_config = DualEncoderConfig(tower=tower)
  kinds = ("query", "caption") if args.captions else ("query",)
  train_config = train_dual.DualTrainConfig(
      steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, seed=args.seed,
      text_kinds=kinds, checkpoint_every=args.checkpoint_every)
  ckpt = Path(args.checkpoint_dir) if args.checkpoint_dir else Path(f"{files['embeddings'].with_suffix('')}.ckpt")
  if not args.resume and ckpt.is_dir():
    for s in train_dual.checkpoint_steps(ckpt):
      os.unlink(ckpt / f"ckpt_{s:08d}.npz")
  progress = progress_factory(args.progress)
  try:
    t0 = time.perf_counter()
    text_encoder = MiniLMTextEncoder(batch_size=args.text_batch)
    t_load = time.perf_counter() - t0
    data = train_dual.prepare_training_data(corpus, tower, text_encoder, kinds, cache_dir=ckpt,
                                            progress=(lambda d, n: progress(d, n).update)
                                            if progress else None)
    model, result = train_dual.train_dual_encoder(data, model_config, train_config,
                                                  checkpoint_dir=ckpt, resume=args.resume,
                                                  progress=progress)
    t1 = time.perf_counter()
    emb = train_dual.embed_items(model, data.media,
                                 progress=_callback(progress, "embedding items", len(corpus.items)))
    t_embed = time.perf_counter() - t1
  finally:
    if progress is not None:
      progress.close_all()
  losses = result.losses
  summary = {
      "encoder": "builtin", "corpus": str(args.corpus), "num_items": len(corpus.items),
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
                  "encode_train_texts": data.seconds_text, "minilm_compile": text_encoder.compile_seconds,
                  "train": result.seconds_train, "train_compile": result.seconds_compile,
                  "embed_items": t_embed},
      "checkpoint_dir": str(ckpt),
  }
  return summary, {"embeddings": emb, "model": model}


def _write_outputs(files, corpus, summary, arrays) -> None:
  """Writes every output to a temporary name first, then renames them all into place."""
  import tempfile  # pylint: disable=g-import-not-at-top

  import numpy as np  # pylint: disable=g-import-not-at-top

  from cart_jax.index.inputs import content_hash  # pylint: disable=g-import-not-at-top

  emb = arrays["embeddings"]
  meta = {"format": META_FORMAT, "version": META_VERSION, "encoder": summary["encoder"],
          "num_items": int(emb.shape[0]), "dim": int(emb.shape[1]), "corpus": summary["corpus"],
          "content_hash": content_hash(emb, corpus.item_ids),
          "model": files["model"].name if "model" in arrays else None,
          "summary": {k: v for k, v in summary.items() if k not in ("files",)}}
  files["embeddings"].parent.mkdir(parents=True, exist_ok=True)
  temps = {}
  try:
    for key, path in files.items():
      if key == "model" and "model" not in arrays:
        continue
      fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent,
                                 suffix=".npz" if key == "model" else "")
      os.close(fd)
      temps[key] = tmp
      if key == "embeddings":
        with open(tmp, "wb") as f:
          np.save(f, np.ascontiguousarray(emb, np.float32))
      elif key == "ids":
        Path(tmp).write_text("".join(f"{i}\n" for i in corpus.item_ids), encoding="utf-8")
      elif key == "meta":
        Path(tmp).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
      elif key == "model":
        from cart_jax.train.dual_encoder import save_model  # pylint: disable=g-import-not-at-top
        save_model(tmp, arrays["model"])
    for key in ("model", "ids", "embeddings", "meta"):
      if key in temps:
        os.replace(temps.pop(key), files[key])
    if "model" not in arrays and files["model"].exists():
      files["model"].unlink()  # a stale model of an earlier built-in run must not pair with these
  finally:
    for tmp in temps.values():
      if os.path.exists(tmp):
        os.unlink(tmp)
