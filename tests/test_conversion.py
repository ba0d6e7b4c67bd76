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
