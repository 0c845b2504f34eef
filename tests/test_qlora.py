"""QLoRA end to end: a quantized frozen base (`jlora.quantize`) through init, wrap, merge,
checkpoints and a device mesh.

The reference is always the dense model with the same dequantized weights: wrap on the
quantized tree must equal ``fn(jlora.merge(qtree, adapter))`` in outputs and adapter gradients
(float32 tolerances as in tests/test_factored.py), and the backward pass must keep the codes,
never a dequantized kernel.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from _hlo import hlo_weight_gradient_dots
from jax.ad_checkpoint import print_saved_residuals
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jlora

RTOL, GRAD_RTOL = 2e-5, 1e-4
SCHEMES = [("nf4", False), ("nf4", True), ("int4", False), ("int8", False)]


def _close(actual, expected, rtol):
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    assert a.shape == e.shape and a.dtype == e.dtype
    bound = rtol * max(float(jnp.max(jnp.abs(e))), 1e-30)
    assert float(jnp.max(jnp.abs(a - e))) <= bound


def _trained(adapter, seed=1):
  leaves, treedef = jax.tree.flatten(adapter)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [0.1 * jax.random.normal(k, x.shape, x.dtype)
                                      for k, x in zip(keys, leaves, strict=True)])


def _loss(y):
  return jnp.sum(jnp.tanh(y))


def _compare(fn, qtree, adapter, *args):
  """wrap(fn) on the quantized tree vs fn on the merged dense tree: outputs and gradients."""

  @jax.jit
  def both(adapter):
    ours = jax.value_and_grad(lambda a: _loss(jlora.wrap(fn)(qtree, a, *args)))(adapter)
    ref = jax.value_and_grad(lambda a: _loss(fn(jlora.merge(qtree, a), *args)))(adapter)
    return ours, ref, jlora.wrap(fn)(qtree, adapter, *args), fn(jlora.merge(qtree, adapter),
                                                                 *args)

  (_, g), (_, g_ref), y, y_ref = both(adapter)
  _close(y, y_ref, RTOL)
  _close(g, g_ref, GRAD_RTOL)


# --- models ---------------------------------------------------------------------------------


class GemmaStyle(nn.Module):
  """Own params named `w`, used through einsum over heads, in an nn.scan stack."""

  @nn.compact
  def __call__(self, x, _=None):
    w = self.param("w", nn.initializers.normal(0.3), (2, x.shape[-1], 32))  # (N, D, H)
    w_o = self.param("w_o", nn.initializers.normal(0.3), (2, 32, x.shape[-1]))
    h = jnp.einsum("btd,ndh->btnh", x, w)
    return x + jnp.einsum("btnh,nhd->btd", jnp.tanh(h), w_o), None


class Stack(nn.Module):
  @nn.compact
  def __call__(self, x):
    layers = nn.scan(nn.remat(GemmaStyle), variable_axes={"params": 0},
                     split_rngs={"params": True}, length=2)
    return layers(name="layers")(x, None)[0]


class FlaxLayers(nn.Module):
  """Dense, DenseGeneral (multi-axis in and out), Einsum and Conv."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(64, (3,), name="conv")(x)
    h = nn.DenseGeneral((2, 32), name="qkv")(x)
    x = x + nn.DenseGeneral(64, axis=(-2, -1), name="out")(h)
    x = nn.Einsum((64, 64), "btd,de->bte", name="mix")(x)
    return nn.Dense(64, name="head")(jax.nn.gelu(x))


def _setup(model, x, scheme, double_quant, targets=r".*(kernel|w|w_o)"):
  variables = model.init(jax.random.key(0), x)
  qtree = jlora.quantize(variables, targets, scheme, block_size=32, double_quant=double_quant)
  config = jlora.LoraConfig(rank=4, alpha=8.0, targets=targets)
  adapter = _trained(jlora.init(jax.random.key(1), qtree, config, model.apply, x))
  return variables, qtree, adapter


# --- wrap equals the merged dense model --------------------------------------------------------


@pytest.mark.parametrize("scheme, double_quant", SCHEMES)
def test_flax_layers_on_a_quantized_base(scheme, double_quant):
  model, x = FlaxLayers(), jax.random.normal(jax.random.key(2), (2, 6, 64))
  _, qtree, adapter = _setup(model, x, scheme, double_quant)
  assert len(adapter.lora) == 5
  _compare(model.apply, qtree, adapter, x)


@pytest.mark.parametrize("scheme, double_quant", SCHEMES[:2])
def test_scanned_custom_layers_on_a_quantized_base(scheme, double_quant):
  model, x = Stack(), jax.random.normal(jax.random.key(2), (2, 5, 64))
  _, qtree, adapter = _setup(model, x, scheme, double_quant)
  f = adapter.lora["params/layers/w"]
  assert f.roles.stacked == (0,) and f.a.shape == (2, 4, 64)  # per layer, fan_in D
  _compare(model.apply, qtree, adapter, x)


def test_quantized_kernel_without_an_adapter_is_dequantized_where_used():
  model, x = FlaxLayers(), jax.random.normal(jax.random.key(2), (2, 6, 64))
  variables = model.init(jax.random.key(0), x)
  qtree = jlora.quantize(variables, r".*kernel", "nf4", block_size=32)
  config = jlora.LoraConfig(rank=4, alpha=8.0, targets=r".*head/kernel")
  adapter = _trained(jlora.init(jax.random.key(1), qtree, config, model.apply, x))
  _compare(model.apply, qtree, adapter, x)


def test_route_and_dropout_on_a_quantized_base():
  model, x = FlaxLayers(), jax.random.normal(jax.random.key(2), (3, 6, 64))
  _, qtree, adapter = _setup(model, x, "nf4", False)
  other = _trained(adapter, seed=7)
  lora_apply = jax.jit(jlora.wrap(model.apply))
  routed = lora_apply(qtree, jlora.route(jlora.stack([adapter, other]), jnp.array([1, -1, 0])), x)
  _close(routed[0], lora_apply(qtree, other, x)[0], RTOL)
  _close(routed[1], model.apply(jlora.dequantize(qtree), x)[1], RTOL)
  _close(routed[2], lora_apply(qtree, adapter, x)[2], RTOL)
  with_dropout = dataclasses.replace(
      adapter, lora={p: dataclasses.replace(f, dropout=0.5) for p, f in adapter.lora.items()})
  key = jax.random.key(3)
  one = lora_apply(qtree, with_dropout, x, dropout_key=key)
  np.testing.assert_array_equal(one, lora_apply(qtree, with_dropout, x, dropout_key=key))
  assert float(jnp.max(jnp.abs(one - lora_apply(qtree, with_dropout, x)))) > 1e-3


# --- the backward pass keeps codes, not dequantized kernels ------------------------------------


def _residual_shapes(fn, *args, capsys) -> list[str]:
  capsys.readouterr()
  print_saved_residuals(fn, *args)
  return capsys.readouterr().out.splitlines()


def test_no_dequantized_kernel_is_saved_for_the_backward(capsys):
  model, x = FlaxLayers(), jax.random.normal(jax.random.key(2), (2, 6, 64))
  _, qtree, adapter = _setup(model, x, "nf4", False)
  kernel_shapes = {f"f32[{','.join(map(str, f.kernel_shape))}]" for f in adapter.lora.values()}
  assert "f32[64,64]" in kernel_shapes  # the head, the mix

  def saved(loss):
    lines = _residual_shapes(loss, adapter, capsys=capsys)
    assert lines  # print_saved_residuals printed something to read
    return [line for line in lines if line.split(" ")[0] in kernel_shapes]

  assert saved(lambda a: _loss(jlora.wrap(model.apply)(qtree, a, x))) == []
  # Not vacuous: the merged recipe keeps a dense kernel for its backward.
  assert saved(lambda a: _loss(model.apply(jlora.merge(qtree, a), x))) != []


def test_compiled_step_on_a_quantized_base_has_no_weight_gradient():
  model, x = Stack(), jax.random.normal(jax.random.key(2), (4, 24, 64))
  _, qtree, adapter = _setup(model, x, "nf4", True)

  def weight_gradients(apply):
    grad = jax.grad(lambda a: _loss(apply(a)))
    return hlo_weight_gradient_dots(jax.jit(grad).lower(adapter).compile().as_text(),
                                    64 * 2 * 32, 4 * 24)

  assert weight_gradients(lambda a: jlora.wrap(model.apply)(qtree, a, x)) == []
  assert weight_gradients(lambda a: model.apply(jlora.merge(qtree, a), x)) != []  # not vacuous


# --- init, summary, checkpoints --------------------------------------------------------------


def test_init_and_summary_accept_a_quantized_tree():
  model, x = FlaxLayers(), jax.random.normal(jax.random.key(2), (2, 6, 64))
  variables, qtree, adapter = _setup(model, x, "nf4", False)
  dense = jlora.init(jax.random.key(1), variables,
                     jlora.LoraConfig(rank=4, alpha=8.0, targets=r".*kernel"), model.apply, x)
  assert jax.tree.map(jnp.shape, dense) == jax.tree.map(jnp.shape, adapter)
  assert "frozen base:" in jlora.summary(adapter, qtree)


def test_save_and_restore_of_quantized_tree_and_adapter_are_bit_exact(tmp_path):
  model, x = FlaxLayers(), jax.random.normal(jax.random.key(2), (2, 6, 64))
  _, qtree, adapter = _setup(model, x, "nf4", True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "base", qtree)
    checkpointer.wait_until_finished()
    base = checkpointer.restore(tmp_path / "base", jax.eval_shape(lambda: qtree))
  assert jlora.save(tmp_path / "adapter", 3, adapter)
  restored = jlora.restore(tmp_path / "adapter").adapter
  for got, want in [(base, qtree), (restored, adapter)]:
    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(np.testing.assert_array_equal, got, want)
  np.testing.assert_array_equal(jlora.wrap(model.apply)(base, restored, x),
                                jlora.wrap(model.apply)(qtree, adapter, x))


# --- a device mesh ---------------------------------------------------------------------------


def test_fsdp_sharded_quantized_base_trains_like_one_device():
  """The quantized base sharded over 8 devices on its leading (input) axes, the batch over
  the same axis; three adamw steps give the losses of one device."""
  model, x = FlaxLayers(), jax.random.normal(jax.random.key(2), (8, 6, 64))
  _, qtree, adapter = _setup(model, x, "nf4", False)
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))

  def place(leaf):
    spec = P("fsdp") if leaf.ndim >= 2 and leaf.shape[0] % 8 == 0 else P()
    return jax.device_put(leaf, NamedSharding(mesh, spec))

  sharded = jax.tree.map(place, qtree)
  assert not sharded["params"]["head"]["kernel"].codes.sharding.is_fully_replicated
  optimizer = optax.adamw(1e-2)

  def train(tree, x):
    @jax.jit
    def step(adapter, opt_state):
      loss, grads = jax.value_and_grad(
          lambda a: jnp.mean(jlora.wrap(model.apply)(tree, a, x) ** 2))(adapter)
      updates, opt_state = optimizer.update(grads, opt_state, adapter)
      return optax.apply_updates(adapter, updates), opt_state, loss

    state, losses = (adapter, optimizer.init(adapter)), []
    for _ in range(3):
      *state, loss = step(*state)
      losses.append(float(loss))
    return losses

  one = train(qtree, x)
  many = train(sharded, jax.device_put(x, NamedSharding(mesh, P("fsdp"))))
  np.testing.assert_allclose(many, one, rtol=1e-5)
  assert one[-1] < one[0]
