"""Training-step throughput and peak memory of every paper model, side by side.

    python -m experiments.benchmarks.train_throughput --out experiments/results/bench_train_cpu.json

For each model (paper sizes: 6 layers, 9 heads, D = 400, CIFAR-shaped 32x32x3 input, SGD with
momentum), dtype and batch size, one fresh subprocess builds the jitted train step, runs 2 warm-up
steps and 5 timed steps, and reports the median images/s and its own peak resident memory (CPU)
or the device's peak memory (GPU), plus the buffers XLA assigns to the step
(``memory_analysis``). Also reported: multiply-adds per image (XLA's count of the forward pass,
and an analytic count the authors' dense way and ours), the step's FLOPs and achieved rate, the
ratio to the issue's PyTorch reference (CPU), and on an H100 the model FLOP utilisation and the
projected wall time of the paper's 300-epoch CIFAR-10 run. With ``--rounds R`` every
configuration runs R times, the rounds sweeping all configurations in turn, and the row is the
round with the median images/s (``images_per_second_rounds`` lists all). GPU::

    python -m experiments.benchmarks.train_throughput --models=paper_quadratic --batches=100 \
      --dtypes=bfloat16 --out experiments/results/bench_train_h100.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from experiments.benchmarks import common

# The authors' dropout: Gaussian attention (quadratic, generalized) shares one attention-dropout
# mask by the batch, the learned encodings draw one per image (as experiments/configs/paper_*).
MODELS = {
  "paper_quadratic": ("attention_net", {"encoding": "quadratic", "shared_dropout_mask": True}),
  # One attention-dropout mask per image: the probabilities get a batch axis (B x more work).
  "paper_quadratic_per_image_dropout": ("attention_net", {"encoding": "quadratic"}),
  # Without attention dropout the batch-free separable path runs in training (fewest FLOPs).
  "paper_quadratic_no_attention_dropout": (
    "attention_net",
    {"encoding": "quadratic", "attention_dropout_rate": 0.0},
  ),
  "paper_generalized": ("attention_net", {"encoding": "generalized", "shared_dropout_mask": True}),
  "paper_learned": ("attention_net", {"encoding": "learned"}),
  "paper_learned_content": ("attention_net", {"encoding": "learned_content"}),
  "resnet18": ("resnet18", {}),
}

# The issue's reference: the authors' PyTorch classes on the same 2-core CPU kind (torch 2.13 CPU),
# training img/s at batch 8 / 32 / 100 and peak memory (GiB) at batch 32 / 100.
REFERENCE_CPU = {
  "paper_quadratic": ({8: 5.9, 32: 5.7, 100: 3.6}, {32: 3.9, 100: 7.2}),
  "paper_generalized": ({8: 6.5, 32: 5.3, 100: 3.5}, {32: 4.0, 100: 7.3}),
  "paper_learned": ({8: 6.0, 32: 5.2, 100: 3.2}, {32: 4.0, 100: 9.1}),
  "paper_learned_content": ({8: 2.7, 32: 1.9}, {32: 7.8}),
  "resnet18": ({8: 92, 32: 101, 100: 96}, {32: 0.8, 100: 1.4}),
}
REFERENCE_CPU["paper_quadratic_per_image_dropout"] = REFERENCE_CPU["paper_quadratic"]
REFERENCE_CPU["paper_quadratic_no_attention_dropout"] = REFERENCE_CPU["paper_quadratic"]

# Dense bfloat16 peak of one H100 SXM (NVIDIA datasheet, without sparsity), for MFU.
H100_BF16_PEAK_FLOPS = 989e12
CIFAR_TRAIN_IMAGES_PER_EPOCH = 45_000  # 50,000 minus the 5,000-image validation split
PAPER_EPOCHS = 300

_CHILD = r"""
import json, resource, sys, time, statistics
import jax, jax.numpy as jnp, optax
from attnconv.models import build_model, count_params
from experiments.accumulation import accumulated_value_and_grad  # jax only (as experiments.train)
name, kwargs, batch, dtype, remat, steps, micro, unroll = json.loads(sys.argv[1])
kwargs = dict(kwargs)
if dtype == "bfloat16":
  kwargs["dtype"] = jnp.bfloat16
if remat and name == "attention_net":
  kwargs["remat"] = remat
model = build_model(name, num_classes=10, **kwargs)
x = jax.random.normal(jax.random.key(0), (batch, 32, 32, 3))
y = jnp.zeros((batch,), jnp.int32)
variables = model.init({"params": jax.random.key(1), "dropout": jax.random.key(2)}, x[:1])
params = variables["params"]
state = {k: v for k, v in variables.items() if k != "params"}
tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9))
opt = tx.init(params)
mutable = list(state.keys())

def loss_fn(p, st, x, y, rng):
  out = model.apply({"params": p, **st}, x, True, rngs={"dropout": rng}, mutable=mutable or False)
  logits, new_st = out if mutable else (out, {})
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), (logits, new_st)

def grads_of(p, st, x, y, rng):
  (l, (_, st)), g = accumulated_value_and_grad(loss_fn, p, st, (x, y), rng, micro, unroll)
  return (l, st), g

@jax.jit
def step(p, o, st, x, y, rng):
  (l, st), g = grads_of(p, st, x, y, rng)
  u, o = tx.update(g, o, p)
  return optax.apply_updates(p, u), o, st, l

compiled = step.lower(params, opt, state, x, y, jax.random.key(3)).compile()
step_cost = compiled.cost_analysis()
step_cost = step_cost[0] if isinstance(step_cost, (list, tuple)) else step_cost
# XLA counts a loop body once: scale by the number of accumulated slices (unrolled, the body
# holds all of them)
step_flops = (1 if unroll else micro) * float(step_cost.get("flops", 0.0)) if step_cost else 0.0
mem = compiled.memory_analysis()
xla_bytes = None
if mem is not None:
  xla_bytes = sum(getattr(mem, k, 0) or 0 for k in ("temp_size_in_bytes", "argument_size_in_bytes",
      "output_size_in_bytes")) - (getattr(mem, "alias_size_in_bytes", 0) or 0)
fwd = jax.jit(lambda p, st, x: model.apply({"params": p, **st}, x, False))
cost = fwd.lower(params, state, x[:1]).compile().cost_analysis()
cost = cost[0] if isinstance(cost, (list, tuple)) else cost
flops = float(cost.get("flops", 0.0)) if cost else 0.0
rng = jax.random.key(3)
for _ in range(2):
  params, opt, state, l = step(params, opt, state, x, y, rng); l.block_until_ready()
times = []
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(steps):
  t = time.perf_counter()
  params, opt, state, l = step(params, opt, state, x, y, rng); l.block_until_ready()
  times.append(time.perf_counter() - t)
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps
med = statistics.median(times)
dev = jax.devices()[0]
peak = None
try:
  peak = dev.memory_stats()["peak_bytes_in_use"] / 2**30
except Exception:
  pass
print("RESULT=" + json.dumps({"images_per_second": batch / med, "step_s": med,
      "step_min_s": min(times), "step_max_s": max(times),
      "params": count_params(params), "xla_fwd_macs_per_image": flops / 2,
      "xla_step_flops": step_flops, "achieved_tflops": step_flops / med / 1e12,
      "xla_step_buffers_gib": None if xla_bytes is None else xla_bytes / 2**30,
      "device_peak_gib": peak, "device": dev.device_kind, "platform": dev.platform,
      "page_faults_per_step": faults}))
"""


def analytic_macs(
  encoding: str,
  heads: int = 9,
  d: int = 400,
  mlp: int = 512,
  layers: int = 6,
  tokens: int = 256,
  side: int = 16,
  classes: int = 10,
  in_ch: int = 12,
) -> dict:
  """Multiply-adds per image: the authors' dense way and this library's separable way."""
  per_layer_linear = tokens * (heads * d * d + d * d + 2 * d * mlp)
  if encoding == "learned_content":
    per_layer_linear += tokens * 2 * d * heads * d  # query, key projections
    content = heads * tokens * tokens * d + heads * tokens * 2 * side * (d // 2)  # q.k, q.r
  else:
    content = 0
  dense_agg = heads * tokens * tokens * d
  sep_agg = heads * tokens * 2 * side * d
  stem = tokens * in_ch * d + d * classes
  authors = layers * (per_layer_linear + content + dense_agg) + stem
  ours_agg = dense_agg if encoding in ("generalized", "learned_content") else sep_agg
  ours = layers * (per_layer_linear + content + ours_agg) + stem
  return {"authors_macs_per_image": authors, "ours_macs_per_image": ours}


def _annotate(row: dict, name: str) -> None:
  """Adds the reference ratios (CPU), MFU and the projected 300-epoch time (GPU)."""
  ips = row.get("images_per_second")
  if not ips:
    return
  if row.get("platform") == "cpu" and name in REFERENCE_CPU:
    ref_ips, ref_mem = REFERENCE_CPU[name]
    if row["batch"] in ref_ips:
      row["reference_images_per_second"] = ref_ips[row["batch"]]
      row["x_reference"] = ips / ref_ips[row["batch"]]
    if row["batch"] in ref_mem:
      row["reference_peak_gib"] = ref_mem[row["batch"]]
      if row.get("host_peak_gib"):
        row["memory_over_reference"] = row["host_peak_gib"] / ref_mem[row["batch"]]
  if row.get("platform") == "gpu":
    if "H100" in str(row.get("device", "")) and row.get("achieved_tflops"):
      row["mfu"] = row["achieved_tflops"] * 1e12 / H100_BF16_PEAK_FLOPS
    row["projected_300_epoch_minutes"] = PAPER_EPOCHS * CIFAR_TRAIN_IMAGES_PER_EPOCH / ips / 60


def combine_rounds(runs: list[dict]) -> dict:
  """One row from the same configuration's runs in several rounds: the run with the median
  images/s (the lower median for an even count), with every round's images/s listed and the
  largest peak memory. A configuration that failed in every round keeps its first error."""
  ok = [r for r in runs if r.get("images_per_second")]
  if not ok:
    return dict(runs[0])
  ok = sorted(ok, key=lambda r: r["images_per_second"])
  row = dict(ok[(len(ok) - 1) // 2])
  row["images_per_second_rounds"] = [r.get("images_per_second") for r in runs]
  peaks = [r["host_peak_gib"] for r in ok if r.get("host_peak_gib") is not None]
  if peaks:
    row["host_peak_gib"] = max(peaks)
  return row


def _run_child(name, model, kwargs, batch, dtype, micro, unroll, allocator, args) -> dict:
  payload = json.dumps([model, kwargs, batch, dtype, args.remat, args.steps, micro, unroll])
  wrapper = _CHILD + "\nprint('PEAK_KB=%d' % resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
  try:
    proc = subprocess.run(
      [sys.executable, "-c", wrapper, payload],
      capture_output=True,
      text=True,
      timeout=args.timeout,
      check=False,
      env=common.allocator_env(allocator),
    )
    out = proc.stdout
  except subprocess.TimeoutExpired:
    out, proc = "", None
  row = {
    "model": name,
    "batch": batch,
    "dtype": dtype,
    "remat": args.remat,
    "microbatches": micro,
    "unroll_microbatches": unroll,
    "allocator": allocator,
  }
  for line in out.splitlines():
    if line.startswith("RESULT="):
      row.update(json.loads(line[len("RESULT=") :]))
    if line.startswith("PEAK_KB="):
      row["host_peak_gib"] = int(line.split("=")[1]) / 2**20
  if "images_per_second" not in row:
    row["error"] = proc.stderr[-500:] if proc is not None else "timeout"
  return row


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--models", default=",".join(MODELS))
  p.add_argument("--batches", default="8,32,100")
  p.add_argument("--dtypes", default="float32", help="comma-separated: float32,bfloat16")
  p.add_argument("--remat", action="store_true", help="rematerialise every block (AttentionNet)")
  p.add_argument(
    "--microbatches",
    type=int,
    default=1,
    help="gradient accumulation slices (used for batches it divides)",
  )
  p.add_argument(
    "--unroll_microbatches",
    action="store_true",
    help="unroll the accumulation loop (fast convolutions on XLA:CPU; more memory)",
  )
  p.add_argument(
    "--allocators",
    default="system",
    help="comma-separated host allocators of the child processes, each configuration run under "
    "each in turn: system, tcmalloc (LD_PRELOAD; apt-get install libtcmalloc-minimal4), thp "
    "(glibc.malloc.hugetlb=1); see common.allocator_env",
  )
  p.add_argument("--steps", type=int, default=5)
  p.add_argument(
    "--rounds",
    type=int,
    default=1,
    help="sweeps over all configurations (a fresh process each); the row is the median round",
  )
  p.add_argument("--timeout", type=float, default=1800)
  p.add_argument("--out", default="experiments/results/bench_train_cpu.json")
  args = p.parse_args(argv)
  allocators = args.allocators.split(",")
  for allocator in allocators:
    common.allocator_env(allocator)  # fail before the sweep on a bad or missing allocator
  configs = []
  for name in args.models.split(","):
    model, kwargs = MODELS[name]
    for dtype in args.dtypes.split(","):
      for batch in [int(b) for b in args.batches.split(",")]:
        micro = args.microbatches if batch % args.microbatches == 0 else 1
        unroll = bool(args.unroll_microbatches and micro > 1)
        for allocator in allocators:
          configs.append((name, model, kwargs, batch, dtype, micro, unroll, allocator))
  # Rounds sweep all configurations in turn: a slow period of a shared machine (seconds to
  # minutes) then falls into one round of a configuration rather than into all of its steps.
  runs: list[list[dict]] = [[] for _ in configs]
  rows: list[dict] = []
  for r in range(args.rounds):
    for cfg, done in zip(configs, runs):
      run = _run_child(*cfg, args)
      done.append(run)
      print(
        f"round {r + 1}/{args.rounds}",
        {k: v for k, v in run.items() if k != "error"},
        run.get("error", ""),
        flush=True,
      )
      rows = []
      for (name, model, kwargs, *_), rs in zip(configs, runs):
        if not rs:
          continue
        row = combine_rounds(rs)
        if model == "attention_net":
          row.update(analytic_macs(kwargs["encoding"]))
          if row.get("xla_fwd_macs_per_image"):
            row["xla_over_authors"] = row["xla_fwd_macs_per_image"] / row["authors_macs_per_image"]
        _annotate(row, name)
        rows.append(row)
      # written after every run, so a long sweep that is stopped keeps its rows
      common.write_json(
        args.out, {"machine": common.machine_info(), "args": vars(args), "rows": rows}
      )
  print(
    common.markdown_table(
      rows,
      [
        "model",
        "batch",
        "dtype",
        "microbatches",
        "allocator",
        "images_per_second",
        "x_reference",
        "host_peak_gib",
        "xla_step_buffers_gib",
        "page_faults_per_step",
        "device_peak_gib",
        "achieved_tflops",
        "params",
        "xla_fwd_macs_per_image",
        "authors_macs_per_image",
        "ours_macs_per_image",
      ],
    )
  )


if __name__ == "__main__":
  main()
