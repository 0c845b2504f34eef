"""`summary`: a table of what an adapter trains, like PEFT's print_trainable_parameters."""

from __future__ import annotations

import math

import jax

from jlora import _tree
from jlora.adapter import Adapter, Params


def summary(adapter: Adapter, params: Params | None = None) -> str:
  """A table of each adapted kernel (shape, rank, scale, size) and the trainable total.

  Args:
    adapter: the adapter to describe.
    params: optionally the base tree, to report the share of its parameters that train.

  Returns:
    A multi-line string; print it.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"fc": {"kernel": jnp.ones((64, 32)), "bias": jnp.zeros(32)}}
    >>> config = jlora.LoraConfig(rank=4, alpha=8.0, targets="fc/kernel")
    >>> print(jlora.summary(jlora.init(jax.random.key(0), params, config), params))
    path       kernel    kind   rank  scale  params
    fc/kernel  (64, 32)  dense     4  2      384
    trainable: 384 of 2,080 (18.462%)
  """
  rows = [("path", "kernel", "kind", "rank", "scale", "params")]
  for path, f in sorted(adapter.lora.items()):
    rows.append((path, str(f.kernel_shape), f.roles.kind, str(f.rank), f"{f.scale:g}",
                 str(f.a.size + f.b.size)))
  for path, leaf in sorted(adapter.extras.items()):
    rows.append((path, str(tuple(leaf.shape)), "full", "-", "-", str(leaf.size)))
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  def line(row):
    cells = (c.rjust(w) if i == 3 else c.ljust(w)  # the rank column is right-aligned
             for i, (c, w) in enumerate(zip(row, widths, strict=True)))
    return "  ".join(cells).rstrip()

  lines = [line(row) for row in rows]
  trained = sum(math.prod(x.shape) for x in jax.tree.leaves(adapter))
  total = f"trainable: {trained:,}"
  if params is not None:
    base = sum(math.prod(x.shape) for x in _tree.flatten(params).values())
    total += f" of {base:,} ({100 * trained / base:.3f}%)"
  return "\n".join([*lines, total])
