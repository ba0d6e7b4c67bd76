"""ResNet18 on CIFAR-10: the paper's convolutional baseline (Table 1).

Command::

  python -m experiments.main --config=experiments/configs/resnet18.py --workdir=runs/resnet18

Recipe (the authors' ``runs/resnet``): SGD lr 0.1, momentum 0.9, weight decay 1e-4, batch 100,
300 epochs, step schedule dividing the lr by 10 at epochs 80, 150 and 250 (applied exactly at those
epochs; the authors' PyTorch loop shifted it by one epoch), random crop (padding 4) and flips.
Unlike the paper, 5000 training images are held out for model selection (45000 train).

Expected runtime: ~1.5-2 h on one H100 (float32; ``--config.dtype=bfloat16`` is faster), days on
CPU. Expected result: the paper reports 94.3% CIFAR-10 test accuracy (to be measured here).
``get_config("quick")`` is a 20-step smoke run.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The ResNet18 / CIFAR-10 config; ``arg="quick"`` shrinks it to a smoke run."""
  config = common.base_config()
  config.dataset.name = "cifar10"
  config.model.name = "resnet18"
  config.model.width = 64
  config.schedule = "step"
  config.decay_epochs = (80, 150, 250)
  config.decay_factor = 10.0
  if arg == "quick":
    common.quick(config)
  elif arg:
    raise ValueError(f"arg: expected None or 'quick', got {arg!r}")
  return config
