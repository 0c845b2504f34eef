"""Subprocess side of tests/test_checkpoint.py: a fresh process that resumes, or dies mid-save.

  python tests/_ckpt_worker.py resume DIR STEPS   restore the latest checkpoint in DIR, train on
                                                  to STEPS, print the losses as JSON (float.hex)
  python tests/_ckpt_worker.py kill DIR           save step 1, start saving step 2, SIGKILL self

The training run itself (`setup`, `train`) is shared with the test, which imports this module.
"""

import json
import os
import signal
import sys

import conftest  # noqa: F401  (the same JAX settings as the test process)
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import jlora
from jlora import checkpoint

CONFIG = jlora.LoraConfig(rank=2, alpha=4.0, targets=r".*/(heads|up|down|embed)/(kernel|embedding)",
                          rank_pattern={".*/up/kernel": 3}, dropout=0.1,
                          trainable=(r"params/norm/scale",))
OPTIMIZER = optax.adamw(1e-2, weight_decay=1e-4)


class SmallLM(nn.Module):
  """Embed -> DenseGeneral to (heads, dim) -> MLP -> logits; small enough to compile fast."""

  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(20, 8, name="embed")(ids)
    h = nn.DenseGeneral((2, 4), name="heads")(nn.LayerNorm(name="norm")(x))
    x = x + jax.nn.softmax(h, -1).reshape(x.shape)
    x = x + nn.Dense(8, name="down")(nn.gelu(nn.Dense(16, name="up")(x)))
    return nn.Dense(20, name="logits")(x)


def setup():
  """(variables, step_fn, adapter at step 0) of a small training run with LoRA dropout."""
  model = SmallLM()
  ids = (jnp.arange(24).reshape(2, 12) * 7) % 20
  variables = jax.jit(model.init)(jax.random.key(0), ids)
  adapter = jlora.init(jax.random.key(1), variables, CONFIG, model.apply, ids)
  lora_apply = jlora.wrap(model.apply)

  def loss_fn(adapter, step):
    rngs = {"lora_dropout": jax.random.fold_in(jax.random.key(2), step)}
    logits = lora_apply(variables, adapter, ids[:, :-1], rngs=rngs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

  @jax.jit
  def step_fn(adapter, opt_state, step):
    loss, grads = jax.value_and_grad(loss_fn)(adapter, step)
    updates, opt_state = OPTIMIZER.update(grads, opt_state, adapter)
    return optax.apply_updates(adapter, updates), opt_state, loss

  return variables, step_fn, adapter


def train(step_fn, adapter, opt_state, start, stop, on_step=None):
  """Runs steps start..stop-1; returns (adapter, opt_state, losses as float.hex strings)."""
  losses = []
  for step in range(start, stop):
    if on_step is not None:
      on_step(step, adapter, opt_state)
    adapter, opt_state, loss = step_fn(adapter, opt_state, jnp.int32(step))
    losses.append(float(loss).hex())
  return adapter, opt_state, losses


def resume(directory, stop):
  variables, step_fn, _ = setup()
  restored = checkpoint.restore(directory, params=variables, optimizer=OPTIMIZER)
  assert restored.config == CONFIG, restored.config
  _, _, losses = train(step_fn, restored.adapter, restored.opt_state, restored.step, stop)
  print(json.dumps({"step": restored.step, "losses": losses}))


def kill(directory):
  params = {"fc": {"kernel": jnp.ones((4, 3))}}
  adapter = jlora.init(jax.random.key(0), params,
                       jlora.LoraConfig(rank=2, alpha=4.0, targets="fc/kernel"))
  manager = checkpoint.checkpoint_manager(directory)
  checkpoint.save(manager, 1, adapter)
  manager.wait_until_finished()
  # Step 2 carries 64 MiB, so its write is still going when the process dies.
  big = jlora.Adapter(lora=adapter.lora, extras={"big": jnp.ones((4096, 4096))})
  checkpoint.save(manager, 2, big)
  print("saving step 2", flush=True)
  os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
  if sys.argv[1] == "resume":
    resume(sys.argv[2], int(sys.argv[3]))
  elif sys.argv[1] == "kill":
    kill(sys.argv[2])
  else:
    raise SystemExit(f"unknown mode {sys.argv[1]!r}")
