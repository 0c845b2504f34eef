"""A small scanned GPT, its parallel layouts and a LoRA train step, for the sharding tests.

Shared by tests/test_sharding.py and the two-process dry run (tests/_multihost_worker.py).
Sizes are chosen so that every sharded axis divides by 8 and kernels (≥ 4,096 numbers) are
much larger than adapter factors (≤ 2,048), which the HLO collective checks rely on.
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jlora

VOCAB, DIM, HEADS, HEAD_DIM, MLP, LAYERS, SEQ = 96, 64, 8, 8, 192, 2, 16
RANK = 4
TARGETS = r".*/(query|key|value|out|up|down)/kernel"


def _constrain(x, sharding):
  """Pins activations to the batch sharding, as FSDP codes do, so XLA gathers the kernels."""
  return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


class Block(nn.Module):
  batch_sharding: NamedSharding | None = None

  @nn.compact
  def __call__(self, x, _):
    pin = lambda t: _constrain(t, self.batch_sharding)  # noqa: E731
    h = nn.LayerNorm(name="ln1")(pin(x))
    q, k, v = (pin(nn.DenseGeneral((HEADS, HEAD_DIM), name=n)(h))
               for n in ("query", "key", "value"))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / HEAD_DIM**0.5
    causal = jnp.tril(jnp.ones((1, 1, x.shape[1], x.shape[1]), bool))
    weights = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
    o = pin(jnp.einsum("bhqk,bkhd->bqhd", weights, v))
    x = x + pin(nn.DenseGeneral(DIM, axis=(-2, -1), name="out")(o))
    h = pin(nn.gelu(nn.Dense(MLP, name="up")(nn.LayerNorm(name="ln2")(x))))
    return pin(x + nn.Dense(DIM, name="down")(h)), None


class GPT(nn.Module):
  """Embed + learned positions -> scanned pre-LN blocks -> LayerNorm -> untied head."""

  batch_sharding: NamedSharding | None = None

  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(VOCAB, DIM, name="embed")(ids)
    x = x + self.param("pos", nn.initializers.normal(0.02), (SEQ, DIM))[None, : ids.shape[1]]
    stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                    length=LAYERS)
    x, _ = stack(self.batch_sharding, name="layers")(_constrain(x, self.batch_sharding), None)
    return nn.Dense(VOCAB, name="head")(nn.LayerNorm(name="ln_f")(x))


MODEL = GPT()
CONFIG = jlora.LoraConfig(rank=RANK, alpha=8.0, targets=TARGETS, trainable="params/ln_f/scale")
OPTIMIZER = optax.adamw(1e-2, weight_decay=1e-4)


def data(batch: int = 16, seed: int = 1):
  """(ids, labels), fixed random tokens."""
  tokens = jax.random.randint(jax.random.key(seed), (batch, SEQ + 1), 0, VOCAB)
  return tokens[:, :-1], tokens[:, 1:]


def variables():
  return MODEL.init(jax.random.key(0), data()[0])


def loss_fn(adapter, variables, ids, labels, model=MODEL):
  logits = jlora.wrap(model.apply)(variables, adapter, ids)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_step(model=MODEL, optimizer=OPTIMIZER):
  """(adapter, opt_state, variables, ids, labels) -> (adapter, opt_state, loss)."""

  def train_step(adapter, opt_state, variables, ids, labels):
    loss, grads = jax.value_and_grad(loss_fn)(adapter, variables, ids, labels, model)
    updates, opt_state = optimizer.update(grads, opt_state, adapter)
    return optax.apply_updates(adapter, updates), opt_state, loss

  return train_step


def frozen_step(model=MODEL):
  """The floor: backprop through the frozen model to the positional embedding only."""

  def step(pos, variables, ids, labels):
    def loss(pos):
      logits = model.apply({"params": dict(variables["params"], pos=pos)}, ids)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    value, grad = jax.value_and_grad(loss)(pos)
    return pos - 1e-2 * grad, value

  return step


# ----------------------------------------------------------------------------------------------
# Layouts: (mesh shape, mesh axis names, batch spec, {regex: kernel spec}); unlisted leaves are
# replicated. Scanned kernels have the layer axis first.

_FSDP = {
    r".*/(query|key|value)/kernel": P(None, "data"),           # (L, D, H, hd): contracted D
    r".*/out/kernel": P(None, None, None, "data"),             # (L, H, hd, D): feature D
    r".*/up/kernel": P(None, "data"),                          # (L, D, F)
    r".*/down/kernel": P(None, "data"),                        # (L, F, D): contracted F
    r"params/embed/embedding": P("data"),
    r"params/head/kernel": P(None, "data"),
    r"params/ln_f/scale": P("data"),
}
_TP = {  # Megatron: q/k/v and up split by columns (heads, F), out and down by rows
    r".*/(query|key|value)/kernel": P(None, None, "model"),
    r".*/(query|key|value)/bias": P(None, "model"),
    r".*/out/kernel": P(None, "model"),
    r".*/up/kernel": P(None, None, "model"),
    r".*/up/bias": P(None, "model"),
    r".*/down/kernel": P(None, "model"),
    r"params/head/kernel": P(None, "model"),
    r"params/head/bias": P("model"),
}
_TP_FSDP = {  # 2-D: the Megatron splits over "model", the other kernel axis over "data"
    r".*/(query|key|value)/kernel": P(None, "data", "model"),
    r".*/(query|key|value)/bias": P(None, "model"),
    r".*/out/kernel": P(None, "model", None, "data"),
    r".*/up/kernel": P(None, "data", "model"),
    r".*/up/bias": P(None, "model"),
    r".*/down/kernel": P(None, "model", "data"),
    r"params/head/kernel": P("data", "model"),
    r"params/embed/embedding": P(None, "data"),
}
LAYOUTS = {
    "data_parallel": ((8,), ("data",), P("data"), {}),
    "fsdp": ((8,), ("data",), P("data"), _FSDP),
    "tensor_parallel": ((8,), ("model",), P(), _TP),
    "data_x_model": ((2, 4), ("data", "model"), P("data"), _TP_FSDP),
}


def mesh_for(layout: str) -> Mesh:
  shape, names, _, _ = LAYOUTS[layout]
  return Mesh(np.array(jax.devices()[:8]).reshape(shape), names)


def param_specs(tree, layout: str):
  """A PartitionSpec for every leaf of `tree`, from the layout's regex rules."""
  rules = LAYOUTS[layout][3]

  def spec(path, _):
    name = jlora._tree.path_str(path)
    return next((s for pattern, s in rules.items() if re.fullmatch(pattern, name)), P())

  return jax.tree_util.tree_map_with_path(spec, tree)


def place(tree, mesh: Mesh, specs):
  return jax.device_put(tree, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))


def batch_sharding(layout: str, mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, LAYOUTS[layout][2])


def model_for(layout: str, mesh: Mesh) -> GPT:
  """The model with its activations pinned to the batch sharding (none for pure TP)."""
  spec = LAYOUTS[layout][2]
  return GPT(NamedSharding(mesh, spec)) if spec != P() else MODEL
