"""Run-level jobs (train, eval, search) and the MODEL_DIR layout they share.

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

No gin here (``cart_jax/cli/gin_config.py`` makes :func:`train_job` configurable).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

RUN_FORMAT = "cart-run"
RUN_VERSION = 1
RUN_FILE = "run.json"
INDEX_SUBDIR = "index"
CHECKPOINT_SUBDIR = "checkpoints"


class RunError(ValueError):
  """A MODEL_DIR that is missing, malformed or incompatible with the requested job."""


def _atomic_json(path: Path, obj) -> None:
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
  os.replace(tmp, path)


def _index_fingerprint(index_dir: Path) -> dict:
  meta = json.loads((index_dir / "meta.json").read_text(encoding="utf-8"))
  return meta.get("files", {})


def _ensure_index(index_dir: Path | None, model_dir: Path, embeddings, identifier_config,
                  log: Callable[[str], None]) -> Path:
  """Copies (or first builds) the index into ``MODEL_DIR/index``; returns that path."""
  from cart_jax.index import identifiers  # pylint: disable=g-import-not-at-top
  dest = model_dir / INDEX_SUBDIR
  if index_dir is None:
    if (dest / "meta.json").exists():
      return dest
    raise RunError(f"no index: pass index_dir (INDEX_DIR), or resume a MODEL_DIR that has {dest}")
  index_dir = Path(index_dir)
  if not (index_dir / "meta.json").exists():
    if embeddings is None:
      raise RunError(f"{index_dir}: not an index directory (no meta.json); build it with "
                     f"`cart build-ids`, or set EMBEDDINGS so the job builds it")
    import numpy as np  # pylint: disable=g-import-not-at-top
    emb = np.load(embeddings, allow_pickle=False)
    ids_path = Path(str(embeddings)[:-4] + ".ids.txt") if str(embeddings).endswith(".npy") else None
    ids = ids_path.read_text(encoding="utf-8").splitlines() if ids_path and ids_path.exists() else None
    log(f"building the index {index_dir} from {embeddings}")
    cfg = identifier_config or identifiers.IdentifierConfig()
    identifiers.build_index(emb, ids, cfg).save(index_dir)
  if (dest / "meta.json").exists():
    if _index_fingerprint(dest) != _index_fingerprint(index_dir):
      raise RunError(f"{model_dir} was trained on another index than {index_dir} "
                     f"(use a new MODEL_DIR)")
    return dest
  tmp = model_dir / f".{INDEX_SUBDIR}.tmp-{os.getpid()}"
  if tmp.exists():
    shutil.rmtree(tmp)
  shutil.copytree(index_dir, tmp)
  os.replace(tmp, dest)
  return dest


def train_job(*, model_dir: str, corpus_dir: str, index_dir: str | None, model_config,
              train_config, input_config, captions_file: str | None = None,
              embeddings: str | None = None, identifier_config=None, operative_config: str | None = None,
              progress: bool = True, stop_after: int | None = None,
              log: Callable[[str], None] = print) -> dict:
  """Trains CART into ``model_dir`` (resuming if it holds checkpoints). Returns a summary."""
  import jax  # pylint: disable=g-import-not-at-top

  from cart_jax.data.corpus import load_corpus  # pylint: disable=g-import-not-at-top
  from cart_jax.index.identifiers import load_index  # pylint: disable=g-import-not-at-top
  from cart_jax.models.cart.config import with_vocab  # pylint: disable=g-import-not-at-top
  from cart_jax.inference import evaluation  # pylint: disable=g-import-not-at-top
  from cart_jax.train import input_pipeline, trainer

  trainer.maybe_initialize_distributed()
  t0 = time.perf_counter()
  model_dir = Path(model_dir).absolute()
  model_dir.mkdir(parents=True, exist_ok=True)
  corpus_dir = Path(corpus_dir).absolute()
  corpus = load_corpus(corpus_dir, check_media=False)
  index_path = _ensure_index(index_dir, model_dir, embeddings, identifier_config, log)
  index = load_index(index_path)
  model_config = with_vocab(model_config, index.vocab)
  run = {"format": RUN_FORMAT, "version": RUN_VERSION, "corpus_dir": str(corpus_dir),
         "index_dir": INDEX_SUBDIR, "model_config": model_config.to_dict(),
         "train_config": dataclasses.asdict(train_config),
         "input_config": dataclasses.asdict(input_config),
         "captions_file": None if captions_file is None else str(Path(captions_file).absolute())}
  run_path = model_dir / RUN_FILE
  if run_path.exists():
    old = json.loads(run_path.read_text(encoding="utf-8"))
    if old.get("model_config") != run["model_config"]:
      raise RunError(f"{run_path}: this MODEL_DIR holds a run of another model config; use a new "
                     f"MODEL_DIR (or the same config to resume)")
  if jax.process_index() == 0:
    _atomic_json(run_path, run)
    if operative_config is not None:
      (model_dir / "config.gin").write_text(operative_config, encoding="utf-8")
  pipeline = input_pipeline.make_pipeline(corpus_dir, corpus, index, input_config, captions_file)
  validation = None
  if train_config.eval_every > 0:
    validation = evaluation.split_queries(corpus, index, train_config.eval_split,
                                          train_config.eval_queries)
  result = trainer.train(model_config=model_config, train_config=train_config, pipeline=pipeline,
                         index=index, checkpoint_dir=model_dir / CHECKPOINT_SUBDIR,
                         metrics_dir=model_dir, validation=validation,
                         input_length=input_config.input_length, progress=progress,
                         stop_after=stop_after, log=log,
                         cache_encoder_states=input_config.cache_encoder_states,
                         state_cache_dir=input_config.state_cache_dir)
  summary = {"model_dir": str(model_dir), "start_step": result.start_step,
             "step": int(jax.device_get(result.state.step)),
             "last_metrics": result.history[-1] if result.history else None,
             "validation": result.validation, "input": pipeline.summary(),
             "seconds": time.perf_counter() - t0, "train_seconds": result.seconds,
             "compile_seconds": result.compile_seconds, "state_cache": result.state_cache}
  if jax.process_index() == 0 and summary["step"] >= train_config.num_steps:
    from cart_jax.inference import rerank  # pylint: disable=g-import-not-at-top
    summary["rerank"] = rerank.after_training(model_dir, embeddings, log=log)  # None w/o embeddings
  if jax.process_index() == 0:
    _atomic_json(model_dir / "train_summary.json", summary)
  return summary


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


def eval_job(model_dir: str, *, split: str = "test", beam_size: int = 10, batch_size: int = 64,
             limit: int | None = None, step: int | None = None, loaded: LoadedRun | None = None,
             modality: str | None = None, rerank: bool = False, rerank_weight: float | None = None,
             embeddings: str | None = None, log: Callable[[str], None] = print,
             items: set[str] | None = None) -> dict:
  """R@1/5/10, MRR@10 and queries/s of a trained run on a split's queries.

  With ``modality`` (image/audio/video): only the queries whose target item has that modality,
  searched against the trie of that modality's identifiers. The summary then also holds
  ``unrestricted``: the same queries searched over the whole index (R@k, and how many top-1
  results were items of another modality -- what the restriction removes).

  With ``items`` (a set of item ids): only the queries whose target is one of them (the whole
  index is still searched); e.g. the unseen items of ``cart data prepare emoji --unseen-items``.

  With ``rerank``: ``summary["rerank"]`` holds CART + dual-tower re-ranking (R@k, MRR@10, qps,
  weight) of the same beams as CART alone (one search pass, re-sorted on the host), with the run's
  ``rerank/`` re-ranker (or one built from ``embeddings``, its weight tuned on val and stored in the
  run: :mod:`cart_jax.inference.rerank`); ``rerank_weight`` overrides the stored weight.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top

  from cart_jax.inference import evaluation  # pylint: disable=g-import-not-at-top
  from cart_jax.inference import rerank as rerank_lib  # pylint: disable=g-import-not-at-top
  r = loaded or load_run(model_dir, step)
  reranker = None
  if rerank:
    try:
      reranker = rerank_lib.reranker_for_run(r, embeddings=embeddings, weight=rerank_weight, log=log)
    except rerank_lib.RerankError as e:
      raise RunError(str(e)) from None
  full = searcher_for_run(r, beam_size=beam_size, n_results=min(10, beam_size),
                          batch_size=batch_size)
  searcher = full.restrict(modality) if modality is not None else full
  texts, targets = evaluation.split_queries(r.corpus, r.index, split,
                                            None if modality is not None else limit)
  if modality is not None:
    keep = full.item_modalities[targets] == modality  # [Q]
    texts = [t for t, k in zip(texts, keep) if k]
    targets = targets[keep]
    if limit is not None:
      texts, targets = texts[:limit], targets[:limit]
  if items is not None:  # only the queries whose target is one of these items
    keep = np.asarray([r.index.item_ids[int(t)] in items for t in targets], bool)  # [Q]
    texts, targets = [t for t, k in zip(texts, keep) if k], targets[keep]
  if not texts:
    what = f"'{split}' queries" + (f" of {modality} items" if modality is not None else "") + \
        (" of the listed items" if items is not None else "")
    raise RunError(f"{r.run['corpus_dir']}: no {what}")
  rr_metrics = None
  if reranker is None:
    metrics, rows, _ = evaluation.evaluate(searcher, r.params, r.frozen, texts, targets)
  else:
    metrics, rr_metrics, rows, _ = rerank_lib.evaluate_with_rerank(searcher, r.params, r.frozen, texts,
                                                                   targets, reranker)
  summary = {"model_dir": str(r.model_dir), "step": r.step, "split": split, **metrics,
             "num_items": r.index.n_items, "corpus_dir": r.run["corpus_dir"]}
  if rr_metrics is not None:
    summary["rerank"] = rr_metrics
  if full.item_modalities is not None:
    summary["index_modalities"] = full.available_modalities()
  if len(summary.get("index_modalities", ())) > 1:
    summary["top1_wrong_modality"] = _wrong_modality(full.item_modalities, rows[:, 0], targets)
    if modality is None:  # a mixed index searched whole: the same numbers per target modality
      summary["by_modality"] = _by_modality(full.item_modalities, rows, targets)
  if modality is not None:
    summary["modality"] = modality
    summary["num_items_searched"] = int(np.sum(full.item_modalities == modality))
    un_metrics, un_rows, _ = evaluation.evaluate(full, r.params, r.frozen, texts, targets)
    summary["unrestricted"] = {
        **{k: un_metrics[k] for k in ("r@1", "r@5", "r@10", "mrr@10") if k in un_metrics},
        "top1_wrong_modality": _wrong_modality(full.item_modalities, un_rows[:, 0], targets)}
  return summary


def _by_modality(item_modalities, rows, targets) -> dict:
  """R@k, MRR and top-1 of another modality, for the queries of each target modality."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  from cart_jax.inference.metrics import retrieval_metrics  # pylint: disable=g-import-not-at-top
  out = {}
  target_mod = item_modalities[targets]  # [Q]
  k = rows.shape[1]
  for m in np.unique(target_mod):
    sel = target_mod == m  # [Q]
    met = retrieval_metrics(rows[sel], targets[sel], ks=tuple(x for x in (1, 5, 10) if x <= k),
                            mrr_k=min(10, k))
    out[str(m)] = {**{key.lower(): v for key, v in met.items()},
                   "top1_wrong_modality": _wrong_modality(item_modalities, rows[sel, 0], targets[sel])}
  return out


def _wrong_modality(item_modalities, top1_rows, targets) -> dict:
  """How many top-1 results (rows, -1 = none) are items of another modality than the target."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  top1_rows = np.asarray(top1_rows)
  found = top1_rows >= 0  # [Q]
  wrong = found & (item_modalities[np.where(found, top1_rows, 0)] != item_modalities[targets])
  return {"count": int(wrong.sum()), "of": int(len(targets)),
          "rate": float(wrong.mean()) if len(targets) else 0.0}
