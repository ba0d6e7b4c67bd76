"""Emulated convolution (attention, dense and gather) against ``flax.linen.Conv``.

    python -m experiments.benchmarks.conv_emulation --out experiments/results/bench_conv.json

Forward time and XLA temporary memory for K x K kernels, K in {3, 5, 7}, on S x S images, S in
{8, 16, 32, 64, 128}, batch B, C_in = C_out = C, SAME padding; ratios are emulation / Conv,
measured side by side in one process: ``--rounds`` sweeps over all cases, in each the variants'
repeats interleaved; times and ratios are medians over the rounds of each round's median.
"""

from __future__ import annotations

import argparse
import statistics

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
  p.add_argument("--repeats", type=int, default=9, help="interleaved repeats per round")
  p.add_argument("--rounds", type=int, default=3, help="sweeps over all sizes; medians over rounds")
  p.add_argument("--max_dense_keys", type=int, default=40 * 40)
  p.add_argument("--out", default="experiments/results/bench_conv.json")
  args = p.parse_args(argv)
  c = args.channels
  cases = []  # (row, {name: call}, {name: temp MiB})
  for k in [int(v) for v in args.kernels.split(",")]:
    kernel = jax.random.normal(jax.random.key(0), (k, k, c, c)) / k
    bias = jax.random.normal(jax.random.key(1), (c,))
    conv = nn.Conv(c, (k, k), padding="SAME")
    conv_vars = {"params": {"kernel": kernel, "bias": bias}}
    for s in [int(v) for v in args.sizes.split(",")]:
      x = jax.random.normal(jax.random.key(2), (args.batch, s, s, c))
      fns = {"conv": (jax.jit(lambda v, x: conv.apply(v, x)), conv_vars)}
      for impl in ("dense", "gather"):
        if impl == "dense" and (s + k - 1) ** 2 > args.max_dense_keys:
          continue
        m, v = conv_to_attention(kernel, bias, padding="SAME", implementation=impl)
        fns[impl] = (jax.jit(lambda v, x, m=m: m.apply(v, x)), v)
      calls, temp = {}, {}
      for name, (fn, v) in fns.items():
        mem = fn.lower(v, x).compile().memory_analysis()
        temp[name] = (mem.temp_size_in_bytes / 2**20) if mem is not None else None
        calls[name] = lambda fn=fn, v=v, x=x: fn(v, x)
      cases.append(({"kernel": f"{k}x{k}", "image": f"{s}x{s}"}, calls, temp))
  # Rounds sweep every case in turn, so a slow period of the machine (they last seconds to
  # minutes) falls into one round of a case, not into all of its repeats.
  times = [{name: [] for name in calls} for _, calls, _ in cases]
  for r in range(args.rounds):
    for (_, calls, _), t in zip(cases, times):
      for name, res in common.time_interleaved(calls, warmup=1, repeats=args.repeats).items():
        t[name].append(res["median_s"])
    print(f"round {r + 1}/{args.rounds} done", flush=True)
  rows = []
  for (case, calls, temp), t in zip(cases, times):
    row = dict(case, conv_ms=1e3 * statistics.median(t["conv"]), conv_temp_mib=temp["conv"])
    for impl in ("dense", "gather"):
      if impl in calls:
        row[f"{impl}_ms"] = 1e3 * statistics.median(t[impl])
        ratios = [a / b for a, b in zip(t[impl], t["conv"])]
        row[f"{impl}_time_ratio"] = statistics.median(ratios)
        row[f"{impl}_time_ratio_rounds"] = ratios
        row[f"{impl}_temp_mib"] = temp[impl]
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
