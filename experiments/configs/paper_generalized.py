"""CIFAR-10, SA generalized quadratic embedding (full-covariance Gaussian heads): the paper's run.

Command::

  python -m experiments.main --config=experiments/configs/paper_generalized.py --workdir=runs/paper_generalized

Expected runtime: 300 epochs x 450 steps of batch 100; on one H100 in bfloat16 (add
``--config.dtype=bfloat16``) see README "Performance" for the measured step rate and projected
wall time; on a 2-core CPU it is impractical (days). Needs CIFAR-10 via tfds (downloaded on first
use where the machine is online).
Expected result: about the quadratic model's accuracy (the paper's appendix: no gain); 12,087,006 parameters.
``get_config("quick")`` is a 20-step smoke run of a tiny model.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import paper_common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return paper_common.attention_config("generalized", num_heads=9, dataset="cifar10", arg=arg)
