"""The item-tower registry: modality -> (config class, module class, media reader).

``cart embed`` and the dual encoder go through these functions and never look at the modality.
Images are registered up front; audio and video (``towers/audio.py`` + ``media/audio.py``,
``towers/video.py`` + ``media/video.py``) are imported on first use and plug into the same
``TOWERS`` table. A :class:`~cart_jax.models.towers.features.FeatureTowerConfig` (a head on a
pretrained network's frozen features, ``cart embed --encoder efficientnet-lite0``) is told apart
by its ``encoder`` field, whatever its modality: its "media" are the cached features.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Callable, Sequence

import numpy as np
from flax import nnx

from cart_jax.core.errors import CartError
from cart_jax.media.image import load_images
from cart_jax.models.towers.features import FeatureTower, FeatureTowerConfig
from cart_jax.models.towers.image import ImageTower, ImageTowerConfig


def default_config(modality: str, encoder: str = "scratch", **overrides):
  """The tower config ``cart embed`` uses for a corpus of ``modality``; ``overrides`` set fields.

  ``encoder``: ``scratch`` (the modality's own tower, trained from the pixels / samples) or a
  pretrained encoder (``pretrained``, ``efficientnet-lite0``, ``aisfx``): a
  :class:`FeatureTowerConfig` on its frozen features. Overrides that the config does not have
  (e.g. ``max_shift`` for audio) are ignored when their value is ``None``; otherwise they are an
  error.
  """
  from cart_jax.models.pretrained import encoders  # pylint: disable=g-import-not-at-top
  name = encoders.resolve(encoder, modality)
  if name != encoders.SCRATCH:
    overrides = dict(overrides, modality=modality, encoder=name,
                     feature_shape=encoders.feature_shape(name, modality))
    cls = FeatureTowerConfig
  else:
    cls = _entry(modality)[0]
  fields = {f.name for f in dataclasses.fields(cls)}
  bad = sorted(k for k, v in overrides.items() if k not in fields and v is not None)
  if bad:
    raise CartError(f"{modality} tower: option(s) {bad} do not apply to {cls.__name__}")
  return cls(**{k: v for k, v in overrides.items() if k in fields and v is not None})


def make_tower(config, *, rngs: nnx.Rngs) -> nnx.Module:
  """Builds the tower module for ``config.modality`` (or the head on pretrained features)."""
  if isinstance(config, FeatureTowerConfig):
    return FeatureTower(config, rngs=rngs)
  return _entry(config.modality)[1](config, rngs=rngs)


def load_media(paths: Sequence[str | os.PathLike], config, progress=None) -> np.ndarray:
  """Reads media files into the fixed-shape array the tower of ``config.modality`` takes
  (a feature tower: the pretrained network's features of the files, computed or cached)."""
  if isinstance(config, FeatureTowerConfig):
    from cart_jax.models.pretrained import encoders  # pylint: disable=g-import-not-at-top
    return encoders.features_of_files(config.encoder, config.modality, paths, progress)
  return _entry(config.modality)[2](paths, config, progress)


def config_from_dict(d: dict):
  """Inverse of ``dataclasses.asdict`` for a tower config (checkpoints store it as JSON)."""
  cls = FeatureTowerConfig if "encoder" in d else _entry(d.get("modality"))[0]
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - fields)
  if unknown:
    raise CartError(f"tower config: unknown field(s) {unknown} for {cls.__name__}")
  return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})


def _entry(modality: str):
  if modality not in TOWERS and modality in _LAZY:
    # Audio/video readers pull soundfile / PyAV on use only; their modules are imported on first use.
    TOWERS[modality] = tuple(getattr(importlib.import_module(module), name)
                             for module, name in _LAZY[modality])
  if modality not in TOWERS:
    raise NotImplementedError(
        f"no built-in item tower for modality {modality!r} (have {sorted(set(TOWERS) | set(_LAZY))}); "
        "bring precomputed embeddings instead (cart embed --encoder precomputed)")
  return TOWERS[modality]


def has_tower(modality: str) -> bool:
  return modality in TOWERS or modality in _LAZY


# modality -> (config class, module class, media loader).
TOWERS: dict[str, tuple[type, type, Callable]] = {
    "image": (ImageTowerConfig, ImageTower, load_images),
}
# modality -> (module, attribute) of its config class, module class and media loader.
_LAZY = {
    "audio": (("cart_jax.models.towers.audio", "AudioTowerConfig"),
              ("cart_jax.models.towers.audio", "AudioTower"),
              ("cart_jax.media.audio", "load_audio")),
    "video": (("cart_jax.models.towers.video", "VideoTowerConfig"),
              ("cart_jax.models.towers.video", "VideoTower"),
              ("cart_jax.media.video", "load_video")),
}
