"""Many adapters on one frozen base: `stack`, `select` and `route`.

* `stack` puts K adapters of one base into one `AdapterStack`: each factor gets a leading
  adapter axis, ranks are zero-padded to the largest, and each adapter's scale (α/r or α/√r)
  is folded into its B, so adapters of any rank and alpha share one shape.
* `select` takes adapter i out as an ordinary `Adapter` (i may be traced: hot-swap inside one
  compiled function); `route` gives every example of a batch its own adapter (mixed batches,
  served or trained in one step); both read index -1 as "no adapter", the base model.

Mixing adapters into one (`combine`, `truncate`) lives in `jlora.combine`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jlora import validate
from jlora.adapter import Adapter, LoraFactors

_HIGHEST = jax.lax.Precision.HIGHEST


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AdapterStack:
  """K adapters of one base in one pytree: every leaf has a leading adapter axis of size K.

  Made by `jlora.stack`; read with `jlora.select` and `jlora.route`. Each `LoraFactors` holds
  ``a`` of shape ``(K, *stacked, rank, fan_in)`` and ``b`` of shape ``(K, *stacked, rank,
  fan_out)``, rank the largest of the K (smaller ones zero-padded), and ``scale`` 1.0: adapter
  k's own scale is folded into ``b[k]``. `merge` and `wrap` do not take a stack; select or
  route it first.

  Attributes:
    lora: ``{path: LoraFactors}`` with the leading adapter axis.
    extras: ``{path: array}`` of shape ``(K, *leaf shape)``.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"fc": {"kernel": jnp.ones((4, 3))}}
    >>> make = lambda r: jlora.init(jax.random.key(r), params,
    ...                             jlora.LoraConfig(rank=r, alpha=1.0, targets="fc/kernel"))
    >>> stacked = jlora.stack([make(1), make(2)])
    >>> stacked.size, stacked.lora["fc/kernel"].a.shape
    (2, (2, 2, 4))
  """

  lora: dict[str, LoraFactors]
  extras: dict[str, jax.Array] = dataclasses.field(default_factory=dict)

  @property
  def size(self) -> int:
    """K, the number of adapters in the stack."""
    return jax.tree.leaves(self)[0].shape[0]


# ----------------------------------------------------------------------------------------------
# Checks.


def _check_adapters(where: str, adapters) -> list[Adapter]:
  if isinstance(adapters, Adapter | AdapterStack) or not isinstance(adapters, Sequence):
    raise TypeError(
        f"{where}: expected a list of jlora.Adapter, got {type(adapters).__name__}. Fix: pass "
        "[adapter_0, adapter_1, ...] (for a stack, jlora.select each adapter out first)."
    )
  if not adapters:
    raise ValueError(f"{where}: got an empty list of adapters. Fix: pass at least one.")
  for i, adapter in enumerate(adapters):
    if not isinstance(adapter, Adapter):
      raise TypeError(f"{where}: adapters[{i}] is a {type(adapter).__name__}, not a "
                      "jlora.Adapter. Fix: pass what jlora.init, select or combine returned.")
    validate.check_not_routed(adapter, where=f"{where}: adapters[{i}]")
    for path, f in adapter.lora.items():
      validate.check_factors(path, f)
  return list(adapters)


def _layout(f: LoraFactors):
  return f.roles, f.kernel_shape, f.a.shape[-1], f.b.shape[-1]


def _same_base(where: str, adapters: list[Adapter], allow_subsets: bool) -> dict[str, tuple]:
  """{path: (roles, kernel_shape, dropout)} shared by all adapters; raises naming the path."""
  first: dict[str, tuple[int, LoraFactors]] = {}
  for i, adapter in enumerate(adapters):
    for path, f in adapter.lora.items():
      j, g = first.setdefault(path, (i, f))
      if _layout(f) != _layout(g):
        raise ValueError(
            f"{where}: adapters[{j}] and adapters[{i}] differ at {path!r}: kernel "
            f"{g.kernel_shape} with {g.roles} vs kernel {f.kernel_shape} with {f.roles}. "
            "Fix: use adapters made for the same base model (same jlora.init model and params)."
        )
      if f.dropout != g.dropout:
        raise ValueError(
            f"{where}: adapters[{j}] and adapters[{i}] have LoRA dropout {g.dropout} and "
            f"{f.dropout} at {path!r}; one stack has one dropout rate. Fix: make them with the "
            "same LoraConfig.dropout, or dataclasses.replace the factors' dropout."
        )
  for i, adapter in enumerate(adapters):
    missing = sorted(set(first) - set(adapter.lora))
    if missing and not allow_subsets:
      j = first[missing[0]][0]
      raise ValueError(
          f"{where}: adapters[{i}] has no update for {missing[0]!r}, which adapters[{j}] "
          f"adapts ({len(missing)} such path(s)). Fix: use adapters made with the same "
          "LoraConfig.targets, or pass allow_subsets=True to give an adapter zero factors (no "
          "update) where it lacks a target."
      )
  _same_extras(where, adapters)
  return {path: (f.roles, f.kernel_shape, f.dropout) for path, (_, f) in first.items()}


def _same_extras(where: str, adapters: list[Adapter]) -> None:
  ref = {path: tuple(x.shape) for path, x in adapters[0].extras.items()}
  for i, adapter in enumerate(adapters[1:], 1):
    got = {path: tuple(x.shape) for path, x in adapter.extras.items()}
    if got != ref:
      path = sorted(set(got).symmetric_difference(ref) or
                    (p for p in got if got[p] != ref[p]))[0]
      raise ValueError(
          f"{where}: adapters[0] and adapters[{i}] differ in their trained extra leaves at "
          f"{path!r} (extras {sorted(ref)} vs {sorted(got)}). An extra is a whole value, so "
          "there is no zero to fill in. Fix: make the adapters with the same "
          "LoraConfig.trainable."
      )


def _check_stack(where: str, stacked) -> None:
  if not isinstance(stacked, AdapterStack):
    raise TypeError(f"{where}: expected a jlora.AdapterStack, got {type(stacked).__name__}. "
                    "Fix: build one with jlora.stack([adapter_0, adapter_1, ...]).")


def _check_index(where: str, index, size: int, name: str):
  """(`index` as an int32 array, its NumPy value or None if traced); concrete: in [-1, size)."""
  if isinstance(index, list | tuple):
    index = np.asarray(index) if len(index) else np.zeros((0,), np.int32)
  dtype = jnp.result_type(index)
  if not jnp.issubdtype(dtype, jnp.integer):
    raise TypeError(f"{where}: {name} must have an integer dtype, got {dtype}. Fix: pass "
                    "adapter indices as ints, -1 for the base model.")
  try:
    concrete = np.asarray(index)
  except jax.errors.TracerArrayConversionError:
    return jnp.asarray(index, jnp.int32), None
  bad = concrete[(concrete < -1) | (concrete >= size)]
  if bad.size:
    raise ValueError(f"{where}: {name} must lie in [-1, {size}) for a stack of {size} "
                     f"adapters (-1 is the base model); got {bad.ravel()[:8].tolist()}. Fix: "
                     "pass valid adapter indices.")
  return jnp.asarray(index, jnp.int32), concrete


# ----------------------------------------------------------------------------------------------
# stack, select, route.


def _pad_rank(x: jax.Array, rank: int) -> jax.Array:
  pad = [(0, 0)] * x.ndim
  pad[-2] = (0, rank - x.shape[-2])
  return jnp.pad(x, pad)


@functools.partial(jax.jit, static_argnums=(1, 3))
def _padded(x: jax.Array, rank: int, scale, dtype) -> jax.Array:
  """(x·scale).astype(dtype), zero-padded to `rank` rows; one compiled op per shape."""
  return _pad_rank((x * scale).astype(dtype), rank)


def _stack_factors(fs: list[LoraFactors | None], roles, kernel_shape, dropout) -> LoraFactors:
  present = [f for f in fs if f is not None]
  rank = max(f.rank for f in present)
  dtype = jnp.result_type(*(x for f in present for x in (f.a, f.b)))
  stacked = present[0].a.shape[:-2]
  fan_in, fan_out = present[0].a.shape[-1], present[0].b.shape[-1]
  a = [jnp.zeros((*stacked, rank, fan_in), dtype) if f is None
       else _padded(f.a, rank, 1, dtype) for f in fs]
  b = [jnp.zeros((*stacked, rank, fan_out), dtype) if f is None
       else _padded(f.b, rank, f.scale, dtype) for f in fs]
  return LoraFactors(a=jnp.stack(a), b=jnp.stack(b), scale=1.0, roles=roles,
                     kernel_shape=kernel_shape, dropout=dropout)


def stack(adapters: Sequence[Adapter], *, allow_subsets: bool = False) -> AdapterStack:
  """Stacks K adapters of one base into one pytree with a leading adapter axis.

  Ranks are zero-padded to the largest at each path, and adapter k's scale is folded into its
  B (``b[k] = s_k·B_k``, scale 1.0), so adapters of different ranks, alphas and rsLoRA
  settings share one shape: a compiled function that takes the stack serves all of them. The
  padding adds zero rows only, so each adapter's update ΔW is unchanged.

  Training a stack (mixed batches through `route`) trains the folded B: its gradient is that
  of the unfolded B divided by s, so with Adam give B s times the learning rate to keep the
  dynamics of the adapters trained alone. `stack` runs under `jax.jit` too; for many adapters
  of different ranks, ``jax.jit(jlora.stack)(adapters)`` compiles once instead of dispatching
  small ops per adapter and path.

  Args:
    adapters: adapters made for the same base (same paths, kernel shapes and axis roles).
    allow_subsets: if True, an adapter without a path that others adapt gets zero factors
      there (no update). Trained extra leaves must still be the same in every adapter.

  Returns:
    An `AdapterStack` of size K = len(adapters).

  Raises:
    TypeError: if `adapters` is not a list of `Adapter`.
    ValueError: naming the path, if adapters differ in kernel shape, axis roles or LoRA
      dropout there, lack a path (without `allow_subsets`), or differ in their extras.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"fc": {"kernel": jnp.ones((8, 4))}}
    >>> a1 = jlora.init(jax.random.key(1), params,
    ...                 jlora.LoraConfig(rank=2, alpha=4.0, targets="fc/kernel"))
    >>> a2 = jlora.init(jax.random.key(2), params,
    ...                 jlora.LoraConfig(rank=4, alpha=1.0, targets="fc/kernel"))
    >>> stacked = jlora.stack([a1, a2])
    >>> f = stacked.lora["fc/kernel"]
    >>> f.a.shape, f.b.shape, f.scale
    ((2, 4, 8), (2, 4, 4), 1.0)
  """
  adapters = _check_adapters("jlora.stack", adapters)
  layout = _same_base("jlora.stack", adapters, allow_subsets)
  lora = {path: _stack_factors([a.lora.get(path) for a in adapters], *meta)
          for path, meta in layout.items()}
  extras = {path: jnp.stack([a.extras[path] for a in adapters]) for path in adapters[0].extras}
  return AdapterStack(lora=lora, extras=extras)


def _take(x: jax.Array, index: jax.Array) -> jax.Array:
  """x[index] along the leading axis, zeros where index lies outside [0, len(x))."""
  valid = (index >= 0) & (index < x.shape[0])
  picked = jnp.take(x, jnp.clip(index, 0, x.shape[0] - 1), axis=0)
  return jnp.where(valid.reshape(valid.shape + (1,) * (x.ndim - 1)), picked,
                   jnp.zeros((), x.dtype))


def select(stacked: AdapterStack, index: jax.typing.ArrayLike) -> Adapter:
  """Adapter `index` of a stack, as an ordinary `Adapter` (hot-swap).

  `index` may be traced: one compiled function that takes the stack and an index serves every
  adapter in it without retracing. Index -1 gives zero factors, the base model. The result
  has the stack's padded rank and scale 1.0 (the scale is folded into B); its update ΔW
  equals adapter `index`'s own.

  Under `jax.jit` an index outside [-1, K) cannot raise: it gives zero factors (the base
  model) and zero extras. Check traced indices yourself where that matters, e.g. with
  ``jax.experimental.checkify.check(index < stacked.size, ...)`` under `checkify.checkify`.

  Args:
    stacked: what `jlora.stack` returned.
    index: a scalar integer in [-1, K), concrete or traced.

  Returns:
    An `Adapter`; `merge`, `wrap` and export take it like any other.

  Raises:
    TypeError: if `stacked` is not an `AdapterStack` or `index` is not an integer.
    ValueError: if `index` is not a scalar, or is concrete and outside [-1, K), or is -1 for
      a stack with extras (their base values are not in the stack).

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"fc": {"kernel": jnp.ones((8, 4))}}
    >>> adapters = [jlora.init(jax.random.key(r), params,
    ...                        jlora.LoraConfig(rank=r, alpha=2.0, targets="fc/kernel"))
    ...             for r in (1, 2, 4)]
    >>> adapters = [jax.tree.map(jnp.ones_like, a) for a in adapters]  # B = 1, as if trained
    >>> serve = jax.jit(lambda s, i: jlora.merge(params, jlora.select(s, i))["fc"]["kernel"])
    >>> stacked = jlora.stack(adapters)
    >>> all(bool(jnp.allclose(serve(stacked, i), jlora.merge(params, adapters[i])["fc"]["kernel"]))
    ...     for i in range(3))
    True
  """
  _check_stack("jlora.select", stacked)
  if jnp.ndim(index) != 0:
    raise ValueError(f"jlora.select: index must be a scalar, got shape {jnp.shape(index)}. "
                     "Fix: for one adapter per example, use jlora.route(stacked, ids).")
  index, concrete = _check_index("jlora.select", index, stacked.size, "index")
  if stacked.extras and concrete is not None and concrete == -1:
    raise ValueError("jlora.select: index -1 (the base model) has no values for the stack's "
                     f"extras {sorted(stacked.extras)}. Fix: select an adapter in [0, K).")
  lora = {path: dataclasses.replace(f, a=_take(f.a, index), b=_take(f.b, index))
          for path, f in stacked.lora.items()}
  extras = {path: _take(x, index) for path, x in stacked.extras.items()}
  return Adapter(lora=lora, extras=extras)


def route(stacked: AdapterStack, ids: jax.typing.ArrayLike) -> Adapter:
  """One adapter per example: example b of the batch runs adapter ``ids[b]``, -1 the base.

  Returns per-example factors: ``a`` of shape ``(*stacked, batch, rank, fan_in)`` and ``b``
  of shape ``(*stacked, batch, rank, fan_out)``, gathered from the stack. The function from
  `jlora.wrap` applies example b's factors to example b of every input, through one batched
  contraction (no loop over sub-batches), for Dense, DenseGeneral, Einsum, Conv, Embed (lookup
  and ``attend``) and `nn.scan` stacks. The batch axis must be the leading axis of every
  input and output of the apply function, and of the input of every adapted module inside it
  (a model that runs time-major inside, or folds the batch into another axis, breaks this:
  move the batch to the front around such code, e.g. with ``jnp.moveaxis``, or use
  `jlora.select` per sub-batch). `merge`, `unmerge`, `export_peft`, `combine`, `truncate`
  and `stack` refuse the result; modules without a factored rule (custom modules, NNX Embed,
  stacked NNX layers) cannot take it either.

  `route` does not see the batch, so it cannot check that ``len(ids)`` equals the batch
  size; the function from `jlora.wrap` checks that when it runs the model.

  Gradients through a routed batch reach adapter k only from the examples with ``ids == k``,
  so one step trains several adapters on a mixed batch: differentiate with respect to the
  stack. Under `jax.jit`, ids outside [-1, K) cannot raise and run the base model; check them
  with `jax.experimental.checkify` where that matters.

  Args:
    stacked: what `jlora.stack` returned, without extras.
    ids: integer adapter indices of shape (batch,), in [-1, K); concrete or traced.

  Returns:
    An `Adapter` with per-example factors, for the function from `jlora.wrap`.

  Raises:
    TypeError: if `stacked` is not an `AdapterStack` or `ids` are not integers.
    ValueError: if `ids` is not 1-D, concrete ids lie outside [-1, K), or the stack has extras
      (whole leaves such as a bias cannot differ per example).

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jlora
    >>> model = nn.Dense(3)
    >>> x = jnp.ones((4, 5))
    >>> variables = model.init(jax.random.key(0), x)
    >>> config = jlora.LoraConfig(rank=2, alpha=4.0, targets=".*kernel")
    >>> adapters = [jax.tree.map(lambda l: l + k, jlora.init(jax.random.key(k), variables,
    ...                                                       config)) for k in (1, 2)]
    >>> ids = jnp.array([1, -1, 0, 1])
    >>> y = jlora.wrap(model.apply)(variables, jlora.route(jlora.stack(adapters), ids), x)
    >>> alone = model.apply(jlora.merge(variables, adapters[1]), x)
    >>> bool(jnp.allclose(y[0], alone[0], atol=1e-5)), bool(jnp.allclose(y[1], model.apply(
    ...     variables, x)[1]))
    (True, True)
  """
  _check_stack("jlora.route", stacked)
  if jnp.ndim(ids) != 1:
    raise ValueError(f"jlora.route: ids must have shape (batch,), got {jnp.shape(ids)}. Fix: "
                     "one adapter index per example; for one adapter for all, jlora.select.")
  if stacked.extras:
    raise ValueError(
        f"jlora.route: the stack has trained extra leaves {sorted(stacked.extras)}; a whole "
        "leaf (a bias, a head) cannot differ per example. Fix: stack adapters without "
        "LoraConfig.trainable, or serve adapters with extras one at a time with jlora.select."
    )
  ids, _ = _check_index("jlora.route", ids, stacked.size, "ids")

  def per_example(x, n_stacked):
    return jnp.moveaxis(_take(x, ids), 0, n_stacked)

  lora = {path: dataclasses.replace(f, a=per_example(f.a, len(f.roles.stacked)),
                                    b=per_example(f.b, len(f.roles.stacked)))
          for path, f in stacked.lora.items()}
  return Adapter(lora=lora)


# ----------------------------------------------------------------------------------------------
# combine and truncate.
