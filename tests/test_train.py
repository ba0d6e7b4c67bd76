"""End-to-end tests of experiments/train.py on a tiny synthetic dataset (4 fake CPU devices)."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from experiments import train as train_lib
from experiments.configs import common
from experiments.input_pipeline import Dataset
from tests.synthetic import synthetic_dataset


def _synthetic_dataset(hw: int = 8, channels: int = 1) -> Dataset:
  """4 classes told apart by brightness; 64 train, 16 val, 20 test images."""
  return synthetic_dataset(64, 16, 20, hw=hw, channels=channels)


def _config(**overrides):
  config = common.base_config()
  config.model.name = "small_cnn"
  config.model.features = (4, 8)
  config.batch_size = 8
  config.num_train_steps = 12
  config.eval_every_steps = 4
  config.checkpoint_every_steps = 4
  config.keep_checkpoints = 5
  config.progress_bar = False
  config.plot = False
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


@pytest.fixture(scope="module")
def dataset():
  return _synthetic_dataset()


def _restore_latest(workdir: pathlib.Path):
  with ocp.CheckpointManager((workdir / "checkpoints").absolute()) as manager:
    step = manager.latest_step()
    return step, manager.restore(step, args=ocp.args.StandardRestore())


def test_devices_are_faked():
  assert len(jax.devices()) == 4


def test_end_to_end_and_resume_is_bitwise(tmp_path, dataset):
  """Uninterrupted run vs. a run 'killed' at step 7 (last checkpoint: 4) and re-run."""
  full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
  full = train_lib.train_and_evaluate(_config(plot=True), full_dir, dataset=dataset)

  # Files of a finished run.
  for name in ("config.json", "metrics.jsonl", "summary.json", "plots/accuracy.png"):
    assert (full_dir / name).exists(), name
  records = [json.loads(line) for line in (full_dir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [4, 8, 12]
  for key in (
    "step",
    "epoch",
    "lr",
    "train_loss",
    "train_accuracy",
    "val_accuracy",
    "test_accuracy",
    "images_per_second",
    "train_seconds",
    "cpu_seconds",
  ):
    assert key in records[0], key
  # Wall and CPU time accumulate over the run; the summary carries the last record's.
  for timer in ("train_seconds", "cpu_seconds"):
    values = [r[timer] for r in records]
    assert 0.0 < values[0] <= values[1] <= values[2], (timer, values)
  summary = json.loads((full_dir / "summary.json").read_text())
  assert summary == json.loads(json.dumps(full))
  assert summary["steps"] == 12 and summary["epochs"] == 1.5
  assert summary["cpu_seconds"] == records[-1]["cpu_seconds"]
  assert summary["devices"]["count"] == 4
  best = max(records, key=lambda r: r["val_accuracy"])  # first max, as the trainer
  assert summary["best_val_accuracy"] == best["val_accuracy"]
  assert summary["final_test_accuracy"] == best["test_accuracy"]
  assert summary["last_test_accuracy"] == records[-1]["test_accuracy"]
  assert json.loads((full_dir / "config.json").read_text())["batch_size"] == 8

  # On-demand evaluation of the saved checkpoints reproduces the logged accuracies.
  from experiments.evaluate import evaluate_workdir

  latest = evaluate_workdir(full_dir, which="latest", plot=False, dataset=dataset)
  assert latest["step"] == 12
  assert latest["test_accuracy"] == records[-1]["test_accuracy"]
  best_eval = evaluate_workdir(full_dir, which="best", plot=False, dataset=dataset)
  assert best_eval["step"] == best["step"]
  assert best_eval["val_accuracy"] == best["val_accuracy"]
  assert best_eval["test_accuracy"] == summary["final_test_accuracy"]

  # Kill after 7 steps (no checkpoint at the kill), then run the same command again.
  partial = train_lib.train_and_evaluate(_config(stop_after_steps=7), resumed_dir, dataset=dataset)
  assert partial["completed"] is False and partial["steps"] == 7
  assert not (resumed_dir / "summary.json").exists()
  assert _restore_latest(resumed_dir)[0] == 4
  resumed = train_lib.train_and_evaluate(_config(), resumed_dir, dataset=dataset)

  step_full, state_full = _restore_latest(full_dir)
  step_res, state_res = _restore_latest(resumed_dir)
  assert step_full == step_res == 12
  for a, b in zip(jax.tree_util.tree_leaves(state_full), jax.tree_util.tree_leaves(state_res)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  resumed_records = [
    json.loads(line) for line in (resumed_dir / "metrics.jsonl").read_text().splitlines()
  ]
  assert [r["step"] for r in resumed_records] == [4, 8, 12]
  for r_full, r_res in zip(records, resumed_records):
    for key in ("train_loss", "train_accuracy", "val_accuracy", "test_accuracy", "lr"):
      assert r_full[key] == r_res[key], key
  for key in ("best_val_accuracy", "final_test_accuracy", "last_test_accuracy", "steps"):
    assert full[key] == resumed[key], key
  # The resumed run's CPU time continues from the record it resumed after (step 4).
  assert resumed_records[1]["cpu_seconds"] > resumed_records[0]["cpu_seconds"] > 0.0
  assert resumed["cpu_seconds"] == resumed_records[-1]["cpu_seconds"]

  # Re-running a finished run changes nothing.
  again = train_lib.train_and_evaluate(_config(), resumed_dir, dataset=dataset)
  assert again["steps"] == 12 and again["final_test_accuracy"] == full["final_test_accuracy"]
  assert len((resumed_dir / "metrics.jsonl").read_text().splitlines()) == 3


def test_batch_size_not_divisible_by_devices(tmp_path, dataset):
  with pytest.raises(ValueError, match="batch_size.*multiple of the device count 4.*got 6"):
    train_lib.train_and_evaluate(_config(batch_size=6), tmp_path, dataset=dataset)


def test_nan_loss_raises_and_keeps_last_good_checkpoint(tmp_path, dataset):
  config = _config(learning_rate=1e30, schedule="constant", num_train_steps=12, log_every_steps=1)
  with pytest.raises(FloatingPointError, match=r"NaN or inf at step \d+"):
    train_lib.train_and_evaluate(config, tmp_path, dataset=dataset)
  with ocp.CheckpointManager((tmp_path / "checkpoints").absolute()) as manager:
    steps = manager.all_steps()
    for step in steps:
      state = manager.restore(step, args=ocp.args.StandardRestore())
      assert int(state["nonfinite_step"]) == -1
      for leaf in jax.tree_util.tree_leaves(state["params"]):
        assert np.isfinite(np.asarray(leaf)).all()


def test_learning_rate_schedules():
  config = _config(schedule="warmup_cosine", learning_rate=0.1, warmup_ratio=0.05)
  sched = train_lib.create_learning_rate_schedule(config, steps_per_epoch=10, total_steps=200)
  assert float(sched(0)) == 0.0
  np.testing.assert_allclose(float(sched(10)), 0.1, rtol=1e-6)
  np.testing.assert_allclose(float(sched(5)), 0.05, rtol=1e-6)
  np.testing.assert_allclose(float(sched(105)), 0.05, rtol=1e-5)
  assert abs(float(sched(200))) < 1e-9
  config = _config(schedule="step", decay_epochs=(2, 4), decay_factor=10.0)
  sched = train_lib.create_learning_rate_schedule(config, steps_per_epoch=10, total_steps=60)
  np.testing.assert_allclose(
    [float(sched(s)) for s in (0, 19, 20, 39, 40)], [0.1, 0.1, 0.01, 0.01, 0.001], rtol=1e-6
  )
  with pytest.raises(ValueError, match="config.schedule"):
    train_lib.create_learning_rate_schedule(_config(schedule="bad"), 10, 100)


def test_weight_decay_skips_centers_and_spreads():
  params = {
    "block_0": {
      "attention": {
        "centers": jnp.ones((2, 2)),
        "spreads": jnp.ones((2,)),
        "kernel": jnp.ones((3,)),
      }
    },
    "classifier": {"kernel": jnp.ones((3,)), "bias": jnp.ones((3,))},
  }
  mask = train_lib.weight_decay_mask(params)
  assert mask["block_0"]["attention"] == {"centers": False, "spreads": False, "kernel": True}
  assert mask["classifier"] == {"kernel": True, "bias": True}
  # Coupled L2 (PyTorch SGD): with zero gradients the update is -lr * wd * param.
  config = _config(weight_decay=0.5, momentum=0.9, learning_rate=0.1)
  tx = train_lib.build_optimizer(config, optax.constant_schedule(0.1))
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_allclose(updates["classifier"]["kernel"], -0.05)
  np.testing.assert_allclose(updates["block_0"]["attention"]["centers"], 0.0)
  np.testing.assert_allclose(updates["block_0"]["attention"]["spreads"], 0.0)


def test_bfloat16_compute_keeps_float32_params(tmp_path, dataset):
  train_lib.train_and_evaluate(
    _config(dtype="bfloat16", num_train_steps=2, eval_every_steps=2, checkpoint_every_steps=2),
    tmp_path,
    dataset=dataset,
  )
  _, state = _restore_latest(tmp_path)
  for leaf in jax.tree_util.tree_leaves(state["params"]):
    assert leaf.dtype == np.float32


def test_attention_net_smoke(tmp_path):
  """One step of a tiny quadratic attention net: centres logged, attention plots drawn."""
  dataset = _synthetic_dataset(hw=8, channels=3)
  config = _config(
    num_train_steps=1,
    eval_every_steps=1,
    checkpoint_every_steps=1,
    schedule="warmup_cosine",
    plot=True,
  )
  config.model = {
    "name": "attention_net",
    "num_layers": 1,
    "num_heads": 4,
    "hidden_size": 16,
    "mlp_dim": 16,
    "encoding": "quadratic",
  }
  summary = train_lib.train_and_evaluate(config, tmp_path, dataset=dataset)
  assert summary["steps"] == 1
  centers = [json.loads(line) for line in (tmp_path / "centers.jsonl").read_text().splitlines()]
  assert [r["step"] for r in centers] == [0, 1]
  (layer,) = centers[0]["centers"]
  assert np.asarray(centers[0]["centers"][layer]).shape == (4, 2)
  # alpha = spreads^2 / 2 per head, logged next to the centres
  assert list(centers[0]["alpha"]) == [layer]
  alpha = np.asarray(centers[0]["alpha"][layer])
  assert alpha.shape == (4,) and np.all(alpha > 0)
  for name in ("accuracy.png", "centers.png", "attention_contours.png", "attention_maps.png"):
    assert (tmp_path / "plots" / name).exists(), name
  # Centres and spreads are excluded from weight decay but still trained (lr > 0 at step 0?
  # warm-up starts at 0, so only check that they are present and finite).
  _, state = _restore_latest(tmp_path)
  found = train_lib.find_params(state["params"], "spreads")
  assert found and all(np.isfinite(v).all() for v in found.values())
  (spreads,) = found.values()
  np.testing.assert_allclose(centers[-1]["alpha"][layer], 0.5 * spreads**2, rtol=1e-6)


@pytest.mark.parametrize("microbatches, unroll", [(2, False), (4, False), (4, True)])
def test_accumulated_gradient_equals_full_batch_gradient(microbatches, unroll):
  """Without random draws the mean of slice gradients is the full-batch gradient (float32
  rounding of a different summation order: tolerance a few eps of the gradient scale)."""
  k0, k1, k2 = jax.random.split(jax.random.key(0), 3)
  params = {"w": jax.random.normal(k0, (5, 3)), "b": jnp.zeros((3,))}
  x = jax.random.normal(k1, (8, 5))
  y = jax.random.randint(k2, (8,), 0, 3)

  def loss_fn(p, carry, x, y, key):
    del key
    logits = x @ p["w"] + p["b"][None]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), (logits, carry)

  (loss, (logits, carry)), grads = train_lib.accumulated_value_and_grad(
    loss_fn, params, {"count": jnp.zeros(())}, (x, y), jax.random.key(3), microbatches, unroll
  )
  (want_loss, (want_logits, _)), want = jax.value_and_grad(loss_fn, has_aux=True)(
    params, None, x, y, None
  )
  tol = 8 * float(jnp.finfo(jnp.float32).eps)
  np.testing.assert_allclose(loss, want_loss, rtol=tol)
  # the same row-wise products; the matmul kernel may differ with the row count (k = 5 terms)
  bound = 6 * float(jnp.finfo(jnp.float32).eps) * (jnp.abs(x) @ jnp.abs(params["w"]))
  assert np.all(np.abs(logits - want_logits) <= bound)
  for name in params:
    scale = float(jnp.max(jnp.abs(want[name]))) + 1e-30
    np.testing.assert_allclose(grads[name], want[name], rtol=0, atol=tol * scale)
  assert set(carry) == {"count"}


def test_microbatches_must_divide_the_batch(tmp_path, dataset):
  with pytest.raises(ValueError, match="config.microbatches: expected a positive divisor"):
    train_lib.train_and_evaluate(_config(microbatches=3), tmp_path, dataset=dataset)


@pytest.mark.parametrize("unroll", [False, True])
def test_training_with_microbatches_runs(tmp_path, dataset, unroll):
  config = _config(microbatches=2, unroll_microbatches=unroll)
  summary = train_lib.train_and_evaluate(config, tmp_path, dataset=dataset)
  assert summary["steps"] == 12 and np.isfinite(summary["final_test_accuracy"])


def test_vit_with_mimetic_init_trains_and_starts_from_the_mimetic_kernels(tmp_path):
  """``config.mimetic_init=True``: the stored step-0 parameters are those of
  ``mimetic_init`` applied to the model's initialisation (query/key products near the target)."""
  dataset = _synthetic_dataset(hw=8, channels=1)
  config = _config(num_train_steps=1, eval_every_steps=1, checkpoint_every_steps=1)
  config.model = {"name": "vit", "patch_size": 2, "hidden_size": 16, "num_layers": 1}
  config.mimetic_init = True
  config.learning_rate = 0.0  # keep the step-1 parameters equal to the initial ones
  summary = train_lib.train_and_evaluate(config, tmp_path, dataset=dataset)
  assert summary["steps"] == 1
  _, state = _restore_latest(tmp_path)
  attention = state["params"]["block_0"]["attention"]
  wq, wk = np.asarray(attention["query"]["kernel"]), np.asarray(attention["key"]["kernel"])
  qk = np.einsum("chd,ehd->hce", wq, wk)  # per head W_q W_k^T, (H, C, C)
  # the best rank-4 approximation of 0.7 Z + 0.7 I (C = 16): about 4 / 16 of the identity's
  # trace on the diagonal, against a mean diagonal near 0 for the default initialisation
  assert np.mean(np.diagonal(qk, axis1=1, axis2=2)) > 0.1
  config.mimetic_init = False
  plain = train_lib.train_and_evaluate(config, tmp_path / "plain", dataset=dataset)
  assert plain["steps"] == 1
  _, plain_state = _restore_latest(tmp_path / "plain")
  pq = plain_state["params"]["block_0"]["attention"]["query"]["kernel"]
  assert not np.allclose(np.asarray(pq), wq)


def test_resume_drops_best_checkpoints_saved_after_the_last_checkpoint(tmp_path, dataset):
  """Evaluations every 2 steps, checkpoints every 4, stopped after 7: a best-validation
  checkpoint of step 6 (made certain here by a copy) belongs to an evaluation that the resumed
  run redoes; it is removed at the restart, the best weights up to step 4 are kept, and the
  newest best checkpoint at the end is the summary's best step."""
  import shutil

  config = _config(eval_every_steps=2, stop_after_steps=7)
  train_lib.train_and_evaluate(config, tmp_path, dataset=dataset)
  best_dir = tmp_path / "best"
  steps = sorted(int(p.name) for p in best_dir.iterdir() if p.name.isdigit())
  assert steps and max(steps) <= 6
  if 6 not in steps:
    shutil.copytree(best_dir / str(max(steps)), best_dir / "6")
  config.stop_after_steps = -1
  summary = train_lib.train_and_evaluate(config, tmp_path, dataset=dataset)
  assert summary["completed"] is True
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [2, 4, 6, 8, 10, 12]
  best = max(records, key=lambda r: r["val_accuracy"])
  assert summary["best_val_step"] == best["step"]
  with ocp.CheckpointManager(best_dir.absolute()) as manager:
    assert manager.latest_step() == best["step"]


def test_resume_from_a_history_without_cpu_time_reports_none(tmp_path, dataset):
  """A run whose logged history has no ``cpu_seconds`` cannot know the CPU time spent before
  the resume: the resumed run reports None instead of the (smaller) time since the restart."""
  train_lib.train_and_evaluate(_config(stop_after_steps=7), tmp_path, dataset=dataset)
  metrics = tmp_path / "metrics.jsonl"
  records = [json.loads(line) for line in metrics.read_text().splitlines()]
  assert [r["step"] for r in records] == [4] and records[0]["cpu_seconds"] > 0.0
  del records[0]["cpu_seconds"]
  metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
  summary = train_lib.train_and_evaluate(_config(), tmp_path, dataset=dataset)
  assert summary["steps"] == 12 and summary["cpu_seconds"] is None
  resumed = [json.loads(line) for line in metrics.read_text().splitlines()]
  assert [r.get("cpu_seconds") for r in resumed] == [None, None, None]
