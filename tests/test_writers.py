"""Writers that are safe together (issue 19, item 6): core/artefacts.py's output lock, the
directory swap, the cleaning of dead writers' litter; `cart build-ids` and `cart train` on an
output another process is writing.

Helper processes are plain Python (no JAX) except the two `cart build-ids` runs.
"""
import collections
import contextlib
import json
import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cart_jax.core import artefacts
from cart_jax.core.artefacts import OutputLockedError, atomic_directory, output_lock
from cart_jax.core.errors import CartError

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def _siblings(target: Path) -> list[str]:
  """Everything beside ``target`` that a writer of it made (temporaries, old copies, locks)."""
  return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


def _commit(target, tag, wait):
  with atomic_directory(target, wait=wait) as tmp:
    for j in range(3):
      (tmp / f"part{j}.txt").write_text(tag)
    time.sleep(0.001)  # a writer that takes a moment: commits overlap


def _consistent_tag(target: Path) -> str:
  tags = {(target / f"part{j}.txt").read_text() for j in range(3)}
  assert sorted(os.listdir(target)) == ["part0.txt", "part1.txt", "part2.txt"]
  assert len(tags) == 1, tags
  return tags.pop()


def _stress_worker(target, n, wait, barrier, queue):
  barrier.wait()
  out = collections.Counter()
  for i in range(n):
    try:
      _commit(target, f"{os.getpid()}-{i}", wait)
      out["ok"] += 1
    except OutputLockedError as e:
      assert re.fullmatch(rf"{re.escape(str(target))} is being written by pid \d+ \(since .*\); "
                          rf"wait for it or remove .*\.target\.lock if that process is gone",
                          str(e)), e
      out["locked"] += 1
    except Exception as e:  # pylint: disable=broad-except
      out[f"{type(e).__name__}: {e}"] += 1
  queue.put(dict(out))


@pytest.mark.parametrize("wait", [False, True], ids=["fail", "wait"])
def test_stress_processes_one_target(tmp_path, wait):
  """4 processes x 50 commits to one target. Before the lock, 3 of 600 commits raised
  FileNotFoundError / OSError ("Directory not empty") and leaked .old-* directories."""
  target = tmp_path / "target"
  ctx = mp.get_context("fork")
  barrier, queue = ctx.Barrier(4), ctx.Queue()
  procs = [ctx.Process(target=_stress_worker, args=(target, 50, wait, barrier, queue))
           for _ in range(4)]
  for p in procs:
    p.start()
  total = collections.Counter()
  for _ in procs:
    total.update(queue.get(timeout=60))
  for p in procs:
    p.join(timeout=10)
    assert p.exitcode == 0
  if wait:
    assert total == {"ok": 200}, total
  else:  # every commit either landed or was refused by the lock; both happened
    assert set(total) == {"ok", "locked"} and sum(total.values()) == 200, total
  assert _siblings(target) == []  # no temporaries, no old copies, no lock file left behind
  assert re.fullmatch(r"\d+-\d+", _consistent_tag(target))
  assert oct(target.stat().st_mode & 0o777) == oct(0o777 & ~artefacts._umask())


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "move-aside"])
def test_stress_threads_one_target_target_never_missing(tmp_path, monkeypatch, exchange):
  """4 threads x 50 commits (waiting for each other) while a reader watches the target: it is
  never missing with renameat2's exchange; the move-aside fallback is race-free too."""
  if not exchange:
    monkeypatch.setattr(artefacts, "_RENAMEAT2", [None])
  elif artefacts._renameat2() is None:
    pytest.skip("no renameat2 here")
  target = tmp_path / "target"
  _commit(target, "first", wait=False)
  errors, missing, done = [], [], threading.Event()

  def writer(k):
    try:
      for i in range(50):
        _commit(target, f"t{k}-{i}", wait=True)
    except BaseException as e:  # pylint: disable=broad-except
      errors.append(e)

  def reader():
    while not done.is_set():
      if not target.is_dir():
        missing.append(time.perf_counter())

  threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
  watch = threading.Thread(target=reader)
  watch.start()
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  done.set()
  watch.join()
  assert errors == []
  assert _siblings(target) == []
  assert re.fullmatch(r"t\d-\d+", _consistent_tag(target))
  if exchange:
    assert missing == []


def test_lock_is_per_thread_reentrant_and_names_the_holder(tmp_path):
  target = tmp_path / "ix"
  with output_lock(target) as lock:
    assert lock == tmp_path / ".ix.lock"
    pid, host, since = lock.read_text().split()
    assert int(pid) == os.getpid() and abs(float(since) - time.time()) < 60
    with atomic_directory(target) as tmp:  # the same thread: re-entrant (a build, then its save)
      (tmp / "a").write_text("1")
    assert (target / "a").read_text() == "1" and lock.exists()
    raised = []

    def other_thread():
      try:
        with atomic_directory(target):
          pass
      except OutputLockedError as e:
        raised.append(str(e))

    t = threading.Thread(target=other_thread)
    t.start()
    t.join()
    assert len(raised) == 1 and f"being written by pid {os.getpid()} (since " in raised[0]
  assert not lock.exists()  # removed on release
  assert issubclass(OutputLockedError, CartError)


def test_failed_block_leaves_the_old_target_and_nothing_else(tmp_path):
  target = tmp_path / "ix"
  _commit(target, "good", wait=False)
  with pytest.raises(RuntimeError, match="boom"):
    with atomic_directory(target) as tmp:
      (tmp / "part0.txt").write_text("half")
      raise RuntimeError("boom")
  assert _consistent_tag(target) == "good" and _siblings(target) == []


def test_forked_child_does_not_inherit_the_lock(tmp_path):
  """A child forked inside the block neither holds nor removes its parent's lock."""
  target = tmp_path / "ix"
  with output_lock(target) as lock:
    pid = os.fork()
    if pid == 0:  # child: the lock is its parent's, not re-entrant here
      code = 3
      try:
        with output_lock(target):
          code = 1
      except OutputLockedError as e:
        code = 0 if f"pid {os.getppid()}" in str(e) else 2
      finally:
        os._exit(code)  # pylint: disable=protected-access
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert lock.exists() and lock.read_text().split()[0] == str(os.getpid())


# ---------------------------------------------------------------------------------------
# Killed writers: litter cleaned, lock taken over.

_HOLD = textwrap.dedent("""
  import sys, time
  from pathlib import Path
  from cart_jax.core import artefacts
  kind, target = sys.argv[1], Path(sys.argv[2])
  if kind == "dir":
    with artefacts.atomic_directory(target) as tmp:
      (tmp / "half.txt").write_text("half")
      print("ready", flush=True)
      time.sleep(120)
  elif kind == "lock":
    with artefacts.output_lock(target):
      print("ready", flush=True)
      time.sleep(120)
  else:
    def write(tmp):
      Path(tmp).write_text("half")
      print("ready", flush=True)
      time.sleep(120)
    artefacts.atomic_write_via(target, write)
""")


def _hold(kind, target) -> subprocess.Popen:
  """A helper process that is in the middle of writing ``target`` (until killed)."""
  proc = subprocess.Popen([sys.executable, "-c", _HOLD, kind, str(target)], env=ENV,
                          stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "ready"
  return proc


def _kill(proc):
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=10)
  proc.stdout.close()


def test_killed_directory_writer_litter_cleaned_and_lock_taken_over(tmp_path):
  target = tmp_path / "ix"
  _commit(target, "old", wait=False)
  writer = _hold("dir", target)
  try:
    with pytest.raises(OutputLockedError,
                       match=rf"ix is being written by pid {writer.pid} \(since "):
      _commit(target, "second", wait=False)
  finally:
    _kill(writer)
  litter = _siblings(target)
  assert len(litter) == 2 and ".ix.lock" in litter, litter
  tmp_name = next(n for n in litter if n != ".ix.lock")
  assert tmp_name.startswith(f".ix.tmp-{writer.pid}.") and _consistent_tag(target) == "old"
  # Litter the next run must keep: a live process's, another host's, an untagged (old-format) one.
  live = _hold("lock", tmp_path / "unrelated")
  try:
    keep = [f".ix.tmp-{live.pid}.{artefacts._HOST}-abcdefgh",
            f".ix.tmp-{writer.pid}.{'0' * 8 if artefacts._HOST != '0' * 8 else '1' * 8}-abcdefgh",
            ".ix.tmp-x1y2z3"]
    dead_old = f".ix.old-{writer.pid}.{artefacts._HOST}-abcdefgh"  # killed mid-swap
    for name in keep + [dead_old]:
      (tmp_path / name).mkdir()
      (tmp_path / name / "f").write_text("x")
    _commit(target, "new", wait=False)  # the dead writer's lock is taken over
    assert _consistent_tag(target) == "new"
    assert _siblings(target) == sorted(keep)
  finally:
    _kill(live)


def test_killed_file_writer_litter_cleaned(tmp_path):
  path = tmp_path / "summary.json"
  writer = _hold("file", path)
  _kill(writer)
  (litter,) = _siblings(tmp_path / "summary")
  assert litter.startswith(f".summary.tmp-{writer.pid}.") and litter.endswith(".json")
  artefacts.atomic_write_json(path, {"a": 1})
  assert json.loads(path.read_text()) == {"a": 1}
  assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
  assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~artefacts._umask())


# ---------------------------------------------------------------------------------------
# The commands.

_SLOW_BUILD = textwrap.dedent("""
  import os, sys, time
  from pathlib import Path
  import numpy as np
  ready, go = Path(sys.argv[1]), Path(sys.argv[2])
  save = np.save
  def paused_save(file, *args, **kwargs):  # pauses inside the index's atomic_directory block
    if ".tmp-" in str(file) and not ready.exists():
      ready.write_text(str(os.getpid()))
      while not go.exists():
        time.sleep(0.02)
    return save(file, *args, **kwargs)
  np.save = paused_save
  from cart_jax.cli.main import main
  sys.exit(main(sys.argv[3:]))
""")


@contextlib.contextmanager
def _slow_build(tmp_path, argv):
  """``cart ARGV`` in a subprocess, paused inside its output's atomic block (it holds the lock)
  until the ``with`` block ends; then it finishes, and must succeed."""
  ready, go = tmp_path / "ready", tmp_path / "go"
  first = subprocess.Popen([sys.executable, "-c", _SLOW_BUILD, str(ready), str(go), *argv], env=ENV,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    for _ in range(1200):
      if ready.exists() or first.poll() is not None:
        break
      time.sleep(0.05)
    assert ready.exists(), first.communicate()
    yield first
  finally:
    go.write_text("")
    _, err = first.communicate(timeout=300)
  assert first.returncode == 0, err


def _cart(argv) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "cart_jax.cli.main", *argv], env=ENV,
                        capture_output=True, text=True, timeout=300)


def test_two_build_ids_to_one_out(tmp_path):
  """The second `cart build-ids` while the first is writing --out: exit 2 naming its pid; the
  first then completes. (The first is paused deterministically inside its write.)"""
  from cart_jax.data.datasets.synthetic import structured_embeddings
  emb, out = tmp_path / "emb.npy", tmp_path / "ix"
  np.save(emb, structured_embeddings(60, 8, n_topics=4, n_subtopics=2))
  args = ["build-ids", "--embeddings", str(emb), "--out", str(out), "--clusters", "3", "--levels",
          "1", "--codebook-size", "4", "--no-rqvae", "--quiet"]  # --no-rqvae: the faster build
  with _slow_build(tmp_path, args) as first:
    second = _cart(args)
    assert second.returncode == 2, second.stderr
    assert re.fullmatch(rf"cart build-ids: error: {re.escape(str(out))} is being written by pid "
                        rf"{first.pid} \(since [-0-9: ]+\); wait for it or remove "
                        rf"{re.escape(str(tmp_path / '.ix.lock'))} if that process is gone\n",
                        second.stderr), second.stderr
    assert not out.exists()  # the refused writer wrote nothing
  meta = json.loads((out / "meta.json").read_text())
  assert meta["n_items"] == 60 and np.load(out / "codes.npy").shape == (60, meta["id_length"])
  assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.npy", "go", "ix", "ready"]


def _train_error(capsys, model_dir, corpus, tmp_path) -> str:
  """`cart train` of the emoji demo into ``model_dir``, which must fail (exit 2); its stderr."""
  from cart_jax.cli.main import main
  assert main(["train", "--gin-file", str(REPO / "gin_configs/experiments/emoji_demo.gin"),
               f"--gin.MODEL_DIR={model_dir}", f"--gin.CORPUS_DIR={corpus}",
               f"--gin.INDEX_DIR={tmp_path / 'index'}", "--no-progress"]) == 2
  return capsys.readouterr().err


def test_train_on_a_model_dir_being_written(tmp_path, capsys):
  """`cart train` on a MODEL_DIR another process holds: exit 2 naming that pid, before reading
  the corpus or writing anything; once the holder is killed, the lock is taken over."""
  model_dir, corpus = tmp_path / "run", tmp_path / "no_corpus"
  holder = _hold("lock", model_dir)
  try:
    # one line: gin's "In call to configurable 'train_job'" suffix is stripped (gin_bridge.run_train)
    err = _train_error(capsys, model_dir, corpus, tmp_path)
    assert re.fullmatch(rf"cart train: error: {re.escape(str(model_dir))} is being written by pid "
                        rf"{holder.pid} \(since [-0-9: ]+\); wait for it or remove "
                        rf"{re.escape(str(tmp_path / '.run.lock'))} if that process is gone\n", err), err
    assert not model_dir.exists() and not corpus.exists()
  finally:
    _kill(holder)
  assert (tmp_path / ".run.lock").exists()  # the killed holder's
  err = _train_error(capsys, model_dir, corpus, tmp_path)  # now past the lock: the missing corpus
  assert "being written" not in err and str(corpus) in err, err
  assert not (tmp_path / ".run.lock").exists()  # released on the way out


# ---------------------------------------------------------------------------------------
# Outputs named through a symbolic link (issue 28, case 1): one lock per real path, and the
# writers write through the link (the link stays; its target gets the new content).


def test_lock_is_keyed_on_the_real_path(tmp_path):
  """A writer of ``link`` and one of its target take the same lock. Before: two locks
  (``.link.lock`` and ``.ix.lock``), both writers went ahead."""
  target, link = tmp_path / "ix", tmp_path / "link"
  target.mkdir()
  link.symlink_to(target)
  holder = _hold("lock", target)
  try:
    with pytest.raises(OutputLockedError, match=rf"link is being written by pid {holder.pid} "
                                                rf"\(since .*\(real path {re.escape(str(target))}\)"):
      with output_lock(link):
        pass
  finally:
    _kill(holder)
  assert artefacts.lock_path(link) == artefacts.lock_path(target) == tmp_path / ".ix.lock"
  # a link to the parent directory leads to the same lock too
  (tmp_path / "up").symlink_to(tmp_path)
  assert artefacts.lock_path(tmp_path / "up" / "link") == tmp_path / ".ix.lock"


def test_atomic_writers_write_through_a_link(tmp_path):
  """A directory or file output that is a symbolic link keeps being the link: the new content
  goes to its target. Before: the link was replaced by a directory (or a file)."""
  real = tmp_path / "data" / "ix"
  real.parent.mkdir()
  _commit(real, "old", wait=False)
  link = tmp_path / "ix"
  link.symlink_to(real)
  _commit(link, "new", wait=False)
  assert link.is_symlink() and os.readlink(link) == str(real)
  assert _consistent_tag(real) == "new" and _siblings(real) == [] and _siblings(link) == []
  real_file = tmp_path / "data" / "summary.json"
  file_link = tmp_path / "summary.json"
  file_link.symlink_to(real_file)  # dangling until written: written through too
  artefacts.atomic_write_json(file_link, {"a": 1})
  assert file_link.is_symlink() and json.loads(real_file.read_text()) == {"a": 1}
  artefacts.atomic_write_via(file_link, lambda tmp: Path(tmp).write_text("{\"a\": 2}"))
  assert file_link.is_symlink() and json.loads(real_file.read_text()) == {"a": 2}


def test_build_ids_into_a_link_beside_a_build_into_its_target(tmp_path):
  """`cart build-ids --out LINK` while another build writes LINK's target: exit 2 naming that
  pid, and the link is still the link. Before: both exited 0 and LINK became a directory."""
  from cart_jax.data.datasets.synthetic import structured_embeddings
  emb, out, link = tmp_path / "emb.npy", tmp_path / "ix", tmp_path / "link"
  np.save(emb, structured_embeddings(60, 8, n_topics=4, n_subtopics=2))
  common = ["--embeddings", str(emb), "--clusters", "3", "--levels", "1", "--codebook-size", "4",
            "--no-rqvae", "--quiet"]
  out.mkdir()
  link.symlink_to(out)
  with _slow_build(tmp_path, ["build-ids", "--out", str(out), *common]) as first:
    second = _cart(["build-ids", "--out", str(link), *common])
    assert second.returncode == 2, second.stderr
    assert second.stderr.startswith(f"cart build-ids: error: {link} is being written by pid "
                                     f"{first.pid} (since "), second.stderr
    assert second.stderr.count("\n") == 1, second.stderr
  assert link.is_symlink() and (link / "meta.json").is_file()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.npy", "go", "ix", "link", "ready"]


def test_train_through_a_link_to_a_model_dir_being_written(tmp_path, capsys):
  """`cart train` with MODEL_DIR a link to a directory another process holds: exit 2 naming
  that pid. Before: the lock was ``.link.lock`` and two trainings wrote one MODEL_DIR (checkpoint
  60 twice, step 60 twice in metrics.jsonl)."""
  model_dir, link, corpus = tmp_path / "run", tmp_path / "link", tmp_path / "no_corpus"
  model_dir.mkdir()
  link.symlink_to(model_dir)
  holder = _hold("lock", model_dir)
  try:
    err = _train_error(capsys, link, corpus, tmp_path)
    assert re.fullmatch(rf"cart train: error: {re.escape(str(link))} is being written by pid "
                        rf"{holder.pid} \(since [-0-9: ]+\) \(real path {re.escape(str(model_dir))}\); "
                        rf"wait for it or remove {re.escape(str(tmp_path / '.run.lock'))} if that "
                        rf"process is gone\n", err), err
  finally:
    _kill(holder)


def test_write_corpus_through_a_link(tmp_path):
  """`write_corpus(overwrite=True)` into a link replaces the link's target. Before: the link was
  moved aside (and left there: rmtree cannot remove a link) and a directory took its place."""
  from cart_jax.data.corpus import Item, Text, write_corpus

  def media(tmp):
    (tmp / "media").mkdir()
    (tmp / "media" / "a.png").write_bytes(b"png")

  items, texts = [Item("a", "image", "media/a.png")], [Text("a", "an apple")]
  real, link = tmp_path / "data" / "corpus", tmp_path / "corpus"
  write_corpus(real, "c", "image", items, texts, media_writer=media)
  link.symlink_to(real)
  corpus = write_corpus(link, "c2", "image", items, texts, media_writer=media, overwrite=True)
  assert corpus.root == link and corpus.name == "c2"
  assert link.is_symlink() and json.loads((real / "corpus.json").read_text())["name"] == "c2"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "data"]
  assert sorted(p.name for p in real.parent.iterdir()) == ["corpus"]


def test_file_writers_write_into_a_fifo_or_device(tmp_path):
  """An output that is a FIFO (or a device: ``--json /dev/null``) is written into, never renamed
  over. Before: the rename made it a regular file (as root, ``/dev/null`` for the whole machine)."""
  import stat
  fifo = tmp_path / "out.json"
  os.mkfifo(fifo)
  reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # so that opening it to write never blocks
  try:
    artefacts.atomic_write_json(fifo, {"a": 1})
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert json.loads(os.read(reader, 1000)) == {"a": 1}
    artefacts.atomic_write_via(fifo, lambda name: Path(name).write_text("2"))
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and os.read(reader, 1000) == b"2"
  finally:
    os.close(reader)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]  # no temporary left
  artefacts.atomic_write_json(os.devnull, {"a": 1})
  assert stat.S_ISCHR(os.stat(os.devnull).st_mode)
