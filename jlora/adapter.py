"""The adapter pytree and `init`, which creates one for the kernels a config selects."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jlora import _tree, program
from jlora.config import LoraConfig
from jlora.roles import AxisRoles, from_letters, read_roles

Params = Any  # a pytree of arrays: a linen variables dict, a params dict or an nnx.State


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraFactors:
  """The low-rank update of one kernel: ΔW = scale · Aᵀ·B, laid out in the kernel's shape.

  Only `a` and `b` are pytree leaves; the rest is static metadata, so `jax.grad` and optax
  see the factors alone.

  Attributes:
    a: shape ``(*stacked, rank, fan_in)``, fan_in the product of the contracted axes.
    b: shape ``(*stacked, rank, fan_out)``, fan_out the product of the feature axes.
    scale: s, α/r or α/√r.
    roles: the kernel's axis roles.
    kernel_shape: the shape of the kernel this update belongs to.
    dropout: dropout rate on the input of this update while training.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"fc": {"kernel": jnp.ones((4, 3))}}
    >>> config = jlora.LoraConfig(rank=2, alpha=4.0, targets="fc/kernel")
    >>> factors = jlora.init(jax.random.key(0), params, config).lora["fc/kernel"]
    >>> factors.a.shape, factors.b.shape, factors.scale, factors.rank
    ((2, 4), (2, 3), 2.0, 2)
  """

  a: jax.Array
  b: jax.Array
  scale: float = dataclasses.field(metadata=dict(static=True))
  roles: AxisRoles = dataclasses.field(metadata=dict(static=True))
  kernel_shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  dropout: float = dataclasses.field(default=0.0, metadata=dict(static=True))

  @property
  def rank(self) -> int:
    return self.a.shape[-2]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Adapter:
  """Everything that trains: low-rank factors by kernel path, and fully trained extra leaves.

  Paths are those of the tree given to `jlora.init` ("/"-joined keys). The adapter is an
  ordinary pytree: pass it to `optax` optimizers, `jax.grad`, `jax.jit` and orbax as it is.

  Attributes:
    lora: ``{path: LoraFactors}`` for every adapted kernel.
    extras: ``{path: array}`` for every leaf trained in full (`LoraConfig.trainable`).

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"fc": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
    >>> config = jlora.LoraConfig(rank=2, alpha=4.0, targets="fc/kernel", trainable="fc/bias")
    >>> adapter = jlora.init(jax.random.key(0), params, config)
    >>> sorted(adapter.lora), sorted(adapter.extras)
    (['fc/kernel'], ['fc/bias'])
    >>> sum(x.size for x in jax.tree.leaves(adapter))  # 2·4 + 2·3 + 3
    17
  """

  lora: dict[str, LoraFactors]
  extras: dict[str, jax.Array] = dataclasses.field(default_factory=dict)


def _sample_a(key, shape, dtype, scheme: str) -> jax.Array:
  fan_in, rank = shape[-1], shape[-2]
  if scheme == "kaiming":
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return jax.random.normal(key, shape, dtype) / rank


def _as_dtype(leaf, dtype):
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(leaf.shape, dtype, sharding=leaf.sharding)
  return jnp.asarray(leaf, dtype)


def _is_embedding(path: str, leaf) -> bool:
  return path.rsplit("/", 1)[-1] == "embedding" and len(leaf.shape) == 2


def _roles_without_model(path: str, leaf, config: LoraConfig) -> AxisRoles:
  letters = config.roles_for(path)
  if letters is not None:
    if len(letters) != len(leaf.shape):
      raise ValueError(
          f"{path}: LoraConfig.roles gives {letters!r} ({len(letters)} axes) for a kernel of "
          f"shape {tuple(leaf.shape)}. Fix: one letter per axis."
      )
    return from_letters(letters)
  if _is_embedding(path, leaf):
    return AxisRoles("embed", (0,), (1,))
  if len(leaf.shape) < 2:
    raise ValueError(
        f"{path}: a leaf of shape {tuple(leaf.shape)} is not a kernel jlora can factor (a bias "
        "or a norm scale has one axis and no low-rank update). Fix: narrow LoraConfig.targets, "
        "or list it in LoraConfig.trainable to train it in full."
    )
  if len(leaf.shape) == 2:
    return AxisRoles("dense", (0,), (1,))
  raise ValueError(
      f"{path}: a kernel of shape {tuple(leaf.shape)} has more than two axes, and jlora does not "
      "guess which are contracted. Fix: pass the model and example inputs, `jlora.init(key, "
      "variables, config, model.apply, x)` (or the NNX module and x), or state them in "
      "LoraConfig.roles, e.g. {'.*attn/out/kernel': 'iio'}."
  )


def _target_roles(targets, config, model, tree, args, kwargs) -> dict[str, AxisRoles]:
  """Roles read from the program of `model` where one is given (an NNX module only with
  example inputs), else the roles `_roles_without_model` allows."""
  if isinstance(model, nnx.Module | nnx.GraphDef) and not (args or kwargs):
    model = None  # its 2-D kernels are checked against the program when jlora.wrap runs it
  to_trace = {p: leaf for p, leaf in targets.items() if config.roles_for(p) is None}
  traced = {}
  if model is not None and to_trace:
    traced = read_roles(program.as_function(model), tree, set(to_trace), args, kwargs)
  return {path: traced[path] if path in traced else _roles_without_model(path, leaf, config)
          for path, leaf in targets.items()}


def _on_a_mesh(leaf) -> bool:
  """Whether a kernel is placed across several devices (an array or a ShapeDtypeStruct with a
  NamedSharding); then `init` creates each factor in its shards."""
  sharding = getattr(leaf, "sharding", None)
  return (not isinstance(leaf, jax.core.Tracer) and isinstance(sharding, jax.sharding.NamedSharding)
          and len(sharding.device_set) > 1)


def _check_floating(path: str, leaf) -> None:
  if not jnp.issubdtype(leaf.dtype, jnp.floating):
    raise ValueError(
        f"{path}: a kernel of dtype {jnp.dtype(leaf.dtype).name} cannot take a low-rank update "
        "(merging would round the update away). Fix: exclude it from LoraConfig.targets; for "
        "a quantized base, quantize the float kernel with jlora.quantize and target that."
    )


def _factor_shapes(path: str, shape, roles: AxisRoles, rank: int):
  size = lambda axes: math.prod(shape[i] for i in axes)  # noqa: E731
  fan_in, fan_out = size(roles.contracting), size(roles.features)
  if rank > min(fan_in, fan_out):
    raise ValueError(
        f"{path}: rank {rank} exceeds min(fan_in, fan_out) = min({fan_in}, {fan_out}) of its "
        f"kernel {tuple(shape)}; the update could not be low-rank. Fix: lower LoraConfig.rank "
        "or set a smaller rank for this path in LoraConfig.rank_pattern."
    )
  stacked = tuple(shape[i] for i in roles.stacked)
  return (*stacked, rank, fan_in), (*stacked, rank, fan_out)


def select_targets(flat: dict[str, Any], config: LoraConfig) -> dict[str, Any]:
  """{path: leaf} for every leaf that `config.targets` selects; errors when none is."""
  targets = {path: leaf for path, leaf in flat.items() if config.is_target(path, leaf)}
  excluded = [path for path, leaf in flat.items()
              if not callable(config.targets) and any(
                  re.fullmatch(t, path) for t in config.targets) and path not in targets]
  if not targets and excluded:
    raise ValueError(
        "LoraConfig.exclude removed every leaf that LoraConfig.targets matched.\n"
        f"  matched, then excluded: {', '.join(excluded[:5])}\n"
        f"  exclude: {' | '.join(config.exclude)!r}\n"
        "  Fix: narrow LoraConfig.exclude."
    )
  if not targets:
    shown = config.targets if callable(config.targets) else " | ".join(config.targets)
    wanted = "" if callable(config.targets) else shown
    raise ValueError(
        "LoraConfig.targets matched no leaf of the tree given to jlora.init.\n"
        f"  targets: {shown!r} (re.fullmatch against '/'-joined paths)\n"
        f"  paths that look close: {_tree.close_paths(flat, wanted)}\n"
        "  Fix: change the regex or pass a callable (path, leaf) -> bool."
    )
  return targets


def init(key: jax.Array, params: Params, config: LoraConfig,
         model: Callable[..., Any] | nnx.Module | nnx.GraphDef | None = None, *example_args,
         **example_kwargs) -> Adapter:
  """Creates a fresh adapter (B = 0) for every kernel of `params` that `config` targets.

  Axis roles come from the program when a model is given: ``model(params, *example_args,
  **example_kwargs)`` is traced abstractly (`jax.make_jaxpr`; inputs may be arrays or
  `jax.ShapeDtypeStruct`, no FLOPs spent), and each target's roles are read from the ops that
  consume it, whatever layer produced them: axes a contraction sums with the input are fan_in,
  its free axes fan_out, axes a scan slices or a contraction batches over (per-expert weights)
  are stacked, and a lookup of whole rows makes an embedding. `model` is any function of the
  tree (a linen ``model.apply``, a function of a dict of arrays) or an NNX module or graphdef,
  then run as ``nnx.merge(graphdef, params)(*example_args)``. Without a model (or an NNX
  module without inputs), only 2-D kernels (taken as (in, out)), ``embedding`` tables and
  kernels with `LoraConfig.roles` are accepted; `jlora.wrap` checks those roles against the
  program when it first runs, so a kernel stored (out, in) fails loudly there.

  Kernels placed on a mesh (`NamedSharding` over several devices; trained extras placed too)
  give an adapter placed like them (A follows each kernel's fan_in axes, B its fan_out axes,
  the rank axis replicated), each factor created in its own shards and never whole on one
  device: `jlora.init_sharded` is then called for you (call it yourself for a replicated,
  DDP-style adapter).

  Args:
    key: a PRNG key for A.
    params: the tree to adapt; its leaves may be arrays, `jax.ShapeDtypeStruct` or quantized
      kernels.
    config: the `LoraConfig`.
    model: optionally the model's function of `params`, or an NNX module or graphdef.
    *example_args: example inputs for `model`, after `params`.
    **example_kwargs: example keyword inputs for `model`.

  Returns:
    An `Adapter` whose paths are those of `params`.

  Raises:
    ValueError: if the targets match nothing, a target is not a floating-point kernel jlora
      can factor (naming the path), its uses in the program disagree on its axes, or a rank
      exceeds min(fan_in, fan_out).

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jlora
    >>> model = nn.DenseGeneral(features=(4, 8))
    >>> x = jnp.ones((2, 16))
    >>> variables = model.init(jax.random.key(0), x)
    >>> config = jlora.LoraConfig(rank=2, alpha=4.0, targets=".*kernel")
    >>> adapter = jlora.init(jax.random.key(1), variables, config, model.apply, x)
    >>> factors = adapter.lora["params/kernel"]
    >>> factors.a.shape, factors.b.shape, factors.roles.features
    ((2, 16), (2, 32), (1, 2))
  """
  flat = _tree.flatten(params)
  targets = select_targets(flat, config)
  for path, leaf in targets.items():
    _check_floating(path, leaf)
  extras = [leaf for path, leaf in flat.items() if config.is_trainable_extra(path)]
  if any(map(_on_a_mesh, targets.values())) and all(
      isinstance(getattr(x, "sharding", None), jax.sharding.NamedSharding) for x in extras):
    from jlora.sharding import init_sharded  # noqa: PLC0415 (sharding builds on this module)
    return init_sharded(key, params, config, model, *example_args, **example_kwargs)
  roles = _target_roles(targets, config, model, params, example_args, example_kwargs)
  dtype = jnp.dtype(config.dtype)
  keys = dict(zip(targets, jax.random.split(key, len(targets)), strict=True))
  lora = {}
  for path, leaf in targets.items():
    a_shape, b_shape = _factor_shapes(path, leaf.shape, roles[path], config.rank_for(path))
    lora[path] = LoraFactors(
        a=_sample_a(keys[path], a_shape, dtype, config.init),
        b=jnp.zeros(b_shape, dtype),
        scale=config.scale_for(path),
        roles=roles[path],
        kernel_shape=tuple(leaf.shape),
        dropout=config.dropout,
    )
  extras = {path: _as_dtype(leaf, dtype) for path, leaf in flat.items()
            if config.is_trainable_extra(path) and path not in lora}
  return Adapter(lora=lora, extras=extras)
