"""Convolutional baselines: the CIFAR ResNet18 of the paper's Table 1 and a small CPU CNN.

Both use only stock ``flax.linen`` layers (``nn.Conv``, ``nn.BatchNorm``, ``nn.Dense``), so code
that intercepts ``nn.Conv.__call__`` (e.g. to run every convolution as self-attention) sees every
convolution.

Call signature (as every model of :mod:`attnconv.models`)::

  logits, updates = model.apply(variables, images, train=True, rngs={"dropout": key},
                                mutable=["batch_stats"])
  logits = model.apply(variables, images, train=False)

``images``: channels-last float ``(B, H, W, C)``; ``logits``: float32 ``(B, num_classes)``.

References:
  Cordonnier, Loukas & Jaggi, "On the Relationship between Self-Attention and Convolutional
  Layers", ICLR 2020 (ResNet18 baseline: kuangliu/pytorch-cifar, as in the authors' code).
  He et al., "Deep Residual Learning for Image Recognition", CVPR 2016.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = ["AttentionCNN", "BasicBlock", "ResNet18", "SmallCNN"]

# PyTorch BatchNorm2d defaults: momentum 0.1 (flax: 0.9 = 1 - 0.1), eps 1e-5.
_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5


def _check_images(images: Array) -> None:
  if not hasattr(images, "ndim") or images.ndim != 4:
    raise ValueError(
      "images: expected a rank-4 (batch, height, width, channels) array, got shape "
      f"{getattr(images, 'shape', type(images).__name__)}"
    )


def _check_positive(name: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name}: expected a positive integer, got {value!r}")


class BasicBlock(nn.Module):
  """ResNet basic block: two 3x3 conv + BN, identity or 1x1 conv + BN projection shortcut.

  Attributes:
    features: output channels.
    strides: stride of the first convolution (and of the projection).
    dtype: computation dtype (``None``: inferred).
    param_dtype: parameter dtype.
  """

  features: int
  strides: int = 1
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    """``(B, H, W, C_in) -> (B, H / strides, W / strides, features)``."""
    conv = lambda f, k, s, name: nn.Conv(  # noqa: E731
      f,
      (k, k),
      strides=(s, s),
      padding=((k // 2, k // 2), (k // 2, k // 2)),
      use_bias=False,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name=name,
    )
    norm = lambda name: nn.BatchNorm(  # noqa: E731
      use_running_average=not train,
      momentum=_BN_MOMENTUM,
      epsilon=_BN_EPSILON,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name=name,
    )
    y = conv(self.features, 3, self.strides, "conv1")(x)
    y = nn.relu(norm("bn1")(y))
    y = conv(self.features, 3, 1, "conv2")(y)
    y = norm("bn2")(y)
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = conv(self.features, 1, self.strides, "shortcut_conv")(x)
      shortcut = norm("shortcut_bn")(shortcut)
    return nn.relu(y + shortcut)


class ResNet18(nn.Module):
  """CIFAR ResNet18 (kuangliu/pytorch-cifar), the paper's convolutional baseline.

  3x3 stem (stride 1, ``width`` channels, BN, ReLU); four stages of ``stage_sizes`` basic blocks
  with ``width * (1, 2, 4, 8)`` channels and strides 1/2/2/2; global average pooling (the
  original's ``avg_pool2d(4)`` on 32x32 inputs); ``Dense(num_classes)``. Convolutions have no
  bias. With 10 classes and 3 input channels: 11,173,962 parameters (BN statistics excluded).

  Attributes:
    num_classes: number of classes.
    width: channels of the stem and first stage.
    stage_sizes: number of basic blocks per stage (ResNet18: (2, 2, 2, 2)).
    dtype: computation dtype (e.g. ``jnp.bfloat16``); logits are returned in float32.
    param_dtype: parameter dtype.
  """

  num_classes: int = 10
  width: int = 64
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: Array, train: bool = False) -> Array:
    """Classifies ``images (B, H, W, C)`` into logits ``(B, num_classes)`` (float32)."""
    _check_images(images)
    _check_positive("num_classes", self.num_classes)
    _check_positive("width", self.width)
    if len(self.stage_sizes) == 0:
      raise ValueError(f"stage_sizes: expected a non-empty sequence, got {self.stage_sizes!r}")
    for size in self.stage_sizes:
      _check_positive("stage_sizes", size)
    x = images.astype(self.dtype or jnp.result_type(images.dtype, jnp.float32))
    x = nn.Conv(
      self.width,
      (3, 3),
      padding=((1, 1), (1, 1)),
      use_bias=False,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="stem_conv",
    )(x)
    x = nn.BatchNorm(
      use_running_average=not train,
      momentum=_BN_MOMENTUM,
      epsilon=_BN_EPSILON,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="stem_bn",
    )(x)
    x = nn.relu(x)
    for stage, num_blocks in enumerate(self.stage_sizes):
      for block in range(num_blocks):
        x = BasicBlock(
          features=self.width * 2**stage,
          strides=2 if stage > 0 and block == 0 else 1,
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          name=f"stage{stage + 1}_block{block + 1}",
        )(x, train)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(
      self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="classifier"
    )(x)
    return x.astype(jnp.float32)


class SmallCNN(nn.Module):
  """A small CNN that trains on Fashion-MNIST on a laptop CPU in minutes.

  Optional ``downsample x downsample`` space-to-depth first (as the attention network); then for
  each ``features[i]``: 3x3 conv (no bias, padding 1) -> BN -> ReLU, with stride 2 on every layer
  but the first; then pooling and ``Dense(num_classes)``. On 28x28x1 inputs with the default
  ``features=(32, 64, 128)`` the feature maps are 28 -> 14 -> 7.

  Attributes:
    num_classes: number of classes.
    features: output channels of the convolutions.
    pool: ``"avg"`` (global average pooling, position-invariant) or ``"flatten"`` (flatten the
      last feature map, position-aware; learns Fashion-MNIST much faster).
    downsample: space-to-depth block size applied to the images first (1: none).
    dtype: computation dtype; logits are returned in float32.
    param_dtype: parameter dtype.
  """

  num_classes: int = 10
  features: Sequence[int] = (32, 64, 128)
  pool: str = "avg"
  downsample: int = 1
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def _conv(self, features: int, stride: int, name: str) -> nn.Module:
    return nn.Conv(
      features,
      (3, 3),
      strides=(stride, stride),
      padding=((1, 1), (1, 1)),
      use_bias=False,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name=name,
    )

  @nn.compact
  def __call__(self, images: Array, train: bool = False) -> Array:
    """Classifies ``images (B, H, W, C)`` into logits ``(B, num_classes)`` (float32)."""
    _check_images(images)
    _check_positive("num_classes", self.num_classes)
    _check_positive("downsample", self.downsample)
    if len(self.features) == 0:
      raise ValueError(f"features: expected a non-empty sequence, got {self.features!r}")
    for f in self.features:
      _check_positive("features", f)
    if self.pool not in ("avg", "flatten"):
      raise ValueError(f"pool: expected 'avg' or 'flatten', got {self.pool!r}")
    x = images.astype(self.dtype or jnp.result_type(images.dtype, jnp.float32))
    if self.downsample > 1:
      from attnconv.models.attention_net import space_to_depth

      x = space_to_depth(x, self.downsample)
    for i, f in enumerate(self.features):
      x = self._conv(f, 1 if i == 0 else 2, f"conv{i + 1}")(x)
      x = nn.BatchNorm(
        use_running_average=not train,
        momentum=_BN_MOMENTUM,
        epsilon=_BN_EPSILON,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=f"bn{i + 1}",
      )(x)
      x = nn.relu(x)
    x = jnp.mean(x, axis=(1, 2)) if self.pool == "avg" else x.reshape(x.shape[0], -1)
    x = nn.Dense(
      self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="classifier"
    )(x)
    return x.astype(jnp.float32)


class AttentionCNN(SmallCNN):
  """:class:`SmallCNN` with its 3x3 convolutions (all, or ``attention_layers``) replaced by 9-head
  self-attention.

  An attention layer ``conv{i}`` is a :class:`attnconv.layers.MultiHeadRelativeAttention` with
  the grids of the convolution it replaces (padding 1, stride 1 or 2, queries at the centres of
  their 3x3 windows), parameters ``centers (9, 2)``, ``alpha (9,)`` and ``out`` (no bias); for
  ``encoding="quadratic_content"`` also ``query``/``key`` projections; for ``encoding="gpsa"``
  (ConViT's gated positional self-attention, d'Ascoli et al. 2021) ``query``/``key`` and the
  per-head ``gate``: probabilities ``sigmoid(-gate) softmax(q.k) + sigmoid(gate) softmax(Eq. 9)``.
  The layers not in ``attention_layers`` stay ``nn.Conv`` with SmallCNN's names, so a SmallCNN's
  parameters load into them unchanged.

  Its attention parameters are those of :func:`attnconv.construction.conv_to_attention`, so a
  trained SmallCNN converts into it and can then be fine-tuned as free attention (centres,
  ``alpha`` and content trainable): :func:`attnconv.models.conv_init.attention_cnn_from_cnn`
  (every layer, quadratic encodings) and
  :func:`attnconv.models.conv_init.transformed_cnn_from_cnn` (chosen layers as GPSA with the
  content half gated off: the T-CNN of d'Ascoli et al. 2021, "Transformed CNNs").

  Attributes (besides :class:`SmallCNN`'s):
    encoding: ``"quadratic"`` (position only; separable fast path), ``"quadratic_content"`` or
      ``"gpsa"`` (dense).
    qk_features: per-head query/key size of the content term.
    attention_layers: names of the convolutions that become attention (e.g. ``("conv3",)``, the
      last stage); ``None``: all of them.
    gate_init: initial ``gate`` of ``"gpsa"`` layers (ConViT: 1) when initialised from scratch.
    locality_strength: ``None`` (centres ``N(0, 2^2)``, alpha about 1) or ConViT's local
      initialisation from scratch: centres on the 3x3 lattice, ``alpha = locality_strength``.
  """

  encoding: str = "quadratic"
  qk_features: int = 8
  attention_layers: tuple[str, ...] | None = None
  gate_init: float = 1.0
  locality_strength: float | None = None

  def _check_attention_layers(self) -> None:
    names = tuple(f"conv{i + 1}" for i in range(len(self.features)))
    layers = self.attention_layers
    if layers is None:
      return
    if isinstance(layers, str) or not isinstance(layers, tuple | list):
      raise TypeError(
        f"attention_layers: expected None or a tuple of names from {names}, got {layers!r}"
      )
    if not layers or any(name not in names for name in layers):
      raise ValueError(
        f"attention_layers: expected None or a non-empty tuple of names from {names}, got "
        f"{tuple(layers)!r}"
      )

  def _conv(self, features: int, stride: int, name: str) -> nn.Module:
    from attnconv.layers import MultiHeadRelativeAttention

    encodings = ("quadratic", "quadratic_content", "gpsa")
    if self.encoding not in encodings:
      raise ValueError(f"encoding: expected one of {encodings}, got {self.encoding!r}")
    self._check_attention_layers()
    if self.attention_layers is not None and name not in self.attention_layers:
      return super()._conv(features, stride, name)
    return MultiHeadRelativeAttention(
      num_heads=9,
      encoding=self.encoding,
      out_features=features,
      qk_features=self.qk_features if self.encoding != "quadratic" else None,
      sharpness_param="alpha",
      implementation="separable" if self.encoding == "quadratic" else "dense",
      strides=stride,
      padding=((1, 1), (1, 1)),
      query_window=3,
      locality_strength=self.locality_strength,
      gate_init=self.gate_init,
      use_bias=False,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name=name,
    )
