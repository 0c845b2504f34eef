"""Mixing adapters: `combine` (exact "cat", or truncated "svd") and `truncate`.

* `combine` mixes adapters exactly, W + Σ wᵢ·ΔWᵢ, by concatenating their ranks ("cat"), or
  truncates that mix by SVD ("svd"). PEFT's "linear" mode, which mixes A and B separately and
  so adds cross terms, is deliberately absent.
* `truncate` is the SVD step alone and also reports the truncation error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jlora.adapter import Adapter, LoraFactors
from jlora.multi import _HIGHEST, _check_adapters, _pad_rank, _same_base


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
