"""Program-level `init` and `wrap` on models written the way real codebases write them.

`jlora.init(key, tree, config, fn, *args)` reads axis roles from the program of
``fn(tree, *args)`` and `jlora.wrap(fn)` adds the low-rank branch where that program contracts a
targeted leaf, whatever layer class (or none) produced it. The models (tests/_custom_models.py)
reproduce Gemma's linen layers, HF GPT-2's (out, in) kernels, tunix-style NNX modules and lab
code: plain functions of dicts, checkpoint policies, cond, jit, loops, scans, masked weights and
per-expert kernels.

The reference is always the model run on merged kernels, ``fn(jlora.merge(tree, adapter),
*args)``. Adapters are "trained-looking" (random A and B), so the update moves every output.
Tolerances, all float32 unless stated:
  outputs:   max |wrap − merged| ≤ 1e-5 · max |merged| + 1e-6;
  gradients: max |∇wrap − ∇merged| ≤ 1e-4 · max |∇merged| + 1e-6, leaf by leaf.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings

import _custom_models as cm
import _hlo
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jlora

OUT_RTOL, GRAD_RTOL, ATOL = 1e-5, 1e-4, 1e-6
BF16_RTOL, BF16_GRAD_RTOL = 3e-2, 6e-2  # a bf16 merge rounds W + ΔW to 8 bits (2^-8 ≈ 4e-3)
RANK = 2


# ----------------------------------------------------------------------------------------------
# Helpers.


def _config(targets, **kw) -> jlora.LoraConfig:
  return jlora.LoraConfig(rank=RANK, alpha=4.0, targets=targets, **kw)


def _init(case: cm.Case, config=None, **kw) -> jlora.Adapter:
  """`jlora.init` with the model and its example inputs, as a user calls it."""
  model = case.module if case.module is not None else case.fn
  return jlora.init(jax.random.key(0), case.tree, config or _config(case.targets), model,
                    *case.args, **kw)


def _trained(adapter: jlora.Adapter, seed=1, scale=0.3) -> jlora.Adapter:
  """The adapter with random A and B (B ≠ 0), drawn with NumPy: a trained-looking update."""
  rng = np.random.default_rng(seed)
  draw = lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype)  # noqa: E731
  lora = {p: dataclasses.replace(f, a=draw(f.a), b=draw(f.b))
          for p, f in sorted(adapter.lora.items())}
  return jlora.Adapter(lora, adapter.extras)


def _zero_b(adapter: jlora.Adapter) -> jlora.Adapter:
  lora = {p: dataclasses.replace(f, b=jnp.zeros_like(f.b)) for p, f in adapter.lora.items()}
  return jlora.Adapter(lora, adapter.extras)


def _merged(case: cm.Case):
  """The reference: the model itself on merged kernels."""
  return lambda tree, adapter, *args, **kw: case.ref(jlora.merge(tree, adapter), *args, **kw)


def _assert_close(actual, expected, rtol, what="", atol=ATOL):
  """Leaf by leaf: same shape and dtype, max |actual − expected| ≤ rtol · max |expected| + atol."""
  a_leaves = jax.tree_util.tree_leaves_with_path(actual)
  e_leaves = jax.tree.leaves(expected)
  assert len(a_leaves) == len(e_leaves), what
  for (path, a), e in zip(a_leaves, e_leaves, strict=True):
    name = f"{what}{jax.tree_util.keystr(path)}"
    assert a.shape == e.shape, (name, a.shape, e.shape)
    assert a.dtype == e.dtype, (name, a.dtype, e.dtype)
    a64, e64 = np.asarray(a, np.float64), np.asarray(e, np.float64)
    bound = rtol * np.max(np.abs(e64)) + atol
    err = np.max(np.abs(a64 - e64))
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g} (rtol {rtol})"


def _max_abs(x) -> float:
  return float(np.max(np.abs(np.asarray(x, np.float64))))


def _loss(y) -> jax.Array:
  return sum(jnp.sum(jnp.sin(leaf.astype(jnp.float32))) for leaf in jax.tree.leaves(y))


def _compare(lora_fn, ref_fn, tree, adapter, *args, grads=True, rtol=OUT_RTOL,
             grad_rtol=GRAD_RTOL, nonzero_grads=True):
  """Outputs (and adapter gradients) of `lora_fn` vs `ref_fn`, under one `jax.jit`.

  Also checks the comparison is not vacuous: the update moves the output (against B = 0), and
  every reference gradient leaf is nonzero.
  """

  def run(fn, adapter, tree, *args):
    y = fn(tree, adapter, *args)
    return _loss(y), y

  def both(tree, adapter, *args):
    if grads:
      (_, y), g = jax.value_and_grad(run, argnums=1, has_aux=True)(lora_fn, adapter, tree, *args)
      (_, y_ref), g_ref = jax.value_and_grad(run, argnums=1, has_aux=True)(ref_fn, adapter, tree,
                                                                             *args)
    else:
      (y, y_ref), g, g_ref = (lora_fn(tree, adapter, *args), ref_fn(tree, adapter, *args)), 0, 0
    return y, g, y_ref, g_ref, ref_fn(tree, _zero_b(adapter), *args)

  y, g, y_ref, g_ref, y_base = jax.jit(both)(tree, adapter, *args)
  _assert_close(y, y_ref, rtol, "output")
  moved = max(_max_abs(a.astype(jnp.float32) - b) for a, b in zip(
      jax.tree.leaves(y_ref), jax.tree.leaves(y_base), strict=True))
  assert moved > 0.05 * max(_max_abs(b) for b in jax.tree.leaves(y_base)), "vacuous comparison"
  if grads:
    _assert_close(g, g_ref, grad_rtol, "grad")
    if nonzero_grads:
      for path, leaf in jax.tree_util.tree_leaves_with_path(g_ref):
        assert _max_abs(leaf) > 0, jax.tree_util.keystr(path)
  return y, g


def _assert_roles(adapter: jlora.Adapter, case: cm.Case, paths=None):
  for path in paths or case.roles:
    assert adapter.lora[path].roles == case.roles[path], (path, adapter.lora[path].roles)


def _wrap_equals_merged(case: cm.Case, **kw):
  adapter = _trained(_init(case))
  return adapter, _compare(jlora.wrap(case.fn), _merged(case), case.tree, adapter, *case.args,
                           **kw)


# ----------------------------------------------------------------------------------------------
# 1. Gemma: a param named `w` read by jnp.einsum, multi-axis in and out.


def test_gemma_attention_roles_come_from_the_einsums():
  case = cm.gemma_attention()
  adapter = _init(case)
  assert set(adapter.lora) == set(case.roles)
  _assert_roles(adapter, case)
  q, kv, out = (adapter.lora[f"params/{n}/w"] for n in ("q_einsum", "kv_einsum", "attn_vec_einsum"))
  assert (q.a.shape, q.b.shape) == ((RANK, cm.D), (RANK, cm.N * cm.H))  # w: (N, D, H)
  assert (kv.a.shape, kv.b.shape) == ((RANK, cm.D), (RANK, 2 * cm.K * cm.H))  # w: (2, K, D, H)
  assert (out.a.shape, out.b.shape) == ((RANK, cm.N * cm.H), (RANK, cm.D))  # w: (N, H, D)


def test_gemma_attention_wrap_equals_merged():
  _wrap_equals_merged(cm.gemma_attention())


def test_gemma_feed_forward_with_a_sliced_gating_kernel():
  """Gemma's FeedForward reads its (2, D, F) gating kernel as w[0] and w[1]."""
  case = cm.gemma_feed_forward()
  adapter = _init(case)
  assert adapter.lora["params/gating_einsum"].roles.contracting == (1,)
  _assert_roles(adapter, case, ["params/linear"])
  _compare(jlora.wrap(case.fn), _merged(case), case.tree, _trained(adapter), *case.args)


# ----------------------------------------------------------------------------------------------
# 2. Kernels stored (out, in): x @ w.T, HF's FlaxConv1D.


def test_out_in_kernels_roles_come_from_the_transposed_use():
  case = cm.torch_style_mlp()
  adapter = _init(case)
  _assert_roles(adapter, case)
  fc = adapter.lora["params/c_fc/kernel"]  # kernel (F, D): fan_in D, fan_out F
  assert (fc.a.shape, fc.b.shape) == ((RANK, cm.D), (RANK, cm.F))


def test_out_in_kernels_wrap_equals_merged():
  _wrap_equals_merged(cm.torch_style_mlp())


def test_square_out_in_kernel_with_an_in_out_adapter_is_refused():
  """An adapter made without the model takes a 2-D kernel as (in, out); on a square (out, in)
  kernel the shapes fit, and only the program shows that the update would be transposed."""
  case = cm.torch_style_mlp()
  path = "params/out/weight"
  adapter = _trained(jlora.init(jax.random.key(0), case.tree, _config(path)))
  assert adapter.lora[path].roles == cm.dense((0,), (1,))
  with pytest.raises(ValueError, match=re.escape(path)):
    jlora.wrap(case.fn)(case.tree, adapter, *case.args)
  # The paired success: the same kernel with the adapter init reads from the program.
  good = _trained(_init(case, _config(path)))
  _compare(jlora.wrap(case.fn), _merged(case), case.tree, good, *case.args)


# ----------------------------------------------------------------------------------------------
# 3. A tied embedding: looked up and read out as h @ table.T.


@pytest.mark.parametrize("lookup", ["index", "take"])
def test_tied_embedding_lookup_and_read_out_both_updated(lookup):
  case = cm.tied_lm(lookup)
  adapter = _init(case)
  _assert_roles(adapter, case)
  table = adapter.lora["params/embedder/input_embedding"]
  assert (table.a.shape, table.b.shape) == ((RANK, cm.V), (RANK, cm.D))
  _compare(jlora.wrap(case.fn), _merged(case), case.tree, _trained(adapter), *case.args)


# ----------------------------------------------------------------------------------------------
# 4. NNX: nnx.Param through jnp.einsum and jax.lax.dot_general.


def test_nnx_params_through_einsum_and_dot_general():
  case = cm.nnx_block()
  adapter = _init(case)
  assert set(adapter.lora) == set(case.roles)  # the norm scale is not a target
  _assert_roles(adapter, case)
  adapter = _trained(adapter)
  _compare(jlora.wrap(case.fn, method="__call__"), _merged(case), case.tree, adapter,
           *case.args)
  # The module itself, instead of its graphdef, is accepted too.
  _compare(jlora.wrap(case.module), _merged(case), case.tree, adapter, *case.args, grads=False)


def test_nnx_init_needs_example_inputs():
  case = cm.nnx_block()
  with pytest.raises((TypeError, ValueError), match=r"(?i)example|input|args"):
    jlora.init(jax.random.key(0), case.tree, _config(case.targets), case.module)
  assert set(_init(case).lora) == set(case.roles)  # the paired success


# ----------------------------------------------------------------------------------------------
# 5. A plain function of a dict of arrays.


def test_plain_function_of_a_dict():
  case = cm.dict_mlp()
  adapter = _init(case)
  assert set(adapter.lora) == {"w1", "w2"}  # b1 is 1-D: not a kernel, not matched
  _assert_roles(adapter, case)
  _compare(jlora.wrap(case.fn), _merged(case), case.tree, _trained(adapter), *case.args)


# ----------------------------------------------------------------------------------------------
# 6. Control flow.


def test_linen_scan_of_custom_layers_with_remat():
  case = cm.scanned_stack()
  adapter = _init(case)
  _assert_roles(adapter, case)
  w_in = adapter.lora["params/layers/w_in"]  # (L, D, N, H)
  assert (w_in.a.shape, w_in.b.shape) == ((cm.L, RANK, cm.D), (cm.L, RANK, cm.N * cm.H))
  _compare(jlora.wrap(case.fn), _merged(case), case.tree, _trained(adapter), *case.args)


@pytest.mark.parametrize("name", [n for n in cm.CONTROL_FLOW if n != "cond"])
def test_control_flow(name):
  """jax.checkpoint with a policy, jax.jit helpers, fori_loop, while_loop (forward only: it has
  no reverse-mode derivative), a scan slicing stacked weights, an RNN scan closing over its
  kernels."""
  case = cm.control_flow(name)
  adapter = _init(case)
  _assert_roles(adapter, case)
  _compare(jlora.wrap(case.fn), _merged(case), case.tree, _trained(adapter), *case.args,
           grads=name != "while_loop")


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["first_branch", "second_branch"])
def test_cond_choosing_between_two_uses_of_a_kernel(sign):
  case = cm.control_flow("cond", sign)
  adapter = _init(case)
  _assert_roles(adapter, case)
  _compare(jlora.wrap(case.fn), _merged(case), case.tree, _trained(adapter), *case.args)


@pytest.mark.parametrize("name", list(cm.LAYOUT))
def test_layout_ops_on_a_kernel_before_its_contraction(name):
  """A fused kernel reshaped to more axes, or sliced into halves, before it is contracted."""
  case = cm.layout(name)
  adapter = _init(case)
  _assert_roles(adapter, case)
  _compare(jlora.wrap(case.fn), _merged(case), case.tree, _trained(adapter), *case.args)


@pytest.mark.parametrize("name", list(cm.USES))
def test_kernel_read_as_left_operand_transposed_or_shared(name):
  case = cm.uses(name)
  adapter = _init(case)
  _assert_roles(adapter, case)
  _compare(jlora.wrap(case.fn), _merged(case), case.tree, _trained(adapter), *case.args)


@pytest.mark.parametrize("name", list(cm.CONVS))
def test_lax_conv_in_flax_and_torch_layouts(name):
  case = cm.lax_conv(name)
  adapter = _init(case)
  _assert_roles(adapter, case)
  _compare(jlora.wrap(case.fn), _merged(case), case.tree, _trained(adapter), *case.args)


def test_nn_vmap_ensemble():
  case = cm.ensemble()
  _compare(jlora.wrap(case.fn), _merged(case), case.tree, _trained(_init(case)), *case.args)


def test_custom_vjp_use_is_merged_with_a_warning():
  """No factored rule sees inside a custom_vjp function: its kernel is merged for that use."""
  params, x = cm.mlp_params(52), cm.normal((cm.TOKENS, cm.D), 53)
  adapter = _trained(jlora.init(jax.random.key(0), params, _config(r"w\d")))  # 2-D: (in, out)
  case = cm.Case(cm.custom_vjp_mlp, params, (x,), r"w\d", {}, cm.custom_vjp_mlp)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    jax.jit(jlora.wrap(case.fn))(params, adapter, x)
  merged_uses = [str(w.message) for w in caught if issubclass(w.category, jlora.MergedUseWarning)]
  assert len(merged_uses) == 1 and "w1" in merged_uses[0], merged_uses
  with pytest.warns(jlora.MergedUseWarning, match="w1"):
    _compare(jlora.wrap(case.fn), _merged(case), params, adapter, x)


# ----------------------------------------------------------------------------------------------
# 7. A kernel also used elementwise: merged for that use, one warning.


def test_elementwise_use_is_merged_for_that_use_with_one_warning():
  assert issubclass(jlora.MergedUseWarning, UserWarning)
  case = cm.masked()
  adapter = _trained(_init(case))
  lora_fn = jlora.wrap(case.fn)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    jax.jit(lora_fn)(case.tree, adapter, *case.args)
  merged_uses = [str(w.message) for w in caught if issubclass(w.category, jlora.MergedUseWarning)]
  assert len(merged_uses) == 1, merged_uses
  assert "proj/w" in merged_uses[0] and "other/w" not in merged_uses[0], merged_uses
  assert "mul" in merged_uses[0], merged_uses  # names the op
  with pytest.warns(jlora.MergedUseWarning, match=re.escape("proj/w")):
    _compare(lora_fn, _merged(case), case.tree, adapter, *case.args)


# ----------------------------------------------------------------------------------------------
# 8. Per-expert weights.


def test_per_expert_weights_get_their_own_factors():
  case = cm.experts()
  adapter = _init(case)
  _assert_roles(adapter, case)
  up = adapter.lora["w_up"]  # (E, D, F_EXPERT), the expert axis a batch axis of the einsum
  assert (up.a.shape, up.b.shape) == ((cm.E, RANK, cm.D), (cm.E, RANK, cm.F_EXPERT))
  _compare(jlora.wrap(case.fn), _merged(case), case.tree, _trained(adapter), *case.args)


# ----------------------------------------------------------------------------------------------
# Paths: unreached ones are fine, absent ones are an error.


def test_adapter_paths_the_program_never_reaches_are_allowed():
  params = cm.two_heads_params()
  x = cm.normal((cm.TOKENS, cm.D), 41)
  config = _config(r"body|head_[ab]")
  adapter = _trained(jlora.init(jax.random.key(0), params, config, cm.two_heads, x, head="both"))
  assert set(adapter.lora) == {"body", "head_a", "head_b"}
  case = cm.Case(cm.two_heads, params, (x,), "", {}, cm.two_heads)
  _, g = _compare(jlora.wrap(cm.two_heads), _merged(case), params, adapter, x,
                  nonzero_grads=False)
  assert not np.any(g.lora["head_b"].a) and not np.any(g.lora["head_b"].b)
  assert np.any(g.lora["head_a"].b)


def test_adapter_path_absent_from_the_tree_is_refused():
  case = cm.dict_mlp()
  adapter = _init(case)
  stray = dict(adapter.lora, **{"nope/w": adapter.lora["w1"]})
  with pytest.raises(ValueError, match=re.escape("nope/w")):
    jlora.wrap(case.fn)(case.tree, jlora.Adapter(stray), *case.args)
  jlora.wrap(case.fn)(case.tree, adapter, *case.args)  # the paired success


# ----------------------------------------------------------------------------------------------
# 9. route and dropout through custom layers.


def _route_check(case: cm.Case, example_ids):
  adapters = [_trained(_init(case), seed=s) for s in (1, 2)]
  lora_fn = jlora.wrap(case.fn)
  y = jax.jit(lambda s, i: lora_fn(case.tree, jlora.route(s, i), *case.args))(
      jlora.stack(adapters), jnp.asarray(example_ids))
  alone = [jax.jit(_merged(case))(case.tree, a, *case.args) for a in adapters]
  alone.append(case.ref(case.tree, *case.args))  # index -1: the base
  for b, k in enumerate(example_ids):
    _assert_close(y[b], alone[k][b], OUT_RTOL, f"example {b} (adapter {k})")
  assert _max_abs(alone[0] - alone[1]) > 0.05 * _max_abs(alone[0])  # adapters differ


def test_route_through_a_plain_function():
  ids = [0, 1, -1, 1, 0, 0, -1, 1, 1, 0, -1, 0, 1, 1]
  assert len(ids) == cm.TOKENS
  _route_check(cm.dict_mlp(), ids)


def test_route_through_gemma_attention():
  _route_check(cm.gemma_attention(), [1, -1])


def test_route_with_ids_not_matching_the_batch_is_refused():
  case = cm.dict_mlp()
  stacked = jlora.stack([_trained(_init(case), seed=s) for s in (1, 2)])
  with pytest.raises(ValueError, match=r"(?i)batch"):
    jlora.wrap(case.fn)(case.tree, jlora.route(stacked, jnp.array([0, 1, -1])), *case.args)


@pytest.mark.parametrize("builder", [cm.dict_mlp, cm.gemma_attention])
def test_dropout_key(builder):
  case = builder()
  adapter = _trained(_init(case, _config(case.targets, dropout=0.5)))
  lora_fn = jax.jit(jlora.wrap(case.fn))
  y_ref = jax.jit(_merged(case))(case.tree, adapter, *case.args)
  run = lambda a, key: lora_fn(case.tree, a, *case.args, dropout_key=key)  # noqa: E731
  _assert_close(run(adapter, None), y_ref, OUT_RTOL, "no key")
  key1, key2 = jax.random.key(1), jax.random.key(2)
  y1 = run(adapter, key1)
  assert _max_abs(y1 - y_ref) > 1e-2 * _max_abs(y_ref)  # dropout is on
  np.testing.assert_array_equal(y1, run(adapter, key1))  # the same key, the same masks
  assert _max_abs(y1 - run(adapter, key2)) > 0
  # Dropout acts on the LoRA input only: with B = 0 the base model comes out, whatever the key.
  _assert_close(run(_zero_b(adapter), key1), case.ref(case.tree, *case.args), OUT_RTOL, "B=0")
  grads = jax.jit(jax.grad(lambda a: _loss(run(a, key1))))(adapter)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_linen_lora_dropout_rng_still_works():
  case = cm.gemma_attention()
  adapter = _trained(_init(case, _config(case.targets, dropout=0.5)))
  lora_fn = jax.jit(jlora.wrap(case.fn))
  y_ref = jax.jit(_merged(case))(case.tree, adapter, *case.args)
  run = lambda key: lora_fn(case.tree, adapter, *case.args, rngs={"lora_dropout": key})  # noqa: E731
  y1 = run(jax.random.key(1))
  assert _max_abs(y1 - y_ref) > 1e-2 * _max_abs(y_ref)
  np.testing.assert_array_equal(y1, run(jax.random.key(1)))
  _assert_close(lora_fn(case.tree, adapter, *case.args), y_ref, OUT_RTOL, "no rng")


# ----------------------------------------------------------------------------------------------
# 10. bf16 base with a float32 adapter; Flax's own layers.


def _bf16(case: cm.Case) -> cm.Case:
  return case._replace(tree=jax.tree.map(lambda w: w.astype(jnp.bfloat16), case.tree))


def test_bf16_compute_with_f32_params():
  """Kernels cast to bfloat16 at their use; tolerances as for a bf16 base."""
  case = cm.bf16_compute()
  adapter = _init(case)
  _assert_roles(adapter, case)
  y, _ = _compare(jlora.wrap(case.fn), _merged(case), case.tree, _trained(adapter), *case.args,
                  rtol=BF16_RTOL, grad_rtol=BF16_GRAD_RTOL)
  assert y.dtype == jnp.bfloat16


@pytest.mark.parametrize("builder", [cm.dict_mlp, cm.gemma_attention, cm.torch_style_mlp])
def test_bf16_base_f32_adapter(builder):
  """Tolerances: outputs BF16_RTOL, gradients BF16_GRAD_RTOL, relative to the largest value."""
  case = _bf16(builder())
  adapter = _trained(_init(case))
  assert {f.a.dtype for f in adapter.lora.values()} == {jnp.dtype(jnp.float32)}
  y, g = _compare(jlora.wrap(case.fn), _merged(case), case.tree, adapter, *case.args,
                  rtol=BF16_RTOL, grad_rtol=BF16_GRAD_RTOL)
  assert {d.dtype for d in jax.tree.leaves(g)} == {jnp.dtype(jnp.float32)}


def test_flax_layers_still_work(tiny_lm):
  """nn.Embed (lookup and attend), nn.Conv, nn.scan(nn.remat(...)) of DenseGeneral (multi-axis
  in and out), nn.Einsum and nn.Dense."""
  model, variables, ids = tiny_lm
  case = cm.Case(model.apply, variables, (ids,), r".*(kernel|embedding)", {}, model.apply)
  adapter = _init(case)
  assert len(adapter.lora) == 8
  assert adapter.lora["params/embed/embedding"].roles == cm.EMBED
  assert adapter.lora["params/layers/attn/query/kernel"].roles == cm.dense((1,), (2, 3), (0,))
  assert adapter.lora["params/layers/attn/out/kernel"].roles == cm.dense((1, 2), (3,), (0,))
  assert adapter.lora["params/layers/up/kernel"].roles == cm.dense((1,), (2,), (0,))
  _compare(jlora.wrap(case.fn), _merged(case), variables, _trained(adapter), ids)


def test_flax_nnx_layers_still_work(tiny_nnx):
  """nnx.Embed, nnx.Conv, nnx.LinearGeneral, nnx.Einsum and nnx.Linear."""
  graphdef, state, ids = tiny_nnx
  module = nnx.merge(graphdef, state)
  ref = lambda state, *args: nnx.merge(graphdef, state)(*args)  # noqa: E731
  case = cm.Case(graphdef, state, (ids,), r".*(kernel|embedding)", {}, ref, module)
  adapter = _init(case)
  assert len(adapter.lora) == 6
  assert adapter.lora["head/kernel"].roles == cm.dense((0,), (1,))
  _compare(jlora.wrap(graphdef), _merged(case), state, _trained(adapter), ids)


# ----------------------------------------------------------------------------------------------
# The compiled training step: no kernel-sized weight gradient.

HLO_CASES = {
    "gemma_attention": cm.gemma_attention,
    "torch_style_mlp": cm.torch_style_mlp,
    "dict_mlp": cm.dict_mlp,
    "scanned_stack": cm.scanned_stack,
    "experts": cm.experts,
}


def _kernel_sizes(adapter: jlora.Adapter) -> set[int]:
  """Each kernel's size, and one layer's size for kernels with stacked axes."""
  sizes = set()
  for f in adapter.lora.values():
    size = math.prod(f.kernel_shape)
    sizes |= {size, size // math.prod(f.kernel_shape[i] for i in f.roles.stacked)}
  return sizes


def _step(apply, tree, args):
  def step(adapter):
    return jax.value_and_grad(lambda a: _loss(apply(tree, a, *args)))(adapter)

  return step


@pytest.mark.parametrize("name", list(HLO_CASES))
def test_compiled_training_step_has_no_weight_gradient(name):
  case = HLO_CASES[name]()
  adapter = _trained(_init(case))
  sizes = _kernel_sizes(adapter)
  assert cm.TOKENS not in {d for f in adapter.lora.values() for d in f.kernel_shape}
  found = {}
  for recipe, apply in (("wrap", jlora.wrap(case.fn)), ("merged", _merged(case))):
    step = _step(apply, case.tree, case.args)
    hlo = jax.jit(step).lower(adapter).compile().as_text()
    jaxpr = jax.make_jaxpr(step)(adapter).jaxpr
    found[recipe] = (
        [d for s in sizes for d in _hlo.hlo_weight_gradient_dots(hlo, s, cm.TOKENS)],
        [d for s in sizes for d in _hlo.jaxpr_weight_gradient_dots(jaxpr, s, cm.TOKENS)],
    )
  assert found["wrap"] == ([], []), found["wrap"]
  # Not vacuous: the same search finds the naive recipe's weight gradients, one per kernel.
  in_hlo, in_jaxpr = found["merged"]
  assert min(len(in_hlo), len(in_jaxpr)) >= len(adapter.lora), found["merged"]
