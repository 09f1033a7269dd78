"""Video reader: clips -> ``uint8 [N, T, H, W, 3]``.

Reads ``T`` frames sampled evenly from

* a container PyAV reads (``.mp4``, ``.webm``, ``.avi``, ``.mkv``, ``.mov``, ...),
* an animated ``.gif`` (Pillow; frames composited onto white),
* a directory of frames (image files in natural name order: ``f2.png`` before ``f10.png``),

each frame resized to ``image_size`` x ``image_size`` RGB: ``uint8 [N, T, H, W, 3]``. Frame ``i``
of ``T`` is source frame ``floor((i + 0.5) * n / T)`` (the middle of the ``i``-th of ``T`` equal
segments), so a clip shorter than ``T`` frames repeats its frames evenly (4 -> 8: 0 0 1 1 2 2 3 3).

PyAV and Pillow are imported when media are read, not when this module is imported.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np

from cart_jax.media import MediaError
from cart_jax.media.image import open_image

FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class VideoMediaConfig(Protocol):
  """What :func:`load_video` reads from its config (``VideoTowerConfig`` has it)."""
  num_frames: int
  image_size: int


def sample_indices(num_source: int, num_frames: int) -> np.ndarray:
  """Evenly spaced source frame indices ``int [num_frames]`` (middle of equal segments)."""
  if num_source < 1:
    raise ValueError("no frames to sample from")
  i = np.arange(num_frames)
  return np.minimum(((i + 0.5) * num_source / num_frames).astype(np.int64), num_source - 1)


def _natural_key(name: str):
  return [int(tok) if tok.isdigit() else tok.casefold() for tok in re.split(r"(\d+)", name)]


def _to_rgb(im, size: int) -> np.ndarray:
  """PIL image -> ``uint8 [size, size, 3]``: alpha composited onto white, bilinear resize."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if im.mode in ("RGBA", "LA", "P", "PA") or "transparency" in im.info:
    im = im.convert("RGBA")
    bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
    im = Image.alpha_composite(bg, im)
  im = im.convert("RGB")
  if im.size != (size, size):
    im = im.resize((size, size), Image.Resampling.BILINEAR)
  return np.asarray(im)


def _read_frames_dir(path: Path, size: int) -> list[np.ndarray]:
  from PIL import UnidentifiedImageError  # pylint: disable=g-import-not-at-top
  files = sorted((p for p in path.iterdir() if p.is_file() and p.suffix.lower() in FRAME_EXTENSIONS),
                 key=lambda p: _natural_key(p.name))
  frames = []
  for f in files:
    try:
      with open_image(f) as im:  # the explicit size limit of media.image
        im.load()
        frames.append(_to_rgb(im, size))
    except MediaError:
      raise
    except (OSError, UnidentifiedImageError, ValueError) as e:
      raise MediaError(f"{f}: cannot read frame image ({e})") from e
  return frames


def _read_gif(path: Path, size: int) -> list[np.ndarray]:
  from PIL import Image, ImageSequence  # pylint: disable=g-import-not-at-top
  with open_image(path) as im:  # the explicit size limit of media.image
    try:
      return [_to_rgb(frame.copy(), size) for frame in ImageSequence.Iterator(im)]
    except Image.DecompressionBombError as e:  # a frame larger than the canvas checked above
      raise MediaError(f"{path}: image too large: a frame exceeds the limit ({e})") from None


def _read_container(path: Path, size: int, num_frames: int) -> list[np.ndarray]:
  """Decoded frames, resized; only the sampled ones when the header's frame count is right.

  When the stream header gives a frame count, only the ``num_frames`` sampled frames are
  converted (decoding still visits every frame, conversion is most of the cost on long clips);
  if the decoded count disagrees with the header, every frame is converted and sampled again.
  """
  import av  # pylint: disable=g-import-not-at-top

  def convert(frame):
    # Resize while converting: a long clip's frames are kept small.
    return frame.to_ndarray(width=size, height=size, format="rgb24", interpolation="BILINEAR")

  with av.open(str(path)) as container:
    if not container.streams.video:
      raise MediaError(f"{path}: no video stream (streams: "
                       f"{[s.type for s in container.streams] or 'none'})")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    declared = int(stream.frames or 0)
    if declared > 0:
      wanted = set(sample_indices(declared, num_frames).tolist())
      kept, n = {}, 0
      for n, frame in enumerate(container.decode(stream), start=1):
        if n - 1 in wanted:
          kept[n - 1] = convert(frame)
      if n == declared:
        # Only the sampled frames hold pixels; read_video samples the same indices again.
        placeholder = next(iter(kept.values()))
        return [kept.get(i, placeholder) for i in range(n)]
      container.seek(0)
    return [convert(frame) for frame in container.decode(stream)]


def read_video(path: str | os.PathLike, num_frames: int, size: int) -> np.ndarray:
  """One clip as ``uint8 [num_frames, size, size, 3]`` (see the module docstring).

  Raises:
    MediaError naming ``path`` when it is missing, unreadable, or has no frames.
  """
  import av  # pylint: disable=g-import-not-at-top
  from PIL import UnidentifiedImageError  # pylint: disable=g-import-not-at-top
  path = Path(path)
  if not path.exists():
    raise MediaError(f"{path}: video not found")
  try:
    if path.is_dir():
      frames = _read_frames_dir(path, size)
      what = f"no frame images ({', '.join(FRAME_EXTENSIONS)}) in this directory"
    elif path.suffix.lower() == ".gif":
      frames = _read_gif(path, size)
      what = "no frames"
    else:
      frames = _read_container(path, size, num_frames)
      what = "no decodable video frames"
  except (av.FFmpegError, OSError, UnidentifiedImageError, EOFError) as e:
    raise MediaError(f"{path}: cannot read video ({type(e).__name__}: {e})") from e
  if not frames:
    raise MediaError(f"{path}: empty video: {what}")
  idx = sample_indices(len(frames), num_frames)
  return np.stack([frames[i] for i in idx])  # [T, size, size, 3]


def load_video(paths: Sequence[str | os.PathLike], config: VideoMediaConfig,
               progress: Callable[[int], None] | None = None) -> np.ndarray:
  """Reads clips as ``uint8 [N, num_frames, image_size, image_size, 3]`` (``registry.load_media``)."""
  t, s = config.num_frames, config.image_size
  out = np.empty((len(paths), t, s, s, 3), np.uint8)  # [N, T, H, W, 3]
  for i, path in enumerate(paths):
    out[i] = read_video(path, t, s)
    if progress is not None:
      progress(1)
  return out
