"""Emulated convolution (attention, dense and gather) against ``flax.linen.Conv``.

    python -m experiments.benchmarks.conv_emulation --out experiments/results/bench_conv.json

Forward time (median after warm-up) and XLA temporary memory for K x K kernels, K in {3, 5, 7},
on S x S images, S in {8, 16, 32, 64, 128}, batch B, C_in = C_out = C, SAME padding; ratios are
emulation / Conv, measured side by side in one process.
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax

from attnconv import conv_to_attention
from experiments.benchmarks import common


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--kernels", default="3,5,7")
  p.add_argument("--sizes", default="8,16,32,64,128")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--channels", type=int, default=32)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--max_dense_keys", type=int, default=40 * 40)
  p.add_argument("--out", default="experiments/results/bench_conv.json")
  args = p.parse_args(argv)
  rows = []
  c = args.channels
  for k in [int(v) for v in args.kernels.split(",")]:
    kernel = jax.random.normal(jax.random.key(0), (k, k, c, c)) / k
    bias = jax.random.normal(jax.random.key(1), (c,))
    conv = nn.Conv(c, (k, k), padding="SAME")
    conv_vars = {"params": {"kernel": kernel, "bias": bias}}
    for s in [int(v) for v in args.sizes.split(",")]:
      x = jax.random.normal(jax.random.key(2), (args.batch, s, s, c))
      fns = {"conv": jax.jit(lambda v, x: conv.apply(v, x))}
      variables = {"conv": conv_vars}
      for impl in ("dense", "gather"):
        keys = (s + k - 1) ** 2
        if impl == "dense" and keys > args.max_dense_keys:
          continue
        m, v = conv_to_attention(kernel, bias, padding="SAME", implementation=impl)
        fns[impl] = jax.jit(lambda v, x, m=m: m.apply(v, x))
        variables[impl] = v
      res = {}
      for name, fn in fns.items():
        compiled = fn.lower(variables[name], x).compile()
        mem = compiled.memory_analysis()
        t = common.time_fn(
          lambda fn=fn, name=name: fn(variables[name], x), warmup=1, repeats=args.repeats
        )
        res[name] = (t["median_s"], (mem.temp_size_in_bytes / 2**20) if mem is not None else None)
      row = {
        "kernel": f"{k}x{k}",
        "image": f"{s}x{s}",
        "conv_ms": 1e3 * res["conv"][0],
        "conv_temp_mib": res["conv"][1],
      }
      for impl in ("dense", "gather"):
        if impl in res:
          row[f"{impl}_ms"] = 1e3 * res[impl][0]
          row[f"{impl}_time_ratio"] = res[impl][0] / res["conv"][0]
          row[f"{impl}_temp_mib"] = res[impl][1]
        else:
          row[f"{impl}_ms"] = "skipped (memory)"
      rows.append(row)
      print(row, flush=True)
  print(
    common.markdown_table(
      rows,
      [
        "kernel",
        "image",
        "conv_ms",
        "gather_ms",
        "gather_time_ratio",
        "dense_ms",
        "dense_time_ratio",
        "conv_temp_mib",
        "gather_temp_mib",
        "dense_temp_mib",
      ],
    )
  )
  common.write_json(args.out, {"machine": common.machine_info(), "args": vars(args), "rows": rows})


if __name__ == "__main__":
  main()
