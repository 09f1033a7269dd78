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
path and records the SHA-256 of the files a run reads of it (``corpus_sha256``: ``corpus.json``,
``items.jsonl``, ``texts.jsonl``), as ``meta.json`` records the index's. After ``cart index add``
/ ``cart index remove`` (:mod:`cart_jax.train.incremental`), ``run.json`` also names
``checkpoint_dir``, ``rerank_dir`` and ``corpus_sources``, and ``index_dir``,
``checkpoint_dir``, ``rerank_dir`` and ``corpus_dir`` point into ``versions/<n>/``; every path
relative to MODEL_DIR must stay inside it. A second ``cart train`` on the same MODEL_DIR
resumes; it refuses a different model config or index (or a run changed by ``cart index``).

Loading verifies: the index copy against ``meta.sha256``/``meta.json`` (every file listed and
hashed, :func:`cart_jax.index.identifiers.load_index`), the corpus's files against
``corpus_sha256`` (:func:`check_corpus`: an edited ``corpus.json``, say one that declares
``"media_roots": ["/etc"]``, is refused) and the checkpoint step against its
``manifest.sha256.json`` (:mod:`cart_jax.train.checkpointing`); a mismatch is a ``CartError``
naming the file (exit 2 in ``cart``), never results. The restored parameters must be finite
(:func:`check_finite`), and a loaded run's searches check their scores (NaN or +inf is a
``NonFiniteError``, not a query with no results): what a corrupt checkpoint loaded with
``--no-verify``, or one from before manifests, would otherwise give silently.
``verify=False`` (``--no-verify``) skips the checkpoint's hashing (the index and the corpus's JSON
files are small and always checked). A run trained before ``corpus_sha256`` existed loads with a
warning line on stderr (its corpus unverified), as old indexes and checkpoints do.

MODEL_DIR may be remote (``gs://...``, :mod:`cart_jax.core.paths`): orbax reads the checkpoints
there, the index copy and the corpus's JSON files are read through a local copy. ``load_run``
restores onto every device of every process (a ``jax.distributed`` launch is joined first), so
``cart eval`` / ``cart search`` search on all of them (:class:`cart_jax.inference.searcher.CartSearcher`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from cart_jax.core.errors import CartError

RUN_FORMAT = "cart-run"
RUN_VERSION = 1
RUN_FILE = "run.json"
INDEX_SUBDIR = "index"
CHECKPOINT_SUBDIR = "checkpoints"
CORPUS_FILES = ("corpus.json", "items.jsonl", "texts.jsonl")  # what a run reads of its corpus
CORPUS_HASHES = "corpus_sha256"  # run.json: {file of CORPUS_FILES: sha256 hex}


class RunError(CartError):
  """A MODEL_DIR that is missing, malformed or incompatible with the requested job."""


class CorpusIntegrityError(RunError):
  """The run's corpus files differ from the hashes ``run.json`` recorded when it was trained."""


def corpus_hashes(corpus_dir) -> dict[str, str]:
  """``{name: sha256}`` of the corpus files a run reads (``CORPUS_FILES``; may be remote)."""
  from cart_jax.core import paths  # pylint: disable=g-import-not-at-top
  root = paths.as_path(corpus_dir)
  return {name: paths.sha256(root / name) for name in CORPUS_FILES}


def check_corpus(run_path, run: dict, corpus_dir) -> bool:
  """The corpus files against ``run.json``'s ``corpus_sha256``; False when the run recorded none.

  A run trained before the hashes existed is accepted with a warning line on stderr.

  Raises:
    CorpusIntegrityError: naming the file that differs (or the malformed field).
  """
  from cart_jax.core import paths  # pylint: disable=g-import-not-at-top
  recorded = run.get(CORPUS_HASHES)
  if recorded is None:
    print(f"warning: {run_path}: no {CORPUS_HASHES} (a run trained before cart-jax hashed its "
          f"corpus): the corpus {corpus_dir} is not verified", file=sys.stderr)
    return False
  if (not isinstance(recorded, dict) or sorted(recorded) != sorted(CORPUS_FILES)
      or not all(isinstance(v, str) for v in recorded.values())):
    raise CorpusIntegrityError(f"{run_path}: field {CORPUS_HASHES!r} must map {list(CORPUS_FILES)} "
                               f"to sha256 hex digests, found {recorded!r:.200}")
  root = paths.as_path(corpus_dir)
  for name in CORPUS_FILES:
    p = root / name
    if not p.is_file():
      raise CorpusIntegrityError(f"{p}: missing (a file of the run's corpus; {run_path} records "
                                 "its hash)")
    got = paths.sha256(p)
    if got != recorded[name]:
      raise CorpusIntegrityError(
          f"{p}: content does not match {run_path}'s {CORPUS_HASHES} (sha256 {got[:16]}..., "
          f"recorded {recorded[name][:16]}...): the run's corpus was modified after training; "
          "restore it, or train a new MODEL_DIR on it")
  return True


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
  mesh: object = None  # the mesh params/frozen live on (all devices, every process: data x model)


def load_run(model_dir: str | os.PathLike, step: int | None = None, *, need_corpus: bool = True,
             verify: bool = True, mesh=None) -> LoadedRun:
  """Reads ``run.json``, the index copy and the newest (or given) checkpoint of a MODEL_DIR.

  ``verify``: check the checkpoint's files against its manifest before reading any array
  (``CheckpointIntegrityError`` naming the step and the file on a mismatch).
  ``mesh``: where the parameters go (default: every device of every process, ``data`` x
  ``model``, the run's ``mesh_model`` where it divides the devices: :func:`inference_model_axis`),
  so :func:`searcher_for_run` splits query batches over all of them. A
  multi-process launch (``jax.distributed``, see ``launch/``) is joined first; then every
  process must call this (the restore is collective).
  """
  from cart_jax.data.corpus import load_corpus  # pylint: disable=g-import-not-at-top
  from cart_jax.index.identifiers import load_index  # pylint: disable=g-import-not-at-top
  from cart_jax.models.cart.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from cart_jax import partitioning  # pylint: disable=g-import-not-at-top
  from cart_jax.train import trainer  # pylint: disable=g-import-not-at-top

  from cart_jax.core import paths  # pylint: disable=g-import-not-at-top

  trainer.maybe_initialize_distributed()
  d = paths.as_path(model_dir)  # gs://... stays a URI (etils.epath); the index and the corpus's
  run_path = d / RUN_FILE        # JSON files are read from a local copy of a remote directory
  if not d.is_dir():
    raise RunError(f"{d}: no such directory (a MODEL_DIR written by `cart train`)")
  if not run_path.exists():
    raise RunError(f"{d}: not a CART model directory (no {RUN_FILE}; train one with `cart train`)")
  try:
    run = json.loads(run_path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise RunError(f"{run_path}: unreadable JSON ({e})") from None
  if not isinstance(run, dict):
    raise RunError(f"{run_path}: expected a JSON object, found {type(run).__name__}")
  if run.get("format") != RUN_FORMAT or run.get("version") != RUN_VERSION:
    raise RunError(f"{run_path}: format {run.get('format')!r} v{run.get('version')}, expected "
                   f"{RUN_FORMAT!r} v{RUN_VERSION}")
  model_config = ModelConfig(**run["model_config"])
  index = load_index(paths.stage(run_subdir(d, run, "index_dir", INDEX_SUBDIR)))
  corpus = None
  if need_corpus:
    corpus_dir = run["corpus_dir"]
    if not paths.as_path(corpus_dir).exists():
      raise RunError(f"{run_path}: corpus_dir {corpus_dir} does not exist")
    if paths.is_remote(corpus_dir):
      corpus_dir = paths.stage(corpus_dir, CORPUS_FILES)
    check_corpus(run_path, run, corpus_dir)
    corpus = load_corpus(corpus_dir, check_media=False)
  ckpt_dir = run_subdir(d, run, "checkpoint_dir", CHECKPOINT_SUBDIR)
  if not ckpt_dir.exists() or not any(p.name.isdigit() for p in ckpt_dir.iterdir()):
    raise RunError(f"{ckpt_dir}: no checkpoint yet")
  if step is not None and not (ckpt_dir / str(step)).is_dir():
    steps = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
    raise RunError(f"{ckpt_dir}: no checkpoint of step {step} (steps: {steps})")
  if mesh is None:
    mesh = partitioning.make_mesh(-1, inference_model_axis(run))
  graphdef, params, frozen, got_step = trainer.restore_for_inference(model_config, ckpt_dir, step,
                                                                     mesh, verify=verify)
  check_finite({"params": params, "frozen": frozen},
               f"{ckpt_dir / str(got_step)}: checkpoint step {got_step} of {d}")
  return LoadedRun(model_dir=d, run=run, model_config=model_config, index=index, corpus=corpus,
                   graphdef=graphdef, params=params, frozen=frozen, step=got_step,
                   input_length=int(run["input_config"]["input_length"]), mesh=mesh)


def check_finite(tree, where: str) -> None:
  """Raises ``NonFiniteError`` naming the first floating-point array of ``tree`` (a pytree of
  arrays) that holds a NaN or an infinity, with how many; ``where`` names the checkpoint."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from cart_jax.inference.searcher import NonFiniteError  # pylint: disable=g-import-not-at-top
  leaves = [(path, leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
            if jnp.issubdtype(leaf.dtype, jnp.floating)]
  # Every count dispatched first, then one transfer (not one device round trip per array).
  counts = jax.device_get([jnp.sum(~jnp.isfinite(leaf)) for _, leaf in leaves])
  for (path, leaf), bad in zip(leaves, counts):
    bad = int(bad)
    if bad:
      name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
      raise NonFiniteError(
          f"{where}: parameter {name} holds {bad} non-finite value{'s' if bad > 1 else ''} (NaN or "
          f"inf) of {leaf.size}: the checkpoint is corrupt (loaded with --no-verify, or written "
          "before manifests) or the training diverged; nothing is searched")


def inference_model_axis(run: dict) -> int:
  """The run's ``TrainConfig.mesh_model`` when it divides the devices here, else 1."""
  import jax  # pylint: disable=g-import-not-at-top
  model = (run.get("train_config") or {}).get("mesh_model", 1)
  n = jax.device_count()
  return model if isinstance(model, int) and model >= 1 and n % model == 0 else 1


def run_subdir(model_dir, run: dict, key: str, default: str) -> Path:
  """``MODEL_DIR / run[key]`` (``default`` when absent): a relative path inside MODEL_DIR
  (``model_dir`` may be remote: the result is then an ``etils.epath.Path``)."""
  from cart_jax.core import paths  # pylint: disable=g-import-not-at-top
  model_dir = paths.as_path(model_dir)
  rel = run.get(key, default)
  if (not isinstance(rel, str) or not rel or os.path.isabs(rel) or paths.is_remote(rel)
      or ".." in Path(rel).parts):
    raise RunError(f"{model_dir / RUN_FILE}: field {key!r} must be a relative path inside "
                   f"the MODEL_DIR, found {rel!r}")
  return model_dir / rel


def searcher_for_run(r: LoadedRun, *, beam_size: int, n_results: int, batch_size: int | None,
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
                          item_modalities=modalities, mesh=getattr(r, "mesh", None),
                          check_finite=True)
  return searcher.restrict(modality) if modality is not None else searcher


def search_job(model_dir: str | os.PathLike, queries: Sequence[str], *, k: int = 10,
               beam: int | None = None, modality: str | None = None, step: int | None = None,
               rerank: bool = False, rerank_weight: float | str | None = None,
               embeddings: str | os.PathLike | None = None, verify: bool = True,
               log: Callable[[str], None] = print) -> dict:
  """The top ``k`` items a trained run generates for each query (``cart search``).

  Args:
    k: results per query; more than the items that can be generated (the index's, or the
      modality's) is clamped to that number, with a line through ``log`` (a larger beam could
      not find more items, only cost more).
    beam: beam size (default ``max(k, 10)``; clamped like ``k``).
    modality: only items of this modality (their trie); ``ModalityError`` when not in the index.
    rerank: re-sort all ``beam`` results by ``logp + weight * cos`` (the run's ``rerank/``);
      ``rerank_weight`` overrides its weight, ``embeddings`` builds it first (both imply rerank).
    verify: check the checkpoint against its manifest (``False``: ``cart search --no-verify``).

  Returns:
    ``{"model_dir", "step", "modality", "queries": [{"query", "results": [...]}]}`` (results as
    :func:`cart_jax.inference.searcher.describe`, plus ``logp`` and ``cos`` when re-ranked) and
    ``rerank_weight`` when re-ranked. Empty queries raise ``RunError``.
  """
  from cart_jax.inference import rerank as rerank_lib  # pylint: disable=g-import-not-at-top
  from cart_jax.inference.searcher import describe  # pylint: disable=g-import-not-at-top
  queries = list(queries)
  if not queries:
    raise RunError("no query given")
  for i, q in enumerate(queries):
    if not isinstance(q, str) or not q.strip():
      raise RunError(f"query {i + 1} of {len(queries)} is empty ({q!r}): give some words to search for")
  if k < 1:
    raise RunError(f"-k {k}: must be >= 1")
  if beam is not None and beam < 1:
    raise RunError(f"--beam {beam}: must be >= 1")
  if beam is not None and beam < k:
    raise RunError(f"--beam {beam} is smaller than -k {k}")
  r = load_run(model_dir, step, verify=verify)
  searchable = _searchable_items(r, modality)
  if k > searchable:
    log(f"-k {k}: {_items_phrase(searchable, modality)}; showing at most {searchable} results")
    k = searchable
  beam = min(beam or max(k, 10), max(searchable, k))
  searcher = searcher_for_run(r, beam_size=beam, n_results=k, batch_size=max(1, len(queries)),
                              modality=modality)
  reranker = None
  if rerank or embeddings or rerank_weight is not None:
    weight = rerank_lib.parse_weight(rerank_weight) if isinstance(rerank_weight, str) else rerank_weight
    reranker = rerank_lib.reranker_for_run(r, embeddings=embeddings, weight=weight, log=log)
  if reranker is None:
    rows, scores, _ = searcher.search_texts(r.params, r.frozen, queries)
    logps, coss = scores, None
  else:
    from cart_jax.train.input_pipeline import encode_texts  # pylint: disable=g-import-not-at-top
    beams = searcher.search_beams(r.params, r.frozen, encode_texts(list(queries), searcher.input_length))
    res = reranker.rerank(beams.rows, beams.scores, beams.query_embedding)
    rows, scores = res.rows[:, :k], res.scores[:, :k]
    logps, coss = res.logp[:, :k], res.cos[:, :k]
  out = []
  for i, (q, rr, ss) in enumerate(zip(queries, rows, scores)):
    results = describe(r.index, rr, ss, r.corpus)
    if coss is not None:
      for d in results:
        d["logp"], d["cos"] = float(logps[i, d["rank"] - 1]), float(coss[i, d["rank"] - 1])
    out.append({"query": q, "results": results})
  doc = {"model_dir": str(r.model_dir), "step": r.step, "modality": modality, "queries": out}
  if reranker is not None:
    doc["rerank_weight"] = rerank_lib.weight_to_json(reranker.weight)
  return doc


def _searchable_items(r: LoadedRun, modality: str | None) -> int:
  """How many items a search of ``modality`` (None: all) can generate."""
  if modality is None or r.corpus is None:
    return r.index.n_items
  from cart_jax.inference.searcher import index_modalities  # pylint: disable=g-import-not-at-top
  try:
    mods = index_modalities(r.index, r.corpus)
  except ValueError:
    return r.index.n_items  # searcher_for_run names the problem
  n = int((mods == modality).sum())
  return n if n > 0 else r.index.n_items  # an unknown modality: restrict() raises ModalityError


def _items_phrase(n: int, modality: str | None) -> str:
  return f"the index has {n} {modality + ' ' if modality else ''}item{'s' if n != 1 else ''}"
