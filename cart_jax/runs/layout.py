"""A trained run (MODEL_DIR): its layout (``run.json``, the files it names, their checks).

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
/ ``cart index remove`` (:mod:`cart_jax.jobs.index_update`), ``run.json`` also names
``checkpoint_dir``, ``rerank_dir`` and ``corpus_sources``, and ``index_dir``,
``checkpoint_dir``, ``rerank_dir`` and ``corpus_dir`` point into ``versions/<n>/``; every path
relative to MODEL_DIR must stay inside it. A second ``cart train`` on the same MODEL_DIR
resumes; it refuses a different model config or index (or a run changed by ``cart index``).

Loading verifies: the index copy against ``meta.sha256``/``meta.json`` (every file listed and
hashed, :func:`cart_jax.index.identifiers.load_index`), the corpus's files against
``corpus_sha256`` (:func:`check_corpus`: an edited ``corpus.json``, say one that declares
``"media_roots": ["/etc"]``, is refused) and the checkpoint step against its
``manifest.sha256.json`` (:mod:`cart_jax.core.checkpointing`); a mismatch is a ``CartError``
naming the file (exit 2 in ``cart``), never results. The restored parameters must be finite
(:func:`check_finite`), and a loaded run's searches check their scores (NaN or +inf is a
``NonFiniteError``, not a query with no results): what a corrupt checkpoint loaded with
``--no-verify``, or one from before manifests, would otherwise give silently
(:mod:`cart_jax.runs.restore`).
``verify=False`` (``--no-verify``) skips the checkpoint's hashing (the index and the corpus's JSON
files are small and always checked). A run trained before ``corpus_sha256`` existed loads with a
warning line on stderr (its corpus unverified), as old indexes and checkpoints do.

MODEL_DIR may be remote (``gs://...``, :mod:`cart_jax.core.paths`): orbax reads the checkpoints
there, the index copy and the corpus's JSON files are read through a local copy. ``load_run``
restores onto every device of every process (a ``jax.distributed`` launch is joined first), so
``cart eval`` / ``cart search`` search on all of them (:class:`cart_jax.inference.searcher.CartSearcher`).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from cart_jax.core import paths
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
  root = paths.as_path(corpus_dir)
  return {name: paths.sha256(root / name) for name in CORPUS_FILES}


def check_corpus(run_path, run: dict, corpus_dir) -> bool:
  """The corpus files against ``run.json``'s ``corpus_sha256``; False when the run recorded none.

  A run trained before the hashes existed is accepted with a warning line on stderr.

  Raises:
    CorpusIntegrityError: naming the file that differs (or the malformed field).
  """
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


def inference_model_axis(run: dict) -> int:
  """The run's ``TrainConfig.mesh_model`` when it divides the devices here, else 1."""
  import jax  # pylint: disable=g-import-not-at-top
  model = (run.get("train_config") or {}).get("mesh_model", 1)
  n = jax.device_count()
  return model if isinstance(model, int) and model >= 1 and n % model == 0 else 1


def run_subdir(model_dir, run: dict, key: str, default: str) -> Path:
  """``MODEL_DIR / run[key]`` (``default`` when absent): a relative path inside MODEL_DIR
  (``model_dir`` may be remote: the result is then an ``etils.epath.Path``)."""
  model_dir = paths.as_path(model_dir)
  rel = run.get(key, default)
  if (not isinstance(rel, str) or not rel or os.path.isabs(rel) or paths.is_remote(rel)
      or ".." in Path(rel).parts):
    raise RunError(f"{model_dir / RUN_FILE}: field {key!r} must be a relative path inside "
                   f"the MODEL_DIR, found {rel!r}")
  return model_dir / rel
