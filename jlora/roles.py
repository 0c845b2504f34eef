"""Axis roles of a kernel: which axes are stacked, contracted with the input, or outputs.

Roles come from the program that uses the kernel, never from its shape alone. `read_roles`
traces ``fn(tree, *args)`` (`jlora.program`) and looks at every op that consumes a targeted
kernel, whatever layer class (or none) produced it:

* a contraction (`dot_general`: einsum, matmul, ``x @ w.T``): the kernel axes it contracts with
  the input are fan_in, its free axes fan_out, and axes it treats as batch axes (per-expert
  weights) are stacked, with factors of their own per index;
* a convolution: the window and input-channel axes are fan_in, the output channels fan_out;
* a lookup (`gather` of whole rows, `jnp.take`, ``table[ids]``): rows are fan_in, kind "embed";
* an axis that a scan slices, or that the program indexes (``w[i]``), is stacked.

Without a program, a 2-D kernel is (input, output), an ``embedding`` leaf is a lookup table,
and `LoraConfig.roles` states anything else explicitly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from jlora import program

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

  def without(self, axes) -> AxisRoles:
    """The roles of the kernel once its `axes` are indexed away (the rest renumbered)."""
    gone = set(axes)
    keep = lambda xs: tuple(a - sum(g < a for g in gone) for a in xs if a not in gone)  # noqa: E731
    return AxisRoles(self.kind, keep(self.contracting), keep(self.features),
                     keep(self.stacked))

  def unstacked(self) -> AxisRoles:
    """The roles of one layer's kernel, as the module inside the stack sees it."""
    return self.without(self.stacked)


def from_letters(letters: str, kind: str = "dense") -> AxisRoles:
  """Roles from one letter per axis: ``s`` stacked, ``i`` input, ``o`` output."""
  axes = lambda letter: tuple(i for i, c in enumerate(letters) if c == letter)  # noqa: E731
  return AxisRoles(kind, axes("i"), axes("o"), axes("s"))




# ----------------------------------------------------------------------------------------------
# Reading roles from the program.


@dataclasses.dataclass(frozen=True)
class Use:
  """What one op of the program does with a kernel, in the kernel's own axes.

  Attributes:
    kind: ``"dense"`` (dot_general), ``"conv"`` or ``"embed"`` (a gather of whole rows).
    contracting: kernel axes the op contracts with its input (rows, for a lookup).
    features: kernel axes that reach the op's output.
    batch: kernel axes the op treats as batch axes (one weight per index: per-expert).
    op: the op's name, for messages.
  """

  kind: str
  contracting: frozenset[int]
  features: frozenset[int]
  batch: frozenset[int]
  op: str


def _whole_axes(view, axes) -> frozenset[int] | None:
  """The kernel axes held by `axes`, if each of them is one whole kernel axis."""
  found = set()
  for ax in axes:
    atoms = view.axis_atoms(ax)
    if len(atoms) > 1:
      return None
    if atoms:
      src = view.sources([ax])
      if src is None:
        return None
      found |= src
  return frozenset(found)


def use_of(eqn, tag: program.Tag, position: int) -> Use | None:
  """How the op `eqn` uses `tag` (its input number `position`), or None if it is not a
  contraction, a convolution or a lookup of whole rows that jlora can factor."""
  view, params, name = tag.view, eqn.params, eqn.primitive.name
  axes = range(len(view.groups))
  batch: frozenset[int] | None = frozenset()
  if name == "dot_general":
    (contract, batched) = params["dimension_numbers"]
    inner, batch_axes = contract[position], batched[position]
    outer = [ax for ax in axes if ax not in inner and ax not in batch_axes]
    batch = _whole_axes(view, batch_axes)
    kind = "dense"
  elif name == "conv_general_dilated" and position == 1:
    if params["feature_group_count"] != 1 or params["batch_group_count"] != 1:
      return None
    out_axis = params["dimension_numbers"].rhs_spec[0]
    inner, outer, kind = [ax for ax in axes if ax != out_axis], [out_axis], "conv"
  elif name == "gather" and position == 0:
    numbers, sizes = params["dimension_numbers"], params["slice_sizes"]
    rows = tuple(numbers.collapsed_slice_dims)
    if (len(rows) != 1 or tuple(numbers.start_index_map) != rows or numbers.operand_batching_dims
        or sizes[rows[0]] != 1
        or any(n != full for ax, (n, full) in enumerate(zip(sizes, view.shape, strict=True))
               if ax != rows[0])):
      return None
    inner, outer, kind = rows, [ax for ax in axes if ax != rows[0]], "embed"
  else:
    return None
  contracting, features = view.sources(inner), view.sources(outer)
  if contracting is None or features is None or batch is None:
    return None
  return Use(kind, contracting, features, batch, name)


_ELEMENTWISE = frozenset({"mul", "add", "sub", "div", "neg", "max", "min", "select_n"})


class _Reader(program.Rules):
  """Records every use of every tag, computing nothing (it runs under `jax.eval_shape`).

  An elementwise op that keeps the kernel's shape (a mask, ``W * mask``) passes the tag on, so
  that the contraction after it still tells the roles (`jlora.wrap` merges at that op).
  """

  def __init__(self):
    self.uses: dict[str, list[Use]] = {}
    self.sliced_axes: dict[str, set[int]] = {}
    self.other_ops: dict[str, list[str]] = {}

  def use(self, eqn, invals):
    tags = [x for x in invals if isinstance(x, program.Tag)]
    out = eqn.outvars[0].aval
    if (eqn.primitive.name in _ELEMENTWISE and len(tags) == 1
        and tuple(out.shape) == tags[0].view.shape):
      return [tags[0].with_view(tags[0].view.astype(out.dtype))]
    for position, x in enumerate(invals):
      if isinstance(x, program.Tag):
        found = use_of(eqn, x, position)
        if found is not None:
          self.uses.setdefault(x.path, []).append(found)
        else:
          self.other_ops.setdefault(x.path, []).append(eqn.primitive.name)
    return super().use(eqn, invals)

  def use_as_value(self, tag, op="an output"):
    self.other_ops.setdefault(tag.path, []).append(op)
    return super().use_as_value(tag, op)

  def sliced(self, tag, axis, op):
    self.sliced_axes.setdefault(tag.path, set()).add(axis)
    return True


def _resolve(path: str, shape, uses: list[Use], sliced: set[int]) -> AxisRoles:
  """One set of roles that every use agrees with (a tied read-out may swap in and out)."""
  first = next((u for u in uses if u.kind == "embed"), uses[0])
  for use in uses:
    same = (use.contracting, use.features) == (first.contracting, first.features)
    swapped = (use.contracting, use.features) == (first.features, first.contracting)
    if not (same or swapped and use.kind == "dense"):
      raise ValueError(
          f"{path}: the program's {first.op} contracts kernel axes {sorted(first.contracting)} "
          f"but its {use.op} contracts {sorted(use.contracting)}; one low-rank update cannot "
          "serve both. Fix: exclude this kernel from LoraConfig.targets, or state its axes in "
          "LoraConfig.roles."
      )
  stacked = sliced.union(*(u.batch for u in uses))
  placed = first.contracting | first.features | stacked
  ones = {ax for ax, n in enumerate(shape) if n == 1 and ax not in placed}
  contracting = first.contracting | (ones if first.kind == "conv" else set())
  features = first.features | (set() if first.kind == "conv" else ones)
  return AxisRoles(first.kind, tuple(sorted(contracting)), tuple(sorted(features)),
                   tuple(sorted(stacked)))


def _unused_error(path: str, ops: list[str]) -> ValueError:
  reached = f"it reaches: {', '.join(dict.fromkeys(ops))}" if ops else "the program never uses it"
  return ValueError(
      f"{path} was selected by LoraConfig.targets, but no contraction, convolution or row "
      f"lookup consumes it when the model runs on the example inputs ({reached}; a bias, a "
      "norm scale or an unused leaf cannot take a low-rank update). Fix: narrow the targets, "
      "pass inputs that reach it, state its axes in LoraConfig.roles (e.g. a kernel used only "
      "inside a custom_vjp), or list it in LoraConfig.trainable to train it in full."
  )


def read_roles(fn: Callable[..., Any], tree, paths, args, kwargs) -> dict[str, AxisRoles]:
  """Runs ``fn(tree, *args, **kwargs)`` abstractly and reads the roles of the kernels at
  `paths` from the ops that consume them.

  Raises:
    ValueError: naming the path, if no contraction, convolution or row lookup consumes one,
      or its uses disagree on its axes.
  """
  traced = program.trace(fn, tree, args, kwargs)
  reader = _Reader()

  def run(leaves, arrays):
    ins = [program.Tag.of(p, x) if p in paths else x
           for p, x in zip(traced.leaf_paths, leaves, strict=True)]
    return program.evaluate(traced.jaxpr.jaxpr, traced.jaxpr.consts, [*ins, *arrays], reader)

  jax.eval_shape(run, [program.abstract(x) for x in traced.leaves], list(traced.arrays))
  shapes = dict(zip(traced.leaf_paths, (x.shape for x in traced.leaves), strict=True))
  for path in sorted(set(paths) - set(reader.uses)):
    raise _unused_error(path, reader.other_ops.get(path, []))
  return {p: _resolve(p, shapes[p], uses, reader.sliced_axes.get(p, set()))
          for p, uses in reader.uses.items()}
