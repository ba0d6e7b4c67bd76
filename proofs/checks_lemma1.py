"""Lemma 1 against the library: the MHSA terms produced by ``attnconv.conv_to_attention`` equal
the convolution (own definition, :mod:`proofs.reference_conv`) for symbolic inputs and kernels.

Trick: the library is called with *integer tags* (distinct integers as float32) for the kernel,
bias and input. The construction only copies them (into per-head matrices, padded / dilated key
grids) or writes zeros, and the hard-limit probabilities are exactly 0 or 1 -- each of these
assumptions is verified -- so every tag is mapped back to its SymPy symbol and the MHSA output
``sum_h sum_k P[h, q, k] keys[k, :] W[h] + b`` is compared symbolically with the convolution.
"""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import sympy as sp  # noqa: E402

from proofs._registry import claim  # noqa: E402
from proofs.reference_conv import reference_conv  # noqa: E402


def _tags(shape, start: int) -> np.ndarray:
  n = int(np.prod(shape))
  return np.arange(start, start + n, dtype=np.int64).reshape(shape)


def check_case(
  spatial: tuple[int, ...],
  kernel_size: tuple[int, ...],
  in_features: int = 2,
  features: int = 2,
  **conv: Any,
) -> str:
  """Verifies MHSA == Conv symbolically for one configuration; returns a one-line summary."""
  from attnconv import conv_to_attention
  from attnconv.layers import layer_grids

  groups = conv.get("feature_group_count", 1)
  kshape = (*kernel_size, in_features // groups, features)
  k_tags = _tags(kshape, 1)
  b_tags = _tags((features,), int(k_tags.max()) + 1)
  x_tags = _tags((*spatial, in_features), int(b_tags.max()) + 1)
  assert x_tags.max() < 2**24  # exact in float32
  k_sym = {int(t): sp.Symbol(f"w{int(t)}") for t in k_tags.ravel()}
  b_sym = {int(t): sp.Symbol(f"b{int(t)}") for t in b_tags.ravel()}
  x_sym = {int(t): sp.Symbol(f"x{int(t)}") for t in x_tags.ravel()}

  module, variables = conv_to_attention(
    jnp.asarray(k_tags, jnp.float32), jnp.asarray(b_tags, jnp.float32), **conv
  )
  params = variables["params"]
  w = np.asarray(params["out"]["kernel"], np.float64)  # (H, C_in, C_out)
  b = np.asarray(params["out"]["bias"], np.float64)
  keys = np.asarray(
    module.apply(variables, jnp.asarray(x_tags[None], jnp.float32), method=module.key_values),
    np.float64,
  )[0]  # (Nk, C_in)
  probs = np.asarray(
    module.apply(variables, spatial, method=module.position_probabilities), np.float64
  )  # (H, Nq, Nk)
  q_shape = tuple(len(q) for q in layer_grids(module, spatial)[2])

  # the assumptions behind the tag trick
  assert w.shape == (int(np.prod(kernel_size)), in_features, features), w.shape
  assert set(np.unique(w)) <= {0.0} | set(map(float, k_sym)), "W^(h) entry is not 0 or a tag"
  assert set(np.unique(keys)) <= {0.0} | set(map(float, x_sym)), "key entry is not 0 or a tag"
  assert set(np.unique(probs)) <= {0.0, 1.0}, f"probabilities not 0/1: {np.unique(probs)}"
  assert np.array_equal(b, b_tags.astype(np.float64)), "bias is not copied"
  assert probs.shape[1] == int(np.prod(q_shape)) and probs.shape[2] == keys.shape[0]

  def back(table, v: float):
    return sp.Integer(0) if v == 0 else table[int(v)]

  w_s = np.vectorize(lambda v: back(k_sym, v), otypes=[object])(w)
  keys_s = np.vectorize(lambda v: back(x_sym, v), otypes=[object])(keys)
  bias_s = [b_sym[int(v)] for v in b]

  # convolution from its definition, on the symbols
  ref = reference_conv(
    np.vectorize(lambda t: x_sym[int(t)], otypes=[object])(x_tags),
    np.vectorize(lambda t: k_sym[int(t)], otypes=[object])(k_tags),
    np.array([b_sym[int(t)] for t in b_tags], dtype=object),
    **conv,
  )
  assert ref.shape[:-1] == q_shape, f"output shape {q_shape} != conv {ref.shape[:-1]}"
  ref = ref.reshape(-1, features)

  num_heads, nq, _ = probs.shape
  for q in range(nq):
    for f in range(features):
      terms = [bias_s[f]]
      for h in range(num_heads):
        for k in np.nonzero(probs[h, q])[0]:  # P[h, q, k] == 0 contributes 0
          p = sp.Rational(probs[h, q, k])
          for c in range(in_features):
            if w_s[h, c, f] != 0 and keys_s[k, c] != 0:
              terms.append(p * keys_s[k, c] * w_s[h, c, f])
      mhsa = sp.Add(*terms)
      diff = sp.expand(mhsa - ref[q, f])
      assert diff == 0, f"query {q}, feature {f}: MHSA - Conv = {diff}"

  # and the forward pass itself uses these terms: exact on the integer tags
  y = np.asarray(module.apply(variables, jnp.asarray(x_tags[None], jnp.float32)), np.float64)[0]
  y_ref = reference_conv(
    x_tags.astype(object), k_tags.astype(object), b_tags.astype(object), **conv
  ).astype(np.float64)
  assert np.array_equal(y, y_ref), "forward pass differs from the convolution on integer tags"
  return f"{spatial} k{kernel_size} {conv or ''} -> {q_shape}"


def _cases(*cases) -> str:
  return "; ".join(check_case(*c[:-1], **c[-1]) for c in cases)


_FAMILIES: dict[str, tuple[str, list]] = {
  "conv2d_same": (
    "2-D 'SAME' / 'SAME_LOWER' (odd, even and rectangular kernels)",
    [
      ((4, 5), (3, 3), dict(padding="SAME")),
      ((4, 4), (2, 2), dict(padding="SAME")),
      ((3, 5), (1, 3), dict(padding="SAME")),
      ((4, 3), (2, 3), dict(padding="SAME_LOWER")),
    ],
  ),
  "conv2d_valid": (
    "2-D 'VALID'",
    [((5, 4), (3, 3), dict(padding="VALID")), ((4, 4), (2, 3), dict(padding="VALID"))],
  ),
  "conv2d_strides": (
    "2-D strides (queries on a strided subset; no pooling layer)",
    [
      ((5, 5), (3, 3), dict(padding="SAME", strides=2)),
      ((5, 4), (3, 2), dict(padding="VALID", strides=(2, 1))),
      ((6, 6), (2, 2), dict(padding="SAME", strides=3)),
    ],
  ),
  "conv2d_circular": (
    "2-D 'CIRCULAR' (keys on a torus)",
    [
      ((4, 4), (3, 3), dict(padding="CIRCULAR")),
      ((3, 4), (2, 2), dict(padding="CIRCULAR")),
      ((5, 4), (3, 3), dict(padding="CIRCULAR", strides=2)),
    ],
  ),
  "conv2d_reflect": (
    "2-D 'REFLECT' (keys on the mirrored grid)",
    [
      ((4, 3), (3, 3), dict(padding="REFLECT")),
      ((5, 5), (3, 3), dict(padding="REFLECT", kernel_dilation=2)),
      ((4, 4), (2, 2), dict(padding="REFLECT")),
    ],
  ),
  "conv1d_causal": (
    "1-D 'CAUSAL'",
    [
      ((5,), (3,), dict(padding="CAUSAL")),
      ((6,), (2,), dict(padding="CAUSAL", kernel_dilation=2)),
      ((6,), (3,), dict(padding="CAUSAL", strides=2)),
    ],
  ),
  "explicit_int_padding": (
    "explicit int padding",
    [
      ((4, 4), (3, 3), dict(padding=1)),
      ((3, 4), (2, 2), dict(padding=2)),
      ((4, 4), (3, 3), dict(padding=0, strides=2)),
    ],
  ),
  "explicit_pair_padding": (
    "explicit (low, high) pairs, including asymmetric ones",
    [
      ((4, 4), (3, 3), dict(padding=((1, 0), (0, 2)))),
      ((3, 4), (2, 3), dict(padding=((2, 1), (1, 1)), strides=(1, 2))),
    ],
  ),
  "input_dilation": (
    "input dilation (transposed-convolution style) with explicit padding",
    [
      ((3, 3), (3, 3), dict(padding=((1, 1), (1, 1)), input_dilation=2)),
      ((3, 2), (2, 2), dict(padding=((1, 0), (0, 1)), input_dilation=(2, 1))),
      ((3,), (3,), dict(padding=((2, 2),), input_dilation=3, strides=2)),
    ],
  ),
  "kernel_dilation": (
    "kernel dilation (heads on a dilated grid of shifts)",
    [
      ((5, 5), (3, 3), dict(padding="SAME", kernel_dilation=2)),
      ((4, 5), (2, 2), dict(padding="VALID", kernel_dilation=(1, 2))),
    ],
  ),
  "grouped": (
    "grouped convolution (block-diagonal per-head matrices), incl. depthwise",
    [
      ((3, 3), (3, 3), 4, 2, dict(padding="SAME", feature_group_count=2)),
      ((3, 3), (2, 2), 2, 4, dict(padding="VALID", feature_group_count=2)),
      ((3, 4), (3, 3), 3, 3, dict(padding="SAME", feature_group_count=3)),
    ],
  ),
  "conv1d": (
    "1-D convolutions (K heads; text / audio)",
    [
      ((5,), (3,), dict(padding="SAME")),
      ((6,), (2,), dict(padding="VALID", strides=2)),
      ((4,), (3,), dict(padding="CIRCULAR")),
      ((5,), (4,), dict(padding="REFLECT")),
    ],
  ),
  "conv3d": (
    "3-D convolutions",
    [
      ((3, 3, 3), (3, 3, 3), 1, 1, dict(padding="SAME")),
      ((3, 2, 4), (2, 1, 3), 2, 2, dict(padding="VALID", strides=(1, 1, 2))),
      ((3, 3, 2), (2, 2, 2), 2, 1, dict(padding="CIRCULAR", kernel_dilation=(1, 2, 1))),
    ],
  ),
}

for _name, (_what, _cases_list) in _FAMILIES.items():
  claim(
    f"lemma1.{_name}",
    "symbolic",
    f"{_what}: MHSA from conv_to_attention's probabilities, keys and W^(h) equals Conv for "
    "symbolic x, W, b",
  )(lambda _c=_cases_list: _cases(*_c))


@claim(
  "lemma1.reference_conv_matches_flax",
  "exact arithmetic",
  "the independent convolution definition (proofs/reference_conv.py) equals flax.linen.Conv "
  "exactly on integer data for every family of configurations used by the lemma1.* claims",
)
def _reference_matches_flax() -> str:
  import flax.linen as nn

  n = 0
  for _what, cases in _FAMILIES.values():
    for case in cases:
      spatial, ks = case[:2]
      cin, cout = (case[2], case[3]) if len(case) == 5 else (2, 2)
      conv = case[-1]
      groups = conv.get("feature_group_count", 1)
      rng = np.random.default_rng(n)
      x = rng.integers(-9, 10, size=(*spatial, cin))
      kern = rng.integers(-9, 10, size=(*ks, cin // groups, cout))
      bias = rng.integers(-9, 10, size=(cout,))
      mod = nn.Conv(cout, ks, **conv)
      y = mod.apply(
        {
          "params": {
            "kernel": jnp.asarray(kern, jnp.float32),
            "bias": jnp.asarray(bias, jnp.float32),
          }
        },
        jnp.asarray(x[None], jnp.float32),
      )[0]
      ref = reference_conv(x.astype(object), kern.astype(object), bias.astype(object), **conv)
      assert np.array_equal(np.asarray(y, np.float64), ref.astype(np.float64)), (spatial, ks, conv)
      n += 1
  return f"{n} configurations"
