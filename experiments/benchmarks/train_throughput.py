"""Training-step throughput and peak memory of the paper's models, side by side.

    python -m experiments.benchmarks.train_throughput --models=paper_quadratic,paper_learned \
      --batches=8,32 --dtypes=float32 --out runs/bench/train_cpu.json

On a GPU (bfloat16, the paper's batch)::

    python -m experiments.benchmarks.train_throughput --models=paper_quadratic --batches=100 \
      --dtypes=bfloat16 --out runs/bench/train_gpu.json

The models are those of ``experiments/configs/paper.py`` (6 layers, 9 heads, D = 400; CIFAR-shaped
32x32x3 input; SGD with momentum and weight decay), plus two variants of the quadratic model's
attention dropout. For each model, dtype, batch size (``--microbatches`` gradient-accumulation
slices where they divide it; ``--remat``: every block rematerialised), one fresh subprocess
compiles the jitted train step, runs 2 warm-up steps and ``--steps`` timed steps, and reports the
median images/s, its own peak resident memory (``host_peak_gib``) or the device's peak memory
(``device_peak_gib``, GPU), and the buffers XLA assigns to the step (``xla_step_buffers_gib``).
Also: multiply-adds per image (XLA's count of the forward pass, and an analytic count of the
authors' dense way and of this library's way), the step's FLOPs and achieved rate, and on a GPU
the model FLOP utilisation (bfloat16 on an H100 / H200) and the projected wall time of the
paper's 300-epoch CIFAR-10 run. The JSON output (``--out``) holds the rows and the machine: CPU
model, GPU name, core count, and the versions of jax, jaxlib and flax.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from experiments.benchmarks import common
from experiments.configs import paper


def _paper_model(model: str, **overrides) -> tuple[str, dict]:
  """``(model name, keyword arguments)`` of ``paper.py:<model>,cifar10``, with overrides."""
  kwargs = paper.get_config(f"{model},cifar10").model.to_dict()
  return kwargs.pop("name"), {**kwargs, **overrides}


# The paper's models as experiments/configs/paper.py builds them: the Gaussian attention
# (quadratic, generalized) shares one attention-dropout mask by the batch, the learned encodings
# draw one per image, as the authors' code.
MODELS = {
  "paper_quadratic": _paper_model("quadratic"),
  # One attention-dropout mask per image: the probabilities get a batch axis (B x more work).
  "paper_quadratic_per_image_dropout": _paper_model("quadratic", shared_dropout_mask=False),
  # Without attention dropout the batch-free separable path runs in training (fewest FLOPs).
  "paper_quadratic_no_attention_dropout": _paper_model("quadratic", attention_dropout_rate=0.0),
  "paper_generalized": _paper_model("generalized"),
  "paper_learned": _paper_model("learned"),
  "paper_learned_content": _paper_model("learned_content"),
  "paper_many_heads": _paper_model("many_heads"),
  "resnet18": _paper_model("resnet18"),
}

# Dense bfloat16 peak of one H100 SXM / H200 (NVIDIA datasheets, without sparsity), for MFU.
BF16_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12}
CIFAR_TRAIN_IMAGES_PER_EPOCH = 45_000  # 50,000 minus the 5,000-image validation split
PAPER_EPOCHS = 300

_CHILD = r"""
import json, sys, time, statistics
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
for _ in range(steps):
  t = time.perf_counter()
  params, opt, state, l = step(params, opt, state, x, y, rng); l.block_until_ready()
  times.append(time.perf_counter() - t)
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
      "device_peak_gib": peak, "device": dev.device_kind, "platform": dev.platform}))
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


def _annotate(row: dict) -> None:
  """Adds the GPU figures to a row: MFU (bfloat16 on a GPU of :data:`BF16_PEAK_FLOPS`) and the
  projected wall time of the paper's 300-epoch CIFAR-10 run."""
  ips = row.get("images_per_second")
  if not ips or row.get("platform") != "gpu":
    return
  device = str(row.get("device", ""))
  peaks = [peak for name, peak in BF16_PEAK_FLOPS.items() if name in device]
  if peaks and row.get("dtype") == "bfloat16" and row.get("achieved_tflops"):
    row["mfu"] = row["achieved_tflops"] * 1e12 / peaks[0]
  row["projected_300_epoch_minutes"] = PAPER_EPOCHS * CIFAR_TRAIN_IMAGES_PER_EPOCH / ips / 60


def _run_child(name: str, batch: int, dtype: str, micro: int, unroll: bool, args) -> dict:
  """One configuration in a fresh process: its row (``error`` when it failed)."""
  model, kwargs = MODELS[name]
  payload = json.dumps([model, kwargs, batch, dtype, args.remat, args.steps, micro, unroll])
  wrapper = (
    _CHILD
    + "\nimport resource\n"
    + "print('PEAK_KB=%d' % resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
  )
  try:
    proc = subprocess.run(
      [sys.executable, "-c", wrapper, payload],
      capture_output=True,
      text=True,
      timeout=args.timeout,
      check=False,
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
  }
  for line in out.splitlines():
    if line.startswith("RESULT="):
      row.update(json.loads(line[len("RESULT=") :]))
    if line.startswith("PEAK_KB="):
      row["host_peak_gib"] = int(line.split("=")[1]) / 2**20
  if "images_per_second" not in row:
    row["error"] = proc.stderr[-500:] if proc is not None else "timeout"
  elif model == "attention_net":
    row.update(analytic_macs(kwargs["encoding"], heads=kwargs["num_heads"]))
    if row.get("xla_fwd_macs_per_image"):
      row["xla_over_authors"] = row["xla_fwd_macs_per_image"] / row["authors_macs_per_image"]
  _annotate(row)
  return row


def _csv(text: str, name: str, kind=str) -> list:
  try:
    values = [kind(v) for v in text.split(",") if v]
  except ValueError:
    raise ValueError(
      f"--{name}: expected comma-separated {kind.__name__} values, got {text!r}"
    ) from None
  if not values:
    raise ValueError(f"--{name}: expected at least one value, got {text!r}")
  return values


def main(argv: list[str] | None = None) -> list[dict]:
  """Runs the sweep; returns the rows (also written to ``--out`` after every configuration)."""
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {list(MODELS)}")
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
  p.add_argument("--steps", type=int, default=5, help="timed steps after 2 warm-up steps")
  p.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
  p.add_argument("--out", default="runs/bench/train_throughput.json")
  args = p.parse_args(argv)
  names = _csv(args.models, "models")
  unknown = [n for n in names if n not in MODELS]
  if unknown:
    raise ValueError(f"--models: expected names of {list(MODELS)}, got {unknown}")
  dtypes = _csv(args.dtypes, "dtypes")
  if any(d not in ("float32", "bfloat16") for d in dtypes):
    raise ValueError(f"--dtypes: expected float32 and/or bfloat16, got {args.dtypes!r}")
  batches = _csv(args.batches, "batches", int)
  if args.microbatches < 1 or args.steps < 1:
    raise ValueError(
      f"--microbatches, --steps: expected positive integers, got {args.microbatches}, {args.steps}"
    )
  machine = common.machine_info()
  rows: list[dict] = []
  for name in names:
    for dtype in dtypes:
      for batch in batches:
        micro = args.microbatches if batch % args.microbatches == 0 else 1
        unroll = bool(args.unroll_microbatches and micro > 1)
        row = _run_child(name, batch, dtype, micro, unroll, args)
        rows.append(row)
        print({k: v for k, v in row.items() if k != "error"}, row.get("error", ""), flush=True)
        # written after every configuration, so a long sweep that is stopped keeps its rows
        common.write_json(args.out, {"machine": machine, "args": vars(args), "rows": rows})
  print(
    common.markdown_table(
      rows,
      [
        "model",
        "batch",
        "dtype",
        "microbatches",
        "images_per_second",
        "host_peak_gib",
        "xla_step_buffers_gib",
        "device_peak_gib",
        "achieved_tflops",
        "mfu",
        "params",
        "xla_fwd_macs_per_image",
        "authors_macs_per_image",
        "ours_macs_per_image",
      ],
    )
  )
  return rows


if __name__ == "__main__":
  main()
