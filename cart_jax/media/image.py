"""Image reader: files -> ``uint8 [N, size, size, 3]`` (alpha composited onto white, resized)."""
from __future__ import annotations

import os
from typing import Callable, Protocol, Sequence

import numpy as np

from cart_jax.media import MediaError


class ImageMediaConfig(Protocol):
  """What :func:`load_images` reads from its config (``ImageTowerConfig`` has it)."""
  image_size: int


def load_images(paths: Sequence[str | os.PathLike], config: ImageMediaConfig,
                progress: Callable[[int], None] | None = None) -> np.ndarray:
  """Reads images as ``uint8 [N, size, size, 3]``: alpha composited onto white, then resized.

  Raises:
    MediaError naming the file that cannot be read as an image.
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
      raise MediaError(f"{path}: cannot read image ({e})") from e
    if progress is not None:
      progress(1)
  return out
