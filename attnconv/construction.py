"""Theorem 1 as code: any convolution is a multi-head self-attention layer (and back).

:func:`conv_to_attention` builds, for a ``flax.linen.Conv`` kernel, the constructive proof of
Cordonnier et al. (2020): one head per kernel offset ``kappa`` (``prod(kernel_size)`` heads), the
quadratic relative encoding (Eq. 9) with ``W_qry = W_key = 0`` and centre
``Delta_kappa = kappa * kernel_dilation - (window - 1) // 2`` (``window`` the dilated kernel
extent; the query sits at the centre of its receptive field), per-head matrices
``W^(kappa) = kernel[kappa]`` (block-diagonal for grouped convolutions) and ``b_out = bias``.
Keys live on the padded (and input-dilated) grid, queries at the strided output positions.

Exactness: with ``alpha=None`` (the hard limit) every head selects exactly one key (Lemma 1/2), the
attention probabilities are exactly 0.0 and 1.0, and the output differs from ``lax`` convolution
only by the order of the floating-point sums. With integer-valued inputs and kernels whose partial
sums stay below 2**24 in float32, both sums are exact, so the outputs are bitwise equal.
With a finite ``alpha`` the error is bounded by :func:`attnconv.bounds.softmax_emulation_error_bound`.

References:
  Cordonnier, Loukas & Jaggi, ICLR 2020: Theorem 1, Lemma 1, Lemma 2 (Eq. 9).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attnconv import grids
from attnconv.layers import MultiHeadRelativeAttention

Array = jax.Array
PaddingLike = str | int | Sequence[int | tuple[int, int]]


def conv_head_offsets(
  kernel_size: Sequence[int], kernel_dilation: Sequence[int] | int = 1
) -> np.ndarray:
  """The centres ``Delta_kappa`` of the construction, one row per kernel offset (row-major).

  ``Delta_kappa = kappa * kernel_dilation - (window - 1) // 2`` with ``window`` the dilated
  extent ``(K - 1) * dilation + 1``. Returns an int array ``(prod(kernel_size), d)``.
  """
  d = len(kernel_size)
  dil = grids.as_tuple("kernel_dilation", 1 if kernel_dilation is None else kernel_dilation, d)
  window = [(k - 1) * r + 1 for k, r in zip(kernel_size, dil)]
  idx = np.array(list(itertools.product(*[range(k) for k in kernel_size])), dtype=np.int64)
  idx = idx.reshape(-1, d)
  return (idx * np.array(dil) - np.array([(w - 1) // 2 for w in window])).astype(np.int32)


def head_matrices(kernel: Array, feature_group_count: int = 1) -> Array:
  """Per-head matrices ``W^(h) = W_val^(h) W_out^(h)`` from a conv kernel: ``(H, C_in, C_out)``.

  For ``G`` groups the kernel slice ``(C_in / G, C_out)`` is expanded block-diagonally: input
  channels of group ``g`` only feed output channels of group ``g``. Differentiable in ``kernel``;
  the expansion multiplies by exact 0/1 masks.
  """
  d = kernel.ndim - 2
  h = int(np.prod(kernel.shape[:d]))
  cin_g, cout = kernel.shape[-2:]
  g = feature_group_count
  flat = kernel.reshape(h, cin_g, cout)
  if g == 1:
    return flat
  mask = (np.arange(cout)[None, :] // (cout // g) == np.arange(g)[:, None]).astype(kernel.dtype)
  blocks = flat[:, None, :, :] * jnp.asarray(mask)[None, :, None, :]  # (H, G, C_in/G, C_out)
  return blocks.reshape(h, g * cin_g, cout)


def conv_to_attention(
  kernel: Array,
  bias: Array | None = None,
  *,
  strides: int | Sequence[int] = 1,
  padding: PaddingLike = "SAME",
  input_dilation: int | Sequence[int] = 1,
  kernel_dilation: int | Sequence[int] = 1,
  feature_group_count: int = 1,
  alpha: float | None = None,
  implementation: str = "dense",
) -> tuple[MultiHeadRelativeAttention, dict]:
  """A multi-head self-attention layer that computes the given convolution (Theorem 1).

  Args:
    kernel: ``flax.linen.Conv`` layout ``(*kernel_size, in_features // feature_group_count,
      features)``, 1-, 2- or 3-D.
    bias: ``(features,)`` or None (no bias, as ``Conv(use_bias=False)``).
    strides, padding, input_dilation, kernel_dilation, feature_group_count: exactly as in
      ``flax.linen.Conv`` ('SAME', 'VALID', 'CIRCULAR', 'REFLECT', 'CAUSAL' (1-D), an int, or
      per-axis ints / (low, high) pairs).
    alpha: ``None`` for the ``alpha -> infinity`` limit (exact hard attention); a positive float
      for softmax attention with logits ``-alpha ||delta - Delta||^2``.
    implementation: ``'dense'`` (softmax / hard attention over all keys, as a transformer
      computes it) or ``'gather'`` (the hard limit as shifted, strided views; ``alpha=None`` only).

  Returns:
    ``(module, variables)``: ``module.apply(variables, x)`` for ``x`` of shape
    ``(batch, *spatial, in_features)`` equals ``flax.linen.Conv(...).apply({'params':
    {'kernel': kernel, 'bias': bias}}, x)``.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> kernel = jax.random.normal(jax.random.key(0), (3, 3, 4, 8))
    >>> module, variables = conv_to_attention(kernel, jnp.zeros(8), padding='SAME')
    >>> x = jax.random.normal(jax.random.key(1), (2, 6, 6, 4))
    >>> conv = nn.Conv(8, (3, 3), padding='SAME')
    >>> ref = conv.apply({'params': {'kernel': kernel, 'bias': jnp.zeros(8)}}, x)
    >>> bool(jnp.allclose(module.apply(variables, x), ref, atol=1e-5))
    True
  """
  if not hasattr(kernel, "ndim") or not hasattr(kernel, "dtype"):
    raise TypeError(f"kernel: expected an array, got {type(kernel).__name__}")
  if not jnp.issubdtype(kernel.dtype, jnp.floating):
    raise TypeError(f"kernel: expected a floating-point dtype, got {kernel.dtype}")
  d = kernel.ndim - 2
  if d not in (1, 2, 3):
    raise ValueError(
      f"kernel: expected rank 3, 4 or 5 (*kernel_size, in_features // groups, features), got shape "
      f"{kernel.shape}"
    )
  kernel_size = tuple(int(k) for k in kernel.shape[:d])
  if any(k < 1 for k in kernel_size) or kernel.shape[-1] < 1 or kernel.shape[-2] < 1:
    raise ValueError(f"kernel: expected non-empty axes, got shape {kernel.shape}")
  if not isinstance(feature_group_count, (int, np.integer)) or isinstance(
    feature_group_count, bool
  ):
    raise TypeError(f"feature_group_count: expected a positive int, got {feature_group_count!r}")
  if feature_group_count < 1:
    raise ValueError(f"feature_group_count: expected a positive int, got {feature_group_count}")
  features = int(kernel.shape[-1])
  if features % feature_group_count:
    raise ValueError(
      f"feature_group_count: expected a divisor of features={features} (the kernel's last axis), "
      f"got {feature_group_count}"
    )
  in_features = int(kernel.shape[-2]) * feature_group_count
  if bias is not None:
    if not hasattr(bias, "shape"):
      raise TypeError(f"bias: expected an array of shape ({features},), got {type(bias).__name__}")
    if tuple(bias.shape) != (features,):
      raise ValueError(f"bias: expected shape ({features},), got {tuple(bias.shape)}")
  # None means 1, as in flax.linen.Conv
  strides, input_dilation, kernel_dilation = (
    grids.as_tuple(name, 1 if value is None else value, d)
    for name, value in (
      ("strides", strides),
      ("input_dilation", input_dilation),
      ("kernel_dilation", kernel_dilation),
    )
  )
  window = tuple((k - 1) * r + 1 for k, r in zip(kernel_size, kernel_dilation))
  pads, mode = grids.conv_padding(padding, window, input_dilation)
  if alpha is not None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating, np.integer)):
      raise TypeError(f"alpha: expected None or a positive float, got {alpha!r}")
    if not alpha > 0 or not math.isfinite(alpha):
      raise ValueError(f"alpha: expected None (hard limit) or a finite float > 0, got {alpha}")
  if implementation not in ("dense", "gather"):
    raise ValueError(f"implementation: expected 'dense' or 'gather', got {implementation!r}")
  if implementation == "gather" and alpha is not None:
    raise ValueError(
      f"implementation: 'gather' computes the hard limit; expected alpha=None, got alpha={alpha}"
    )

  centers = conv_head_offsets(kernel_size, kernel_dilation)
  num_heads = centers.shape[0]
  module = MultiHeadRelativeAttention(
    num_heads=num_heads,
    encoding="quadratic",
    out_features=features,
    hard=alpha is None,
    sharpness_param="alpha",
    implementation=implementation,
    strides=strides,
    padding=pads,
    padding_mode=mode,
    input_dilation=input_dilation,
    query_window=window,
    use_bias=bias is not None,
    param_dtype=kernel.dtype,
  )
  params = {
    "centers": jnp.asarray(centers, kernel.dtype),
    "alpha": jnp.full((num_heads,), 1.0 if alpha is None else alpha, kernel.dtype),
    "out": {"kernel": head_matrices(kernel, feature_group_count)},
  }
  if bias is not None:
    params["out"]["bias"] = jnp.asarray(bias)
  del in_features
  return module, {"params": params}


def _offset_mass(
  centers: np.ndarray, alpha: np.ndarray, hard: bool
) -> tuple[np.ndarray, np.ndarray]:
  """Nearest integer shift of each head and its attention mass on an unbounded lattice."""
  shift = np.round(centers).astype(np.int64)
  if hard:
    frac = np.abs(centers - shift)
    on_tie = np.any(np.isclose(frac, 0.5), axis=-1)
    return shift, np.where(on_tie, 0.5, 1.0)
  masses = []
  for c, a in zip(centers, alpha):
    # the lattice softmax factorises over axes: mass at the nearest point = prod_a p_a
    radius = int(np.ceil(np.sqrt(40.0 / max(a, 1e-12)))) + 2
    m = 1.0
    for ca in c:
      pts = np.arange(np.round(ca) - radius, np.round(ca) + radius + 1)
      logits = -a * (pts - ca) ** 2
      p = np.exp(logits - logits.max())
      m *= p[radius] / p.sum()
    masses.append(m)
  return shift, np.array(masses)


def attention_to_conv(
  module: MultiHeadRelativeAttention, variables: dict, *, tolerance: float = 1e-6
) -> tuple[Array, Array | None]:
  """The inverse map: a convolution kernel from an attention layer concentrated on integer shifts.

  Each head must put (up to ``tolerance``) all its attention on one integer shift ``Delta_h``
  (a hard-limit layer, or a quadratic head with an integer centre and large ``alpha``). The kernel
  is the smallest one whose offsets (centred as in :func:`conv_head_offsets`) cover every shift;
  heads on the same shift add up, uncovered offsets are zero. With the module's own strides and
  padding, ``flax.linen.Conv`` with the returned kernel computes the layer (up to the off-target
  mass). For a layer from :func:`conv_to_attention` with kernel dilation 1 and one group the
  original kernel is returned exactly; with groups the block-diagonal dense kernel is returned.

  Args:
    module: a :class:`~attnconv.layers.MultiHeadRelativeAttention` with the quadratic encoding,
      no value projection.
    variables: its variables.
    tolerance: largest allowed attention mass off the nearest integer shift, per head.

  Returns:
    ``(kernel, bias)`` in ``flax.linen.Conv`` layout ``(*kernel_size, in_features, features)``.

  Raises:
    ValueError: naming the first head that is not concentrated, with its off-shift mass.
  """
  if not isinstance(module, MultiHeadRelativeAttention):
    raise TypeError(f"module: expected MultiHeadRelativeAttention, got {type(module).__name__}")
  if module.encoding != "quadratic" or module.value_features is not None:
    raise ValueError(
      f"module: expected the quadratic encoding with value_features=None, got encoding="
      f"{module.encoding!r}, value_features={module.value_features}"
    )
  params = variables["params"]
  centers = np.asarray(params["centers"], dtype=np.float64)
  if module.hard:
    alpha = np.full(centers.shape[0], np.inf)
  elif module.sharpness_param == "alpha":
    alpha = np.asarray(params["alpha"], dtype=np.float64)
  else:
    alpha = 0.5 * np.asarray(params["spreads"], dtype=np.float64) ** 2
  shift, mass = _offset_mass(centers, alpha, module.hard)
  for h in range(centers.shape[0]):
    off = 1.0 - float(mass[h])
    if off > tolerance:
      raise ValueError(
        f"module: head {h} is not concentrated on an integer shift: centre {centers[h].tolist()}, "
        f"alpha {alpha[h]:.4g}; attention mass off the nearest shift {shift[h].tolist()} is "
        f"{off:.3g} > tolerance {tolerance:g}"
      )
  d = centers.shape[1]
  size = []
  for a in range(d):
    lo, hi = int(shift[:, a].min()), int(shift[:, a].max())
    odd = 2 * max(-lo, hi, 0) + 1
    even = 2 * max(-lo, hi - 1, 0) + 2
    size.append(min(odd, even))
  kernel_heads = jnp.asarray(params["out"]["kernel"])
  _, cin, cout = kernel_heads.shape
  kernel = jnp.zeros((*size, cin, cout), kernel_heads.dtype)
  for h in range(centers.shape[0]):
    idx = tuple(int(shift[h, a]) + (size[a] - 1) // 2 for a in range(d))
    kernel = kernel.at[idx].add(kernel_heads[h])
  bias = params["out"].get("bias") if module.use_bias else None
  return kernel, bias


# ----------------------------------------------------------------------------------------------
# Whole networks: run every flax.linen.Conv as its attention emulation
# ----------------------------------------------------------------------------------------------


def _conv_interceptor(alpha: float | None, implementation: str):
  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (
      context.method_name != "__call__"
      or type(module) is not nn.Conv
      or module.is_initializing()
      or not module.shared_weights
      or module.mask is not None
    ):
      return next_fun(*args, **kwargs)
    x = args[0] if args else kwargs["inputs"]
    kernel = module.get_variable("params", "kernel")
    bias = module.get_variable("params", "bias") if module.use_bias else None
    d = kernel.ndim - 2
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=module.dtype)
    batch_shape = x.shape[: x.ndim - (d + 1)]
    xb = x.reshape((-1, *x.shape[x.ndim - (d + 1) :]))
    attn_module, attn_vars = conv_to_attention(
      kernel,
      bias,
      strides=module.strides or 1,
      padding=module.padding,
      input_dilation=module.input_dilation or 1,
      kernel_dilation=module.kernel_dilation or 1,
      feature_group_count=module.feature_group_count,
      alpha=alpha,
      implementation=implementation,
    )
    attn_module = attn_module.clone(precision=module.precision, dtype=module.dtype)
    y = attn_module.apply(attn_vars, xb)
    return y.reshape((*batch_shape, *y.shape[1:]))

  return interceptor


@contextlib.contextmanager
def convolutions_as_attention(
  alpha: float | None = None, implementation: str = "dense"
) -> Iterator[None]:
  """Within this context every ``flax.linen.Conv`` runs as its self-attention emulation.

  Works on any Flax (linen) model without changing it: ``model.apply`` inside the context gives
  the same outputs (exactly in the hard limit, up to float summation order) with no convolution
  primitive left in the jaxpr. Initialisation (``model.init``) is not intercepted. JAX's trace
  caches are cleared on entry and exit, so functions traced (or jitted) before the context are
  traced again inside it.

  Args:
    alpha: ``None`` (hard limit) or the finite sharpness of every head.
    implementation: ``'dense'`` or ``'gather'`` (see :func:`conv_to_attention`).
  """
  if implementation not in ("dense", "gather"):
    raise ValueError(f"implementation: expected 'dense' or 'gather', got {implementation!r}")
  if implementation == "gather" and alpha is not None:
    raise ValueError(f"implementation: 'gather' needs alpha=None, got alpha={alpha}")
  if alpha is not None and not alpha > 0:
    raise ValueError(f"alpha: expected None or a float > 0, got {alpha}")
  # JAX caches traces per function object and the interception is not part of the cache key:
  # clear the caches on entry and exit so that functions traced outside the context are traced
  # anew inside it (and vice versa).
  jax.clear_caches()
  try:
    with nn.intercept_methods(_conv_interceptor(alpha, implementation)):
      yield
  finally:
    jax.clear_caches()
