"""cart demo: recipe selection by --modality, and a smoke run of the whole image pipeline."""
import json

import pytest

from cart_jax.cli import CliError, main
from cart_jax.commands import demo


def test_recipe_for_image_and_errors():
  assert demo.recipe_for("image")["dataset"] == "emoji"
  assert demo.recipe_for("image", full=True)["experiment"].endswith("emoji_cart.gin")
  with pytest.raises(CliError, match="expected one of"):
    demo.recipe_for("smell")
  with pytest.raises(CliError, match="--full is the image recipe"):
    demo.recipe_for("audio", full=True)
  assert demo._last_value(["--steps", "3", "--lr", "1", "--steps", "7"], "--steps", 600) == "7"
  assert demo._last_value(["--lr", "1"], "--steps", 600) == 600


def test_demo_smoke_image(tmp_path, capsys):
  """Every stage runs and the summary has the table's numbers (tiny budgets: values not judged)."""
  out = tmp_path / "demo.json"
  rc = main(["demo", "--workdir", str(tmp_path / "w"), "--limit", "24", "--embed-steps", "3",
             "--train-steps", "4", "--json", str(out)])
  assert rc == 0
  s = json.loads(out.read_text())
  assert s["modality"] == "image" and s["dataset"] == "emoji" and s["n_items"] == 24
  assert s["train_steps"] == 4 and s["embed_steps"] == 3
  for side in ("cart", "dual_tower"):
    assert 0.0 <= s[side]["r@1"] <= s[side]["r@5"] <= s[side]["r@10"] <= 1.0
  assert s["n_test_queries"] > 0
  printed = capsys.readouterr().out
  assert "candidates: 24 emoji" in printed and "CART" in printed and "dual tower" in printed


@pytest.mark.parametrize("modality,dataset", [("audio", "instruments"), ("video", "emoji-motion")])
def test_recipes_of_audio_and_video_point_at_real_steps(modality, dataset):
  """Every argument list of the recipe parses with its command's own parser; the gin file exists."""
  from pathlib import Path

  from cart_jax.commands import build_ids, data, embed
  r = demo.recipe_for(modality)
  assert r["dataset"] == dataset and r["dataset"] in data.PREPARERS
  assert (Path(__file__).resolve().parents[1] / r["experiment"]).is_file()
  e = demo._sub_args(embed, "embed", ["--corpus", "c", "--out", "e.npy"] + r["embed_args"])
  assert e.steps > 0
  for key in ("ids_args", "smoke_ids_args"):
    b = demo._sub_args(build_ids, "build-ids", ["--embeddings", "e.npy", "--out", "i"] + r[key])
    assert b.clusters >= 2 and b.levels >= 1
