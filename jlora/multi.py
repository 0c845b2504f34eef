"""Many adapters on one frozen base: `stack`, `select`, `route`, `combine` and `truncate`.

* `stack` puts K adapters of one base into one `AdapterStack`: each factor gets a leading
  adapter axis, ranks are zero-padded to the largest, and each adapter's scale (α/r or α/√r)
  is folded into its B, so adapters of any rank and alpha share one shape.
* `select` takes adapter i out as an ordinary `Adapter` (i may be traced: hot-swap inside one
  compiled function); `route` gives every example of a batch its own adapter (mixed batches,
  served or trained in one step); both read index -1 as "no adapter", the base model.
* `combine` mixes adapters exactly, W + Σ wᵢ·ΔWᵢ, by concatenating their ranks ("cat"), or
  truncates that mix by SVD ("svd"); `truncate` is the SVD step alone and also reports the
  truncation error.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

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


class Truncation(NamedTuple):
  """What `jlora.truncate` returns.

  Attributes:
    adapter: the truncated adapter (scale 1.0, the given rank at every path).
    error: ``{path: ‖ΔW − ΔW_rank‖_F}``, the Frobenius norm of the dropped singular values
      (over all layers of a stacked kernel), as float32 scalars.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"fc": {"kernel": jnp.zeros((8, 6))}}
    >>> adapter = jlora.init(jax.random.key(0), params,
    ...                      jlora.LoraConfig(rank=4, alpha=4.0, targets="fc/kernel"))
    >>> result = jlora.truncate(adapter, 2)
    >>> result.adapter.lora["fc/kernel"].rank, float(result.error["fc/kernel"])  # B = 0
    (2, 0.0)
  """

  adapter: Adapter
  error: dict[str, jax.Array]


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
    for path, f in adapter.lora.items():
      if f.a.ndim != len(f.roles.stacked) + 2:
        raise ValueError(f"{where}: adapters[{i}] has per-example factors at {path!r} (it came "
                         "from jlora.route). Fix: pass the adapters themselves.")
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
  `jlora.select` per sub-batch). `merge` does not take the result; modules without a
  factored rule (custom modules, NNX Embed, stacked NNX layers) cannot take it either.

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


def _check_weights(weights, n: int) -> jax.Array:
  weights = jnp.asarray(weights)
  if weights.shape != (n,):
    raise ValueError(f"jlora.combine: got weights of shape {weights.shape} for {n} adapters. "
                     f"Fix: pass one weight per adapter, shape ({n},).")
  if not jnp.issubdtype(weights.dtype, jnp.inexact):
    weights = weights.astype(jnp.float32)
  return weights


def _cat(adapters: list[Adapter], weights: jax.Array, path: str, meta) -> LoraFactors:
  roles, kernel_shape, dropout = meta
  pairs = [(f, w) for f, w in ((a.lora.get(path), weights[i]) for i, a in enumerate(adapters))
           if f is not None]
  dtype = jnp.result_type(*(x for f, _ in pairs for x in (f.a, f.b)))
  a = jnp.concatenate([f.a.astype(dtype) for f, _ in pairs], axis=-2)
  b = jnp.concatenate([(f.b * (w * f.scale).astype(f.b.dtype)).astype(dtype)
                       for f, w in pairs], axis=-2)
  return LoraFactors(a=a, b=b, scale=1.0, roles=roles, kernel_shape=kernel_shape,
                     dropout=dropout)


def combine(adapters: Sequence[Adapter], weights: jax.typing.ArrayLike, *, method: str = "cat",
            rank: int | None = None, allow_subsets: bool = False) -> Adapter:
  """A weighted mix of adapters: ΔW = Σᵢ wᵢ·ΔWᵢ at every path, as one ordinary adapter.

  ``method="cat"`` is exact: A and wᵢ·sᵢ·Bᵢ are concatenated along the rank axis, so the
  result has rank Σᵢ rᵢ and ``merge(params, combine(...))`` equals W + Σᵢ wᵢ·ΔWᵢ. It runs
  under `jax.jit` with `weights` as an array: changing the mix does not retrace.
  ``method="svd"`` keeps the best rank-`rank` approximation of that sum at each path (per
  layer of a stacked kernel); it is ``truncate(combine(adapters, weights), rank).adapter``.
  Call `jlora.truncate` that way to also get the truncation error. A and B are never mixed
  separately (that would add cross terms wᵢ·wⱼ·AᵢᵀBⱼ).

  Args:
    adapters: adapters made for the same base, any ranks, alphas and rsLoRA settings.
    weights: one weight per adapter, shape (len(adapters),); may be traced.
    method: ``"cat"`` (exact) or ``"svd"`` (truncated to `rank`).
    rank: for ``"svd"``, the rank of the result, 1 ≤ rank ≤ min(fan_in, fan_out) at every
      path; must be None for ``"cat"``.
    allow_subsets: if True, an adapter without a path contributes no update there.

  Returns:
    An `Adapter` with scale 1.0 (the scales and weights are folded into B).

  Raises:
    TypeError: if `adapters` is not a list of `Adapter`.
    ValueError: if the number of weights differs from the number of adapters, `method` is
      unknown, `rank` is missing or out of range for ``"svd"`` or given for ``"cat"``, any
      adapter has extras (whole leaves have no exact weighted mix), or the adapters do not fit
      one base (the error names the path).

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"fc": {"kernel": jnp.zeros((8, 4))}}
    >>> a1, a2 = (jax.tree.map(jnp.ones_like, jlora.init(jax.random.key(0), params,
    ...           jlora.LoraConfig(rank=r, alpha=2.0, targets="fc/kernel"))) for r in (1, 2))
    >>> mix = jlora.combine([a1, a2], jnp.array([0.7, 0.3]))
    >>> mix.lora["fc/kernel"].rank
    3
    >>> want = 0.7 * jlora.delta(a1.lora["fc/kernel"]) + 0.3 * jlora.delta(a2.lora["fc/kernel"])
    >>> bool(jnp.allclose(jlora.merge(params, mix)["fc"]["kernel"], want))
    True
  """
  adapters = _check_adapters("jlora.combine", adapters)
  weights = _check_weights(weights, len(adapters))
  if method not in ("cat", "svd"):
    raise ValueError(f"jlora.combine: unknown {method=}. Fix: 'cat' (exact) or 'svd'.")
  if method == "cat" and rank is not None:
    raise ValueError(f"jlora.combine: method='cat' is exact at rank Σ rᵢ; got {rank=}. Fix: "
                     "leave rank=None, or use method='svd' to truncate.")
  if method == "svd":
    _check_rank(rank)
  with_extras = [i for i, a in enumerate(adapters) if a.extras]
  if with_extras:
    raise ValueError(
        f"jlora.combine: adapters[{with_extras[0]}] has trained extra leaves "
        f"{sorted(adapters[with_extras[0]].extras)}; a whole leaf has no exact weighted mix "
        "without its base value. Fix: combine adapters made without LoraConfig.trainable."
    )
  layout = _same_base("jlora.combine", adapters, allow_subsets)
  if method == "svd":
    _check_rank_fits(rank, {p: f for a in adapters for p, f in a.lora.items()})
  mix = Adapter(lora={path: _cat(adapters, weights, path, meta) for path, meta in layout.items()})
  return mix if method == "cat" else truncate(mix, rank).adapter


def _check_rank(rank) -> None:
  if not isinstance(rank, int | np.integer) or isinstance(rank, bool) or rank < 1:
    raise ValueError(f"jlora: the SVD rank must be an int >= 1, got {rank=}. Fix: pass e.g. "
                     "rank=8.")


def _check_rank_fits(rank: int, lora: dict[str, LoraFactors]) -> None:
  for path, f in lora.items():
    fan_in, fan_out = f.a.shape[-1], f.b.shape[-1]
    if rank > min(fan_in, fan_out):
      raise ValueError(f"jlora: SVD rank {rank} exceeds min(fan_in, fan_out) = min({fan_in}, "
                       f"{fan_out}) at {path!r}. Fix: lower the rank.")


def _truncate_factors(f: LoraFactors, rank: int) -> tuple[LoraFactors, jax.Array]:
  """The best rank-`rank` factors of ΔW = s·AᵀB via QR of A and B and an SVD of the core."""
  a = f.a.astype(jnp.float32)
  b = f.b.astype(jnp.float32) * jnp.float32(f.scale)
  qa, ra = jnp.linalg.qr(jnp.swapaxes(a, -1, -2))  # (.., fan_in, ka), (.., ka, r)
  qb, rb = jnp.linalg.qr(jnp.swapaxes(b, -1, -2))  # (.., fan_out, kb), (.., kb, r)
  core = jnp.matmul(ra, jnp.swapaxes(rb, -1, -2), precision=_HIGHEST)
  u, s, vt = jnp.linalg.svd(core, full_matrices=False)
  keep = min(rank, s.shape[-1])
  root = jnp.sqrt(s[..., None, :keep])
  new_a = jnp.matmul(qa, u[..., :keep], precision=_HIGHEST) * root
  new_b = jnp.matmul(qb, jnp.swapaxes(vt, -1, -2)[..., :keep], precision=_HIGHEST) * root
  error = jnp.sqrt(jnp.sum(s[..., keep:] ** 2))
  a_out = _pad_rank(jnp.swapaxes(new_a, -1, -2), rank).astype(f.a.dtype)
  b_out = _pad_rank(jnp.swapaxes(new_b, -1, -2), rank).astype(f.b.dtype)
  return dataclasses.replace(f, a=a_out, b=b_out, scale=1.0), error


def truncate(adapter: Adapter, rank: int) -> Truncation:
  """The best rank-`rank` approximation of an adapter's updates, and what it drops.

  At each path (and each layer of a stacked kernel) ΔW = s·AᵀB = U·S·Vᵀ is cut to its
  `rank` largest singular values (Eckart–Young): A = (U·√S)ᵀ and B = √S·Vᵀ, zero-padded when
  ΔW has fewer. The SVD is of an r×r core after QR of A and B, never of ΔW itself. Extras are
  kept as they are.

  Args:
    adapter: any adapter (e.g. ``jlora.combine(..., method="cat")``).
    rank: the new rank, 1 ≤ rank ≤ min(fan_in, fan_out) at every path; static under jit.

  Returns:
    A `Truncation` (adapter, error): error[path] is ‖ΔW − ΔW_rank‖_F, the Frobenius norm of
    the dropped singular values.

  Raises:
    TypeError: if `adapter` is not an `Adapter`.
    ValueError: if `rank` is not an int ≥ 1, exceeds min(fan_in, fan_out) at a path (named),
      or the adapter has per-example factors.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"fc": {"kernel": jnp.zeros((8, 6))}}
    >>> adapter = jlora.init(jax.random.key(0), params,
    ...                      jlora.LoraConfig(rank=4, alpha=4.0, targets="fc/kernel"))
    >>> adapter = jax.tree.map(jnp.ones_like, adapter)  # ΔW = 4·1ᵀ1 has rank 1
    >>> small, error = jlora.truncate(adapter, 1)
    >>> small.lora["fc/kernel"].rank, round(float(error["fc/kernel"]), 4)
    (1, 0.0)
  """
  (adapter,) = _check_adapters("jlora.truncate", [adapter])
  _check_rank(rank)
  _check_rank_fits(rank, adapter.lora)
  done = {path: _truncate_factors(f, rank) for path, f in adapter.lora.items()}
  return Truncation(
      adapter=Adapter(lora={p: f for p, (f, _) in done.items()}, extras=adapter.extras),
      error={p: e for p, (_, e) in done.items()},
  )
