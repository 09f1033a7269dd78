"""Corpus format: round trip, validation errors naming file:line, atomic writes, captions, CLI."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cart_jax.data import captions as captions_lib
from cart_jax.data.corpus import (CorpusFormatError, Item, Text, find_leaks, load_corpus,
                                  normalize_text, write_corpus)

from helpers import data_cli as _cli


def _media(tmp_path, n):
  src = tmp_path / "src"
  src.mkdir(exist_ok=True)
  for i in range(n):
    (src / f"m{i}.png").write_bytes(b"\x89PNG fake " + bytes([i]))
  return {f"i{i}": src / f"m{i}.png" for i in range(n)}


def _small(tmp_path, name="c"):
  items = [Item(f"i{i}", "image", f"media/i{i}.png") for i in range(3)]
  texts = [Text("i0", "a red ball", "train", "query"), Text("i0", "red ball", "test", "query"),
           Text("i1", "a blue cube", "train", "query"), Text("i1", "blue cube", "val", "query"),
           Text("i2", "green cone", "test", "query"),
           Text("i2", "a green cone on a table", "train", "caption", "captioner")]
  return write_corpus(tmp_path / name, "toy", "image", items, texts,
                      media_sources=_media(tmp_path, 3), media_mode="copy")


def test_round_trip_counts_and_helpers(tmp_path):
  c = _small(tmp_path)
  c2 = load_corpus(tmp_path / "c")
  assert c2.item_ids == ["i0", "i1", "i2"]
  assert c2.counts() == {"train": {"query": 2, "caption": 1}, "val": {"query": 1, "caption": 0},
                         "test": {"query": 2, "caption": 0}}
  texts, rows = c2.pairs(split="test", kind="query")
  assert texts == ["red ball", "green cone"] and rows.tolist() == [0, 2]
  assert [t.text for t in c2.texts(kind="caption")] == ["a green cone on a table"]
  assert c2.texts(kind="caption")[0].source == "captioner"
  assert c2.media_path("i1").read_bytes() == b"\x89PNG fake \x01"
  meta = json.loads((tmp_path / "c" / "corpus.json").read_text())
  assert meta["format"] == "cart-corpus" and meta["num_items"] == 3 and meta["num_texts"] == 6
  assert c.summary()["num_texts"] == 6
  assert not find_leaks(c2)
  with pytest.raises(ValueError, match="unknown split"):
    c2.texts(split="dev")


def _corrupt(tmp_path, fname, lineno, new):
  _small(tmp_path)
  p = tmp_path / "c" / fname
  lines = p.read_text().splitlines()
  lines[lineno - 1] = new
  p.write_text("\n".join(lines) + "\n")
  return p


@pytest.mark.parametrize("fname,lineno,record,msg", [
    ("texts.jsonl", 3, {"item_id": "nope", "text": "x", "split": "train", "kind": "query"},
     "unknown item id 'nope'"),
    ("texts.jsonl", 2, {"item_id": "i0", "text": "  ", "split": "train", "kind": "query"},
     "empty text"),
    ("texts.jsonl", 4, {"item_id": "i1", "text": "x", "split": "dev", "kind": "query"},
     "bad split 'dev'"),
    ("texts.jsonl", 5, {"item_id": "i1", "text": "x", "split": "test", "kind": "title"},
     "bad kind 'title'"),
    ("texts.jsonl", 1, {"item_id": "i1", "split": "test", "kind": "query"}, "missing field 'text'"),
    ("items.jsonl", 3, {"id": "i0", "modality": "image", "media": "media/i0.png"},
     "duplicate item id 'i0' \\(first on line 1\\)"),
    ("items.jsonl", 2, {"id": "i1", "modality": "image", "media": "media/gone.png"},
     "media file 'media/gone.png' of item 'i1' not found"),
    ("items.jsonl", 2, {"id": "i1", "modality": "smell", "media": "media/i1.png"},
     "bad modality 'smell'"),
    ("items.jsonl", 2, {"id": "i1", "modality": "image", "media": "../i1.png"},
     "media path '../i1.png' must be relative and inside the corpus"),
])
def test_validation_errors_name_file_and_line(tmp_path, fname, lineno, record, msg):
  p = _corrupt(tmp_path, fname, lineno, json.dumps(record))
  with pytest.raises(CorpusFormatError, match=f"{p}:{lineno}: {msg}"):
    load_corpus(tmp_path / "c")


def test_bad_json_line_and_missing_files(tmp_path):
  p = _corrupt(tmp_path, "texts.jsonl", 2, "{not json")
  with pytest.raises(CorpusFormatError, match=f"{p}:2: not valid JSON"):
    load_corpus(tmp_path / "c")
  (tmp_path / "c" / "items.jsonl").unlink()
  with pytest.raises(CorpusFormatError, match="items.jsonl: missing"):
    load_corpus(tmp_path / "c")
  with pytest.raises(CorpusFormatError, match="not a directory"):
    load_corpus(tmp_path / "nowhere")


def test_write_is_atomic_and_refuses_to_clobber(tmp_path):
  _small(tmp_path)
  with pytest.raises(FileExistsError):
    _small(tmp_path)
  # A failing write (a media source missing) leaves neither the target nor a temp dir.
  items = [Item("a", "image", "media/a.png")]
  with pytest.raises(FileNotFoundError):
    write_corpus(tmp_path / "bad", "x", "image", items, [Text("a", "t")],
                 media_sources={"a": tmp_path / "missing.png"}, media_mode="copy")
  with pytest.raises(CorpusFormatError, match="text #0: unknown item id 'b'"):
    write_corpus(tmp_path / "bad", "x", "image", items, [Text("b", "t")],
                 media_sources={"a": tmp_path / "src" / "m0.png"})
  assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "src"]
  # overwrite=True replaces the corpus in one rename.
  c = write_corpus(tmp_path / "c", "x", "image", items, [Text("a", "only")],
                   media_sources={"a": tmp_path / "src" / "m0.png"}, overwrite=True)
  assert load_corpus(tmp_path / "c").item_ids == ["a"] and len(c.all_texts) == 1
  assert os.path.islink(tmp_path / "c" / "media" / "a.png")  # default media mode: symlink
  assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "src"]


def test_normalize_and_leaks(tmp_path):
  assert normalize_text("Flag: Germany") == normalize_text("flag_germany") == "flag germany"
  assert normalize_text("thumbs-up") == "thumbs up" and normalize_text("+1") == "+1"
  items = [Item("a", "image", "media/a.png"), Item("b", "image", "media/b.png")]
  texts = [Text("a", "Red Ball", "test"), Text("b", "red_ball", "train", "caption")]
  c = write_corpus(tmp_path / "l", "l", "image", items, texts,
                   media_sources={"a": _media(tmp_path, 1)["i0"], "b": _media(tmp_path, 1)["i0"]})
  leaks = find_leaks(c)
  assert len(leaks) == 1 and leaks[0][0].text == "Red Ball" and leaks[0][1].item_id == "b"


def test_add_captions_and_caption_texts(tmp_path):
  _small(tmp_path)
  cap = tmp_path / "caps.jsonl"
  cap.write_text("\n".join(json.dumps(r) for r in [
      {"item_id": "i0", "text": "a small red ball"},
      {"item_id": "i1", "text": "Blue cube"},           # equals a val query -> dropped (leak)
      {"item_id": "i0", "text": "a small  red ball"},   # duplicate after normalisation
      {"item_id": "i1", "text": "a cube, blue", "source": "blip2"},
  ]) + "\n")
  from_file = captions_lib.caption_texts(load_corpus(tmp_path / "c"), cap)
  assert [t.text for t in from_file] == ["a small red ball", "a cube, blue"]  # leak + dup dropped
  corpus, stats = captions_lib.add_captions(tmp_path / "c", cap)
  assert stats == {"added": 2, "dropped_leak": 1, "dropped_duplicate": 1, "removed": 0}
  assert corpus.counts()["train"]["caption"] == 3
  assert {t.source for t in corpus.texts(kind="caption")} == {"captioner", "blip2"}
  corpus, stats = captions_lib.add_captions(tmp_path / "c", cap, replace=True)
  assert stats["removed"] == 3 and corpus.counts()["train"]["caption"] == 2
  assert json.loads((tmp_path / "c" / "corpus.json").read_text())["counts"]["train"]["caption"] == 2
  assert [t.text for t in captions_lib.caption_texts(corpus)] == ["a small red ball", "a cube, blue"]
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"item_id": "i0", "text": "ok"}\n{"item_id": "zz", "text": "x"}\n')
  with pytest.raises(CorpusFormatError, match=f"{bad}:2: unknown item id 'zz'"):
    captions_lib.add_captions(tmp_path / "c", bad)
  bad.write_text('{"item_id": "i0"}\n')
  with pytest.raises(CorpusFormatError, match=f"{bad}:1: field 'text' missing"):
    captions_lib.add_captions(tmp_path / "c", bad)


def test_cli_info_and_add_captions(tmp_path, capsys):
  from PIL import Image
  from cart_jax.core.errors import CartError
  for it in _small(tmp_path).items:  # info decodes every image: real ones
    Image.new("RGB", (4, 4)).save(tmp_path / "c" / it.media)
  assert _cli(["info", str(tmp_path / "c"), "--json", str(tmp_path / "s.json")]) == 0
  summary = json.loads((tmp_path / "s.json").read_text())
  assert summary["num_items"] == 3 and summary["leaks"] == 0
  cap = tmp_path / "caps.jsonl"
  cap.write_text('{"item_id": "i2", "text": "a cone"}\n')
  assert _cli(["add-captions", "--corpus", str(tmp_path / "c"), "--captions", str(cap)]) == 0
  assert load_corpus(tmp_path / "c").counts()["train"]["caption"] == 2
  # texts.jsonl rewritten by hand below: drop the header's counts (checked against the file when present)
  header = json.loads((tmp_path / "c" / "corpus.json").read_text())
  header.pop("num_texts", None)
  header.pop("counts", None)
  (tmp_path / "c" / "corpus.json").write_text(json.dumps(header))
  (tmp_path / "c" / "texts.jsonl").write_text(
      '{"item_id": "i0", "text": "x", "split": "test", "kind": "query"}\n'
      '{"item_id": "i1", "text": "X", "split": "train", "kind": "query"}\n')
  assert _cli(["info", str(tmp_path / "c")]) == 1  # a leak -> non-zero exit
  (tmp_path / "c" / "texts.jsonl").write_text('{"item_id": "i9", "text": "x", "split": "test", '
                                               '"kind": "query"}\n')
  with pytest.raises(CartError, match="texts.jsonl:1: unknown item id 'i9'"):
    _cli(["info", str(tmp_path / "c")])


def test_data_package_imports_without_tensorflow():
  code = ("import sys; import cart_jax.data.corpus, cart_jax.data.importers, "
          "cart_jax.data.captions, cart_jax.data.datasets.emoji, cart_jax.cli.commands.data; "
          "bad = [m for m in ('tensorflow', 'seqio', 'jax', 'tensorflow_datasets') if m in sys.modules]; "
          "print(bad); sys.exit(1 if bad else 0)")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                     cwd=Path(__file__).resolve().parents[1])
  assert r.returncode == 0, r.stdout + r.stderr


def test_cli_info_decodes_every_image(tmp_path, capsys):
  """Issue 28, minor. Before: `data info` only checked that media files exist, so an image over
  the pixel limit (or not an image at all) passed it and failed later, in `cart embed`."""
  from PIL import Image
  from cart_jax.media import MediaError
  from cart_jax.media.image import MAX_IMAGE_PIXELS
  c = _small(tmp_path)
  for it in c.items:
    Image.new("RGB", (8, 8), (0, 0, 0)).save(c.media_path(it))
  assert _cli(["info", str(c.root), "--json", str(tmp_path / "s.json")]) == 0
  assert json.loads((tmp_path / "s.json").read_text())["images_decoded"] == 3
  big = c.media_path("i1")
  Image.new("1", (12000, 12000), 0).save(big)
  with pytest.raises(MediaError, match=f"{big}: image too large: 12000 x 12000 "
                                       rf"\(limit {MAX_IMAGE_PIXELS} pixels\)"):
    _cli(["info", str(c.root)])
  big.write_bytes(b"\x89PNG not an image")
  with pytest.raises(MediaError, match=f"{big}: cannot read image"):
    _cli(["info", str(c.root)])
