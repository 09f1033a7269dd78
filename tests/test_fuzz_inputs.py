"""Fuzzing the inputs (issue 19, Deliver 8): generated corrupt corpora, embeddings and ids files.

Every generated input is broken on purpose (a bad JSON line, a wrong type, a bad id, bytes that
are not UTF-8, NaN/inf/huge values, a wrong shape or dtype, a damaged .npy, ids that do not
round-trip). Each goes through the console entry as a user would give it, and must give exit 2
with one line naming the broken file (and its line where it has lines), never a traceback, and
write nothing to the output path. Small ``max_examples`` keep the file to a few seconds.
"""
import io
import json
import shutil
import tempfile
from contextlib import redirect_stderr
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cart_jax.cli import main as cli

N = 6
SETTINGS = settings(max_examples=30, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


def run_cli(argv) -> tuple[int, str]:
  err = io.StringIO()
  with redirect_stderr(err):
    try:
      rc = cli.main([str(a) for a in argv])
    except SystemExit as e:
      rc = e.code
  out = err.getvalue()
  lines = out.strip().splitlines()
  return rc, out, (lines[-1] if lines else "")


def assert_named_error(argv, artefact: Path | str, command: str):
  rc, out, line = run_cli(argv)
  assert rc == 2, out
  assert "Traceback" not in out
  assert line.startswith(f"cart {command}: error: "), line
  assert str(artefact) in line, (str(artefact), line)
  return line


def assert_nothing_written(out: Path):
  """No file under ``out`` (the output path, or a directory holding it): no artefact, no lock,
  no temporary. (An empty directory may be left: ``cart build-ids`` creates --out's parent to
  hold its lock.)"""
  assert not [p for p in out.rglob("*") if not p.is_dir()] if out.is_dir() else not out.exists()


@pytest.fixture(scope="module")
def workdir():
  d = Path(tempfile.mkdtemp(prefix="cart-fuzz-"))
  yield d
  shutil.rmtree(d, ignore_errors=True)


def _good_records():
  items = [{"id": f"i{i}", "modality": "image", "media": f"media/m{i}.png"} for i in range(N)]
  texts = [{"item_id": f"i{i}", "text": f"thing {i}", "split": s, "kind": "query"}
           for i in range(N) for s in ("train", "test")]
  header = {"format": "cart-corpus", "version": 1, "name": "toy", "modality": "image",
            "num_items": N, "num_texts": len(texts), "meta": {}}
  return items, texts, header


def _write(d: Path, items, texts, header, items_raw=None, texts_raw=None):
  if d.exists():
    shutil.rmtree(d)
  (d / "media").mkdir(parents=True)
  for i in range(N):
    (d / "media" / f"m{i}.png").write_bytes(b"png")  # never decoded: check_media only stats
  (d / "items.jsonl").write_bytes(items_raw if items_raw is not None else "".join(
      json.dumps(r) + "\n" for r in items).encode())
  (d / "texts.jsonl").write_bytes(texts_raw if texts_raw is not None else "".join(
      json.dumps(r) + "\n" for r in texts).encode())
  (d / "corpus.json").write_text(json.dumps(header))


# ---------------------------------------------------------------- corrupt corpora

BAD_IDS = st.one_of(
    st.just(""),
    st.text(min_size=1, max_size=4).map(lambda s: f" {s}"),  # leading whitespace
    st.text(min_size=1, max_size=4).map(lambda s: f"{s}\t"),
    st.tuples(st.text(max_size=3), st.sampled_from("\n\r\u2028\u2029\x85\x0b\x0c\x1c"),
              st.text(max_size=3)).map("".join),
    st.tuples(st.text(alphabet="abc", max_size=3), st.sampled_from("\x00\x07\x1b\u200b\u202e\ufeff\ud800"),
              st.text(alphabet="abc", max_size=3)).map("".join),
)
JSON_NON_STRINGS = st.one_of(st.none(), st.integers(), st.floats(allow_nan=False), st.booleans(),
                             st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2),
                                                                                  st.integers(), max_size=2))


@st.composite
def corrupt_line(draw, kind: str):
  """(raw bytes of a broken line, what its error names)."""
  what = draw(st.sampled_from(["json", "not-object", "wrong-type", "missing", "bad-id", "utf8"] +
                              (["bad-media"] if kind == "items" else [])))
  field = "id" if kind == "items" else draw(st.sampled_from(["item_id", "text", "split", "kind"]))
  good = ({"id": "zz", "modality": "image", "media": "media/m0.png"} if kind == "items" else
          {"item_id": "i0", "text": "a thing", "split": "train", "kind": "query"})
  if what == "json":
    text = json.dumps(good)
    cut = draw(st.integers(1, len(text) - 1))
    return (text[:cut] + draw(st.sampled_from(["", ",", "}}", "\x01", "'"]))).encode()
  if what == "not-object":
    return json.dumps(draw(st.one_of(st.integers(), st.lists(st.integers(), max_size=2),
                                     st.text(max_size=3), st.none()))).encode()
  if what == "wrong-type":
    return json.dumps(dict(good, **{field: draw(JSON_NON_STRINGS)})).encode()
  if what == "missing":
    return json.dumps({k: v for k, v in good.items() if k != field}).encode()
  if what == "bad-media":
    media = draw(st.sampled_from(["", "/etc/passwd", "../x.png", "media/\x00.png",
                                  "media/../../x.png", 3, None]))
    return json.dumps(dict(good, media=media)).encode()
  if what == "bad-id":
    key = "id" if kind == "items" else "item_id"
    return json.dumps(dict(good, **{key: draw(BAD_IDS)})).encode()
  prefix = json.dumps(good)[:draw(st.integers(1, 10))].encode()
  return prefix + draw(st.sampled_from([b"\xff", b"\xc3(", b"\xe2\x82", b"\xed\xa0\x80", b"\x80"]))


@SETTINGS
@given(kind=st.sampled_from(["items", "texts"]), data=st.data())
def test_corrupt_corpus_lines_name_file_and_line(workdir, kind, data):
  items, texts, header = _good_records()
  records = items if kind == "items" else texts
  line = data.draw(corrupt_line(kind))
  pos = data.draw(st.integers(0, len(records) - 1))
  raw = [json.dumps(r).encode() for r in records]
  raw.insert(pos, line)
  blob = b"\n".join(raw) + b"\n"
  d = workdir / "corpus"
  _write(d, items, texts, header, **{f"{kind}_raw": blob})
  path = d / f"{kind}.jsonl"
  # The broken line is the first error unless a line of the file before it is broken too.
  msg = assert_named_error(["data", "info", d], path, "data")
  assert f"{path}:{pos + 1}:" in msg, msg
  emb = workdir / "out.npy"
  assert_named_error(["embed", "--corpus", d, "--out", emb, "--encoder", "precomputed",
                      "--precomputed", workdir / "unused.npy"], path, "embed")
  assert not emb.exists()


@st.composite
def corrupt_header(draw):
  """Bytes of a ``corpus.json`` that must be refused."""
  items, texts, header = _good_records()
  not_int = st.one_of(st.none(), st.text(max_size=2), st.floats(allow_nan=False),
                      st.booleans(), st.lists(st.integers(), max_size=1))
  change = draw(st.sampled_from(["format", "version", "name", "modality", "num_items",
                                 "num_texts", "counts", "media_roots", "meta", "truncated",
                                 "utf16", "not-object", "not-utf8"]))
  if change == "truncated":
    text = json.dumps(header)
    return text[:draw(st.integers(0, len(text) - 1))].encode()
  if change == "utf16":
    return json.dumps(header).encode("utf-16")
  if change == "not-utf8":
    return json.dumps(header).encode().replace(b'"toy"', b'"t\xffy"')
  if change == "not-object":
    return json.dumps(draw(st.one_of(st.lists(st.integers(), max_size=2), st.integers(),
                                     st.text(max_size=3)))).encode()
  bad = {
      "format": st.one_of(st.text(max_size=5).filter(lambda v: v != "cart-corpus"), not_int),
      "version": st.one_of(st.integers().filter(lambda v: v != 1), not_int),
      "name": st.one_of(st.just(""), st.integers(), st.none(), st.lists(st.text(), max_size=1)),
      "modality": st.one_of(st.text(max_size=6).filter(
          lambda v: v not in ("image", "audio", "video", "mixed")), not_int),
      "num_items": st.one_of(st.integers().filter(lambda v: v != N), not_int.filter(
          lambda v: v is not None)),
      "num_texts": st.one_of(st.integers().filter(lambda v: v != 2 * N), not_int.filter(
          lambda v: v is not None)),
      "counts": st.one_of(st.just({"test": {"query": 99}}), st.just({"train": 3}),
                          st.just({"train": {"query": "6"}}), st.integers(), st.text(max_size=2)),
      "media_roots": st.one_of(st.just("/data"), st.just([""]), st.just([3]), st.just(["/"]),
                               st.just(["x\x00"]), st.just(["/.."]), st.integers()),
      "meta": st.one_of(st.integers(), st.text(max_size=2), st.lists(st.integers(), max_size=1)),
  }[change]
  header[change] = draw(bad)
  return json.dumps(header).encode()


@SETTINGS
@given(blob=corrupt_header())
def test_corrupt_corpus_header_names_corpus_json(workdir, blob):
  d = workdir / "corpus"
  _write(d, *_good_records())
  (d / "corpus.json").write_bytes(blob)
  assert_named_error(["data", "info", d], d / "corpus.json", "data")


# ---------------------------------------------------------------- corrupt embeddings

BAD_VALUES = st.sampled_from([np.nan, np.inf, -np.inf, 1e13, -4e20, 1e30, 1e300, -1e300])


@st.composite
def bad_embeddings(draw):
  """(array that must be refused, what the message says)."""
  what = draw(st.sampled_from(["value", "shape", "dtype", "empty"]))
  if what == "value":
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    arr = draw(hnp.arrays(dtype, (draw(st.integers(1, 9)), draw(st.integers(1, 5))),
                          elements=st.floats(-10, 10, width=32)))
    value = draw(BAD_VALUES)
    if dtype == np.float32 and abs(value) > 3e38:
      value = np.float32(np.inf) * np.sign(value)
    r, c = draw(st.integers(0, arr.shape[0] - 1)), draw(st.integers(0, arr.shape[1] - 1))
    arr[r, c] = value
    return arr, f"row {r}, column {c}"
  if what == "shape":
    shape = draw(st.sampled_from([(), (5,), (2, 3, 4), (1, 1, 1, 1)]))
    return np.ones(shape, np.float32), "expected a rank-2 array"
  if what == "dtype":
    dtype = draw(st.sampled_from([np.int32, np.int64, np.uint8, np.bool_, np.complex64, "U3"]))
    return np.ones((4, 3)).astype(dtype), "expected a floating dtype"
  return np.ones(draw(st.sampled_from([(0, 4), (4, 0)])), np.float32), "empty array"


@SETTINGS
@given(case=bad_embeddings(), command=st.sampled_from(["build-ids", "embed", "baseline"]))
def test_bad_embeddings_are_refused_by_every_command(workdir, case, command):
  arr, message = case
  corpus = workdir / "good-corpus"
  if not corpus.exists():
    _write(corpus, *_good_records())
  e = workdir / "bad.npy"
  np.save(e, arr)
  n = arr.shape[0] if arr.ndim >= 1 else 1
  e.with_suffix(".ids.txt").write_text("".join(f"i{i}\n" for i in range(n)))
  out = workdir / "out"
  shutil.rmtree(out, ignore_errors=True)
  argv = {"build-ids": ["build-ids", "--embeddings", e, "--out", out / "ix", "--clusters", "2",
                        "--quiet"],
          "embed": ["embed", "--corpus", corpus, "--out", out / "E.npy", "--encoder",
                    "precomputed", "--precomputed", e, "--quiet"],
          "baseline": ["baseline", "--corpus", corpus, "--embeddings", e, "--quiet", "--json",
                       out / "b.json"]}[command]
  line = assert_named_error(argv, e, command)
  assert message in line, line
  assert_nothing_written(out)


@SETTINGS
@given(damage=st.sampled_from(["truncate", "garbage", "header", "npz-as-npy", "zip-garbage"]),
       cut=st.integers(0, 100))
def test_damaged_npy_files_name_the_file(workdir, damage, cut):
  e = workdir / "damaged.npy"
  good = np.ones((6, 4), np.float32)
  np.save(e, good)
  blob = e.read_bytes()
  if damage == "truncate":
    e.write_bytes(blob[:min(cut, len(blob) - 1)])
  elif damage == "garbage":
    e.write_bytes(bytes((cut * 37 + i * 11) % 256 for i in range(cut + 1)))
  elif damage == "header":  # a header that promises more rows than the file holds
    with open(e, "wb") as f:
      np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False,
                                               "shape": (99 + cut, 4)})
      f.write(good.tobytes())
  elif damage == "npz-as-npy":
    np.savez(workdir / "z.npz", embeddings=good)
    e.write_bytes((workdir / "z.npz").read_bytes())
  else:
    np.savez_compressed(workdir / "z.npz", embeddings=good)
    z = bytearray((workdir / "z.npz").read_bytes())
    # Flip one byte of the compressed data of the first member (after its local header).
    start = 30 + int.from_bytes(z[26:28], "little") + int.from_bytes(z[28:30], "little")
    size = int.from_bytes(z[18:22], "little")
    z[start + cut % size if size not in (0, 0xFFFFFFFF) else start + cut % 16] ^= 0xFF
    e = workdir / "damaged.npz"
    e.write_bytes(bytes(z))
  out = workdir / "ix"
  shutil.rmtree(out, ignore_errors=True)
  assert_named_error(["build-ids", "--embeddings", e, "--out", out, "--clusters", "2"], e,
                     "build-ids")
  assert_nothing_written(out)


# ---------------------------------------------------------------- ids files


@st.composite
def bad_ids_file(draw):
  """(bytes of an ids file for N rows that must be refused, its first bad line or None)."""
  ids = [f"i{i}" for i in range(N)]
  what = draw(st.sampled_from(["bad-id", "duplicate", "count", "utf8"]))
  if what == "bad-id":
    pos = draw(st.integers(0, N - 1))
    # (not "\n", which makes two lines; not a final "\r", which makes a CRLF line end)
    ids[pos] = draw(BAD_IDS.filter(lambda s: "\n" not in s and "\ud800" not in s
                                   and not s.endswith("\r")))
    lines = [i.encode("utf-8") for i in ids]
    bad = pos + 1
    if ids[pos] == "" and pos == N - 1:  # a blank last line is the file's final newline
      lines, bad = lines[:-1], None
  elif what == "duplicate":
    pos = draw(st.integers(1, N - 1))
    ids[pos] = ids[draw(st.integers(0, pos - 1))]
    lines, bad = [i.encode() for i in ids], pos + 1
  elif what == "count":
    lines = [i.encode() for i in ids[:draw(st.integers(1, N - 1))]]
    lines += [] if draw(st.booleans()) else [f"x{i}".encode() for i in range(N + 1 - len(lines))]
    bad = None
  else:
    pos = draw(st.integers(0, N - 1))
    lines = [i.encode() for i in ids]
    lines[pos] += draw(st.sampled_from([b"\xff", b"\xc0\xaf", b"\xe2\x28\xa1"]))
    bad = pos + 1
  ending = draw(st.sampled_from([b"\n", b"\r\n"]))
  bom = b"\xef\xbb\xbf" if draw(st.booleans()) else b""
  return bom + ending.join(lines) + ending, bad


@SETTINGS
@given(case=bad_ids_file(), command=st.sampled_from(["build-ids", "embed"]))
def test_bad_ids_files_name_file_and_line(workdir, case, command):
  blob, bad_line = case
  ids = workdir / "ids.txt"
  ids.write_bytes(blob)
  e = workdir / "good.npy"
  if not e.exists():
    np.save(e, np.random.default_rng(0).normal(size=(N, 4)).astype(np.float32))
  corpus = workdir / "good-corpus"
  if not corpus.exists():
    _write(corpus, *_good_records())
  out = workdir / "out"
  shutil.rmtree(out, ignore_errors=True)
  argv = (["build-ids", "--embeddings", e, "--item-ids", ids, "--out", out, "--clusters", "2"]
          if command == "build-ids" else
          ["embed", "--corpus", corpus, "--out", out / "E.npy", "--encoder", "precomputed",
           "--precomputed", e, "--item-ids", ids])
  line = assert_named_error(argv, ids, command)
  if bad_line is not None:
    assert f"{ids}:{bad_line}:" in line, line
  assert_nothing_written(out)
