"""Position-only attention cost against the number of tokens N, for every aggregation path.

    python -m experiments.benchmarks.positional_scaling --out experiments/results/bench_positional.json

Forward + backward of one quadratic-encoding layer (H heads, C channels, batch B) on an S x S grid,
S in {16, 24, 32, 48, 64}; paths: ``dense`` (softmax over all keys, aggregate, project),
``separable`` (per-axis softmaxes, two small contractions), each with the output projection fused
per head (the library's default) or unfused. Reports median time and XLA's temporary memory.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from attnconv import attention as attn
from attnconv import encodings as enc
from experiments.benchmarks import common


def make_fn(path: str, size: int, heads: int):
  pos = enc.grid_positions((size, size))
  centers = jnp.asarray(jax.random.normal(jax.random.key(0), (heads, 2)) * 2.0)
  alpha = jnp.full((heads,), 0.5)

  def fwd(x, kernel):
    axis_logits = enc.quadratic_axis_logits(pos, pos, centers, alpha)
    if path.startswith("separable"):
      probs = [attn.softmax(t) for t in axis_logits]
      if path == "separable":
        return attn.aggregate_project_separable(probs, x, (size, size), kernel)
      heads_out = attn.aggregate_separable(probs, x, (size, size))
    else:
      probs = attn.softmax(enc.combine_axis_logits(axis_logits))
      if path == "dense":
        return attn.aggregate_project(probs, x, kernel)
      heads_out = attn.aggregate(probs, x)
    return jnp.einsum("bqhc,hcd->bqd", heads_out, kernel)

  def loss(x, kernel):
    return jnp.sum(fwd(x, kernel) ** 2)

  return jax.jit(jax.grad(loss, argnums=(0, 1)))


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--sizes", default="16,24,32,48,64")
  p.add_argument("--paths", default="dense,dense_unfused,separable,separable_unfused")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--channels", type=int, default=64)
  p.add_argument("--heads", type=int, default=9)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--max_dense_tokens", type=int, default=48 * 48)
  p.add_argument("--out", default="experiments/results/bench_positional.json")
  args = p.parse_args(argv)
  rows = []
  for size in [int(s) for s in args.sizes.split(",")]:
    n = size * size
    x = jax.random.normal(jax.random.key(1), (args.batch, n, args.channels))
    kernel = jax.random.normal(jax.random.key(2), (args.heads, args.channels, args.channels)) * 0.05
    for path in args.paths.split(","):
      if path.startswith("dense") and n > args.max_dense_tokens:
        rows.append({"tokens": n, "grid": f"{size}x{size}", "path": path, "skipped": "memory"})
        continue
      fn = make_fn(path, size, args.heads)
      mem = fn.lower(x, kernel).compile().memory_analysis()
      t = common.time_fn(lambda fn=fn: fn(x, kernel), warmup=1, repeats=args.repeats)
      row = {
        "tokens": n,
        "grid": f"{size}x{size}",
        "path": path,
        "median_ms": 1e3 * t["median_s"],
        "temp_mib": (mem.temp_size_in_bytes / 2**20) if mem is not None else None,
      }
      rows.append(row)
      print(row, flush=True)
  base = {(r["tokens"]): r["median_ms"] for r in rows if r["path"] == "dense" and "median_ms" in r}
  for r in rows:
    if "median_ms" in r and r["tokens"] in base:
      r["speedup_vs_dense"] = base[r["tokens"]] / r["median_ms"]
  print(
    common.markdown_table(
      rows, ["grid", "tokens", "path", "median_ms", "temp_mib", "speedup_vs_dense"]
    )
  )
  common.write_json(args.out, {"machine": common.machine_info(), "args": vars(args), "rows": rows})


if __name__ == "__main__":
  main()
