"""Multi-process training on JAX's distributed runtime (gloo collectives on CPU), the bounded
dispatch that keeps more devices than cores from starving collective rendezvous, and the
TensorBoard event files.

The multi-process runs are subprocesses on 127.0.0.1 that run this file as a worker (``python
tests/test_distributed.py '<json>'``): ``experiments.train.initialize_distributed`` then
``train_and_evaluate`` on a tiny synthetic dataset with the quick config shrunk further (one
quadratic-attention block, 8 steps). They share a persistent compilation cache.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
METRIC_KEYS = (
  "step",
  "epoch",
  "lr",
  "train_loss",
  "train_accuracy",
  "val_loss",
  "val_accuracy",
  "test_loss",
  "test_accuracy",
)
STEPS = 8
EVAL_STEPS = [4, 8]


def _synthetic_dataset():
  """4 classes, 8x8x1 images, 64 train, 24 val, 20 test (the last evaluation batch of 8 is
  padded, unevenly across processes); random crops and flips on."""
  from tests.synthetic import synthetic_dataset

  return synthetic_dataset(64, 24, 20)


def _tiny_config(**overrides):
  """``quick.py:smoke`` shrunk: one block of 4 quadratic heads on 4x4 tokens, dropout on (its
  keys must not depend on the process layout either), 8 steps of batch 8."""
  from experiments.configs import quick

  config = quick.get_config("smoke")
  config.model.num_layers = 1
  config.model.num_heads = 4
  config.model.hidden_size = 16
  config.model.mlp_dim = 16
  config.model.downsample = 2
  config.model.dropout_rate = 0.1
  config.batch_size = 8
  config.num_train_steps = STEPS
  config.eval_every_steps = 4
  config.checkpoint_every_steps = 4
  config.keep_checkpoints = 5
  config.log_every_steps = 1
  config.plot = False
  config.progress_bar = True
  for key, value in overrides.items():
    config[key] = value
  return config


def _worker(spec: dict) -> None:
  """One process of a run: ``spec`` holds the coordinator, the process index and count, the
  workdir and config overrides."""
  from experiments import train as train_lib

  train_lib.initialize_distributed(
    spec["coordinator_address"], spec["num_processes"], spec["process_id"]
  )
  import jax

  assert jax.process_count() == spec["num_processes"]
  summary = train_lib.train_and_evaluate(
    _tiny_config(**spec["overrides"]), spec["workdir"], dataset=_synthetic_dataset()
  )
  print("SUMMARY " + json.dumps(summary), flush=True)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _gloo_unavailable() -> str | None:
  from jax._src.lib import _jax

  if not hasattr(_jax, "make_gloo_tcp_collectives"):
    return "this jaxlib has no gloo CPU collectives (make_gloo_tcp_collectives)"
  return None


def _launch(workdir, num_processes, devices_per_process, cache_dir, timeout=240, **overrides):
  """Runs the worker as ``num_processes`` processes of ``devices_per_process`` CPU devices each;
  returns their (stdout, stderr), process 0 first."""
  reason = _gloo_unavailable()
  if reason:
    pytest.skip(reason)
  env = dict(os.environ)
  env.update(
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
    JAX_PLATFORMS="cpu",
    PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
    JAX_COMPILATION_CACHE_DIR=str(cache_dir),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
  )
  address = f"127.0.0.1:{_free_port()}"
  procs = []
  for i in range(num_processes):
    spec = {
      "coordinator_address": address,
      "num_processes": num_processes,
      "process_id": i,
      "workdir": str(workdir),
      "overrides": overrides,
    }
    procs.append(
      subprocess.Popen(
        [sys.executable, __file__, json.dumps(spec)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
      )
    )
  outputs = []
  deadline = time.monotonic() + timeout
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic())))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  for i, (p, (out, err)) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{out[-3000:]}\n{err[-6000:]}"
  return outputs


def _summary(stdout: str) -> dict:
  (line,) = [x for x in stdout.splitlines() if x.startswith("SUMMARY ")]
  return json.loads(line[len("SUMMARY ") :])


def _records(workdir: pathlib.Path, name: str = "metrics.jsonl") -> list[dict]:
  return [json.loads(line) for line in (workdir / name).read_text().splitlines()]


def _restore(workdir: pathlib.Path, step: int):
  """Checkpoint ``step`` of ``workdir``, restored onto this process's first device (it was saved
  on 4 devices of 1 or 2 processes)."""
  import jax
  import orbax.checkpoint as ocp

  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  path = (workdir / "checkpoints").absolute()
  with ocp.CheckpointManager(path, item_handlers=ocp.StandardCheckpointHandler()) as manager:
    assert step in manager.all_steps(), (workdir, step, manager.all_steps())
    target = jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
      manager.item_metadata(step),
    )
    return manager.restore(step, args=ocp.args.StandardRestore(target))


def _assert_same_state(dir_a: pathlib.Path, dir_b: pathlib.Path, step: int) -> None:
  import jax

  leaves_a = jax.tree_util.tree_leaves_with_path(_restore(dir_a, step))
  leaves_b = jax.tree_util.tree_leaves_with_path(_restore(dir_b, step))
  assert [p for p, _ in leaves_a] == [p for p, _ in leaves_b]
  for (path, a), (_, b) in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


def _assert_same_metrics(records_a: list[dict], records_b: list[dict]) -> None:
  assert [r["step"] for r in records_a] == [r["step"] for r in records_b]
  for r1, r2 in zip(records_a, records_b):
    for key in METRIC_KEYS:
      assert r1[key] == r2[key], (r1["step"], key)


def read_tensorboard_scalars(logdir: pathlib.Path) -> dict[str, list[tuple[int, float]]]:
  """``{tag: [(step, value), ...]}`` of every scalar in the event files of ``logdir``, read with
  ``tensorboardX``'s protos (TFRecord framing: length, masked CRC32C of it, data, masked CRC32C of
  it; both CRCs checked)."""
  from tensorboardX.crc32c import crc32c
  from tensorboardX.proto.event_pb2 import Event

  def masked(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

  scalars: dict[str, list[tuple[int, float]]] = {}
  for path in sorted(logdir.glob("events.out.tfevents.*")):
    data, offset = path.read_bytes(), 0
    while offset < len(data):
      header = data[offset : offset + 8]
      (length,) = struct.unpack("<Q", header)
      (length_crc,) = struct.unpack("<I", data[offset + 8 : offset + 12])
      assert length_crc == masked(header), path
      body = data[offset + 12 : offset + 12 + length]
      (body_crc,) = struct.unpack("<I", data[offset + 12 + length : offset + 16 + length])
      assert body_crc == masked(body), path
      offset += 16 + length
      event = Event.FromString(body)
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((int(event.step), float(value.simple_value)))
  return scalars


def _assert_tensorboard_matches(workdir: pathlib.Path) -> None:
  """Every scalar of metrics.jsonl is in the event files, once, at its step (float32)."""
  from experiments import train as train_lib

  records = _records(workdir)
  scalars = read_tensorboard_scalars(workdir / train_lib.TENSORBOARD_DIR)
  assert set(scalars) == set(train_lib.TENSORBOARD_TAGS.values())
  for key, tag in train_lib.TENSORBOARD_TAGS.items():
    want = [(r["step"], float(np.float32(r[key]))) for r in records if r.get(key) is not None]
    assert scalars[tag] == want, tag


# ----------------------------------------------------------------------------------------------
# Sharded batches.


def test_process_rows_and_global_batch_reassemble_the_batch():
  import jax
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  from experiments import input_pipeline

  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  sharding = NamedSharding(mesh, P("data"))
  rows = input_pipeline.process_rows(sharding, 8)
  np.testing.assert_array_equal(rows, np.arange(8))  # one process holds every row
  dataset = _synthetic_dataset()
  full = input_pipeline.batch_at_step(dataset, 3, 8, seed=1)
  part = input_pipeline.batch_at_step(dataset, 3, 8, seed=1, rows=np.array([1, 5, 6]))
  np.testing.assert_array_equal(part[0], full[0][[1, 5, 6]])
  images, labels = input_pipeline.make_global_batch(sharding, full, 8)
  assert images.sharding == sharding and images.shape == (8, 8, 8, 1)
  np.testing.assert_array_equal(np.asarray(labels), full[1])
  with pytest.raises(ValueError, match=r"local\[0\]: expected this process's 8 rows.*got shape"):
    input_pipeline.make_global_batch(sharding, (full[0][:4],), 8)
  with pytest.raises(ValueError, match=r"rows: expected positions in \[0, 8\), got"):
    input_pipeline.batch_at_step(dataset, 3, 8, seed=1, rows=np.array([0, 8]))
  with pytest.raises(ValueError, match="batch_size: expected a positive integer, got 0"):
    input_pipeline.process_rows(sharding, 0)


def test_eval_batches_rows_are_the_rows_of_the_padded_batches():
  from experiments import input_pipeline

  images = np.arange(10 * 2).reshape(10, 2, 1, 1).astype(np.uint8)
  labels = np.arange(10, dtype=np.int32)
  rows = np.array([2, 3])
  whole = list(input_pipeline.eval_batches(images, labels, 4))
  parts = list(input_pipeline.eval_batches(images, labels, 4, rows=rows))
  assert len(whole) == len(parts) == 3
  for (wi, wl, wm), (pi, pl, pm) in zip(whole, parts):
    np.testing.assert_array_equal(pi, wi[rows])
    np.testing.assert_array_equal(pl, wl[rows])
    np.testing.assert_array_equal(pm, wm[rows])
  assert parts[-1][2].tolist() == [False, False]  # rows 10 and 11 are padding


# ----------------------------------------------------------------------------------------------
# Command-line flags.


@pytest.mark.parametrize(
  "kwargs, message",
  [
    ({"coordinator_address": "127.0.0.1:1234"}, "num_processes: expected a value"),
    ({"num_processes": 2, "process_id": 0}, "coordinator_address: expected a value"),
    (
      {"coordinator_address": "127.0.0.1", "num_processes": 2, "process_id": 0},
      "coordinator_address: expected 'HOST:PORT', got '127.0.0.1'",
    ),
    (
      {"coordinator_address": "h:1", "num_processes": 0, "process_id": 0},
      "num_processes: expected an integer >= 1, got 0",
    ),
    (
      {"coordinator_address": "h:1", "num_processes": 2, "process_id": 2},
      r"process_id: expected an integer in \[0, 2\), got 2",
    ),
  ],
)
def test_initialize_distributed_rejects_bad_flags(kwargs, message):
  from experiments.train import initialize_distributed

  with pytest.raises(ValueError, match=message):
    initialize_distributed(**kwargs)


def test_initialize_distributed_without_flags_is_a_single_process_run():
  from experiments.train import initialize_distributed

  assert initialize_distributed() is False


# ----------------------------------------------------------------------------------------------
# More devices than cores.


def test_smoke_config_with_four_devices_on_few_cores(tmp_path):
  """``quick.py:smoke`` (shortened) in one process with 4 CPU devices, on a machine with fewer
  cores: executions with collectives queued without bound starve each other's rendezvous (XLA
  aborts after 40 s), so the host keeps at most ``MAX_INFLIGHT`` of them in flight, and the
  evaluation (105 batches here) has no collective but one final gather."""
  from experiments import input_pipeline

  try:
    input_pipeline.find_fashion_mnist_dir()
  except FileNotFoundError as e:
    pytest.skip(f"Fashion-MNIST IDX files absent: {e}")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  command = [
    sys.executable,
    "-m",
    "experiments.main",
    "--config=experiments/configs/quick.py:smoke",
    f"--workdir={tmp_path}",
    "--config.num_train_steps=3",
    "--config.eval_every_steps=3",
    "--config.checkpoint_every_steps=3",
    "--config.plot=False",
    "--config.progress_bar=False",
  ]
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-6000:]
  records = _records(tmp_path)
  assert [r["step"] for r in records] == [3]
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["devices"]["count"] == 4 and summary["completed"] is True


# ----------------------------------------------------------------------------------------------
# Multi-process runs.


def test_two_processes_match_one_process_write_once_and_resume(tmp_path):
  """Three runs of the tiny config (8 steps; evaluations and checkpoints at 4 and 8): 1 process x
  4 CPU devices, uninterrupted; 2 processes x 2 CPU devices stopped after 6 steps (so its last
  checkpoint is step 4 and the step-4 evaluation is on file), then the same 2 x 2 command again.
  One test, so that pytest-xdist never launches them twice.

  (a) Up to the stop, 2 x 2 gives the metrics (step 4) and the checkpoint (step 4) of 1 x 4,
  bitwise, and the restarted 2 x 2 run ends with the metrics and final state of 1 x 4, bitwise.
  Why bitwise holds: the global batch of a step is a function of (seed, step) only, and device d
  of the 4-device mesh (``jax.devices()``, ordered by process) gets the same rows of it in both
  layouts; augmentation and dropout are drawn in the jitted step from the global shape
  (partitionable threefry), so each example's draw depends on its global position; every device
  runs the same SPMD program on the same data; the loss and gradient all-reduces run over the
  same 4 gloo ranks with the same ring algorithm, hence the same float32 summation order;
  evaluation sums are per device (no collective), gathered exactly and added on the host in
  float64 in device order. The 1-process reference runs on the same runtime
  (``jax.distributed`` with one process, gloo). The plain single-process runtime (no
  ``jax.distributed``) reduces across devices with XLA's in-process communicator, which adds the
  4 partial sums in rank order where gloo's ring starts each chunk at another rank: two orders
  of 4 float32 terms x_d differ by at most 2 * gamma_3 * sum_d |x_d| (gamma_3 = 3u / (1 - 3u),
  u = 2^-24) per all-reduce, and training carries such differences on with no a-priori bound,
  so that comparison is not made here.

  (b) Only process 0 writes: each evaluation is one line of metrics.jsonl and centers.jsonl and
  one event per tag (after the restart too), and only process 0 shows the progress bar.

  (c) The stopped 2 x 2 run, restarted from its step-4 checkpoint, ends where the uninterrupted
  run does (the final comparison of (a)).
  """
  cache = tmp_path / "jax_cache"
  one, two = tmp_path / "one", tmp_path / "two"
  out_one = _launch(one, 1, 4, cache)
  records_one = _records(one)
  assert [r["step"] for r in records_one] == EVAL_STEPS

  out_stopped = _launch(two, 2, 2, cache, stop_after_steps=6)
  stopped = _summary(out_stopped[0][0])
  assert stopped["completed"] is False and stopped["steps"] == 6
  assert _summary(out_stopped[1][0]) == stopped  # every process returns process 0's summary
  assert not (two / "summary.json").exists()
  _assert_same_metrics(records_one[:1], _records(two))  # (a), step 4
  _assert_same_state(one, two, 4)
  (stdout0, stderr0), (stdout1, stderr1) = out_stopped  # (b)
  assert "train:" in stderr0 and "train:" not in stderr1  # the progress bar
  assert "step 4 epoch" in stdout0 + stderr0 and "step 4 epoch" not in stdout1 + stderr1

  out_resumed = _launch(two, 2, 2, cache)
  assert "Resumed from" in out_resumed[0][0] and "Resumed from" not in out_resumed[1][0]
  _assert_same_metrics(records_one, _records(two))  # (a) and (c), the end
  _assert_same_state(one, two, STEPS)
  summary_one, summary_two = _summary(out_one[0][0]), _summary(out_resumed[0][0])
  assert summary_one["processes"] == 1 and summary_two["processes"] == 2
  assert summary_one["devices"]["count"] == summary_two["devices"]["count"] == 4
  for key in ("best_val_accuracy", "best_val_step", "final_test_accuracy", "last_train_loss"):
    assert summary_one[key] == summary_two[key], key
  assert summary_two["completed"] is True and summary_two["steps"] == STEPS
  assert json.loads((two / "summary.json").read_text())["processes"] == 2

  for workdir in (one, two):  # (b)
    assert [r["step"] for r in _records(workdir)] == EVAL_STEPS
    assert [r["step"] for r in _records(workdir, "centers.jsonl")] == [0, *EVAL_STEPS]
    _assert_tensorboard_matches(workdir)


# ----------------------------------------------------------------------------------------------
# TensorBoard in a single process.


def test_tensorboard_events_hold_the_metrics_once_after_a_resume(tmp_path):
  """Evaluations every 2 steps, checkpoints every 4, 'killed' after step 7: the events of step 6
  are written, then redone after the restart from step 4; each step is in the files once."""
  from experiments import train as train_lib

  dataset = _synthetic_dataset()
  config = _tiny_config(progress_bar=False, eval_every_steps=2)
  config.stop_after_steps = 7
  partial = train_lib.train_and_evaluate(config, tmp_path, dataset=dataset)
  assert partial["completed"] is False
  scalars = read_tensorboard_scalars(tmp_path / train_lib.TENSORBOARD_DIR)
  assert [step for step, _ in scalars["val/accuracy"]] == [2, 4, 6]
  config.stop_after_steps = -1
  train_lib.train_and_evaluate(config, tmp_path, dataset=dataset)
  assert [r["step"] for r in _records(tmp_path)] == [2, 4, 6, 8]
  _assert_tensorboard_matches(tmp_path)


if __name__ == "__main__":
  _worker(json.loads(sys.argv[1]))
