"""ResNet v1 in Flax, laid out exactly like Keras Applications' ResNet50 so ImageNet weights map 1:1.

Keras v1 (He et al. 2016, as in ``keras.applications.ResNet50``): the stride of a downsampling bottleneck
sits in its *first* 1x1 convolution (torchvision's "v1.5" puts it in the 3x3); every convolution has a bias;
BatchNorm epsilon is 1.001e-5. Submodules carry the Keras layer names (``conv1_conv``, ``conv2_block1_0_conv``,
``conv5_block3_3_bn``, ...), so converting a Keras weights file is a rename of the variable kinds only.

Depths 50/101/152 use bottleneck blocks (as Keras); 18/34 use basic blocks with the same naming scheme (Keras
ships no weights for them). ``norm="group"`` swaps BatchNorm for GroupNorm (no running statistics, so nothing
to average or freeze across clients). Named sizes are partials of one module, with tiny variants for tests.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["ResNet", "ResNet18", "ResNet34", "ResNet50", "ResNet50Torch", "ResNet101", "ResNet152", "ResNetTiny",
           "ClassifierHead", "caffe_preprocess", "torch_preprocess"]

BN_EPSILON = 1.001e-5  # Keras Applications' value


def caffe_preprocess(x: jax.Array) -> jax.Array:
  """Keras ``preprocess_input`` mode 'caffe' on uint8 RGB: RGB -> BGR, subtract the ImageNet BGR mean."""
  x = x.astype(jnp.float32)[..., ::-1]
  return x - jnp.array([103.939, 116.779, 123.68], jnp.float32)


def torch_preprocess(x: jax.Array) -> jax.Array:
  """torchvision/timm preprocessing on uint8 RGB: scale to [0, 1], normalise with the ImageNet mean/std."""
  x = x.astype(jnp.float32) / 255.0
  return (x - jnp.array([0.485, 0.456, 0.406])) / jnp.array([0.229, 0.224, 0.225])


class _Norm(nn.Module):
  """BatchNorm (masked batch statistics, no cross-client axis) or GroupNorm."""

  kind: str = "batch"
  groups: int = 32
  epsilon: float = BN_EPSILON
  dtype: Any = None  # output/computation dtype (statistics are reduced in float32 either way)

  @nn.compact
  def __call__(self, x, train: bool, mask=None):
    if self.kind == "batch":
      m = None if mask is None else mask.reshape(mask.shape + (1,) * (x.ndim - 1))
      return nn.BatchNorm(use_running_average=not train, momentum=0.99, epsilon=self.epsilon, dtype=self.dtype,
                          name="bn")(x, mask=m)
    if self.kind == "group":
      return nn.GroupNorm(num_groups=min(self.groups, x.shape[-1]), epsilon=self.epsilon, dtype=self.dtype,
                          name="gn")(x)
    raise ValueError(f"norm must be 'batch' or 'group', got {self.kind!r}")


class ResNet(nn.Module):
  """ResNet v1 feature extractor (no top): returns globally average-pooled features [batch, channels].

  Attributes:
    stage_sizes: blocks per stage (conv2..conv5 in Keras naming).
    bottleneck: bottleneck (1x1-3x3-1x1, expansion 4) or basic (3x3-3x3) blocks.
    width: filters of the first stage (64 for the standard nets).
    norm: "batch" or "group".
    stem: "imagenet" (7x7/2 conv + 3x3/2 max-pool) or "small" (3x3/1 conv, no pool; for 32x32 inputs).
    pooling: "avg" (global average) or None (return the feature map).
    stride_on: where a downsampling bottleneck puts its stride: "1x1" (Keras v1) or "3x3" (torchvision and
      timm, "ResNet v1.5").
    conv_bias: convolutions with bias (Keras: True; torchvision/timm: False).
    bn_epsilon: BatchNorm epsilon (Keras 1.001e-5; torchvision 1e-5).
    dtype: computation dtype, e.g. ``jnp.bfloat16`` for mixed precision on GPU/TPU: convolutions and
      activations in bf16, params (and so gradients, optimizer state and updates) stay float32, normalisation
      statistics and the pooled features are reduced in float32. None = float32. On CPU bf16 is slower.
  """

  stage_sizes: Sequence[int]
  bottleneck: bool = True
  width: int = 64
  norm: str = "batch"
  stem: str = "imagenet"
  pooling: str | None = "avg"
  stride_on: str = "1x1"
  conv_bias: bool = True
  bn_epsilon: float = BN_EPSILON
  dtype: Any = None

  def _conv_norm(self, x, filters, kernel, strides, name, train, mask, padding="VALID"):
    if kernel > 1 and strides > 1 and padding == "SAME":  # torch-style symmetric padding for strided 3x3
      padding = ((kernel // 2, kernel // 2),) * 2
    x = nn.Conv(filters, (kernel, kernel), (strides, strides), padding=padding, use_bias=self.conv_bias,
                dtype=self.dtype, name=f"{name}_conv")(x)
    norm = _Norm(self.norm, epsilon=self.bn_epsilon, dtype=self.dtype,
                 name=f"{name}_{'bn' if self.norm == 'batch' else 'gn'}")
    return norm(x, train, mask)

  @nn.compact
  def __call__(self, x, train: bool = False, mask=None):
    if self.stem == "imagenet":
      x = jnp.pad(x, ((0, 0), (3, 3), (3, 3), (0, 0)))
      x = nn.relu(self._conv_norm(x, self.width, 7, 2, "conv1", train, mask))
      x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
      x = nn.max_pool(x, (3, 3), (2, 2))
    elif self.stem == "small":
      x = nn.relu(self._conv_norm(x, self.width, 3, 1, "conv1", train, mask, padding="SAME"))
    else:
      raise ValueError(f"stem must be 'imagenet' or 'small', got {self.stem!r}")
    for i, blocks in enumerate(self.stage_sizes):
      filters = self.width * 2**i
      for j in range(blocks):
        name = f"conv{i + 2}_block{j + 1}"
        stride = 2 if (i > 0 and j == 0) else 1
        x = self._block(x, filters, stride, first=j == 0, name=name, train=train, mask=mask)
    if self.pooling == "avg":
      x = x.astype(jnp.float32).mean(axis=(1, 2))
    return x

  def _block(self, x, filters, stride, first, name, train, mask):
    out_filters = filters * 4 if self.bottleneck else filters
    shortcut = x
    if first and (stride != 1 or x.shape[-1] != out_filters):
      shortcut = self._conv_norm(x, out_filters, 1, stride, f"{name}_0", train, mask)
    if self.stride_on not in ("1x1", "3x3"):
      raise ValueError(f"stride_on must be '1x1' or '3x3', got {self.stride_on!r}")
    s1, s3 = (stride, 1) if self.stride_on == "1x1" else (1, stride)
    if self.bottleneck:
      y = nn.relu(self._conv_norm(x, filters, 1, s1, f"{name}_1", train, mask))
      y = nn.relu(self._conv_norm(y, filters, 3, s3, f"{name}_2", train, mask, padding="SAME"))
      y = self._conv_norm(y, out_filters, 1, 1, f"{name}_3", train, mask)
    else:
      y = nn.relu(self._conv_norm(x, filters, 3, stride, f"{name}_1", train, mask,
                                  padding=((1, 1), (1, 1))))
      y = self._conv_norm(y, filters, 3, 1, f"{name}_2", train, mask, padding="SAME")
    return nn.relu(shortcut + y)


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), bottleneck=False)
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), bottleneck=False)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3))
# torchvision / timm layout ("v1.5"): stride in the 3x3 conv, no conv bias, BN epsilon 1e-5.
ResNet50Torch = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), stride_on="3x3", conv_bias=False,
                                  bn_epsilon=1e-5)
ResNet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3))
ResNet152 = functools.partial(ResNet, stage_sizes=(3, 8, 36, 3))
# One block per stage and 8 base filters: the whole structure (stem, downsampling shortcuts, 4 stages) at a
# size that trains in milliseconds on a CPU, for tests and the smoke preset.
ResNetTiny = functools.partial(ResNet, stage_sizes=(1, 1, 1, 1), width=8)


class ClassifierHead(nn.Module):
  """Backbone features -> optional Dense(hidden, relu) layers -> Dense(num_classes), under ``head/``.

  ``backbone`` is a feature extractor (e.g. ResNet50()); the article's model is
  ``ClassifierHead(ResNet50(), num_classes=10, hidden=(128,))``.
  """

  backbone: nn.Module
  num_classes: int
  hidden: Sequence[int] = ()
  dtype: Any = None  # computation dtype of the hidden layers (the logits are float32)
  representation: bool = False  # return {"logits", "features": the input of the last Dense} (for MOON)

  @nn.compact
  def __call__(self, x, train: bool = False, mask=None):
    x = self.backbone(x, train=train, mask=mask)
    for i, h in enumerate(self.hidden):
      x = nn.relu(nn.Dense(h, dtype=self.dtype, name=f"head_hidden{i}")(x))
    logits = nn.Dense(self.num_classes, dtype=jnp.float32, name="head")(x)
    return {"logits": logits, "features": x} if self.representation else logits
