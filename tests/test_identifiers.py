"""Identifiers: uniqueness, counters, ablations, artefact round trip and validation, assign()."""
import json

import numpy as np
import pytest

from cart_jax.data.datasets.synthetic import structured_embeddings
from cart_jax.index import identifiers as ident
from cart_jax.index.inputs import InputError

SMALL = dict(n_clusters=8, num_levels=2, codebook_size=8, rq_steps=60, rq_batch_size=256,
             rq_latent_dim=8, rq_hidden_dims=(32,))


@pytest.fixture(scope="module")
def emb():
  return structured_embeddings(600, 32, n_topics=8, n_subtopics=8, seed=0)


@pytest.fixture(scope="module")
def built(emb):
  ids = [f"it{i}" for i in range(len(emb))]
  return ident.build_index(emb, ids, ident.IdentifierConfig(**SMALL))


def _assert_unique(codes):
  assert np.unique(codes, axis=0).shape[0] == codes.shape[0]


def test_counters_match_a_python_prefix_database():
  rng = np.random.default_rng(0)
  prefixes = rng.integers(0, 3, size=(500, 2)).astype(np.int32)
  u = ident.assign_counters(prefixes)
  seen = {}
  for row, got in zip(prefixes, u):
    key = tuple(row)
    assert got == seen.get(key, 0)
    seen[key] = seen.get(key, 0) + 1
  more = rng.integers(0, 3, size=(50, 2)).astype(np.int32)
  codes = np.concatenate([prefixes, u[:, None]], 1)
  u2 = ident.assign_counters(more, ident.prefix_counts(codes))
  for row, got in zip(more, u2):
    key = tuple(row)
    assert got == seen.get(key, 0)
    seen[key] = seen.get(key, 0) + 1


def test_hundred_identical_embeddings_get_counters_0_to_99():
  x = np.tile(np.arange(16, dtype=np.float32)[None], (100, 1))
  index = ident.build_index(x, None, ident.IdentifierConfig(**{**SMALL, "n_clusters": 1}))
  _assert_unique(index.codes)
  np.testing.assert_array_equal(np.sort(index.codes[:, -1]), np.arange(100))
  assert np.all(index.codes[:, :-1] == index.codes[0, :-1])
  assert index.stats["collision_rate"] == 1.0 and index.stats["max_counter"] == 99
  assert index.vocab.level_sizes[-1] == 100


def test_identifier_layout_and_stats(built):
  codes = built.codes
  assert codes.dtype == np.int32 and codes.shape == (600, 4)  # L = M + 2
  _assert_unique(codes)
  assert built.vocab.level_sizes[:3] == (8, 8, 8)
  tokens = built.vocab.codes_to_tokens(codes)
  assert tokens.min() >= 2 and tokens.max() < built.vocab.vocab_size
  s = built.stats
  for key in ["n_items", "id_length", "collision_rate", "max_counter", "unique_prefixes",
              "kmeans_inertia", "rq_mse_per_level", "codebook_usage_per_level", "seconds"]:
    assert key in s, key
  assert s["unique_prefixes"] == np.unique(codes[:, :-1], axis=0).shape[0]
  assert 0.0 <= s["collision_rate"] <= 1.0


@pytest.mark.parametrize("switch, length", [("use_kmeans", 3), ("use_rqvae", 4)])
def test_ablations_still_give_unique_identifiers(emb, switch, length):
  # 300 items, K = 8: level-1 groups (~37 items) are clustered, level-2 groups fit in C = 16.
  cfg = {**SMALL, switch: False, "codebook_size": 16} if switch == "use_rqvae" else {**SMALL, switch: False}
  n = 300 if switch == "use_rqvae" else 600
  index = ident.build_index(emb[:n], None, ident.IdentifierConfig(**cfg))
  assert index.codes.shape == (n, length)
  _assert_unique(index.codes)
  if switch == "use_rqvae":
    # hierarchical K-Means: fine codes are cluster ids within the parent group
    assert index.codes[:, 1].max() < 16
    assert index.hier_tables is not None and index.rqvae_params is None


def test_save_load_round_trip_and_input_hash(built, emb, tmp_path):
  built.save(tmp_path / "ix")
  again = ident.load_index(tmp_path / "ix", emb)
  np.testing.assert_array_equal(again.codes, built.codes)
  assert again.item_ids == built.item_ids and again.vocab == built.vocab
  other = emb.copy()
  other[0, 0] += 1.0
  with pytest.raises(ident.IndexFormatError, match="other embeddings"):
    ident.load_index(tmp_path / "ix", other)
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_load_rejects_other_version_and_corruption(built, tmp_path):
  d = built.save(tmp_path / "ix")
  meta = json.loads((d / "meta.json").read_text())
  meta["version"] = 999
  (d / "meta.json").write_text(json.dumps(meta))
  with pytest.raises(ident.IndexFormatError, match="version 999"):
    ident.load_index(d)
  d = built.save(tmp_path / "ix2")
  codes = np.load(d / "codes.npy")
  codes[0, 0] = 0 if codes[0, 0] else 1
  np.save(d / "codes.npy", codes)
  with pytest.raises(ident.IndexFormatError, match="does not match"):
    ident.load_index(d)
  with pytest.raises(ident.IndexFormatError, match="no meta.json"):
    ident.load_index(tmp_path / "nowhere")


def test_failed_save_leaves_previous_index_intact(built, tmp_path, monkeypatch):
  d = built.save(tmp_path / "ix")
  before = (d / "meta.json").read_text()

  def boom(*a, **k):
    raise OSError("disk full")
  monkeypatch.setattr(ident.np, "savez", boom)
  with pytest.raises(OSError, match="disk full"):
    built.save(tmp_path / "ix")
  assert (d / "meta.json").read_text() == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ix"]


def test_assign_keeps_existing_identifiers_and_stays_unique(built, emb):
  new_emb = np.concatenate([emb[:5], structured_embeddings(20, 32, seed=7)])
  ext, new_codes = built.assign(new_emb, [f"new{i}" for i in range(25)])
  np.testing.assert_array_equal(ext.codes[:600], built.codes)
  _assert_unique(ext.codes)
  # a copy of an existing item gets the same prefix and the next counter
  np.testing.assert_array_equal(new_codes[:5, :-1], built.codes[:5, :-1])
  assert np.all(new_codes[:5, -1] > built.codes[:5, -1])
  assert ext.n_items == 625 and ext.item_ids[-1] == "new24"
  with pytest.raises(InputError, match="already in the index"):
    built.assign(emb[:1], ["it3"])
  with pytest.raises(InputError, match="dimension"):
    built.assign(np.zeros((1, 5), np.float32), ["x"])


def test_item_log_prior_follows_assign_remove_and_the_saved_index(built, emb, tmp_path):
  assert built.log_prior is None and not built.prior().any()
  ext, _ = built.assign(structured_embeddings(20, 32, seed=7), [f"new{i}" for i in range(20)])
  with_prior = ext.with_prior(np.arange(600, 620), -1.25)
  p = with_prior.prior()
  assert p.shape == (620,) and np.all(p[600:] == np.float32(-1.25)) and not p[:600].any()
  # a later assign appends zeros; a remove drops the removed rows' offsets with them
  ext2, _ = with_prior.assign(structured_embeddings(3, 32, seed=8), ["a", "b", "c"])
  assert ext2.prior()[600:620].tolist() == [-1.25] * 20 and not ext2.prior()[620:].any()
  rem = ext2.remove(["new0", "it1"])
  assert rem.n_items == 621 and rem.prior()[rem.row_of()["new1"]] == np.float32(-1.25)
  assert rem.prior()[rem.row_of()["it0"]] == 0.0 and (rem.prior() < 0).sum() == 19
  rem.save(tmp_path / "idx")
  assert (tmp_path / "idx" / ident.LOG_PRIOR_FILE).is_file()
  back = ident.load_index(tmp_path / "idx")
  np.testing.assert_array_equal(back.prior(), rem.prior())
  built.save(tmp_path / "plain")  # no offsets: no file
  assert not (tmp_path / "plain" / ident.LOG_PRIOR_FILE).exists()
  with pytest.raises(InputError, match="finite and <= 0"):
    ext.with_prior(np.arange(600, 602), 0.5)
  # a tampered prior file is refused by its hash; a wrong one (hash updated) by its shape
  np.save(tmp_path / "idx" / ident.LOG_PRIOR_FILE, np.zeros(621, np.float32))
  with pytest.raises(ident.IndexFormatError, match="item_log_prior.npy: content does not match"):
    ident.load_index(tmp_path / "idx")


def test_build_rejects_bad_input(emb):
  with pytest.raises(InputError, match="fewer items"):
    ident.build_index(emb[:4], None, ident.IdentifierConfig(**SMALL))
  with pytest.raises(InputError, match="duplicate"):
    ident.build_index(emb[:20], ["a"] * 20, ident.IdentifierConfig(**SMALL))
  bad = emb[:20].copy()
  bad[3, 1] = np.inf
  with pytest.raises(InputError, match="row 3"):
    ident.build_index(bad, None, ident.IdentifierConfig(**SMALL))


def test_train_job_builds_a_missing_index_from_validated_embeddings(tmp_path):
  """train_job's own index build (INDEX_DIR without meta.json + EMBEDDINGS) reads E.npy and its
  E.ids.txt sidecar through the same validation as `cart build-ids`."""
  from cart_jax.index.identifiers import IdentifierConfig, load_index
  from cart_jax.index.inputs import InputError
  from cart_jax.jobs.train import _ensure_index
  rng = np.random.default_rng(0)
  emb = tmp_path / "E.npy"
  np.save(emb, rng.normal(size=(12, 8)).astype(np.float32))
  (tmp_path / "E.ids.txt").write_text("".join(f"item{i}\n" for i in range(12)))
  cfg = IdentifierConfig(n_clusters=3, num_levels=1, codebook_size=4, rq_steps=5, rq_latent_dim=4,
                         rq_hidden_dims=(8,))
  logs = []
  index_dir = _ensure_index(tmp_path / "index", tmp_path / "run", emb, cfg, logs.append)
  assert load_index(index_dir).item_ids == [f"item{i}" for i in range(12)]
  assert any("building the index" in m for m in logs)
  (tmp_path / "E.ids.txt").write_text("".join(f"item{i}\n" for i in range(11)) + " item11 \n")
  with pytest.raises(InputError, match=r"E\.ids\.txt:12: .*whitespace"):
    _ensure_index(tmp_path / "index2", tmp_path / "run2", emb, cfg, logs.append)
  assert not (tmp_path / "index2").exists()


def test_build_is_a_deterministic_function_of_inputs_and_config(built, emb):
  """The same embeddings and config give bit-identical codes and RQ-VAE parameters (run twice)."""
  again = ident.build_index(emb, [f"it{i}" for i in range(len(emb))], ident.IdentifierConfig(**SMALL))
  np.testing.assert_array_equal(again.codes, built.codes)
  assert again.stats["kmeans_inertia"] == built.stats["kmeans_inertia"]
  other = ident.build_index(emb, [f"it{i}" for i in range(len(emb))],
                            ident.IdentifierConfig(**{**SMALL, "seed": 1}))
  assert not np.array_equal(other.codes, built.codes)  # the seed does matter
