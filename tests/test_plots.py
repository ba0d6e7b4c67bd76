"""Tests of experiments/plots.py on synthetic probability maps and metric files (no training)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments import plots


def _gaussian_maps(heads: int, h: int, w: int, seed: int = 0) -> np.ndarray:
  """``(heads, h, w)`` softmax of a quadratic encoding with random centres and spreads."""
  rng = np.random.default_rng(seed)
  rows, cols = np.mgrid[0:h, 0:w]
  q = (h // 2, w // 2)
  maps = []
  for _ in range(heads):
    center = rng.integers(-2, 3, 2)
    alpha = rng.uniform(0.3, 3.0)
    d2 = (rows - q[0] - center[0]) ** 2 + (cols - q[1] - center[1]) ** 2
    logits = -alpha * d2
    p = np.exp(logits - logits.max())
    maps.append(p / p.sum())
  return np.stack(maps)


def _is_png(path) -> bool:
  return path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mass_threshold_encloses_the_mass():
  rng = np.random.default_rng(0)
  probs = rng.dirichlet(np.ones(49)).reshape(7, 7)
  for mass in (0.5, 0.9, 1.0):
    level = plots.mass_threshold(probs, mass)
    inside = probs[probs >= level]
    assert inside.sum() >= mass - 1e-9
    # Minimal: dropping the smallest selected pixel goes below the mass.
    assert inside.sum() - inside.min() < mass
  one_hot = np.zeros((5, 5))
  one_hot[2, 3] = 1.0
  level = plots.mass_threshold(one_hot, 0.9)
  assert np.argwhere(one_hot >= level).tolist() == [[2, 3]]
  with pytest.raises(ValueError, match="mass"):
    plots.mass_threshold(probs, 0.0)


def test_attention_contours_png(tmp_path):
  maps = [_gaussian_maps(9, 16, 16, seed) for seed in range(3)]
  # Degenerate heads: one-hot (hard attention) and uniform.
  maps[0][0] = 0.0
  maps[0][0, 8, 9] = 1.0
  maps[0][1] = 1.0 / 256
  out = plots.plot_attention_contours(maps, tmp_path / "sub" / "contours.png", window=9)
  assert _is_png(out)
  out = plots.plot_attention_contours(np.stack(maps), tmp_path / "full.png", window=None)
  assert _is_png(out)
  with pytest.raises(ValueError, match="maps"):
    plots.plot_attention_contours([np.ones((4, 4))], tmp_path / "bad.png")


def test_attention_maps_png(tmp_path):
  maps = [_gaussian_maps(4, 8, 8, seed) for seed in range(2)]
  assert _is_png(plots.plot_attention_maps(maps, tmp_path / "maps.png", title="mean"))


def test_center_trajectories_png(tmp_path):
  rng = np.random.default_rng(0)
  path = tmp_path / "centers.jsonl"
  centers = rng.normal(0, 2, (2, 9, 2))
  with path.open("w") as f:
    for step in range(0, 50, 10):
      centers = centers + rng.normal(0, 0.3, centers.shape)
      record = {
        "step": step,
        "centers": {f"block_{i}/attention": centers[i].tolist() for i in range(2)},
      }
      f.write(json.dumps(record) + "\n")
  assert _is_png(plots.plot_center_trajectories(path, tmp_path / "centers.png"))


def test_accuracy_curves_png(tmp_path):
  path = tmp_path / "metrics.jsonl"
  with path.open("w") as f:
    for step in (100, 200, 300):
      acc = step / 400
      record = {
        "step": step,
        "train_loss": 1 / step,
        "train_accuracy": acc,
        "val_accuracy": acc - 0.05,
        "test_accuracy": acc - 0.06,
      }
      f.write(json.dumps(record) + "\n")
  assert _is_png(plots.plot_accuracy_curves(path, tmp_path / "acc.png"))
  with pytest.raises(ValueError, match="metrics"):
    plots.plot_accuracy_curves([], tmp_path / "empty.png")


def test_plot_workdir_without_model(tmp_path):
  (tmp_path / "metrics.jsonl").write_text(
    json.dumps({"step": 1, "train_loss": 1.0, "train_accuracy": 0.5, "val_accuracy": 0.4}) + "\n"
  )
  written = plots.plot_workdir(tmp_path)
  assert [p.name for p in written] == ["accuracy.png"]
  assert _is_png(tmp_path / "plots" / "accuracy.png")
