"""The grid-formation measures: lattice distance, its null, peak mass, r90, the verdict."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from experiments import grid_formation as gf
from experiments import train as train_lib
from experiments.configs import grid as grid_config
from tests.test_data_scaling import _synthetic

LATTICE_3X3 = gf.lattice(9)


@st.composite
def permuted_lattice_with_shift(draw):
  """The 3x3 lattice in a random head order, every centre moved by one shift of norm < 0.5."""
  perm = draw(st.permutations(range(9)))
  angle = draw(st.floats(0.0, 2.0 * np.pi))
  norm = draw(st.floats(0.0, 0.49))
  shift = norm * np.array([np.cos(angle), np.sin(angle)])
  return LATTICE_3X3[list(perm)] + shift, norm


def test_lattice_is_the_kernel_shifts():
  assert LATTICE_3X3.shape == (9, 2)
  assert {tuple(p) for p in LATTICE_3X3} == {(i, j) for i in (-1, 0, 1) for j in (-1, 0, 1)}
  assert gf.lattice(25).min() == -2 and gf.lattice(25).max() == 2
  for bad in (4, 8, 10):
    with pytest.raises(ValueError, match="num_heads"):
      gf.lattice(bad)


@settings(max_examples=30, deadline=None)
@given(permuted_lattice_with_shift())
def test_lattice_distance_of_a_shifted_lattice_is_the_shift(case):
  """Any head order matches optimally; a common shift of norm < 1/2 costs exactly its norm."""
  centers, norm = case
  assert gf.lattice_distance(centers) == pytest.approx(norm, abs=1e-9)


def test_lattice_distance_exact_zero_and_one_misplaced_head():
  assert gf.lattice_distance(LATTICE_3X3[::-1]) == 0.0
  centers = LATTICE_3X3.copy()
  centers[4] = (3.0, 4.0)  # the centre head 5 tokens off; the rest in place
  # Optimal matching: the stray head takes the free shift (0, 0): distance 5, mean 5/9.
  assert gf.lattice_distance(centers) == pytest.approx(5.0 / 9.0)
  with pytest.raises(ValueError, match="centers"):
    gf.lattice_distance(np.zeros(9))


def test_null_distribution_is_reproducible_and_ordered():
  a = gf.lattice_distance_null(9, 2.0, draws=300, seed=1)
  b = gf.lattice_distance_null(9, 2.0, draws=300, seed=1)
  assert a == b and a["draws"] == 300
  assert 0.0 < a["p5"] < a["mean"]
  # Tighter initialisations sit closer to the lattice.
  assert gf.lattice_distance_null(9, 0.5, draws=300)["mean"] < a["mean"]
  with pytest.raises(ValueError, match="draws"):
    gf.lattice_distance_null(9, 2.0, draws=0)


def test_head_measures_sharp_heads_on_the_lattice():
  """alpha large: each head puts (almost) all of the centre query's mass on its shift."""
  grid = (7, 7)
  m = gf.head_measures(LATTICE_3X3, np.full(9, 50.0), grid)
  np.testing.assert_allclose(m["peak_mass"], 1.0, atol=1e-6)
  np.testing.assert_allclose(m["r90"], np.linalg.norm(LATTICE_3X3, axis=-1), atol=1e-12)
  # Every probability row sums to one, for every query.
  probs = gf.head_probabilities(LATTICE_3X3, np.full(9, 0.5), grid)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  wide = gf.head_measures(LATTICE_3X3, np.full(9, 0.01), grid)
  assert max(wide["peak_mass"]) < 0.1 and min(wide["r90"]) > 2.0


def _write_workdir(path, first, last, alpha_first, alpha_last, std=2.0):
  config = {
    "dataset": {"name": "fashion_mnist"},
    "model": {"downsample": 4, "center_init_std": std, "encoding": "quadratic"},
    "optimizer": "adamw",
    "num_epochs": 2,
  }
  (path / "config.json").write_text(json.dumps(config))
  name = "block_0/attention"
  records = [
    {"step": 0, "centers": {name: first.tolist()}, "alpha": {name: alpha_first.tolist()}},
    {"step": 10, "centers": {name: last.tolist()}, "alpha": {name: alpha_last.tolist()}},
  ]
  (path / "centers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  metric = {"step": 10, "epoch": 2.0, "train_accuracy": 0.5, "test_accuracy": 0.4}
  (path / "metrics.jsonl").write_text(json.dumps(metric) + "\n")


def test_verdict_follows_the_criterion(tmp_path):
  rng = np.random.default_rng(0)
  start = 2.0 * rng.standard_normal((9, 2))
  alpha0 = np.full(9, 0.5)
  cases = {
    "grid": (LATTICE_3X3 + 0.05, np.full(9, 10.0), True),
    "wide": (LATTICE_3X3 + 0.05, np.full(9, 0.05), False),  # on the lattice, not peaked
    "random": (start + 0.1, np.full(9, 10.0), False),  # peaked, not on the lattice
  }
  for tag, (final, alpha, formed) in cases.items():
    workdir = tmp_path / tag
    workdir.mkdir()
    _write_workdir(workdir, start, final, alpha0, alpha)
    result = gf.analyse_run(workdir, null_draws=200)
    assert result["tokens"] == [7, 7] and result["epochs"] == 2.0
    (layer,) = result["layers"]
    assert layer["formed"] is formed and result["formed"] is formed, tag
    assert layer["lattice_distance_init"] == pytest.approx(gf.lattice_distance(start))
    assert layer["alpha_final"] == pytest.approx(alpha.tolist())
    assert len(layer["lattice_distance_trajectory"]) == 2
    assert layer["lattice_distance_null_p5"] < layer["lattice_distance_null_mean"]
  with pytest.raises(ValueError, match="workdir"):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((tmp_path / "grid" / "config.json").read_text())
    gf.analyse_run(tmp_path / "empty")


def test_grid_config_trains_and_is_analysed(tmp_path):
  """The smoke grid config through the trainer: centres and alpha logged, measures and figure."""
  config = grid_config.get_config("smoke")
  assert config.model.num_heads == 9 and config.model.downsample == 2
  config.num_train_steps = config.eval_every_steps = config.checkpoint_every_steps = 2
  config.batch_size, config.progress_bar, config.plot = 8, False, False
  config.model.hidden_size, config.model.mlp_dim, config.model.num_layers = 8, 8, 1
  train_lib.train_and_evaluate(config, tmp_path, dataset=_synthetic(40))
  result = gf.analyse_run(tmp_path, null_draws=50)
  assert result["tokens"] == [14, 14] and len(result["layers"]) == 1
  assert len(result["layers"][0]["alpha_final"]) == 9
  gf.plot(result, tmp_path / "grid.png")
  assert (tmp_path / "grid.png").stat().st_size > 1000


@pytest.mark.parametrize("arg", ["adamw", "sgd", "gpsa", "paper_size", "sgd,smoke"])
def test_grid_config_recipes(arg):
  config = grid_config.get_config(arg)
  assert config.model.num_layers >= 2 and config.model.center_init_std == 2.0
  assert config.model.encoding == ("gpsa" if arg == "gpsa" else "quadratic")
  assert config.optimizer == ("sgd" if arg.startswith(("sgd", "paper_size")) else "adamw")
  # The paper's full size (6 x 9 heads, D = 400) in bfloat16; the CPU recipes are float32.
  size = (config.model.num_layers, config.model.hidden_size, config.model.mlp_dim, config.dtype)
  assert size == ((6, 400, 512, "bfloat16") if arg == "paper_size" else size[:3] + ("float32",))
  if "smoke" not in arg:
    assert config.num_epochs >= 20 and config.dataset.crop_padding == 2 and config.dataset.flip


def test_gpsa_trajectories_from_kept_checkpoints(tmp_path, monkeypatch):
  """Gates start at sigmoid(1) (ConViT) and every kept checkpoint adds one point per layer."""
  dataset = _synthetic(40)
  monkeypatch.setattr(train_lib, "load_dataset_from_config", lambda config: dataset)
  config = grid_config.get_config("gpsa,smoke")
  assert config.model.encoding == "gpsa" and config.model.downsample == 4
  config.num_train_steps, config.eval_every_steps, config.checkpoint_every_steps = 2, 1, 1
  config.keep_checkpoints = 3
  config.batch_size, config.progress_bar, config.plot = 8, False, False
  config.model.hidden_size, config.model.mlp_dim, config.model.num_layers = 8, 8, 2
  train_lib.train_and_evaluate(config, tmp_path, dataset=dataset)
  traj = gf.checkpoint_trajectories(tmp_path, num_images=5)
  assert traj["tokens"] == [7, 7] and len(traj["layers"]) == 2
  for layer in traj["layers"]:
    assert [t[0] for t in layer["gate_trajectory"]] == [0, 1, 2]
    np.testing.assert_allclose(layer["gate_trajectory"][0][1], 1 / (1 + np.exp(-1.0)), atol=1e-4)
    assert [t[0] for t in layer["attention_distance_trajectory"]] == [0, 1, 2]
    assert all(len(t[1]) == 9 for t in layer["attention_distance_trajectory"])
  gf.plot_trajectories(traj, tmp_path / "traj.png")
  assert (tmp_path / "traj.png").stat().st_size > 1000
