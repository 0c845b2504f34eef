"""`wrap`: run any JAX model with an adapter, without ever differentiating its kernels.

`jlora.program` traces the model's function and runs its program again with every adapted
kernel tagged. Where a tagged kernel meets a contraction, this module adds the low-rank branch
beside the model's own op, y = x·W + s·((x·Aᵀ)·B), in that op's output layout:

* `dot_general` (einsum, matmul, tensordot, ``x @ w.T``): the LoRA input is flattened to
  (tokens, fan_in), with A stored as (rank, fan_in), so no adapter dot contracts two batch axes
  or needs a transposed copy (DESIGN.md §4); a contraction over the kernel's output axes (a tied
  read-out ``h @ table.T``) gets s·((h·Bᵀ)·A); kernel axes that the op batches over (per-expert
  weights) get factors of their own per index;
* `conv_general_dilated`: A as a convolution with the kernel's window and `rank` outputs, B as a
  1×1 on its output;
* `gather` of whole rows (an embedding lookup): the same rows of Aᵀ, times B.

Autodiff then adds only rank-r products to the backward pass; W is never a differentiated
argument, so no (fan_in × fan_out) weight gradient is formed. A quantized kernel is dequantized
inside the op that uses it, under `jax.checkpoint`, so the backward recomputes it from the codes
instead of keeping it. Any other use of an adapted kernel (``w * mask``, a kernel passed
through a custom_vjp or returned) computes with W + ΔW for that use only, with one
`MergedUseWarning` naming the kernel and the op.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jlora import program, quant
from jlora.adapter import Adapter, LoraFactors
from jlora.merge import check_fits, delta, with_extras
from jlora.program import Tag
from jlora.roles import AxisRoles, Use, use_of

DROPOUT_RNG = "lora_dropout"
_NOTHING_SAVED = jax.checkpoint_policies.nothing_saveable


class MergedUseWarning(UserWarning):
  """An adapted kernel reached an op with no factored rule; that use computes with W + ΔW,
  so its update trains through a full weight gradient there.

  Example:
    >>> import warnings, jax, jax.numpy as jnp, jlora
    >>> def fn(params, x):
    ...   return x @ (params["w"] * params["mask"])  # W·mask: elementwise, then the matmul
    >>> params = {"w": jnp.ones((4, 3)), "mask": jnp.ones((4, 3))}
    >>> config = jlora.LoraConfig(rank=1, alpha=1.0, targets="w")
    >>> adapter = jlora.init(jax.random.key(0), params, config, fn, jnp.ones((2, 4)))
    >>> with warnings.catch_warnings(record=True) as caught:
    ...   warnings.simplefilter("always")
    ...   _ = jlora.wrap(fn)(params, adapter, jnp.ones((2, 4)))
    >>> caught[0].category.__name__, "w is used by mul" in str(caught[0].message)
    ('MergedUseWarning', True)
  """


# ----------------------------------------------------------------------------------------------
# Helpers on tags.


def _now(tag: Tag, f: LoraFactors) -> LoraFactors:
  """`f` as it applies to `tag`'s kernel: sliced stacked axes dropped, axes renumbered."""
  sliced = [ax for ax in range(len(f.kernel_shape)) if ax not in tag.axes]
  a, b = tag.lora
  return LoraFactors(a=a, b=b, scale=f.scale, roles=f.roles.without(sliced),
                     kernel_shape=tuple(tag.kernel.shape), dropout=f.dropout)


def _remaining_stacked(tag: Tag, f: LoraFactors) -> list[int]:
  return [ax for ax in f.roles.stacked if ax in tag.axes]


def _is_routed(tag: Tag, f: LoraFactors) -> bool:
  return tag.lora[0].ndim == len(_remaining_stacked(tag, f)) + 3


def _with_kernel(tag: Tag, compute: Callable[[jax.Array], Any]):
  """`compute(W)` with the value the program holds for the kernel; a quantized kernel is
  dequantized inside a `jax.checkpoint`, so the backward recomputes it from the codes."""
  if not quant.is_quantized(tag.kernel):
    return compute(tag.view.apply(tag.kernel))
  run = lambda kernel: compute(tag.view.apply(program.dense(kernel)))  # noqa: E731
  return jax.checkpoint(run, policy=_NOTHING_SAVED)(tag.kernel)


def _dropout(x, tag: Tag, f: LoraFactors):
  if tag.key is None or not f.dropout:
    return x
  key = tag.key if tag.key.ndim == 0 else tag.key.reshape(-1)[0]
  keep = jax.random.bernoulli(key, 1.0 - f.dropout, x.shape)
  return jnp.where(keep, x / (1.0 - f.dropout), jnp.zeros_like(x))


def _to_value_order(q, view, value_axes):
  """Factor `q` (…, rank, fan) with fan in kernel order, its fan atoms put in the order the
  value holds them, still flat: (…, rank, fan). Kept 2-D, so the product with it is one plain
  matmul whose transpose needs no copy of the activations."""
  atoms = [i for ax in value_axes for i in view.axis_atoms(ax)]
  ordered = sorted(atoms)
  if atoms == ordered:
    return q
  lead = q.shape[:-1]
  q = q.reshape(*lead, *(view.atoms[i][1] for i in ordered))
  n = len(lead)
  q = q.transpose(*range(n), *(n + ordered.index(i) for i in atoms))
  return q.reshape(*lead, -1)


# ----------------------------------------------------------------------------------------------
# The factored branches.


def _check_routed(tag: Tag, f: LoraFactors, x, eqn, batch_axis_free: bool = True) -> None:
  n = tag.lora[0].shape[len(_remaining_stacked(tag, f))]
  if not batch_axis_free or x.ndim == 0 or x.shape[0] != n:
    raise ValueError(
        f"{tag.path}: the routed adapter has {n} examples (len(ids) in jlora.route), but "
        f"{eqn.primitive.name} reads an input of shape {x.shape} whose leading axis is not a "
        "batch of that size. Fix: pass ids with one entry per example of the batch, and keep "
        "the batch as the leading axis of the model's inputs."
    )


def _dot_branch(eqn, ins, position: int, tag: Tag, f: LoraFactors, swapped: bool):
  """s·((x·Aᵀ)·B) for a dot_general, in the dot's output layout."""
  view, x = tag.view, ins[1 - position]
  (contract, batch) = eqn.params["dimension_numbers"]
  k_in, k_batch = contract[position], batch[position]
  x_in, x_batch = contract[1 - position], batch[1 - position]
  k_free = [ax for ax in range(len(view.groups)) if ax not in k_in and ax not in k_batch]
  x_free = [ax for ax in range(x.ndim) if ax not in x_in and ax not in x_batch]
  a, b = tag.lora
  p, q = (b, a) if swapped else (a, b)
  # Batch axes of the branch: the stacked kernel axes the dot batches over, then the routed
  # example axis (x's leading axis).
  by_source = {next(iter(view.sources([ax]))): x_ax for ax, x_ax in zip(k_batch, x_batch,
                                                                        strict=True)
               if view.axis_atoms(ax)}
  groups = [by_source[ax] for ax in _remaining_stacked(tag, f)]
  if _is_routed(tag, f):
    _check_routed(tag, f, x, eqn, batch_axis_free=bool(x_free) and x_free[0] == 0)
    groups.append(0)
  tokens = [ax for ax in x_free if ax not in groups]
  # x with its contracted axes cut into the kernel's atoms, then (*groups, tokens, fan_in).
  shape, labels = [], []
  for ax in range(x.ndim):
    if ax in x_in:
      atoms = view.axis_atoms(k_in[x_in.index(ax)])
      shape += [view.atoms[i][1] for i in atoms]
      labels += [("in", i) for i in atoms]
    else:
      shape.append(x.shape[ax])
      labels.append(("x", ax))
  fan_in = sorted(i for kind, i in labels if kind == "in")
  order = [labels.index(("x", ax)) for ax in groups + tokens] + [
      labels.index(("in", i)) for i in fan_in]
  g_shape = [x.shape[ax] for ax in groups]
  x3 = x.reshape(shape).transpose(order).reshape(*g_shape, -1, p.shape[-1])
  x3 = _dropout(x3, tag, f)
  n = len(groups)
  batch_dims = (tuple(range(n)), tuple(range(n)))
  u = jax.lax.dot_general(x3, p.astype(x.dtype), (((n + 1,), (n + 1,)), batch_dims))
  u = u * jnp.asarray(f.scale, x.dtype)
  v = jax.lax.dot_general(u, _to_value_order(q.astype(x.dtype), view, k_free),
                          (((n + 1,), (n,)), batch_dims))
  v = _unflatten(v, x, groups, tokens, [view.shape[ax] for ax in k_free])
  have = [("x", ax) for ax in groups + tokens] + [("k", ax) for ax in k_free]
  frees = [("x", ax) for ax in x_free], [("k", ax) for ax in k_free]
  want = [("x", ax) for ax in x_batch] + (frees[0] + frees[1] if position == 1
                                          else frees[1] + frees[0])
  return v.transpose([have.index(label) for label in want])


def _unflatten(v, x, groups, tokens, out_sizes):
  """(*groups, T, *features) back to (*groups, *tokens, *features), keeping the input's
  explicit shardings (on a mesh with explicit axes they cannot be inferred from T)."""
  v = v.reshape(*v.shape[:len(groups) + 1], math.prod(out_sizes) if out_sizes else 1)
  shape = (*(x.shape[ax] for ax in groups + tokens), *out_sizes)
  sharding = jax.typeof(x).sharding
  spec = tuple(getattr(sharding, "spec", ()))
  spec = spec + (None,) * (x.ndim - len(spec))
  lead = tuple(spec[ax] for ax in groups + tokens)
  if not any(lead):
    return v.reshape(shape)
  out = jax.sharding.PartitionSpec(*lead, *(None,) * len(out_sizes))
  return jax.lax.reshape(v, shape, out_sharding=jax.sharding.NamedSharding(sharding.mesh, out))


def _conv_branch(eqn, ins, tag: Tag, f: LoraFactors):
  """s·conv(x, A)·B: A as a convolution with the kernel's window and `rank` outputs."""
  view, (x, _) = tag.view, ins
  numbers = eqn.params["dimension_numbers"]
  out_source = next(iter(view.sources([numbers.rhs_spec[0]])))
  now = _now(tag, f)
  contracting = [tag.axes[i] for i in now.roles.contracting]
  size = dict(zip(tag.axes, tag.kernel.shape, strict=True))

  def branch(x, a, b):
    rank = a.shape[0]
    a_full = a.reshape(rank, *(size[ax] for ax in contracting))
    a_full = jnp.moveaxis(a_full, 0, sum(ax < out_source for ax in contracting))
    a_full = a_full.reshape([rank if ax == out_source else size[ax] for ax in tag.axes])
    a_value = view.apply(a_full, sizes={out_source: rank}).astype(x.dtype)
    u = program.bind(eqn, [x, a_value])[0]
    channel = numbers.out_spec[1]
    u = jnp.moveaxis(u, channel, -1) * jnp.asarray(f.scale, x.dtype)
    return jnp.moveaxis(u @ b.astype(x.dtype), -1, channel)

  x = _dropout(x, tag, f)
  a, b = tag.lora
  if _is_routed(tag, f):
    _check_routed(tag, f, x, eqn)
    return jax.vmap(lambda xi, ai, bi: branch(xi[None], ai, bi)[0])(x, a, b)
  return branch(x, a, b)


def _gather_branch(eqn, ins, tag: Tag, f: LoraFactors):
  """s·Aᵀ[ids]·B for a lookup of whole rows of a 2-D table."""
  view, (_, ids) = tag.view, ins
  numbers = eqn.params["dimension_numbers"]
  row = numbers.collapsed_slice_dims[0]
  feature = 1 - row
  channel = numbers.offset_dims[0]
  a, b = tag.lora
  routed = _is_routed(tag, f)
  if routed:
    _check_routed(tag, f, ids, eqn)
  rank, rows = a.shape[-2], a.shape[-1]
  table = jnp.swapaxes(a, -1, -2)  # (…, rows, rank)
  if routed:  # one table of B·rows rows; example i reads its own block
    table = table.reshape(-1, rank)
    ids = ids + (rows * jnp.arange(ids.shape[0], dtype=ids.dtype)).reshape(
        (-1,) + (1,) * (ids.ndim - 1))
  table = table if row == 0 else table.T
  sizes = list(eqn.params["slice_sizes"])
  sizes[feature] = rank
  params = dict(eqn.params, slice_sizes=tuple(sizes))
  u = eqn.primitive.bind(table.astype(view.dtype), ids, **params)
  u = jnp.moveaxis(u, channel, -1) * jnp.asarray(f.scale, u.dtype)
  q = _to_value_order(b.astype(u.dtype), view, [feature])
  if routed:
    lead = u.shape[:-1]
    v = jax.lax.dot_general(u.reshape(lead[0], -1, rank), q, (((2,), (1,)), ((0,), (0,))))
    v = v.reshape(*lead, -1)
  else:
    v = u @ q
  return jnp.moveaxis(v, -1, channel)


# ----------------------------------------------------------------------------------------------
# The rules.


def _roles_error(path: str, roles: AxisRoles, use: Use) -> ValueError:
  return ValueError(
      f"{path}: the adapter records axis roles with fan_in axes {roles.contracting} and fan_out "
      f"axes {roles.features} for this kernel, but the program's {use.op} contracts its axes "
      f"{sorted(use.contracting)} with the input (a kernel stored (out, in) and used as "
      "x @ w.T has fan_in axis 1). Fix: make the adapter with jlora.init(key, tree, config, "
      "fn, *example_args) so that its roles are read from this program, or state them in "
      "LoraConfig.roles."
  )


@dataclasses.dataclass
class _Factored(program.Rules):
  """Adds the low-rank branch at every factorable use of an adapted kernel."""

  factors: dict[str, LoraFactors]
  warned: set = dataclasses.field(default_factory=set)
  swapped_only: dict = dataclasses.field(default_factory=dict)  # path -> a swapped use, or None

  def check_orientations(self) -> None:
    """A dense kernel that the program only ever contracts over its recorded fan_out axes has
    wrong roles (e.g. an (out, in) kernel taken as (in, out)); outputs would still match the
    merged model, but an export would be transposed. Tied weights, used both ways, are fine."""
    for path, use in self.swapped_only.items():
      if use is not None and self.factors[path].roles.kind != "embed":
        raise _roles_error(path, self.factors[path].roles, use)

  def stacked_axes(self, tag):
    f = self.factors.get(tag.path)
    return f.roles.stacked if f is not None else ()

  def sliced(self, tag, axis, op):
    f = self.factors.get(tag.path)
    return f is None or axis in f.roles.stacked

  def narrow_factors(self, tag, axis, start, stop):
    f = self.factors.get(tag.path)
    if f is None:
      return tag.lora
    a, b = tag.lora
    if axis in f.roles.stacked:
      pos = _remaining_stacked(tag, f).index(axis)
      return tuple(jax.lax.slice_in_dim(x, start, stop, axis=pos) for x in (a, b))
    shape = dict(zip(tag.axes, tag.kernel.shape, strict=True))
    for fan, axes in ((0, f.roles.contracting), (1, f.roles.features)):
      if axis in axes:
        x = tag.lora[fan]
        split = x.reshape(*x.shape[:-1], *(shape[ax] for ax in axes))
        part = jax.lax.slice_in_dim(split, start, stop, axis=x.ndim - 1 + axes.index(axis))
        part = part.reshape(*x.shape[:-1], -1)
        return (part, b) if fan == 0 else (a, part)
    return None

  def use_as_value(self, tag, op="an output"):
    f = self.factors.get(tag.path)
    if f is None:
      return super().use_as_value(tag, op)
    if _is_routed(tag, f):
      raise ValueError(
          f"jlora.wrap: {tag.path} reaches {op}, which has no factored rule, so per-example "
          "(routed) factors cannot be applied to it. Fix: exclude it from the adapters you "
          "route, or serve them one at a time with jlora.select."
      )
    if (tag.path, op) not in self.warned:
      self.warned.add((tag.path, op))
      warnings.warn(
          f"jlora.wrap: {tag.path} is used by {op}, which has no factored rule; that use "
          "computes with W + ΔW, so its update trains through a full weight gradient there.",
          MergedUseWarning, stacklevel=2)
    w = program.dense(tag.kernel)
    merged = (w.astype(jnp.float32) + delta(_now(tag, f))).astype(w.dtype)
    return tag.view.apply(merged)

  def use(self, eqn, invals):
    tagged = [k for k, x in enumerate(invals) if isinstance(x, Tag)]
    if len(tagged) == 1:
      position = tagged[0]
      tag = invals[position]
      found = use_of(eqn, tag, position)
      if found is not None:
        factored = self._factored(eqn, invals, position, tag, found)
        if factored is not None:
          return factored
    return super().use(eqn, invals)

  def _swapped(self, tag: Tag, f: LoraFactors, use: Use) -> bool | None:
    """Whether `use` contracts the kernel's fan_out axes (a tied read-out); None if the use
    batches over other axes than the remaining stacked ones (no factored rule then)."""
    if set(use.batch) != set(_remaining_stacked(tag, f)):
      return None
    ones = {ax for ax, n in enumerate(f.kernel_shape) if n == 1}
    recorded = (set(f.roles.contracting) - ones, set(f.roles.features) - ones)
    if (set(use.contracting), set(use.features)) == recorded:
      self.swapped_only[tag.path] = None
      return False
    if use.kind == "dense" and (set(use.features), set(use.contracting)) == recorded:
      self.swapped_only.setdefault(tag.path, use)
      return True
    raise _roles_error(tag.path, f.roles, use)

  def _factored(self, eqn, ins, position, tag: Tag, use: Use):
    f = self.factors.get(tag.path)
    if f is not None:
      swapped = self._swapped(tag, f, use)
      if swapped is None or swapped and use.kind != "dense":
        return None

    def base(w):
      return program.bind(eqn, [w if k == position else x for k, x in enumerate(ins)])

    if f is None:
      return _with_kernel(tag, base)
    (y,) = _with_kernel(tag, base)  # the model's own op first, as the program orders it
    with jax.named_scope("jlora/low_rank"):
      if use.kind == "dense":
        branch = _dot_branch(eqn, ins, position, tag, f, swapped)
      elif use.kind == "conv":
        branch = _conv_branch(eqn, ins, tag, f)
      else:
        branch = _gather_branch(eqn, ins, tag, f)
    return [program.Sum(y, branch)]  # added after a following bias add, if there is one


# ----------------------------------------------------------------------------------------------
# wrap.


def _dropout_key(key, kwargs: dict):
  """The LoRA dropout key: ``dropout_key=``, or a linen call's ``rngs={"lora_dropout": k}``
  (taken out of the call's rngs)."""
  rngs = kwargs.get("rngs")
  if isinstance(rngs, dict) and DROPOUT_RNG in rngs:
    rest = {k: v for k, v in rngs.items() if k != DROPOUT_RNG}
    if rest:
      kwargs["rngs"] = rest
    else:
      del kwargs["rngs"]
    key = rngs[DROPOUT_RNG] if key is None else key
  if key is not None and not jnp.issubdtype(jnp.result_type(key), jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)
  return key


def _tags(traced: program.Program, adapter: Adapter, key) -> dict[str, Tag]:
  leaves = dict(zip(traced.leaf_paths, traced.leaves, strict=True))
  tags = {p: Tag.of(p, x) for p, x in leaves.items() if not program.is_array(x)}  # quantized
  for i, path in enumerate(sorted(adapter.lora)):
    f = adapter.lora[path]
    lora_key = jax.random.fold_in(key, i) if key is not None and f.dropout else None
    tags[path] = Tag.of(path, leaves[path], (f.a, f.b), lora_key)
  return tags


def wrap(fn: Callable[..., Any] | nnx.GraphDef | nnx.Module, *, method: str = "__call__"):
  """Turns a model's function into one that also takes an adapter, factored.

  `fn` is any JAX function of a parameter tree, ``fn(tree, *args, **kwargs)``: a linen
  ``model.apply`` whatever its layers (Flax's own, a layer with its own param named ``w`` used
  by `jnp.einsum`, a kernel stored (out, in) used as ``x @ w.T``, a tied read-out), a plain
  function of a dict of arrays, or an NNX graphdef or module (run as ``getattr(nnx.merge(
  graphdef, state), method)``). ``jlora.wrap(fn)(tree, adapter, *args, **kwargs)`` equals
  ``fn(jlora.merge(tree, adapter), *args, **kwargs)`` in outputs, and its gradients with
  respect to the adapter are those of the merged model, but no kernel is ever differentiated.

  The update is added at every contraction (`dot_general`, `conv_general_dilated`) and row
  lookup of an adapted kernel, inside `jax.jit`, `scan` (stacked kernels and their factors are
  sliced together), `checkpoint`/remat (same policy), `cond`/`switch` and `while`. Any other use
  computes with W + ΔW for that use only and warns once (`MergedUseWarning`). Adapter kernels
  that the call never uses are allowed. Quantized kernels (`jlora.quantize`) are dequantized in
  the op that uses them and recomputed in the backward pass.

  LoRA dropout is on only when the call gets a key: ``dropout_key=key``, or for linen the
  ``rngs={"lora_dropout": key}`` of ``model.apply``; each kernel (and each layer of a scanned
  stack) gets its own mask.

  Args:
    fn: the model's function, or an NNX graphdef or module.
    method: for NNX, the name of the module method to call.

  Returns:
    A function ``(tree given to jlora.init, adapter, *args, dropout_key=None, **kwargs) ->
    outputs``.

  Raises:
    ValueError: when called, if an adapter path is not in the tree, or its recorded axis roles
      differ from those the program gives the kernel, or routed factors reach an op with no
      factored rule or a batch of another size.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> def mlp(params, x):  # any function of a dict of arrays
    ...   return jnp.tanh(x @ params["w1"]) @ params["w2"].T  # w2 is stored (out, in)
    >>> params = {"w1": jnp.ones((4, 8)) / 4, "w2": jnp.ones((3, 8)) / 8}
    >>> x = jnp.ones((2, 4))
    >>> config = jlora.LoraConfig(rank=2, alpha=4.0, targets="w.")
    >>> adapter = jlora.init(jax.random.key(1), params, config, mlp, x)
    >>> adapter.lora["w2"].roles.contracting  # read from the program: x @ w2.T
    (1,)
    >>> adapter = jax.tree.map(lambda t: t + 0.1, adapter)  # as if trained
    >>> y = jax.jit(jlora.wrap(mlp))(params, adapter, x)
    >>> bool(jnp.allclose(y, mlp(jlora.merge(params, adapter), x), atol=1e-6))
    True
  """
  call = program.as_function(fn, method)

  def lora_apply(tree, adapter: Adapter, *args, dropout_key=None, **kwargs):
    check_fits(tree, adapter)
    kwargs = dict(kwargs)
    key = _dropout_key(dropout_key, kwargs)
    tree = with_extras(tree, adapter)
    traced = program.trace(call, tree, args, kwargs)
    rules = _Factored(dict(adapter.lora))
    out = program.run(traced, _tags(traced, adapter, key), rules)
    rules.check_orientations()
    return out

  return lora_apply
