"""Matrix-product rates (GFLOP/s) of the forms a training step uses, float32 against bfloat16.

    python -m experiments.benchmarks.matmul_rates --out experiments/results/bench_matmul.json

For the paper model's largest product (tokens x (heads * D) @ (heads * D) x D: the per-head output
projection; ``--rows`` = batch x 256 tokens) it times, side by side in one process (median after
warm-up):

* ``forward``: ``x @ w``; ``grad``: forward + both gradients (``jax.vjp`` with a random
  cotangent): three products;
* ``plain``: ``jnp.matmul`` (bfloat16 result for bfloat16 operands);
* ``attnconv``: :func:`attnconv.matmul.matmul` (float32 accumulation, row-major transposes in the
  VJP; identical to ``plain`` for float32).

On CPUs with ``avx512_bf16`` the bfloat16 ``attnconv`` rows show the hardware's bfloat16 rate;
``plain`` bfloat16 falls back to a slower path than float32.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from attnconv import matmul as mm
from experiments.benchmarks import common


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--rows", default="2048,8192")
  p.add_argument("--inner", type=int, default=3600)
  p.add_argument("--cols", type=int, default=400)
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--out", default="experiments/results/bench_matmul.json")
  args = p.parse_args(argv)
  rows = []
  k, n = args.inner, args.cols
  for m in [int(v) for v in args.rows.split(",")]:
    for dtype in ("float32", "bfloat16"):
      x = jax.random.normal(jax.random.key(0), (m, k)).astype(dtype)
      w = jax.random.normal(jax.random.key(1), (k, n)).astype(dtype) * 0.02
      g = jax.random.normal(jax.random.key(2), (m, n)).astype(dtype)
      for impl, f in (("plain", jnp.matmul), ("attnconv", mm.matmul)):
        fwd = jax.jit(f)

        # forward + both gradients for a random cotangent (a constant one would let XLA turn the
        # gradient products into reductions)
        def grad_fn(x, w, g, f=f):
          y, pullback = jax.vjp(f, x, w)
          return (y, *pullback(g))  # the primal is returned, so its product is not dropped

        grad = jax.jit(grad_fn)
        for kind, fn, flops in (("forward", fwd, 2 * m * k * n), ("grad", grad, 6 * m * k * n)):
          t = common.time_fn(
            lambda fn=fn: fn(x, w, g) if fn is grad else fn(x, w), warmup=2, repeats=args.repeats
          )
          row = {
            "shape": f"{m}x{k} @ {k}x{n}",
            "dtype": dtype,
            "impl": impl,
            "kind": kind,
            "median_ms": 1e3 * t["median_s"],
            "gflops": flops / t["median_s"] / 1e9,
          }
          rows.append(row)
          print(row, flush=True)
  print(common.markdown_table(rows, ["shape", "dtype", "impl", "kind", "median_ms", "gflops"]))
  common.write_json(args.out, {"machine": common.machine_info(), "args": vars(args), "rows": rows})


if __name__ == "__main__":
  main()
