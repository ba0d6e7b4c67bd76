"""The data-scaling grid (experiments/data_scaling.py and its config) on a tiny synthetic dataset:
configs and budgets, every model through the runner, records, paired intervals, trends."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnconv.construction import conv_head_offsets
from attnconv.models import build_model, count_params
from experiments import data_scaling
from experiments import train as train_lib
from experiments.configs import data_scaling as grid_config
from experiments.configs import priors
from experiments.input_pipeline import Dataset
from tests.synthetic import synthetic_dataset

# Student t quantile t_{0.975, 2} (3 seeds, 2 degrees of freedom), from the t table.
T975_2DOF = 4.302652729749464


def _synthetic(train_size: int) -> Dataset:
  """10 classes, 28x28x1 images, ``train_size`` train, 20 val, 20 test."""
  return synthetic_dataset(
    train_size, 20, 20, num_classes=10, hw=28, noise=40, step=20, crop_padding=2, seed=train_size
  )


@pytest.fixture
def fake_loader(monkeypatch):
  calls = []

  def load(config):
    calls.append((config.dataset.train_size, config.dataset.seed))
    return _synthetic(int(config.dataset.train_size))

  monkeypatch.setattr(train_lib, "load_dataset_from_config", load)
  return calls


@pytest.fixture
def tiny_backbone(monkeypatch):
  """The shared attention backbone shrunk (2 narrow blocks, GPSA in the first) for fast compiles."""
  for key, value in {"hidden_size": 18, "mlp_dim": 18, "num_layers": 2}.items():
    monkeypatch.setitem(priors.BACKBONE, key, value)
  monkeypatch.setitem(priors.PRIORS, "gpsa", ({"gpsa_layers": 1}, {}))


def test_convergence_config():
  config = grid_config.get_config()
  assert config.scaling.grid == "convergence"
  assert config.scaling.models == ("cnn", *priors.PRIORS)
  assert config.scaling.train_sizes == (1000, 3000, 10000, 30000, -1)
  assert config.scaling.seeds == (0, 1, 2)
  assert (config.num_train_steps, config.scaling.min_epochs, config.scaling.evaluations) == (
    2000,
    10.0,
    10,
  )
  assert config.batch_size == 100 and config.optimizer == "adamw"
  assert config.learning_rate == 0.001 and config.weight_decay == 0.05
  assert config.schedule == "warmup_cosine"
  assert config.dataset.crop_padding == 2 and config.dataset.flip is True
  for prior in priors.PRIORS:  # the priors' backbone and switches, from priors.apply_prior
    run = grid_config.run_config(config, prior, 1000, 1)
    reference = priors.get_config(prior)
    assert run.model.to_dict() == reference.model.to_dict()
    assert run.mimetic_init == reference.mimetic_init
    assert run.conv_init_alpha == reference.conv_init_alpha
    assert run.dataset.crop_padding == 2 and run.dataset.flip is True  # the same augmentation
  cnn = grid_config.run_config(config, "cnn", 1000, 2)
  assert cnn.model.name == "small_cnn" and cnn.conv_init_alpha == 0.0 and not cnn.mimetic_init
  # The CNN is parameter-matched: within the attention models' range (132,742-175,098); the
  # fixed-compute grid keeps its smaller global-average-pooled CNN.
  fixed = grid_config.run_config(grid_config.get_config("fixed_compute"), "cnn", 1000, 0)
  counts = {}
  for name, run in (("cnn", cnn), ("fixed", fixed)):
    kwargs = run.model.to_dict()
    module = build_model(kwargs.pop("name"), num_classes=10, **kwargs)
    shapes = jax.eval_shape(lambda m=module: m.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1))))
    counts[name] = count_params(shapes["params"])
  assert counts == {"cnn": 155_626, "fixed": 56_554}
  assert cnn.model.pool == "flatten" and fixed.model.pool == "avg"
  assert cnn.dataset.train_size == 1000 and cnn.dataset.seed == 2 and cnn.seed == 2
  assert "scaling" not in cnn and "scaling" in config  # the grid config is not modified
  with pytest.raises(ValueError, match="model"):
    grid_config.run_config(config, "attention_learned", 500, 0)  # a fixed-compute model only
  assert grid_config.get_config("cifar10").dataset.crop_padding == 4


def test_fixed_compute_config():
  config = grid_config.get_config("fixed_compute")
  assert config.scaling.grid == "fixed_compute"
  assert set(config.scaling.models) == set(grid_config.FIXED_COMPUTE_MODELS)
  assert config.batch_size == 64 and config.learning_rate == 0.003
  assert config.dataset.crop_padding == 0 and config.dataset.flip is False
  for size in (500, 15000, -1):  # the same steps whatever the size
    run = grid_config.run_config(config, "attention_conv_init", size, 2)
    assert (run.num_train_steps, run.eval_every_steps) == (600, 200)
    assert run.conv_init_alpha == 2.0 and run.model.name == "attention_net"
  assert grid_config.get_config("fixed_compute,cifar10").dataset.name == "cifar10"
  smoke = grid_config.get_config("fixed_compute,smoke")
  assert smoke.num_train_steps == 4 and smoke.scaling.train_sizes == (200, 400)


def test_large_config():
  """The GPU variant: the convergence recipe and budget at the two largest sizes, larger models
  whose attention parameter counts stay within 25 % of each other."""
  config = grid_config.get_config("large")
  base = grid_config.get_config()
  assert config.scaling.grid == "large" and config.scaling.train_sizes == (30000, -1)
  assert tuple(config.scaling.models) == tuple(base.scaling.models)
  counts = {}
  for model in config.scaling.models:
    run = grid_config.run_config(config, model, -1, 1)
    small = grid_config.run_config(base, model, -1, 1)
    assert run.num_train_steps == small.num_train_steps == 5500
    assert (run.learning_rate, run.batch_size) == (small.learning_rate, small.batch_size)
    assert (run.mimetic_init, run.conv_init_alpha) == (small.mimetic_init, small.conv_init_alpha)
    kwargs = run.model.to_dict()
    module = build_model(kwargs.pop("name"), num_classes=10, **kwargs)
    variables = jax.eval_shape(
      lambda m=module: m.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    )
    counts[model] = count_params(variables["params"])
  assert counts["cnn"] == 495_562
  assert counts["vit"] == counts["vit_mimetic"] == 1_016_074 and counts["gpsa"] == 1_016_254
  assert counts["attention_quadratic"] == counts["attention_conv_init"] == 765_676
  assert counts["attention_learned_content"] == 1_017_322
  attention = [v for k, v in counts.items() if k != "cnn"]
  assert min(attention) >= 0.75 * max(attention)
  assert grid_config.run_config(config, "gpsa", -1, 0).model.gpsa_layers == 5
  assert grid_config.run_config(base, "gpsa", -1, 0).model.gpsa_layers == 3
  smoke = grid_config.get_config("large,smoke")
  assert smoke.scaling.train_sizes == (200, 400) and smoke.scaling.backbone_overrides


def test_budget_config_doubles_the_convergence_budget_at_10000_images():
  """The budget check: the convergence grid's runs at 10,000 images with twice the steps, and
  nothing else changed (the same model, subset, seed and recipe)."""
  config = grid_config.get_config("budget")
  base = grid_config.get_config()
  assert config.scaling.grid == "budget" and config.scaling.train_sizes == (10000,)
  assert tuple(config.scaling.models) == ("cnn", "vit", "gpsa", "attention_conv_init")
  assert set(config.scaling.models) <= set(base.scaling.models)
  for model in config.scaling.models:
    longer = grid_config.run_config(config, model, 10000, 2).to_dict()
    shorter = grid_config.run_config(base, model, 10000, 2).to_dict()
    assert (longer["num_train_steps"], shorter["num_train_steps"]) == (4000, 2000)
    assert (longer["eval_every_steps"], shorter["eval_every_steps"]) == (400, 200)
    budget = ("num_train_steps", "eval_every_steps", "checkpoint_every_steps")
    assert {k: v for k, v in longer.items() if k not in budget} == {
      k: v for k, v in shorter.items() if k not in budget
    }
  smoke, base_smoke = grid_config.get_config("budget,smoke"), grid_config.get_config("smoke")
  assert smoke.scaling.train_sizes == (200,) and smoke.scaling.seeds == (0,)
  for model in smoke.scaling.models:  # 2 steps in the convergence smoke grid at 200 images
    assert grid_config.run_config(smoke, model, 200, 0).num_train_steps == 4
    assert grid_config.run_config(base_smoke, model, 200, 0).num_train_steps == 2


@pytest.mark.parametrize("arg", ["imagenet", "fixed_compute,imagenet", "cifar10,fashion_mnist"])
def test_bad_config_argument(arg):
  with pytest.raises(ValueError, match="^arg: expected"):
    grid_config.get_config(arg)


def test_budget_formula():
  # max(2000 steps, 10 epochs) at batch 100; 10 evaluations.
  for images, steps in ((1000, 2000), (3000, 2000), (10000, 2000), (30000, 3000), (55000, 5500)):
    assert grid_config.budget_steps(images, 100, 2000, 10.0) == (steps, images // 100)
  assert grid_config.budget_steps(2999, 100, 1, 10.0) == (290, 29)  # partial batch dropped
  assert grid_config.budget_steps(1000, 100, 7, 0.25) == (7, 10)
  config = grid_config.get_config()
  for size, steps in ((1000, 2000), (30000, 3000), (-1, 5500)):
    run = grid_config.run_config(config, "gpsa", size, 0)
    assert run.num_train_steps == steps
    assert run.eval_every_steps == run.checkpoint_every_steps == steps // 10
  assert grid_config.num_train_images(config, -1) == 55000
  cifar = grid_config.get_config("cifar10")
  assert grid_config.run_config(cifar, "vit", -1, 0).num_train_steps == 4500  # 45,000 images
  # The loaded subset's size wins over the nominal one.
  assert grid_config.run_config(config, "cnn", -1, 0, num_images=20000).num_train_steps == 2000
  assert grid_config.run_config(config, "cnn", 1000, 0, num_images=3501).eval_every_steps == 200
  for kwargs, name in (
    ({"num_images": 0}, "num_images"),
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": 2000}, "batch_size"),
    ({"min_steps": 0}, "min_steps"),
    ({"min_epochs": -1.0}, "min_epochs"),
  ):
    args = {"num_images": 1000, "batch_size": 100, "min_steps": 1, "min_epochs": 1.0, **kwargs}
    with pytest.raises(ValueError, match=f"^{name}: expected"):
      grid_config.budget_steps(**args)
  with pytest.raises(ValueError, match="^train_size: expected"):
    grid_config.num_train_images(config, 0)
  with pytest.raises(TypeError, match="^train_size: expected"):
    grid_config.num_train_images(config, 1.5)
  with pytest.raises(ValueError, match="^evaluations: expected"):
    grid_config.apply_budget(grid_config.run_config(config, "cnn", 1000, 0), 1000, 1, 1.0, 0)


def test_grid_points_order_and_errors():
  config = grid_config.get_config("smoke")
  points = data_scaling.grid_points(config, ["cnn", "gpsa"])
  assert points == [("cnn", 200, 0), ("gpsa", 200, 0), ("cnn", 400, 0), ("gpsa", 400, 0)]
  assert len(data_scaling.grid_points(config)) == 2 * len(grid_config.MODELS)
  with pytest.raises(ValueError, match="models"):
    data_scaling.grid_points(config, ["nope"])


RECORD_FIELDS = {
  "model",
  "train_size",
  "seed",
  "test_accuracy",
  "init_test_accuracy",
  "val_accuracy",
  "steps",
  "epochs",
  "final_train_accuracy",
  "late_val_gain",
  "params",
  "train_seconds",
  "cpu_seconds",
  "device",
  "dataset",
}


def test_every_model_trains_one_grid_point(tmp_path, fake_loader, tiny_backbone):
  config = grid_config.get_config("smoke")
  points = [(m, 200, 0) for m in grid_config.MODELS]
  data_scaling.run_grid(config, str(tmp_path), points)
  assert fake_loader == [(200, 0)]  # one subset, loaded once for every model
  records = data_scaling.gather(config, str(tmp_path), points, init_accuracy=True)
  assert [r["model"] for r in records] == list(grid_config.MODELS)
  for r in records:
    assert set(r) == RECORD_FIELDS
    # The initialisation's test accuracy, evaluated once and cached in the run directory.
    cache = data_scaling.run_dir(tmp_path, r["model"], 200, 0) / "evaluation_init.json"
    init = json.loads(cache.read_text())
    assert init["step"] == 0 and init["which"] == "init"
    assert r["init_test_accuracy"] == init["test_accuracy"]
    assert 0.0 <= r["init_test_accuracy"] <= 1.0
    # Budget max(2 steps, 0.2 epochs of 200 images at batch 20) = 2 steps = 0.2 epochs.
    assert r["train_size"] == 200 and r["steps"] == 2 and r["epochs"] == pytest.approx(0.2)
    assert r["params"] > 0 and 0.0 <= r["final_train_accuracy"] <= 1.0
    # Evaluations at steps 1 and 2: the gain from the first (at or before 70 % of 2 steps).
    val = [json.loads(line) for line in (cache.parent / "metrics.jsonl").read_text().splitlines()]
    val = [row["val_accuracy"] for row in val if "val_accuracy" in row]
    assert r["late_val_gain"] == pytest.approx(val[-1] - val[0])
    assert r["train_seconds"] >= 0.0 and r["cpu_seconds"] > 0.0 and r["device"] == "cpu x4"
    # Each attention run's receptive-field summary is cached as it finishes (not the CNN's).
    rf_cache = cache.parent / "receptive_field.json"
    assert rf_cache.exists() == (r["model"] != "cnn")
  # A finished run whose summary is missing or stale (here: computed for another image count)
  # gets it recomputed on the next pass, while its checkpoint is there.
  gpsa = data_scaling.run_dir(tmp_path, "gpsa", 200, 0)
  entry = json.loads((gpsa / "receptive_field.json").read_text())
  (gpsa / "receptive_field.json").write_text(
    json.dumps({**entry, "key": {**entry["key"], "num_images": 7}})
  )
  data_scaling.run_grid(config, str(tmp_path), points)
  assert json.loads((gpsa / "receptive_field.json").read_text()) == entry
  import shutil

  (gpsa / "receptive_field.json").unlink()
  shutil.rmtree(gpsa / "best")
  data_scaling.run_grid(config, str(tmp_path), points)  # gone: nothing to summarise, no error
  assert not (gpsa / "receptive_field.json").exists()
  cache.write_text(json.dumps({**init, "test_accuracy": 0.125}))  # read back, not recomputed
  assert data_scaling.init_test_accuracy(cache.parent) == 0.125
  summary = data_scaling.analyze(records)
  for m in grid_config.MODELS:
    at_init = summary["init_accuracy"][m]["200"]
    assert at_init["n"] == 1 and at_init["mean"] == next(
      r["init_test_accuracy"] for r in records if r["model"] == m
    )
  assert "test accuracy at initialisation" in data_scaling.format_summary(summary)
  # Without the evaluation the field is None and the summary has no initialisation table.
  plain = data_scaling.gather(config, str(tmp_path), points)
  assert all(r["init_test_accuracy"] is None for r in plain)
  assert data_scaling.analyze(plain)["init_accuracy"] == {}
  params = {r["model"]: r["params"] for r in records}
  assert params["attention_conv_init"] == params["attention_quadratic"]
  assert params["vit_mimetic"] == params["vit"] < params["gpsa"]
  summaries = {
    m: json.loads((data_scaling.run_dir(tmp_path, m, 200, 0) / "config.json").read_text())
    for m in grid_config.MODELS
  }
  assert summaries["attention_conv_init"]["conv_init_alpha"] == 2.0
  assert summaries["vit_mimetic"]["mimetic_init"] is True
  # The conv-initialised prior starts with its centres on the kernel's shifts at alpha = 2.
  centers = data_scaling.run_dir(tmp_path, "attention_conv_init", 200, 0) / "centers.jsonl"
  first = json.loads(centers.read_text().splitlines()[0])
  for layer in ("block_0/attention", "block_1/attention"):
    np.testing.assert_array_equal(first["centers"][layer], conv_head_offsets((3, 3)))
    np.testing.assert_allclose(first["alpha"][layer], 2.0, rtol=1e-6)


def test_resume_skips_finished_points_then_gather_and_plot(tmp_path, fake_loader, monkeypatch):
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
  # The initialisation depends on the model and seed, not the subset: evaluated once, shared.
  from experiments import evaluate

  calls = []

  def counted(path, **kwargs):
    calls.append(pathlib.Path(path).parent.name)
    return real_evaluate(path, **kwargs)

  real_evaluate = evaluate.evaluate_workdir
  monkeypatch.setattr(evaluate, "evaluate_workdir", counted)
  # As with the real data, every subset shares one test split (the fake loader's differ).
  shared = _synthetic(200)

  def same_test_split(config):
    data = _synthetic(int(config.dataset.train_size))
    return dataclasses.replace(data, test_images=shared.test_images, test_labels=shared.test_labels)

  monkeypatch.setattr(train_lib, "load_dataset_from_config", same_test_split)
  with_init = data_scaling.gather(config, str(tmp_path), points, init_accuracy=True)
  assert calls == ["n200"]
  assert with_init[0]["init_test_accuracy"] == with_init[1]["init_test_accuracy"]
  other = real_evaluate(data_scaling.run_dir(tmp_path, *points[1]), which="init", plot=False)
  assert other["test_accuracy"] == with_init[1]["init_test_accuracy"]
  # Each run's budget from its own size: max(2, ceil(0.2 * 200 // 20)) = 2, then 4 steps.
  assert [r["steps"] for r in records] == [2, 4]
  accuracy = data_scaling.analyze(records + [dict(records[0], seed=1, test_accuracy=0.0)])
  cell = accuracy["accuracy"]["cnn"]["200"]
  a = records[0]["test_accuracy"]  # the seeds' accuracies a and 0: std (ddof=1) a / sqrt(2)
  assert cell["n"] == 2 and cell["mean"] == pytest.approx(a / 2)
  assert cell["std"] == pytest.approx(a / math.sqrt(2))
  data_scaling.plot(records, tmp_path / "scaling.png")
  assert (tmp_path / "scaling.png").stat().st_size > 1000
  totals = data_scaling.compute(records)
  assert set(totals) == {"cnn", "total"} and totals["cnn"] == totals["total"]
  assert totals["total"]["runs"] == 2
  expected = sum(r["cpu_seconds"] for r in records) / 3600
  assert totals["total"]["cpu_hours"] == pytest.approx(expected, abs=1e-3)
  # One record without its CPU time makes that model's and the total's CPU time unknown.
  totals = data_scaling.compute([*records, dict(records[0], model="vit", cpu_seconds=None)])
  assert totals["cnn"]["cpu_hours"] is not None and totals["vit"]["cpu_hours"] is None
  assert totals["total"]["cpu_hours"] is None and totals["total"]["runs"] == 3
  # A finished run of another budget in the same directory is an error, not a silent skip.
  config.num_train_steps = 3
  with pytest.raises(ValueError, match="^workdir: expected"):
    data_scaling.run_grid(config, str(tmp_path), points[:1])


def _records(table: dict[str, dict[int, list[float]]]) -> list[dict]:
  return [
    {"model": m, "train_size": n, "seed": s, "test_accuracy": a}
    for m, sizes in table.items()
    for n, accs in sizes.items()
    for s, a in enumerate(accs)
  ]


# Hand-made accuracies, 3 seeds: gpsa - cnn = (-0.05, -0.04, -0.03) at 1000 images,
# (-0.04, -0.01, 0.02) at 10,000, (-0.01, 0.02, 0.05) at 100,000 (per-seed least-squares slopes
# 0.02, 0.03, 0.04 per decade); vit = 0.5 everywhere.
HAND = {
  "cnn": {1000: [0.80, 0.81, 0.82], 10000: [0.90, 0.90, 0.90], 100000: [0.95, 0.95, 0.95]},
  "gpsa": {1000: [0.75, 0.77, 0.79], 10000: [0.86, 0.89, 0.92], 100000: [0.94, 0.97, 1.00]},
  "vit": {1000: [0.50, 0.50, 0.50], 10000: [0.50, 0.50, 0.50], 100000: [0.50, 0.50, 0.50]},
}


def test_paired_intervals_on_a_hand_made_example():
  records = _records(HAND)
  summary = data_scaling.analyze(records)
  # gpsa - cnn at 1000: (-0.05, -0.04, -0.03): mean -0.04, sd 0.01, half-width t * 0.01 / sqrt 3.
  gap = summary["gap_to_reference"]["gpsa"]["1000"]
  half = T975_2DOF * 0.01 / math.sqrt(3)
  assert gap["n"] == 3
  assert gap["mean"] == pytest.approx(-0.04, abs=1e-12)
  assert gap["std"] == pytest.approx(0.01, abs=1e-12)
  assert gap["low"] == pytest.approx(-0.04 - half, abs=1e-12)
  assert gap["high"] == pytest.approx(-0.04 + half, abs=1e-12)
  assert half == pytest.approx(0.024841377118, abs=1e-11)
  # Relative gain over vit = (acc - 0.5) / 0.5: gpsa at 10000 is (0.72, 0.78, 0.84).
  gain = summary["gain_over_baseline"]["gpsa"]["10000"]
  assert gain["mean"] == pytest.approx(0.78, abs=1e-12)
  assert gain["std"] == pytest.approx(0.06, abs=1e-12)
  assert gain["high"] - gain["mean"] == pytest.approx(T975_2DOF * 0.06 / math.sqrt(3), abs=1e-12)
  # Accuracy: mean +- sample std.
  acc = summary["accuracy"]["cnn"]["1000"]
  assert acc["mean"] == pytest.approx(0.81, abs=1e-12) and acc["std"] == pytest.approx(0.01)
  assert "cnn" not in summary["gap_to_reference"] and "vit" not in summary["gain_over_baseline"]
  # The trend: per-seed slopes 0.02, 0.03, 0.04 per decade, interval above 0, the gap starts
  # below 0: it shrinks.
  trend = summary["trends"]["gpsa"]
  slope = trend["slope_per_decade"]
  assert slope["mean"] == pytest.approx(0.03, abs=1e-12)
  assert slope["low"] == pytest.approx(0.03 - half, abs=1e-12)
  assert trend["verdict"] == "shrinks" and trend["shrinks"] is True
  assert trend["gap_at_smallest"] == pytest.approx(-0.04)
  # Mean gaps -0.04, -0.01, +0.02: the sign changes a third of a decade above 10,000.
  assert trend["crossover_size"] == pytest.approx(10 ** (4 + 1 / 3), rel=1e-9)
  # vit - cnn: -0.30 -> -0.45 on every seed (slopes -0.075, -0.07, -0.065): it grows.
  assert summary["trends"]["vit"]["verdict"] == "grows"
  assert summary["trends"]["vit"]["crossover_size"] is None
  # gpsa - vit: (0.25, 0.36, 0.44), (0.27, 0.39, 0.47), (0.29, 0.42, 0.50) per seed: slopes
  # 0.095, 0.100, 0.105 per decade, away from 0 -- the lead over vit grows, it does not fade.
  lead = summary["baseline_trends"]["gpsa"]
  assert lead["slope_per_decade"]["mean"] == pytest.approx(0.10, abs=1e-12)
  assert lead["verdict"] == "grows" and lead["gap_at_smallest"] == pytest.approx(0.27)
  assert "vit" not in summary["baseline_trends"] and "cnn" in summary["baseline_trends"]
  json.dumps(summary, allow_nan=False)
  text = data_scaling.format_summary(summary)
  assert "shrinks" in text and "gpsa" in text


def test_markdown_tables_quote_the_analysis():
  records = _records(HAND)
  for r in records:
    r["params"] = {"cnn": 94_000, "gpsa": 174_790, "vit": 174_682}[r["model"]]
    r["init_test_accuracy"] = 0.1 + 0.01 * r["seed"]
    r["final_train_accuracy"] = 0.9 if r["train_size"] < 100000 else 0.6 + 0.1 * r["seed"]
    r["late_val_gain"] = 0.01 if r["train_size"] < 100000 else 0.01 + 0.01 * r["seed"]
  text = data_scaling.format_markdown(records, data_scaling.analyze(records))
  lines = text.splitlines()
  assert "| model | params | at initialisation | 1,000 | 10,000 | 100,000 |" in lines
  assert "|---|---|---|---|---|---|" in lines
  # Accuracy: mean +- sample std (seeds); the initialisation's mean +- std over seeds.
  assert "| `cnn` | 94,000 | 0.110 ± 0.010 | 0.810 ± 0.010 (3) | 0.900 ± 0.000 (3) |" in text
  # Mean final training accuracy (0.6, 0.7, 0.8 at 100,000 images).
  assert "| `gpsa` | 0.900 | 0.900 | 0.700 |" in lines
  # Mean validation gain over the last 30 % of the runs, in points.
  assert "| `gpsa` | +1.00 | +1.00 | +2.00 |" in lines
  # gpsa - cnn at 1000: -4 points, half-width t * 1 / sqrt 3 = 2.48 points.
  assert "| `gpsa` | -4.00 [-6.48, -1.52] | -1.00 [-8.45, +6.45] | +2.00 [-5.45, +9.45] |" in lines
  # Relative gain of gpsa over vit at 10,000: +78 %.
  assert any(line.startswith("| `gpsa` | ") and "| +78.00 [" in line for line in lines)
  # The trend: slope +3 points per decade, shrinks, crossover a third of a decade above 10,000.
  trend = next(line for line in lines if line.startswith("| `gpsa` | -4.00 → +2.00"))
  assert "| +3.00 [" in trend and "| shrinks | 21,544 images |" in trend
  assert "Trend of the difference to `vit` with data (accuracy points)" in text
  lead = next(line for line in lines if line.startswith("| `gpsa` | +27.00 → +47.00"))
  assert "| +10.00 [" in lead and "| grows | none |" in lead
  # Records without parameter counts or initial accuracies leave those cells empty.
  bare = data_scaling.format_markdown(_records(HAND), data_scaling.analyze(_records(HAND)))
  assert "| `cnn` |  |  | 0.810 ± 0.010 (3) |" in bare and "Final training" not in bare
  assert "Validation accuracy gained" not in bare


def test_crossover_and_verdicts():
  def trend(gaps_by_size):
    table = {"cnn": {}, "m": {}}
    for n, gaps in gaps_by_size.items():
      table["cnn"][n] = [0.5] * len(gaps)
      table["m"][n] = [0.5 + g for g in gaps]
    return data_scaling.gap_trends(_records(table))["m"]

  crossing = trend({1000: [-0.02, -0.02, -0.02], 10000: [0.02, 0.01, 0.03]})
  assert crossing["crossover_size"] == pytest.approx(10**3.5, rel=1e-9)
  assert crossing["verdict"] == "shrinks"
  widening = trend({1000: [-0.01, -0.01, -0.01], 10000: [-0.03, -0.04, -0.035]})
  assert widening["verdict"] == "grows" and widening["shrinks"] is False
  flat = trend({1000: [-0.01, -0.02, -0.01], 10000: [-0.02, -0.01, -0.01]})
  assert flat["verdict"] == "no detectable trend"
  one_seed = trend({1000: [-0.01], 10000: [-0.02]})
  assert one_seed["verdict"] == "undetermined" and one_seed["slope_per_decade"]["low"] is None
  one_size = _records({"cnn": {1000: [0.5, 0.5]}, "m": {1000: [0.4, 0.45]}})
  assert data_scaling.gap_trends(one_size) == {}  # a trend needs two sizes


def test_late_validation_gain(tmp_path):
  rows = [
    {"step": 100, "train_accuracy": 0.5},  # a training log line: no validation accuracy
    *({"step": 200 * k, "val_accuracy": 0.5 + 0.01 * k} for k in range(1, 11)),
  ]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  # Last evaluation at step 2000 (0.60); the last one at or before 70 % of it, step 1400 (0.57).
  assert data_scaling.late_validation_gain(tmp_path) == pytest.approx(0.03, abs=1e-12)
  # At or before 50 %: step 1000 (0.55).
  assert data_scaling.late_validation_gain(tmp_path, 0.5) == pytest.approx(0.05, abs=1e-12)
  assert data_scaling.late_validation_gain(tmp_path / "missing") is None
  # Rows already read are used as given (the path is not read).
  assert data_scaling.late_validation_gain(tmp_path / "missing", rows=rows) == pytest.approx(0.03)
  (tmp_path / "metrics.jsonl").write_text(json.dumps(rows[-1]) + "\n")
  assert data_scaling.late_validation_gain(tmp_path) is None  # one evaluation
  with pytest.raises(ValueError, match="^fraction: expected"):
    data_scaling.late_validation_gain(tmp_path, 1.0)


def test_best_prior_ranks_by_mean_and_pairs_the_runner_up():
  table = {
    "cnn": {1000: [0.9, 0.9, 0.9]},  # left out (reference), as is vit (baseline)
    "vit": {1000: [0.5, 0.5, 0.5]},
    # a - b = (0.03, 0.02, 0.04) at 1000: leads; (0.01, -0.01, 0.03) at 10,000: tied.
    "a": {1000: [0.83, 0.82, 0.84], 10000: [0.86, 0.84, 0.88]},
    "b": {1000: [0.80, 0.80, 0.80], 10000: [0.85, 0.85, 0.85]},
    "c": {1000: [0.70, 0.70, 0.70]},
  }
  ranking = data_scaling.best_prior(_records(table))
  assert set(ranking) == {"1000", "10000"}
  first = ranking["1000"]
  assert (first["best"], first["runner_up"], first["verdict"]) == ("a", "b", "leads")
  assert first["difference"]["mean"] == pytest.approx(0.03, abs=1e-12)
  half = T975_2DOF * 0.01 / math.sqrt(3)
  assert first["difference"]["low"] == pytest.approx(0.03 - half, abs=1e-12)
  assert ranking["10000"]["verdict"] == "tied"
  assert data_scaling.best_prior(_records({"a": table["a"], "cnn": table["cnn"]})) == {}
  summary = data_scaling.analyze(_records(table))
  assert summary["best_prior"] == ranking
  assert "    1000: a over b +3.00 [" in data_scaling.format_summary(summary)
  lines = data_scaling.format_markdown(_records(table), summary).splitlines()
  assert any(line.startswith("| 1,000 | `a` | `b` | +3.00 [") for line in lines)
  assert "| 10,000 | `a` | `b` | +1.00 [-3.97, +5.97] | tied |" in lines


def test_budget_effect_pairs_seeds_and_labels_compute_limited_points():
  def records(accs: dict[str, list[float]], steps: int, train: float | None) -> list[dict]:
    return [
      {
        "model": m,
        "train_size": 10000,
        "seed": s,
        "test_accuracy": a,
        "steps": steps,
        "final_train_accuracy": train,
      }
      for m, values in accs.items()
      for s, a in enumerate(values)
    ]

  base = records({"vit": [0.80, 0.81, 0.82], "cnn": [0.89, 0.90, 0.91]}, 2000, 0.83)
  # vit gains (0.03, 0.02, 0.04): interval above 0; cnn (0.01, -0.01, 0.00) contains 0; gpsa has
  # no base run; the seed order of the records does not matter.
  longer = records({"vit": [0.83, 0.83, 0.86], "cnn": [0.90, 0.89, 0.91], "gpsa": [0.9]}, 4000, 0.9)
  effect = data_scaling.budget_effect(longer[::-1], base)
  assert set(effect) == {"vit", "cnn"}
  vit = effect["vit"]["10000"]
  half = T975_2DOF * 0.01 / math.sqrt(3)
  assert vit["change"]["mean"] == pytest.approx(0.03, abs=1e-12)
  assert vit["change"]["low"] == pytest.approx(0.03 - half, abs=1e-12)
  assert vit["verdict"] == "compute-limited" and vit["steps"] == [2000, 4000]
  assert vit["final_train_accuracy"] == pytest.approx([0.83, 0.9])
  cnn = effect["cnn"]["10000"]
  assert cnn["change"]["mean"] == pytest.approx(0.0, abs=1e-12)
  assert cnn["verdict"] == "not compute-limited"
  one = data_scaling.budget_effect(longer[:1], base)["vit"]["10000"]
  assert one["verdict"] == "undetermined" and one["change"]["n"] == 1
  summary = {**data_scaling.analyze(longer), "budget_effect": effect}
  text = data_scaling.format_summary(summary)
  assert "vit                        10000: +3.00 [" in text and "compute-limited)" in text
  lines = data_scaling.format_markdown(longer, summary).splitlines()
  row = next(line for line in lines if line.startswith("| `vit` | 10,000 |"))
  assert row.startswith("| `vit` | 10,000 | 2000 → 4000 | 0.830 → 0.900 | +3.00 [")
  assert row.endswith("| compute-limited |")
  json.dumps(summary, allow_nan=False)
  with pytest.raises(ValueError, match="^base_records: expected runs shorter"):
    data_scaling.budget_effect(base, longer)


def test_results_file_formats(tmp_path):
  records = _records(HAND)
  new = tmp_path / "new.json"
  new.write_text(json.dumps({"records": records, "summary": data_scaling.analyze(records)}))
  old = tmp_path / "list.json"
  old.write_text(json.dumps(records))  # a plain list of records
  assert data_scaling.load_records(new) == data_scaling.load_records(old) == records
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"runs": []}))
  with pytest.raises(ValueError, match="^path: expected"):
    data_scaling.load_records(bad)
  data_scaling.plot(records, tmp_path / "hand.png")
  assert (tmp_path / "hand.png").stat().st_size > 1000
  # A point with a single seed has no interval: drawn without an error bar.
  first = records[0]
  single = [
    r
    for r in records
    if r is first or (r["model"], r["train_size"]) != (first["model"], first["train_size"])
  ]
  data_scaling.plot(single, tmp_path / "single.png")
  assert (tmp_path / "single.png").stat().st_size > 1000
