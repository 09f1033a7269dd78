"""``cart embed --model E.model.npz`` (encode only): a trained item tower embeds a corpus again.

One tiny built-in ``cart embed`` (24 emoji, 2 steps, 16 dimensions) is shared by the module; the
encode-only runs must give back its rows (all items, and a reordered subset), and a model of
another modality or dimension, a file that is no model, or ``--model`` with ``--encoder
precomputed`` are one-line errors (exit 2) that write nothing.
"""
import json

import numpy as np
import pytest

from cart_jax import api
from cart_jax.cli import main as cli
from cart_jax.data.corpus import write_corpus

from helpers import require_emoji_and_minilm

TRAIN = ["--steps", "2", "--batch-size", "8", "--dim", "16", "--text-batch", "16",
         "--checkpoint-every", "0", "--no-progress"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  require_emoji_and_minilm()
  root = tmp_path_factory.mktemp("embed_model")
  corpus = api.prepare("emoji", root / "emoji", limit=24).corpus
  assert cli.main(["embed", "--corpus", str(corpus.root), "--out", str(root / "E.npy"), *TRAIN]) == 0
  return root, corpus


def test_the_model_trained_on_a_corpus_gives_back_its_rows(trained, tmp_path):
  root, corpus = trained
  out = tmp_path / "again.npy"
  assert cli.main(["embed", "--corpus", str(corpus.root), "--out", str(out), "--model",
                   str(root / "E.model.npz"), "--expect-dim", "16", "--json",
                   str(tmp_path / "s.json"), "--quiet"]) == 0
  np.testing.assert_allclose(np.load(out), np.load(root / "E.npy"), rtol=1e-5, atol=1e-6)
  assert (tmp_path / "again.ids.txt").read_text().splitlines() == corpus.item_ids
  s = json.loads((tmp_path / "s.json").read_text())
  assert s["mode"] == "encode-only" and s["dim"] == 16 and s["num_items"] == 24
  assert s["model_meta"]["num_items"] == 24  # the model's own training, from E.meta.json
  meta = json.loads((tmp_path / "again.meta.json").read_text())
  assert meta["encoder"] == "builtin" and meta["model"] == "again.model.npz"
  assert (tmp_path / "again.model.npz").is_file()  # cart baseline / the re-ranker read it


def test_new_items_land_in_the_old_rows_space(trained, tmp_path):
  """A corpus of some of the items, in another order: the same rows, by id (api.embed)."""
  root, corpus = trained
  pick = corpus.item_ids[::-5]  # reversed, every fifth
  items = [corpus.items[corpus.item_index(i)] for i in pick]
  write_corpus(tmp_path / "few", corpus.name, corpus.modality, items,
               [t for t in corpus.all_texts if t.item_id in set(pick)],
               media_sources={it.id: corpus.media_path(it) for it in items}, media_mode="symlink")
  res = api.embed(tmp_path / "few", tmp_path / "few.npy",
                  api.ModelEmbedOptions(model=str(root / "E.model.npz"), batch_size=3),
                  progress=False)
  full = np.load(root / "E.npy")
  rows = [corpus.item_index(i) for i in pick]
  np.testing.assert_allclose(np.load(res.path), full[rows], rtol=1e-5, atol=1e-6)
  assert res.files.ids.read_text().splitlines() == pick


def _fails(argv, capsys) -> str:
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("cart embed: error:") and "\n" not in err
  return err


def test_a_model_of_another_modality_or_dimension_is_a_clear_error(trained, tmp_path, capsys):
  root, corpus = trained
  from cart_jax.models.dual_encoder import DualEncoderConfig
  from cart_jax.models.towers import registry
  from cart_jax.train.dual_encoder import init_model, save_model
  audio = tmp_path / "audio.model.npz"
  save_model(audio, init_model(DualEncoderConfig(tower=registry.default_config("audio", out_dim=16)), 0))
  base = ["embed", "--corpus", str(corpus.root), "--out", str(tmp_path / "x.npy")]
  err = _fails(base + ["--model", str(audio)], capsys)
  assert "audio item tower" in err and "image corpus" in err
  err = _fails(base + ["--model", str(root / "E.model.npz"), "--expect-dim", "32"], capsys)
  assert "dimension 16" in err and "expected 32" in err
  err = _fails(base + ["--model", str(root / "E.npy")], capsys)  # not a model file
  assert "E.npy" in err
  err = _fails(base + ["--model", str(tmp_path / "missing.model.npz")], capsys)
  assert "not found" in err
  err = _fails(base + ["--model", str(root / "E.model.npz"), "--encoder", "precomputed"], capsys)
  assert "--encoder precomputed" in err
  err = _fails(["embed", "--corpus", str(corpus.root), "--out", str(root / "E.npy"), "--model",
                str(root / "E.model.npz"), "--overwrite"], capsys)
  assert "would write" in err
  assert not list(tmp_path.glob("x.*"))  # nothing written
