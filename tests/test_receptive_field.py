"""Receptive-field analysis (experiments/receptive_field.py)."""

from __future__ import annotations

import pathlib

import ml_collections
import numpy as np
import pytest

from experiments import receptive_field as rf
from experiments import train as train_lib
from experiments.configs import common
from tests.test_data_scaling import _synthetic


def _one_hot_shift(grid, shift):
  """(1, N, N) attention: every query attends to the token at ``q + shift`` (clamped)."""
  h, w = grid
  n = h * w
  probs = np.zeros((1, n, n))
  for i in range(h):
    for j in range(w):
      ki, kj = min(max(i + shift[0], 0), h - 1), min(max(j + shift[1], 0), w - 1)
      probs[0, i * w + j, ki * w + kj] = 1.0
  return probs


def test_distances_and_exact_masses():
  d = rf.token_distances((2, 3))
  assert d.shape == (6, 6) and d[0, 5] == pytest.approx(np.sqrt(1 + 4))
  np.testing.assert_array_equal(d, d.T)
  # Interior queries of a (0, 2) shift are at distance 2; clamped border queries nearer.
  probs = _one_hot_shift((5, 5), (0, 2))
  masses = rf.mass_within(probs, rf.token_distances((5, 5)), [0.0, 1.0, 2.0])
  # Columns 0-2 reach their key at distance 2; column 3 at 1; column 4 at 0.
  np.testing.assert_allclose(masses, [5 / 25, 10 / 25, 1.0])
  assert rf.radius_for_mass(probs, rf.token_distances((5, 5)), 0.9) == pytest.approx(
    (15 * 2 + 5 * 1 + 0) / 25
  )
  # A batch axis is averaged over first.
  batched = np.stack([probs, _one_hot_shift((5, 5), (0, 0))])
  np.testing.assert_allclose(
    rf.mass_within(batched, rf.token_distances((5, 5)), [0.0]), [(5 / 25 + 1) / 2]
  )
  with pytest.raises(ValueError, match="probs"):
    rf.mass_within(np.ones((2, 3, 3)), rf.token_distances((2, 2)), [1.0])


def test_uniform_attention_masses_are_area_fractions():
  grid = (4, 4)
  probs = np.full((2, 16, 16), 1 / 16)
  d = rf.token_distances(grid)
  for r in (0.0, 1.0, 2.5):
    np.testing.assert_allclose(rf.mass_within(probs, d, [r])[0], (d <= r).mean())
  layers = rf.analyse([probs, _one_hot_shift(grid, (0, 0))], grid, rf.RADII)
  assert layers[1]["r90"] == 0.0 and layers[1]["mean_distance"] == 0.0
  assert layers[0]["r90"] > layers[1]["r90"]
  assert all(
    a <= b
    for a, b in zip(
      list(layers[0]["mass_within"].values()), list(layers[0]["mass_within"].values())[1:]
    )
  )


def _one_step_run(tmp_path, monkeypatch, model: dict, **fields):
  """Trains ``model`` one step (batch 8) on 40 synthetic images into ``tmp_path``; returns the
  config and the dataset (which the workdir's readers also load)."""
  monkeypatch.setattr(train_lib, "load_dataset_from_config", lambda config: _synthetic(40))
  config = common.base_config()
  config.model = model
  config.num_train_steps, config.eval_every_steps, config.checkpoint_every_steps = 1, 1, 1
  config.batch_size, config.progress_bar, config.plot = 8, False, False
  for key, value in fields.items():
    config[key] = value
  dataset = _synthetic(40)
  train_lib.train_and_evaluate(config, tmp_path, dataset=dataset)
  return config, dataset


def test_trained_workdir(tmp_path, monkeypatch):
  """From a trainer workdir: one map per layer, the token grid, and the plot."""
  model = {"name": "attention_net", "num_layers": 2, "num_heads": 4, "hidden_size": 8}
  model.update({"mlp_dim": 8, "downsample": 4, "encoding": "learned_content"})
  _one_step_run(tmp_path, monkeypatch, model)
  probs, grid = rf.layer_probabilities(tmp_path, num_images=5)
  assert grid == (7, 7) and len(probs) == 2
  assert probs[0].shape == (5, 4, 49, 49)  # content: one map per image
  np.testing.assert_allclose(probs[1].sum(-1), 1.0, rtol=1e-5)
  # The JSON entry: the receptive-field summary of the trained network and of its
  # initialisation (the run's seed), and the attention distance per layer and head of both.
  entry = rf.summarise_run(tmp_path, num_images=5)
  assert entry["grid"] == [7, 7] and entry["layers"] == rf.analyse(probs, grid, rf.RADII)
  init_probs, _ = rf.layer_probabilities(tmp_path, num_images=5, which="init")
  assert entry["init_layers"] == rf.analyse(init_probs, grid, rf.RADII)
  assert entry["init_layers"] != entry["layers"]
  seeds = rf.summarise_seeds([entry])
  results = {"models": {"x": {"grid": entry["grid"], "seeds": seeds, "runs": [entry]}}}
  rf.plot(results, tmp_path / "rf.png")
  assert (tmp_path / "rf.png").stat().st_size > 1000
  dist = entry["attention_distance"]
  assert [d["layer"] for d in dist] == [0, 1]
  for d in dist:
    for when in ("init", "final"):
      heads = np.asarray(d[when])
      assert heads.shape == (4,)
      assert np.all(np.isfinite(heads)) and np.all(heads >= 0.0)
      assert d[f"{when}_mean"] == pytest.approx(heads.mean(), abs=1e-3)
  # Head means agree with the summary's mean distance (batch- and head-averaged maps).
  for d, lay in zip(dist, entry["layers"]):
    assert d["final_mean"] == pytest.approx(lay["mean_distance"], abs=2e-3)
  np.testing.assert_allclose(
    [d["init"] for d in dist], np.round(rf.layer_attention_distances(init_probs, grid), 4)
  )
  with pytest.raises(ValueError, match="which"):
    rf.layer_probabilities(tmp_path, which="last")


def test_summary_of_a_finished_run_is_cached_without_its_checkpoints(tmp_path, monkeypatch):
  """A finished run's entry is written to receptive_field.json and read back from it once the
  checkpoints are gone; another number of images or a re-trained run is not served from it."""
  import json
  import shutil

  model = {"name": "vit", "num_layers": 1, "num_heads": 2, "hidden_size": 8, "mlp_dim": 8}
  _one_step_run(tmp_path / "run", monkeypatch, {**model, "patch_size": 4})
  assert rf.cached_summary(tmp_path / "run", num_images=3) is None  # nothing cached yet
  entry = rf.summarise_run(tmp_path / "run", num_images=3)
  cached = json.loads((tmp_path / "run" / rf.CACHE_FILE).read_text())
  assert cached["key"]["num_images"] == 3 and cached["entry"] == entry
  assert rf.cached_summary(tmp_path / "run", num_images=3) == entry
  assert rf.cached_summary(tmp_path / "run", num_images=4) is None  # another image count
  assert rf.cached_summary(tmp_path / "run", num_images=3, radii=(1.0,)) is None  # other radii
  shutil.rmtree(tmp_path / "run" / "best")
  shutil.rmtree(tmp_path / "run" / "checkpoints")
  moved = tmp_path / "moved"
  shutil.move(tmp_path / "run", moved)
  assert rf.summarise_run(moved, num_images=3) == {**entry, "workdir": str(moved)}
  with pytest.raises(FileNotFoundError):  # not cached for 4 images: needs the checkpoint
    rf.summarise_run(moved, num_images=4)
  summary = json.loads((moved / "summary.json").read_text())
  (moved / "summary.json").write_text(json.dumps({**summary, "best_val_step": 7}))
  assert rf.cached_summary(moved, num_images=3) is None  # stale: another run
  with pytest.raises(FileNotFoundError):  # another run in the same directory
    rf.summarise_run(moved, num_images=3)
  (moved / "summary.json").write_text(json.dumps({**summary, "completed": False}))
  assert rf.cached_summary(moved, num_images=3) is None  # unfinished


def test_unfinished_runs_are_not_cached(tmp_path, monkeypatch):
  import json

  model = {"name": "vit", "num_layers": 1, "num_heads": 2, "hidden_size": 8, "mlp_dim": 8}
  _one_step_run(tmp_path, monkeypatch, {**model, "patch_size": 4})
  summary = json.loads((tmp_path / "summary.json").read_text())
  (tmp_path / "summary.json").write_text(json.dumps({**summary, "completed": False}))
  rf.summarise_run(tmp_path, num_images=2)
  assert not (tmp_path / rf.CACHE_FILE).exists()
  rf.summarise_run(tmp_path, num_images=2, cache=False)
  assert not (tmp_path / rf.CACHE_FILE).exists()


def test_vit_workdir_uses_the_patch_grid(tmp_path, monkeypatch):
  """The ViT backbone's tokens are its patches: a 28x28 image in 4x4 patches is a 7x7 grid, for
  its GPSA and its content layers alike."""
  model = {"name": "vit", "num_layers": 2, "num_heads": 4, "hidden_size": 8, "mlp_dim": 8}
  _one_step_run(tmp_path, monkeypatch, {**model, "patch_size": 4, "gpsa_layers": 1})
  probs, grid = rf.layer_probabilities(tmp_path, num_images=3)
  assert grid == (7, 7) and len(probs) == 2
  assert all(p.shape[-2:] == (49, 49) for p in probs)
  entry = rf.summarise_run(tmp_path, num_images=3)
  assert entry["grid"] == [7, 7] and len(entry["layers"]) == len(entry["init_layers"]) == 2


_TINY_VIT = {"name": "vit", "num_layers": 1, "num_heads": 2, "hidden_size": 8, "mlp_dim": 8}


@pytest.mark.parametrize(
  "model, fields",
  [
    pytest.param(
      {
        "name": "attention_net",
        "num_layers": 1,
        "num_heads": 2,
        "hidden_size": 8,
        "mlp_dim": 8,
        "downsample": 4,
        "encoding": "learned_content",
      },
      {},
      id="plain",
    ),
    pytest.param(
      {**_TINY_VIT, "encoding": "quadratic", "num_heads": 9, "hidden_size": 18},
      {"conv_init_alpha": 2.0},
      id="conv_init",
    ),
    pytest.param(_TINY_VIT, {"mimetic_init": True}, id="mimetic"),
  ],
)
def test_initial_variables_are_the_trainers(tmp_path, monkeypatch, model, fields):
  """train.initial_variables reproduces the trainer's initialisation, with and without the
  conv and mimetic rewrites: a run with learning rate 0 keeps its initial parameters as its
  best checkpoint."""
  import jax

  from experiments import conversion

  config, dataset = _one_step_run(
    tmp_path, monkeypatch, model, seed=3, learning_rate=0.0, weight_decay=0.0, **fields
  )
  model = train_lib._build_model(config, dataset.num_classes)
  init = train_lib.initial_variables(config, model, dataset.image_shape)
  best = conversion.load_best(tmp_path)
  jax.tree_util.tree_map(np.testing.assert_array_equal, init["params"], best["params"])
  # ... and the rewrite took place: without it the parameters differ.
  bare = ml_collections.ConfigDict(config.to_dict())
  bare.conv_init_alpha, bare.mimetic_init = 0.0, False
  plain = jax.tree_util.tree_leaves(train_lib.initial_variables(bare, model, dataset.image_shape))
  same = [np.array_equal(a, b) for a, b in zip(plain, jax.tree_util.tree_leaves(init))]
  assert all(same) == (not fields)
  if fields:
    return
  # Evaluating the initialisation (experiments.evaluate --which=init) scores those parameters.
  from experiments.evaluate import evaluate_workdir

  at_init = evaluate_workdir(tmp_path, which="init", plot=False, dataset=dataset)
  at_best = evaluate_workdir(tmp_path, which="best", plot=False, dataset=dataset)
  assert at_init["step"] == 0 and (tmp_path / "evaluation_init.json").exists()
  for key in ("val_accuracy", "test_accuracy", "val_loss", "test_loss"):
    assert at_init[key] == at_best[key]
  with pytest.raises(ValueError, match="which"):
    evaluate_workdir(tmp_path, which="first", plot=False, dataset=dataset)
  config.seed = 4
  other = train_lib.initial_variables(config, model, dataset.image_shape)
  assert not all(
    np.array_equal(a, b)
    for a, b in zip(jax.tree_util.tree_leaves(other), jax.tree_util.tree_leaves(init))
  )


def _run_entry(r90_init, r90_final, mass_init, mass_final, dist_init, dist_final):
  """A summarise_run entry with one value per layer for the three summarised quantities."""

  def layers(r90, mass):
    return [
      {"layer": i, "r90": r, "mass_within": {"1": 0.0, rf.WINDOW: m}, "mean_distance": 0.0}
      for i, (r, m) in enumerate(zip(r90, mass))
    ]

  return {
    "workdir": "w",
    "grid": [7, 7],
    "layers": layers(r90_final, mass_final),
    "init_layers": layers(r90_init, mass_init),
    "attention_distance": [
      {"layer": i, "init_mean": a, "final_mean": b}
      for i, (a, b) in enumerate(zip(dist_init, dist_final))
    ],
  }


def test_summarise_seeds_pairs_trained_with_initial_values():
  from experiments.intervals import t_interval

  runs = [
    _run_entry([2.0, 3.0], [1.5, 3.5], [0.5, 0.4], [0.75, 0.25], [2.5, 2.5], [2.0, 3.0]),
    _run_entry([2.5, 3.0], [1.5, 4.0], [0.5, 0.5], [0.5, 0.25], [2.5, 2.0], [1.5, 3.5]),
    _run_entry([2.0, 3.5], [1.0, 4.0], [0.25, 0.5], [1.0, 0.5], [3.0, 2.5], [2.0, 3.0]),
  ]
  summary = rf.summarise_seeds(runs)
  assert [s["layer"] for s in summary] == [0, 1]
  first = summary[0]["r90"]
  assert first["init"] == {
    "mean": pytest.approx(6.5 / 3, abs=1e-4),
    "std": pytest.approx(float(np.std([2.0, 2.5, 2.0], ddof=1)), abs=1e-4),
  }
  assert first["final"]["mean"] == pytest.approx(4.0 / 3, abs=1e-4)
  # The change is paired seed by seed: (-0.5, -1.0, -1.0), not final mean minus init mean alone.
  expected = t_interval([-0.5, -1.0, -1.0])
  for k in ("mean", "std", "low", "high"):
    assert first["change"][k] == pytest.approx(expected[k], abs=1e-4)
  assert first["change"]["n"] == 3
  mass = summary[1]["mass_within_sqrt2"]
  assert mass["final"]["mean"] == pytest.approx(1.0 / 3, abs=1e-4)
  assert summary[1]["attention_distance"]["change"]["mean"] == pytest.approx(
    (0.5 + 1.5 + 0.5) / 3, abs=1e-4
  )
  # One seed: means only.
  single = rf.summarise_seeds(runs[:1])[0]["attention_distance"]
  assert single["init"]["std"] is None and single["change"]["low"] is None
  assert single["change"]["mean"] == pytest.approx(-0.5)
  with pytest.raises(ValueError, match="runs"):
    rf.summarise_seeds([])
  shallow = _run_entry([2.0], [1.0], [0.5], [0.5], [2.0], [2.0])
  with pytest.raises(ValueError, match="depth"):
    rf.summarise_seeds([runs[0], shallow])
  no_window = _run_entry([2.0], [1.0], [0.5], [0.5], [2.0], [2.0])
  del no_window["layers"][0]["mass_within"][rf.WINDOW]
  with pytest.raises(ValueError, match="1.41421"):
    rf.summarise_seeds([no_window])


def test_network_means_average_layers_within_each_seed(tmp_path):
  from experiments.intervals import t_interval

  runs = [
    _run_entry([2.0, 3.0], [1.5, 3.5], [0.5, 0.4], [0.75, 0.25], [2.5, 2.5], [2.0, 3.0]),
    _run_entry([2.5, 3.0], [1.5, 4.0], [0.5, 0.5], [0.5, 0.25], [2.5, 2.0], [1.5, 3.5]),
    _run_entry([2.0, 3.5], [1.0, 4.0], [0.25, 0.5], [1.0, 0.5], [3.0, 2.5], [2.0, 3.0]),
  ]
  means = rf.network_means(runs)
  # Layer means per seed, mass within sqrt(2): init (0.45, 0.5, 0.375), final (0.5, 0.375, 0.75).
  mass = means["mass_within_sqrt2"]
  assert mass["init"]["mean"] == pytest.approx(1.325 / 3, abs=1e-4)
  assert mass["final"]["std"] == pytest.approx(float(np.std([0.5, 0.375, 0.75], ddof=1)), abs=1e-4)
  expected = t_interval([0.05, -0.125, 0.375])
  for k in ("mean", "low", "high"):
    assert mass["change"][k] == pytest.approx(expected[k], abs=1e-4)
  assert means["r90"]["final"]["mean"] == pytest.approx((2.5 + 2.75 + 2.5) / 3, abs=1e-4)
  with pytest.raises(ValueError, match="runs"):
    rf.network_means([])
  # Uniform attention: the reference the figures draw.
  uniform = rf.uniform_reference((7, 7))
  assert uniform["mass_within"][rf.WINDOW] == pytest.approx(0.1504, abs=1e-4)
  assert uniform["r90"] == pytest.approx(5.72, abs=1e-3)
  # The figure against the training-set size (two sizes, two models).
  entry = {"grid": [7, 7], "network_mean": means}
  results = {
    "sizes": {
      "1000": {"train_examples": 1000, "models": {"a": entry, "b": entry}},
      "all": {"train_examples": 55000, "models": {"a": entry}},
    },
    "uniform_reference": uniform,
  }
  rf.plot_sizes(results, tmp_path / "sizes.png")
  assert (tmp_path / "sizes.png").stat().st_size > 1000


def test_study_workdirs_lists_finished_seeds_in_order(tmp_path):
  import json

  def make(model, seed, completed):
    d = tmp_path / model / "nall" / f"s{seed}"
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({"completed": completed}))

  for seed in (10, 2, 0):
    make("gpsa", seed, True)
  make("gpsa", 3, False)  # interrupted: left out
  make("vit", 1, True)
  (tmp_path / "vit" / "nall" / "s4").mkdir()  # started, no summary yet
  workdirs, names = rf.study_workdirs(tmp_path, ["vit", "gpsa"])
  assert names == ["vit", "gpsa", "gpsa", "gpsa"]
  assert [pathlib.Path(w).name for w in workdirs] == ["s1", "s0", "s2", "s10"]
  with pytest.raises(ValueError, match="study_workdir"):
    rf.study_workdirs(tmp_path, ["cnn"])
  with pytest.raises(ValueError, match="study_workdir"):
    rf.study_workdirs(tmp_path, ["gpsa"], size="1000")


def test_format_markdown_quotes_init_trained_and_paired_change():
  runs = [
    _run_entry([2.0, 3.0], [1.5, 3.5], [0.5, 0.4], [0.75, 0.25], [2.5, 2.5], [2.0, 3.0]),
    _run_entry([2.5, 3.0], [1.5, 4.0], [0.5, 0.5], [0.5, 0.25], [2.5, 2.0], [1.5, 3.5]),
    _run_entry([2.0, 3.5], [1.0, 4.0], [0.25, 0.5], [1.0, 0.5], [3.0, 2.5], [2.0, 3.0]),
  ]
  entry = {
    "grid": [7, 7],
    "seeds": rf.summarise_seeds(runs),
    "network_mean": rf.network_means(runs),
  }
  uniform = rf.uniform_reference((7, 7))
  # One size: per layer.
  lines = rf.format_markdown({"models": {"m": entry}, "uniform_reference": uniform}).splitlines()
  assert "| model | layer 1 | layer 2 |" in lines
  rows = [line for line in lines if line.startswith("| `m` |")]
  assert len(rows) == 2 * len(rf.QUANTITIES)
  # Mass within sqrt(2), layer 1: init (0.5, 0.5, 0.25), trained (0.75, 0.5, 1.0).
  init_std, final_std = np.std([0.5, 0.5, 0.25], ddof=1), np.std([0.75, 0.5, 1.0], ddof=1)
  assert rows[0].startswith(f"| `m` | 0.417 ± {init_std:.3f} → 0.750 ± {final_std:.3f} |")
  # Its paired change, layer 2: (-0.15, -0.25, 0.0).
  change = entry["seeds"][1]["mass_within_sqrt2"]["change"]
  assert rows[1].endswith(
    f"| {change['mean']:+.3f} [{change['low']:+.3f}, {change['high']:+.3f}] |"
  )
  assert (
    lines[-1]
    == "Uniform attention over the grid: mass within sqrt(2) 0.150, attention distance 3.61, r90 5.72."
  )
  # Several sizes: the network means, one column per size, blank where a model has no run.
  sizes = {
    "1000": {"train_examples": 1000, "models": {"a": entry, "b": entry}},
    "all": {"train_examples": 55000, "models": {"a": entry}},
  }
  text = rf.format_markdown({"sizes": sizes, "uniform_reference": uniform})
  assert "| model | 1,000 | 55,000 |" in text
  b_rows = [line for line in text.splitlines() if line.startswith("| `b` |")]
  # Attention distance, layer means per seed: init (2.5, 2.25, 2.75), trained (2.5, 2.5, 2.5): a
  # zero std is left out. Model b has no run at 55,000 images: a blank cell.
  assert b_rows[2] == "| `b` | 2.50 ± 0.25 → 2.50 |  |"
  # One seed: no std, no interval.
  single = {"grid": [7, 7], "seeds": rf.summarise_seeds(runs[:1])}
  one = rf.format_markdown({"models": {"s": single}}).splitlines()
  assert "| `s` | 0.500 → 0.750 | 0.400 → 0.250 |" in one
  assert "| `s` | +0.250 | -0.150 |" in one
