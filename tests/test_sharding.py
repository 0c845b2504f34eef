"""Tests for jlora/sharding.py on 8 fake CPU devices (tests/conftest.py sets jax_num_cpu_devices).

The model, layouts and train step live in tests/_sharding_model.py; the two-process dry run in
tests/_multihost_worker.py. Every layout trains the same adapter from the same data as a
one-device run and must reach the same losses; the expected factor shardings are written out by
hand below, independent of the implementation.
"""

import collections
import dataclasses
import functools
import json
import math
import os
import re
import socket
import subprocess
import sys

import _sharding_model as m
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jlora
from jlora import sharding

pytestmark = pytest.mark.skipif(len(jax.devices()) != 8, reason="needs 8 (fake CPU) devices")

STEPS = 3
_HERE = os.path.dirname(os.path.abspath(__file__))


def _mesh(shape, names, devices=None):
  devices = jax.devices()[: math.prod(shape)] if devices is None else devices
  return Mesh(np.array(devices).reshape(shape), names)


def _adapter(params, letters=None, **config):
  roles = {} if letters is None else {".*": letters}
  config = jlora.LoraConfig(rank=2, alpha=4.0, targets=".*kernel|.*embedding", roles=roles,
                            **config)
  return jlora.init(jax.random.key(0), params, config)


# ----------------------------------------------------------------------------------------------
# The layout rule, kernel by kernel: (kernel shape, axis letters, kernel spec, A spec, B spec).

RULES = {
    "dense_column": ((8, 6), "io", P(None, "x"), P(None, None), P(None, "x")),
    "dense_row": ((8, 6), "io", P("x"), P(None, "x"), P(None, None)),
    "dense_both": ((8, 6), "io", P("x", "y"), P(None, "x"), P(None, "y")),
    "dense_two_axes_on_one_dim": ((8, 6), "io", P(("x", "y")), P(None, ("x", "y")), P(None, None)),
    "qkv_heads": ((8, 4, 3), "ioo", P(None, "x"), P(None, None), P(None, "x")),
    "qkv_head_dim_only": ((8, 4, 2), "ioo", P(None, None, "x"), P(None, None), P(None, None)),
    "qkv_heads_and_head_dim": ((8, 4, 2), "ioo", P(None, "x", "y"), P(None, None), P(None, None)),
    "out_heads": ((4, 3, 8), "iio", P("x", None, "y"), P(None, "x"), P(None, "y")),
    "size_one_lead": ((1, 4, 6), "iio", P(None, "x"), P(None, "x"), P(None, None)),
    "stacked": ((4, 8, 6), "sio", P("x", None, "y"), P("x", None, None), P("x", None, "y")),
    "stacked_fsdp": ((4, 8, 6), "sio", P(None, "x"), P(None, None, "x"), P(None, None, None)),
    "short_spec": ((4, 8, 6), "sio", P(), P(None, None, None), P(None, None, None)),
}


@pytest.mark.parametrize("case", RULES)
def test_factor_shardings_follow_kernel(case):
  shape, letters, kernel_spec, a_spec, b_spec = RULES[case]
  mesh = _mesh((2, 2), ("x", "y"))
  adapter = _adapter({"w": {"kernel": jnp.zeros(shape)}}, letters)
  out = jlora.shardings(adapter, {"w": {"kernel": kernel_spec}}, mesh=mesh).lora["w/kernel"]
  assert (out.a.spec, out.b.spec) == (a_spec, b_spec)
  assert out.a.mesh == mesh and out.roles == adapter.lora["w/kernel"].roles
  # The layouts are real: each factor places, and shards of A hold whole rows of fan_in.
  placed = jax.device_put(adapter.lora["w/kernel"], out)
  assert placed.a.sharding.spec == a_spec


def test_embedding_and_arrays_as_shardings():
  mesh = _mesh((4,), ("data",))
  table = jax.device_put(jnp.zeros((8, 6)), NamedSharding(mesh, P("data")))
  params = {"embed": {"embedding": table}, "norm": {"scale": jnp.ones(6)}}
  adapter = _adapter(params, trainable="norm/scale")
  with pytest.raises(TypeError, match=r"norm/scale: expected a NamedSharding.*SingleDevice"):
    jlora.shardings(adapter, params)
  params["norm"]["scale"] = jax.device_put(params["norm"]["scale"], NamedSharding(mesh, P()))
  out = jlora.shardings(adapter, params)
  assert out.lora["embed/embedding"].a.spec == P(None, "data")  # rows of the table: fan_in
  assert out.lora["embed/embedding"].b.spec == P(None, None)
  assert out.extras["norm/scale"] == params["norm"]["scale"].sharding


def test_extras_follow_their_param_and_replicate_option():
  mesh = _mesh((2, 4), ("data", "model"))
  params = {"fc": {"kernel": jnp.zeros((8, 16)), "bias": jnp.zeros(16)}}
  specs = {"fc": {"kernel": P("data", "model"), "bias": P("model")}}
  adapter = _adapter(params, trainable="fc/bias")
  out = jlora.shardings(adapter, specs, mesh=mesh)
  assert out.extras["fc/bias"] == NamedSharding(mesh, P("model"))
  ddp = jlora.shardings(adapter, specs, mesh=mesh, replicate=True)
  assert all(s == NamedSharding(mesh, P()) for s in jax.tree.leaves(ddp))


def test_nnx_state(tiny_nnx):
  graphdef, state, ids = tiny_nnx
  mesh = _mesh((2,), ("model",))

  def place(path, _):
    column = jax.tree_util.keystr(path, simple=True, separator="/").startswith("query/kernel")
    return NamedSharding(mesh, P(None, "model") if column else P())

  placed = jax.device_put(state, jax.tree_util.tree_map_with_path(place, state))
  config = jlora.LoraConfig(rank=2, alpha=4.0, targets="(query|out)/kernel", trainable="head/bias")
  model = nnx.merge(graphdef, state)
  adapter = jlora.init_sharded(jax.random.key(0), placed, config, model, ids)
  assert adapter.lora["query/kernel"].b.sharding.spec == P(None, "model")  # (8, 2·4): heads
  assert adapter.lora["query/kernel"].a.sharding.is_fully_replicated
  assert adapter.extras["head/bias"].sharding.is_fully_replicated
  jax.tree.map(np.testing.assert_array_equal, adapter,
               jlora.init(jax.random.key(0), state, config, model, ids))


def test_opt_state_shardings_through_optax_wrappers():
  mesh = _mesh((2,), ("x",))
  adapter = _adapter({"w": {"kernel": jnp.zeros((8, 6))}})
  adapter_sh = jlora.shardings(adapter, {"w": {"kernel": P("x")}}, mesh=mesh)
  expected_a = P(None, "x")
  optimizers = {"lora_plus": jlora.lora_plus(optax.adam, 1e-3),
                "multisteps": optax.MultiSteps(optax.sgd(1e-3, 0.9), 2),
                "adafactor": optax.adafactor(1e-3, min_dim_size_to_factor=2)}  # factored: none
  for name, optimizer in optimizers.items():
    state = jax.eval_shape(optimizer.init, adapter)
    out = jlora.opt_state_shardings(state, adapter_sh)
    found = {jax.tree_util.keystr(path): s for path, s in jax.tree_util.tree_leaves_with_path(out)}
    paths = {jax.tree_util.keystr(path): x.shape
             for path, x in jax.tree_util.tree_leaves_with_path(state)}
    for path, placed in found.items():
      if path.endswith(".lora['w/kernel'].a") and paths[path] == adapter.lora["w/kernel"].a.shape:
        assert placed.spec == expected_a, path
      else:
        assert placed.is_fully_replicated, path
    assert any(s.spec == expected_a for s in found.values()) == (name != "adafactor"), name


def test_shardings_accept_abstract_adapter():
  mesh = _mesh((2,), ("x",))
  params = {"w": {"kernel": jnp.zeros((8, 6))}}
  config = jlora.LoraConfig(rank=2, alpha=4.0, targets="w/kernel")
  abstract = jax.eval_shape(lambda k: jlora.init(k, params, config), jax.random.key(0))
  out = jlora.shardings(abstract, {"w": {"kernel": P(None, "x")}}, mesh=mesh)
  assert out.lora["w/kernel"].b.spec == P(None, "x")


BAD_SPECS = {
    "too_many_entries": ((8, 6), P(None, None, "x"), r"w/kernel: the sharding spec .* has 3 "
                         r"entries but the leaf has 2 axes"),
    "does_not_divide": ((6, 8), P("y"), r"w/kernel: axis 0 has size 6, which mesh axis 'y' "
                        r"\(size 4\) does not divide"),
    "tuple_does_not_divide": ((8, 4), P(None, ("x", "y")), r"w/kernel: axis 1 has size 4, "
                              r"which mesh axis \('x', 'y'\) \(size 8\) does not divide"),
    "unknown_axis": ((8, 6), P(None, "model"), r"w/kernel: axis 1 is sharded over mesh axis "
                     r"'model', which the mesh \{'x': 2, 'y': 4\} does not have"),
}


@pytest.mark.parametrize("case", BAD_SPECS)
def test_bad_spec_names_path_and_axis(case):
  shape, spec, message = BAD_SPECS[case]
  mesh = _mesh((2, 4), ("x", "y"))
  adapter = _adapter({"w": {"kernel": jnp.zeros(shape)}})
  with pytest.raises(ValueError, match=message):
    jlora.shardings(adapter, {"w": {"kernel": spec}}, mesh=mesh)


def test_bad_inputs():
  mesh = _mesh((2,), ("x",))
  adapter = _adapter({"w": {"kernel": jnp.zeros((8, 6))}})
  with pytest.raises(TypeError, match=r"w/kernel: got a PartitionSpec but no mesh"):
    jlora.shardings(adapter, {"w": {"kernel": P()}})
  with pytest.raises(ValueError, match=r"adapter's path 'w/kernel' is not in the params"):
    jlora.shardings(adapter, {"v": {"kernel": P()}}, mesh=mesh)
  other = _mesh((2,), ("x",), jax.devices()[2:4])
  with pytest.raises(ValueError, match=r"w/kernel: its sharding is on the mesh"):
    jlora.shardings(adapter, {"w": {"kernel": NamedSharding(other, P())}}, mesh=mesh)
  with pytest.raises(TypeError, match=r"Expected a jlora.Adapter"):
    jlora.shardings({"w": {"kernel": jnp.zeros((8, 6))}}, {"w": {"kernel": P()}}, mesh=mesh)


def test_extra_spec_must_fit_its_leaf():
  mesh = _mesh((4,), ("x",))
  adapter = _adapter({"w": {"kernel": jnp.zeros((8, 6))}, "b": jnp.zeros(6)}, trainable="b")
  with pytest.raises(ValueError, match=r"b: axis 0 has size 6, which mesh axis 'x' \(size 4\)"):
    jlora.shardings(adapter, {"w": {"kernel": P("x")}, "b": P("x")}, mesh=mesh)
  out = jlora.shardings(adapter, {"w": {"kernel": P("x")}, "b": P()}, mesh=mesh)
  assert out.extras["b"].spec == P()


def test_init_sharded_abstract_extras_error():
  mesh = _mesh((2,), ("x",))
  sharded = NamedSharding(mesh, P())
  params = {"w": {"kernel": jax.ShapeDtypeStruct((8, 6), jnp.float32, sharding=sharded)},
            "b": jax.ShapeDtypeStruct((6,), jnp.float32, sharding=sharded)}
  config = jlora.LoraConfig(rank=2, alpha=4.0, targets="w/kernel", trainable="b")
  with pytest.raises(ValueError, match=r"b: LoraConfig.trainable selects it.*only its shape"):
    jlora.init_sharded(jax.random.key(0), params, config)
  adapter = jlora.init_sharded(jax.random.key(0), params, dataclasses.replace(config, trainable=()))
  assert adapter.lora["w/kernel"].a.sharding.is_equivalent_to(sharded, 2)


# ----------------------------------------------------------------------------------------------
# The train step on each layout.

# Factor specs written out by hand: {kernel name: (A spec, B spec)}; A is (L, r, fan_in),
# B is (L, r, fan_out); the layer axis is never sharded in these layouts.
_R = P(None, None, None)
EXPECTED = {
    "data_parallel": dict.fromkeys(("query", "key", "value", "out", "up", "down"), (_R, _R)),
    "fsdp": {**dict.fromkeys(("query", "key", "value", "up", "down"), (P(None, None, "data"), _R)),
             "out": (_R, P(None, None, "data"))},
    "tensor_parallel": {**dict.fromkeys(("query", "key", "value", "up"),
                                        (_R, P(None, None, "model"))),
                        "out": (P(None, None, "model"), _R), "down": (P(None, None, "model"), _R)},
    "data_x_model": {**dict.fromkeys(("query", "key", "value", "up"),
                                     (P(None, None, "data"), P(None, None, "model"))),
                     "out": (P(None, None, "model"), P(None, None, "data")),
                     "down": (P(None, None, "model"), P(None, None, "data"))},
}


@functools.cache
def _setup():
  """Host values shared by every run: variables, data, and the one-device adapter."""
  variables = m.variables()
  ids, labels = m.data()
  adapter = jlora.init(jax.random.key(2), variables, m.CONFIG, m.MODEL.apply, ids)
  return variables, ids, labels, adapter


@functools.cache
def _single_device():
  variables, ids, labels, adapter = _setup()
  step = jax.jit(m.make_step())
  state, losses = m.OPTIMIZER.init(adapter), []
  for _ in range(STEPS):
    adapter, state, loss = step(adapter, state, variables, ids, labels)
    losses.append(float(loss))
  return losses, adapter


@functools.cache
def _run(layout: str):
  """Trains STEPS steps on `layout`; returns what the tests inspect."""
  variables, ids, labels, adapter = _setup()
  mesh = m.mesh_for(layout)
  placed = m.place(variables, mesh, m.param_specs(variables, layout))
  adapter_sh = jlora.shardings(adapter, placed)
  adapter = jax.device_put(adapter, adapter_sh)
  state_sh = jlora.opt_state_shardings(jax.eval_shape(m.OPTIMIZER.init, adapter), adapter_sh)
  state = jax.jit(m.OPTIMIZER.init, out_shardings=state_sh)(adapter)
  batch = jax.device_put((ids, labels), m.batch_sharding(layout, mesh))
  step = jax.jit(m.make_step(m.model_for(layout, mesh)),
                 out_shardings=(adapter_sh, state_sh, NamedSharding(mesh, P())))
  compiled = step.lower(adapter, state, placed, *batch).compile()
  losses = []
  for _ in range(STEPS):
    adapter, state, loss = compiled(adapter, state, placed, *batch)
    losses.append(float(loss))
  return dict(mesh=mesh, placed=placed, batch=batch, adapter=adapter, state=state,
              adapter_sh=adapter_sh, state_sh=state_sh, losses=losses, compiled=compiled)


def _assert_close(x, y, tol=1e-3):
  """Relative error in norm: Adam turns float noise in near-zero gradients into whole steps
  for a few elements, so elementwise tolerances would be loose for all the others."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  assert np.linalg.norm(x - y) <= tol * np.linalg.norm(y), (np.abs(x - y).max(), x.shape)


def _same_sharding(x, expected) -> bool:
  return x.sharding.is_equivalent_to(expected, x.ndim)


@pytest.mark.parametrize("layout", m.LAYOUTS)
def test_layout_matches_single_device(layout):
  base_losses, base_adapter = _single_device()
  run = _run(layout)
  np.testing.assert_allclose(run["losses"], base_losses, rtol=2e-5)
  assert base_losses[-1] < base_losses[0] - 0.1  # it does train
  jax.tree.map(_assert_close, run["adapter"], base_adapter)
  # The intended layouts, kept across steps: adapter, then the Adam moments beside it.
  for path, factors in run["adapter"].lora.items():
    name = path.split("/")[-2]
    assert (factors.a.sharding.spec, factors.b.sharding.spec) == EXPECTED[layout][name], path
  assert run["adapter"].extras["params/ln_f/scale"].sharding == run["placed"]["params"]["ln_f"][
      "scale"].sharding
  adam = run["state"][0]
  for moments in (adam.mu, adam.nu):
    assert all(jax.tree.leaves(jax.tree.map(_same_sharding, moments, run["adapter_sh"])))
  assert adam.count.sharding.is_fully_replicated


def test_fsdp_frozen_params_are_split():
  run = _run("fsdp")
  placed = run["placed"]
  leaves = jax.tree.leaves(placed)
  split = sum(x.nbytes for x in leaves if not x.sharding.is_fully_replicated)
  replicated = sum(x.nbytes for x in leaves if x.sharding.is_fully_replicated)
  assert split > 0.9 * (split + replicated)  # LayerNorms, biases and `pos` stay whole
  on_device0 = sum(x.addressable_shards[0].data.nbytes for x in leaves)
  assert on_device0 == split // 8 + replicated


# ---- collectives in the compiled FSDP step

_COLLECTIVE = re.compile(r"\s*(?:ROOT\s+)?\S+\s*=\s*(.*?)\s+(all-gather|all-reduce|reduce-scatter|"
                         r"all-to-all|collective-permute)(?:-start)?\(")


def _collectives(hlo: str, min_size: int) -> collections.Counter:
  """(op, number of elements) of every collective result at least `min_size` large.

  A combined collective returns a tuple; each member counts on its own.
  """
  found = collections.Counter()
  for line in hlo.splitlines():
    match = _COLLECTIVE.match(line)
    if match:
      for dims in re.findall(r"\w+\[([\d,]*)\]", match.group(1)):
        size = math.prod(int(d) for d in dims.split(",") if d)
        if size >= min_size:
          found[match.group(2), size] += 1
  return found


def test_fsdp_step_adds_no_kernel_sized_collectives():
  """The LoRA path gathers no kernel beyond what the frozen model's own forward/backward
  gathers, and reduces no kernel-sized weight gradient (full fine-tuning does both)."""
  run = _run("fsdp")
  model = m.model_for("fsdp", run["mesh"])
  placed, batch = run["placed"], run["batch"]
  smallest_kernel = min(math.prod(f.kernel_shape[1:]) for f in run["adapter"].lora.values())
  largest_factor = max(x.size for x in jax.tree.leaves(run["adapter"]))
  assert largest_factor < smallest_kernel  # so sizes tell kernels from factors

  pos = placed["params"]["pos"]
  floor = jax.jit(m.frozen_step(model)).lower(pos, placed, *batch).compile()
  ours = _collectives(run["compiled"].as_text(), smallest_kernel)
  frozen = _collectives(floor.as_text(), smallest_kernel)
  assert frozen, "the frozen model's FSDP step should gather its kernels"
  assert not ours - frozen, f"LoRA adds kernel-sized collectives: {ours - frozen}"

  def full_step(params, ids, labels):  # the check would catch weight gradients
    def loss(p):
      logits = model.apply(p, ids)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    return jax.grad(loss)(params)

  full = _collectives(jax.jit(full_step).lower(placed, *batch).compile().as_text(),
                      smallest_kernel)
  assert not full <= frozen


def test_wrap_on_an_explicit_mesh():
  """Under `AxisType.Explicit` (jax.make_mesh's default) jlora.wrap keeps the batch sharding of
  its flattened (tokens, fan) products, as the base model does."""
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
  model = nn.DenseGeneral((4, 8))
  x = jnp.ones((8, 5, 16))
  variables = jax.device_put(model.init(jax.random.key(0), x), NamedSharding(mesh, P()))
  x = jax.device_put(x, NamedSharding(mesh, P("data")))
  adapter = jlora.init(jax.random.key(1), variables, jlora.LoraConfig(
      rank=2, alpha=4.0, targets=".*kernel"), model.apply, x)
  assert jax.jit(model.apply)(variables, x).sharding.spec == P("data", None, None, None)
  y = jax.jit(jlora.wrap(model.apply))(variables, adapter, x)
  assert y.sharding.spec == P("data", None, None, None)
  np.testing.assert_allclose(y, model.apply(jlora.merge(variables, adapter), x), rtol=1e-6)


# ---- init_sharded


def test_init_sharded_creates_shards_in_place():
  variables, ids, _, adapter = _setup()
  mesh = m.mesh_for("data_x_model")
  placed = m.place(variables, mesh, m.param_specs(variables, "data_x_model"))
  program, args = sharding._init_program(jax.random.key(2), placed, m.CONFIG, m.MODEL.apply,
                                         (ids,), {}, False)
  compiled = program.lower(*args).compile()
  expected = jlora.shardings(adapter, placed)
  assert all(jax.tree.leaves(jax.tree.map(lambda s, e: s.is_equivalent_to(e, 3),
                                          compiled.output_shardings.lora, expected.lora)))
  assert not _collectives(compiled.as_text(), 1)  # no gather: each device makes its own shard
  sharded = compiled(*args)
  # Values equal jlora.init's (threefry is partitionable), and each device holds only its shard.
  jax.tree.map(np.testing.assert_array_equal, sharded, adapter)
  per_device = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(sharded))
  memory = compiled.memory_analysis()
  if memory is not None:  # the shards, plus the table of output pointers (8 bytes each)
    n = len(jax.tree.leaves(sharded))
    assert per_device <= memory.output_size_in_bytes <= per_device + 8 * n
  assert per_device < 0.5 * sum(x.nbytes for x in jax.tree.leaves(adapter))
  for path, f in sharded.lora.items():
    assert f.a.sharding.is_equivalent_to(expected.lora[path].a, 3), path


# ---- gradient accumulation


def test_multisteps_micro_batches_equal_one_big_batch():
  """k micro-batches through optax.MultiSteps equal one step on their concatenation."""
  k = 2
  run = _run("data_parallel")
  variables, ids, labels, adapter = _setup()
  mesh, placed = run["mesh"], run["placed"]
  accumulate = optax.MultiSteps(m.OPTIMIZER, every_k_schedule=k)
  adapter_sh = run["adapter_sh"]
  adapter = jax.device_put(adapter, adapter_sh)
  state_sh = jlora.opt_state_shardings(jax.eval_shape(accumulate.init, adapter), adapter_sh)
  assert state_sh.acc_grads.lora["params/layers/up/kernel"].b == adapter_sh.lora[
      "params/layers/up/kernel"].b
  state = jax.jit(accumulate.init, out_shardings=state_sh)(adapter)
  step = jax.jit(m.make_step(m.model_for("data_parallel", mesh), accumulate),
                 out_shardings=(adapter_sh, state_sh, NamedSharding(mesh, P())))
  batch = m.batch_sharding("data_parallel", mesh)
  size = len(ids) // k
  for i in range(k):
    micro = jax.device_put((ids[i * size:(i + 1) * size], labels[i * size:(i + 1) * size]), batch)
    adapter, state, _ = step(adapter, state, placed, *micro)
  assert int(state.gradient_step) == 1

  big = jax.device_put(_setup()[3], adapter_sh)
  big_state = jax.device_put(m.OPTIMIZER.init(big), run["state_sh"])
  big, big_state, _ = run["compiled"](big, big_state, placed, *run["batch"])
  jax.tree.map(functools.partial(_assert_close, tol=1e-4), adapter, big)
  jax.tree.map(functools.partial(_assert_close, tol=1e-4), state.inner_opt_state, big_state)
  assert all(jax.tree.leaves(jax.tree.map(_same_sharding, adapter, adapter_sh)))


# ---- checkpoints


def test_checkpoint_restores_onto_a_smaller_mesh(tmp_path):
  """Adapter and Adam state saved from the 2 × 4 mesh come back on a 2 × 2 mesh."""
  run = _run("data_x_model")
  saved = {"adapter": run["adapter"], "opt_state": run["state"]}
  sharding.save_sharded(str(tmp_path / "ckpt"), saved)

  mesh4 = _mesh((2, 2), ("data", "model"))
  variables, ids, _, _ = _setup()
  specs = m.param_specs(variables, "data_x_model")
  params4 = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=NamedSharding(mesh4, s)),
                         variables, specs)
  like = jax.eval_shape(lambda: saved)  # what a fresh process rebuilds from config and model
  adapter_sh = jlora.shardings(like["adapter"], params4)
  state_sh = jlora.opt_state_shardings(like["opt_state"], adapter_sh)
  restored = sharding.restore_sharded(str(tmp_path / "ckpt"), like,
                                      {"adapter": adapter_sh, "opt_state": state_sh})

  jax.tree.map(np.testing.assert_array_equal, restored, saved)
  for leaf, expected in zip(jax.tree.leaves(restored), jax.tree.leaves(
      {"adapter": adapter_sh, "opt_state": state_sh}), strict=True):
    assert leaf.sharding == expected and set(leaf.sharding.device_set) <= set(jax.devices()[:4])
  up = restored["adapter"].lora["params/layers/up/kernel"]
  assert up.b.addressable_shards[0].data.shape == (m.LAYERS, m.RANK, m.MLP // 2)
  assert up.roles == saved["adapter"].lora["params/layers/up/kernel"].roles


# ---- two processes on localhost


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.skipif(os.environ.get("JLORA_SKIP_MULTIHOST") == "1", reason="JLORA_SKIP_MULTIHOST")
def test_two_processes_on_localhost(tmp_path):
  """jax.distributed over two local processes (4 CPU devices each, gloo collectives): FSDP
  training with process-local batches reaches the one-device losses, and orbax round-trips."""
  address = f"127.0.0.1:{_free_port()}"
  worker = os.path.join(_HERE, "_multihost_worker.py")
  procs = [subprocess.Popen([sys.executable, worker, str(i), "2", address, str(tmp_path / "ckpt")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=300)[0])
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  for proc, out in zip(procs, outputs, strict=True):
    assert proc.returncode == 0, out[-3000:]
  result = next(line for line in outputs[0].splitlines() if line.startswith("{"))
  result = json.loads(result)
  assert result["devices"] == 8 and result["local"] == 4 and result["restored_equal"]
  np.testing.assert_allclose(result["losses"], _single_device()[0], rtol=2e-5)


def test_init_on_sharded_params_returns_an_adapter_placed_like_its_kernels():
  """DESIGN §2: no separate call needed; the values equal an unsharded init's."""
  mesh = _mesh((2, 2), ("data", "model"))
  kernel = jnp.arange(8 * 6, dtype=jnp.float32).reshape(8, 6) / 10
  params = {"fc": {"kernel": jax.device_put(kernel, NamedSharding(mesh, P("data", "model")))}}
  config = jlora.LoraConfig(rank=2, alpha=4.0, targets="fc/kernel")
  adapter = jlora.init(jax.random.key(0), params, config)
  f = adapter.lora["fc/kernel"]
  assert f.a.sharding.spec == P(None, "data") and f.b.sharding.spec == P(None, "model")
  assert f.a.addressable_shards[0].data.shape == (2, 4)
  plain = jlora.init(jax.random.key(0), {"fc": {"kernel": kernel}}, config)
  jax.tree.map(np.testing.assert_array_equal, adapter, plain)
