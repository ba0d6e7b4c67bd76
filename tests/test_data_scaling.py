"""The data-scaling grid driver (experiments/data_scaling.py) on a tiny synthetic dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments import data_scaling
from experiments import train as train_lib
from experiments.configs import data_scaling as grid_config
from experiments.input_pipeline import Dataset


def _synthetic(train_size: int) -> Dataset:
  rng = np.random.default_rng(train_size)

  def make(n):
    labels = rng.integers(0, 10, n).astype(np.int32)
    images = (rng.integers(0, 40, (n, 28, 28, 1)) + 20 * labels[:, None, None, None]).astype(
      np.uint8
    )
    return images, labels

  (tri, trl), (vai, val), (tei, tel) = make(train_size), make(20), make(20)
  return Dataset(
    name="synthetic",
    train_images=tri,
    train_labels=trl,
    val_images=vai,
    val_labels=val,
    test_images=tei,
    test_labels=tel,
    num_classes=10,
    mean=(0.5,),
    std=(0.25,),
    crop_padding=2,
    flip=True,
  )


@pytest.fixture
def fake_loader(monkeypatch):
  calls = []

  def load(config):
    calls.append((config.dataset.train_size, config.dataset.seed))
    return _synthetic(int(config.dataset.train_size))

  monkeypatch.setattr(train_lib, "load_dataset_from_config", load)
  return calls


def test_configs():
  for arg in (None, "fashion_mnist", "cifar10", "smoke"):
    config = grid_config.get_config(arg)
    assert set(config.scaling.models) == set(grid_config.MODELS)
    assert len(config.scaling.seeds) >= (1 if arg == "smoke" else 3)
    assert len(config.scaling.train_sizes) >= (2 if arg == "smoke" else 5)
  assert grid_config.get_config("cifar10").dataset.name == "cifar10"
  with pytest.raises(ValueError, match="arg"):
    grid_config.get_config("imagenet")
  config = grid_config.get_config()
  run = grid_config.run_config(config, "attention_conv_init", 1000, 2)
  assert run.conv_init_alpha == 2.0 and run.model.encoding == "quadratic"
  assert run.dataset.train_size == 1000 and run.dataset.seed == 2 and run.seed == 2
  assert "scaling" not in run and "scaling" in config  # the grid config is not modified
  assert grid_config.run_config(config, "cnn", 500, 0).conv_init_alpha == 0.0
  # Every model gets the same number of steps whatever the size.
  assert (
    len({grid_config.run_config(config, m, 500, 0).num_train_steps for m in grid_config.MODELS})
    == 1
  )
  with pytest.raises(ValueError, match="model"):
    grid_config.run_config(config, "vit", 500, 0)


def test_grid_points_order_and_errors():
  config = grid_config.get_config("smoke")
  points = data_scaling.grid_points(config, ["cnn", "attention_quadratic"])
  assert points == [
    ("cnn", 200, 0),
    ("attention_quadratic", 200, 0),
    ("cnn", 400, 0),
    ("attention_quadratic", 400, 0),
  ]
  assert len(data_scaling.grid_points(config)) == 2 * len(grid_config.MODELS)
  with pytest.raises(ValueError, match="models"):
    data_scaling.grid_points(config, ["nope"])


def test_every_model_trains_one_grid_point(tmp_path, fake_loader):
  config = grid_config.get_config("smoke")
  config.num_train_steps = 1
  config.eval_every_steps = 1
  config.checkpoint_every_steps = 1
  points = [(m, 200, 0) for m in grid_config.MODELS]
  data_scaling.run_grid(config, str(tmp_path), points)
  assert fake_loader == [(200, 0)]  # one subset, loaded once for every model
  records = data_scaling.gather(config, str(tmp_path), points)
  assert [r["model"] for r in records] == list(grid_config.MODELS)
  for r in records:
    assert set(r) >= {
      "model",
      "train_size",
      "seed",
      "test_accuracy",
      "val_accuracy",
      "steps",
      "params",
    }
    assert r["train_size"] == 200 and r["steps"] == 1 and r["params"] > 0
  # The conv-initialised network has exactly the quadratic network's parameters.
  params = {r["model"]: r["params"] for r in records}
  assert params["attention_conv_init"] == params["attention_quadratic"]


def test_resume_skips_finished_points_then_gather_and_plot(tmp_path, fake_loader):
  config = grid_config.get_config("smoke")
  points = data_scaling.grid_points(config, ["cnn"])
  data_scaling.run_grid(config, str(tmp_path), points[:1])
  first = (data_scaling.run_dir(tmp_path, *points[0]) / "summary.json").read_text()
  fake_loader.clear()
  data_scaling.run_grid(config, str(tmp_path), points)  # the first point is not re-run
  assert fake_loader == [(400, 0)]
  assert (data_scaling.run_dir(tmp_path, *points[0]) / "summary.json").read_text() == first
  records = data_scaling.gather(config, str(tmp_path), points)
  assert [r["train_size"] for r in records] == [200, 400]
  assert all(r["steps"] == config.num_train_steps for r in records)
  json.dumps(records)
  table = data_scaling.summarize(records + [dict(records[0], seed=1, test_accuracy=0.0)])
  mean, std, count = table["cnn"][200]
  a = records[0]["test_accuracy"]
  assert count == 2 and mean == pytest.approx(a / 2) and std == pytest.approx(a / 2)
  data_scaling.plot(records, tmp_path / "scaling.png")
  assert (tmp_path / "scaling.png").stat().st_size > 1000
