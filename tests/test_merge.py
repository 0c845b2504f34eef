"""Tests for jlora/merge.py against float64 NumPy references written here.

Every reference below is the obvious slow computation: ΔW = s·Aᵀ·B with A of shape
(rank, fan_in) and B of shape (rank, fan_out), reshaped (and, where the kernel stores its axes
in another order, transposed) into the kernel by hand, and each kernel kind's forward pass
written out in NumPy (an explicit sliding-window loop for convolutions).
"""

import dataclasses

import chex
import conftest
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import jlora
from jlora.merge import check_fits

KEY = jax.random.key(0)


# --- helpers ----------------------------------------------------------------------------------


def _f64(x) -> np.ndarray:
  return np.asarray(x).astype(np.float64)


def _random_like(tree, seed: int, scale: float = 1.0):
  """`tree` with every leaf replaced by standard-normal draws of its shape and dtype."""
  rng = np.random.default_rng(seed)
  leaves, treedef = jax.tree.flatten(tree)
  return jax.tree.unflatten(treedef, [
      jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype) for x in leaves])


def _random_variables(module, x, seed: int = 0):
  """Variables of `module` with the shapes `module.init` gives, filled with N(0, 0.3²)."""
  return _random_like(jax.eval_shape(module.init, KEY, x), seed, 0.3)


def _trained(variables, config, model=None, *args, seed: int = 1) -> jlora.Adapter:
  """An adapter as if trained: A and B drawn from N(0, 0.5²) (B is no longer zero)."""
  shapes = jax.eval_shape(lambda v: jlora.init(KEY, v, config, model, *args), variables)
  return _random_like(shapes, seed, 0.5)


def _ulp(x, dtype) -> np.ndarray:
  """The spacing of `dtype` at |x|: the gap from |x| to the next larger number of `dtype`."""
  info = jnp.finfo(dtype)
  x = np.abs(_f64(x))
  return np.exp2(np.floor(np.log2(np.maximum(x, float(info.tiny)))) - info.nmant)


def _assert_trees_bitwise_equal(x, y):
  assert jax.tree.structure(x) == jax.tree.structure(y)
  for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
    assert u.dtype == v.dtype and u.shape == v.shape
    u, v = np.asarray(u), np.asarray(v)
    np.testing.assert_array_equal(u.view(f"u{u.itemsize}"), v.view(f"u{v.itemsize}"))


def _conv_reference(x, w, padding):
  """Stride-1 convolution by an explicit loop over window offsets (NHWC, HWIO)."""
  window = w.shape[:-2]
  pads = [(0, 0)] + [((k - 1) // 2, k // 2) if padding == "SAME" else (0, 0) for k in window]
  xp = np.pad(x, pads + [(0, 0)])
  out = [n - k + 1 for n, k in zip(xp.shape[1:-1], window, strict=True)]
  y = np.zeros((x.shape[0], *out, w.shape[-1]))
  for offset in np.ndindex(*window):
    window_slices = (slice(o, o + n) for o, n in zip(offset, out, strict=True))
    patch = xp[(slice(None), *window_slices, slice(None))]
    y += np.einsum("n...c,co->n...o", patch, w[offset])
  return y


def _softmax(z):
  z = np.exp(z - z.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


# --- the kernel kinds: a module, its input, a hand-written ΔW per kernel, a NumPy forward ------


class _ScanDense(nn.Module):
  """Three Dense(4) layers under nn.scan: kernel (3, 4, 4), bias (3, 4)."""

  @nn.compact
  def __call__(self, x):
    body = lambda mdl, h, _: (nn.Dense(4, name="fc")(h), None)  # noqa: E731
    stack = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    return stack(self, x, None)[0]


def _scan_forward(p, x):
  for w, b in zip(p["params/fc/kernel"], p["params/fc/bias"], strict=True):
    x = x @ w + b
  return x


def _attention_forward(p, x):
  proj = lambda name: np.einsum("btd,dhk->bthk", x, p[f"params/{name}/kernel"]) + p[  # noqa: E731
      f"params/{name}/bias"]
  q, k, v = proj("query"), proj("key"), proj("value")
  weights = _softmax(np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1]))
  out = np.einsum("bhqs,bshk->bqhk", weights, v)
  return np.einsum("bqhk,hko->bqo", out, p["params/out/kernel"]) + p["params/out/bias"]


@dataclasses.dataclass(frozen=True)
class Kind:
  module: nn.Module
  x: np.ndarray
  deltas: dict  # path -> (a, b, s) -> ΔW, float64, in the kernel's layout
  forward: callable  # ({path: float64 array}, x) -> y


def _x(*shape):
  return np.random.default_rng(7).standard_normal(shape).astype(np.float32)


KINDS = {
    "dense": Kind(
        nn.Dense(5), _x(3, 6),
        {"params/kernel": lambda a, b, s: s * a.T @ b},
        lambda p, x: x @ p["params/kernel"] + p["params/bias"]),
    "dense_general_out": Kind(
        nn.DenseGeneral((2, 3)), _x(3, 6),
        {"params/kernel": lambda a, b, s: (s * a.T @ b).reshape(6, 2, 3)},
        lambda p, x: np.einsum("bd,dhk->bhk", x, p["params/kernel"]) + p["params/bias"]),
    "dense_general_in": Kind(
        nn.DenseGeneral(5, axis=(-2, -1)), _x(3, 2, 4),
        {"params/kernel": lambda a, b, s: (s * a.T @ b).reshape(2, 4, 5)},
        lambda p, x: np.einsum("bhk,hko->bo", x, p["params/kernel"]) + p["params/bias"]),
    "einsum": Kind(
        nn.Einsum((6, 2, 3), "btd,dhk->bthk"), _x(2, 4, 6),
        {"params/kernel": lambda a, b, s: (s * a.T @ b).reshape(6, 2, 3)},
        lambda p, x: np.einsum("btd,dhk->bthk", x, p["params/kernel"]) + p["params/bias"]),
    "einsum_contracted_last": Kind(
        nn.Einsum((2, 3, 6), "btd,hkd->bthk"), _x(2, 4, 6),
        {"params/kernel": lambda a, b, s: (s * a.T @ b).reshape(6, 2, 3).transpose(1, 2, 0)},
        lambda p, x: np.einsum("btd,hkd->bthk", x, p["params/kernel"]) + p["params/bias"]),
    "conv1d": Kind(
        nn.Conv(4, (3,)), _x(2, 7, 3),
        {"params/kernel": lambda a, b, s: (s * a.T @ b).reshape(3, 3, 4)},
        lambda p, x: _conv_reference(x, p["params/kernel"], "SAME") + p["params/bias"]),
    "conv2d": Kind(
        nn.Conv(4, (3, 3), padding="VALID"), _x(1, 5, 6, 2),
        {"params/kernel": lambda a, b, s: (s * a.T @ b).reshape(3, 3, 2, 4)},
        lambda p, x: _conv_reference(x, p["params/kernel"], "VALID") + p["params/bias"]),
    "embed": Kind(
        nn.Embed(10, 4), np.array([[0, 3, 9], [3, 3, 1]]),
        {"params/embedding": lambda a, b, s: s * a.T @ b},
        lambda p, ids: p["params/embedding"][ids]),
    "scan_stack": Kind(
        _ScanDense(), _x(2, 4),
        {"params/fc/kernel": lambda a, b, s: s * np.einsum("lri,lro->lio", a, b)},
        _scan_forward),
    "attention": Kind(
        conftest.Attention(), _x(2, 3, 8),
        {f"params/{name}/kernel": (lambda a, b, s: (s * a.T @ b).reshape(8, 2, 4))
         for name in ("query", "key", "value")}
        | {"params/out/kernel": lambda a, b, s: (s * a.T @ b).reshape(2, 4, 8)},
        _attention_forward),
}


@pytest.mark.parametrize("name", list(KINDS))
def test_merged_kernels_and_forward_match_numpy_reference(name):
  kind = KINDS[name]
  variables = _random_variables(kind.module, kind.x)
  config = jlora.LoraConfig(rank=2, alpha=3.0, targets=r".*(kernel|embedding)")
  adapter = _trained(variables, config, kind.module.apply, kind.x)
  assert sorted(adapter.lora) == sorted(kind.deltas)
  merged = jax.jit(jlora.merge)(variables, adapter)

  flat, flat_merged = jlora._tree.flatten(variables), jlora._tree.flatten(merged)
  reference = {path: _f64(w) for path, w in flat.items()}
  for path, delta_fn in kind.deltas.items():
    f = adapter.lora[path]
    reference[path] = reference[path] + delta_fn(_f64(f.a), _f64(f.b), f.scale)
    # One float32 rounding of values of size ~1-10.
    np.testing.assert_allclose(flat_merged[path], reference[path], rtol=1e-6, atol=1e-5)

  y = jax.jit(kind.module.apply)(merged, kind.x)
  x = kind.x if kind.x.dtype.kind == "i" else _f64(kind.x)  # ids stay integers
  y_reference = kind.forward(reference, x)
  assert y.shape == y_reference.shape
  np.testing.assert_allclose(y, y_reference, rtol=1e-5, atol=1e-4)


def test_tiny_lm_merged_kernels_and_forward_match_reference():
  """Every kernel kind at once: Embed (tied head), Conv, a scanned+remat DenseGeneral/Einsum
  attention block and MLP."""
  model = conftest.TinyLM()
  ids = (jnp.arange(12).reshape(2, 6) * 7) % 20
  variables = _random_variables(model, ids)
  config = jlora.LoraConfig(rank=2, alpha=3.0, targets=r".*(kernel|embedding)")
  adapter = _trained(variables, config, model.apply, ids)
  stacked = lambda *shape: (  # noqa: E731
      lambda a, b, s: (s * np.einsum("lri,lro->lio", a, b)).reshape(shape))
  deltas = {
      "params/embed/embedding": lambda a, b, s: s * a.T @ b,
      "params/conv/kernel": lambda a, b, s: (s * a.T @ b).reshape(3, 8, 8),
      "params/layers/attn/query/kernel": stacked(2, 8, 2, 4),
      "params/layers/attn/key/kernel": stacked(2, 8, 2, 4),
      "params/layers/attn/value/kernel": stacked(2, 8, 2, 4),
      "params/layers/attn/out/kernel": stacked(2, 2, 4, 8),
      "params/layers/up/kernel": stacked(2, 8, 16),
      "params/layers/down/kernel": stacked(2, 16, 8),
  }
  assert sorted(adapter.lora) == sorted(deltas)
  merged = jlora._tree.flatten(jax.jit(jlora.merge)(variables, adapter))
  reference = {}
  for path, w in jlora._tree.flatten(variables).items():
    f = adapter.lora.get(path)
    reference[path] = _f64(w) + (deltas[path](_f64(f.a), _f64(f.b), f.scale) if f else 0.0)
    np.testing.assert_allclose(merged[path], reference[path], rtol=1e-6, atol=1e-5)
  # The model run on the merged tree equals the model run on the NumPy-built kernels.
  apply = jax.jit(model.apply)
  y = apply(jlora._tree.replace(variables, merged), ids)
  y_reference = apply(jlora._tree.replace(
      variables, {p: jnp.asarray(w, jnp.float32) for p, w in reference.items()}), ids)
  # Two float32 runs of the model on kernels that differ by float32 rounding.
  np.testing.assert_allclose(y, y_reference, rtol=1e-5, atol=1e-5 * np.abs(y_reference).max())


def test_delta_is_float32_in_the_kernel_layout():
  kind = KINDS["einsum_contracted_last"]
  variables = _random_variables(kind.module, kind.x)
  config = jlora.LoraConfig(rank=2, alpha=3.0, targets=r".*kernel", dtype="bfloat16")
  adapter = _trained(variables, config, kind.module.apply, kind.x)
  f = adapter.lora["params/kernel"]
  d = jlora.delta(f)
  assert d.dtype == jnp.float32 and d.shape == (2, 3, 6)
  expected = kind.deltas["params/kernel"](_f64(f.a), _f64(f.b), f.scale)
  np.testing.assert_allclose(d, expected, rtol=1e-6, atol=1e-6)


# --- merging a fresh adapter changes nothing --------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_merge_of_a_fresh_adapter_is_bitwise_identity(dtype):
  model = conftest.TinyLM()
  ids = (jnp.arange(12).reshape(2, 6) * 7) % 20
  variables = jax.tree.map(lambda x: x.astype(dtype), _random_variables(model, ids))
  config = jlora.LoraConfig(rank=2, alpha=16.0, targets=r".*(kernel|embedding)",
                            trainable=r".*(bias|scale)")
  adapter = jlora.init(KEY, variables, config, model.apply, ids)
  assert jax.tree.leaves(adapter)[0].dtype == jnp.float32
  _assert_trees_bitwise_equal(jlora.merge(variables, adapter), variables)
  _assert_trees_bitwise_equal(jax.jit(jlora.merge)(variables, adapter), variables)


def test_merge_of_a_fresh_adapter_on_nnx_state_is_bitwise_identity():
  model = nnx.eval_shape(lambda: conftest.TinyNNX(nnx.Rngs(0)))  # the shapes of tiny_nnx
  state = _random_like(nnx.state(model), seed=0)
  config = jlora.LoraConfig(rank=2, alpha=4.0, targets=r".*(kernel|embedding)",
                            trainable=r"head/bias")
  ids = (jnp.arange(12).reshape(2, 6) * 7) % 20  # roles are read from the program it runs
  adapter = jlora.init(KEY, state, config, model, ids)
  merged = jlora.merge(state, adapter)
  assert isinstance(merged, nnx.State)
  _assert_trees_bitwise_equal(merged, state)


# --- unmerge ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_unmerge_of_merge_is_within_one_ulp(dtype):
  """|unmerge(merge(W)) − W| ≤ 1 ulp of W's dtype at max(|W|, |merge(W)|).

  Measured on this test: at most 1.0 ulp in float32 and 0.5 ulp in bfloat16. It is not exact
  in float32: fl(fl(W + Δ) − Δ) ≠ W when the first sum rounds.
  """
  model = conftest.TinyLM()
  ids = (jnp.arange(12).reshape(2, 6) * 7) % 20
  variables = jax.tree.map(lambda x: x.astype(dtype), _random_variables(model, ids))
  config = jlora.LoraConfig(rank=2, alpha=3.0, targets=r".*(kernel|embedding)")
  adapter = _trained(variables, config, model.apply, ids)
  merged = jax.jit(jlora.merge)(variables, adapter)
  back = jax.jit(jlora.unmerge)(merged, adapter)
  flat, flat_merged, flat_back = (jlora._tree.flatten(t) for t in (variables, merged, back))
  worst = 0.0
  for path in adapter.lora:
    w, m, u = _f64(flat[path]), _f64(flat_merged[path]), _f64(flat_back[path])
    assert flat_back[path].dtype == dtype
    assert not np.array_equal(m, w)  # the update is not lost in rounding
    worst = max(worst, float((np.abs(u - w) / _ulp(np.maximum(np.abs(w), np.abs(m)), dtype)).max()))
  assert worst <= 1.0, f"unmerge(merge(W)) is {worst} ulp from W, above the 1 ulp bound"
  for path in set(flat) - set(adapter.lora):  # leaves without an adapter are untouched
    np.testing.assert_array_equal(flat_back[path], flat[path])


def test_unmerge_keeps_trained_extras():
  params = {"fc": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
  config = jlora.LoraConfig(rank=2, alpha=4.0, targets="fc/kernel", trainable="fc/bias")
  adapter = _trained(params, config)
  merged = jlora.merge(params, adapter)
  np.testing.assert_array_equal(merged["fc"]["bias"], adapter.extras["fc/bias"])
  back = jlora.unmerge(merged, adapter)
  np.testing.assert_array_equal(back["fc"]["bias"], adapter.extras["fc/bias"])


def test_merge_casts_extras_back_to_the_param_dtype():
  params = {"fc": {"kernel": jnp.ones((4, 3), jnp.bfloat16), "bias": jnp.zeros(3, jnp.bfloat16)}}
  config = jlora.LoraConfig(rank=2, alpha=4.0, targets="fc/kernel", trainable="fc/bias")
  adapter = _trained(params, config)
  merged = jlora.merge(params, adapter)
  assert jax.tree.map(lambda x: x.dtype, merged) == jax.tree.map(lambda x: x.dtype, params)
  np.testing.assert_array_equal(merged["fc"]["bias"],
                                adapter.extras["fc/bias"].astype(jnp.bfloat16))


# --- randomized: shapes, axis roles, ranks, dtypes --------------------------------------------


def _delta_reference(a, b, scale, letters, shape):
  """s·Aᵀ·B in the kernel layout by naming every kernel axis: A is (*s, r, *i), B (*s, r, *o)."""
  names = "ABCDEFGH"[:len(letters)]
  pick = lambda role: [k for k, c in enumerate(letters) if c == role]  # noqa: E731
  stack, inp, out = pick("s"), pick("i"), pick("o")
  sub = lambda axes: "".join(names[k] for k in axes)  # noqa: E731
  dims = lambda axes: [shape[k] for k in axes]  # noqa: E731
  a = a.reshape(*dims(stack), a.shape[-2], *dims(inp))
  b = b.reshape(*dims(stack), b.shape[-2], *dims(out))
  return scale * np.einsum(f"{sub(stack)}r{sub(inp)},{sub(stack)}r{sub(out)}->{names}", a, b)


@st.composite
def _cases(draw):
  letters = draw(st.permutations(
      ["i"] * draw(st.integers(1, 2)) + ["o"] * draw(st.integers(1, 2))
      + ["s"] * draw(st.integers(0, 1))))
  shape = tuple(draw(st.integers(1, 5)) for _ in letters)
  fan_in = int(np.prod([n for n, c in zip(shape, letters, strict=True) if c == "i"]))
  fan_out = int(np.prod([n for n, c in zip(shape, letters, strict=True) if c == "o"]))
  return dict(
      letters="".join(letters), shape=shape,
      rank=draw(st.integers(1, min(fan_in, fan_out))),
      dtype=draw(st.sampled_from(["float32", "bfloat16", "float16"])),
      adapter_dtype=draw(st.sampled_from(["float32", "bfloat16"])),
      alpha=draw(st.sampled_from([0.5, 1.0, 8.0])),
      rslora=draw(st.booleans()),
      seed=draw(st.integers(0, 2**16)),
  )


@jax.jit
def _merge_unmerge(params, adapter):
  merged = jlora.merge(params, adapter)
  return merged, jlora.unmerge(merged, adapter)


@settings(max_examples=20, deadline=None)
@given(_cases())
def test_randomized_merge_and_unmerge(case):
  rng = np.random.default_rng(case["seed"])
  dtype = jnp.dtype(case["dtype"])
  params = {"w": {"kernel": jnp.asarray(rng.standard_normal(case["shape"]), dtype)}}
  config = jlora.LoraConfig(rank=case["rank"], alpha=case["alpha"], targets=".*",
                            use_rslora=case["rslora"], dtype=case["adapter_dtype"],
                            roles={".*": case["letters"]})
  adapter = _random_like(jax.eval_shape(lambda p: jlora.init(KEY, p, config), params),
                         case["seed"])
  f = adapter.lora["w/kernel"]
  assert f.scale == case["alpha"] / (np.sqrt(case["rank"]) if case["rslora"] else case["rank"])
  a, b = _f64(f.a), _f64(f.b)
  w = _f64(params["w"]["kernel"])
  exact = w + _delta_reference(a, b, f.scale, case["letters"], case["shape"])
  magnitude = np.abs(w) + _delta_reference(np.abs(a), np.abs(b), f.scale, case["letters"],
                                           case["shape"])

  merged, back = _merge_unmerge(params, adapter)
  merged, back = merged["w"]["kernel"], back["w"]["kernel"]
  assert merged.dtype == back.dtype == dtype and merged.shape == back.shape == case["shape"]
  m = _f64(merged)
  # One rounding to `dtype` plus the float32 sum of rank products.
  tolerance = _ulp(np.maximum(np.abs(m), np.abs(exact)), dtype) + (
      4 * case["rank"] * np.finfo(np.float32).eps * magnitude)
  assert np.all(np.abs(m - exact) <= tolerance)

  back = _f64(back)
  assert np.all(np.abs(back - w) <= _ulp(np.maximum(np.abs(w), np.abs(m)), dtype))


# --- jit ------------------------------------------------------------------------------------


def test_jit_and_no_jit_give_identical_results():
  model = conftest.TinyLM()
  ids = (jnp.arange(12).reshape(2, 6) * 7) % 20
  variables = _random_variables(model, ids)
  config = jlora.LoraConfig(rank=2, alpha=3.0, targets=r".*(kernel|embedding)",
                            trainable=r".*bias")
  adapter = _trained(variables, config, model.apply, ids)
  merged = jlora.merge(variables, adapter)
  _assert_trees_bitwise_equal(jax.jit(jlora.merge)(variables, adapter), merged)
  _assert_trees_bitwise_equal(jax.jit(jlora.unmerge)(merged, adapter),
                              jlora.unmerge(merged, adapter))
  for factors in adapter.lora.values():
    np.testing.assert_array_equal(jax.jit(jlora.delta)(factors), jlora.delta(factors))


def test_merge_traces_once_for_adapters_of_the_same_structure():
  params = {"fc": {"kernel": jnp.ones((4, 3))}}
  config = jlora.LoraConfig(rank=2, alpha=4.0, targets="fc/kernel")
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def merge(params, adapter):
    return jlora.merge(params, adapter)

  for seed in range(3):
    merge(params, _trained(params, config, seed=seed))


# --- errors -----------------------------------------------------------------------------------


def _simple():
  params = {"fc": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
  config = jlora.LoraConfig(rank=2, alpha=4.0, targets="fc/kernel", trainable="fc/bias")
  return params, _trained(params, config)


def _copy(tree):
  return jax.tree.map(np.array, tree)


@pytest.mark.parametrize("fold", [jlora.merge, jlora.unmerge])
def test_adapter_path_missing_from_params_is_named(fold):
  params, adapter = _simple()
  other = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
  before, adapter_before = _copy(other), _copy(adapter)
  with pytest.raises(ValueError, match=r"adapter's kernel 'fc/kernel' is not in the params; "
                     r"close paths: .*dense/kernel.*Fix: pass the same tree"):
    fold(other, adapter)
  _assert_trees_bitwise_equal(other, before)
  _assert_trees_bitwise_equal(adapter, adapter_before)
  assert fold(params, adapter)["fc"]["kernel"].shape == (4, 3)


def test_linen_params_without_the_variables_wrapper_are_refused():
  module, x = nn.Dense(3), jnp.ones((2, 4))
  variables = _random_variables(module, x)
  adapter = _trained(variables, jlora.LoraConfig(rank=2, alpha=4.0, targets=".*kernel"))
  with pytest.raises(ValueError, match=r"'params/kernel' is not in the params.*\{'params': "):
    jlora.merge(variables["params"], adapter)
  assert jlora.merge(variables, adapter)["params"]["kernel"].shape == (4, 3)


@pytest.mark.parametrize("fold", [jlora.merge, jlora.unmerge])
def test_kernel_shape_mismatch_names_path_and_both_shapes(fold):
  params, adapter = _simple()
  wrong = {"fc": {"kernel": jnp.ones((5, 3)), "bias": jnp.zeros(3)}}
  before, adapter_before = _copy(wrong), _copy(adapter)
  with pytest.raises(ValueError, match=r"adapter's kernel 'fc/kernel' was made for shape "
                     r"\(4, 3\), but the params hold \(5, 3\)"):
    fold(wrong, adapter)
  _assert_trees_bitwise_equal(wrong, before)
  _assert_trees_bitwise_equal(adapter, adapter_before)
  assert fold(params, adapter)["fc"]["kernel"].shape == (4, 3)


def test_extra_shape_mismatch_and_missing_extra_are_named():
  params, adapter = _simple()
  with pytest.raises(ValueError, match=r"trainable leaf 'fc/bias' was made for shape \(3,\), "
                     r"but the params hold \(4,\)"):
    jlora.merge({"fc": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(4)}}, adapter)
  with pytest.raises(ValueError, match=r"trainable leaf 'fc/bias' is not in the params"):
    jlora.merge({"fc": {"kernel": jnp.ones((4, 3))}}, adapter)
  assert jlora.merge(params, adapter)["fc"]["bias"].shape == (3,)


def test_not_an_adapter_is_a_type_error():
  params, adapter = _simple()
  with pytest.raises(TypeError, match=r"Expected a jlora\.Adapter, got dict"):
    jlora.merge(params, {"fc/kernel": adapter.lora["fc/kernel"]})
  assert jlora.merge(params, adapter)


# --- inconsistent factors and kernels: one clear error from check_fits --------------------------


def _with_factors(adapter, **changes):
  factors = dataclasses.replace(adapter.lora["fc/kernel"], **changes)
  return dataclasses.replace(adapter, lora={"fc/kernel": factors})


BAD_FACTORS = [
    (dict(b=np.zeros((3, 3), np.float32)), ValueError,
     r"fc/kernel: a has rank 2 \(shape \(2, 4\)\) but b has rank 3 \(shape \(3, 3\)\)\. Fix:"),
    (dict(a=np.zeros((2, 5), np.float32)), ValueError,
     r"fc/kernel: the kernel \(4, 3\) needs a of shape \(\.\.\., rank, 4\).*got a \(2, 5\).*Fix:"),
    (dict(b=np.zeros((2, 4), np.float32)), ValueError,
     r"needs .* b of shape \(\.\.\., rank, 3\).*got a \(2, 4\) and b \(2, 4\)"),
    (dict(a=np.zeros((1, 1, 2, 4), np.float32), b=np.zeros((1, 1, 2, 3), np.float32)), ValueError,
     r"fc/kernel: factors need 2 axes \(0 stacked, rank, fan\).*Fix:"),
    (dict(a=[[0.0] * 4] * 2), TypeError, r"fc/kernel: factor a is a list, not an array\. Fix:"),
    (dict(b=np.zeros((2, 3), np.int32)), TypeError,
     r"fc/kernel: factor b has dtype int32, not a floating dtype\. Fix:"),
]


@pytest.mark.parametrize("fold", [jlora.merge, jlora.unmerge])
@pytest.mark.parametrize("changes, error, match", BAD_FACTORS,
                         ids=["rank", "fan_in", "fan_out", "extra_axis", "list", "int"])
def test_inconsistent_factors_raise_naming_the_path(fold, changes, error, match):
  params, adapter = _simple()
  bad = _with_factors(adapter, **changes)
  before = _copy(params)
  with pytest.raises(error, match=match):
    fold(params, bad)
  with pytest.raises(error, match=match):
    check_fits(params, bad)  # the check that wrap and restore run too
  _assert_trees_bitwise_equal(params, before)
  assert fold(params, adapter)["fc"]["kernel"].shape == (4, 3)


def test_stacked_axes_of_factors_must_match_the_kernel():
  params = {"layers": {"kernel": jnp.ones((3, 4, 5))}}
  config = jlora.LoraConfig(rank=2, alpha=4.0, targets=".*kernel", roles={".*": "sio"})
  adapter = _trained(params, config)
  factors = adapter.lora["layers/kernel"]
  bad = dataclasses.replace(factors, a=factors.a[:2], b=factors.b[:2])
  with pytest.raises(ValueError, match=r"layers/kernel: the leading axes of a and b must be the "
                     r"kernel's stacked axes \(a \(2, 2, 4\), b \(2, 2, 5\), kernel \(3, 4, 5\), "
                     r"stacked axes \(3,\)\)"):
    jlora.merge(params, jlora.Adapter(lora={"layers/kernel": bad}))
  assert jlora.merge(params, adapter)["layers"]["kernel"].shape == (3, 4, 5)


@pytest.mark.parametrize("fold", [jlora.merge, jlora.unmerge])
def test_integer_kernel_is_refused_not_truncated(fold):
  params, adapter = _simple()
  quantized = {"fc": {"kernel": jnp.ones((4, 3), jnp.int8), "bias": jnp.zeros(3)}}
  with pytest.raises(ValueError, match=r"kernel 'fc/kernel' has dtype int8; .* rounded to "
                     r"integers.*Fix: leave it out of LoraConfig\.targets, or dequantize"):
    fold(quantized, adapter)
  assert fold(params, adapter)["fc"]["kernel"].dtype == jnp.float32


def test_check_fits_accepts_array_like_kernels_and_abstract_params():
  class Quantized:  # what a quantized kernel type offers: a shape and a floating dtype
    shape, dtype = (4, 3), jnp.dtype(jnp.bfloat16)

  params, adapter = _simple()
  assert set(check_fits({"fc": {"kernel": Quantized(), "bias": jnp.zeros(3)}}, adapter)) == {
      "fc/kernel", "fc/bias"}
  abstract = jax.eval_shape(lambda: params)
  assert set(check_fits(abstract, jax.eval_shape(lambda: adapter))) == {"fc/kernel", "fc/bias"}
  with pytest.raises(ValueError, match=r"The adapter's kernel 'fc/kernel' was made for shape"):
    jlora.merge({"fc": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(3)}}, adapter)
  with pytest.raises(ValueError, match=r"'fc/kernel' was made for shape \(4, 3\), but the "
                     r"params hold float\. Fix:"):
    check_fits({"fc": {"kernel": 1.0, "bias": jnp.zeros(3)}}, adapter)


def test_check_fits_allows_per_example_factors_only_when_asked():
  params, adapter = _simple()
  adapter = dataclasses.replace(adapter, extras={})
  routed = jlora.route(jlora.stack([adapter, adapter]), jnp.array([0, 1, -1]))
  assert "fc/kernel" in check_fits(params, routed, per_example=True)
  with pytest.raises(ValueError, match=r"fc/kernel: factors need 2 axes"):
    check_fits(params, routed, per_example=False)
  for fold in (jlora.merge, jlora.unmerge):
    with pytest.raises(ValueError, match=r"fc/kernel: these factors have a per-example axis "
                       r"\(from jlora\.route\).*Fix: pass jlora\.select"):
      fold(params, routed)


# --- bf16 merge/unmerge loops drift; merging from the frozen base does not -------------------


def _changing_adapter(params, step: int) -> jlora.Adapter:
  """Step `step` of a training run: fresh A and B, ΔW about 5 % of W in Frobenius norm."""
  config = jlora.LoraConfig(rank=8, alpha=16.0, targets="fc/kernel")
  shapes = jax.eval_shape(lambda: jlora.init(KEY, params, config))
  rng = np.random.default_rng(step + 1)
  f = shapes.lora["fc/kernel"]
  return jlora.Adapter(lora={"fc/kernel": dataclasses.replace(
      f, a=jnp.asarray(0.1 * rng.standard_normal(f.a.shape), jnp.float32),
      b=jnp.asarray(0.002 * rng.standard_normal(f.b.shape), jnp.float32))})


def test_bf16_merge_unmerge_loop_drift_is_pinned_and_remerging_from_base_has_none():
  """100 merge/unmerge cycles with a changing adapter drift; merging from the base does not.

  Measured here (CPU, JAX 0.10.2): 4.16e-3 relative Frobenius drift after 100 cycles (the
  same order as TRL #6688's 2.7e-3); the bound below leaves a little room above it.
  """
  rng = np.random.default_rng(0)
  base = {"fc": {"kernel": jnp.asarray(0.02 * rng.standard_normal((64, 64)), jnp.bfloat16)}}
  frozen = _copy(base)
  cycle = jax.jit(lambda p, a: jlora.unmerge(jlora.merge(p, a), a))
  remerge = jax.jit(jlora.merge)
  looped = base
  for step in range(100):
    adapter = _changing_adapter(base, step)
    looped = cycle(looped, adapter)
    merged = remerge(base, adapter)  # the safe pattern: base is never written
  w0 = _f64(base["fc"]["kernel"])
  drift = np.linalg.norm(_f64(looped["fc"]["kernel"]) - w0) / np.linalg.norm(w0)
  assert 3e-3 < drift < 5e-3, f"drift after 100 cycles: {drift:.3e}"
  _assert_trees_bitwise_equal(base, frozen)  # zero drift: the base is bit for bit the same
  _assert_trees_bitwise_equal(merged, jlora.merge(frozen, adapter))


def test_merge_of_a_quantized_base_is_dense_and_exact_against_dequantize():
  base = {"fc": {"kernel": jax.random.normal(jax.random.key(3), (8, 64)), "bias": jnp.zeros(64)}}
  quantized = jlora.quantize(base, "fc/kernel", "nf4")
  config = jlora.LoraConfig(rank=2, alpha=4.0, targets="fc/kernel")
  adapter = jax.tree.map(lambda x: x + 0.1, jlora.init(jax.random.key(0), quantized, config))
  for dtype in (None, jnp.bfloat16):
    merged = jlora.merge(quantized, adapter, dtype=dtype)
    expected = jlora.merge(jlora.dequantize(quantized, dtype), adapter)
    jax.tree.map(np.testing.assert_array_equal, merged, expected)
    assert merged["fc"]["kernel"].dtype == (dtype or jnp.float32)
  with pytest.raises(ValueError, match=r"dtype=int8 cannot hold .*fc/kernel.*Fix: pass a floating"):
    jlora.merge(quantized, adapter, dtype=jnp.int8)
  with pytest.raises(ValueError, match=r"'fc/kernel' is quantized; subtracting an update"):
    jlora.unmerge(quantized, adapter)
