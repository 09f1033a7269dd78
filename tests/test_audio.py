"""Audio media loading (log-mel), the audio item tower, and `cart embed` on imported audio corpora."""
import csv
import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx

sf = pytest.importorskip("soundfile")

from cart_jax.cli import main as cli  # pylint: disable=g-import-not-at-top,wrong-import-position
from cart_jax.media import audio as media  # pylint: disable=g-import-not-at-top,wrong-import-position
from cart_jax.models.towers import audio, registry  # pylint: disable=g-import-not-at-top,wrong-import-position

CONFIG = audio.AudioTowerConfig()


def _sine(freq, rate, seconds=1.0, amp=0.5, channels=1):
  t = np.arange(int(rate * seconds)) / rate
  x = amp * np.sin(2 * np.pi * freq * t)
  return np.stack([x] * channels, axis=1) if channels > 1 else x


def _peak_band(freq, config=CONFIG):
  return int(np.abs(media.mel_frequencies(config) - freq).argmin())


@pytest.mark.parametrize("ext,subtype", [("wav", "PCM_16"), ("flac", "PCM_16"), ("ogg", "VORBIS")])
def test_sine_peaks_in_its_mel_band(tmp_path, ext, subtype):
  path = tmp_path / f"sine.{ext}"
  sf.write(path, _sine(1000, 16000), 16000, subtype=subtype)
  mels = media.load_audio([path], CONFIG)
  assert mels.shape == (1, CONFIG.frames, CONFIG.n_mels) == (1, 92, 64) and mels.dtype == np.float32
  frame = mels[0, 20]  # [n_mels], inside the 1 s tone
  assert int(frame.argmax()) == _peak_band(1000) == 21
  # Amplitude 0.5 = -6 dB (the Hann window spreads it over neighbouring bands a little).
  assert -7.0 < frame.max() < -5.0
  assert frame.max() - np.median(frame) > 40.0  # a tone, not noise


def test_resampling_8k_to_16k_keeps_the_tone_and_mixes_stereo(tmp_path):
  path = tmp_path / "tone8k.wav"
  sf.write(path, _sine(1500, 8000, channels=2), 8000)
  wave = media.read_wave(path, CONFIG)
  assert wave.shape == (CONFIG.clip_samples,)
  spectrum = np.abs(np.fft.rfft(wave[:16000]))  # the first second: 1 Hz bins
  assert int(spectrum.argmax()) == 1500
  mels = media.load_audio([path], CONFIG)
  assert int(mels[0, 20].argmax()) == _peak_band(1500)


def test_clips_are_cropped_and_zero_padded_to_clip_seconds(tmp_path):
  short, long = tmp_path / "short.wav", tmp_path / "long.wav"
  sf.write(short, _sine(440, 16000, seconds=0.5), 16000)
  sf.write(long, _sine(440, 16000, seconds=3.0), 16000)
  mels = media.load_audio([short, long], CONFIG)
  frames_with_sound = (mels.max(axis=2) > CONFIG.min_db).sum(axis=1)  # [2]
  # 0.5 s = 8000 samples: frames starting before 8000 - 1 see the tone (window 512, hop 256).
  assert frames_with_sound[0] == (8000 - 1) // 256 + 1 == 32
  assert frames_with_sound[1] == CONFIG.frames
  np.testing.assert_array_equal(mels[0, 40:], CONFIG.min_db)  # padding is silence


def test_silence_is_fine_and_sits_at_the_floor(tmp_path):
  path = tmp_path / "silence.wav"
  sf.write(path, np.zeros(16000), 16000)
  np.testing.assert_array_equal(media.load_audio([path], CONFIG), CONFIG.min_db)


def test_unreadable_and_empty_files_raise_errors_naming_the_file(tmp_path):
  broken = tmp_path / "broken.wav"
  broken.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" + bytes(range(200)))
  zero_bytes = tmp_path / "zero.flac"
  zero_bytes.write_bytes(b"")
  empty = tmp_path / "empty.wav"
  sf.write(empty, np.zeros(0), 16000)
  assert sf.info(empty).frames == 0
  good = tmp_path / "good.wav"
  sf.write(good, _sine(440, 16000), 16000)
  with pytest.raises(ValueError, match=r"broken\.wav: cannot read audio"):
    media.load_audio([good, broken], CONFIG)
  with pytest.raises(ValueError, match=r"zero\.flac: cannot read audio"):
    media.load_audio([zero_bytes], CONFIG)
  with pytest.raises(ValueError, match=r"empty\.wav: empty audio \(0 samples\)"):
    media.load_audio([empty], CONFIG)
  with pytest.raises(ValueError, match=r"missing\.ogg: cannot read audio"):
    media.load_audio([tmp_path / "missing.ogg"], CONFIG)


def test_config_validation():
  with pytest.raises(ValueError, match="shorter than one STFT window"):
    audio.AudioTowerConfig(clip_seconds=0.01)
  with pytest.raises(ValueError, match="Nyquist"):
    audio.AudioTowerConfig(f_max=9000.0)
  assert audio.AudioTowerConfig(clip_seconds=1.0, hop=160).frames == 1 + (16000 - 512) // 160


def test_tower_output_shape_and_towers_table():
  config = registry.default_config("audio", out_dim=24, max_shift=None)
  assert isinstance(config, audio.AudioTowerConfig) and config.out_dim == 24
  with pytest.raises(ValueError, match="max_shift"):
    registry.default_config("audio", max_shift=4)
  small = dataclasses.replace(config, channels=(16, 8), hidden_dim=32)
  tower = registry.make_tower(small, rngs=nnx.Rngs(params=0))
  assert isinstance(tower, audio.AudioTower)
  x = np.random.default_rng(0).normal(-50, 20, (3, small.frames, small.n_mels)).astype(np.float32)
  y = jax.jit(lambda m, v: m(v))(tower, x)
  assert y.shape == (3, 24) and np.all(np.isfinite(y))
  assert not np.allclose(y[0], y[1])  # different inputs, different embeddings
  # Checkpoints store the config as JSON: it must come back equal.
  assert registry.config_from_dict(json.loads(json.dumps(dataclasses.asdict(small)))) == small


# ----------------------------------------------------------------- importers -> cart embed


def _csv(path, header, rows):
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)


def _clotho(root):
  header = ["file_name"] + [f"caption_{i}" for i in range(1, 6)]
  freqs = iter(range(300, 3000, 150))
  for split, names in [("development", [f"dev{i}.wav" for i in range(6)]),
                       ("validation", ["val0.wav"]), ("evaluation", ["eval0.wav", "eval1.wav"])]:
    rows = []
    for n in names:
      f = next(freqs)
      rows.append([n] + [f"a tone of {f} hertz, take {k}" for k in range(5)])
      (root / "audio" / split).mkdir(parents=True, exist_ok=True)
      sf.write(root / "audio" / split / n, _sine(f, 44100, seconds=0.8), 44100)
    _csv(root / f"clotho_captions_{split}.csv", header, rows)


def _audiocaps(root):
  header = ["audiocap_id", "youtube_id", "start_time", "caption"]
  k = 0
  for split, n in (("train", 6), ("val", 1), ("test", 2)):
    rows = []
    for i in range(n):
      k += 1
      rows.append([str(k), f"yt{k:03d}", "30", f"a beep at {200 * k} hertz"])
      (root / "wav").mkdir(parents=True, exist_ok=True)
      sf.write(root / "wav" / f"yt{k:03d}_30.flac", _sine(200 * k, 22050, seconds=2.0), 22050)
    _csv(root / f"{split}.csv", header, rows)


@pytest.mark.parametrize("fmt", ["clotho", "audiocaps"])
def test_importers_produce_corpora_that_cart_embed_accepts(tmp_path, fmt):
  src = tmp_path / "src"
  src.mkdir()
  if fmt == "clotho":
    _clotho(src)
    media = ["--media-root", str(src / "audio")]
  else:
    _audiocaps(src)
    media = ["--media-root", str(src / "wav"), "--media-pattern", "{youtube_id}_{start_time}.flac"]
  corpus_dir, out = tmp_path / "corpus", tmp_path / "emb" / "E.npy"
  assert cli.main(["data", "import", fmt, str(src), "--out", str(corpus_dir), *media]) == 0
  rc = cli.main(["embed", "--corpus", str(corpus_dir), "--out", str(out), "--steps", "2",
                 "--batch-size", "4", "--dim", "8", "--text-batch", "16", "--no-progress",
                 "--json", str(tmp_path / "embed.json")])
  assert rc == 0
  emb = np.load(out)
  assert emb.shape == (9, 8) and emb.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
  s = json.loads((tmp_path / "embed.json").read_text())
  assert s["model_config"]["tower"]["modality"] == "audio"
  assert s["train_texts"] == (30 if fmt == "clotho" else 6)
  assert len(set(map(tuple, emb.round(5)))) == 9  # distinct clips, distinct embeddings
