"""Adapters on a `jax.sharding.Mesh`: shardings that follow the base kernels, sharded init.

The layout rule, for a kernel W whose sharding is a `PartitionSpec` with one entry per axis:

* A, shape ``(*stacked, rank, fan_in)``: the stacked axes take W's stacked entries, the rank
  axis is replicated, fan_in takes the entry of W's contracted axes (`AxisRoles.contracting`);
* B, shape ``(*stacked, rank, fan_out)``: likewise, fan_out takes the entry of W's feature axes;
* an extra trained leaf (`LoraConfig.trainable`) takes its param's sharding unchanged.

fan_in and fan_out flatten several kernel axes row-major (DenseGeneral's (D, H, hd) kernel has
fan_out H·hd). A flattened dimension is sharded over W's mesh axes only when those shards are
contiguous blocks of it: exactly one axis of the group is partitioned and every axis before it
in the group has size 1 (the usual case: heads sharded, head_dim not). Any other pattern (only
head_dim sharded, or heads and head_dim over different mesh axes) leaves that dimension of the
factor replicated: the factor is rank × fan, a few KiB to MiB, and XLA inserts whatever
communication the product needs, so the result is still exact.

With ``replicate=True`` every adapter leaf is replicated on the kernel's mesh (DDP style: the
adapter and its optimizer state are small, and a replicated adapter needs no gathers).

Everything here is plain `jax.sharding`: the train step is `jax.jit` over sharded inputs and
XLA's SPMD partitioner does the communication.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jlora import _tree
from jlora.adapter import Adapter, LoraFactors, Params, init
from jlora.config import LoraConfig

_FIX = ("Fix: give each kernel a PartitionSpec with at most one entry per axis, naming mesh "
        "axes whose sizes divide that axis.")


# ----------------------------------------------------------------------------------------------
# Reading the params' shardings.


def _is_sharding_leaf(x) -> bool:
  return x is None or isinstance(x, NamedSharding | PartitionSpec | nnx.Variable)


def _flat_shardings(params) -> dict[str, Any]:
  """{path: what the params tree holds there} with PartitionSpec, None and Variables as leaves."""
  leaves = jax.tree_util.tree_leaves_with_path(params, is_leaf=_is_sharding_leaf)
  return {_tree.path_str(path): _tree._value(leaf) for path, leaf in leaves}


def _names(entry) -> tuple[str, ...]:
  """The mesh axis names of one PartitionSpec entry: None, a name, or a tuple of names."""
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _named(path: str, leaf, mesh: Mesh | None) -> NamedSharding:
  """The NamedSharding of one params leaf: a NamedSharding, a PartitionSpec, or an array."""
  if isinstance(leaf, PartitionSpec):
    if mesh is None:
      raise TypeError(
          f"{path}: got a PartitionSpec but no mesh to place it on. Fix: pass mesh=..., or "
          "give NamedShardings (or the sharded params themselves)."
      )
    for axis, entry in enumerate(leaf):
      for name in _names(entry):
        if name not in mesh.shape:
          raise ValueError(
              f"{path}: axis {axis} is sharded over mesh axis {name!r}, which the mesh "
              f"{dict(mesh.shape)} does not have. {_FIX}"
          )
    return NamedSharding(mesh, leaf)
  sharding = leaf if isinstance(leaf, NamedSharding) else getattr(leaf, "sharding", None)
  if mesh is not None and isinstance(sharding, NamedSharding) and sharding.mesh != mesh:
    raise ValueError(
        f"{path}: its sharding is on the mesh {dict(sharding.mesh.shape)}, not on the mesh "
        f"given, {dict(mesh.shape)}. Fix: pass the mesh the params live on, or no mesh."
    )
  if not isinstance(sharding, NamedSharding):
    raise TypeError(
        f"{path}: expected a NamedSharding, a PartitionSpec, or an array placed with a "
        f"NamedSharding; got {type(leaf).__name__} with sharding {sharding!r}. Fix: place the "
        "params on a Mesh, e.g. jax.device_put(params, NamedSharding(mesh, spec)), or pass "
        "their shardings."
    )
  return sharding


def _checked_spec(path: str, sharding: NamedSharding, shape: tuple[int, ...]) -> tuple:
  """The spec padded to one entry per axis, after checking it fits `shape` on its mesh."""
  spec, mesh_shape = tuple(sharding.spec), dict(sharding.mesh.shape)
  if len(spec) > len(shape):
    raise ValueError(
        f"{path}: the sharding spec {sharding.spec} has {len(spec)} entries but the leaf has "
        f"{len(shape)} axes, shape {tuple(shape)}. {_FIX}"
    )
  spec = spec + (None,) * (len(shape) - len(spec))
  for axis, entry in enumerate(spec):
    size = math.prod(mesh_shape[name] for name in _names(entry))
    if shape[axis] % size:
      raise ValueError(
          f"{path}: axis {axis} has size {shape[axis]}, which mesh axis {entry!r} (size "
          f"{size}) does not divide; shape {tuple(shape)}, spec {sharding.spec}. {_FIX}"
      )
  return spec


def _group_entry(spec: tuple, shape: tuple[int, ...], axes: tuple[int, ...]):
  """The spec entry of the row-major flattening of kernel `axes`: a contiguous split or None."""
  split = [i for i in axes if spec[i] is not None]
  if len(split) != 1:
    return None
  first = split[0]
  if any(shape[i] != 1 for i in axes if i < first):
    return None
  return spec[first]


def _factor_shardings(path: str, factors: LoraFactors, sharding: NamedSharding,
                      replicate: bool) -> LoraFactors:
  shape, roles = factors.kernel_shape, factors.roles
  spec = _checked_spec(path, sharding, shape)
  if replicate:
    a_spec = b_spec = PartitionSpec()
  else:
    stacked = tuple(spec[i] for i in roles.stacked)
    a_spec = PartitionSpec(*stacked, None, _group_entry(spec, shape, roles.contracting))
    b_spec = PartitionSpec(*stacked, None, _group_entry(spec, shape, roles.features))
  mesh = sharding.mesh
  return dataclasses.replace(factors, a=NamedSharding(mesh, a_spec), b=NamedSharding(mesh, b_spec))


# ----------------------------------------------------------------------------------------------
# Public functions.


def shardings(adapter: Adapter, params: Params, *, mesh: Mesh | None = None,
              replicate: bool = False) -> Adapter:
  """The `NamedSharding` of every adapter leaf, derived from its base kernel's sharding.

  A's fan_in axis follows the partitioning of W's contracted axes, B's fan_out axis that of
  W's feature axes, stacked (scanned-layer) axes follow W's stacked axes, and the rank axis is
  replicated. A flattened fan axis (several kernel axes) is sharded only when exactly one of
  its kernel axes is, and that axis leads the group; otherwise that axis of the factor is
  replicated (see the module docstring). Extra trained leaves take their param's sharding.

  Args:
    adapter: an adapter, or its abstract shape (`jax.eval_shape` of `jlora.init`).
    params: the tree given to `jlora.init`, or one like it, whose leaves at the adapter's paths
      are `NamedSharding`s, `PartitionSpec`s (then pass `mesh`), or arrays (concrete or
      `jax.ShapeDtypeStruct`) placed with a `NamedSharding`.
    mesh: the mesh for `PartitionSpec` leaves.
    replicate: replicate every adapter leaf on its kernel's mesh instead (DDP style).

  Returns:
    An `Adapter` with the structure of `adapter` whose leaves are `NamedSharding`s: pass it as
    `out_shardings` to `jax.jit`, or to `jax.device_put`.

  Raises:
    ValueError: naming the path and the axis, if a spec has more entries than the kernel has
      axes, names an axis the mesh lacks, or a mesh axis does not divide the kernel axis it
      shards; or if an adapter path is missing from `params`.
    TypeError: if a leaf holds no `NamedSharding`, or a `PartitionSpec` comes without `mesh`.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> from jax.sharding import Mesh, PartitionSpec as P
    >>> mesh = Mesh(jax.devices()[:2], ("model",))
    >>> params = {"fc": {"kernel": jnp.ones((4, 6))}}
    >>> config = jlora.LoraConfig(rank=2, alpha=4.0, targets="fc/kernel")
    >>> adapter = jlora.init(jax.random.key(0), params, config)
    >>> specs = {"fc": {"kernel": P(None, "model")}}  # column-parallel
    >>> out = jlora.shardings(adapter, specs, mesh=mesh).lora["fc/kernel"]
    >>> out.a.spec, out.b.spec
    (P(None, None), P(None, 'model'))
  """
  if not isinstance(adapter, Adapter):
    raise TypeError(f"Expected a jlora.Adapter, got {type(adapter).__name__}.")
  flat = _flat_shardings(params)

  def named(path: str) -> NamedSharding:
    if path not in flat:
      raise ValueError(
          f"The adapter's path {path!r} is not in the params shardings; close paths: "
          f"{_tree.close_paths(flat, path)}. Fix: pass a tree shaped like the one given to "
          "jlora.init (for model.apply, the variables dict {'params': ...})."
      )
    return _named(path, flat[path], mesh)

  lora = {path: _factor_shardings(path, f, named(path), replicate)
          for path, f in adapter.lora.items()}
  extras = {}
  for path, leaf in adapter.extras.items():
    sharding = named(path)
    _checked_spec(path, sharding, tuple(leaf.shape))
    extras[path] = NamedSharding(sharding.mesh, PartitionSpec()) if replicate else sharding
  return Adapter(lora=lora, extras=extras)


def init_sharded(key: jax.Array, params: Params, config: LoraConfig, model: Any = None,
                 *example_args, replicate: bool = False, **example_kwargs) -> Adapter:
  """`jlora.init`, with every leaf created directly in its shard (see `jlora.shardings`).

  `jlora.init` calls this itself when the targeted kernels are placed on a mesh; call it
  directly for ``replicate=True`` (a DDP-style adapter) or for abstract params.

  The adapter's shape is worked out abstractly (`jax.eval_shape`), its shardings derived from
  the params', and `jlora.init` then runs under `jax.jit(..., out_shardings=...)`: each device
  computes only its own shard of A (threefry is partitionable, so the values equal those of
  `jlora.init` with the same key), and no full factor ever sits on one device. Only the extra
  trained leaves (`LoraConfig.trainable`) are read from `params`; kernels are read for shapes.

  Args:
    key: a PRNG key for A.
    params: the tree to adapt, placed on a mesh: arrays with `NamedSharding`s, or
      `jax.ShapeDtypeStruct`s with a `sharding` (then no extra leaves may be trained, as their
      values would be unknown).
    config: the `LoraConfig`.
    model: as in `jlora.init`: ``model.apply`` or an NNX module, to trace axis roles.
    *example_args: example inputs for `model`.
    replicate: replicate the adapter on the mesh instead (DDP style).
    **example_kwargs: example keyword inputs for `model`.

  Returns:
    An `Adapter` equal to ``jlora.init(key, params, config, model, *example_args)``, whose
    leaves carry the shardings of ``jlora.shardings(adapter, params, replicate=replicate)``.

  Raises:
    ValueError: as `jlora.init` and `jlora.shardings` do, or if an extra trained leaf of
      `params` is abstract.
    TypeError: if an adapted leaf of `params` is not placed with a `NamedSharding`.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    >>> mesh = Mesh(jax.devices()[:2], ("data",))
    >>> kernel = jax.device_put(jnp.ones((8, 4)), NamedSharding(mesh, P("data", None)))
    >>> params = {"fc": {"kernel": kernel}}
    >>> config = jlora.LoraConfig(rank=2, alpha=4.0, targets="fc/kernel")
    >>> adapter = jlora.init_sharded(jax.random.key(0), params, config)
    >>> adapter.lora["fc/kernel"].a.sharding.spec
    P(None, 'data')
    >>> adapter.lora["fc/kernel"].a.addressable_shards[0].data.shape  # (rank, fan_in / 2)
    (2, 4)
  """
  program, args = _init_program(key, params, config, model, example_args, example_kwargs,
                                replicate)
  return program(*args)


def _init_program(key, params, config, model, example_args, example_kwargs, replicate):
  """(jitted init with the adapter's out_shardings, its arguments): the key and the extras."""
  call = lambda k, p: init(k, p, config, model, *example_args, **example_kwargs)  # noqa: E731
  abstract = jax.eval_shape(call, key, params)
  out_shardings = shardings(abstract, params, replicate=replicate)
  flat = _tree.flatten(params)
  extras = {path: flat[path] for path in abstract.extras}
  for path, leaf in extras.items():
    if not isinstance(leaf, jax.Array):
      raise ValueError(
          f"{path}: LoraConfig.trainable selects it, so the adapter copies its value, but "
          f"params holds only its shape ({type(leaf).__name__}). Fix: pass the params arrays."
      )
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  build = lambda k, e: call(k, _tree.replace(shapes, e))  # noqa: E731
  return jax.jit(build, out_shardings=out_shardings), (key, extras)


def opt_state_shardings(opt_state: Any, adapter_shardings: Adapter) -> Any:
  """Shardings for an optimizer state: each adapter-shaped leaf as its adapter leaf, the rest
  replicated.

  A state leaf takes an adapter leaf's sharding when the adapter leaf's key path ends the state
  leaf's path (``mu.lora['…/kernel'].a`` ends with ``.lora['…/kernel'].a``) and that sharding
  fits the state leaf's shape (no more spec entries than axes, mesh axes dividing them). So any
  optax wrapper works (`optax.chain`, `optax.MultiSteps`, `optax.multi_transform`,
  `jlora.lora_plus`); counters, and statistics of other ranks (Adafactor's factored moments),
  are replicated.

  Args:
    opt_state: the optimizer state, or its shape: ``jax.eval_shape(optimizer.init, adapter)``.
    adapter_shardings: what `jlora.shardings` returned for the adapter.

  Returns:
    A tree with the structure of `opt_state` whose leaves are `NamedSharding`s.

  Raises:
    ValueError: if `adapter_shardings` has no leaf to take a mesh from.

  Example:
    >>> import jax, jax.numpy as jnp, optax, jlora
    >>> from jax.sharding import Mesh, PartitionSpec as P
    >>> mesh = Mesh(jax.devices()[:2], ("model",))
    >>> params = {"fc": {"kernel": jnp.ones((4, 6))}}
    >>> config = jlora.LoraConfig(rank=2, alpha=4.0, targets="fc/kernel")
    >>> adapter = jlora.init(jax.random.key(0), params, config)
    >>> sh = jlora.shardings(adapter, {"fc": {"kernel": P(None, "model")}}, mesh=mesh)
    >>> state = jax.eval_shape(optax.adam(1e-3).init, adapter)
    >>> out = jlora.opt_state_shardings(state, sh)
    >>> out[0].mu.lora["fc/kernel"].b.spec, out[0].count.spec
    (P(None, 'model'), P())
  """
  by_path = {tuple(path): s for path, s in jax.tree_util.tree_leaves_with_path(adapter_shardings)}
  if not by_path:
    raise ValueError("opt_state_shardings: adapter_shardings has no leaves to take a mesh from.")
  lengths = sorted({len(path) for path in by_path})
  replicated = NamedSharding(next(iter(by_path.values())).mesh, PartitionSpec())

  def pick(path, leaf):
    path = tuple(path)
    for n in lengths:
      match = by_path.get(path[-n:]) if len(path) >= n else None
      if match is not None and _fits(match, getattr(leaf, "shape", ())):
        return match
    return replicated

  return jax.tree_util.tree_map_with_path(pick, opt_state)


def _fits(sharding: NamedSharding, shape) -> bool:
  spec = tuple(sharding.spec)
  if len(spec) > len(shape):
    return False
  try:
    sharding.shard_shape(tuple(shape))
  except ValueError:
    return False
  return True


# ----------------------------------------------------------------------------------------------
# Sharded checkpoints (orbax). Every process calls both; each writes and reads its own shards.


def save_sharded(directory: str, tree: Any) -> None:
  """Saves a tree of (sharded) arrays with orbax, each process writing the shards it holds.

  Call it on every process with the same tree (an adapter, an optimizer state, or a dict of
  both). Only array values are stored; an adapter's static metadata (roles, scale) comes back
  from the `like` tree given to `restore_sharded`.

  Args:
    directory: an absolute path that does not exist yet, on storage all processes share.
    tree: a pytree of `jax.Array`s, e.g. ``{"adapter": adapter, "opt_state": opt_state}``.

  Example:
    >>> import os, tempfile, jax, jax.numpy as jnp
    >>> from jlora import sharding
    >>> path = os.path.join(tempfile.mkdtemp(), "ckpt")
    >>> sharding.save_sharded(path, {"x": jnp.arange(4.0)})
    >>> sorted(os.listdir(path))[:2]
    ['_CHECKPOINT_METADATA', '_METADATA']
  """
  import orbax.checkpoint as ocp  # imported here: orbax is slow to import and seldom needed

  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory, tree)


def restore_sharded(directory: str, like: Any, shardings: Any) -> Any:
  """Restores what `save_sharded` wrote, straight into the given shardings, on any mesh.

  Each device reads only its own shard, so a checkpoint written on one mesh (8 devices, say)
  restores onto another (4 devices, a different layout): pass the shardings for the new mesh,
  e.g. from `jlora.shardings` and `jlora.opt_state_shardings` with the new params.

  Args:
    directory: the path given to `save_sharded`.
    like: a tree with the structure, shapes and dtypes to restore: the saved tree itself, or
      its abstract shape (`jax.eval_shape` of the code that made it).
    shardings: a tree like `like` of `NamedSharding`s on the new mesh.

  Returns:
    A tree like `like` whose leaves are arrays placed with `shardings`.

  Example:
    >>> import os, tempfile, jax, jax.numpy as jnp
    >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    >>> from jlora import sharding
    >>> path = os.path.join(tempfile.mkdtemp(), "ckpt")
    >>> sharding.save_sharded(path, {"x": jnp.arange(4.0)})
    >>> mesh = Mesh(jax.devices()[:2], ("data",))
    >>> split = {"x": NamedSharding(mesh, P("data"))}
    >>> out = sharding.restore_sharded(path, {"x": jnp.zeros(4)}, split)
    >>> out["x"].sharding.spec, out["x"].addressable_shards[0].data.tolist()
    (P('data',), [0.0, 1.0])
  """
  import orbax.checkpoint as ocp

  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        like, shardings)
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(directory, target)
