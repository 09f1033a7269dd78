"""aiSFX sound-effects embeddings in Flax NNX, with the weights of the PyPI package ``aisfx``.

Model and weights: "Representation Learning for the Automatic Indexing of Sound Effects
Libraries", A.B. Ma and A. Lerch, ISMIR 2022 (model X-Sequential-CE). The pretrained model is
licensed CC BY 4.0 (this attribution must be kept); the package's code (``aisfx`` 0.1.2,
https://github.com/alisonbma/aisfx) is MIT. Its network code comes from the DCASE 2018
cross-task baseline (``Cnn_9layers``). This port matches ``aisfx`` 0.1.2 as follows:

Spectrogram (:func:`spectrogram`), the package's librosa path
(``aisfx.spectrogram.spectrogram_librosa.compute_spectrogram`` with librosa 0.9.2, the version
``aisfx`` pins, then ``aisfx.preprocessing.spectrogram_normalize(spec, 'original')``):

* mono wave at 44,100 Hz, divided by its peak ``max |y|`` (left alone when silent);
* STFT as ``librosa.stft`` computes it by default: ``n_fft`` = window = 2048, hop 1024,
  periodic Hann window, ``center=True`` with ``pad_mode='constant'`` (1024 zeros on each side,
  librosa 0.9.2's default), so a wave of ``n`` samples gives ``1 + n // 1024`` frames;
* power spectrum ``|X|^2``, then 96 HTK-mel triangles from 0 to 22,050 Hz with ``norm=1.0``:
  in librosa a number is an L^p norm, so each filter's weights sum to 1 (not the peak-1
  triangles of :mod:`cart_jax.media.audio`, nor Slaney's area normalisation);
* ``log10(10000 * mel + 1)``, divided by 9.457798957824707 (``'original'``: the maximum over
  the paper's training spectrograms; the minimum is 0).

Orientation: the network reads ``[time, mel]`` (``EmbeddingNet.forward``: "(batch_size,
times_steps, freq_bins)"; the Essentia path the paper used returns ``[frames, bands]``).
librosa returns ``[mel, time]``, and ``aisfx.inference.main(spectrogram_type='librosa')`` passes
that to ``blocking`` untransposed, so it would cut blocks along the mel axis. This port
transposes: :func:`spectrogram` is ``[frames, 96]``.

Embedding (:class:`AisfxEmbeddingNet`): ``EmbeddingNet('max', 3, 1, 64)``, i.e. four
ConvBlocks (3x3 conv, ReLU, 3x3 conv, ReLU, 2x2 max pool; no pool after the fourth) with
64/128/256/512 channels, then the mean over the mel axis and the max over time. That is what
``CrossNet.get_embedding`` returns (the dataset heads ``fc.*`` are not used and not converted).
Batch norm (eps 1e-5, running statistics, inference only) is folded into each convolution when
the weights are converted (:func:`convert`).

Files (:func:`encode_audio`): blocks of 100 frames (~2.3 s) with a hop of 50 frames, as
``aisfx.inference.main`` makes them with ``emb_hop_size=0.5`` and ``drop_partial_block=True``:
an incomplete last block is dropped, except that a spectrogram shorter than one block gives one
block zero-padded to 100 frames (``preprocessing.blocking``). Where the reference asserts
(50 frames or fewer, i.e. under ~1.2 s), this port still pads to one block. A file's embedding
is the mean of its blocks' embeddings (our choice: ``aisfx`` saves one embedding per block).

Reading files (:func:`read_wave`) follows ``librosa.load(sr=44100, mono=True)`` of librosa 0.9.2:
channels averaged, other rates resampled with resampy's ``kaiser_best`` filter (re-derived here
and applied with ``scipy.signal.resample_poly``; resampy itself is not needed). Against the
package (tests/test_pretrained_aisfx.py): spectrograms within 2.5e-6, embeddings within 5e-6
(entries up to ~7), for files at 16, 44.1 and 48 kHz.

Nothing here imports torch, librosa or tensorflow: the ``.pth`` file is read by
:mod:`cart_jax.models.pretrained.torch_pickle` and converted once into a cached ``.npz``
(:func:`cart_jax.models.pretrained.weights.converted`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cart_jax.core.errors import CartError
from cart_jax.media import MediaError
from cart_jax.models.pretrained import torch_pickle, weights

AISFX = weights.WeightsSource(
    name="aisfx-x-sequential-ce",
    package="aisfx",
    relpath="models/checkpoint.pth",
    sha256="499ea75909c932a2f94c35fa722fa4fabc5bcb7e84917209cc5f7402627b7eb5",
    pip_name="aisfx==0.1.2",
)
EMBED_DIM = 512
BATCH_NORM_EPS = 1e-5  # torch.nn.BatchNorm2d's default


class AisfxInputError(CartError):
  """A bad argument to the aiSFX encoder (batch size, wave or spectrogram shape)."""


@dataclasses.dataclass(frozen=True)
class AisfxConfig:
  """The reference's preprocessing and network sizes (``aisfx.inference`` constants).

  Attributes:
    sample_rate: Hz; every file is resampled to it.
    n_fft: STFT size = Hann window length (samples).
    hop: STFT hop (samples).
    n_mels, f_min, f_max: HTK-mel filterbank (each filter's weights sum to 1).
    log_scale: ``log10(log_scale * mel + 1)``.
    norm_max: the log-mel spectrogram is divided by it (``spectrogram_normalize('original')``).
    block_frames, block_hop: spectrogram frames per network input and between inputs.
    widths: output channels of the four ConvBlocks; the last is the embedding size.
  """
  sample_rate: int = 44100
  n_fft: int = 2048
  hop: int = 1024
  n_mels: int = 96
  f_min: float = 0.0
  f_max: float = 22050.0
  log_scale: float = 10000.0
  norm_max: float = 9.457798957824707
  block_frames: int = 100
  block_hop: int = 50
  widths: tuple[int, ...] = (64, 128, 256, 512)


DEFAULT_CONFIG = AisfxConfig()


# ----------------------------------------------------------------------------- spectrogram


def _hz_to_mel(f):
  return 2595.0 * np.log10(1.0 + np.asarray(f, np.float64) / 700.0)


def _mel_to_hz(m):
  return 700.0 * (10.0 ** (np.asarray(m, np.float64) / 2595.0) - 1.0)


@functools.lru_cache(maxsize=4)
def mel_filters(config: AisfxConfig = DEFAULT_CONFIG) -> np.ndarray:
  """librosa's ``filters.mel(htk=True, norm=1.0)``, transposed: ``float64 [n_fft/2 + 1, n_mels]``.

  Triangles between consecutive HTK-mel edges (evaluated at the FFT bin frequencies), each
  divided by the sum of its weights; a filter with no weight (none at 44.1 kHz / 2048 / 96) stays
  zero, as in librosa.
  """
  edges = _mel_to_hz(np.linspace(_hz_to_mel(config.f_min), _hz_to_mel(config.f_max),
                                 config.n_mels + 2))  # [M + 2] Hz
  freqs = np.linspace(0.0, config.sample_rate / 2, config.n_fft // 2 + 1)  # [F] Hz
  widths = np.diff(edges)  # [M + 1]
  ramps = edges[:, None] - freqs[None]  # [M + 2, F]
  lower = -ramps[:-2] / widths[:-1, None]  # [M, F]
  upper = ramps[2:] / widths[1:, None]  # [M, F]
  fb = np.maximum(0.0, np.minimum(lower, upper)).astype(np.float32)  # [M, F], librosa's dtype
  total = fb.astype(np.float64).sum(axis=1, keepdims=True)  # [M, 1]
  fb = fb / np.where(total < np.finfo(np.float32).tiny, 1.0, total)  # [M, F]
  out = np.ascontiguousarray(fb.T)  # [F, M]
  out.flags.writeable = False  # shared by the cache
  return out


@functools.lru_cache(maxsize=4)
def _mel_rows(config: AisfxConfig):
  """:func:`mel_filters` as a sparse ``[n_mels, F]`` matrix (about 2,000 of its 98,400 entries).

  A sparse product keeps the tiny ``[T, F] x [F, M]`` product off BLAS, whose threads, on a
  loaded machine, made it 20x slower than the rest of the spectrogram.
  """
  from scipy import sparse  # pylint: disable=g-import-not-at-top
  return sparse.csr_array(mel_filters(config).T)


def spectrogram(wave: np.ndarray, config: AisfxConfig = DEFAULT_CONFIG) -> np.ndarray:
  """Mono wave at ``config.sample_rate`` -> the network's input ``float32 [frames, n_mels]``.

  ``frames = 1 + len(wave) // hop``; values in about [0, 1] (``log10(1e4 mel + 1) / 9.4578``)
  for a peak-normalised wave.

  Raises:
    AisfxInputError: ``wave`` is not a non-empty 1-D array.
  """
  y = np.asarray(wave, np.float32)
  if y.ndim != 1 or y.shape[0] == 0:
    raise AisfxInputError(f"wave: expected a non-empty mono float [n], got shape {y.shape}")
  peak = np.max(np.abs(y))
  y = y / (peak if peak != 0 else np.float32(1.0))  # [n] float32, peak 1
  half = config.n_fft // 2
  padded = np.pad(y, (half, half))  # [n + n_fft] zeros each side (center=True, 'constant')
  windows = np.lib.stride_tricks.sliding_window_view(padded, config.n_fft)  # [n + 1, n_fft]
  frames = windows[::config.hop]  # [T, n_fft], T = 1 + n // hop
  n = np.arange(config.n_fft)
  window = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / config.n_fft)  # [n_fft] periodic Hann
  # librosa multiplies the float32 frames by a float64 window and stores the FFT as complex64.
  stft = np.fft.rfft(frames * window[None], axis=-1).astype(np.complex64)  # [T, F]
  power = stft.real.astype(np.float64) ** 2 + stft.imag.astype(np.float64) ** 2  # [T, F]
  mel = (_mel_rows(config) @ power.T).T  # [T, M]
  log_mel = np.log10(mel * config.log_scale + 1.0)  # [T, M]
  return (log_mel / config.norm_max).astype(np.float32)


def num_blocks(frames: int, config: AisfxConfig = DEFAULT_CONFIG) -> int:
  """Blocks ``preprocessing.blocking(drop_partial_block=True)`` cuts ``frames`` frames into."""
  size, hop = config.block_frames, config.block_hop
  n = math.ceil((frames - size) / hop + 1)
  if (frames - size) % hop != 0:  # an incomplete last block (Python's %: also when frames < size)
    n -= 1
  return max(n, 1)


def blocks(spec: np.ndarray, config: AisfxConfig = DEFAULT_CONFIG) -> np.ndarray:
  """``float32 [frames, n_mels]`` -> ``float32 [num_blocks, block_frames, n_mels]`` (zero-padded).

  Raises:
    AisfxInputError: ``spec`` is not ``[frames, n_mels]``.
  """
  spec = np.asarray(spec, np.float32)
  if spec.ndim != 2 or spec.shape[1] != config.n_mels or spec.shape[0] == 0:
    raise AisfxInputError(f"spectrogram: expected [frames, {config.n_mels}], got {spec.shape}")
  n = num_blocks(spec.shape[0], config)
  need = (n - 1) * config.block_hop + config.block_frames
  if spec.shape[0] < need:
    spec = np.pad(spec, ((0, need - spec.shape[0]), (0, 0)))  # [need, M]
  starts = np.arange(n) * config.block_hop  # [n]
  idx = starts[:, None] + np.arange(config.block_frames)[None]  # [n, block_frames]
  return spec[idx]  # [n, block_frames, M]


# resampy's "kaiser_best" filter, which librosa 0.9.2's ``load`` resamples with: a table of the
# right half of a Kaiser-windowed sinc, 50 zero crossings, 2^13 entries per crossing, roll-off
# 0.9173473712608761 of the lower Nyquist, beta 12.9846 (this re-derives resampy 0.4's stored
# table to within 1e-8).
KAISER_BEST_ZEROS = 50
KAISER_BEST_PRECISION = 2 ** 13
KAISER_BEST_ROLLOFF = 0.9173473712608761
KAISER_BEST_BETA = 12.9846


@functools.lru_cache(maxsize=1)
def _kaiser_best_table() -> np.ndarray:
  """resampy's ``kaiser_best`` half window, ``float64 [zeros * precision + 1]``."""
  from scipy.special import i0  # pylint: disable=g-import-not-at-top
  n = KAISER_BEST_ZEROS * KAISER_BEST_PRECISION
  d = np.linspace(0.0, KAISER_BEST_ZEROS, n + 1)  # [n + 1] zero crossings
  taper = i0(KAISER_BEST_BETA * np.sqrt(np.clip(1.0 - (np.arange(n + 1) / n) ** 2, 0.0, None)))
  return KAISER_BEST_ROLLOFF * np.sinc(KAISER_BEST_ROLLOFF * d) * taper / i0(KAISER_BEST_BETA)


@functools.lru_cache(maxsize=8)
def _kaiser_best_fir(up: int, down: int) -> np.ndarray:
  """resampy's interpolation as a polyphase filter at ``up`` x the input rate: ``float64 [2K+1]``.

  resampy weighs input ``j`` for an output at input time ``t`` by a linear interpolation of the
  table (scaled by ``s = min(1, up / down)``) at ``s (t - j)``, stepping ``int(s * precision)``
  entries per input sample and dropping the last partial step. Tap ``k`` of the filter here is
  ``t - j = k / up``, so ``scipy.signal.resample_poly`` with it gives resampy's weights exactly
  (up to rounding), including that step's truncation.
  """
  prec = KAISER_BEST_PRECISION
  s = min(1.0, up / down)
  win = s * _kaiser_best_table()  # [nwin]
  delta = np.diff(win, append=win[-1])  # [nwin]
  nwin, step = win.shape[0], int(s * prec)
  half = int(math.ceil(KAISER_BEST_ZEROS * up / s)) + up
  d = np.arange(-half, half + 1) / up  # [2K+1] t - j, input samples
  # Left wing (j <= t): i = floor(d) whole samples back, fraction d - i.
  # Right wing (j > t): k = ceil(-d) - 1 samples ahead, fraction 1 - (t - floor t) = -d - k.
  whole = np.where(d >= 0, np.floor(d), np.ceil(-d) - 1)  # [2K+1]
  frac = np.where(d >= 0, d - whole, -d - whole)  # [2K+1]
  index = s * frac * prec  # [2K+1] position in the table
  offset = index.astype(np.int64)
  eta = index - offset
  pos = offset + whole.astype(np.int64) * step  # [2K+1]
  valid = offset + (whole.astype(np.int64) + 1) * step <= nwin  # resampy's loop bound
  posc = np.minimum(pos, nwin - 1)
  h = np.where(valid, win[posc] + eta * delta[posc], 0.0)  # [2K+1]
  return h / up  # resample_poly multiplies its filter by up


def resample(wave: np.ndarray, rate: int, target: int) -> np.ndarray:
  """``float32 [n]`` at ``rate`` -> ``float32 [ceil(n * target / rate)]`` at ``target``.

  What ``librosa.load(sr=target)`` (0.9.2, ``res_type='kaiser_best'``) does: resampy's filter
  (:func:`_kaiser_best_fir`), applied here by ``scipy.signal.resample_poly``; resampy computes
  ``floor(n * target / rate)`` samples and librosa pads with zeros to the ceiling.
  """
  if rate == target:
    return np.asarray(wave, np.float32)
  from scipy.signal import resample_poly  # pylint: disable=g-import-not-at-top
  g = math.gcd(int(rate), int(target))
  up, down = int(target) // g, int(rate) // g
  out = resample_poly(np.asarray(wave, np.float64), up, down, window=_kaiser_best_fir(up, down))
  n_out = int(math.ceil(wave.shape[0] * target / rate))  # librosa's length
  out = out[:n_out].astype(np.float32)  # [n_out]
  out[int(wave.shape[0] * float(target) / float(rate)):] = 0.0  # past resampy's last sample
  return out


def read_wave(path: str | os.PathLike, config: AisfxConfig = DEFAULT_CONFIG) -> np.ndarray:
  """A whole file -> mono ``float32 [n]`` at ``config.sample_rate``, as ``librosa.load`` reads it.

  Channels are averaged (``mono=True``); another rate is resampled with :func:`resample`
  (resampy's kaiser_best filter, as librosa 0.9.2). Unlike
  :func:`cart_jax.media.audio.read_wave`, the file is neither cropped nor padded.

  Raises:
    MediaError: naming the file, when it cannot be read as audio, is empty or not finite.
  """
  import soundfile as sf  # pylint: disable=g-import-not-at-top

  try:
    data, rate = sf.read(str(path), dtype="float32", always_2d=True)  # [n, channels]
  except (sf.SoundFileError, OSError, RuntimeError) as e:
    raise MediaError(f"{path}: cannot read audio ({e})") from e
  if data.shape[0] == 0:
    raise MediaError(f"{path}: empty audio (0 samples)")
  if not np.all(np.isfinite(data)):
    raise MediaError(f"{path}: audio has NaN or infinite samples")
  wave = data.mean(axis=1, dtype=np.float32)  # [n] mono
  return resample(wave, int(rate), config.sample_rate)


# ----------------------------------------------------------------------------- network


class ConvBlock(nnx.Module):
  """Two 3x3 convolutions (batch norm folded, ReLU after each), then a 2x2 max pool if ``pool``."""

  def __init__(self, in_features: int, out_features: int, *, pool: bool, rngs: nnx.Rngs):
    # HIGHEST: full float32 on GPUs too (no TF32), as the reference computes; same speed on CPU.
    conv = functools.partial(nnx.Conv, kernel_size=(3, 3), padding=((1, 1), (1, 1)),
                             precision=jax.lax.Precision.HIGHEST, rngs=rngs)
    self.conv1 = conv(in_features, out_features)
    self.conv2 = conv(out_features, out_features)
    self.pool = pool

  def __call__(self, x: jax.Array) -> jax.Array:
    """``[B, T, F, in] -> [B, T', F', out]`` (``T' = T // 2`` with the pool, as torch floors)."""
    x = jax.nn.relu(self.conv1(x))  # [B, T, F, out]
    x = jax.nn.relu(self.conv2(x))  # [B, T, F, out]
    if self.pool:
      x = nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2),
                       padding="VALID")  # [B, T/2, F/2, out]
    return x


class AisfxEmbeddingNet(nnx.Module):
  """``EmbeddingNet('max', 3, 1, 64)`` of ``aisfx`` for inference (batch norm folded)."""

  def __init__(self, config: AisfxConfig = DEFAULT_CONFIG, *, rngs: nnx.Rngs):
    self.config = config
    ins = (1,) + tuple(config.widths[:-1])
    last = len(config.widths) - 1
    self.blocks = nnx.List([ConvBlock(i, o, pool=k != last, rngs=rngs)
                            for k, (i, o) in enumerate(zip(ins, config.widths))])

  def __call__(self, spec: jax.Array) -> jax.Array:
    """Embeddings of spectrogram blocks: ``float32 [B, T, n_mels] -> [B, widths[-1]]``."""
    x = spec[..., None]  # [B, T, M, 1]
    for block in self.blocks:
      x = block(x)  # -> [B, T/8, M/8, 512] after the last
    x = jnp.mean(x, axis=2)  # [B, T/8, 512]: mean over mel
    return jnp.max(x, axis=1)  # [B, 512]: max over time


def _abstract(config: AisfxConfig) -> AisfxEmbeddingNet:
  return nnx.eval_shape(lambda: AisfxEmbeddingNet(config, rngs=nnx.Rngs(0)))


@functools.lru_cache(maxsize=None)
def _param_shapes(config: AisfxConfig) -> dict[str, tuple[int, ...]]:
  return {k: tuple(v.get_value().shape) for k, v in weights.flat_params(_abstract(config)).items()}


def convert(path: str | os.PathLike, config: AisfxConfig = DEFAULT_CONFIG) -> dict[str, np.ndarray]:
  """The package's checkpoint -> ``{"blocks.0.conv1.kernel": ..., "blocks.3.conv2.bias": ...}``.

  The file holds ``(state_dict, datasets)``; ``embedding_net.conv_blockK.convJ`` with
  ``bnJ`` becomes ``blocks.{K-1}.convJ`` (HWIO kernel, bias). The nine dataset heads ``fc.*``
  are left out.

  Raises:
    TorchPickleError: the file cannot be read.
    PretrainedWeightsError: a tensor is missing, left over, or has an unexpected shape.
  """
  obj = torch_pickle.load(path)
  sd = obj[0] if isinstance(obj, tuple) and obj else obj
  if not isinstance(sd, dict):
    raise weights.PretrainedWeightsError(f"{path}: expected (state_dict, datasets), got "
                                         f"{type(obj).__name__}")
  out: dict[str, np.ndarray] = {}
  used: set[str] = set()
  for k in range(len(config.widths)):
    for j in (1, 2):
      conv = f"embedding_net.conv_block{k + 1}.conv{j}"
      bn = f"embedding_net.conv_block{k + 1}.bn{j}"
      try:
        kernel, bias = weights.fold_batch_norm(sd, conv, bn, BATCH_NORM_EPS)
        out[f"blocks.{k}.conv{j}.kernel"], out[f"blocks.{k}.conv{j}.bias"] = kernel, bias
      except KeyError as e:
        raise weights.PretrainedWeightsError(f"{path}: tensor {e.args[0]!r} missing") from None
      used.update([f"{conv}.weight"] + [f"{bn}.{s}" for s in weights.BATCH_NORM_KEYS])
  left = sorted(k for k in set(sd) - used if not k.startswith("fc."))
  if left:
    raise weights.PretrainedWeightsError(f"{path}: unexpected tensors {left[:5]} (not aisfx?)")
  weights.check_shapes(str(path), out, _param_shapes(config))
  return out


def from_arrays(arrays: dict[str, np.ndarray],
                config: AisfxConfig = DEFAULT_CONFIG) -> AisfxEmbeddingNet:
  """An :class:`AisfxEmbeddingNet` holding ``arrays`` (the output of :func:`convert`).

  Raises:
    PretrainedWeightsError: the arrays do not match the network's parameters.
  """
  return weights.load_into(_abstract(config), arrays, "aisfx")  # abstract: no random init


def load_pretrained() -> AisfxEmbeddingNet:
  """The aiSFX embedding network with its weights (converted at first use, then cached).

  Raises:
    PretrainedWeightsError: ``aisfx`` is not installed or its checkpoint is not the one this port
      was checked against.
  """
  return from_arrays(weights.converted(AISFX, convert).arrays)


# ----------------------------------------------------------------------------- files


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _embed_batch(graphdef, state, spec_blocks):
  return nnx.merge(graphdef, state)(spec_blocks)  # [B, 512]


@functools.lru_cache(maxsize=1)
def _default_model() -> AisfxEmbeddingNet:
  return load_pretrained()


def encode_audio(paths: Sequence[str | os.PathLike], *, batch_size: int = 64,
                 progress: Callable[[int], None] | None = None,
                 model: AisfxEmbeddingNet | None = None) -> np.ndarray:
  """aiSFX embedding of every audio file: ``N`` paths -> ``float32 [N, 512]``.

  Each file: whole wave at 44.1 kHz (:func:`read_wave`) -> :func:`spectrogram` -> blocks of 100
  frames, hop 50 (:func:`blocks`) -> one embedding per block -> **the mean over the file's
  blocks** (our choice; ``aisfx`` keeps the per-block embeddings). Blocks of consecutive files
  share jitted calls of ``batch_size`` blocks (the last call is padded to the next power of 2),
  so at most ``log2(batch_size) + 1`` shapes are compiled per process.

  Args:
    paths: audio files (whatever libsndfile reads), any sample rate, mono or not.
    batch_size: spectrogram blocks per compiled call.
    progress: called with the number of files whose embeddings are complete, after each call.
    model: the network; the pretrained one (loaded once per process) when None.

  Raises:
    AisfxInputError: ``batch_size`` < 1.
    MediaError: a file cannot be read (named).
    PretrainedWeightsError: the pretrained weights are missing or altered.
  """
  if batch_size < 1:
    raise AisfxInputError(f"batch_size must be >= 1, got {batch_size}")
  n = len(paths)
  if n == 0:
    return np.zeros((0, EMBED_DIM if model is None else model.config.widths[-1]), np.float32)
  model = model if model is not None else _default_model()
  config = model.config
  sums = np.zeros((n, config.widths[-1]), np.float64)  # [N, 512]
  counts = np.zeros(n, np.int64)  # [N] blocks per file
  graphdef, state = nnx.split(model)
  pending: list[np.ndarray] = []  # [k_i, block_frames, M] each
  owners: list[np.ndarray] = []  # [k_i] file index of each block
  held = 0  # blocks in pending
  done = 0  # files whose blocks have all been embedded

  def run(size: int) -> None:
    nonlocal pending, owners, held, done
    x = np.concatenate(pending)  # [held, block_frames, M]
    who = np.concatenate(owners)  # [held]
    take = min(size, x.shape[0])
    batch = x[:take]
    if take < size:
      batch = np.concatenate([batch, np.zeros((size - take,) + x.shape[1:], np.float32)])
    emb = np.asarray(_embed_batch(graphdef, state, jnp.asarray(batch)))[:take]  # [take, 512]
    np.add.at(sums, who[:take], emb.astype(np.float64))
    pending, owners, held = [x[take:]], [who[take:]], x.shape[0] - take
    finished = int(who[take]) if held else int(who[take - 1]) + 1  # files before it are complete
    if progress is not None and finished > done:
      progress(finished - done)
    done = max(done, finished)

  for i, path in enumerate(paths):
    b = blocks(spectrogram(read_wave(path, config), config), config)  # [k, block_frames, M]
    pending.append(b)
    owners.append(np.full(b.shape[0], i, np.int64))
    counts[i] = b.shape[0]
    held += b.shape[0]
    while held >= batch_size:
      run(batch_size)
  while held:
    run(min(batch_size, 1 << (held - 1).bit_length()))
  if progress is not None and done < n:
    progress(n - done)
  return (sums / counts[:, None]).astype(np.float32)  # [N, 512]
