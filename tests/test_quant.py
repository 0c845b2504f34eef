"""Tests for jlora/quant.py: formats, bounds, the slicing invariant, bitsandbytes parity, orbax."""

import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jlora.quant as jq
from jlora import _tree

SCHEMES = ("int8", "int4", "nf4")
NF4_HALF_GAP = float(np.diff(jq.NF4_CODEBOOK).max()) / 2  # 0.15190, between -1 and -0.696


def _kernel(shape, kind="normal", seed=0):
  """float32 test kernels: Gaussian, uniform, with exact zeros (whole blocks too), or with ties."""
  rng = np.random.default_rng(seed)
  if kind == "normal":
    return (0.02 * rng.standard_normal(shape)).astype(np.float32)
  if kind == "uniform":
    return rng.uniform(-3, 3, shape).astype(np.float32)
  if kind == "zeros":
    x = rng.standard_normal(shape).astype(np.float32)
    x[rng.random(shape) < 0.3] = 0.0
    x[..., :64] = 0.0  # whole all-zero blocks
    return x
  # ties: values exactly on NF4 midpoints and int grid midpoints, repeated, with absmax 1 or 2
  grid = np.concatenate([jq._NF4_MIDPOINTS, np.arange(-13, 14, 2) / 14, [1.0, -1.0, 0.0]])
  x = rng.choice(grid.astype(np.float32), shape)
  x[..., ::64] = 1.0
  return x * np.float32(2.0)


def _leaves_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------------------------------------
# The format.


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_quantized_array_has_the_documented_leaves_shape_dtype_and_bytes(scheme, double_quant):
  x = jnp.asarray(_kernel((3, 5, 512)), jnp.bfloat16)
  q = jq.quantize_array(x, scheme, block_size=64, double_quant=double_quant, lead_axes=2)
  assert (q.shape, q.ndim, q.size, q.dtype) == ((3, 5, 512), 3, 3 * 5 * 512, jnp.bfloat16)
  width = 512 if scheme == "int8" else 256
  assert q.codes.shape == (3, 5, width)
  assert q.codes.dtype == (jnp.int8 if scheme == "int8" else jnp.uint8)
  assert q.scales.shape == (3, 5, 8)
  if double_quant:
    assert q.scales.dtype == jnp.uint8
    assert q.scale_offset.shape == q.scale_step.shape == (3, 5, 1)
    assert q.scale_offset.dtype == q.scale_step.dtype == jnp.float32
  else:
    assert q.scales.dtype == jnp.float32 and q.scale_offset is None and q.scale_step is None
  assert q.nbytes == sum(leaf.nbytes for leaf in jax.tree.leaves(q))
  assert jq.is_quantized(q) and not jq.is_quantized(x)


def test_by_default_only_the_first_axis_is_kept_and_the_rest_form_each_row():
  """lead_axes=1: a (d, heads, 64) kernel has rows of heads·64, not of 64, so its blocks and
  groups of scales are those of the flattened matrix; the codes are the same numbers."""
  x = jnp.asarray(_kernel((6, 8, 64)))
  q, per_head = jq.quantize_array(x, "nf4"), jq.quantize_array(x, "nf4", lead_axes=2)
  assert (q.shape, q.codes.shape, q.scales.shape) == ((6, 8, 64), (6, 256), (6, 8))
  np.testing.assert_array_equal(q.codes.reshape(-1), per_head.codes.reshape(-1))
  np.testing.assert_array_equal(jq.dequantize(q), jq.dequantize(per_head))
  assert jq.quantize_array(x, "nf4", double_quant=True).nbytes < jq.quantize_array(
      x, "nf4", double_quant=True, lead_axes=2).nbytes


def test_nibble_order_is_high_then_low():
  """Element 2k of a row is in the high nibble of byte k, element 2k+1 in the low nibble."""
  row = np.array([[-1.0, 1.0] + [0.0] * 62], np.float32)  # NF4 codes 0, 15, then 7s
  q = jq.quantize_array(jnp.asarray(row), "nf4")
  assert np.asarray(q.codes)[0, 0] == 0x0F and np.asarray(q.codes)[0, 1] == 0x77
  q4 = jq.quantize_array(jnp.asarray(row), "int4")  # nibble = code + 8: -7 -> 1, 7 -> 15
  assert np.asarray(q4.codes)[0, 0] == 0x1F and np.asarray(q4.codes)[0, 1] == 0x88


def test_nf4_codebook_is_the_qlora_normal_quantile_construction():
  """QLoRA, Appendix E: 8 positive and 7 negative N(0,1) quantiles (offset 0.9677083), plus 0,
  scaled to [-1, 1]."""
  ppf, offset = statistics.NormalDist().inv_cdf, 0.9677083
  pos = [ppf(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
  neg = [-ppf(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
  values = np.sort(np.array(pos + neg + [0.0]))
  np.testing.assert_allclose(jq.NF4_CODEBOOK, values / np.abs(values).max(), atol=1e-7)
  assert jq.NF4_CODEBOOK[7] == 0.0 and jq.NF4_CODEBOOK.dtype == np.float32


# ----------------------------------------------------------------------------------------------
# bitsandbytes parity.

BNB_CASES = [((64, 128), "normal"), ((256, 512), "uniform"), ((3, 128, 256), "normal"),
             ((4, 64), "zeros"), ((2, 8, 192), "zeros"), ((16, 128), "ties"), ((1, 64), "ties")]


@pytest.mark.parametrize(("shape", "kind"), BNB_CASES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_nf4_is_bit_exact_with_bitsandbytes(shape, kind, dtype):
  torch = pytest.importorskip("torch")
  F = pytest.importorskip("bitsandbytes.functional")
  t = torch.from_numpy(_kernel(shape, kind)).to(getattr(torch, dtype))
  packed, state = F.quantize_4bit(t, blocksize=64, quant_type="nf4")
  x = jnp.asarray(t.float().numpy()).astype(dtype)
  q = jq.quantize_array(x, "nf4", block_size=64)
  np.testing.assert_array_equal(np.asarray(q.codes).reshape(-1), packed.numpy().reshape(-1))
  np.testing.assert_array_equal(np.asarray(q.scales).reshape(-1), state.absmax.numpy())
  expected = F.dequantize_4bit(packed, state).float().numpy()
  np.testing.assert_array_equal(np.asarray(jq.dequantize(q).astype(jnp.float32)), expected)
  np.testing.assert_array_equal(np.asarray(jax.jit(jq.dequantize)(q).astype(jnp.float32)),
                                expected)


@pytest.mark.parametrize(("shape", "kind"), BNB_CASES[:4])
def test_double_quant_keeps_bitsandbytes_codes_and_is_at_least_as_accurate(shape, kind):
  """The 4-bit codes equal bitsandbytes' with compress_statistics=True (both use the exact
  absmax); only the 8-bit coding of the scales differs (module docstring), and ours is closer."""
  torch = pytest.importorskip("torch")
  F = pytest.importorskip("bitsandbytes.functional")
  w = _kernel(shape, kind)
  packed, state = F.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4",
                                  compress_statistics=True)
  q = jq.quantize_array(jnp.asarray(w), "nf4", double_quant=True)
  np.testing.assert_array_equal(np.asarray(q.codes).reshape(-1), packed.numpy().reshape(-1))
  exact = np.asarray(jq.quantize_array(jnp.asarray(w), "nf4").scales).reshape(-1)
  theirs = (F.dequantize_blockwise(state.absmax, state.state2) + state.offset).numpy()
  ours = np.asarray(jq._scales(q)).reshape(-1)
  assert np.abs(ours - exact).max() <= np.abs(theirs - exact).max() + 1e-9
  dense = F.dequantize_4bit(packed, state).numpy()
  err = lambda d: np.linalg.norm(d - w)
  assert err(np.asarray(jq.dequantize(q))) <= err(dense) * 1.0001 + 1e-9


# ----------------------------------------------------------------------------------------------
# Error bounds, against a float64 NumPy reference of each block's absmax.


def _block_absmax(w, block):
  lead, n = w.shape[:-1], w.shape[-1]
  amax = np.abs(w.astype(np.float64)).reshape(*lead, n // block, block).max(-1)
  return np.repeat(amax, block, axis=-1)


@pytest.mark.parametrize("kind", ["normal", "uniform", "zeros", "ties"])
@pytest.mark.parametrize(("scheme", "block", "bound"), [
    ("int8", None, 1 / 254), ("int8", 64, 1 / 254), ("int4", 64, 1 / 14), ("int4", 32, 1 / 14),
    ("nf4", 64, NF4_HALF_GAP), ("nf4", None, NF4_HALF_GAP)])
def test_round_to_nearest_error_is_within_half_a_step_times_absmax(kind, scheme, block, bound):
  """int8: |err| <= absmax/254, int4: <= absmax/14 (round to nearest, half of absmax/127 and
  absmax/7), nf4: <= half the widest codebook gap (0.15190) times absmax; plus f32 rounding."""
  w = _kernel((8, 4, 256), kind)
  q = jq.quantize_array(jnp.asarray(w), scheme, block_size=block, lead_axes=2)
  err = np.abs(np.asarray(jq.dequantize(q), np.float64) - w)
  amax = _block_absmax(w, block or w.shape[-1])
  worst = float((err / np.maximum(amax, 1e-30)).max())
  assert (err <= amax * (bound + 1e-6)).all(), worst
  assert err[amax == 0].max(initial=0) == 0  # zero blocks come back exactly


@pytest.mark.parametrize("scheme", SCHEMES)
def test_double_quant_scales_are_within_half_a_step_and_inside_their_group(scheme):
  w = _kernel((4, 64 * 600), "uniform", seed=3)  # 600 blocks a row: groups of 256, 256, 88
  q = jq.quantize_array(jnp.asarray(w), scheme, double_quant=True)
  exact = np.asarray(jq.quantize_array(jnp.asarray(w), scheme).scales)
  assert q.scale_step.shape == (4, 3)
  approx = np.asarray(jq._scales(q))
  step = np.repeat(np.asarray(q.scale_step), 256, axis=-1)[:, :600]
  lo = np.repeat(np.asarray(q.scale_offset), 256, axis=-1)[:, :600]
  assert (np.abs(approx - exact) <= step / 2 + 4 * np.spacing(exact)).all()  # + f32 rounding
  assert (approx >= lo).all() and (approx >= 0).all()
  group_min = [exact[:, :256].min(-1), exact[:, 256:512].min(-1), exact[:, 512:].min(-1)]
  np.testing.assert_array_equal(np.asarray(q.scale_offset), np.stack(group_min, -1))


def test_double_quant_of_equal_scales_is_exact():
  w = np.tile(np.array([1.0, -0.5] * 32, np.float32), (3, 4))  # every block has absmax 1
  q = jq.quantize_array(jnp.asarray(w), "nf4", double_quant=True)
  np.testing.assert_array_equal(np.asarray(jq._scales(q)), np.ones((3, 4), np.float32))


# ----------------------------------------------------------------------------------------------
# Round trips, jit, and the slicing invariant.


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("double_quant", [False, True])
def test_round_trip_keeps_shape_and_dtype_and_works_under_jit(scheme, dtype, double_quant):
  x = jnp.asarray(_kernel((2, 3, 128)), dtype)
  quant = lambda a: jq.quantize_array(a, scheme, block_size=32, double_quant=double_quant)
  q, qj = quant(x), jax.jit(quant)(x)
  _leaves_equal(q, qj)
  d = jq.dequantize(q)
  assert d.shape == x.shape and d.dtype == dtype
  assert jq.dequantize(q, jnp.float32).dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(jax.jit(jq.dequantize)(q), np.float32),
                             np.asarray(d, np.float32), rtol=1e-6, atol=0)
  rel = np.linalg.norm(np.asarray(d, np.float32) - np.asarray(x, np.float32)) / np.linalg.norm(
      np.asarray(x, np.float32))
  assert rel < {"int8": 0.01, "int4": 0.2, "nf4": 0.12}[scheme]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_slicing_leading_axes_gives_the_quantized_slice(scheme, double_quant):
  x = jnp.asarray(_kernel((3, 2, 8, 640)))  # 10 blocks a row: one short group
  quant = lambda a: jq.quantize_array(a, scheme, double_quant=double_quant,  # noqa: E731
                                      lead_axes=a.ndim - 1)
  q = quant(x)
  for i in range(3):
    _leaves_equal(jax.tree.map(lambda leaf, i=i: leaf[i], q), quant(x[i]))
  _leaves_equal(jax.tree.map(lambda leaf: leaf[1, :, 2:5], q), quant(x[1, :, 2:5]))
  _leaves_equal(jax.tree.map(lambda leaf: jnp.moveaxis(leaf, 0, 2), q),
                quant(jnp.moveaxis(x, 0, 2)))


@pytest.mark.parametrize("double_quant", [False, True])
def test_scan_over_a_stacked_kernel_dequantizes_each_layer(double_quant):
  stack = jnp.asarray(_kernel((4, 64, 128)))  # (layers, in, out)
  q = jq.quantize_array(stack, "nf4", double_quant=double_quant)

  def body(h, layer_q):
    w = jq.dequantize(layer_q)
    return h @ w[:, :64], w

  h, per_layer = jax.jit(lambda q: jax.lax.scan(body, jnp.ones((2, 64)), q))(q)
  assert per_layer.shape == (4, 64, 128)
  for i in range(4):
    expected = jax.jit(jq.dequantize)(jq.quantize_array(stack[i], "nf4", lead_axes=0,
                                                        double_quant=double_quant))
    np.testing.assert_allclose(per_layer[i], expected, rtol=1e-6, atol=0)
  if not double_quant:
    np.testing.assert_array_equal(per_layer, jq.dequantize(q))


def test_vmap_over_the_stack_axis():
  stack = jnp.asarray(_kernel((4, 64, 128)))
  q = jq.quantize_array(stack, "int4")
  np.testing.assert_array_equal(jax.vmap(jq.dequantize)(q), jq.dequantize(q))


# ----------------------------------------------------------------------------------------------
# Trees.


def test_quantize_replaces_only_the_targets_and_dequantize_maps_the_tree():
  params = {"fc": {"kernel": jnp.ones((64, 128)), "bias": jnp.zeros(128)},
            "out": {"kernel": jnp.ones((128, 64))}}
  q = jq.quantize(params, ["fc/kernel", "out/.*"], "int8", block_size=None)
  assert jq.is_quantized(q["fc"]["kernel"]) and jq.is_quantized(q["out"]["kernel"])
  assert q["fc"]["bias"] is params["fc"]["bias"]
  back = jq.dequantize(q)
  assert back["fc"]["bias"] is params["fc"]["bias"]
  _leaves_equal(back, params)  # ones quantize exactly
  q2 = jq.quantize(params, lambda path, leaf: path.startswith("out"), "nf4")
  assert jq.is_quantized(q2["out"]["kernel"]) and not jq.is_quantized(q2["fc"]["kernel"])


def test_tree_helpers_treat_a_quantized_kernel_as_one_leaf(tiny_lm):
  _, variables, _ = tiny_lm
  q = jq.quantize(variables, r".*/(up|down)/kernel", "nf4", block_size=8)
  flat = _tree.flatten(q)
  assert set(flat) == set(_tree.flatten(variables))
  kernel = flat["params/layers/up/kernel"]  # the scanned (2, 8, 16) stack
  assert jq.is_quantized(kernel) and kernel.shape == (2, 8, 16)
  swapped = _tree.replace(q, {"params/layers/up/kernel": jnp.zeros((2, 8, 16))})
  assert not jq.is_quantized(swapped["params"]["layers"]["up"]["kernel"])


def test_quantize_an_nnx_state(tiny_nnx):
  _, state, _ = tiny_nnx
  q = jq.quantize(state, r"(query|out)/kernel", "int4", block_size=4)
  assert isinstance(q["query"]["kernel"], nnx.Variable)
  assert jq.is_quantized(q["query"]["kernel"].get_value())
  assert _tree.flatten(q)["query/kernel"].shape == (8, 2, 4)


# ----------------------------------------------------------------------------------------------
# orbax and memory.


@pytest.mark.parametrize("target", ["abstract", "tree"])
def test_orbax_round_trip_is_bit_exact(tmp_path, target):
  ocp = pytest.importorskip("orbax.checkpoint")
  params = {"a": {"kernel": jnp.asarray(_kernel((3, 16, 128)))}, "bias": jnp.arange(3.0),
            "b": {"kernel": jnp.asarray(_kernel((8, 64)), jnp.bfloat16)}}
  q = jq.quantize(params, "a/kernel", "nf4", double_quant=True)
  q = jq.quantize(q, "b/kernel", "int8", block_size=None)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "q", q)
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "q", jax.eval_shape(lambda: q) if target == "abstract"
                            else q)
  _leaves_equal(restored, q)  # the static metadata too: it is part of the treedef
  assert repr(restored["b"]["kernel"]) == repr(q["b"]["kernel"])


def test_bytes_per_scheme_against_float32():
  w = jnp.asarray(_kernel((512, 2048)))
  ratio = lambda **kw: jq.quantize_array(w, **kw).nbytes / w.nbytes
  assert ratio(scheme="int8", block_size=None) <= 0.26
  assert ratio(scheme="int4") <= 0.15
  assert ratio(scheme="nf4") <= 0.15
  assert ratio(scheme="nf4", double_quant=True) <= 0.135


# ----------------------------------------------------------------------------------------------
# Sharding.


def _auto_mesh():
  return Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))


def _explicit_mesh():
  return jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)


@pytest.mark.parametrize("make_mesh", [_auto_mesh, _explicit_mesh])
@pytest.mark.parametrize(("scheme", "block", "spec", "expected"), [
    # codes, scales, scale_offset, scale_step (double quant)
    ("nf4", 64, P("data", "model"), [P("data", "model"), P("data", "model"), P("data", None),
                                      P("data", None)]),
    ("int8", None, P("data", "model"), [P("data", "model"), P("data", None), P("data", None),
                                         P("data", None)]),
    ("int4", 128, P(None, "data"), [P(None, "data"), P(None, "data"), P(None, None),
                                     P(None, None)]),
    ("nf4", 64, P("data"), [P("data", None)] * 4),
    ("nf4", 2, P("data", "model"), [P("data", "model"), P("data", "model"), P("data", None),
                                     P("data", None)]),  # 768 blocks: 3 groups on 2 devices
    ("int4", 4, P("data", "model"), [P("data", "model")] * 4),  # 384 blocks: 2 groups a row
])
def test_quantizing_a_sharded_kernel_keeps_the_leading_axes_sharding(
    make_mesh, scheme, block, spec, expected):
  mesh = make_mesh()
  w = _kernel((16, 1536), seed=5)
  x = jax.device_put(jnp.asarray(w), NamedSharding(mesh, spec))
  q = jq.quantize_array(x, scheme, block_size=block, double_quant=True)
  got = [leaf.sharding for leaf in jax.tree.leaves(q)]
  assert [s.spec for s in got] == expected and all(s.mesh == mesh for s in got)
  _leaves_equal(q, jq.quantize_array(jnp.asarray(w), scheme, block_size=block, double_quant=True))
  d = jq.dequantize(q)
  np.testing.assert_allclose(d, jq.dequantize(jq.quantize_array(
      jnp.asarray(w), scheme, block_size=block, double_quant=True)), rtol=1e-6, atol=0)
  if make_mesh is _explicit_mesh:  # typed shardings: the dense kernel comes back like the codes
    with jax.set_mesh(mesh):
      dj = jax.jit(lambda q: jq.dequantize(q) * 1)(q)
    assert d.sharding.spec == dj.sharding.spec == expected[0]
    np.testing.assert_array_equal(dj, d)


def test_a_sharded_stack_keeps_its_layer_axis_sharding():
  mesh = _auto_mesh()
  x = jax.device_put(jnp.asarray(_kernel((4, 64, 256))), NamedSharding(mesh, P("data", None,
                                                                               "model")))
  tree = {"w": x}
  q = jq.quantize(tree, "w", "nf4", lead_axes=2)["w"]
  assert tree["w"] is x
  assert q.codes.sharding.spec == P("data", None, "model")
  assert q.scales.sharding.spec == P("data", None, "model")
  sliced = jax.tree.map(lambda leaf: leaf[1], q)
  _leaves_equal(sliced, jq.quantize_array(jnp.asarray(np.asarray(x)[1]), "nf4"))
  rows = jq.quantize(tree, "w", "nf4")["w"]  # lead_axes=1: rows of 64·256, the layer axis kept
  assert rows.codes.sharding.spec == P("data", None)


# ----------------------------------------------------------------------------------------------
# Errors: each names the path and ends with a fix; the input is left as it was.


PARAMS = {"fc": {"kernel": jnp.ones((6, 96)), "bias": jnp.zeros(96)},
          "odd": {"kernel": jnp.ones((4, 63))}, "ids": {"table": jnp.ones((4, 64), jnp.int32)}}


@pytest.mark.parametrize(("targets", "kwargs", "message"), [
    ("fc/kernel", dict(block_size=64), r"fc/kernel has rows of 96 elements.*not a multiple of "
     r"block_size=64.*Fix: use block_size=32"),
    ("odd/kernel", dict(scheme="nf4", block_size=None), r"odd/kernel has rows of an odd 63 "
     r"elements.*Fix: use scheme='int8'"),
    ("odd/kernel", dict(scheme="int4", block_size=None), r"odd 63 elements; int4"),
    ("fc/kernel", dict(lead_axes=2), r"fc/kernel has shape \(6, 96\); lead_axes=2 must be"),
    ("fc/bias", dict(), r"fc/bias has shape \(96,\).*Fix: narrow targets"),
    ("ids/table", dict(), r"ids/table is not a floating-point array \(dtype=int32\).*Fix:"),
    ("fc/.*", dict(block_size=32), r"fc/bias has shape"),
])
def test_quantize_rejects_leaves_it_cannot_quantize_naming_the_path(targets, kwargs, message):
  with pytest.raises(ValueError, match=message):
    jq.quantize(PARAMS, targets, **kwargs)
  assert not any(jq.is_quantized(x) for x in _tree.flatten(PARAMS).values())


def test_the_same_leaves_quantize_with_a_fitting_setting():
  assert jq.is_quantized(jq.quantize(PARAMS, "fc/kernel", block_size=32)["fc"]["kernel"])
  assert jq.is_quantized(jq.quantize(PARAMS, "odd/kernel", "int8", block_size=None)["odd"][
      "kernel"])
  assert jq.is_quantized(jq.quantize(PARAMS, "odd/kernel", "int8", block_size=9)["odd"][
      "kernel"])


def test_quantizing_twice_is_an_error():
  q = jq.quantize(PARAMS, "fc/kernel", block_size=32)
  with pytest.raises(ValueError, match=r"fc/kernel is already quantized .*Fix: quantize the"):
    jq.quantize(q, "fc/kernel", block_size=32)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(scheme="fp4"), r"unknown scheme 'fp4'. Fix: use one of \('int8', 'int4', 'nf4'\)"),
    (dict(block_size=0), r"block_size must be a positive int or None.*block_size=0.*Fix:"),
    (dict(block_size=-64), r"block_size=-64"),
    (dict(block_size=True), r"block_size=True"),
    (dict(block_size=32.0), r"block_size=32.0"),
])
def test_bad_options_are_rejected(kwargs, message):
  with pytest.raises(ValueError, match=message):
    jq.quantize(PARAMS, "fc/kernel", **kwargs)
  with pytest.raises(ValueError, match=message):
    jq.quantize_array(PARAMS["fc"]["kernel"], **{"scheme": "nf4", **kwargs})


def test_quantize_array_names_the_array_in_its_errors():
  with pytest.raises(ValueError, match=r"quantize_array: the array has shape"):
    jq.quantize_array(jnp.ones(64))


def test_targets_matching_nothing_lists_close_paths():
  with pytest.raises(ValueError, match=r"(?s)matched no leaf.*'fc/kernels'.*look close:.*fc/kernel"
                     r".*Fix:") as info:
    jq.quantize(PARAMS, "fc/kernels")
  assert "\n" in str(info.value)
  with pytest.raises(TypeError, match=r"targets must be a regex.*got 3"):
    jq.quantize(PARAMS, ["fc/kernel", 3])


def test_dequantize_to_an_integer_dtype_is_an_error_naming_the_path():
  q = jq.quantize(PARAMS, "fc/kernel", block_size=32)
  with pytest.raises(ValueError, match=r"dtype=int8 cannot hold.*of fc/kernel.*Fix: pass a "
                     r"floating dtype"):
    jq.dequantize(q, jnp.int8)
  with pytest.raises(ValueError, match=r"dtype=int32 cannot hold.*of a QuantizedArray"):
    jq.dequantize(q["fc"]["kernel"], "int32")
  assert jq.dequantize(q, jnp.bfloat16)["fc"]["kernel"].dtype == jnp.bfloat16

