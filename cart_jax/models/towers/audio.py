"""The audio item tower: dB log-mel spectrograms -> a small 1-D conv net.

The host-side reader that turns files into log-mels is ``cart_jax.media.audio.load_audio``; it
takes the front-end fields of :class:`AudioTowerConfig` (sample rate, clip length, STFT, mel).

The tower (:class:`AudioTower`): the mel bins are the channels of a 1-D convolution over
time, so pitch stays where it is and the net learns timbre and time patterns (short notes vs a
held one)::

  dB [B, T, M] -> (dB - db_offset) / db_scale -> [Conv1D(k=3, stride 2) + GELU] per channels
  -> flatten [B, T' * C] and mean/max over time [B, 2C] -> LayerNorm -> Linear(hidden) -> GELU
  -> Linear(out_dim)

Measured on the shared 2-core CPU: see ``AudioTowerConfig``.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from cart_jax.core.errors import CartError


@dataclasses.dataclass(frozen=True)
class AudioTowerConfig:
  """Log-mel front end + 1-D conv tower.

  One dual-encoder training step (256 clips of 92 x 64 log-mels, forward + backward, AdamW),
  median of 10 after 3 warm-up steps on the shared 2-core CPU at load ~8: channels (64, 64, 64)
  (the default, 0.73 M parameters) 0.10 s; (128, 128, 128) 0.53 s; no conv, flatten + MLP
  (3.3 M parameters) 0.33 s. Convolving over time with the mel bins as channels costs about
  what a matmul does, so the tower keeps its convs.

  Attributes:
    sample_rate: clips are resampled to this rate (Hz).
    clip_seconds: clips are cropped / zero-padded to this length.
    n_fft, hop: STFT window (Hann) and hop, in samples.
    n_mels, f_min, f_max: mel filterbank (HTK mel scale, triangular filters); ``f_max`` None =
      Nyquist.
    min_db: floor of the log-mel values (silence).
    db_offset, db_scale: the tower's fixed input normalisation ``(dB - offset) / scale``.
    channels: one stride-2 Conv1D (kernel ``kernel``) + GELU per entry.
    hidden_dim, out_dim: MLP head; ``out_dim`` is the embedding size.
  """
  modality: str = "audio"
  sample_rate: int = 16000
  clip_seconds: float = 1.5
  n_fft: int = 512
  hop: int = 256
  n_mels: int = 64
  f_min: float = 30.0
  f_max: float | None = None
  min_db: float = -100.0
  db_offset: float = -50.0
  db_scale: float = 25.0
  channels: tuple[int, ...] = (64, 64, 64)
  kernel: int = 3
  hidden_dim: int = 512
  out_dim: int = 256

  def __post_init__(self):
    if self.sample_rate < 1000 or self.clip_seconds <= 0:
      raise CartError(f"bad AudioTowerConfig: sample_rate {self.sample_rate} must be >= 1000 and "
                       f"clip_seconds {self.clip_seconds} > 0")
    if self.n_fft < 16 or self.hop < 1 or self.n_mels < 1:
      raise CartError(f"bad AudioTowerConfig: n_fft {self.n_fft}, hop {self.hop}, n_mels {self.n_mels}")
    if self.clip_samples < self.n_fft:
      raise CartError(f"clip_seconds {self.clip_seconds} is shorter than one STFT window "
                       f"({self.n_fft} samples at {self.sample_rate} Hz)")
    f_max = self.sample_rate / 2 if self.f_max is None else self.f_max
    if not 0 <= self.f_min < f_max <= self.sample_rate / 2:
      raise CartError(f"mel range [{self.f_min}, {f_max}] Hz must lie in [0, Nyquist "
                       f"{self.sample_rate / 2}]")
    if min(self.out_dim, self.hidden_dim, self.kernel, *self.channels, 1) < 1 or self.db_scale <= 0:
      raise CartError(f"bad AudioTowerConfig {self}")

  @property
  def clip_samples(self) -> int:
    return int(round(self.clip_seconds * self.sample_rate))

  @property
  def frames(self) -> int:
    """Time frames of the log-mel input (no centre padding)."""
    return 1 + (self.clip_samples - self.n_fft) // self.hop


class AudioTower(nnx.Module):
  """dB log-mel ``[B, frames, n_mels]`` -> ``[B, out_dim]`` (see :class:`AudioTowerConfig`)."""

  def __init__(self, config: AudioTowerConfig, *, rngs: nnx.Rngs):
    self.config = config
    convs, c_in, t = [], config.n_mels, config.frames
    for c_out in config.channels:
      convs.append(nnx.Conv(c_in, c_out, (config.kernel,), strides=(2,), padding="SAME", rngs=rngs))
      c_in, t = c_out, -(-t // 2)
    self.convs = nnx.List(convs)
    flat = t * c_in + 2 * c_in
    self.norm = nnx.LayerNorm(flat, rngs=rngs)
    self.hidden = nnx.Linear(flat, config.hidden_dim, rngs=rngs)
    self.out = nnx.Linear(config.hidden_dim, config.out_dim, rngs=rngs)

  def __call__(self, mels: jax.Array, *, train: bool = False,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    del train, rngs  # no augmentation
    c = self.config
    x = (mels.astype(jnp.float32) - c.db_offset) / c.db_scale  # [B, T, M] ~[-2, 2]
    for conv in self.convs:
      x = jax.nn.gelu(conv(x))  # [B, T/2, C]
    b = x.shape[0]
    pooled = jnp.concatenate([x.mean(axis=1), x.max(axis=1)], axis=-1)  # [B, 2C]
    x = jnp.concatenate([x.reshape(b, -1), pooled], axis=-1)  # [B, T' * C + 2C]
    x = jax.nn.gelu(self.hidden(self.norm(x)))  # [B, hidden]
    return self.out(x)  # [B, out_dim]
