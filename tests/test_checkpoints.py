"""Checkpoints written by earlier versions of the library load and compute the same logits.

``tests/data/checkpoints/`` holds small models of the zoo saved with orbax (as the trainer saves
them) by ``tests/data/write_checkpoints.py``, with a fixed input and the logits computed when they
were written. They are restored here into freshly built models: a renamed or reshaped parameter
fails the restore or the tree comparison, changed arithmetic fails the logits.
"""

from __future__ import annotations

import importlib.util
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from attnconv.models import build_model

DATA = pathlib.Path(__file__).resolve().parent / "data"
_spec = importlib.util.spec_from_file_location("write_checkpoints", DATA / "write_checkpoints.py")
writer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(writer)


def _model(name: str):
  model_name, kwargs, _ = writer.MODELS[name]
  kw = dict(kwargs, num_classes=10)
  if model_name == "attention_net":
    kw.update(writer.SMALL)
  return build_model(model_name, **kw)


@pytest.mark.parametrize("name", sorted(writer.MODELS))
def test_checkpoint_restores_with_the_same_tree_and_logits(name):
  stored = np.load(writer.ROOT / f"{name}.npz")
  images = stored["images"]
  model = _model(name)
  fresh = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))
  restored = ocp.StandardCheckpointer().restore((writer.ROOT / name).absolute(), fresh)
  # same names and shapes as the current code creates
  assert jax.tree.structure(restored) == jax.tree.structure(fresh)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(fresh)):
    assert a.shape == b.shape and a.dtype == b.dtype
  logits = np.asarray(model.apply(restored, images, train=False))
  # float32 forward passes of a few layers: summation order may differ, 1e-5 relative to the
  # logits' scale (about 1) bounds a few hundred float32 roundings
  np.testing.assert_allclose(logits, stored["logits"], rtol=1e-5, atol=1e-5)


def test_fixture_covers_every_attention_encoding_of_the_paper_model():
  from attnconv.models.attention_net import ENCODINGS

  covered = {kw.get("encoding") for m, kw, _ in writer.MODELS.values() if m == "attention_net"}
  # GPSA (ConViT) is not one of the paper's encodings; its parameters are exactly the
  # quadratic layer's and the content layer's plus ``gate`` (tests/test_layers.py).
  assert covered == set(ENCODINGS) - {"gpsa"}
