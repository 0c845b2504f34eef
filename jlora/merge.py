"""Folding low-rank updates into their kernels and back out: `delta`, `merge`, `unmerge`."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jlora import _tree
from jlora.adapter import Adapter, LoraFactors, Params


def delta(factors: LoraFactors) -> jax.Array:
  """The update ΔW = s·Aᵀ·B of one kernel, in float32 and in the kernel's shape and layout.

  Args:
    factors: one entry of `Adapter.lora`.

  Returns:
    A float32 array of shape `factors.kernel_shape`.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"fc": {"kernel": jnp.ones((4, 3))}}
    >>> config = jlora.LoraConfig(rank=2, alpha=4.0, targets="fc/kernel")
    >>> d = jlora.delta(jlora.init(jax.random.key(0), params, config).lora["fc/kernel"])
    >>> d.shape, bool((d == 0).all())
    ((4, 3), True)
  """
  roles, shape = factors.roles, factors.kernel_shape
  a = factors.a.astype(jnp.float32) * jnp.float32(factors.scale)  # same rounding under jit
  flat = jnp.einsum("...ri,...ro->...io", a, factors.b.astype(jnp.float32))
  order = roles.stacked + roles.contracting + roles.features
  grouped = flat.reshape(tuple(shape[i] for i in order))
  return jnp.transpose(grouped, np.argsort(order))


def check_fits(params: Params, adapter: Adapter) -> dict:
  """Raises unless every adapter path exists in `params` with the recorded shape.

  Returns the flattened params, {path: leaf}.
  """
  if not isinstance(adapter, Adapter):
    raise TypeError(
        f"Expected a jlora.Adapter, got {type(adapter).__name__}. Fix: pass what jlora.init, "
        "jlora.select or jlora.combine returned."
    )
  flat = _tree.flatten(params)
  for path, factors in adapter.lora.items():
    _check_leaf(flat, path, factors.kernel_shape, "kernel")
  for path, extra in adapter.extras.items():
    _check_leaf(flat, path, extra.shape, "trainable leaf")
  return flat


def _check_leaf(flat: dict, path: str, shape, what: str) -> None:
  if path not in flat:
    raise ValueError(
        f"The adapter's {what} {path!r} is not in the params; close paths: "
        f"{_tree.close_paths(flat, path)}. Fix: pass the same tree that was given to jlora.init "
        "(for model.apply, the variables dict {'params': ...})."
    )
  if tuple(flat[path].shape) != tuple(shape):
    raise ValueError(
        f"The adapter's {what} {path!r} was made for shape {tuple(shape)}, but the params hold "
        f"{tuple(flat[path].shape)}. Fix: use the adapter with the model it was made for."
    )


def _fold(params: Params, adapter: Adapter, sign: float) -> Params:
  flat = check_fits(params, adapter)
  new = {}
  for path, factors in adapter.lora.items():
    if factors.a.ndim != len(factors.roles.stacked) + 2:
      raise ValueError(
          f"{path}: these factors have a per-example axis (from jlora.route) and no single "
          "update to merge. Fix: merge jlora.select(stacked, i) or a jlora.combine result."
      )
    w = flat[path]
    new[path] = (w.astype(jnp.float32) + sign * delta(factors)).astype(w.dtype)
  return _tree.replace(params, new)


def merge(params: Params, adapter: Adapter) -> Params:
  """Folds each low-rank update into the kernel it targets, and sets the trained extras.

  Each adapted kernel W becomes W + s·AᵀB, summed in float32 and cast once to W.dtype; each
  extra leaf is replaced by the adapter's value in the leaf's dtype; other leaves come back
  unchanged. A fresh adapter (B = 0) gives `params` back bit for bit.

  Args:
    params: the tree that was given to `jlora.init`.
    adapter: an adapter made for that tree, trained or not.

  Returns:
    A tree with the structure, shapes and dtypes of `params`.

  Raises:
    ValueError: if an adapter path is missing from `params` or its shape differs.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"fc": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
    >>> config = jlora.LoraConfig(rank=2, alpha=4.0, targets="fc/kernel")
    >>> merged = jlora.merge(params, jlora.init(jax.random.key(0), params, config))
    >>> jax.tree.map(jnp.shape, merged)
    {'fc': {'bias': (3,), 'kernel': (4, 3)}}
    >>> bool((merged["fc"]["kernel"] == params["fc"]["kernel"]).all())  # B starts at 0
    True
  """
  flat = check_fits(params, adapter)
  extras = {path: value.astype(flat[path].dtype) for path, value in adapter.extras.items()}
  return _fold(_tree.replace(params, extras), adapter, 1.0)


def unmerge(merged: Params, adapter: Adapter) -> Params:
  """Subtracts each low-rank update again: the inverse of `merge` for the kernels.

  Each adapted kernel W' becomes W' − s·AᵀB, in float32, cast once to W'.dtype. The result
  is within one unit in the last place of W's dtype of the original kernel (twice rounded:
  once by `merge`, once here). Extra trained leaves keep their trained values: the originals
  are not part of the adapter.

  Args:
    merged: a tree that `jlora.merge` returned for `adapter`.
    adapter: the adapter that was merged.

  Returns:
    A tree with the structure, shapes and dtypes of `merged`.

  Raises:
    ValueError: if an adapter path is missing from `merged` or its shape differs.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"fc": {"kernel": jnp.ones((4, 3))}}
    >>> config = jlora.LoraConfig(rank=2, alpha=4.0, targets="fc/kernel")
    >>> adapter = jlora.init(jax.random.key(0), params, config)
    >>> back = jlora.unmerge(jlora.merge(params, adapter), adapter)
    >>> bool((back["fc"]["kernel"] == params["fc"]["kernel"]).all())
    True
  """
  return _fold(merged, adapter, -1.0)


def num_params(adapter: Adapter) -> int:
  """How many numbers train: the sizes of all factors and extras.

  Args:
    adapter: an adapter (or any pytree of arrays).

  Returns:
    The total number of elements of its leaves.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"fc": {"kernel": jnp.ones((4, 3))}}
    >>> config = jlora.LoraConfig(rank=2, alpha=4.0, targets="fc/kernel")
    >>> jlora.num_params(jlora.init(jax.random.key(0), params, config))  # 2·4 + 2·3
    14
  """
  return sum(math.prod(x.shape) for x in jax.tree.leaves(adapter))
