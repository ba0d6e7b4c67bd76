"""Data efficiency to convergence: test accuracy against the number of training images.

Question. On Fashion-MNIST, does a convolutional prior built into attention (ConViT's GPSA, Eq. 9
positional attention, a conv-initialised Eq. 9 layer, mimetic initialisation, relative content
attention) make a small vision transformer as data-efficient as a small CNN, and does the CNN's
advantage shrink as the training set grows? Every model trains to convergence on every subset
(not a fixed number of images), so the comparison is between what each architecture can learn
from ``n`` images, not how fast it learns.

Grid (``get_config()``): 7 models x 5 nested, class-stratified subsets of the 55,000 training
images left after the 5000-image validation split (1000, 3000, 10,000, 30,000, all) x 3 seeds =
105 runs. Models (record names):

  ``cnn``: SmallCNN, 3x3 convolutions 32-64-128 (strides 1, 2, 2), BatchNorm, ReLU, the 7x7x128
    map flattened into the classifier (155,626 parameters at 28x28x1, within the attention
    models' range). Not the global-average-pooled SmallCNN of the fixed-compute grid: its 3
    layers see 11x11 pixels, and averaged over the image they cannot fit the training set (on
    1000 images, training accuracy 0.87 and loss 0.41 after 200 epochs, where the attention
    models reach 0.92-0.96).
  ``vit``, ``vit_mimetic``, ``gpsa``, ``attention_quadratic``, ``attention_conv_init``,
    ``attention_learned_content``: the priors of ``experiments/configs/priors.py`` on its shared
    backbone (4x4 patches, D = 72, 4 blocks of 9 heads; 133k-175k parameters), set by
    :func:`experiments.configs.priors.apply_prior`.

Recipe (every model): AdamW lr 1e-3, weight decay 0.05 (not on centres / spreads / alpha),
batch 100, linear warm-up 5% then cosine to 0 over the run's own budget, random crops (padding 2)
and horizontal flips. Budget per run: ``max(S steps, E epochs)`` with ``S = 2000``
(``num_train_steps``) and ``E = 10`` (``scaling.min_epochs``): 2000 steps for 1000-10,000 images
(200, 67, 20 epochs), 3000 for 30,000, 5500 for 55,000. ``eval_every_steps = ceil(steps / 10)``:
10 evaluations per run (plus the end when the last interval is short). Model selection on
the validation split: a run reports the test accuracy of its best-validation evaluation.

Pre-stated answers (``experiments.data_scaling.analyze`` and ``gap_trends`` compute them; 95%
intervals are paired over seeds, t distribution with n - 1 = 2 degrees of freedom):

* "Attention with prior P is as data-efficient as the CNN at size n": the interval of P's gap to
  ``cnn`` at n contains 0 or lies above it. "The CNN is more data-efficient at n": it lies below.
* "The CNN's advantage shrinks with data": the per-seed slope of the gap against log10(size) has
  an interval above 0 (for a model below the CNN at the smallest size); "grows": below 0; an
  interval containing 0 is "no detectable trend". A crossover is the size, interpolated in log
  size, where the mean gap changes sign.
* "Prior P helps a ViT at size n": P's paired relative gain over ``vit``,
  ``(acc_P - acc_vit) / acc_vit`` (ConViT's table form), has an interval above 0.
* "Prior P helps most at size n": P has the highest mean test accuracy of the six priors and
  its paired difference to the runner-up has an interval above 0 (``best_prior``, "leads");
  an interval containing 0 is a tie between the two.
* "P's lead over ``vit`` fades with data" (ConViT's finding on ImageNet: ConViT-S over DeiT-S
  +37% at 5% of the images, +1.9% with all): for a prior ahead of ``vit`` at the smallest size,
  the per-seed slope of ``acc_P - acc_vit`` against log10(size) has an interval below 0
  (``baseline_trends``, verdict "shrinks").
* Expected if the convolutional priors work as claimed for small data: ``cnn`` > ``vit`` by
  several points at 1000 images; ``gpsa`` and ``attention_conv_init`` recover most of that gap
  (gain over ``vit`` > 0 at 1000-3000 images); every gap shrinks towards 0 at 55,000 images
  (positive slopes). A prior whose gain over ``vit`` is indistinguishable from 0 at every size
  does not help at this scale.

Compute estimate. CPU time per step of one single-threaded grid worker at batch 100 (the
process's CPU time over 30 timed steps after compilation, synthetic 28x28 images; measured on
this 2-core machine while another training run and test suites kept it at a load average of
5-6, which inflates CPU time too, through shared caches): cnn 0.118 s, vit 0.367 s,
vit_mimetic 0.374 s, gpsa 0.446 s, attention_quadratic 0.181 s, attention_conv_init 0.174 s,
attention_learned_content 0.435 s; an evaluation batch of 100 images 0.015-0.088 s. Every model
takes 14,500 steps per seed (3 x 2000 + 3000 + 5500), 43,500 over 3 seeds, plus 10 evaluations
of 15,000 validation and test images per run (22,500 batches per model). Total: 27.6 CPU hours
as measured (cnn 1.5, vit 4.9, vit_mimetic 4.9, gpsa 5.8, attention_quadratic 2.4,
attention_conv_init 2.3, attention_learned_content 5.8). Measured in the study itself (the
first 14 runs, 2000 steps each, two single-threaded workers on the 2-core machine, training CPU
time per step, evaluations excluded): cnn 0.117 s, vit 0.36, vit_mimetic 0.35, gpsa 0.44,
attention_quadratic 0.165, attention_conv_init 0.17, attention_learned_content 0.38 -- the same
rates as the estimate; the flatten-head ``cnn`` 0.13 s (its first run: 266 CPU seconds for 2000
steps and 10 evaluations). Expect about 24 CPU hours of training plus 10-15% for the
evaluations, i.e. about 27-28 CPU hours and 13-14 hours wall with ``--workers=2``.

Command (resumable -- rerun the same command after a kill; finished runs are skipped)::

  python -m experiments.data_scaling --config=experiments/configs/data_scaling.py \
    --workdir=experiments/results/data_scaling_runs --workers=2

It writes ``experiments/results/data_scaling.json`` (records and the analysis) and
``experiments/results/data_scaling.png``; ``--markdown=<path>`` also writes the analysis as the
Markdown tables ``docs/experiments.md`` quotes, and ``--aggregate_only`` analyses the finished runs
without training. The finished runs' small files (config, summary, metrics, cached
initialisation accuracy and receptive fields; not the checkpoints) are committed under
``experiments/results/data_scaling_runs``: on a checkout the command above redoes the analysis
from them and trains only the points that are missing (use another ``--workdir`` to retrain).

Variants:
  ``data_scaling.py:cifar10``: the same grid on CIFAR-10 (45,000 training images; downloaded into
    ``$ATTNCONV_DATA_DIR`` or ``~/.cache/attnconv`` once).
  ``data_scaling.py:fixed_compute`` (and ``:fixed_compute,cifar10``): the fixed-compute
    comparison -- 5 models (SmallCNN and 4 AttentionNet variants, below), the same
    600 steps of batch 64 whatever the subset size (38,400 images: 77 epochs of 500 images, 0.7
    of the full set), no augmentation, AdamW lr 3e-3, sizes 500-55,000. It measures how fast each
    model learns from a fixed number of updates, not what it converges to. Command::

      python -m experiments.data_scaling \
        --config=experiments/configs/data_scaling.py:fixed_compute --workdir=runs/data_scaling \
        --workers=2 --out=experiments/results/data_scaling_fixed_compute.json \
        --plot=experiments/results/data_scaling_fixed_compute.png

    Measured (2-core CPU, ``--workers=2``): 52 minutes wall for 75 runs; test accuracy at 500 /
    55,000 images: cnn 0.750 / 0.830, attention_quadratic 0.737 / 0.789, attention_learned
    0.747 / 0.796, attention_learned_content 0.742 / 0.820, attention_conv_init 0.753 / 0.804.
  ``data_scaling.py:large``: the two largest sizes (30,000 and all) with larger models, for a
    GPU: the shared backbone 6 blocks deep and twice as wide (D = 144, 16 per head, MLP 288;
    GPSA in the first 5 blocks; 766k-1,017k parameters) and the CNN twice as wide (64-128-256,
    496k), same recipe and budget. ``experiments/gpu_studies.sh`` runs its full-data points.
  ``data_scaling.py:budget``: is the convergence grid limited by its budget? The 10,000-image
    points of ``cnn``, ``vit``, ``gpsa`` and ``attention_conv_init`` (3 seeds) with twice the
    budget: S = 4000 steps (40 epochs instead of 20), the same recipe, the schedule stretched
    over the longer run. Why: at 10,000 images and 2000 steps the attention models' final
    training accuracy (0.83-0.86, augmented batches) is within 1-2 points of their validation
    accuracy, and the ViT's validation accuracy still rose by 1.9 points over the last 30% of
    its run (seed 0): they look underfitted, where the CNN has fitted 1000 images (0.99).
    Criterion, stated before the run: a model is *compute-limited* at 10,000 images when its
    paired change of test accuracy from 2000 to 4000 steps has a 95% interval above 0
    (``budget_effect``, with ``--base`` the convergence grid's results); its points at 30,000
    and 55,000 images, which get 10 epochs, are then compute-limited too. Its gap to ``cnn`` at
    4000 steps says how much of the gap at 10,000 images is compute. Compute estimate: 4000
    steps x (0.13 + 0.36 + 0.44 + 0.17) s x 3 seeds = 3.7 CPU hours, plus about 10% for the
    evaluations: about 2 hours wall with ``--workers=2``. Command::

      python -m experiments.data_scaling --config=experiments/configs/data_scaling.py:budget \
        --workdir=experiments/results/data_scaling_budget_runs --workers=2 \
        --base=experiments/results/data_scaling.json \
        --out=experiments/results/data_scaling_budget.json --plot=''

  ``smoke`` (``:smoke``, ``:cifar10,smoke``, ``:fixed_compute,smoke``, ``:large,smoke``,
    ``:budget,smoke``): 2 sizes (``budget``: 1), 1 seed, a few steps (tests).

Fixed-compute models (:data:`FIXED_COMPUTE_MODELS`): ``cnn``: SmallCNN 32-64-64 (strides 1, 2,
2), BatchNorm, global average pooling (56,554 parameters);
``attention_quadratic``: AttentionNet, 4x4 space-to-depth (7x7 tokens), 3 blocks of 9 Gaussian
heads (Eq. 9), D = 32, MLP 64, centres N(0, 1); ``attention_learned``: learned relative
encodings; ``attention_learned_content``: learned relative encodings plus content;
``attention_conv_init``: ``attention_quadratic`` started as freshly initialised 3x3 convolutions
at alpha = 2.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from experiments.configs import common, priors

DATASETS = ("fashion_mnist", "cifar10")
GRIDS = ("convergence", "fixed_compute", "large", "budget")
# Images in each dataset's official training split (the validation split is carved from it).
TRAIN_SPLIT_SIZES = {"fashion_mnist": 60_000, "cifar10": 50_000}

# The convergence grid's CNN: SmallCNN 32-64-128 with a flatten head (155,626 parameters, within
# the attention models' 132,742-175,098). The fixed-compute grid keeps the global-average-pooled
# 32-64-64 SmallCNN (56,554 parameters): with a 3-layer, 11-pixel receptive field pooled over the
# image it cannot fit even 1000 images (final training accuracy 0.87 after 200 epochs).
CNN: dict[str, Any] = {"name": "small_cnn", "features": (32, 64, 128), "pool": "flatten"}
FIXED_COMPUTE_CNN: dict[str, Any] = {"name": "small_cnn", "features": (32, 64, 64), "pool": "avg"}

# The ``large`` grid's models: the shared backbone 6 blocks deep and twice as wide (16 per head),
# ConViT's GPSA in all blocks but the last; the CNN twice as wide (64-128-256, flatten head).
LARGE_BACKBONE: dict[str, Any] = {"hidden_size": 144, "num_layers": 6, "mlp_dim": 288}
LARGE_CNN: dict[str, Any] = {"features": (64, 128, 256)}

# The ``budget`` grid's models: the CNN, the plain ViT and the two priors that help it most at
# 1000 images (module docstring).
BUDGET_MODELS = ("cnn", "vit", "gpsa", "attention_conv_init")


def _prior_entry(prior: str) -> tuple[dict, dict]:
  """(model fields, trainer fields) of a prior, as :func:`priors.apply_prior` sets them."""
  config = priors.apply_prior(ml_collections.ConfigDict(), prior)
  return config.model.to_dict(), {k: config[k] for k in ("mimetic_init", "conv_init_alpha")}


# The convergence grid: name -> (model fields, extra top-level config fields).
MODELS: dict[str, tuple[dict, dict]] = {
  "cnn": (CNN, {}),
  **{prior: _prior_entry(prior) for prior in priors.PRIORS},
}

# The fixed-compute grid: name -> (model fields, extra top-level config fields).
FIXED_COMPUTE_MODELS: dict[str, tuple[dict, dict]] = {
  "cnn": (FIXED_COMPUTE_CNN, {}),
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


def _parse(arg: str | None) -> tuple[str, str, bool]:
  """``(grid, dataset, smoke)`` of ``"[fixed_compute,|large,|budget,][<dataset>][,smoke]"``."""
  parts = (arg or "").split(",") if arg else []
  smoke = bool(parts) and parts[-1] == "smoke"
  if smoke:
    parts = parts[:-1]
  grid = "convergence"
  if parts and parts[0] in GRIDS[1:]:
    grid, parts = parts[0], parts[1:]
  dataset = parts[0] if parts else "fashion_mnist"
  if len(parts) > 1 or dataset not in DATASETS:
    raise ValueError(
      f"arg: expected '[fixed_compute,|large,|budget,][<dataset>][,smoke]' with a dataset in "
      f"{DATASETS} (or None), got {arg!r}"
    )
  return grid, dataset, smoke


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The data-scaling grid (see the module docstring).

  Args:
    arg: ``"[fixed_compute,|large,|budget,][<dataset>][,smoke]"``: ``fixed_compute`` selects the
      fixed-compute comparison, ``large`` the larger models at the two largest sizes, ``budget``
      the convergence grid's 10,000-image points at twice the budget (default: the convergence
      grid); the dataset ``"fashion_mnist"`` (default) or
      ``"cifar10"``; ``smoke``: a tiny grid (2 sizes, 1 seed, a few steps) for tests.

  Returns:
    The grid config (``config.scaling``) with the trainer fields shared by its runs;
    ``num_train_steps`` is the budget's floor ``S`` and ``scaling.min_epochs`` its ``E``.

  Raises:
    ValueError: if ``arg`` is not of that form.
  """
  grid, dataset, smoke = _parse(arg)
  config = common.base_config()
  config.dataset.name = dataset
  config.dataset.val_size = 5000
  config.optimizer = "adamw"
  config.weight_decay = 0.05
  config.schedule = "warmup_cosine"
  config.keep_checkpoints = 1
  config.log_every_steps = 100
  config.plot = False
  config.progress_bar = False

  config.scaling = ml_collections.ConfigDict()
  config.scaling.grid = grid
  config.scaling.seeds = (0, 1, 2)
  if grid in ("convergence", "large", "budget"):
    config.learning_rate = 0.001
    config.batch_size = 100
    config.dataset.crop_padding = 2 if dataset == "fashion_mnist" else 4
    config.dataset.flip = True
    config.num_train_steps = 2000
    config.scaling.min_epochs = 10.0
    config.scaling.evaluations = 10
    config.scaling.models = tuple(MODELS)
    # -1: all images of the train split left after the validation split (55,000 / 45,000).
    config.scaling.train_sizes = (1000, 3000, 10000, 30000, -1)
    if grid == "budget":
      config.num_train_steps = 2 * config.num_train_steps
      config.scaling.train_sizes = (10000,)
      config.scaling.models = BUDGET_MODELS
    if grid == "large":
      config.scaling.train_sizes = (30000, -1)
      config.scaling.backbone_overrides = dict(LARGE_BACKBONE)
      config.scaling.cnn_overrides = dict(LARGE_CNN)
  else:
    config.learning_rate = 0.003
    config.batch_size = 64
    config.dataset.crop_padding = 0
    config.dataset.flip = False
    config.num_train_steps = 600
    config.scaling.min_epochs = 0.0
    config.scaling.evaluations = 3
    config.scaling.models = tuple(FIXED_COMPUTE_MODELS)
    config.scaling.train_sizes = (500, 1000, 5000, 15000, -1)
  # Set per run by run_config (budget_steps); the grid's values are those of its smallest run.
  config.eval_every_steps = -(-config.num_train_steps // config.scaling.evaluations)
  config.checkpoint_every_steps = config.eval_every_steps
  # The model of each run; the grid driver fills it in.
  config.model = ml_collections.ConfigDict(dict(CNN))
  if smoke:
    config.scaling.train_sizes = (200, 400)
    config.scaling.seeds = (0,)
    config.dataset.val_size = 200
    config.batch_size = 20
    config.num_train_steps = {"fixed_compute": 4, "budget": 4}.get(grid, 2)
    if grid == "budget":  # Twice the convergence smoke grid's 2 steps at its smaller size.
      config.scaling.train_sizes = (200,)
    config.scaling.min_epochs = 0.0 if grid == "fixed_compute" else 0.2
    config.scaling.evaluations = 2
    config.eval_every_steps = 2 if grid == "fixed_compute" else 1
    config.checkpoint_every_steps = config.eval_every_steps
  return config


def num_train_images(config: ml_collections.ConfigDict, train_size: int) -> int:
  """Training images of a run with ``train_size`` (-1: the split left after validation)."""
  if isinstance(train_size, bool) or not isinstance(train_size, int):
    raise TypeError(f"train_size: expected an int (> 0 or -1), got {train_size!r}")
  if train_size == -1:
    return TRAIN_SPLIT_SIZES[config.dataset.name] - int(config.dataset.val_size)
  if train_size < 1:
    raise ValueError(f"train_size: expected a positive int or -1 (all), got {train_size}")
  return train_size


def budget_steps(
  num_images: int, batch_size: int, min_steps: int, min_epochs: float
) -> tuple[int, int]:
  """The steps of a run, ``max(min_steps, ceil(min_epochs * steps_per_epoch))``.

  An epoch is ``num_images // batch_size`` steps (the trainer drops the last partial batch).

  Args:
    num_images: training images of the run (``>= batch_size``).
    batch_size: the batch size (``>= 1``).
    min_steps: the floor ``S`` (``>= 1``).
    min_epochs: the epochs ``E`` (``>= 0``).

  Returns:
    ``(steps, steps_per_epoch)``.

  Raises:
    ValueError: naming the first argument out of range.
  """
  for name, value, low in (
    ("num_images", num_images, 1),
    ("batch_size", batch_size, 1),
    ("min_steps", min_steps, 1),
  ):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
  if batch_size > num_images:
    raise ValueError(f"batch_size: expected <= num_images={num_images}, got {batch_size}")
  if not (isinstance(min_epochs, int | float) and math.isfinite(min_epochs) and min_epochs >= 0):
    raise ValueError(f"min_epochs: expected a finite number >= 0, got {min_epochs!r}")
  per_epoch = num_images // batch_size
  return max(min_steps, math.ceil(min_epochs * per_epoch)), per_epoch


def apply_budget(
  run: ml_collections.ConfigDict,
  num_images: int,
  min_steps: int,
  min_epochs: float,
  evaluations: int,
) -> ml_collections.ConfigDict:
  """Sets ``run``'s ``num_train_steps``, ``eval_every_steps`` and ``checkpoint_every_steps``.

  ``eval_every_steps = ceil(steps / evaluations)``; checkpoints at every evaluation.
  """
  if isinstance(evaluations, bool) or not isinstance(evaluations, int) or evaluations < 1:
    raise ValueError(f"evaluations: expected a positive int, got {evaluations!r}")
  steps, _ = budget_steps(num_images, int(run.batch_size), min_steps, min_epochs)
  run.num_train_steps = steps
  run.eval_every_steps = -(-steps // evaluations)
  run.checkpoint_every_steps = run.eval_every_steps
  return run


def run_config(
  config: ml_collections.ConfigDict,
  model: str,
  train_size: int,
  seed: int,
  num_images: int | None = None,
) -> ml_collections.ConfigDict:
  """The trainer config of one grid point: ``config`` with the model, subset, seeds and budget.

  Args:
    config: a grid config from :func:`get_config`.
    model: a name of the grid's models.
    train_size: the subset size (-1: all).
    seed: the seed of the subset, the initialisation and the batches.
    num_images: the run's training images, for the budget (default:
      :func:`num_train_images`; the grid driver passes the loaded subset's size).

  Raises:
    ValueError: if ``model`` is not a model of the grid.
  """
  grid = config.scaling.get("grid", "convergence")
  table = FIXED_COMPUTE_MODELS if grid == "fixed_compute" else MODELS
  if model not in table:
    raise ValueError(f"model: expected one of {tuple(table)} ({grid} grid), got {model!r}")
  run = ml_collections.ConfigDict(config.to_dict())
  del run["scaling"]
  if grid != "fixed_compute" and model in priors.PRIORS:
    priors.apply_prior(run, model, dict(config.scaling.get("backbone_overrides") or {}))
  else:
    fields, extra = table[model]
    model_fields = dict(fields)
    if fields["name"] == "attention_net":
      model_fields = {**_ATTENTION, **model_fields}
    if fields["name"] == "small_cnn":
      model_fields.update(config.scaling.get("cnn_overrides") or {})
    run.model = ml_collections.ConfigDict(model_fields)
    run.mimetic_init = False
    run.conv_init_alpha = 0.0
    for key, value in extra.items():
      run[key] = value
  run.dataset.train_size = int(train_size)
  run.dataset.seed = int(seed)
  run.seed = int(seed)
  images = num_train_images(config, int(train_size)) if num_images is None else int(num_images)
  return apply_budget(
    run,
    images,
    int(config.num_train_steps),
    float(config.scaling.min_epochs),
    int(config.scaling.evaluations),
  )
