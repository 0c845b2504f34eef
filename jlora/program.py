"""The program reader: what a function computes from each leaf of its parameter tree.

`trace` turns ``fn(tree, *args, **kwargs)`` into a program with `jax.make_jaxpr`, and
`evaluate` runs that program again, equation by equation, with some leaves replaced by `Tag`s:
a tagged leaf carries its kernel, its low-rank factors and a `View` of the layout ops applied
to it so far. Layout-only ops update the view; every other op that consumes a tag is handed to
a `Rules` object (`jlora.factored` adds the low-rank branch at contractions). Control flow is
entered again through its public APIs (`jax.lax.scan`, `jax.lax.switch`, `jax.lax.while_loop`,
`jax.checkpoint`), with tags passed through them as pytrees, so a scan slices a stacked kernel
and its factors together, and remat keeps its policy.

This is the one module that touches JAX's program representation. It uses `jax.make_jaxpr`,
`jax.extend.core` (Literal) and `Primitive.bind`; `_bind_params` absorbs the one difference
between the JAX versions jlora supports (see `pyproject.toml`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np

from jlora import _tree, quant
from jlora._layout import View

_CALLS = frozenset({"pjit", "jit", "closed_call", "core_call"})
_REMATS = frozenset({"checkpoint", "remat", "remat2"})
_CASTS = frozenset({"convert_element_type"})
_IDENTITIES = frozenset({"copy", "copy_p", "sharding_constraint", "optimization_barrier"})

# ----------------------------------------------------------------------------------------------
# Compatibility.


def _bind_params(primitive, params) -> tuple[Sequence[Any], dict]:
  """(subfuns, params) for `primitive.bind`: older JAX returns both, JAX 0.10 params only."""
  got = primitive.get_bind_params(params)
  if isinstance(got, tuple):
    return got
  return (), got


def bind(eqn, invals: Sequence[Any]) -> list[Any]:
  """Runs one equation of a program on `invals`, as `jax.core.eval_jaxpr` does."""
  subfuns, params = _bind_params(eqn.primitive, eqn.params)
  out = eqn.primitive.bind(*subfuns, *invals, **params)
  return list(out) if eqn.primitive.multiple_results else [out]


def _read(env: dict, var) -> Any:
  return var.val if isinstance(var, jex.Literal) else env[var]


# ----------------------------------------------------------------------------------------------
# Tags.


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Tag:
  """A tagged leaf as the program sees it at one point.

  Attributes:
    kernel: the leaf as given (an array or a quantized kernel), less the stacked axes that were
      sliced away, in the leaf's own axis order.
    lora: ``(a, b)`` factors with the remaining stacked axes leading (and a per-example axis
      after them for routed adapters), or None.
    key: a dropout key for this kernel (one per remaining stacked index once a scan slices
      it), or None.
    path: the leaf's path in the tree.
    view: how the value the program holds derives from `kernel`.
    axes: the leaf's axes still in `kernel` (the others were sliced), in order.
  """

  kernel: Any
  lora: tuple[jax.Array, jax.Array] | None
  key: jax.Array | None
  path: str = dataclasses.field(metadata=dict(static=True))
  view: View = dataclasses.field(metadata=dict(static=True))
  axes: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))

  @classmethod
  def of(cls, path: str, kernel, lora=None, key=None) -> Tag:
    axes = tuple(range(len(kernel.shape)))
    return cls(kernel, lora, key, path, View.of(kernel.shape, kernel.dtype), axes)

  def with_view(self, view: View) -> Tag:
    return dataclasses.replace(self, view=view)


def _index_leading(tree, axis: int, index):
  """Indexes `axis` of every leaf (arrays and quantized kernels alike share leading axes)."""
  return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, index, axis, keepdims=False),
                      tree)


def _moveaxis_leading(tree, axis: int):
  return jax.tree.map(lambda x: jnp.moveaxis(x, axis, 0), tree)


def _stacked_position(tag: Tag, source_axis: int, stacked: tuple[int, ...]) -> int:
  """Where the factors of `tag` keep kernel axis `source_axis`, a stacked axis."""
  remaining = [ax for ax in stacked if ax in tag.axes]
  return remaining.index(source_axis)


# ----------------------------------------------------------------------------------------------
# Rules: what happens when a tag reaches an op that is not layout-only.


class Rules:
  """Decides what the ops that consume tags compute; the base class computes them unchanged."""

  def use_as_value(self, tag: Tag, op: str = "an output") -> Any:
    """The array the program holds for `tag`, for a use with no rule (`op`)."""
    return tag.view.apply(dense(tag.kernel))

  def use(self, eqn, invals: list[Any]) -> list[Any]:
    """Runs `eqn`, some of whose inputs are tags."""
    return bind(eqn, [self.use_as_value(v, eqn.primitive.name) if isinstance(v, Tag) else v
                      for v in invals])

  def stacked_axes(self, tag: Tag) -> tuple[int, ...]:
    """The kernel axes of `tag` that its factors have one slice per index of."""
    return ()

  def sliced(self, tag: Tag, axis: int, op: str) -> bool:
    """Called when the program slices kernel axis `axis` of `tag`; False refuses it (the
    slice is then a use with no rule)."""
    return True

  def narrow_factors(self, tag: Tag, axis: int, start: int, stop: int):
    """`tag.lora` for the part ``[start, stop)`` of kernel axis `axis`, or None."""
    return None


def dense(kernel):
  """The kernel as an array: a quantized kernel is dequantized."""
  return quant.dequantize(kernel) if quant.is_quantized(kernel) else kernel


def can_index(tag: Tag, source: int) -> bool:
  """Whether kernel axis `source` can be indexed in the stored kernel (a quantized kernel
  keeps its blocks along its last axis)."""
  return not quant.is_quantized(tag.kernel) or source != tag.axes[-1]


# ----------------------------------------------------------------------------------------------
# Tracing and evaluation.


@dataclasses.dataclass(frozen=True)
class Program:
  """A traced function: its program and how to feed it.

  Attributes:
    jaxpr: the closed program.
    leaf_paths: paths of the tree leaves that are inputs, in input order.
    leaves: their values.
    arrays: the array leaves of the call's ``(args, kwargs)``, in input order after the tree's.
    out_tree: the structure of the function's output.
  """

  jaxpr: Any
  leaf_paths: tuple[str, ...]
  leaves: tuple[Any, ...]
  arrays: tuple[Any, ...]
  out_tree: Any


def is_array(x) -> bool:
  return isinstance(x, jax.Array | np.ndarray | jax.ShapeDtypeStruct | np.generic)


def abstract(x):
  """An input for `jax.make_jaxpr`: arrays as they are, other leaves with shape and dtype."""
  if is_array(x):
    return x
  return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype)


def _split_arrays(args, kwargs) -> tuple[list, Callable[[Sequence[Any]], tuple]]:
  """The array leaves of (args, kwargs), and how to put (new) arrays back among the rest."""
  leaves, treedef = jax.tree.flatten((args, kwargs))
  mask = [is_array(x) for x in leaves]

  def rebuild(arrays):
    it = iter(arrays)
    return jax.tree.unflatten(treedef, [next(it) if m else x for x, m in zip(leaves, mask,
                                                                             strict=True)])

  return [x for x, m in zip(leaves, mask, strict=True) if m], rebuild


def trace(fn: Callable[..., Any], tree, args, kwargs) -> Program:
  """The program of ``fn(tree, *args, **kwargs)``, with the tree leaves that are arrays (or
  quantized kernels) and the array arguments as inputs; everything else stays a constant."""
  flat = _tree.flatten(tree)
  paths = tuple(p for p, x in flat.items() if hasattr(x, "shape") and hasattr(x, "dtype"))
  arrays, rebuild = _split_arrays(args, kwargs)

  def run(leaves, arrays):
    call_args, call_kwargs = rebuild(arrays)
    return fn(_tree.replace(tree, dict(zip(paths, leaves, strict=True))), *call_args,
              **call_kwargs)

  leaves = tuple(flat[p] for p in paths)
  jaxpr, out_shape = jax.make_jaxpr(run, return_shape=True)(
      [abstract(x) for x in leaves], list(arrays))
  return Program(jaxpr, paths, leaves, tuple(arrays), jax.tree.structure(out_shape))


def run(program: Program, tags: dict[str, Tag], rules: Rules):
  """Evaluates `program` with the leaves in `tags` replaced by them; returns fn's output."""
  inputs = [tags.get(p, x) for p, x in zip(program.leaf_paths, program.leaves, strict=True)]
  outs = evaluate(program.jaxpr.jaxpr, program.jaxpr.consts, [*inputs, *program.arrays], rules)
  return jax.tree.unflatten(program.out_tree, outs)


@dataclasses.dataclass(frozen=True)
class Sum:
  """A value the program holds as ``base + extra`` (an op's output plus a low-rank branch),
  added late: when the next op is an add (a layer's bias), that add comes first, so XLA can
  still fuse the bias into the op's output as it would without LoRA."""

  base: Any
  extra: Any

  def value(self):
    return self.base + self.extra.astype(self.base.dtype)


def _settle(x):
  return x.value() if isinstance(x, Sum) else x


def evaluate(jaxpr, consts, invals, rules: Rules) -> list[Any]:
  """Runs `jaxpr` on `invals` (some of them tags); tags in the outputs are made values."""
  env: dict[Any, Any] = {}
  env.update(zip(jaxpr.constvars, consts, strict=True))
  env.update(zip(jaxpr.invars, invals, strict=True))
  for eqn in jaxpr.eqns:
    ins = [_read(env, v) for v in eqn.invars]
    sums = [k for k, v in enumerate(ins) if isinstance(v, Sum)]
    if len(sums) == 1 and eqn.primitive.name == "add" and not any(isinstance(v, Tag)
                                                                    for v in ins):
      k = sums[0]
      (out,) = bind(eqn, [ins[k].base if i == k else v for i, v in enumerate(ins)])
      outs = [Sum(out, ins[k].extra).value()]
    elif any(isinstance(v, Tag) for v in ins):
      outs = _step(eqn, [_settle(v) for v in ins], rules)
    else:
      outs = bind(eqn, [_settle(v) for v in ins])
    env.update(zip(eqn.outvars, outs, strict=True))
  return [_value(_settle(_read(env, v)), rules) for v in jaxpr.outvars]


def _value(x, rules: Rules, op: str = "an output"):
  return rules.use_as_value(x, op) if isinstance(x, Tag) else x


def _step(eqn, ins: list[Any], rules: Rules) -> list[Any]:
  """One equation that consumes a tag."""
  name, params = eqn.primitive.name, eqn.params
  tag = ins[0]
  if isinstance(tag, Tag):
    view = _layout_step(name, params, tag.view, eqn)
    if view is not None:
      return [tag.with_view(view)]
    if name in ("slice", "dynamic_slice"):
      sliced = _slice_step(eqn, ins, rules)
      if sliced is not None:
        return [sliced]
    if name == "stop_gradient":  # a frozen copy (a reference model): so are its factors
      return [dataclasses.replace(tag, lora=jax.lax.stop_gradient(tag.lora))]
    if name == "split":
      parts = _split_step(eqn, tag, rules)
      if parts is not None:
        return parts
  if name in _CALLS:
    closed = params["jaxpr"]
    return evaluate(closed.jaxpr, closed.consts, ins, rules)
  if name in _REMATS:
    body = params["jaxpr"]
    fn = jax.checkpoint(lambda *xs: evaluate(body, (), list(xs), rules),
                        prevent_cse=params.get("prevent_cse", True), policy=params.get("policy"))
    return list(fn(*ins))
  if name == "scan":
    return _scan(params, ins, rules)
  if name == "cond":
    branches = [lambda *xs, b=b: evaluate(b.jaxpr, b.consts, list(xs), rules)
                for b in params["branches"]]
    return list(jax.lax.switch(ins[0], branches, *ins[1:]))
  if name == "while":
    return _while(params, ins, rules)
  return rules.use(eqn, ins)


def _layout_step(name: str, params, view: View, eqn) -> View | None:
  """The view after a layout-only op, or None if the op is something else."""
  if name in _IDENTITIES:
    return view
  if name in _CASTS:
    return view.astype(params["new_dtype"])
  if name == "transpose":
    return view.transpose(params["permutation"])
  if name == "reshape":
    return view.reshape(eqn.outvars[0].aval.shape)
  if name == "squeeze":
    return view.drop_unit_axes(params["dimensions"])
  if name == "expand_dims":
    return view.insert_unit_axes(params["dimensions"])
  if name == "broadcast_in_dim":
    shape, dims = params["shape"], params["broadcast_dimensions"]
    if len(eqn.invars) == 1 and [shape[d] for d in dims] == list(view.shape):
      return view.insert_unit_axes([i for i in range(len(shape)) if i not in dims]) if all(
          shape[i] == 1 for i in range(len(shape)) if i not in dims) else None
  return None


def _slice_step(eqn, ins, rules: Rules) -> Tag | None:
  """Indexing one stacked kernel axis (``w[i]`` on a stack of layers), or None."""
  tag, view = ins[0], ins[0].view
  shape = view.shape
  if eqn.primitive.name == "slice":
    starts, limits = eqn.params["start_indices"], eqn.params["limit_indices"]
    if eqn.params.get("strides") not in (None, (1,) * len(shape)):
      return None
    sizes = [hi - lo for lo, hi in zip(starts, limits, strict=True)]
    index_of = lambda ax: starts[ax]  # noqa: E731
  else:
    sizes = list(eqn.params["slice_sizes"])
    index_of = lambda ax: ins[1 + ax]  # noqa: E731
  cut = [ax for ax, (n, full) in enumerate(zip(sizes, shape, strict=True)) if n != full]
  if len(cut) != 1:
    return None
  atoms = view.axis_atoms(cut[0])
  if len(atoms) != 1:
    return None
  source = view.atoms[atoms[0]][0]
  if sizes[cut[0]] == 1:
    indexed = slice_source(tag, source, index_of(cut[0]), rules, eqn.primitive.name,
                           keep_axis=True)
    if indexed is not None:
      return indexed
  if eqn.primitive.name != "slice":
    return None
  return narrow(tag, source, index_of(cut[0]), index_of(cut[0]) + sizes[cut[0]], rules)


def _split_step(eqn, tag: Tag, rules: Rules) -> list[Tag] | None:
  """``jnp.split`` of a fused kernel (q|k|v, gate|up) into parts, each a narrowed tag."""
  atoms = tag.view.axis_atoms(eqn.params["axis"])
  if len(atoms) != 1:
    return None
  source, start, parts = tag.view.atoms[atoms[0]][0], 0, []
  for size in eqn.params["sizes"]:
    parts.append(narrow(tag, source, start, start + size, rules))
    start += size
  return None if any(p is None for p in parts) else parts


def narrow(tag: Tag, source: int, start: int, stop: int, rules: Rules) -> Tag | None:
  """`tag` restricted to ``[start, stop)`` of kernel axis `source` (one part of a fused
  kernel), the factor that spans that axis sliced alike; or None."""
  if tag.view.axis_of_source(source) is None or not can_index(tag, source):
    return None
  pos = tag.axes.index(source)
  cut = lambda x, axis: jax.lax.slice_in_dim(x, start, stop, axis=axis)  # noqa: E731
  lora = tag.lora
  if lora is not None:
    lora = rules.narrow_factors(tag, source, start, stop)
    if lora is None:
      return None
  kernel = jax.tree.map(lambda x: cut(x, pos), tag.kernel)
  return dataclasses.replace(tag, kernel=kernel, lora=lora,
                             view=tag.view.resize_source(source, stop - start))


def slice_source(tag: Tag, source: int, index, rules: Rules, op: str, *, keep_axis: bool
                 ) -> Tag | None:
  """`tag` with kernel axis `source` indexed at `index` (factors and keys too), or None."""
  view = tag.view.remove_source(source)
  if view is None or not can_index(tag, source) or not rules.sliced(tag, source, op):
    return None
  if not keep_axis:
    view = view.drop_unit_axes([tag.view.axis_of_source(source)])
  lora, key = tag.lora, tag.key
  if lora is not None:
    pos = _stacked_position(tag, source, rules.stacked_axes(tag))
    lora = _index_leading(lora, pos, index)
    if key is not None:
      key = jax.random.fold_in(key, index) if key.ndim == 0 else _index_leading(key, pos, index)
  kernel = _index_leading(tag.kernel, tag.axes.index(source), index)
  return Tag(kernel, lora, key, tag.path, view, tuple(ax for ax in tag.axes if ax != source))


def _scan_slices(tag: Tag, rules: Rules) -> Tag | None:
  """`tag` prepared as a scan's `xs`: its leading value axis (one stacked kernel axis) moved
  to the front of the kernel, factors and keys, with the view of one slice; or None."""
  atoms = tag.view.axis_atoms(0)
  if len(atoms) != 1:
    return None
  source = tag.view.atoms[atoms[0]][0]
  inner = tag.view.remove_source(source)
  if inner is None or not can_index(tag, source) or not rules.sliced(tag, source, "scan"):
    return None
  lora, key = tag.lora, tag.key
  if lora is not None:
    k = _stacked_position(tag, source, rules.stacked_axes(tag))
    lora = _moveaxis_leading(lora, k)
    if key is not None:
      key = (jax.random.split(key, tag.view.shape[0]) if key.ndim == 0
             else _moveaxis_leading(key, k))
  return Tag(_moveaxis_leading(tag.kernel, tag.axes.index(source)), lora, key, tag.path,
             inner.drop_unit_axes([0]), tuple(ax for ax in tag.axes if ax != source))


def _scan(params, ins, rules: Rules) -> list[Any]:
  closed = params["jaxpr"]
  n_consts, n_carry = params["num_consts"], params["num_carry"]
  consts = ins[:n_consts]
  carry = [_value(x, rules, "a scan carry") for x in ins[n_consts:n_consts + n_carry]]
  xs = []
  for x in ins[n_consts + n_carry:]:
    if isinstance(x, Tag):
      x = _scan_slices(x, rules) or rules.use_as_value(x, "scan")
    xs.append(x)

  def body(c, x):
    outs = evaluate(closed.jaxpr, closed.consts, [*consts, *c, *x], rules)
    return outs[:n_carry], outs[n_carry:]

  carry, ys = jax.lax.scan(body, carry, xs, length=params["length"], reverse=params["reverse"],
                           unroll=params["unroll"])
  return [*carry, *ys]


def _while(params, ins, rules: Rules) -> list[Any]:
  cond, body = params["cond_jaxpr"], params["body_jaxpr"]
  n_cond, n_body = params["cond_nconsts"], params["body_nconsts"]
  cond_consts, body_consts = ins[:n_cond], ins[n_cond:n_cond + n_body]
  init = [_value(x, rules, "a while_loop carry") for x in ins[n_cond + n_body:]]
  out = jax.lax.while_loop(
      lambda c: evaluate(cond.jaxpr, cond.consts, [*cond_consts, *c], rules)[0],
      lambda c: evaluate(body.jaxpr, body.consts, [*body_consts, *c], rules),
      init)
  return list(out)


def as_function(model, method: str = "__call__") -> Callable[..., Any]:
  """``fn(tree, *args, **kwargs)`` for a model: a function as it is; an NNX module or graphdef
  as ``getattr(nnx.merge(graphdef, state), method)(*args, **kwargs)``."""
  from flax import nnx  # noqa: PLC0415

  if isinstance(model, nnx.Module):
    model = nnx.graphdef(model)
  if not isinstance(model, nnx.GraphDef):
    return model
  graphdef = model

  def apply(state, *args, **kwargs):
    return getattr(nnx.merge(graphdef, state), method)(*args, **kwargs)

  return apply
