"""The conversion experiment (experiments/conversion.py) end to end on a tiny synthetic dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments import conversion
from experiments.configs import conversion as conversion_config
from tests.test_data_scaling import _synthetic


def test_stage_configs():
  config = conversion_config.get_config()
  cnn = conversion.stage_config(config, "cnn")
  assert "conversion" not in cnn and cnn.num_epochs == config.conversion.cnn_epochs
  free = conversion.stage_config(config, "attention_free")
  assert free.model.name == "attention_cnn" and free.model.encoding == "quadratic"
  assert free.learning_rate == config.conversion.finetune_lr
  content = conversion.stage_config(config, "attention_content")
  assert content.model.encoding == "quadratic_content"
  for key in ("features", "pool", "downsample"):  # the same network, convolutions swapped
    assert free.model[key] == cnn.model[key] == content.model[key]
  assert conversion.stage_config(config, "cnn_continued").model.name == "small_cnn"
  with pytest.raises(ValueError, match="stage"):
    conversion.stage_config(config, "vit")
  with pytest.raises(ValueError, match="arg"):
    conversion_config.get_config("full")


def test_run_end_to_end_and_resume(tmp_path):
  config = conversion_config.get_config("smoke")
  dataset = _synthetic(60)
  results = conversion.run(config, tmp_path, dataset=dataset)
  # Hard attention reproduces the CNN's predictions (the point of the experiment).
  for implementation in ("dense", "gather"):
    exact = results["as_attention"][implementation]
    assert exact["changed_predictions"] == 0
    assert exact["test_accuracy"] == results["cnn"]["test_accuracy_of_best"]
  sharp, soft = results["alpha_sweep"]
  assert sharp["alpha"] == 20.0 and sharp["changed_predictions"] == 0
  assert sharp["max_abs_logit_diff"] <= soft["max_abs_logit_diff"]
  # Fine-tuning starts from the converted network, which (alpha = 5) keeps the CNN's predictions
  # on this easy data; the attention stages report how far the centres moved.
  ft = results["finetune"]
  assert set(ft) == set(conversion.FINETUNE_STAGES)
  assert ft["cnn_continued"]["start_test_accuracy"] == results["cnn"]["test_accuracy_of_best"]
  assert ft["attention_content"]["num_params"] > ft["attention_free"]["num_params"]
  for stage in ("attention_free", "attention_content"):
    layers = ft[stage]["layers"]
    assert set(layers) == {"conv1", "conv2", "conv3"}
    assert all(np.isfinite(v["centre_moved_max"]) for v in layers.values())
  saved = json.loads((tmp_path / "conversion.json").read_text())
  assert saved["as_attention"] == json.loads(json.dumps(results["as_attention"]))
  # Rerunning resumes: the CNN stage is not retrained (same summary file).
  before = (tmp_path / "cnn" / "summary.json").read_text()
  again = conversion.run(config, tmp_path, dataset=dataset)
  assert (tmp_path / "cnn" / "summary.json").read_text() == before
  assert again["cnn"]["test_accuracy_of_best"] == results["cnn"]["test_accuracy_of_best"]


# ----------------------------------------------------------------------------------------------
# The T-CNN study (conversion.py:finetune).


def test_finetune_arm_configs():
  config = conversion_config.get_config("finetune")
  c = config.conversion
  assert c.study == "finetune" and c.seeds == (0, 1, 2)
  assert c.finetune_epochs >= 10 and c.cnn_epochs == 10
  assert tuple(c.arms) == conversion.FINETUNE_ARMS
  cnn = conversion.arm_config(config, "cnn", 1)
  assert "conversion" not in cnn and cnn.num_epochs == 10 and cnn.seed == 1
  assert cnn.model.name == "small_cnn" and cnn.learning_rate == config.learning_rate
  finetune = conversion.arm_config(config, "cnn_finetune", 1)
  assert finetune.model.to_dict() == cnn.model.to_dict()
  assert finetune.num_epochs == c.finetune_epochs and finetune.learning_rate == c.finetune_lr
  tcnn = conversion.arm_config(config, "tcnn", 2)
  assert tcnn.model.name == "attention_cnn" and tcnn.model.encoding == "gpsa"
  assert tuple(tcnn.model.attention_layers) == ("conv3",) and tcnn.model.gate_init == 17.0
  for key in ("features", "pool", "downsample"):  # the CNN with its last stage swapped
    assert tcnn.model[key] == cnn.model[key]
  assert tcnn.num_epochs == c.finetune_epochs and tcnn.learning_rate == c.finetune_lr
  assert conversion.arm_config(config, "tcnn_open_gate", 0).model.gate_init == 1.0
  scratch = conversion.arm_config(config, "hybrid_scratch", 0)
  assert scratch.num_epochs == c.cnn_epochs + c.finetune_epochs
  assert scratch.learning_rate == config.learning_rate
  assert scratch.model.locality_strength == 1.0 and scratch.model.gate_init == 1.0
  # The same data split for every arm and seed.
  assert (
    len({conversion.arm_config(config, a, s).dataset.seed for a in c.arms for s in c.seeds}) == 1
  )
  with pytest.raises(ValueError, match="^arm: expected"):
    conversion.arm_config(config, "vit", 0)
  smoke = conversion_config.get_config("finetune,smoke")
  assert smoke.conversion.seeds == (0,) and smoke.num_train_steps == 2
  assert conversion_config.get_config().conversion.study == "exactness"


def test_finetune_end_to_end(tmp_path):
  config = conversion_config.get_config("finetune,smoke")
  dataset = _synthetic(60)
  results = conversion.run_finetune(config, tmp_path, dataset=dataset)
  arms = ("cnn", *conversion.FINETUNE_ARMS)
  assert tuple(results["runs"]) == arms
  keys = ["gaussian_noise:0.1", "gaussian_blur:1", "translate:2"]
  assert results["metrics"] == ["clean", *keys, "mean_corrupted"]
  cnn = results["runs"]["cnn"]["0"]
  for arm in arms:
    record = results["runs"][arm]["0"]
    assert list(record["corruptions"]) == keys
    assert set(record["translations"]["translate:2"]) == {"0,1", "0,-1", "1,0", "-1,0"}
    assert record["mean_corrupted"] == pytest.approx(np.mean(list(record["corruptions"].values())))
    assert 0.0 <= record["clean"] <= 1.0 and record["steps"] == 2
    assert record["train_seconds"] > 0.0 and record["cpu_seconds"] > 0.0
    # The clean accuracy of the best checkpoint is the trainer's model-selected test accuracy.
    assert record["clean"] == pytest.approx(record["final_test_accuracy"])
  # Fine-tuning starts from the CNN's function: the T-CNN (content gated off) exactly.
  for arm in ("cnn_finetune", "tcnn"):
    assert results["runs"][arm]["0"]["start_test_accuracy"] == cnn["clean"]
  gates = results["runs"]["tcnn"]["0"]["gates"]
  assert gates["start"]["conv3"]["content_weight_max"] == pytest.approx(1 / (1 + np.exp(17.0)))
  assert results["runs"]["tcnn_open_gate"]["0"]["gates"]["start"]["conv3"]["gate"] == [1.0] * 9
  # The hybrid trained from scratch starts from the trainer's initialisation: ConViT's gates
  # (sigmoid(1)) and an accuracy at step 0 recorded beside the trained one, as for the CNN.
  scratch = results["runs"]["hybrid_scratch"]["0"]
  assert scratch["gates"]["start"]["conv3"]["gate"] == [1.0] * 9
  for arm in ("cnn", "hybrid_scratch"):
    assert 0.0 <= results["runs"][arm]["0"]["start_test_accuracy"] <= 1.0
  for arm in arms:
    start = results["summary"][arm]["start_test_accuracy"]
    assert start["n"] == 1 and start["mean"] == results["runs"][arm]["0"]["start_test_accuracy"]
  # Paired differences (one seed: means only) against the fine-tuned CNN, and T-CNN vs scratch.
  assert set(results["paired"]) == {
    "tcnn - cnn_finetune",
    "tcnn_open_gate - cnn_finetune",
    "hybrid_scratch - cnn_finetune",
    "tcnn - hybrid_scratch",
    "tcnn_open_gate - hybrid_scratch",
  }
  diff = results["paired"]["tcnn - cnn_finetune"]["clean"]
  want = results["runs"]["tcnn"]["0"]["clean"] - results["runs"]["cnn_finetune"]["0"]["clean"]
  assert diff["mean"] == pytest.approx(want) and diff["low"] is None and diff["n"] == 1
  saved = json.loads((tmp_path / "conversion_finetune.json").read_text())
  assert saved["paired"] == json.loads(json.dumps(results["paired"]))
  assert "tcnn" in conversion.format_finetune(results)
  # The Markdown tables quote the same numbers (one seed: no std, no interval).
  lines = conversion.format_finetune_markdown(results).splitlines()
  assert "| arm | params | epochs | at step 0 | " + " | ".join(results["metrics"]) + " |" in lines
  tcnn = results["runs"]["tcnn"]["0"]
  row = next(line for line in lines if line.startswith("| `tcnn` | "))
  assert row.startswith(f"| `tcnn` | {tcnn['num_params']:,} | {tcnn['epochs']:g} | ")
  assert f"| {100 * tcnn['start_test_accuracy']:.2f} | {100 * tcnn['clean']:.2f} |" in row
  assert f"| tcnn - cnn_finetune | {100 * diff['mean']:+.2f} |" in "\n".join(lines)
  assert "| `tcnn` | conv3 | 4.14e-08 (4.14e-08) | " in "\n".join(lines)
  assert not any(line.startswith("| `cnn_finetune` | conv3") for line in lines)
  conversion.plot_finetune(results, tmp_path / "finetune.png")
  assert (tmp_path / "finetune.png").stat().st_size > 1000
  # Resuming retrains nothing (the same summaries) and gives the same results.
  before = (tmp_path / "tcnn" / "s0" / "summary.json").read_text()
  again = conversion.run_finetune(config, tmp_path, dataset=dataset)
  assert (tmp_path / "tcnn" / "s0" / "summary.json").read_text() == before
  assert again["runs"]["tcnn"]["0"]["clean"] == results["runs"]["tcnn"]["0"]["clean"]


def test_finetune_rejects_unknown_arms(tmp_path):
  config = conversion_config.get_config("finetune,smoke")
  config.conversion.arms = ("cnn_finetune", "vit")
  with pytest.raises(ValueError, match="arms: expected"):
    conversion.run_finetune(config, tmp_path, dataset=_synthetic(60))
