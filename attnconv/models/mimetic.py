"""Mimetic initialisation of self-attention layers (Trockman & Kolter, ICML 2023).

Trained vision transformers have ``W_q W_k^T`` close to a positive multiple of the identity plus
noise (tokens attend to similar tokens) and ``W_v W_o`` close to a negative multiple of it. The
mimetic initialisation sets, for every head ``h`` of every content attention layer,

  ``W_q^h (W_k^h)^T ~ alpha Z_1 + beta I``     and     ``W_v^h W_o^h ~ vo_alpha Z_2 - vo_beta I``

with ``Z_1, Z_2`` of i.i.d. ``N(0, 1/C)`` entries (``C`` the layer's input width), one draw per
layer, head and product. Each target ``T = U S V^T`` (SVD) is factorised as
``W_1 = U_k S_k^{1/2}``, ``W_2 = S_k^{1/2} V_k^T`` with ``k = D_h`` the head size, so that
``W_1 W_2`` is the best rank-``D_h`` approximation of ``T`` (Eckart-Young; exactly ``T`` when
``D_h = C``).

Constants used by default: ``alpha = beta = 0.7`` for ``W_q W_k^T`` and
``vo_alpha = vo_beta = 0.4`` for ``W_v W_o`` (the values the paper reports for ViT-Tiny on
CIFAR-10). The targets are per head, as the query/key products; biases are left as they are.

A layer is recognised in a parameter tree as a mapping with ``query``, ``key`` (and optionally
``value``) entries holding ``kernel (C, H, D_h)`` and an ``out`` entry with
``kernel (H, D_h, C)``: the layout of :class:`attnconv.layers.MultiHeadRelativeAttention` (content
encodings) and of ``flax.linen.MultiHeadDotProductAttention``. Without a ``value`` projection
(every head aggregating the raw input) only the query/key products are set.

References:
  Trockman & Kolter, "Mimetic Initialization of Self-Attention Layers", ICML 2023.
  Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at
  Scale", ICLR 2021.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import FrozenDict

Array = jax.Array
Path = tuple[str, ...]

__all__ = ["attention_layers", "mimetic_init", "mimetic_targets", "rank_truncated_factors"]


def attention_layers(params: Any) -> list[Path]:
  """The paths (tuples of keys, sorted) of the content attention layers of a parameter tree."""
  found: list[Path] = []

  def visit(node: Any, path: Path) -> None:
    if not isinstance(node, Mapping):
      return
    if _is_attention(node):
      found.append(path)
      return
    for name in node:
      visit(node[name], (*path, str(name)))

  visit(params, ())
  return sorted(found)


def _is_attention(node: Mapping) -> bool:
  try:
    q, k, o = (np.shape(node[n]["kernel"]) for n in ("query", "key", "out"))
    v = np.shape(node["value"]["kernel"]) if "value" in node else None
  except (KeyError, TypeError):
    return False
  return (
    len(q) == 3
    and k == q
    and len(o) == 3
    and o[0] == q[1]
    and o[2] == q[0]
    and (v is None or (v[:2] == q[:2] and v[2] == o[1]))
  )


def _check_constant(name: str, value: Any) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
    raise TypeError(f"{name}: expected a finite real number, got {value!r}")
  return float(value)


def mimetic_targets(
  params: Any,
  key: Array,
  *,
  alpha: float = 0.7,
  beta: float = 0.7,
  vo_alpha: float = 0.4,
  vo_beta: float = 0.4,
) -> dict[Path, dict[str, np.ndarray]]:
  """The full-rank targets of :func:`mimetic_init` for the same ``key``.

  Returns:
    ``{layer path: {"qk": (H, C, C), "vo": (H, C, C)}}`` (float64; ``"vo"`` only for layers with
    a ``value`` projection): ``alpha Z_1 + beta I`` and ``vo_alpha Z_2 - vo_beta I`` per head.
  """
  alpha, beta = _check_constant("alpha", alpha), _check_constant("beta", beta)
  vo_alpha, vo_beta = _check_constant("vo_alpha", vo_alpha), _check_constant("vo_beta", vo_beta)
  layers = attention_layers(params)
  if not layers:
    raise ValueError(
      "params: expected at least one attention layer (query/key kernels (C, H, D_h), out kernel "
      "(H, D_h, C)), got none"
    )
  targets = {}
  for path, layer_key in zip(layers, jax.random.split(key, len(layers))):
    node = _get(params, path)
    c, h, _ = np.shape(node["query"]["kernel"])
    k_qk, k_vo = jax.random.split(layer_key)
    eye = np.eye(c)[None]
    z = lambda k: np.asarray(jax.random.normal(k, (h, c, c), jnp.float32), np.float64) / np.sqrt(c)  # noqa: E731
    targets[path] = {"qk": alpha * z(k_qk) + beta * eye}
    if "value" in node:
      targets[path]["vo"] = vo_alpha * z(k_vo) - vo_beta * eye
  return targets


def rank_truncated_factors(target: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
  """``(W_1 (..., C, r), W_2 (..., r, C))`` with ``W_1 W_2`` the best rank-``r`` approximation of
  ``target (..., C, C)`` (balanced: ``U_r S_r^{1/2}`` and ``S_r^{1/2} V_r^T``), in float64."""
  u, s, vt = np.linalg.svd(np.asarray(target, np.float64))
  root = np.sqrt(s[..., :rank])
  return u[..., :rank] * root[..., None, :], root[..., :, None] * vt[..., :rank, :]


def mimetic_init(
  params: Any,
  key: Array,
  *,
  alpha: float = 0.7,
  beta: float = 0.7,
  vo_alpha: float = 0.4,
  vo_beta: float = 0.4,
) -> Any:
  """Mimetic initialisation (Trockman & Kolter, 2023) of every attention layer of ``params``.

  Rewrites the ``query``/``key`` kernels so that ``W_q^h (W_k^h)^T`` is the best rank-``D_h``
  approximation of ``alpha Z_1 + beta I``, and the ``value``/``out`` kernels so that
  ``W_v^h W_o^h`` is that of ``vo_alpha Z_2 - vo_beta I`` (module docstring). A pure function: the
  SVDs run on the host in float64 and the kernels are cast back to their dtypes; every other leaf
  (biases, embeddings, MLPs, norms) is returned unchanged.

  Args:
    params: a parameter tree (e.g. ``variables["params"]`` of :class:`attnconv.models.vit.ViT`).
    key: PRNG key for the random parts ``Z`` (see :func:`mimetic_targets`).
    alpha, beta: the query/key constants (default 0.7, 0.7).
    vo_alpha, vo_beta: the value/output constants (default 0.4, 0.4).

  Returns:
    A new tree of the same structure (a ``FrozenDict`` if ``params`` is one).
  """
  targets = mimetic_targets(params, key, alpha=alpha, beta=beta, vo_alpha=vo_alpha, vo_beta=vo_beta)
  frozen = isinstance(params, FrozenDict)
  out = _copy(params)
  for path, target in targets.items():
    node = _get(out, path)
    c, h, dh = np.shape(node["query"]["kernel"])
    w_q, w_kt = rank_truncated_factors(target["qk"], dh)  # (H, C, D_h), (H, D_h, C)
    _set_kernel(node["query"], w_q.transpose(1, 0, 2))
    _set_kernel(node["key"], w_kt.transpose(2, 0, 1))
    if "vo" in target:
      w_v, w_o = rank_truncated_factors(target["vo"], dh)
      _set_kernel(node["value"], w_v.transpose(1, 0, 2))
      _set_kernel(node["out"], w_o)
  return FrozenDict(out) if frozen else out


def _set_kernel(node: dict, value: np.ndarray) -> None:
  old = node["kernel"]
  node["kernel"] = jnp.asarray(value, dtype=old.dtype)


def _copy(node: Any) -> Any:
  """Copies the mappings of a tree into plain dicts (the leaves are shared, not copied)."""
  if isinstance(node, Mapping):
    return {k: _copy(v) for k, v in node.items()}
  return node


def _get(tree: Any, path: Path) -> Any:
  for name in path:
    tree = tree[name]
  return tree
