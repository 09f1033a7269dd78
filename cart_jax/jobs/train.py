"""The training job: trains CART into a MODEL_DIR (layout: :mod:`cart_jax.runs.layout`).

No gin here (``cart_jax/cli/gin_bridge.py`` makes :func:`train_job` configurable).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

from cart_jax.core import paths
from cart_jax.core.artefacts import output_lock
from cart_jax.runs.layout import (CHECKPOINT_SUBDIR, CORPUS_FILES, CORPUS_HASHES, INDEX_SUBDIR,
                                  RUN_FILE, RUN_FORMAT, RUN_VERSION, RunError, corpus_hashes)

CONFIG_FILE = "config.gin"


def resolve_config(config: str, summary: dict) -> str:
  """``config`` (gin text) with the values a run resolved itself in place of the configured ones.

  ``summary`` holds the absolute ``model_dir``, ``corpus_dir``, ``index_dir`` and ``embeddings``
  (None when not given) and the ``model_config`` the network was built with (its
  ``output_vocab_size`` comes from the index, not from the gin files). Their bindings in
  ``config`` are dropped and bound again at the end, so the file says what the run used.
  """
  resolved = {macro: summary[key] for macro, key in (
      ("MODEL_DIR", "model_dir"), ("CORPUS_DIR", "corpus_dir"), ("INDEX_DIR", "index_dir"),
      ("EMBEDDINGS", "embeddings"))}
  resolved.update({f"ModelConfig.{k}": v for k, v in summary["model_config"].items()})
  kept = [line for line in config.splitlines() if line.split("=", 1)[0].strip() not in resolved]
  lines = kept + ["", "# Resolved by the run (absolute paths; output_vocab_size from the index):"]
  lines += [f"{name} = {value!r}" for name, value in resolved.items()]
  return "\n".join(lines) + "\n"


def _index_fingerprint(index_dir) -> dict:
  meta = json.loads((index_dir / "meta.json").read_text(encoding="utf-8"))
  return meta.get("files", {})


def _ensure_index(index_dir, model_dir, embeddings, identifier_config,
                  log: Callable[[str], None]):
  """Copies (or first builds) the index into ``MODEL_DIR/index``; returns that path.

  Either directory may be remote (``gs://``); the index is built only into a local one."""
  from cart_jax.index import identifiers  # pylint: disable=g-import-not-at-top
  dest = model_dir / INDEX_SUBDIR
  if index_dir is None:
    if (dest / "meta.json").exists():
      return dest
    raise RunError(f"no index: pass index_dir (INDEX_DIR), or resume a MODEL_DIR that has {dest}")
  index_dir = paths.absolute(index_dir)
  if not (index_dir / "meta.json").exists():
    if paths.is_remote(index_dir):
      raise RunError(f"{index_dir}: not an index directory (no meta.json); build it with "
                     f"`cart build-ids` and copy it there (indexes are built on a local disk)")
    if embeddings is None:
      raise RunError(f"{index_dir}: not an index directory (no meta.json); build it with "
                     f"`cart build-ids`, or set EMBEDDINGS so the job builds it")
    from cart_jax.data.embeddings import embedding_files  # pylint: disable=g-import-not-at-top
    from cart_jax.index import inputs  # pylint: disable=g-import-not-at-top
    emb = inputs.load_embeddings(embeddings)  # the float32 values, validated (finite, magnitude)
    ids_path = embedding_files(embeddings).ids
    ids = inputs.load_item_ids(ids_path) if ids_path.exists() else None
    if ids is not None:
      inputs.check_ids(ids, emb.shape[0], source=f"{ids_path} vs {embeddings}")
    log(f"building the index {index_dir} from {embeddings}")
    cfg = identifier_config or identifiers.IdentifierConfig()
    identifiers.build_index(emb, ids, cfg).save(index_dir)
  if (dest / "meta.json").exists():
    if _index_fingerprint(dest) != _index_fingerprint(index_dir):
      raise RunError(f"{model_dir} was trained on another index than {index_dir} "
                     f"(use a new MODEL_DIR)")
    return dest
  paths.copy_tree(index_dir, dest)  # atomic locally; meta.json last on a bucket
  return dest


def _refuse_updated_run(run_path) -> None:
  """A run whose items ``cart index add/remove`` changed (it reads ``versions/<n>/``) is not resumed."""
  try:
    if not run_path.exists():
      return
    old = json.loads(run_path.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError):
    return
  if isinstance(old, dict) and old.get("index_version", 1) != 1:
    raise RunError(f"{run_path}: items were added or removed (`cart index`, index version "
                   f"{old.get('index_version')}): this MODEL_DIR cannot be trained further; train a "
                   f"new MODEL_DIR on its corpus {old.get('corpus_dir')}")


def train_job(*, model_dir: str, corpus_dir: str, index_dir: str | None, model_config,
              train_config, input_config, captions_file: str | None = None,
              embeddings: str | None = None, identifier_config=None, operative_config: str | None = None,
              progress: bool = True, stop_after: int | None = None,
              log: Callable[[str], None] = print) -> dict:
  """Trains CART into ``model_dir`` (resuming if it holds checkpoints). Returns a summary.

  ``operative_config`` (gin text) is written to ``MODEL_DIR/config.gin`` up front, followed by
  the values resolved here (:func:`resolve_config`), so a crashed run documents itself too.
  Process 0 holds ``MODEL_DIR``'s output lock (:func:`cart_jax.core.artefacts.output_lock`) for
  the whole job: a second job on the same ``MODEL_DIR`` raises ``OutputLockedError`` naming
  this one's pid before it reads or writes anything.

  Multi-process (``jax.distributed``, see ``launch/``): every process reads and checks the
  inputs; process 0 alone writes MODEL_DIR (the index copy, or the index built from
  ``embeddings``; ``run.json``; ``config.gin``; metrics; ``train_summary.json``), each file
  atomically, and the others read the index copy only after it is complete (a barrier). A
  failure on any process during that setup raises on all of them (:func:`partitioning.agree`),
  so none waits for ever at a collective. Checkpoints are saved by all processes together
  (orbax). Log lines come from process 0.
  """
  import jax  # pylint: disable=g-import-not-at-top

  from cart_jax import partitioning  # pylint: disable=g-import-not-at-top
  from cart_jax.jobs.rerank import after_training  # pylint: disable=g-import-not-at-top
  from cart_jax.train import input_pipeline, trainer  # pylint: disable=g-import-not-at-top

  partitioning.maybe_initialize_distributed()
  primary = partitioning.is_primary()
  if not primary:
    log = lambda line: None  # noqa: E731  one copy of each line, from process 0
  t0 = time.perf_counter()
  model_dir = paths.absolute(model_dir)  # gs://... stays a URI (etils.epath)
  with contextlib.ExitStack() as held:
    corpus_dir, local_corpus, corpus, held_out = _agreed(
        lambda: _read_inputs(model_dir, corpus_dir, index_dir, embeddings, identifier_config,
                             primary=primary, held=held, log=log),
        "preparing MODEL_DIR (process 0) or reading the inputs")
    # The index copy is complete (process 0 wrote it before the barrier above).
    index, model_config, run, resolved = _agreed(
        lambda: _run_record(model_dir, corpus_dir, local_corpus, index_dir, embeddings, captions_file,
                            model_config, train_config, input_config, held_out),
        "reading MODEL_DIR's index copy and run.json")
    # Every process has read run.json before process 0 replaces it.
    if primary:
      paths.write_json(model_dir / RUN_FILE, run)
      if operative_config is not None:
        paths.write_text(model_dir / CONFIG_FILE, resolve_config(operative_config, resolved))
    pseudo, pseudo_summary = _pseudo_queries(corpus, index, embeddings, input_config, log)
    pipeline = input_pipeline.make_pipeline(local_corpus, corpus, index, input_config,
                                            paths.to_str(captions_file and paths.stage_file(captions_file)),
                                            pseudo=pseudo)
    validation = _validation(corpus, index, held_out, train_config, input_config, log)
    result = trainer.train(model_config=model_config, train_config=train_config, pipeline=pipeline,
                           index=index, checkpoint_dir=model_dir / CHECKPOINT_SUBDIR,
                           metrics_dir=model_dir, validation=validation, progress=progress,
                           stop_after=stop_after, log=log,
                           cache_encoder_states=input_config.cache_encoder_states,
                           state_cache_dir=input_config.state_cache_dir)
    summary = {**resolved, "start_step": result.start_step,
               "step": int(jax.device_get(result.state.step)),
               "last_metrics": result.history[-1] if result.history else None,
               "validation": result.validation, "input": pipeline.summary(),
               "pseudo_queries": pseudo_summary,
               "seconds": time.perf_counter() - t0, "train_seconds": result.seconds,
               "compile_seconds": result.compile_seconds, "state_cache": result.state_cache}
    if primary and summary["step"] >= train_config.num_steps:
      if paths.is_remote(model_dir):
        summary["rerank"] = None if embeddings is None else {
            "skipped": "remote MODEL_DIR: build it afterwards with `cart eval --rerank --embeddings` "
                       "on a local copy"}
      else:
        summary["rerank"] = after_training(model_dir, embeddings, log=log)  # None w/o embeddings
    if primary:
      paths.write_json(model_dir / "train_summary.json", summary)
    partitioning.sync("cart-train-done")  # MODEL_DIR is complete when any process returns
    return summary


def _agreed(step: Callable, what: str):
  """``step()`` on every process; a failure on any of them raises on all (``partitioning.agree``:
  none waits for ever at a later collective). Returns what ``step`` returned."""
  from cart_jax import partitioning  # pylint: disable=g-import-not-at-top
  failure, out = None, None
  try:
    out = step()
  except BaseException as e:  # pylint: disable=broad-except
    failure = e
  partitioning.agree(failure is None, what)
  if failure is not None:
    raise failure
  return out


def _read_inputs(model_dir, corpus_dir, index_dir, embeddings, identifier_config, *, primary: bool,
                 held: contextlib.ExitStack, log: Callable[[str], None]):
  """Step 1: process 0 takes MODEL_DIR's lock and copies (or builds) the index into it; every
  process reads the corpus, less the queries held out for the re-ranker (with ``embeddings``).
  Returns ``(corpus_dir, local_corpus, corpus, held_out)``."""
  from cart_jax.data.corpus import load_corpus  # pylint: disable=g-import-not-at-top
  from cart_jax.inference import rerank  # pylint: disable=g-import-not-at-top
  if primary and not paths.is_remote(model_dir):  # advisory locks exist on local disks only
    held.enter_context(output_lock(model_dir))
  _refuse_updated_run(model_dir / RUN_FILE)
  corpus_dir = paths.absolute(corpus_dir)
  # A remote corpus: its JSON files are read from a local copy (media are not read here).
  local_corpus = paths.stage(corpus_dir, CORPUS_FILES) if paths.is_remote(corpus_dir) else corpus_dir
  corpus = load_corpus(local_corpus, check_media=False)
  held_out = []
  if embeddings is not None:  # the re-ranker will be tuned after training
    corpus, held_out = rerank.without_holdout(corpus)  # no val split: tune on these instead
  if primary:
    model_dir.mkdir(parents=True, exist_ok=True)
    _ensure_index(index_dir, model_dir, embeddings, identifier_config, log)
  return corpus_dir, local_corpus, corpus, held_out


def _run_record(model_dir, corpus_dir, local_corpus, index_dir, embeddings, captions_file,
                model_config, train_config, input_config, held_out):
  """Step 2 (every process): the index copy, the model config sized to its vocabulary, the new
  ``run.json`` (refused when MODEL_DIR holds a run of another model config) and the resolved
  values of ``config.gin``. Returns ``(index, model_config, run, resolved)``."""
  from cart_jax.index.identifiers import load_index  # pylint: disable=g-import-not-at-top
  from cart_jax.inference import rerank  # pylint: disable=g-import-not-at-top
  from cart_jax.models.cart.config import with_vocab  # pylint: disable=g-import-not-at-top
  index = load_index(paths.stage(model_dir / INDEX_SUBDIR))
  model_config = with_vocab(model_config, index.vocab)
  run = {"format": RUN_FORMAT, "version": RUN_VERSION, "corpus_dir": str(corpus_dir),
         CORPUS_HASHES: corpus_hashes(local_corpus),  # checked by every load (runs.check_corpus)
         "index_dir": INDEX_SUBDIR, "model_config": model_config.to_dict(),
         "train_config": dataclasses.asdict(train_config),
         "input_config": dataclasses.asdict(input_config),
         "captions_file": paths.to_str(captions_file and paths.absolute(captions_file))}
  if held_out:
    run["rerank_holdout"] = {"split": rerank.HOLDOUT_SPLIT, "share": rerank.HOLDOUT_SHARE,
                             "num_texts": len(held_out)}
  run_path = model_dir / RUN_FILE
  if run_path.exists():
    old = json.loads(run_path.read_text(encoding="utf-8"))
    if old.get("model_config") != run["model_config"]:
      raise RunError(f"{run_path}: this MODEL_DIR holds a run of another model config; use a new "
                     f"MODEL_DIR (or the same config to resume)")
  resolved = {"model_dir": str(model_dir), "corpus_dir": str(corpus_dir),
              "index_dir": paths.to_str(index_dir and paths.absolute(index_dir)),
              "embeddings": paths.to_str(embeddings and paths.absolute(embeddings)),
              "model_config": model_config.to_dict()}
  return index, model_config, run, resolved


def _pseudo_queries(corpus, index, embeddings, input_config, log):
  """Step 3: pseudo-queries for the text-less items (with local ``embeddings``, the numpy
  pipeline and ``InputConfig.pseudo_queries`` > 0); ``(texts, summary)``, else ``([], None)``."""
  from cart_jax.train import input_pipeline  # pylint: disable=g-import-not-at-top
  if (embeddings is None or input_config.pseudo_queries <= 0 or paths.is_remote(embeddings)
      or input_pipeline.resolve_pipeline(input_config.pipeline) != "numpy"):
    return [], None
  from cart_jax.jobs import pseudo_queries  # pylint: disable=g-import-not-at-top
  from cart_jax.train import state_cache  # pylint: disable=g-import-not-at-top
  root = Path(input_config.state_cache_dir) if input_config.state_cache_dir else state_cache.default_root()
  return pseudo_queries.pseudo_queries(corpus, index, embeddings, input_config.pseudo_queries,
                                       cache_dir=root.parent / "pseudo_text_features", log=log)


def _validation(corpus, index, held_out, train_config, input_config, log):
  """Step 4: what the trainer validates on every ``eval_every`` steps: the ``eval_split`` queries,
  else those held out for the re-ranker; None when ``eval_every`` is 0 or there are none."""
  from cart_jax.inference import evaluation, rerank  # pylint: disable=g-import-not-at-top
  if train_config.eval_every <= 0:
    return None
  validation = evaluation.split_queries(corpus, index, train_config.eval_split,
                                        train_config.eval_queries)
  if not validation[0] and held_out:  # no val split: the queries held out for the re-ranker
    validation = evaluation.text_targets(held_out[:train_config.eval_queries], index,
                                         rerank.HOLDOUT_SPLIT)
    log(f"no '{train_config.eval_split}' queries: validating on {len(validation[0])} training "
        f"queries held out of training")
  elif not validation[0]:
    log(f"no '{train_config.eval_split}' queries: no validation during training")
    return None
  return evaluation.validation(index, *validation, beam_size=train_config.beam_size,
                               input_length=input_config.input_length)
