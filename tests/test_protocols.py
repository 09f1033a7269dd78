"""Data a recipe was never tuned for: the protocols, the queryless pool, pseudo-queries, and the
re-ranker of a corpus without a ``val`` split (issue 26)."""
import json

import numpy as np
import pytest

from cart_jax.core.errors import CartError
from cart_jax.data import protocols
from cart_jax.data.corpus import Corpus, Item, Text, load_corpus
from cart_jax.inference import rerank
from cart_jax.train.input_pipeline import InputConfig, NumpyPipeline


@pytest.fixture(scope="module")
def emoji24(tmp_path_factory):
  from cart_jax import api
  root = tmp_path_factory.mktemp("emoji24")
  api.prepare("emoji", root / "corpus", limit=24)
  return root / "corpus"


def _copy(src, dst):
  import shutil
  shutil.copytree(src, dst, symlinks=True)
  return dst


def test_textless_protocol_removes_every_train_and_val_text_of_the_held_items(emoji24, tmp_path):
  corpus_dir = _copy(emoji24, tmp_path / "c")
  before = load_corpus(corpus_dir)
  out = protocols.apply_protocol(corpus_dir, "textless", 0.3)
  after = load_corpus(corpus_dir)
  held = (corpus_dir / protocols.AFFECTED_FILE).read_text().split()
  assert out["affected_items"] == len(held) and 0 < len(held) < 24
  # The same hash rule chooses them, whatever the corpus order.
  assert held == [i for i in before.item_ids if protocols.held_out_rank(i, "textless") < 0.3]
  for t in after.all_texts:
    assert t.item_id not in held or t.split == "test"
  # Test texts are untouched; every other item keeps all its texts.
  assert [t for t in before.all_texts if t.split == "test"] == after.texts(split="test")
  kept = [t for t in before.all_texts if t.item_id not in held or t.split == "test"]
  assert list(after.all_texts) == kept
  assert json.loads((corpus_dir / "corpus.json").read_text())["num_texts"] == len(kept)


def test_captions_only_protocol_replaces_queries_by_keyword_captions(emoji24, tmp_path):
  corpus_dir = _copy(emoji24, tmp_path / "c")
  out = protocols.apply_protocol(corpus_dir, "captions-only", 0.3,
                                 keyword_captions=lambda i: [f"tag {i}", f"{i}.png"])
  after = load_corpus(corpus_dir)
  held = set((corpus_dir / protocols.AFFECTED_FILE).read_text().split())
  assert out["keyword_captions"] == 2 * len(held)
  for i in held:
    train = [t for t in after.all_texts if t.item_id == i and t.split != "test"]
    assert sorted(t.text for t in train) == sorted([f"tag {i}", f"{i}.png"])
    assert all(t.kind == "caption" and t.split == "train" and t.source == protocols.KEYWORD_SOURCE
               for t in train)
  with pytest.raises(CartError, match="no keyword captions"):
    protocols.apply_protocol(corpus_dir, "captions-only", 0.3)


def test_no_val_protocol_and_bad_shares(emoji24, tmp_path):
  corpus_dir = _copy(emoji24, tmp_path / "c")
  n_val = len(load_corpus(corpus_dir).texts(split="val"))
  assert n_val > 0
  out = protocols.apply_protocol(corpus_dir, "no-val")
  assert out["texts_before"] - out["texts_after"] == n_val
  assert not load_corpus(corpus_dir).texts(split="val")
  assert not (corpus_dir / protocols.AFFECTED_FILE).exists()
  for bad in (0, 1, 1.5, -0.1, "x"):
    with pytest.raises(CartError, match="--textless-items: expected a share in \\(0, 1\\)"):
      protocols.apply_protocol(corpus_dir, "textless", bad)
  with pytest.raises(CartError, match="unknown protocol"):
    protocols.apply_protocol(corpus_dir, "nothing")


def test_instruments_keyword_captions():
  from cart_jax.data.datasets.instruments import instrument_items, keyword_captions
  assert keyword_captions("gm000-low-soft-short") == ["acoustic grand piano, piano, low, soft, short",
                                                      "gm000-low-soft-short.wav"]
  assert keyword_captions("gm040-high-loud-sustained")[0] == "violin, strings, high, loud, sustained"
  assert keyword_captions("event-dialog-warning") == ["dialog warning", "dialog-warning.oga"]
  assert all(keyword_captions(c["id"]) for c in instrument_items())
  with pytest.raises(CartError, match="not an instruments item id"):
    keyword_captions("piano")


# ----------------------------------------------------------------------------- the queryless pool


def _index(item_ids, seed=0):
  from cart_jax.index import identifiers
  from cart_jax.index.identifiers import IdentifierConfig
  emb = np.random.RandomState(seed).randn(len(item_ids), 8).astype(np.float32)
  return identifiers.build_index(emb, list(item_ids), IdentifierConfig(
      n_clusters=3, num_levels=1, codebook_size=4, rq_steps=5, rq_latent_dim=8, rq_hidden_dims=(8,)))


def _corpus(n_items=20, queryless=(), textless=()):
  items = [Item(f"it{i}", "image", f"media/it{i}.png") for i in range(n_items)]
  texts = []
  for i in range(n_items):
    iid = f"it{i}"
    if iid in textless:
      pass
    elif iid in queryless:
      texts += [Text(iid, f"caption of {i}", "train", "caption"),
                Text(iid, f"tag {i}", "train", "caption")]
    else:
      texts += [Text(iid, f"query {i} a", "train", "query"), Text(iid, f"query {i} b", "train", "query")]
    texts.append(Text(iid, f"test {i}", "test", "query"))
  return Corpus("synthetic", "image", items, texts)


def _targets_of(pipe, batch):
  return [tuple(r) for r in batch["decoder_target_tokens"]]


def test_queryless_pool_draws_those_items_at_their_share_of_the_corpus():
  queryless = {f"it{i}" for i in range(5)}  # 5 of 20 items: 0.25 of each batch
  corpus = _corpus(20, queryless=queryless)
  index = _index(corpus.item_ids)
  cfg = InputConfig(batch_size=16, input_length=8, caption_rate=0.0, pipeline="numpy")
  pipe = NumpyPipeline(corpus, index, cfg)
  assert pipe.queryless_items == 5 and pipe.num_queryless_per_batch == 4
  assert pipe.summary()["queryless_texts"] == 10 and pipe.summary()["queryless_rate"] == 0.25
  tokens = index.vocab.codes_to_tokens(index.codes)
  row_of = index.row_of()
  ql_targets = {tuple(tokens[row_of[i]]) for i in queryless}
  seen = set()
  for step in range(6):
    b = pipe.batch_at(step)
    t = _targets_of(pipe, b)
    assert all(x in ql_targets for x in t[12:])  # the last 4 rows: the queryless items' texts
    seen.update(t[12:])
    # A process's slices put together are the global batch.
    parts = [pipe.batch_at(step, slice(lo, lo + 4)) for lo in range(0, 16, 4)]
    np.testing.assert_array_equal(np.concatenate([p["encoder_input_tokens"] for p in parts]),
                                  b["encoder_input_tokens"])
  assert seen == ql_targets  # every queryless item is trained on
  # queryless_rate=0: the recipe before the pool (caption-only items never trained without captions).
  off = NumpyPipeline(corpus, index, InputConfig(batch_size=16, input_length=8, caption_rate=0.0,
                                                 queryless_rate=0.0))
  assert off.queryless is None
  assert not any(x in ql_targets for s in range(6) for x in _targets_of(off, off.batch_at(s)))


def test_queryless_rows_come_out_of_the_caption_rows_first():
  queryless = {f"it{i}" for i in range(4)}  # 4 of 16 items: 4 rows of 16
  corpus = _corpus(16, queryless=queryless)
  corpus = Corpus(corpus.name, corpus.modality, corpus.items, list(corpus.all_texts) + [
      Text(f"it{i}", f"other caption {i}", "train", "caption") for i in range(4, 16)])
  index = _index(corpus.item_ids)
  pipe = NumpyPipeline(corpus, index, InputConfig(batch_size=16, input_length=8, caption_rate=0.5))
  assert pipe.summary()["rows_per_batch"] == {"query": 8, "caption": 4, "queryless": 4}
  few = NumpyPipeline(corpus, index, InputConfig(batch_size=16, input_length=8, caption_rate=0.125))
  assert few.summary()["rows_per_batch"] == {"query": 12, "caption": 0, "queryless": 4}
  b = pipe.batch_at(3)
  assert b["encoder_input_tokens"].shape[0] == 16


def test_without_queryless_items_the_batches_are_those_of_before():
  corpus = _corpus(20)
  index = _index(corpus.item_ids)
  a = NumpyPipeline(corpus, index, InputConfig(batch_size=16, input_length=8))
  b = NumpyPipeline(corpus, index, InputConfig(batch_size=16, input_length=8, queryless_rate=0.0))
  assert a.queryless is None and a.summary()["queryless_items"] == 0
  for step in range(4):
    for k, v in a.batch_at(step).items():
      np.testing.assert_array_equal(v, b.batch_at(step)[k])


def test_pseudo_queries_join_the_queryless_pool():
  corpus = _corpus(12, textless={"it0", "it1"})
  index = _index(corpus.item_ids)
  pseudo = [Text("it0", "query 5 a", "train", "caption", "pseudo"),
            Text("it1", "query 7 b", "train", "caption", "pseudo")]
  pipe = NumpyPipeline(corpus, index, InputConfig(batch_size=12, input_length=8), pseudo=pseudo)
  assert pipe.queryless_items == 2 and pipe.num_queryless_per_batch == 2
  assert pipe.summary()["pseudo_queries"] == 2
  with pytest.raises(ValueError, match="leave no query rows"):
    NumpyPipeline(corpus, index, InputConfig(batch_size=12, input_length=8, caption_rate=0.0,
                                             queryless_rate=0.99), pseudo=pseudo)


# ----------------------------------------------------------------------------- pseudo-queries


def test_pseudo_queries_are_the_texts_nearest_to_the_item_in_the_dual_towers_space(tmp_path):
  from cart_jax.models.text.encoder import MiniLMTextEncoder
  from cart_jax.jobs import pseudo_queries
  from test_rerank import _dual_model
  corpus = _corpus(10, textless={"it0", "it3"})
  index = _index(corpus.item_ids)
  d = 8
  kernel, bias = _dual_model(tmp_path / "E.model.npz", d)
  cands = sorted({t.text for t in corpus.texts(split="train")})
  enc = MiniLMTextEncoder()
  tvec = rerank._l2n(enc.encode(cands) @ kernel + bias)  # [T, d]
  # Items' vectors: it0 sits on "query 5 a"; it3 is random.
  rs = np.random.RandomState(0)
  emb = {i: rs.randn(d).astype(np.float32) for i in corpus.item_ids}
  emb["it0"] = tvec[cands.index("query 5 a")]
  ids = corpus.item_ids
  np.save(tmp_path / "E.npy", np.stack([emb[i] for i in ids]))
  (tmp_path / "E.ids.txt").write_text("\n".join(ids) + "\n")
  texts, summary = pseudo_queries.pseudo_queries(corpus, index, tmp_path / "E.npy", 2,
                                                 cache_dir=tmp_path / "cache", log=lambda m: None)
  assert summary["textless_items"] == 2 and summary["pseudo_queries"] == 4
  by_item = {}
  for t in texts:
    by_item.setdefault(t.item_id, []).append(t.text)
    assert t.split == "train" and t.kind == "caption" and t.source == pseudo_queries.SOURCE
  assert by_item["it0"][0] == "query 5 a"
  # The brute-force ranking agrees (nearest first), and a second call reads the cached features.
  for item in ("it0", "it3"):
    e = rerank._l2n(emb[item][None])[0]
    assert by_item[item] == [cands[j] for j in np.argsort(-(tvec @ e))[:2]]
  assert len(list((tmp_path / "cache").iterdir())) == 1
  again, _ = pseudo_queries.pseudo_queries(corpus, index, tmp_path / "E.npy", 2,
                                           cache_dir=tmp_path / "cache", log=lambda m: None)
  assert [t.text for t in again] == [t.text for t in texts]
  none, s = pseudo_queries.pseudo_queries(_corpus(10), index, tmp_path / "E.npy", 2)
  assert none == [] and s["textless_items"] == 0


# ----------------------------------------------------------------------------- no val split


def test_holdout_queries_take_one_query_of_a_tenth_of_the_items_with_two_or_more():
  corpus = _corpus(40)
  assert rerank.has_val(corpus) is False
  held = rerank.holdout_queries(corpus)
  assert len(held) == 4  # ceil(0.1 * 40)
  assert len({t.item_id for t in held}) == 4
  assert held == rerank.holdout_queries(corpus)  # deterministic
  kept, held2 = rerank.without_holdout(corpus)
  assert held2 == held
  assert len(kept.texts(split="train")) == len(corpus.texts(split="train")) - 4
  for t in held:  # the item keeps its other query
    assert [x for x in kept.texts(split="train") if x.item_id == t.item_id]
  with_val = Corpus("v", "image", corpus.items, list(corpus.all_texts) + [Text("it0", "v", "val", "query")])
  assert rerank.holdout_queries(with_val) == [] and rerank.without_holdout(with_val)[0] is with_val
  single = Corpus("s", "image", corpus.items, [t for t in corpus.all_texts if not t.text.endswith(" b")])
  assert rerank.holdout_queries(single) == []


def test_a_run_without_val_tunes_on_held_out_queries_and_eval_rerank_works(emoji24, tmp_path, capsys):
  from test_e2e_cli import cart
  corpus = _copy(emoji24, tmp_path / "corpus")
  protocols.apply_protocol(corpus, "no-val")
  protocols.apply_protocol(corpus, "textless", 0.2)
  affected = (corpus / protocols.AFFECTED_FILE).read_text().split()
  from test_rerank import embed_and_index
  emb, index, run = tmp_path / "emb" / "e.npy", tmp_path / "index", tmp_path / "run"
  embed_and_index(corpus, emb, index)
  gin = ["--gin_file=gin_configs/experiments/emoji_demo.gin", f"--gin.CORPUS_DIR={corpus}",
         f"--gin.INDEX_DIR={index}", "--gin.ModelConfig.d_model=16",
         "--gin.ModelConfig.d_ff=16", "--gin.ModelConfig.num_heads=2", "--gin.ModelConfig.head_dim=8",
         "--gin.ModelConfig.num_decoder_layers=1", "--gin.InputConfig.batch_size=8",
         "--gin.InputConfig.input_length=16", "--gin.TrainConfig.warmup_steps=1",
         "--gin.TrainConfig.num_steps=2", "--no-progress"]
  assert cart("train", *gin, f"--gin.MODEL_DIR={run}", f"--gin.EMBEDDINGS='{emb}'",
              "--gin.train_job.embeddings=%EMBEDDINGS", "--json", str(tmp_path / "t.json")) == 0
  t = json.loads((tmp_path / "t.json").read_text())
  n_held = len(rerank.holdout_queries(load_corpus(corpus)))
  assert n_held > 0
  assert t["rerank"]["split"] == rerank.HOLDOUT_SPLIT and t["rerank"]["num_queries"] == n_held
  assert "held out of training" in t["rerank"]["chosen_by"]
  assert json.loads((run / "run.json").read_text())["rerank_holdout"]["num_texts"] == n_held
  # Trained without the held-out queries; the text-less items got pseudo-queries.
  assert t["input"]["train_queries"] == len(load_corpus(corpus).texts(split="train", kind="query")) - n_held
  assert t["pseudo_queries"]["textless_items"] == len(affected)
  assert t["pseudo_queries"]["pseudo_queries"] == 8 * len(affected)
  assert t["input"]["queryless_items"] == len(affected) and t["input"]["queryless_rate"] > 0
  assert cart("eval", "--model-dir", str(run), "--rerank", "--json", str(tmp_path / "e.json")) == 0
  ev = json.loads((tmp_path / "e.json").read_text())
  assert ev["rerank"]["tuned_on"]["split"] == rerank.HOLDOUT_SPLIT
  assert ev["rerank"]["weight"] == t["rerank"]["weight"]
  # A run trained without EMBEDDINGS held nothing out: --rerank --embeddings uses the default weight.
  run2 = tmp_path / "run2"
  assert cart("train", *gin, f"--gin.MODEL_DIR={run2}", "--quiet") == 0
  assert cart("eval", "--model-dir", str(run2), "--rerank", "--embeddings", str(emb),
              "--json", str(tmp_path / "e2.json")) == 0
  assert json.loads((tmp_path / "e2.json").read_text())["rerank"]["weight"] == rerank.DEFAULT_WEIGHT
  meta = json.loads((run2 / "rerank" / "meta.json").read_text())
  assert meta["tuning"]["chosen_by"].startswith("default weight")


def test_demo_protocol_flags_are_checked(capsys):
  from test_e2e_cli import cart
  with pytest.raises(SystemExit) as e:
    cart("demo", "--textless-items", "1.5")
  assert e.value.code == 2
  assert "expected a share in (0, 1)" in capsys.readouterr().err
  from cart_jax.cli import recipes
  with pytest.raises(CartError, match="--unseen-items F"):
    recipes.run_demo(recipes.recipe_for("image"), captions_only_items=0.2, log=lambda m: None)
  with pytest.raises(CartError, match="pick one"):
    recipes.run_demo(recipes.recipe_for("audio"), captions_only_items=0.2, textless_items=0.2,
                     log=lambda m: None)


def test_demo_report_says_how_the_weight_was_chosen_and_shows_the_affected_items():
  from cart_jax.cli.recipes import report, table
  m = {"r@1": 0.5, "r@5": 0.75, "r@10": 0.875, "mrr@10": 0.6, "qps": 10.0}
  s = {"n_items": 8, "n_test_queries": 4, "cart": m, "dual_tower": m,
       "cart_rerank": dict(m, weight=64.0)}
  assert table(s).endswith("weight tuned on val)")  # the default demo's line, unchanged
  held = {**s, "rerank_tuning": "max R@1, ...; on 27 training queries held out of training (no 'val' split)"}
  assert table(held).endswith("weight tuned on held-out training queries (no val split))")
  dflt = {**s, "rerank_tuning": "default weight 64 (no 'val' queries and no training queries held out)"}
  assert "the default: no val split" in table(dflt)
  aff = {**s, "affected": {"cart": dict(m, **{"r@1": 0.25}), "cart_rerank": dict(m, weight=64.0),
                           "dual_tower": m, "n_test_queries": 2, "what": "textless"},
         "example": {"query": "q", "target_item": "a", "target_train_texts": [], "results": []},
         "stage_seconds": {"train": 1.0}, "seconds": 1.0, "model_dir": "/tmp/m"}
  out = report(aff)
  assert "the 2 test queries of the held-out items (with no training text at all):" in out
  assert "0.250" in out.split("held-out items")[1]
