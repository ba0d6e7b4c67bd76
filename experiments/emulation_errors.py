"""Maximum absolute error of the attention emulation of a 3x3 convolution (README table).

Runs ``conv_to_attention`` (Theorem 1) on a ``(8, 16, 16, 32)`` input with a ``3x3x32x32``
kernel and ``'SAME'`` padding and compares it with ``flax.linen.Conv``:

* float32 and bfloat16 data (random normal; kernel scaled like LeCun-normal initialisation),
* ``implementation='dense'`` and ``'gather'``,
* the hard limit (``alpha=None``) and finite ``alpha`` in {5, 10, 20, 46} with the rigorous bound
  of :func:`attnconv.bounds.softmax_emulation_error_bound` (when that module exists),
* one integer-valued float32 row, where the hard-limit emulation is bitwise exact.

bfloat16 rows are compared both with the bfloat16 ``flax.linen.Conv`` and with the float32
convolution of the unrounded data. The script also records the smallest float32 ``alpha`` at
which the float32 softmax attention is exactly one-hot (and the smallest at which the target
probability rounds to 1.0), to compare with the paper's remark ``alpha = 46``.

Usage::

  python -m experiments.emulation_errors --out experiments/results/emulation_errors.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attnconv.construction import conv_to_attention

try:
  from attnconv import bounds
except ImportError:  # pragma: no cover - written concurrently
  bounds = None

ALPHAS = (5.0, 10.0, 20.0, 46.0)


def _conv(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  conv = nn.Conv(kernel.shape[-1], kernel.shape[:2], padding="SAME", precision="highest")
  return conv.apply({"params": {"kernel": kernel, "bias": bias}}, x)


def _attention(x, kernel, bias, *, alpha, implementation):
  module, variables = conv_to_attention(
    kernel, bias, padding="SAME", alpha=alpha, implementation=implementation
  )
  return module.apply(variables, x), module, variables


def _max_err(a: jax.Array, b: jax.Array) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def one_hot_thresholds(spatial=(8, 8)) -> dict:
  """Smallest float32 alphas making float32 softmax attention (3x3 'SAME') one-hot.

  ``exact_one_hot``: every probability is exactly 0.0 or 1.0; ``target_is_one``: the target
  probability rounds to 1.0 (the off-target ones may still be tiny non-zeros). Bisection over the
  bit patterns of positive float32 numbers (both properties are monotone in alpha).
  """
  module, variables = conv_to_attention(jnp.ones((3, 3, 1, 1)), alpha=1.0, padding="SAME")

  @jax.jit
  def probs(alpha):
    params = dict(variables["params"])
    params["alpha"] = jnp.full_like(params["alpha"], alpha)
    return module.apply({"params": params}, spatial, method=module.position_probabilities)

  tests = {
    "exact_one_hot": lambda p: bool(np.all((p == 0.0) | (p == 1.0))),
    "target_is_one": lambda p: bool(np.all(p.max(-1) == 1.0)),
  }
  as_float = lambda bits: np.array(bits, np.int32).view(np.float32).item()  # noqa: E731
  out = {}
  for name, ok in tests.items():
    lo, hi = int(np.float32(1.0).view(np.int32)), int(np.float32(1000.0).view(np.int32))
    assert not ok(np.asarray(probs(as_float(lo)))) and ok(np.asarray(probs(as_float(hi))))
    while hi - lo > 1:
      mid = (lo + hi) // 2
      if ok(np.asarray(probs(np.float32(as_float(mid))))):
        hi = mid
      else:
        lo = mid
    out[name] = as_float(hi)
  return out


def run() -> dict:
  shape, features = (8, 16, 16, 32), 32
  kx, kk, kb = jax.random.split(jax.random.key(0), 3)
  x32 = jax.random.normal(kx, shape, jnp.float32)
  kernel32 = jax.random.normal(kk, (3, 3, shape[-1], features), jnp.float32) / np.sqrt(9 * 32)
  bias32 = 0.1 * jax.random.normal(kb, (features,), jnp.float32)
  xi = jnp.round(4 * x32)  # integer data in about [-16, 16]
  ki = jnp.round(8 * kernel32 * np.sqrt(9 * 32) / 3)
  bi = jnp.round(10 * bias32)

  rows = []

  def add(data, dtype, implementation, alpha, x, kernel, bias, ref32):
    xc, kc, bc = (a.astype(dtype) for a in (x, kernel, bias))
    ref = _conv(xc, kc, bc)
    t0 = time.perf_counter()
    y, module, variables = _attention(xc, kc, bc, alpha=alpha, implementation=implementation)
    y.block_until_ready()
    row = {
      "data": data,
      "dtype": jnp.dtype(dtype).name,
      "implementation": implementation,
      "alpha": "inf (hard)" if alpha is None else alpha,
      "max_abs_error_vs_flax_conv": _max_err(y, ref),
      "max_abs_error_vs_float32_conv": _max_err(y, ref32),
      "bound": None,
      "seconds": round(time.perf_counter() - t0, 3),
    }
    if alpha is not None and bounds is not None:
      num_keys = module.apply(variables, xc, method=module.key_values).shape[1]
      row["bound"] = float(
        bounds.softmax_emulation_error_bound(
          np.asarray(kc, np.float32),
          alpha,
          input_bound=float(np.max(np.abs(np.asarray(xc, np.float32)))),
          num_keys=num_keys,
        )
      )
    rows.append(row)

  ref32 = _conv(x32, kernel32, bias32)
  for dtype in (jnp.float32, jnp.bfloat16):
    for implementation in ("dense", "gather"):
      add("normal", dtype, implementation, None, x32, kernel32, bias32, ref32)
    for alpha in ALPHAS:
      add("normal", dtype, "dense", alpha, x32, kernel32, bias32, ref32)
  refi = _conv(xi, ki, bi)
  for implementation in ("dense", "gather"):
    add("integer", jnp.float32, implementation, None, xi, ki, bi, refi)
  bf16_conv_error = _max_err(
    _conv(*(a.astype(jnp.bfloat16) for a in (x32, kernel32, bias32))), ref32
  )
  return {
    "command": "python -m experiments.emulation_errors " + " ".join(sys.argv[1:]),
    "versions": {
      "jax": jax.__version__,
      "flax": flax.__version__,
      "numpy": np.__version__,
      "python": platform.python_version(),
    },
    "backend": jax.default_backend(),
    "device": str(jax.devices()[0].device_kind),
    "setup": {
      "input_shape": list(shape),
      "kernel_shape": [3, 3, shape[-1], features],
      "padding": "SAME",
      "data": "x ~ N(0, 1); kernel ~ N(0, 1/(9*32)); bias ~ N(0, 0.01). Integer row: "
      "round(4x), round(8 k sqrt(288) / 3), round(10 b)",
      "reference": "flax.linen.Conv in the row's dtype (precision='highest'); also the float32 "
      "convolution of the unrounded data",
    },
    "bfloat16_flax_conv_error_vs_float32": bf16_conv_error,
    "float32_one_hot_alpha": one_hot_thresholds(),
    "float32_one_hot_alpha_predicted": (
      None if bounds is None else bounds.float32_one_hot_alpha().alpha_float
    ),
    "paper_one_hot_alpha": 46.0,
    "rows": rows,
  }


def markdown(result: dict) -> str:
  lines = [
    "| data | dtype | implementation | alpha | max abs error vs flax Conv "
    "| vs float32 Conv | bound |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in result["rows"]:
    bound = "-" if r["bound"] is None else f"{r['bound']:.3g}"
    lines.append(
      f"| {r['data']} | {r['dtype']} | {r['implementation']} | {r['alpha']} "
      f"| {r['max_abs_error_vs_flax_conv']:.3g} | {r['max_abs_error_vs_float32_conv']:.3g} "
      f"| {bound} |"
    )
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", type=Path, default=None, help="JSON output path")
  args = parser.parse_args(argv)
  result = run()
  print(markdown(result))
  print(
    f"\nbfloat16 flax.linen.Conv vs float32: {result['bfloat16_flax_conv_error_vs_float32']:.3g}"
  )
  print(
    f"float32 one-hot alpha thresholds: {result['float32_one_hot_alpha']} (predicted: "
    f"{result['float32_one_hot_alpha_predicted']}, paper: 46)"
  )
  if args.out is not None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
