"""The CART pipeline as library functions: what every ``cart`` command calls, for a notebook too.

  from cart_jax import api
  from cart_jax.data.embeddings import BuiltinEmbedOptions
  from cart_jax.index.identifiers import IdentifierConfig

  corpus = api.prepare("emoji", "work/corpus", limit=200)
  emb = api.embed("work/corpus", "work/emb/emoji.npy", BuiltinEmbedOptions(steps=300))
  index = api.build_index(emb.path, "work/index", IdentifierConfig(n_clusters=64, num_levels=2,
                                                                    codebook_size=64, rq_steps=300))
  run = api.train("work/cart", "work/corpus", "work/index", ModelConfig(...), TrainConfig(...),
                  InputConfig(...), embeddings=emb.path)  # `cart train` reads them from gin
  api.evaluate("work/cart", split="test")        # {"r@1", "r@5", "r@10", "mrr@10", "qps", ...}
  api.baseline(emb.path, "work/corpus")          # the dual tower, same keys
  api.search("work/cart", ["smiling cat"], k=5)  # [{"query", "results": [...]}]
  api.make_server("work/cart").run()             # HTTP search + page: cart serve
  recipes.run_demo(recipes.recipe_for("image"), workdir="work")  # all of the above: cart demo

Each function calls the jobs below it (:mod:`cart_jax.jobs`, composing ``data``, ``index``,
``train`` and ``inference``) and returns typed values or the JSON-ready dict its command prints. No
gin here: ``cart train`` reads its configs from gin files (:mod:`cart_jax.cli.gin_bridge`) and calls
:func:`train`; the demo (``cart demo``, :mod:`cart_jax.cli.recipes`) composes these functions. User
errors raise :class:`cart_jax.core.errors.CartError` (a subclass naming the file/line/field); anything else
propagates with its traceback. Heavy imports happen inside the functions, so importing this module
is cheap and needs neither gin nor TensorFlow.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from cart_jax.core.errors import CartError
from cart_jax.data.embeddings import (BuiltinEmbedOptions, EmbedResult, ModelEmbedOptions,
                                     PrecomputedEmbedOptions)

if TYPE_CHECKING:
  from cart_jax.data.corpus import Corpus
  from cart_jax.index.identifiers import IdentifierConfig, SemanticIndex
  from cart_jax.models.cart.config import ModelConfig
  from cart_jax.train.input_pipeline import InputConfig
  from cart_jax.train.trainer import TrainConfig
  from cart_jax.serve import Server, ServeConfig

# Built-in data sets: name -> "module:function", called as fn(out_dir, *, limit, size, templates,
# overwrite[, unseen_items]) -> (Corpus, stats dataclass); only emoji has unseen_items.
DATASETS = {
    "emoji": "cart_jax.data.datasets.emoji:prepare_emoji",
    "instruments": "cart_jax.data.datasets.instruments:prepare_instruments",
    "emoji-motion": "cart_jax.data.datasets.emoji_motion:prepare_emoji_motion",
}

__all__ = ["DATASETS", "PreparedCorpus", "BuiltIndex", "BuiltinEmbedOptions", "ModelEmbedOptions",
           "PrecomputedEmbedOptions", "EmbedResult", "prepare", "data_import", "data_merge",
           "add_captions", "data_info", "embed", "build_index", "train", "evaluate", "baseline",
           "search", "export", "index_add", "index_remove", "model_info", "make_server"]


@dataclasses.dataclass
class PreparedCorpus:
  """A built-in corpus written by :func:`prepare`; ``summary`` is what ``cart data prepare`` prints."""
  corpus: Corpus
  summary: dict


@dataclasses.dataclass
class BuiltIndex:
  """Identifiers written by :func:`build_index`; ``stats`` is what ``cart build-ids --json`` writes."""
  index: SemanticIndex
  stats: dict


def prepare(dataset: str, out: str | os.PathLike, *, limit: int | None = None,
            size: int | None = None, templates: bool = True, unseen_items: float = 0.0,
            overwrite: bool = False) -> PreparedCorpus:
  """Builds a built-in corpus (:data:`DATASETS`) in ``out`` (``cart data prepare``).

  Args:
    limit: smoke runs, only the first N items (emoji-motion: N emoji, 11 clips each).
    size: image/frame side in pixels (``None``: the data set's default).
    templates: templated English wordings ('<name> emoji', '<name> icon').
    unseen_items: emoji only, a share of the items without training queries (captions only).
  """
  if dataset not in DATASETS:
    raise CartError(f"unknown data set {dataset!r}; expected one of {sorted(DATASETS)}")
  if Path(out).exists() and not overwrite:
    raise CartError(f"--out {out} already exists (pass --overwrite to replace it)")
  extra = {}
  if dataset == "emoji":
    extra["unseen_items"] = unseen_items
  elif unseen_items:
    raise CartError(f"--unseen-items applies only to the emoji corpus, not {dataset}")
  module, fn = DATASETS[dataset].split(":")
  corpus, stats = getattr(importlib.import_module(module), fn)(
      out, limit=limit, size=size, templates=templates, overwrite=overwrite, **extra)
  return PreparedCorpus(corpus, dict(corpus.summary(), out=str(out), **vars(stats)))


def data_import(fmt: str, sources: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                media_root: str | os.PathLike | None = None, media_mode: str = "symlink",
                overwrite: bool = False, name: str | None = None, media_pattern: str | None = None,
                skip_missing_media: bool = False,
                split_lists: dict[str, str | os.PathLike] | None = None,
                mapping: str | os.PathLike | None = None) -> PreparedCorpus:
  """Imports a data set's files (``fmt``: :data:`cart_jax.data.importers.FORMATS`) as a corpus in
  ``out`` (``cart data import``); ``summary`` adds ``out`` and ``skipped_missing_media``."""
  from cart_jax.data.importers import import_corpus  # pylint: disable=g-import-not-at-top
  corpus, result = import_corpus(fmt, sources, out, media_root=media_root, media_mode=media_mode,
                                 overwrite=overwrite, name=name, media_pattern=media_pattern,
                                 skip_missing_media=skip_missing_media, split_lists=split_lists,
                                 mapping=mapping)
  return PreparedCorpus(corpus, dict(corpus.summary(), out=str(out),
                                     skipped_missing_media=len(result.skipped_items)))


def data_merge(corpora: Sequence[str | os.PathLike], out: str | os.PathLike, *,
               embeddings: Sequence[str | os.PathLike] | None = None,
               names: Sequence[str] | None = None, name: str | None = None, prefix: bool = False,
               media_mode: str = "symlink", overwrite: bool = False) -> PreparedCorpus:
  """One corpus (``mixed`` when the modalities differ) from several, with their embeddings merged
  in the same row order (``cart data merge``)."""
  from cart_jax.data.merge import merge_corpora  # pylint: disable=g-import-not-at-top
  corpus, stats = merge_corpora(corpora, out, embeddings=embeddings, names=names, name=name,
                                prefix=prefix, media_mode=media_mode, overwrite=overwrite)
  return PreparedCorpus(corpus, dict(corpus.summary(), out=str(out), **dataclasses.asdict(stats)))


def add_captions(corpus_dir: str | os.PathLike, captions: str | os.PathLike, *,
                 replace: bool = False, source: str | None = None) -> PreparedCorpus:
  """Adds a captioner's JSONL output to a corpus as ``kind=caption`` training texts
  (``cart data add-captions``)."""
  from cart_jax.data.captions import add_captions as add  # pylint: disable=g-import-not-at-top
  corpus, stats = add(corpus_dir, captions, replace=replace, source=source)
  return PreparedCorpus(corpus, dict(corpus.summary(), **stats))


def data_info(corpus_dir: str | os.PathLike) -> dict:
  """A corpus's summary, its images decoded, and texts that leak across splits
  (``cart data info``: ``leaks``, ``leak_examples``)."""
  from cart_jax.data.corpus import find_leaks, load_corpus  # pylint: disable=g-import-not-at-top
  from cart_jax.media.image import check_images  # pylint: disable=g-import-not-at-top
  corpus = load_corpus(corpus_dir)
  decoded = check_images([corpus.media_path(it) for it in corpus.items if it.modality == "image"])
  leaks = find_leaks(corpus)
  return dict(corpus.summary(), images_decoded=decoded, leaks=len(leaks),
              leak_examples=[[a.text, a.split, b.text, b.item_id] for a, b in leaks[:5]])


def embed(corpus_dir: str | os.PathLike, out: str | os.PathLike,
          options: BuiltinEmbedOptions | ModelEmbedOptions | PrecomputedEmbedOptions
          = BuiltinEmbedOptions(), *, overwrite: bool = False, progress: bool = True
          ) -> EmbedResult:
  """Item embeddings ``out`` (``E.npy`` + sidecars) of a corpus (``cart embed``).

  ``options``: train the built-in dual encoder; encode with one trained before
  (``ModelEmbedOptions(model="E.model.npz")``, ``cart embed --model``: new items in the space
  of that model's ``E.npy``, e.g. for :func:`index_add`); or align embeddings computed elsewhere.
  """
  from cart_jax.jobs.embed import embed as embed_job  # pylint: disable=g-import-not-at-top
  return embed_job(corpus_dir, out, options, overwrite=overwrite, progress=progress)


def build_index(embeddings: str | os.PathLike, out: str | os.PathLike, config: IdentifierConfig, *,
                item_ids: str | os.PathLike | None = None, npz_key: str | None = None,
                progress: Callable[[str, int, int], None] | None = None) -> BuiltIndex:
  """Semantic identifiers (K-Means + RQ-VAE + counter) of ``embeddings``, saved to ``out``.

  Args:
    item_ids: ids of the rows, one per line (default: row numbers 0..N-1).
    npz_key: the array inside an ``.npz``.
    progress: ``progress(phase, done, total)``.
  """
  from cart_jax.core.artefacts import output_lock  # pylint: disable=g-import-not-at-top
  from cart_jax.index import identifiers, inputs  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  # ``out``'s lock for the whole build, not only the final write: a second build of the same
  # ``out`` started meanwhile fails at once (OutputLockedError naming this pid) instead of both
  # reporting success.
  # The inputs are checked first, so bad input leaves nothing behind (not even OUT's parent).
  emb = inputs.load_embeddings(embeddings, key=npz_key)
  ids = inputs.load_item_ids(item_ids) if item_ids else None
  if ids is not None:
    inputs.check_ids(ids, emb.shape[0], source=f"{item_ids} vs {embeddings}")
  with output_lock(out):
    index = identifiers.build_index(emb, ids, config, progress=progress)
    index.save(out)
  stats = dict(index.stats, seconds=time.perf_counter() - t0, out=str(out))
  return BuiltIndex(index, stats)


def train(model_dir: str | os.PathLike, corpus_dir: str | os.PathLike,
          index_dir: str | os.PathLike | None, model_config: ModelConfig, train_config: TrainConfig,
          input_config: InputConfig, *, captions_file: str | os.PathLike | None = None,
          embeddings: str | os.PathLike | None = None,
          identifier_config: IdentifierConfig | None = None, operative_config: str | None = None,
          progress: bool = True, stop_after: int | None = None,
          log: Callable[[str], None] = print) -> dict:
  """Trains CART into ``model_dir`` (``cart train``); returns the training summary.

  Running again on the same ``model_dir`` resumes from its newest checkpoint.

  Args:
    index_dir: a ``cart build-ids`` directory (None: resume a MODEL_DIR that holds its copy); with
      ``embeddings`` and no index there yet, it is built first (``identifier_config``).
    model_config, train_config, input_config: the network, the optimisation and the input
      pipeline (``cart train`` builds them from its gin files: ``gin_configs/``).
    embeddings: the ``cart embed`` output the index was built from: the re-ranker is fitted after
      training and its pseudo-queries drawn for items without texts.
    operative_config: text written to ``MODEL_DIR/config.gin`` (``cart train`` passes gin's).
    stop_after: stop (after a checkpoint) once this many steps ran in this call.
  """
  from cart_jax.jobs.train import train_job  # pylint: disable=g-import-not-at-top
  return train_job(model_dir=str(model_dir), corpus_dir=str(corpus_dir),
                   index_dir=None if index_dir is None else str(index_dir),
                   model_config=model_config, train_config=train_config, input_config=input_config,
                   captions_file=None if captions_file is None else str(captions_file),
                   embeddings=None if embeddings is None else str(embeddings),
                   identifier_config=identifier_config, operative_config=operative_config,
                   progress=progress, stop_after=stop_after, log=log)


def evaluate(model_dir: str | os.PathLike, *, split: str = "test", beam_size: int = 10,
             batch_size: int | None = None, limit: int | None = None, step: int | None = None,
             modality: str | None = None, items: str | os.PathLike | set[str] | None = None,
             rerank: bool = False, rerank_weight: float | str | None = None,
             embeddings: str | os.PathLike | None = None, progress: bool = False,
             verify: bool = True, log: Callable[[str], None] = print) -> dict:
  """R@1/5/10, MRR@10 and queries/s of a trained run on a split's queries (``cart eval``).

  Args:
    batch_size: queries per compiled call (>= 1); None: the device's default
      (:func:`cart_jax.inference.searcher.default_batch_size`, per device).
    limit: only the first ``limit`` (>= 1) queries.
    items: a file of item ids (or a set of them): only the queries of these items.
    rerank: also CART + dual-tower re-ranking of the same beams (``summary["rerank"]``).
    rerank_weight: a number >= 0 or ``"cosine"`` (default: the run's tuned weight).
    embeddings: ``cart embed`` output to build the run's re-ranker from (implies ``rerank``).
    verify: check the checkpoint against its manifest before loading it (a mismatch raises
      ``CheckpointIntegrityError``); ``False`` skips the hashing (``cart eval --no-verify``).
  """
  from cart_jax.inference import rerank as rerank_lib  # pylint: disable=g-import-not-at-top
  from cart_jax.jobs.evaluate import eval_job  # pylint: disable=g-import-not-at-top
  if beam_size < 10:
    raise CartError(f"--beam {beam_size}: R@10 and MRR@10 need a beam of at least 10")
  if batch_size is not None and batch_size < 1:
    raise CartError(f"--batch-size {batch_size}: must be >= 1")
  if limit is not None and limit < 1:
    raise CartError(f"--limit {limit}: must be >= 1 (leave it out for every query)")
  if isinstance(rerank_weight, str):
    rerank_weight = rerank_lib.parse_weight(rerank_weight)
  return eval_job(str(model_dir), split=split, beam_size=beam_size, batch_size=batch_size,
                  limit=limit, step=step, verify=verify, modality=modality,
                  items=items,
                  rerank=bool(rerank or embeddings or rerank_weight is not None),
                  rerank_weight=rerank_weight, embeddings=embeddings, log=log, progress=progress)


def baseline(embeddings: str | os.PathLike, corpus_dir: str | os.PathLike, **options) -> dict:
  """The dual-tower baseline over ``embeddings`` on a corpus's queries (``cart baseline``).

  Options: :func:`cart_jax.jobs.baseline.baseline_job` (``split``, ``method``, ``k``,
  ``model``, ``query_embeddings``, ``items``, ``agreement``, ``progress``, ...). The metrics
  have the keys of :func:`evaluate`.
  """
  from cart_jax.jobs.baseline import baseline_job  # pylint: disable=g-import-not-at-top
  return baseline_job(corpus_dir, embeddings, **options)


def search(model_dir: str | os.PathLike, queries: Sequence[str], *, k: int = 10,
           beam: int | None = None, modality: str | None = None, step: int | None = None,
           rerank: bool = False, rerank_weight: float | str | None = None,
           embeddings: str | os.PathLike | None = None, verify: bool = True,
           log: Callable[[str], None] = print) -> list[dict]:
  """The top ``k`` items a trained run generates for each query (``cart search``).

  Args (:func:`cart_jax.jobs.search.search_job`, which also returns the run's step and the
  re-rank weight):
    beam: beam size (default ``max(k, 10)``); ``k`` above the number of items is clamped to it.
    modality: only items of this modality (``ModalityError`` when the index has none).
    rerank, rerank_weight, embeddings: re-sort the beam with the dual tower (the run's re-ranker;
      ``embeddings`` builds it first).
    verify: ``False`` skips checking the checkpoint against its manifest.

  Returns one ``{"query", "results"}`` per query; an empty query is a ``CartError``.
  """
  from cart_jax.jobs.search import search_job  # pylint: disable=g-import-not-at-top
  return search_job(model_dir, queries, k=k, beam=beam, modality=modality, step=step,
                    rerank=rerank, rerank_weight=rerank_weight, embeddings=embeddings,
                    verify=verify, log=log)["queries"]


def export(model_dir: str | os.PathLike, out: str | os.PathLike, **options) -> dict:
  """Writes a trained run's search as a ``jax.export`` program + data directory (``cart export``).

  Options: :func:`cart_jax.inference.export.export_run` (``batch_size``, ``k``, ``beam``,
  ``step``, ``platforms``, ``verify``, ``overwrite``, ``log``). Run it with JAX and NumPy only:
  ``cart_jax.inference.exported.load_exported(out).search(queries, k)``. Returns the summary
  (sizes, shapes, platforms).
  """
  from cart_jax.inference.export import export_run  # pylint: disable=g-import-not-at-top
  return export_run(model_dir, out, **options)


def index_add(model_dir: str | os.PathLike, corpus_dir: str | os.PathLike,
              embeddings: str | os.PathLike, **options) -> dict:
  """Adds a corpus's items to a trained run without retraining it (``cart index add``).

  Options: :func:`cart_jax.jobs.index_update.add_items` (``item_ids``, ``steps`` (None: auto, 0:
  identifiers only), ``replay_ratio``, ``balance_tail``, ``learning_rate``, ``batch_size``, ``seed``,
  ``keep_versions``, ``verify``, ``progress``, ``log``). Returns its summary: the run's new
  ``version``, ``added``, ``num_items``, ``fine_tune`` (steps, seconds, last metrics), ``seconds``.
  """
  from cart_jax.jobs.index_update import add_items  # pylint: disable=g-import-not-at-top
  return add_items(model_dir, corpus_dir, embeddings, **options)


def index_remove(model_dir: str | os.PathLike, ids: str | os.PathLike | Sequence[str],
                 **options) -> dict:
  """Removes items (a file of ids, or the ids) from a trained run (``cart index remove``).

  Options: :func:`cart_jax.jobs.index_update.remove_items` (``keep_versions``, ``verify``,
  ``log``). The items leave search at once; their identifiers are never reused.
  """
  from cart_jax.jobs.index_update import remove_items  # pylint: disable=g-import-not-at-top
  return remove_items(model_dir, ids, **options)


def model_info(config: str = "small", *, encoder: str | None = None, fusion: str | None = None,
               vocab_size: int | None = None, src_len: int = 32, beam: int = 10, id_length: int = 6,
               embed_dim: int = 256, cost_analysis: bool = False) -> dict:
  """Parameters and FLOPs per query of a model preset (``cart model-info``), next to the dual
  tower's query side and the re-ranking cost; nothing is allocated (``cost_analysis``: also
  compile it and report XLA's count)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from cart_jax.models.cart.config import get_config  # pylint: disable=g-import-not-at-top
  from cart_jax.models.cart.flops import (dual_tower_query_flops, flops_per_query,  # pylint: disable=g-import-not-at-top
                                          measured_flops)
  from cart_jax.models.cart.network import CARTNetwork, param_groups  # pylint: disable=g-import-not-at-top

  overrides = {}
  if encoder is not None:
    overrides["encoder"] = encoder
  if fusion is not None:
    overrides["fusion"] = fusion
  if vocab_size is not None:
    overrides["output_vocab_size"] = vocab_size
  cfg = get_config(config, **overrides)
  for flag, value in (("src-len", src_len), ("beam", beam), ("id-length", id_length)):
    if value < 1:
      raise CartError(f"--{flag} must be >= 1, got {value}")
  abstract = nnx.eval_shape(lambda: CARTNetwork(cfg, rngs=nnx.Rngs(0)))
  params = param_groups(nnx.state(abstract))
  flops = flops_per_query(cfg, src_len=src_len, beam=beam, id_length=id_length)
  info = {"config": config, "model_config": cfg.to_dict(), "parameters": params,
          "flops_per_query": flops,
          "dual_tower_query_flops": dual_tower_query_flops(src_len=src_len, embed_dim=embed_dim),
          "rerank_flops": 2 * beam * embed_dim}
  if cost_analysis:
    measured = measured_flops(cfg, src_len=src_len, beam=beam, id_length=id_length)
    info["xla_cost_analysis_flops"] = measured
    info["xla_over_analytic"] = measured / flops["total"]
  return info


def make_server(model_dir: str | os.PathLike, config: ServeConfig | None = None,
                **options) -> Server:
  """A trained run loaded once and compiled, ready to serve over HTTP (``cart serve``).

  ``config``: :class:`cart_jax.serve.ServeConfig` (host, port, beam, max_batch, max_wait_ms,
  queue_size, batch_sizes, ...). Options: :func:`cart_jax.serve.make_server` (``step``,
  ``rerank``, ``rerank_weight``, ``embeddings``, ``verify``, ``log``). ``server.run()`` serves
  until SIGTERM/SIGINT, answers the requests in flight, and returns.
  """
  from cart_jax import serve  # pylint: disable=g-import-not-at-top  (starlette/uvicorn: the serve extra)
  return serve.make_server(model_dir, config or serve.ServeConfig(), **options)
