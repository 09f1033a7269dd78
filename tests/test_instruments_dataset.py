"""The built-in text-audio corpus `instruments`: MIDI writer, rendering, texts/split, `cart embed`."""
import collections
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("soundfile")

from cart_jax.cli import main as cli  # pylint: disable=g-import-not-at-top,wrong-import-position
from cart_jax.data.datasets import instruments as ins  # pylint: disable=g-import-not-at-top,wrong-import-position
from cart_jax.data.corpus import find_leaks, normalize_text  # pylint: disable=g-import-not-at-top,wrong-import-position
from cart_jax.media import audio as media  # pylint: disable=g-import-not-at-top,wrong-import-position
from cart_jax.models.towers import audio  # pylint: disable=g-import-not-at-top,wrong-import-position


def _have_tools():
  try:
    ins.check_tools()
    return True
  except RuntimeError:
    return False


needs_tools = pytest.mark.skipif(not _have_tools(), reason="fluidsynth / timgm6mb-soundfont / "
                                 "sound-theme-freedesktop not installed (make installs them)")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  if not _have_tools():
    pytest.skip("fluidsynth / soundfont / event sounds not installed")
  c, stats = ins.prepare_instruments(tmp_path_factory.mktemp("c") / "instruments", limit=40,
                                     progress=False)
  return c, stats


def test_midi_writer_bytes():
  assert [ins._vlq(n) for n in (0, 0x7F, 0x80, 0x3FFF, 0x4000)] == [
      b"\x00", b"\x7f", b"\x81\x00", b"\xff\x7f", b"\x81\x80\x00"]
  data = ins.midi_file([(960, bytes([0x80, 60, 0])), (0, bytes([0x90, 60, 100]))])
  assert data[:14] == b"MThd\x00\x00\x00\x06\x00\x00\x00\x01\x01\xe0"  # format 0, 1 track, 480 tpq
  track = data[22:]
  assert data[14:18] == b"MTrk" and int.from_bytes(data[18:22], "big") == len(track)
  # tempo 500000 us, note on at 0, note off 960 ticks later (VLQ 87 40), end of track
  assert track == (b"\x00\xff\x51\x03\x07\xa1\x20" + b"\x00\x90\x3c\x64" + b"\x87\x40\x80\x3c\x00"
                   + b"\x00\xff\x2f\x00")


def test_grid_and_names():
  items = ins.instrument_items()
  assert len(items) == 128 * 3 * 2 * 2 == 1536 and len(set(i["id"] for i in items)) == 1536
  assert len(ins.GM_PROGRAMS) == 128 and len(set(ins.GM_PROGRAMS)) == 128 and len(ins.GM_FAMILIES) == 16
  assert items[0]["id"] == "gm000-low-soft-short" and items[0]["family"] == "piano"
  assert items[-1]["name"] == "gunshot" and items[-1]["family"] == "sound effects"
  assert ins.GM_PROGRAMS[40] == "violin" and ins.GM_FAMILIES[40 // 8] == "strings"


@needs_tools
def test_rendered_clips_differ_by_loudness_register_and_articulation():
  clips = [c for c in ins.instrument_items() if c["program"] == 0]  # piano, 12 clips, 1 process
  waves = ins.render_instruments(clips, workers=1)
  assert len(waves) == 12
  config = audio.AudioTowerConfig()
  fb = media.mel_filterbank(config)

  def feats(register, loudness, articulation):
    w = waves[f"gm000-{register}-{loudness}-{articulation}"].astype(np.float32) / 32768
    assert w.shape == (int(ins.CLIP_SECONDS * ins.SAMPLE_RATE),)
    mel = media.log_mel(w, config, fb)  # [T, M]
    power = 10 ** (mel / 10)
    centroid = float((power.sum(0) * np.arange(config.n_mels)).sum() / power.sum())
    return float(np.sqrt(np.mean(w ** 2))), centroid, mel

  loud, soft = feats("middle", "loud", "sustained"), feats("middle", "soft", "sustained")
  assert 20 * np.log10(loud[0] / soft[0]) > 6.0  # velocity 112 vs 40
  low, high = feats("low", "loud", "sustained"), feats("high", "loud", "sustained")
  assert high[1] > low[1] + 5  # mel bands
  short, held = feats("middle", "loud", "short"), feats("middle", "loud", "sustained")
  # Staccato notes (0.1 s every 0.35 s) go quiet between notes: the short clip's frame energy
  # varies more over time than the held note's.
  t = lambda s: int(s * ins.SAMPLE_RATE / config.hop)
  frame_energy = lambda m: 10 * np.log10((10 ** (m / 10)).sum(1))  # [T] dB
  assert np.std(frame_energy(short[2][:t(1.3)])) > np.std(frame_energy(held[2][:t(1.3)]))


def test_texts_split_is_honest_and_identifying():
  clips = ins.instrument_items()
  texts = [t for c in clips for t in ins.instrument_texts(c)]
  texts += [t for name in ins.EVENT_DESCRIPTIONS for t in ins.event_texts(name)]
  per_split = collections.Counter(t.split for t in texts)
  n = len(clips) + len(ins.EVENT_DESCRIPTIONS)
  assert per_split["test"] == per_split["val"] == n
  assert per_split["train"] == 6 * len(clips) + 3 * len(ins.EVENT_DESCRIPTIONS)
  owners = collections.defaultdict(set)
  for t in texts:
    owners[normalize_text(t.text)].add(t.item_id)
  assert all(len(v) == 1 for v in owners.values())  # no text names two items
  train = {normalize_text(t.text) for t in texts if t.split == "train"}
  held = [normalize_text(t.text) for t in texts if t.split != "train"]
  assert not train.intersection(held)
  # The third synonym of each attribute occurs in held-out texts only, in about a third of them.
  train_words = set(" ".join(train).split())
  for options in ins.ATTRIBUTE_WORDS.values():
    for third in options[2]:
      assert not any(f" {normalize_text(third)} " in f" {x} " for x in train), third
  soft = [normalize_text(t.text).split() for t in texts if t.split == "test" and "-soft-" in t.item_id]
  uses = {w: sum(w in x for x in soft) for w in ("soft", "quiet", "gentle", "softly", "quietly", "gently")}
  assert len(soft) == 768 and sum(uses.values()) == 768
  assert 200 < uses["gentle"] + uses["gently"] < 320  # ~1/3 unseen
  assert "gentle" not in train_words and "gently" not in train_words
  sources = collections.defaultdict(set)
  for t in texts:
    sources[t.split].add(t.source.split(":")[1].rstrip("0123456789"))
  assert sources == {"train": {"train"}, "val": {"val"}, "test": {"test"}}
  t = ins.instrument_texts(clips[0])
  assert t[-1].split == "test" and "acoustic grand piano" in t[-1].text
  assert len(ins.instrument_texts(clips[0], templates=False)) == 3


def test_prepare_corpus(corpus, tmp_path):
  c, stats = corpus
  assert len(c.items) == 40 and c.modality == "audio"
  assert stats.event_sounds == 1 and stats.instrument_clips == 39 and stats.silent_clips == 0
  assert find_leaks(c) == []
  assert all(c.media_path(it).is_file() for it in c.items)
  assert c.counts()["test"]["query"] == 40 and c.counts()["val"]["query"] == 40
  programs = {it.id[:5] for it in c.items if it.id.startswith("gm")}
  assert len(programs) > 30  # spread over the grid, not the first 3 programs
  assert cli.main(["data", "info", str(c.root), "--json", str(tmp_path / "info.json")]) == 0
  assert json.loads((tmp_path / "info.json").read_text())["leaks"] == 0


def test_prepare_errors(tmp_path, monkeypatch):
  with pytest.raises(ValueError, match="--size does not apply"):
    ins.prepare_instruments(tmp_path / "x", size=64)
  monkeypatch.setattr(ins.shutil, "which", lambda _: None)
  monkeypatch.setattr(ins, "SOUNDFONT", Path(tmp_path / "none.sf2"))
  with pytest.raises(RuntimeError, match=r"fluidsynth.*none\.sf2.*apt-get install "
                                         r"--no-install-recommends fluidsynth timgm6mb-soundfont"):
    ins.prepare_instruments(tmp_path / "x")
  assert not (tmp_path / "x").exists()


def test_cart_embed_on_the_corpus(corpus, tmp_path):
  c, _ = corpus
  out = tmp_path / "E.npy"
  rc = cli.main(["embed", "--corpus", str(c.root), "--out", str(out), "--steps", "3",
                 "--batch-size", "16", "--dim", "16", "--text-batch", "64", "--no-progress",
                 "--json", str(tmp_path / "e.json")])
  assert rc == 0
  emb = np.load(out)
  assert emb.shape == (40, 16)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
  s = json.loads((tmp_path / "e.json").read_text())
  assert s["train_texts"] == 39 * 6 + 3 and s["loss_first"] > 0


def test_demo_recipe_points_at_real_files():
  r = ins.DEMO_RECIPE
  root = Path(__file__).resolve().parents[1]
  assert r["dataset"] == "instruments" and (root / r["experiment"]).is_file()
  from cart_jax.cli import recipes
  recipe = recipes.DemoRecipe.from_settings("audio", r)  # typed: the settings name real fields
  assert recipe.embed.steps == 300 and recipe.ids.n_clusters == 32
