r"""Learned receptive fields: per layer, the attention mass within radius r of the query.

Usage (trainer workdirs; a name repeated marks seeds of one model)::

  python -m experiments.receptive_field --workdirs=runs/priors/gpsa,runs/priors/vit \
    [--names=gpsa,vit] [--out=experiments/results/receptive_field.json] \
    [--plot=experiments/results/receptive_field.png]

For each trained attention network (a trainer workdir: ``config.json`` and ``best/``) and each
layer, the attention probabilities of every head are read from the ``attention_probs`` the layers
sow (position-only encodings: the map itself; content encodings: averaged over ``--images`` test
images), and the mass within Euclidean distance ``r`` of the query (in tokens of that layer's grid)
is averaged over heads and queries. A 3x3 convolution puts all its weight within ``r = sqrt(2)``
at every layer (its fixed field); the attention network chooses its own. Also reported per layer:
``r50`` / ``r90``, the smallest radius holding 50% / 90% of the mass, and the mean distance.

The same summary of the network at the trainer's initialisation from the run's seed is
``init_layers``. Under ``attention_distance``, per layer and per head: ConViT's non-locality
(d'Ascoli et al. 2021; :func:`attnconv.attention.attention_distance`), the attention-weighted mean
Euclidean query-key distance in tokens, of each layer's own sown maps (every block on its own
input), after training (``final``) and at initialisation (``init``), with the means over heads.

Workdirs given the same name are seeds of one model: its entry holds every run (``runs``) and,
per layer, the mean and standard deviation over seeds of r90, of the mass within sqrt(2) (a 3x3
window) and of the attention distance, at initialisation and after training, with the paired
change (trained minus initial) and its 95% t interval over seeds (``seeds``,
:func:`summarise_seeds`). ``--study_workdir`` names the runs of a data-efficiency grid instead::

  python -m experiments.receptive_field --study_workdir=experiments/results/data_scaling_runs \
    --study_models=vit,vit_mimetic,gpsa,attention_quadratic,attention_conv_init,attention_learned_content \
    --study_size=all

(every seed ``<study_workdir>/<model>/n<size>/s*`` that finished). Every model entry also has
``network_mean``: the same three quantities averaged over the layers of each run, then over
seeds. Several sizes (``--study_size=1000,3000,10000,30000,all``) measure locality against the
amount of training data: the JSON holds ``sizes: {size: {"train_examples", "models"}}`` and the
figure (:func:`plot_sizes`) the network means against the training-set size.
``--markdown=<path>`` also writes the results as the Markdown tables ``docs/experiments.md``
quotes (:func:`format_markdown`).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import json  # noqa: E402
import pathlib  # noqa: E402
from collections.abc import Callable, Mapping, Sequence  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

FLAGS = flags.FLAGS


def token_distances(grid: Sequence[int]) -> np.ndarray:
  """``(N, N)`` Euclidean distances between the tokens of a ``grid`` (row-major order)."""
  coords = np.stack(np.meshgrid(*[np.arange(n) for n in grid], indexing="ij"), -1).reshape(
    -1, len(grid)
  )
  return np.linalg.norm(coords[:, None, :] - coords[None, :, :], axis=-1)


def _batch_mean(probs: np.ndarray) -> np.ndarray:
  """float64 ``(H, Nq, Nk)``: content maps ``(B, H, Nq, Nk)`` are averaged over the batch."""
  probs = np.asarray(probs, np.float64)
  return probs.mean(0) if probs.ndim == 4 else probs


def mass_within(probs: np.ndarray, distances: np.ndarray, radii: Sequence[float]) -> np.ndarray:
  """Mean over heads and queries of the attention mass at distance ``<= r``, for each ``r``.

  Args:
    probs: ``(H, Nq, Nk)`` (or ``(B, H, Nq, Nk)``, averaged over ``B`` first); rows sum to 1.
    distances: ``(Nq, Nk)`` query-key distances.
    radii: the radii.

  Returns:
    ``(len(radii),)`` masses in [0, 1], non-decreasing in ``r``.
  """
  probs = _batch_mean(probs)
  if probs.ndim != 3 or probs.shape[1:] != distances.shape:
    raise ValueError(
      f"probs: expected (H, Nq, Nk) or (B, H, Nq, Nk) with (Nq, Nk) = {distances.shape}, got "
      f"{probs.shape}"
    )
  return np.array([(probs * (distances <= r + 1e-9)).sum(-1).mean() for r in radii])


def radius_for_mass(probs: np.ndarray, distances: np.ndarray, mass: float) -> float:
  """Mean over heads and queries of the smallest ``r`` with at least ``mass`` within ``r``."""
  probs = _batch_mean(probs)
  order = np.argsort(distances, axis=-1, kind="stable")
  d_sorted = np.take_along_axis(distances, order, -1)  # (Nq, Nk)
  p_sorted = np.take_along_axis(probs, order[None], -1)  # (H, Nq, Nk)
  cum = np.cumsum(p_sorted, -1)
  idx = np.argmax(cum >= mass - 1e-9, axis=-1)  # (H, Nq)
  return float(
    np.take_along_axis(d_sorted[None].repeat(probs.shape[0], 0), idx[..., None], -1).mean()
  )


def _load_run(
  workdir: str | os.PathLike, num_images: int, dataset: Any = None
) -> tuple[Any, Any, Any, Any, tuple]:
  """A trainer workdir's config, dataset (``dataset`` when given, else loaded from the run's
  config), model, normalised test images and token grid."""
  import ml_collections

  from experiments import input_pipeline
  from experiments import train as train_lib

  workdir = pathlib.Path(workdir)
  config = ml_collections.ConfigDict(json.loads((workdir / train_lib.CONFIG_FILE).read_text()))
  if dataset is None:
    dataset = train_lib.load_dataset_from_config(config)
  model = train_lib._build_model(config, dataset.num_classes)
  images = input_pipeline.normalize(dataset.test_images[:num_images], dataset.mean, dataset.std)
  # One token per patch (ViT backbone) or per space-to-depth block (AttentionNet, SmallCNN).
  key = "patch_size" if "patch_size" in config.model else "downsample"
  down = int(config.model.get(key, 1))
  grid = tuple(n // down for n in dataset.image_shape[:2])
  return config, dataset, model, images, grid


def _sown_probabilities_fn(model) -> Callable[[Any, Any], list[np.ndarray]]:
  """``probabilities(variables, images)``: per layer (in depth order), the ``attention_probs``
  each layer of ``model`` sows on ``images`` (every block's map of its own input). One compiled
  forward pass serves every set of variables of the same shapes (initial, trained, each
  checkpoint of a run)."""
  import jax

  apply = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=["intermediates"]))

  def probabilities(variables: Any, images: Any) -> list[np.ndarray]:
    # One tree structure and one input type, one compilation: empty collections dropped (the
    # initial ``batch_stats`` of a network without BatchNorm is {}, a checkpoint has none),
    # arrays on the host (a restored checkpoint's carry its training mesh's sharding).
    variables = {k: jax.tree.map(np.asarray, v) for k, v in variables.items() if v}
    _, state = apply(variables, images)
    flat = jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]
    probs = []
    for path, leaf in flat:
      keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
      if "attention_probs" in keys:
        probs.append((keys, np.asarray(leaf)))
    probs.sort(
      key=lambda kv: [int(k.split("_")[-1]) if k.startswith("block_") else 0 for k in kv[0]]
    )
    return [p for _, p in probs]

  return probabilities


def layer_probabilities(
  workdir: str | os.PathLike, num_images: int = 200, *, which: str = "best"
) -> tuple[list, tuple]:
  """Per layer, the sown attention probabilities of a trained network and its token grid.

  ``which``: ``'best'`` (the best-validation checkpoint) or ``'init'``
  (:func:`experiments.train.initial_variables`).
  """
  from experiments import conversion
  from experiments import train as train_lib

  if which not in ("best", "init"):
    raise ValueError(f"which: expected 'best' or 'init', got {which!r}")
  config, dataset, model, images, grid = _load_run(workdir, num_images)
  if which == "best":
    variables = conversion.load_best(workdir)
  else:
    variables = train_lib.initial_variables(config, model, dataset.image_shape)
  return _sown_probabilities_fn(model)(variables, images), grid


def layer_attention_distances(
  probs_per_layer: Sequence[np.ndarray], grid: Sequence[int]
) -> list[np.ndarray]:
  """Per layer, the ``(H,)`` attention distance of each head
  (:func:`attnconv.attention.attention_distance`: mean over queries, and images for content
  maps, of the attention-weighted Euclidean query-key distance, in tokens of the grid)."""
  from attnconv.attention import attention_distance

  positions = tuple(np.arange(n) for n in grid)
  return [
    np.asarray(attention_distance(np.asarray(p, np.float32), positions, positions), np.float64)
    for p in probs_per_layer
  ]


def attention_distance_entries(
  init: Sequence[np.ndarray], final: Sequence[np.ndarray]
) -> list[dict[str, Any]]:
  """JSON entries per layer: per-head distances at initialisation and after training, and
  their means over heads."""
  if len(init) != len(final):
    raise ValueError(f"init: expected {len(final)} layers (as final), got {len(init)}")
  return [
    {
      "layer": layer,
      "init": np.round(a, 4).tolist(),
      "final": np.round(b, 4).tolist(),
      "init_mean": round(float(np.mean(a)), 4),
      "final_mean": round(float(np.mean(b)), 4),
    }
    for layer, (a, b) in enumerate(zip(init, final))
  ]


CACHE_FILE = "receptive_field.json"


def _run_summary(workdir: str | os.PathLike) -> dict[str, Any]:
  from experiments import train as train_lib

  path = pathlib.Path(workdir) / train_lib.SUMMARY_FILE
  return json.loads(path.read_text()) if path.exists() else {}


def _cache_key(
  summary: Mapping[str, Any], num_images: int, radii: Sequence[float]
) -> dict[str, Any]:
  """What a cached entry was computed from: the image count, the radii and the run (its steps
  and best-validation step, so that a re-trained run is not served the old entry)."""
  return {
    "num_images": int(num_images),
    "radii": [round(float(r), 6) for r in radii],
    "run": [summary.get("steps"), summary.get("best_val_step")],
  }


def cached_summary(
  workdir: str | os.PathLike,
  num_images: int = 200,
  radii: Sequence[float] | None = None,
  *,
  summary: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
  """The entry :func:`summarise_run` cached for this finished run with these ``num_images`` and
  ``radii``, or None when there is none: no ``receptive_field.json``, one computed for another
  image count, radii or run (a stale cache), or a run that has not finished. Reads no
  checkpoint. ``summary``: the run's ``summary.json`` contents when already read."""
  summary = _run_summary(workdir) if summary is None else summary
  cache_path = pathlib.Path(workdir) / CACHE_FILE
  if not summary.get("completed") or not cache_path.exists():
    return None
  radii = RADII if radii is None else tuple(float(r) for r in radii)
  cached = json.loads(cache_path.read_text())
  if cached.get("key") != _cache_key(summary, num_images, radii):
    return None
  return {**cached["entry"], "workdir": str(workdir)}


def summarise_run(
  workdir: str | os.PathLike,
  num_images: int = 200,
  radii: Sequence[float] | None = None,
  *,
  cache: bool = True,
  dataset: Any = None,
) -> dict[str, Any]:
  """A workdir's JSON entry: its grid, its number of training examples (``train_examples``,
  None without a summary), the per-layer receptive-field summary (:func:`analyse`) of the
  trained network and of its initialisation (``init_layers``), and the per-head attention
  distance of every layer at initialisation (same seed as the run) and after training.

  With ``cache``, the entry of a finished run (``summary.json`` with ``completed``) is also
  written to ``<workdir>/receptive_field.json`` and read back from there by later calls with
  the same ``num_images``, ``radii`` and run (its steps and best-validation step): the best
  checkpoint is then no longer needed, a finished run's small files are enough to redo the
  study's analysis. ``workdir`` in the entry is always the path given. ``dataset``: the run's
  :class:`experiments.input_pipeline.Dataset` when already loaded (else loaded from its config).
  """
  from experiments import conversion
  from experiments import train as train_lib

  radii = RADII if radii is None else tuple(float(r) for r in radii)
  summary = _run_summary(workdir)
  cache = cache and bool(summary.get("completed"))
  if cache:
    cached = cached_summary(workdir, num_images, radii, summary=summary)
    if cached is not None:
      return cached
  config, dataset, model, images, grid = _load_run(workdir, num_images, dataset)
  probabilities = _sown_probabilities_fn(model)
  final = probabilities(conversion.load_best(workdir), images)
  init = probabilities(train_lib.initial_variables(config, model, dataset.image_shape), images)
  entry = {
    "workdir": str(workdir),
    "train_examples": summary.get("num_train_examples"),
    "grid": list(grid),
    "layers": analyse(final, grid, radii),
    "init_layers": analyse(init, grid, radii),
    "attention_distance": attention_distance_entries(
      layer_attention_distances(init, grid), layer_attention_distances(final, grid)
    ),
  }
  if cache:
    key = _cache_key(summary, num_images, radii)
    (pathlib.Path(workdir) / CACHE_FILE).write_text(json.dumps({"key": key, "entry": entry}) + "\n")
  return entry


WINDOW = f"{np.sqrt(2.0):g}"  # the mass_within key of a 3x3 window: "1.41421"


def _run_values(run: dict[str, Any], layer: int, when: str) -> dict[str, float]:
  lay = run["layers" if when == "final" else "init_layers"][layer]
  if WINDOW not in lay["mass_within"]:
    raise ValueError(
      f"runs: expected masses within r = {WINDOW}, got radii {list(lay['mass_within'])}"
    )
  return {
    "r90": lay["r90"],
    "mass_within_sqrt2": lay["mass_within"][WINDOW],
    "attention_distance": run["attention_distance"][layer][f"{when}_mean"],
  }


def _round4(value: Any) -> Any:
  return round(value, 4) if isinstance(value, float) else value


def summarise_seeds(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Per layer, over the runs (seeds) of one model (entries of :func:`summarise_run`): for
  ``r90``, ``mass_within_sqrt2`` and ``attention_distance``, ``{"init": {"mean", "std"},
  "final": {"mean", "std"}, "change": t interval}`` where ``change`` is the paired difference
  trained minus initial (:func:`experiments.intervals.t_interval`: ``mean``, ``std``,
  ``low``, ``high``, ``n``; with one seed ``std``, ``low`` and ``high`` are None)."""
  if not runs:
    raise ValueError("runs: expected at least one run, got none")
  depth = {len(r["layers"]) for r in runs}
  if len(depth) != 1:
    raise ValueError(f"runs: expected networks of one depth, got depths {sorted(depth)}")
  out = []
  for layer in range(depth.pop()):
    init = [_run_values(r, layer, "init") for r in runs]
    final = [_run_values(r, layer, "final") for r in runs]
    entry: dict[str, Any] = {"layer": layer}
    for key in SUMMARISED:
      entry[key] = _init_final_change([v[key] for v in init], [v[key] for v in final])
    out.append(entry)
  return out


SUMMARISED = ("r90", "mass_within_sqrt2", "attention_distance")


def _init_final_change(init: Sequence[float], final: Sequence[float]) -> dict[str, Any]:
  """Over seeds: ``init`` and ``final`` mean and std, and the paired ``change`` (t interval)."""
  from experiments.intervals import t_interval

  a, b = np.asarray(init, np.float64), np.asarray(final, np.float64)
  return {
    "init": {k: _round4(t_interval(a)[k]) for k in ("mean", "std")},
    "final": {k: _round4(t_interval(b)[k]) for k in ("mean", "std")},
    "change": {k: _round4(v) for k, v in t_interval(b - a).items()},
  }


def network_means(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Over the runs (seeds) of one model, each run's mean over its layers of ``r90``,
  ``mass_within_sqrt2`` and ``attention_distance``, summarised as :func:`summarise_seeds`
  summarises one layer (init and trained mean and std, paired change)."""
  if not runs:
    raise ValueError("runs: expected at least one run, got none")
  out = {}
  for key in SUMMARISED:
    per_run = {
      when: [np.mean([_run_values(r, i, when)[key] for i in range(len(r["layers"]))]) for r in runs]
      for when in ("init", "final")
    }
    out[key] = _init_final_change(per_run["init"], per_run["final"])
  return out


def study_workdirs(
  study_workdir: str | os.PathLike, models: Sequence[str], size: str = "all"
) -> tuple[list[str], list[str]]:
  """``(workdirs, names)`` of every finished seed ``<study_workdir>/<model>/n<size>/s*`` of a
  data-efficiency grid (:func:`experiments.data_scaling.run_dir`), seeds in numerical order."""
  from experiments.data_scaling import _completed

  workdirs, names = [], []
  for model in models:
    base = pathlib.Path(study_workdir) / model / f"n{size}"
    seeds = sorted(base.glob("s*"), key=lambda p: int(p.name[1:]) if p.name[1:].isdigit() else -1)
    done = [p for p in seeds if _completed(p)]
    if not done:
      raise ValueError(f"study_workdir: expected finished runs in {base}/s*, found none")
    workdirs += [str(p) for p in done]
    names += [model] * len(done)
  return workdirs, names


def analyse(
  probs_per_layer: Sequence[np.ndarray], grid: Sequence[int], radii: Sequence[float]
) -> list[dict[str, Any]]:
  """Per layer: mass within each radius, r50, r90 and the mean query-key distance."""
  distances = token_distances(grid)
  out = []
  for layer, probs in enumerate(probs_per_layer):
    p3 = _batch_mean(probs)
    out.append(
      {
        "layer": layer,
        "mass_within": dict(
          zip([f"{r:g}" for r in radii], np.round(mass_within(p3, distances, radii), 4).tolist())
        ),
        "r50": round(radius_for_mass(p3, distances, 0.5), 3),
        "r90": round(radius_for_mass(p3, distances, 0.9), 3),
        "mean_distance": round(float((p3 * distances).sum(-1).mean()), 3),
      }
    )
  return out


RADII = (0.0, 1.0, float(np.sqrt(2.0)), 2.0, float(np.sqrt(8.0)), 3.0, 4.0, 6.0)


def _save_with_legend(fig, ax, path: str | os.PathLike) -> None:
  """Saves ``fig`` with ``ax``'s legend below the axes (dashed lines: the initialisation)."""
  import matplotlib.pyplot as plt

  handles, labels = ax.get_legend_handles_labels()
  fig.legend(
    handles,
    labels,
    loc="lower center",
    ncol=4,
    fontsize=7,
    title="dashed: at initialisation",
    title_fontsize=7,
  )
  fig.tight_layout(rect=(0, 0.16, 1, 1))
  fig.savefig(path, dpi=130)
  plt.close(fig)


def plot(results: dict[str, Any], path: str | os.PathLike) -> None:
  """Left: r90 against depth per model (mean over seeds, bars: std; dashed: at initialisation),
  beside the 3x3 convolution's field. Right: the mass within r = sqrt(2) (the 3x3 window)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
  depth = 0
  for i, (name, entry) in enumerate(results["models"].items()):
    color = f"C{i}"
    layers = entry["seeds"]
    x = np.array([lay["layer"] + 1 for lay in layers], dtype=float)
    depth = max(depth, len(x))
    for ax, key in zip(axes, ("r90", "mass_within_sqrt2")):
      final = [lay[key]["final"] for lay in layers]
      ax.errorbar(
        x + 0.04 * (i - 1),
        [v["mean"] for v in final],
        yerr=[v["std"] or 0.0 for v in final],
        marker="o",
        color=color,
        capsize=2,
        label=f"{name} (trained)",
      )
      ax.plot(x, [lay[key]["init"]["mean"] for lay in layers], "--", color=color, alpha=0.6)
  xs = np.arange(1, depth + 1)
  axes[0].plot(xs, [np.sqrt(2)] * len(xs), "k-", lw=0.8, label="3x3 conv (fixed)")
  axes[1].plot(xs, [1.0] * len(xs), "k-", lw=0.8, label="3x3 conv (fixed)")
  uniform = results.get("uniform_reference")
  if uniform:
    axes[0].plot(xs, [uniform["r90"]] * len(xs), ":", color="gray", label="uniform attention")
    axes[1].plot(xs, [uniform["mass_within"][WINDOW]] * len(xs), ":", color="gray")
  axes[0].set(xlabel="layer", ylabel="r90 (tokens)", title="radius holding 90% of attention")
  axes[1].set(xlabel="layer", ylabel="mass", title="attention mass inside the 3x3 window")
  for ax in axes:
    ax.set_xticks(xs)
    ax.grid(alpha=0.3)
  _save_with_legend(fig, axes[0], path)


def _define_flags() -> None:
  """Command-line flags (defined only when run as a script, so the module imports cleanly)."""
  flags.DEFINE_list("workdirs", [], "Trainer workdirs of attention networks.")
  flags.DEFINE_list("names", [], "Labels of the workdirs (default: the paths; repeated: seeds).")
  flags.DEFINE_string(
    "study_workdir", None, "A data-efficiency grid's workdir (instead of --workdirs)."
  )
  flags.DEFINE_list("study_models", [], "With --study_workdir: the models.")
  flags.DEFINE_list(
    "study_size",
    ["all"],
    "With --study_workdir: the training-set size (or 'all'); several: locality against size.",
  )
  flags.DEFINE_integer("images", 200, "Test images averaged over for content attention.")
  flags.DEFINE_string("out", "experiments/results/receptive_field.json", "Results (JSON).")
  flags.DEFINE_string("plot", "experiments/results/receptive_field.png", "Plot ('' for none).")
  flags.DEFINE_string("markdown", "", "Also write the results as Markdown tables to this path.")


def _fmt(stat: dict[str, Any], digits: int = 2) -> str:
  return f"{stat['mean']:.{digits}f}" + (f"+-{stat['std']:.{digits}f}" if stat["std"] else "")


def summarise_models(
  names: Sequence[str], workdirs: Sequence[str], num_images: int = 200, label: str = ""
) -> dict[str, Any]:
  """``name -> {"grid", "seeds", "network_mean", "runs"}`` over the workdirs (names repeated:
  seeds of one model), printing one line per model and layer."""
  runs: dict[str, list[dict[str, Any]]] = {}
  for name, workdir in zip(names, workdirs):
    runs.setdefault(name, []).append(summarise_run(workdir, num_images))
  models = {}
  for name, entries in runs.items():
    grids = {tuple(e["grid"]) for e in entries}
    if len(grids) != 1:
      raise ValueError(
        f"workdirs: expected one token grid per name, got {sorted(grids)} for {name}"
      )
    models[name] = entry = {
      "grid": entries[0]["grid"],
      "seeds": summarise_seeds(entries),
      "network_mean": network_means(entries),
      "runs": entries,
    }
    for lay in entry["seeds"]:
      print(
        f"{label}{name:26s} layer {lay['layer'] + 1} ({len(entries)} runs), init -> trained: "
        f"r90 {_fmt(lay['r90']['init'])} -> {_fmt(lay['r90']['final'])}  "
        f"mass<=sqrt2 {_fmt(lay['mass_within_sqrt2']['init'], 3)} -> "
        f"{_fmt(lay['mass_within_sqrt2']['final'], 3)}  attention distance "
        f"{_fmt(lay['attention_distance']['init'])} -> {_fmt(lay['attention_distance']['final'])}"
      )
  return models


QUANTITIES = {
  "mass_within_sqrt2": ("Attention mass within sqrt(2) of the query (the 3x3 window)", 3),
  "attention_distance": ("Attention distance (tokens)", 2),
  "r90": ("Radius r90 holding 90 % of the attention mass (tokens)", 2),
}


def _mean_std(stat: dict[str, Any], digits: int) -> str:
  """``mean ± std``; the std left out when None (one seed) or below the last digit shown."""
  text = f"{stat['mean']:.{digits}f}"
  if stat["std"] is not None and round(stat["std"], digits) > 0:
    text += f" ± {stat['std']:.{digits}f}"
  return text


def _markdown_tables(
  rows: dict[str, dict[str, dict[str, Any]]], columns: Sequence[str], what: str
) -> list[str]:
  """For every quantity of :data:`QUANTITIES`: a table of ``init -> trained`` (mean ± std over
  seeds) and one of the paired change (mean [95 % interval]); ``rows[model][column]`` is a
  :func:`summarise_seeds` layer entry or a :func:`network_means` entry."""
  from experiments.intervals import interval_text

  header = f"| model | {' | '.join(columns)} |"
  rule = "|---" * (len(columns) + 1) + "|"
  lines: list[str] = []
  for key, (title, digits) in QUANTITIES.items():
    trained = [f"{title}, {what}: at initialisation → trained, mean ± std over seeds.", ""]
    change = [
      f"{title}, {what}: paired change (trained − initial), mean [95 % interval over seeds].",
      "",
    ]
    trained += [header, rule]
    change += [header, rule]
    for model, cells in rows.items():
      stats = [cells.get(c, {}).get(key) for c in columns]
      trained.append(
        f"| `{model}` | "
        + " | ".join(
          "" if v is None else f"{_mean_std(v['init'], digits)} → {_mean_std(v['final'], digits)}"
          for v in stats
        )
        + " |"
      )
      change.append(
        f"| `{model}` | "
        + " | ".join(
          "" if v is None else interval_text(v["change"], 1.0, f"+.{digits}f") for v in stats
        )
        + " |"
      )
    lines += trained + [""] + change + [""]
  return lines


def format_markdown(results: dict[str, Any]) -> str:
  """The results of :func:`main` as Markdown tables (``--markdown``; the form
  ``docs/experiments.md`` quotes). One training-set size: per model and layer, the mass within
  sqrt(2), the attention distance and r90 at initialisation and trained, and their paired
  changes. Several sizes (``sizes``): the same for the network means (over layers) per model
  against the training-set size. The values of uniform attention close the text."""
  if "sizes" in results:
    sizes = results["sizes"]
    columns = [f"{int(entry['train_examples']):,}" for entry in sizes.values()]
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    for column, entry in zip(columns, sizes.values()):
      for model, m in entry["models"].items():
        rows.setdefault(model, {})[column] = m["network_mean"]
    lines = _markdown_tables(rows, columns, "mean over layers, by training images")
  else:
    models = results.get("models", {})
    depth = max((len(m["seeds"]) for m in models.values()), default=0)
    columns = [f"layer {i + 1}" for i in range(depth)]
    rows = {
      model: {f"layer {lay['layer'] + 1}": lay for lay in m["seeds"]} for model, m in models.items()
    }
    lines = _markdown_tables(rows, columns, "per layer")
  uniform = results.get("uniform_reference")
  if uniform:
    lines.append(
      f"Uniform attention over the grid: mass within sqrt(2) "
      f"{uniform['mass_within'][WINDOW]:.3f}, attention distance {uniform['mean_distance']:.2f}, "
      f"r90 {uniform['r90']:.2f}."
    )
  return "\n".join(lines).rstrip() + "\n"


def uniform_reference(grid: Sequence[int]) -> dict[str, Any]:
  """:func:`analyse` of every head uniform over the grid (no locality at all)."""
  n = int(np.prod(grid))
  return analyse([np.full((1, n, n), 1.0 / n)], grid, RADII)[0]


def plot_sizes(results: dict[str, Any], path: str | os.PathLike) -> None:
  """Per model against the training-set size: the mean over layers of the mass within sqrt(2)
  and of the attention distance after training (bars: std over seeds) and at initialisation
  (dashed)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
  names = list(dict.fromkeys(m for s in results["sizes"].values() for m in s["models"]))
  for i, name in enumerate(names):
    points = sorted(
      (s["train_examples"], s["models"][name]["network_mean"])
      for s in results["sizes"].values()
      if name in s["models"]
    )
    x = np.array([n for n, _ in points], dtype=float) * (1 + 0.015 * (i - len(names) / 2))
    for ax, key in zip(axes, ("mass_within_sqrt2", "attention_distance")):
      final = [m[key]["final"] for _, m in points]
      ax.errorbar(
        x,
        [v["mean"] for v in final],
        yerr=[v["std"] or 0.0 for v in final],
        marker="o",
        color=f"C{i}",
        capsize=2,
        label=f"{name} (trained)",
      )
      ax.plot(x, [m[key]["init"]["mean"] for _, m in points], "--", color=f"C{i}", alpha=0.6)
  uniform = results.get("uniform_reference")
  if uniform:
    axes[0].axhline(uniform["mass_within"][WINDOW], ls=":", color="gray", label="uniform attention")
    axes[1].axhline(uniform["mean_distance"], ls=":", color="gray")
  axes[0].set(ylabel="mass within sqrt(2), mean over layers", title="attention in the 3x3 window")
  axes[1].set(ylabel="attention distance (tokens), mean over layers", title="attention distance")
  for ax in axes:
    ax.set_xscale("log")
    ax.set_xlabel("training images")
    ax.grid(alpha=0.3)
  _save_with_legend(fig, axes[0], path)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.WARNING)
  workdirs, names = list(FLAGS.workdirs), list(FLAGS.names or FLAGS.workdirs)
  results: dict[str, Any] = {"radii": list(RADII)}
  sizes = list(FLAGS.study_size)
  if FLAGS.study_workdir:
    if workdirs or not FLAGS.study_models:
      raise app.UsageError("--study_workdir: expected --study_models and no --workdirs")
    if len(sizes) > 1:  # Locality against the training-set size.
      results["sizes"] = {}
      for size in sizes:
        workdirs, names = study_workdirs(FLAGS.study_workdir, FLAGS.study_models, size)
        models = summarise_models(names, workdirs, FLAGS.images, label=f"n={size} ")
        examples = {r["train_examples"] for m in models.values() for r in m["runs"]}
        if len(examples) != 1:
          raise ValueError(f"study_size: expected one training-set size in n{size}, got {examples}")
        results["sizes"][size] = {"train_examples": examples.pop(), "models": models}
      grid = next(iter(next(iter(results["sizes"].values()))["models"].values()))["grid"]
      results["uniform_reference"] = uniform_reference(grid)
      _write(results, FLAGS.out, FLAGS.markdown)
      if FLAGS.plot:
        plot_sizes(results, FLAGS.plot)
      return
    workdirs, names = study_workdirs(FLAGS.study_workdir, FLAGS.study_models, sizes[0])
  if len(names) != len(workdirs):
    raise app.UsageError("--names: expected one name per workdir")
  results["models"] = summarise_models(names, workdirs, FLAGS.images)
  if results["models"]:
    results["uniform_reference"] = uniform_reference(next(iter(results["models"].values()))["grid"])
  _write(results, FLAGS.out, FLAGS.markdown)
  if FLAGS.plot and results["models"]:
    plot(results, FLAGS.plot)


def _write(results: dict[str, Any], path: str, markdown: str = "") -> None:
  """Writes ``results`` as JSON to ``path`` and, with ``markdown``, :func:`format_markdown`."""
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(path).write_text(json.dumps(results, indent=1) + "\n")
  if markdown:
    pathlib.Path(markdown).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(markdown).write_text(format_markdown(results))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
