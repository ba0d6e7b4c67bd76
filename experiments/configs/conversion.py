"""Train a CNN, run it exactly as self-attention, then fine-tune it as free attention.

Command (resumable: rerun after a kill; finished stages are skipped)::

  python -m experiments.conversion --config=experiments/configs/conversion.py \
    --workdir=runs/conversion

Stages (each an ordinary trainer run in ``<workdir>/<stage>``, model selection on validation):
  1. ``cnn``: SmallCNN (2x2 space-to-depth, 3x3 convolutions 32-64-64, strides 1-2-2, BatchNorm,
     flatten head) on Fashion-MNIST, AdamW lr 3e-3, ``cnn_epochs`` epochs.
  2. exactness: the best CNN on the test set, plain and with every ``nn.Conv`` run as hard
     self-attention (``convolutions_as_attention``, dense and gather): accuracy, number of
     changed predictions, largest logit difference; then the CNN converted to an AttentionCNN at
     finite sharpness (``alphas``), with the accuracy at each.
  3. fine-tuning for ``finetune_epochs`` epochs at lr ``finetune_lr`` from the best CNN:
     ``cnn_continued`` (the CNN, trained on: the baseline with the same extra steps),
     ``attention_free`` (AttentionCNN, quadratic, centres and alpha trainable, starting at
     ``finetune_alpha``) and ``attention_content`` (the same plus content q.k with W_qry = 0 at
     the start; ``content_finetune_epochs`` epochs).

Writes ``<workdir>/conversion.json`` (and ``--out``, default
``experiments/results/conversion.json``). Expected runtime (2-core CPU): about 14 minutes (8 of
them the content stage). Expected result (measured): CNN 0.8917 test; as hard attention 0.8917
with 0 of 10,000 predictions changed; fine-tuned 2 epochs: CNN 0.8956, free attention 0.8947;
content (1 epoch) 0.8924 (``docs/experiments.md``, "Conversion").
``conversion.py:smoke`` runs a few steps of every stage (tests).
"""

from __future__ import annotations

import ml_collections

from experiments.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The conversion experiment's config; ``arg="smoke"``: a few steps of every stage (tests).

  Raises:
    ValueError: if ``arg`` is neither ``None`` nor ``"smoke"``.
  """
  if arg not in (None, "", "smoke"):
    raise ValueError(f"arg: expected None or 'smoke', got {arg!r}")
  config = common.base_config()
  config.dataset.name = "fashion_mnist"
  config.model = ml_collections.ConfigDict(
    {"name": "small_cnn", "features": (32, 64, 64), "pool": "flatten", "downsample": 2}
  )
  config.optimizer = "adamw"
  config.learning_rate = 0.003
  config.weight_decay = 0.05
  config.schedule = "warmup_cosine"
  config.num_epochs = 4
  config.progress_bar = False
  config.plot = False
  config.keep_checkpoints = 1

  config.conversion = ml_collections.ConfigDict()
  config.conversion.cnn_epochs = 4
  config.conversion.alphas = (87.3365478515625, 20.0, 10.0, 5.0, 3.0, 2.0, 1.0)
  config.conversion.finetune_alpha = 5.0
  config.conversion.finetune_epochs = 2
  # The content stage is ~16x slower per image on CPU (dense (B, H, Nq, Nk) content logits
  # against the separable position-only path): one epoch.
  config.conversion.content_finetune_epochs = 1
  config.conversion.finetune_lr = 0.001
  config.conversion.qk_features = 8
  if arg == "smoke":
    common.quick(config, steps=2)
    config.batch_size = 20
    config.conversion.alphas = (20.0, 1.0)
    config.conversion.cnn_epochs = -1
    config.conversion.finetune_epochs = -1
    config.conversion.content_finetune_epochs = -1
  return config
