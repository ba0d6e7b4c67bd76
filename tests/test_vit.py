"""The Vision Transformer (attnconv.models.vit) and mimetic initialisation (attnconv.models.mimetic)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.core import FrozenDict
from hypothesis import given, settings
from hypothesis import strategies as st

from attnconv.models import build_model, count_params, model_names
from attnconv.models.mimetic import (
  attention_layers,
  mimetic_init,
  mimetic_targets,
  rank_truncated_factors,
)
from attnconv.models.vit import ViT
from tests import jitted

SHAPES = {"cifar": (2, 32, 32, 3), "mnist": (2, 28, 28, 1)}


def vit_param_count(h, w, c, *, p=4, d=64, layers=4, mlp=128, classes=10, cls=False):
  """The ViT parameter count from its formula (module docstring of attnconv.models.vit)."""
  n = (h // p) * (w // p) + int(cls)
  patch = p * p * c * d + d
  pos = n * d
  token = d if cls else 0
  attention = 4 * (d * d + d)  # query, key, value (D, H, D/H) + (H, D/H); out (H, D/H, D) + (D,)
  block = 2 * d + attention + 2 * d + (d * mlp + mlp) + (mlp * d + d)
  return patch + pos + token + layers * block + 2 * d + d * classes + classes


def _init(model, shape, seed=0):
  return jitted.init(model, jax.random.PRNGKey(seed), jnp.zeros(shape, jnp.float32))


@pytest.fixture(scope="module")
def default_vit():
  model = build_model("vit", num_classes=10)
  return model, _init(model, SHAPES["cifar"])


def test_registered():
  assert "vit" in model_names()
  assert isinstance(build_model("vit", num_classes=10), ViT)


@pytest.mark.parametrize(
  ("dataset", "pool", "expected"),
  [("cifar", "mean", 141_898), ("mnist", "mean", 138_890), ("cifar", "cls", 142_026)],
)
def test_default_parameter_count(dataset, pool, expected):
  shape = SHAPES[dataset]
  model = build_model("vit", num_classes=10, pool=pool)
  variables = jax.eval_shape(lambda: _init(model, shape))
  assert set(variables) == {"params"}
  formula = vit_param_count(*shape[1:], cls=pool == "cls")
  assert formula == expected
  assert count_params(variables["params"]) == expected


@st.composite
def vit_configs(draw):
  """Small ViTs with an image whose sides the patch size divides."""
  p = draw(st.sampled_from([2, 4, 7]))
  grid = draw(st.tuples(st.integers(1, 3), st.integers(1, 3)))
  heads = draw(st.sampled_from([1, 2, 4]))
  head_dim = draw(st.sampled_from([2, 4]))
  config = {
    "patch_size": p,
    "hidden_size": heads * head_dim,
    "num_heads": heads,
    "num_layers": draw(st.integers(1, 2)),
    "mlp_dim": draw(st.sampled_from([4, 8])),
    "num_classes": draw(st.integers(1, 5)),
    "pool": draw(st.sampled_from(["mean", "cls"])),
  }
  shape = (draw(st.integers(1, 2)), grid[0] * p, grid[1] * p, draw(st.sampled_from([1, 3])))
  return config, shape


@settings(max_examples=3)
@given(vit_configs())
def test_forward_shape_dtype_and_count(case):
  config, shape = case
  model = ViT(**config)
  variables = _init(model, shape)
  images = jax.random.normal(jax.random.PRNGKey(1), shape)
  logits = jitted.apply(model, variables, images, train=False)
  assert logits.shape == (shape[0], config["num_classes"])
  assert logits.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(logits)))
  expected = vit_param_count(
    *shape[1:],
    p=config["patch_size"],
    d=config["hidden_size"],
    layers=config["num_layers"],
    mlp=config["mlp_dim"],
    classes=config["num_classes"],
    cls=config["pool"] == "cls",
  )
  assert count_params(variables["params"]) == expected


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_pooling_and_attention_probabilities(pool):
  shape = SHAPES["mnist"]
  model = build_model("vit", num_classes=10, pool=pool, num_layers=2)
  variables = _init(model, shape)
  assert ("cls_token" in variables["params"]) == (pool == "cls")
  images = jax.random.normal(jax.random.PRNGKey(2), shape)
  logits, state = jitted.apply(model, variables, images, train=False, mutable=["intermediates"])
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  n = 7 * 7 + (pool == "cls")
  for i in range(2):
    (probs,) = state["intermediates"][f"block_{i}"]["attention"]["attention_probs"]
    assert probs.shape == (2, model.num_heads, n, n)
    tol = 16 * n * np.finfo(np.float32).eps
    np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, rtol=0, atol=tol)
    assert np.all(np.asarray(probs) >= 0)
  # Sowing does not change the output.
  np.testing.assert_array_equal(
    np.asarray(jitted.apply(model, variables, images)), np.asarray(logits)
  )


def test_pools_differ_on_same_weights(default_vit):
  """'mean' and 'cls' are different read-outs: the class token changes the logits."""
  model, variables = default_vit
  cls_model = build_model("vit", num_classes=10, pool="cls")
  cls_vars = _init(cls_model, SHAPES["cifar"])
  params = dict(cls_vars["params"])
  for name, value in variables["params"].items():
    if name != "pos_embedding":
      params[name] = value
  images = jax.random.normal(jax.random.PRNGKey(3), SHAPES["cifar"])
  a = jitted.apply(model, variables, images)
  b = jitted.apply(cls_model, {"params": params}, images)
  assert not np.allclose(np.asarray(a), np.asarray(b))


def test_dropout_train_differs_from_eval():
  shape = SHAPES["cifar"]
  model = build_model("vit", num_classes=10, dropout_rate=0.1, attention_dropout_rate=0.1)
  variables = _init(model, shape)
  images = jax.random.normal(jax.random.PRNGKey(4), shape)
  eval_a = jitted.apply(model, variables, images, train=False)
  eval_b = jitted.apply(
    model, variables, images, train=False, rngs={"dropout": jax.random.PRNGKey(5)}
  )
  np.testing.assert_array_equal(np.asarray(eval_a), np.asarray(eval_b))
  train_a = jitted.apply(
    model, variables, images, train=True, rngs={"dropout": jax.random.PRNGKey(5)}
  )
  train_b = jitted.apply(
    model, variables, images, train=True, rngs={"dropout": jax.random.PRNGKey(6)}
  )
  assert train_a.shape == (2, 10) and train_a.dtype == jnp.float32
  assert not np.allclose(np.asarray(train_a), np.asarray(eval_a))
  assert not np.allclose(np.asarray(train_a), np.asarray(train_b))


@pytest.mark.parametrize("shape", [(1, 30, 32, 3), (1, 32, 30, 3), (1, 29, 29, 1)])
def test_bad_patch_size_names_images(shape):
  model = build_model("vit", num_classes=10)
  with pytest.raises(ValueError, match=r"images: expected .*patch_size=4.*got shape"):
    _init(model, shape)


def test_bad_configuration_raises():
  with pytest.raises(ValueError, match=r"images: expected a rank-4"):
    _init(build_model("vit"), (32, 32, 3))
  with pytest.raises(ValueError, match=r"pool: expected one of \('mean', 'cls'\), got 'max'"):
    _init(build_model("vit", pool="max"), SHAPES["cifar"])
  with pytest.raises(ValueError, match=r"hidden_size: expected a multiple of num_heads=3, got 64"):
    _init(build_model("vit", num_heads=3), SHAPES["cifar"])
  with pytest.raises(ValueError, match=r"patch_size: expected a positive integer, got 0"):
    _init(build_model("vit", patch_size=0), SHAPES["cifar"])
  with pytest.raises(ValueError, match=r"dropout_rate: expected a float in \[0, 1\), got 1.5"):
    _init(build_model("vit", dropout_rate=1.5), SHAPES["cifar"])


def test_one_sgd_step_has_finite_gradients(default_vit):
  model, variables = default_vit
  images = jax.random.normal(jax.random.PRNGKey(7), SHAPES["cifar"])
  labels = jnp.array([1, 7])

  def loss_fn(params):
    logits = model.apply(
      {"params": params}, images, train=True, rngs={"dropout": jax.random.key(8)}
    )
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  params = variables["params"]
  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
  leaves = jax.tree_util.tree_leaves(grads)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in leaves)
  assert any(np.any(np.asarray(g) != 0) for g in leaves)
  new_params = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, grads)
  new_loss = jax.jit(loss_fn)(new_params)
  assert np.isfinite(float(new_loss))
  assert float(new_loss) < float(loss)


# --- mimetic initialisation -------------------------------------------------------------------


def _truncated(target, rank):
  u, s, vt = np.linalg.svd(target)
  return (u[..., :rank] * s[..., None, :rank]) @ vt[..., :rank, :]


def _products(node):
  q, k = (np.asarray(node[n]["kernel"], np.float64) for n in ("query", "key"))
  qk = np.einsum("chd,ehd->hce", q, k)
  vo = None
  if "value" in node:
    v, o = np.asarray(node["value"]["kernel"], np.float64), np.asarray(node["out"]["kernel"])
    vo = np.einsum("chd,hde->hce", v, o.astype(np.float64))
  return qk, vo


def _get(tree, path):
  for name in path:
    tree = tree[name]
  return tree


def _rtol(c):
  """float32 rounding of the factors: each product entry sums D_h <= C rounded terms."""
  return 8 * np.sqrt(c) * np.finfo(np.float32).eps


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_mimetic_products_hit_truncated_targets(default_vit, pool):
  model, variables = default_vit
  if pool == "cls":
    model = build_model("vit", num_classes=10, pool="cls")
    variables = _init(model, SHAPES["cifar"])
  params = variables["params"]
  key = jax.random.PRNGKey(11)
  new = mimetic_init(params, key)
  layers = attention_layers(params)
  assert layers == [(f"block_{i}", "attention") for i in range(4)]
  targets = mimetic_targets(params, key)
  for path in layers:
    node = _get(new, path)
    c, h, dh = node["query"]["kernel"].shape
    assert (c, h, dh) == (64, 4, 16)
    qk, vo = _products(node)
    for name, product in (("qk", qk), ("vo", vo)):
      want = _truncated(targets[path][name], dh)
      for head in range(h):
        err = np.linalg.norm(product[head] - want[head]) / np.linalg.norm(want[head])
        assert err < _rtol(c), (path, name, head, err)
    # The targets' constants: identity parts beta = 0.7 and -vo_beta = -0.4.
    np.testing.assert_allclose(np.einsum("hcc->h", targets[path]["qk"]) / c, 0.7, atol=4 * 0.7 / c)
    np.testing.assert_allclose(np.einsum("hcc->h", targets[path]["vo"]) / c, -0.4, atol=4 * 0.4 / c)
  # Other leaves untouched, kernels' dtypes and shapes kept, input not modified.
  flat_old = dict(jax.tree_util.tree_leaves_with_path(params))
  flat_new = dict(jax.tree_util.tree_leaves_with_path(new))
  assert flat_old.keys() == flat_new.keys()
  changed = set()
  for path, old in flat_old.items():
    assert flat_new[path].shape == old.shape and flat_new[path].dtype == old.dtype
    if not np.array_equal(np.asarray(flat_new[path]), np.asarray(old)):
      changed.add(path)
  names = {(str(p[0].key), str(p[-2].key), str(p[-1].key)) for p in changed}
  expected = {
    (f"block_{i}", n, "kernel") for i in range(4) for n in ("query", "key", "value", "out")
  }
  assert names == expected
  for path, value in jax.tree_util.tree_leaves_with_path(variables["params"]):
    assert flat_old[path] is value
  # The model still runs.
  images = jax.random.normal(jax.random.PRNGKey(12), SHAPES["cifar"])
  logits = jitted.apply(model, {"params": new}, images, train=False)
  assert logits.shape == (2, 10) and np.all(np.isfinite(np.asarray(logits)))


def test_mimetic_full_rank_is_exact_and_deterministic():
  """With D_h = C (one head) the products equal the targets; the same key gives the same tree."""
  model = ViT(hidden_size=8, num_heads=1, num_layers=2, mlp_dim=8, patch_size=4)
  params = FrozenDict(_init(model, (1, 8, 8, 1))["params"])
  key = jax.random.PRNGKey(3)
  new = mimetic_init(params, key, alpha=0.5, beta=1.0, vo_alpha=0.2, vo_beta=0.3)
  assert isinstance(new, FrozenDict)
  targets = mimetic_targets(params, key, alpha=0.5, beta=1.0, vo_alpha=0.2, vo_beta=0.3)
  for path in attention_layers(params):
    qk, vo = _products(_get(new, path))
    for name, product in (("qk", qk), ("vo", vo)):
      want = targets[path][name]
      err = np.linalg.norm(product - want) / np.linalg.norm(want)
      assert err < _rtol(8)
  again = mimetic_init(params, key, alpha=0.5, beta=1.0, vo_alpha=0.2, vo_beta=0.3)
  for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(again)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Different layers get different draws.
  (a, b) = (targets[p]["qk"] for p in attention_layers(params))
  assert not np.allclose(a, b)


@st.composite
def low_rank_cases(draw):
  c = draw(st.integers(2, 12))
  rank = draw(st.integers(1, c))
  seed = draw(st.integers(0, 2**16))
  return c, rank, seed


@given(low_rank_cases())
def test_rank_truncated_factors_is_best_rank_approximation(case):
  c, rank, seed = case
  target = np.random.default_rng(seed).normal(size=(2, c, c))
  w1, w2 = rank_truncated_factors(target, rank)
  assert w1.shape == (2, c, rank) and w2.shape == (2, rank, c)
  s = np.linalg.svd(target, compute_uv=False)
  err = np.linalg.norm(w1 @ w2 - target, axis=(-2, -1))
  tol = 64 * c * np.finfo(np.float64).eps * np.linalg.norm(target, axis=(-2, -1))
  np.testing.assert_allclose(err, np.sqrt(np.sum(s[..., rank:] ** 2, -1)), atol=np.max(tol))


def test_mimetic_init_bad_input():
  with pytest.raises(ValueError, match=r"params: expected at least one attention layer"):
    mimetic_init({"dense": {"kernel": jnp.zeros((3, 3))}}, jax.random.PRNGKey(0))
  with pytest.raises(TypeError, match=r"alpha: expected a finite real number, got 'x'"):
    mimetic_init({}, jax.random.PRNGKey(0), alpha="x")


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_convit_blocks_are_gpsa_with_local_init_then_content(pool):
  """``gpsa_layers=2``: blocks 0-1 are GPSA layers (gate, centres on the 3x3 lattice), blocks
  2-3 content attention; with ``pool="cls"`` the class token joins after the GPSA blocks and
  the position embedding covers the patches only (ConViT)."""
  model = build_model("vit", num_classes=10, num_heads=9, hidden_size=36, gpsa_layers=2, pool=pool)
  x = jnp.ones((2, 28, 28, 1))
  variables = jax.jit(model.init)(jax.random.key(0), x)
  params = variables["params"]
  lattice = np.array([[i, j] for i in (-1, 0, 1) for j in (-1, 0, 1)], np.float32)
  for i in (0, 1):
    attention = params[f"block_{i}"]["attention"]
    np.testing.assert_array_equal(attention["centers"], lattice)
    np.testing.assert_array_equal(attention["gate"], np.ones(9, np.float32))
  for i in (2, 3):
    assert "gate" not in params[f"block_{i}"]["attention"]
  assert params["pos_embedding"].shape == (7, 7, 36)
  _, state = jax.jit(lambda v: model.apply(v, x, mutable=["intermediates"]))(variables)
  maps = [state["intermediates"][f"block_{i}"]["attention"]["attention_probs"][0] for i in range(4)]
  n = 49 + (pool == "cls")
  assert [m.shape for m in maps] == [(2, 9, 49, 49)] * 2 + [(2, 9, n, n)] * 2
  with pytest.raises(ValueError, match=r"gpsa_layers: expected 0 to"):
    build_model("vit", num_heads=9, hidden_size=36, gpsa_layers=4, pool="cls").init(
      jax.random.key(0), x
    )
