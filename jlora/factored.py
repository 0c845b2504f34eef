"""`wrap`: run a Flax model with an adapter, without ever differentiating its kernels.

Every adapted contraction computes y = x·W + s·((x·Aᵀ)·B): the module's own x·W, plus the
low-rank branch with its input flattened to (tokens, fan_in) and A stored as (rank, fan_in), so
no adapter dot contracts two batch axes or needs a transposed copy (DESIGN.md §4). Autodiff
then adds only rank-r products to the backward pass: dx gains s·(g·Bᵀ)·A, dA = s·(g·Bᵀ)ᵀ·x and
dB = s·(x·Aᵀ)ᵀ·g. W is never a differentiated argument, so no (fan_in × fan_out) weight gradient
is formed. (A merged forward x·(W + s·AᵀB) inside a custom VJP measured 1.13× the no-weight-
gradient floor on the benchmark against 1.08× for this form, so jlora keeps the one path.)

Linen models are intercepted with the public `flax.linen.intercept_methods`; the factors travel
inside the variables, beside their kernel (``kernel_lora_a``, ``kernel_lora_b``), so lifted
transforms such as `nn.scan` and `nn.remat` slice and carry them like the kernel itself. NNX
models are run through `nnx.merge` with the public injection points of their layers
(``dot_general``, ``einsum_op``, ``conv_general_dilated``) set on the fresh copy.
"""

from __future__ import annotations

import contextvars
import functools
import string
import warnings
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx, traverse_util
from flax.core import unfreeze

from jlora.adapter import Adapter, LoraFactors
from jlora.merge import check_fits, merge
from jlora.roles import (
    as_tuple,
    einsum_spec,
    eval_shape,
    kernel_name,
    linen_roles,
    module_path,
    nnx_roles,
)

_LINEN_MODULES = (nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Conv, nn.Embed)
_A, _B = "_lora_a", "_lora_b"
_DN = (((1,), (1,)), ((), ()))  # (T, n) x (r, n) -> (T, r): contract the last axes of both
DROPOUT_RNG = "lora_dropout"
_BYPASS = contextvars.ContextVar("jlora_bypass", default=False)


# ----------------------------------------------------------------------------------------------
# The factored products, shared by linen and NNX.


def _dropout(x, keep):
  if keep is None:
    return x
  rate, key = keep
  mask = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(mask, x / (1.0 - rate), jnp.zeros_like(x))


def _per_example(branch, x, a, b):
  """`branch(x, a, b)`, or, for per-example factors (a leading batch axis on a and b, as
  `jlora.route` makes), each example of x through its own factors: a batched contraction."""
  if a.ndim == 2:
    return branch(x, a, b)
  return jax.vmap(lambda xi, ai, bi: branch(xi[None], ai, bi)[0])(x, a, b)


def _unflatten(y2, moved, n: int, out_dims):
  """(tokens, fan_out) back to moved's batch axes + `out_dims`, keeping explicit shardings.

  On a mesh with explicit axes, the batch axes' partitioning cannot be inferred from the
  flattened tokens axis, so it is stated; on automatic meshes XLA propagates it.
  """
  shape = moved.shape[:-n] + tuple(out_dims)
  sharding = jax.typeof(moved).sharding
  lead = tuple(getattr(sharding, "spec", ()))[: moved.ndim - n]
  if not any(lead):
    return y2.reshape(shape)
  spec = jax.sharding.PartitionSpec(*lead, *(None,) * len(out_dims))
  return jax.lax.reshape(y2, shape, out_sharding=jax.sharding.NamedSharding(sharding.mesh, spec))


def _dense_branch(in_axes, out_dims, scale):
  """x -> s·((x·Aᵀ)·B) with the contracted axes flattened: the LoRA input is (tokens, fan_in)."""

  def branch(x, a, b):
    n = len(in_axes)
    moved = jnp.moveaxis(x, tuple(ax % x.ndim for ax in in_axes), tuple(range(x.ndim - n,
                                                                             x.ndim)))
    x2 = moved.reshape(-1, a.shape[-1])
    u = jax.lax.dot_general(x2, a.astype(x.dtype), _DN) * jnp.asarray(scale, x.dtype)
    return _unflatten(u @ b.astype(x.dtype), moved, n, out_dims)

  return branch


def dense_product(x, in_axes, kernel, a, b, factors: LoraFactors, base, *, keep=None):
  """base + s·(x·Aᵀ)·B for a kernel whose contracted axes lead, output in DenseGeneral layout.

  `base` is the module's own x·W (with bias).
  """
  out_dims = kernel.shape[len(in_axes):]
  in_axes = tuple(ax % x.ndim - x.ndim for ax in in_axes)  # negative: valid per example too
  with jax.named_scope("jlora/low_rank"):
    branch = _dense_branch(in_axes, out_dims, factors.scale)
    return base + _per_example(branch, _dropout(x, keep), a, b).astype(base.dtype)


def einsum_product(spec: str, x, kernel_shape, a, b, factors: LoraFactors, base, *, keep=None):
  """y + s·(x·Aᵀ)·B for an Einsum kernel, with A and B reshaped to the kernel's axes."""
  ins, out = spec.replace(" ", "").split("->")
  x_letters, k_letters = ins.split(",")
  r = next(c for c in string.ascii_letters if c not in spec)
  contracted = "".join(c for c in k_letters if c in x_letters)
  features = "".join(c for c in k_letters if c in out)
  kept = "".join(c for c in x_letters if c in out)
  sizes = dict(zip(k_letters, kernel_shape, strict=True))

  def branch(x, a, b):
    a_full = a.astype(x.dtype).reshape((a.shape[0], *(sizes[c] for c in contracted)))
    b_full = b.astype(x.dtype).reshape((b.shape[0], *(sizes[c] for c in features)))
    u = jnp.einsum(f"{x_letters},{r}{contracted}->{kept}{r}", x, a_full) * factors.scale
    return jnp.einsum(f"{kept}{r},{r}{features}->{out}", u, b_full)

  with jax.named_scope("jlora/low_rank"):
    return base + _per_example(branch, _dropout(x, keep), a, b).astype(base.dtype)


def _conv_branch(conv_a: Callable, kernel_shape, scale):
  """x -> s·conv(x, A)·B: A as a conv with the base window and `rank` features, B as a 1×1."""

  def branch(x, a, b):
    u = conv_a(x, a.astype(x.dtype).T.reshape((*kernel_shape[:-1], a.shape[0])))
    v = u.reshape(-1, u.shape[-1]) @ (b.astype(x.dtype) * scale)
    return v.reshape((*u.shape[:-1], b.shape[-1]))

  return branch


def _embed_branch(dtype, scale):
  def branch(ids, a, b):
    u = jnp.take(a.T, ids, axis=0).astype(dtype) * scale
    return (u.reshape(-1, a.shape[0]) @ b.astype(dtype)).reshape((*ids.shape, b.shape[-1]))

  return branch


def _attend_branch(scale):
  def branch(q, a, b):
    u = jax.lax.dot_general(q.reshape(-1, q.shape[-1]), b.astype(q.dtype), _DN) * scale
    return (u @ a.astype(q.dtype)).reshape((*q.shape[:-1], a.shape[-1]))

  return branch


# ----------------------------------------------------------------------------------------------
# Checks and fallbacks.


def _check_roles(path: str, expected, factors: LoraFactors) -> None:
  recorded = factors.roles.unstacked()
  if expected is not None and (expected.kind, expected.contracting, expected.features) != (
      recorded.kind, recorded.contracting, recorded.features):
    raise ValueError(
        f"{path}: the adapter records axis roles {recorded} for one layer's kernel, but the "
        f"module that uses it contracts {expected}. Fix: make the adapter with "
        "jlora.init(key, variables, config, model.apply, x) for this model."
    )


def _warn_fallback(paths) -> None:
  warnings.warn(
      f"jlora.wrap: no factored rule for {', '.join(sorted(paths))}; these kernels are merged "
      "(W + s·AᵀB), so their updates train through a full weight gradient.",
      stacklevel=3,
  )


# ----------------------------------------------------------------------------------------------
# Linen.


def _inject(variables, adapter: Adapter):
  """The variables with each kernel's factors beside it, stacked axes where the kernel has them."""
  flat = traverse_util.flatten_dict(unfreeze(variables), sep="/")
  for path, factors in adapter.lora.items():
    stacked = factors.roles.stacked
    positions = tuple(range(len(stacked)))
    flat[path + _A] = jnp.moveaxis(factors.a, positions, stacked)
    flat[path + _B] = jnp.moveaxis(factors.b, positions, stacked)
  return traverse_util.unflatten_dict(flat, sep="/")


def _linen_dropout(module, factors: LoraFactors):
  if factors.dropout and module.has_rng(DROPOUT_RNG):
    return factors.dropout, module.make_rng(DROPOUT_RNG)
  return None


def _has_rule(module, method: str) -> bool:
  """Whether a factored rule computes exactly what this module's `method` does.

  Subclasses that override the method, and masked convolutions (no low-rank form of
  (W + s·AᵀB)·mask), are left to the merged fallback.
  """
  if _BYPASS.get() or method not in ("__call__", "attend"):
    return False
  for base in _LINEN_MODULES:
    if isinstance(module, base):
      own = getattr(type(module), method, None)
      return own is not None and own is getattr(base, method, None) and getattr(
          module, "mask", None) is None
  return False


def _linen_rule(module, method: str, args, kwargs, next_fun, factors: LoraFactors, path: str):
  name = kernel_name(module)
  kernel = module.get_variable("params", name)
  spec = einsum_spec(module, args, kwargs) if isinstance(module, nn.Einsum) else None
  _check_roles(path, linen_roles(module, kernel.ndim, path, spec), factors)
  a, b = module.get_variable("params", name + _A), module.get_variable("params", name + _B)
  x = args[0] if args else kwargs["query" if method == "attend" else "inputs"]
  if isinstance(module, nn.Embed):
    y = next_fun(*args, **kwargs)
    branch = _attend_branch(factors.scale) if method == "attend" else _embed_branch(
        y.dtype, factors.scale)
    with jax.named_scope("jlora/low_rank"):
      return y + _per_example(branch, x, a, b).astype(y.dtype)
  keep = _linen_dropout(module, factors)
  if isinstance(module, nn.Einsum):
    return einsum_product(spec, x, kernel.shape, a, b, factors, next_fun(*args, **kwargs),
                          keep=keep)
  if isinstance(module, nn.Conv):
    y = next_fun(*args, **kwargs)
    conv_a = module.clone(parent=None, features=a.shape[-2], use_bias=False)

    def apply_a(x, k):
      token = _BYPASS.set(True)  # the rank-r helper conv is not itself adapted
      try:
        return conv_a.apply({"params": {"kernel": k}}, x)
      finally:
        _BYPASS.reset(token)

    with jax.named_scope("jlora/low_rank"):
      branch = _conv_branch(apply_a, kernel.shape, factors.scale)
      return y + _per_example(branch, _dropout(x, keep), a, b).astype(y.dtype)
  axes = as_tuple(module.axis) if isinstance(module, nn.DenseGeneral) else (-1,)
  in_axes = tuple(sorted(ax % x.ndim for ax in axes))  # DenseGeneral sorts its axes too
  return dense_product(x, in_axes, kernel, a, b, factors, next_fun(*args, **kwargs), keep=keep)


def _linen_interceptor(adapter: Adapter, seen: dict[str, bool]):
  def intercept(next_fun, args, kwargs, context):
    module = context.module
    method = context.method_name
    if _has_rule(module, method):
      path = module_path(module)
      factors = adapter.lora.get(path)
      if factors is not None:
        seen[path] = True
        return _linen_rule(module, method, args, kwargs, next_fun, factors, path)
    for name in ("kernel", "embedding"):
      path = "/".join(("params", *module.path, name))
      if path in adapter.lora:
        seen.setdefault(path, False)
    return next_fun(*args, **kwargs)

  return intercept


def _without(adapter: Adapter, paths) -> Adapter:
  return Adapter(lora={p: f for p, f in adapter.lora.items() if p not in paths},
                 extras=adapter.extras)


def _only(adapter: Adapter, paths) -> Adapter:
  return Adapter(lora={p: adapter.lora[p] for p in paths}, extras=adapter.extras)


def _unused_error(paths) -> ValueError:
  return ValueError(
      f"jlora.wrap: the adapter's kernels {', '.join(sorted(paths))} are not used by any module "
      "when the model runs. Fix: make the adapter for this model and pass the tree given to "
      "jlora.init (for model.apply, the variables dict {'params': ...})."
  )


def _classify(apply_fn, variables, adapter, args, kwargs) -> tuple[set, set]:
  """Runs the model abstractly: which adapter paths have a factored rule, which need merging."""
  seen: dict[str, bool] = {}
  with nn.intercept_methods(_linen_interceptor(adapter, seen)):
    eval_shape(apply_fn, _inject(variables, adapter), *args, **kwargs)
  unused = set(adapter.lora) - set(seen)
  if unused:
    raise _unused_error(unused)
  return {p for p, ok in seen.items() if ok}, {p for p, ok in seen.items() if not ok}


def _check_fallback(adapter: Adapter, fallback) -> None:
  routed = [p for p in fallback
            if adapter.lora[p].a.ndim != len(adapter.lora[p].roles.stacked) + 2]
  if routed:
    raise ValueError(
        f"jlora.wrap: {', '.join(sorted(routed))} has no factored rule, so per-example "
        "(routed) factors cannot be applied to it. Fix: exclude it from the adapters you route."
    )
  if fallback:
    _warn_fallback(fallback)


def _wrap_linen(apply_fn: Callable[..., Any]):
  @functools.wraps(apply_fn)
  def lora_apply(variables, adapter: Adapter, *args, **kwargs):
    check_fits(variables, adapter)
    _, fallback = _classify(apply_fn, variables, adapter, args, kwargs)
    _check_fallback(adapter, fallback)
    variables = merge(variables, _only(adapter, fallback))  # also sets the trained extras
    adapter = _without(adapter, fallback)
    with nn.intercept_methods(_linen_interceptor(adapter, {})):
      return apply_fn(_inject(variables, adapter), *args, **kwargs)

  return lora_apply


# ----------------------------------------------------------------------------------------------
# NNX.


class _LoraOp:
  """A replacement for an NNX layer's injected op that adds the low-rank update."""

  def __init__(self, base, path: str, factors: LoraFactors, keep, ran: set):
    self.base, self.path, self.factors, self.keep, self.ran = base, path, factors, keep, ran


class _LoraDotGeneral(_LoraOp):
  def __call__(self, x, kernel, dimension_numbers, precision=None, **kwargs):
    self.ran.add(self.path)
    (x_axes, _), _ = dimension_numbers
    f = self.factors
    base = self.base(x, kernel, dimension_numbers, precision=precision, **kwargs)
    return dense_product(x, x_axes, kernel, f.a, f.b, f, base, keep=self.keep)


class _LoraEinsum(_LoraOp):
  def __call__(self, spec, x, kernel, **kwargs):
    self.ran.add(self.path)
    f = self.factors
    return einsum_product(spec, x, kernel.shape, f.a, f.b, f,
                          self.base(spec, x, kernel, **kwargs), keep=self.keep)


class _LoraConv(_LoraOp):
  def __call__(self, x, kernel, *args, **kwargs):
    self.ran.add(self.path)
    f = self.factors
    apply_a = lambda x, k: self.base(x, k, *args, **kwargs)  # noqa: E731
    y = self.base(x, kernel, *args, **kwargs)
    branch = _conv_branch(apply_a, kernel.shape, f.scale)
    with jax.named_scope("jlora/low_rank"):
      return y + _per_example(branch, _dropout(x, self.keep), f.a, f.b).astype(y.dtype)


def _nnx_has_rule(module, factors: LoraFactors) -> bool:
  """Whether the layer has an injection point that computes the factored update exactly."""
  if factors.roles.stacked or getattr(module, "mask", None) is not None:
    return False
  if isinstance(module, nnx.Linear | nnx.LinearGeneral):
    return getattr(module, "dot_general_cls", None) is None  # else Flax ignores `dot_general`
  return isinstance(module, nnx.Einsum | nnx.Conv)


def _patch_nnx(module, path: str, factors: LoraFactors, keep, ran: set) -> None:
  """Sets the LoRA op on the injection point of a layer for which `_nnx_has_rule` holds."""
  if isinstance(module, nnx.Linear | nnx.LinearGeneral):
    base = module.dot_general or jax.lax.dot_general
    module.dot_general = _LoraDotGeneral(base, path, factors, keep, ran)
  elif isinstance(module, nnx.Einsum):
    module.einsum_op = _LoraEinsum(module.einsum_op, path, factors, keep, ran)
  else:
    module.conv_general_dilated = _LoraConv(module.conv_general_dilated, path, factors, keep,
                                            ran)


def _nnx_layers(model, adapter: Adapter) -> dict:
  """{adapter path: the layer that owns that kernel}, checking each layer's axis roles."""
  modules = {"/".join(map(str, p)): m for p, m in nnx.iter_graph(model)
             if isinstance(m, nnx.Module)}
  layers = {}
  for path, factors in adapter.lora.items():
    module_key, _, name = path.rpartition("/")
    module = modules.get(module_key)
    if module is None or kernel_name(module) != name:
      raise _unused_error([path])
    inner = getattr(module, name)[...].shape[len(factors.roles.stacked):]
    _check_roles(path, nnx_roles(module, len(inner), path), factors)
    layers[path] = module
  return layers


def _wrap_nnx(graphdef, method: str):
  def lora_apply(state, adapter: Adapter, *args, dropout_key: jax.Array | None = None, **kwargs):
    check_fits(state, adapter)
    model = nnx.merge(graphdef, merge(state, Adapter(lora={}, extras=adapter.extras)))
    layers = _nnx_layers(model, adapter)
    fallback = {p for p, m in layers.items() if not _nnx_has_rule(m, adapter.lora[p])}
    _check_fallback(adapter, fallback)
    if fallback:  # a fresh copy: the caller's state is never written
      model = nnx.merge(graphdef, merge(state, _only(adapter, fallback)))
      layers = _nnx_layers(model, adapter)
    ran: set[str] = set()
    for i, (path, factors) in enumerate(sorted(adapter.lora.items())):
      if path in fallback:
        continue
      keep = None
      if dropout_key is not None and factors.dropout:
        keep = (factors.dropout, jax.random.fold_in(dropout_key, i))
      _patch_nnx(layers[path], path, factors, keep, ran)
    out = getattr(model, method)(*args, **kwargs)
    unused = set(adapter.lora) - fallback - ran
    if unused:
      raise _unused_error(unused)
    return out

  return lora_apply


def wrap(apply_fn: Callable[..., Any] | nnx.GraphDef | nnx.Module, *, method: str = "__call__"):
  """Turns a model's apply function into one that also takes an adapter, factored.

  For linen, `jlora.wrap(model.apply)(variables, adapter, *args, **kwargs)` equals
  `model.apply(jlora.merge(variables, adapter), *args, **kwargs)` in outputs, and its
  gradients with respect to the adapter are those of the merged model, but no kernel is ever
  differentiated. LoRA dropout is on only when the call gets a ``"lora_dropout"`` rng
  (`rngs={"lora_dropout": key}`); nn.scan users add that name to ``split_rngs`` for
  per-layer masks.

  For NNX, pass the graphdef (or the module): `jlora.wrap(graphdef)(state, adapter, *args,
  dropout_key=None, **kwargs)` runs `nnx.merge(graphdef, state)` with the update added to each
  adapted Linear, LinearGeneral, Einsum and Conv.

  Kernels whose module has no factored rule (a custom module, a subclass that overrides
  ``__call__``, a masked Conv, NNX Embed, stacked NNX layers) are merged instead, with a
  warning naming them. A kernel read outside its own module (e.g. tied weights taken from
  ``module.variables``) is not seen by the interception: use it through the module (as
  ``nn.Embed.attend`` does) or give it no adapter.

  Args:
    apply_fn: a linen ``model.apply``, or an NNX graphdef or module.
    method: for NNX, the name of the module method to call.

  Returns:
    A function ``(tree given to jlora.init, adapter, *args, **kwargs) -> outputs``.

  Raises:
    ValueError: when called, if an adapter path is not in the tree, is used by no module, or
      its recorded axis roles differ from those of the module that uses it.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jlora
    >>> model = nn.Dense(3)
    >>> x = jnp.ones((2, 4))
    >>> variables = model.init(jax.random.key(0), x)
    >>> config = jlora.LoraConfig(rank=2, alpha=4.0, targets=".*kernel")
    >>> adapter = jlora.init(jax.random.key(1), variables, config)
    >>> y = jax.jit(jlora.wrap(model.apply))(variables, adapter, x)
    >>> bool(jnp.allclose(y, model.apply(jlora.merge(variables, adapter), x)))
    True
  """
  if isinstance(apply_fn, nnx.Module):
    apply_fn = nnx.graphdef(apply_fn)
  if isinstance(apply_fn, nnx.GraphDef):
    return _wrap_nnx(apply_fn, method)
  return _wrap_linen(apply_fn)
