"""The pretrained item encoders ``cart embed --encoder NAME`` can put in front of the dual encoder.

======================  ==========  ========================================================
name                    modalities  network (weights' package, licence)
======================  ==========  ========================================================
``efficientnet-lite0``  image       EfficientNet-Lite0, ImageNet (``efficientnet-lite0-pytorch-
                                    model``, Apache-2.0): 1,280-d pooled features at 224 px
``efficientnet-lite0``  video       the same network on each of ``T`` frames: ``[T, 1280]``
``aisfx``               audio       the aiSFX sound-effects CNN (``aisfx``, model CC BY 4.0,
                                    A.B. Ma and A. Lerch, ISMIR 2022): 512-d, mean over 2 s blocks
======================  ==========  ========================================================

``pretrained`` names the modality's default (:data:`DEFAULTS`). Features are frozen: computed
once per item by :func:`features_of_files` and cached under ``<cache>/pretrained_features/``
(``$CART_CACHE_DIR`` or ``~/.cache/cart-jax``), keyed by the encoder, its weights and the
content of every file, so a second ``cart embed`` (another ``--dim``, more steps) reads them
back, and a changed file is encoded again.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from cart_jax.core.artefacts import atomic_write_via
from cart_jax.core.errors import CartError
from cart_jax.models.pretrained import weights

SCRATCH = "scratch"  # the from-scratch tower (towers/image.py, audio.py, video.py)
IMAGE_SIZE = 224  # EfficientNet-Lite0's ImageNet resolution
VIDEO_FRAME_SIZE = 224
VIDEO_FRAMES = 8
CHUNK = 256  # items read and encoded at a time (bounds memory on large corpora)


@dataclasses.dataclass(frozen=True)
class Encoder:
  name: str
  modalities: tuple[str, ...]
  source: Callable[[], weights.WeightsSource]


def _efficientnet_source():
  from cart_jax.models.pretrained import efficientnet_lite  # pylint: disable=g-import-not-at-top
  return efficientnet_lite.EFFICIENTNET_LITE0


def _aisfx_source():
  from cart_jax.models.pretrained import aisfx  # pylint: disable=g-import-not-at-top
  return aisfx.AISFX


ENCODERS = {
    "efficientnet-lite0": Encoder("efficientnet-lite0", ("image", "video"), _efficientnet_source),
    "aisfx": Encoder("aisfx", ("audio",), _aisfx_source),
}
DEFAULTS = {"image": "efficientnet-lite0", "video": "efficientnet-lite0", "audio": "aisfx"}
CHOICES = (SCRATCH, "pretrained", *ENCODERS)


class EncoderChoiceError(CartError):
  """An item encoder that does not exist or does not take the corpus's modality."""


def resolve(name: str, modality: str) -> str:
  """``scratch``, ``pretrained`` or an encoder name -> ``scratch`` or an encoder for ``modality``."""
  if name == SCRATCH:
    return SCRATCH
  if name == "pretrained":
    if modality not in DEFAULTS:
      raise EncoderChoiceError(f"no pretrained encoder for modality {modality!r} (have "
                               f"{sorted(DEFAULTS)})")
    return DEFAULTS[modality]
  if name not in ENCODERS:
    raise EncoderChoiceError(f"item encoder {name!r}: expected one of {list(CHOICES)}")
  if modality not in ENCODERS[name].modalities:
    raise EncoderChoiceError(f"item encoder {name!r} takes {list(ENCODERS[name].modalities)} "
                             f"items, not {modality} (for {modality}: "
                             f"{DEFAULTS.get(modality, 'none')})")
  return name


def feature_shape(name: str, modality: str) -> tuple[int, ...]:
  """One item's features: the network's own output size (per frame for video)."""
  if name == "aisfx":
    from cart_jax.models.pretrained.aisfx import EMBED_DIM  # pylint: disable=g-import-not-at-top
    return (EMBED_DIM,)
  from cart_jax.models.pretrained.efficientnet_lite import NUM_FEATURES  # pylint: disable=g-import-not-at-top
  return (VIDEO_FRAMES, NUM_FEATURES) if modality == "video" else (NUM_FEATURES,)


def _encode_chunk(name: str, modality: str, paths: Sequence[str | os.PathLike]) -> np.ndarray:
  """Features of a few files: ``float32 [n, *feature_shape]``."""
  if name == "aisfx":
    from cart_jax.models.pretrained import aisfx  # pylint: disable=g-import-not-at-top
    return aisfx.encode_audio(paths)
  from cart_jax.models.pretrained import efficientnet_lite  # pylint: disable=g-import-not-at-top
  if modality == "video":
    from cart_jax.media.video import load_video  # pylint: disable=g-import-not-at-top
    clips = load_video(paths, _MediaConfig(VIDEO_FRAME_SIZE, VIDEO_FRAMES))  # [n, T, S, S, 3]
    n, t = clips.shape[:2]
    feats = efficientnet_lite.encode_images(clips.reshape((n * t,) + clips.shape[2:]))
    return feats.reshape(n, t, -1)  # [n, T, 1280]
  from cart_jax.media.image import load_images  # pylint: disable=g-import-not-at-top
  return efficientnet_lite.encode_images(load_images(paths, _MediaConfig(IMAGE_SIZE)))


@dataclasses.dataclass(frozen=True)
class _MediaConfig:
  image_size: int
  num_frames: int = VIDEO_FRAMES


def _weights_sha256(name: str) -> str:
  return ENCODERS[name].source().sha256


def _content_key(name: str, modality: str, paths: Sequence[str | os.PathLike]) -> str:
  """One key for (encoder, its weights, its input settings, every file's bytes in order)."""
  h = hashlib.sha256(f"{name}\0{modality}\0{_weights_sha256(name)}\0".encode())
  h.update(f"{IMAGE_SIZE}\0{VIDEO_FRAME_SIZE}\0{VIDEO_FRAMES}\0".encode())
  for p in paths:
    h.update(hashlib.sha256(Path(p).read_bytes()).digest())
  return h.hexdigest()


def cache_path(name: str, modality: str, paths: Sequence[str | os.PathLike]) -> Path:
  return (weights.cache_dir().parent / "pretrained_features" /
          f"{name}-{modality}-{_content_key(name, modality, paths)[:24]}.npy")


def features_of_files(name: str, modality: str, paths: Sequence[str | os.PathLike],
                      progress: Callable[[int], None] | None = None) -> np.ndarray:
  """Frozen features of every file: ``float32 [N, *feature_shape(name, modality)]``, cached.

  Raises:
    EncoderChoiceError: ``name`` does not take ``modality``.
    MediaError: a file cannot be read (named).
    PretrainedWeightsError: the weights' package is missing or altered.
  """
  name = resolve(name, modality)
  if name == SCRATCH:
    raise EncoderChoiceError("the scratch tower reads media, not pretrained features")
  cached = cache_path(name, modality, paths)
  if cached.is_file():
    try:
      feats = np.load(cached, allow_pickle=False)
      if feats.shape == (len(paths), *feature_shape(name, modality)) and feats.dtype == np.float32:
        if progress is not None:
          progress(len(paths))
        return feats
    except (OSError, ValueError):
      pass  # unreadable: encode again and replace it
  out = np.empty((len(paths), *feature_shape(name, modality)), np.float32)
  for s in range(0, len(paths), CHUNK):
    out[s:s + CHUNK] = _encode_chunk(name, modality, paths[s:s + CHUNK])
    if progress is not None:
      progress(len(paths[s:s + CHUNK]))
  bad = ~np.isfinite(out).reshape(len(paths), -1).all(axis=1)  # [N]
  if bad.any():
    first = paths[int(np.argmax(bad))]
    raise CartError(f"{name}: non-finite features for {int(bad.sum())} item(s), first {first}")
  atomic_write_via(cached, lambda tmp: np.save(tmp, out))
  return out
