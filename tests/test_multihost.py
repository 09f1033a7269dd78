"""Multi-host for real: `cart train` and `cart eval` as 2 CPU processes joined by jax.distributed.

Both commands are launched the way a user launches them on GPU hosts, through
``launch/multi_gpu.sh`` (``NUM_HOSTS=2 HOST_ID=i COORDINATOR=localhost:PORT``), with
``JAX_PLATFORMS=cpu`` (gloo collectives) and 2 CPU devices per process: a global mesh of 4
devices over 2 processes (data 2 x model 2: batches split across the processes, parameters the
rules shard split across each process's devices), so every global array spans devices this
process cannot read.

Training: a tiny model on a 12-item corpus, global batch 8, validation every 2 steps (the
constrained beam search over the mesh), a checkpoint every 2 steps. The first launch stops after
3 steps (``train_job.stop_after``: it saves step 3 and exits in the middle of the run); the test
then leaves what a SIGKILL during that save would (step 3 without its manifest, metrics lines of
later steps, a torn last line), and the second launch resumes, from step 2, to step 6. Checked
against the same job run in one process with one device:

* the final parameters (max abs difference printed; <= 1e-5),
* every step's loss and every validation's recall,
* MODEL_DIR holds exactly one of each artefact: run.json, config.gin, the index copy, one
  metrics line per step, one checkpoint per saved step, no temporary litter.

Evaluation: ``cart eval`` on the 2 processes (restored onto the 2 x 2 mesh) gives the metrics of
the 1-process evaluation, and both processes report the same (results gathered across processes).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch" / "multi_gpu.sh"

WORDS = ["red", "blue", "green", "small", "large", "round", "square", "bright", "dark", "soft",
         "loud", "fast"]
THINGS = ["circle", "box", "star", "bird", "drum", "bell", "tree", "boat", "lamp", "cup", "key",
          "shoe"]


def _corpus(root: Path) -> tuple[Path, Path]:
  """A 12-item corpus (3 train, 1 val, 1 test query per item) and a hand-made index for it."""
  from cart_jax.index.identifiers import IdentifierConfig, build_index

  corpus = root / "corpus"
  (corpus / "media").mkdir(parents=True)
  items, texts = [], []
  for i, (w, t) in enumerate(zip(WORDS, THINGS)):
    item = f"item{i:02d}"
    (corpus / "media" / f"{item}.png").write_bytes(b"not read in training")
    items.append({"id": item, "modality": "image", "media": f"media/{item}.png"})
    for split, text in (("train", f"a {w} {t}"), ("train", f"{t} that is {w}"),
                        ("train", f"the {w} {t} picture"), ("val", f"{w} {t} image"),
                        ("test", f"photo of a {w} {t}")):
      texts.append({"item_id": item, "text": text, "split": split, "kind": "query"})
  (corpus / "corpus.json").write_text(json.dumps(
      {"format": "cart-corpus", "version": 1, "name": "multihost", "modality": "image",
       "num_items": len(items), "num_texts": len(texts)}))
  (corpus / "items.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))
  (corpus / "texts.jsonl").write_text("".join(json.dumps(x) + "\n" for x in texts))
  emb = np.random.default_rng(0).normal(size=(len(items), 8)).astype(np.float32)
  build_index(emb, [x["id"] for x in items],
              IdentifierConfig(n_clusters=3, num_levels=1, codebook_size=3, use_rqvae=False,
                               kmeans_iters=20)).save(root / "index")
  return corpus, root / "index"


def _gin(corpus: Path, index: Path) -> list[str]:
  return ["--gin.CORPUS_DIR=" + str(corpus), "--gin.INDEX_DIR=" + str(index),
          "--gin.ModelConfig.d_model=16", "--gin.ModelConfig.d_ff=32", "--gin.ModelConfig.num_heads=2",
          "--gin.ModelConfig.head_dim=8", "--gin.ModelConfig.num_encoder_layers=1",
          "--gin.ModelConfig.num_decoder_layers=1",
          "--gin.TrainConfig.num_steps=6", "--gin.TrainConfig.warmup_steps=2",
          "--gin.TrainConfig.learning_rate=0.01", "--gin.TrainConfig.log_every=1",
          "--gin.TrainConfig.checkpoint_every=2", "--gin.TrainConfig.keep_checkpoints=10",
          "--gin.TrainConfig.eval_every=2", "--gin.TrainConfig.eval_queries=12",
          "--gin.TrainConfig.beam_size=10", "--gin.TrainConfig.seed=5",
          "--gin.InputConfig.batch_size=8", "--gin.InputConfig.input_length=12",
          "--gin.InputConfig.pipeline='numpy'", "--gin.InputConfig.caption_rate=0.0"]


GIN_FILES = ["gin_configs/models/tiny.gin", "gin_configs/runs/train.gin"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


# XLA's CPU backend without its LLVM optimisation passes: a train step of the tiny model compiles
# in ~8 s instead of ~27 s on 2 cores. Every run of the test (1 and 2 processes) uses it.
XLA_FLAGS = "--xla_backend_optimization_level=0"


_LAUNCHED: list = []  # every Launch of the running test (killed at its end if still running)


@pytest.fixture(autouse=True)
def _no_process_left():
  yield
  while _LAUNCHED:
    for p, err in _LAUNCHED.pop().procs:
      if p.poll() is None:
        p.kill()
        p.wait()
      err.close()


class Launch:
  """``launch/multi_gpu.sh ARGS`` as ``processes`` processes of ``devices`` CPU devices each.

  ``args``: the arguments, or a function of the process id that returns them. :meth:`wait`
  returns their stderr and fails the test if any exited non-zero (or ran past ``timeout``).
  """

  def __init__(self, args, tmp: Path, tag: str, *, processes: int = 2, devices: int = 2):
    self.tag, self.procs = tag, []
    port = _free_port()
    for i in range(processes):
      env = dict(os.environ, JAX_PLATFORMS="cpu", LOCAL_DEVICES=str(devices), XLA_FLAGS=XLA_FLAGS,
                 CART=f"{sys.executable} -m cart_jax.cli.main", CART_DISTRIBUTED_TIMEOUT="120",
                 PYTHONUNBUFFERED="1")
      for k in ("NUM_HOSTS", "HOST_ID", "COORDINATOR", "JAX_COORDINATOR_ADDRESS"):
        env.pop(k, None)
      if processes > 1:
        env.update(NUM_HOSTS=str(processes), HOST_ID=str(i), COORDINATOR=f"localhost:{port}")
      err = open(tmp / f"{tag}.{i}.err", "w+")
      argv = args(i) if callable(args) else args
      self.procs.append((subprocess.Popen(["bash", str(LAUNCH), *argv], cwd=REPO, env=env,
                                          stdout=subprocess.DEVNULL, stderr=err), err))
    _LAUNCHED.append(self)

  def wait(self, timeout: float = 300, expect: int = 0) -> list[str]:
    try:
      for p, _ in self.procs:
        p.wait(timeout=timeout)
    finally:
      for p, _ in self.procs:
        if p.poll() is None:
          p.kill()
          p.wait()
    logs = []
    for _, err in self.procs:
      err.seek(0)
      logs.append(err.read())
      err.close()
    for i, (p, _) in enumerate(self.procs):
      assert p.returncode == expect, f"{self.tag}: process {i} exited {p.returncode}:\n{logs[i][-3000:]}"
    return logs


def _metrics(run: Path) -> list[dict]:
  return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_train_and_eval_on_two_processes_match_one_process(tmp_path, capsys):
  from cart_jax.runs.restore import load_run

  corpus, index = _corpus(tmp_path)
  run2, run1 = tmp_path / "run2", tmp_path / "run1"
  gin = [f"--gin_file={GIN_FILES[1]}", *_gin(corpus, index), "--quiet"]  # tiny.gin: GIN_FILE

  # The reference: the same job in one process with one device (the same global batch), run
  # while the 2 processes x 2 devices run stops after 3 steps; then the latter resumes to step 6.
  reference = Launch([GIN_FILES[0], str(run1), *gin], tmp_path, "train_1", processes=1, devices=1)
  # The 2-process run's mesh: data 2 x model 2 (tensor-parallel parameters split across each
  # process's 2 devices, batches across the processes).
  gin2 = [*gin, "--gin.TrainConfig.mesh_model=2"]
  Launch([GIN_FILES[0], str(run2), *gin2, "--gin.train_job.stop_after=3"], tmp_path, "train_a").wait()
  stopped = json.loads((run2 / "train_summary.json").read_text())
  assert (stopped["start_step"], stopped["step"]) == (0, 3)
  assert sorted(os.listdir(run2 / "checkpoints")) == ["2", "3"]
  assert [m["step"] for m in _metrics(run2)] == [1, 2, 3]
  # What a SIGKILL during the step-3 save leaves behind: orbax's step directory complete but no
  # manifest yet, and metrics lines of later steps, the last one torn. The resumed run must drop
  # step 3, go on from step 2 and write each step's line once.
  (run2 / "checkpoints" / "3" / "manifest.sha256.json").unlink()
  with open(run2 / "metrics.jsonl", "a") as f:
    f.write('{"step": 4, "train/loss": 99.0}\n{"step": 5, "train/lo')
  Launch([GIN_FILES[0], str(run2), *gin2], tmp_path, "train_b").wait()
  resumed = json.loads((run2 / "train_summary.json").read_text())
  assert (resumed["start_step"], resumed["step"]) == (2, 6)
  assert [v["step"] for v in resumed["validation"]] == [4, 6]
  reference.wait()

  # MODEL_DIR: one of each artefact, nothing half-written left beside them.
  assert sorted(os.listdir(run2)) == sorted(os.listdir(run1)) == sorted(
      ["checkpoints", "config.gin", "index", "metrics.jsonl", "run.json", "tensorboard",
       "train_summary.json"])
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], list(tmp_path.iterdir())
  assert sorted(os.listdir(run2 / "checkpoints")) == ["2", "4", "6"]
  assert all((run2 / "checkpoints" / s / "manifest.sha256.json").is_file() for s in "246")
  assert sorted(os.listdir(run2 / "index")) == sorted(os.listdir(index))
  run_json = json.loads((run2 / "run.json").read_text())
  assert run_json["train_config"]["eval_every"] == 2 and run_json["index_dir"] == "index"
  assert run_json["train_config"]["mesh_model"] == 2
  assert f"MODEL_DIR = '{run2}'" in (run2 / "config.gin").read_text()
  m2, m1 = _metrics(run2), _metrics(run1)
  assert [m["step"] for m in m2] == [m["step"] for m in m1] == [1, 2, 3, 4, 5, 6]

  # cart eval on 2 processes x 2 devices and on 1 process x 1 device, of the 2-process run.
  evals = Launch(lambda i: ["eval", str(run2), "--split", "test", "--json",
                            str(tmp_path / f"eval2.{i}.json"), "--quiet"], tmp_path, "eval_2")
  eval1 = Launch(["eval", str(run2), "--split", "test", "--json", str(tmp_path / "eval1.json"),
                  "--quiet"], tmp_path, "eval_1", processes=1, devices=1)

  # Same losses and validation recall as one process; same final parameters.
  loss2 = np.array([m["train/loss"] for m in m2])
  loss1 = np.array([m["train/loss"] for m in m1])
  for step in (2, 4, 6):
    for key in ("val/r@1", "val/r@10", "val/mrr@10"):
      assert m2[step - 1][key] == pytest.approx(m1[step - 1][key], abs=1e-6), (step, key)
  a = load_run(run1, need_corpus=False)
  b = load_run(run2, need_corpus=False)
  assert a.step == b.step == 6
  diff = max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))),
                                          a.params, b.params)))
  moved = max(jax.tree.leaves(jax.tree.map(lambda x: float(np.max(np.abs(np.asarray(x)))), a.params)))
  with capsys.disabled():
    print(f"\n[multihost] 2 processes x 2 CPU devices vs 1 process: max |param diff| {diff:.3g}, "
          f"max |loss diff| {float(np.max(np.abs(loss2 - loss1))):.3g}")
  assert diff <= 1e-5 and moved > 0.1
  assert np.max(np.abs(loss2 - loss1)) <= 1e-5

  evals.wait()
  eval1.wait()
  one = json.loads((tmp_path / "eval1.json").read_text())
  for i in range(2):
    two = json.loads((tmp_path / f"eval2.{i}.json").read_text())
    for key in ("r@1", "r@5", "r@10", "mrr@10", "num_queries", "step", "num_items"):
      assert two[key] == one[key], (i, key, two[key], one[key])
  assert one["num_queries"] == 12 and one["step"] == 6
  with capsys.disabled():
    print(f"[multihost] eval R@1/R@10/MRR@10 1 process {one['r@1']:.4f}/{one['r@10']:.4f}/"
          f"{one['mrr@10']:.4f}, 2 processes: the same")


def test_a_setup_error_on_process_0_stops_every_process(tmp_path):
  """Process 0 alone copies the index into MODEL_DIR; when that fails, the other process must not
  wait for it at the next collective: both exit with the error (2), within seconds."""
  corpus, _ = _corpus(tmp_path)
  logs = Launch([GIN_FILES[0], str(tmp_path / "run"), f"--gin_file={GIN_FILES[1]}",
                 *_gin(corpus, tmp_path / "no_index")], tmp_path, "bad").wait(timeout=180, expect=2)
  assert "no_index: not an index directory (no meta.json)" in logs[0]
  assert "failed on process(es) [0] (this is process 1)" in logs[1]
  assert not (tmp_path / "run" / "run.json").exists()


def test_launch_scripts_cite_extras_that_exist_and_tpu_command(monkeypatch):
  """What can be checked of the TPU launch without a TPU: the command every worker would run."""
  import re
  import runpy
  import shlex

  import setuptools
  captured = {}
  monkeypatch.chdir(REPO)
  monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
  runpy.run_path(str(REPO / "setup.py"))
  extras = captured["extras_require"]
  for script in (REPO / "launch").glob("*.sh"):
    for name in re.findall(r"\.\[(\w+)\]", script.read_text()):
      assert name in extras, f"{script.name} cites the extra [{name}], setup.py has {sorted(extras)}"
  assert not any(p.startswith("jax[") for p in extras["all"])  # `make install` stays the CPU build

  env = dict(os.environ, DRY_RUN="1", SETUP="1")
  out = subprocess.run(["bash", str(REPO / "launch" / "tpu_vm.sh"), "tpu1", "us-central2-b",
                        "gin_configs/experiments/flickr30k.gin", "gs://bucket/run",
                        "--gin.ModelConfig.fusion='none'"], env=env, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  argv = shlex.split(out.stdout)
  assert argv[:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "tpu1", "--zone", "us-central2-b",
                      "--worker=all"]
  setup_part, run_part = argv[-1].split(" && ")[1:]
  assert shlex.split(setup_part) == ["pip", "install", "-q", "-e", ".[tpu]"]
  assert shlex.split(run_part) == ["CART_DISTRIBUTED=1", "cart", "train",
                                   "--gin-file=gin_configs/experiments/flickr30k.gin",
                                   "--gin.MODEL_DIR=gs://bucket/run", "--quiet",
                                   "--gin.ModelConfig.fusion='none'"]
  out = subprocess.run(["bash", str(REPO / "launch" / "tpu_vm.sh"), "tpu1", "z", "eval", "gs://bucket/run",
                        "--split", "test"], env=dict(os.environ, DRY_RUN="1"), capture_output=True, text=True)
  assert shlex.split(shlex.split(out.stdout)[-1].split(" && ")[-1]) == [
      "CART_DISTRIBUTED=1", "cart", "eval", "--model-dir", "gs://bucket/run", "--quiet", "--split", "test"]
  for script in ("tpu_vm.sh", "multi_gpu.sh"):  # too few arguments: the usage, exit 2
    out = subprocess.run(["bash", str(REPO / "launch" / script)], capture_output=True, text=True)
    assert out.returncode == 2 and "launch/" in out.stdout


def test_index_add_on_two_processes_matches_one_process(tmp_path):
  """``cart index add`` launched on 2 processes x 2 devices (the fine-tune is collective, process
  0 writes the version and switches ``run.json``) gives the run the same add in one process gives."""
  from cart_jax.data.corpus import load_corpus, write_corpus
  from cart_jax.index.identifiers import IdentifierConfig, build_index, load_index
  from cart_jax.runs.restore import load_run

  corpus, _ = _corpus(tmp_path)
  full = load_corpus(corpus)
  old_ids, new_ids = full.item_ids[:9], full.item_ids[9:]
  for name, keep in (("base", set(old_ids)), ("new", set(new_ids))):
    items = [it for it in full.items if it.id in keep]
    write_corpus(tmp_path / name, full.name, full.modality, items,
                 [t for t in full.all_texts if t.item_id in keep],
                 media_sources={it.id: full.media_path(it) for it in items}, media_mode="copy")
  emb = np.random.default_rng(0).normal(size=(12, 8)).astype(np.float32)
  build_index(emb[:9], old_ids, IdentifierConfig(n_clusters=3, num_levels=1, codebook_size=3,
                                                 use_rqvae=False, kmeans_iters=20)).save(tmp_path / "index")
  np.save(tmp_path / "new.npy", emb[9:])
  (tmp_path / "new.ids.txt").write_text("".join(f"{i}\n" for i in new_ids))
  run = tmp_path / "run"
  gin = [f"--gin_file={GIN_FILES[1]}", *_gin(tmp_path / "base", tmp_path / "index"),
         "--gin.TrainConfig.eval_every=0", "--quiet"]
  Launch([GIN_FILES[0], str(run), *gin], tmp_path, "train", processes=1, devices=1).wait()
  runs = {n: tmp_path / f"run_{n}" for n in (1, 2)}
  for dst in runs.values():
    shutil.copytree(run, dst)
  add = ["--corpus", str(tmp_path / "new"), "--embeddings", str(tmp_path / "new.npy"),
         "--steps", "4", "--new-item-prior", "auto", "--quiet"]
  one = Launch(["index", "add", str(runs[1]), *add], tmp_path, "add_1", processes=1, devices=1)
  Launch(["index", "add", str(runs[2]), *add], tmp_path, "add_2").wait()
  one.wait()
  loaded = {n: load_run(d) for n, d in runs.items()}
  for n, d in runs.items():
    r = json.loads((d / "run.json").read_text())
    assert r["index_version"] == 2 and loaded[n].step == 10
    assert sorted(os.listdir(d / "versions")) == ["2"]  # one version, no temporary left
    assert sorted(os.listdir(d / "versions" / "2")) == ["checkpoints", "corpus", "index",
                                                        "update.json"]
  a, b = (load_index(d / "versions" / "2" / "index") for d in runs.values())
  np.testing.assert_array_equal(a.codes, b.codes)
  np.testing.assert_array_equal(a.prior(), b.prior())
  assert a.prior()[9:].min() < 0 and not a.prior()[:9].any()
  diff = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(loaded[1].params), jax.tree.leaves(loaded[2].params)))
  print(f"index add: max |params(2 processes) - params(1 process)| = {diff:.2e}")
  assert diff <= 1e-5
