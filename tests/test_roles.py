"""Tests for jlora/roles.py: axis roles read from the program that uses each kernel.

Roles depend on shapes only, so these tests run abstractly: variables from
`jax.eval_shape(model.init, ...)`, adapters from `jax.eval_shape(jlora.init, ...)`. That also
checks that `init` works on `jax.ShapeDtypeStruct` leaves, and costs no compilation.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import jlora
from jlora import AxisRoles

KEY = jax.random.key(0)
IDS = jnp.zeros((2, 6), jnp.int32)  # an input for the TinyNNX fixture


def _roles(adapter) -> dict:
  return {path: factors.roles for path, factors in adapter.lora.items()}


def _abstract_init(variables, config, model=None, *args) -> jlora.Adapter:
  return jax.eval_shape(lambda v: jlora.init(KEY, v, config, model, *args), variables)


def _linen_roles(module, x, targets=r".*(kernel|embedding)", **config):
  variables = jax.eval_shape(module.init, KEY, x)
  config = jlora.LoraConfig(rank=1, alpha=1.0, targets=targets, **config)
  return _roles(_abstract_init(variables, config, module.apply, x))



# --- the fixtures: every kernel kind ----------------------------------------------------------


def test_tiny_lm_roles_for_every_kernel_kind(abstract_lm):
  model, variables, ids = abstract_lm
  config = jlora.LoraConfig(rank=2, alpha=4.0, targets=r".*(kernel|embedding)")
  got = _roles(_abstract_init(variables, config, model.apply, ids))
  dense_out = AxisRoles("dense", contracting=(1,), features=(2, 3), stacked=(0,))
  assert got == {
      "params/embed/embedding": AxisRoles("embed", (0,), (1,)),
      "params/conv/kernel": AxisRoles("conv", (0, 1), (2,)),  # (window, cin) -> cout
      "params/layers/attn/query/kernel": dense_out,  # DenseGeneral, multi-axis out, scanned
      "params/layers/attn/key/kernel": dense_out,
      "params/layers/attn/value/kernel": dense_out,  # Einsum btd,dhk->bthk, scanned
      "params/layers/attn/out/kernel": AxisRoles("dense", (1, 2), (3,), (0,)),  # multi-axis in
      "params/layers/up/kernel": AxisRoles("dense", (1,), (2,), (0,)),
      "params/layers/down/kernel": AxisRoles("dense", (1,), (2,), (0,)),
  }


def test_tiny_lm_factor_shapes(abstract_lm):
  model, variables, ids = abstract_lm
  config = jlora.LoraConfig(rank=2, alpha=4.0, targets=r".*(kernel|embedding)")
  adapter = _abstract_init(variables, config, model.apply, ids)
  shapes = {p: (f.a.shape, f.b.shape) for p, f in adapter.lora.items()}
  assert shapes["params/embed/embedding"] == ((2, 20), (2, 8))
  assert shapes["params/conv/kernel"] == ((2, 24), (2, 8))  # kw·cin = 3·8
  assert shapes["params/layers/attn/query/kernel"] == ((2, 2, 8), (2, 2, 8))  # layers first
  assert shapes["params/layers/attn/out/kernel"] == ((2, 2, 8), (2, 2, 8))
  assert shapes["params/layers/up/kernel"] == ((2, 2, 8), (2, 2, 16))


def test_tiny_nnx_roles_are_read_from_its_program(abstract_nnx):
  model, state = abstract_nnx
  config = jlora.LoraConfig(rank=2, alpha=4.0, targets=r".*(kernel|embedding)")
  got = _roles(_abstract_init(state, config, model, IDS))
  assert got == {
      "embed/embedding": AxisRoles("embed", (0,), (1,)),
      "conv/kernel": AxisRoles("conv", (0, 1), (2,)),
      "query/kernel": AxisRoles("dense", (0,), (1, 2)),
      "value/kernel": AxisRoles("dense", (0,), (1, 2)),
      "out/kernel": AxisRoles("dense", (0, 1), (2,)),
      "head/kernel": AxisRoles("dense", (0,), (1,)),
  }


@pytest.mark.parametrize("with_module", [False, True])
def test_nnx_state_without_inputs_refuses_multi_axis_kernels(abstract_nnx, with_module):
  model, state = abstract_nnx
  config = jlora.LoraConfig(rank=2, alpha=4.0, targets=r"(query|head)/kernel")
  with pytest.raises(ValueError, match=r"query/kernel: a kernel of shape \(8, 2, 4\) has more"):
    _abstract_init(state, config, *((model,) if with_module else ()))
  adapter = _abstract_init(state, config, model, IDS)
  assert adapter.lora["query/kernel"].roles.features == (1, 2)


# --- roles follow the module, not the shape ---------------------------------------------------


@pytest.mark.parametrize("spec, shape, contracting, features", [
    ("btd,dhk->bthk", (6, 2, 3), (0,), (1, 2)),
    ("btd,hkd->bthk", (2, 3, 6), (2,), (0, 1)),  # contracted axis last
    ("btd,hdk->bthk", (2, 6, 3), (1,), (0, 2)),  # contracted axis in the middle
    ("bd,od->bo", (5, 6), (1,), (0,)),  # a 2-D kernel stored (out, in)
])
def test_einsum_roles_follow_the_spec(spec, shape, contracting, features):
  x = jnp.ones((2, 4, 6)) if spec.startswith("btd") else jnp.ones((2, 6))
  got = _linen_roles(nn.Einsum(shape, spec), x)
  assert got == {"params/kernel": AxisRoles("dense", contracting, features)}


def test_two_d_einsum_kernel_is_not_guessed_from_its_shape():
  # Without the model a 2-D kernel is read as (in, out); the model says (out, in).
  module, x = nn.Einsum((5, 6), "bd,od->bo"), jnp.ones((2, 6))
  variables = jax.eval_shape(module.init, KEY, x)
  config = jlora.LoraConfig(rank=2, alpha=1.0, targets=r".*kernel")
  guessed = _abstract_init(variables, config).lora["params/kernel"]
  traced = _abstract_init(variables, config, module.apply, x).lora["params/kernel"]
  assert (guessed.a.shape, guessed.b.shape) == ((2, 5), (2, 6))
  assert (traced.a.shape, traced.b.shape) == ((2, 6), (2, 5))


@pytest.mark.parametrize("module, x, expected", [
    (nn.Dense(5), jnp.ones((2, 3)), AxisRoles("dense", (0,), (1,))),
    (nn.DenseGeneral((2, 3)), jnp.ones((2, 4)), AxisRoles("dense", (0,), (1, 2))),
    (nn.DenseGeneral(5, axis=(-2, -1)), jnp.ones((2, 3, 4)), AxisRoles("dense", (0, 1), (2,))),
    (nn.DenseGeneral((2, 5), axis=(1, 2)), jnp.ones((2, 3, 4, 6)),
     AxisRoles("dense", (0, 1), (2, 3))),
    (nn.Conv(4, (3,)), jnp.ones((1, 5, 2)), AxisRoles("conv", (0, 1), (2,))),
    (nn.Conv(4, (3, 3)), jnp.ones((1, 5, 5, 2)), AxisRoles("conv", (0, 1, 2), (3,))),
    (nn.Embed(10, 4), jnp.arange(3), AxisRoles("embed", (0,), (1,))),
], ids=["dense", "dg_out", "dg_in", "dg_in_out", "conv1d", "conv2d", "embed"])
def test_linen_module_roles(module, x, expected):
  path = "params/embedding" if isinstance(module, nn.Embed) else "params/kernel"
  assert _linen_roles(module, x) == {path: expected}


class _ScanDense(nn.Module):
  axis: int = 0

  @nn.compact
  def __call__(self, x):
    body = lambda mdl, h, _: (nn.Dense(4, name="fc")(h), None)  # noqa: E731
    stack = nn.scan(body, variable_axes={"params": self.axis}, split_rngs={"params": True},
                    length=3)
    return stack(self, x, None)[0]


def test_scanned_kernel_gets_a_leading_stacked_axis():
  got = _linen_roles(_ScanDense(), jnp.ones((2, 4)))
  assert got == {"params/fc/kernel": AxisRoles("dense", (1,), (2,), stacked=(0,))}


def test_scan_over_a_non_leading_axis_is_read_from_the_program():
  # nn.scan(variable_axes={"params": 1}) moves the layer axis to the front before it slices.
  expected = {"params/fc/kernel": AxisRoles("dense", (0,), (2,), stacked=(1,))}
  assert _linen_roles(_ScanDense(axis=1), jnp.ones((2, 4))) == expected
  # Config letters state the same thing without a model.
  got = _linen_roles(_ScanDense(axis=1), jnp.ones((2, 4)), roles={r".*fc/kernel": "iso"})
  assert got == expected


# --- kernel axes a contraction batches over: one update per index ------------------------------


def test_dense_general_batch_dims_get_factors_per_index():
  x = jnp.ones((2, 3, 4))
  got = _linen_roles(nn.DenseGeneral(5, axis=-1, batch_dims=(0,)), x)
  assert got == {"params/kernel": AxisRoles("dense", (1,), (2,), stacked=(0,))}
  assert _linen_roles(nn.DenseGeneral(5, axis=-1), x)["params/kernel"].features == (1,)


def test_einsum_with_a_per_head_kernel_axis_gets_factors_per_head():
  x = jnp.ones((2, 3, 4))
  got = _linen_roles(nn.Einsum((3, 4, 5), "bhd,hdk->bhk"), x)
  assert got == {"params/kernel": AxisRoles("dense", (1,), (2,), stacked=(0,))}
  assert _linen_roles(nn.Einsum((4, 5), "bhd,dk->bhk"), x)["params/kernel"].contracting == (0,)


# --- kernels with no single low-rank update ---------------------------------------------------


def test_grouped_conv_is_refused_naming_the_op():
  x = jnp.ones((1, 5, 4))
  with pytest.raises(ValueError, match=r"params/kernel was selected.*no contraction.*it reaches: "
                     r"conv_general_dilated"):
    _linen_roles(nn.Conv(4, (3,), feature_group_count=2), x)
  assert _linen_roles(nn.Conv(4, (3,)), x)["params/kernel"].kind == "conv"


def test_uses_that_disagree_on_the_axes_are_refused():
  def fn(params, x):  # one kernel, contracted over axis 0 here and over axis 1 there
    w = params["w"]
    return jnp.einsum("bi,ijk->bjk", x, w).sum() + jnp.einsum("bj,ijk->bik", x[:, :3], w).sum()

  params, x = {"w": jnp.ones((4, 3, 5))}, jnp.ones((2, 4))
  config = jlora.LoraConfig(rank=1, alpha=1.0, targets="w")
  with pytest.raises(ValueError, match=r"w: the program's dot_general contracts kernel axes \[0\]"
                     r" but its dot_general contracts \[1\]"):
    _abstract_init(params, config, fn, x)


# --- NNX --------------------------------------------------------------------------------------


class _NNXStack(nnx.Module):
  """Three Linear layers made with nnx.vmap: one kernel of shape (layers, in, out)."""

  def __init__(self):
    @nnx.vmap(in_axes=0, out_axes=0)
    def make(key):
      return nnx.Linear(4, 5, rngs=nnx.Rngs(key))

    self.layers = make(jax.random.split(KEY, 3))

  def __call__(self, x):  # x: (layers, batch, 4), one slice per layer
    @nnx.vmap(in_axes=(0, 0), out_axes=0)
    def each(layer, x):
      return layer(x)

    return each(self.layers, x)


def test_nnx_stacked_kernel_gets_a_stacked_axis():
  model = nnx.eval_shape(_NNXStack)
  state = nnx.state(model)
  config = jlora.LoraConfig(rank=2, alpha=1.0, targets=r".*kernel")
  roles = _abstract_init(state, config, model, jnp.ones((3, 2, 4))).lora["layers/kernel"].roles
  assert roles == AxisRoles("dense", (1,), (2,), stacked=(0,))


def test_nnx_linear_general_multi_axis():
  model = nnx.eval_shape(lambda: nnx.LinearGeneral((2, 3), 5, axis=(-2, -1), rngs=nnx.Rngs(0)))
  config = jlora.LoraConfig(rank=2, alpha=1.0, targets=r".*kernel")
  x = jnp.ones((2, 2, 3))
  assert _abstract_init(nnx.state(model), config, model, x).lora["kernel"].roles == AxisRoles(
      "dense", (0, 1), (2,))


# --- AxisRoles itself -------------------------------------------------------------------------


def test_axis_roles_stack_and_unstack_are_inverse():
  roles = AxisRoles("dense", (0, 1), (2,))
  stacked = roles.stack(2)
  assert stacked == AxisRoles("dense", (2, 3), (4,), stacked=(0, 1))
  assert stacked.unstacked() == roles
  assert roles.stack(0) == roles


def test_axis_roles_are_hashable_static_metadata():
  roles = AxisRoles("conv", (0, 1), (2,))
  assert hash(roles) == hash(AxisRoles("conv", (0, 1), (2,)))
  assert jax.tree.leaves(roles) == [roles]  # not a pytree node: no array leaves hide in it
