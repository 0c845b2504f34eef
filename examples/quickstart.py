"""Quickstart: LoRA-train a small Flax transformer block on a task it makes up itself.

A frozen random "pretrained" model learns to name the last token of a sequence; only the
adapter (rank-8 updates of the query, value and head kernels, ~5 % of this tiny model) trains.

    python examples/quickstart.py
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import jlora

VOCAB, DIM, SEQ = 32, 64, 16


class Model(nn.Module):
  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(VOCAB, DIM, name="embed")(ids)
    q = nn.DenseGeneral((4, 16), name="query")(x)
    k = nn.DenseGeneral((4, 16), name="key")(x)
    v = nn.DenseGeneral((4, 16), name="value")(x)
    attn = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / 4.0, axis=-1)
    x = x + nn.DenseGeneral(DIM, axis=(-2, -1), name="out")(jnp.einsum("bhqk,bkhd->bqhd", attn, v))
    x = x + nn.Dense(DIM, name="down")(nn.gelu(nn.Dense(4 * DIM, name="up")(x)))
    return nn.Dense(VOCAB, name="head")(x.mean(axis=1))


def main(steps: int = 300) -> None:
  model = Model()
  ids = jax.random.randint(jax.random.key(0), (256, SEQ), 0, VOCAB)
  labels = ids[:, -1]  # the task: name the last token
  variables = model.init(jax.random.key(1), ids[:1])

  config = jlora.LoraConfig(rank=8, alpha=16.0, targets=r".*/(query|value|head)/kernel")
  adapter = jlora.init(jax.random.key(2), variables, config, model.apply, ids[:1])
  print(jlora.summary(adapter, variables))

  lora_apply = jlora.wrap(model.apply)
  optimizer = optax.adamw(3e-3)

  def loss_fn(adapter, batch, targets):
    logits = lora_apply(variables, adapter, batch)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  @jax.jit
  def step(adapter, opt_state, batch, targets):
    loss, grads = jax.value_and_grad(loss_fn)(adapter, batch, targets)
    updates, opt_state = optimizer.update(grads, opt_state, adapter)
    return optax.apply_updates(adapter, updates), opt_state, loss

  opt_state = optimizer.init(adapter)
  for i in range(steps):
    adapter, opt_state, loss = step(adapter, opt_state, ids, labels)
    if i % 50 == 0 or i == steps - 1:
      print(f"step {i:4d}  loss {float(loss):.4f}")

  merged = jlora.merge(variables, adapter)
  same = jnp.allclose(model.apply(merged, ids), lora_apply(variables, adapter, ids), atol=1e-4)
  print(f"merged model matches the adapted one: {bool(same)}")


if __name__ == "__main__":
  main()
