"""Cheap checks of an adapter's values, run on every restore and import."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jlora import _tree


def check_finite(adapter, *, where: str = "the adapter") -> None:
  """Raises if any factor or extra of `adapter` holds a NaN or an infinity.

  One reduction per leaf, on the host; NaN and inf propagate silently through JAX otherwise.

  Args:
    adapter: a `jlora.Adapter` (or any pytree of arrays).
    where: what to call the adapter in the error (e.g. the file it came from).

  Raises:
    ValueError: naming the first non-finite leaf and how many of its values are bad.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"fc": {"kernel": jnp.ones((4, 3))}}
    >>> adapter = jlora.init(jax.random.key(0), params,
    ...                      jlora.LoraConfig(rank=2, alpha=4.0, targets="fc/kernel"))
    >>> jlora.check_finite(adapter)
    >>> bad = jax.tree.map(lambda x: x.at[0].set(jnp.nan), adapter)
    >>> jlora.check_finite(bad)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: lora/fc/kernel/a in the adapter has 1 non-finite value(s) (NaN or inf). ...
  """
  for path, leaf in _tree.flatten(adapter).items():
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
      continue
    bad = int(np.asarray(jax.device_get(jnp.sum(~jnp.isfinite(leaf)))))
    if bad:
      raise ValueError(
          f"{path} in {where} has {bad} non-finite value(s) (NaN or inf). Fix: restore an "
          "earlier step, or lower the learning rate of the run that produced it."
      )
