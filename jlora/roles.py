"""Axis roles of a kernel: which axes are stacked, contracted with the input, or outputs.

Roles come from the module that uses the kernel, never from its shape alone:

* `trace_roles` runs a linen apply function abstractly (`jax.eval_shape`) under
  `flax.linen.intercept_methods` and reads each Dense, DenseGeneral, Einsum, Conv and Embed
  module's own configuration;
* `nnx_roles` reads the same from the submodules of an NNX model;
* without a model, a 2-D kernel is (input, output), an ``embedding`` leaf is a lookup table,
  and `LoraConfig.roles` states anything else explicitly.

Stacked axes (the layer axis of an `nn.scan`'d stack) are the kernel's extra leading axes:
the outer kernel has more axes than the one the module sees, and the module's kernel must equal
its trailing axes. A stack with the layer axis elsewhere needs `LoraConfig.roles`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import nnx

KINDS = ("dense", "conv", "embed")


@dataclasses.dataclass(frozen=True)
class AxisRoles:
  """The role of every axis of one kernel (indices into the kernel's shape).

  Attributes:
    kind: ``"dense"`` (a contraction: Dense, DenseGeneral, Einsum), ``"conv"`` (window and
      input channels contracted) or ``"embed"`` (a lookup table; rows are contracted one-hot).
    contracting: kernel axes contracted with the input, in kernel order.
    features: kernel axes that appear in the output, in kernel order.
    stacked: leading kernel axes of a stack of layers (`nn.scan`).

  Example:
    >>> from jlora import AxisRoles
    >>> AxisRoles("dense", contracting=(0,), features=(1, 2)).stack(1)
    AxisRoles(kind='dense', contracting=(1,), features=(2, 3), stacked=(0,))
  """

  kind: str
  contracting: tuple[int, ...]
  features: tuple[int, ...]
  stacked: tuple[int, ...] = ()

  def stack(self, n: int) -> AxisRoles:
    """The roles of the same kernel with `n` more leading stacked axes."""
    shift = lambda axes: tuple(a + n for a in axes)  # noqa: E731
    return AxisRoles(self.kind, shift(self.contracting), shift(self.features),
                     tuple(range(n)) + shift(self.stacked))

  def unstacked(self) -> AxisRoles:
    """The roles of one layer's kernel, as the module inside the stack sees it."""
    drop = lambda axes: tuple(a - sum(s < a for s in self.stacked) for a in axes)  # noqa: E731
    return AxisRoles(self.kind, drop(self.contracting), drop(self.features))


def from_letters(letters: str, kind: str = "dense") -> AxisRoles:
  """Roles from one letter per axis: ``s`` stacked, ``i`` input, ``o`` output."""
  axes = lambda letter: tuple(i for i, c in enumerate(letters) if c == letter)  # noqa: E731
  return AxisRoles(kind, axes("i"), axes("o"), axes("s"))


def _einsum_roles(spec: str, path: str) -> AxisRoles:
  inputs, out = spec.replace(" ", "").split("->")
  x, kernel = inputs.split(",")
  shared = [c for c in kernel if c in x and c in out]
  summed = [c for c in kernel if c not in x and c not in out]
  if shared or summed:
    raise ValueError(
        f"{path}: the Einsum {spec!r} uses kernel axes {''.join(shared + summed)!r} that are "
        "neither purely contracted nor purely output; jlora cannot give it a low-rank update. "
        "Fix: exclude this kernel from LoraConfig.targets."
    )
  return AxisRoles(
      "dense",
      tuple(i for i, c in enumerate(kernel) if c in x),
      tuple(i for i, c in enumerate(kernel) if c in out),
  )


def _dense_general_roles(n_batch: int, n_axis: int, ndim: int, path: str) -> AxisRoles:
  if n_batch:
    raise ValueError(
        f"{path}: DenseGeneral with batch_dims shares kernel axes with the input; jlora "
        "cannot give it one low-rank update. Fix: exclude it from LoraConfig.targets."
    )
  return AxisRoles("dense", tuple(range(n_axis)), tuple(range(n_axis, ndim)))


def _conv_roles(groups: int, ndim: int, path: str) -> AxisRoles:
  if groups != 1:
    raise ValueError(
        f"{path}: a grouped convolution ({groups=}) has no single low-rank update. "
        "Fix: exclude it from LoraConfig.targets."
    )
  return AxisRoles("conv", tuple(range(ndim - 1)), (ndim - 1,))


def as_tuple(axis) -> tuple[int, ...]:
  """A Flax axis or size argument (an int or a sequence of ints) as a tuple."""
  return tuple(axis) if isinstance(axis, tuple | list) else (axis,)


def einsum_spec(module, args, kwargs) -> str | None:
  """The equation an `nn.Einsum` call uses: given at call time, or the module's own."""
  given = args[1] if len(args) > 1 else kwargs.get("einsum_str")
  return given or module.einsum_str


def eval_shape(fn: Callable[..., Any], *args, **kwargs):
  """`jax.eval_shape(fn, *args, **kwargs)` with only the array leaves made abstract.

  Flags, strings and functions among the arguments (``deterministic=True``, ``method=...``)
  reach `fn` as they are.
  """
  leaves, treedef = jax.tree.flatten((args, kwargs))
  is_array = [isinstance(x, jax.Array | np.ndarray | jax.ShapeDtypeStruct) for x in leaves]

  def run(arrays):
    it = iter(arrays)
    full = [next(it) if array else x for x, array in zip(leaves, is_array, strict=True)]
    call_args, call_kwargs = jax.tree.unflatten(treedef, full)
    return fn(*call_args, **call_kwargs)

  return jax.eval_shape(run, [x for x, array in zip(leaves, is_array, strict=True) if array])


def linen_roles(module: nn.Module, ndim: int, path: str, spec: str | None = None
                ) -> AxisRoles | None:
  """Roles of the kernel of a linen module, or None for a module jlora does not adapt.

  `spec` is the equation of an `nn.Einsum` call (default: the module's own).
  """
  if isinstance(module, nn.Embed):
    return AxisRoles("embed", (0,), (1,))
  if isinstance(module, nn.Dense):
    return AxisRoles("dense", (0,), (1,))
  if isinstance(module, nn.DenseGeneral):
    return _dense_general_roles(len(as_tuple(module.batch_dims)), len(as_tuple(module.axis)),
                                ndim, path)
  if isinstance(module, nn.Einsum):
    return _einsum_roles(spec or module.einsum_str, path)
  if isinstance(module, nn.Conv):
    return _conv_roles(module.feature_group_count, ndim, path)
  return None


def nnx_roles(module: nnx.Module, ndim: int, path: str) -> AxisRoles | None:
  """Roles of the kernel of an NNX module, or None for a module jlora does not adapt."""
  if isinstance(module, nnx.Embed):
    return AxisRoles("embed", (0,), (1,))
  if isinstance(module, nnx.Linear):
    return AxisRoles("dense", (0,), (1,))
  if isinstance(module, nnx.LinearGeneral):
    return _dense_general_roles(len(module.batch_axis), len(as_tuple(module.axis)),
                                ndim, path)
  if isinstance(module, nnx.Einsum):
    return _einsum_roles(module.einsum_str, path)
  if isinstance(module, nnx.Conv):
    return _conv_roles(module.feature_group_count, ndim, path)
  return None


def nnx_kernel_shape(module: nnx.Module) -> tuple[int, ...] | None:
  """The kernel shape an NNX layer computes with (one layer of a stack), from its attributes."""
  if isinstance(module, nnx.Embed):
    return (module.num_embeddings, module.features)
  if isinstance(module, nnx.Linear):
    return (module.in_features, module.out_features)
  if isinstance(module, nnx.LinearGeneral):
    return as_tuple(module.in_features) + as_tuple(module.out_features)
  if isinstance(module, nnx.Einsum | nnx.Conv):
    return tuple(module.kernel_shape)
  return None


def kernel_name(module) -> str:
  return "embedding" if isinstance(module, nn.Embed | nnx.Embed) else "kernel"


def module_path(module: nn.Module) -> str:
  """The path of a bound linen module's kernel in the variables dict: ``params/.../kernel``."""
  return "/".join(("params", *module.path, kernel_name(module)))


def with_stack(roles: AxisRoles, inner: tuple[int, ...], outer: tuple[int, ...],
               path: str) -> AxisRoles:
  """Adds the stacked axes by which the `outer` kernel shape extends the module's `inner` one."""
  n = len(outer) - len(inner)
  if n < 0 or tuple(outer[n:]) != tuple(inner):
    raise ValueError(
        f"{path}: the module uses a kernel of shape {tuple(inner)} but the tree holds "
        f"{tuple(outer)}; jlora expects stacked (nn.scan) axes to lead. "
        "Fix: state the axes in LoraConfig.roles, e.g. {'.*/kernel': 'sio'}."
    )
  return roles.stack(n)


def trace_roles(apply_fn: Callable[..., Any], variables, shapes: dict[str, tuple[int, ...]],
                *args, **kwargs) -> dict[str, AxisRoles]:
  """Runs `apply_fn(variables, *args, **kwargs)` abstractly and records every kernel's roles.

  Returns {path: roles} for each Dense, DenseGeneral, Einsum, Conv and Embed kernel the
  apply function uses; `shapes` gives each path's shape in `variables`.
  """
  found: dict[str, AxisRoles] = {}

  def record(next_fun, call_args, call_kwargs, context):
    module = context.module
    path = module_path(module)
    if context.method_name in ("__call__", "attend") and path in shapes:
      inner = module.get_variable("params", kernel_name(module)).shape
      spec = einsum_spec(module, call_args, call_kwargs) if isinstance(module, nn.Einsum) else None
      roles = linen_roles(module, len(inner), path, spec)
      if roles is not None:
        found[path] = with_stack(roles, inner, shapes[path], path)
    return next_fun(*call_args, **call_kwargs)

  with nn.intercept_methods(record):
    eval_shape(apply_fn, variables, *args, **kwargs)
  return found
