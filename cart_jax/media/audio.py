"""Audio reader: files -> dB log-mel spectrograms ``float32 [N, frames, n_mels]``.

A file (wav, flac, ogg/oga: whatever libsndfile reads) is mixed down to mono, resampled to
``sample_rate`` with a polyphase filter (``scipy.signal.resample_poly``; scipy comes with
scikit-learn), cropped or zero-padded to ``clip_seconds`` and turned into a log-mel spectrogram
``float32 [frames, n_mels]`` in dB (``10 log10`` of the mel power of a Hann-windowed STFT, floor
``min_db``). A full-scale sine has about 0 dB in its mel band. Loudness is kept (no per-clip
normalisation): "soft" and "loud" are things a query may ask for.

The parameters come from an ``AudioTowerConfig`` (``cart_jax.models.towers.audio``), which
validates them.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Protocol, Sequence

import numpy as np

from cart_jax.media import MediaError


class MelConfig(Protocol):
  """What the readers take from their config (``AudioTowerConfig`` has it).

  Attributes:
    sample_rate: clips are resampled to this rate (Hz).
    n_fft, hop: STFT window (Hann) and hop, in samples.
    n_mels, f_min, f_max: mel filterbank (HTK mel scale); ``f_max`` None = Nyquist.
    min_db: floor of the log-mel values.
    clip_samples: samples per clip (crop / zero-pad).
    frames: time frames of the log-mel output.
  """
  sample_rate: int
  n_fft: int
  hop: int
  n_mels: int
  f_min: float
  f_max: float | None
  min_db: float

  @property
  def clip_samples(self) -> int: ...

  @property
  def frames(self) -> int: ...


def _hz_to_mel(f):
  return 2595.0 * np.log10(1.0 + np.asarray(f, np.float64) / 700.0)


def _mel_to_hz(m):
  return 700.0 * (10.0 ** (np.asarray(m, np.float64) / 2595.0) - 1.0)


def mel_frequencies(config: MelConfig) -> np.ndarray:
  """Centre frequency (Hz) of each mel band, ``float64 [n_mels]``."""
  f_max = config.sample_rate / 2 if config.f_max is None else config.f_max
  edges = _mel_to_hz(np.linspace(_hz_to_mel(config.f_min), _hz_to_mel(f_max), config.n_mels + 2))
  return edges[1:-1]


def mel_filterbank(config: MelConfig) -> np.ndarray:
  """Triangular HTK-mel filters ``float32 [n_fft // 2 + 1, n_mels]`` (peak 1 at the centre)."""
  f_max = config.sample_rate / 2 if config.f_max is None else config.f_max
  edges = _mel_to_hz(np.linspace(_hz_to_mel(config.f_min), _hz_to_mel(f_max), config.n_mels + 2))
  bins = np.linspace(0, config.sample_rate / 2, config.n_fft // 2 + 1)  # [F] Hz
  lo, mid, hi = edges[:-2], edges[1:-1], edges[2:]  # [M] each
  up = (bins[:, None] - lo[None]) / np.maximum(mid - lo, 1e-9)[None]  # [F, M]
  down = (hi[None] - bins[:, None]) / np.maximum(hi - mid, 1e-9)[None]  # [F, M]
  fb = np.clip(np.minimum(up, down), 0.0, None)
  # A band narrower than the FFT bin spacing would get no bin: give it its nearest bin.
  empty = fb.max(axis=0) == 0
  if empty.any():
    fb[np.abs(bins[:, None] - mid[None, empty]).argmin(axis=0), np.flatnonzero(empty)] = 1.0
  return fb.astype(np.float32)


def log_mel(wave: np.ndarray, config: MelConfig, filterbank: np.ndarray | None = None
            ) -> np.ndarray:
  """Mono ``float [clip_samples]`` at ``sample_rate`` -> dB log-mel ``float32 [frames, n_mels]``."""
  fb = mel_filterbank(config) if filterbank is None else filterbank
  n, hop = config.n_fft, config.hop
  x = np.asarray(wave, np.float32)
  idx = np.arange(config.frames)[:, None] * hop + np.arange(n)[None]  # [T, n_fft]
  window = np.hanning(n + 1)[:-1].astype(np.float32)  # periodic Hann
  spec = np.fft.rfft(x[idx] * window[None], axis=-1)  # [T, F] complex
  # Power normalised so that a full-scale sine puts ~1 (0 dB) into its bin.
  power = (spec.real ** 2 + spec.imag ** 2) * (4.0 / float(window.sum()) ** 2)  # [T, F]
  mel = power @ fb  # [T, M]
  return np.maximum(10.0 * np.log10(np.maximum(mel, 1e-30)), config.min_db).astype(np.float32)


def read_wave(path: str | os.PathLike, config: MelConfig) -> np.ndarray:
  """One file -> mono ``float32 [clip_samples]`` at ``config.sample_rate`` (crop / zero-pad).

  Raises:
    MediaError naming the file when it cannot be read as audio or has no samples.
  """
  import soundfile as sf  # pylint: disable=g-import-not-at-top

  try:
    data, rate = sf.read(str(path), dtype="float32", always_2d=True)  # [n, channels]
  except (sf.SoundFileError, OSError) as e:
    raise MediaError(f"{path}: cannot read audio ({e})") from e
  if data.shape[0] == 0:
    raise MediaError(f"{path}: empty audio (0 samples)")
  if not np.all(np.isfinite(data)):
    raise MediaError(f"{path}: audio has NaN or infinite samples")
  wave = data.mean(axis=1)  # [n] mono
  if rate != config.sample_rate:
    from scipy.signal import resample_poly  # pylint: disable=g-import-not-at-top
    g = math.gcd(int(rate), int(config.sample_rate))
    wave = resample_poly(wave, config.sample_rate // g, int(rate) // g).astype(np.float32)
  n = config.clip_samples
  if wave.shape[0] >= n:
    return wave[:n]
  return np.pad(wave, (0, n - wave.shape[0]))


def load_audio(paths: Sequence[str | os.PathLike], config: MelConfig,
               progress: Callable[[int], None] | None = None) -> np.ndarray:
  """Reads audio files as dB log-mel spectrograms ``float32 [N, frames, n_mels]``.

  Raises:
    MediaError naming the file that cannot be read, or that has no samples.
  """
  fb = mel_filterbank(config)
  out = np.empty((len(paths), config.frames, config.n_mels), np.float32)  # [N, T, M]
  for i, path in enumerate(paths):
    out[i] = log_mel(read_wave(path, config), config, fb)
    if progress is not None:
      progress(1)
  return out
