"""Has a quadratic attention network's layer settled on the paper's grid of heads?

Usage (after training ``experiments/configs/grid.py`` runs)::

  python -m experiments.grid_formation --workdirs=runs/grid/adamw,runs/grid/sgd \
    --out=experiments/results/grid_formation.json --plot=experiments/results/grid_formation.png

Reads each trainer workdir's ``config.json``, ``metrics.jsonl`` and ``centers.jsonl`` (every
quadratic head's centre ``Delta_h`` and sharpness ``alpha_h`` at initialisation and at every
evaluation). Eq. 9's probabilities depend on nothing else, so every measure below is exact, with
no images involved. Per layer, at initialisation and at the end of training:

* ``lattice_distance``: the mean Euclidean distance (tokens) of the layer's ``H = (2k+1)^2``
  centres to the lattice ``{-k..k}^2`` (the 3x3 kernel's shifts for 9 heads) under the optimal
  one-to-one matching (:func:`lattice_distance`); 0 exactly on the grid;
* its null distribution: the same distance for centres drawn from the initialisation
  ``N(0, center_init_std^2)`` (``--null_draws`` draws): mean and 5th percentile;
* ``peak_mass``: per head, the largest probability given to one key by a query at the centre of
  the token grid (1 for Lemma 1's hard attention; median over heads reported);
* ``alpha`` per head, ``r90`` (the smallest radius around the query holding 90% of the head's
  mass, at the same query) and the attention distance (the probability-weighted mean
  query-key distance over all queries, :func:`attnconv.attention.attention_distance`).

The criterion (``experiments/configs/grid.py``, stated before the runs): a layer has formed the
grid when its final lattice distance is <= ``--max_lattice_distance`` (0.3) and below the null's
5th percentile, and its median peak mass is >= ``--min_peak_mass`` (0.5).
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import app, flags
from scipy.optimize import linear_sum_assignment

from attnconv import attention as attn
from attnconv import encodings as enc
from attnconv import grids
from experiments.jsonl import read_jsonl

FLAGS = flags.FLAGS

MAX_LATTICE_DISTANCE = 0.3
MIN_PEAK_MASS = 0.5


def lattice(num_heads: int, d: int = 2) -> np.ndarray:
  """``(H, d)`` integer shifts ``{-k..k}^d`` of a ``(2k+1)^d``-head grid (row-major)."""
  side = round(num_heads ** (1.0 / d))
  if side**d != num_heads or side % 2 == 0:
    raise ValueError(f"num_heads: expected (2k+1)^{d} heads (a centred lattice), got {num_heads}")
  k = side // 2
  axes = np.meshgrid(*[np.arange(-k, k + 1)] * d, indexing="ij")
  return np.stack(axes, -1).reshape(-1, d).astype(np.float64)


def lattice_distance(centers: np.ndarray) -> float:
  """Mean distance of ``(H, d)`` centres to the ``H``-point lattice under the optimal matching.

  The matching (each centre to its own lattice shift) minimises the summed Euclidean distance
  (Hungarian algorithm); the returned value is that minimum divided by ``H``.
  """
  centers = np.asarray(centers, np.float64)
  if centers.ndim != 2:
    raise ValueError(f"centers: expected shape (H, d), got {centers.shape}")
  target = lattice(centers.shape[0], centers.shape[1])
  cost = np.linalg.norm(centers[:, None, :] - target[None, :, :], axis=-1)
  rows, cols = linear_sum_assignment(cost)
  return float(cost[rows, cols].mean())


def lattice_distance_null(
  num_heads: int, center_std: float, draws: int = 2000, seed: int = 0, d: int = 2
) -> dict[str, float]:
  """Lattice distance of centres drawn i.i.d. ``N(0, center_std^2)``: mean, 5th percentile,
  and the number of draws."""
  if draws < 1:
    raise ValueError(f"draws: expected >= 1, got {draws}")
  rng = np.random.default_rng(seed)
  values = np.array(
    [lattice_distance(center_std * rng.standard_normal((num_heads, d))) for _ in range(draws)]
  )
  return {"mean": float(values.mean()), "p5": float(np.percentile(values, 5)), "draws": draws}


def head_probabilities(centers: np.ndarray, alpha: np.ndarray, grid: Sequence[int]) -> np.ndarray:
  """``(H, N, N)`` Eq. 9 probabilities of every query over every key of a token ``grid``."""
  positions = grids.grid_positions(grid)
  logits = enc.quadratic_logits(
    positions, positions, np.asarray(centers, np.float32), np.asarray(alpha, np.float32)
  )
  return np.asarray(attn.position_probs(logits), np.float64)


def head_measures(centers: np.ndarray, alpha: np.ndarray, grid: Sequence[int]) -> dict[str, Any]:
  """Per-head peak mass and r90 at the centre query, attention distance over all queries."""
  grid = tuple(int(g) for g in grid)
  probs = head_probabilities(centers, alpha, grid)  # (H, N, N)
  query = int(np.ravel_multi_index(tuple(g // 2 for g in grid), grid))
  p = probs[:, query, :]  # (H, N)
  positions = grids.grid_positions(grid)
  coords = np.stack(np.meshgrid(*positions, indexing="ij"), -1).reshape(-1, len(grid))
  dist = np.linalg.norm(coords - coords[query], axis=-1)
  order = np.argsort(dist, kind="stable")
  cum = np.cumsum(p[:, order], axis=-1)
  r90 = dist[order][np.argmax(cum >= 0.9 - 1e-9, axis=-1)]
  distance = np.asarray(attn.attention_distance(probs, positions, positions), np.float64)
  return {
    "peak_mass": p.max(-1).tolist(),
    "r90": r90.tolist(),
    "attention_distance": distance.tolist(),
  }


def _token_grid(config: Mapping[str, Any]) -> tuple[int, int]:
  sizes = {"fashion_mnist": 28, "cifar10": 32}
  name = config["dataset"]["name"]
  if name not in sizes:
    raise ValueError(f"config.dataset.name: expected one of {sorted(sizes)}, got {name!r}")
  side = sizes[name] // int(config["model"].get("downsample", 1))
  return side, side


def layer_summary(
  centers_init: np.ndarray,
  alpha_init: np.ndarray,
  centers_final: np.ndarray,
  alpha_final: np.ndarray,
  grid: Sequence[int],
  null: Mapping[str, float],
  max_lattice_distance: float = MAX_LATTICE_DISTANCE,
  min_peak_mass: float = MIN_PEAK_MASS,
) -> dict[str, Any]:
  """One layer's grid measures at initialisation and at the end, and the criterion's verdict."""
  init = head_measures(centers_init, alpha_init, grid)
  final = head_measures(centers_final, alpha_final, grid)
  d_init, d_final = lattice_distance(centers_init), lattice_distance(centers_final)
  peak = float(np.median(final["peak_mass"]))
  return {
    "lattice_distance_init": d_init,
    "lattice_distance_final": d_final,
    "lattice_distance_null_mean": null["mean"],
    "lattice_distance_null_p5": null["p5"],
    "peak_mass_init": float(np.median(init["peak_mass"])),
    "peak_mass_final": peak,
    "peak_mass_final_per_head": final["peak_mass"],
    "alpha_init": np.asarray(alpha_init, np.float64).tolist(),
    "alpha_final": np.asarray(alpha_final, np.float64).tolist(),
    "r90_init": init["r90"],
    "r90_final": final["r90"],
    "attention_distance_init": init["attention_distance"],
    "attention_distance_final": final["attention_distance"],
    "centers_init": np.asarray(centers_init, np.float64).tolist(),
    "centers_final": np.asarray(centers_final, np.float64).tolist(),
    "formed": bool(
      d_final <= max_lattice_distance and d_final < null["p5"] and peak >= min_peak_mass
    ),
  }


def analyse_run(
  workdir: str | os.PathLike, null_draws: int = 2000, **criterion: float
) -> dict[str, Any]:
  """The grid measures of one trainer workdir (see the module docstring)."""
  workdir = pathlib.Path(workdir)
  config = json.loads((workdir / "config.json").read_text())
  records = sorted(read_jsonl(workdir / "centers.jsonl"), key=lambda r: r["step"])
  if len(records) < 2:
    raise ValueError(
      f"workdir: expected centers.jsonl with the initial and at least one trained record in "
      f"{workdir}, got {len(records)} record(s)"
    )
  metrics = read_jsonl(workdir / "metrics.jsonl")
  grid = _token_grid(config)
  std = float(config["model"].get("center_init_std", 2.0))
  first, last = records[0], records[-1]
  layers = sorted(
    first["centers"],
    key=lambda k: [int(t) if t.isdigit() else t for t in k.replace("/", "_").split("_")],
  )
  out_layers = []
  for name in layers:
    c0, c1 = np.asarray(first["centers"][name]), np.asarray(last["centers"][name])
    null = lattice_distance_null(c0.shape[0], std, draws=null_draws, d=c0.shape[1])
    entry = {"layer": name.split("/")[0]}
    entry.update(
      layer_summary(
        c0,
        np.asarray(first["alpha"][name]),
        c1,
        np.asarray(last["alpha"][name]),
        grid,
        null,
        **criterion,
      )
    )
    entry["lattice_distance_trajectory"] = [
      [r["step"], lattice_distance(np.asarray(r["centers"][name]))] for r in records
    ]
    entry["alpha_median_trajectory"] = [
      [r["step"], float(np.median(r["alpha"][name]))] for r in records
    ]
    if "gate" in first:
      entry["gate_trajectory"] = [[r["step"], r["gate"][name]] for r in records if "gate" in r]
    out_layers.append(entry)
  final_metrics = metrics[-1] if metrics else {}
  summary_path = workdir / "summary.json"
  summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
  return {
    "workdir": str(workdir),
    "optimizer": config.get("optimizer"),
    "encoding": config["model"].get("encoding"),
    "epochs": float(final_metrics.get("epoch", float("nan"))),
    "planned_epochs": config.get("num_epochs"),
    "steps": int(last["step"]),
    "tokens": list(grid),
    "final_train_accuracy": final_metrics.get("train_accuracy"),
    "test_accuracy": summary.get("final_test_accuracy", final_metrics.get("test_accuracy")),
    "train_seconds": final_metrics.get("train_seconds"),
    "cpu_seconds": final_metrics.get("cpu_seconds"),
    "layers": out_layers,
    "formed": bool(out_layers[0]["formed"]),
  }


def checkpoint_trajectories(workdir: str | os.PathLike, num_images: int = 100) -> dict[str, Any]:
  """Per layer, the gate ``sigmoid(lambda_h)`` (GPSA layers) and the attention distance of every
  head at initialisation and at every kept training checkpoint, on the first ``num_images``
  test images (each block's maps of its own input)."""
  import jax
  import orbax.checkpoint as ocp

  from experiments import receptive_field as rf
  from experiments import train as train_lib

  workdir = pathlib.Path(workdir)
  config, dataset, model, images, grid = rf._load_run(workdir, num_images)
  snapshots = [(0, train_lib.initial_variables(config, model, dataset.image_shape))]
  with ocp.CheckpointManager((workdir / "checkpoints").absolute()) as manager:
    for step in sorted(manager.all_steps()):
      restored = manager.restore(step, args=ocp.args.StandardRestore())
      variables = {"params": restored["params"]}
      if restored.get("batch_stats"):
        variables["batch_stats"] = restored["batch_stats"]
      snapshots.append((int(step), variables))
  if len(snapshots) < 2:
    raise ValueError(f"workdir: expected training checkpoints in {workdir}, found none")
  distances: dict[int, list] = {}
  gates: dict[int, list] = {}
  probabilities = rf._sown_probabilities_fn(model)
  for step, variables in snapshots:
    probs = probabilities(variables, images)
    for layer, d in enumerate(rf.layer_attention_distances(probs, grid)):
      distances.setdefault(layer, []).append([step, np.round(d, 4).tolist()])
    params = jax.device_get(variables["params"])
    for layer in range(len(probs)):
      attention = params.get(f"block_{layer}", {}).get("attention", {})
      if "gate" in attention:
        gate = 1.0 / (1.0 + np.exp(-np.asarray(attention["gate"], np.float64)))
        gates.setdefault(layer, []).append([step, np.round(gate, 4).tolist()])
  return {
    "tokens": list(grid),
    "images": int(num_images),
    "layers": [
      {
        "layer": f"block_{layer}",
        "attention_distance_trajectory": distances[layer],
        **({"gate_trajectory": gates[layer]} if layer in gates else {}),
      }
      for layer in sorted(distances)
    ],
  }


def plot_trajectories(trajectories: Mapping[str, Any], path: str | os.PathLike) -> pathlib.Path:
  """ConViT's picture of layers leaving locality: per layer, the mean gate ``sigmoid(lambda)``
  and the mean attention distance (with the heads' range) against the training step."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  layers = trajectories["layers"]
  has_gate = any("gate_trajectory" in layer for layer in layers)
  fig, axes = plt.subplots(1, 2 if has_gate else 1, figsize=(9 if has_gate else 4.8, 3.4))
  axes = np.atleast_1d(axes)
  for i, layer in enumerate(layers):
    color = f"C{i}"
    steps = np.array([t[0] for t in layer["attention_distance_trajectory"]])
    d = np.array([t[1] for t in layer["attention_distance_trajectory"]])
    axes[0].plot(steps, d.mean(1), "-o", color=color, markersize=3, label=layer["layer"])
    axes[0].fill_between(steps, d.min(1), d.max(1), color=color, alpha=0.15)
    if "gate_trajectory" in layer:
      g = np.array([t[1] for t in layer["gate_trajectory"]])
      gs = np.array([t[0] for t in layer["gate_trajectory"]])
      axes[1].plot(gs, g.mean(1), "-o", color=color, markersize=3, label=layer["layer"])
      axes[1].fill_between(gs, g.min(1), g.max(1), color=color, alpha=0.15)
  axes[0].set_xlabel("step")
  axes[0].set_ylabel("attention distance (tokens)")
  axes[0].legend(fontsize=7)
  if has_gate:
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("gate sigmoid(lambda): positional share")
    axes[1].set_ylim(0, 1)
  fig.tight_layout()
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def plot(result: Mapping[str, Any], path: str | os.PathLike) -> pathlib.Path:
  """Per layer: each head's attention around the centre query at initialisation and at the end
  (50% solid / 90% dotted contours at token resolution), and the centres' trajectories with the
  lattice marked."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from experiments import plots

  grid = tuple(result["tokens"])
  layers = result["layers"]
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig, axes = plt.subplots(len(layers), 3, figsize=(8.4, 2.8 * len(layers)), squeeze=False)
  q = tuple(g // 2 for g in grid)
  qi = int(np.ravel_multi_index(q, grid))
  for i, layer in enumerate(layers):
    for j, when in enumerate(("init", "final")):
      probs = head_probabilities(layer[f"centers_{when}"], layer[f"alpha_{when}"], grid)
      maps = probs[:, qi, :].reshape(-1, *grid)
      cropped, qc = plots.crop(maps, q, 9)
      plots.draw_contours(axes[i, j], cropped, qc, (0.5, 0.9))
      axes[i, j].set_title(
        f"{layer['layer']} {when}: lattice d {layer[f'lattice_distance_{when}']:.2f}, "
        f"peak {layer[f'peak_mass_{when}']:.2f}",
        fontsize=7,
      )
    ax = axes[i, 2]
    lat = lattice(len(layer["centers_init"]))
    ax.plot(lat[:, 1], lat[:, 0], "s", color="black", markersize=4, fillstyle="none")
    c0 = np.asarray(layer["centers_init"])
    c1 = np.asarray(layer["centers_final"])
    for h in range(c0.shape[0]):
      color = plots.head_color(h)
      ax.plot([c0[h, 1], c1[h, 1]], [c0[h, 0], c1[h, 0]], ":", color=color, linewidth=0.8)
      ax.plot(c0[h, 1], c0[h, 0], "o", color=color, markersize=3, alpha=0.6)
      ax.plot(c1[h, 1], c1[h, 0], "*", color=color, markersize=8)
    ax.set_aspect("equal", adjustable="datalim")
    ax.invert_yaxis()
    ax.grid(True, color="#dddddd", linewidth=0.5)
    ax.set_title(
      f"centres: o init, * final (null d {layer['lattice_distance_null_mean']:.2f})", fontsize=7
    )
  fig.suptitle(
    f"{result.get('encoding')} / {result.get('optimizer')}, {result['epochs']:.0f} epochs, "
    f"{grid[0]}x{grid[1]} tokens",
    fontsize=9,
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def _define_flags() -> None:
  flags.DEFINE_list("workdirs", None, "Trainer workdirs; the first one is the headline run.")
  flags.DEFINE_string("out", "experiments/results/grid_formation.json", "Output JSON.")
  flags.DEFINE_string("plot", "experiments/results/grid_formation.png", "Output figure ('' none).")
  flags.DEFINE_integer("null_draws", 2000, "Draws of the initialisation's lattice distance.")
  flags.DEFINE_float("max_lattice_distance", MAX_LATTICE_DISTANCE, "Criterion (tokens).")
  flags.DEFINE_float("min_peak_mass", MIN_PEAK_MASS, "Criterion (median over heads).")
  flags.DEFINE_list(
    "trajectory_workdirs",
    [],
    "Workdirs whose kept checkpoints give gate and attention-distance trajectories "
    "(written under 'trajectories' and plotted to <plot stem>_trajectories_<i>.png).",
  )


def main(argv: list[str]) -> None:
  del argv
  criterion = {
    "max_lattice_distance": FLAGS.max_lattice_distance,
    "min_peak_mass": FLAGS.min_peak_mass,
  }
  runs = [analyse_run(w, FLAGS.null_draws, **criterion) for w in FLAGS.workdirs]
  result = dict(runs[0])
  result["criterion"] = criterion
  result["other_runs"] = runs[1:]
  result["trajectories"] = [
    {"workdir": w, **checkpoint_trajectories(w)} for w in FLAGS.trajectory_workdirs
  ]
  out = pathlib.Path(FLAGS.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=1) + "\n")
  if FLAGS.plot:
    plot(result, FLAGS.plot)
    for run in runs[1:]:
      stem = pathlib.Path(FLAGS.plot)
      tag = f"{run.get('encoding')}_{run.get('optimizer')}"
      plot(run, stem.with_name(f"{stem.stem}_{tag}{stem.suffix}"))
    for i, trajectories in enumerate(result["trajectories"]):
      stem = pathlib.Path(FLAGS.plot)
      plot_trajectories(trajectories, stem.with_name(f"{stem.stem}_trajectories_{i}{stem.suffix}"))
  for run in runs:
    print(run["workdir"], "formed" if run["formed"] else "not formed")
    for layer in run["layers"]:
      print(
        f"  {layer['layer']}: lattice {layer['lattice_distance_init']:.3f} -> "
        f"{layer['lattice_distance_final']:.3f} (null p5 {layer['lattice_distance_null_p5']:.3f}),"
        f" peak {layer['peak_mass_init']:.3f} -> {layer['peak_mass_final']:.3f}"
      )


if __name__ == "__main__":
  _define_flags()
  flags.mark_flag_as_required("workdirs")
  app.run(main)
