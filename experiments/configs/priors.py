"""Convolutional priors for attention on one shared backbone: only the attention differs.

``get_config("<prior>[,<dataset>][,smoke]")`` (default ``"vit,fashion_mnist"``). Priors:

=============================  ====================================================================
``vit``                        content attention (q.k), learned absolute positions (Dosovitskiy
                               et al. 2021): no convolutional prior
``vit_mimetic``                ``vit`` with mimetic initialisation (Trockman & Kolter 2023):
                               ``W_q W_k^T ~ 0.7 Z + 0.7 I``, ``W_v W_o ~ 0.4 Z - 0.4 I``
``gpsa``                       ConViT (d'Ascoli et al. 2021): gated positional self-attention in
                               the first ``num_layers - 1`` blocks, local initialisation
                               (centres on the 3x3 lattice, locality strength 1), content after
``attention_quadratic``        Eq. 9 (Gaussian) positional attention in every block, random
                               centres ``N(0, 2^2)`` (Cordonnier et al. 2020)
``attention_conv_init``        ``attention_quadratic`` started as a freshly initialised 3x3
                               convolution (``conv_to_attention`` at alpha = 2; per-head rank D/H,
                               the nearest such convolution by truncated SVD)
``attention_learned_content``  learned relative encoding plus content (q.k + q.r)
=============================  ====================================================================

Every prior is also a choice of fields, so any of them runs from the command line of any config
with the shared backbone: ``--config.model.encoding`` (``content``, ``gpsa``, ``quadratic``,
``learned_content``, ...), ``--config.model.gpsa_layers``, ``--config.model.locality_strength``,
``--config.mimetic_init``, ``--config.conv_init_alpha``. Commands::

  python -m experiments.main --config=experiments/configs/priors.py:gpsa --workdir=runs/priors/gpsa
  python -m experiments.main --config=experiments/configs/priors.py:vit \
    --config.mimetic_init=True --workdir=runs/priors/vit_mimetic

Backbone (:class:`attnconv.models.vit.ViT`, sized for a 2-core CPU): 4x4 patches (7x7 tokens on
Fashion-MNIST, 8x8 on CIFAR-10), D = 72, 4 pre-LayerNorm blocks of 9 heads (per-head query, key
and value size 8), MLP 144, learned absolute position embedding, mean pooling. Parameters on
Fashion-MNIST (10 classes; pinned in ``tests/test_configs.py``): 174,682 (vit, vit_mimetic),
174,790 (gpsa), 132,742 (attention_quadratic, attention_conv_init: no query/key projections),
175,098 (attention_learned_content); the smallest is 24% below the largest.

Recipe: AdamW lr 1e-3, weight decay 0.05 (not on centres / spreads), batch 100, warm-up 5% then
cosine, 10 epochs, random crops (padding 2) and flips. ``smoke``: 20 steps on 1000 images.

Expected runtime: about 10-25 minutes per prior on a 2-core CPU (10 epochs; GPSA and the
content models are the slowest); the results of the priors side by side are those of the data
efficiency study (``experiments/configs/data_scaling.py``).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from experiments.configs import common

DATASETS = ("fashion_mnist", "cifar10")

BACKBONE: dict[str, Any] = {
  "name": "vit",
  "patch_size": 4,
  "hidden_size": 72,
  "num_layers": 4,
  "num_heads": 9,
  "mlp_dim": 144,
  "pool": "mean",
  "norm": "pre",
  "pos_embedding": True,
  "dropout_rate": 0.0,
  "attention_dropout_rate": 0.0,
  "encoding": "content",
  "gpsa_layers": 0,
  "locality_strength": 1.0,
  "center_init_std": 2.0,
}

# prior -> (model fields over BACKBONE, top-level trainer fields)
PRIORS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
  "vit": ({}, {}),
  "vit_mimetic": ({}, {"mimetic_init": True}),
  "gpsa": ({"gpsa_layers": BACKBONE["num_layers"] - 1}, {}),
  "attention_quadratic": ({"encoding": "quadratic"}, {}),
  "attention_conv_init": ({"encoding": "quadratic"}, {"conv_init_alpha": 2.0}),
  "attention_learned_content": ({"encoding": "learned_content"}, {}),
}


def apply_prior(
  config: ml_collections.ConfigDict, prior: str, backbone: dict[str, Any] | None = None
) -> ml_collections.ConfigDict:
  """Sets ``config.model`` to the shared backbone (``BACKBONE`` updated by ``backbone``) with
  ``prior`` (and its trainer fields); ``gpsa`` keeps GPSA in every block but the last."""
  if prior not in PRIORS:
    raise ValueError(f"prior: expected one of {tuple(PRIORS)}, got {prior!r}")
  fields, extra = PRIORS[prior]
  model = {**BACKBONE, **(backbone or {})}
  if "gpsa_layers" in fields:
    fields = {**fields, "gpsa_layers": int(model["num_layers"]) - 1}
  config.model = ml_collections.ConfigDict({**model, **fields})
  config.mimetic_init = False
  config.conv_init_alpha = 0.0
  for key, value in extra.items():
    config[key] = value
  return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The config of one prior on the shared backbone (see the module docstring)."""
  parts = (arg or "vit").split(",")
  smoke = parts[-1] == "smoke"
  if smoke:
    parts = parts[:-1] or ["vit"]
  prior = parts[0]
  dataset = parts[1] if len(parts) == 2 else "fashion_mnist"
  if len(parts) > 2 or prior not in PRIORS or dataset not in DATASETS:
    raise ValueError(
      f"arg: expected '<prior>[,<dataset>][,smoke]' with a prior in {tuple(PRIORS)} and a "
      f"dataset in {DATASETS}, got {arg!r}"
    )
  config = common.base_config()
  config.dataset.name = dataset
  config.dataset.crop_padding = 2 if dataset == "fashion_mnist" else 4
  config.dataset.flip = True
  apply_prior(config, prior)
  config.optimizer = "adamw"
  config.learning_rate = 0.001
  config.weight_decay = 0.05
  config.schedule = "warmup_cosine"
  config.batch_size = 100
  config.num_epochs = 10
  config.log_every_steps = 100
  if smoke:
    common.quick(config)
  return config
