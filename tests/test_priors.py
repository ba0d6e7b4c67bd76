"""The convolutional priors on the shared backbone (experiments/configs/priors.py); every prior
trains through the grid runner in tests/test_data_scaling.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from attnconv.models import build_model, count_params
from experiments.configs import priors

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
