"""Fashion-MNIST counterpart of paper_generalized: SA generalized quadratic embedding (full-covariance Gaussian heads).

Same model sizes and recipe as the CIFAR-10 run (6 layers, 9 heads, D = 400, SGD 0.1, batch 100,
warm-up + cosine), on 28x28x1 Fashion-MNIST (2x2 space-to-depth -> 14x14 tokens), which is
available offline from Debian's dataset-fashion-mnist package.

Command::

  python -m experiments.main --config=experiments/configs/fashion_paper_generalized.py \
    --workdir=runs/fashion_paper_generalized [--config.num_epochs=N] [--config.dtype=bfloat16]

Expected runtime: GPU-sized (minutes per epoch on one H100; hours per epoch on a 2-core CPU).
Expected result: not yet measured at full length here (no GPU was lent to the session that wrote
it); see README "Results" for what was measured and with which command.
``get_config("quick")`` is a 20-step smoke run of a tiny model.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import paper_common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = paper_common.attention_config(
    "generalized", num_heads=9, dataset="fashion_mnist", arg=arg
  )
  config.num_epochs = 100
  return config
