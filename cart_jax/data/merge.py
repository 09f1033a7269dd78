"""Merging corpora of different modalities into one ``mixed`` corpus (``cart data merge``).

  cart data merge corpora/emoji corpora/instruments corpora/emoji-motion --out corpora/mixed \\
      --embeddings emb/emoji.npy emb/instruments.npy emb/emoji-motion.npy

The identifier scheme does not care what an item is: one index over images, audio and video
together is built from one embedding matrix. :func:`merge_corpora` writes

  OUT/corpus.json, items.jsonl, texts.jsonl   header modality ``mixed`` when the items are of
                                              several modalities (each item keeps its own)
  OUT/media/<corpus name>/...                 each source's media, symlinked (or copied); with
                                              symlinks, the header's media_roots declares the
                                              source corpora and their own media roots
  OUT/embeddings.npy, .ids.txt, .meta.json    (with ``embeddings``) float32 [N, d], rows in the
                                              merged item order, every row L2-normalised, the same
                                              files ``cart embed`` writes, so
                                              ``cart build-ids --embeddings OUT/embeddings.npy
                                              --item-ids OUT/embeddings.ids.txt`` takes them

Item ids stay as they are unless two corpora share one: then that id becomes
``<corpus name>:<id>`` in every corpus that has it (``prefix=True`` prefixes every id). Texts keep
their split, kind and source. Everything is validated before anything is written; the output
directory appears atomically (all of it, embeddings included) or not at all.

Embeddings come one file per corpus, aligned with its items through the ``.ids.txt`` sidecar
``cart embed`` writes (any order; every item needs a row, no extra rows). They must have one
dimension. Embeddings of different corpora live in different spaces (each ``cart embed`` trains
its own towers), so each row is L2-normalised: no modality dominates K-Means by its norm.

Pure numpy: importing this module never imports TensorFlow or JAX.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from cart_jax.core.errors import CartError
from cart_jax.data.corpus import (MEDIA_DIR, MIXED, Corpus, CorpusFormatError, Item,
                                  OutputExistsError, Text, find_leaks, load_corpus, write_corpus)
from cart_jax.index.inputs import InputError

ID_SEPARATOR = ":"
EMBEDDINGS_FILE = "embeddings.npy"
EMBEDDINGS_IDS_FILE = "embeddings.ids.txt"
EMBEDDINGS_META_FILE = "embeddings.meta.json"
EMBEDDINGS_FORMAT = "cart-embeddings"  # the format of `cart embed`'s E.meta.json
EMBEDDINGS_VERSION = 1


class MergeError(CartError):
  """The corpora (or their embeddings) cannot be merged; the message names the input."""


@dataclasses.dataclass
class MergeStats:
  """What a merge did (JSON-friendly via ``dataclasses.asdict``)."""
  name: str
  modality: str
  num_items: int
  num_texts: int
  modality_counts: dict[str, int]
  sources: list[dict]  # per input corpus: name, dir, modality, items, texts, prefixed ids
  prefixed_ids: int  # ids that got a "<corpus name>:" prefix
  held_out_texts_equal_to_train_texts: int  # find_leaks on the merged corpus (across sources)
  media_mode: str
  embeddings: str | None = None
  embedding_dim: int | None = None
  seconds: float = 0.0


def _check_name(name: str, where: str) -> str:
  if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name \
      or ID_SEPARATOR in name or name != name.strip():
    raise MergeError(f"{where}: corpus name {name!r} cannot prefix ids and media folders "
                     f"(non-empty, no '/', '\\\\' or {ID_SEPARATOR!r}, no surrounding spaces); "
                     "pass names=[...] / --names")
  return name


def _new_ids(corpora: Sequence[Corpus], names: Sequence[str], prefix: bool) -> list[dict[str, str]]:
  """Per corpus: old item id -> merged item id (prefixed where ids collide, or always)."""
  owners = collections.Counter(i for c in corpora for i in set(c.item_ids))
  maps = []
  for c, name in zip(corpora, names):
    maps.append({i: (f"{name}{ID_SEPARATOR}{i}" if prefix or owners[i] > 1 else i)
                 for i in c.item_ids})
  seen: dict[str, str] = {}
  for m, name in zip(maps, names):
    for old, new in m.items():
      if new in seen:
        raise MergeError(f"item id {new!r} of corpus {name!r} (was {old!r}) collides with an id of "
                         f"corpus {seen[new]!r} even after prefixing; pass prefix=True / --prefix "
                         "or rename the corpora")
      seen[new] = name
  return maps


def _media_path(item: Item, name: str) -> str:
  """``media/<x>`` of corpus ``name`` -> ``media/<name>/<x>`` in the merged corpus."""
  parts = Path(item.media).parts
  rel = Path(*parts[1:]) if parts[0] == MEDIA_DIR and len(parts) > 1 else Path(*parts)
  return (Path(MEDIA_DIR) / name / rel).as_posix()


def _aligned_embeddings(paths: Sequence[str | os.PathLike], corpora: Sequence[Corpus],
                        names: Sequence[str]) -> tuple[np.ndarray, list[dict]]:
  """float32 [N, d]: each corpus's embeddings in its item order, stacked, rows L2-normalised."""
  from cart_jax.data.embeddings import align, read_embeddings_with_ids  # pylint: disable=g-import-not-at-top
  if len(paths) != len(corpora):
    raise MergeError(f"{len(paths)} embedding file(s) for {len(corpora)} corpora: pass one per "
                     "corpus, in the same order")
  blocks, info = [], []
  for path, corpus, name in zip(paths, corpora, names):
    try:
      arr, ids = read_embeddings_with_ids(path)
      al = align(arr, ids, corpus.item_ids, source=f"{path} (corpus {name!r})")
    except InputError as e:
      raise MergeError(str(e)) from None
    blocks.append(np.asarray(al.embeddings, np.float32))  # [n_c, d_c]
    info.append({"corpus": name, "path": str(path), "num_items": len(corpus.items),
                 "dim": int(arr.shape[1]), "reordered": al.reordered})
  dims = {i["dim"] for i in info}
  if len(dims) > 1:
    desc = ", ".join(f"{i['path']} ({i['corpus']}): {i['dim']}" for i in info)
    raise MergeError(f"embeddings of different dimensions cannot share one index: {desc}; embed "
                     "every corpus with the same --dim")
  emb = np.concatenate(blocks, axis=0)  # [N, d]
  norms = np.linalg.norm(emb, axis=1, keepdims=True)  # [N, 1]
  if (norms[:, 0] <= 1e-12).any():
    row = int(np.flatnonzero(norms[:, 0] <= 1e-12)[0])
    start = 0
    for i, corpus in zip(info, corpora):
      if row < start + i["num_items"]:
        raise MergeError(f"{i['path']}: item {corpus.item_ids[row - start]!r} has a zero "
                         "embedding (cannot be L2-normalised)")
      start += i["num_items"]
  return emb / norms, info


def _write_embeddings(directory: Path, emb: np.ndarray, ids: Sequence[str], corpus_dir: Path,
                      sources: list[dict]) -> None:
  from cart_jax.index.inputs import content_hash  # pylint: disable=g-import-not-at-top
  with open(directory / EMBEDDINGS_FILE, "wb") as f:
    np.save(f, np.ascontiguousarray(emb, np.float32))
  (directory / EMBEDDINGS_IDS_FILE).write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
  meta = {"format": EMBEDDINGS_FORMAT, "version": EMBEDDINGS_VERSION, "encoder": "merged",
          "num_items": int(emb.shape[0]), "dim": int(emb.shape[1]), "corpus": str(corpus_dir),
          "content_hash": content_hash(emb, list(ids)), "model": None,
          "summary": {"l2_normalised": True, "sources": sources}}
  (directory / EMBEDDINGS_META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def merge_corpora(corpus_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *,
                  embeddings: Sequence[str | os.PathLike] | None = None,
                  names: Sequence[str] | None = None, name: str | None = None,
                  prefix: bool = False, media_mode: str = "symlink",
                  overwrite: bool = False) -> tuple[Corpus, MergeStats]:
  """Merges corpora (any modalities) into one corpus directory; see the module docstring.

  Args:
    corpus_dirs: two or more corpus directories.
    out_dir: the merged corpus directory (must not exist unless ``overwrite``).
    embeddings: optional, one ``.npy``/``.npz`` per corpus (ids from the ``.ids.txt`` sidecar or
      the ``.npz``), same dimension; written merged and L2-normalised into ``out_dir``.
    names: per corpus, the name used for id prefixes and media folders (default: each corpus's
      own name; must be distinct).
    name: the merged corpus's name (default: the names joined by ``+``).
    prefix: prefix every item id with ``<corpus name>:`` (default: only colliding ids).
    media_mode: ``symlink`` (absolute links to the source files) or ``copy`` or ``hardlink``.
    overwrite: replace an existing ``out_dir``.

  Returns:
    (the merged corpus, loaded back; MergeStats).

  Raises:
    MergeError / CorpusFormatError naming the bad input; FileExistsError. Nothing is written then.
  """
  t0 = time.perf_counter()
  if len(corpus_dirs) < 2:
    raise MergeError(f"merging needs at least two corpus directories, got {len(corpus_dirs)}")
  if media_mode not in ("symlink", "copy", "hardlink"):
    raise MergeError(f"media mode {media_mode!r}: expected symlink, copy or hardlink")
  out = Path(out_dir)
  resolved = [Path(d).resolve() for d in corpus_dirs]
  if len(set(resolved)) != len(resolved):
    dup = [str(d) for d, n in collections.Counter(resolved).items() if n > 1][0]
    raise MergeError(f"corpus {dup} is given twice")
  if out.resolve() in resolved or any(out.resolve() in d.parents for d in resolved):
    raise MergeError(f"--out {out} is (or holds) one of the corpora being merged")
  if out.exists() and not overwrite:
    raise OutputExistsError(f"{out} already exists (pass overwrite=True / --overwrite to replace it)")
  corpora = [load_corpus(d, check_media=True) for d in corpus_dirs]
  if names is None:
    names = [c.name for c in corpora]
  if len(names) != len(corpora):
    raise MergeError(f"{len(names)} name(s) for {len(corpora)} corpora")
  names = [_check_name(n, str(d)) for n, d in zip(names, corpus_dirs)]
  if len(set(names)) != len(names):
    dup = [n for n, k in collections.Counter(names).items() if k > 1][0]
    raise MergeError(f"two corpora are named {dup!r}; names prefix ids and media folders, so they "
                     "must be distinct: pass names=[...] / --names")
  id_maps = _new_ids(corpora, names, prefix)

  items, texts, media_sources, sources = [], [], {}, []
  for corpus, cname, d, id_map in zip(corpora, names, corpus_dirs, id_maps):
    for it in corpus.items:
      new = Item(id_map[it.id], it.modality, _media_path(it, cname))
      items.append(new)
      media_sources[new.id] = Path(corpus.media_path(it)).resolve()
    texts.extend(Text(id_map[t.item_id], t.text, t.split, t.kind, t.source) for t in corpus.all_texts)
    sources.append({"name": cname, "dir": str(Path(d).absolute()), "modality": corpus.modality,
                    "num_items": len(corpus.items), "num_texts": len(corpus.all_texts),
                    "prefixed_ids": sum(1 for k, v in id_map.items() if k != v)})
  counts = collections.Counter(it.modality for it in items)
  modality = MIXED if len(counts) > 1 else items[0].modality
  merged_name = name or "+".join(names)

  emb, emb_info, writer = None, None, None
  if embeddings is not None:
    emb, emb_info = _aligned_embeddings(embeddings, corpora, names)
    merged_ids = [it.id for it in items]
    writer = lambda tmp: _write_embeddings(tmp, emb, merged_ids, out.absolute(), emb_info)

  meta = {"merged_from": sources, "id_separator": ID_SEPARATOR, "prefix_all": bool(prefix)}
  # Symlinked media resolve into the source corpora (or the data folders they declare).
  roots = [r for c in corpora for r in (c.root.resolve(), *c.media_roots)]
  merged = write_corpus(out, merged_name, modality, items, texts, media_sources=media_sources,
                        media_mode=media_mode, media_writer=writer, meta=meta, overwrite=overwrite,
                        media_roots=roots)
  stats = MergeStats(
      name=merged_name, modality=modality, num_items=len(items), num_texts=len(texts),
      modality_counts=merged.modality_counts(), sources=sources,
      prefixed_ids=sum(s["prefixed_ids"] for s in sources),
      held_out_texts_equal_to_train_texts=len(find_leaks(merged)), media_mode=media_mode,
      embeddings=str(out / EMBEDDINGS_FILE) if emb is not None else None,
      embedding_dim=int(emb.shape[1]) if emb is not None else None,
      seconds=time.perf_counter() - t0)
  return merged, stats


__all__ = ["MergeError", "MergeStats", "merge_corpora", "CorpusFormatError", "EMBEDDINGS_FILE",
           "EMBEDDINGS_IDS_FILE"]
