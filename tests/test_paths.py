"""Remote paths (gs://) without a bucket: path handling, and MODEL_DIR's files on a fake gs://.

``etils.epath`` reads ``gs://`` through fsspec when TensorFlow's gfile is not used
(``EPATH_USE_TF=false``); here fsspec's ``gcs`` protocol is an in-memory file system
(``FakeGCS`` in ``conftest.py``, offline), so everything cart-jax itself reads and writes under a ``gs://``
MODEL_DIR runs for real: run.json / config.gin writes, the index copy and reading it back,
metrics.jsonl (rewritten whole: object stores cannot append) and a resume's truncation,
checkpoint manifests and their verification. Not covered (needs a bucket or a GCS emulator):
orbax's array writes, which go through tensorstore's own GCS driver, and TensorBoard events.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cart_jax.core import paths


def test_remote_paths_are_not_made_local():
  p = paths.absolute("gs://bucket/runs/r1")
  assert str(p) == "gs://bucket/runs/r1" and str(p / "index") == "gs://bucket/runs/r1/index"
  assert paths.is_remote("gs://b/x") and paths.is_remote("s3://b/x") and not paths.is_remote("runs/x")
  assert paths.absolute("runs/x") == Path.cwd() / "runs" / "x"
  assert paths.as_path("runs/x") == Path("runs/x")
  assert paths.to_str(None) is None and paths.to_str(p) == "gs://bucket/runs/r1"
  # What train_job used to do: pathlib makes a local folder of a URI.
  assert str(Path("gs://bucket/runs/r1").absolute()).startswith(str(Path.cwd()))


def test_run_subdir_of_a_remote_model_dir():
  from cart_jax.runs.layout import RunError, run_subdir
  assert str(run_subdir("gs://b/run", {}, "index_dir", "index")) == "gs://b/run/index"
  assert str(run_subdir("gs://b/run", {"checkpoint_dir": "versions/2/checkpoints"}, "checkpoint_dir",
                        "checkpoints")) == "gs://b/run/versions/2/checkpoints"
  for bad in ("gs://other/index", "/abs/index", "../index", ""):
    with pytest.raises(RunError, match="must be a relative path inside the MODEL_DIR"):
      run_subdir("gs://b/run", {"index_dir": bad}, "index_dir", "index")


def test_read_write_copy_stage_on_fake_gcs(gcs, tmp_path):
  paths.write_json("gs://bucket/run/run.json", {"a": 1})
  assert json.loads(paths.read_text("gs://bucket/run/run.json")) == {"a": 1}
  assert "/bucket/run/run.json" in gcs  # in the bucket, not in a local ./gs: folder
  assert not Path("gs:").exists()
  src = tmp_path / "index"
  (src / "sub").mkdir(parents=True)
  (src / "meta.json").write_text('{"files": {}}')
  (src / "codes.npy").write_bytes(b"\x00" * 1000)
  (src / "sub" / "x.txt").write_text("x")
  paths.copy_tree(src, "gs://bucket/run/index")
  files = paths.walk_files("gs://bucket/run/index")
  assert sorted(files) == ["codes.npy", "meta.json", "sub/x.txt"]
  assert all(str(p).startswith("gs://bucket/run/index/") for p in files.values())
  assert paths.size(files["codes.npy"]) == 1000
  assert paths.sha256(files["codes.npy"]) == paths.sha256(src / "codes.npy")
  staged = paths.stage("gs://bucket/run/index")
  assert staged.is_dir() and (staged / "sub" / "x.txt").read_text() == "x"
  assert paths.stage("gs://bucket/run/index") == staged  # once per process ...
  paths.write_text("gs://bucket/run/index/sub/x.txt", "changed")
  restaged = paths.stage("gs://bucket/run/index")  # ... while its files stay the same
  assert restaged != staged and (restaged / "sub" / "x.txt").read_text() == "changed"
  only = paths.stage_file("gs://bucket/run/index/meta.json")
  assert only.read_text() == '{"files": {}}' and not paths.is_remote(only)
  # Local copies stay atomic (temporary sibling + rename): nothing else beside the target.
  paths.copy_tree("gs://bucket/run/index", tmp_path / "back")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["back", "index"]
  assert (tmp_path / "back" / "codes.npy").read_bytes() == b"\x00" * 1000


def test_index_copy_and_load_from_a_remote_model_dir(gcs, tmp_path):
  from cart_jax.index.identifiers import IdentifierConfig, build_index, load_index
  from cart_jax.runs.layout import RunError
  from cart_jax.jobs import train as jobs
  cfg = IdentifierConfig(n_clusters=2, num_levels=1, codebook_size=2, use_rqvae=False, kmeans_iters=10)
  rng = np.random.default_rng(0)
  index = build_index(rng.normal(size=(6, 4)).astype(np.float32), list("abcdef"), cfg)
  index.save(tmp_path / "index")
  codes = index.codes
  model_dir = paths.absolute("gs://bucket/run")
  dest = jobs._ensure_index(tmp_path / "index", model_dir, None, None, print)  # pylint: disable=protected-access
  assert str(dest) == "gs://bucket/run/index"
  back = load_index(paths.stage(dest))  # verified against its meta.sha256 on the way
  np.testing.assert_array_equal(back.codes, codes)
  assert back.item_ids == list("abcdef")
  # A second job on the same MODEL_DIR with another index is refused (fingerprints compared remotely).
  build_index(rng.normal(size=(6, 4)).astype(np.float32), list("abcdef"), cfg).save(tmp_path / "other")
  with pytest.raises(RunError, match="another index"):
    jobs._ensure_index(tmp_path / "other", model_dir, None, None, print)  # pylint: disable=protected-access
  with pytest.raises(RunError, match="indexes are built on a local disk"):
    jobs._ensure_index("gs://bucket/nothing", paths.absolute("gs://bucket/run2"), None, None, print)  # pylint: disable=protected-access


def test_metrics_on_a_remote_model_dir_resume_without_duplicates(gcs):
  from cart_jax.core.loop import MetricWriter
  w = MetricWriter("gs://bucket/run", resume_step=0)
  for step in (1, 2, 3):
    w.write(step, {"train/loss": 1.0 / step})
    w.flush()
  w.close()
  text = paths.read_text("gs://bucket/run/metrics.jsonl")
  assert [json.loads(l)["step"] for l in text.splitlines()] == [1, 2, 3]
  # Resumed from the step-2 checkpoint: step 3 is written again, once.
  w = MetricWriter("gs://bucket/run", resume_step=2)
  w.write(3, {"train/loss": 0.5})
  w.write(3, {"val/r@1": 0.25})
  w.write(4, {"train/loss": 0.25})
  w.close()
  rows = [json.loads(l) for l in paths.read_text("gs://bucket/run/metrics.jsonl").splitlines()]
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  assert rows[2] == {"step": 3, "train/loss": 0.5, "val/r@1": 0.25}


def test_checkpoint_manifest_on_a_remote_step(gcs):
  from cart_jax.core import checkpointing
  step = "gs://bucket/run/checkpoints/4"
  paths.write_text(step + "/params/data.bin", "0123456789")
  paths.write_json(step + "/meta/metadata", {"step": 4, "manifest": checkpointing.MANIFEST})
  manifest = checkpointing.write_manifest(step, 4)
  assert sorted(manifest["files"]) == ["meta/metadata", "params/data.bin"]
  assert manifest["files"]["params/data.bin"]["bytes"] == 10
  assert checkpointing.verify_step(step, 4) is True
  paths.write_text(step + "/params/data.bin", "0123456780")  # same size, other bytes
  with pytest.raises(checkpointing.CheckpointIntegrityError, match="content does not match"):
    checkpointing.verify_step(step, 4)
