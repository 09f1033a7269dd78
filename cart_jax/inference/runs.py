"""A trained run (MODEL_DIR): its layout, and loading it for inference.

``MODEL_DIR`` holds everything ``cart eval`` and ``cart search`` need::

  MODEL_DIR/
    run.json            {"format": "cart-run", "version": 1, "corpus_dir": <absolute path>,
                         "index_dir": "index", "model_config": {...}, "train_config": {...},
                         "input_config": {...}, "captions_file": ...}
    config.gin          the operative gin config of `cart train` (when launched through gin)
    index/              a copy of the SemanticIndex directory the run was trained on
    checkpoints/<step>/ orbax checkpoints (params, frozen, opt_state, meta), newest N kept
    tensorboard/        TensorBoard event files (train/*, val/*)
    metrics.jsonl       the same scalars, one JSON line per logged step
    train_summary.json  last metrics, validation recall, timings

The corpus itself is not copied (media can be large): ``run.json`` points at it by absolute
path. A second ``cart train`` on the same MODEL_DIR resumes; it refuses a different model
config or index.

"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from cart_jax.core.errors import CartError

RUN_FORMAT = "cart-run"
RUN_VERSION = 1
RUN_FILE = "run.json"
INDEX_SUBDIR = "index"
CHECKPOINT_SUBDIR = "checkpoints"


class RunError(CartError):
  """A MODEL_DIR that is missing, malformed or incompatible with the requested job."""


@dataclasses.dataclass
class LoadedRun:
  """A trained run ready for inference."""
  model_dir: Path
  run: dict
  model_config: object
  index: object
  corpus: object
  graphdef: object
  params: object
  frozen: object
  step: int
  input_length: int


def load_run(model_dir: str | os.PathLike, step: int | None = None, *, need_corpus: bool = True) -> LoadedRun:
  """Reads ``run.json``, the index copy and the newest (or given) checkpoint of a MODEL_DIR."""
  from cart_jax.data.corpus import load_corpus  # pylint: disable=g-import-not-at-top
  from cart_jax.index.identifiers import load_index  # pylint: disable=g-import-not-at-top
  from cart_jax.models.cart.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from cart_jax.train import trainer  # pylint: disable=g-import-not-at-top

  d = Path(model_dir)
  run_path = d / RUN_FILE
  if not run_path.exists():
    raise RunError(f"{d}: not a CART model directory (no {RUN_FILE}; train one with `cart train`)")
  try:
    run = json.loads(run_path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise RunError(f"{run_path}: unreadable JSON ({e})") from None
  if run.get("format") != RUN_FORMAT or run.get("version") != RUN_VERSION:
    raise RunError(f"{run_path}: format {run.get('format')!r} v{run.get('version')}, expected "
                   f"{RUN_FORMAT!r} v{RUN_VERSION}")
  model_config = ModelConfig(**run["model_config"])
  index = load_index(d / run.get("index_dir", INDEX_SUBDIR))
  corpus = None
  if need_corpus:
    if not Path(run["corpus_dir"]).exists():
      raise RunError(f"{run_path}: corpus_dir {run['corpus_dir']} does not exist")
    corpus = load_corpus(run["corpus_dir"], check_media=False)
  ckpt_dir = d / CHECKPOINT_SUBDIR
  if not ckpt_dir.exists() or not any(p.name.isdigit() for p in ckpt_dir.iterdir()):
    raise RunError(f"{ckpt_dir}: no checkpoint yet")
  graphdef, params, frozen, got_step = trainer.restore_for_inference(model_config, ckpt_dir, step)
  return LoadedRun(model_dir=d, run=run, model_config=model_config, index=index, corpus=corpus,
                   graphdef=graphdef, params=params, frozen=frozen, step=got_step,
                   input_length=int(run["input_config"]["input_length"]))


def searcher_for_run(r: LoadedRun, *, beam_size: int, n_results: int, batch_size: int,
                     modality: str | None = None):
  """A CartSearcher over the run's index; item modalities from the run's corpus (when loaded).

  With ``modality`` the searcher only generates identifiers of that modality's items; an unknown
  modality raises ``ModalityError`` listing the index's modalities.
  """
  from cart_jax.inference.searcher import CartSearcher, index_modalities  # pylint: disable=g-import-not-at-top
  modalities = None
  if r.corpus is not None:
    try:
      modalities = index_modalities(r.index, r.corpus)
    except ValueError as e:
      if modality is not None:  # restricting needs every row's modality
        raise RunError(f"{r.model_dir}: cannot restrict by modality: {e}") from None
  searcher = CartSearcher(r.graphdef, r.index, beam_size=beam_size, n_results=n_results,
                          input_length=r.input_length, batch_size=batch_size,
                          item_modalities=modalities)
  return searcher.restrict(modality) if modality is not None else searcher
