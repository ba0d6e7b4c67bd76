"""Writes ``tests/data/checkpoints/``: small models of the zoo saved with orbax, as the trainer saves
them, with a fixed input and the logits the library computed when they were written.

    python tests/data/write_checkpoints.py

``tests/test_checkpoints.py`` restores them into freshly built models and checks the logits: a
change of parameter names, shapes or arithmetic that breaks existing checkpoints fails there.
The stored files are those written by attnconv 0.1.0; rerunning this script overwrites them.
"""

from __future__ import annotations

import pathlib
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

from attnconv.models import build_model

ROOT = pathlib.Path(__file__).resolve().parent / "checkpoints"

# name -> (model name, keyword arguments, image shape (H, W, C))
MODELS = {
  "attention_net_quadratic": ("attention_net", {"encoding": "quadratic"}, (8, 8, 3)),
  "attention_net_generalized": ("attention_net", {"encoding": "generalized"}, (8, 8, 3)),
  "attention_net_learned": ("attention_net", {"encoding": "learned"}, (8, 8, 3)),
  "attention_net_learned_content": ("attention_net", {"encoding": "learned_content"}, (8, 8, 3)),
  "attention_cnn_quadratic_content": (
    "attention_cnn",
    {"encoding": "quadratic_content", "features": (4, 8), "qk_features": 4},
    (8, 8, 1),
  ),
}
SMALL = {"num_layers": 2, "num_heads": 4, "hidden_size": 8, "mlp_dim": 16}


def main() -> None:
  if ROOT.exists():
    shutil.rmtree(ROOT)
  ROOT.mkdir(parents=True)
  checkpointer = ocp.StandardCheckpointer()
  for i, (name, (model_name, kwargs, shape)) in enumerate(MODELS.items()):
    kw = dict(kwargs, num_classes=10)
    if model_name == "attention_net":
      kw.update(SMALL)
    model = build_model(model_name, **kw)
    images = jax.random.normal(jax.random.key(100 + i), (2, *shape))
    variables = model.init(jax.random.key(i), images, train=False)
    # non-zero biases and statistics, so that a dropped or renamed parameter changes the logits
    noise = lambda v: v + 0.01 * jax.random.normal(jax.random.key(7), v.shape)  # noqa: E731
    variables = jax.tree.map(noise, variables)
    logits = model.apply(variables, images, train=False)
    checkpointer.save((ROOT / name).absolute(), dict(variables))
    checkpointer.wait_until_finished()
    np.savez(ROOT / f"{name}.npz", images=np.asarray(images), logits=np.asarray(logits))


if __name__ == "__main__":
  main()
