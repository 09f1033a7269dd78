"""A tiny trained CART run for the tests that need one (export, compilation cache).

24 emoji, random 8-d item embeddings, identifiers K=4 x one 8-code level (+ counter), a tiny T5
CART (16 wide, one encoder and one decoder layer) trained for a few steps at a high learning
rate, through the real ``cart train`` entry point. Seconds on a 2-core CPU.
"""
from pathlib import Path

import numpy as np

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
