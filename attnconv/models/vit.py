"""The Vision Transformer (ViT) of Dosovitskiy et al. (2021), sized for CPU runs on small images.

``images (B, H, W, C)`` -> non-overlapping ``p x p`` patch embedding (an ``nn.Conv`` with kernel =
strides = ``p``, ``VALID`` padding: ``(B, H/p, W/p, D)``) -> ``+ pos_embedding`` (learned absolute
positions, ``N(0, 0.02^2)``) -> dropout -> ``num_layers`` pre-LayerNorm blocks -> LayerNorm ->
pooling (mean over the tokens, or the class token) -> ``Dense(num_classes)``.

Each block::

  x = x + Dropout(MHSA(LayerNorm(x)))                     # content (q.k) attention, H heads
  x = x + Dropout(Dense(D)(gelu_exact(Dense(mlp_dim)(LayerNorm(x)))))

The attention is the library's :class:`attnconv.layers.MultiHeadRelativeAttention` with
``encoding="content"`` (``qk_features = value_features = D / H``, ``out_features = D``), which is
a standard multi-head self-attention layer (parameters ``query``/``key``/``value`` kernels
``(D, H, D/H)``, ``out`` kernel ``(H, D/H, D)``, all with biases) that sows its probabilities as
``('intermediates', 'attention_probs')``, shape ``(B, H, N, N)``:

* ``pool="mean"`` (default): the layer runs on the 2-D token grid ``(B, H/p, W/p, D)``; the
  tokens are ordered row-major, so the library's grid analyses (attention distances) apply.
* ``pool="cls"``: a learned class token is prepended and the same layer runs on the 1-D token
  sequence ``(B, N + 1, D)`` (token 0 is the class token; content attention has no positional
  term, so grid and sequence give the same output). The sown maps are ``(B, H, N + 1, N + 1)``.

Parameters (``D`` hidden, ``M`` mlp, ``L`` layers, ``K`` classes, ``N = HW / p^2`` tokens,
``t = 1`` with the class token else 0)::

  p^2 C D + D  +  (N + t) D  +  t D  +  L (4 D^2 + 4 D + 2 M D + M + D + 4 D)  +  2 D  +  D K + K

With the defaults (p = 4, D = 64, L = 4, H = 4, M = 128, K = 10): 141,898 on 32x32x3 and
138,890 on 28x28x1 images.

Initialisation as the reference implementation where it matters for small runs: Xavier-uniform
attention and MLP kernels, zero biases, ``N(0, 0.02^2)`` position embeddings and class token;
Flax defaults for the patch embedding and the classifier.

References:
  Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at
  Scale", ICLR 2021.
  Cordonnier, Loukas & Jaggi, "On the Relationship between Self-Attention and Convolutional
  Layers", ICLR 2020.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnconv.layers import MultiHeadRelativeAttention

Array = jax.Array

__all__ = ["ENCODINGS", "NORMS", "POOLS", "ViT", "ViTBlock"]

POOLS = ("mean", "cls")
NORMS = ("pre", "post")
ENCODINGS = ("content", "gpsa", "quadratic", "quadratic_content", "learned", "learned_content")


def _check_positive(name: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name}: expected a positive integer, got {value!r}")


def _check_rate(name: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
    raise ValueError(f"{name}: expected a float in [0, 1), got {value!r}")


class ViTBlock(nn.Module):
  """One pre-LayerNorm transformer block (Dosovitskiy et al., 2021, Eqs. 2-3).

  Works on any token layout ``(B, *tokens, D)`` the attention layer accepts (1-3 token axes).

  Attributes:
    num_heads: attention heads ``H`` (must divide ``hidden_size``).
    hidden_size: token width ``D``.
    mlp_dim: hidden width of the MLP.
    dropout_rate: dropout after the attention and after the MLP.
    attention_dropout_rate: dropout on the attention probabilities.
    encoding: an encoding of :class:`attnconv.layers.MultiHeadRelativeAttention`: ``"content"``
      (ViT), ``"gpsa"`` (ConViT's gated positional self-attention), ``"quadratic"`` (Eq. 9),
      ``"learned_content"``, ... (every encoding but ``"content"`` needs a token grid).
    norm: ``"pre"`` (ViT: LayerNorm before attention and MLP) or ``"post"`` (BERT and the
      paper's network: LayerNorm after each residual sum).
    locality_strength: ConViT's local initialisation of the quadratic-family centres (``None``:
      random, ``N(0, center_init_std^2)``).
    center_init_std: standard deviation of random centres (quadratic family).
    dtype: computation dtype (``None``: inferred).
    param_dtype: parameter dtype.
  """

  num_heads: int = 4
  hidden_size: int = 64
  mlp_dim: int = 128
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  encoding: str = "content"
  norm: str = "pre"
  locality_strength: float | None = None
  center_init_std: float = 2.0
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    """``(B, *tokens, D) -> (B, *tokens, D)``."""
    d, h = self.hidden_size, self.num_heads
    layer_norm = lambda name: nn.LayerNorm(  # noqa: E731
      dtype=self.dtype, param_dtype=self.param_dtype, name=name
    )
    pre = self.norm == "pre"
    norm_in = lambda name, y: layer_norm(name)(y) if pre else y  # noqa: E731
    norm_out = lambda name, y: y if pre else layer_norm(name)(y)  # noqa: E731
    dense = lambda features, name: nn.Dense(  # noqa: E731
      features,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=nn.initializers.xavier_uniform(),
      name=name,
    )
    y = MultiHeadRelativeAttention(
      num_heads=h,
      encoding=self.encoding,
      locality_strength=self.locality_strength,
      center_init_std=self.center_init_std,
      qk_features=d // h,
      value_features=d // h,
      out_features=d,
      dropout_rate=self.attention_dropout_rate,
      kernel_init=nn.initializers.xavier_uniform(),
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="attention",
    )(norm_in("attention_norm", x), deterministic=not train)
    x = norm_out("attention_norm", x + nn.Dropout(self.dropout_rate, deterministic=not train)(y))
    y = dense(self.mlp_dim, "mlp_in")(norm_in("mlp_norm", x))
    y = dense(d, "mlp_out")(nn.gelu(y, approximate=False))
    return norm_out("mlp_norm", x + nn.Dropout(self.dropout_rate, deterministic=not train)(y))


class ViT(nn.Module):
  """Vision Transformer classifier (see the module docstring).

  Attributes:
    num_classes: number of classes ``K``.
    patch_size: side ``p`` of the square non-overlapping patches (must divide the image sides).
    hidden_size: token width ``D``.
    num_layers: number of transformer blocks ``L``.
    num_heads: attention heads ``H`` (must divide ``hidden_size``).
    mlp_dim: hidden width ``M`` of the MLPs.
    pool: ``"mean"`` (average of the output tokens) or ``"cls"`` (a learned class token).
    encoding: the attention of every block after the first ``gpsa_layers``: ``"content"`` (the
      plain ViT) or any other encoding of :class:`attnconv.layers.MultiHeadRelativeAttention`
      (``"quadratic"``, ``"learned_content"``, ``"gpsa"``, ...: the shared backbone on which
      the convolutional priors differ only in the attention; positional encodings need
      ``pool="mean"``).
    norm: ``"pre"`` (ViT) or ``"post"`` (the paper's network) LayerNorm placement; ``"post"``
      drops the final LayerNorm.
    pos_embedding: add the learned absolute position embedding (ViT, ConViT).
    gpsa_layers: the first this many blocks use GPSA on the token grid (ConViT, d'Ascoli et al.
      2021); with ``pool="cls"`` the class token joins after them, as in ConViT, and the
      position embedding covers the patch tokens only. 0: every block uses ``encoding``.
    locality_strength: ConViT's local initialisation of the GPSA blocks (``None``: random
      centres).
    center_init_std: standard deviation of random centres (``encoding="quadratic"``, or GPSA
      without local initialisation; the paper: 2 tokens).
    dropout_rate: dropout on the embeddings and after each attention and MLP.
    attention_dropout_rate: dropout on the attention probabilities.
    dtype: computation dtype (e.g. ``jnp.bfloat16``); logits are returned in float32.
    param_dtype: parameter dtype.
  """

  num_classes: int = 10
  patch_size: int = 4
  hidden_size: int = 64
  num_layers: int = 4
  num_heads: int = 4
  mlp_dim: int = 128
  pool: str = "mean"
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  encoding: str = "content"
  norm: str = "pre"
  pos_embedding: bool = True
  gpsa_layers: int = 0
  locality_strength: float | None = 1.0
  center_init_std: float = 2.0
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def _check(self, images: Array) -> None:
    for name in ("num_classes", "patch_size", "hidden_size", "num_layers", "num_heads", "mlp_dim"):
      _check_positive(name, getattr(self, name))
    _check_rate("dropout_rate", self.dropout_rate)
    _check_rate("attention_dropout_rate", self.attention_dropout_rate)
    if self.hidden_size % self.num_heads:
      raise ValueError(
        f"hidden_size: expected a multiple of num_heads={self.num_heads}, got {self.hidden_size}"
      )
    if self.pool not in POOLS:
      raise ValueError(f"pool: expected one of {POOLS}, got {self.pool!r}")
    if self.norm not in NORMS:
      raise ValueError(f"norm: expected one of {NORMS}, got {self.norm!r}")
    if self.encoding not in ENCODINGS:
      raise ValueError(f"encoding: expected one of {ENCODINGS}, got {self.encoding!r}")
    if self.encoding != "content" and self.pool == "cls":
      raise ValueError(
        f"pool: expected 'mean' with the positional encoding {self.encoding!r} (a class token "
        f"has no grid position), got 'cls'"
      )
    if not hasattr(images, "ndim"):
      raise TypeError(f"images: expected an array, got {type(images).__name__}")
    if images.ndim != 4:
      raise ValueError(
        f"images: expected a rank-4 (batch, height, width, channels) array, got shape "
        f"{images.shape}"
      )
    p = self.patch_size
    if images.shape[1] % p or images.shape[2] % p:
      raise ValueError(
        f"images: expected height and width divisible by patch_size={p}, got shape {images.shape}"
      )

  @nn.compact
  def __call__(self, images: Array, train: bool = False) -> Array:
    """Classifies ``images (B, H, W, C)`` into logits ``(B, num_classes)`` (float32)."""
    self._check(images)
    p, d = self.patch_size, self.hidden_size
    x = images.astype(self.dtype or jnp.result_type(images.dtype, jnp.float32))
    x = nn.Conv(
      d,
      (p, p),
      strides=(p, p),
      padding="VALID",
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="patch_embedding",
    )(x)
    b, gh, gw, _ = x.shape
    cls = self.pool == "cls"
    top = self.num_layers - 1 if cls else self.num_layers  # the class token needs a block
    if not 0 <= self.gpsa_layers <= top:
      raise ValueError(f"gpsa_layers: expected 0 to {top}, got {self.gpsa_layers}")
    if cls and self.gpsa_layers == 0:
      token = self.param("cls_token", nn.initializers.normal(0.02), (d,), self.param_dtype)
      token = jnp.broadcast_to(token.astype(x.dtype)[None, None], (b, 1, d))
      x = jnp.concatenate([token, x.reshape(b, gh * gw, d)], axis=1)
    if self.pos_embedding:
      pos = self.param(
        "pos_embedding", nn.initializers.normal(0.02), x.shape[1:], self.param_dtype
      ).astype(x.dtype)
      x = x + pos[None]
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    for i in range(self.num_layers):
      gpsa = i < self.gpsa_layers
      if cls and i == self.gpsa_layers > 0:  # ConViT: the class token joins after the GPSA blocks
        token = self.param("cls_token", nn.initializers.normal(0.02), (d,), self.param_dtype)
        token = jnp.broadcast_to(token.astype(x.dtype)[None, None], (b, 1, d))
        x = jnp.concatenate([token, x.reshape(b, gh * gw, d)], axis=1)
      x = ViTBlock(
        num_heads=self.num_heads,
        hidden_size=d,
        mlp_dim=self.mlp_dim,
        dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate,
        encoding="gpsa" if gpsa else self.encoding,
        norm=self.norm,
        locality_strength=self.locality_strength if gpsa or self.encoding == "gpsa" else None,
        center_init_std=self.center_init_std,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=f"block_{i}",
      )(x, train)
    if self.norm == "pre":
      x = nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="final_norm")(x)
    x = x[:, 0] if cls else jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(
      self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="classifier"
    )(x)
    return logits.astype(jnp.float32)
