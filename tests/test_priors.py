"""The convolutional priors on the shared backbone (experiments/configs/priors.py)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnconv.construction import conv_head_offsets
from attnconv.models import build_model, count_params
from experiments import train as train_lib
from experiments.configs import priors
from tests.test_data_scaling import _synthetic

# Parameters on Fashion-MNIST (28x28x1, 10 classes).
COUNTS = {
  "vit": 174_682,
  "vit_mimetic": 174_682,
  "gpsa": 174_790,
  "attention_quadratic": 132_742,
  "attention_conv_init": 132_742,
  "attention_learned_content": 175_098,
}


def _model(config):
  kwargs = config.model.to_dict()
  return build_model(kwargs.pop("name"), num_classes=10, **kwargs)


@pytest.mark.parametrize("prior", list(priors.PRIORS))
def test_backbone_is_shared_and_counts_pinned(prior):
  """Every prior has the backbone's fields; only the attention fields and init switches differ."""
  config = priors.get_config(prior)
  base = priors.get_config("vit")
  attention_fields = {"encoding", "gpsa_layers"}
  for key, value in base.model.items():
    if key not in attention_fields:
      assert config.model[key] == value, (prior, key)
  model = _model(config)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1))))
  assert count_params(variables["params"]) == COUNTS[prior]
  assert min(COUNTS.values()) >= 0.75 * max(COUNTS.values())


def test_prior_fields_are_the_command_line_switches():
  assert priors.get_config("vit_mimetic").mimetic_init is True
  assert priors.get_config("attention_conv_init").conv_init_alpha == 2.0
  assert priors.get_config("gpsa").model.gpsa_layers == 3
  assert priors.get_config("attention_learned_content").model.encoding == "learned_content"
  for prior in ("vit", "gpsa", "attention_quadratic"):
    config = priors.get_config(prior)
    assert config.mimetic_init is False and config.conv_init_alpha == 0.0
  assert priors.get_config("vit,cifar10").dataset.crop_padding == 4
  for bad in ("cnn", "vit,mnist", "vit,cifar10,x", "smoke,smoke"):
    with pytest.raises(ValueError, match="^arg: expected"):
      priors.get_config(bad)
  with pytest.raises(ValueError, match="^prior: expected"):
    priors.apply_prior(priors.get_config(), "resnet")


# vit and attention_quadratic run the same code paths as vit_mimetic and attention_conv_init
# (without their initialisation step).
@pytest.mark.parametrize(
  "prior", ["vit_mimetic", "gpsa", "attention_conv_init", "attention_learned_content"]
)
def test_every_prior_trains_through_the_trainer(prior, tmp_path):
  """Two steps of each prior's smoke config: finite metrics, the prior's initialisation applied."""
  config = priors.get_config(f"{prior},smoke")
  config.num_train_steps = config.eval_every_steps = config.checkpoint_every_steps = 2
  config.batch_size, config.progress_bar, config.plot = 8, False, False
  config.model.hidden_size, config.model.mlp_dim, config.model.num_layers = 18, 8, 2
  if prior == "gpsa":
    config.model.gpsa_layers = 1
  summary = train_lib.train_and_evaluate(config, tmp_path, dataset=_synthetic(40))
  assert np.isfinite(summary["final_test_accuracy"])
  if prior == "attention_conv_init":  # the logged initial centres are the kernel's shifts
    first = json.loads((tmp_path / train_lib.CENTERS_FILE).read_text().splitlines()[0])
    for i in range(2):
      centers = np.asarray(first["centers"][f"block_{i}/attention"])
      np.testing.assert_array_equal(centers, conv_head_offsets((3, 3)))
      np.testing.assert_allclose(first["alpha"][f"block_{i}/attention"], 2.0, rtol=1e-6)
