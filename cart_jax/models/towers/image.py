"""Item towers: small networks that map one modality's media to a ``[batch, dim]`` embedding.

Every tower follows one interface, so the dual encoder and ``cart embed`` never look at the
modality:

* a frozen config dataclass (``ImageTowerConfig``) with ``modality`` and ``out_dim``;
* ``load_media(paths, config) -> np.ndarray [N, ...]``: the host-side reader that turns media
  files into the tower's fixed-shape input (images: ``uint8 [N, H, W, 3]``);
* an ``nnx.Module`` whose ``__call__(x [B, ...], *, train=False, rngs=None) -> [B, out_dim]``
  is NOT normalised (the dual encoder L2-normalises).

``TOWERS`` maps a modality to ``(config class, module class, media loader)``. Images are here;
audio (``encoders/audio.py``: log-mel spectrograms) and video (``encoders/video.py``: frames
``[B, T, H, W, 3]``) are imported on first use and plug into the same table.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True)
class ImageTowerConfig:
  """A small, batchnorm-free image tower that trains in minutes on a 2-core CPU.

  ``image -> average-pool by downsample -> non-overlapping patch_size patches -> Linear
  (patch_dim) -> GELU -> [3x3 stride-2 conv + GELU per entry of channels] -> flatten ->
  LayerNorm -> Linear(hidden_dim) -> GELU -> Linear(out_dim)``.

  The patch stem is a strided convolution written as a matmul, and the head keeps the spatial
  layout (flatten, not a global pool): emoji differ by where things are, not only by what.
  Measured on the shared 2-core CPU: a 4-block 3x3 conv net (32..128 channels at 64 px) took
  17 s per 256-image training step, this default 0.16 s (one extra conv block: 0.24 s), so the
  default uses matmuls only.

  Attributes:
    image_size: images are resized to ``image_size`` x ``image_size`` when read (emoji: 64).
    downsample: average-pool factor applied first (2: 64 -> 32 pixels).
    patch_size, patch_dim: patch stem.
    channels: optional stride-2 3x3 conv blocks after the stem.
    hidden_dim, out_dim: MLP head; ``out_dim`` is the embedding size.
    max_shift: training augmentation: random translation of up to this many pixels (0 = off).
  """
  modality: str = "image"
  image_size: int = 64
  downsample: int = 2
  patch_size: int = 4
  patch_dim: int = 64
  channels: tuple[int, ...] = ()
  hidden_dim: int = 512
  out_dim: int = 256
  max_shift: int = 0

  def __post_init__(self):
    factor = self.downsample * self.patch_size * 2 ** len(self.channels)
    if self.image_size % factor:
      raise ValueError(f"image_size {self.image_size} must be divisible by downsample * patch_size "
                       f"* 2**len(channels) = {factor}")
    if min(self.out_dim, self.hidden_dim, self.patch_dim, self.downsample, self.patch_size) < 1:
      raise ValueError(f"bad ImageTowerConfig {self}")

  @property
  def grid(self) -> int:
    """Side of the final feature map."""
    return self.image_size // (self.downsample * self.patch_size * 2 ** len(self.channels))


def load_images(paths: Sequence[str | os.PathLike], config: ImageTowerConfig,
                progress: Callable[[int], None] | None = None) -> np.ndarray:
  """Reads images as ``uint8 [N, size, size, 3]``: alpha composited onto white, then resized.

  Raises:
    ValueError naming the file that cannot be read as an image.
  """
  from PIL import Image, UnidentifiedImageError  # pylint: disable=g-import-not-at-top

  size = config.image_size
  out = np.empty((len(paths), size, size, 3), np.uint8)  # [N, H, W, 3]
  for i, path in enumerate(paths):
    try:
      with Image.open(path) as im:
        im.load()
        if im.mode in ("RGBA", "LA", "P"):
          im = im.convert("RGBA")
          bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
          im = Image.alpha_composite(bg, im)
        im = im.convert("RGB")
        if im.size != (size, size):
          im = im.resize((size, size), Image.Resampling.BILINEAR)
        out[i] = np.asarray(im)
    except (OSError, UnidentifiedImageError) as e:
      raise ValueError(f"{path}: cannot read image ({e})") from e
    if progress is not None:
      progress(1)
  return out


class ImageTower(nnx.Module):
  """``uint8 [B, H, W, 3]`` -> ``[B, out_dim]`` (see :class:`ImageTowerConfig`)."""

  def __init__(self, config: ImageTowerConfig, *, rngs: nnx.Rngs):
    self.config = config
    p = config.patch_size
    self.stem = nnx.Linear(p * p * 3, config.patch_dim, rngs=rngs)
    convs, c_in = [], config.patch_dim
    for c_out in config.channels:
      convs.append(nnx.Conv(c_in, c_out, (3, 3), strides=(2, 2), padding="SAME", rngs=rngs))
      c_in = c_out
    self.convs = nnx.List(convs)
    flat = config.grid * config.grid * c_in
    self.norm = nnx.LayerNorm(flat, rngs=rngs)
    self.hidden = nnx.Linear(flat, config.hidden_dim, rngs=rngs)
    self.out = nnx.Linear(config.hidden_dim, config.out_dim, rngs=rngs)

  def __call__(self, images: jax.Array, *, train: bool = False,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    c = self.config
    x = images.astype(jnp.float32) / 127.5 - 1.0  # [B, H, W, 3] in [-1, 1]
    if train and c.max_shift > 0 and rngs is not None:
      x = random_shift(x, c.max_shift, rngs.augment())
    b, h, w, ch = x.shape
    if c.downsample > 1:
      f = c.downsample
      x = x.reshape(b, h // f, f, w // f, f, ch).mean(axis=(2, 4))  # [B, H/f, W/f, 3]
      h, w = h // f, w // f
    p = c.patch_size
    x = x.reshape(b, h // p, p, w // p, p, ch).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, h // p, w // p, p * p * ch)  # [B, h, w, p*p*3] patches
    x = jax.nn.gelu(self.stem(x))  # [B, h, w, patch_dim]
    for conv in self.convs:
      x = jax.nn.gelu(conv(x))  # [B, h/2, w/2, C]
    x = x.reshape(b, -1)  # [B, grid * grid * C]
    x = jax.nn.gelu(self.hidden(self.norm(x)))  # [B, hidden]
    return self.out(x)  # [B, out_dim]


def random_shift(x: jax.Array, s: int, key: jax.Array) -> jax.Array:
  """Translates each image by an integer offset in ``[-s, s]^2``, padding with white (+1)."""
  b, h, w, c = x.shape
  padded = jnp.pad(x, ((0, 0), (s, s), (s, s), (0, 0)), constant_values=1.0)  # [B, H+2s, W+2s, C]
  offsets = jax.random.randint(key, (b, 2), 0, 2 * s + 1)  # [B, 2]
  crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c))
  return jax.vmap(crop)(padded, offsets)  # [B, H, W, C]


def default_config(modality: str, **overrides):
  """The tower config ``cart embed`` uses for a corpus of ``modality``; ``overrides`` set fields.

  Overrides that the modality's config does not have (e.g. ``max_shift`` for audio) are
  ignored when their value is ``None``; otherwise they are an error.
  """
  cls = _entry(modality)[0]
  fields = {f.name for f in dataclasses.fields(cls)}
  bad = sorted(k for k, v in overrides.items() if k not in fields and v is not None)
  if bad:
    raise ValueError(f"{modality} tower: option(s) {bad} do not apply to {cls.__name__}")
  return cls(**{k: v for k, v in overrides.items() if k in fields and v is not None})


def make_tower(config, *, rngs: nnx.Rngs) -> nnx.Module:
  """Builds the tower module for ``config.modality``."""
  return _entry(config.modality)[1](config, rngs=rngs)


def load_media(paths: Sequence[str | os.PathLike], config, progress=None) -> np.ndarray:
  """Reads media files into the fixed-shape array the tower of ``config.modality`` takes."""
  return _entry(config.modality)[2](paths, config, progress)


def config_from_dict(d: dict):
  """Inverse of ``dataclasses.asdict`` for a tower config (checkpoints store it as JSON)."""
  cls = _entry(d.get("modality"))[0]
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - fields)
  if unknown:
    raise ValueError(f"tower config: unknown field(s) {unknown} for {cls.__name__}")
  return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})


def _entry(modality: str):
  if modality not in TOWERS and modality in _LAZY:
    # Audio/video towers live in their own modules (they pull soundfile / PyAV on use only);
    # each exposes TOWER_ENTRY = (config class, module class, media loader).
    import importlib  # pylint: disable=g-import-not-at-top
    TOWERS[modality] = importlib.import_module(_LAZY[modality]).TOWER_ENTRY
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
_LAZY = {"audio": "cart_jax.models.towers.audio", "video": "cart_jax.models.towers.video"}
