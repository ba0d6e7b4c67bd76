"""ResNet18 on Fashion-MNIST (28x28x1), the baseline recipe on a small dataset.

Command::

  python -m experiments.main --config=experiments/configs/fashion_resnet18.py \
    --workdir=runs/fashion_resnet18

Recipe: SGD lr 0.1, momentum 0.9, weight decay 1e-4, batch 100, 30 epochs, step schedule
(lr / 10 at epochs 15 and 25), random crop (padding 2) and flips; 5000 training images held out
for validation (55000 train).

Expected runtime: ~10 min on one H100; hours on CPU. Expected result: ~94-95% test accuracy
(typical for ResNet18 on Fashion-MNIST; to be measured here).
``get_config("quick")`` is a 20-step smoke run.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The ResNet18 / Fashion-MNIST config; ``arg="quick"`` shrinks it to a smoke run."""
  config = common.base_config()
  config.dataset.name = "fashion_mnist"
  config.model.name = "resnet18"
  config.model.width = 64
  config.num_epochs = 30
  config.schedule = "step"
  config.decay_epochs = (15, 25)
  config.decay_factor = 10.0
  if arg == "quick":
    common.quick(config)
  elif arg:
    raise ValueError(f"arg: expected None or 'quick', got {arg!r}")
  return config
