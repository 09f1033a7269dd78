"""The tiny trained CART runs the tests share (tests/conftest.py makes each one once per session).

* ``train_tiny_run``: 24 emoji, random 8-d item embeddings, identifiers K=4 x one 8-code level
  (+ counter), a tiny T5 CART (16 wide, one encoder and one decoder layer) trained for a few steps
  at a high learning rate, through the real ``cart train`` entry point. Seconds on a 2-core CPU.
  The session fixture ``tiny_run`` (tests/test_export.py, tests/test_compile_cache.py).
* ``train_served_run``: 24 emoji; the built-in dual encoder (2 steps, 16 dimensions) gives the item
  embeddings, the identifiers and the re-ranker; CART is a 16-wide decoder over the frozen MiniLM,
  6 steps. Quality is not judged. The session fixture ``served_run`` (tests/test_serve.py,
  tests/test_browser.py, tests/test_rerank.py).

A test that changes a run works on a copy (the ``copy_run`` fixture), never on the shared one.
"""
import os
import shutil
import types
from pathlib import Path

import numpy as np

from helpers import REPO, require_emoji_and_minilm

TEST_QUERIES = ["smiling cat", "a red heart", "grinning face with big eyes", "thumbs up",
                "dog", "crying face", "fire", "party popper"]


def train_tiny_run(root: Path, *, steps: int = 6, limit: int = 24) -> Path:
  """Prepares the corpus and index under ``root`` and trains ``root / "run"``; returns the run."""
  from cart_jax import api
  from cart_jax.cli.main import main
  from cart_jax.index import identifiers
  from cart_jax.index.identifiers import IdentifierConfig

  corpus, index, run = root / "corpus", root / "index", root / "run"
  ids = api.prepare("emoji", corpus, limit=limit).corpus.item_ids
  emb = np.random.RandomState(0).randn(len(ids), 8).astype(np.float32)
  identifiers.build_index(emb, ids, IdentifierConfig(n_clusters=4, num_levels=1, codebook_size=8,
                                                     rq_steps=10, rq_latent_dim=8,
                                                     rq_hidden_dims=(8,))).save(index)
  argv = ["train", "--gin-file", "gin_configs/models/tiny.gin",
          "--gin-file", "gin_configs/runs/train.gin",
          f"--gin.MODEL_DIR={run}", f"--gin.CORPUS_DIR={corpus}", f"--gin.INDEX_DIR={index}",
          "--gin.ModelConfig.d_model=16", "--gin.ModelConfig.d_ff=16",
          "--gin.ModelConfig.num_heads=2", "--gin.ModelConfig.head_dim=8",
          "--gin.ModelConfig.num_encoder_layers=1", "--gin.ModelConfig.num_decoder_layers=1",
          "--gin.TrainConfig.omega=0.0", "--gin.TrainConfig.learning_rate=0.01",
          "--gin.InputConfig.batch_size=8", "--gin.InputConfig.input_length=16",
          "--gin.InputConfig.pipeline='numpy'", "--gin.TrainConfig.warmup_steps=1",
          f"--gin.TrainConfig.num_steps={steps}", f"--gin.TrainConfig.checkpoint_every={steps}",
          "--gin.TrainConfig.keep_checkpoints=1", "--gin.TrainConfig.eval_every=0", "--quiet"]
  assert main(argv) == 0
  return run


SERVED_STEPS = 6


def train_served_run(root: Path) -> types.SimpleNamespace:
  """``(root, corpus, emb, run)`` of the MiniLM run with a re-ranker, trained under ``root``;
  skips when its inputs are not installed."""
  require_emoji_and_minilm()
  from cart_jax import api
  from cart_jax.cli.main import main as cart
  corpus = api.prepare("emoji", root / "corpus", limit=24).corpus
  emb = root / "emb" / "E.npy"
  assert cart(["embed", "--corpus", str(corpus.root), "--out", str(emb),
               "--steps", "2", "--batch-size", "8", "--dim", "16", "--text-batch", "16",
               "--checkpoint-every", "0", "--quiet"]) == 0
  assert cart(["build-ids", "--embeddings", str(emb), "--item-ids",
               str(root / "emb" / "E.ids.txt"), "--out", str(root / "index"), "--clusters", "3",
               "--levels", "1", "--codebook-size", "4", "--rq-steps", "10", "--rq-latent-dim", "8",
               "--quiet"]) == 0
  run = root / "run"
  assert cart(["train", f"--gin_file={REPO / 'gin_configs/experiments/emoji_demo.gin'}",
               f"--gin.MODEL_DIR={run}", f"--gin.CORPUS_DIR={corpus.root}",
               f"--gin.INDEX_DIR={root / 'index'}", f"--gin.EMBEDDINGS={emb}",
               "--gin.ModelConfig.d_model=16", "--gin.ModelConfig.d_ff=16",
               "--gin.ModelConfig.num_heads=2", "--gin.ModelConfig.head_dim=8",
               "--gin.ModelConfig.num_decoder_layers=1", "--gin.InputConfig.batch_size=8",
               "--gin.InputConfig.input_length=16", "--gin.TrainConfig.warmup_steps=1",
               f"--gin.TrainConfig.num_steps={SERVED_STEPS}", "--gin.TrainConfig.log_every=3",
               "--quiet"]) == 0
  assert (run / "rerank" / "meta.json").is_file(), "training did not build the re-ranker"
  return types.SimpleNamespace(root=root, corpus=corpus, emb=emb, run=run)


def copy_run(src: Path, dst: Path) -> Path:
  """A copy of the run ``src`` at ``dst`` by hard links (no bytes copied). The run's writers
  replace files (write a new file, then rename), so changing the copy leaves ``src`` as it was;
  a test that edits a file in place must copy that file for real first."""
  shutil.copytree(src, dst, copy_function=os.link)
  return dst


def free_port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]
