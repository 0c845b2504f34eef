"""`summary`: a table of what an adapter trains, like PEFT's print_trainable_parameters."""

from __future__ import annotations

import math

import jax
import numpy as np

from jlora import _tree
from jlora.adapter import Adapter, Params
from jlora.quant import is_quantized


def summary(adapter: Adapter, params: Params | None = None) -> str:
  """A table of each adapted kernel (shape, rank, scale, size) and the trainable total.

  When `params` holds quantized kernels (`jlora.quant`), a last line gives the bytes the frozen
  base really occupies against the same tree stored dense in its original dtypes.

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
    >>> qparams = jlora.quant.quantize(params, "fc/kernel", "nf4", block_size=32)
    >>> print(jlora.summary(jlora.init(jax.random.key(0), params, config), qparams))
    path       kernel    kind   rank  scale  params
    fc/kernel  (64, 32)  dense     4  2      384
    trainable: 384 of 2,080 (18.462%)
    frozen base: 1,408 bytes with 1 quantized kernel (nf4), 8,320 bytes dense (0.169x)
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
  return "\n".join([*lines, total, *([] if params is None else _base_bytes(params))])


def _base_bytes(params: Params) -> list[str]:
  """The frozen-base bytes line, quantized against dense, when `params` has quantized kernels."""
  leaves = list(_tree.flatten(params).values())
  quantized = [x for x in leaves if is_quantized(x)]
  if not quantized:
    return []
  dense_bytes = lambda x: math.prod(x.shape) * np.dtype(x.dtype).itemsize
  stored = sum(x.nbytes if is_quantized(x) else dense_bytes(x) for x in leaves)
  dense = sum(dense_bytes(x) for x in leaves)
  schemes = ", ".join(sorted({x.scheme for x in quantized}))
  kernels = f"{len(quantized)} quantized kernel{'s' if len(quantized) > 1 else ''}"
  return [f"frozen base: {stored:,} bytes with {kernels} ({schemes}), {dense:,} bytes dense "
          f"({stored / dense:.3f}x)"]
