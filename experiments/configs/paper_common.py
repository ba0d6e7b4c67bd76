"""Shared builder of the paper's attention-network configs (Cordonnier et al., 2020, Sec. 4).

Model: 2x2 space-to-depth, Dense(400), 6 post-LayerNorm blocks (9 heads, per-head value
dimension 400, MLP 512, exact GELU, dropout 0.1 on hidden states and attention probabilities --
one mask per step shared by the batch for the Gaussian encodings, one per image for the learned
ones, as in the authors' code),
mean pooling, Dense(classes). Training: SGD lr 0.1, momentum 0.9, weight decay 1e-4 (not on
centres/spreads), batch 100, 300 epochs, linear warm-up over 5% of the steps then cosine, per
step; seed 42; model selection on a 5000-image validation split carved from the training set.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import common


def attention_config(
  encoding: str, *, num_heads: int = 9, dataset: str = "cifar10", arg: str | None = None
) -> ml_collections.ConfigDict:
  """The paper's attention model with ``encoding`` on ``dataset``; ``arg='quick'``: smoke run."""
  config = common.base_config()
  config.dataset.name = dataset
  config.model.name = "attention_net"
  config.model.encoding = encoding
  config.model.num_layers = 6
  config.model.num_heads = num_heads
  config.model.hidden_size = 400
  config.model.mlp_dim = 512
  config.model.downsample = 2
  config.model.dropout_rate = 0.1
  config.model.attention_dropout_rate = 0.1
  # As the authors' code: their Gaussian attention (quadratic, generalized) has batch-free
  # probabilities, so one dropout mask is shared by the batch; their learned class expands the
  # probabilities to the batch first (one mask per image).
  config.model.shared_dropout_mask = encoding in ("quadratic", "generalized")
  config.model.implementation = "auto"
  config.schedule = "warmup_cosine"
  config.warmup_ratio = 0.05
  config.num_epochs = 300
  if arg == "quick":
    common.quick(config)
    config.model.num_layers = 1
    config.model.hidden_size = 32
    config.model.mlp_dim = 32
  elif arg:
    raise ValueError(f"arg: expected None or 'quick', got {arg!r}")
  return config
