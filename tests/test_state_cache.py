"""The frozen-encoder state cache: same numbers as running the encoder, reuse, rebuild, errors.

The network is a small decoder over the real pretrained MiniLM (frozen), as in ``minilm_frozen``.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cart_jax.models.cart import losses
from cart_jax.models.cart.config import minilm_frozen
from cart_jax.models.cart.network import create_model, load_pretrained_encoder, shift_right
from cart_jax.train import input_pipeline, state_cache, trainer

TEXTS = ["a dog face", "grinning face with big eyes", "red apple", "a dog face",
         "thumbs up sign", "flag of japan", "smiling cat with heart eyes"]


@pytest.fixture(scope="module")
def net():
  cfg = minilm_frozen(d_model=32, num_heads=2, head_dim=16, d_ff=32, num_decoder_layers=1,
                      output_vocab_size=12, dropout_rate=0.0)
  model = load_pretrained_encoder(create_model(cfg, host_init=True))
  graphdef, params, frozen = nnx.split(model, trainer.trainable_filter(cfg), ...)
  return cfg, model, graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)


def _build(net, root, rows, **kw):
  cfg, _, graphdef, params, frozen = net
  return trainer.build_state_cache(graphdef, params, frozen, cfg, rows, root=root, progress=False,
                                   log=lambda s: None, **kw)


def test_cached_states_equal_the_encoder_and_train_the_same_loss(net, tmp_path):
  cfg, model, _, _, _ = net
  rows = input_pipeline.encode_texts(TEXTS, 16)  # [7, 16]
  cache = _build(net, tmp_path, rows)
  assert cache.num_texts == 6  # one duplicate text
  assert cache.num_layers == 6 and cache.width == 384
  # stored: only real tokens (padding trimmed), float16
  assert cache.states.shape[0] == int((rows != 0).sum(axis=1)[[0, 1, 2, 4, 5, 6]].sum())
  assert cache.states.dtype == np.float16
  got = cache.lookup(rows).astype(np.float32)  # [7, 6, 16, 384]
  want = np.asarray(model.encoder_states(jnp.asarray(rows), jnp.asarray(rows != 0)))
  mask = (rows != 0)[:, None, :, None]
  np.testing.assert_allclose(got * mask, want * mask, atol=2e-2, rtol=1e-2)
  assert np.all(got[~np.broadcast_to(mask, got.shape)] == 0)

  targets = jnp.asarray(np.random.default_rng(0).integers(2, 12, (7, 3)), jnp.int32)
  batch = {"inputs": jnp.asarray(rows), "targets": targets, "decoder_inputs": shift_right(targets)}
  l_tokens, _ = losses.compute_loss(model, batch, omega=0.0, dropout_rng=None)
  l_states, _ = losses.compute_loss(model, {**batch, "states": jnp.asarray(cache.lookup(rows))},
                                    omega=0.0, dropout_rng=None)
  assert abs(float(l_tokens) - float(l_states)) < 2e-3 * max(1.0, abs(float(l_tokens)))


def test_fusion_none_caches_only_the_last_layer(net, tmp_path):
  cfg = net[0].replace(fusion="none")
  assert state_cache.fused_layers(cfg) == (5,)
  assert state_cache.fused_layers(net[0]) == tuple(range(6))


def test_reuse_rebuild_on_corruption_and_new_key(net, tmp_path):
  rows = input_pipeline.encode_texts(TEXTS[:3], 12)
  calls = []
  fp = "weights-a"

  def encode(ids, mask):
    calls.append(ids.shape)
    return np.ones((ids.shape[0], 2, ids.shape[1], 4), np.float32) * ids[:, None, :, None]

  logs = []
  c1 = state_cache.load_or_build(rows, fingerprint=fp, layers=(0, 1), encode=encode, root=tmp_path,
                                 progress=False, log=logs.append)
  n_calls = len(calls)
  assert n_calls >= 1
  c2 = state_cache.load_or_build(rows, fingerprint=fp, layers=(0, 1), encode=encode, root=tmp_path,
                                 progress=False, log=logs.append)
  assert len(calls) == n_calls and c2.directory == c1.directory and "reusing" in logs[-1]
  before = c1.lookup(rows)
  np.testing.assert_array_equal(c2.lookup(rows), before)
  # corrupt one byte of the states: detected by its hash, rebuilt, same values again
  with open(c1.directory / "states.f16", "r+b") as f:
    f.seek(10)
    b = f.read(1)
    f.seek(10)
    f.write(bytes([b[0] ^ 0xFF]))
  c3 = state_cache.load_or_build(rows, fingerprint=fp, layers=(0, 1), encode=encode, root=tmp_path,
                                 progress=False, log=logs.append)
  assert len(calls) > n_calls and any("sha256 mismatch" in m for m in logs)
  np.testing.assert_array_equal(c3.lookup(rows), before)
  # a truncated meta.json is rebuilt too
  (c3.directory / "meta.json").write_text("{", encoding="utf-8")
  state_cache.load_or_build(rows, fingerprint=fp, layers=(0, 1), encode=encode, root=tmp_path,
                            progress=False, log=logs.append)
  assert json.loads((c3.directory / "meta.json").read_text())["num_texts"] == 3
  # other weights -> another cache directory
  c4 = state_cache.load_or_build(rows, fingerprint="weights-b", layers=(0, 1), encode=encode,
                                 root=tmp_path, progress=False, log=logs.append)
  assert c4.directory != c1.directory
  # no temporary directories left behind
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_unknown_text_is_an_error_unless_it_can_be_encoded(net, tmp_path):
  rows = input_pipeline.encode_texts(TEXTS[:2], 12)
  enc = lambda ids, mask: np.zeros((ids.shape[0], 1, ids.shape[1], 4), np.float32)
  c = state_cache.load_or_build(rows, fingerprint="x", layers=(0,), encode=enc, root=tmp_path,
                                progress=False, log=lambda s: None)
  other = input_pipeline.encode_texts(["never seen"], 12)
  with pytest.raises(state_cache.StateCacheError, match="not in the encoder-state cache"):
    c.lookup(other)
  with pytest.raises(state_cache.StateCacheError, match="input_length changed"):
    c.lookup(input_pipeline.encode_texts(["a"], 8))
  c.encode_missing = lambda ids: np.full((ids.shape[0], 1, ids.shape[1], 4), 7.0, np.float32)
  got = c.lookup(np.concatenate([rows, other]))
  assert c.misses == 1 and np.all(got[2] == 7.0) and np.all(got[:2] == 0.0)


def test_states_need_a_frozen_encoder(net):
  cfg, model, _, _, _ = net
  unfrozen = create_model(cfg.replace(freeze_encoder=False), host_init=True)
  ids = jnp.asarray(input_pipeline.encode_texts(["a"], 8))
  with pytest.raises(ValueError, match="freeze_encoder"):
    unfrozen(ids, shift_right(jnp.full((1, 3), 2, jnp.int32)), states=jnp.zeros((1, 6, 8, 384)))


def test_resume_with_cached_states_matches_uninterrupted(tmp_path):
  """A run stopped after a checkpoint and resumed equals an uninterrupted one (states from the cache).

  (The SIGKILL variant of this, with the encoder in the step, is tests/test_trainer.py.)
  """
  from cart_jax.index.identifiers import IdentifierConfig, SemanticIndex
  from cart_jax.index.vocab import IdentifierVocab
  from cart_jax.models.cart.config import with_vocab

  vocab = IdentifierVocab((3, 3, 2))
  codes = np.array([[0, 0, 0], [0, 1, 0], [1, 0, 0], [1, 0, 1], [2, 2, 0], [2, 1, 0]], np.int32)
  index = SemanticIndex(codes=codes, item_ids=[f"i{r}" for r in range(6)], vocab=vocab,
                        config=IdentifierConfig(n_clusters=3, num_levels=1, codebook_size=3),
                        embedding_dim=4, input_hash="test")
  model_cfg = with_vocab(minilm_frozen(d_model=32, num_heads=2, head_dim=16, d_ff=32,
                                       num_decoder_layers=1), vocab)
  train_cfg = trainer.TrainConfig(num_steps=6, warmup_steps=2, learning_rate=1e-2, omega=1.0,
                                  log_every=100, checkpoint_every=2, keep_checkpoints=2, seed=3)
  texts = ["red apple", "green apple", "a dog face", "a cat face", "flag of japan", "flag of peru"]
  ids = input_pipeline.encode_texts(texts, 12)  # [6, 12]

  class Pipeline:
    def batch_at(self, step):
      rows = np.random.RandomState(step).randint(0, 6, 8)
      return input_pipeline.model_features(ids[rows], vocab.codes_to_tokens(codes[rows]))

    def iterate(self, start):
      step = start
      while True:
        yield self.batch_at(step)
        step += 1

    def token_rows(self):
      return ids

  kw = dict(model_config=model_cfg, train_config=train_cfg, pipeline=Pipeline(), index=index,
            progress=False, log=lambda s: None, state_cache_dir=tmp_path / "cache")
  full = trainer.train(checkpoint_dir=None, **kw)
  assert full.state_cache["texts"] == 6 and full.state_cache["misses"] == 0
  part = trainer.train(checkpoint_dir=tmp_path / "ckpt", stop_after=4, **kw)
  assert int(part.state.step) == 4
  resumed = trainer.train(checkpoint_dir=tmp_path / "ckpt", **kw)
  assert resumed.start_step == 4 and int(resumed.state.step) == 6
  diff = max(jax.tree.leaves(jax.tree.map(
      lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
      resumed.state.params, full.state.params)))
  moved = max(jax.tree.leaves(jax.tree.map(
      lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
      part.state.params, full.state.params)))
  assert diff < 1e-5 < 1e-3 < moved  # steps 5-6 changed the parameters; the resumed run did the same


def _fake_encode(ids, mask):  # [b, L] -> [b, S=2, L, width=8]: the token ids, so caches differ
  x = np.asarray(ids, np.float32)[:, None, :, None]
  return np.broadcast_to(x, (ids.shape[0], 2, ids.shape[1], 8)).copy()


def test_size_cap_deletes_the_least_recently_used_caches(tmp_path, monkeypatch):
  import os
  import time
  root = tmp_path / "states"
  rows = [np.asarray([[101, 7 + i, 8 + i, 102, 0, 0]] * 2 + [[101, 30 + i, 102, 0, 0, 0]], np.int32)
          for i in range(4)]
  build = lambda r, logs: state_cache.load_or_build(r, fingerprint="f", layers=(0, 1), encode=_fake_encode,
                                                    root=root, progress=False, log=logs.append)
  monkeypatch.setenv(state_cache.ENV_MAX_GB, "0")  # no cap while the first two are built
  a = build(rows[0], [])
  time.sleep(0.05)
  b = build(rows[1], [])
  # Same shapes; meta.json's build seconds may differ by a digit.
  one = max(state_cache._cache_bytes(a.directory), state_cache._cache_bytes(b.directory))
  assert 0 < one - 16 <= min(state_cache._cache_bytes(a.directory), state_cache._cache_bytes(b.directory))
  time.sleep(0.05)
  logs = []
  assert build(rows[0], logs).directory == a.directory  # reused: now the most recently used
  assert any("reusing" in line for line in logs)
  monkeypatch.setenv(state_cache.ENV_MAX_GB, repr(2.5 * one / 2**30))  # room for two caches
  time.sleep(0.05)
  logs = []
  c = build(rows[2], logs)
  kept = sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
  assert kept == sorted([a.directory.name, c.directory.name])  # b, the least recently used, went
  assert not b.directory.exists() and not (root / f".{b.directory.name}.lock").exists()
  assert any("deleted the least recently used cache" in line and b.directory.name in line for line in logs)
  np.testing.assert_array_equal(c.lookup(rows[2])[:, 0, :, 0], rows[2].astype(np.float16))
  # A directory that is not a cache (another meta.json format) is never touched.
  other = root / "not-a-cache"
  other.mkdir()
  (other / "meta.json").write_text('{"format": "cart-index"}')
  (other / "big.bin").write_bytes(b"x" * (4 * one))
  # A cap smaller than one cache keeps the one just built.
  monkeypatch.setenv(state_cache.ENV_MAX_GB, repr(0.5 * one / 2**30))
  d = build(rows[3], [])
  assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == sorted(
      [d.directory.name, "not-a-cache"])
  assert os.path.isfile(d.directory / "states.f16")


def test_bad_size_cap_is_a_clear_error_before_any_work(tmp_path, monkeypatch):
  monkeypatch.setenv(state_cache.ENV_MAX_GB, "lots")
  with pytest.raises(state_cache.StateCacheError, match=r"CART_CACHE_MAX_GB='lots': expected a number of GB"):
    state_cache.load_or_build(np.asarray([[101, 5, 102]], np.int32), fingerprint="f", layers=(0,),
                              encode=_fake_encode, root=tmp_path, progress=False, log=lambda s: None)
  assert not any(tmp_path.iterdir())
