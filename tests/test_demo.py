"""cart demo: recipe selection by --modality, and a smoke run of the whole image pipeline."""
import json

import pytest

from cart_jax.cli.main import main
from cart_jax.core.errors import CartError
from cart_jax.cli.commands import demo


def test_recipe_for_image_and_errors():
  assert demo.recipe_for("image")["dataset"] == "emoji"
  assert demo.recipe_for("image", full=True)["experiment"].endswith("emoji_cart.gin")
  with pytest.raises(CartError, match="expected one of"):
    demo.recipe_for("smell")
  with pytest.raises(CartError, match="--full is the image recipe"):
    demo.recipe_for("audio", full=True)
  assert demo._last_value(["--steps", "3", "--lr", "1", "--steps", "7"], "--steps", 600) == "7"
  assert demo._last_value(["--lr", "1"], "--steps", 600) == 600


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
  """Every argument list of the recipe parses with its command's own parser; the gin file exists."""
  from pathlib import Path

  from cart_jax.cli.commands import build_ids, data, embed
  r = demo.recipe_for(modality)
  assert r["dataset"] == dataset and r["dataset"] in data.PREPARERS
  assert (Path(__file__).resolve().parents[1] / r["experiment"]).is_file()
  e = demo._sub_args(embed, "embed", ["--corpus", "c", "--out", "e.npy"] + r["embed_args"])
  assert e.steps > 0
  for key in ("ids_args", "smoke_ids_args"):
    b = demo._sub_args(build_ids, "build-ids", ["--embeddings", "e.npy", "--out", "i"] + r[key])
    assert b.clusters >= 2 and b.levels >= 1
