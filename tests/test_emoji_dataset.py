"""The embedded emoji corpus: renders, splits honestly, deterministic."""
import argparse
import collections
import json

import numpy as np
import pytest
from PIL import Image

from cart_jax.data import emoji_dataset
from cart_jax.data.corpus import find_leaks, load_corpus, normalize_text


def _cli(argv):
  from cart_jax.commands import data as data_cmd
  parser = argparse.ArgumentParser(prog="cart")
  sub = parser.add_subparsers(dest="command")
  data_cmd.register(sub, "data", "corpora")
  args = parser.parse_args(["data"] + argv)
  return args.func(args)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  out = tmp_path_factory.mktemp("emoji") / "emoji"
  corpus, stats = emoji_dataset.prepare_emoji(out, limit=50)
  return out, corpus, stats


def _check_honest(corpus):
  assert find_leaks(corpus) == []
  train = {normalize_text(t.text) for t in corpus.texts(split="train")}
  held = [t for t in corpus.all_texts if t.split != "train"]
  assert held and not any(normalize_text(t.text) in train for t in held)
  assert all(t.kind == "query" for t in held)  # captions are training-only
  test_items = collections.Counter(t.item_id for t in corpus.texts(split="test"))
  assert set(test_items) == set(corpus.item_ids)  # every item has a held-out English query
  # one owner per held-out text: a test query never names two items
  owners = collections.defaultdict(set)
  for t in corpus.all_texts:
    if t.kind == "query":
      owners[normalize_text(t.text)].add(t.item_id)
  assert all(len(owners[normalize_text(t.text)]) == 1 for t in held)


def test_small_corpus_builds(small):
  out, corpus, stats = small
  assert stats.rendered == 50 and stats.blank == 0 and stats.candidates > 3800
  again = load_corpus(out)
  assert len(again.items) == 50 and again.modality == "image"
  counts = again.counts()
  assert counts["test"]["query"] == 50 and counts["val"]["query"] >= 45
  assert counts["train"]["query"] >= 100 and counts["train"]["caption"] >= 500
  assert counts["val"]["caption"] == counts["test"]["caption"] == 0
  meta = json.loads((out / "corpus.json").read_text())
  assert meta["meta"]["image_license"] == "CC BY-SA 4.0" and "OpenMoji" in meta["meta"]["attribution"]
  _check_honest(again)


def test_images_are_real_renders(small):
  out, corpus, _ = small
  medal = corpus.media_path("1F947")  # first place medal, the first entry of EMOJI_DATA
  im = np.asarray(Image.open(medal))
  assert im.shape == (64, 64, 3) and im.dtype == np.uint8
  assert (im < 250).any(axis=-1).mean() > 0.2  # a substantial non-white glyph
  assert len({Image.open(corpus.media_path(i)).tobytes() for i in corpus.item_ids}) == 50


def test_texts_and_sources(small):
  _, corpus, _ = small
  by_item = collections.defaultdict(list)
  for t in corpus.all_texts:
    by_item[t.item_id].append(t)
  medal = {t.text: (t.split, t.source) for t in by_item["1F947"]}
  assert {"1st place medal", "first place medal", "1st place medal emoji"} <= set(medal)
  assert medal["1st place medal emoji"] == ("train", "template")
  caps = [t for t in by_item["1F947"] if t.kind == "caption"]
  assert {t.source for t in caps} >= {"name:de", "name:fr", "name:ja"}
  assert {"goldmedaille", "金メダル", "medalla de oro"} <= {t.text for t in caps}
  assert len(caps) == 13


def test_wordings_and_split_are_deterministic():
  data = {"en": ":thumbs_up_medium_skin_tone:", "status": 2}
  w = emoji_dataset.english_wordings("\U0001F44D\U0001F3FD", data)
  assert [t for t, _ in w] == ["thumbs up medium skin tone", "thumbs up sign medium skin tone",
                               "thumbs up medium skin tone emoji", "thumbs up medium skin tone icon"]
  flag = emoji_dataset.english_wordings("\U0001F1E9\U0001F1EA",
                                        {"en": ":Germany:", "alias": [":flag_for_Germany:", ":de:"]},
                                        templates=False)
  assert [t for t, _ in flag] == ["Germany", "flag for Germany", "de", "flag of Germany", "Germany flag"]
  entries = [("\U0001F600", {"en": ":grinning_face:", "alias": [":grinning:"], "de": ":grinsendes_gesicht:"}),
             ("\U0001F603", {"en": ":grinning_face_with_big_eyes:", "alias": [":smiley:"],
                             "de": ":grinning:"})]  # a caption equal to the other item's query
  t1, drops1 = emoji_dataset.build_texts(entries)
  t2, _ = emoji_dataset.build_texts(entries)
  assert t1 == t2
  held = {normalize_text(t.text) for t in t1 if t.split != "train"}
  assert all(normalize_text(t.text) not in held for t in t1 if t.split == "train")
  # 'grinning' is either held out (then the 'de' caption of the other emoji is dropped as a leak)
  # or a training query of 1F600 (then the caption is dropped as another item's text).
  assert not any(t.text == "grinning" and t.kind == "caption" for t in t1)
  assert drops1["captions_dropped_leak"] + drops1["captions_dropped_shared"] == 1


def test_cli_prepare_refuses_existing(small, tmp_path):
  from cart_jax.cli import CliError
  out, _, _ = small
  with pytest.raises(CliError, match="already exists"):
    _cli(["prepare", "emoji", "--out", str(out), "--limit", "3"])
  assert _cli(["prepare", "emoji", "--out", str(tmp_path / "e"), "--limit", "3", "--size", "32",
               "--no-templates"]) == 0
  c = load_corpus(tmp_path / "e")
  assert len(c.items) == 3 and Image.open(c.media_path(c.items[0])).size == (32, 32)
  assert not any(t.source == "template" for t in c.all_texts)


@pytest.mark.slow
def test_full_corpus(tmp_path):
  corpus, stats = emoji_dataset.prepare_emoji(tmp_path / "full")
  assert stats.rendered > 3900 and stats.blank == 0
  _check_honest(load_corpus(tmp_path / "full"))
