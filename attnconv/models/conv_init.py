"""Start an attention network as a convolutional network (a soft convolutional prior).

:func:`init_attention_as_convolution` rewrites every quadratic-encoding attention layer of a
parameter tree (e.g. of :class:`attnconv.models.attention_net.AttentionNet` with ``num_heads =
K^2``) into the attention layer that Theorem 1 builds from a freshly initialised ``K x K``
convolution: it draws a convolution kernel, calls :func:`attnconv.construction.conv_to_attention`
at a *finite* sharpness ``alpha`` and copies the heads' centres (the kernel shifts), their
sharpness and the per-head output matrices (the kernel slices) into the layer. Training may then
move the centres and change ``alpha`` -- the convolution is where the network starts, not a
constraint (the initialisation ConViT uses with Eq. 9).

A layer with a value projection (``value`` kernel ``(C_in, H, D_v)``, ``out`` kernel
``(H, D_v, C_out)``, as in the shared backbone :class:`attnconv.models.vit.ViT`) expresses, per
head, the matrices ``W_val^(h) W_out^(h)`` of rank at most ``D_v``: it starts as the convolution
whose kernel slices are the best rank-``D_v`` approximations (truncated SVD, Eckart-Young) of the
fresh kernel's slices, ``W_val^(h) = U sqrt(S)``, ``W_out^(h) = sqrt(S) V^T``, value bias 0;
exactly the fresh convolution where ``D_v >= min(C_in, C_out)``.

The attention layers of :class:`AttentionNet` attend over the token grid without padding: at the
border the softmax renormalises over the keys that exist, where a 'SAME' convolution would see
zeros. Away from the border the layer equals ``conv_to_attention``'s up to the finite-alpha
leakage bounded in :mod:`attnconv.bounds`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp

from attnconv import construction

Initializer = Callable[..., jax.Array]


def conv_kernel_init() -> Initializer:
  """PyTorch's ``nn.Conv2d`` default kernel init: ``U(+-1/sqrt(K*K*C_in))``.

  It has the same fan-in and scale as the torch init of the attention layer's out kernel
  ``(H, D, D)`` with ``H = K^2``, so a converted network starts at the usual activation scale.
  """
  return jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _check_alpha(alpha: Any) -> None:
  """Raises unless ``alpha`` is a finite Python float (or int) > 0."""
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
    raise TypeError(f"alpha: expected a finite float > 0, got {alpha!r}")
  if not (alpha > 0 and math.isfinite(alpha)):
    raise ValueError(f"alpha: expected a finite float > 0, got {alpha}")


def _is_quadratic_layer(tree: Any) -> bool:
  return (
    isinstance(tree, Mapping)
    and "centers" in tree
    and ("spreads" in tree or "alpha" in tree)
    and "out" in tree
  )


def low_rank_factors(matrices: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
  """Per-head factors of the best rank-``rank`` approximation of ``(H, C_in, C_out)`` matrices.

  Returns ``(W_val (H, C_in, rank), W_out (H, rank, C_out))`` with ``W_val @ W_out`` the truncated
  SVD ``U_r S_r V_r^T`` of each matrix (the nearest rank-``rank`` matrix in Frobenius and spectral
  norm; exact when ``rank >= min(C_in, C_out)``, with zero columns beyond the matrix rank), the
  singular values split evenly ``U sqrt(S)``, ``sqrt(S) V^T``. Computed in float32.
  """
  if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
    raise ValueError(f"rank: expected a positive integer, got {rank!r}")
  m = jnp.asarray(matrices, jnp.float32)
  if m.ndim != 3:
    raise ValueError(f"matrices: expected shape (H, C_in, C_out), got {m.shape}")
  u, s, vt = jnp.linalg.svd(m, full_matrices=False)
  r = min(rank, s.shape[-1])
  root = jnp.sqrt(s[:, :r])
  w_val = u[:, :, :r] * root[:, None, :]
  w_out = root[:, :, None] * vt[:, :r, :]
  pad = rank - r
  if pad:
    w_val = jnp.pad(w_val, ((0, 0), (0, 0), (0, pad)))
    w_out = jnp.pad(w_out, ((0, 0), (0, pad), (0, 0)))
  return w_val, w_out


def init_attention_as_convolution(
  params: Any,
  rng: jax.Array,
  *,
  alpha: float,
  kernel_init: Initializer | None = None,
) -> Any:
  """Initialises every quadratic attention layer in ``params`` as a ``K x K`` convolution.

  Args:
    params: a parameter pytree (nested dicts; a ``FrozenDict`` is accepted). Each quadratic
      attention layer -- a dict with ``centers (H, 2)``, ``spreads (H,)`` (``alpha = s^2 / 2``) or
      ``alpha (H,)``, and ``out`` with ``kernel (H, C_in, C_out)`` and optional ``bias`` (or a
      ``value`` projection ``(C_in, H, D_v)`` and ``out`` ``(H, D_v, C_out)``: the nearest
      convolution of per-head rank ``D_v``, see the module docstring) -- is rewritten; all other
      leaves (a GPSA layer's content half and gate included) are returned unchanged.
    rng: key for the convolution kernels (one kernel per layer, folded in by layer order).
    alpha: finite sharpness > 0 of the softmax (Eq. 9 logits ``-alpha ||delta - Delta||^2``).
      Each head then puts ``1 / (1 + sum_{s != 0} e^{-alpha ||s||^2})`` of its mass on its shift.
    kernel_init: initialiser of the ``(K, K, C_in, C_out)`` convolution kernels (default:
      :func:`conv_kernel_init`).

  Returns:
    A pytree of the same structure, shapes and dtypes. The biases are kept.

  Raises:
    ValueError: if ``alpha`` is not a finite float > 0, no quadratic attention layer is found, or
      a layer's number of heads is not a square ``K^2`` on a 2-D grid.
  """
  _check_alpha(alpha)
  kernel_init = conv_kernel_init() if kernel_init is None else kernel_init
  frozen = isinstance(params, flax.core.FrozenDict)
  tree = flax.core.unfreeze(params) if frozen else params
  counter = [0]

  def convert(layer: Mapping[str, Any], path: str) -> dict:
    centers = layer["centers"]
    heads = centers.shape[0]
    k = math.isqrt(heads)
    if centers.ndim != 2 or centers.shape[1] != 2 or k * k != heads:
      raise ValueError(
        f"params: expected the attention layer at {path!r} to have K^2 heads on a 2-D grid "
        f"(centers of shape (K*K, 2)), got centers of shape {tuple(centers.shape)}"
      )
    out = layer["out"]
    c_out = out["kernel"].shape[-1]
    c_in = layer["value"]["kernel"].shape[0] if "value" in layer else out["kernel"].shape[1]
    key = jax.random.fold_in(rng, counter[0])
    counter[0] += 1
    kernel = kernel_init(key, (k, k, c_in, c_out), out["kernel"].dtype)
    bias = out.get("bias")
    _, variables = construction.conv_to_attention(kernel, bias, alpha=float(alpha))
    new = dict(layer)
    new["centers"] = variables["params"]["centers"].astype(centers.dtype)
    if "spreads" in layer:  # alpha = s^2 / 2  <=>  s = sqrt(2 alpha)
      s = layer["spreads"]
      new["spreads"] = jnp.full(s.shape, math.sqrt(2.0 * alpha), s.dtype)
    else:
      a = layer["alpha"]
      new["alpha"] = jnp.full(a.shape, alpha, a.dtype)
    new["out"] = dict(out)
    matrices = variables["params"]["out"]["kernel"]  # (H, C_in, C_out)
    if "value" in layer:
      value = layer["value"]
      rank = value["kernel"].shape[-1]
      w_val, w_out = low_rank_factors(matrices, rank)
      new["value"] = dict(value)
      new["value"]["kernel"] = jnp.transpose(w_val, (1, 0, 2)).astype(value["kernel"].dtype)
      if "bias" in value:
        new["value"]["bias"] = jnp.zeros_like(value["bias"])
      matrices = w_out
    new["out"]["kernel"] = matrices.astype(out["kernel"].dtype)
    return new

  def walk(node: Any, path: str) -> Any:
    if _is_quadratic_layer(node):
      return convert(node, path)
    if isinstance(node, Mapping):
      return {k: walk(v, f"{path}/{k}" if path else str(k)) for k, v in node.items()}
    return node

  result = walk(tree, "")
  if counter[0] == 0:
    raise ValueError(
      "params: expected at least one quadratic attention layer (centers, spreads or alpha, out), "
      "found none"
    )
  return flax.core.freeze(result) if frozen else result


def attention_cnn_from_cnn(
  variables: Mapping[str, Any],
  *,
  alpha: float,
  encoding: str = "quadratic",
  qk_features: int = 8,
  rng: jax.Array | None = None,
) -> dict:
  """Converts the variables of a trained :class:`SmallCNN` into an :class:`AttentionCNN`'s.

  Every ``conv{i}`` kernel ``(3, 3, C_in, C_out)`` becomes the 9-head attention layer of
  :func:`attnconv.construction.conv_to_attention` at sharpness ``alpha`` (centres on the kernel
  grid, out kernel = the kernel's slices); BatchNorm, its statistics and the classifier are copied.
  For ``encoding="quadratic_content"`` the content term starts switched off but trainable:
  ``W_qry = 0`` and ``b_qry = 0`` (the logits' content part is exactly 0) and a random ``W_key``
  (LeCun normal from ``rng``), so the first gradient step reaches ``W_qry``.

  Args:
    variables: ``{'params': ..., 'batch_stats': ...}`` of a SmallCNN.
    alpha: finite sharpness > 0 (the layers are softmax attention, so ``alpha`` is trainable).
    encoding: the AttentionCNN's ``encoding``.
    qk_features: the AttentionCNN's ``qk_features`` (content only).
    rng: key of the random ``W_key`` (content only; default ``jax.random.key(0)``).

  Returns:
    The AttentionCNN variables (plain dicts).
  """
  _check_alpha(alpha)
  if encoding not in ("quadratic", "quadratic_content"):
    raise ValueError(f"encoding: expected 'quadratic' or 'quadratic_content', got {encoding!r}")
  variables = flax.core.unfreeze(variables)
  params = dict(variables["params"])
  convs = sorted(k for k in params if k.startswith("conv") and "kernel" in params[k])
  if not convs:
    raise ValueError(
      f"variables: expected SmallCNN parameters with conv1, conv2, ... kernels, got {list(params)}"
    )
  rng = jax.random.key(0) if rng is None else rng
  for i, name in enumerate(convs):
    kernel = params[name]["kernel"]
    if kernel.shape[:2] != (3, 3):
      raise ValueError(f"variables: expected 3x3 kernels, got {name} of shape {kernel.shape}")
    _, converted = construction.conv_to_attention(kernel, alpha=float(alpha))
    layer = dict(converted["params"])
    if encoding == "quadratic_content":
      c_in = kernel.shape[2]
      heads = layer["centers"].shape[0]
      key_kernel = jax.nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))(
        jax.random.fold_in(rng, i), (c_in, heads, qk_features), kernel.dtype
      )
      zeros = jnp.zeros((heads, qk_features), kernel.dtype)
      layer["query"] = {"kernel": jnp.zeros_like(key_kernel), "bias": zeros}
      layer["key"] = {"kernel": key_kernel, "bias": zeros}
    params[name] = layer
  out = {"params": params}
  if "batch_stats" in variables:
    out["batch_stats"] = variables["batch_stats"]
  return out


def transformed_cnn_from_cnn(
  variables: Mapping[str, Any],
  *,
  layers: tuple[str, ...] = ("conv3",),
  alpha: float = 20.0,
  gate_init: float = 17.0,
  qk_features: int = 8,
  rng: jax.Array | None = None,
) -> dict:
  """A trained :class:`SmallCNN` as a T-CNN: chosen convolutions become GPSA, content gated off.

  The Transformed CNN of d'Ascoli et al. (2021, "Transformed CNNs: recasting pre-trained
  convolutional layers with self-attention"): each layer in ``layers`` (by default the last
  stage, ``conv3``) becomes the gated positional self-attention (GPSA) layer of an
  :class:`AttentionCNN` with ``encoding="gpsa"`` and ``attention_layers=layers``:

  * positional half: :func:`attnconv.construction.conv_to_attention` of the kernel at sharpness
    ``alpha`` (centres on the kernel shifts, ``alpha``, out kernel = the kernel's slices);
  * content half: ``query`` and ``key`` kernels ``(C_in, 9, qk_features)`` drawn LeCun normal
    from ``rng``, biases 0;
  * gate ``lambda_0 = gate_init`` for every head: the layer mixes
    ``sigmoid(-lambda) softmax(q.k) + sigmoid(lambda) softmax(Eq. 9)``.

  Every other parameter (the other convolutions, BatchNorm and its statistics, the classifier)
  is copied. The network's outputs are then those of the CNN up to two leakages, each below the
  float32 resolution of the layer's output with the defaults: the content weight
  ``sigmoid(-17) = 4.1e-8 < 2^-24 = 6.0e-8``, and the positional off-target mass, at most
  ``(M - 1) e^{-alpha}`` over ``M`` keys (:func:`attnconv.bounds.offtarget_mass_bound`; about
  ``4 e^{-20} = 8.2e-9`` from the four lattice neighbours). Neither is exactly 0, so the
  gradients to the gate, the query/key kernels, the centres and ``alpha`` are non-zero (the GPSA
  mixing computes ``sigmoid(-lambda)`` directly, exact in the tail); they are of the order of the
  leakages. Adam's per-parameter normalisation turns such gradients into updates of up to the
  learning rate per step (less where they fall below Adam's ``eps``), so the gate can open only
  as fast as the learning rate moves it: ``lambda`` falls by at most about the sum of the
  learning rates over the run (plus decoupled weight decay), e.g. 2.75 over 5500 steps of a
  warm-up-cosine schedule peaking at 1e-3. A lower ``gate_init`` trades exact equivalence at step
  0 for a content half that can grow within the run.

  Args:
    variables: ``{'params': ..., 'batch_stats': ...}`` of a SmallCNN.
    layers: names of the convolutions to convert (``conv1``, ``conv2``, ...; 3x3 kernels).
    alpha: finite sharpness > 0 of the positional half.
    gate_init: the gate ``lambda_0`` (a finite float).
    qk_features: per-head query/key size (a positive int).
    rng: key of the query/key kernels (default ``jax.random.key(0)``).

  Returns:
    The AttentionCNN variables (plain dicts).

  Raises:
    TypeError: if ``alpha`` or ``gate_init`` is not a real number, or ``layers`` is not a tuple
      or list of names.
    ValueError: naming the argument: a non-positive or infinite ``alpha``, a non-finite
      ``gate_init``, a non-positive ``qk_features``, no convolution named in ``layers`` or a
      kernel that is not 3x3.
  """
  _check_alpha(alpha)
  if isinstance(gate_init, bool) or not isinstance(gate_init, (int, float)):
    raise TypeError(f"gate_init: expected a finite float, got {gate_init!r}")
  if not math.isfinite(gate_init):
    raise ValueError(f"gate_init: expected a finite float, got {gate_init}")
  if isinstance(qk_features, bool) or not isinstance(qk_features, int) or qk_features < 1:
    raise ValueError(f"qk_features: expected a positive int, got {qk_features!r}")
  if isinstance(layers, str) or not isinstance(layers, (tuple, list)):
    raise TypeError(f"layers: expected a tuple of convolution names, got {layers!r}")
  variables = flax.core.unfreeze(variables)
  params = dict(variables["params"])
  convs = sorted(k for k in params if k.startswith("conv") and "kernel" in params[k])
  if not layers or any(name not in convs for name in layers):
    raise ValueError(
      f"layers: expected a non-empty tuple of convolution names from {convs}, got {tuple(layers)!r}"
    )
  rng = jax.random.key(0) if rng is None else rng
  init = jax.nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
  for i, name in enumerate(layers):
    kernel = params[name]["kernel"]
    if kernel.shape[:2] != (3, 3):
      raise ValueError(f"variables: expected 3x3 kernels, got {name} of shape {kernel.shape}")
    _, converted = construction.conv_to_attention(kernel, alpha=float(alpha))
    layer = dict(converted["params"])
    heads, c_in = layer["centers"].shape[0], kernel.shape[2]
    q_key, k_key = jax.random.split(jax.random.fold_in(rng, i))
    zeros = jnp.zeros((heads, qk_features), kernel.dtype)
    layer["query"] = {
      "kernel": init(q_key, (c_in, heads, qk_features), kernel.dtype),
      "bias": zeros,
    }
    layer["key"] = {"kernel": init(k_key, (c_in, heads, qk_features), kernel.dtype), "bias": zeros}
    layer["gate"] = jnp.full((heads,), gate_init, kernel.dtype)
    params[name] = layer
  out = {"params": params}
  if "batch_stats" in variables:
    out["batch_stats"] = variables["batch_stats"]
  return out
