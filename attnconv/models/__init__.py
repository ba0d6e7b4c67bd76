"""Model zoo: the paper's attention network, the CIFAR ResNet18 baseline, a small Vision
Transformer and small CPU models.

Every model is a ``flax.linen.Module`` called as
``model.apply(variables, images, train=bool, rngs={'dropout': key}, mutable=...)`` on channels-last
images ``(batch, height, width, channels)`` and returns class logits ``(batch, num_classes)``.
Models with BatchNorm keep their statistics in the ``batch_stats`` collection.
"""

from __future__ import annotations

import importlib
from typing import Any

import flax.linen as nn

# name -> (module path, class name); imported lazily so that importing one model does not pay for all.
_REGISTRY: dict[str, tuple[str, str]] = {
  "attention_cnn": ("attnconv.models.cnn", "AttentionCNN"),
  "attention_net": ("attnconv.models.attention_net", "AttentionNet"),
  "resnet18": ("attnconv.models.cnn", "ResNet18"),
  "small_cnn": ("attnconv.models.cnn", "SmallCNN"),
  "vit": ("attnconv.models.vit", "ViT"),
}


def model_names() -> tuple[str, ...]:
  """The names accepted by :func:`build_model`."""
  return tuple(sorted(_REGISTRY))


def build_model(name: str, **kwargs: Any) -> nn.Module:
  """Builds a registered model by name with keyword arguments (its dataclass fields)."""
  if name not in _REGISTRY:
    raise ValueError(f"name: expected one of {model_names()}, got {name!r}")
  module_path, cls_name = _REGISTRY[name]
  cls = getattr(importlib.import_module(module_path), cls_name)
  return cls(**kwargs)


def count_params(params: Any) -> int:
  """Total number of scalars in a parameter pytree."""
  import jax

  return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
