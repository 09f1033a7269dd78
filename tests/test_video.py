"""Video media loading (PyAV containers, GIF, frames folders), the video tower, and MSR-VTT/MSVD
corpora with real (generated) clips going through `cart embed`."""
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from cart_jax.cli import main as cli
from cart_jax.models.dual_encoder import DualEncoderConfig
from cart_jax.media.video import load_video, read_video, sample_indices
from cart_jax.models.towers import registry
from cart_jax.models.towers.video import VideoTower, VideoTowerConfig

av = pytest.importorskip("av")

COLOURS = [(255, 0, 0), (0, 200, 0), (0, 0, 255), (240, 240, 0)]  # red, green, blue, yellow
EMBED = ("embed", "embed", "item embeddings of a corpus")


def write_video(path, codec, colours=COLOURS, size=32, fmt=None):
  """A clip with one solid-colour frame per entry of ``colours``, written by PyAV."""
  with av.open(str(path), "w", format=fmt) as c:
    s = c.add_stream(codec, rate=4)
    s.width, s.height, s.pix_fmt = size, size, "yuv420p"
    for col in colours:
      frame = np.zeros((size, size, 3), np.uint8)
      frame[:] = col
      for packet in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
        c.mux(packet)
    for packet in s.encode():
      c.mux(packet)
  return path


def write_gif(path, colours=COLOURS, size=32):
  frames = [Image.new("RGB", (size, size), c) for c in colours]
  frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
  return path


def _centre_colours(clip):
  return clip[:, clip.shape[1] // 2, clip.shape[2] // 2].astype(int)  # [T, 3]


# ----------------------------------------------------------------------------- loading


def test_sample_indices_even_and_repeating():
  np.testing.assert_array_equal(sample_indices(4, 4), [0, 1, 2, 3])
  np.testing.assert_array_equal(sample_indices(4, 8), [0, 0, 1, 1, 2, 2, 3, 3])
  np.testing.assert_array_equal(sample_indices(100, 4), [12, 37, 62, 87])
  np.testing.assert_array_equal(sample_indices(1, 3), [0, 0, 0])


def test_four_frame_gif_in_order(tmp_path):
  path = write_gif(tmp_path / "clip.gif")
  clip = read_video(path, 4, 16)
  assert clip.shape == (4, 16, 16, 3) and clip.dtype == np.uint8
  np.testing.assert_array_equal(_centre_colours(clip), COLOURS)
  np.testing.assert_array_equal(clip[2], np.broadcast_to(np.uint8(COLOURS[2]), (16, 16, 3)))
  # 4 frames sampled to 8 repeat evenly
  np.testing.assert_array_equal(_centre_colours(read_video(path, 8, 16)),
                                [COLOURS[i // 2] for i in range(8)])


def test_transparent_gif_frames_composite_on_white(tmp_path):
  im = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
  im.putpixel((0, 0), (0, 0, 255, 255))
  im.save(tmp_path / "t.gif", save_all=True, append_images=[im.copy()])
  clip = read_video(tmp_path / "t.gif", 2, 8)
  assert tuple(clip[0, 4, 4]) == (255, 255, 255) and tuple(clip[1, 0, 0]) == (0, 0, 255)


@pytest.mark.parametrize("name,codec", [("clip.mp4", "libx264"), ("clip.webm", "libvpx"),
                                        ("clip.avi", "mpeg4")])
def test_pyav_containers_in_order(tmp_path, name, codec):
  path = write_video(tmp_path / name, codec)
  clip = read_video(path, 8, 16)
  assert clip.shape == (8, 16, 16, 3)
  want = np.asarray([COLOURS[i // 2] for i in range(8)])
  assert np.abs(_centre_colours(clip) - want).max() <= 12  # lossy codecs: within a few levels


@pytest.mark.parametrize("name,codec", [("long.mp4", "libx264"), ("long.webm", "libvpx")])
def test_long_clip_samples_the_middle_of_equal_segments(tmp_path, name, codec):
  # 40 frames, frame k a grey of level 6k; 4 samples are frames 5, 15, 25, 35.
  greys = [(6 * k,) * 3 for k in range(40)]
  path = write_video(tmp_path / name, codec, greys)
  clip = read_video(path, 4, 16)
  assert np.abs(_centre_colours(clip)[:, 0] - [30, 90, 150, 210]).max() <= 6


def test_frames_folder_natural_order_and_other_files_ignored(tmp_path):
  d = tmp_path / "frames"
  d.mkdir()
  for name, col in zip(["f1.png", "f2.jpg", "f10.png", "f9.png"], COLOURS):
    Image.new("RGB", (20, 20), col).save(d / name, quality=95)
  (d / "notes.txt").write_text("not a frame")
  clip = read_video(d, 4, 10)
  # natural order: f1, f2, f9, f10
  want = np.asarray([COLOURS[0], COLOURS[1], COLOURS[3], COLOURS[2]])
  assert np.abs(_centre_colours(clip) - want).max() <= 3


def test_load_video_batch_shape_and_progress(tmp_path):
  paths = [write_gif(tmp_path / "a.gif"), write_video(tmp_path / "b.mp4", "libx264", COLOURS[::-1])]
  ticks = []
  x = load_video(paths, VideoTowerConfig(num_frames=4, image_size=16), ticks.append)
  assert x.shape == (2, 4, 16, 16, 3) and ticks == [1, 1]
  assert np.abs(_centre_colours(x[1]) - np.asarray(COLOURS[::-1])).max() <= 12
  # through the modality-generic entry point
  y = registry.load_media(paths, registry.default_config("video", num_frames=4, image_size=16))
  np.testing.assert_array_equal(x, y)


def test_broken_and_empty_media_errors_name_the_file(tmp_path):
  garbage = tmp_path / "broken.mp4"
  garbage.write_bytes(b"\x00not a video\x00" * 20)
  with pytest.raises(ValueError, match=r"broken\.mp4: cannot read video"):
    read_video(garbage, 4, 16)
  (tmp_path / "empty.webm").write_bytes(b"")
  with pytest.raises(ValueError, match=r"empty\.webm: cannot read video"):
    read_video(tmp_path / "empty.webm", 4, 16)
  (tmp_path / "broken.gif").write_bytes(b"GIF89a" + b"\x01" * 10)
  with pytest.raises(ValueError, match=r"broken\.gif: cannot read video"):
    read_video(tmp_path / "broken.gif", 4, 16)
  with pytest.raises(ValueError, match=r"missing\.mp4: video not found"):
    read_video(tmp_path / "missing.mp4", 4, 16)
  (tmp_path / "nothing").mkdir()
  (tmp_path / "nothing" / "readme.txt").write_text("x")
  with pytest.raises(ValueError, match=r"nothing: empty video: no frame images"):
    read_video(tmp_path / "nothing", 4, 16)
  (tmp_path / "badframes").mkdir()
  (tmp_path / "badframes" / "0001.png").write_bytes(b"not a png")
  with pytest.raises(ValueError, match=r"0001\.png: cannot read frame image"):
    read_video(tmp_path / "badframes", 4, 16)
  # a container with an audio stream only
  with av.open(str(tmp_path / "audio.wav"), "w") as c:
    s = c.add_stream("pcm_s16le", rate=8000)
    s.layout = "mono"
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
    frame.sample_rate = 8000
    for p in s.encode(frame):
      c.mux(p)
    for p in s.encode():
      c.mux(p)
  with pytest.raises(ValueError, match=r"audio\.wav: no video stream"):
    read_video(tmp_path / "audio.wav", 4, 16)
  # load_video stops at the first bad file and names it
  with pytest.raises(ValueError, match=r"broken\.mp4"):
    load_video([write_gif(tmp_path / "ok.gif"), garbage], VideoTowerConfig(num_frames=4, image_size=16))


# ----------------------------------------------------------------------------- tower

SMALL = dict(num_frames=4, image_size=16, patch_size=4, patch_dim=8, frame_hidden_dim=16,
             frame_dim=8, hidden_dim=32, out_dim=12)


def _moving_square(num_frames=4, size=16, seed=0):
  """A clip of a red square moving right on white, and its time reversal."""
  clip = np.full((num_frames, size, size, 3), 255, np.uint8)
  for t in range(num_frames):
    clip[t, 6:10, 2 + 3 * t:6 + 3 * t] = (200, 0, 0)
  return clip, clip[::-1].copy()


def test_tower_output_shape_and_config_validation():
  config = VideoTowerConfig(**SMALL)
  tower = VideoTower(config, rngs=nnx.Rngs(0))
  x = np.random.default_rng(0).integers(0, 256, (3, 4, 16, 16, 3), dtype=np.uint8)
  out = tower(jnp.asarray(x))
  assert out.shape == (3, 12) and out.dtype == jnp.float32
  assert tower.frame_features(jnp.asarray(x)).shape == (3, 4, 8)
  assert config.temporal_in_dim == 7 * 8
  with pytest.raises(ValueError, match="expects 4 frames per clip, got 5"):
    tower(jnp.zeros((1, 5, 16, 16, 3), jnp.uint8))
  with pytest.raises(ValueError, match="divisible"):
    VideoTowerConfig(image_size=30)
  with pytest.raises(ValueError, match="temporal must be one of"):
    VideoTowerConfig(temporal="lstm")
  with pytest.raises(ValueError, match="num_frames must be at least 2"):
    VideoTowerConfig(num_frames=1)


def test_flatten_tower_tells_a_clip_from_its_reversal_mean_pooling_cannot():
  clip, rev = _moving_square()
  x = jnp.asarray(np.stack([clip, rev]))  # [2, T, H, W, 3]
  flat = VideoTower(VideoTowerConfig(**SMALL), rngs=nnx.Rngs(0))(x)  # [2, d]
  mean = VideoTower(VideoTowerConfig(**SMALL, temporal="mean"), rngs=nnx.Rngs(0))(x)
  assert float(jnp.abs(flat[0] - flat[1]).max()) > 1e-2
  np.testing.assert_allclose(mean[0], mean[1], atol=1e-5)


def test_augmentation_shifts_every_frame_of_a_clip_alike():
  static = np.full((1, 4, 16, 16, 3), 255, np.uint8)
  static[:, :, 4:12, 4:12] = (0, 0, 180)  # the same frame four times
  tower = VideoTower(VideoTowerConfig(**SMALL, max_shift=3), rngs=nnx.Rngs(0))
  plain = tower.frame_features(jnp.asarray(static))
  shifted = [tower.frame_features(jnp.asarray(static), train=True, rngs=nnx.Rngs(augment=k))
             for k in range(4)]
  for f in shifted:  # frames stay identical to each other: no fake motion
    np.testing.assert_allclose(f[0, 1:], jnp.broadcast_to(f[0, :1], f[0, 1:].shape), atol=1e-5)
  assert max(float(jnp.abs(f - plain).max()) for f in shifted) > 1e-3  # but the clip moved


def test_video_config_through_the_tower_table_and_json():
  config = registry.default_config("video", out_dim=64, max_shift=None)
  assert isinstance(config, VideoTowerConfig) and config.out_dim == 64 and config.max_shift == 0
  again = DualEncoderConfig.from_json(DualEncoderConfig(tower=VideoTowerConfig(channels=(16,))).to_json())
  assert again.tower == VideoTowerConfig(channels=(16,))
  model = registry.make_tower(VideoTowerConfig(**SMALL), rngs=nnx.Rngs(1))
  assert isinstance(model, VideoTower)


# ----------------------------------------------------------------------------- importers -> embed


def _embed(corpus_dir, out):
  saved = list(cli.COMMANDS)
  names = {c[0] for c in saved}
  cli.COMMANDS[:] = saved + ([EMBED] if EMBED[0] not in names else [])
  try:
    return cli.main(["embed", "--corpus", str(corpus_dir), "--out", str(out), "--steps", "2",
                     "--batch-size", "4", "--dim", "8", "--text-batch", "8", "--no-progress",
                     "--checkpoint-every", "0"])
  finally:
    cli.COMMANDS[:] = saved


def _colours(seed):
  return [tuple(int(v) for v in c) for c in np.random.default_rng(seed).integers(0, 256, (3, 3))]


def test_msrvtt_and_msvd_imports_feed_cart_embed(tmp_path, capsys):
  from cart_jax.data.importers import import_corpus
  # MSR-VTT: videoN.mp4 + the two JSON files
  d = tmp_path / "msrvtt"
  (d / "videos").mkdir(parents=True)
  videos = [{"video_id": f"video{i}", "split": s, "id": i}
            for i, s in enumerate(["train", "train", "train", "validate", "test"])]
  sents = [{"caption": f"a clip number {i} variant {k}", "video_id": f"video{i}", "sen_id": 2 * i + k}
           for i in range(5) for k in range(2)]
  (d / "tv.json").write_text(json.dumps({"videos": videos[:4], "sentences": sents[:8]}))
  (d / "te.json").write_text(json.dumps({"videos": videos[4:], "sentences": sents[8:]}))
  for i in range(5):
    write_video(d / "videos" / f"video{i}.mp4", "libx264", _colours(i))
  msrvtt, _ = import_corpus("msrvtt", [d / "tv.json", d / "te.json"], tmp_path / "c_msrvtt",
                            media_root=d / "videos")
  assert msrvtt.modality == "video" and len(msrvtt.items) == 5
  # MSVD: <clip>.avi + AllVideoDescriptions.txt + split lists
  m = tmp_path / "msvd"
  (m / "YouTubeClips").mkdir(parents=True)
  clips = [f"abcDEF{i}_{i}_{i + 5}" for i in range(4)]
  (m / "AllVideoDescriptions.txt").write_text(
      "# header\n" + "".join(f"{c} a thing happens {k} in clip {i}\n" for i, c in enumerate(clips)
                             for k in range(2)))
  for name, ids in (("train", clips[:2]), ("val", clips[2:3]), ("test", clips[3:])):
    (m / f"{name}.txt").write_text("\n".join(ids) + "\n")
  for i, c in enumerate(clips):
    write_video(m / "YouTubeClips" / f"{c}.avi", "mpeg4", _colours(10 + i))
  msvd, _ = import_corpus("msvd", [m / "AllVideoDescriptions.txt"], tmp_path / "c_msvd",
                          media_root=m / "YouTubeClips",
                          split_lists={s: m / f"{s}.txt" for s in ("train", "val", "test")})
  assert msvd.modality == "video" and len(msvd.items) == 4
  for corpus, n in ((msrvtt, 5), (msvd, 4)):
    out = tmp_path / f"{corpus.name}.npy"
    assert _embed(corpus.root, out) == 0
    emb = np.load(out)
    assert emb.shape == (n, 8) and np.isfinite(emb).all()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    meta = json.loads(out.with_suffix(".meta.json").read_text())
    assert meta["summary"]["model_config"]["tower"]["modality"] == "video"
  # a corpus whose clip is broken: cart embed fails with exit code 2 naming the file
  (d / "videos" / "video2.mp4").write_bytes(b"broken")
  capsys.readouterr()
  assert _embed(msrvtt.root, tmp_path / "bad.npy") == 2
  assert "video2.mp4: cannot read video" in capsys.readouterr().err
  assert not (tmp_path / "bad.npy").exists()
