"""The experiment configs: every file loads with its default and ``smoke`` arguments, rejects
unknown ones, the paper's configs build the pinned models, and one smoke run trains end to end."""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from attnconv.models import build_model, count_params, model_names
from experiments.configs import paper

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "experiments" / "configs"
CONFIG_FILES = sorted(
  p.stem for p in CONFIG_DIR.glob("*.py") if p.stem not in ("__init__", "common")
)
PAPER_ARGS = [f"{m},{d}" for m in paper.MODELS for d in paper.DATASETS]

# Parameter counts of the paper's models (10 classes); the CIFAR-10 ones are the authors'.
PAPER_COUNTS = {
  "quadratic,cifar10": 12_086_844,
  "generalized,cifar10": 12_087_006,
  "learned,cifar10": 12_278_682,
  "learned_content,cifar10": 29_484_282,
  "many_heads,cifar10": 18_806_970,
  "resnet18,cifar10": 11_173_962,
  "quadratic,fashion_mnist": 12_083_644,
  "generalized,fashion_mnist": 12_083_806,
  "learned,fashion_mnist": 12_256_282,
  "learned_content,fashion_mnist": 29_471_482,
  "many_heads,fashion_mnist": 18_803_770,
  "resnet18,fashion_mnist": 11_172_810,
}
INPUT_SHAPES = {"cifar10": (1, 32, 32, 3), "fashion_mnist": (1, 28, 28, 1)}


def _module(name: str):
  return importlib.import_module(f"experiments.configs.{name}")


def _num_params(config) -> int:
  kwargs = config.model.to_dict()
  model = build_model(kwargs.pop("name"), num_classes=10, **kwargs)
  x = jnp.zeros(INPUT_SHAPES[config.dataset.name])
  variables = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, x))
  return count_params(variables["params"])


def test_the_config_files():
  assert CONFIG_FILES == [
    "conversion",
    "data_scaling",
    "fashion_small_cnn",
    "grid",
    "paper",
    "priors",
    "quick",
  ]


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_config_file_loads_with_default_and_smoke(name):
  default = _module(name).get_config()
  smoke = _module(name).get_config("smoke")
  for config in (default, smoke):
    assert config.model.name in model_names(), name
    assert config.dataset.name in ("cifar10", "fashion_mnist"), name
  # A few steps: the smoke run is shorter than the default.
  assert 0 < smoke.num_train_steps <= 20, name
  assert default.num_train_steps < 0 or default.num_train_steps > smoke.num_train_steps, name


@pytest.mark.parametrize("name", CONFIG_FILES)
@pytest.mark.parametrize("arg", ["quick", "full", "smoke,smoke", "imagenet"])
def test_unknown_arguments_raise_naming_arg(name, arg):
  with pytest.raises(ValueError, match=r"^arg: expected .*got"):
    _module(name).get_config(arg)


@pytest.mark.parametrize("arg", PAPER_ARGS)
def test_paper_config_default_and_smoke(arg):
  model, dataset = arg.split(",")
  config = paper.get_config(arg)
  assert config.dataset.name == dataset
  assert config.batch_size == 100 and config.optimizer == "sgd"
  assert config.learning_rate == 0.1 and config.weight_decay == 1e-4 and config.seed == 42
  assert config.dataset.val_size == 5000 and config.num_train_steps == -1
  if model == "resnet18":
    assert config.model.name == "resnet18" and config.schedule == "step"
    assert config.num_epochs == (300 if dataset == "cifar10" else 30)
  else:
    assert config.model.name == "attention_net" and config.schedule == "warmup_cosine"
    assert config.model.num_heads == (16 if model == "many_heads" else 9)
    assert config.model.encoding == ("quadratic" if model == "many_heads" else model)
    assert config.num_epochs == (300 if dataset == "cifar10" else 100)
  smoke = paper.get_config(f"{arg},smoke")
  assert smoke.num_train_steps == 20 and smoke.dataset.train_size == 1000
  assert smoke.dataset.name == dataset and smoke.model.name == config.model.name
  # Smoke shrinks the model and the run length, nothing else of the recipe.
  assert smoke.optimizer == config.optimizer and smoke.schedule == config.schedule
  if model == "resnet18":
    assert smoke.model.width < config.model.width
  else:
    assert smoke.model.num_layers == 1 and smoke.model.hidden_size < config.model.hidden_size


def test_paper_default_argument():
  assert paper.get_config().to_dict() == paper.get_config("quadratic,cifar10").to_dict()
  assert paper.get_config("").to_dict() == paper.get_config(paper.DEFAULT_ARG).to_dict()
  smoke = paper.get_config("quadratic,cifar10,smoke").to_dict()
  assert paper.get_config("smoke").to_dict() == smoke


@pytest.mark.parametrize(
  "arg",
  [
    "quadratic",
    "quadratic,smoke",
    "vit,cifar10",
    "quadratic,imagenet",
    "quadratic,cifar10,quick",
    "quadratic,cifar10,smoke,smoke",
    "cifar10,quadratic",
  ],
)
def test_paper_rejects_malformed_arguments(arg):
  with pytest.raises(ValueError, match=r"^arg: expected"):
    paper.get_config(arg)


def test_paper_rejects_non_string_arguments():
  with pytest.raises(TypeError, match="arg: expected a string"):
    paper.get_config(3)


_GAUSSIAN = ("quadratic", "generalized", "many_heads")


@pytest.mark.parametrize(
  ("arg", "shared"),
  [(a, a.split(",")[0] in _GAUSSIAN) for a in PAPER_ARGS if not a.startswith("resnet18")],
)
def test_paper_configs_share_the_dropout_mask_as_the_authors(arg, shared):
  """The authors' Gaussian attention shares one dropout mask by the batch; learned does not."""
  assert paper.get_config(arg).model.shared_dropout_mask is shared


@pytest.mark.parametrize("arg", PAPER_ARGS)
def test_paper_configs_build_the_pinned_models(arg):
  assert _num_params(paper.get_config(arg)) == PAPER_COUNTS[arg]


@pytest.fixture
def fashion_mnist_dir():
  from experiments import input_pipeline

  try:
    return input_pipeline.find_fashion_mnist_dir(None)
  except FileNotFoundError:
    pytest.skip("Fashion-MNIST IDX files not installed")


def test_paper_smoke_run_trains_end_to_end(tmp_path, fashion_mnist_dir):
  """The documented command form, ``paper.py:<model>,<dataset>,smoke``, through main."""
  workdir = tmp_path / "run"
  command = [
    sys.executable,
    "-m",
    "experiments.main",
    "--config=experiments/configs/paper.py:quadratic,fashion_mnist,smoke",
    f"--workdir={workdir}",
    f"--config.dataset.data_dir={tmp_path / 'data'}",
    "--config.progress_bar=False",
    "--config.plot=False",
  ]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as the command
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["completed"] and summary["steps"] == 20
  assert 0.0 <= summary["final_test_accuracy"] <= 1.0
  expected = paper.get_config("quadratic,fashion_mnist,smoke")
  assert summary["num_params"] == _num_params(expected)
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["model"] == json.loads(json.dumps(expected.model.to_dict()))


def test_gpu_script_parses_and_names_existing_configs():
  """experiments/gpu_studies.sh is valid bash and every config argument it passes loads."""
  import pathlib
  import re
  import subprocess

  script = pathlib.Path(__file__).parents[1] / "experiments" / "gpu_studies.sh"
  subprocess.run(["bash", "-n", str(script)], check=True)
  args = re.findall(r"experiments/configs/(\w+)\.py:(\w[\w,]*\w|\w)", script.read_text())
  assert {name for name, _ in args} == {"grid", "data_scaling"}
  for name, arg in args:
    assert _module(name).get_config(arg).model.name in model_names()


def test_library_modules_of_experiments_define_no_flags_on_import():
  """Only the entry point (``experiments.main``) defines command-line flags at import; every other
  module defines its own in ``_define_flags`` when run as a script, so one script can import
  another's functions without a clash of flag names (e.g. ``workdir``)."""
  root = pathlib.Path(__file__).resolve().parents[1]
  modules = sorted(
    f"experiments.{p.stem}" for p in (root / "experiments").glob("*.py") if p.stem != "main"
  )
  code = (
    "import importlib\nfrom absl import flags\n"
    f"for m in {modules!r}:\n  importlib.import_module(m)\n"
    "print(sorted(m for m in flags.FLAGS.flags_by_module_dict() if 'experiments' in m))\n"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True, timeout=300
  )
  assert out.stdout.strip() == "[]", out.stdout + out.stderr
  assert "experiments.evaluate" in modules and "experiments.data_scaling" in modules
