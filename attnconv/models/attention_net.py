"""The fully attentional image classifier of Cordonnier et al. (2020), Sec. 4.

``images (B, H, W, C)`` -> 2x2 space-to-depth (invertible down-sampling) -> ``Dense(D)`` ->
``num_layers`` post-LayerNorm blocks -> mean pooling over positions -> ``Dense(num_classes)``.

Each block (BERT layer as in the authors' code)::

  a = MHSA(x)                         # H heads; each head aggregates the full D-dim input,
                                      # then out: Dense(H * D -> D)
  x = LayerNorm(x + Dropout(Dense(D)(a)))
  m = Dense(D)(gelu_exact(Dense(mlp_dim)(x)))
  x = LayerNorm(x + Dropout(m))        # LayerNorm eps 1e-12

No positional embedding is added to the input: positions enter only through the relative
attention. With the paper's sizes (6 layers, 9 heads, D = 400, mlp 512, 10 classes, 32x32x3
inputs) the parameter counts are 12,086,844 (quadratic), 12,087,006 (generalized), 12,278,682
(learned), 29,484,282 (learned + content with q.r) and 18,806,970 (quadratic, 16 heads).

Initialisation follows the authors' PyTorch code (``init_scheme="torch"``): dense kernels
``U(+-1/sqrt(fan_in))`` (kaiming-uniform with a = sqrt(5)), biases ``U(+-1/sqrt(fan_in))``,
learned relative tables ``N(0, 1)``, centres ``N(0, 2^2)``, spreads ``1 + N(0, 0.01^2)``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attnconv.layers import MultiHeadRelativeAttention

Array = jax.Array

ENCODINGS = ("quadratic", "generalized", "learned", "learned_content", "gpsa")

# 'auto' takes the separable path from this many tokens on (a 16 x 16 grid): on smaller grids the
# per-axis contractions are too short (K = grid side) to beat the dense products; measured in
# docs/performance.md (experiments/benchmarks/positional_scaling.py).
SEPARABLE_MIN_TOKENS = 256


def auto_implementation(encoding: str, num_tokens: int) -> str:
  """The attention path 'auto' picks: 'separable' for the quadratic and learned encodings on at
  least ``SEPARABLE_MIN_TOKENS`` tokens, 'dense' otherwise."""
  if encoding in ("quadratic", "learned") and num_tokens >= SEPARABLE_MIN_TOKENS:
    return "separable"
  return "dense"


def space_to_depth(x: Array, block: int) -> Array:
  """Invertible down-sampling: ``(B, H, W, C) -> (B, H/b, W/b, b*b*C)`` (channel order b_h, b_w, C)."""
  b, h, w, c = x.shape
  if h % block or w % block:
    raise ValueError(
      f"x: expected height and width divisible by downsample={block}, got shape {x.shape}"
    )
  x = x.reshape(b, h // block, block, w // block, block, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // block, w // block, block * block * c)


def torch_kernel_init() -> Any:
  """PyTorch ``nn.Linear`` default kernel init: ``U(+-1/sqrt(fan_in))``."""
  return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int) -> Any:
  """PyTorch ``nn.Linear`` default bias init: ``U(+-1/sqrt(fan_in))``."""
  bound = 1.0 / np.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class AttentionBlock(nn.Module):
  """One post-LayerNorm transformer block with relative-position attention."""

  num_heads: int = 9
  hidden_size: int = 400
  mlp_dim: int = 512
  encoding: str = "quadratic"
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  implementation: str = "auto"
  init_scheme: str = "torch"
  center_init_std: float = 2.0
  shared_dropout_mask: bool = False
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    d = self.hidden_size
    torch = self.init_scheme == "torch"

    def dense(features: int, fan_in: int, name: str) -> nn.Dense:
      kw = {}
      if torch:
        kw = {"kernel_init": torch_kernel_init(), "bias_init": torch_bias_init(fan_in)}
      return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype, name=name, **kw)

    attn_kw: dict[str, Any] = {}
    if torch:
      attn_kw = {
        "kernel_init": torch_kernel_init(),
        "bias_init": torch_bias_init(self.num_heads * d),
      }
    if self.encoding in ("learned_content", "gpsa"):
      attn_kw["qk_features"] = d
    implementation = self.implementation
    if implementation == "auto":
      implementation = auto_implementation(self.encoding, int(np.prod(x.shape[1:-1])))
    a = MultiHeadRelativeAttention(
      num_heads=self.num_heads,
      encoding=self.encoding,
      out_features=d,
      dropout_rate=self.attention_dropout_rate,
      shared_dropout_mask=self.shared_dropout_mask,
      implementation=implementation,
      center_init_std=self.center_init_std,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="attention",
      **attn_kw,
    )(x, deterministic=not train)
    a = dense(d, d, "attention_output")(a)
    a = nn.Dropout(self.dropout_rate, deterministic=not train)(a)
    ln = lambda name: nn.LayerNorm(  # noqa: E731
      epsilon=1e-12, dtype=self.dtype, param_dtype=self.param_dtype, name=name
    )
    x = ln("attention_norm")(x + a)
    m = dense(self.mlp_dim, d, "mlp_in")(x)
    m = nn.gelu(m, approximate=False)
    m = dense(d, self.mlp_dim, "mlp_out")(m)
    m = nn.Dropout(self.dropout_rate, deterministic=not train)(m)
    return ln("mlp_norm")(x + m)


class AttentionNet(nn.Module):
  """The paper's attention-only classifier (see the module docstring).

  Attributes:
    num_classes: number of classes.
    num_layers: number of blocks ``L`` (paper: 6).
    num_heads: heads per layer (paper: 9; 16 in the many-heads run).
    hidden_size: ``D`` (paper: 400).
    mlp_dim: feed-forward width (paper: 512).
    encoding: 'quadratic', 'generalized', 'learned', 'learned_content' or 'gpsa' (ConViT's
      gated positional self-attention with the paper's random centres).
    downsample: space-to-depth block size (paper: 2).
    dropout_rate: hidden dropout (paper: 0.1).
    attention_dropout_rate: dropout on attention probabilities (paper: 0.1).
    implementation: attention path: 'auto' (:func:`auto_implementation`: separable for
      quadratic/learned on at least 256 tokens, dense otherwise; training with attention dropout
      always uses the dense path), 'dense' or 'separable'.
    init_scheme: 'torch' (the authors' PyTorch defaults) or 'flax' (flax defaults).
    center_init_std: std of the attention centres at initialisation (paper: 2 pixels of the
      down-sampled grid).
    remat: rematerialise each block in the backward pass (saves memory).
    shared_dropout_mask: one attention-dropout mask per step shared by the batch (position-only
      encodings; keeps the fused dense path in training) instead of one per example. The authors'
      code shares the mask for its Gaussian (quadratic, generalized) attention and draws one per
      image for the learned encodings; the paper configs follow it.
    dtype: computation dtype (e.g. bfloat16); parameters stay ``param_dtype``.
  """

  num_classes: int = 10
  num_layers: int = 6
  num_heads: int = 9
  hidden_size: int = 400
  mlp_dim: int = 512
  encoding: str = "quadratic"
  downsample: int = 2
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  implementation: str = "auto"
  init_scheme: str = "torch"
  center_init_std: float = 2.0
  remat: bool = False
  shared_dropout_mask: bool = False
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: Array, train: bool = False) -> Array:
    if self.encoding not in ENCODINGS:
      raise ValueError(f"encoding: expected one of {ENCODINGS}, got {self.encoding!r}")
    if images.ndim != 4:
      raise ValueError(
        f"images: expected rank 4 (batch, height, width, channels), got {images.shape}"
      )
    x = images.astype(self.dtype or images.dtype)
    if self.downsample > 1:
      x = space_to_depth(x, self.downsample)
    kw = {}
    if self.init_scheme == "torch":
      kw = {"kernel_init": torch_kernel_init(), "bias_init": torch_bias_init(x.shape[-1])}
    x = nn.Dense(
      self.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name="embedding", **kw
    )(x)
    block_cls = nn.remat(AttentionBlock, static_argnums=(2,)) if self.remat else AttentionBlock
    for i in range(self.num_layers):
      block = block_cls(
        num_heads=self.num_heads,
        hidden_size=self.hidden_size,
        mlp_dim=self.mlp_dim,
        encoding=self.encoding,
        dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate,
        implementation=self.implementation,
        init_scheme=self.init_scheme,
        center_init_std=self.center_init_std,
        shared_dropout_mask=self.shared_dropout_mask,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=f"block_{i}",
      )
      x = block(x, train)
    x = jnp.mean(x, axis=(1, 2))
    if self.init_scheme == "torch":
      kw = {"kernel_init": torch_kernel_init(), "bias_init": torch_bias_init(self.hidden_size)}
    logits = nn.Dense(
      self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="classifier", **kw
    )(x)
    return logits.astype(jnp.float32)
