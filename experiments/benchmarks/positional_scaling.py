"""Position-only attention cost against the number of tokens N, for every aggregation path.

    python -m experiments.benchmarks.positional_scaling --out experiments/results/bench_positional.json

Forward + backward of one quadratic-encoding layer (H heads, C channels, batch B) on an S x S grid,
S in {16, 24, 32, 48, 64}. Paths:

* ``dense`` / ``separable``: the attention itself -- probabilities (softmax over all keys, or the
  per-axis softmaxes) and aggregation to the per-head outputs ``(B, N, H, C)``;
* ``dense_projected`` / ``separable_projected``: the library's fused layer paths, which add the
  per-head output projection ``H C x C`` per token (the same cost in both, so it dilutes the
  ratio: at 16 x 16 at most (256 + 64) / (32 + 64) = 3.3x in multiply-adds).

By default the gradient is taken with respect to the input and the output kernel; with
``--position_grads`` also with respect to the centres and ``alpha``, as in training. The quick
model's sizes (batch 100, 64 channels; the data behind ``attention_net.SEPARABLE_MIN_TOKENS``)::

    python -m experiments.benchmarks.positional_scaling --sizes 7,8,10,12,14,16 --batch 100 \
      --channels 64 --paths dense_projected,separable_projected --position_grads --repeats 7 \
      --out experiments/results/bench_positional_small.json

Reports the median time, XLA's temporary memory, the speed-up over the dense path of the same
kind, and each path's growth exponent in N (log time ratio / log token ratio between sizes).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from attnconv import attention as attn
from attnconv import encodings as enc
from attnconv import grids
from experiments.benchmarks import common


def make_fn(path: str, size: int, heads: int, position_grads: bool = False):
  """Jitted gradient of a loss of one layer's output: with respect to the input and the output
  kernel, and with ``position_grads`` also the centres and ``alpha`` (as in training, where the
  gradient flows back through the probabilities)."""
  pos = grids.grid_positions((size, size))
  centers0 = jnp.asarray(jax.random.normal(jax.random.key(0), (heads, 2)) * 2.0)
  alpha0 = jnp.full((heads,), 0.5)

  def fwd(x, kernel, centers=centers0, alpha=alpha0):
    axis_logits = enc.quadratic_logits(pos, pos, centers, alpha)
    if path.endswith("_projected"):  # the layer's computation (attention.relative_attention)
      implementation = path.removesuffix("_projected")
      return attn.relative_attention(
        x, kernel, position_logits=axis_logits, implementation=implementation
      )
    if path == "separable":
      return attn.aggregate_separable([attn.softmax(t) for t in axis_logits], x)
    return attn.aggregate(attn.softmax(enc.combine_axis_logits(axis_logits)), x)

  if position_grads:

    def loss_all(x, kernel, centers, alpha):
      return jnp.sum(fwd(x, kernel, centers, alpha) ** 2)

    grad = jax.grad(loss_all, argnums=(0, 1, 2, 3))
    return jax.jit(lambda x, kernel: grad(x, kernel, centers0, alpha0))

  def loss(x, kernel):
    return jnp.sum(fwd(x, kernel) ** 2)

  return jax.jit(jax.grad(loss, argnums=(0, 1)))


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--sizes", default="16,24,32,48,64")
  p.add_argument("--paths", default="dense,separable,dense_projected,separable_projected")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--channels", type=int, default=64)
  p.add_argument("--heads", type=int, default=9)
  p.add_argument("--repeats", type=int, default=9)
  p.add_argument("--max_dense_tokens", type=int, default=48 * 48)
  p.add_argument(
    "--position_grads",
    action="store_true",
    help="also differentiate the centres and alpha (through the probabilities), as in training",
  )
  p.add_argument("--out", default="experiments/results/bench_positional.json")
  args = p.parse_args(argv)
  rows = []
  for size in [int(s) for s in args.sizes.split(",")]:
    n = size * size
    x = jax.random.normal(jax.random.key(1), (args.batch, n, args.channels))
    kernel = jax.random.normal(jax.random.key(2), (args.heads, args.channels, args.channels)) * 0.05
    fns = {}
    for path in args.paths.split(","):
      if path.startswith("dense") and n > args.max_dense_tokens:
        rows.append({"tokens": n, "grid": f"{size}x{size}", "path": path, "skipped": "memory"})
        continue
      fns[path] = make_fn(path, size, args.heads, args.position_grads)
    # The paths' repeats interleaved: a slow period of a shared machine hits all of them.
    timed = common.time_interleaved(
      {path: (lambda fn=fn: fn(x, kernel)) for path, fn in fns.items()},
      warmup=2,
      repeats=args.repeats,
    )
    for path, fn in fns.items():
      mem = fn.lower(x, kernel).compile().memory_analysis()
      row = {
        "tokens": n,
        "grid": f"{size}x{size}",
        "path": path,
        "median_ms": 1e3 * timed[path]["median_s"],
        "temp_mib": (mem.temp_size_in_bytes / 2**20) if mem is not None else None,
      }
      rows.append(row)
      print(row, flush=True)
  for r in rows:
    if "median_ms" not in r:
      continue
    kind = "dense_projected" if r["path"].endswith("_projected") else "dense"
    base = [
      q for q in rows if q["path"] == kind and q["tokens"] == r["tokens"] and "median_ms" in q
    ]
    if base:
      r["speedup_vs_dense"] = base[0]["median_ms"] / r["median_ms"]
    prev = [
      q for q in rows if q["path"] == r["path"] and q["tokens"] < r["tokens"] and "median_ms" in q
    ]
    if prev:
      q = prev[-1]
      r["growth_exponent"] = float(
        np.log(r["median_ms"] / q["median_ms"]) / np.log(r["tokens"] / q["tokens"])
      )
  print(
    common.markdown_table(
      rows,
      ["grid", "tokens", "path", "median_ms", "temp_mib", "speedup_vs_dense", "growth_exponent"],
    )
  )
  common.write_json(args.out, {"machine": common.machine_info(), "args": vars(args), "rows": rows})


if __name__ == "__main__":
  main()
