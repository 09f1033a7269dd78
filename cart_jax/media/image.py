"""Image reader: files -> ``uint8 [N, size, size, 3]`` (alpha composited onto white, resized).

Size limit: an image is decoded only if it has at most :data:`MAX_IMAGE_PIXELS` pixels, set
explicitly here (Pillow's own default warns at 89 M pixels and refuses above 179 M): a small file
that declares a huge canvas (a "decompression bomb", 20000 x 20000 in a few hundred KB) is a
:class:`MediaError` ``image too large: W x H (limit N pixels)`` naming the file, never a
``DecompressionBombError`` traceback or gigabytes of memory. The item towers see 32-64 pixel
images, so the limit only has to leave room for real photographs.
"""
from __future__ import annotations

import contextlib
import os
import threading
import warnings
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np

from cart_jax.media import MediaError

# 2**27 = 134,217,728 pixels (11585 x 11585): a 108-megapixel phone photo passes; decoding one
# takes ~0.5 GiB as RGBA. Pillow's check is set to the same number (it warns above it and refuses
# above twice it); ours refuses above it, before any pixel is decoded.
MAX_IMAGE_PIXELS = 2 ** 27
_SIZE_LOCK = threading.Lock()


class ImageMediaConfig(Protocol):
  """What :func:`load_images` reads from its config (``ImageTowerConfig`` has it)."""
  image_size: int


def _too_large(path, width: int, height: int) -> MediaError:
  return MediaError(f"{path}: image too large: {width} x {height} "
                    f"(limit {MAX_IMAGE_PIXELS} pixels)")


def _declared_size(path) -> tuple[int, int]:
  """Width and height from the header of an image Pillow refused as a bomb (nothing decoded)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with _SIZE_LOCK:  # Pillow's limit is a module global: lift it only to read this header
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
      with Image.open(path) as im:
        return im.size
    finally:
      Image.MAX_IMAGE_PIXELS = saved


def check_image_size(path, size: tuple[int, int]) -> None:
  """Raises MediaError ``image too large: W x H`` when ``size`` is over the limit."""
  if size[0] * size[1] > MAX_IMAGE_PIXELS:
    raise _too_large(path, *size)


@contextlib.contextmanager
def open_image(path: str | os.PathLike) -> Iterator:
  """``PIL.Image.open`` with the explicit size limit checked before anything is decoded.

  Raises:
    MediaError: ``image too large: W x H (limit N pixels)``, naming the file.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS  # explicit, not Pillow's default
  with warnings.catch_warnings():
    # Between the limit and twice it Pillow only warns; the check below refuses it.
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    try:
      im = Image.open(path)
    except Image.DecompressionBombError:
      raise _too_large(path, *_declared_size(path)) from None
  with im:
    check_image_size(path, im.size)
    yield im


def check_images(paths: Sequence[str | os.PathLike]) -> int:
  """Decodes every image once (the size limit checked first); returns how many.

  For validating a corpus (``cart data info``) before a long job meets a bad file.

  Raises:
    MediaError naming the first file that is too large or cannot be read as an image.
  """
  from PIL import UnidentifiedImageError  # pylint: disable=g-import-not-at-top
  for path in paths:
    try:
      with open_image(path) as im:
        im.load()
    except MediaError:
      raise
    except (OSError, UnidentifiedImageError, EOFError, ValueError, SyntaxError) as e:
      raise MediaError(f"{path}: cannot read image ({e})") from e
  return len(paths)


def load_images(paths: Sequence[str | os.PathLike], config: ImageMediaConfig,
                progress: Callable[[int], None] | None = None) -> np.ndarray:
  """Reads images as ``uint8 [N, size, size, 3]``: alpha composited onto white, then resized.

  Raises:
    MediaError naming the file that cannot be read as an image, or is too large
    (:data:`MAX_IMAGE_PIXELS`).
  """
  from PIL import Image, UnidentifiedImageError  # pylint: disable=g-import-not-at-top

  size = config.image_size
  out = np.empty((len(paths), size, size, 3), np.uint8)  # [N, H, W, 3]
  for i, path in enumerate(paths):
    try:
      with open_image(path) as im:
        im.load()
        if im.mode in ("RGBA", "LA", "P"):
          im = im.convert("RGBA")
          bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
          im = Image.alpha_composite(bg, im)
        im = im.convert("RGB")
    except MediaError:
      raise
    except (OSError, UnidentifiedImageError, EOFError) as e:
      raise MediaError(f"{path}: cannot read image ({e})") from e
    except ValueError as e:  # Pillow's limits on a file's chunks (e.g. a huge PNG text chunk)
      raise MediaError(f"{path}: cannot read image ({e})") from e
    if im.size != (size, size):
      im = im.resize((size, size), Image.Resampling.BILINEAR)
    out[i] = np.asarray(im)
    if progress is not None:
      progress(1)
  return out
