"""Shared defaults of every experiment config (the paper's training recipe).

Every field the trainer reads is defined here, so an override ``--config.<key>=<value>`` on the
command line works for any experiment. Experiment files start from :func:`base_config` and change
what differs.

Fields:
  dataset.name: ``"cifar10"`` or ``"fashion_mnist"`` (see
    :func:`experiments.input_pipeline.load_dataset`).
  dataset.data_dir, dataset.manual_dir: CIFAR-10 tarball directory / Fashion-MNIST IDX directory
    (empty string: the input pipeline's default).
  dataset.val_size: validation examples carved from the official train split (model selection).
  dataset.train_size: keep this many training examples (-1: all).
  dataset.crop_padding, dataset.flip: augmentation (-1 / None: the dataset default).
  dataset.seed: seed of the validation split and train subset.
  model.name: a name of :func:`attnconv.models.build_model`; the other ``model`` fields are its
    keyword arguments (``num_classes`` is filled in from the dataset, ``dtype`` from ``dtype``).
  batch_size: global batch size, divisible by the number of devices (paper: 100).
  eval_batch_size: evaluation batch size (-1: ``batch_size``).
  num_epochs: training epochs (paper: 300); num_train_steps > 0 overrides it.
  optimizer: ``"sgd"`` (the paper) or ``"adamw"``.
  learning_rate, momentum, weight_decay: SGD (coupled L2 as PyTorch's SGD; centres and spreads
    are not decayed); for AdamW, decoupled weight decay with the same mask.
  schedule: ``"warmup_cosine"`` (linear warm-up over ``warmup_ratio`` of the steps, then cosine
    to 0, per step) or ``"step"`` (divide by ``decay_factor`` at each of ``decay_epochs``) or
    ``"constant"``.
  conv_init_alpha: 0 (off) or a finite sharpness > 0: start every quadratic attention layer as a
    freshly initialised K x K convolution with this alpha (via ``conv_to_attention``; see
    :func:`attnconv.models.conv_init.init_attention_as_convolution`), then train it freely.
  mimetic_init: rewrite every content attention layer's query/key and value/out kernels at
    initialisation so that W_q W_k^T ~ 0.7 Z + 0.7 I and W_v W_o ~ 0.4 Z - 0.4 I per head
    (:func:`attnconv.models.mimetic.mimetic_init`, Trockman & Kolter 2023).
  seed: seed of the parameter init, the batch order, augmentation and dropout.
  dtype: ``"float32"`` or ``"bfloat16"`` computation (parameters stay float32).
  microbatches: gradient accumulation over this many equal slices of each batch (memory).
  unroll_microbatches: run the slices as straight-line code instead of a loop: faster for
    convolutional models on the CPU (XLA:CPU's convolutions are slow inside loops), but the
    memory saving may be lost (see ``experiments.accumulation``).
  eval_every_steps: evaluate val and test every this many steps (-1: once per epoch) and at the
    end.
  checkpoint_every_steps: save a checkpoint every this many steps (-1: once per epoch) and at the
    end; keep_checkpoints: how many to keep.
  log_every_steps: how often the host checks the loss for NaN/inf and updates the progress bar.
  plot: write plots to ``<workdir>/plots`` at the end of training.
  progress_bar: show a tqdm progress bar.
  stop_after_steps: stop (without a final checkpoint, as if killed) once this step is reached
    (-1: never); for testing resumption.
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """All trainer fields with the paper's defaults (SGD 0.1, batch 100, 300 epochs, seed 42)."""
  config = ml_collections.ConfigDict()

  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = "cifar10"
  config.dataset.data_dir = ""
  config.dataset.manual_dir = ""
  config.dataset.val_size = 5000
  config.dataset.train_size = -1
  config.dataset.crop_padding = -1
  config.dataset.flip = ml_collections.FieldReference(None, field_type=bool)
  config.dataset.seed = 0

  config.model = ml_collections.ConfigDict()
  config.model.name = "resnet18"

  config.batch_size = 100
  # Gradient accumulation: the batch runs as this many equal slices in sequence (activation
  # memory of one slice; dropout masks are drawn per slice). 1 = the whole batch at once.
  config.microbatches = 1
  config.unroll_microbatches = False
  config.eval_batch_size = -1
  config.num_epochs = 300
  config.num_train_steps = -1

  config.optimizer = "sgd"
  config.learning_rate = 0.1
  config.momentum = 0.9
  config.weight_decay = 1e-4
  config.schedule = "warmup_cosine"
  config.warmup_ratio = 0.05
  config.decay_epochs = (80, 150, 250)
  config.decay_factor = 10.0

  config.seed = 42
  config.conv_init_alpha = 0.0
  config.mimetic_init = False
  config.dtype = "float32"

  config.eval_every_steps = -1
  config.checkpoint_every_steps = -1
  config.keep_checkpoints = 3
  config.log_every_steps = 50
  config.plot = True
  config.progress_bar = True
  config.stop_after_steps = -1
  return config


def quick(config: ml_collections.ConfigDict, steps: int = 20) -> ml_collections.ConfigDict:
  """Shrinks a config to a smoke run: ``steps`` steps on 1000 training examples."""
  config.dataset.train_size = 1000
  config.dataset.val_size = 500
  config.num_train_steps = steps
  config.eval_every_steps = steps
  config.checkpoint_every_steps = steps
  return config
