"""The paper's grid of heads, measured: does a quadratic attention network's first layer settle on
the 3x3 lattice around the query (Cordonnier et al. 2020, Sec. 4.2, Fig. 4)?

``get_config("<recipe>[,smoke]")``, recipes:

* ``adamw`` (default): AdamW lr 3e-3, weight decay 0.05, 20 epochs, warm-up (5%) + cosine;
* ``sgd``: the paper's recipe, SGD lr 0.1, momentum 0.9, weight decay 1e-4, warm-up + cosine;
* ``gpsa``: the same network with ConViT's gated positional self-attention in every layer
  (content half + Eq. 9 positional half, gate sigma(lambda) init sigma(1); the paper's random
  centres, not ConViT's local initialisation, so that the grid can form or not by training),
  AdamW as ``adamw``, on 7x7 tokens (4x4 space-to-depth: its content half has a batch axis,
  B x H x N x N probabilities, 16x cheaper at 7x7 than at 14x14), every epoch's checkpoint kept
  for the gate and attention-distance trajectories;
* ``paper_size``: the paper's full-size network (6 blocks of 9 heads, D = 400, MLP 512) in
  bfloat16 with the paper's SGD recipe, for a GPU (``experiments/gpu_studies.sh`` trains it for
  as many epochs as fit in its time budget; the measures read whatever epochs were logged);
* ``smoke``: 20 steps on 1000 images (alone, or appended: ``sgd,smoke``).

Commands (each resumes where it stopped when re-run; the analysis reads the workdir)::

  python -m experiments.main --config=experiments/configs/grid.py:adamw --workdir=runs/grid/adamw
  python -m experiments.main --config=experiments/configs/grid.py:sgd --workdir=runs/grid/sgd
  python -m experiments.main --config=experiments/configs/grid.py:gpsa --workdir=runs/grid/gpsa
  python -m experiments.grid_formation --workdirs=runs/grid/adamw,runs/grid/sgd,runs/grid/gpsa \
    --out=experiments/results/grid_formation.json --plot=experiments/results/grid_formation.png

Model: the paper's attention network (post-LayerNorm blocks, no absolute positions, mean pooling)
on Fashion-MNIST with 2x2 space-to-depth (28x28x1 -> 14x14 tokens of 4 values), Dense(64),
4 blocks of 9 quadratic (Gaussian, Eq. 9) heads, per-head value dimension 64, MLP 128, hidden
dropout 0.1, no attention-probability dropout (position-only probabilities then have no batch
axis: computed once per step, not once per image). The paper's initialisation:
centres N(0, 2^2) tokens, spreads 1 + N(0, 0.01^2) (alpha = spread^2 / 2 ~ 0.5). Augmentation:
random crops (padding 2) and horizontal flips. Batch 100, 5000 training images held out for
validation. Centres and alpha of every head are logged at every epoch (``centers.jsonl``).

Success criterion (stated before the runs): a layer has formed the paper's grid when, at the end
of training, (a) its lattice distance -- the mean Euclidean distance of its 9 centres to the 3x3
lattice {-1, 0, 1}^2 under the optimal one-to-one matching -- is <= 0.3 token, below the 5th
percentile of the same distance for centres drawn from the initialisation (>= 1000 draws), and
(b) the median over its heads of the peak attention mass (the largest probability a head gives
one key, at an interior query) is >= 0.5. The network has formed a grid when its first layer
has.

Compute estimate (2-core AMD EPYC, float32, median of 5 timed training steps of batch 100):
122 images/s for the quadratic network, so 20 epochs x 55,000 images = 1.1 M images ~ 2.5 h of
training plus ~0.2 h of per-epoch evaluation, ~2.7 h wall (5.4 CPU hours) per recipe. ``gpsa``
runs at 23 images/s at 14x14 tokens (~13 h for 20 epochs), hence 7x7 tokens: ~150 images/s,
~2 h wall. ``smoke``: under a minute.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import common

RECIPES = ("adamw", "sgd", "gpsa", "paper_size")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The grid-formation config for ``arg = "<recipe>[,smoke]"`` (see the module docstring)."""
  parts = (arg or "adamw").split(",")
  smoke = parts[-1] == "smoke"
  if smoke:
    parts = parts[:-1] or ["adamw"]
  if len(parts) != 1 or parts[0] not in RECIPES:
    raise ValueError(f"arg: expected '<recipe>[,smoke]' with recipe in {RECIPES}, got {arg!r}")
  recipe = parts[0]

  config = common.base_config()
  config.dataset.name = "fashion_mnist"
  config.dataset.crop_padding = 2
  config.dataset.flip = True

  config.model.name = "attention_net"
  config.model.encoding = "gpsa" if recipe == "gpsa" else "quadratic"
  config.model.num_layers = 4
  config.model.num_heads = 9
  config.model.hidden_size = 64
  config.model.mlp_dim = 128
  config.model.downsample = 2
  config.model.dropout_rate = 0.1
  config.model.attention_dropout_rate = 0.0
  config.model.implementation = "auto"  # dense at 14 x 14 tokens (faster there)
  config.model.center_init_std = 2.0

  config.batch_size = 100
  config.num_epochs = 20
  config.schedule = "warmup_cosine"
  if recipe in ("sgd", "paper_size"):
    config.optimizer = "sgd"
    config.learning_rate = 0.1
    config.momentum = 0.9
    config.weight_decay = 1e-4
  else:
    config.optimizer = "adamw"
    config.learning_rate = 0.003
    config.weight_decay = 0.05
  config.log_every_steps = 100
  config.keep_checkpoints = 2
  if recipe == "paper_size":
    config.model.num_layers = 6
    config.model.hidden_size = 400
    config.model.mlp_dim = 512
    config.dtype = "bfloat16"
  if recipe == "gpsa":
    config.model.downsample = 4
    config.keep_checkpoints = config.num_epochs + 1
  if smoke:
    common.quick(config)
    config.model.num_layers = 2
  return config
