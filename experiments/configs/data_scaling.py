"""Data efficiency: test accuracy against the number of training images, CNN vs attention.

Command (the whole grid; resumable -- rerun the same command after a kill)::

  python -m experiments.data_scaling --config=experiments/configs/data_scaling.py \
    --workdir=runs/data_scaling

CIFAR-10 (online users; downloaded into ``$ATTNCONV_DATA_DIR`` or ``~/.cache/attnconv`` once)::

  python -m experiments.data_scaling --config=experiments/configs/data_scaling.py:cifar10 \
    --workdir=runs/data_scaling_cifar10

``data_scaling.py:smoke`` (or ``:cifar10,smoke``) is a tiny grid: 2 sizes, 1 seed, 4 steps.

One run per (model, training-set size, seed); every run takes the same number of optimisation
steps (``num_train_steps``) whatever its training-set size, selects its model on the same
5000-image validation split carved from the official training set (never on test) and reports the
test accuracy of that model. Training subsets are class-stratified and nested for a seed.

Models (all sized for a 2-core CPU, comparable parameter counts):
  ``cnn``: SmallCNN, 3x3 convolutions 32-64-64 (strides 1, 2, 2), BatchNorm, global average pool.
  ``attention_quadratic``: AttentionNet, 4x4 space-to-depth (7x7 tokens on Fashion-MNIST),
    3 blocks of 9 Gaussian heads (Eq. 9), D = 32, MLP 64, centres N(0, 1).
  ``attention_learned``: the same with learned relative (row/column) encodings.
  ``attention_learned_content``: the same with learned relative encodings plus content (q.k, q.r).
  ``attention_conv_init``: ``attention_quadratic`` whose attention layers start as freshly
    initialised 3x3 convolutions through ``conv_to_attention`` at finite ``alpha = 2`` (an interior
    head puts 1 / (1 + 2e^-2 + 2e^-8)^2 = 62% of its mass on its shift; centres and alpha are
    then trained freely).

Recipe: AdamW lr 3e-3 (weight decay 0.05, not on centres/spreads), batch 64, linear warm-up 5%
then cosine, 600 steps (38,400 images: 77 epochs of the 500-image subset, 0.7 of the full set),
3 evaluations per run. No augmentation: the architecture is the only prior being compared.

Expected runtime and result (measured, 2-core CPU, ``--workers=2``): 52 minutes wall for the 75
runs; test accuracy at 500 / 55,000 images: cnn 0.750 / 0.830, attention_quadratic 0.737 / 0.789,
attention_learned 0.747 / 0.796, attention_learned_content 0.742 / 0.820, attention_conv_init
0.753 / 0.804 (means over 3 seeds; all points in ``experiments/results/data_scaling.json`` and
``docs/experiments.md``, "Data efficiency").
"""

from __future__ import annotations

import ml_collections

from experiments.configs import common

DATASETS = ("fashion_mnist", "cifar10")

# name -> (model fields, extra top-level config fields)
MODELS: dict[str, tuple[dict, dict]] = {
  "cnn": ({"name": "small_cnn", "features": (32, 64, 64), "pool": "avg"}, {}),
  "attention_quadratic": ({"name": "attention_net", "encoding": "quadratic"}, {}),
  "attention_learned": ({"name": "attention_net", "encoding": "learned"}, {}),
  "attention_learned_content": ({"name": "attention_net", "encoding": "learned_content"}, {}),
  "attention_conv_init": (
    {"name": "attention_net", "encoding": "quadratic"},
    {"conv_init_alpha": 2.0},
  ),
}

_ATTENTION = {
  "num_layers": 3,
  "num_heads": 9,
  "hidden_size": 32,
  "mlp_dim": 64,
  "downsample": 4,
  "dropout_rate": 0.0,
  "attention_dropout_rate": 0.0,
  "implementation": "auto",
  "center_init_std": 1.0,
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The data-scaling grid.

  Args:
    arg: ``"<dataset>[,smoke]"`` or ``"smoke"``, the dataset ``"fashion_mnist"`` (default) or
      ``"cifar10"``; ``smoke``: a tiny grid (2 sizes, 1 seed, 4 steps) for tests.

  Returns:
    The grid config (``config.scaling``) with the trainer fields shared by its runs.

  Raises:
    ValueError: if ``arg`` is not of that form.
  """
  parts = (arg or "fashion_mnist").split(",")
  smoke = parts[-1] == "smoke"
  dataset = parts[0] if len(parts) == 2 or not smoke else "fashion_mnist"
  if len(parts) > 2 or (len(parts) == 2 and not smoke) or dataset not in DATASETS:
    raise ValueError(
      f"arg: expected '<dataset>[,smoke]' or 'smoke' with a dataset in {DATASETS}, got {arg!r}"
    )
  config = common.base_config()
  config.dataset.name = dataset
  config.dataset.val_size = 5000
  config.optimizer = "adamw"
  config.learning_rate = 0.003
  config.weight_decay = 0.05
  config.schedule = "warmup_cosine"
  config.batch_size = 64
  config.dataset.crop_padding = 0
  config.dataset.flip = False
  config.num_train_steps = 600
  config.eval_every_steps = 200
  config.checkpoint_every_steps = 200
  config.keep_checkpoints = 1
  config.log_every_steps = 100
  config.plot = False
  config.progress_bar = False

  config.scaling = ml_collections.ConfigDict()
  config.scaling.models = tuple(MODELS)
  # All 55,000 remaining images of Fashion-MNIST's train split (45,000 for CIFAR-10).
  config.scaling.train_sizes = (500, 1000, 5000, 15000, -1)
  config.scaling.seeds = (0, 1, 2)
  # The model of each run; the grid driver fills it in from MODELS.
  config.model = ml_collections.ConfigDict({"name": "small_cnn"})
  if smoke:
    config.scaling.train_sizes = (200, 400)
    config.scaling.seeds = (0,)
    config.dataset.val_size = 200
    config.num_train_steps = 4
    config.eval_every_steps = 2
    config.checkpoint_every_steps = 2
    config.batch_size = 20
  return config


def run_config(
  config: ml_collections.ConfigDict, model: str, train_size: int, seed: int
) -> ml_collections.ConfigDict:
  """The trainer config of one grid point: ``config`` with the model, subset size and seeds set."""
  if model not in MODELS:
    raise ValueError(f"model: expected one of {tuple(MODELS)}, got {model!r}")
  run = ml_collections.ConfigDict(config.to_dict())
  del run["scaling"]
  fields, extra = MODELS[model]
  model_fields = dict(fields)
  if fields["name"] == "attention_net":
    model_fields = {**_ATTENTION, **model_fields}
  run.model = ml_collections.ConfigDict(model_fields)
  for key, value in extra.items():
    run[key] = value
  run.dataset.train_size = int(train_size)
  run.dataset.seed = int(seed)
  run.seed = int(seed)
  return run
