"""gin_configs/models/*.gin bind exactly the Python presets (parsed as text: no gin import needed)."""
import ast
import dataclasses
import os
import re

import pytest

from cart_jax.models.cart.config import PRESETS, ModelConfig

GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin_configs", "models")
BINDING = re.compile(r"^ModelConfig\.(\w+)\s*=\s*(.+)$")


def _bindings(path):
  out = {}
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line or line.startswith("#"):
        continue
      m = BINDING.match(line)
      assert m, f"{path}: unexpected line {line!r} (model files bind ModelConfig fields only)"
      assert m.group(1) not in out, f"{path}: {m.group(1)} bound twice"
      out[m.group(1)] = ast.literal_eval(m.group(2))
  return out


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_gin_file_matches_preset(name):
  path = os.path.join(GIN_DIR, f"{name}.gin")
  with open(path) as f:
    header = f.readline()
  assert header.startswith(f"# Model architecture `{name}`")
  bound = _bindings(path)
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  assert set(bound) <= fields
  assert "output_vocab_size" not in bound  # comes from the index
  assert ModelConfig(**bound) == PRESETS[name]()


def test_every_gin_model_file_is_a_preset():
  names = {f[:-4] for f in os.listdir(GIN_DIR) if f.endswith(".gin")}
  assert names == set(PRESETS)
