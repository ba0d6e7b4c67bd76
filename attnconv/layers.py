"""Thin Flax modules: parameters are created here, the math lives in encodings.py / attention.py.

:class:`MultiHeadRelativeAttention` is the multi-head self-attention layer of Cordonnier et al.
(2020) on a 1-, 2- or 3-D grid of tokens, with a relative positional encoding chosen by
``encoding``:

``'quadratic'``      Eq. 9, per head a centre ``Delta_h`` and sharpness ``alpha_h``; position only.
``'generalized'``    ``-1/2 (delta - Delta)^T A A^T (delta - Delta)``; position only.
``'learned'``        learned per-axis (row/column) relative tables projected per head; position only.
``'learned_content'`` content ``q.k / sqrt(D_k)`` plus ``q.r`` against the learned tables.
``'content'``        content ``q.k / sqrt(D_k)`` only (no positions: permutation-equivariant).
``'quadratic_content'`` content ``q.k / sqrt(D_k)`` plus the Eq. 9 logits ``-alpha_h ||delta -
                     Delta_h||^2``; with ``W_qry = 0`` it is the quadratic layer, so a converted
                     convolution (Theorem 1) can be fine-tuned with content switched on. Works on
                     convolution-style grids too (queries read the key grid at their centres).

The output is ``MHSA(X)_q = sum_h (sum_k P_h[q, k] V_h[k]) W_out^(h) + b_out``; by default
(``value_features=None``) every head aggregates the full input (``V_h = X``, ``D_h = D_in``), the
paper's advice for exact re-parametrisation, and ``W_out`` has shape ``(H, D_in, D_out)``
(``DenseGeneral`` layout, parameter ``out``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attnconv import attention as attn
from attnconv import encodings as enc
from attnconv import matmul as mm
from attnconv import normalization
from attnconv import rng as rng_lib

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

ENCODINGS = (
  "quadratic",
  "generalized",
  "learned",
  "learned_content",
  "content",
  "quadratic_content",
)
POSITION_ONLY = ("quadratic", "generalized", "learned")
IMPLEMENTATIONS = ("dense", "separable", "gather")


def _tuple(name: str, value, d: int) -> tuple[int, ...]:
  if isinstance(value, (int, np.integer)):
    out = (value,) * d
  elif isinstance(value, (tuple, list)):
    out = tuple(value)
  else:
    raise TypeError(f"{name}: expected an int or {d} ints, got {value!r}")
  if len(out) != d or any(not isinstance(v, (int, np.integer)) for v in out):
    raise TypeError(f"{name}: expected an int or {d} ints, got {value!r}")
  return tuple(int(v) for v in out)


def spread_init(std: float = 0.01) -> Initializer:
  """Spreads ``1 + N(0, std^2)`` (isotropic) or ``I + N(0, std^2)`` (factor ``A`` of Sigma^-1)."""

  def init(key, shape, dtype=jnp.float32):
    noise = std * jax.random.normal(key, shape, dtype)
    if len(shape) == 1:
      return 1.0 + noise
    return jnp.eye(shape[-1], dtype=dtype) + noise

  return init


def _affine(x: Array, kernel: Array, bias: Array | None, dtype, precision) -> Array:
  """``x @ kernel (+ bias)`` over ``x``'s last axis and ``kernel``'s first, in the promoted
  ``dtype``: the product through :func:`attnconv.matmul.dot_general`, the bias through
  :func:`attnconv.matmul.add_bias` (:class:`Dense`, :class:`DenseHeads`)."""
  x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=dtype)
  y = mm.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)
  return y if bias is None else mm.add_bias(y, bias)


class Dropout(nn.Module):
  """``flax.linen.Dropout`` with the same fields, call signature, key and output, bit for bit;
  the mask comes from :func:`attnconv.rng.bernoulli` (one fused pass instead of JAX's rolled
  Threefry loop on the CPU).

  Attributes:
    rate: the probability of dropping an entry (not the keep rate).
    broadcast_dims: axes that share one mask entry.
    deterministic: if true the inputs are returned unchanged.
    rng_collection: the rng collection the key is drawn from.
  """

  rate: float
  broadcast_dims: Sequence[int] = ()
  deterministic: bool | None = None
  rng_collection: str = "dropout"

  @nn.compact
  def __call__(
    self, inputs: Array, deterministic: bool | None = None, rng: Array | None = None
  ) -> Array:
    """``inputs`` (any shape) with entries zeroed with probability ``rate``, the rest scaled by
    ``1 / (1 - rate)``; unchanged when deterministic."""
    deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
    if self.rate == 0.0 or deterministic:
      return inputs
    if self.rate == 1.0:
      return jnp.zeros_like(inputs)
    keep_prob = 1.0 - self.rate
    if rng is None:
      rng = self.make_rng(self.rng_collection)
    shape = list(inputs.shape)
    for dim in self.broadcast_dims:
      shape[dim] = 1
    keep = jnp.broadcast_to(rng_lib.bernoulli(rng, keep_prob, shape), inputs.shape)
    return jax.lax.select(keep, inputs / keep_prob, jnp.zeros_like(inputs))


class Dense(nn.Module):
  """``flax.linen.Dense`` with the same fields, parameters (``kernel`` ``(D_in, features)``,
  ``bias`` ``(features,)``) and initialisation, the product through
  :func:`attnconv.matmul.dot_general` and the bias through :func:`attnconv.matmul.add_bias`.

  In bfloat16 on the CPU, ``nn.Dense``'s bias gradient is a sum that XLA fuses into the
  optimiser update as a strided loop (~6 ms at 6400 x 512 entries); ``add_bias`` keeps it a
  vectorised float32 reduction. Elsewhere it computes what ``nn.Dense`` computes.

  ``(..., D_in) -> (..., features)``.
  """

  features: int
  use_bias: bool = True
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  precision: Any = None
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
    bias = None
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
    return _affine(x, kernel, bias, self.dtype, self.precision)


class LayerNorm(nn.Module):
  """``flax.linen.LayerNorm`` over the last axis (same parameters ``scale``, ``bias`` and
  initialisation; forward bitwise the same) through :func:`attnconv.normalization.layer_norm`,
  whose closed-form backward pass serves bfloat16 on the CPU.

  ``(..., D) -> (..., D)``.
  """

  epsilon: float = 1e-6
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  scale_init: Initializer = nn.initializers.ones_init()
  bias_init: Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    scale = self.param("scale", self.scale_init, (d,), self.param_dtype)
    bias = self.param("bias", self.bias_init, (d,), self.param_dtype)
    dtype = nn.dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype)
    return normalization.layer_norm(x, scale, bias, epsilon=self.epsilon, dtype=dtype)


class DenseHeads(nn.Module):
  """``nn.DenseGeneral(features=(H, D_h))`` on the last axis, with the same parameters (``kernel``
  ``(D_in, H, D_h)``, ``bias`` ``(H, D_h)``; initialised from the flattened ``(D_in, H D_h)`` /
  ``(H D_h,)`` shapes exactly as ``DenseGeneral`` does), the product through
  :func:`attnconv.matmul.dot_general` and the bias through :func:`attnconv.matmul.add_bias`
  (bfloat16 bias gradients summed in float32 instead of XLA:CPU's slow bfloat16 reduce-window).

  ``(..., D_in) -> (..., H, D_h)``.
  """

  features: tuple[int, int]
  use_bias: bool = True
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  precision: Any = None
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel, bias = self._params(x.shape[-1])
    return _affine(x, kernel, bias, self.dtype, self.precision)

  def _params(self, d_in: int) -> tuple[Array, Array | None]:
    """``kernel (D_in, H, D_h)`` and ``bias (H, D_h)`` (or None); call from a compact method."""
    h, dh = self.features
    kernel = self.param(
      "kernel",
      lambda rng, shape, dtype: self.kernel_init(rng, (d_in, h * dh), dtype).reshape(shape),
      (d_in, h, dh),
      self.param_dtype,
    )
    bias = None
    if self.use_bias:
      bias = self.param(
        "bias",
        lambda rng, shape, dtype: self.bias_init(rng, (h * dh,), dtype).reshape(shape),
        (h, dh),
        self.param_dtype,
      )
    return kernel, bias


class DenseHeadsParams(DenseHeads):
  """:class:`DenseHeads`'s parameters without the product: ``__call__(d_in)`` returns
  ``(kernel (D_in, H, D_h), bias (H, D_h) or None)``, created (same names, shapes and
  initialisation) under this module's name, for layers that use the kernel in another form
  (:func:`attnconv.encodings.content_logits_folded`)."""

  @nn.compact
  def __call__(self, d_in: int) -> tuple[Array, Array | None]:  # type: ignore[override]
    return self._params(int(d_in))


class MultiHeadRelativeAttention(nn.Module):
  """Multi-head self-attention with a relative positional encoding on a d-D grid (d in 1, 2, 3).

  Called on channels-last ``x`` of shape ``(batch, *spatial, features)``; returns
  ``(batch, *query_shape, out_features)``. By default keys and queries are all input positions.
  Convolution-style key grids are also expressible: ``padding`` pads the keys (``padding_mode``:
  zeros / circular / reflect), ``input_dilation`` interleaves zeros, and queries sit on the strided
  positions ``o * strides`` whose ``query_window`` fits in the key grid (see
  :func:`attnconv.attention.key_grid` and :func:`attnconv.attention.query_grid`).

  Position-only probabilities (no batch axis) are sown as ``('intermediates', 'attention_probs')``
  with shape ``(H, Nq, Nk)``; content probabilities as ``(B, H, Nq, Nk)``.

  Attributes:
    num_heads: number of heads ``H``.
    encoding: one of :data:`ENCODINGS`.
    out_features: ``D_out`` (default: input features).
    value_features: per-head value size ``D_h``; ``None`` aggregates the full input in every head.
    qk_features: per-head query/key size for content encodings (default: input features).
    rel_features: learned-table width ``P`` (default: input features for ``'learned'``, and
      ``qk_features / d`` for ``'learned_content'``, where the query is split across axes).
    max_distance: per-axis table size ``M`` (shifts ``|delta| < M``); default: the key grid size.
    hard: use the ``alpha -> infinity`` limit (one-hot attention) of the quadratic encoding.
    sharpness_param: ``'spread'`` (parameter ``spreads`` = s, ``alpha = s^2 / 2``, the authors'
      parametrisation) or ``'alpha'`` (parameter ``alpha`` directly).
    implementation: ``'dense'`` (softmax over all keys), ``'separable'`` (per-axis softmaxes;
      quadratic and learned encodings) or ``'gather'`` (hard quadratic only: shifted views).
    strides, padding, padding_mode, input_dilation, query_window: the key and query grids.
    dropout_rate: dropout on attention probabilities (independent mask per example).
    shared_dropout_mask: for position-only encodings, draw one attention-dropout mask per step,
      shared by the batch, instead of one per example: the probabilities keep no batch axis and
      the fused aggregation applies in training (a different, cheaper regulariser).
    use_dot_product_attention: for content encodings, compute ``softmax(q.k / sqrt(D_k) + bias) V``
      with :func:`jax.nn.dot_product_attention` (the positional logits as its ``bias``; JAX picks
      cuDNN's fused attention on GPUs where dtype and shapes allow, XLA otherwise) whenever the
      probabilities themselves are not needed (no attention dropout in training, not sowing) and
      the per-head value size equals ``qk_features`` (as the function requires).
    fold_key_projection: when the content probabilities are formed explicitly (attention
      dropout, sowing, or ``use_dot_product_attention=False``), score ``(q_h W_{k,h}^T) . x``
      instead of ``q_h . (x W_{k,h} + b_{k,h})``
      (:func:`attnconv.encodings.content_logits_folded`): the same probabilities, as the key
      bias only adds a per-query constant that the softmax removes (its gradient is then exactly
      zero), with per-image instead of per-(image, head) score products. The parameters are the
      same either way (``key/kernel``, ``key/bias``).
    center_init_std: centres are initialised ``N(0, std^2)`` per coordinate (paper: 2).
    spread_init_std: spreads are initialised ``1 + N(0, std^2)`` (paper: 0.01).
    use_bias: bias ``b_out``.
    dtype: computation dtype (``None``: from inputs and params); softmax runs in float32.
    param_dtype: parameter dtype.
    precision: precision of the contractions.
    kernel_init, bias_init, rel_init: initialisers of dense kernels, biases and tables.
  """

  num_heads: int
  encoding: str = "quadratic"
  out_features: int | None = None
  value_features: int | None = None
  qk_features: int | None = None
  rel_features: int | None = None
  max_distance: int | Sequence[int] | None = None
  hard: bool = False
  sharpness_param: str = "spread"
  implementation: str = "dense"
  strides: int | Sequence[int] = 1
  padding: str | Sequence[tuple[int, int]] | None = None
  padding_mode: str = "zeros"
  input_dilation: int | Sequence[int] = 1
  query_window: int | Sequence[int] = 1
  dropout_rate: float = 0.0
  shared_dropout_mask: bool = False
  use_dot_product_attention: bool = True
  fold_key_projection: bool = True
  center_init_std: float = 2.0
  spread_init_std: float = 0.01
  use_bias: bool = True
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  precision: Any = None
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros_init()
  rel_init: Initializer = nn.initializers.normal(1.0)

  # ------------------------------------------------------------------------------------------
  # validation and grids
  # ------------------------------------------------------------------------------------------

  def _validate(self, d: int) -> None:
    if not isinstance(self.num_heads, (int, np.integer)) or self.num_heads < 1:
      raise ValueError(f"num_heads: expected a positive int, got {self.num_heads!r}")
    if self.encoding not in ENCODINGS:
      raise ValueError(f"encoding: expected one of {ENCODINGS}, got {self.encoding!r}")
    if self.implementation not in IMPLEMENTATIONS:
      raise ValueError(
        f"implementation: expected one of {IMPLEMENTATIONS}, got {self.implementation!r}"
      )
    if self.implementation == "separable" and self.encoding not in ("quadratic", "learned"):
      raise ValueError(
        f"implementation: 'separable' needs encoding 'quadratic' or 'learned', got {self.encoding!r}"
      )
    if self.implementation == "gather" and not (self.encoding == "quadratic" and self.hard):
      raise ValueError(
        "implementation: 'gather' is the hard limit of the quadratic encoding; expected "
        f"encoding='quadratic' and hard=True, got encoding={self.encoding!r}, hard={self.hard}"
      )
    if self.hard and self.encoding != "quadratic":
      raise ValueError(f"hard: only the quadratic encoding has a hard limit, got {self.encoding!r}")
    if self.sharpness_param not in ("spread", "alpha"):
      raise ValueError(
        f"sharpness_param: expected 'spread' or 'alpha', got {self.sharpness_param!r}"
      )
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"dropout_rate: expected 0 <= rate < 1, got {self.dropout_rate}")
    for name in ("strides", "input_dilation", "query_window"):
      vals = _tuple(name, getattr(self, name), d)
      if any(v < 1 for v in vals):
        raise ValueError(f"{name}: expected positive integers, got {vals}")
    if self.encoding not in (*POSITION_ONLY, "quadratic_content"):
      moved = (
        self.padding is not None
        or _tuple("strides", self.strides, d) != (1,) * d
        or _tuple("input_dilation", self.input_dilation, d) != (1,) * d
        or _tuple("query_window", self.query_window, d) != (1,) * d
      )
      if moved:
        raise ValueError(
          f"encoding: content attention needs queries == keys (no padding, strides, input "
          f"dilation or query window), got encoding={self.encoding!r}"
        )

  def _padding(self, spatial_shape: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """Resolves ``padding`` (None, 'SAME', 'SAME_LOWER', 'VALID' or pairs) for an input grid."""
    d = len(spatial_shape)
    if self.padding is None:
      return ((0, 0),) * d
    if isinstance(self.padding, str):
      if self.padding == "VALID":
        return ((0, 0),) * d
      if self.padding not in ("SAME", "SAME_LOWER"):
        raise ValueError(
          f"padding: expected 'SAME', 'SAME_LOWER', 'VALID' or (low, high) pairs, got "
          f"{self.padding!r}"
        )
      dil = _tuple("input_dilation", self.input_dilation, d)
      strides = _tuple("strides", self.strides, d)
      window = _tuple("query_window", self.query_window, d)
      pads = []
      for n, ld, s, w in zip(spatial_shape, dil, strides, window):
        length = (n - 1) * ld + 1
        total = max((-(-length // s) - 1) * s + w - length, 0)
        lo = total // 2 if self.padding == "SAME" else total - total // 2
        pads.append((lo, total - lo))
      return tuple(pads)
    pads = tuple(self.padding)
    if len(pads) != d or any(not isinstance(p, (tuple, list)) or len(p) != 2 for p in pads):
      raise ValueError(f"padding: expected {d} (low, high) pairs, got {self.padding!r}")
    return tuple((int(lo), int(hi)) for lo, hi in pads)

  def _check_input(self, x: Array) -> int:
    if not hasattr(x, "ndim"):
      raise TypeError(f"x: expected an array, got {type(x).__name__}")
    d = x.ndim - 2
    if d not in (1, 2, 3):
      raise ValueError(
        f"x: expected rank 3, 4 or 5 (batch, 1-3 spatial axes, features), got shape {x.shape}"
      )
    for name in ("strides", "input_dilation", "query_window", "max_distance"):
      value = getattr(self, name)
      if isinstance(value, (tuple, list)) and len(value) != d:
        raise ValueError(
          f"x: expected rank {len(value) + 2} (batch, {len(value)} spatial axes, features) to "
          f"match {name}={tuple(value)}, got shape {x.shape}"
        )
    if self.padding is not None and not isinstance(self.padding, str) and len(self.padding) != d:
      raise ValueError(
        f"x: expected rank {len(self.padding) + 2} to match padding={self.padding!r}, got shape "
        f"{x.shape}"
      )
    self._validate(d)
    return d

  def _grids(self, x: Array):
    """Returns ``(keys (B, *key_shape, C), key_positions, query_positions)``."""
    d = x.ndim - 2
    pads = self._padding(x.shape[1:-1])
    keys, kpos = attn.key_grid(
      x,
      pads,
      mode=self.padding_mode,
      input_dilation=_tuple("input_dilation", self.input_dilation, d),
    )
    qpos = attn.query_grid(
      keys.shape[1:-1],
      pads,
      strides=_tuple("strides", self.strides, d),
      window=_tuple("query_window", self.query_window, d),
    )
    return keys, kpos, qpos

  def _static_grids(self, spatial_shape: Sequence[int]):
    """Key and query coordinates for an input grid, without data."""
    x = jnp.zeros((1, *spatial_shape, 1), jnp.float32)
    return self._grids(x)[1:]

  # ------------------------------------------------------------------------------------------
  # parameters
  # ------------------------------------------------------------------------------------------

  def _param(self, name: str, init: Initializer, shape: tuple[int, ...]) -> Array:
    """``self.param`` that also works in non-compact methods once the variables exist."""
    if self.has_variable("params", name):
      value = self.get_variable("params", name)
      if value.shape != tuple(shape):
        raise ValueError(f"{name}: expected a parameter of shape {tuple(shape)}, got {value.shape}")
      return value
    return self.param(name, init, shape, self.param_dtype)

  def _quadratic_params(self, d: int):
    centers = self._param(
      "centers", nn.initializers.normal(self.center_init_std), (self.num_heads, d)
    )
    if self.encoding == "generalized":
      factors = self._param("spreads", spread_init(self.spread_init_std), (self.num_heads, d, d))
      return centers, factors
    if self.sharpness_param == "alpha":
      alpha = self._param("alpha", spread_init(self.spread_init_std), (self.num_heads,))
    else:
      spreads = self._param("spreads", spread_init(self.spread_init_std), (self.num_heads,))
      alpha = 0.5 * spreads**2
    return centers, alpha

  def _tables(self, d: int, kpos, qpos, width: int):
    if self.max_distance is None:
      extent = [
        int(max(np.max(np.abs(np.asarray(k)[None, :] - np.asarray(q)[:, None])), 0)) + 1
        for q, k in zip(qpos, kpos)
      ]
    else:
      extent = list(_tuple("max_distance", self.max_distance, d))
    return [
      self._param(f"rel_table_{a}", self.rel_init, (2 * m - 1, width)) for a, m in enumerate(extent)
    ]

  # ------------------------------------------------------------------------------------------
  # position-only probabilities
  # ------------------------------------------------------------------------------------------

  def _position_terms(self, d: int, kpos, qpos, width: int):
    """Returns ('axis', [per-axis logits]) or ('full', logits) of the position-only encoding."""
    if self.encoding in ("quadratic", "quadratic_content"):
      centers, alpha = self._quadratic_params(d)
      if self.hard:
        # The limit does not depend on alpha > 0: use alpha = 1 for the logits.
        alpha = jnp.ones((self.num_heads,), jnp.float32)
      axis_logits = enc.quadratic_axis_logits(
        qpos, kpos, centers.astype(jnp.float32), alpha.astype(jnp.float32)
      )
      return "axis", axis_logits
    if self.encoding == "generalized":
      centers, factors = self._quadratic_params(d)
      return "full", enc.generalized_quadratic_logits(
        qpos, kpos, centers.astype(jnp.float32), factors.astype(jnp.float32)
      )
    # learned: per-axis tables of width P, projected per head
    tables = self._tables(d, kpos, qpos, width)
    heads = [
      self._param(f"rel_head_{a}", self.kernel_init, (width, self.num_heads)) for a in range(d)
    ]
    axis_logits = enc.learned_axis_logits(
      qpos, kpos, [t.astype(jnp.float32) for t in tables], [w.astype(jnp.float32) for w in heads]
    )
    return "axis", axis_logits

  def _normalize(self, logits: Array) -> Array:
    return attn.hard_attention(logits) if self.hard else attn.softmax(logits)

  def position_probabilities(self, spatial_shape: Sequence[int]) -> Array:
    """Position-only attention probabilities ``(H, Nq, Nk)`` for an input grid ``spatial_shape``.

    Use with ``module.apply(variables, spatial_shape, method=module.position_probabilities)``.
    """
    d = len(spatial_shape)
    self._validate(d)
    if self.encoding not in POSITION_ONLY:
      raise ValueError(f"encoding: {self.encoding!r} is content-dependent: no position-only map")
    kpos, qpos = self._static_grids(spatial_shape)
    width = self.rel_features or 1
    if self.has_variable("params", "rel_table_0"):
      width = int(self.get_variable("params", "rel_table_0").shape[1])
    kind, terms = self._position_terms(d, kpos, qpos, width)
    if kind == "axis":
      return attn.combine_axis_probs([self._normalize(t) for t in terms])
    return self._normalize(terms)

  def key_values(self, x: Array) -> Array:
    """The keys/values on the padded, input-dilated key grid, flattened: ``(B, Nk, C)``."""
    self._check_input(x)
    keys, _, _ = self._grids(x)
    return keys.reshape(keys.shape[0], -1, keys.shape[-1])

  def query_shape(self, spatial_shape: Sequence[int]) -> tuple[int, ...]:
    """The spatial shape of the output (query grid) for an input grid ``spatial_shape``."""
    self._validate(len(spatial_shape))
    _, qpos = self._static_grids(spatial_shape)
    return tuple(int(q.shape[0]) for q in qpos)

  def _out_params(self, heads_dim: int, out_features: int, x_shape: tuple[int, ...]):
    """The output projection ``out``: kernel ``(H, D_h, D_out)`` (DenseGeneral layout), bias.

    Existing variables are checked against the layer and the input (``x_shape``) first, so a
    mismatch names the argument instead of surfacing as flax's parameter-shape error.
    """

    def init(rng):
      k_rng, b_rng = jax.random.split(rng)
      flat = self.kernel_init(k_rng, (self.num_heads * heads_dim, out_features), self.param_dtype)
      params = {"kernel": flat.reshape(self.num_heads, heads_dim, out_features)}
      if self.use_bias:
        params["bias"] = self.bias_init(b_rng, (out_features,), self.param_dtype)
      return params

    expected = (self.num_heads, heads_dim, out_features)
    if self.has_variable("params", "out"):
      have = tuple(self.get_variable("params", "out")["kernel"].shape)
      if have[0] != self.num_heads:
        raise ValueError(
          f"num_heads: expected {have[0]} (the out kernel of the variables has shape {have}), "
          f"got {self.num_heads}"
        )
      if self.value_features is None and have[1] != heads_dim:
        raise ValueError(
          f"x: expected {have[1]} input features on the last axis, got shape {tuple(x_shape)}"
        )
      if have != expected:
        raise ValueError(
          f"x: expected inputs giving an out kernel of shape {expected} (heads, features, "
          f"out_features), but the parameters have {have}"
        )
    out = self.param("out", init)
    return out["kernel"], out.get("bias")

  # ------------------------------------------------------------------------------------------
  # forward
  # ------------------------------------------------------------------------------------------

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
    d = self._check_input(x)
    b = x.shape[0]
    in_features = x.shape[-1]
    out_features = self.out_features or in_features
    dtype = self.dtype or jnp.result_type(x.dtype, self.param_dtype)
    x = x.astype(dtype)

    keys, kpos, qpos = self._grids(x)
    key_shape = keys.shape[1:-1]
    q_shape = tuple(int(q.shape[0]) for q in qpos)
    keys_flat = keys.reshape(b, -1, in_features)

    heads_dim = in_features if self.value_features is None else self.value_features
    kernel, bias = self._out_params(heads_dim, out_features, x.shape)
    if self.value_features is None:
      values = keys_flat
    else:
      values = DenseHeads(
        (self.num_heads, self.value_features),
        dtype=dtype,
        param_dtype=self.param_dtype,
        kernel_init=self.kernel_init,
        bias_init=self.bias_init,
        precision=self.precision,
        name="value",
      )(keys_flat)

    use_dropout = self.dropout_rate > 0.0 and not deterministic
    sow = self.is_mutable_collection("intermediates")
    kernel = kernel.astype(dtype)
    y = None  # (B, Nq, D_out) when a fused path computes the projection itself

    if self.encoding in POSITION_ONLY:
      kind, terms = self._position_terms(d, kpos, qpos, self.rel_features or in_features)
      shared = use_dropout and self.shared_dropout_mask
      fused = self.value_features is None and (not use_dropout or shared)
      if self.implementation == "gather":
        if self.value_features is not None:
          raise ValueError(
            f"value_features: 'gather' reads the input directly; expected None, got "
            f"{self.value_features}"
          )
        centers = self.get_variable("params", "centers")
        y = attn.gather_project(keys, kpos, qpos, centers, kernel, precision=self.precision)
        if sow:
          self.sow(
            "intermediates",
            "attention_probs",
            attn.combine_axis_probs([self._normalize(t) for t in terms]),
          )
      elif kind == "axis" and self.implementation == "separable" and not use_dropout:
        axis_probs = [self._normalize(t).astype(dtype) for t in terms]
        if sow:
          self.sow("intermediates", "attention_probs", attn.combine_axis_probs(axis_probs))
        if fused:
          y = attn.aggregate_project_separable(
            axis_probs, values, key_shape, kernel, precision=self.precision
          )
        else:
          heads = attn.aggregate_separable(axis_probs, values, key_shape, precision=self.precision)
      else:
        if kind == "axis":
          probs = attn.combine_axis_probs([self._normalize(t) for t in terms])
        else:
          probs = self._normalize(terms)
        if sow:
          self.sow("intermediates", "attention_probs", probs)
        probs = probs.astype(dtype)
        if use_dropout:
          probs = attn.dropout_probs(
            self.make_rng("dropout"), probs, self.dropout_rate, None if shared else b
          )
        if fused:
          y = attn.aggregate_project(probs, values, kernel, precision=self.precision)
        else:
          heads = attn.aggregate(probs, values, precision=self.precision)
    else:
      dk = self.qk_features or in_features
      dense = lambda name, cls=DenseHeads: cls(  # noqa: E731
        (self.num_heads, dk),
        dtype=dtype,
        param_dtype=self.param_dtype,
        kernel_init=self.kernel_init,
        bias_init=self.bias_init,
        precision=self.precision,
        name=name,
      )
      if self.encoding == "quadratic_content":
        # Queries read the key grid at their own coordinates (the centre of their window).
        # The rows are arithmetic progressions start + stride * i: a strided slice (no gather).
        index = [slice(None)]
        for q, k in zip(qpos, kpos):
          rows = np.asarray(q) - np.asarray(k)[0]
          step = int(rows[1] - rows[0]) if rows.size > 1 else 1
          index.append(slice(int(rows[0]), int(rows[-1]) + 1, step))
        q_in = keys[tuple(index)].reshape(b, -1, in_features)
      else:
        q_in = keys_flat
      q = dense("query")(q_in)
      fused_dpa = self.use_dot_product_attention and not use_dropout and not sow and heads_dim == dk
      if fused_dpa or not self.fold_key_projection:
        k = dense("key")(keys_flat)
      else:  # the same key/kernel and key/bias parameters, the kernel used by the folded scores
        key_kernel, _ = dense("key", DenseHeadsParams)(in_features)
      extra = None  # positional logits added to the content scores
      if self.encoding == "learned_content":
        if dk % d:
          raise ValueError(
            f"qk_features: expected a multiple of the number of axes {d} (the query is split "
            f"across axes for q.r), got {dk}"
          )
        width = self.rel_features or dk // d
        if width * d != dk:
          raise ValueError(f"rel_features: expected qk_features / d = {dk // d}, got {width}")
        tables = self._tables(d, kpos, qpos, width)
        rel = enc.relative_embeddings(qpos, kpos, [t.astype(dtype) for t in tables])
        extra = enc.query_relative_logits(q, q_shape, rel, out_dtype=jnp.float32)
      if self.encoding == "quadratic_content":
        _, axis_logits = self._position_terms(d, kpos, qpos, width=1)
        extra = enc.combine_axis_logits(axis_logits)[None]
      if fused_dpa:
        # Fused path: the (B, H, Nq, Nk) probabilities are never returned (flash attention on
        # GPU). Heads share the full input as values unless value_features is set.
        v = values
        if self.value_features is None:
          v = jnp.broadcast_to(
            values[:, :, None, :], (*values.shape[:2], self.num_heads, in_features)
          )
        heads = jax.nn.dot_product_attention(q, k, v.astype(q.dtype), bias=extra)
      else:
        if self.fold_key_projection:
          logits = enc.content_logits_folded(
            q, keys_flat, key_kernel, out_dtype=jnp.float32, precision=self.precision
          )
        else:
          logits = enc.content_logits(q, k, out_dtype=jnp.float32)
        if extra is not None:
          logits = logits + extra
        probs = attn.softmax(logits)
        if sow:
          self.sow("intermediates", "attention_probs", probs)
        probs = probs.astype(dtype)
        if use_dropout:
          probs = attn.dropout_probs(self.make_rng("dropout"), probs, self.dropout_rate, b)
        heads = attn.aggregate(probs, values, precision=self.precision)

    if y is None:
      # (B, Nq, H, C) @ (H C, D): one product over heads and channels (attnconv.matmul).
      hb, hq, hh, hc = heads.shape
      y = mm.matmul(
        heads.reshape(hb, hq, hh * hc), kernel.reshape(hh * hc, -1), precision=self.precision
      )
    if bias is not None:
      y = mm.add_bias(y, bias.astype(dtype))
    return y.reshape((b, *q_shape, out_features))
