"""The embedded emoji corpus: renders, splits honestly, deterministic."""
import collections
import json

import numpy as np
import pytest
from PIL import Image

from cart_jax.data.datasets import emoji as emoji_dataset
from cart_jax.data.corpus import find_leaks, load_corpus, normalize_text

from helpers import data_cli as _cli


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
  from cart_jax.core.errors import CartError
  out, _, _ = small
  with pytest.raises(CartError, match="already exists"):
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


# --- --unseen-items: items known only through captions (CART's protocol) -----------------------


@pytest.fixture(scope="module")
def unseen(tmp_path_factory):
  out = tmp_path_factory.mktemp("emoji_unseen") / "emoji"
  corpus, stats = emoji_dataset.prepare_emoji(out, limit=80, unseen_items=0.5)
  plain = tmp_path_factory.mktemp("emoji_plain") / "emoji"
  emoji_dataset.prepare_emoji(plain, limit=80)
  return out, load_corpus(out), stats, load_corpus(plain)


def _by_item(corpus):
  by = collections.defaultdict(list)
  for t in corpus.all_texts:
    by[t.item_id].append(t)
  return by


def test_unseen_items_have_only_honest_captions(unseen):
  out, corpus, stats, plain = unseen
  ids = corpus.meta["unseen_item_ids"]
  # Deterministic numbers (emoji 2.16, first 80 emoji): 39 eligible, 22 unseen, 126 captions.
  assert stats.unseen_items == 0.5 and corpus.meta["unseen_items"] == 0.5
  assert stats.num_unseen_items == corpus.meta["num_unseen_items"] == len(ids) >= 10
  assert 0.3 < len(ids) / stats.unseen_eligible_items < 0.7  # roughly half the eligible items
  if corpus.meta["emoji_version"] == "2.16.0":
    assert (stats.unseen_eligible_items, len(ids), stats.unseen_captions) == (39, 22, 126)
  assert (out / "unseen_items.txt").read_text().split() == ids
  assert ids == [i for i in corpus.item_ids if i in set(ids)]  # corpus order
  assert all(emoji_dataset.unseen_rank(i) < 0.5 for i in ids)
  by, plain_by = _by_item(corpus), _by_item(plain)
  test_items = {t.item_id for t in plain.texts(split="test")}
  n_caps = 0
  for iid in ids:
    assert iid in test_items
    assert not [t for t in by[iid] if t.kind == "query" and t.split == "train"]
    held = [t for t in plain_by[iid] if t.split != "train"]
    assert [t for t in by[iid] if t.split != "train"] == held  # val/test queries unchanged
    caps = [t for t in by[iid] if (t.source or "").startswith("unseen_caption")]
    assert caps and all(t.kind == "caption" and t.split == "train" for t in caps)
    n_caps += len(caps)
    for c in caps:
      key = normalize_text(c.text)
      assert not any(normalize_text(h.text) in key for h in held), (c, held)
    # the 13-language name captions stay as they were
    assert ([t for t in by[iid] if (t.source or "").startswith("name:")]
            == [t for t in plain_by[iid] if (t.source or "").startswith("name:")])
  assert n_caps == stats.unseen_captions == corpus.meta["unseen_captions"]
  assert n_caps >= len(ids)
  for iid in set(corpus.item_ids) - set(ids):  # everything else is the plain corpus
    assert by[iid] == plain_by[iid]
  assert find_leaks(corpus) == []
  held_all = {normalize_text(t.text) for t in corpus.all_texts if t.split != "train"}
  assert not any(normalize_text(t.text) in held_all for t in corpus.texts(split="train"))


def test_unseen_cli_info_reports_no_leaks(unseen, capsys):
  out, corpus, _, _ = unseen
  assert _cli(["info", str(out)]) == 0
  summary = json.loads(capsys.readouterr().out)
  assert summary["leaks"] == 0 and summary["num_items"] == 80


def test_unseen_choice_is_stable_across_limit():
  import emoji
  entries = [(e, d) for e, d in emoji.EMOJI_DATA.items()
             if d.get("status") == emoji.STATUS["fully_qualified"]][:120]
  small_ids = {emoji_dataset.item_id_of(e) for e, _ in entries[:60]}
  big = emoji_dataset.hold_out_items(emoji_dataset.build_texts(entries)[0], entries, 0.5)
  small = emoji_dataset.hold_out_items(emoji_dataset.build_texts(entries[:60])[0], entries[:60], 0.5)
  assert small.unseen_ids == [i for i in big.unseen_ids if i in small_ids]
  again = emoji_dataset.hold_out_items(emoji_dataset.build_texts(entries)[0], entries, 0.5)
  assert again == big
  more = emoji_dataset.hold_out_items(emoji_dataset.build_texts(entries)[0], entries, 0.8)
  assert set(big.unseen_ids) < set(more.unseen_ids)  # a larger F adds items, keeps the others


def test_unseen_captions_rules():
  names = {"\U0001F468": "man", "\U0001F4BB": "laptop", "\U0001F44D": "thumbs up"}
  techie = "\U0001F468\u200D\U0001F4BB"
  thumbs = "\U0001F44D\U0001F3FD"
  entries = [(techie, {"en": ":man_technologist:"}),
             (thumbs, {"en": ":thumbs_up_medium_skin_tone:", "alias": [":+1_tone3:"]})]
  texts, _ = emoji_dataset.build_texts(entries)
  split = emoji_dataset.hold_out_items(texts, entries, 0.999, names=names)
  caps = {(t.item_id, t.text, t.source) for t in split.texts if t.kind == "caption"}
  assert ("1F468-200D-1F4BB", "an emoji of man and laptop", "unseen_caption:parts") in caps
  # 'thumbs up in medium skin tone' is a held-out wording with 'in' added: dropped as a copy.
  assert not any("in medium skin tone" in t for _, t, _ in caps)
  held = {t.item_id: [normalize_text(t.text)] for t in texts if t.split != "train"}
  for iid, text, _ in caps:
    assert not any(h in normalize_text(text) for h in held[iid])
  unchanged = emoji_dataset.hold_out_items(texts, entries, 0.0, names=names)
  assert unchanged.texts == texts and unchanged.unseen_ids == []


def test_unseen_zero_is_byte_identical(small, tmp_path):
  out, _, _ = small  # prepared with the defaults
  emoji_dataset.prepare_emoji(tmp_path / "z", limit=50, unseen_items=0.0)
  for name in ("corpus.json", "items.jsonl", "texts.jsonl"):
    assert (tmp_path / "z" / name).read_bytes() == (out / name).read_bytes()
  assert not (tmp_path / "z" / "unseen_items.txt").exists()


@pytest.mark.parametrize("bad", ["1", "1.5", "-0.1", "abc", "nan", "inf"])
def test_unseen_bad_fraction_fails(bad, tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    _cli(["prepare", "emoji", "--out", str(tmp_path / "e"), "--limit", "3", "--unseen-items", bad])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert "--unseen-items" in err and "[0, 1)" in err
  assert not (tmp_path / "e").exists() and list(tmp_path.iterdir()) == []
  with pytest.raises(ValueError, match="--unseen-items"):
    emoji_dataset.prepare_emoji(tmp_path / "f", limit=3, unseen_items=bad)
  assert list(tmp_path.iterdir()) == []


def test_unseen_cli_flag(tmp_path, capsys):
  from cart_jax.core.errors import CartError
  with pytest.raises(SystemExit) as e:
    _cli(["prepare", "--help"])
  assert e.value.code == 0
  assert "--unseen-items FRACTION" in capsys.readouterr().out
  with pytest.raises(CartError, match="only to the emoji corpus"):
    _cli(["prepare", "instruments", "--out", str(tmp_path / "i"), "--unseen-items", "0.5"])
  assert not (tmp_path / "i").exists()
  assert _cli(["prepare", "emoji", "--out", str(tmp_path / "e"), "--limit", "40",
               "--unseen-items", "0.5", "--json", str(tmp_path / "s.json")]) == 0
  summary = json.loads((tmp_path / "s.json").read_text())
  assert summary["unseen_items"] == 0.5 and summary["num_unseen_items"] >= 5
  assert summary["num_unseen_items"] == len(load_corpus(tmp_path / "e").meta["unseen_item_ids"])
