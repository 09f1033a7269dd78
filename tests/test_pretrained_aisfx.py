"""The aiSFX port against the aisfx package's own output (torch model + librosa spectrogram).

tests/fixtures/aisfx_reference.npz is made by tests/fixtures/make_aisfx_reference.py (torch,
librosa 0.9.2, aisfx 0.1.2 in a throwaway venv; the command is in its docstring) from waves the
script makes, which are made again here. Tolerances (float32 on both sides):

* spectrogram values (in [0, 1]): 2e-5 absolute (reached: 2.5e-6; 44.1 kHz files 1.2e-7);
* embeddings (entries up to ~7): 1e-5 relative + 5e-5 absolute (reached: 5e-6 absolute).

The tests that need the pretrained weights skip when the ``aisfx`` package is not installed.
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cart_jax.core.errors import CartError
from cart_jax.media import MediaError
from cart_jax.models.pretrained import aisfx, weights

FIXTURES = Path(__file__).parent / "fixtures"
REF = np.load(FIXTURES / "aisfx_reference.npz")
SPEC_ATOL = 2e-5
EMB_RTOL, EMB_ATOL = 1e-5, 5e-5

needs_aisfx = pytest.mark.skipif(
    importlib.util.find_spec("aisfx") is None,
    reason="the aisfx package (its checkpoint) is not installed: "
    "pip install --no-deps aisfx==0.1.2")


def _make_reference_module():
  spec = importlib.util.spec_from_file_location("make_aisfx_reference",
                                                FIXTURES / "make_aisfx_reference.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)  # numpy only at import time
  return module


@pytest.fixture(scope="module")
def wave_files(tmp_path_factory):
  mk = _make_reference_module()
  out = tmp_path_factory.mktemp("aisfx_waves")
  paths = []
  for name, wave, sr in mk.make_waves():
    path = out / f"{name}.wav"
    mk.write_wav(str(path), wave, sr)
    paths.append(path)
  assert [p.stem for p in paths] == list(REF["names"])
  return paths


@pytest.fixture(scope="module")
def model():
  return aisfx.load_pretrained()


def test_attribution_kept():
  assert "A.B. Ma and A. Lerch, ISMIR 2022" in aisfx.__doc__
  assert "CC BY 4.0" in aisfx.__doc__


def test_spectrogram_matches_librosa_reference(wave_files):
  for i, path in enumerate(wave_files):
    spec = aisfx.spectrogram(aisfx.read_wave(path))  # [frames, 96]
    assert spec.dtype == np.float32 and spec.shape == (REF["frames"][i], 96), path.stem
    np.testing.assert_allclose(spec[REF["rows"][i]], REF["spec_rows"][i], rtol=0, atol=SPEC_ATOL,
                               err_msg=path.stem)
    np.testing.assert_allclose(spec.mean(axis=0), REF["spec_mean"][i], rtol=0, atol=SPEC_ATOL,
                               err_msg=path.stem)
    np.testing.assert_allclose(spec.max(axis=0), REF["spec_max"][i], rtol=0, atol=SPEC_ATOL,
                               err_msg=path.stem)


def test_mel_filters_sum_to_one():
  fb = aisfx.mel_filters()  # [1025, 96]
  assert fb.shape == (1025, 96)
  np.testing.assert_allclose(fb.sum(axis=0), 1.0, rtol=1e-6)


def test_blocks_follow_reference_rule():
  # preprocessing.blocking(block 100, hop 50, drop_partial_block=True), counted by hand.
  for frames, want in [(10, 1), (65, 1), (100, 1), (149, 1), (150, 2), (173, 2), (200, 3),
                       (201, 3), (250, 4)]:
    assert aisfx.num_blocks(frames) == want, frames
  spec = np.arange(65 * 96, dtype=np.float32).reshape(65, 96)
  b = aisfx.blocks(spec)  # [1, 100, 96]
  assert b.shape == (1, 100, 96)
  np.testing.assert_array_equal(b[0, :65], spec)
  assert not b[0, 65:].any()  # zero-padded
  spec = np.random.RandomState(0).rand(201, 96).astype(np.float32)
  b = aisfx.blocks(spec)  # [3, 100, 96]
  np.testing.assert_array_equal(b[2], spec[100:200])


@needs_aisfx
def test_network_matches_torch_on_a_fixed_block(model):
  probe = _make_reference_module().network_probe()  # [1, 100, 96]
  emb = np.asarray(model(probe))  # [1, 512]
  np.testing.assert_allclose(emb, REF["probe_emb"], rtol=EMB_RTOL, atol=EMB_ATOL)


@needs_aisfx
def test_embeddings_match_torch_reference(wave_files, model):
  all_blocks = np.concatenate([aisfx.blocks(aisfx.spectrogram(aisfx.read_wave(p)))
                               for p in wave_files])  # [8, 100, 96]
  np.testing.assert_array_equal(
      np.repeat(np.arange(len(wave_files)), [aisfx.num_blocks(f) for f in REF["frames"]]),
      REF["block_file"])
  np.testing.assert_allclose(np.asarray(model(all_blocks)), REF["block_emb"], rtol=EMB_RTOL,
                             atol=EMB_ATOL)
  done = []
  emb = aisfx.encode_audio([str(p) for p in wave_files], batch_size=4, progress=done.append,
                           model=model)  # [6, 512]: 8 blocks in two full batches
  assert emb.dtype == np.float32 and emb.shape == (len(wave_files), 512)
  np.testing.assert_allclose(emb, REF["file_emb"], rtol=EMB_RTOL, atol=EMB_ATOL)
  assert sum(done) == len(wave_files) and all(n > 0 for n in done)
  # A batch size that splits files across calls and pads the last call gives the same result.
  again = aisfx.encode_audio(wave_files, batch_size=3, model=model)
  np.testing.assert_allclose(again, emb, rtol=1e-6, atol=1e-6)


@needs_aisfx
def test_converted_weights_are_cached_and_reused(tmp_path, monkeypatch):
  monkeypatch.setenv(weights.ENV_DIR, str(tmp_path))
  first = weights.converted(aisfx.AISFX, aisfx.convert)
  assert first.converted_now and first.path.parent == tmp_path / "pretrained"
  assert set(first.arrays) == {f"blocks.{k}.conv{j}.{p}" for k in range(4) for j in (1, 2)
                               for p in ("kernel", "bias")}
  assert first.arrays["blocks.3.conv2.kernel"].shape == (3, 3, 512, 512)

  def refuse(path):
    raise AssertionError("converted again instead of reading the cache")

  monkeypatch.setattr(aisfx, "convert", refuse)
  second = weights.converted(aisfx.AISFX, aisfx.convert)
  assert not second.converted_now and second.path == first.path
  for k, v in first.arrays.items():
    np.testing.assert_array_equal(second.arrays[k], v)
  aisfx.load_pretrained()  # reads the cache too


def test_bad_inputs_are_named_errors(tmp_path):
  bad = tmp_path / "not_audio.wav"
  bad.write_bytes(b"hello")
  with pytest.raises(MediaError, match="not_audio.wav"):
    aisfx.read_wave(bad)
  with pytest.raises(aisfx.AisfxInputError, match="batch_size"):
    aisfx.encode_audio([bad], batch_size=0, model=object())
  with pytest.raises(CartError, match="mono"):
    aisfx.spectrogram(np.zeros((10, 2), np.float32))
  with pytest.raises(CartError, match=r"\[frames, 96\]"):
    aisfx.blocks(np.zeros((96, 10), np.float32))
  assert aisfx.encode_audio([]).shape == (0, 512)  # no model loaded


@needs_aisfx
def test_runs_without_torch_librosa_or_tensorflow(wave_files):
  code = (
      "import sys\n"
      "BLOCKED = ('torch', 'librosa', 'tensorflow', 'resampy', 'essentia')\n"
      "class Block:  # a finder that fails their imports (scipy chokes on sys.modules[m] = None)\n"
      "  def find_spec(self, name, path=None, target=None):\n"
      "    if name.split('.')[0] in BLOCKED:\n"
      "      raise ImportError(f'{name} is blocked')\n"
      "sys.meta_path.insert(0, Block())\n"
      "from cart_jax.models.pretrained import aisfx\n"
      f"emb = aisfx.encode_audio([{str(wave_files[3])!r}, {str(wave_files[4])!r}], batch_size=1)\n"
      "assert emb.shape == (2, 512), emb.shape\n"
      "bad = sorted(m for m in sys.modules if m.split('.')[0] in BLOCKED + ('aisfx',))\n"
      "assert not bad, bad\n"
      "print(float(emb[0, 0]))\n")
  res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert res.returncode == 0, res.stderr[-3000:]
  np.testing.assert_allclose(float(res.stdout.split()[-1]), REF["file_emb"][3, 0], rtol=EMB_RTOL,
                             atol=EMB_ATOL)
