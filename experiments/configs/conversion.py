"""Convolutions as attention: exactness of a converted CNN, and the T-CNN fine-tuning study.

Two studies, one command (``experiments.conversion`` dispatches on ``conversion.study``).

**Exactness** (``conversion.py``, the default): train a CNN, run it exactly as self-attention,
then fine-tune it as free attention. Command (resumable: rerun after a kill; finished stages are
skipped)::

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

**T-CNN fine-tuning** (``conversion.py:finetune``; d'Ascoli et al. 2021, "Transformed CNNs").

Question: does recasting the last convolutional stage of a trained CNN as gated positional
self-attention (GPSA) and fine-tuning it improve clean or corrupted accuracy over fine-tuning the
CNN itself for the same number of epochs, and over the same hybrid trained from scratch?

For each seed in ``seeds`` (0, 1, 2): the SmallCNN above (AdamW lr 3e-3, weight decay 0.05,
batch 100, warm-up 5% + cosine, random crops (padding 2) and flips) trained ``cnn_epochs`` = 10
epochs; its best-validation checkpoint starts the arms:

  ``cnn_finetune``: the CNN fine-tuned ``finetune_epochs`` = 10 epochs at lr ``finetune_lr`` =
    1e-3 (warm-up + cosine again): the reference of the paired differences.
  ``tcnn``: the T-CNN: ``conv3`` (the last stage, 7x7 -> 4x4) recast as 9-head GPSA by
    :func:`attnconv.models.conv_init.transformed_cnn_from_cnn` -- positional half the
    convolution at ``alpha`` = 20 (off-target mass <= 80 e^-20 = 1.6e-7), content half (query/key,
    ``qk_features`` = 8 per head) gated off by ``gate_init`` = 17 (content weight sigmoid(-17) =
    4.1e-8, below float32 resolution): at step 0 it computes the CNN's function -- then
    fine-tuned exactly as ``cnn_finetune``.
  ``tcnn_open_gate``: the same conversion with ``open_gate_init`` = 1 (ConViT's gate init, content
    weight 0.27 at step 0: not the CNN's function at the start).
  ``hybrid_scratch``: the same hybrid (``conv3`` GPSA, ConViT's local init: centres on the 3x3
    lattice, alpha 1, gate 1) trained from scratch for ``cnn_epochs + finetune_epochs`` = 20
    epochs with the CNN's recipe.

Why ``tcnn_open_gate``: with the content half gated off at 17, its gradients are of the order of
sigmoid(-17) (measured on a batch: about 3e-9 for the gate, 1e-10 for the query/key kernels),
below Adam's eps (1e-8), so Adam's steps are a fraction of the learning rate (about 0.26 of it
for the gate, 0.01 for the kernels), and no Adam step exceeds about the learning rate anyway:
over 5500 steps of warm-up + cosine at peak 1e-3 (sum of the rates 2.75) the gradient moves the
gate down by about 0.7 (2.75 at the very most) and the decoupled weight decay (0.05) by about
2.2, leaving a content weight of about 1e-6 (6e-6 at the very most). Measured: one epoch of
fine-tuning (550 steps, from a CNN trained 500 steps) moved the gates from 17 to 16.77, what the
weight decay alone accounts for (17 x 0.05 x 0.275 = 0.23). ``tcnn`` is therefore
expected to stay functionally a CNN (the same accuracy as ``cnn_finetune`` within noise);
``tcnn_open_gate`` is the arm in which content attention actually takes part. The final gates
are recorded (``gates``: content weight per head at the start and at the best checkpoint).

Evaluation (the best-validation checkpoint of every run): clean test accuracy, and test accuracy
under corruptions of the test images (:mod:`experiments.corruptions`): Gaussian noise std 0.05,
0.1, 0.2 (of the [0, 1] range), Gaussian blur sigma 0.5, 1, 1.5 pixels, translations by 2, 3, 4
pixels (zero fill; mean over right, left, down, up), and ``mean_corrupted`` (their mean).
Paired differences against ``cnn_finetune`` (and of both T-CNNs against ``hybrid_scratch``) over
seeds, with 95% t intervals (2 degrees of freedom).

Pre-stated criterion: an arm "beats the fine-tuned CNN" on a metric when the 95% interval of its
paired difference lies above 0; "is worse" when below; otherwise no detectable difference at 3
seeds (the interval half-width is about 2.5 times the between-seed standard deviation of the
differences). The T-CNN claim (d'Ascoli et al.: better clean accuracy and markedly better
robustness) predicts ``tcnn_open_gate - cnn_finetune`` above 0 on ``clean`` and on
``mean_corrupted``, and ``tcnn*`` above ``hybrid_scratch``; the gating argument above predicts
``tcnn - cnn_finetune`` indistinguishable from 0.

Compute estimate: CPU time per step at batch 100 (the process's CPU time over 30 timed steps,
measured on this 2-core machine at a load average of 5-6 from other runs): SmallCNN 0.021 s, the
conv3-GPSA hybrid 0.08-0.09 s (the dense content probabilities make it about 4 times the CNN);
evaluation 0.005 / 0.013 s per 100 images. Per seed: 20 CNN epochs (11,000 steps, about 4 CPU
minutes), 40 hybrid epochs (22,000 steps, about 31 CPU minutes), one evaluation of 15,000 images
per epoch (about 1.5 minutes) and the corruption suite (19 test sets of 10,000 images for 5
networks, about 1.5 minutes): about 38 CPU minutes, 1.9 CPU hours for 3 seeds as measured; on an
idle machine expect about 1-1.3 CPU hours, 1-1.5 hours wall (the trainer's 2 threads are not
fully used by these small networks). Measured: 1.7 CPU hours, 1.8 hours wall for the 15 runs
(sharing the 2 cores with one single-threaded training run). Result (``docs/experiments.md``,
"T-CNN"): ``tcnn`` = ``cnn_finetune`` on every metric; ``tcnn_open_gate``: clean +0.07 points
[-0.26, +0.41], mean corrupted -0.31 [-0.37, -0.26]; ``hybrid_scratch``: clean +0.26
[-0.32, +0.83], translations by 4 pixels +4.71 [+3.97, +5.45]. Command (resumable)::

  python -m experiments.conversion --config=experiments/configs/conversion.py:finetune \
    --workdir=runs/conversion_finetune

Runs in ``<workdir>/cnn/s<seed>`` and ``<workdir>/<arm>/s<seed>``; writes
``experiments/results/conversion_finetune.json`` (per arm, seed and corruption; paired
differences with intervals) and ``experiments/results/conversion_finetune.png``;
``--markdown=<path>`` also writes its tables in the form ``docs/experiments.md`` quotes.
``conversion.py:finetune,smoke`` runs a few steps of every arm on 1 seed (tests).
"""

from __future__ import annotations

import ml_collections

from experiments.configs import common

ARGS = ("", "smoke", "finetune", "finetune,smoke")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The config of one of the conversion studies (see the module docstring).

  Args:
    arg: ``None``/``""`` (exactness study), ``"smoke"`` (a few steps of every stage),
      ``"finetune"`` (the T-CNN study) or ``"finetune,smoke"``.

  Raises:
    ValueError: if ``arg`` is none of these.
  """
  if (arg or "") not in ARGS:
    raise ValueError(f"arg: expected None or one of {ARGS}, got {arg!r}")
  if (arg or "").startswith("finetune"):
    return _finetune_config(smoke=arg.endswith("smoke"))
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
  config.conversion.study = "exactness"
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


def _finetune_config(smoke: bool) -> ml_collections.ConfigDict:
  """The T-CNN fine-tuning study (module docstring)."""
  config = common.base_config()
  config.dataset.name = "fashion_mnist"
  config.dataset.crop_padding = 2
  config.dataset.flip = True
  config.model = ml_collections.ConfigDict(
    {"name": "small_cnn", "features": (32, 64, 64), "pool": "flatten", "downsample": 2}
  )
  config.optimizer = "adamw"
  config.learning_rate = 0.003
  config.weight_decay = 0.05
  config.schedule = "warmup_cosine"
  config.batch_size = 100
  config.num_epochs = 10
  config.progress_bar = False
  config.plot = False
  config.keep_checkpoints = 1

  c = config.conversion = ml_collections.ConfigDict()
  c.study = "finetune"
  c.seeds = (0, 1, 2)
  c.cnn_epochs = 10
  c.finetune_epochs = 10
  c.finetune_lr = 0.001
  c.arms = ("cnn_finetune", "tcnn", "tcnn_open_gate", "hybrid_scratch")
  c.reference_arm = "cnn_finetune"
  # Paired differences "a - b" reported besides every arm against the reference.
  c.extra_comparisons = (("tcnn", "hybrid_scratch"), ("tcnn_open_gate", "hybrid_scratch"))
  c.attention_layers = ("conv3",)
  c.alpha = 20.0
  c.gate_init = 17.0
  c.open_gate_init = 1.0
  c.scratch_locality_strength = 1.0
  c.qk_features = 8
  c.corruptions = ml_collections.ConfigDict(
    {
      "gaussian_noise": (0.05, 0.1, 0.2),
      "gaussian_blur": (0.5, 1.0, 1.5),
      "translate": (2, 3, 4),
    }
  )
  c.corruption_seed = 0
  if smoke:
    common.quick(config, steps=2)
    config.batch_size = 20
    config.model.features = (4, 8, 8)
    c.seeds = (0,)
    c.cnn_epochs = -1
    c.finetune_epochs = -1
    c.corruptions = ml_collections.ConfigDict(
      {"gaussian_noise": (0.1,), "gaussian_blur": (1.0,), "translate": (2,)}
    )
  return config
