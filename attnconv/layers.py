"""The multi-head self-attention layer with relative positional encodings: a thin Flax module.

:class:`MultiHeadRelativeAttention` creates the parameters and calls the math:
:mod:`attnconv.grids` (where keys and queries sit), :mod:`attnconv.encodings` (the scores, one
function per equation) and :func:`attnconv.attention.relative_attention` (the MHSA equation).

``encoding`` picks the scores (Cordonnier et al., 2020):

=======================  ==========================================================  ==========
encoding                 scores                                                      parameters
=======================  ==========================================================  ==========
``'quadratic'``          Eq. 9, ``-alpha_h ||delta - Delta_h||^2``                    ``centers``, ``spreads`` or ``alpha``
``'generalized'``        ``-1/2 (delta - Delta_h)^T A_h A_h^T (delta - Delta_h)``     ``centers``, ``spreads`` (H, d, d)
``'learned'``            per-axis learned tables, one vector per head                 ``rel_table_a``, ``rel_head_a``
``'learned_content'``    ``q.k / sqrt(D_k)`` + ``q.r_delta / sqrt(D_k)``                ``query``, ``key``, ``rel_table_a``
``'content'``            ``q.k / sqrt(D_k)`` (no positions)                           ``query``, ``key``
``'quadratic_content'``  ``q.k / sqrt(D_k)`` + Eq. 9                                  both
``'gpsa'``               gated: ``(1 - s) softmax(q.k) + s softmax(Eq. 9)``, ``s = sigmoid(gate)``  both, ``gate``
=======================  ==========================================================  ==========

Every layer has the output projection ``out`` (``kernel (H, D_h, D_out)`` in
``flax.linen.DenseGeneral`` layout, ``bias (D_out,)``). By default (``value_features=None``) every
head aggregates the full input (``V_h = X``), the paper's choice for exact re-parametrisation;
otherwise a ``value`` projection ``DenseGeneral((H, D_h))``.
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
from attnconv import grids

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
  "gpsa",
)
POSITION_ONLY = ("quadratic", "generalized", "learned")
IMPLEMENTATIONS = attn.IMPLEMENTATIONS


def spread_init(std: float = 0.01) -> Initializer:
  """Spreads ``1 + N(0, std^2)`` (isotropic) or ``I + N(0, std^2)`` (the factor ``A``)."""

  def init(key, shape, dtype=jnp.float32):
    noise = std * jax.random.normal(key, shape, dtype)
    return (
      1.0 if len(shape) == 1 else jnp.broadcast_to(jnp.eye(shape[-1], dtype=dtype), shape)
    ) + noise

  return init


def constant(value: float) -> Initializer:
  """An initialiser filling the parameter with ``value``."""
  return lambda key, shape, dtype=jnp.float32: jnp.full(shape, value, dtype)


def local_centers(key: Array, shape: tuple[int, int], dtype=jnp.float32) -> Array:
  """ConViT's local initialisation: the ``H = m^d`` centres on the ``m``-wide lattice centred on
  the query (``m = 3``: the shifts of a 3x3 kernel), in row-major order."""
  del key
  h, d = shape
  m = round(h ** (1 / d))
  if m**d != h:
    raise ValueError(f"num_heads: expected a {d}-th power for local centres, got {h}")
  grid = np.stack(np.meshgrid(*[np.arange(m)] * d, indexing="ij"), -1).reshape(h, d)
  return jnp.asarray(grid - (m - 1) / 2, dtype)


def check_input(layer: MultiHeadRelativeAttention, x: Array) -> int:
  """The number of spatial axes of ``x``; raises ValueError naming ``x`` or the layer's first
  invalid field."""
  if not hasattr(x, "ndim"):
    raise TypeError(f"x: expected an array, got {type(x).__name__}")
  if x.ndim not in (3, 4, 5):
    raise ValueError(
      f"x: expected rank 3, 4 or 5 (batch, 1-3 spatial axes, features), got shape {x.shape}"
    )
  d = x.ndim - 2
  for name in ("strides", "input_dilation", "query_window", "max_distance", "padding"):
    value = getattr(layer, name)
    if isinstance(value, (tuple, list)) and len(value) != d:
      raise ValueError(
        f"x: expected rank {len(value) + 2} (batch, {len(value)} spatial axes, features) to match "
        f"{name}={tuple(value)}, got shape {x.shape}"
      )
  check_config(layer, d)
  dk = layer.qk_features or x.shape[-1]
  if layer.encoding == "learned_content" and (dk % d or (layer.rel_features or dk // d) * d != dk):
    raise ValueError(
      f"qk_features: expected rel_features * {d} (the query is split across axes for q.r), got "
      f"qk_features={dk}, rel_features={layer.rel_features}"
    )
  return d


def check_config(layer: MultiHeadRelativeAttention, d: int) -> None:
  """Raises ValueError/TypeError naming the first field of ``layer`` that is invalid for a
  ``d``-dimensional input."""
  if isinstance(layer.num_heads, bool) or not isinstance(layer.num_heads, (int, np.integer)):
    raise ValueError(f"num_heads: expected a positive int, got {layer.num_heads!r}")
  checks = [
    ("num_heads", layer.num_heads >= 1, "a positive int"),
    ("encoding", layer.encoding in ENCODINGS, f"one of {ENCODINGS}"),
    ("implementation", layer.implementation in IMPLEMENTATIONS, f"one of {IMPLEMENTATIONS}"),
    ("sharpness_param", layer.sharpness_param in ("spread", "alpha"), "'spread' or 'alpha'"),
    ("dropout_rate", 0.0 <= layer.dropout_rate < 1.0, "0 <= rate < 1"),
    ("padding_mode", layer.padding_mode in grids.PADDING_MODES, f"one of {grids.PADDING_MODES}"),
    ("hard", not layer.hard or layer.encoding == "quadratic", "False unless encoding='quadratic'"),
    ("locality_strength", (layer.locality_strength or 1.0) > 0, "None or a float > 0"),
  ]
  for name, ok, expected in checks:
    if not ok:
      raise ValueError(f"{name}: expected {expected}, got {getattr(layer, name)!r}")
  if layer.implementation == "separable" and layer.encoding not in ("quadratic", "learned"):
    raise ValueError(
      f"implementation: 'separable' needs encoding 'quadratic' or 'learned', got {layer.encoding!r}"
    )
  if layer.implementation == "gather" and not (layer.hard and layer.value_features is None):
    raise ValueError(
      f"implementation: 'gather' is the hard limit of the quadratic encoding on "
      f"the input; expected hard=True and value_features=None, got hard="
      f"{layer.hard}, value_features={layer.value_features}"
    )
  steps = [
    grids.as_tuple(n, getattr(layer, n), d) for n in ("strides", "input_dilation", "query_window")
  ]
  moved = layer.padding is not None or any(t != (1,) * d for t in steps)
  if moved and layer.encoding in ("content", "learned_content"):
    raise ValueError(
      f"encoding: content attention needs queries == keys (no padding, strides, "
      f"input dilation or query window), got encoding={layer.encoding!r}"
    )


def check_out_kernel(
  layer: MultiHeadRelativeAttention, have: tuple, want: tuple, x_shape: tuple
) -> None:
  """Raises ValueError naming ``num_heads`` or ``x`` when the variables' out kernel (``have``)
  does not fit the layer and the input of shape ``x_shape`` (``want``; both ``(H, D_h, D_out)``)."""
  if have[0] != want[0]:
    raise ValueError(
      f"num_heads: expected {have[0]} (the out kernel of the variables has shape {have}), got "
      f"{want[0]}"
    )
  if layer.value_features is None and have[1] != want[1]:
    raise ValueError(f"x: expected {have[1]} input features on the last axis, got shape {x_shape}")
  if have != want:
    raise ValueError(
      f"x: expected inputs giving an out kernel of shape {have}, got {want} from shape {x_shape}"
    )


def out_params(
  layer: MultiHeadRelativeAttention, heads_dim: int, out_features: int, x_shape: tuple
) -> tuple[Array, Array | None]:
  """The output projection ``out`` of ``layer``: kernel ``(H, D_h, D_out)`` (initialised as
  ``DenseGeneral`` over both axes) and bias ``(D_out,)`` or None; call from the layer."""
  want = (layer.num_heads, heads_dim, out_features)
  if layer.has_variable("params", "out"):
    have = tuple(layer.get_variable("params", "out")["kernel"].shape)
    check_out_kernel(layer, have, want, tuple(x_shape))

  def init(rng):
    k_rng, b_rng = jax.random.split(rng)
    flat = layer.kernel_init(k_rng, (want[0] * heads_dim, out_features), layer.param_dtype)
    out = {"kernel": flat.reshape(want)}
    if layer.use_bias:
      out["bias"] = layer.bias_init(b_rng, (out_features,), layer.param_dtype)
    return out

  out = layer.param("out", init)
  return out["kernel"], out.get("bias")


def layer_grids(layer: MultiHeadRelativeAttention, spatial_shape: Sequence[int]):
  """``(padding, key_positions, query_positions)`` of ``layer`` for an input grid (static)."""
  d = len(spatial_shape)
  dilation, strides, window = (
    grids.as_tuple(n, getattr(layer, n), d) for n in ("input_dilation", "strides", "query_window")
  )
  pads = grids.resolve_padding(
    layer.padding, spatial_shape, strides=strides, input_dilation=dilation, window=window
  )
  kpos = grids.key_positions(spatial_shape, pads, input_dilation=dilation)
  qpos = grids.query_grid([k.shape[0] for k in kpos], pads, strides=strides, window=window)
  return pads, kpos, qpos


def heads_dense(
  layer: MultiHeadRelativeAttention, features: int, dtype: Dtype, name: str
) -> nn.DenseGeneral:
  """``flax.linen.DenseGeneral((H, features))`` with the layer's initialisers and precision: the
  ``query``/``key``/``value`` projections, kernel ``(C, H, features)``."""
  return nn.DenseGeneral(
    (layer.num_heads, features),
    dtype=dtype,
    param_dtype=layer.param_dtype,
    precision=layer.precision,
    kernel_init=layer.kernel_init,
    bias_init=layer.bias_init,
    name=name,
  )


class MultiHeadRelativeAttention(nn.Module):
  """Multi-head self-attention with a relative positional encoding on a d-D grid (d in 1, 2, 3).

  Called on channels-last ``x (B, *spatial, C)``, returns ``(B, *query_shape, out_features)``.
  Keys are the input positions, or a convolution's key grid: ``padding`` (None, 'SAME',
  'SAME_LOWER', 'VALID' or pairs; ``padding_mode`` zeros / circular / reflect) and
  ``input_dilation``; queries sit at the centres of the ``query_window``-wide windows at
  ``strides`` (:mod:`attnconv.grids`). The probabilities are sown as ``('intermediates',
  'attention_probs')``: ``(H, Nq, Nk)`` when position-only, else ``(B, H, Nq, Nk)``; sowing never
  changes the computation of the output.

  Attributes:
    num_heads: ``H``.
    encoding: one of :data:`ENCODINGS` (module docstring).
    out_features, value_features, qk_features: ``D_out`` (default ``C``); per-head value size
      (``None``: every head aggregates the full input); per-head query/key size (default ``C``).
    rel_features: learned-table width (default ``C`` for 'learned', ``qk_features / d`` for
      'learned_content', where the query is split across axes).
    max_distance: per-axis table size ``M`` (shifts ``|delta| < M``; default: the key grid's).
    hard: the ``alpha -> infinity`` limit of the quadratic encoding (Lemma 1's hard attention).
    sharpness_param: ``'spread'`` (parameter ``spreads`` s, ``alpha = s^2 / 2``, as the authors)
      or ``'alpha'``.
    implementation: ``'dense'``, ``'separable'`` (per-axis softmaxes; quadratic and learned) or
      ``'gather'`` (hard quadratic as shifted views).
    dropout_rate, shared_dropout_mask: attention dropout; one mask per step shared by the batch
      for position-only probabilities, else one per example.
    use_dot_product_attention: content attention through ``jax.nn.dot_product_attention`` where
      no attention dropout runs.
    center_init_std, spread_init_std: initial centres ``N(0, std^2)``, spreads ``1 + N(0, std^2)``.
    locality_strength: ConViT's local initialisation instead: centres on the ``H^(1/d)``-wide
      lattice around the query, sharpness ``alpha = locality_strength`` (quadratic family).
    gate_init: initial ``gate`` of 'gpsa' (ConViT: 1, ``sigmoid(1) = 0.73`` positional).
    use_bias, dtype, param_dtype, precision, kernel_init, bias_init, rel_init: as Flax's layers.
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
  center_init_std: float = 2.0
  spread_init_std: float = 0.01
  locality_strength: float | None = None
  gate_init: float = 1.0
  use_bias: bool = True
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  precision: Any = None
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros_init()
  rel_init: Initializer = nn.initializers.normal(1.0)

  def _param(self, name: str, init: Initializer, shape: tuple[int, ...]) -> Array:
    """``self.param``, also from :meth:`position_probabilities` once the variables exist."""
    if self.has_variable("params", name):
      value = self.get_variable("params", name)
      if value.shape != tuple(shape):
        raise ValueError(f"{name}: expected a parameter of shape {tuple(shape)}, got {value.shape}")
      return value
    return self.param(name, init, shape, self.param_dtype)

  def _position_logits(self, kpos, qpos, width: int):
    """The position scores: per-axis terms (quadratic, learned) or the full array (generalized)."""
    d, h = len(kpos), self.num_heads
    if self.encoding == "learned":
      heads = [self._param(f"rel_head_{a}", self.kernel_init, (width, h)) for a in range(d)]
      return enc.learned_logits(qpos, kpos, self._tables(kpos, qpos, width), heads)
    local = self.locality_strength is not None
    center_init = local_centers if local else nn.initializers.normal(self.center_init_std)
    centers = self._param("centers", center_init, (h, d))
    if self.encoding == "generalized":
      factors = self._param("spreads", spread_init(self.spread_init_std), (h, d, d))
      return enc.generalized_quadratic_logits(qpos, kpos, centers, factors)
    strength = self.locality_strength
    if self.sharpness_param == "alpha":
      init = constant(strength) if local else spread_init(self.spread_init_std)
      alpha = self._param("alpha", init, (h,))
    else:  # alpha = s^2 / 2
      init = constant((2 * strength) ** 0.5) if local else spread_init(self.spread_init_std)
      alpha = 0.5 * self._param("spreads", init, (h,)) ** 2
    alpha = jnp.ones((h,)) if self.hard else alpha  # the hard limit does not depend on alpha
    return enc.quadratic_logits(qpos, kpos, centers, alpha)

  def _tables(self, kpos, qpos, width: int) -> list[Array]:
    """Learned per-axis tables ``rel_table_a (2 M_a - 1, width)``."""
    extent = [int(np.max(np.abs(k[None] - q[:, None]))) + 1 for q, k in zip(qpos, kpos)]
    extent = grids.as_tuple("max_distance", self.max_distance or extent, len(kpos))
    return [self._param(f"rel_table_{a}", self.rel_init, (2 * m - 1, width)) for a, m in
            enumerate(extent)]  # fmt: skip

  def position_probabilities(self, spatial_shape: Sequence[int]) -> Array:
    """Position-only probabilities ``(H, Nq, Nk)`` for an input grid ``spatial_shape``.

    ``module.apply(variables, spatial_shape, method=module.position_probabilities)``.
    """
    check_config(self, len(spatial_shape))
    if self.encoding not in POSITION_ONLY:
      raise ValueError(f"encoding: {self.encoding!r} is content-dependent: no position-only map")
    _, kpos, qpos = layer_grids(self, spatial_shape)
    learned = self.encoding == "learned"
    width = self.get_variable("params", "rel_table_0").shape[1] if learned else 1
    return attn.position_probs(self._position_logits(kpos, qpos, width), hard=self.hard)

  def key_values(self, x: Array) -> Array:
    """The keys/values on the padded, input-dilated key grid, flattened: ``(B, Nk, C)``."""
    check_config(self, x.ndim - 2)
    pads, _, _ = layer_grids(self, x.shape[1:-1])
    keys, _ = grids.key_grid(x, pads, mode=self.padding_mode, input_dilation=self.input_dilation)
    return keys.reshape(x.shape[0], -1, x.shape[-1])

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
    d, b, c = check_input(self, x), x.shape[0], x.shape[-1]
    dtype = self.dtype or jnp.result_type(x.dtype, self.param_dtype)
    pads, kpos, qpos = layer_grids(self, x.shape[1:-1])
    keys, _ = grids.key_grid(
      x.astype(dtype), pads, mode=self.padding_mode, input_dilation=self.input_dilation
    )
    q_shape = tuple(q.shape[0] for q in qpos)
    tokens = keys.reshape(b, -1, c)
    dense = lambda features, name: heads_dense(self, features, dtype, name)  # noqa: E731
    values = tokens if self.value_features is None else dense(self.value_features, "value")(tokens)
    heads_dim = c if self.value_features is None else self.value_features
    kernel, bias = out_params(self, heads_dim, self.out_features or c, x.shape)
    kernel, bias = (None if p is None else p.astype(dtype) for p in (kernel, bias))

    position, query, key = None, None, None
    if self.encoding not in ("content", "learned_content"):
      position = self._position_logits(kpos, qpos, self.rel_features or c)
    if self.encoding not in POSITION_ONLY:
      dk = self.qk_features or c
      # Queries read the key grid at their own coordinates (the centres of their windows).
      index = tuple(
        slice(q[0] - k[0], q[-1] - k[0] + 1, s)
        for q, k, s in zip(qpos, kpos, grids.as_tuple("strides", self.strides, d))
      )
      query = dense(dk, "query")(keys[(slice(None), *index)].reshape(b, -1, c))
      key = dense(dk, "key")(tokens)
      if self.encoding == "learned_content":
        tables = [t.astype(dtype) for t in self._tables(kpos, qpos, dk // d)]
        rel = enc.relative_embeddings(qpos, kpos, tables)
        position = enc.query_relative_logits(query, q_shape, rel)

    gate = None
    if self.encoding == "gpsa":
      gate = self._param("gate", constant(self.gate_init), (self.num_heads,))
    sow = self.is_mutable_collection("intermediates")
    training = self.dropout_rate > 0.0 and not deterministic
    if self.implementation == "gather":  # the hard limit as shifted views of the keys (im2col)
      centers = self.get_variable("params", "centers")
      y = attn.gather_project(keys, kpos, qpos, centers, kernel, bias, precision=self.precision)
      probs = attn.position_probs(position, hard=True) if sow else None
    else:
      out = attn.relative_attention(
        values,
        kernel,
        bias,
        position_logits=position,
        query=query,
        key=key,
        hard=self.hard,
        implementation=self.implementation,
        dropout_rate=self.dropout_rate if training else 0.0,
        dropout_rng=self.make_rng("dropout") if training else None,
        shared_dropout_mask=self.shared_dropout_mask,
        use_dot_product_attention=self.use_dot_product_attention,
        gate=gate,
        return_probs=sow,
        precision=self.precision,
      )
      y, probs = out if sow else (out, None)
    if sow:
      self.sow("intermediates", "attention_probs", probs)
    return y.reshape(b, *q_shape, -1)
