"""Figures of a training run, written to ``<workdir>/plots/``.

The plotting functions take plain numpy arrays or file paths, so they run without a model:

* :func:`plot_attention_contours`: per layer, each head's attention probabilities around the
  centre query pixel, with the contours enclosing 50% (solid) and 90% (dotted) of the mass, one
  colour per head, the query pixel outlined (the paper's Fig. 3 / 4, the authors'
  ``utils/plotting.py``).
* :func:`plot_attention_maps`: a layers x heads grid of attention maps (e.g. the learned
  encodings' probabilities averaged over test images).
* :func:`plot_center_trajectories`: every head's Gaussian centre over training, from
  ``centers.jsonl``.
* :func:`plot_accuracy_curves`: train / val / test accuracy vs step, from ``metrics.jsonl``.

:func:`compute_attention_maps` extracts the centre query's maps from a model through its sown
``('intermediates', 'attention_probs')`` and :func:`plot_workdir` draws everything for a run.
"""

from __future__ import annotations

import os
import pathlib
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments.jsonl import read_jsonl  # noqa: E402

__all__ = [
  "HEAD_COLORS",
  "compute_attention_maps",
  "mass_threshold",
  "plot_accuracy_curves",
  "plot_attention_contours",
  "plot_attention_maps",
  "plot_center_trajectories",
  "plot_workdir",
]

# "Flat UI" palette, one colour per head (as in the authors' figures); cycled beyond 16 heads.
HEAD_COLORS = (
  "#e74c3c",
  "#3498db",
  "#2ecc71",
  "#9b59b6",
  "#f1c40f",
  "#e67e22",
  "#1abc9c",
  "#34495e",
  "#e84393",
  "#00cec9",
  "#6c5ce7",
  "#fdcb6e",
  "#d35400",
  "#27ae60",
  "#2980b9",
  "#8e44ad",
)

PathLike = str | os.PathLike


def head_color(h: int) -> str:
  """The colour of head ``h`` in every figure."""
  return HEAD_COLORS[h % len(HEAD_COLORS)]


def mass_threshold(probs: np.ndarray, mass: float) -> float:
  """Contour level enclosing the smallest set of pixels holding ``mass`` of the probability.

  The pixels are taken in decreasing order of probability until their total reaches
  ``mass * total``; the level is half-way between the last pixel taken and the next one, so the
  contour ``{p >= level}`` is exactly that set.

  Args:
    probs: non-negative array of any shape (one head's map).
    mass: fraction in (0, 1].

  Returns:
    The contour level (a float).
  """
  if not 0.0 < mass <= 1.0:
    raise ValueError(f"mass: expected a fraction in (0, 1], got {mass}")
  flat = np.sort(np.asarray(probs, np.float64).ravel())[::-1]
  if flat.size == 0:
    raise ValueError("probs: expected a non-empty array, got size 0")
  total = flat.sum()
  cum = np.cumsum(flat)
  k = int(np.searchsorted(cum, mass * total - 1e-12 * max(total, 1e-300)))
  k = min(k, flat.size - 1)
  below = flat[k + 1] if k + 1 < flat.size else 0.0
  return float(0.5 * (flat[k] + below))


def crop(maps: np.ndarray, query: tuple[int, int], window: int | None):
  """Crops ``(..., h, w)`` maps to a window centred on ``query``; returns maps and new query."""
  h, w = maps.shape[-2:]
  if window is None or window >= max(h, w):
    return maps, query
  half = window // 2
  r0 = int(np.clip(query[0] - half, 0, max(h - window, 0)))
  c0 = int(np.clip(query[1] - half, 0, max(w - window, 0)))
  return maps[..., r0 : r0 + window, c0 : c0 + window], (query[0] - r0, query[1] - c0)


def draw_contours(ax, maps: np.ndarray, query: tuple[int, int], masses: Sequence[float]) -> None:
  """Draws each head's ``masses`` contours of ``(heads, h, w)`` maps on ``ax``, the query outlined."""
  styles = ("solid", "dotted", "dashed", "dashdot")
  heads, h, w = maps.shape
  ys, xs = np.mgrid[0:h, 0:w]
  for head in range(heads):
    m = maps[head]
    for i, mass in enumerate(masses):
      level = mass_threshold(m, mass)
      if not np.isfinite(level) or m.max() <= level or m.min() >= level:
        # One pixel holds the mass (or the map is flat): outline the selected pixels directly.
        sel = np.argwhere(m >= level) if m.max() > m.min() else np.argwhere(np.ones_like(m))
        for r, c in sel:
          ax.add_patch(
            plt.Rectangle(
              (c - 0.5, r - 0.5),
              1,
              1,
              fill=False,
              edgecolor=head_color(head),
              linestyle=styles[i % len(styles)],
              linewidth=1.5,
            )
          )
        continue
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ax.contour(
          xs,
          ys,
          m,
          levels=[level],
          colors=[head_color(head)],
          linestyles=[styles[i % len(styles)]],
          linewidths=1.5,
        )
  ax.add_patch(
    plt.Rectangle(
      (query[1] - 0.5, query[0] - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2.0
    )
  )
  ax.set_xlim(-0.5, w - 0.5)
  ax.set_ylim(h - 0.5, -0.5)
  ax.set_aspect("equal")
  ax.set_xticks(np.arange(w))
  ax.set_yticks(np.arange(h))
  ax.set_xticklabels([])
  ax.set_yticklabels([])
  ax.grid(True, color="#dddddd", linewidth=0.5)
  ax.tick_params(length=0)


def plot_attention_contours(
  maps: Sequence[np.ndarray] | np.ndarray,
  path: PathLike,
  *,
  query: tuple[int, int] | None = None,
  window: int | None = 9,
  masses: Sequence[float] = (0.5, 0.9),
  titles: Sequence[str] | None = None,
) -> pathlib.Path:
  """Per layer, each head's attention around the query pixel with mass contours.

  Args:
    maps: per layer, ``(heads, h, w)`` probabilities of the query pixel over key pixels
      (a sequence, or an array ``(layers, heads, h, w)``).
    path: output PNG path (parent directories are created).
    query: ``(row, col)`` of the query pixel (default: the centre ``(h // 2, w // 2)``).
    window: side of the square crop around the query (``None``: the whole map).
    masses: contour masses; drawn solid, dotted, dashed, dash-dotted.
    titles: one title per layer (default ``"layer i"``).

  Returns:
    The PNG path.
  """
  maps = [np.asarray(m, np.float64) for m in maps]
  if not maps:
    raise ValueError("maps: expected at least one layer, got none")
  for i, m in enumerate(maps):
    if m.ndim != 3:
      raise ValueError(f"maps: expected (heads, h, w) per layer, got shape {m.shape} at layer {i}")
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  n = len(maps)
  fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 2.8), squeeze=False)
  for i, m in enumerate(maps):
    q = query if query is not None else (m.shape[1] // 2, m.shape[2] // 2)
    cropped, q = crop(m, q, window)
    draw_contours(axes[0, i], cropped, q, masses)
    axes[0, i].set_title(titles[i] if titles else f"layer {i + 1}", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def plot_attention_maps(
  maps: Sequence[np.ndarray] | np.ndarray,
  path: PathLike,
  *,
  query: tuple[int, int] | None = None,
  window: int | None = None,
  title: str | None = None,
) -> pathlib.Path:
  """A layers x heads grid of attention maps (e.g. averaged over test images).

  Args:
    maps: per layer, ``(heads, h, w)`` probabilities of the query pixel.
    path: output PNG path.
    query: query pixel ``(row, col)``, outlined (default: the centre).
    window: optional crop around the query.
    title: figure title.

  Returns:
    The PNG path.
  """
  maps = [np.asarray(m, np.float64) for m in maps]
  if not maps or any(m.ndim != 3 for m in maps):
    raise ValueError(
      f"maps: expected a non-empty sequence of (heads, h, w) arrays, got shapes "
      f"{[m.shape for m in maps]}"
    )
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  layers, heads = len(maps), max(m.shape[0] for m in maps)
  fig, axes = plt.subplots(layers, heads, figsize=(1.4 * heads, 1.4 * layers + 0.4), squeeze=False)
  for i, m in enumerate(maps):
    q = query if query is not None else (m.shape[1] // 2, m.shape[2] // 2)
    cropped, qc = crop(m, q, window)
    for h in range(heads):
      ax = axes[i, h]
      ax.set_xticks([])
      ax.set_yticks([])
      if h >= cropped.shape[0]:
        ax.axis("off")
        continue
      ax.imshow(cropped[h], cmap="viridis", interpolation="nearest")
      ax.add_patch(
        plt.Rectangle((qc[1] - 0.5, qc[0] - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1)
      )
      if i == 0:
        ax.set_title(f"head {h + 1}", fontsize=8)
      if h == 0:
        ax.set_ylabel(f"layer {i + 1}", fontsize=8)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def plot_center_trajectories(
  centers: PathLike | Sequence[Mapping[str, Any]], path: PathLike
) -> pathlib.Path:
  """Every head's Gaussian centre over training, one panel per layer.

  Args:
    centers: ``centers.jsonl`` path or its records ``{"step": int, "centers": {layer: (heads, 2)
      nested lists as (row, col) shifts}}``.
    path: output PNG path.

  Returns:
    The PNG path.
  """
  records = read_jsonl(centers) if isinstance(centers, str | os.PathLike) else list(centers)
  if not records:
    raise ValueError("centers: expected at least one record, got none")
  records = sorted(records, key=lambda r: r["step"])
  layers = sorted(records[0]["centers"], key=_natural_key)
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  n = len(layers)
  fig, axes = plt.subplots(1, n, figsize=(2.8 * n, 3.0), squeeze=False)
  for i, layer in enumerate(layers):
    traj = np.asarray([r["centers"][layer] for r in records], np.float64)  # (T, heads, d)
    ax = axes[0, i]
    if traj.ndim != 3 or traj.shape[-1] < 2:
      raise ValueError(
        f"centers: expected (heads, 2) centres per layer, got shape {traj.shape[1:]} for {layer}"
      )
    for h in range(traj.shape[1]):
      col, row = traj[:, h, 1], traj[:, h, 0]
      c = head_color(h)
      ax.plot(col, row, "-", color=c, linewidth=1.0, alpha=0.8)
      ax.plot(col[0], row[0], "o", color=c, markersize=3, alpha=0.6)
      ax.plot(col[-1], row[-1], "*", color=c, markersize=8)
    ax.plot(0, 0, "s", color="black", markersize=5)
    ax.set_title(layer.split("/")[0] if "/" in layer else layer, fontsize=9)
    ax.set_aspect("equal", adjustable="datalim")
    ax.invert_yaxis()
    ax.grid(True, color="#dddddd", linewidth=0.5)
    ax.set_xlabel("column shift", fontsize=8)
    if i == 0:
      ax.set_ylabel("row shift", fontsize=8)
  fig.suptitle(f"attention centres, steps {records[0]['step']}..{records[-1]['step']}", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def plot_accuracy_curves(metrics: PathLike | Sequence[Mapping[str, Any]], path: PathLike):
  """Train / validation / test accuracy (and train loss) vs step from ``metrics.jsonl``.

  Args:
    metrics: ``metrics.jsonl`` path or its records (keys ``step``, ``train_accuracy``,
      ``val_accuracy``, ``test_accuracy``, ``train_loss``).
    path: output PNG path.

  Returns:
    The PNG path.
  """
  records = read_jsonl(metrics) if isinstance(metrics, str | os.PathLike) else list(metrics)
  if not records:
    raise ValueError("metrics: expected at least one record, got none")
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  steps = np.asarray([r["step"] for r in records])
  fig, (ax, ax_loss) = plt.subplots(1, 2, figsize=(9, 3.2))
  for key, label in (
    ("train_accuracy", "train"),
    ("val_accuracy", "validation"),
    ("test_accuracy", "test"),
  ):
    values = np.asarray([r.get(key, np.nan) for r in records], np.float64)
    if np.isfinite(values).any():
      ax.plot(steps, 100 * values, marker=".", label=label)
  ax.set_xlabel("step")
  ax.set_ylabel("accuracy (%)")
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8)
  loss = np.asarray([r.get("train_loss", np.nan) for r in records], np.float64)
  ax_loss.plot(steps, loss, marker=".", color="black")
  ax_loss.set_xlabel("step")
  ax_loss.set_ylabel("train loss")
  ax_loss.grid(True, alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def _natural_key(s: str):
  import re

  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def compute_attention_maps(
  model: Any,
  variables: Mapping[str, Any],
  images: np.ndarray,
  *,
  grid: tuple[int, int] | None = None,
  query: tuple[int, int] | None = None,
) -> list[np.ndarray]:
  """The query pixel's attention maps of every layer, averaged over ``images``.

  Runs ``model.apply(variables, images, train=False, mutable=['intermediates'])`` and reads every
  sown ``attention_probs``: ``(heads, Nq, Nk)`` (position only) or ``(batch, heads, Nq, Nk)``
  (with content; averaged over the batch).

  Args:
    model: a Flax module that sows ``attention_probs``.
    variables: its variables (``params`` and possibly ``batch_stats``).
    images: ``(B, H, W, C)`` normalised float images.
    grid: ``(h, w)`` of the token grid (default: ``H / downsample`` by ``W / downsample`` with the
      model's ``downsample`` field, else the square root of ``Nk``).
    query: ``(row, col)`` query token (default: the centre).

  Returns:
    Per layer (in module order), a ``(heads, h, w)`` float64 array; empty if nothing was sown.
  """
  import jax

  _, intermediates = model.apply(dict(variables), images, train=False, mutable=["intermediates"])
  found = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(intermediates)[0]:
    keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
    if "attention_probs" in keys:
      found.append(("/".join(keys), leaf))
  found.sort(key=lambda kv: _natural_key(kv[0]))
  maps = []
  for _, probs in found:
    if probs.ndim not in (3, 4):
      continue
    nk = probs.shape[-1]
    if grid is None:
      ds = int(getattr(model, "downsample", 1) or 1)
      h, w = images.shape[1] // ds, images.shape[2] // ds
      if h * w != nk:
        h = w = int(round(np.sqrt(nk)))
    else:
      h, w = grid
    if h * w != nk or probs.shape[-2] != nk:
      continue
    q = query if query is not None else (h // 2, w // 2)
    row = np.asarray(jax.device_get(probs[..., q[0] * w + q[1], :]), np.float64)
    if row.ndim == 3:  # (batch, heads, Nk): content-dependent, average over the images
      row = row.mean(axis=0)
    maps.append(row.reshape(row.shape[0], h, w))
  return maps


def plot_workdir(
  workdir: PathLike,
  *,
  model: Any = None,
  state: Any = None,
  dataset: Any = None,
  num_images: int = 64,
) -> list[pathlib.Path]:
  """Draws every available figure of a run into ``<workdir>/plots``.

  Args:
    workdir: the run directory (reads ``metrics.jsonl`` and ``centers.jsonl``).
    model, state, dataset: optional model, a state with ``params`` / ``batch_stats`` and the
      :class:`experiments.input_pipeline.Dataset`; when given and the model sows attention
      probabilities, the attention figures are drawn (from the first ``num_images`` test images).
    num_images: test images used for the attention maps.

  Returns:
    The written PNG paths.
  """
  workdir = pathlib.Path(workdir)
  out = workdir / "plots"
  written = []
  metrics, centers = read_jsonl(workdir / "metrics.jsonl"), read_jsonl(workdir / "centers.jsonl")
  if metrics:
    written.append(plot_accuracy_curves(metrics, out / "accuracy.png"))
  if centers:
    written.append(plot_center_trajectories(centers, out / "centers.png"))
  if model is not None and state is not None and dataset is not None:
    import jax

    from experiments import input_pipeline

    variables = {"params": jax.device_get(state.params)}
    batch_stats = jax.device_get(getattr(state, "batch_stats", {}))
    if batch_stats:
      variables["batch_stats"] = batch_stats
    images = input_pipeline.normalize(dataset.test_images[:num_images], dataset.mean, dataset.std)
    maps = compute_attention_maps(model, variables, np.asarray(images))
    if maps:
      written.append(plot_attention_contours(maps, out / "attention_contours.png"))
      written.append(
        plot_attention_maps(
          maps, out / "attention_maps.png", title=f"centre query, mean over {num_images} images"
        )
      )
  return written
