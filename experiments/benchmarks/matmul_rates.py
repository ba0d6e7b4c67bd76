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

Then the per-image attention products at the paper's sizes (``--batch`` images, 9 heads, 256
tokens, 400 channels): the aggregation ``P V`` (``einsum('bhqk,bkc->bqhc')`` against
:func:`attnconv.matmul.bmm` of ``(B, H N, N) @ (B, N, C)``, heads moved after) and the content
scores ``q . k`` (``einsum('bqhd,bkhd->bhqk')`` against ``bmm(..., transpose_b=True)`` of
head-major copies), forward and forward + gradients.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from attnconv import attention as attn
from attnconv import matmul as mm
from experiments.benchmarks import common


def _forward_and_grad_rows(
  shape: str, dtype: str, impl: str, f, args: tuple, cot, flops: float, repeats: int
) -> list[dict]:
  """Median time and GFLOP/s of ``f(*args)`` and of its forward + both gradients (``jax.vjp``
  with the random cotangent ``cot``: a constant one would let XLA turn the gradient products
  into reductions; the primal is returned, so its product is not dropped)."""

  def grad_fn(a, b, g):
    y, pullback = jax.vjp(f, a, b)
    return (y, *pullback(g))

  rows = []
  for kind, fn, call_args, fl in (
    ("forward", jax.jit(f), args, flops),
    ("grad", jax.jit(grad_fn), (*args, cot), 3 * flops),
  ):
    t = common.time_fn(lambda fn=fn, a=call_args: fn(*a), warmup=2, repeats=repeats)
    row = {
      "shape": shape,
      "dtype": dtype,
      "impl": impl,
      "kind": kind,
      "median_ms": 1e3 * t["median_s"],
      "gflops": fl / t["median_s"] / 1e9,
    }
    rows.append(row)
    print(row, flush=True)
  return rows


def _aggregate_einsum(p, v):
  return jnp.einsum("bhqk,bkc->bqhc", p, v)


def _scores_einsum(q, k):
  return jnp.einsum("bqhd,bkhd->bhqk", q, k)


def _scores_bmm(q, k):
  qh = mm.row_major(q, (0, 2, 1, 3))
  kh = mm.row_major(k, (0, 2, 1, 3))
  return mm.bmm(qh, kh, transpose_b=True)


def attention_rows(batch: int, repeats: int, heads: int = 9, n: int = 256, c: int = 400):
  """Per-image aggregation and score products, einsum against attnconv.matmul.bmm."""
  rows = []
  flops = 2 * batch * heads * n * n * c
  for dtype in ("float32", "bfloat16"):
    keys = jax.random.split(jax.random.key(3), 4)
    probs = jax.random.uniform(keys[0], (batch, heads, n, n)).astype(dtype)
    values = jax.random.normal(keys[1], (batch, n, c)).astype(dtype)
    q = jax.random.normal(keys[2], (batch, n, heads, c)).astype(dtype)
    k = jax.random.normal(keys[3], (batch, n, heads, c)).astype(dtype)
    cases = (
      ("aggregate P V", (probs, values), (("einsum", _aggregate_einsum), ("bmm", attn.aggregate))),
      ("scores q.k", (q, k), (("einsum", _scores_einsum), ("bmm", _scores_bmm))),
    )
    for label, args, impls in cases:
      for impl, f in impls:
        cot = jax.random.normal(jax.random.key(4), jax.eval_shape(f, *args).shape).astype(dtype)
        shape = f"{label} B{batch} H{heads} N{n} C{c}"
        rows.extend(_forward_and_grad_rows(shape, dtype, impl, f, args, cot, flops, repeats))
  return rows


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--rows", default="2048,8192")
  p.add_argument("--inner", type=int, default=3600)
  p.add_argument("--cols", type=int, default=400)
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--batch", type=int, default=8, help="images for the per-image attention products")
  p.add_argument("--heads", type=int, default=9)
  p.add_argument("--tokens", type=int, default=256)
  p.add_argument("--channels", type=int, default=400)
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
        shape = f"{m}x{k} @ {k}x{n}"
        rows.extend(
          _forward_and_grad_rows(shape, dtype, impl, f, (x, w), g, 2 * m * k * n, args.repeats)
        )
  rows.extend(attention_rows(args.batch, args.repeats, args.heads, args.tokens, args.channels))
  print(common.markdown_table(rows, ["shape", "dtype", "impl", "kind", "median_ms", "gflops"]))
  common.write_json(args.out, {"machine": common.machine_info(), "args": vars(args), "rows": rows})


if __name__ == "__main__":
  main()
