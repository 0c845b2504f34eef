"""How a value the program computes from a kernel by layout-only ops relates to the kernel.

A `View` describes ``reshape(transpose(reshape(W, atoms), perm), shape)``: the kernel W (less
any stacked axes already sliced away) is cut into *atoms* — each source axis into one or more
row-major pieces — the atoms are permuted, and consecutive atoms form each axis of the value.
Transposes, reshapes that split or merge axes, size-1 axes and dtype casts all keep a value in
this form, so one small record follows a kernel through any of them, and tells, at the op that
finally consumes it, which kernel axes each of that op's axes came from.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class View:
  """Atoms of the kernel, in kernel order; their order in the value; atoms per value axis.

  Attributes:
    atoms: ``(source axis, size)`` pieces of the kernel, in the kernel's row-major order.
      Axes of size 1 have no atom.
    perm: atom indices in the value's order.
    groups: how many consecutive atoms (in `perm` order) make each axis of the value; 0 for
      an axis of size 1.
    dtype: the value's dtype.
  """

  atoms: tuple[tuple[int, int], ...]
  perm: tuple[int, ...]
  groups: tuple[int, ...]
  dtype: np.dtype

  @classmethod
  def of(cls, shape, dtype, axes=None) -> View:
    """The identity view of a kernel of `shape`, whose axes are source axes `axes`."""
    axes = tuple(range(len(shape))) if axes is None else tuple(axes)
    atoms = tuple((ax, n) for ax, n in zip(axes, shape, strict=True) if n != 1)
    return cls(atoms, tuple(range(len(atoms))), tuple(int(n != 1) for n in shape),
               np.dtype(dtype))

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(math.prod(self.atoms[i][1] for i in self.axis_atoms(ax))
                 for ax in range(len(self.groups)))

  def axis_atoms(self, axis: int) -> tuple[int, ...]:
    """The atoms of one axis of the value, in the value's order."""
    start = sum(self.groups[:axis])
    return self.perm[start:start + self.groups[axis]]

  def sources(self, axes) -> frozenset[int] | None:
    """The kernel axes that make up the value's `axes`, or None if one is split across them
    and other axes (then no role can be given to it)."""
    inside = [i for ax in axes for i in self.axis_atoms(ax)]
    found = frozenset(self.atoms[i][0] for i in inside)
    whole = [i for i, (src, _) in enumerate(self.atoms) if src in found]
    return found if sorted(whole) == sorted(inside) else None

  # -- layout ops -------------------------------------------------------------------------------

  def transpose(self, permutation) -> View:
    perm = tuple(i for ax in permutation for i in self.axis_atoms(ax))
    return dataclasses.replace(self, perm=perm, groups=tuple(self.groups[ax] for ax in permutation))

  def astype(self, dtype) -> View:
    return dataclasses.replace(self, dtype=np.dtype(dtype))

  def insert_unit_axes(self, positions) -> View:
    """Size-1 axes inserted so that they sit at `positions` of the result."""
    groups = list(self.groups)
    for pos in sorted(positions):
      groups.insert(pos, 0)
    return dataclasses.replace(self, groups=tuple(groups))

  def drop_unit_axes(self, axes) -> View:
    return dataclasses.replace(
        self, groups=tuple(g for ax, g in enumerate(self.groups) if ax not in set(axes)))

  def reshape(self, new_shape) -> View | None:
    """The view after a row-major reshape, splitting atoms where needed; None if a new axis
    does not line up with atom boundaries (that reshape is not layout-only for the kernel)."""
    atoms = [list(a) for a in self.atoms]
    order = list(self.perm)  # atom indices, value order
    groups, pos = [], 0
    for size in new_shape:
      count, prod = 0, 1
      while prod < size:
        if pos + count >= len(order):
          return None
        atom = atoms[order[pos + count]]
        if prod * atom[1] <= size:
          prod *= atom[1]
          count += 1
          continue
        outer = size // prod
        if size % prod or atom[1] % outer:
          return None
        k = order[pos + count]  # split atom k into (outer, inner), both in kernel order
        atoms[k:k + 1] = [[atom[0], outer], [atom[0], atom[1] // outer]]
        order = [i + (i > k) for i in order]
        order.insert(pos + count + 1, k + 1)
        prod *= outer
        count += 1
      if prod != size:
        return None
      groups.append(count)
      pos += count
    if pos != len(order):
      return None
    return View(tuple(map(tuple, atoms)), tuple(order), tuple(groups), self.dtype)

  def remove_source(self, axis: int) -> View | None:
    """The view once kernel axis `axis` (one whole value axis) is indexed away; the value axis
    it filled stays, with size 1. None if that axis is split or shares a value axis."""
    owners = [ax for ax in range(len(self.groups))
              if any(self.atoms[i][0] == axis for i in self.axis_atoms(ax))]
    if len(owners) != 1 or self.groups[owners[0]] != 1:
      return None
    gone = self.axis_atoms(owners[0])[0]
    atoms = self.atoms[:gone] + self.atoms[gone + 1:]
    perm = tuple(i - (i > gone) for i in self.perm if i != gone)
    groups = tuple(0 if ax == owners[0] else g for ax, g in enumerate(self.groups))
    return View(atoms, perm, groups, self.dtype)

  def resize_source(self, axis: int, size: int) -> View:
    """The view once kernel axis `axis` (one atom) is narrowed to `size`."""
    atoms = tuple((src, size if src == axis else n) for src, n in self.atoms)
    return dataclasses.replace(self, atoms=atoms)

  def axis_of_source(self, axis: int) -> int | None:
    """The value axis that holds exactly kernel axis `axis` and nothing else, if any."""
    for ax in range(len(self.groups)):
      atoms = self.axis_atoms(ax)
      if len(atoms) == 1 and self.atoms[atoms[0]][0] == axis and not any(
          src == axis for i, (src, _) in enumerate(self.atoms) if i != atoms[0]):
        return ax
    return None

  # -- applying the view ------------------------------------------------------------------------

  def apply(self, x, sizes=None):
    """`x`, laid out like the kernel (less sliced axes), in the value's layout and dtype.

    `sizes` overrides atom sizes by source axis (for a factor that replaces one axis by rank).
    """
    atom_sizes = [(sizes or {}).get(src, n) for src, n in self.atoms]
    shape = [math.prod(atom_sizes[i] for i in self.axis_atoms(ax))
             for ax in range(len(self.groups))]
    y = x.reshape(atom_sizes).transpose(self.perm) if self.atoms else x.reshape(())
    return y.reshape(shape).astype(self.dtype)
