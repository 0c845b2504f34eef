"""Tests for jlora/multi.py: `stack`, `select`, `route`, `combine`, `truncate`.

References are independent of the code under test: each adapter run alone on the merged model
(``model.apply(jlora.merge(variables, adapter), x)``), gradients of each adapter taken alone,
and float64 NumPy for W + Σ wᵢ·ΔWᵢ and for the singular values of the mix. Every adapter here
is "trained-looking" (noise on A and B, so B ≠ 0); the ranks, alphas and rsLoRA settings differ
within each stack.
"""

from collections.abc import Callable
from typing import NamedTuple

import chex
import conftest
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jlora

RTOL = 1e-4  # float32 vs float32 in another summation order, relative to max |reference|
ALL_KERNELS = r".*(kernel|embedding)"
# (rank, alpha, rsLoRA) of the adapters stacked on the tiny LM: all different.
SPECS = ((1, 2.0, False), (3, 1.0, True), (4, 8.0, False))


# ----------------------------------------------------------------------------------------------
# Helpers.


def _trained(adapter, seed, noise=0.3):
  """The adapter with Gaussian noise on every leaf, so B ≠ 0 like a trained one (NumPy, so
  no XLA compile per shape: leaves may be `jax.ShapeDtypeStruct`s)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(
      (np.asarray(x) if isinstance(x, jax.Array) else np.zeros(x.shape, x.dtype))
      + noise * rng.standard_normal(x.shape).astype(x.dtype)), adapter)


def _adapters(variables, *model_and_x, specs=SPECS, targets=ALL_KERNELS):
  """Trained-looking adapters of the given (rank, alpha, rsLoRA); A and B random."""
  out = []
  for seed, (rank, alpha, rs) in enumerate(specs):
    c = jlora.LoraConfig(rank=rank, alpha=alpha, use_rslora=rs, targets=targets)
    shapes = jax.eval_shape(lambda c=c: jlora.init(jax.random.key(0), variables, c, *model_and_x))
    out.append(_trained(shapes, seed))
  return out


def _assert_close(actual, expected, rtol=RTOL, what=""):
  a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert a.shape == e.shape, (what, a.shape, e.shape)
  err, bound = np.max(np.abs(a - e)), rtol * max(np.max(np.abs(e)), 1e-30)
  assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def _np_matrix(f, weight=1.0):
  """float64 w·s·AᵀB as (*stacked, fan_in, fan_out)."""
  a, b = np.asarray(f.a, np.float64), np.asarray(f.b, np.float64)
  return np.einsum("...ri,...ro->...io", a, b) * f.scale * weight


def _np_kernel(f, matrix):
  """A (*stacked, fan_in, fan_out) matrix in the kernel's own layout."""
  order = f.roles.stacked + f.roles.contracting + f.roles.features
  return np.transpose(matrix.reshape([f.kernel_shape[i] for i in order]), np.argsort(order))


class LM(NamedTuple):
  model: nn.Module
  variables: dict
  ids: jax.Array
  adapters: list
  apply: Callable  # jax.jit(model.apply), the reference


@pytest.fixture(scope="module")
def lm():
  """The conftest TinyLM with three adapters on all its kernels: Embed (lookup and attend),
  Conv, scanned DenseGeneral in/out, Einsum and Dense."""
  model = conftest.TinyLM()
  ids = (jnp.arange(30).reshape(5, 6) * 7) % 20  # a batch of 5
  variables = model.init(jax.random.key(0), ids)
  return LM(model, variables, ids, _adapters(variables, model.apply, ids), jax.jit(model.apply))


class Wide(nn.Module):
  """Embed and Dense kernels wide enough for ranks up to 16."""

  @nn.compact
  def __call__(self, ids):
    return nn.Dense(32, name="dense")(nn.gelu(nn.Embed(40, 32, name="embed")(ids)))


# ----------------------------------------------------------------------------------------------
# stack and select.


def test_stack_pads_ranks_and_folds_scales(lm):
  *_, adapters, _ = lm
  stacked = jlora.stack(adapters)
  assert stacked.size == 3 and sorted(stacked.lora) == sorted(adapters[0].lora)
  for path, f in stacked.lora.items():
    assert f.scale == 1.0 and f.rank == 4
    for k, adapter in enumerate(adapters):
      g = adapter.lora[path]
      np.testing.assert_array_equal(f.a[k, ..., : g.rank, :], g.a)
      np.testing.assert_array_equal(f.b[k, ..., : g.rank, :], g.b * g.scale)
      assert not np.any(f.a[k, ..., g.rank:, :]) and not np.any(f.b[k, ..., g.rank:, :])


def test_select_equals_each_adapter_alone_every_kernel_kind_one_trace(lm):
  model, variables, ids, adapters, ref = lm
  lora_apply = jlora.wrap(model.apply)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def serve(stacked, i):
    return lora_apply(variables, jlora.select(stacked, i), ids)

  stacked = jlora.stack(adapters)
  for i, adapter in enumerate(adapters):
    _assert_close(serve(stacked, i), ref(jlora.merge(variables, adapter), ids),
                  what=f"adapter {i}")
  _assert_close(serve(stacked, -1), ref(variables, ids), what="base")
  # Under jit an index out of range cannot raise: it reads zero factors, the base model.
  _assert_close(serve(stacked, 7), ref(variables, ids), what="out of range")


def test_select_gives_an_ordinary_adapter_for_merge(lm):
  _, variables, _, adapters, _ = lm
  stacked = jlora.stack(adapters)
  for i, adapter in enumerate(adapters):
    chosen = jlora.select(stacked, i)
    assert isinstance(chosen, jlora.Adapter)
    merged = jlora.merge(variables, chosen)
    for path, f in adapter.lora.items():
      want = _np_kernel(f, _np_matrix(f)) + np.asarray(_leaf(variables, path), np.float64)
      _assert_close(_leaf(merged, path), want, what=path)


def _leaf(tree, path):
  for key in path.split("/"):
    tree = tree[key]
  return tree


def test_hot_swap_ranks_1_to_16_and_different_alphas_does_not_retrace():
  model, ids = Wide(), jnp.arange(12).reshape(2, 6) % 40
  variables = model.init(jax.random.key(0), ids)
  specs = [(r, 0.5 * r + r % 3, r % 2 == 1) for r in range(1, 17)]
  adapters = _adapters(variables, specs=specs)  # 2-D kernels: no model needed
  ref = jax.jit(model.apply)
  lora_apply = jlora.wrap(model.apply)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def serve(stacked, i):
    return lora_apply(variables, jlora.select(stacked, i), ids)

  stacked = jlora.stack(adapters)
  for i in (-1, 0, 5, 15, 7):
    want = ref(variables if i < 0 else jlora.merge(variables, adapters[i]), ids)
    _assert_close(serve(stacked, jnp.int32(i)), want, what=f"adapter {i}")
  # A new stack of the same shapes (other adapters, other alphas) reuses the compiled function.
  serve(jlora.stack([_trained(a, 99) for a in adapters]), jnp.int32(3))


# ----------------------------------------------------------------------------------------------
# route.


def test_route_each_example_equals_its_own_adapter_and_minus_one_the_base(lm):
  model, variables, ids, adapters, ref = lm
  lora_apply = jlora.wrap(model.apply)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def serve(stacked, example_ids):
    return lora_apply(variables, jlora.route(stacked, example_ids), ids)

  stacked = jlora.stack(adapters)
  alone = [ref(jlora.merge(variables, a), ids) for a in adapters]
  alone.append(ref(variables, ids))  # index -1
  for example_ids in ([2, -1, 0, 1, 2], [-1, 1, 1, 0, -1]):
    y = serve(stacked, jnp.array(example_ids))
    for b, k in enumerate(example_ids):
      _assert_close(y[b], alone[k][b], what=f"example {b} (adapter {k})")


def test_route_result_layout(lm):
  *_, adapters, _ = lm
  routed = jlora.route(jlora.stack(adapters), jnp.array([0, 2, -1]))
  f = routed.lora["params/layers/attn/query/kernel"]  # scanned: 2 layers
  assert f.a.shape == (2, 3, 4, 8) and f.b.shape == (2, 3, 4, 8) and f.scale == 1.0
  assert not np.any(f.a[:, 2]) and not np.any(f.b[:, 2])


NNX_FACTORED = r"(conv|query|value|out|head)/kernel"  # nnx Conv, LinearGeneral, Einsum, Linear


def _nnx_adapters(tiny_nnx, targets):
  graphdef, state, ids = tiny_nnx
  model = nnx.merge(graphdef, state)
  return _adapters(state, model, ids, specs=SPECS[:2], targets=targets)


def test_route_nnx_conv_linear_general_einsum_linear(tiny_nnx):
  graphdef, state, ids = tiny_nnx
  adapters = _nnx_adapters(tiny_nnx, NNX_FACTORED)
  lora_apply = jlora.wrap(graphdef)
  y = jax.jit(lambda s, e: lora_apply(state, jlora.route(s, e), ids))(
      jlora.stack(adapters), jnp.array([1, -1]))
  _assert_close(y[0], lora_apply(state, adapters[1], ids)[0])
  _assert_close(y[1], nnx.merge(graphdef, state)(ids)[1])


def test_routed_gradients_reach_each_adapter_only_from_its_examples(lm):
  model, variables, ids, adapters, ref = lm
  adapters = [*adapters, _trained(adapters[0], 42)]  # adapter 3: used by no example
  example_ids = jnp.array([0, 2, 0, -1, 2])
  lora_apply = jlora.wrap(model.apply)

  def loss(adapter, x):
    return jnp.sum(jnp.sin(lora_apply(variables, adapter, x)))

  stacked = jlora.stack(adapters)
  got = jax.jit(jax.grad(lambda s: loss(jlora.route(s, example_ids), ids)))(stacked)
  alone = jax.jit(jax.grad(loss))
  for k, adapter in enumerate(adapters):
    rows = np.flatnonzero(np.asarray(example_ids) == k)
    for path, f in adapter.lora.items():
      ga, gb = got.lora[path].a[k], got.lora[path].b[k]
      if not rows.size:
        assert not np.any(ga) and not np.any(gb), (k, path)
        continue
      want = alone(adapter, ids[rows]).lora[path]  # adapter k alone on its examples
      # The stack holds b·s, so its gradient is the gradient of b divided by s.
      _assert_close(ga[..., : f.rank, :], want.a, what=f"{k} {path} a")
      _assert_close(gb[..., : f.rank, :], want.b / f.scale, what=f"{k} {path} b")
      assert not np.any(ga[..., f.rank:, :]) and not np.any(gb[..., f.rank:, :])


# ----------------------------------------------------------------------------------------------
# combine and truncate.

WEIGHTS = (0.7, -0.2, 0.5)


def test_combine_cat_is_exact_against_float64_numpy(lm):
  _, variables, _, adapters, _ = lm
  traces = []

  @jax.jit
  def mixed(adapters, weights):
    traces.append(1)
    return jlora.merge(variables, jlora.combine(adapters, weights, method="cat"))

  for weights in (WEIGHTS, (0.25, 0.25, 0.5)):
    merged = mixed(adapters, jnp.array(weights))
    for path in adapters[0].lora:
      f = adapters[0].lora[path]
      update = sum(_np_matrix(a.lora[path], w) for a, w in zip(adapters, weights, strict=True))
      want = np.asarray(_leaf(variables, path), np.float64) + _np_kernel(f, update)
      _assert_close(_leaf(merged, path), want, what=path)
  assert len(traces) == 1  # a new mix does not retrace
  mix = jlora.combine(adapters, jnp.array(WEIGHTS))
  assert all(f.rank == 1 + 3 + 4 and f.scale == 1.0 for f in mix.lora.values())


def test_combine_cat_runs_through_wrap(lm):
  model, variables, ids, adapters, ref = lm
  mix = jlora.combine(adapters[:2], [0.5, 0.5])
  y = jax.jit(jlora.wrap(model.apply))(variables, mix, ids)
  _assert_close(y, ref(jlora.merge(variables, mix), ids))


@pytest.mark.parametrize("rank", [1, 3])
def test_combine_svd_error_is_the_singular_value_tail(lm, rank):
  _, _, _, adapters, _ = lm
  mix = jlora.combine(adapters, jnp.array(WEIGHTS))
  small, error = jax.jit(jlora.truncate, static_argnums=1)(mix, rank)
  svd_only = jlora.combine(adapters, jnp.array(WEIGHTS), method="svd", rank=rank)
  for path in adapters[0].lora:
    full = sum(_np_matrix(a.lora[path], w) for a, w in zip(adapters, WEIGHTS, strict=True))
    u, s, vt = np.linalg.svd(full, full_matrices=False)
    tail = np.sqrt(np.sum(s[..., rank:] ** 2))
    best = np.einsum("...ik,...k,...kj->...ij", u[..., :rank], s[..., :rank], vt[..., :rank, :])
    scale = np.sqrt(np.sum(s**2))  # ‖ΔW‖_F
    assert abs(float(error[path]) - tail) <= 1e-5 * scale, (path, float(error[path]), tail)
    for got in (small.lora[path], svd_only.lora[path]):
      assert got.rank == rank and got.scale == 1.0
      np.testing.assert_allclose(_np_matrix(got), best, atol=1e-5 * scale)


def test_truncate_to_the_full_rank_is_lossless(lm):
  *_, adapters, _ = lm
  small, error = jlora.truncate(adapters[2], 4)
  for path, f in adapters[2].lora.items():
    np.testing.assert_allclose(_np_matrix(small.lora[path]), _np_matrix(f),
                               atol=1e-5 * np.abs(_np_matrix(f)).max())
    assert float(error[path]) <= 1e-5 * np.linalg.norm(_np_matrix(f))


# ----------------------------------------------------------------------------------------------
# Subsets and bad input.


def _dense_adapter(shape=(8, 4), rank=2, targets="fc/kernel", seed=0, **config):
  params = {"fc": {"kernel": jnp.ones(shape), "bias": jnp.zeros(shape[1])},
            "gc": {"kernel": jnp.ones((4, 4))}}
  c = jlora.LoraConfig(rank=rank, alpha=2.0, targets=targets, **config)
  return params, _trained(jax.eval_shape(lambda: jlora.init(jax.random.key(0), params, c)), seed)


def test_subsets_only_when_allowed():
  params, both = _dense_adapter(targets="(fc|gc)/kernel")
  _, fc_only = _dense_adapter(seed=1)
  with pytest.raises(ValueError, match=r"adapters\[1\] has no update for 'gc/kernel'.*"
                                       r"allow_subsets=True"):
    jlora.stack([both, fc_only])
  stacked = jlora.stack([both, fc_only], allow_subsets=True)
  np.testing.assert_array_equal(jlora.merge(params, jlora.select(stacked, 1))["gc"]["kernel"],
                                params["gc"]["kernel"])
  mix = jlora.combine([both, fc_only], [1.0, 1.0], allow_subsets=True)
  assert mix.lora["gc/kernel"].rank == 2 and mix.lora["fc/kernel"].rank == 4


def test_stack_different_base_shapes_names_the_path():
  _, a = _dense_adapter((8, 4))
  _, b = _dense_adapter((8, 5))
  with pytest.raises(ValueError, match=r"adapters\[0\] and adapters\[1\] differ at "
                                       r"'fc/kernel': kernel \(8, 4\).*\(8, 5\)"):
    jlora.stack([a, b])
  with pytest.raises(ValueError, match=r"differ at 'fc/kernel'"):
    jlora.combine([a, b], [0.5, 0.5])


def test_stack_bad_arguments():
  _, a = _dense_adapter()
  _, with_bias = _dense_adapter(trainable="fc/bias")
  _, dropout = _dense_adapter(dropout=0.1)
  with pytest.raises(ValueError, match=r"extra leaves at 'fc/bias'.*LoraConfig.trainable"):
    jlora.stack([a, with_bias])
  with pytest.raises(ValueError, match=r"LoRA dropout 0.0 and 0.1 at 'fc/kernel'"):
    jlora.stack([a, dropout])
  with pytest.raises(TypeError, match=r"expected a list of jlora.Adapter, got Adapter"):
    jlora.stack(a)
  with pytest.raises(ValueError, match=r"empty list"):
    jlora.stack([])
  with pytest.raises(TypeError, match=r"adapters\[1\] is a AdapterStack"):
    jlora.stack([a, jlora.stack([a])])


def test_stacks_with_extras_select_but_do_not_route():
  params, a = _dense_adapter(trainable="fc/bias")
  _, b = _dense_adapter(trainable="fc/bias", seed=1)
  stacked = jlora.stack([a, b])
  np.testing.assert_array_equal(jlora.select(stacked, 1).extras["fc/bias"], b.extras["fc/bias"])
  with pytest.raises(ValueError, match=r"index -1 \(the base model\) has no values.*fc/bias"):
    jlora.select(stacked, -1)
  with pytest.raises(ValueError, match=r"route: the stack has trained extra leaves \['fc/bias'\]"):
    jlora.route(stacked, jnp.array([0, 1]))
  with pytest.raises(ValueError, match=r"combine: adapters\[0\] has trained extra leaves"):
    jlora.combine([a, b], [0.5, 0.5])


def test_ids_out_of_range():
  _, a = _dense_adapter()
  stacked = jlora.stack([a, a, a])
  with pytest.raises(ValueError, match=r"ids must lie in \[-1, 3\).*got \[3, -2\]"):
    jlora.route(stacked, jnp.array([0, 3, -1, -2]))
  with pytest.raises(ValueError, match=r"index must lie in \[-1, 3\).*got \[5\]"):
    jlora.select(stacked, 5)
  with pytest.raises(ValueError, match=r"ids must have shape \(batch,\)"):
    jlora.route(stacked, jnp.zeros((2, 2), jnp.int32))
  with pytest.raises(ValueError, match=r"index must be a scalar"):
    jlora.select(stacked, jnp.array([0, 1]))
  with pytest.raises(TypeError, match=r"ids must have an integer dtype, got float32"):
    jlora.route(stacked, jnp.array([0.0, 1.0]))
  with pytest.raises(TypeError, match=r"expected a jlora.AdapterStack, got Adapter"):
    jlora.route(a, jnp.array([0]))
  # Under jit nothing can raise: out-of-range ids read zero factors, i.e. the base model.
  routed = jax.jit(jlora.route)(stacked, jnp.array([0, 3, -2]))
  assert np.any(routed.lora["fc/kernel"].b[0]) and not np.any(routed.lora["fc/kernel"].b[1:])


def test_stack_and_routed_adapters_are_refused_where_one_adapter_is_expected(tmp_path):
  params, a = _dense_adapter()
  stacked = jlora.stack([a, a])
  with pytest.raises(TypeError, match=r"Expected a jlora.Adapter, got AdapterStack"):
    jlora.merge(params, stacked)
  routed = jlora.route(stacked, jnp.array([0, 1]))
  with pytest.raises(ValueError, match=r"fc/kernel: these factors have a per-example axis"):
    jlora.merge(params, routed)
  for fn in (lambda: jlora.combine([a, routed], [1.0, 1.0]), lambda: jlora.stack([routed]),
             lambda: jlora.truncate(routed, 1)):
    with pytest.raises(ValueError, match=r"(combine|stack|truncate): adapters\[\d\]: fc/kernel: "
                       r"these factors have a per-example axis \(from jlora\.route\).*Fix:"):
      fn()
  with pytest.raises(ValueError, match=r"unmerge: fc/kernel: these factors have a per-example"):
    jlora.unmerge(params, routed)
  with pytest.raises(ValueError, match=r"export_peft: fc/kernel: these factors have a per-example"):
    jlora.export_peft(tmp_path / "out", routed)
  assert not (tmp_path / "out").exists()


def test_combine_bad_arguments():
  _, a = _dense_adapter()
  _, b = _dense_adapter(rank=4, seed=1)
  with pytest.raises(ValueError, match=r"weights of shape \(3,\) for 2 adapters"):
    jlora.combine([a, b], [0.2, 0.3, 0.5])
  with pytest.raises(ValueError, match=r"weights of shape \(2, 1\) for 2 adapters"):
    jlora.combine([a, b], jnp.ones((2, 1)))
  for rank in (0, -1, None, 2.0):
    with pytest.raises(ValueError, match=r"SVD rank must be an int >= 1, got rank="):
      jlora.combine([a, b], [0.5, 0.5], method="svd", rank=rank)
  with pytest.raises(ValueError, match=r"SVD rank 5 exceeds min\(fan_in, fan_out\) = "
                                       r"min\(8, 4\) at 'fc/kernel'"):
    jlora.combine([a, b], [0.5, 0.5], method="svd", rank=5)
  with pytest.raises(ValueError, match=r"method='cat' is exact.*rank=2"):
    jlora.combine([a, b], [0.5, 0.5], rank=2)
  with pytest.raises(ValueError, match=r"unknown method='linear'"):
    jlora.combine([a, b], [0.5, 0.5], method="linear")
  with pytest.raises(ValueError, match=r"SVD rank must be an int >= 1, got rank=0"):
    jlora.truncate(a, 0)
  # Success beside each failure: four weights would fail, two mix.
  assert jlora.combine([a, b], [0.5, 0.5], method="svd", rank=4).lora["fc/kernel"].rank == 4


@pytest.mark.parametrize("layer, x", [
    (nn.Embed(10, 4), jnp.zeros((3, 5), jnp.int32)),
    (nn.Conv(4, (3,)), jnp.ones((3, 5, 2))),
    (nn.Dense(4), jnp.ones((3, 5, 2))),
], ids=["lookup", "conv", "dense"])
def test_route_with_ids_of_another_length_than_the_batch_names_the_kernel(layer, x):
  variables = layer.init(jax.random.key(0), x)
  config = jlora.LoraConfig(rank=1, alpha=1.0, targets=".*(kernel|embedding)")
  adapter = jlora.init(jax.random.key(1), variables, config, layer.apply, x)
  stacked = jlora.stack([adapter, adapter])
  with pytest.raises(ValueError, match=r"params/(kernel|embedding): the routed adapter has 2 "
                     r"examples \(len\(ids\) in jlora.route\).*Fix: pass ids with one entry"):
    jlora.wrap(layer.apply)(variables, jlora.route(stacked, jnp.array([0, 1])), x)
  y = jlora.wrap(layer.apply)(variables, jlora.route(stacked, jnp.array([0, 1, -1])), x)
  assert y.shape == layer.apply(variables, x).shape
