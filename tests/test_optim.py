"""Tests for jlora/optim.py and training through `jlora.wrap`: only the adapter learns.

Also LoRA dropout, which only matters while training: on with a dropout key, never at eval.
"""

import conftest
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jlora

KEY = jax.random.key(0)


def _random_like(tree, seed: int, scale: float):
  rng = np.random.default_rng(seed)
  leaves, treedef = jax.tree.flatten(tree)
  return jax.tree.unflatten(treedef, [
      jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype) for x in leaves])


@pytest.fixture(scope="module")
def lm():
  """(model, variables, ids) of the conftest `TinyLM`, with N(0, 0.3²) parameters."""
  model = conftest.TinyLM()
  ids = (jnp.arange(12).reshape(2, 6) * 7) % 20
  return model, _random_like(jax.eval_shape(model.init, KEY, ids), 0, 0.3), ids


def _copy(tree):
  return jax.tree.map(np.array, tree)


def _assert_bitwise_equal(tree, copy):
  assert jax.tree.structure(tree) == jax.tree.structure(copy)
  for x, y in zip(jax.tree.leaves(tree), jax.tree.leaves(copy), strict=True):
    x = np.asarray(x)
    np.testing.assert_array_equal(x.view(f"u{x.itemsize}"), y.view(f"u{y.itemsize}"))


def _next_token_loss(apply, variables, adapter, ids):
  logits = apply(variables, adapter, ids)
  return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.roll(ids, -1, 1)).mean()


# --- training ---------------------------------------------------------------------------------


def test_jitted_adamw_training_moves_only_the_adapter_and_extras(lm):
  model, variables, ids = lm
  config = jlora.LoraConfig(rank=2, alpha=4.0, targets=r".*(kernel|embedding)",
                            trainable=r".*/(bias|scale)")
  adapter = jlora.init(KEY, variables, config, model.apply, ids)
  frozen, start = _copy(variables), _copy(adapter)
  apply = jlora.wrap(model.apply)
  optimizer = optax.adamw(2e-2)

  @jax.jit
  def step(adapter, opt_state, variables):
    # Only the adapter is differentiated; the variables are a constant input of the step.
    loss, grads = jax.value_and_grad(_next_token_loss, argnums=2)(apply, variables, adapter, ids)
    updates, opt_state = optimizer.update(grads, opt_state, adapter)
    return optax.apply_updates(adapter, updates), opt_state, loss, grads

  opt_state = optimizer.init(adapter)
  losses = []
  for i in range(25):
    adapter, opt_state, loss, grads = step(adapter, opt_state, variables)
    losses.append(float(loss))
    if i == 0:  # at init B = 0: ∂L/∂A ∝ B is exactly zero, B and the extras get gradients
      for path, g in grads.lora.items():
        np.testing.assert_array_equal(g.a, np.zeros(g.a.shape))
        assert np.abs(np.asarray(g.b)).max() > 0, path
      for path, g in grads.extras.items():
        assert np.abs(np.asarray(g)).max() > 0, path

  assert losses[-1] < 0.5 * losses[0], losses
  _assert_bitwise_equal(variables, frozen)  # the frozen tree comes back bit for bit
  for path, factors in adapter.lora.items():
    assert not np.array_equal(factors.a, start.lora[path].a), path
    assert not np.array_equal(factors.b, start.lora[path].b), path
  assert len(adapter.extras) == 9  # 8 biases and the LayerNorm scale
  for path, extra in adapter.extras.items():
    assert not np.array_equal(extra, start.extras[path]), path


# --- labels and LoRA+ -------------------------------------------------------------------------


def _small():
  params = {"fc": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)},
            "head": {"kernel": jnp.ones((3, 2))}}
  config = jlora.LoraConfig(rank=2, alpha=4.0, targets=r".*kernel", trainable=r"fc/bias")
  return params, jlora.init(KEY, params, config)


def test_labels_tree_mirrors_the_adapter():
  _, adapter = _small()
  tags = jlora.labels(adapter)
  assert jax.tree.structure(tags) == jax.tree.structure(adapter)  # static metadata included
  assert {p: (f.a, f.b) for p, f in tags.lora.items()} == {
      "fc/kernel": ("a", "b"), "head/kernel": ("a", "b")}
  assert tags.extras == {"fc/bias": "extra"}


def test_labels_drive_optax_multi_transform():
  _, adapter = _small()
  optimizer = optax.multi_transform(
      {"a": optax.set_to_zero(), "b": optax.sgd(1.0), "extra": optax.set_to_zero()},
      jlora.labels)
  ones = jax.tree.map(jnp.ones_like, adapter)
  updates, _ = optimizer.update(ones, optimizer.init(adapter), adapter)
  for f in updates.lora.values():
    np.testing.assert_array_equal(f.a, np.zeros(f.a.shape))
    np.testing.assert_array_equal(f.b, -np.ones(f.b.shape))
  np.testing.assert_array_equal(updates.extras["fc/bias"], np.zeros(3))


@pytest.mark.parametrize("ratio", [1.0, 4.0, 16.0])
def test_lora_plus_gives_b_ratio_times_the_update_of_a(ratio):
  params, adapter = _small()
  learning_rate = 0.1
  grads = _random_like(adapter, 3, 1.0)
  optimizer = jlora.lora_plus(optax.sgd, learning_rate, ratio=ratio)
  updates, _ = jax.jit(optimizer.update)(grads, optimizer.init(adapter), adapter)
  for path, f in updates.lora.items():
    g = grads.lora[path]
    np.testing.assert_allclose(f.a, -learning_rate * np.asarray(g.a), rtol=1e-6)
    np.testing.assert_allclose(f.b, -learning_rate * ratio * np.asarray(g.b), rtol=1e-6)
  np.testing.assert_allclose(updates.extras["fc/bias"],
                             -learning_rate * np.asarray(grads.extras["fc/bias"]), rtol=1e-6)
  ones = jax.tree.map(jnp.ones_like, adapter)
  updates, _ = optimizer.update(ones, optimizer.init(adapter), adapter)
  for f in updates.lora.values():
    np.testing.assert_allclose(f.a, np.full(f.a.shape, -learning_rate), rtol=1e-6)
    np.testing.assert_allclose(f.b, np.full(f.b.shape, -learning_rate * ratio), rtol=1e-6)


@pytest.mark.parametrize("ratio", [0.0, -2.0])
def test_lora_plus_rejects_a_non_positive_ratio(ratio):
  with pytest.raises(ValueError, match=rf"ratio must be > 0, got ratio={ratio}"):
    jlora.lora_plus(optax.sgd, 0.1, ratio=ratio)
  assert jlora.lora_plus(optax.sgd, 0.1, ratio=0.5)


def test_lora_plus_with_adamw_trains_under_jit():
  params, adapter = _small()
  optimizer = jlora.lora_plus(lambda lr: optax.adamw(lr, weight_decay=1e-4), 1e-2, ratio=16.0)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 4)), jnp.float32)
  apply = lambda p, x: (x @ p["fc"]["kernel"] + p["fc"]["bias"][None]) @ p["head"]["kernel"]
  loss_fn = lambda a: jnp.mean((apply(jlora.merge(params, a), x) - 1.0) ** 2)  # noqa: E731

  @jax.jit
  def step(adapter, state):
    loss, grads = jax.value_and_grad(loss_fn)(adapter)
    updates, state = optimizer.update(grads, state, adapter)
    return optax.apply_updates(adapter, updates), state, loss

  state = optimizer.init(adapter)
  first = None
  for _ in range(20):
    adapter, state, loss = step(adapter, state)
    first = float(loss) if first is None else first
  assert float(loss) < 0.5 * first


# --- LoRA dropout: training only --------------------------------------------------------------


def test_linen_dropout_only_with_a_dropout_rng(lm):
  model, variables, ids = lm
  config = jlora.LoraConfig(rank=2, alpha=4.0, targets=r".*(kernel|embedding)", dropout=0.5)
  adapter = _random_like(jlora.init(KEY, variables, config, model.apply, ids), 1, 0.3)
  apply = jax.jit(jlora.wrap(model.apply))
  rngs = lambda seed: {"lora_dropout": jax.random.key(seed)}  # noqa: E731
  evaluated = apply(variables, adapter, ids)
  merged = jax.jit(model.apply)(jlora.merge(variables, adapter), ids)
  # Eval never drops: factored and merged float32 forward agree to rounding.
  np.testing.assert_allclose(evaluated, merged, rtol=1e-5, atol=1e-5 * np.abs(merged).max())
  one, same, two = (apply(variables, adapter, ids, rngs=rngs(s)) for s in (1, 1, 2))
  np.testing.assert_array_equal(one, same)  # a key fixes the mask
  assert np.abs(one - two).max() > 1e-2 * np.abs(merged).max()
  assert np.abs(one - evaluated).max() > 1e-2 * np.abs(merged).max()


def test_linen_dropout_rate_zero_ignores_the_rng():
  model, x = nn.Dense(3), jnp.ones((2, 4))
  variables = _random_like(jax.eval_shape(model.init, KEY, x), 0, 0.3)
  config = jlora.LoraConfig(rank=2, alpha=4.0, targets=r".*kernel")
  adapter = _random_like(jlora.init(KEY, variables, config), 1, 0.3)
  apply = jlora.wrap(model.apply)
  np.testing.assert_array_equal(
      apply(variables, adapter, x, rngs={"lora_dropout": jax.random.key(1)}),
      apply(variables, adapter, x))


@pytest.fixture(scope="module")
def nnx_lm():
  """(graphdef, state, ids) with the shapes of the tiny_nnx fixture, N(0, 0.3²) values."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: conftest.TinyNNX(nnx.Rngs(0))))
  ids = (jnp.arange(12).reshape(2, 6) * 7) % 20
  return graphdef, _random_like(state, 0, 0.3), ids


@pytest.mark.parametrize("targets", [r"(conv|value|head)/kernel", r"(query|out)/kernel"],
                         ids=["conv_einsum_linear", "linear_general"])
def test_nnx_dropout_only_with_a_dropout_key(nnx_lm, targets):
  graphdef, state, ids = nnx_lm
  config = jlora.LoraConfig(rank=2, alpha=4.0, targets=targets, dropout=0.5)
  adapter = _random_like(jlora.init(KEY, state, config, nnx.merge(graphdef, state), ids), 1,
                         0.3)
  apply = jlora.wrap(graphdef)
  evaluated = apply(state, adapter, ids)
  merged = nnx.merge(graphdef, jlora.merge(state, adapter))(ids)
  np.testing.assert_allclose(evaluated, merged, rtol=1e-5, atol=1e-5 * np.abs(merged).max())
  one, same, two = (apply(state, adapter, ids, dropout_key=jax.random.key(s)) for s in (1, 1, 2))
  np.testing.assert_array_equal(one, same)
  assert np.abs(one - two).max() > 1e-2 * np.abs(merged).max()
  assert np.abs(one - evaluated).max() > 1e-2 * np.abs(merged).max()
