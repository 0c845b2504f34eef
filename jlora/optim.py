"""Optax helpers: labels for the adapter's leaves, and LoRA+ learning rates."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import optax

from jlora.adapter import Adapter


def labels(adapter: Adapter) -> Adapter:
  """The adapter with every leaf replaced by its label: ``"a"``, ``"b"`` or ``"extra"``.

  Use it with `optax.multi_transform` or `optax.partition` to treat the parts differently.

  Args:
    adapter: an adapter from `jlora.init`.

  Returns:
    An `Adapter` of the same structure whose leaves are label strings.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"fc": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
    >>> config = jlora.LoraConfig(rank=2, alpha=4.0, targets="fc/kernel", trainable="fc/bias")
    >>> tags = jlora.labels(jlora.init(jax.random.key(0), params, config))
    >>> tags.lora["fc/kernel"].a, tags.lora["fc/kernel"].b, tags.extras["fc/bias"]
    ('a', 'b', 'extra')
  """
  lora = {path: dataclasses.replace(f, a="a", b="b") for path, f in adapter.lora.items()}
  return dataclasses.replace(adapter, lora=lora, extras={path: "extra" for path in adapter.extras})


def lora_plus(make_optimizer: Callable[[float], optax.GradientTransformation],
              learning_rate: float, *, ratio: float = 16.0) -> optax.GradientTransformation:
  """LoRA+ (Hayou et al. 2024): B learns `ratio` times faster than A and the extras.

  Built from `optax.multi_transform` over `jlora.labels`, so any optax optimizer works.

  Args:
    make_optimizer: learning rate -> optimizer, e.g. ``lambda lr: optax.adamw(lr, 1e-4)``.
    learning_rate: the learning rate of A and of the extra trainable leaves.
    ratio: B's learning rate over A's (the paper suggests 16 for Adam).

  Returns:
    An optax `GradientTransformation` to `init` with the adapter.

  Example:
    >>> import jax, jax.numpy as jnp, optax, jlora
    >>> params = {"fc": {"kernel": jnp.ones((4, 3))}}
    >>> config = jlora.LoraConfig(rank=2, alpha=4.0, targets="fc/kernel")
    >>> adapter = jlora.init(jax.random.key(0), params, config)
    >>> optimizer = jlora.lora_plus(optax.sgd, 1e-2, ratio=4.0)
    >>> state = optimizer.init(adapter)
    >>> ones = jax.tree.map(jnp.ones_like, adapter)
    >>> updates, _ = optimizer.update(ones, state, adapter)
    >>> updates.lora["fc/kernel"].b[0, 0] / updates.lora["fc/kernel"].a[0, 0]
    Array(4., dtype=float32)
  """
  if not ratio > 0:
    raise ValueError(f"lora_plus: ratio must be > 0, got {ratio=}.")
  transforms = {
      "a": make_optimizer(learning_rate),
      "b": make_optimizer(learning_rate * ratio),
      "extra": make_optimizer(learning_rate),
  }
  return optax.multi_transform(transforms, labels)
