"""The search behind ``cart serve``: one loaded run, jitted searches compiled for a few batch sizes.

:class:`SearchEngine` loads a MODEL_DIR once (:func:`cart_jax.runs.restore.load_run`) and answers
a list of :class:`Query` (text, k, modality) with one result list per query. It knows nothing about
HTTP: the micro-batcher (:mod:`cart_jax.serve.batcher`) hands it whatever requests it gathered.

Static shapes: the searcher compiles one program per (batch size, trie). The engine compiles
``batch_sizes`` (e.g. 1, 4, 16) at start-up (:meth:`SearchEngine.warm_up`) and pads every batch up to
the smallest compiled size that holds it (larger batches go through in chunks of the largest), so
no request ever waits for a compilation of the whole index's search. A ``modality`` restricts the
search to that modality's trie (:meth:`CartSearcher.restrict`): another trie shape, compiled on the
first request of that modality (or at start-up with ``warm_modalities``).

Media: ``GET /media/<id>`` serves an item's file only when its real path lies in the corpus
directory, in a media root ``corpus.json`` declares inside it, in a corpus the run was built from
(``run.json``'s ``corpus_sources``, written by ``cart index add``) or in a directory named at serve
time (``media_roots``, ``cart serve --media-root``); roots the corpus declares elsewhere are not
served from (:attr:`SearchEngine.unserved_media_roots`: a corpus is data, and a ``"media_roots":
["/etc"]`` in it must not open ``/etc``). Only image, audio and video types are served
(:meth:`SearchEngine.media_type`).

Every query of a batch is decoded with the same beam (``beam``, the most results a request may
ask for) and its first ``k`` results are kept: a result list equals
``api.search(model_dir, [text], k=k, beam=beam)`` (``beam`` 10 is ``cart search``'s default for
``k <= 10``). With ``rerank`` all ``beam`` results are re-sorted by the run's dual-tower re-ranker
(``logp + weight * cos``) before the first ``k`` are kept, as ``cart search --rerank`` does.
"""
from __future__ import annotations

import dataclasses
import mimetypes
import os
import time
from pathlib import Path
from typing import Callable, Sequence
from urllib.parse import quote

import numpy as np

from cart_jax.core.errors import CartError

DEFAULT_BATCH_SIZES = (1, 4, 16)
MEDIA_TYPES = ("image", "audio", "video")  # the content types /media serves


class ServeError(CartError):
  """A ``cart serve`` setting that cannot work (the message names the flag)."""


@dataclasses.dataclass(frozen=True)
class Query:
  """One search request: the text, how many results, and an optional modality."""
  text: str
  k: int
  modality: str | None = None


def compiled_batch_sizes(max_batch: int, sizes: Sequence[int] | None = None) -> tuple[int, ...]:
  """The batch sizes to compile: ``sizes`` (default 1, 4, 16, ...) up to ``max_batch``, and it.

  ``compiled_batch_sizes(16) == (1, 4, 16)``; ``compiled_batch_sizes(10) == (1, 4, 10)``.
  """
  if max_batch < 1:
    raise ServeError(f"--max-batch {max_batch}: must be >= 1")
  if sizes is None:
    sizes = [b for b in (4 ** i for i in range(8)) if b < max_batch]
  else:
    sizes = sorted({int(b) for b in sizes})
    if not sizes or sizes[0] < 1:
      raise ServeError(f"--batch-sizes {sizes}: need sizes >= 1")
    if sizes[-1] > max_batch:
      raise ServeError(f"--batch-sizes {sizes}: larger than --max-batch {max_batch}")
  return tuple(sorted(set(sizes) | {max_batch}))


class SearchEngine:
  """A trained run ready to answer batches of queries (see the module docstring).

  Args:
    loaded: a :class:`cart_jax.runs.restore.LoadedRun` (with its corpus).
    beam: beam size, and the most results a query may ask for (clamped to the number of items).
    batch_sizes: the compiled batch sizes (ascending; a batch is padded to the smallest that
      holds it).
    reranker: a :class:`cart_jax.inference.rerank.Reranker`, or None.
    media_roots: directories outside the corpus whose media may be served (``--media-root``).
  """

  def __init__(self, loaded, *, beam: int = 10, batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
               reranker=None, media_roots: Sequence[str | os.PathLike] = ()):
    from cart_jax.inference.searcher import searcher_for_run  # pylint: disable=g-import-not-at-top
    if beam < 1:
      raise ServeError(f"--beam {beam}: must be >= 1")
    if loaded.corpus is None:
      raise ServeError(f"{loaded.model_dir}: the run's corpus is needed to serve its media")
    self.loaded = loaded
    self.index = loaded.index
    self.corpus = loaded.corpus
    self.media_roots, self.unserved_media_roots = self._served_roots(media_roots)
    self.beam = min(int(beam), self.index.n_items)
    self.batch_sizes = tuple(sorted({int(b) for b in batch_sizes}))
    self.reranker = reranker
    self._searcher = searcher_for_run(loaded, beam_size=self.beam, n_results=self.beam,
                                      batch_size=self.batch_sizes[0])
    self._views: dict[tuple[str | None, int], object] = {}
    self.item_ids = set(self.index.item_ids)  # live items: the only ids whose media are served
    self.modalities = self._searcher.available_modalities()  # {modality: n items}

  @classmethod
  def from_run(cls, model_dir: str | os.PathLike, *, step: int | None = None, beam: int = 10,
               batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES, rerank: bool = False,
               rerank_weight: float | None = None, embeddings: str | os.PathLike | None = None,
               verify: bool = True, media_roots: Sequence[str | os.PathLike] = (),
               log: Callable[[str], None] = print) -> "SearchEngine":
    """Loads MODEL_DIR (and its re-ranker with ``rerank``) as ``cart search`` does.

    Media roots the corpus declares outside it and that are not served from are named through
    ``log`` (``--media-root`` serves them).
    """
    from cart_jax.jobs.rerank import reranker_for_run  # pylint: disable=g-import-not-at-top
    from cart_jax.runs.restore import load_run  # pylint: disable=g-import-not-at-top
    loaded = load_run(model_dir, step, verify=verify)
    reranker = None
    if rerank or embeddings or rerank_weight is not None:
      reranker = reranker_for_run(loaded, embeddings=embeddings, weight=rerank_weight, log=log)
    engine = cls(loaded, beam=beam, batch_sizes=batch_sizes, reranker=reranker,
                 media_roots=media_roots)
    if engine.unserved_media_roots:
      log(f"{loaded.corpus.root}: corpus.json declares media roots outside the corpus directory: "
          f"{', '.join(map(str, engine.unserved_media_roots))}; media there are not served (403) "
          "unless named with --media-root")
    return engine

  # ------------------------------------------------------------------ describing the run

  def info(self) -> dict:
    """What the page and ``GET /healthz`` show about the served run."""
    from cart_jax.inference import rerank as rerank_lib  # pylint: disable=g-import-not-at-top
    return {"model": Path(self.loaded.model_dir).name, "step": self.loaded.step,
            "num_items": self.index.n_items, "modalities": self.modalities,
            "max_k": self.beam, "batch_sizes": list(self.batch_sizes),
            "rerank_weight": (rerank_lib.weight_to_json(self.reranker.weight)
                              if self.reranker is not None else None)}

  def _served_roots(self, named: Sequence[str | os.PathLike]
                    ) -> tuple[tuple[Path, ...], tuple[Path, ...]]:
    """(media roots served from, declared roots that are not) as real paths (module docstring)."""
    from cart_jax.core import paths  # pylint: disable=g-import-not-at-top
    from cart_jax.data.corpus import is_within  # pylint: disable=g-import-not-at-top
    root = os.path.realpath(self.corpus.root)
    sources = self.loaded.run.get("corpus_sources") or []
    built_from = {os.path.realpath(d) for d in sources if isinstance(d, str) and d
                  and not paths.is_remote(d)}
    served, unserved = [], []
    for r in self.corpus.media_roots:
      (served if is_within(r, root) or str(r) in built_from else unserved).append(r)
    for d in named:
      if not os.path.isdir(d):
        raise ServeError(f"--media-root {d}: not a directory")
      served.append(Path(os.path.realpath(d)))
    return tuple(dict.fromkeys(served)), tuple(r for r in unserved if r not in served)

  def media_file(self, item_id: str) -> Path | None:
    """The real path of a live item's media file, or None (unknown id, or not a file).

    Only ids of the index are looked up (the id is never used as a path), and the file's real
    path (symbolic links resolved) must lie inside the corpus directory or a served media root
    (module docstring; :meth:`Corpus.media_path`: a link leading elsewhere raises
    ``CorpusFormatError``).
    """
    if item_id not in self.item_ids or item_id not in self.corpus:
      return None
    path = Path(os.path.realpath(self.corpus.media_path(item_id, self.media_roots)))
    return path if path.is_file() else None

  def media_type(self, item_id: str) -> str:
    """The content type of an item's media, from its name in ``items.jsonl``: an ``image/``,
    ``audio/`` or ``video/`` type, else ``application/octet-stream`` (never served)."""
    media = self.corpus.items[self.corpus.item_index(item_id)].media if item_id in self.corpus else ""
    guessed = mimetypes.guess_type(media)[0] or ""
    return guessed if guessed.split("/")[0] in MEDIA_TYPES else "application/octet-stream"

  # ------------------------------------------------------------------ searching

  def warm_up(self, log: Callable[[str], None] = print,
              modalities: Sequence[str | None] = (None,)) -> dict[str, float]:
    """Compiles the search for every batch size (and modality); returns ``{"<modality>/<b>": s}``."""
    times = {}
    for modality in modalities:
      for b in self.batch_sizes:
        t0 = time.perf_counter()
        self.search([Query("warm up", 1, modality)] * b)
        times[f"{modality or 'all'}/{b}"] = dt = time.perf_counter() - t0
        log(f"compiled the search for batch size {b}"
            f"{'' if modality is None else f' ({modality})'}: {dt:.2f} s")
    return times

  def _view(self, modality: str | None, batch_size: int):
    key = (modality, batch_size)
    if key not in self._views:
      view = self._searcher.restrict(modality)  # a copy sharing the jitted function and tries
      view.batch_size = batch_size  # _run pads every call up to this size
      mesh = getattr(view, "mesh", None)
      if mesh is not None:  # a batch split over the mesh's data axis fills it evenly
        from cart_jax import partitioning  # pylint: disable=g-import-not-at-top
        n_data = dict(mesh.shape).get(partitioning.DATA, 1)
        view.batch_size = -(-batch_size // n_data) * n_data
      self._views[key] = view
    return self._views[key]

  def padded_size(self, n: int) -> int:
    """The compiled batch size a batch of ``n`` queries runs at (the largest for bigger ones)."""
    return next((b for b in self.batch_sizes if b >= n), self.batch_sizes[-1])

  def search(self, queries: Sequence[Query]) -> list[list[dict]]:
    """One result list per query (see :meth:`describe`), in order.

    Queries are grouped by modality; each group runs padded to a compiled batch size.
    """
    out: list[list[dict] | None] = [None] * len(queries)
    groups: dict[str | None, list[int]] = {}
    for i, q in enumerate(queries):
      groups.setdefault(q.modality, []).append(i)
    for modality, members in groups.items():
      for start in range(0, len(members), self.batch_sizes[-1]):
        chunk = members[start:start + self.batch_sizes[-1]]
        view = self._view(modality, self.padded_size(len(chunk)))
        texts = [queries[i].text for i in chunk]
        for i, results in zip(chunk, self._search_chunk(view, texts)):
          out[i] = results[:queries[i].k]
    return out  # type: ignore[return-value]

  def _search_chunk(self, view, texts: list[str]) -> list[list[dict]]:
    from cart_jax.models.text.tokenizer import encode_texts  # pylint: disable=g-import-not-at-top
    ids = encode_texts(texts, view.input_length)  # [n, src]
    if self.reranker is None:
      rows, scores, _ = view.search_ids(self.loaded.params, self.loaded.frozen, ids)
      logps = coss = None
    else:
      beams = view.search_beams(self.loaded.params, self.loaded.frozen, ids)
      res = self.reranker.rerank(beams.rows, beams.scores, beams.query_embedding)
      rows, scores, logps, coss = res.rows, res.scores, res.logp, res.cos
    out = []
    for i in range(len(texts)):
      out.append(self.describe(rows[i], scores[i], None if logps is None else logps[i],
                               None if coss is None else coss[i]))
    return out

  def describe(self, rows: np.ndarray, scores: np.ndarray, logps=None, coss=None) -> list[dict]:
    """Results as JSON-ready dicts: rank, id, identifier, score, modality, media URL and type."""
    results = []
    for rank, (r, s) in enumerate(zip(rows, scores)):
      if r < 0:
        continue
      item = self.index.item_ids[int(r)]
      modality = self.corpus.item_modality(item) if item in self.corpus else None
      d = {"rank": len(results) + 1, "id": item,
           "identifier": [int(c) for c in self.index.codes[int(r)]], "score": float(s),
           "modality": modality, "media_url": media_url(item), "media_type": self.media_type(item)}
      if logps is not None:
        d["logp"], d["cos"] = float(logps[rank]), float(coss[rank])
      results.append(d)
    return results


def media_url(item_id: str) -> str:
  """``/media/<id>`` with the id percent-encoded (an id may hold '/', '?', '#', spaces, ...)."""
  return "/media/" + quote(item_id, safe="")
