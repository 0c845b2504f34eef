"""Quantized frozen kernels for QLoRA: int8, int4 and NF4 block-wise codes as pytrees.

A `QuantizedArray` stands where a kernel W stood in a parameter tree. Its leaves are the packed
codes and the per-block scales; the scheme, the block size, W's trailing axes and W's dtype are
static metadata. W's first ``lead_axes`` axes (default 1: the layer axis of a stack, or the input
axis of a matrix) stay array axes; the rest are flattened row-major into *rows* of ``n``
elements, cut into blocks. Every leaf has W's leading axes as its own leading axes, so slicing,
scanning, vmapping, moving or sharding them gives the `QuantizedArray` of the same slice of W.
(A (d, heads, 64) q kernel thus has rows of heads·64, and its double-quantized scales pay for
themselves; ``lead_axes=W.ndim - 1`` cuts blocks along the last axis alone.) Below, a "row" is
the last axis of the codes::

    scheme  codes                          scales (scale of block j of a row)
    int8    (*lead, n) int8, in [-127,127]  (*lead, n // block) f32: absmax / 127
    int4    (*lead, n // 2) uint8           (*lead, n // block) f32: absmax / 7
    nf4     (*lead, n // 2) uint8           (*lead, n // block) f32: absmax

Dequantized, element i of a row is ``value(code_i) * scale[i // block]`` computed in float32 and
cast once to the requested dtype; ``value`` is the code itself for int8, the nibble minus 8 for
int4 (nibbles 1..15 hold -7..7) and the NF4 codebook entry for nf4.

**Rounding.** int8 and int4 round ``x / scale`` to the nearest integer (ties to even), so the
error is at most ``absmax / 254`` (int8) or ``absmax / 14`` (int4) per element, up to float32
rounding. NF4 maps ``clip(x * (1 / absmax), -1, 1)`` to the nearest of the 16 NormalFloat values
of QLoRA (Dettmers et al. 2023, arXiv:2305.14314, Appendix E), a value exactly halfway between
two entries going to the lower one: the same arithmetic as bitsandbytes 0.50, whose
``quantize_4bit(t, blocksize=64, quant_type="nf4")`` codes, absmax and ``dequantize_4bit`` output
jlora reproduces bit for bit for a row-major float32 tensor whose rows are a multiple of 64
long (there the flattened blocks of bitsandbytes are jlora's blocks along the rows). One known
difference: an all-zero block has scale 0 here and codes of 0.0, as in bitsandbytes; a block whose
absmax is a float32 subnormal below 1e-38 is scaled by 1/absmax here and by 1e38 there.

**Packing order (int4, nf4).** Two 4-bit codes per byte along the last axis: elements ``2k`` and
``2k + 1`` of a row share byte ``k``, element ``2k`` in the high nibble (bits 4-7) and element
``2k + 1`` in the low nibble (bits 0-3) — bitsandbytes' order, so its packed bytes of a
``(*lead, n)`` tensor, flattened, equal ``codes.reshape(-1)``.

**Double quantization** (``double_quant=True``, QLoRA's "quantizing the quantization
constants"): the float32 scales are themselves stored as uint8 codes with an affine second level
per group of 256 consecutive scales along the last axis (the last group of a row may be shorter;
groups never span two rows): ``scale ≈ scale_offset[g] + code * scale_step[g]`` with
``scale_offset`` the group's smallest scale and ``scale_step = (max - min) / 255``, codes rounded
to nearest. So a dequantized scale lies in its group's [min, max], never negative, within
``scale_step / 2`` of the true one, and exact when a group's scales are equal. The 4-bit codes are
chosen with the exact scales, as in QLoRA. This differs from bitsandbytes'
``compress_statistics=True``, which subtracts one mean over the whole tensor and codes the
centred scales with its 8-bit dynamic (sign/exponent/fraction) map in groups of 256 over the
flattened tensor: a tensor-wide mean would tie every row's scales together and break the slicing
invariant above. Cost per element: 4 + 8/64 + 64/(64·256) bits vs 4 + 32/64 bits without. As
groups stay within a row, it saves bytes only for rows of three or more blocks: with
``lead_axes=2``, q/k/v of shape (d, heads, 64) have rows of one block and pay 9 bytes a row for 4.

**Shapes that do not fit** are rejected, never padded: a block size must divide ``n`` (or be
``None``: one block per row), and 4-bit codes need an even ``n``.

**Sharding.** Quantizing a kernel placed with a `jax.sharding.NamedSharding` places every leaf on
the same mesh with the kernel's spec on the leading axes; on the last (blocked, packed) axis a
leaf keeps the kernel's last-axis spec when its own last-axis length divides evenly among those
devices, and is replicated along it otherwise. On a mesh with `jax.sharding.AxisType.Explicit`
axes the blocks are computed under `jax.sharding.auto_axes` (a sharded last axis need not split
evenly into blocks), and `dequantize` returns the dense kernel with the spec of the codes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import re
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from jlora import _tree

SCHEMES = ("int8", "int4", "nf4")
DQ_GROUP = 256  # first-level scales per second-level (offset, step) pair

# The 16 NormalFloat4 values of QLoRA, in code order (code 7 is exactly 0). They are quantiles of
# N(0, 1) rescaled to [-1, 1] (the construction is checked in tests/test_quant.py); as float32
# they equal the table bitsandbytes ships, which bit-exact agreement needs.
NF4_CODEBOOK = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)
_NF4_MIDPOINTS = (NF4_CODEBOOK[:-1] + NF4_CODEBOOK[1:]) / np.float32(2)


def _static():
  return dataclasses.field(metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantizedArray:
  """A kernel stored as block-wise int8, int4 or NF4 codes with per-block scales.

  Leaves: ``codes``, ``scales`` and, with double quantization, ``scale_offset`` and
  ``scale_step`` (else None); every leaf has the kernel's leading axes as its own leading axes.
  Static: ``scheme``, ``block_size``, ``trailing`` (the kernel's axes in a row), ``orig_dtype`` and
  ``double_quant``. Make one with `quantize_array` or `quantize`; read it with `dequantize`.

  Attributes:
    codes: the packed codes, ``(*lead, n)`` int8 or ``(*lead, n // 2)`` uint8 (two 4-bit
      codes per byte).
    scales: one float32 scale per block, ``(*lead, n // block_size)``; with double
      quantization their uint8 codes.
    scale_offset: with double quantization, the float32 offset of each group of 256 scales.
    scale_step: with double quantization, the float32 step of each group of 256 scales.
    scheme: ``"int8"``, ``"int4"`` or ``"nf4"``.
    block_size: elements per block along a row.
    trailing: the kernel's axes after the leading ones, flattened into each row.
    orig_dtype: the kernel's dtype before quantization.
    double_quant: whether the scales are quantized too.

  Example:
    >>> import jax, jax.numpy as jnp, jlora.quant as jq
    >>> q = jq.quantize_array(jnp.ones((3, 128), jnp.bfloat16), "nf4")
    >>> q
    QuantizedArray(shape=(3, 128), dtype=bfloat16, scheme='nf4', block_size=64, double_quant=False)
    >>> q.codes.shape, q.scales.shape, q.nbytes
    ((3, 64), (3, 2), 216)
    >>> jax.tree.map(lambda leaf: leaf[0], q).shape  # a slice of the leading axes
    (128,)
  """

  codes: jax.Array
  scales: jax.Array
  scale_offset: jax.Array | None = None
  scale_step: jax.Array | None = None
  scheme: str = _static()
  block_size: int = _static()
  trailing: tuple[int, ...] = _static()
  orig_dtype: np.dtype = _static()
  double_quant: bool = _static()

  _jlora_leaf: ClassVar[bool] = True  # jlora._tree: one leaf at the kernel's path

  @property
  def shape(self) -> tuple[int, ...]:
    return (*self.codes.shape[:-1], *self.trailing)

  @property
  def n(self) -> int:
    """Elements per row: the trailing axes flattened, cut into blocks."""
    return math.prod(self.trailing)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def dtype(self) -> np.dtype:
    return self.orig_dtype

  @property
  def nbytes(self) -> int:
    """Bytes of all leaves: what the quantized kernel really occupies."""
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(self))

  def __repr__(self) -> str:
    if not hasattr(self.codes, "shape"):  # a tree.map made the leaves something else
      return f"QuantizedArray(codes={self.codes!r}, scales={self.scales!r}, ...)"
    return (f"QuantizedArray(shape={self.shape}, dtype={self.dtype}, scheme={self.scheme!r}, "
            f"block_size={self.block_size}, double_quant={self.double_quant})")


def is_quantized(x: Any) -> bool:
  """Whether `x` is a `QuantizedArray`.

  Example:
    >>> import jax.numpy as jnp, jlora.quant as jq
    >>> x = jnp.ones((2, 64))
    >>> jq.is_quantized(x), jq.is_quantized(jq.quantize_array(x, "int8"))
    (False, True)
  """
  return isinstance(x, QuantizedArray)


# ----------------------------------------------------------------------------------------------
# Checks at the boundary.


def _check_options(where: str, scheme: Any, block_size: Any) -> None:
  if scheme not in SCHEMES:
    raise ValueError(f"{where}: unknown scheme {scheme!r}. Fix: use one of {SCHEMES}.")
  if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int)
                                 or block_size <= 0):
    raise ValueError(f"{where}: block_size must be a positive int or None (one block per row), "
                     f"got {block_size=}. Fix: pass e.g. block_size=64.")


def _leaf_problem(path: str, leaf: Any, scheme: str, block_size: int | None,
                  lead_axes: int) -> str | None:
  """Why the leaf at `path` cannot be quantized, as an error message; None if it can."""
  if is_quantized(leaf):
    return (f"{path} is already quantized ({leaf!r}). Fix: quantize the float kernel once, or "
            "dequantize it first.")
  shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
  if shape is None or dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    return (f"{path} is not a floating-point array (dtype={dtype}). Fix: select only float "
            "kernels with targets.")
  if len(shape) < 2:
    return (f"{path} has shape {tuple(shape)}: only kernels with two or more axes are quantized "
            "(blocks run along the last axis; biases and norms stay dense). Fix: narrow targets "
            "to kernels, e.g. '.*/kernel'.")
  if isinstance(lead_axes, bool) or not isinstance(lead_axes, int) or not (
      0 <= lead_axes < len(shape)):
    return (f"{path} has shape {tuple(shape)}; lead_axes={lead_axes!r} must be an int in "
            f"[0, {len(shape)}). Fix: keep 1 leading axis (the layer axis of a stack), or 0.")
  n = math.prod(shape[lead_axes:])
  if block_size is not None and n % block_size:
    divisors = [b for b in (256, 128, 64, 32, 16) if n % b == 0][:2]
    hint = f"block_size={divisors[0]}" if divisors else "block_size=None (one block per row)"
    return (f"{path} has rows of {n} elements (its axes after the first {lead_axes}), not a "
            f"multiple of {block_size=} (blocks are not padded). Fix: use {hint}, or leave "
            "this kernel dense.")
  if scheme in ("int4", "nf4") and n % 2:
    return (f"{path} has rows of an odd {n} elements; {scheme} packs two codes per byte. "
            "Fix: use scheme='int8' for this kernel, or leave it dense.")
  return None


def _select(tree, targets) -> dict[str, Any]:
  leaves = _tree.flatten(tree)
  if callable(targets):
    return {p: x for p, x in leaves.items() if targets(p, x)}
  regexes = (targets,) if isinstance(targets, str) else tuple(targets)
  for pattern in regexes:
    if not isinstance(pattern, str):
      raise TypeError(f"jlora.quantize: targets must be a regex, a sequence of regexes or a "
                      f"callable (path, leaf) -> bool; got {pattern!r}. Fix: pass e.g. "
                      "'.*/kernel'.")
  chosen = {p: x for p, x in leaves.items() if any(re.fullmatch(r, p) for r in regexes)}
  if not chosen:
    raise ValueError(
        "jlora.quantize: targets matched no leaf of the tree.\n"
        f"  targets: {targets!r} (re.fullmatch against \"/\"-joined paths)\n"
        f"  paths that look close: {_tree.close_paths(list(leaves), regexes[0] if regexes else '')}"
        "\n  Fix: change the regex or pass a callable (path, leaf) -> bool.")
  return chosen


# ----------------------------------------------------------------------------------------------
# The numerics, vectorised over all blocks at once.


def _pack(nibbles):
  """(..., n) values in [0, 15] -> (..., n // 2) uint8: element 2k high nibble, 2k+1 low."""
  pairs = nibbles.astype(jnp.uint8).reshape(*nibbles.shape[:-1], -1, 2)
  return (pairs[..., 0] << 4) | pairs[..., 1]


def _unpack(codes):
  """Inverse of `_pack`: (..., m) uint8 -> (..., 2m) uint8 nibbles."""
  return jnp.stack([codes >> 4, codes & 0xF], axis=-1).reshape(*codes.shape[:-1], -1)


def _lookup(nibbles, table: np.ndarray):
  """table[nibbles] as a tree of 15 selects on the 4 bits: elementwise, so any sharding of
  `nibbles` carries over (a gather from a replicated table needs an explicit out_sharding)."""
  level = [np.float32(v) for v in table]
  for bit in range(4):
    on = (nibbles >> bit) & 1 == 1
    level = [jnp.where(on, level[k + 1], level[k]) for k in range(0, len(level), 2)]
  return level[0]


def _groups(nb: int) -> int:
  return -(-nb // DQ_GROUP)


def _expand(per_group, nb: int):
  """(..., G) -> (..., nb): each group's value for each of its scales (reshapes when it can)."""
  lead, groups = per_group.shape[:-1], per_group.shape[-1]
  if groups == 1 or nb == groups * DQ_GROUP:
    size = min(nb, DQ_GROUP)
    return jnp.broadcast_to(per_group[..., None], (*lead, groups, size)).reshape(*lead, nb)
  return jnp.repeat(per_group, DQ_GROUP, axis=-1)[..., :nb]


def _group_extremes(scales):
  """(..., nb) -> per-group (min, max), groups of `DQ_GROUP` along the last axis."""
  nb, groups = scales.shape[-1], _groups(scales.shape[-1])
  if groups == 1 or nb == groups * DQ_GROUP:
    grouped = scales.reshape(*scales.shape[:-1], groups, -1)
    return grouped.min(axis=-1), grouped.max(axis=-1)
  # A short last group: mask instead of padding. (Padding with +inf for the min and -inf for
  # the max in one program gave wrong maxima on a sharded input with XLA:CPU, jax 0.10.2.)
  member = np.arange(nb) // DQ_GROUP == np.arange(groups)[:, None]  # (groups, nb), static
  member = member.reshape((1,) * (scales.ndim - 1) + member.shape)
  spread = scales[..., None, :]
  return (jnp.where(member, spread, jnp.inf).min(axis=-1),
          jnp.where(member, spread, -jnp.inf).max(axis=-1))


def _compress_scales(scales):
  """(..., nb) scales >= 0 -> uint8 codes and per-256-group (offset, step) along the last axis."""
  nb = scales.shape[-1]
  lo, hi = _group_extremes(scales)
  step = (hi - lo) / 255
  q = jnp.where(_expand(step, nb) > 0, (scales - _expand(lo, nb)) / _expand(step, nb), 0)
  return jnp.clip(jnp.round(q), 0, 255).astype(jnp.uint8), lo, step


def _scales(q: QuantizedArray):
  if not q.double_quant:
    return q.scales
  nb = q.scales.shape[-1]
  return _expand(q.scale_offset, nb) + q.scales.astype(jnp.float32) * _expand(q.scale_step, nb)


def _encode(x, scheme: str, block: int, double_quant: bool, lead_axes: int) -> QuantizedArray:
  trailing = x.shape[lead_axes:]
  x = x.reshape(*x.shape[:lead_axes], -1)
  lead, n = x.shape[:-1], x.shape[-1]
  blocks = x.astype(jnp.float32).reshape(*lead, n // block, block)
  absmax = jnp.max(jnp.abs(blocks), axis=-1)
  if scheme == "nf4":
    scales = absmax
    recip = jnp.where(absmax > 0, 1 / jnp.where(absmax > 0, absmax, 1), 0)
    unit = jnp.clip(blocks * recip[..., None], -1, 1)
    nearest = jnp.searchsorted(_NF4_MIDPOINTS, unit, side="left", method="compare_all")
    codes = _pack(nearest.reshape(*lead, n))
  else:
    top = 127 if scheme == "int8" else 7
    scales = absmax / top
    safe = jnp.where(scales > 0, scales, 1)[..., None]
    ints = jnp.clip(jnp.round(blocks / safe), -top, top).reshape(*lead, n)
    codes = ints.astype(jnp.int8) if scheme == "int8" else _pack(ints + 8)
  offset = step = None
  if double_quant:
    scales, offset, step = _compress_scales(scales)
  return QuantizedArray(codes=codes, scales=scales, scale_offset=offset, scale_step=step,
                        scheme=scheme, block_size=block, trailing=tuple(trailing),
                        orig_dtype=np.dtype(x.dtype), double_quant=double_quant)


def _explicit_spec(a) -> PartitionSpec | None:
  """`a`'s spec padded to its rank when its mesh has `Explicit` axes (typed sharding), else None."""
  sharding = jax.typeof(a).sharding
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or AxisType.Explicit not in tuple(getattr(mesh, "axis_types", ())):
    return None
  return PartitionSpec(*sharding.spec, *(None,) * (a.ndim - len(sharding.spec)))


def _mesh_context(a):
  """`jax.set_mesh` of a concrete array's mesh (`auto_axes` needs one in context), else a no-op.
  Under an outer jit the traced arrays already carry their (abstract) mesh."""
  if a is None or isinstance(a, jax.core.Tracer):
    return contextlib.nullcontext()
  return jax.set_mesh(a.sharding.mesh)


def _shardings(x, abstract: QuantizedArray, lead_axes: int):
  """Per-leaf NamedShardings following `x`'s on the leading axes (module docstring), or None."""
  sharding = getattr(x, "sharding", None) if not isinstance(x, jax.core.Tracer) else None
  if not isinstance(sharding, NamedSharding):
    return None
  spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
  # A row is the trailing axes flattened: it can keep the first one's spec when the rest are
  # whole (row-major), else it is replicated.
  spec = (*spec[:lead_axes], spec[lead_axes] if not any(spec[lead_axes + 1:]) else None)
  last = spec[-1]
  names = () if last is None else (last,) if isinstance(last, str) else tuple(last)
  ways = math.prod(sharding.mesh.shape[a] for a in names)

  def place(leaf):
    keep = last if leaf.shape[-1] % ways == 0 else None
    return NamedSharding(sharding.mesh, PartitionSpec(*spec[:-1], keep))

  return jax.tree.map(place, abstract)


def quantize_array(x: jax.Array, scheme: str = "nf4", *, block_size: int | None = 64,
                   double_quant: bool = False, lead_axes: int = 1) -> QuantizedArray:
  """Quantizes one kernel block-wise along its last axis (formats: the module docstring).

  Each block of `block_size` consecutive elements of a row gets scale s from its absmax; int8
  stores round(x / s) with s = absmax/127, int4 round(x / s) in [-7, 7] with s = absmax/7, nf4
  the nearest NormalFloat4 value of x / absmax. A kernel placed with a `NamedSharding` keeps it
  on its leading axes.

  Args:
    x: a floating-point array with two or more axes (any float dtype; computed in float32).
    scheme: "int8", "int4" or "nf4".
    block_size: elements per block along a row, dividing it; None: one block per row.
    double_quant: also quantize the scales to 8 bits (QLoRA's double quantization).
    lead_axes: how many leading axes of `x` stay array axes (sliceable, shardable); the rest
      are flattened into rows.

  Returns:
    A `QuantizedArray` with ``shape == x.shape`` and ``dtype == x.dtype``.

  Raises:
    ValueError: for an unknown scheme, a bad block size, a block size that does not divide the
      last axis, an odd last axis for 4-bit codes, or `x` not a float array of ndim >= 2.

  Example:
    >>> import jax, jax.numpy as jnp, jlora.quant as jq
    >>> w = jax.random.normal(jax.random.key(0), (4, 256))
    >>> q = jq.quantize_array(w, "int8", block_size=None)
    >>> q.codes.dtype, q.scales.shape
    (dtype('int8'), (4, 1))
    >>> bool(jnp.abs(jq.dequantize(q) - w).max() <= jnp.abs(w).max() / 254 + 1e-6)
    True
  """
  _check_options("jlora.quantize_array", scheme, block_size)
  problem = _leaf_problem("the array", x, scheme, block_size, lead_axes)
  if problem:
    raise ValueError(f"jlora.quantize_array: {problem}")
  row = math.prod(x.shape[lead_axes:])
  options = (scheme, row if block_size is None else block_size, bool(double_quant), lead_axes)
  layout = jax.eval_shape(lambda a: _encode(a, *options), jax.ShapeDtypeStruct(x.shape, x.dtype))
  out_shardings = _shardings(x, layout, lead_axes)
  explicit = out_shardings is not None and _explicit_spec(x) is not None
  with jax.named_scope("jlora/quantize"), _mesh_context(x if explicit else None):
    return _encoder(*options, out_shardings, explicit)(x)


@functools.lru_cache(maxsize=256)
def _encoder(scheme: str, block: int, double_quant: bool, lead_axes: int, out_shardings,
             explicit: bool):
  """`_encode` jitted once per options and placement (jit then caches per input shape)."""
  encode = functools.partial(_encode, scheme=scheme, block=block, double_quant=double_quant,
                             lead_axes=lead_axes)
  if explicit:
    # Explicit axes type-check every reshape of the sharded last axis; the blocks are laid out
    # by XLA inside (auto axes) and the leaves come out as `_shardings` says.
    specs = jax.tree.map(lambda s: s.spec, out_shardings)
    encode = jax.sharding.auto_axes(encode, out_sharding=specs)
  return jax.jit(encode, out_shardings=out_shardings)


def quantize(tree, targets: str | Sequence[str] | Callable[[str, Any], bool],
             scheme: str = "nf4", *, block_size: int | None = 64, double_quant: bool = False,
             lead_axes: int = 1):
  """Replaces each kernel of `tree` selected by `targets` with its `QuantizedArray`.

  Args:
    tree: a parameter tree (dicts, FrozenDicts or `nnx.State`).
    targets: a regex or a sequence of regexes matched with `re.fullmatch` against each leaf's
      "/"-joined path (as `LoraConfig.targets`), or a callable ``(path, leaf) -> bool``.
    scheme: "int8", "int4" or "nf4".
    block_size: elements per block along each row of a kernel; None: one block per row.
    double_quant: also quantize the scales to 8 bits.
    lead_axes: leading axes of each kernel kept as array axes (1: a stack's layer axis, which
      `jlora.wrap` slices in a scan); the rest are flattened into rows.

  Returns:
    `tree` with the selected leaves replaced; every other leaf is the same object.

  Raises:
    ValueError: if no leaf matches, or a selected leaf cannot be quantized (named by its path);
      nothing is quantized then.

  Example:
    >>> import jax.numpy as jnp, jlora.quant as jq
    >>> params = {"fc": {"kernel": jnp.ones((64, 128)), "bias": jnp.zeros(128)}}
    >>> qparams = jq.quantize(params, ".*/kernel", "nf4", double_quant=True)
    >>> qparams["fc"]["kernel"]
    QuantizedArray(shape=(64, 128), dtype=float32, scheme='nf4', block_size=64, double_quant=True)
    >>> qparams["fc"]["bias"] is params["fc"]["bias"]
    True
  """
  _check_options("jlora.quantize", scheme, block_size)
  chosen = _select(tree, targets)
  for path, leaf in chosen.items():
    problem = _leaf_problem(path, leaf, scheme, block_size, lead_axes)
    if problem:
      raise ValueError(f"jlora.quantize: {problem}")
  return _tree.replace(tree, {
      path: quantize_array(leaf, scheme, block_size=block_size, double_quant=double_quant,
                           lead_axes=lead_axes)
      for path, leaf in chosen.items()})


def dequantize(x, dtype: Any = None):
  """The dense kernel of a `QuantizedArray`; on a tree, of each `QuantizedArray` leaf.

  Computes ``value(code) * scale`` per element in float32 (module docstring) and casts once to
  `dtype`, or to the kernel's original dtype. Jittable; elementwise shifts and selects only.

  Args:
    x: a `QuantizedArray`, or a tree whose other leaves come back unchanged.
    dtype: a floating-point dtype for the result; None keeps each kernel's original dtype.

  Returns:
    A dense array of shape ``x.shape``, or the tree with its quantized leaves made dense.

  Raises:
    ValueError: if `dtype` is not a floating-point dtype.

  Example:
    >>> import jax, jax.numpy as jnp, jlora.quant as jq
    >>> w = jnp.linspace(-1.0, 1.0, 128).reshape(2, 64)
    >>> q = jq.quantize_array(w, "nf4")
    >>> jq.dequantize(q).dtype, jax.jit(jq.dequantize)(q).shape
    (dtype('float32'), (2, 64))
    >>> float(jnp.abs(jq.dequantize(q) - w).max()) <= 0.16  # half the widest NF4 gap, 0.152
    True
  """
  if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
    where = "a QuantizedArray" if is_quantized(x) else ", ".join(
        _tree.path_str(p) for p, leaf in jax.tree_util.tree_leaves_with_path(
            x, is_leaf=is_quantized) if is_quantized(leaf)) or "a tree"
    raise ValueError(f"jlora.dequantize: dtype={np.dtype(dtype)} cannot hold dequantized values "
                     f"(of {where}). Fix: pass a floating dtype such as jnp.bfloat16, or None.")
  if not is_quantized(x):
    return jax.tree.map(lambda leaf: dequantize(leaf, dtype) if is_quantized(leaf) else leaf,
                        x, is_leaf=is_quantized)
  spec = _explicit_spec(x.codes)
  if spec is not None:  # the dense kernel: the row's spec on its first trailing axis
    spec = PartitionSpec(*spec, *(None,) * (len(x.trailing) - 1))
  with jax.named_scope("jlora/dequantize"), _mesh_context(None if spec is None else x.codes):
    return _decoder(np.dtype(x.dtype if dtype is None else dtype), spec)(x)


@functools.lru_cache(maxsize=256)
def _decoder(dtype: np.dtype, explicit_spec: PartitionSpec | None):
  """`_decode` jitted once per dtype (and, on `Explicit` axes, per spec of the codes)."""
  decode = functools.partial(_decode, dtype=dtype)
  if explicit_spec is not None:
    # Explicit axes: compute with auto axes and hand back the codes' spec (see quantize_array).
    decode = jax.sharding.auto_axes(decode, out_sharding=explicit_spec)
  return jax.jit(decode)


def _decode(x: QuantizedArray, dtype):
  if x.scheme == "int8":
    values = x.codes.astype(jnp.float32)
  elif x.scheme == "int4":
    values = _unpack(x.codes).astype(jnp.float32) - 8
  else:
    values = _lookup(_unpack(x.codes), NF4_CODEBOOK)
  lead = x.codes.shape[:-1]
  blocks = values.reshape(*lead, x.n // x.block_size, x.block_size)
  return (blocks * _scales(x)[..., None]).reshape(*lead, *x.trailing).astype(dtype)
