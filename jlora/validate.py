"""Cheap checks of an adapter, shared by every function that takes one.

* `check_finite`: no NaN or infinity in the values (run on every restore and import).
* `check_not_routed`: no per-example factors (what `jlora.route` makes) where one update per
  kernel is needed: merge, unmerge, export, combine, truncate, stack.
* `check_factors`: the factors of one path agree with each other and with the kernel they
  were made for (arrays of a floating dtype, one rank, the kernel's fan-in and fan-out).
* `check_kernel`: a leaf can take a low-rank update (it has a shape and a floating dtype).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora import _tree
from jlora.adapter import Adapter, LoraFactors
from jlora.roles import AxisRoles

_ARRAY_TYPES = (jax.Array, np.ndarray, jax.ShapeDtypeStruct)


def check_finite(adapter, *, where: str = "the adapter", fix: str | None = None) -> None:
  """Raises if any factor or extra of `adapter` holds a NaN or an infinity.

  One reduction per leaf, on the host; NaN and inf propagate silently through JAX otherwise.

  Args:
    adapter: a `jlora.Adapter` (or any pytree of arrays).
    where: what to call the adapter in the error (e.g. the file it came from).
    fix: the advice after "Fix:" in the error; by default, restore an earlier step.

  Raises:
    ValueError: naming the first non-finite leaf and how many of its values are bad.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> from jlora.validate import check_finite
    >>> params = {"fc": {"kernel": jnp.ones((4, 3))}}
    >>> adapter = jlora.init(jax.random.key(0), params,
    ...                      jlora.LoraConfig(rank=2, alpha=4.0, targets="fc/kernel"))
    >>> check_finite(adapter)
    >>> bad = jax.tree.map(lambda x: x.at[0, 0].set(jnp.nan), adapter)
    >>> check_finite(bad)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: lora/fc/kernel/a in the adapter has 1 non-finite value(s) (NaN or inf). ...
  """
  for path, leaf in _tree.flatten(adapter).items():
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
      continue
    bad = int(np.asarray(jax.device_get(jnp.sum(~jnp.isfinite(leaf)))))
    if bad:
      fix = fix or ("restore an earlier step, or lower the learning rate of the run that "
                    "produced it.")
      raise ValueError(f"{path} in {where} has {bad} non-finite value(s) (NaN or inf). Fix: {fix}")


def is_routed(factors: LoraFactors) -> bool:
  """Whether `factors` carry a per-example axis (one update per example, from `jlora.route`)."""
  return len(np.shape(factors.a)) == len(factors.roles.stacked) + 3


def check_not_routed(adapter: Adapter, *, where: str) -> None:
  """Raises if `adapter` has per-example factors, which hold no single update per kernel.

  What `jlora.route` returns is for the function from `jlora.wrap` only: merging, exporting,
  combining or truncating it would treat the batch axis as a layer axis (or fail deep inside).

  Args:
    adapter: a `jlora.Adapter`.
    where: the caller, named first in the error (e.g. ``"jlora.merge"``).

  Raises:
    ValueError: naming the first path with per-example factors.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> from jlora.validate import check_not_routed
    >>> params = {"fc": {"kernel": jnp.ones((4, 3))}}
    >>> adapter = jlora.init(jax.random.key(0), params,
    ...                      jlora.LoraConfig(rank=2, alpha=4.0, targets="fc/kernel"))
    >>> check_not_routed(adapter, where="jlora.merge")
    >>> routed = jlora.route(jlora.stack([adapter]), jnp.array([0, 0]))
    >>> check_not_routed(routed, where="jlora.merge")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: jlora.merge: fc/kernel: these factors have a per-example axis (from jlora.route)...
  """
  for path, factors in adapter.lora.items():
    if isinstance(factors, LoraFactors) and is_routed(factors):
      raise ValueError(
          f"{where}: {path}: these factors have a per-example axis (from jlora.route) and no "
          "single update per kernel; only the function from jlora.wrap takes them. Fix: pass "
          "jlora.select(stacked, i) or a jlora.combine result instead."
      )


def _is_array(x: Any) -> bool:
  return isinstance(x, _ARRAY_TYPES)


def _is_floating(dtype: Any) -> bool:
  try:
    return bool(jnp.issubdtype(dtype, jnp.floating))
  except TypeError:
    return False


def check_kernel(path: str, leaf: Any) -> None:
  """Raises unless `leaf` can take a low-rank update: it has a shape and a floating dtype.

  Arrays, `jax.ShapeDtypeStruct` and other array-like leaves (e.g. a quantized kernel type)
  that expose ``.shape`` and a floating ``.dtype`` pass. An integer kernel is refused: its
  merged update would be rounded to integers, most of it to zero.

  Args:
    path: the leaf's "/"-joined path, for the error.
    leaf: the kernel.

  Raises:
    TypeError: if `leaf` has no shape and dtype.
    ValueError: if its dtype is not floating.

  Example:
    >>> import jax.numpy as jnp
    >>> from jlora.validate import check_kernel
    >>> check_kernel("fc/kernel", jnp.ones((4, 3), jnp.bfloat16))
    >>> check_kernel("fc/kernel", jnp.ones((4, 3), jnp.int8))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: The kernel 'fc/kernel' has dtype int8; ...
  """
  if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
    raise TypeError(
        f"The kernel {path!r} is a {type(leaf).__name__}, not an array. Fix: give params as "
        "arrays (jnp.asarray) or jax.ShapeDtypeStruct."
    )
  if not _is_floating(leaf.dtype):
    raise ValueError(  # the same exception type as jlora.init's check of a target's dtype
        f"The kernel {path!r} has dtype {leaf.dtype}; a low-rank update merged into it would be "
        "rounded to integers and mostly lost. Fix: leave it out of LoraConfig.targets, or "
        "dequantize it to a floating dtype (e.g. bfloat16) first."
    )


def check_factors(path: str, factors: Any, *, per_example: bool = False) -> None:
  """Raises unless the factors at `path` are consistent with each other and their kernel.

  Checks, before anything is traced: ``a`` and ``b`` are arrays (or `jax.ShapeDtypeStruct`)
  of a floating dtype; they have one rank; ``a``'s last axis is the kernel's fan-in (the
  product of its contracted axes) and ``b``'s its fan-out (the product of its feature axes);
  the leading axes are the kernel's stacked axes, plus one per-example axis (of the same size
  in both) only if `per_example` is True; the axis roles cover every kernel axis once.

  Args:
    path: the kernel's "/"-joined path, for the error.
    factors: one entry of `Adapter.lora`.
    per_example: whether a per-example axis (from `jlora.route`) is allowed.

  Raises:
    TypeError: if `factors` is not `LoraFactors` or a factor is not a floating array.
    ValueError: naming the path and both shapes, if the shapes disagree.

  Example:
    >>> import dataclasses, jax, jax.numpy as jnp, jlora
    >>> from jlora.validate import check_factors
    >>> params = {"fc": {"kernel": jnp.ones((4, 3))}}
    >>> f = jlora.init(jax.random.key(0), params,
    ...                jlora.LoraConfig(rank=2, alpha=4.0, targets="fc/kernel")).lora["fc/kernel"]
    >>> check_factors("fc/kernel", f)
    >>> check_factors("fc/kernel", dataclasses.replace(f, b=jnp.zeros((1, 3))))
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: fc/kernel: a has rank 2 (shape (2, 4)) but b has rank 1 (shape (1, 3)). ...
  """
  if not isinstance(factors, LoraFactors):
    raise TypeError(
        f"{path}: expected jlora.LoraFactors in Adapter.lora, got {type(factors).__name__}. "
        "Fix: build adapters with jlora.init (or dataclasses.replace an existing LoraFactors)."
    )
  for name in ("a", "b"):
    x = getattr(factors, name)
    if not _is_array(x):
      raise TypeError(
          f"{path}: factor {name} is a {type(x).__name__}, not an array. Fix: store factors "
          "as jax or NumPy arrays (jnp.asarray), e.g. after editing them with jax.tree.map."
      )
    if not _is_floating(x.dtype):
      raise TypeError(
          f"{path}: factor {name} has dtype {x.dtype}, not a floating dtype. Fix: cast it "
          "with .astype(jnp.float32) (or the LoraConfig.dtype it was made with)."
      )
  roles, shape = factors.roles, tuple(factors.kernel_shape)
  _check_roles(path, roles, shape)
  a, b = tuple(factors.a.shape), tuple(factors.b.shape)
  fan_in = math.prod(shape[i] for i in roles.contracting)
  fan_out = math.prod(shape[i] for i in roles.features)
  stacked = tuple(shape[i] for i in roles.stacked)
  lead = len(stacked) + 2
  allowed = (lead, lead + 1) if per_example else (lead,)
  both = f"(a {a}, b {b}, kernel {shape}, stacked axes {stacked})"
  if len(a) not in allowed or len(b) != len(a):
    extra = f" (or {lead + 1}, with a per-example axis after them)" if per_example else ""
    raise ValueError(
        f"{path}: factors need {lead} axes ({len(stacked)} stacked, rank, fan){extra} {both}. "
        "Fix: pass the adapter jlora.init made for this kernel (per-example factors from "
        "jlora.route only go to the function from jlora.wrap)."
    )
  if a[-2] != b[-2]:
    raise ValueError(
        f"{path}: a has rank {a[-2]} (shape {a}) but b has rank {b[-2]} (shape {b}). Fix: "
        "give both factors the same rank axis (second to last)."
    )
  if a[-1] != fan_in or b[-1] != fan_out:
    raise ValueError(
        f"{path}: the kernel {shape} needs a of shape (..., rank, {fan_in}) and b of shape "
        f"(..., rank, {fan_out}) (fan-in over axes {roles.contracting}, fan-out over "
        f"{roles.features}); got a {a} and b {b}. Fix: use the adapter made for this kernel."
    )
  if a[:-2] != b[:-2] or a[:len(stacked)] != stacked:
    extra = " (then one per-example axis)" if per_example else ""
    raise ValueError(
        f"{path}: the leading axes of a and b must be the kernel's stacked axes{extra} {both}. "
        "Fix: use the adapter made for this kernel."
    )


def _check_roles(path: str, roles: Any, shape: tuple[int, ...]) -> None:
  if not isinstance(roles, AxisRoles):
    raise TypeError(f"{path}: factors.roles is a {type(roles).__name__}, not jlora.AxisRoles. "
                    "Fix: build adapters with jlora.init.")
  axes = sorted((*roles.stacked, *roles.contracting, *roles.features))
  if axes != list(range(len(shape))) or not roles.contracting or not roles.features:
    raise ValueError(
        f"{path}: axis roles {roles} do not give each of the {len(shape)} axes of the kernel "
        f"{shape} exactly one role (with at least one contracted and one feature axis). Fix: "
        "make the adapter with jlora.init, or correct LoraConfig.roles for this path."
    )
