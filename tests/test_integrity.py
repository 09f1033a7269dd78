"""Integrity on load (issue 19): verified checkpoints and indexes, and the small CLI checks.

One tiny trained run (24 emoji, a 2-step tiny T5 CART, checkpoints of steps 1 and 2) is shared
by the module; each test corrupts its own copy and runs the real console entry point
(``cart_jax.cli.main.main``): exit 2, one line naming the file and the step, and no results.
"""
import json
import shutil
from pathlib import Path

import hypothesis
import hypothesis.strategies as st
import jax
import numpy as np
import pytest

from cart_jax.cli.main import main
from cart_jax.core.artefacts import sha256_file
from cart_jax.core import checkpointing
from cart_jax.core.checkpointing import MANIFEST, CheckpointIntegrityError, Checkpointer

pytestmark = pytest.mark.integration  # trains or loads a real CART run (still in `make test`)


def _train_argv(run: Path, corpus: Path, index: Path, *extra: str) -> list[str]:
  return ["train", "--gin-file", "gin_configs/models/tiny.gin", "--gin-file", "gin_configs/runs/train.gin",
          f"--gin.MODEL_DIR={run}", f"--gin.CORPUS_DIR={corpus}", f"--gin.INDEX_DIR={index}",
          "--gin.ModelConfig.d_model=16", "--gin.ModelConfig.d_ff=16", "--gin.ModelConfig.num_heads=2",
          "--gin.ModelConfig.head_dim=8", "--gin.ModelConfig.num_encoder_layers=1",
          "--gin.TrainConfig.omega=0.0",
          "--gin.ModelConfig.num_decoder_layers=1", "--gin.InputConfig.batch_size=8",
          "--gin.InputConfig.input_length=16", "--gin.InputConfig.pipeline='numpy'",
          "--gin.TrainConfig.warmup_steps=1", "--gin.TrainConfig.log_every=1",
          "--gin.TrainConfig.checkpoint_every=1", "--gin.TrainConfig.keep_checkpoints=5",
          "--gin.TrainConfig.eval_every=0", "--quiet", *extra]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """``(root, corpus, index, run)``: a run killed after step 3's metrics line, before its
  checkpoint (checkpoints of steps 1 and 2, metrics.jsonl of steps 1-3). Never modified: the
  tests copy it."""
  from cart_jax import api
  from cart_jax.index import identifiers
  from cart_jax.index.identifiers import IdentifierConfig
  root = tmp_path_factory.mktemp("integrity")
  corpus, index, run = root / "corpus", root / "index", root / "run"
  ids = api.prepare("emoji", corpus, limit=24).corpus.item_ids
  emb = np.random.RandomState(0).randn(len(ids), 8).astype(np.float32)
  identifiers.build_index(emb, ids, IdentifierConfig(n_clusters=3, num_levels=1, codebook_size=4,
                                                     rq_steps=10, rq_latent_dim=8,
                                                     rq_hidden_dims=(8,))).save(index)
  real_save = Checkpointer.save

  def killed_at_3(self, step, *a, **k):
    if step == 3:
      raise KeyboardInterrupt  # a kill after step 3's metrics line, before its checkpoint
    return real_save(self, step, *a, **k)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(Checkpointer, "save", killed_at_3)
    assert main(_train_argv(run, corpus, index, "--gin.TrainConfig.num_steps=3")) == 130
  return root, corpus, index, run


def _copy(tiny, name: str) -> Path:
  root, _, _, run = tiny
  dest = root / name
  shutil.rmtree(dest, ignore_errors=True)
  shutil.copytree(run, dest)
  return dest


def _largest(directory: Path) -> Path:
  files = [p for p in directory.rglob("*") if p.is_file()]
  return max(files, key=lambda p: p.stat().st_size)


def _flip(path: Path, positions, mask: int = 0xFF) -> None:
  b = bytearray(path.read_bytes())
  for i in positions:
    b[i % len(b)] ^= mask
  path.write_bytes(bytes(b))


def _eval_and_search_refuse(run: Path, capsys, *expected: str) -> None:
  """``cart eval`` and ``cart search`` exit 2 with one line holding ``expected``, and no results."""
  for argv in (["eval", "--model-dir", str(run), "--quiet"],
               ["search", "--model-dir", str(run), "grinning face", "--quiet"]):
    assert main(argv) == 2, argv
    out, err = capsys.readouterr()
    assert out == "", out  # no metrics, no results
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"cart {argv[0]}: error: "), err
    for want in expected:
      assert want in line, (want, line)
    assert "Traceback" not in err


# ---------------------------------------------------------------------------------------
# The manifest itself.


def test_every_checkpoint_step_has_a_manifest_of_all_its_files(tiny):
  run = tiny[3]
  ckpt_dir = run / "checkpoints"
  assert sorted(int(p.name) for p in ckpt_dir.iterdir()) == [1, 2]
  for step in (1, 2):
    d = ckpt_dir / str(step)
    manifest = json.loads((d / MANIFEST).read_text())
    assert manifest["step"] == step and manifest["format"] == checkpointing.MANIFEST_FORMAT
    on_disk = {p.relative_to(d).as_posix(): p for p in d.rglob("*") if p.is_file() and p.name != MANIFEST}
    assert set(manifest["files"]) == set(on_disk) and len(on_disk) > 10
    for rel, p in on_disk.items():
      assert manifest["files"][rel] == {"bytes": p.stat().st_size, "sha256": sha256_file(p)}, rel
    assert any(rel.startswith("params/") for rel in on_disk) and "meta/metadata" in on_disk
    assert checkpointing.verify_step(d, step) is True


def test_async_saves_get_their_manifest_once_finished_and_keep_n_drops_old_ones(tmp_path):
  import jax.numpy as jnp
  ckpt = Checkpointer(tmp_path / "ck", keep=2, async_save=True, items=("params",))
  for step in (1, 2, 3):
    ckpt.save(step, {"params": {"w": jnp.full((64, 8), float(step))}})
  ckpt.close()
  assert sorted(int(p.name) for p in (tmp_path / "ck").iterdir()) == [2, 3]
  for step in (2, 3):
    assert checkpointing.verify_step(tmp_path / "ck" / str(step), step) is True
  again = Checkpointer(tmp_path / "ck", items=("params",))
  restored, meta = again.restore({"params": {"w": jnp.zeros((64, 8))}})
  assert meta["step"] == 3 and float(restored["params"]["w"][0, 0]) == 3.0
  _flip(_largest(tmp_path / "ck" / "3" / "params"), [7])
  fresh = Checkpointer(tmp_path / "ck", items=("params",))
  with pytest.raises(CheckpointIntegrityError, match=r"step 3 of .*content does not match"):
    fresh.restore({"params": {"w": jnp.zeros((64, 8))}})
  again.close()
  fresh.close()


# ---------------------------------------------------------------------------------------
# Corrupt checkpoints: eval, search and resume refuse them.


def test_flipped_bytes_in_a_params_file_refused_by_eval_and_search(tiny, capsys):
  from cart_jax.runs.restore import load_run
  run = _copy(tiny, "flipped")
  data = _largest(run / "checkpoints" / "2" / "params")
  _flip(data, range(100, 116))  # the audit's case: XOR of 16 bytes (exit 0, R@1 0.0 before)
  _eval_and_search_refuse(run, capsys, str(data), "step 2", "content does not match")
  # verify=False (--no-verify) skips the check: the corrupt parameters load, unlike the good ones.
  bad = load_run(run, need_corpus=False, verify=False)
  good = load_run(tiny[3], need_corpus=False)
  assert bad.step == good.step == 2
  differ = [a.shape for a, b in zip(jax.tree.leaves(bad.params), jax.tree.leaves(good.params))
            if not np.array_equal(np.asarray(a), np.asarray(b))]
  assert len(differ) >= 1
  with pytest.raises(CheckpointIntegrityError, match="step 2"):
    load_run(run, need_corpus=False)


@hypothesis.settings(max_examples=30, deadline=None, derandomize=True,
                     suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(pick=st.integers(0, 10**6), pos=st.integers(0, 10**9), mask=st.integers(1, 255),
                  truncate=st.booleans())
def test_any_byte_flipped_or_file_truncated_names_that_file(tiny, pick, pos, mask, truncate):
  run = tiny[0] / "fuzzed"
  if not run.exists():
    shutil.copytree(tiny[3], run)
  d = run / "checkpoints" / "2"
  files = [(rel, p) for rel, p in sorted(checkpointing.step_files(d).items()) if p.stat().st_size]
  rel, path = files[pick % len(files)]
  original = path.read_bytes()
  try:
    if truncate:
      path.write_bytes(original[:pos % max(1, len(original))])
    else:
      _flip(path, [pos], mask)
    with pytest.raises(CheckpointIntegrityError) as e:
      checkpointing.verify_step(d, 2)
    assert str(path) in str(e.value) and "step 2" in str(e.value)
  finally:
    path.write_bytes(original)
  assert checkpointing.verify_step(d, 2) is True


def test_truncated_metadata_extra_and_missing_files_are_refused(tiny, capsys):
  run = _copy(tiny, "metadata")
  meta = run / "checkpoints" / "2" / "params" / "_METADATA"
  meta.write_bytes(meta.read_bytes()[:100])
  _eval_and_search_refuse(run, capsys, str(meta), "step 2", "truncated")
  # --no-verify skips the manifest; the truncated JSON is still a one-line error naming the step
  # (was a JSONDecodeError traceback).
  for argv in (["eval", "--model-dir", str(run)], ["search", "--model-dir", str(run), "a cat"]):
    assert main([*argv, "--no-verify", "--quiet"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err
    assert f"{run / 'checkpoints' / '2'}: checkpoint step 2" in err and "truncated or corrupt" in err
    assert "manifest" not in err
  run = _copy(tiny, "extra")
  extra = run / "checkpoints" / "2" / "params" / "d" / "extra"
  extra.write_bytes(b"x")
  _eval_and_search_refuse(run, capsys, str(extra), "not listed in manifest.sha256.json")
  run = _copy(tiny, "missing")
  gone = _largest(run / "checkpoints" / "2" / "params")
  gone.unlink()
  _eval_and_search_refuse(run, capsys, str(gone), "missing")


def test_resume_of_a_corrupt_checkpoint_is_refused(tiny, capsys):
  root, corpus, index, _ = tiny
  run = _copy(tiny, "resume_corrupt")
  data = _largest(run / "checkpoints" / "2" / "opt_state")
  _flip(data, [0, 1, 2, 3])
  before = (run / "metrics.jsonl").read_text()
  assert main(_train_argv(run, corpus, index, "--gin.TrainConfig.num_steps=3")) == 2
  err = capsys.readouterr().err
  assert str(data) in err and "step 2" in err and "Traceback" not in err
  assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["1", "2"]
  assert (run / "metrics.jsonl").read_text() == before


# ---------------------------------------------------------------------------------------
# Interrupted manifests, metrics.jsonl after a resume, checkpoints from before manifests.


def test_killed_runs_resume_with_each_step_once_in_metrics(tiny, capsys):
  """The shared run was killed after step 3's metrics line, before its checkpoint; here step 2's
  save was also killed before its manifest. eval refuses the unverifiable step; a resume drops
  it, continues from step 1, and metrics.jsonl keeps each step once, the redone steps equal to
  the first attempt's (exact resume)."""
  root, corpus, index, _ = tiny
  run = _copy(tiny, "killed")
  first = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in first] == [1, 2, 3]  # step 3 logged, never checkpointed
  (run / "checkpoints" / "2" / MANIFEST).unlink()  # killed before step 2's manifest was written
  _eval_and_search_refuse(run, capsys, str(run / "checkpoints" / "2" / MANIFEST), "step 2",
                          "interrupted")
  argv = _train_argv(run, corpus, index, "--gin.TrainConfig.num_steps=3", "--json",
                     str(root / "killed.json"))
  argv.remove("--quiet")
  assert main(argv) == 0
  assert "dropped checkpoint step 2" in capsys.readouterr().err
  assert json.loads((root / "killed.json").read_text())["start_step"] == 1
  rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2, 3]
  no_speed = lambda row: {k: v for k, v in row.items() if k != "train/steps_per_second"}
  assert [no_speed(r) for r in rows] == [no_speed(r) for r in first]  # redone bit for bit
  for step in (1, 2, 3):
    assert checkpointing.verify_step(run / "checkpoints" / str(step), step) is True


def test_checkpoints_from_before_manifests_load_with_a_warning_and_k_is_capped(tiny, capsys):
  run = _copy(tiny, "legacy")
  d = run / "checkpoints" / "2"
  (d / MANIFEST).unlink()
  meta_file = d / "meta" / "metadata"
  meta = json.loads(meta_file.read_text())
  del meta["manifest"]  # what a save before this change wrote
  meta_file.write_text(json.dumps(meta))
  assert main(["search", "--model-dir", str(run), "grinning face", "-k", "100", "--json", "-"]) == 0
  out, err = capsys.readouterr()
  assert f"warning: {d}: checkpoint step 2" in err and "loaded without verification" in err
  assert "-k 100: the index has 24 items; showing at most 24 results" in err
  results = json.loads(out)["queries"][0]["results"]
  assert len(results) == 24 and len({r["item_id"] for r in results}) == 24


# ---------------------------------------------------------------------------------------
# The index copy: meta.json hashed, every file accounted for.


def _rehash_meta(index: Path) -> None:
  (index / "meta.sha256").write_text(f"{sha256_file(index / 'meta.json')}  meta.json\n")


@pytest.mark.parametrize("case", ["entry_removed", "codes_corrupt", "meta_edited", "extra_file",
                                  "meta_hash_removed", "entry_and_file_removed"])
def test_corrupt_index_refused_by_eval_and_search(tiny, capsys, case):
  run = _copy(tiny, f"index_{case}")
  ix = run / "index"
  meta = json.loads((ix / "meta.json").read_text())
  if case == "entry_removed":  # the audit's bypass: codes.npy altered, its entry removed
    codes = np.load(ix / "codes.npy")
    codes[[0, 1]] = codes[[1, 0]]
    np.save(ix / "codes.npy", codes)
    del meta["files"]["codes.npy"]
    (ix / "meta.json").write_text(json.dumps(meta))
    _rehash_meta(ix)  # even with meta.sha256 made to agree
    want = (str(ix / "codes.npy"), "not listed in meta.json")
  elif case == "codes_corrupt":
    _flip(ix / "codes.npy", [-5])
    want = (str(ix / "codes.npy"), "does not match meta.json")
  elif case == "meta_edited":
    meta["stats"]["n_items"] = 25
    (ix / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    want = (str(ix / "meta.json"), "does not match meta.sha256")
  elif case == "extra_file":
    (ix / "notes.txt").write_text("hello\n")
    want = (str(ix / "notes.txt"), "not listed in meta.json")
  elif case == "meta_hash_removed":
    (ix / "meta.sha256").unlink()
    want = (str(ix / "meta.sha256"), "missing")
  else:
    (ix / "centroids.npy").unlink()
    del meta["files"]["centroids.npy"]
    (ix / "meta.json").write_text(json.dumps(meta))
    _rehash_meta(ix)
    want = (str(ix / "meta.json"), "no entry for centroids.npy")
  _eval_and_search_refuse(run, capsys, *want)


# ---------------------------------------------------------------------------------------
# Small items: batch size, limit, empty queries.


def test_bad_numbers_and_empty_queries_are_one_line_errors(tiny, capsys):
  run = tiny[3]
  for argv, want in (
      (["eval", "--model-dir", str(run), "--batch", "-3"], "--batch-size -3: must be >= 1"),
      (["eval", "--model-dir", str(run), "--batch-size", "0"], "--batch-size 0: must be >= 1"),
      (["eval", "--model-dir", str(run), "--limit", "0"], "--limit 0: must be >= 1"),
      (["search", "--model-dir", str(run), ""], "query 1 of 1 is empty"),
      (["search", "--model-dir", str(run), "a cat", "   "], "query 2 of 2 is empty"),
      (["search", "--model-dir", str(run), "a cat", "-k", "0"], "-k 0: must be >= 1"),
      (["search", "--model-dir", str(run), "a cat", "--beam", "0"], "--beam 0: must be >= 1"),
      (["eval", "--model-dir", str(run), "--step", "7"], "no checkpoint of step 7 (steps: [1, 2])")):
    assert main(argv) == 2, argv
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and want in err, (argv, err)


# ---------------------------------------------------------------------------------------
# The run's corpus (issue 28, case 3): hashed into run.json at training, checked by every load.


def _copy_with_corpus(tiny, name: str) -> tuple[Path, Path]:
  """A copy of the run and of its corpus, run.json pointing at the copied corpus."""
  root, corpus, _, _ = tiny
  run = _copy(tiny, name)
  dest = root / f"{name}-corpus"
  shutil.rmtree(dest, ignore_errors=True)
  shutil.copytree(corpus, dest, symlinks=True)
  r = json.loads((run / "run.json").read_text())
  r["corpus_dir"] = str(dest)
  (run / "run.json").write_text(json.dumps(r))
  return run, dest


def test_the_run_records_its_corpus_hashes(tiny):
  _, corpus, _, run = tiny
  r = json.loads((run / "run.json").read_text())
  assert r["corpus_sha256"] == {name: sha256_file(corpus / name)
                                for name in ("corpus.json", "items.jsonl", "texts.jsonl")}


def test_an_edited_corpus_is_refused_by_eval_search_and_serve(tiny, capsys):
  """corpus.json declaring "media_roots": ["/etc"] after training. Before: eval and search ran,
  and cart serve loaded it and served /etc/passwd from /media/<id>."""
  from cart_jax.runs.layout import CorpusIntegrityError
  from cart_jax.serve.engine import SearchEngine
  run, corpus = _copy_with_corpus(tiny, "corpus-edited")
  header = json.loads((corpus / "corpus.json").read_text())
  header["media_roots"] = ["/etc"]
  (corpus / "corpus.json").write_text(json.dumps(header))
  want = (str(corpus / "corpus.json"), "does not match", "corpus_sha256",
          "modified after training")
  _eval_and_search_refuse(run, capsys, *want)
  with pytest.raises(CorpusIntegrityError, match="corpus.json: content does not match"):
    SearchEngine.from_run(run, log=lambda s: None)
  texts = corpus / "texts.jsonl"  # a text added to the training split: refused as well
  shutil.copy(tiny[1] / "corpus.json", corpus / "corpus.json")
  texts.write_text(texts.read_text() + texts.read_text().splitlines()[0] + "\n")
  _eval_and_search_refuse(run, capsys, str(texts), "does not match")


def test_a_run_from_before_corpus_hashes_loads_with_a_warning(tiny, capsys):
  run, _ = _copy_with_corpus(tiny, "corpus-old")
  r = json.loads((run / "run.json").read_text())
  del r["corpus_sha256"]
  (run / "run.json").write_text(json.dumps(r))
  assert main(["search", "--model-dir", str(run), "grinning face", "-k", "2"]) == 0
  out, err = capsys.readouterr()
  assert "grinning face" in out
  assert (f"warning: {run / 'run.json'}: no corpus_sha256 (a run trained before cart-jax hashed "
          "its corpus)") in err
  r["corpus_sha256"] = {"corpus.json": "x"}
  (run / "run.json").write_text(json.dumps(r))
  _eval_and_search_refuse(run, capsys, "field 'corpus_sha256' must map")


# ---------------------------------------------------------------------------------------
# Non-finite parameters and scores (issue 28, case 4): a named error, never empty results.


def _rewrite_params(run: Path, edit) -> None:
  """Replaces the newest checkpoint of ``run`` by one whose params ``edit`` changed (a fresh,
  manifest-verified save: what a diverged training, or a corrupt file saved as is, looks like)."""
  from cart_jax.runs.restore import load_run
  from cart_jax.jobs import index_update
  r = load_run(run, need_corpus=False)
  params = jax.tree.map(np.array, r.params)  # writable host copies
  edit(params)
  shutil.rmtree(run / "checkpoints")
  index_update._save_checkpoint(run / "checkpoints", r.step, params, r.frozen, {})


def test_non_finite_parameters_are_named_at_load(tiny, capsys):
  """One NaN in the output projection. Before: eval exit 0 with R@1 0.0, search exit 0 with no
  results (every beam's score NaN, so none kept)."""
  run = _copy(tiny, "nan-param")

  def one_nan(params):
    params["logits_dense"]["kernel"][0, 3] = np.nan
  _rewrite_params(run, one_nan)
  want = (f"{run / 'checkpoints' / '2'}: checkpoint step 2 of {run}: parameter "
          "params/logits_dense/kernel holds 1 non-finite value (NaN or inf)", "nothing is searched")
  _eval_and_search_refuse(run, capsys, *want)
  # From before manifests (no manifest, its meta edited not to promise one): loads with the
  # manifest warning, then the same error.
  step = run / "checkpoints" / "2"
  (step / MANIFEST).unlink()
  meta = json.loads((step / "meta" / "metadata").read_text())
  del meta["manifest"]
  (step / "meta" / "metadata").write_text(json.dumps(meta))
  assert main(["search", "--model-dir", str(run), "grinning face"]) == 2
  out, err = capsys.readouterr()
  assert out == "" and "loaded without verification" in err and want[0] in err


def test_overflowing_parameters_are_named_at_the_first_search(tiny, capsys):
  """Finite parameters whose logits overflow: every beam's score ends -inf. Before: exit 0, R@1
  0.0 and no results."""
  run = _copy(tiny, "huge-param")

  def huge(params):
    params["logits_dense"]["kernel"][...] = 3e38
  _rewrite_params(run, huge)
  _eval_and_search_refuse(run, capsys, "the search gave non-finite scores", "1 of the",
                          "no results are given")


def test_unreadable_array_files_with_no_verify_are_a_named_error(tiny, capsys):
  """Truncated array files loaded with --no-verify. Before: tensorstore's ValueError traceback."""
  run = _copy(tiny, "truncated-arrays")
  for p in (run / "checkpoints" / "2" / "params").rglob("*"):
    if p.is_file() and p.parent.name == "d":
      p.write_bytes(p.read_bytes()[:p.stat().st_size // 2])
  for argv in (["eval", "--model-dir", str(run)], ["search", "--model-dir", str(run), "a cat"]):
    assert main([*argv, "--no-verify", "--quiet"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{run / 'checkpoints' / '2'}: checkpoint step 2 of " in err
    assert "an array file of the step cannot be read" in err and "tensorstore_spec" not in err


def test_search_escapes_the_querys_control_characters(tiny, capsys):
  """Issue 28, minor. Before: the query's ESC sequence went to the terminal as is."""
  run = tiny[3]
  assert main(["search", "--model-dir", str(run), "cat\x1b[2J\rdog", "-k", "1"]) == 0
  out = capsys.readouterr().out
  assert "\x1b" not in out and "\r" not in out
  assert "query: cat\\x1b[2J\\rdog" in out
  assert main(["search", "--model-dir", str(run), "cat\x1b[2J", "-k", "1", "--json", "-"]) == 0
  assert json.loads(capsys.readouterr().out)["queries"][0]["query"] == "cat\x1b[2J"  # JSON: as given
