"""Importers from the paper's data set formats to the corpus format (``corpus.py``).

Each importer reads the annotation files users already hold and the media on disk, and
returns an :class:`ImportResult`; :func:`import_corpus` writes it atomically. Every problem
(missing column/field, unknown id, empty caption, bad split, media missing on disk) raises
:class:`~cart_jax.data.corpus.CorpusFormatError` naming the file and line (CSV/text) or
record (JSON, e.g. ``images[12]``).

Formats (``FORMATS``):

* ``karpathy`` - Karpathy split JSON (``dataset_flickr30k.json``, ``dataset_coco.json``):
  ``images[].filename``, optional ``filepath``, ``split`` (``restval`` -> train),
  ``sentences[].raw``. Media: ``MEDIA_ROOT/[filepath/]filename``. Item id: file stem.
* ``clotho`` - ``clotho_captions_{development,validation,evaluation}.csv`` (columns
  ``file_name, caption_1..caption_5``; development -> train, validation -> val,
  evaluation -> test). Media: ``MEDIA_ROOT/<development|validation|evaluation>/<file_name>``,
  else ``MEDIA_ROOT/clotho_audio_<...>/<file_name>``, else ``MEDIA_ROOT/<file_name>``.
  Item id: ``file_name``.
* ``audiocaps`` - ``train.csv``/``val.csv``/``test.csv`` (columns ``audiocap_id, youtube_id,
  start_time, caption``). One item per ``(youtube_id, start_time)`` clip, id
  ``<youtube_id>_<start_time>``. Media: ``MEDIA_ROOT/<pattern>``, pattern default
  ``{youtube_id}_{start_time}.wav`` (placeholders ``{youtube_id}``, ``{start_time}``,
  ``{audiocap_id}``; with ``{audiocap_id}`` the first row of the clip whose file exists wins).
* ``msrvtt`` - MSR-VTT JSON (``train_val_videodatainfo.json``, ``test_videodatainfo.json``;
  several may be given): ``videos[] {video_id, split: train|validate|test}``,
  ``sentences[] {video_id, caption}``. Media pattern default ``{video_id}.mp4``.
* ``msvd`` - ``AllVideoDescriptions.txt`` (``<video_id> <caption...>`` per line, ``#``
  comments) or Microsoft's ``MSR Video Description Corpus.csv`` (English rows; id
  ``<VideoID>_<Start>_<End>``), with splits from ``--split-list train=FILE`` (one id per line,
  each split) or ``--mapping youtube_mapping.txt`` (``<video_id> vid<N>`` per line; the
  standard split vid1-1200 train, vid1201-1300 val, vid1301-1970 test). Media pattern
  default ``{video_id}.avi`` (the ``YouTubeClips`` files).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import os
import re
from pathlib import Path
from typing import Callable, Mapping, Sequence

from cart_jax.data.corpus import (BOM, MEDIA_DIR, Corpus, CorpusFormatError, Item, Text,
                                  check_item_id, read_json_file, write_corpus)


@dataclasses.dataclass
class ImportResult:
  """What an importer found: records plus where each item's media lives on disk."""
  name: str
  modality: str
  items: list[Item]
  texts: list[Text]
  media_sources: dict[str, Path]
  meta: dict
  skipped_items: list[str] = dataclasses.field(default_factory=list)


def _safe_name(item_id: str) -> str:
  return re.sub(r"[^A-Za-z0-9._-]+", "_", item_id).strip("._") or "item"


class _Collector:
  """Accumulates items and texts in file order; resolves media at the end."""

  def __init__(self, modality: str, media_root: Path):
    self.modality = modality
    self.media_root = Path(os.path.normpath(media_root))
    self.order: list[str] = []
    self.where: dict[str, str] = {}
    self.candidates: dict[str, list[Path]] = {}
    self.texts: list[Text] = []

  def add_item(self, item_id: str, where: str, candidates: Sequence[Path]) -> None:
    check_item_id(item_id, where)  # the one id rule, named at the source record
    for c in candidates:  # a name from the annotations may not climb out of the media root
      rel = os.path.relpath(os.path.normpath(c), self.media_root)
      if rel == ".." or rel.startswith(".." + os.sep) or os.path.isabs(rel):
        raise CorpusFormatError(f"{where}: media path {str(c)!r} of item {item_id!r} leaves the "
                                f"media root {str(self.media_root)!r}")
    if item_id not in self.where:
      self.order.append(item_id)
      self.where[item_id] = where
      self.candidates[item_id] = []
    for c in candidates:
      if c not in self.candidates[item_id]:
        self.candidates[item_id].append(c)

  def add_text(self, item_id: str, text: str | None, split: str, where: str, source: str) -> None:
    if item_id not in self.where:
      raise CorpusFormatError(f"{where}: unknown item id {item_id!r}")
    if text is None or not str(text).strip():
      raise CorpusFormatError(f"{where}: empty caption for item {item_id!r}")
    self.texts.append(Text(item_id, " ".join(str(text).split()), split, "query", source))

  def finish(self, name: str, meta: dict, skip_missing_media: bool) -> ImportResult:
    items, sources, skipped, used = [], {}, [], set()
    for item_id in self.order:
      found = next((c for c in self.candidates[item_id] if c.is_file()), None)
      if found is None:
        if skip_missing_media:
          skipped.append(item_id)
          continue
        tried = ", ".join(str(c) for c in self.candidates[item_id]) or "(no path)"
        raise CorpusFormatError(f"{self.where[item_id]}: media of item {item_id!r} missing on disk "
                                f"(tried {tried}); pass --skip-missing-media to drop such items")
      base = _safe_name(item_id)
      if not base.endswith(found.suffix):
        base += found.suffix
      stem, k = base, 1
      while base in used:
        base, k = f"{k}_{stem}", k + 1
      used.add(base)
      items.append(Item(item_id, self.modality, f"{MEDIA_DIR}/{base}"))
      sources[item_id] = found
    kept = {it.id for it in items}
    texts = [t for t in self.texts if t.item_id in kept]
    if not items:
      raise CorpusFormatError(f"no items with media found (all {len(self.order)} missing)")
    meta = dict(meta, skipped_missing_media=len(skipped))
    return ImportResult(name, self.modality, items, texts, sources, meta, skipped)


def _need(rec, key: str, where: str):
  if not isinstance(rec, dict):
    raise CorpusFormatError(f"{where}: expected an object, found {type(rec).__name__}")
  if key not in rec:
    raise CorpusFormatError(f"{where}: missing field {key!r}")
  return rec[key]


def _text_lines(path: Path) -> list[str]:
  """The lines of a UTF-8 text file (BOM at the start dropped); bad UTF-8 names file and line."""
  try:
    data = path.read_bytes()
  except OSError as e:
    raise CorpusFormatError(f"{path}: cannot read ({e.strerror})") from None
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    col = e.start - (data.rfind(b"\n", 0, e.start) + 1)
    raise CorpusFormatError(f"{path}:{line}: not valid UTF-8 ({e.reason} at byte {col} of the "
                            "line)") from None
  # Lines end at \n, \r\n or \r only (as open() and csv read them), not at \u2028 inside a field.
  return list(io.StringIO(text.removeprefix(BOM), newline=""))


def _read_csv(path: Path, required: Sequence[str]):
  """Yields (line number, row dict) after checking the header has every required column."""
  reader = csv.DictReader(_text_lines(path))
  try:
    header = reader.fieldnames or []
    missing = [c for c in required if c not in header]
    if missing:
      raise CorpusFormatError(f"{path}:1: missing column(s) {missing}; header has {header}")
    for row in reader:
      if None in row or any(v is None for v in row.values()):
        raise CorpusFormatError(f"{path}:{reader.line_num}: expected {len(header)} columns")
      yield reader.line_num, row
  except csv.Error as e:
    raise CorpusFormatError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None


def _fill(pattern: str, where: str, **fields) -> str:
  try:
    return pattern.format(**fields)
  except (KeyError, IndexError) as e:
    raise CorpusFormatError(f"--media-pattern {pattern!r}: unknown placeholder {e} "
                            f"(known: {sorted(fields)})") from None


# ---------------------------------------------------------------------------------------


def import_karpathy(sources: Sequence[Path], media_root: Path, *, name: str | None = None,
                    skip_missing_media: bool = False, **_) -> ImportResult:
  """Karpathy split JSON (Flickr30K / MS-COCO)."""
  split_map = {"train": "train", "restval": "train", "val": "val", "test": "test"}
  col = _Collector("image", media_root)
  found_name = None
  for path in sources:
    data = read_json_file(path)
    images = _need(data, "images", str(path))
    if not isinstance(images, list):
      raise CorpusFormatError(f"{path}: field 'images' must be a list")
    found_name = found_name or data.get("dataset")
    for i, img in enumerate(images):
      where = f"{path}: images[{i}]"
      filename = _need(img, "filename", where)
      where = f"{path}: images[{i}] ({filename!r})"
      split = _need(img, "split", where)
      if split not in split_map:
        raise CorpusFormatError(f"{where}: unknown split {split!r}; expected one of {list(split_map)}")
      sentences = _need(img, "sentences", where)
      if not isinstance(sentences, list) or not sentences:
        raise CorpusFormatError(f"{where}: 'sentences' must be a non-empty list")
      rel = Path(img.get("filepath") or "") / filename
      item_id = Path(filename).stem
      if item_id in col.where:
        raise CorpusFormatError(f"{where}: duplicate image {filename!r} (first at {col.where[item_id]})")
      col.add_item(item_id, where, [media_root / rel, media_root / filename])
      for j, s in enumerate(sentences):
        col.add_text(item_id, _need(s, "raw", f"{where} sentences[{j}]"), split_map[split],
                     f"{where} sentences[{j}]", "human")
  return col.finish(name or found_name or "karpathy", {"format": "karpathy"}, skip_missing_media)


CLOTHO_SPLITS = {"development": "train", "validation": "val", "evaluation": "test"}


def import_clotho(sources: Sequence[Path], media_root: Path, *, name: str | None = None,
                  skip_missing_media: bool = False, **_) -> ImportResult:
  """Clotho captions CSVs (a directory holding them, or the files)."""
  files: list[tuple[Path, str]] = []
  for src in sources:
    cands = sorted(src.glob("clotho_captions_*.csv")) if src.is_dir() else [src]
    for f in cands:
      key = next((k for k in CLOTHO_SPLITS if k in f.name), None)
      if key is None:
        raise CorpusFormatError(f"{f}: cannot tell the split from the file name (expected "
                                f"clotho_captions_{{{','.join(CLOTHO_SPLITS)}}}.csv)")
      files.append((f, key))
  if not files:
    raise CorpusFormatError(f"no clotho_captions_*.csv found in {[str(s) for s in sources]}")
  order = list(CLOTHO_SPLITS)
  files.sort(key=lambda f: order.index(f[1]))  # development, validation, evaluation
  col = _Collector("audio", media_root)
  columns = ["file_name"] + [f"caption_{i}" for i in range(1, 6)]
  for path, key in files:
    for line, row in _read_csv(path, columns):
      where = f"{path}:{line}"
      fn = row["file_name"].strip()
      if fn in col.where:
        raise CorpusFormatError(f"{where}: duplicate file_name {fn!r} (first at {col.where[fn]})")
      col.add_item(fn, where, [media_root / key / fn, media_root / f"clotho_audio_{key}" / fn,
                               media_root / fn])
      for c in columns[1:]:
        col.add_text(fn, row[c], CLOTHO_SPLITS[key], f"{where} ({c})", "human")
  return col.finish(name or "clotho", {"format": "clotho"}, skip_missing_media)


AUDIOCAPS_SPLITS = {"train": "train", "val": "val", "validation": "val", "test": "test"}


def import_audiocaps(sources: Sequence[Path], media_root: Path, *, name: str | None = None,
                     media_pattern: str | None = None, skip_missing_media: bool = False,
                     **_) -> ImportResult:
  """AudioCaps CSVs (a directory holding train/val/test.csv, or the files)."""
  pattern = media_pattern or "{youtube_id}_{start_time}.wav"
  files: list[tuple[Path, str]] = []
  for src in sources:
    cands = [src / f"{s}.csv" for s in ("train", "val", "test")] if src.is_dir() else [src]
    for f in cands:
      if src.is_dir() and not f.exists():
        continue
      split = AUDIOCAPS_SPLITS.get(f.stem)
      if split is None:
        raise CorpusFormatError(f"{f}: cannot tell the split from the file name (expected "
                                "train.csv, val.csv or test.csv)")
      files.append((f, split))
  if not files:
    raise CorpusFormatError(f"no train/val/test.csv found in {[str(s) for s in sources]}")
  col = _Collector("audio", media_root)
  for path, split in files:
    for line, row in _read_csv(path, ["audiocap_id", "youtube_id", "start_time", "caption"]):
      where = f"{path}:{line}"
      yid, start = row["youtube_id"].strip(), row["start_time"].strip()
      if not yid or not start:
        raise CorpusFormatError(f"{where}: empty youtube_id or start_time")
      item_id = f"{yid}_{start}"
      rel = _fill(pattern, where, youtube_id=yid, start_time=start,
                  audiocap_id=row["audiocap_id"].strip())
      col.add_item(item_id, where, [media_root / rel])
      col.add_text(item_id, row["caption"], split, where, "human")
  return col.finish(name or "audiocaps", {"format": "audiocaps", "media_pattern": pattern},
                    skip_missing_media)


MSRVTT_SPLITS = {"train": "train", "validate": "val", "val": "val", "test": "test"}


def import_msrvtt(sources: Sequence[Path], media_root: Path, *, name: str | None = None,
                  media_pattern: str | None = None, skip_missing_media: bool = False,
                  **_) -> ImportResult:
  """MSR-VTT ``*_videodatainfo.json`` files (videos + sentences)."""
  pattern = media_pattern or "{video_id}.mp4"
  col = _Collector("video", media_root)
  split_of: dict[str, str] = {}
  datas = [(p, read_json_file(p)) for p in sources]
  for path, data in datas:  # all videos first: a test file may hold sentences only for itself
    videos = _need(data, "videos", str(path))
    for i, v in enumerate(videos):
      where = f"{path}: videos[{i}]"
      vid = str(_need(v, "video_id", where))
      split = _need(v, "split", f"{where} ({vid!r})")
      if split not in MSRVTT_SPLITS:
        raise CorpusFormatError(f"{where} ({vid!r}): unknown split {split!r}; expected one of "
                                f"{list(MSRVTT_SPLITS)}")
      if vid in split_of:
        raise CorpusFormatError(f"{where}: duplicate video_id {vid!r} (first at {col.where[vid]})")
      split_of[vid] = MSRVTT_SPLITS[split]
      col.add_item(vid, where, [media_root / _fill(pattern, where, video_id=vid)])
  for path, data in datas:
    for i, s in enumerate(_need(data, "sentences", str(path))):
      where = f"{path}: sentences[{i}]"
      vid = str(_need(s, "video_id", where))
      col.add_text(vid, _need(s, "caption", where), split_of.get(vid, "train"), where, "human")
  return col.finish(name or "msrvtt", {"format": "msrvtt", "media_pattern": pattern},
                    skip_missing_media)


MSVD_STANDARD_SPLIT = (("train", 1, 1200), ("val", 1201, 1300), ("test", 1301, 1970))


def _msvd_annotations(path: Path) -> list[tuple[str, str, str]]:
  """(video id, caption, where) from AllVideoDescriptions.txt or the Microsoft CSV."""
  out = []
  if path.suffix.lower() == ".csv":
    for line, row in _read_csv(path, ["VideoID", "Start", "End", "Language", "Description"]):
      if row["Language"].strip().lower() != "english":
        continue
      vid = f"{row['VideoID'].strip()}_{row['Start'].strip()}_{row['End'].strip()}"
      out.append((vid, row["Description"], f"{path}:{line}"))
    return out
  for lineno, line in enumerate(_text_lines(path), start=1):
    line = line.strip()
    if not line or line.startswith("#"):
      continue
    parts = line.split(None, 1)
    out.append((parts[0], parts[1] if len(parts) > 1 else "", f"{path}:{lineno}"))
  return out


def _read_id_lines(path: Path) -> list[tuple[str, str]]:
  return [(ln.split()[0], f"{path}:{i}") for i, ln in enumerate(_text_lines(path), start=1)
          if ln.strip()]


def import_msvd(sources: Sequence[Path], media_root: Path, *, name: str | None = None,
                media_pattern: str | None = None, skip_missing_media: bool = False,
                split_lists: Mapping[str, Path] | None = None, mapping: Path | None = None,
                **_) -> ImportResult:
  """MSVD annotations + split lists (or the YouTube mapping with the standard split)."""
  pattern = media_pattern or "{video_id}.avi"
  to_clip: dict[str, str] = {}  # "vid17" -> clip id
  if mapping is not None:
    for i, ln in enumerate(_text_lines(Path(mapping)), start=1):
      if not ln.strip():
        continue
      parts = ln.split()
      if len(parts) != 2 or not re.fullmatch(r"vid\d+", parts[1]):
        raise CorpusFormatError(f"{mapping}:{i}: expected '<video_id> vid<N>', found {ln!r}")
      to_clip[parts[1]] = parts[0]
  split_entries: list[tuple[str, str, str]] = []  # (clip id, split, where)
  if split_lists:
    for split, path in split_lists.items():
      if split not in ("train", "val", "test"):
        raise CorpusFormatError(f"--split-list {split}={path}: split must be train, val or test")
      for vid, where in _read_id_lines(Path(path)):
        split_entries.append((to_clip.get(vid, vid), split, where))
  elif to_clip:
    for split, lo, hi in MSVD_STANDARD_SPLIT:
      for n in range(lo, hi + 1):
        if f"vid{n}" in to_clip:
          split_entries.append((to_clip[f"vid{n}"], split, f"{mapping}: vid{n}"))
  else:
    raise CorpusFormatError("msvd needs its splits: --split-list SPLIT=FILE (repeat per split) "
                            "or --mapping youtube_mapping.txt (standard 1200/100/670 split)")
  col = _Collector("video", media_root)
  split_of: dict[str, str] = {}
  for vid, split, where in split_entries:
    if vid in split_of:
      raise CorpusFormatError(f"{where}: video {vid!r} listed twice (first in split {split_of[vid]})")
    split_of[vid] = split
    col.add_item(vid, where, [media_root / _fill(pattern, where, video_id=vid)])
  have_caption = set()
  for path in sources:
    for vid, caption, where in _msvd_annotations(path):
      if vid not in split_of:
        raise CorpusFormatError(f"{where}: video {vid!r} is in no split")
      col.add_text(vid, caption, split_of[vid], where, "human")
      have_caption.add(vid)
  for vid, split, where in split_entries:
    if vid not in have_caption:
      raise CorpusFormatError(f"{where}: video {vid!r} has no caption in "
                              f"{[str(s) for s in sources]}")
  return col.finish(name or "msvd", {"format": "msvd", "media_pattern": pattern},
                    skip_missing_media)


Importer = Callable[..., ImportResult]
FORMATS: dict[str, Importer] = {
    "karpathy": import_karpathy,
    "clotho": import_clotho,
    "audiocaps": import_audiocaps,
    "msrvtt": import_msrvtt,
    "msvd": import_msvd,
}


def import_corpus(fmt: str, sources: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *,
                  media_root: str | os.PathLike | None = None, media_mode: str = "symlink",
                  overwrite: bool = False, **options) -> tuple[Corpus, ImportResult]:
  """Reads ``sources`` in format ``fmt`` and writes a corpus to ``out_dir`` atomically.

  Args:
    fmt: one of ``FORMATS``.
    sources: annotation files (or, for clotho/audiocaps, a directory holding them).
    out_dir: the corpus directory to create.
    media_root: where the media live (default: the directory of the first source).
    media_mode: ``symlink`` (default, absolute links; the corpus then declares the media root in
      ``corpus.json``'s ``media_roots``, see :mod:`cart_jax.data.corpus`), ``copy`` or ``hardlink``.
    overwrite: replace ``out_dir`` if it exists.
    **options: importer options (``name``, ``media_pattern``, ``skip_missing_media``,
      ``split_lists``, ``mapping``).
  """
  if fmt not in FORMATS:
    raise CorpusFormatError(f"unknown format {fmt!r}; expected one of {sorted(FORMATS)}")
  paths = [Path(s) for s in sources]
  if not paths:
    raise CorpusFormatError("no source files given")
  for p in paths:
    if not p.exists():
      raise CorpusFormatError(f"{p}: not found")
  root = Path(media_root) if media_root is not None else (paths[0] if paths[0].is_dir()
                                                          else paths[0].parent)
  result = FORMATS[fmt](paths, root, **options)
  meta = dict(result.meta, sources=[str(p.resolve()) for p in paths], media_root=str(root.resolve()),
              media_mode=media_mode)
  # With symlinks the media stay in the media root: the corpus declares it (media_roots).
  corpus = write_corpus(out_dir, result.name, result.modality, result.items, result.texts,
                        media_sources=result.media_sources, media_mode=media_mode, meta=meta,
                        overwrite=overwrite, media_roots=[root])
  return corpus, result
