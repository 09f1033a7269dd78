"""Trainer: exact resume after a SIGKILL, checkpoint restore, deterministic input pipeline.

The killed run is a real subprocess: it trains with checkpoints every 2 steps and blocks for
ever after the step-4 checkpoint; the test kills it with SIGKILL once that checkpoint is
committed, resumes in this process up to step 6 and compares the parameters with an
uninterrupted 6-step run (same dropout masks: keys are fold_in(seed, step)).
"""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from cart_jax.data.corpus import Corpus, Item, Text
from cart_jax.index.identifiers import IdentifierConfig, SemanticIndex
from cart_jax.index.vocab import IdentifierVocab
from cart_jax.runs.restore import restore_for_inference
from cart_jax.train import input_pipeline, trainer

REPO = Path(__file__).resolve().parents[1]

# Shared by this process and the killed child (exec'd there).
SETUP = textwrap.dedent("""
    import numpy as np
    from cart_jax.index.identifiers import IdentifierConfig, SemanticIndex
    from cart_jax.index.vocab import IdentifierVocab
    from cart_jax.models.cart.config import tiny, with_vocab
    from cart_jax.train import input_pipeline, trainer

    VOCAB = IdentifierVocab((3, 3, 2))
    CODES = np.array([[0, 0, 0], [0, 1, 0], [1, 0, 0], [1, 0, 1], [2, 2, 0], [2, 1, 0]], np.int32)
    INDEX = SemanticIndex(codes=CODES, item_ids=[f"i{r}" for r in range(6)], vocab=VOCAB,
                          config=IdentifierConfig(n_clusters=3, num_levels=1, codebook_size=3),
                          embedding_dim=4, input_hash="test")
    MODEL = with_vocab(tiny(input_vocab_size=40, d_model=16, num_heads=2, head_dim=8, d_ff=16,
                            num_encoder_layers=1, num_decoder_layers=1, fusion="none"), VOCAB)
    TRAIN = trainer.TrainConfig(num_steps=6, warmup_steps=2, learning_rate=1e-2, omega=1.0,
                                log_every=100, checkpoint_every=2, keep_checkpoints=2, seed=3)

    class SyntheticPipeline:
      \"\"\"batch_at(step) depends only on the step (like the real pipelines).\"\"\"
      def __init__(self, block_after=None):
        self.block_after = block_after
      def batch_at(self, step):
        rs = np.random.RandomState(step)
        rows = rs.randint(0, 6, 8)
        inputs = rs.randint(1, 40, (8, 5)).astype(np.int32)
        return input_pipeline.model_features(inputs, VOCAB.codes_to_tokens(CODES[rows]))
      def iterate(self, start):
        step = start
        while True:
          if self.block_after is not None and step >= self.block_after:
            import time
            while True:
              time.sleep(1)
          yield self.batch_at(step)
          step += 1
""")


def _ns():
  ns = {}
  exec(SETUP, ns)  # pylint: disable=exec-used
  return ns


def _params_close(a, b, atol):
  diffs = jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b))
  return max(diffs)


def test_resume_after_sigkill_matches_uninterrupted(tmp_path):
  ns = _ns()
  # The run to be killed: child process, blocks before step 5 (after the step-4 checkpoint).
  ckpt = tmp_path / "ckpt"
  child_src = SETUP + textwrap.dedent(f"""
      trainer.train(model_config=MODEL, train_config=TRAIN, pipeline=SyntheticPipeline(block_after=4),
                    index=INDEX, checkpoint_dir={str(ckpt)!r}, progress=False, log=lambda s: None)
  """)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  child = subprocess.Popen([sys.executable, "-c", child_src], cwd=REPO, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  try:
    # Meanwhile: the uninterrupted run (no checkpoints) in this process.
    full = trainer.train(model_config=ns["MODEL"], train_config=ns["TRAIN"],
                         pipeline=ns["SyntheticPipeline"](), index=ns["INDEX"], checkpoint_dir=None,
                         progress=False, log=lambda s: None)
    deadline = time.time() + 240
    while not (ckpt / "4" / "manifest.sha256.json").exists():  # written once orbax's save is complete
      assert child.poll() is None, f"child died early: {child.stderr.read().decode()[-2000:]}"
      assert time.time() < deadline, "child never wrote the step-4 checkpoint"
      time.sleep(0.2)
    time.sleep(0.5)
  finally:
    child.send_signal(signal.SIGKILL)
    child.wait()
  assert child.returncode == -signal.SIGKILL
  assert sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) == [2, 4]  # keep-2

  logs = []
  resumed = trainer.train(model_config=ns["MODEL"], train_config=ns["TRAIN"],
                          pipeline=ns["SyntheticPipeline"](), index=ns["INDEX"], checkpoint_dir=ckpt,
                          progress=False, log=logs.append)
  assert resumed.start_step == 4 and any("resumed" in m for m in logs)
  assert int(resumed.state.step) == int(full.state.step) == 6
  assert _params_close(resumed.state.params, full.state.params, 0) < 1e-5
  # Optimizer moments too.
  assert _params_close(resumed.state.opt_state, full.state.opt_state, 0) < 1e-5
  # Inference restore reads the newest checkpoint (step 6, written by the resumed run); keep-2
  # dropped step 2. Steps 5-6 changed the parameters, so the equality above is not trivial.
  _, params, frozen, step = restore_for_inference(ns["MODEL"], ckpt)
  assert step == 6 and _params_close(params, full.state.params, 0) < 1e-5
  assert sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) == [4, 6]
  _, params4, _, step4 = restore_for_inference(ns["MODEL"], ckpt, step=4)
  assert step4 == 4 and _params_close(params4, full.state.params, 0) > 1e-3


def test_learning_rate_schedule_warmup_and_decay():
  c = trainer.TrainConfig(num_steps=100, warmup_steps=10, learning_rate=1e-3, end_lr_fraction=0.1)
  lr = trainer.learning_rate_schedule(c)
  assert float(lr(0)) == 0.0
  assert abs(float(lr(10)) - 1e-3) < 1e-9
  assert abs(float(lr(100)) - 1e-4) < 1e-8
  assert float(lr(5)) == pytest.approx(5e-4)


def test_numpy_pipeline_is_deterministic_by_step_and_mixes_captions():
  vocab = IdentifierVocab((2, 2, 2))
  codes = np.array([[0, 0, 0], [0, 1, 0], [1, 0, 0], [1, 1, 0]], np.int32)
  ids = ["a", "b", "c", "d"]
  index = SemanticIndex(codes=codes, item_ids=ids, vocab=vocab, config=IdentifierConfig(),
                        embedding_dim=4, input_hash="t")
  texts = [Text(i, f"query {n} for {i}", "train", "query") for n in range(3) for i in ids]
  texts += [Text(i, f"caption {i}", "train", "caption") for i in ids]
  corpus = Corpus("t", "image", [Item(i, "image", f"media/{i}.png") for i in ids], texts)
  cfg = input_pipeline.InputConfig(batch_size=4, input_length=8, caption_rate=0.25, seed=1)
  a = input_pipeline.NumpyPipeline(corpus, index, cfg)
  b = input_pipeline.NumpyPipeline(corpus, index, cfg)
  it = a.iterate(0)
  first = [next(it) for _ in range(7)]
  for step in (0, 3, 6):
    for k, v in b.batch_at(step).items():
      np.testing.assert_array_equal(v, first[step][k])
  batch = first[0]
  assert batch["encoder_input_tokens"].shape == (4, 8) and batch["decoder_target_tokens"].shape == (4, 3)
  np.testing.assert_array_equal(batch["decoder_input_tokens"][:, 0], 1)  # START_ID
  np.testing.assert_array_equal(batch["decoder_input_tokens"][:, 1:], batch["decoder_target_tokens"][:, :-1])
  assert a.num_captions_per_batch == 1
  # 12 queries, 3 per batch: steps 0..3 cover every query exactly once (one epoch).
  seen = np.concatenate([a.queries.rows(s * 3, 3) for s in range(4)])
  assert sorted(seen.tolist()) == list(range(12))
  # Targets are the identifier tokens of the text's item.
  tok = vocab.codes_to_tokens(codes)
  for row, tgt in zip(a.queries.rows(0, 3), first[0]["decoder_target_tokens"][:3]):
    np.testing.assert_array_equal(tgt, a.queries.targets[row])
    assert any((tgt == t).all() for t in tok)
