"""A mixed corpus (images, audio and video in one index) and search restricted by modality.

Covers the ``mixed`` corpus header, ``merge_corpora`` (ids, texts, splits, collisions, embeddings,
bad inputs writing nothing), the modality sub-trie (only that modality's rows, mapped back to
global rows, same ranking as the unrestricted exhaustive search filtered to the modality), and
``cart search/eval --modality`` on a tiny trained run.
"""
import json
import os
import types

import numpy as np
import pytest

from cart_jax.data.corpus import (MIXED, CorpusFormatError, Item, Text, load_corpus,
                                  write_corpus)
from cart_jax.data.merge import MergeError, merge_corpora

# ---------------------------------------------------------------------------------------
# Tiny hand-made corpora (media files are a few bytes: nothing here decodes them).

WORDS = ["red", "blue", "green", "small", "large", "bright", "dark", "soft", "loud", "round",
         "sharp", "quick"]
NOUNS = {"image": "picture", "audio": "sound", "video": "clip"}


def _corpus(root, name, modality, ids, ext):
  src = root / f"{name}_src"
  src.mkdir(parents=True, exist_ok=True)
  items, texts, media = [], [], {}
  for i, item_id in enumerate(ids):
    (src / f"{i}.{ext}").write_bytes(f"{name} {item_id}".encode())
    media[item_id] = src / f"{i}.{ext}"
    items.append(Item(item_id, modality, f"media/{i}.{ext}"))
    w = WORDS[i % len(WORDS)]
    texts += [Text(item_id, f"{w} {NOUNS[modality]} number {i}", "train", "query"),
              Text(item_id, f"a {w} {NOUNS[modality]} {i}", "test", "query"),
              Text(item_id, f"{name} {w} thing", "train", "caption", "captioner")]
  return write_corpus(root / name, name, modality, items, texts, media_sources=media,
                      media_mode="copy")


def _embeddings(path, ids, dim, seed, shuffle=False):
  """Unnormalised random embeddings + the ``.ids.txt`` sidecar ``cart embed`` writes."""
  rng = np.random.default_rng(seed)
  emb = rng.normal(size=(len(ids), dim)).astype(np.float32) * rng.uniform(0.5, 3.0)
  order = rng.permutation(len(ids)) if shuffle else np.arange(len(ids))
  path.parent.mkdir(parents=True, exist_ok=True)
  np.save(path, emb[order])
  path.with_name(path.stem + ".ids.txt").write_text("".join(f"{ids[i]}\n" for i in order))
  return {i: emb[k] for k, i in enumerate(ids)}


def _leftovers(parent):
  return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# ---------------------------------------------------------------------------------------
# Corpus header.


def test_mixed_header_round_trip_and_helpers(tmp_path):
  src = tmp_path / "m.bin"
  src.write_bytes(b"x")
  items = [Item("a", "image", "media/a.png"), Item("b", "audio", "media/b.wav"),
           Item("c", "audio", "media/c.wav")]
  texts = [Text("a", "a cat", "test"), Text("b", "a bell", "train"), Text("c", "a drum", "val")]
  c = write_corpus(tmp_path / "c", "mix", MIXED, items, texts,
                   media_sources={i.id: src for i in items})
  back = load_corpus(tmp_path / "c")
  assert back.modality == "mixed" and back.modalities() == ("image", "audio")
  assert back.modality_counts() == {"image": 1, "audio": 2}
  assert back.item_modality("c") == "audio" and c.summary()["modality_counts"] == {"image": 1, "audio": 2}
  assert json.loads((tmp_path / "c" / "corpus.json").read_text())["modality"] == "mixed"
  # A single-modality corpus reports its one modality.
  one = write_corpus(tmp_path / "one", "one", "video", [Item("v", "video", "media/v.mp4")],
                     [Text("v", "a clip")], media_sources={"v": src})
  assert one.modalities() == ("video",) and "modality_counts" not in one.summary()
  # Items still need a real modality; the header needs a known one.
  with pytest.raises(CorpusFormatError, match=r"bad modality 'mixed'"):
    write_corpus(tmp_path / "bad", "b", MIXED, [Item("a", "mixed", "media/a.png")], [],
                 media_sources={"a": src})
  with pytest.raises(CorpusFormatError, match=r"bad modality 'smell'.*'mixed'"):
    write_corpus(tmp_path / "bad", "b", "smell", items, texts, media_sources={i.id: src for i in items})
  assert not (tmp_path / "bad").exists()
  meta = tmp_path / "c" / "corpus.json"
  meta.write_text(meta.read_text().replace('"mixed"', '"smell"'))
  with pytest.raises(CorpusFormatError, match=r"corpus.json: bad modality 'smell'"):
    load_corpus(tmp_path / "c")


# ---------------------------------------------------------------------------------------
# Merging.


def test_merge_preserves_texts_prefixes_collisions_and_merges_embeddings(tmp_path):
  img = _corpus(tmp_path, "pics", "image", ["x", "p1", "p2"], "png")
  aud = _corpus(tmp_path, "sounds", "audio", ["s1", "x", "s2", "s3"], "wav")
  e_img = _embeddings(tmp_path / "emb" / "pics.npy", img.item_ids, 8, seed=1)
  e_aud = _embeddings(tmp_path / "emb" / "sounds.npy", aud.item_ids, 8, seed=2, shuffle=True)
  out = tmp_path / "mixed"
  merged, stats = merge_corpora([tmp_path / "pics", tmp_path / "sounds"], out,
                                embeddings=[tmp_path / "emb" / "pics.npy",
                                            tmp_path / "emb" / "sounds.npy"])
  # Ids: only the colliding "x" is prefixed, in both corpora; order = corpus order.
  assert merged.item_ids == ["pics:x", "p1", "p2", "s1", "sounds:x", "s2", "s3"]
  assert merged.modality == "mixed" and merged.name == "pics+sounds"
  assert merged.modality_counts() == {"image": 3, "audio": 4} and stats.prefixed_ids == 2
  assert [s["prefixed_ids"] for s in stats.sources] == [1, 1]
  back = load_corpus(out)  # media checked
  assert [it.modality for it in back.items] == ["image"] * 3 + ["audio"] * 4
  assert back.media_path("sounds:x").read_bytes() == b"sounds x"
  assert back.items[1].media == "media/pics/1.png" and os.path.islink(back.media_path("p1"))
  # Texts: every text kept with its split, kind and source, on the renamed item.
  assert len(back.all_texts) == 3 * 7 and back.counts() == {
      "train": {"query": 7, "caption": 7}, "val": {"query": 0, "caption": 0},
      "test": {"query": 7, "caption": 0}}
  got = {(t.item_id, t.text, t.split, t.kind, t.source) for t in back.all_texts}
  for c, ren in ((img, {"x": "pics:x"}), (aud, {"x": "sounds:x"})):
    for t in c.all_texts:
      assert (ren.get(t.item_id, t.item_id), t.text, t.split, t.kind, t.source) in got
  # Embeddings: merged item order (the audio file was shuffled), each row L2-normalised.
  emb = np.load(out / "embeddings.npy")
  ids = (out / "embeddings.ids.txt").read_text().splitlines()
  assert ids == merged.item_ids and emb.shape == (7, 8) and emb.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)
  want = [e_img["x"], e_img["p1"], e_img["p2"], e_aud["s1"], e_aud["x"], e_aud["s2"], e_aud["s3"]]
  want = np.stack([w / np.linalg.norm(w) for w in want])
  np.testing.assert_allclose(emb, want, atol=1e-6)
  meta = json.loads((out / "embeddings.meta.json").read_text())
  assert meta["format"] == "cart-embeddings" and meta["dim"] == 8 and meta["num_items"] == 7
  assert stats.embedding_dim == 8 and _leftovers(tmp_path) == []
  # `cart embed --encoder precomputed` (the aligner) accepts the merged file for the merged corpus.
  from cart_jax.data.embeddings import load_aligned
  assert not load_aligned(out / "embeddings.npy", merged.item_ids).reordered

  # --prefix: every id gets its corpus's name; explicit names and a copy of the media.
  m2, s2 = merge_corpora([tmp_path / "pics", tmp_path / "sounds"], tmp_path / "m2", prefix=True,
                         names=["img", "aud"], name="both", media_mode="copy")
  assert m2.item_ids == ["img:x", "img:p1", "img:p2", "aud:s1", "aud:x", "aud:s2", "aud:s3"]
  assert m2.name == "both" and s2.prefixed_ids == 7 and s2.embeddings is None
  assert not os.path.islink(m2.media_path("aud:s1")) and m2.media_path("aud:s1").read_bytes() == b"sounds s1"
  assert not (tmp_path / "m2" / "embeddings.npy").exists()


def test_merge_bad_inputs_write_nothing(tmp_path):
  _corpus(tmp_path, "pics", "image", ["p0", "p1"], "png")
  _corpus(tmp_path, "sounds", "audio", ["s0", "s1", "s2"], "wav")
  _corpus(tmp_path / "other", "pics", "video", ["v0"], "mp4")  # same name as the first corpus
  dirs = [tmp_path / "pics", tmp_path / "sounds"]
  _embeddings(tmp_path / "e" / "pics.npy", ["p0", "p1"], 8, seed=1)
  _embeddings(tmp_path / "e" / "sounds16.npy", ["s0", "s1", "s2"], 16, seed=2)
  _embeddings(tmp_path / "e" / "sounds_short.npy", ["s0", "s1"], 8, seed=3)
  zero = _embeddings(tmp_path / "e" / "sounds_zero.npy", ["s0", "s1", "s2"], 8, seed=4)
  np.save(tmp_path / "e" / "sounds_zero.npy", np.stack([zero["s0"], 0 * zero["s1"], zero["s2"]]))
  out = tmp_path / "out"
  cases = [
      (dict(corpus_dirs=dirs[:1]), MergeError, "at least two"),
      (dict(corpus_dirs=[dirs[0], dirs[0]]), MergeError, "given twice"),
      (dict(corpus_dirs=[dirs[0], tmp_path / "other" / "pics"]), MergeError, "two corpora are named 'pics'"),
      (dict(corpus_dirs=dirs, names=["a", "a:b"]), MergeError, "cannot prefix"),
      (dict(corpus_dirs=dirs, names=["a"]), MergeError, "1 name"),
      (dict(corpus_dirs=dirs, embeddings=[tmp_path / "e" / "pics.npy"]), MergeError,
       "1 embedding file.*2 corpora"),
      (dict(corpus_dirs=dirs, embeddings=[tmp_path / "e" / "pics.npy", tmp_path / "e" / "sounds16.npy"]),
       MergeError, r"different dimensions.*pics.npy \(pics\): 8.*sounds16.npy \(sounds\): 16"),
      (dict(corpus_dirs=dirs, embeddings=[tmp_path / "e" / "pics.npy", tmp_path / "e" / "sounds_short.npy"]),
       MergeError, r"1 corpus item\(s\) have no embedding.*'s2'"),
      (dict(corpus_dirs=dirs, embeddings=[tmp_path / "e" / "pics.npy", tmp_path / "e" / "sounds_zero.npy"]),
       MergeError, "item 's1' has a zero embedding"),
      (dict(corpus_dirs=dirs, embeddings=[tmp_path / "e" / "pics.npy", tmp_path / "e" / "nope.npy"]),
       MergeError, "nope.npy: no such file"),
      (dict(corpus_dirs=[dirs[0], tmp_path / "missing"]), CorpusFormatError, "not a directory"),
  ]
  for kwargs, exc, msg in cases:
    with pytest.raises(exc, match=msg):
      merge_corpora(kwargs.pop("corpus_dirs"), out, **kwargs)
    assert not out.exists() and _leftovers(tmp_path) == [], msg
  with pytest.raises(MergeError, match="is \\(or holds\\) one of the corpora"):
    merge_corpora(dirs, tmp_path / "pics", overwrite=True)
  assert load_corpus(tmp_path / "pics").item_ids == ["p0", "p1"]  # untouched
  out.mkdir()
  with pytest.raises(FileExistsError, match="overwrite"):
    merge_corpora(dirs, out)
  merged, _ = merge_corpora(dirs, out, overwrite=True)
  assert len(merged.items) == 5 and merged.modalities() == ("image", "audio")


# ---------------------------------------------------------------------------------------
# The modality sub-trie, through CartSearcher and a tiny random network.


def _tiny_searcher(n_items=14, beam=16, seed=0):
  from flax import nnx

  from cart_jax.index.vocab import IdentifierVocab
  from cart_jax.models.cart.config import tiny, with_vocab
  from cart_jax.models.cart.network import create_model
  from cart_jax.inference.searcher import CartSearcher

  vocab = IdentifierVocab((3, 3, 2))
  rs = np.random.RandomState(seed)
  all_codes = np.stack(np.meshgrid(*[np.arange(s) for s in vocab.level_sizes], indexing="ij"), -1).reshape(-1, 3)
  codes = all_codes[rs.choice(len(all_codes), n_items, replace=False)].astype(np.int32)  # unsorted rows
  modalities = np.asarray(["image", "audio", "video", "audio", "image", "audio", "image", "video",
                           "audio", "image", "audio", "image", "audio", "image"][:n_items])
  index = types.SimpleNamespace(codes=codes, vocab=vocab, item_ids=[f"it{i}" for i in range(n_items)],
                                n_items=n_items, prior=lambda: np.zeros(n_items, np.float32))
  model = create_model(with_vocab(tiny(input_vocab_size=40, num_decoder_layers=1), vocab), seed=3,
                       host_init=True)
  graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
  searcher = CartSearcher(graphdef, index, beam_size=beam, n_results=beam, input_length=6,
                          batch_size=2, item_modalities=modalities)
  inputs = rs.randint(1, 40, (3, 6)).astype(np.int32)
  return searcher, params, frozen, inputs, codes, modalities


def test_restricted_search_returns_only_that_modality_in_the_full_ranking_order():
  from cart_jax.inference.searcher import ModalityError, subset_trie
  searcher, params, frozen, inputs, codes, modalities = _tiny_searcher()
  full_rows, full_scores, _ = searcher.search_ids(params, frozen, inputs)  # exhaustive (beam >= N)
  assert (full_rows >= 0).sum(1).tolist() == [14, 14, 14]
  assert searcher.available_modalities() == {"audio": 6, "image": 6, "video": 2}
  for modality, n in (("audio", 6), ("video", 2)):  # two sub-tries of different shapes
    view = searcher.restrict(modality)
    rows, scores, got_codes = view.search_ids(params, frozen, inputs)
    for q in range(3):
      valid = rows[q] >= 0
      assert valid.sum() == n  # exactly the modality's identifiers, no more
      r = rows[q][valid]
      assert set(r.tolist()) == set(np.flatnonzero(modalities == modality).tolist())
      np.testing.assert_array_equal(got_codes[q][valid], codes[r])  # rows map back to global rows
      # Same scores and order as the unrestricted exhaustive ranking, filtered to the modality.
      f_rows, f_scores = full_rows[q][:14], full_scores[q][:14]  # the 14 valid results
      keep = modalities[f_rows] == modality
      np.testing.assert_array_equal(r, f_rows[keep])
      np.testing.assert_allclose(scores[q][valid], f_scores[keep], atol=1e-5)
  # Views share the trie cache; the parent searcher stays unrestricted.
  image = searcher.restrict("image").trie
  assert sorted(np.asarray(image.leaf_row).tolist()) == np.flatnonzero(modalities == "image").tolist()
  assert set(searcher._tries) == {None, "audio", "image", "video"} and searcher.modality is None
  assert searcher.restrict("video").trie is searcher._tries["video"]
  assert searcher.restrict(None).trie is searcher.trie
  with pytest.raises(ModalityError, match=r"'text' is not in this index; available: audio \(6 items\), "
                                          r"image \(6 items\), video \(2 items\)"):
    searcher.restrict("text")
  # subset_trie on its own: leaves point at global rows.
  sub = subset_trie(codes, np.asarray([9, 2, 5]), searcher.index.vocab)
  leaves = sub.to_nested_dict()
  flat = {}

  def walk(d, prefix):
    for c, v in d.items():
      walk(v, prefix + (c,)) if isinstance(v, dict) else flat.__setitem__(prefix + (c,), v)
  walk(leaves, ())
  assert flat == {tuple(codes[r].tolist()): r for r in (9, 2, 5)}
  with pytest.raises(ValueError, match="distinct"):
    subset_trie(codes, np.asarray([1, 1]))


# ---------------------------------------------------------------------------------------
# CLI: merge -> build-ids -> train (2 steps) -> search/eval --modality.


def test_cli_search_and_eval_restricted_by_modality(tmp_path, capsys):
  from test_e2e_cli import cart
  _corpus(tmp_path, "pics", "image", [f"p{i}" for i in range(10)], "png")
  _corpus(tmp_path, "sounds", "audio", [f"s{i}" for i in range(6)], "wav")
  _embeddings(tmp_path / "e" / "pics.npy", [f"p{i}" for i in range(10)], 16, seed=1)
  _embeddings(tmp_path / "e" / "sounds.npy", [f"s{i}" for i in range(6)], 16, seed=2)
  mixed, run, index = tmp_path / "mixed", tmp_path / "run", tmp_path / "index"
  assert cart("data", "merge", str(tmp_path / "pics"), str(tmp_path / "sounds"), "--out", str(mixed),
              "--embeddings", str(tmp_path / "e" / "pics.npy"), str(tmp_path / "e" / "sounds.npy"),
              "--json", str(tmp_path / "merge.json")) == 0
  merged = json.loads((tmp_path / "merge.json").read_text())
  assert merged["modality"] == "mixed" and merged["num_items"] == 16
  assert merged["modality_counts"] == {"audio": 6, "image": 10}
  # The output exists now: exit 2 naming it, nothing replaced.
  assert cart("data", "merge", str(tmp_path / "pics"), str(tmp_path / "sounds"), "--out",
              str(mixed)) == 2
  assert "already exists" in capsys.readouterr().out
  assert load_corpus(mixed).modality == MIXED
  assert cart("build-ids", "--embeddings", str(mixed / "embeddings.npy"), "--item-ids",
              str(mixed / "embeddings.ids.txt"), "--out", str(index), "--clusters", "3",
              "--levels", "1", "--codebook-size", "4", "--rq-steps", "10", "--rq-latent-dim", "8",
              "--quiet") == 0
  gin = ["--gin_file=gin_configs/experiments/emoji_demo.gin", f"--gin.MODEL_DIR={run}",
         f"--gin.CORPUS_DIR={mixed}", f"--gin.INDEX_DIR={index}", "--gin.ModelConfig.d_model=16",
         "--gin.ModelConfig.d_ff=16", "--gin.ModelConfig.num_heads=2", "--gin.ModelConfig.head_dim=8",
         "--gin.InputConfig.batch_size=8", "--gin.InputConfig.input_length=16",
         "--gin.TrainConfig.warmup_steps=1", "--gin.TrainConfig.checkpoint_every=2",
         "--gin.TrainConfig.log_every=1", "--gin.TrainConfig.num_steps=2",
         # the smallest network that trains: this test is about the search, not the model
         "--gin.ModelConfig.num_encoder_layers=1", "--gin.ModelConfig.num_decoder_layers=1",
         "--gin.ModelConfig.fusion='none'"]
  assert cart("train", *gin, "--no-progress") == 0
  capsys.readouterr()

  # Unrestricted: 10 results out of 16 items. Restricted to audio: the 6 audio items only.
  assert cart("search", "--model_dir", str(run), "loud sound", "-k", "10", "--json",
              str(tmp_path / "all.json")) == 0
  allres = json.loads((tmp_path / "all.json").read_text())["queries"][0]["results"]
  assert len(allres) == 10 and {r["modality"] for r in allres} <= {"image", "audio"}
  capsys.readouterr()
  assert cart("search", "--model_dir", str(run), "--modality", "audio", "loud sound", "-k", "10",
              "--json", str(tmp_path / "audio.json")) == 0
  printed = capsys.readouterr().out
  res = json.loads((tmp_path / "audio.json").read_text())
  assert res["modality"] == "audio"
  got = res["queries"][0]["results"]
  assert sorted(r["item_id"] for r in got) == [f"s{i}" for i in range(6)]
  assert all(r["modality"] == "audio" and r["media"].endswith(".wav") for r in got)
  assert "audio" in printed and ".png" not in printed and " p1 " not in printed
  # Same model, same scores: audio items found by both searches keep their relative order.
  order_all = [r["item_id"] for r in allres if r["modality"] == "audio"]
  order_audio = [r["item_id"] for r in got]
  assert [i for i in order_audio if i in order_all] == order_all
  scores = {r["item_id"]: r["score"] for r in got}
  for r in allres:
    if r["modality"] == "audio":
      assert abs(scores[r["item_id"]] - r["score"]) < 1e-4

  # Unknown / absent modality: a clear error listing what the index holds.
  for bad in ("video", "smell"):
    assert cart("search", "--model_dir", str(run), "--modality", bad, "x") == 2
    assert (f"--modality {bad}: modality '{bad}' is not in this index; available: audio (6 items), "
            "image (10 items)") in capsys.readouterr().out
  assert cart("eval", "--model_dir", str(run), "--modality", "video") == 2
  assert "available: audio (6 items), image (10 items)" in capsys.readouterr().out

  assert cart("eval", "--model_dir", str(run), "--split", "test", "--modality", "audio",
              "--batch", "6", "--json", str(tmp_path / "ev.json")) == 0
  ev = json.loads((tmp_path / "ev.json").read_text())
  assert ev["modality"] == "audio" and ev["num_queries"] == 6 and ev["num_items_searched"] == 6
  assert ev["r@10"] == 1.0  # 6 candidates, 10 results: every target is found
  assert 0.0 <= ev["r@1"] <= ev["r@5"] <= 1.0
  un = ev["unrestricted"]
  assert un["top1_wrong_modality"]["of"] == 6 and 0 <= un["top1_wrong_modality"]["count"] <= 6
  assert ev["top1_wrong_modality"]["count"] == 0  # restricted: never another modality
  assert ev["index_modalities"] == {"audio": 6, "image": 10} and "by_modality" not in ev


def test_eval_breakdown_by_target_modality():
  from cart_jax.jobs.evaluate import _by_modality, _wrong_modality
  mods = np.asarray(["image", "audio", "image", "video"])  # modality of index rows 0..3
  rows = np.asarray([[0, 1], [0, 1], [1, 2], [-1, -1]])  # ranked rows of 4 queries (-1: none)
  targets = np.asarray([0, 1, 2, 3])
  assert _wrong_modality(mods, rows[:, 0], targets) == {"count": 2, "of": 4, "rate": 0.5}
  got = _by_modality(mods, rows, targets)
  assert got["image"]["num_queries"] == 2 and got["image"]["r@1"] == 0.5
  assert got["image"]["mrr@2"] == pytest.approx(0.75)  # ranks 1 and 2
  assert got["image"]["top1_wrong_modality"] == {"count": 1, "of": 2, "rate": 0.5}
  assert got["audio"]["r@1"] == 0.0 and got["audio"]["top1_wrong_modality"]["count"] == 1
  assert got["video"]["r@1"] == 0.0 and got["video"]["top1_wrong_modality"]["count"] == 0
