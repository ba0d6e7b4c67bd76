"""Training and evaluation loop: ``train_and_evaluate(config, workdir)``.

* SGD with momentum and PyTorch-style coupled L2 weight decay (``grad += wd * param`` before
  momentum), not applied to the quadratic attention's ``centers`` / ``spreads``; warm-up + cosine
  or step learning-rate schedule, updated every step.
* One jitted train step (``jax.jit``, state donated), data parallel over all devices of all
  processes (``jax.devices()``): a 1-D ``jax.sharding.Mesh`` with axis ``"data"``, batch sharded
  along it, state replicated. The host runs at most ``MAX_INFLIGHT`` steps (and evaluation
  batches) ahead of the devices: with more devices than CPU cores, an unbounded queue of
  executions with collectives can starve their rendezvous.
* Multi-process (``jax.distributed``, see :mod:`experiments.main`): the global batch of a step
  is a pure function of ``(seed, step)`` (:func:`experiments.input_pipeline.batch_at_step`),
  whatever the number of processes; each process reads only its rows of it
  (:func:`experiments.input_pipeline.process_rows`) and the global array is assembled with
  ``jax.make_array_from_process_local_data``. Augmentation and dropout are drawn inside the
  jitted step from ``fold_in(key, step)`` with the global batch's shape (partitionable threefry),
  so every example's draw depends on its global position, not on the process that holds it.
  Evaluation is sharded the same way (``shard_map``: per-device sums, no collective until one
  gather at the end). Only process 0 writes files other than checkpoints and shows progress.
* With the train-metric accumulators kept in the state, a run resumed from a checkpoint is
  bit-identical to an uninterrupted one.
* Orbax ``CheckpointManager`` in ``<workdir>/checkpoints`` (params, batch_stats, optimizer state,
  step, RNG key, metric accumulators) with automatic resume; the best-validation weights in
  ``<workdir>/best`` (those of evaluations after the checkpoint a run resumes from are removed at
  the restart). Every process saves and restores collectively, so the workdir must be on a file
  system all processes share.
* ``<workdir>/config.json``, ``metrics.jsonl`` (one JSON object per evaluation),
  ``centers.jsonl`` (quadratic attention centres and sharpness alpha per evaluation),
  ``summary.json``, ``plots/``, and TensorBoard event files of the metrics in
  ``<workdir>/tensorboard/`` (``tensorboardX``; rewritten from ``metrics.jsonl`` at every start,
  so a resumed run holds each step once).
* Model selection is on the validation split only: ``final_test_accuracy`` is the test accuracy
  of the evaluation with the best validation accuracy; ``last_test_accuracy`` that of the end.
"""

from __future__ import annotations

import collections
import json
import math
import os
import pathlib
import shutil
import time
import types
from collections.abc import Callable
from typing import Any

import flax
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from attnconv.models import build_model, count_params
from attnconv.models.conv_init import init_attention_as_convolution
from attnconv.models.mimetic import mimetic_init
from experiments import input_pipeline
from experiments.accumulation import accumulated_value_and_grad
from experiments.jsonl import read_jsonl

__all__ = [
  "MAX_INFLIGHT",
  "TENSORBOARD_DIR",
  "TENSORBOARD_TAGS",
  "TrainState",
  "build_optimizer",
  "create_learning_rate_schedule",
  "evaluate",
  "find_params",
  "initialize_distributed",
  "load_dataset_from_config",
  "num_train_steps",
  "train_and_evaluate",
  "weight_decay_mask",
]

NO_DECAY_NAMES = ("centers", "spreads", "alpha")
METRICS_FILE = "metrics.jsonl"
CENTERS_FILE = "centers.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.json"
TENSORBOARD_DIR = "tensorboard"
# metrics.jsonl key -> TensorBoard scalar tag.
TENSORBOARD_TAGS = {
  "train_loss": "train/loss",
  "train_accuracy": "train/accuracy",
  "lr": "train/learning_rate",
  "images_per_second": "train/images_per_second",
  "val_loss": "val/loss",
  "val_accuracy": "val/accuracy",
  "test_loss": "test/loss",
  "test_accuracy": "test/accuracy",
}
# Executions the host dispatches ahead of the devices (train steps, evaluation batches).
MAX_INFLIGHT = 2


class TrainState(flax.struct.PyTreeNode):
  """Everything a checkpoint holds; a pytree of arrays.

  Attributes:
    step: int32 scalar, number of optimizer updates done.
    params: model parameters.
    batch_stats: BatchNorm statistics (``{}`` for models without).
    opt_state: optax state.
    rng: ``(2,)`` uint32 raw PRNG key (per-step keys are ``fold_in(rng, step)``).
    loss_sum, correct_sum, count: float32 train-metric accumulators since the last evaluation.
    nonfinite_step: int32, first step whose loss was NaN/inf (-1: none).
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array
  loss_sum: jax.Array
  correct_sum: jax.Array
  count: jax.Array
  nonfinite_step: jax.Array


# ----------------------------------------------------------------------------------------------
# Multi-process runtime.


def initialize_distributed(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  auto: bool = False,
) -> bool:
  """Starts JAX's distributed runtime if asked; call it before anything touches the devices.

  Args:
    coordinator_address: ``"HOST:PORT"`` of process 0's coordinator service.
    num_processes: number of processes, >= 1.
    process_id: this process's index in ``[0, num_processes)``.
    auto: let ``jax.distributed.initialize`` detect the cluster (the three arguments above,
      where given, override what it detects).

  Returns:
    Whether the runtime was started (False: a plain single-process run, nothing given).

  Raises:
    ValueError: if only some of the three explicit arguments are given without ``auto``, or one
      is out of range.
  """
  given = {
    "coordinator_address": coordinator_address,
    "num_processes": num_processes,
    "process_id": process_id,
  }
  if not auto and all(v is None for v in given.values()):
    return False
  if not auto:
    missing = [name for name, value in given.items() if value is None]
    if missing:
      raise ValueError(
        f"{missing[0]}: expected a value when any of coordinator_address, num_processes and "
        f"process_id is given (or use --distributed to detect the cluster), got None"
      )
  if coordinator_address is not None:
    host, sep, port = coordinator_address.rpartition(":")
    if not sep or not host or not port.isdigit():
      raise ValueError(f"coordinator_address: expected 'HOST:PORT', got {coordinator_address!r}")
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"num_processes: expected an integer >= 1, got {num_processes}")
  if process_id is not None:
    if process_id < 0 or (num_processes is not None and process_id >= num_processes):
      bound = f"[0, {num_processes})" if num_processes is not None else ">= 0"
      raise ValueError(f"process_id: expected an integer in {bound}, got {process_id}")

  # Cross-process collectives of the CPU backend (the default of recent jaxlib, set explicitly).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**{k: v for k, v in given.items() if v is not None})
  return True


# ----------------------------------------------------------------------------------------------
# Config helpers.


def _opt(value: Any, none_if: Any) -> Any:
  """Maps the config's 'unset' sentinels ('' / -1 / None) to None."""
  return None if value is None or value == none_if else value


def load_dataset_from_config(config: ml_collections.ConfigDict) -> input_pipeline.Dataset:
  """Loads ``config.dataset`` with :func:`experiments.input_pipeline.load_dataset`."""
  d = config.dataset
  return input_pipeline.load_dataset(
    d.name,
    data_dir=_opt(d.get("data_dir"), ""),
    manual_dir=_opt(d.get("manual_dir"), ""),
    val_size=d.get("val_size", 5000),
    train_size=_opt(d.get("train_size"), -1),
    seed=d.get("seed", 0),
    crop_padding=_opt(d.get("crop_padding"), -1),
    flip=d.get("flip"),
  )


def num_train_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """``config.num_train_steps`` if positive, else ``num_epochs * steps_per_epoch``."""
  if config.get("num_train_steps", -1) > 0:
    return int(config.num_train_steps)
  if config.num_epochs <= 0:
    raise ValueError(
      f"config.num_epochs: expected a positive number when num_train_steps <= 0, got "
      f"{config.num_epochs}"
    )
  return int(math.ceil(config.num_epochs * steps_per_epoch))


def create_learning_rate_schedule(
  config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int
) -> optax.Schedule:
  """The per-step learning rate.

  ``"warmup_cosine"``: linear 0 -> lr over ``int(warmup_ratio * total_steps)`` steps, then
  ``0.5 * lr * (1 + cos(pi * progress))`` to 0 at ``total_steps``. ``"step"``: lr divided by
  ``decay_factor`` at the start of each epoch in ``decay_epochs``. ``"constant"``: lr.
  """
  lr = float(config.learning_rate)
  name = config.schedule
  if name == "warmup_cosine":
    warmup = int(config.warmup_ratio * total_steps)
    return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=lr,
      warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1),
      end_value=0.0,
    )
  if name == "step":
    if config.decay_factor <= 0:
      raise ValueError(f"config.decay_factor: expected > 0, got {config.decay_factor}")
    boundaries = {int(e * steps_per_epoch): 1.0 / config.decay_factor for e in config.decay_epochs}
    return optax.piecewise_constant_schedule(lr, boundaries)
  if name == "constant":
    return optax.constant_schedule(lr)
  raise ValueError(f"config.schedule: expected 'warmup_cosine', 'step' or 'constant', got {name!r}")


def weight_decay_mask(params: Any) -> Any:
  """Pytree of bools: True for every parameter except those named ``centers``, ``spreads``, ``alpha``."""

  def decay(path, _):
    names = {getattr(k, "key", getattr(k, "name", None)) for k in path}
    return not names.intersection(NO_DECAY_NAMES)

  return jax.tree_util.tree_map_with_path(decay, params)


def build_optimizer(
  config: ml_collections.ConfigDict, schedule: optax.Schedule
) -> optax.GradientTransformation:
  """SGD + momentum with PyTorch's coupled L2 decay (the paper), or AdamW; decay is masked off
  attention centres and spreads."""
  name = config.get("optimizer", "sgd")
  if name == "sgd":
    return optax.chain(
      optax.add_decayed_weights(config.weight_decay, mask=weight_decay_mask),
      optax.sgd(schedule, momentum=config.momentum or None),
    )
  if name == "adamw":
    return optax.adamw(schedule, weight_decay=config.weight_decay, mask=weight_decay_mask)
  raise ValueError(f"config.optimizer: expected 'sgd' or 'adamw', got {name!r}")


def find_params(tree: Any, name: str) -> dict[str, np.ndarray]:
  """All leaves of ``tree`` whose last path key is ``name``, keyed by ``'/'``-joined path."""
  found = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    if keys and keys[-1] == name:
      found["/".join(keys[:-1])] = np.asarray(leaf)
  return found


def _build_model(config: ml_collections.ConfigDict, num_classes: int):
  kwargs = config.model.to_dict()
  name = kwargs.pop("name")
  for key, value in list(kwargs.items()):
    if isinstance(value, list):
      kwargs[key] = tuple(value)
  kwargs["num_classes"] = num_classes
  dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
  if config.dtype not in dtypes:
    raise ValueError(f"config.dtype: expected one of {sorted(dtypes)}, got {config.dtype!r}")
  if config.dtype != "float32":
    kwargs["dtype"] = dtypes[config.dtype]
  return build_model(name, **kwargs)


# ----------------------------------------------------------------------------------------------
# Steps.


def _keys(config: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
  """``(init_key, train_key)`` of a run, from ``config.seed``."""
  init_key, train_key = jax.random.split(jax.random.key(int(config.seed)))
  return init_key, train_key


def _conv_init_alpha(config: ml_collections.ConfigDict) -> float:
  alpha = float(config.get("conv_init_alpha", 0.0))
  if alpha < 0:
    raise ValueError(f"config.conv_init_alpha: expected 0 (off) or > 0, got {alpha}")
  return alpha


def _initialise(
  init_key: jax.Array,
  model,
  image_shape: tuple[int, ...],
  alpha: float,
  given_variables: Any = None,
) -> dict[str, Any]:
  """The jittable part of a run's initialisation: ``model.init`` from the run's ``init_key``
  (:func:`_keys`), the collections of ``given_variables`` put in place of the fresh ones, then,
  with ``alpha > 0`` (``conv_init_alpha``), every quadratic attention layer started as a K x K
  convolution.

  Returns:
    ``{"params", "batch_stats"}`` (``batch_stats`` ``{}`` for models without BatchNorm).
  """
  params_key, dropout_key = jax.random.split(init_key)
  sample = jnp.zeros((1, *image_shape), jnp.float32)
  variables = model.init({"params": params_key, "dropout": dropout_key}, sample, train=False)
  if given_variables is not None:
    variables = {**variables, **given_variables}
  params = variables["params"]
  if alpha > 0:
    params = init_attention_as_convolution(params, jax.random.fold_in(params_key, 1), alpha=alpha)
  return {"params": params, "batch_stats": variables.get("batch_stats", {})}


def _mimetic(config: ml_collections.ConfigDict, params: Any) -> Any:
  """With ``config.mimetic_init``, ``params`` (on the host) rewritten by Trockman & Kolter's
  mimetic initialisation (SVDs of the kernels, in numpy); else ``params`` unchanged."""
  if not config.get("mimetic_init", False):
    return params
  return _to_host(mimetic_init(params, jax.random.fold_in(_keys(config)[0], 2)))


def initial_variables(
  config: ml_collections.ConfigDict, model, image_shape: tuple[int, ...]
) -> dict[str, Any]:
  """A run's initial ``{"params", "batch_stats"}``, as :func:`train_and_evaluate` starts it
  from ``config.seed`` (``conv_init_alpha``, ``mimetic_init``): the at-initialisation network
  of a finished run. Runs started from given ``init_variables`` (fine-tuning a converted
  network) are not reproduced: their initial parameters are not in the workdir."""
  variables = _initialise_compiled(
    _keys(config)[0], model, tuple(image_shape), _conv_init_alpha(config), None
  )
  variables = _to_host(variables)
  return {**variables, "params": _mimetic(config, variables["params"])}


# The key is an argument: one compilation per model, image shape and alpha serves every seed and
# both callers, the trainer and `initial_variables` (which pass every argument positionally, so
# that their calls share one cache entry).
_initialise_compiled = jax.jit(_initialise, static_argnums=(1, 2, 3))


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def _make_train_step(
  model, tx, dataset: input_pipeline.Dataset, microbatches: int = 1, unroll: bool = False
) -> Callable:
  crop_padding, flip = dataset.crop_padding, dataset.flip
  mean, std = dataset.mean, dataset.std

  def train_step(state: TrainState, images: jax.Array, labels: jax.Array):
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    aug_key, dropout_key = jax.random.split(step_key)
    images = input_pipeline.augment(aug_key, images, crop_padding=crop_padding, flip=flip)
    images = input_pipeline.normalize(images, mean, std)

    def loss_fn(params, batch_stats, images, labels, key):
      variables = {"params": params}
      if batch_stats:
        variables["batch_stats"] = batch_stats
      logits, updates = model.apply(
        variables, images, train=True, rngs={"dropout": key}, mutable=["batch_stats"]
      )
      loss = jnp.mean(_cross_entropy(logits, labels))
      return loss, (logits, updates.get("batch_stats", {}))

    (loss, (logits, batch_stats)), grads = accumulated_value_and_grad(
      loss_fn,
      state.params,
      state.batch_stats,
      (images, labels),
      dropout_key,
      microbatches,
      unroll,
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    correct = jnp.sum(jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    finite = jnp.isfinite(loss)
    nonfinite_step = jnp.where(
      (state.nonfinite_step < 0) & ~finite, state.step, state.nonfinite_step
    )
    new_state = state.replace(
      step=state.step + 1,
      params=params,
      batch_stats=batch_stats,
      opt_state=opt_state,
      loss_sum=state.loss_sum + loss * labels.shape[0],
      correct_sum=state.correct_sum + correct,
      count=state.count + labels.shape[0],
      nonfinite_step=nonfinite_step,
    )
    return new_state, loss

  return train_step


def _make_eval_step(model, dataset: input_pipeline.Dataset) -> Callable:
  mean, std = dataset.mean, dataset.std

  def eval_step(params, batch_stats, images, labels, mask):
    variables = {"params": params}
    if batch_stats:
      variables["batch_stats"] = batch_stats
    logits = model.apply(variables, input_pipeline.normalize(images, mean, std), train=False)
    loss = _cross_entropy(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels) & mask
    return jnp.sum(jnp.where(mask, loss, 0.0)), jnp.sum(correct.astype(jnp.float32))

  return eval_step


def _make_sharded_eval_step(model, dataset: input_pipeline.Dataset, mesh: Mesh) -> Callable:
  """The eval step per device (``shard_map``): ``(D,)`` loss and correct sums, one per device of
  ``mesh``, sharded along ``"data"``; no cross-device collective."""
  local_step = _make_eval_step(model, dataset)

  def step(params, batch_stats, images, labels, mask):
    loss, correct = local_step(params, batch_stats, images, labels, mask)
    return loss[None], correct[None]

  data = P("data")
  return jax.jit(
    jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), data, data, data), out_specs=(data, data))
  )


@jax.jit
def _add(a: Any, b: Any) -> Any:
  return jax.tree_util.tree_map(jnp.add, a, b)


def _to_host(tree: Any) -> Any:
  """Host (numpy) copies of the leaves of ``tree``: fully addressable or replicated arrays."""

  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if not x.sharding.is_fully_replicated:
        raise ValueError(
          f"tree: expected replicated or fully addressable arrays, got sharding {x.sharding}"
        )
      x = x.addressable_data(0)
    return np.asarray(x)

  return jax.tree_util.tree_map(get, tree)


def _gather(x: jax.Array) -> np.ndarray:
  """The whole of a global array on every process's host (a collective if it is sharded across
  processes)."""
  if x.is_fully_addressable or x.sharding.is_fully_replicated:
    return _to_host(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _replicate(tree: Any, sharding: NamedSharding) -> Any:
  """Global replicated arrays from host values that are equal on every process."""

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree_util.tree_map(put, tree)


def _broadcast_json(value: Any) -> Any:
  """Process 0's JSON-serialisable ``value`` on every process (``value`` of the others unused)."""
  if jax.process_count() == 1:
    return value
  data = json.dumps(value).encode() if jax.process_index() == 0 else b""
  size = int(multihost_utils.broadcast_one_to_all(np.asarray(len(data), np.int32)))
  buffer = np.zeros(size, np.uint8)
  if jax.process_index() == 0:
    buffer[:] = np.frombuffer(data, np.uint8)
  return json.loads(bytes(multihost_utils.broadcast_one_to_all(buffer)).decode())


def evaluate(
  eval_step: Callable,
  params: Any,
  batch_stats: Any,
  images: np.ndarray,
  labels: np.ndarray,
  batch_size: int,
  sharding: NamedSharding,
  *,
  max_inflight: int = MAX_INFLIGHT,
) -> dict[str, float]:
  """Accuracy and mean cross-entropy over a whole split (``nan`` for an empty split).

  Each process feeds only its rows of every batch (:func:`input_pipeline.process_rows`). The
  sums ``eval_step`` returns (scalars, or one per device as the trainer's ``shard_map`` step) are
  accumulated on the devices, at most ``max_inflight`` batches ahead of the host, and gathered
  once at the end; the per-device float32 sums are added on the host in float64, in device
  order, so the result does not depend on the number of processes.

  Args:
    eval_step: ``(params, batch_stats, images, labels, mask) -> (loss_sum, correct_sum)``.
    params, batch_stats: the model's variables (replicated).
    images, labels: the whole split, ``(N, H, W, C)`` and ``(N,)``, on every process.
    batch_size: global evaluation batch size (a multiple of the device count).
    sharding: the batch sharding.
    max_inflight: positive number of batches dispatched ahead of the host.

  Returns:
    ``{"accuracy": ..., "loss": ...}``.

  Raises:
    ValueError: if ``max_inflight`` is not a positive integer.
  """
  if isinstance(max_inflight, bool) or not isinstance(max_inflight, int) or max_inflight < 1:
    raise ValueError(f"max_inflight: expected a positive integer, got {max_inflight!r}")
  n = int(images.shape[0])
  if n == 0:
    return {"accuracy": float("nan"), "loss": float("nan")}
  rows = input_pipeline.process_rows(sharding, batch_size)
  total = None
  pending = collections.deque()
  for batch in input_pipeline.eval_batches(images, labels, batch_size, rows=rows):
    args = input_pipeline.make_global_batch(sharding, batch, batch_size)
    sums = eval_step(params, batch_stats, *args)
    total = sums if total is None else _add(total, sums)
    pending.append(total)
    if len(pending) > max_inflight:
      jax.block_until_ready(pending.popleft())
  loss_sum, correct_sum = (float(np.sum(_gather(x), dtype=np.float64)) for x in total)
  return {"accuracy": correct_sum / n, "loss": loss_sum / n}


# ----------------------------------------------------------------------------------------------
# Files.


def _truncate_jsonl(path: pathlib.Path, max_step: int, write: bool = True) -> list[dict]:
  """Drops events after ``max_step`` (written before a kill, to be redone); returns the rest
  (``write=False``: only returns them)."""
  records = [r for r in read_jsonl(path) if r.get("step", 0) <= max_step]
  if write and path.exists():
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return records


def _append_jsonl(path: pathlib.Path, record: dict) -> None:
  with path.open("a") as f:
    f.write(json.dumps(record) + "\n")


def _json_default(value: Any) -> Any:
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  return str(value)


def _to_python(x: Any) -> Any:
  return float(x) if isinstance(x, np.floating | float) else x


# ----------------------------------------------------------------------------------------------
# The loop.


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str | os.PathLike,
  *,
  dataset: input_pipeline.Dataset | None = None,
  init_variables: Any = None,
) -> dict[str, Any]:
  """Trains ``config.model`` on ``config.dataset``, resuming from ``workdir`` if possible.

  In a multi-process run (``jax.distributed.initialize`` called first, as
  :mod:`experiments.main` does) every process calls this with the same arguments; ``workdir``
  must be on a file system they share (checkpoints are saved and restored collectively), and
  only process 0 writes the other files.

  Args:
    config: a config from ``experiments/configs`` (fields in
      :func:`experiments.configs.common.base_config`).
    workdir: output directory (created if needed): checkpoints, metrics, summary, plots,
      TensorBoard events.
    dataset: optional pre-loaded :class:`experiments.input_pipeline.Dataset` (tests); by default
      it is loaded from ``config.dataset`` (by process 0 first, then by the others).
    init_variables: optional ``{'params': ..., 'batch_stats': ...}`` to start from instead of the
      model's initialisation (fine-tuning, e.g. a converted network); their shapes must be the
      model's. Ignored when ``workdir`` has a checkpoint to resume from.

  Returns:
    The summary dict written to ``<workdir>/summary.json`` (the same on every process); when the
    run stopped early because of ``config.stop_after_steps``, the summary of the partial run (not
    written).

  Raises:
    ValueError: if ``batch_size`` is not divisible by the device count, or a config field is
      invalid.
    FloatingPointError: if the training loss becomes NaN or inf (the step is named; checkpoints
      written before that step are kept, none is written after it).
  """
  workdir = pathlib.Path(workdir)
  is_main = jax.process_index() == 0
  if is_main:
    workdir.mkdir(parents=True, exist_ok=True)
  if dataset is None:
    if is_main:  # a first read may download or unpack into a shared directory: one at a time
      dataset = load_dataset_from_config(config)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("attnconv: dataset loaded by process 0")
    if not is_main:
      dataset = load_dataset_from_config(config)
  if is_main:
    (workdir / CONFIG_FILE).write_text(
      json.dumps(config.to_dict(), indent=2, default=_json_default) + "\n"
    )

  # --- Devices and mesh. ---------------------------------------------------------------------
  devices = jax.devices()
  num_devices = len(devices)
  batch_size = int(config.batch_size)
  if batch_size % num_devices:
    raise ValueError(
      f"config.batch_size: expected a multiple of the device count {num_devices}, got {batch_size}"
    )
  microbatches = int(config.get("microbatches", 1))
  if microbatches < 1 or batch_size % microbatches:
    raise ValueError(
      f"config.microbatches: expected a positive divisor of config.batch_size={batch_size}, got "
      f"{microbatches}"
    )
  eval_batch_size = int(config.get("eval_batch_size", -1))
  eval_batch_size = batch_size if eval_batch_size <= 0 else eval_batch_size
  if eval_batch_size % num_devices:
    raise ValueError(
      f"config.eval_batch_size: expected a multiple of the device count {num_devices}, got "
      f"{eval_batch_size}"
    )
  mesh = Mesh(np.asarray(devices), ("data",))
  replicated = NamedSharding(mesh, P())
  data_sharding = NamedSharding(mesh, P("data"))
  rows = input_pipeline.process_rows(data_sharding, batch_size)

  # --- Steps, schedule, model, optimizer. -----------------------------------------------------
  per_epoch = input_pipeline.steps_per_epoch(dataset, batch_size)
  total_steps = num_train_steps(config, per_epoch)
  eval_every = int(config.get("eval_every_steps", -1))
  eval_every = per_epoch if eval_every <= 0 else eval_every
  ckpt_every = int(config.get("checkpoint_every_steps", -1))
  ckpt_every = per_epoch if ckpt_every <= 0 else ckpt_every
  log_every = max(1, int(config.get("log_every_steps", 50)))
  stop_after = int(config.get("stop_after_steps", -1))
  schedule = create_learning_rate_schedule(config, per_epoch, total_steps)
  tx = build_optimizer(config, schedule)
  model = _build_model(config, dataset.num_classes)

  # --- Initial state (jitted init, replicated). ----------------------------------------------
  seed = int(config.seed)
  init_key, _ = _keys(config)
  sample = jnp.zeros((1, *dataset.image_shape), jnp.float32)

  def init_fn(given_variables):
    # Every process computes the same initialisation (same keys, same program).
    variables = _initialise_compiled(
      init_key, model, tuple(dataset.image_shape), _conv_init_alpha(config), given_variables
    )
    return initial_state(variables)

  def initial_state(variables):
    zero = jnp.zeros((), jnp.float32)
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=variables["params"],
      batch_stats=variables["batch_stats"],
      opt_state=tx.init(variables["params"]),
      rng=jax.random.key_data(_keys(config)[1]),
      loss_sum=zero,
      correct_sum=zero,
      count=zero,
      nonfinite_step=-jnp.ones((), jnp.int32),
    )

  if init_variables is not None:
    init_variables = _to_host(flax.core.unfreeze(init_variables))
    expected = jax.eval_shape(
      lambda: model.init({"params": init_key, "dropout": init_key}, sample, train=False)
    )
    for collection, tree in init_variables.items():
      want = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), expected.get(collection))
      got = jax.tree_util.tree_map(lambda x: (tuple(x.shape), x.dtype), tree)
      if want != got:
        raise ValueError(
          f"init_variables: expected the model's {collection!r} shapes and dtypes {want}, got {got}"
        )

  abstract = jax.tree_util.tree_map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
    jax.eval_shape(init_fn, init_variables),
  )
  num_params = count_params(abstract.params)

  # --- Checkpoints: resume from the latest. ---------------------------------------------------
  # Orbax names its cross-process barriers after the step directory: the two managers, which
  # may save the same step at once, need distinct prefixes.
  options = ocp.CheckpointManagerOptions(
    max_to_keep=int(config.get("keep_checkpoints", 3)),
    create=True,
    multiprocessing_options=ocp.options.MultiprocessingOptions(
      barrier_sync_key_prefix="checkpoints"
    ),
  )
  manager = ocp.CheckpointManager((workdir / "checkpoints").absolute(), options=options)
  latest = manager.latest_step()
  if latest is None:
    # Initialised once, on one device of each process, then replicated: an init with LAPACK
    # kernels (e.g. the SVDs of a conv-initialisation) run on every CPU device at once can
    # exhaust the shared intra-op thread pool and hang.
    first_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    # The parameters come from `_initialise_compiled` (the key is an argument), compiled once per
    # model and shared with `initial_variables`; the optimizer state is built around them.
    # Its inputs are uncommitted (host values and a key), so it runs on the default device, the
    # first local one.
    variables = _initialise_compiled(
      init_key, model, tuple(dataset.image_shape), _conv_init_alpha(config), init_variables
    )
    fresh = _to_host(jax.jit(initial_state, out_shardings=first_device)(variables))
    if config.get("mimetic_init", False):  # Trockman & Kolter; SVDs of the kernels on the host
      params = _mimetic(config, fresh.params)
      fresh = fresh.replace(params=params, opt_state=_to_host(tx.init(params)))
    state = _replicate(fresh, replicated)
  else:  # No init: restore straight into the (sharded) abstract state.
    state = manager.restore(latest, args=ocp.args.StandardRestore(abstract))
    if is_main:
      print(f"Resumed from {workdir / 'checkpoints'} at step {latest}.", flush=True)
  start_step = int(_to_host(state.step))
  summary_path = workdir / SUMMARY_FILE
  metrics_path = workdir / METRICS_FILE
  centers_path = workdir / CENTERS_FILE

  # Process 0 reads the files; every process takes its decisions from that one view.
  resume = None
  if is_main:
    finished = None
    if start_step >= total_steps and summary_path.exists():
      candidate = json.loads(summary_path.read_text())
      if candidate.get("completed") and candidate.get("steps") == total_steps:
        finished = candidate  # Nothing left to do: keep the finished run's summary as it is.
    history = [] if latest is None else _truncate_jsonl(metrics_path, start_step, write=False)
    resume = {"finished": finished, "history": history}
  resume = _broadcast_json(resume)
  if resume["finished"] is not None:
    manager.close()
    return resume["finished"]
  history = resume["history"]

  # Best-validation weights: one orbax step per improvement, thinned out by hand
  # (_thin_best_checkpoints) only up to a committed training checkpoint, so that a resumed run
  # always finds the best weights of the history it keeps; those saved after the checkpoint it
  # resumes from belong to evaluations that are redone, and go.
  best_dir = (workdir / "best").absolute()
  if is_main:
    _remove_checkpoint_steps(best_dir, lambda s: s > start_step)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("attnconv: stale best checkpoints removed")
  best_options = ocp.CheckpointManagerOptions(
    max_to_keep=None,
    create=True,
    multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix="best"),
  )
  best_manager = ocp.CheckpointManager(best_dir, options=best_options)
  writer = None
  if is_main:
    if latest is None:  # a fresh start: nothing of an earlier attempt is kept
      for path in (metrics_path, centers_path):
        path.unlink(missing_ok=True)
    else:
      _truncate_jsonl(metrics_path, start_step)
      _truncate_jsonl(centers_path, start_step)
    writer = _open_tensorboard(workdir / TENSORBOARD_DIR, history)
  has_centers = bool(find_params(_to_host(state.params), "centers"))
  if is_main and has_centers and start_step == 0:
    _log_centers(centers_path, 0, state.params)

  best = {"val_accuracy": -1.0, "step": -1, "test_accuracy": float("nan")}
  for record in history:
    if "val_accuracy" in record and _better(record["val_accuracy"], best["val_accuracy"]):
      best = {
        "val_accuracy": record["val_accuracy"],
        "step": record["step"],
        "test_accuracy": record.get("test_accuracy", float("nan")),
      }
  train_seconds = float(history[-1].get("train_seconds", 0.0)) if history else 0.0
  # Process CPU time (all threads) over the same intervals as train_seconds. A run resumed from
  # a history without it has no complete CPU count: it stays None rather than undercounting.
  cpu_seconds: float | None = (
    float(history[-1]["cpu_seconds"])
    if history and history[-1].get("cpu_seconds") is not None
    else (None if history else 0.0)
  )

  # --- Jitted steps. --------------------------------------------------------------------------
  train_step = jax.jit(
    _make_train_step(
      model, tx, dataset, microbatches, bool(config.get("unroll_microbatches", False))
    ),
    in_shardings=(replicated, data_sharding, data_sharding),
    out_shardings=(replicated, replicated),
    donate_argnums=0,
  )
  eval_step = _make_sharded_eval_step(model, dataset, mesh)

  def check_finite(upto_step: int) -> None:
    bad = int(_to_host(state.nonfinite_step))
    if bad >= 0:
      raise FloatingPointError(
        f"Training loss is NaN or inf at step {bad} (0-based update index; the last checkpoint "
        f"saved before it is kept in {workdir / 'checkpoints'}). Checked at step {upto_step}."
      )

  def save(step: int) -> None:
    check_finite(step)
    previous = manager.latest_step()
    manager.save(step, args=ocp.args.StandardSave(state))  # commits the previous save first
    if is_main and previous is not None:
      best_manager.wait_until_finished()
      _thin_best_checkpoints(best_dir, previous)

  # --- Loop. ----------------------------------------------------------------------------------
  bar = None
  if is_main and config.get("progress_bar", True):
    import tqdm

    bar = tqdm.tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)
  interval_start = time.perf_counter()
  interval_cpu_start = time.process_time()
  interval_images = 0
  total_images_timed, total_time_timed = 0, 0.0
  last_eval: dict[str, Any] = history[-1] if history else {}
  stopped_early = False
  compile_seconds = 0.0
  step = start_step
  inflight = collections.deque()
  try:
    while step < total_steps:
      if 0 <= stop_after <= step:
        stopped_early = True
        break
      local = input_pipeline.batch_at_step(dataset, step, batch_size, seed=seed, rows=rows)
      images, labels = input_pipeline.make_global_batch(data_sharding, local, batch_size)
      state, loss = train_step(state, images, labels)
      inflight.append(loss)
      if len(inflight) > MAX_INFLIGHT:
        jax.block_until_ready(inflight.popleft())
      step += 1
      interval_images += batch_size
      if step == start_step + 1:
        # Exclude compilation from the throughput (it stays in train_seconds).
        jax.block_until_ready(state)
        now = time.perf_counter()
        compile_seconds = now - interval_start
        train_seconds += compile_seconds
        cpu_now = time.process_time()
        if cpu_seconds is not None:
          cpu_seconds += cpu_now - interval_cpu_start
        interval_start, interval_cpu_start, interval_images = now, cpu_now, 0
      if bar is not None:
        bar.update(1)
      if step % log_every == 0:
        check_finite(step)
        if bar is not None:
          bar.set_postfix(
            loss=f"{float(_to_host(loss)):.4f}", lr=f"{float(schedule(step - 1)):.4g}"
          )
      if step % eval_every == 0 or step == total_steps:
        check_finite(step)
        jax.block_until_ready(state)
        elapsed = time.perf_counter() - interval_start
        train_seconds += elapsed
        if cpu_seconds is not None:
          cpu_seconds += time.process_time() - interval_cpu_start
        total_images_timed += interval_images
        total_time_timed += elapsed
        sums = _to_host((state.loss_sum, state.correct_sum, state.count))
        count = max(float(sums[2]), 1.0)
        val, test = (
          evaluate(
            eval_step,
            state.params,
            state.batch_stats,
            split_images,
            split_labels,
            eval_batch_size,
            data_sharding,
          )
          for split_images, split_labels in (
            (dataset.val_images, dataset.val_labels),
            (dataset.test_images, dataset.test_labels),
          )
        )
        record = {
          "step": step,
          "epoch": step / per_epoch,
          "lr": float(schedule(step - 1)),
          "train_loss": float(sums[0]) / count,
          "train_accuracy": float(sums[1]) / count,
          "val_loss": val["loss"],
          "val_accuracy": val["accuracy"],
          "test_loss": test["loss"],
          "test_accuracy": test["accuracy"],
          "images_per_second": interval_images / elapsed if interval_images else None,
          "train_seconds": train_seconds,
          "cpu_seconds": cpu_seconds,
        }
        last_eval = record
        if is_main:
          _append_jsonl(metrics_path, record)
          _write_tensorboard(writer, record)
          if has_centers:
            _log_centers(centers_path, step, state.params)
        if _better(val["accuracy"], best["val_accuracy"]):
          best = {"val_accuracy": val["accuracy"], "step": step, "test_accuracy": test["accuracy"]}
          best_manager.save(
            step,
            args=ocp.args.StandardSave({"params": state.params, "batch_stats": state.batch_stats}),
            force=True,
          )
        if bar is not None:
          bar.write(
            f"step {step} epoch {record['epoch']:.2f}: train_loss {record['train_loss']:.4f} "
            f"train_acc {record['train_accuracy']:.4f} val_acc {val['accuracy']:.4f} "
            f"test_acc {test['accuracy']:.4f}"
          )
        # Three distinct buffers: the whole state is donated to the next step.
        zeros = [_replicate(np.zeros((), np.float32), replicated) for _ in range(3)]
        state = state.replace(loss_sum=zeros[0], correct_sum=zeros[1], count=zeros[2])
        interval_start = time.perf_counter()
        interval_cpu_start = time.process_time()
        interval_images = 0
      if step % ckpt_every == 0 or step == total_steps:
        save(step)
  finally:
    if bar is not None:
      bar.close()
    if writer is not None:
      writer.close()
  manager.wait_until_finished()
  best_manager.wait_until_finished()
  if is_main and manager.latest_step() is not None:
    _thin_best_checkpoints(best_dir, manager.latest_step())

  summary = {
    "num_params": num_params,
    "best_val_accuracy": best["val_accuracy"] if best["step"] >= 0 else None,
    "best_val_step": best["step"] if best["step"] >= 0 else None,
    "final_test_accuracy": best["test_accuracy"] if best["step"] >= 0 else None,
    "final_test_accuracy_note": (
      "test accuracy of the evaluation with the best validation accuracy (model selected on "
      "validation, never on test)"
    ),
    "last_val_accuracy": last_eval.get("val_accuracy"),
    "last_test_accuracy": last_eval.get("test_accuracy"),
    "last_train_loss": last_eval.get("train_loss"),
    "train_seconds": train_seconds,
    "cpu_seconds": cpu_seconds,
    "compile_seconds": compile_seconds,
    "images_per_second": (total_images_timed / total_time_timed if total_time_timed > 0 else None),
    "devices": {"count": num_devices, "kinds": sorted({d.device_kind for d in devices})},
    "processes": jax.process_count(),
    "platform": devices[0].platform,
    "steps": step,
    "epochs": step / per_epoch,
    "steps_per_epoch": per_epoch,
    "batch_size": batch_size,
    "num_train_examples": int(dataset.num_train),
    "completed": not stopped_early,
  }
  summary = _broadcast_json(summary)  # process 0's timings on every process
  if stopped_early or not is_main:
    manager.close()
    best_manager.close()
    return summary
  (workdir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=_json_default) + "\n")
  if config.get("plot", True):
    try:
      from experiments import plots

      host_state = types.SimpleNamespace(
        params=_to_host(state.params), batch_stats=_to_host(state.batch_stats)
      )
      plots.plot_workdir(workdir, model=model, state=host_state, dataset=dataset)
    except Exception as e:  # plots must never lose a finished run
      print(f"Plotting failed: {type(e).__name__}: {e}", flush=True)
  manager.close()
  best_manager.close()
  return summary


def _open_tensorboard(logdir: pathlib.Path, history: list[dict]):
  """A ``tensorboardX.SummaryWriter`` on ``logdir`` holding exactly ``history``: earlier event
  files are replaced by the records of ``metrics.jsonl`` kept at this (re)start, so no step is
  logged twice after a resume."""
  from tensorboardX import SummaryWriter

  if logdir.exists():
    for path in logdir.glob("events.out.tfevents.*"):
      path.unlink()
  writer = SummaryWriter(logdir=str(logdir), flush_secs=30)
  for record in history:
    _write_tensorboard(writer, record, flush=False)
  writer.flush()
  return writer


def _write_tensorboard(writer, record: dict, flush: bool = True) -> None:
  """One evaluation's scalars (:data:`TENSORBOARD_TAGS`) at its step."""
  for key, tag in TENSORBOARD_TAGS.items():
    value = record.get(key)
    if value is not None:
      writer.add_scalar(tag, float(value), global_step=int(record["step"]))
  if flush:
    writer.flush()


def _checkpoint_steps(directory: pathlib.Path) -> list[int]:
  """Steps of the committed orbax checkpoints in ``directory`` (integer-named folders)."""
  if not directory.exists():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def _remove_checkpoint_steps(directory: pathlib.Path, condition: Callable[[int], bool]) -> None:
  for step in _checkpoint_steps(directory):
    if condition(step):
      shutil.rmtree(directory / str(step))


def _thin_best_checkpoints(directory: pathlib.Path, upto: int) -> None:
  """Keeps the newest best-validation checkpoint at or before step ``upto`` (a committed
  training checkpoint) and every later one; removes the older ones."""
  kept = [s for s in _checkpoint_steps(directory) if s <= upto]
  _remove_checkpoint_steps(directory, lambda s: s in kept[:-1])


def _better(value: float, best: float) -> bool:
  return value is not None and not math.isnan(value) and value > best


def _log_centers(path: pathlib.Path, step: int, params: Any) -> None:
  """Appends the quadratic layers' centres ``(H, d)`` and sharpness ``alpha`` ``(H,)`` (the
  ``alpha`` parameter, or ``spreads^2 / 2``), keyed by layer path."""
  params = _to_host(params)
  centers = find_params(params, "centers")
  alpha = find_params(params, "alpha")
  alpha.update({k: 0.5 * v**2 for k, v in find_params(params, "spreads").items() if v.ndim == 1})
  record = {"step": step, "centers": {k: v.tolist() for k, v in centers.items()}}
  record["alpha"] = {k: v.tolist() for k, v in alpha.items()}
  _append_jsonl(path, record)
