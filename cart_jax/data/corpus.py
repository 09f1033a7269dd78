"""The one corpus directory format that everything downstream reads.

A corpus is a directory::

  corpus.json    {"format": "cart-corpus", "version": 1, "name": ..., "modality": ...
                  (image|audio|video, or "mixed" when the items are of several modalities),
                  "num_items": N, "num_texts": T, "counts": {split: {kind: n}},
                  "media_roots": [dir, ...] (optional, see below), "meta": {...}}
  items.jsonl    one candidate per line: {"id": str, "modality": "image"|"audio"|"video",
                  "media": "media/<file>"}   (path relative to the corpus directory)
  texts.jsonl    one text per line: {"item_id": str, "text": str,
                  "split": "train"|"val"|"test", "kind": "query"|"caption",
                  "source": str (optional provenance tag)}
  media/         the media files (or symbolic links to them)

The header's ``modality`` names the corpus's kind; every item carries its own. A ``mixed``
corpus (``cart data merge``) holds items of any of the three modalities in one index;
:meth:`Corpus.modalities` says which ones.

Splits belong to texts, not items: every item is a retrieval candidate (it gets an
identifier), and a test item's human queries are simply all ``split=test``. ``kind=query``
texts are human queries; ``kind=caption`` texts are caption-enhancement descriptions of the
item (from a captioner), used only for training.

Item ids follow one rule wherever they enter (``items.jsonl``, importers, ids files such as
``E.ids.txt`` / ``--item-ids``, the ids of precomputed embeddings): :func:`check_item_id`. An id is
non-empty, printable (no control, format, separator or unassigned characters; the ASCII space and,
inside emoji sequences and scripts that need them, the zero-width (non-)joiner and emoji tag
characters are allowed), without leading or trailing whitespace and without line separators
(``\\n``, ``\\r``, ``\\u2028``, ``\\u2029``, ``\\x85``, ...), so it round-trips through a one-id-per-line
file. A UTF-8 byte order mark at the very start of a file is stripped (editors on Windows write
one); anywhere else it is a non-printable character and refused.

Containment: an item's media path is relative, and its real path (symbolic links resolved) must lie
under the corpus directory or under one of the directories the header declares in ``media_roots``
(absolute, or relative to the corpus directory). ``cart data import --media symlink`` and
``cart data merge`` declare the directories their links point into, so a ``media/`` that links
to a data folder keeps working, while a link that leads elsewhere (``media -> /etc``) is refused.
Corpora written before ``media_roots`` existed declare their roots through ``meta.media_root``
(written by ``cart data import``) and ``meta.merged_from[].dir`` (``cart data merge``); they are
honoured too.

``load_corpus`` validates everything and raises :class:`CorpusFormatError` naming the file
and line. ``num_items``, ``num_texts`` and ``counts`` of the header, when present, must agree with
the files. ``write_corpus`` writes into a temporary directory next to the target and renames
it into place, so a failed write leaves nothing behind.

Pure Python: importing this module never imports TensorFlow or JAX.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import shutil
import tempfile
import unicodedata
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from cart_jax.core import ids
from cart_jax.core.errors import CartError
from cart_jax.core.ids import BOM, ID_RULE, item_id_problem  # noqa: F401  (the corpus format's names)

FORMAT_NAME = "cart-corpus"
FORMAT_VERSION = 1
CORPUS_FILE = "corpus.json"
ITEMS_FILE = "items.jsonl"
TEXTS_FILE = "texts.jsonl"
MEDIA_DIR = "media"

MODALITIES = ("image", "audio", "video")  # what an item is
MIXED = "mixed"
CORPUS_MODALITIES = MODALITIES + (MIXED,)  # what a corpus header may say
SPLITS = ("train", "val", "test")
KINDS = ("query", "caption")


class CorpusFormatError(CartError):
  """A corpus (or an importer's source file) is malformed; the message names file and line."""


class OutputExistsError(CartError, FileExistsError):
  """An output directory exists and replacing it was not asked for (``overwrite``)."""


# ---------------------------------------------------------------------------------------
# Item ids: the one rule (module docstring, :mod:`cart_jax.core.ids`), used wherever ids enter.


def check_item_id(item_id, where: str, error: type[CartError] | None = None) -> str:
  """:func:`cart_jax.core.ids.check_item_id`, raising ``error`` (default CorpusFormatError)."""
  return ids.check_item_id(item_id, where, error or CorpusFormatError)


def read_id_lines(path: str | os.PathLike, error: type[CartError] | None = None,
                  what: str = "item ids") -> list[tuple[int, str]]:
  """:func:`cart_jax.core.ids.read_id_lines`, raising ``error`` (default CorpusFormatError)."""
  return ids.read_id_lines(path, error or CorpusFormatError, what)


def escape_controls(text: str) -> str:
  """``text`` with control, format and separator characters escaped as ``repr`` would.

  For user-supplied strings echoed in messages and logs: a terminal never interprets them (an
  ESC sequence, a carriage return that hides the start of the line), and the message stays one
  line.
  """
  return "".join(ch if ch.isprintable() or ch == " " else repr(ch)[1:-1] for ch in text)


def json_error(where: str, e: json.JSONDecodeError, one_line: bool = True) -> str:
  """``where: not valid JSON (MSG: column C)``, or ``line L column C`` for a multi-line file.

  ``e.msg`` alone is cut off mid-sentence for some errors (``"Invalid control character at"``):
  the position completes it, as in ``str(e)``.
  """
  pos = f"column {e.colno}" if one_line else f"line {e.lineno} column {e.colno}"
  return f"{where}: not valid JSON ({e.msg}: {pos})"


@dataclasses.dataclass(frozen=True)
class Item:
  """One retrieval candidate."""
  id: str
  modality: str
  media: str  # path relative to the corpus directory

  def to_json(self) -> dict:
    return {"id": self.id, "modality": self.modality, "media": self.media}


@dataclasses.dataclass(frozen=True)
class Text:
  """One text attached to an item: a human query or a caption-enhancement description."""
  item_id: str
  text: str
  split: str = "train"
  kind: str = "query"
  source: str | None = None

  def to_json(self) -> dict:
    d = {"item_id": self.item_id, "text": self.text, "split": self.split, "kind": self.kind}
    if self.source is not None:
      d["source"] = self.source
    return d


def normalize_text(text: str) -> str:
  """Canonical form used to compare texts (dedupe and leak checks).

  NFKC, case-folded, ``_``/``:``/``,``/``.``/quotes and word-internal hyphens become
  spaces, whitespace collapsed. ``"Flag: Germany"``, ``"flag_germany"`` and
  ``"flag germany"`` are the same text.
  """
  t = unicodedata.normalize("NFKC", text).casefold()
  t = t.replace("\u2019", "'").replace("\u2018", "'")
  t = re.sub(r"(?<=\w)-(?=\w)", " ", t)
  t = re.sub(r"[_:,.;!?\"()\[\]{}\u201c\u201d\u3001\u3002\uff0c\uff1a]", " ", t)
  return " ".join(t.split())


class Corpus:
  """An in-memory corpus: items, texts and helpers. Build with ``load_corpus`` or directly."""

  def __init__(self, name: str, modality: str, items: Sequence[Item], texts: Sequence[Text],
               root: str | os.PathLike | None = None, meta: Mapping | None = None,
               media_roots: Sequence[str | os.PathLike] = ()):
    self.name = name
    self.modality = modality
    self.items: tuple[Item, ...] = tuple(items)
    self.all_texts: tuple[Text, ...] = tuple(texts)
    self.root = Path(root) if root is not None else None
    self.meta = dict(meta or {})
    # Real paths of the directories besides the corpus directory that media may resolve into.
    self.media_roots: tuple[Path, ...] = tuple(Path(os.path.realpath(r)) for r in media_roots)
    self._index = {it.id: i for i, it in enumerate(self.items)}

  def __repr__(self) -> str:
    return (f"Corpus(name={self.name!r}, modality={self.modality!r}, items={len(self.items)}, "
            f"texts={len(self.all_texts)}, root={str(self.root) if self.root else None!r})")

  @property
  def item_ids(self) -> list[str]:
    return [it.id for it in self.items]

  def item_index(self, item_id: str) -> int:
    """Row of ``item_id`` in ``items`` (KeyError if unknown)."""
    return self._index[item_id]

  def __contains__(self, item_id: str) -> bool:
    return item_id in self._index

  def texts(self, split: str | None = None, kind: str | None = None) -> list[Text]:
    """Texts filtered by split and/or kind (``None`` = any)."""
    if split is not None and split not in SPLITS:
      raise CartError(f"unknown split {split!r}; expected one of {SPLITS}")
    if kind is not None and kind not in KINDS:
      raise CartError(f"unknown kind {kind!r}; expected one of {KINDS}")
    return [t for t in self.all_texts
            if (split is None or t.split == split) and (kind is None or t.kind == kind)]

  def pairs(self, split: str | None = None, kind: str | None = None) -> tuple[list[str], np.ndarray]:
    """(texts, item rows int32 [n]) for a split/kind: the retrieval ground truth."""
    sel = self.texts(split, kind)
    rows = np.asarray([self._index[t.item_id] for t in sel], np.int32)  # [n]
    return [t.text for t in sel], rows

  def media_path(self, item: Item | str, media_roots: Sequence[Path] | None = None) -> Path:
    """Path of an item's media file (under ``root``), checked to resolve inside the corpus.

    ``media_roots``: the real paths of the directories outside the corpus directory the file
    may resolve into (default: the declared ``media_roots``; ``cart serve`` passes fewer).

    Raises:
      CorpusFormatError: its real path (links resolved) leaves the corpus directory and the
        media roots (module docstring: containment).
    """
    if isinstance(item, str):
      item = self.items[self._index[item]]
    if self.root is None:
      raise ValueError("corpus has no root directory; media paths are relative to it")
    roots = self.media_roots if media_roots is None else tuple(media_roots)
    problem = _containment_problem(self.root, item.media, roots)
    if problem:
      raise CorpusFormatError(f"{self.root / ITEMS_FILE}: item {item.id!r}: {problem}")
    return self.root / item.media

  def modalities(self) -> tuple[str, ...]:
    """The item modalities present, in ``MODALITIES`` order (one entry unless ``mixed``)."""
    present = {it.modality for it in self.items}
    return tuple(m for m in MODALITIES if m in present)

  def modality_counts(self) -> dict[str, int]:
    """``{modality: number of items}`` for the modalities present."""
    c = collections.Counter(it.modality for it in self.items)
    return {m: c[m] for m in MODALITIES if c[m]}

  def item_modality(self, item_id: str) -> str:
    """Modality of one item (KeyError if unknown)."""
    return self.items[self._index[item_id]].modality

  def counts(self) -> dict[str, dict[str, int]]:
    """``{split: {kind: number of texts}}`` for every split and kind (zeros included)."""
    c = collections.Counter((t.split, t.kind) for t in self.all_texts)
    return {s: {k: c[(s, k)] for k in KINDS} for s in SPLITS}

  def summary(self) -> dict:
    out = {"name": self.name, "modality": self.modality, "num_items": len(self.items),
           "num_texts": len(self.all_texts), "counts": self.counts()}
    if self.modality == MIXED:
      out["modality_counts"] = self.modality_counts()
    return out


# ---------------------------------------------------------------------------------------
# Reading and validation.


def read_jsonl(path: Path) -> Iterable[tuple[int, dict]]:
  """``(line number, JSON object)`` of each non-blank line of a UTF-8 JSONL file (a BOM allowed);
  a bad line is a CorpusFormatError naming the file and line."""
  try:
    f = open(path, "rb")
  except OSError as e:
    raise CorpusFormatError(f"{path}: cannot read ({e.strerror})") from None
  with f:
    for lineno, raw in enumerate(f, start=1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise CorpusFormatError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start} "
                                "of the line)") from None
      if lineno == 1 and line.startswith(BOM):
        line = line[1:]
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise CorpusFormatError(json_error(f"{path}:{lineno}", e)) from None
      if not isinstance(rec, dict):
        raise CorpusFormatError(f"{path}:{lineno}: expected a JSON object, found {type(rec).__name__}")
      yield lineno, rec


def _field(rec: dict, key: str, where: str) -> str:
  if key not in rec:
    raise CorpusFormatError(f"{where}: missing field {key!r} (found fields {sorted(rec)})")
  val = rec[key]
  if not isinstance(val, str):
    raise CorpusFormatError(f"{where}: field {key!r} must be a string, found {val!r}")
  return val


def has_visible_text(text: str) -> bool:
  """True when ``text`` has a character other than whitespace, control and format characters.

  A query of spaces, zero-width spaces or control characters tokenizes to nothing.
  """
  return any(not (ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Zs"))
             for ch in text)


def check_text(text: Text, where: str, known_ids: Mapping[str, int] | set | None = None) -> None:
  """Validates one text record (raises CorpusFormatError naming ``where``)."""
  if known_ids is not None and text.item_id not in known_ids:
    raise CorpusFormatError(f"{where}: unknown item id {text.item_id!r}")
  if not has_visible_text(text.text):
    raise CorpusFormatError(f"{where}: empty text {text.text!r} for item {text.item_id!r} (no "
                            "visible character)")
  if text.split not in SPLITS:
    raise CorpusFormatError(f"{where}: bad split {text.split!r}; expected one of {list(SPLITS)}")
  if text.kind not in KINDS:
    raise CorpusFormatError(f"{where}: bad kind {text.kind!r}; expected one of {list(KINDS)}")


def is_within(real: str | os.PathLike, directory: str | os.PathLike) -> bool:
  """Whether the real path ``real`` is ``directory`` or lies under it (both real paths)."""
  real, directory = os.fspath(real), os.fspath(directory)
  return real == directory or real.startswith(directory.rstrip(os.sep) + os.sep)


def _containment_problem(root: Path, media: str, media_roots: Sequence[Path]) -> str | None:
  """Why ``root / media`` (links resolved) is outside ``root`` and ``media_roots``, else None."""
  real = os.path.realpath(root / media)
  allowed = [os.path.realpath(root)] + [str(r) for r in media_roots]
  if any(is_within(real, d) for d in allowed):
    return None
  return (f"media path {media!r} resolves to {real!r}, outside the corpus directory "
          f"{allowed[0]!r} and its declared media roots {allowed[1:]}; if the media really live "
          f"there, list that directory in {CORPUS_FILE}'s \"media_roots\"")


def _media_roots(header: Mapping, root: Path, where: str) -> list[Path]:
  """The header's ``media_roots`` (and the legacy ``meta.media_root``) as real paths."""
  declared = header.get("media_roots", [])
  if not isinstance(declared, list) or not all(isinstance(d, str) and d and "\x00" not in d
                                               for d in declared):
    raise CorpusFormatError(f"{where}: field 'media_roots' must be a list of directory paths "
                            f"(absolute, or relative to the corpus), found {declared!r}")
  meta = header.get("meta") if isinstance(header.get("meta"), dict) else {}
  # Corpora written before media_roots declared their roots in provenance fields: the media root
  # of `cart data import` and the source corpora of `cart data merge` (whose links point there).
  merged_from = meta.get("merged_from") if isinstance(meta.get("merged_from"), list) else []
  legacy = [meta.get("media_root")] + [s.get("dir") for s in merged_from if isinstance(s, dict)]
  declared = declared + [d for d in legacy if isinstance(d, str) and d and "\x00" not in d]
  out = []
  for d in declared:
    real = Path(os.path.realpath(root / d))  # an absolute d replaces root
    if real == Path(real.anchor):
      raise CorpusFormatError(f"{where}: media root {d!r} is the file system root: every file of "
                              "the machine would be readable through the corpus; declare the "
                              "media's own directory")
    out.append(real)
  return out


def _check_item(item: Item, where: str, root: Path | None, check_media: bool,
                media_roots: Sequence[Path] = ()) -> None:
  check_item_id(item.id, where)
  if item.modality not in MODALITIES:
    raise CorpusFormatError(f"{where}: bad modality {item.modality!r}; expected one of {list(MODALITIES)}")
  if not item.media:
    raise CorpusFormatError(f"{where}: empty media path for item {item.id!r}")
  if "\x00" in item.media:
    raise CorpusFormatError(f"{where}: media path {item.media!r} of item {item.id!r} holds a NUL "
                            "character")
  if os.path.isabs(item.media) or ".." in Path(item.media).parts:
    raise CorpusFormatError(f"{where}: media path {item.media!r} must be relative and inside the corpus")
  if check_media and root is not None:
    problem = _containment_problem(root, item.media, media_roots)
    if problem:
      raise CorpusFormatError(f"{where}: item {item.id!r}: {problem}")
    if not (root / item.media).is_file():
      raise CorpusFormatError(f"{where}: media file {item.media!r} of item {item.id!r} not found "
                              f"under {root}")


def read_json_file(path: Path):
  """The JSON document in ``path`` (UTF-8, a BOM allowed); a CorpusFormatError naming the file
  (and line) when it cannot be read or parsed."""
  try:
    return json.loads(Path(path).read_text(encoding="utf-8-sig"))
  except json.JSONDecodeError as e:
    raise CorpusFormatError(json_error(f"{path}:{e.lineno}", e, one_line=False)) from None
  except UnicodeDecodeError as e:
    raise CorpusFormatError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
  except OSError as e:
    raise CorpusFormatError(f"{path}: cannot read ({e.strerror or e})") from None


def load_corpus(directory: str | os.PathLike, check_media: bool = True) -> Corpus:
  """Reads and validates a corpus directory.

  Args:
    directory: the corpus directory (holds ``corpus.json``, ``items.jsonl``, ``texts.jsonl``).
    check_media: also check that every item's media file exists.

  Raises:
    CorpusFormatError: naming the file and line of the first problem.
  """
  root = Path(directory)
  if not root.is_dir():
    raise CorpusFormatError(f"{root}: not a directory (expected a corpus directory)")
  meta_path = root / CORPUS_FILE
  if not meta_path.is_file():
    raise CorpusFormatError(f"{meta_path}: missing (not a corpus directory?)")
  meta = read_json_file(meta_path)
  if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
    raise CorpusFormatError(f"{meta_path}: field 'format' must be {FORMAT_NAME!r}")
  if meta.get("version") != FORMAT_VERSION or isinstance(meta.get("version"), bool):
    raise CorpusFormatError(f"{meta_path}: unsupported version {meta.get('version')!r} "
                            f"(this reader knows {FORMAT_VERSION})")
  name = meta.get("name")
  modality = meta.get("modality")
  if not isinstance(name, str) or not name:
    raise CorpusFormatError(f"{meta_path}: field 'name' must be a non-empty string")
  if modality not in CORPUS_MODALITIES:
    raise CorpusFormatError(f"{meta_path}: bad modality {modality!r}; expected one of "
                            f"{list(CORPUS_MODALITIES)}")
  if not isinstance(meta.get("meta", {}), dict):
    raise CorpusFormatError(f"{meta_path}: field 'meta' must be a JSON object, found "
                            f"{meta['meta']!r}")
  media_roots = _media_roots(meta, root, str(meta_path))

  items_path = root / ITEMS_FILE
  if not items_path.is_file():
    raise CorpusFormatError(f"{items_path}: missing")
  items: list[Item] = []
  seen: dict[str, int] = {}
  for lineno, rec in read_jsonl(items_path):
    where = f"{items_path}:{lineno}"
    item = Item(_field(rec, "id", where), _field(rec, "modality", where), _field(rec, "media", where))
    if item.id in seen:
      raise CorpusFormatError(f"{where}: duplicate item id {item.id!r} (first on line {seen[item.id]})")
    seen[item.id] = lineno
    _check_item(item, where, root, check_media, media_roots)
    items.append(item)
  if not items:
    raise CorpusFormatError(f"{items_path}: no items")

  texts_path = root / TEXTS_FILE
  if not texts_path.is_file():
    raise CorpusFormatError(f"{texts_path}: missing")
  texts: list[Text] = []
  for lineno, rec in read_jsonl(texts_path):
    where = f"{texts_path}:{lineno}"
    src = rec.get("source")
    if src is not None and not isinstance(src, str):
      raise CorpusFormatError(f"{where}: field 'source' must be a string, found {src!r}")
    text = Text(_field(rec, "item_id", where), _field(rec, "text", where),
                _field(rec, "split", where), _field(rec, "kind", where), src)
    check_text(text, where, seen)
    texts.append(text)

  corpus = Corpus(name, modality, items, texts, root=root, meta=meta.get("meta", {}),
                  media_roots=media_roots)
  _check_header_counts(meta, corpus, meta_path)
  return corpus


_EDITED_HINT = (" (a file edited by hand? update the header's num_items/num_texts/counts, or "
                "remove them)")


def _check_header_counts(header: Mapping, corpus: Corpus, meta_path: Path) -> None:
  """``num_items``, ``num_texts`` and ``counts`` of ``corpus.json``, when present, match the files."""
  items_path, texts_path = meta_path.parent / ITEMS_FILE, meta_path.parent / TEXTS_FILE
  for key, found, path, what in (("num_items", len(corpus.items), items_path, "items"),
                                 ("num_texts", len(corpus.all_texts), texts_path, "texts")):
    want = header.get(key)
    if want is None:
      continue
    if not isinstance(want, int) or isinstance(want, bool):
      raise CorpusFormatError(f"{meta_path}: field {key!r} must be an integer, found {want!r}")
    if want != found:
      raise CorpusFormatError(f"{meta_path}: {key} is {want} but {path} has {found} {what}"
                              f"{_EDITED_HINT}")
  counts = header.get("counts")
  if counts is None:
    return
  found = corpus.counts()
  if not isinstance(counts, dict) or not all(
      isinstance(v, dict) and all(isinstance(n, int) and not isinstance(n, bool) for n in v.values())
      for v in counts.values()):
    raise CorpusFormatError(f"{meta_path}: field 'counts' must be {{split: {{kind: integer}}}}, "
                            f"found {counts!r}")
  for split in sorted(set(counts) | set(found)):
    for kind in sorted(set(counts.get(split, {})) | set(found.get(split, {}))):
      want, have = counts.get(split, {}).get(kind, 0), found.get(split, {}).get(kind, 0)
      if want != have:
        raise CorpusFormatError(f"{meta_path}: counts[{split!r}][{kind!r}] is {want} but {texts_path} "
                                f"has {have} {split} {kind} texts{_EDITED_HINT}")


# ---------------------------------------------------------------------------------------
# Writing.

MediaWriter = Callable[[Path], None]  # called with the corpus temp dir; writes media/...


def _place_media(src: Path, dst: Path, mode: str) -> None:
  dst.parent.mkdir(parents=True, exist_ok=True)
  if mode == "copy":
    shutil.copyfile(src, dst)
  elif mode == "symlink":
    os.symlink(os.path.abspath(src), dst)
  elif mode == "hardlink":
    os.link(src, dst)
  else:
    raise CartError(f"unknown media mode {mode!r}; expected copy, symlink or hardlink")


def write_corpus(out_dir: str | os.PathLike, name: str, modality: str, items: Sequence[Item],
                 texts: Sequence[Text], *, media_sources: Mapping[str, str | os.PathLike] | None = None,
                 media_mode: str = "symlink", media_writer: MediaWriter | None = None,
                 meta: Mapping | None = None, overwrite: bool = False,
                 media_roots: Sequence[str | os.PathLike] = (), check_media: bool = True) -> Corpus:
  """Writes a corpus directory atomically and returns it (loaded back and validated).

  Args:
    out_dir: target directory; must not exist unless ``overwrite``. A symbolic link is written
      through (its target is replaced; the link stays).
    name, modality: corpus name and modality (one of ``MODALITIES``, or ``mixed`` for items of
      several modalities; each item keeps its own).
    items, texts: the records; ``item.media`` is the path inside the corpus.
    media_sources: item id -> existing file to copy/link to ``item.media``.
    media_mode: ``copy``, ``symlink`` (absolute link) or ``hardlink``.
    media_writer: alternatively a function that writes the media into the temp directory.
    meta: free-form provenance stored in ``corpus.json``.
    overwrite: replace an existing corpus directory.
    media_roots: with ``media_mode="symlink"``, the directories the links may point into (an
      importer's media root), stored as real paths in the header's ``media_roots``; the directory
      of any source outside them is added, so every link written is declared.
    check_media: validate the media files too (False: the JSON files only, e.g. a corpus whose
      media stay where its items came from).
  """
  if modality not in CORPUS_MODALITIES:
    raise CorpusFormatError(f"corpus {name!r}: bad modality {modality!r}; expected one of "
                            f"{list(CORPUS_MODALITIES)}")
  if Path(out_dir).exists() and not overwrite:
    raise OutputExistsError(f"{out_dir} already exists (pass overwrite=True / --overwrite to replace "
                            "it)")
  out = Path(os.path.realpath(out_dir))  # a symbolic link is written through: the link stays
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the corpus gets the usual permissions
  try:
    # Validate records before writing anything heavy.
    ids: dict[str, int] = {}
    for i, it in enumerate(items):
      check_item_id(it.id, f"item #{i}")
      if it.id in ids:
        raise CorpusFormatError(f"item #{i}: duplicate item id {it.id!r}")
      ids[it.id] = i
      _check_item(it, f"item #{i} ({it.id!r})", None, check_media=False)
    for i, t in enumerate(texts):
      check_text(t, f"text #{i}", ids)
    declared: list[str] = []
    if media_sources is not None:
      for it in items:
        src = media_sources.get(it.id)
        if src is None:
          raise CorpusFormatError(f"item {it.id!r}: no media source given")
        _place_media(Path(src), tmp / it.media, media_mode)
      if media_mode == "symlink":
        declared = _declared_roots(media_roots, [media_sources[it.id] for it in items])
    if media_writer is not None:
      media_writer(tmp)
    (tmp / MEDIA_DIR).mkdir(exist_ok=True)
    with open(tmp / ITEMS_FILE, "w", encoding="utf-8") as f:
      for it in items:
        f.write(json.dumps(it.to_json(), ensure_ascii=False) + "\n")
    with open(tmp / TEXTS_FILE, "w", encoding="utf-8") as f:
      for t in texts:
        f.write(json.dumps(t.to_json(), ensure_ascii=False) + "\n")
    corpus = Corpus(name, modality, items, texts)
    header = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "name": name, "modality": modality,
              "num_items": len(items), "num_texts": len(texts), "counts": corpus.counts(),
              **({"media_roots": declared} if declared else {}), "meta": dict(meta or {})}
    (tmp / CORPUS_FILE).write_text(json.dumps(header, indent=2, ensure_ascii=False) + "\n",
                                   encoding="utf-8")
    load_corpus(tmp, check_media=check_media)  # full validation before it becomes visible
    _swap_into_place(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return load_corpus(out_dir, check_media=False)


def _declared_roots(given: Sequence[str | os.PathLike], sources: Sequence[str | os.PathLike]
                    ) -> list[str]:
  """Real paths of ``given`` plus the fewest directories holding every source outside them."""
  roots = [os.path.realpath(r) for r in given]
  extra: set[str] = set()
  for src in sources:
    real = os.path.realpath(src)
    if not any(is_within(real, r) for r in roots):
      extra.add(os.path.dirname(real))
  # Drop a directory that lies under another one.
  extra_sorted = sorted(extra, key=len)
  cover: list[str] = []
  for d in extra_sorted:
    if not any(is_within(d, c) for c in cover):
      cover.append(d)
  return list(dict.fromkeys(roots)) + sorted(cover)


def _swap_into_place(tmp: Path, out: Path) -> None:
  if out.exists():
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rmdir(old)
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.replace(tmp, out)


def rewrite_texts(corpus_dir: str | os.PathLike, texts: Sequence[Text]) -> Corpus:
  """Replaces ``texts.jsonl`` (and the counts in ``corpus.json``) of an existing corpus atomically."""
  root = Path(corpus_dir)
  corpus = load_corpus(root, check_media=False)
  ids = {it.id: i for i, it in enumerate(corpus.items)}
  for i, t in enumerate(texts):
    check_text(t, f"text #{i}", ids)
  tmp_texts = root / f".{TEXTS_FILE}.tmp-{os.getpid()}"
  tmp_meta = root / f".{CORPUS_FILE}.tmp-{os.getpid()}"
  try:
    with open(tmp_texts, "w", encoding="utf-8") as f:
      for t in texts:
        f.write(json.dumps(t.to_json(), ensure_ascii=False) + "\n")
    header = json.loads((root / CORPUS_FILE).read_text(encoding="utf-8-sig"))
    header["num_texts"] = len(texts)
    header["counts"] = Corpus(corpus.name, corpus.modality, corpus.items, texts).counts()
    tmp_meta.write_text(json.dumps(header, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp_texts, root / TEXTS_FILE)
    os.replace(tmp_meta, root / CORPUS_FILE)
  finally:
    for p in (tmp_texts, tmp_meta):
      if p.exists():
        p.unlink()
  return load_corpus(root, check_media=False)


def read_item_ids(path: str | os.PathLike, corpus: Corpus) -> set[str]:
  """Item ids listed one per line in ``path`` (blank lines ignored), each an item of ``corpus``.

  Each id follows :func:`check_item_id` as written (surrounding spaces are an error, not stripped).

  Used to restrict an evaluation to some items (e.g. ``unseen_items.txt`` of
  ``cart data prepare emoji --unseen-items``). Raises CorpusFormatError naming the file and line.
  """
  path = Path(path)
  out = set()
  for lineno, item in read_id_lines(path, what="item list"):
    if not item.strip():
      continue
    check_item_id(item, f"{path}:{lineno}")
    if item not in corpus:
      raise CorpusFormatError(f"{path}:{lineno}: {item!r} is not an item of corpus {corpus.name!r}")
    out.add(item)
  if not out:
    raise CorpusFormatError(f"{path}: no item ids")
  return out


def find_leaks(corpus: Corpus) -> list[tuple[Text, Text]]:
  """(held-out text, training text) pairs whose normalised texts are equal.

  A held-out text is any ``val``/``test`` text; a training text is any ``train`` text of any
  item or kind. An honest corpus returns ``[]``.
  """
  train = {}
  for t in corpus.all_texts:
    if t.split == "train":
      train.setdefault(normalize_text(t.text), t)
  return [(t, train[normalize_text(t.text)]) for t in corpus.all_texts
          if t.split != "train" and normalize_text(t.text) in train]
