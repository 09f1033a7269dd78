"""``cart export`` (issue 18 item 5): the exported search program gives ``cart search``'s results,
and its loader needs neither Flax nor any other part of cart-jax.

The session's tiny trained run (the ``tiny_run`` fixture, tests/tiny_runs.py) is exported once
for the module through the real console entry point.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

from cart_jax import api
from cart_jax.cli.main import main
from cart_jax.core.errors import CartError
from cart_jax.inference import exported as fmt
from cart_jax.inference.exported import ExportError, load_exported

from tiny_runs import TEST_QUERIES

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_run):
  root = tmp_path_factory.mktemp("export")
  run = tiny_run
  out = root / "search.cart-export"
  assert main(["export", "--model-dir", str(run), "--out", str(out), "--batch-size", "3", "-k", "8",
               "--json", str(root / "export.json"), "--quiet"]) == 0
  return root, run, out, json.loads((root / "export.json").read_text())


def _assert_same(got: list[dict], ref: list[dict], k: int) -> None:
  """Same items, identifiers and scores (1e-5), rank by rank; items whose scores tie within 1e-5
  may swap places."""
  assert [q["query"] for q in got] == [q["query"] for q in ref]
  for g, r in zip(got, ref):
    assert len(g["results"]) == len(r["results"]) == k
    gs = np.array([d["score"] for d in g["results"]])
    rs = np.array([d["score"] for d in r["results"]])
    np.testing.assert_allclose(gs, rs, rtol=0, atol=1e-5)
    for a, b in zip(g["results"], r["results"]):
      assert a["rank"] == b["rank"]
      if a["item_id"] != b["item_id"]:  # only a tie may reorder
        assert np.sum(np.abs(rs - b["score"]) <= 1e-5) > 1, (a, b)
      else:
        assert a["identifier"] == b["identifier"]


def test_export_writes_a_verified_directory(world):
  root, run, out, summary = world
  manifest = json.loads((out / fmt.MANIFEST).read_text())
  assert manifest["format"] == fmt.FORMAT and manifest["version"] == fmt.VERSION
  assert (manifest["batch_size"], manifest["n_results"], manifest["input_length"]) == (3, 8, 16)
  assert manifest["beam_size"] == 10 and manifest["n_items"] == 24 and manifest["platforms"] == ["cpu"]
  assert sorted(os.listdir(out)) == sorted([*fmt.FILES, fmt.MANIFEST, fmt.MANIFEST_HASH])  # no temporaries
  assert not [p for p in os.listdir(root) if p.startswith(".search.cart-export")]
  assert summary["program_bytes"] == (out / fmt.PROGRAM).stat().st_size > 1000
  codes = np.load(out / fmt.INDEX)["codes"]
  from cart_jax.index.identifiers import load_index
  index = load_index(run / "index")
  np.testing.assert_array_equal(codes, index.codes)
  assert json.loads((out / fmt.ITEMS).read_text())["item_ids"] == index.item_ids


def test_round_trip_gives_cart_search_results(world, capsys):
  _, run, out, _ = world
  s = load_exported(out)
  queries = TEST_QUERIES[:7]  # 7 queries: two full batches of 3 and one padded
  got = s.search(queries, k=8)
  ref = api.search(run, queries, k=8)
  _assert_same(got, ref, 8)
  assert not np.allclose([d["score"] for d in got[0]["results"]],
                         [d["score"] for d in got[1]["results"]])  # the queries matter
  # fewer results than exported: the first k of the same beams, as `cart search -k 4` prints them
  capsys.readouterr()
  assert main(["search", "--model-dir", str(run), *queries[:2], "-k", "4", "--json", "-", "--quiet"]) == 0
  cli = json.loads(capsys.readouterr().out)["queries"]
  _assert_same(s.search(queries[:2], k=4), cli, 4)
  # token ids in, rows out: one query alone gives its row of the batch
  rows, scores = s.search_ids(s.encode(queries))
  rows1, scores1 = s.search_ids(s.encode(queries[4:5]))
  np.testing.assert_allclose(scores1[0], scores[4], atol=1e-5)


def test_loader_needs_only_jax_and_numpy(world, tmp_path):
  """The loader file copied alone, cart_jax made unimportable: same results, Flax never imported."""
  _, _, out, _ = world
  shutil.copy(REPO / "cart_jax" / "inference" / "exported.py", tmp_path / "exported.py")
  script = f"""
import json, sys
sys.modules["cart_jax"] = None  # any import of cart-jax fails
sys.path.insert(0, {str(tmp_path)!r})
from exported import load_exported, ExportError
s = load_exported({str(out)!r})
res = s.search({TEST_QUERIES[:4]!r}, k=5)
heavy = ("flax", "cart_jax", "cart_seqio", "tensorflow", "optax", "orbax")
bad = [m for m, v in sys.modules.items() if v is not None and m.split(".")[0] in heavy]
import contextlib, io, exported
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
  rc = exported.main([{str(out)!r}, "smiling cat", "-k", "2"])  # python exported.py DIR QUERY -k 2
print(json.dumps({{"results": res, "bad": bad, "jax": "jax" in sys.modules,
                   "error_base": ExportError.__mro__[1].__name__, "rc": rc,
                   "printed": json.loads(buf.getvalue())}}))
"""
  env = dict(os.environ, PYTHONPATH="")
  proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  doc = json.loads(proc.stdout.strip().splitlines()[-1])
  assert doc["bad"] == [] and doc["jax"] and doc["error_base"] == "ValueError"
  _assert_same(doc["results"], load_exported(out).search(TEST_QUERIES[:4], k=5), 5)
  assert doc["rc"] == 0 and doc["printed"] == load_exported(out).search(["smiling cat"], k=2)


def test_bad_inputs_are_named_errors(world, tmp_path, capsys):
  root, run, out, _ = world
  # the command: missing run, bad batch size, existing --out
  capsys.readouterr()
  assert main(["export", "--model-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
  assert "no such directory" in capsys.readouterr().err and not (tmp_path / "x").exists()
  with pytest.raises(SystemExit) as e:
    main(["export", "--model-dir", str(run), "--out", str(tmp_path / "x"), "--batch-size", "0"])
  assert e.value.code == 2 and "--batch-size" in capsys.readouterr().err
  assert main(["export", "--model-dir", str(run), "--out", str(out)]) == 2
  assert "already exists" in capsys.readouterr().err
  with pytest.raises(CartError, match="--platforms: unknown platform 'gpu2'"):
    api.export(run, tmp_path / "x", platforms=["gpu2"])
  assert not (tmp_path / "x").exists()
  # the loader
  with pytest.raises(ExportError, match="no such export directory"):
    load_exported(tmp_path / "missing")
  assert issubclass(ExportError, CartError)
  s = load_exported(out)
  with pytest.raises(ExportError, match=r"expected shape \[n, 16\].*found \[2, 12\]"):
    s.search_ids(np.zeros((2, 12), np.int32))
  with pytest.raises(ExportError, match="at most n_results=8"):
    s.search(["cat"], k=9)
  with pytest.raises(ExportError, match="query 2 of 2 is empty"):
    s.search(["cat", "  "], k=3)
  # an altered file, a manifest whose batch size is not the program's, another format version
  bad = tmp_path / "bad"
  shutil.copytree(out, bad)
  data = bytearray((bad / fmt.ARGUMENTS).read_bytes())
  data[-100] ^= 0xFF
  (bad / fmt.ARGUMENTS).write_bytes(bytes(data))
  with pytest.raises(ExportError, match="arguments.npz: sha256 differs"):
    load_exported(bad)
  shutil.copy(out / fmt.ARGUMENTS, bad / fmt.ARGUMENTS)
  manifest = json.loads((out / fmt.MANIFEST).read_text())
  (bad / fmt.MANIFEST).write_text(json.dumps(dict(manifest, batch_size=4)))
  with pytest.raises(ExportError, match="manifest.json: content does not match manifest.sha256"):
    load_exported(bad)
  with pytest.raises(ExportError, match="batch_size"):  # unverified: the value is checked too
    load_exported(bad, verify=False)
  (bad / fmt.MANIFEST).write_text(json.dumps(dict(manifest, version=99)))
  with pytest.raises(ExportError, match="version 99"):
    load_exported(bad, verify=False)


def test_the_manifest_is_hashed_and_its_values_checked(world, tmp_path, capsys):
  """Issue 28, case 5. Before: an edited tokenizer id changed the results silently, and an edited
  n_results gave a raw ValueError traceback (a broadcast in search_ids)."""
  _, _, out, _ = world
  assert (out / fmt.MANIFEST_HASH).read_text() == (
      f"{fmt._sha256(out / fmt.MANIFEST)}  {fmt.MANIFEST}\n")
  assert json.loads((out / fmt.MANIFEST).read_text())["integrity"] == fmt.MANIFEST_HASH
  manifest = json.loads((out / fmt.MANIFEST).read_text())
  bad = tmp_path / "bad"
  shutil.copytree(out, bad)
  edits = {"cls_id": dict(manifest, tokenizer=dict(manifest["tokenizer"], cls_id=1000)),
           "n_results": dict(manifest, n_results=5)}
  for name, edited in edits.items():
    (bad / fmt.MANIFEST).write_text(json.dumps(edited, indent=2) + "\n")
    with pytest.raises(ExportError, match=r"manifest.json: content does not match manifest.sha256"):
      load_exported(bad)
    rc, line = main_exported([str(bad), "smiling cat"], capsys)  # python exported.py: exit 2
    assert rc == 2 and line.startswith(f"error: {bad / fmt.MANIFEST}: content does not match "
                                       "manifest.sha256 (sha256 "), line
  # unverified (verify=False): the values themselves are checked against the program and vocab
  with pytest.raises(ExportError, match=r"manifest.json: n_results 5 does not match the program's "
                                        r"outputs \[3, 8\]"):
    load_exported(bad, verify=False)
  (bad / fmt.MANIFEST).write_text(json.dumps(dict(manifest, tokenizer=dict(manifest["tokenizer"],
                                                                          cls_id=99999))))
  with pytest.raises(ExportError, match=r"manifest.json: tokenizer cls_id 99999 is not an id of "
                                        r"vocab.txt \(0..30521\)"):
    load_exported(bad, verify=False)
  for field, value in (("n_results", "8"), ("batch_size", 0), ("beam_size", -1),
                       ("input_length", True)):
    (bad / fmt.MANIFEST).write_text(json.dumps(dict(manifest, **{field: value})))
    with pytest.raises(ExportError, match=rf"manifest.json: field '{field}' must be an integer "
                                          rf">= 1, found {value!r}"):
      load_exported(bad, verify=False)
  # an export from before manifest.sha256 (its manifest names no integrity file): a warning
  old = tmp_path / "old"
  shutil.copytree(out, old)
  (old / fmt.MANIFEST_HASH).unlink()
  (old / fmt.MANIFEST).write_text(json.dumps({k: v for k, v in manifest.items() if k != "integrity"}))
  capsys.readouterr()
  assert load_exported(old).search(["smiling cat"], k=2) == load_exported(out).search(["smiling cat"], k=2)
  assert (f"warning: {old}: no {fmt.MANIFEST_HASH} (an export written before cart-jax hashed its "
          "manifest)") in capsys.readouterr().err
  (bad / fmt.MANIFEST).write_text(json.dumps(manifest))  # says it has one: the file is missing
  (bad / fmt.MANIFEST_HASH).unlink()
  with pytest.raises(ExportError, match=r"manifest.sha256: missing \(manifest.json says"):
    load_exported(bad)


def main_exported(argv, capsys) -> tuple[int, str]:
  """``python exported.py ARGV``: (exit status, the first line on stderr)."""
  capsys.readouterr()
  rc = fmt.main(argv)
  return rc, capsys.readouterr().err.splitlines()[0]


def test_overflowing_weights_of_an_export_are_a_named_error(world, tmp_path):
  """Weights that overflow (loaded unverified): every query keeps no identifier. Before: empty
  results, no error (issue 28, case 4)."""
  _, _, out, _ = world
  bad = tmp_path / "bad"
  shutil.copytree(out, bad)
  with np.load(out / fmt.ARGUMENTS) as z:
    arrays = {name: (np.full_like(z[name], 3e38) if z[name].dtype.kind == "f" else z[name])
              for name in z.files}
  np.savez(bad / fmt.ARGUMENTS, **arrays)
  s = load_exported(bad, verify=False)
  with pytest.raises(ExportError, match=r"arguments.npz: the search gave non-finite scores .* for "
                                        r"2 of 2 queries"):
    s.search(["smiling cat", "a red heart"], k=3)


def test_exported_for_several_platforms_runs_here_and_others_are_refused(world, tmp_path):
  """Lowered for cpu, cuda and tpu on this CPU-only machine: the same results here; a program
  exported for TPU alone is refused by name, not run."""
  _, run, out, _ = world
  multi = api.export(run, tmp_path / "multi", batch_size=3, k=8, platforms=["cpu", "cuda", "tpu"])
  assert multi["platforms"] == ["cpu", "cuda", "tpu"]
  queries = TEST_QUERIES[:3]
  assert load_exported(tmp_path / "multi").search(queries, k=8) == load_exported(out).search(queries, k=8)
  api.export(run, tmp_path / "tpu", batch_size=3, k=8, platforms=["tpu"])
  with pytest.raises(ExportError, match="exported for tpu; this process runs on cpu"):
    load_exported(tmp_path / "tpu")


def test_a_failed_export_leaves_nothing(world, tmp_path, monkeypatch):
  _, run, _, _ = world

  def boom(*a, **k):
    raise OSError("disk full")

  monkeypatch.setattr(np, "savez", boom)
  with pytest.raises(OSError, match="disk full"):
    api.export(run, tmp_path / "x", batch_size=2, k=3)
  assert os.listdir(tmp_path) == []


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(st.text(max_size=60) | st.sampled_from([
    "Café déjà vu", "naïve façade", "東京タワー", "what's up?!", "a--b__c", "x" * 120,
    "😀 grinning", "tab\there\nnewline", "\u200b zero width", "ÀÉÎÕÜ", "don't", "3.14159"]))
def test_loader_tokenizer_matches_the_models(text):
  from cart_jax.models.text.tokenizer import minilm_tokenizer as tokenizer
  ref = tokenizer()
  tok = fmt.WordPiece(ref.inv_vocab, cls_id=ref.cls_id, sep_id=ref.sep_id, pad_id=ref.pad_id,
                      unk_id=ref.unk_id)
  np.testing.assert_array_equal(tok.encode_batch([text], 24), ref.encode_batch([text], 24)[0])
