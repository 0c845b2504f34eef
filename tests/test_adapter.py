"""Tests for jlora/adapter.py: `init` and the adapter pytree."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora import AxisRoles

KEY = jax.random.key(0)


def _params(dtype=jnp.float32):
  return {"fc": {"kernel": jnp.ones((4, 3), dtype), "bias": jnp.zeros(3, dtype)},
          "head": {"kernel": jnp.ones((3, 5), dtype)}}


def _snapshot(tree):
  """Structure and values of a tree, to check that a failed call changed nothing."""
  return jax.tree.structure(tree), [np.asarray(x) for x in jax.tree.leaves(tree)]


def _assert_unchanged(tree, snapshot):
  structure, leaves = snapshot
  assert jax.tree.structure(tree) == structure
  for x, y in zip(jax.tree.leaves(tree), leaves, strict=True):
    np.testing.assert_array_equal(np.asarray(x), y)



def _abstract_init(variables, config, model=None, *args) -> jlora.Adapter:
  return jax.eval_shape(lambda v: jlora.init(KEY, v, config, model, *args), variables)


# --- targets ----------------------------------------------------------------------------------


def test_targets_matching_nothing_list_close_real_paths(abstract_lm):
  model, variables, ids = abstract_lm
  config = jlora.LoraConfig(rank=2, alpha=4.0, targets=r".*/(q|v)_proj/kernel")
  with pytest.raises(ValueError, match=r"(?s)matched no leaf.*\(q\|v\)_proj.*paths that look "
                     r"close: .*params/layers/attn/\w+/kernel.*Fix:"):
    jlora.init(KEY, variables, config, model.apply, ids)
  ok = jlora.LoraConfig(rank=2, alpha=4.0, targets=r".*/(query|value)/kernel")
  assert sorted(_abstract_init(variables, ok, model.apply, ids).lora) == [
      "params/layers/attn/query/kernel", "params/layers/attn/value/kernel"]


def test_callable_targets_matching_nothing_raise():
  params = _params()
  snap = _snapshot(params)
  config = jlora.LoraConfig(rank=1, alpha=1.0, targets=lambda path, leaf: leaf.ndim == 4)
  with pytest.raises(ValueError, match=r"(?s)matched no leaf.*paths that look close: .*fc/"):
    jlora.init(KEY, params, config)
  _assert_unchanged(params, snap)
  config = jlora.LoraConfig(rank=1, alpha=1.0, targets=lambda path, leaf: leaf.ndim == 2)
  assert sorted(jlora.init(KEY, params, config).lora) == ["fc/kernel", "head/kernel"]


def test_exclude_removing_every_target_says_so():
  # targets match fc/kernel and head/kernel; exclude removes both. The error must point at
  # `exclude`, not claim that the targets regex matched nothing.
  config = jlora.LoraConfig(rank=1, alpha=1.0, targets=r".*kernel", exclude=r"(fc|head)/.*")
  with pytest.raises(ValueError, match=r"exclude removed every leaf"):
    jlora.init(KEY, _params(), config)
  config = jlora.LoraConfig(rank=1, alpha=1.0, targets=r".*kernel", exclude=r"head/.*")
  assert list(jlora.init(KEY, _params(), config).lora) == ["fc/kernel"]


def test_exclude_and_rank_pattern_are_applied():
  config = jlora.LoraConfig(rank=2, alpha=4.0, targets=r".*kernel", exclude=r"head/.*",
                            rank_pattern={r"fc/.*": 3})
  adapter = jlora.init(KEY, _params(), config)
  assert list(adapter.lora) == ["fc/kernel"]
  factors = adapter.lora["fc/kernel"]
  assert (factors.a.shape, factors.b.shape, factors.rank) == ((3, 4), (3, 3), 3)
  assert factors.scale == 4.0 / 3 and factors.kernel_shape == (4, 3)


# --- rank -------------------------------------------------------------------------------------


def test_rank_above_min_fan_in_fan_out_names_the_path():
  params = _params()
  snap = _snapshot(params)
  config = jlora.LoraConfig(rank=4, alpha=1.0, targets=r"fc/kernel")
  with pytest.raises(ValueError, match=r"fc/kernel: rank 4 exceeds min\(fan_in, fan_out\) = "
                     r"min\(4, 3\) of its kernel \(4, 3\).*rank_pattern"):
    jlora.init(KEY, params, config)
  _assert_unchanged(params, snap)
  assert jlora.init(KEY, params, jlora.LoraConfig(rank=3, alpha=1.0, targets=r"fc/kernel"))


def test_rank_from_rank_pattern_is_checked_per_path():
  config = jlora.LoraConfig(rank=2, alpha=1.0, targets=r".*kernel", rank_pattern={"head/.*": 5})
  with pytest.raises(ValueError, match=r"head/kernel: rank 5 exceeds .* min\(3, 5\)"):
    jlora.init(KEY, _params(), config)
  config = jlora.LoraConfig(rank=2, alpha=1.0, targets=r".*kernel", rank_pattern={"head/.*": 3})
  assert jlora.init(KEY, _params(), config).lora["head/kernel"].rank == 3


def test_rank_limit_uses_the_traced_fan_in_of_multi_axis_kernels(abstract_lm):
  # out/kernel (layers, heads, head_dim, dim) = (2, 2, 4, 8): fan_in 8, fan_out 8.
  model, variables, ids = abstract_lm
  config = jlora.LoraConfig(rank=9, alpha=1.0, targets=r".*attn/out/kernel")
  with pytest.raises(ValueError, match=r"params/layers/attn/out/kernel: rank 9 exceeds .* "
                     r"min\(8, 8\)"):
    jlora.init(KEY, variables, config, model.apply, ids)
  config = jlora.LoraConfig(rank=8, alpha=1.0, targets=r".*attn/out/kernel")
  assert _abstract_init(variables, config, model.apply, ids).lora[
      "params/layers/attn/out/kernel"].a.shape == (2, 8, 8)


# --- leaves that are not kernels ----------------------------------------------------------------


@pytest.mark.parametrize("target, path", [
    (r".*/norm/scale", "params/layers/norm/scale"),
    (r".*/conv/bias", "params/conv/bias"),
    (r".*/attn/query/bias", "params/layers/attn/query/bias"),
])
def test_bias_or_norm_scale_with_a_model_names_it_and_says_why(abstract_lm, target, path):
  model, variables, ids = abstract_lm
  config = jlora.LoraConfig(rank=1, alpha=1.0, targets=target)
  with pytest.raises(ValueError, match=rf"{path} was selected by LoraConfig\.targets, but no "
                     r"contraction.*(?s:.*)a bias, a norm scale.*LoraConfig\.trainable"):
    jlora.init(KEY, variables, config, model.apply, ids)
  # As a trainable extra it is fine.
  config = jlora.LoraConfig(rank=1, alpha=1.0, targets=r".*/conv/kernel", trainable=target)
  adapter = _abstract_init(variables, config, model.apply, ids)
  assert list(adapter.extras) == [path] and list(adapter.lora) == ["params/conv/kernel"]


def test_bias_without_a_model_names_it_and_says_it_is_no_kernel():
  params = _params()
  config = jlora.LoraConfig(rank=1, alpha=1.0, targets=r"fc/.*")
  with pytest.raises(ValueError, match=r"fc/bias.*shape \(3,\).*not a kernel") as info:
    jlora.init(KEY, params, config)
  assert "more than two axes" not in str(info.value)  # a (3,) bias has one axis
  config = jlora.LoraConfig(rank=1, alpha=1.0, targets=r"fc/kernel", trainable=r"fc/bias")
  assert list(jlora.init(KEY, params, config).extras) == ["fc/bias"]


def test_multi_axis_kernel_without_a_model_raises(abstract_lm):
  _, variables, _ = abstract_lm
  config = jlora.LoraConfig(rank=1, alpha=1.0, targets=r".*/attn/query/kernel")
  with pytest.raises(ValueError, match=r"params/layers/attn/query/kernel: a kernel of shape "
                     r"\(2, 8, 2, 4\) has more than two axes.*Fix: pass the model"):
    jlora.init(KEY, variables, config)
  config = jlora.LoraConfig(rank=1, alpha=1.0, targets=r".*/attn/query/kernel",
                            roles={r".*/query/kernel": "sioo"})
  assert _abstract_init(variables, config).lora["params/layers/attn/query/kernel"].roles == (
      AxisRoles("dense", (1,), (2, 3), stacked=(0,)))


# --- config.roles -----------------------------------------------------------------------------


def test_config_roles_letters_are_used():
  params = {"w": {"kernel": jnp.ones((3, 4, 5))}, "v": {"kernel": jnp.ones((6, 2))}}
  config = jlora.LoraConfig(rank=2, alpha=1.0, targets=r".*kernel",
                            roles={r"w/.*": "sio", r"v/.*": "oi"})
  adapter = jlora.init(KEY, params, config)
  w, v = adapter.lora["w/kernel"], adapter.lora["v/kernel"]
  assert w.roles == AxisRoles("dense", (1,), (2,), stacked=(0,))
  assert (w.a.shape, w.b.shape) == ((3, 2, 4), (3, 2, 5))
  assert v.roles == AxisRoles("dense", (1,), (0,))  # stored (out, in)
  assert (v.a.shape, v.b.shape) == ((2, 2), (2, 6))


def test_config_roles_with_the_wrong_number_of_letters_raise():
  params = {"w": {"kernel": jnp.ones((3, 4, 5))}}
  config = jlora.LoraConfig(rank=2, alpha=1.0, targets=r".*kernel", roles={r".*": "io"})
  with pytest.raises(ValueError, match=r"w/kernel: LoraConfig\.roles gives 'io' \(2 axes\) for "
                     r"a kernel of shape \(3, 4, 5\)"):
    jlora.init(KEY, params, config)
  config = jlora.LoraConfig(rank=2, alpha=1.0, targets=r".*kernel", roles={r".*": "iio"})
  assert jlora.init(KEY, params, config).lora["w/kernel"].a.shape == (2, 12)


def test_config_roles_override_the_traced_roles():
  module, x = nn.Dense(5), jnp.ones((2, 3))
  variables = jax.eval_shape(module.init, KEY, x)
  config = jlora.LoraConfig(rank=2, alpha=1.0, targets=r".*kernel", roles={r".*": "io"})
  assert _abstract_init(variables, config, module.apply, x).lora["params/kernel"].roles == (
      AxisRoles("dense", (0,), (1,)))


# --- initial values ---------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["kaiming", "gaussian"])
def test_b_starts_at_exactly_zero_and_a_does_not(scheme):
  config = jlora.LoraConfig(rank=2, alpha=1.0, targets=r".*kernel", init=scheme)
  for factors in jlora.init(KEY, _params(), config).lora.values():
    np.testing.assert_array_equal(factors.b, np.zeros(factors.b.shape))
    assert np.all(np.asarray(factors.a) != 0)


def test_kaiming_a_is_uniform_with_bound_one_over_sqrt_fan_in():
  fan_in, rank = 256, 16
  params = {"w": {"kernel": jnp.zeros((fan_in, 64))}}
  config = jlora.LoraConfig(rank=rank, alpha=1.0, targets=r".*", init="kaiming")
  a = np.asarray(jlora.init(KEY, params, config).lora["w/kernel"].a, np.float64)
  bound = 1 / math.sqrt(fan_in)
  assert np.abs(a).max() <= bound
  assert np.abs(a).max() > 0.98 * bound  # 4096 draws reach the edge
  # Uniform(-b, b): std b/√3; 4096 draws estimate it within ~1.1% (one sigma); allow 5%.
  assert a.std() == pytest.approx(bound / math.sqrt(3), rel=0.05)
  assert abs(a.mean()) < 0.05 * bound


def test_gaussian_a_has_std_one_over_rank():
  rank = 8
  params = {"w": {"kernel": jnp.zeros((512, 64))}}
  config = jlora.LoraConfig(rank=rank, alpha=1.0, targets=r".*", init="gaussian")
  a = np.asarray(jlora.init(KEY, params, config).lora["w/kernel"].a, np.float64)
  # N(0, (1/r)^2) as in PEFT's "gaussian": 4096 draws estimate the std within ~1.1%; allow 5%.
  assert a.std() == pytest.approx(1 / rank, rel=0.05)
  assert abs(a.mean()) < 0.05 / rank
  assert np.abs(a).max() > 3 / rank  # not a bounded (uniform) draw


def test_same_key_same_adapter_and_each_kernel_gets_its_own_draw():
  params = {"p": {"kernel": jnp.zeros((4, 4))}, "q": {"kernel": jnp.zeros((4, 4))}}
  config = jlora.LoraConfig(rank=2, alpha=1.0, targets=r".*kernel")
  one, two = jlora.init(KEY, params, config), jlora.init(KEY, params, config)
  other = jlora.init(jax.random.key(1), params, config)
  np.testing.assert_array_equal(one.lora["p/kernel"].a, two.lora["p/kernel"].a)
  assert not np.array_equal(one.lora["p/kernel"].a, one.lora["q/kernel"].a)
  assert not np.array_equal(one.lora["p/kernel"].a, other.lora["p/kernel"].a)


# --- dtypes -----------------------------------------------------------------------------------


def test_adapter_dtype_defaults_to_float32_even_for_a_bfloat16_base():
  params = _params(jnp.bfloat16)
  config = jlora.LoraConfig(rank=2, alpha=1.0, targets=r".*kernel", trainable=r".*bias")
  adapter = jlora.init(KEY, params, config)
  assert {x.dtype for x in jax.tree.leaves(adapter)} == {jnp.dtype(jnp.float32)}


def test_adapter_dtype_follows_the_config():
  config = jlora.LoraConfig(rank=2, alpha=1.0, targets=r".*kernel", dtype="bfloat16")
  adapter = jlora.init(KEY, _params(), config)
  assert {x.dtype for x in jax.tree.leaves(adapter)} == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.parametrize("base, adapter_dtype", [(jnp.float32, "bfloat16"),
                                                 (jnp.bfloat16, "float32")])
def test_extras_are_copies_in_the_config_dtype(base, adapter_dtype):
  bias = jnp.linspace(-1, 1, 3).astype(base)
  params = {"fc": {"kernel": jnp.ones((4, 3), base), "bias": bias}}
  config = jlora.LoraConfig(rank=2, alpha=1.0, targets=r".*kernel", trainable=r".*",
                            dtype=adapter_dtype)
  adapter = jlora.init(KEY, params, config)
  assert list(adapter.extras) == ["fc/bias"]  # the kernel is adapted, not trained in full
  extra = adapter.extras["fc/bias"]
  assert extra.dtype == jnp.dtype(adapter_dtype)
  np.testing.assert_array_equal(extra, bias.astype(adapter_dtype))
  assert params["fc"]["bias"].dtype == base  # the input is untouched


# --- abstract inputs and NNX ------------------------------------------------------------------


def test_init_under_eval_shape_matches_the_concrete_init():
  params = _params()
  config = jlora.LoraConfig(rank=2, alpha=4.0, targets=r".*kernel", trainable=r".*bias")
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  abstract = _abstract_init(shapes, config)
  concrete = jlora.init(KEY, params, config)
  assert jax.tree.structure(abstract) == jax.tree.structure(concrete)  # static metadata too
  assert jax.tree.map(lambda x: (x.shape, x.dtype), abstract) == jax.tree.map(
      lambda x: (x.shape, x.dtype), concrete)


def test_init_traces_a_model_on_shape_dtype_structs(abstract_lm):
  model, variables, ids = abstract_lm
  config = jlora.LoraConfig(rank=2, alpha=4.0, targets=r".*(kernel|embedding)")
  ids_shape = jax.ShapeDtypeStruct(ids.shape, ids.dtype)
  adapter = _abstract_init(variables, config, model.apply, ids_shape)
  assert len(adapter.lora) == 8


def test_init_accepts_shape_dtype_struct_leaves_directly():
  # The docstring: "its leaves may be arrays or `jax.ShapeDtypeStruct`", extras included.
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _params())
  config = jlora.LoraConfig(rank=2, alpha=4.0, targets=r".*kernel", trainable=r".*bias")
  adapter = jlora.init(KEY, params, config)
  assert adapter.extras["fc/bias"].shape == (3,)
  assert adapter.lora["fc/kernel"].a.shape == (2, 4)


def test_nnx_state_paths_and_roles(abstract_nnx):
  model, state = abstract_nnx
  config = jlora.LoraConfig(rank=2, alpha=4.0, targets=r"(conv|out|head)/kernel",
                            trainable=r"head/bias")
  adapter = _abstract_init(state, config, model, jnp.zeros((2, 6), jnp.int32))
  assert sorted(adapter.lora) == ["conv/kernel", "head/kernel", "out/kernel"]
  assert list(adapter.extras) == ["head/bias"]
  assert adapter.lora["out/kernel"].a.shape == (2, 8)  # out kernel (2, 4, 8): fan_in 2·4


def test_nnx_bias_targeted_with_the_module_names_it(abstract_nnx):
  model, state = abstract_nnx
  config = jlora.LoraConfig(rank=1, alpha=1.0, targets=r"head/(kernel|bias)")
  ids = jnp.zeros((2, 6), jnp.int32)
  with pytest.raises(ValueError, match=r"head/bias was selected by LoraConfig\.targets"):
    _abstract_init(state, config, model, ids)
  config = jlora.LoraConfig(rank=1, alpha=1.0, targets=r"head/kernel", trainable=r"head/bias")
  assert list(_abstract_init(state, config, model).extras) == ["head/bias"]


# --- the pytree -------------------------------------------------------------------------------


def test_adapter_leaves_are_only_the_factors_and_extras():
  config = jlora.LoraConfig(rank=2, alpha=1.0, targets=r".*kernel", trainable=r".*bias")
  adapter = jlora.init(KEY, _params(), config)
  leaves = jax.tree.leaves(adapter)
  assert len(leaves) == 2 * 2 + 1
  assert jlora.num_params(adapter) == (2 * 4 + 2 * 3) + (2 * 3 + 2 * 5) + 3
  state = optax.adam(1e-3).init(adapter)  # optax sees A, B and the extras only
  assert jax.tree.structure(state[0].mu) == jax.tree.structure(adapter)


def test_adapter_survives_jit_with_its_static_metadata():
  config = jlora.LoraConfig(rank=2, alpha=4.0, targets=r".*kernel")
  adapter = jlora.init(KEY, _params(), config)
  back = jax.jit(lambda a: a)(adapter)
  assert back.lora["fc/kernel"].scale == 2.0
  assert back.lora["fc/kernel"].roles == adapter.lora["fc/kernel"].roles
  assert back.lora["fc/kernel"].kernel_shape == (4, 3)
