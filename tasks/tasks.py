"""SeqIO task and mixture registration for a corpus. Nothing registers on import: call
:func:`register_corpus_tasks` (or :func:`register_index_tasks`) with a corpus directory and
the identifiers of its items (or import ``cart_seqio.registered``, which does it from
environment variables, for ``--module_import``).

For a corpus named ``NAME`` (prefix ``cart_NAME``) it registers:

* ``cart_NAME_query``   human queries -> identifier tokens; splits ``train``, ``validation``,
                        ``test`` (those the corpus has).
* ``cart_NAME_caption`` caption-enhancement texts -> identifier tokens; split ``train``
                        (the corpus's ``caption`` texts, or a captioner's JSONL file).
* ``cart_NAME_train``   mixture of both: rates ``1 - caption_rate`` and ``caption_rate``
                        (``caption_rate=0`` is the "w/o caption enhancement" ablation: only
                        the query task).
* ``cart_NAME_eval_val`` / ``cart_NAME_eval_test``: the held-out queries (split
                        ``validation`` / ``test``), with an exact-identifier metric.

Example::

  import cart_seqio.tasks as cart_tasks
  names = cart_tasks.register_corpus_tasks("corpora/emoji", item_ids, codes, vocab)
  ds = seqio.get_mixture_or_task(names.train).get_dataset(
      {"inputs": 32, "targets": vocab.id_length}, split="train")
  ds = CartFeatureConverter()(ds, {"inputs": 32, "targets": vocab.id_length})
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Sequence

import numpy as np
import seqio
import tensorflow as tf

from cart_jax.core.errors import CartError
from cart_jax.data.captions import caption_texts
from cart_jax.data.corpus import Corpus, Text, load_corpus
from cart_jax.index.vocab import IdentifierVocab
from cart_seqio.preprocessors import finalize_inputs
from cart_seqio.vocabularies import IdentifierVocabulary, input_vocabulary

SEQIO_SPLITS = {"train": "train", "val": "validation", "test": "test"}


@dataclasses.dataclass(frozen=True)
class CorpusTaskNames:
  """Names registered for one corpus (``caption`` is None when there are no captions)."""
  query: str
  caption: str | None
  train: str
  eval_val: str | None
  eval_test: str | None
  caption_rate: float
  id_length: int


def identifier_accuracy(targets: Sequence[tuple], predictions: Sequence[tuple]) -> dict:
  """Exact identifier match (= Recall@1 for the top prediction), in percent."""
  if len(targets) != len(predictions):
    raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions")
  hits = sum(tuple(t) == tuple(p) for t, p in zip(targets, predictions))
  return {"recall@1": 100.0 * hits / max(1, len(targets))}


def parse_identifier(output, example=None, is_target: bool = False) -> tuple[int, ...]:
  """Task postprocessor: a code string (``b"3 17 0 2"``, the pretokenized target) or a decoded
  code sequence -> tuple of ints, so targets and predictions compare equal in the metric."""
  del example, is_target
  if isinstance(output, bytes):
    output = output.decode("utf-8")
  if isinstance(output, str):
    return tuple(int(x) for x in output.split())
  return tuple(int(x) for x in output)


def _prefix(name: str) -> str:
  return "cart_" + re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_").lower()


def _item_code_strings(corpus: Corpus, item_ids: Sequence[str], codes: np.ndarray,
                       vocab: IdentifierVocab) -> dict[str, str]:
  codes = np.asarray(codes)
  if codes.ndim != 2 or codes.shape[1] != vocab.id_length:
    raise ValueError(f"codes must be int [N, {vocab.id_length}], got shape {codes.shape}")
  if len(item_ids) != codes.shape[0]:
    raise ValueError(f"{len(item_ids)} item ids but {codes.shape[0]} identifier rows")
  if len(set(item_ids)) != len(item_ids):
    raise ValueError("item ids of the identifiers are not unique")
  vocab.codes_to_tokens(codes)  # validates every code against its level's range
  by_id = {iid: " ".join(str(int(c)) for c in row) for iid, row in zip(item_ids, codes)}
  missing = [it.id for it in corpus.items if it.id not in by_id]
  if missing:
    raise CartError(f"{len(missing)} corpus items have no identifier (e.g. {missing[:3]}); "
                    "build the index over every item of the corpus")
  return by_id


def _source(texts_by_split: dict[str, list[Text]], code_of: dict[str, str]) -> seqio.DataSource:
  arrays = {}
  for split, texts in texts_by_split.items():
    arrays[split] = {
        "inputs": np.asarray([t.text for t in texts], dtype=object),
        "targets": np.asarray([code_of[t.item_id] for t in texts], dtype=object),
        "item_id": np.asarray([t.item_id for t in texts], dtype=object),
        "kind": np.asarray([t.kind for t in texts], dtype=object),
    }

  def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
    del shuffle_files, seed  # in-memory; the Task shuffles examples
    a = arrays[split]
    return tf.data.Dataset.from_tensor_slices({k: tf.constant(v, tf.string) for k, v in a.items()})

  return seqio.FunctionDataSource(dataset_fn, splits=list(arrays),
                                  num_input_examples={s: len(t) for s, t in texts_by_split.items()})


_FEATURES = ("inputs", "targets", "item_id", "kind")
_COMPLETE = "_COMPLETE"  # written last into a TFRecord source directory


def _tfrecord_source(texts_by_split: dict[str, list[Text]], code_of: dict[str, str], directory: str,
                     *, num_shards: int, write: bool) -> seqio.DataSource:
  """A file-backed source: TFRecord shards of tf.train.Examples under ``directory`` (local or
  ``gs://``), one ``<split>.tfrecord-XXXXX-of-YYYYY`` set per split, then ``_COMPLETE``.

  Written once (``write=True`` and no ``_COMPLETE`` yet); readers shard by file (one SeqIO
  ``ShardInfo`` per host) and ``seqio.scripts.cache_tasks_main`` can preprocess them with Beam.
  ``write=False`` (the other processes of a multi-host job): the files must exist.
  """
  gfile = tf.io.gfile
  done = f"{directory}/{_COMPLETE}"
  counts = {split: len(texts) for split, texts in texts_by_split.items()}
  shards = {split: max(1, min(num_shards, n)) for split, n in counts.items()}  # files per split
  if not gfile.exists(done):
    if not write:
      raise CartError(f"{directory}: no TFRecord source ({_COMPLETE} missing); the process that "
                      "writes it (process 0) has not, or another job is writing it")
    gfile.makedirs(directory)
    for split, texts in texts_by_split.items():
      n = shards[split]
      for shard in range(n):
        with tf.io.TFRecordWriter(f"{directory}/{split}.tfrecord-{shard:05d}-of-{n:05d}") as w:
          for t in texts[shard::n]:
            values = {"inputs": t.text, "targets": code_of[t.item_id], "item_id": t.item_id,
                      "kind": t.kind}
            feature = {k: tf.train.Feature(bytes_list=tf.train.BytesList(value=[v.encode("utf-8")]))
                       for k, v in values.items()}
            w.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    with gfile.GFile(done, "w") as f:
      f.write(_json_dumps(counts))
  return seqio.TFExampleDataSource(
      split_to_filepattern={split: f"{directory}/{split}.tfrecord-*-of-{n:05d}"
                            for split, n in shards.items()},
      feature_description={k: tf.io.FixedLenFeature([], tf.string) for k in _FEATURES},
      num_input_examples=counts)


def _json_dumps(obj) -> str:
  import json  # pylint: disable=g-import-not-at-top
  return json.dumps(obj, sort_keys=True)


def _content_key(corpus: Corpus, code_of: dict[str, str], caption_texts_: Sequence[Text]) -> str:
  """A hash of every text and identifier a corpus's tasks hold (names its TFRecord sources)."""
  import hashlib  # pylint: disable=g-import-not-at-top
  h = hashlib.sha256()
  for t in list(corpus.texts()) + list(caption_texts_):
    h.update("\x1f".join((t.item_id, t.text, t.split, t.kind, code_of.get(t.item_id, ""))).encode())
    h.update(b"\x1e")
  return h.hexdigest()[:12]


def _add_task(name: str, source: seqio.DataSource, output_features: dict, metrics: bool) -> None:
  seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
      name, source=source,
      preprocessors=[seqio.preprocessors.tokenize, finalize_inputs],
      output_features=output_features, postprocess_fn=parse_identifier,
      metric_fns=[identifier_accuracy] if metrics else [])


def register_caption_mixture(names: CorpusTaskNames, caption_rate: float,
                             mixture_name: str | None = None) -> str:
  """(Re)registers a query/caption mixture with ``caption_rate`` in [0, 1]; returns its name."""
  if not 0.0 <= caption_rate <= 1.0:
    raise CartError(f"caption_rate must be in [0, 1], got {caption_rate}")
  if caption_rate > 0 and names.caption is None:
    raise CartError("the corpus has no caption texts: add some (cart data add-captions or "
                    "captions_file=...) or use caption_rate=0")
  mixture_name = mixture_name or names.train
  parts = []
  if caption_rate < 1.0:
    parts.append((names.query, 1.0 - caption_rate))
  if caption_rate > 0.0:
    parts.append((names.caption, caption_rate))
  seqio.MixtureRegistry.remove(mixture_name)
  seqio.MixtureRegistry.add(mixture_name, parts)
  return mixture_name


def register_corpus_tasks(corpus_dir: str | os.PathLike, item_ids: Sequence[str], codes: np.ndarray,
                          vocab: IdentifierVocab, *, name: str | None = None,
                          input_vocab: str = "wordpiece", caption_rate: float | None = None,
                          captions_file: str | os.PathLike | None = None,
                          source_dir: str | None = None, num_shards: int = 16,
                          write_sources: bool = True) -> CorpusTaskNames:
  """Registers the query/caption tasks, the training mixture and the eval tasks of a corpus.

  Args:
    corpus_dir: a corpus directory (``cart_jax.data.corpus`` format).
    item_ids: ``[N]`` item ids; row ``i`` of ``codes`` is the identifier of ``item_ids[i]``.
    codes: int ``[N, L]`` level-local codes (``SemanticIndex.codes``).
    vocab: the identifier vocabulary (``SemanticIndex.vocab``).
    name: task name stem (default: the corpus name); tasks are ``cart_<name>_*``.
    input_vocab: ``"wordpiece"`` (MiniLM) or ``"byte"``.
    caption_rate: fraction of training examples drawn from the caption task; default 0.5
      when the corpus (or ``captions_file``) has captions, else 0.
    captions_file: a captioner's JSONL (``{"item_id", "text"}``) used instead of the
      corpus's own ``caption`` texts.
    source_dir: None: the texts are served from memory. Else a directory (local or ``gs://``)
      under which each task's texts are written once as TFRecord shards
      (``<source_dir>/<prefix>-<content hash>/<task>/``, ``num_shards`` files per split) and read
      back from them: shardable per host, and what ``seqio.scripts.cache_tasks_main`` (Apache
      Beam) preprocesses into the cache ``seqio.get_dataset(use_cached=True)`` reads.
    write_sources: write missing TFRecord sources (False: they must exist; multi-host processes
      other than the writer).

  Returns:
    The registered names.
  """
  corpus = load_corpus(corpus_dir, check_media=False)
  code_of = _item_code_strings(corpus, list(item_ids), codes, vocab)
  prefix = _prefix(name or corpus.name)
  output_features = {
      "inputs": seqio.Feature(input_vocabulary(input_vocab), add_eos=False),
      "targets": seqio.Feature(IdentifierVocabulary(vocab), add_eos=False),
  }
  query_splits = {SEQIO_SPLITS[s]: corpus.texts(split=s, kind="query") for s in SEQIO_SPLITS}
  query_splits = {s: t for s, t in query_splits.items() if t}
  if "train" not in query_splits:
    raise CartError(f"corpus {corpus.name!r} has no training queries")
  captions = caption_texts(corpus, captions_file)

  def source(task: str, texts_by_split: dict[str, list[Text]]) -> seqio.DataSource:
    if source_dir is None:
      return _source(texts_by_split, code_of)
    root = f"{str(source_dir).rstrip('/')}/{prefix}-{_content_key(corpus, code_of, captions)}"
    return _tfrecord_source(texts_by_split, code_of, f"{root}/{task}", num_shards=num_shards,
                            write=write_sources)

  _add_task(f"{prefix}_query", source(f"{prefix}_query", query_splits), output_features, metrics=True)
  caption_task = None
  if captions:
    caption_task = f"{prefix}_caption"
    _add_task(caption_task, source(caption_task, {"train": captions}), output_features, metrics=False)

  evals = {}
  for split in ("validation", "test"):
    if split in query_splits:
      evals[split] = f"{prefix}_eval_{'val' if split == 'validation' else 'test'}"
      _add_task(evals[split], source(evals[split], {split: query_splits[split]}), output_features,
                metrics=True)
  if caption_rate is None:
    caption_rate = 0.5 if captions else 0.0
  names = CorpusTaskNames(query=f"{prefix}_query", caption=caption_task, train=f"{prefix}_train",
                          eval_val=evals.get("validation"), eval_test=evals.get("test"),
                          caption_rate=float(caption_rate), id_length=vocab.id_length)
  register_caption_mixture(names, float(caption_rate))
  return names


def register_index_tasks(corpus_dir: str | os.PathLike, index, **kwargs) -> CorpusTaskNames:
  """Same, with the identifiers taken from a ``SemanticIndex`` (``.item_ids``, ``.codes``, ``.vocab``)."""
  return register_corpus_tasks(corpus_dir, list(index.item_ids), np.asarray(index.codes),
                               index.vocab, **kwargs)
