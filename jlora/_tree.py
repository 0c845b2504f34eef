"""Paths and leaves of parameter trees: linen dicts, FrozenDicts and `nnx.State` alike."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx


def path_str(path) -> str:
  """The "/"-joined key path that targets, adapter keys and errors all use."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def _is_leaf(x) -> bool:
  """An `nnx.Variable` or a `jlora.quant.QuantizedArray` (marked, to avoid an import cycle)."""
  return _is_variable(x) or getattr(type(x), "_jlora_leaf", False)


def _value(leaf):
  return leaf.get_value() if _is_variable(leaf) else leaf


def flatten(tree) -> dict[str, Any]:
  """{path: array} for every leaf; an `nnx.Variable` or a `QuantizedArray` is one leaf."""
  leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=_is_leaf)
  return {path_str(path): _value(leaf) for path, leaf in leaves}


def replace(tree, new: Mapping[str, Any]):
  """`tree` with the leaves at the paths of `new` replaced; structure and types are kept."""

  def swap(path, leaf):
    value = new.get(path_str(path), None)
    if value is None:
      return leaf
    return leaf.replace(value) if _is_variable(leaf) else value

  return jax.tree.map_with_path(swap, tree, is_leaf=_is_leaf)


def close_paths(paths, wanted: str, n: int = 5) -> str:
  """A few of `paths`, those sharing the most words with `wanted` first, for error messages."""
  words = set(wanted.replace(".", "/").split("/"))
  ranked = sorted(paths, key=lambda p: -len(words & set(p.split("/"))))
  return ", ".join(ranked[:n]) or "(the tree has no leaves)"
