"""`cart build-ids` end to end: the JSON summary and every bad-input path (exit 2, nothing written)."""
import json

import numpy as np
import pytest

from cart_jax.cli import main as cli
from cart_jax.data.datasets.synthetic import structured_embeddings

FAST = ["--clusters", "4", "--levels", "2", "--codebook-size", "4", "--rq-steps", "20",
        "--rq-latent-dim", "4", "--quiet"]


@pytest.fixture
def emb_file(tmp_path):
  p = tmp_path / "emb.npy"
  np.save(p, structured_embeddings(200, 16, n_topics=4, n_subtopics=4))
  return p


def test_build_ids_writes_index_and_json(emb_file, tmp_path, capsys):
  ids = tmp_path / "ids.txt"
  ids.write_text("".join(f"img{i}\n" for i in range(200)))
  rc = cli.main(["build-ids", "--embeddings", str(emb_file), "--item-ids", str(ids), "--out",
                 str(tmp_path / "ix"), "--json", str(tmp_path / "s.json"), *FAST])
  assert rc == 0
  s = json.loads((tmp_path / "s.json").read_text())
  for key in ["n_items", "id_length", "collision_rate", "max_counter", "unique_prefixes",
              "kmeans_inertia", "rq_mse_per_level", "codebook_usage_per_level", "seconds"]:
    assert key in s
  assert s["n_items"] == 200 and s["id_length"] == 4
  assert len(s["rq_mse_per_level"]) == 2 and len(s["codebook_usage_per_level"]) == 2
  codes = np.load(tmp_path / "ix" / "codes.npy")
  assert codes.shape == (200, 4) and np.unique(codes, axis=0).shape[0] == 200
  assert (tmp_path / "ix" / "item_ids.txt").read_text().splitlines()[5] == "img5"
  assert "collision_rate" in capsys.readouterr().out


def test_ablation_flags(emb_file, tmp_path):
  assert cli.main(["build-ids", "--embeddings", str(emb_file), "--out", str(tmp_path / "a"),
                   "--no-kmeans", *FAST]) == 0
  assert np.load(tmp_path / "a" / "codes.npy").shape == (200, 3)
  assert cli.main(["build-ids", "--embeddings", str(emb_file), "--out", str(tmp_path / "b"),
                   "--no-rqvae", *FAST, "--codebook-size", "64"]) == 0
  assert np.load(tmp_path / "b" / "codes.npy").shape == (200, 4)


def _bad_case(tmp_path, name):
  emb = structured_embeddings(50, 8, n_topics=4, n_subtopics=2)
  p = tmp_path / "e.npy"
  extra = []
  if name == "nan":
    emb[10, 3] = np.nan
  elif name == "rank":
    emb = emb.reshape(50, 2, 4)
  elif name == "dtype":
    emb = (emb * 100).astype(np.int64)
  elif name == "too_few":
    emb = emb[:3]
  elif name == "unreadable":
    p.write_bytes(b"not a numpy file")
    return p, extra, "not a readable"
  np.save(p, emb)
  if name == "dup_ids":
    ids = tmp_path / "ids.txt"
    ids.write_text("a\nb\n" + "".join(f"x{i}\n" for i in range(47)) + "a\n")
    extra = ["--item-ids", str(ids)]
  elif name == "count":
    ids = tmp_path / "ids.txt"
    ids.write_text("".join(f"x{i}\n" for i in range(49)))
    extra = ["--item-ids", str(ids)]
  elif name == "missing_ids":
    extra = ["--item-ids", str(tmp_path / "nope.txt")]
  msg = {"nan": "non-finite value nan at row 10", "rank": "rank-2", "dtype": "floating dtype",
         "too_few": "fewer items", "dup_ids": "ids.txt:50: duplicate item id 'a'",
         "count": "49 ids for 50 embeddings", "missing_ids": "nope.txt"}[name]
  return p, extra, msg


@pytest.mark.parametrize("name", ["nan", "rank", "dtype", "too_few", "unreadable", "dup_ids", "count",
                                  "missing_ids"])
def test_bad_input_exits_2_names_the_problem_and_writes_nothing(tmp_path, capsys, name):
  p, extra, msg = _bad_case(tmp_path, name)
  out = tmp_path / "ix"
  rc = cli.main(["build-ids", "--embeddings", str(p), "--out", str(out), "--json",
                 str(tmp_path / "s.json"), *extra, *FAST])
  err = capsys.readouterr().err
  assert rc == 2
  assert msg in err, err
  assert not out.exists() and not (tmp_path / "s.json").exists()
  assert not [q for q in tmp_path.iterdir() if q.name.startswith(".ix")]


def test_missing_embeddings_file(tmp_path, capsys):
  rc = cli.main(["build-ids", "--embeddings", str(tmp_path / "none.npy"), "--out", str(tmp_path / "ix")])
  assert rc == 2 and "no such file" in capsys.readouterr().err
