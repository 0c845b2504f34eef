"""User stories, end to end: fine-tune a small transformer with LoRA, then serve it merged.

Each story: a base model (random weights stand in for a pretrained one) is frozen; an adapter
is trained with `jlora.wrap` and optax on a fixed toy task (predict the previous token, which
needs attention); the loss falls; then `jlora.merge` folds the adapter in for inference and the
merged model predicts what the wrapped one does. Nothing is written to disk (checkpoints have
their own tests).
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jlora

VOCAB, DIM, HEADS, SEQ, BATCH = 16, 32, 4, 8, 32
STEPS = 60
RTOL = 1e-4  # merged vs wrapped logits, float32: max |Δ| ≤ RTOL · max |logits|


def _toy_task(seed):
  """Random token sequences; the target at position t is the token at t − 1 (0 at t = 0)."""
  ids = np.random.default_rng(seed).integers(1, VOCAB, (BATCH, SEQ), np.int32)
  targets = np.concatenate([np.zeros((BATCH, 1), np.int32), ids[:, :-1]], axis=1)
  return jnp.asarray(ids), jnp.asarray(targets)


def _xent(logits, targets):
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def _causal_attention(q, k, v):
  scores = jnp.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1])
  mask = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))
  weights = jax.nn.softmax(jnp.where(mask[None, None], scores, -1e9), axis=-1)
  return jnp.einsum("bhqs,bshk->bqhk", weights, v)


def _assert_same_predictions(merged_logits, wrapped_logits):
  err = float(jnp.max(jnp.abs(merged_logits - wrapped_logits)))
  assert err <= RTOL * float(jnp.max(jnp.abs(merged_logits))), err
  np.testing.assert_array_equal(jnp.argmax(merged_logits, -1), jnp.argmax(wrapped_logits, -1))


# ----------------------------------------------------------------------------------------------
# Linen.


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(name="norm1")(x)
    shape = (HEADS, DIM // HEADS)
    q = nn.DenseGeneral(shape, name="query")(h)
    k = nn.DenseGeneral(shape, name="key")(h)
    v = nn.DenseGeneral(shape, name="value")(h)
    x = x + nn.DenseGeneral(DIM, axis=(-2, -1), name="out")(_causal_attention(q, k, v))
    h = nn.LayerNorm(name="norm2")(x)
    return x + nn.Dense(DIM, name="down")(nn.gelu(nn.Dense(2 * DIM, name="up")(h)))


class Transformer(nn.Module):
  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(VOCAB, DIM, name="embed")(ids)
    x = x + self.param("pos", nn.initializers.normal(0.02), (SEQ, DIM))[None]
    for i in range(2):
      x = Block(name=f"block{i}")(x)
    return nn.Dense(VOCAB, name="head")(nn.LayerNorm(name="norm")(x))


def test_linen_story_train_with_wrap_then_serve_merged():
  model = Transformer()
  ids, targets = _toy_task(0)
  variables = jax.jit(model.init)(jax.random.key(0), ids)  # stands in for pretrained weights

  config = jlora.LoraConfig(
      rank=4, alpha=8.0, dropout=0.1,
      targets=r".*/(query|key|value|out|up|down)/kernel",
      trainable=r"params/head/.*",  # a new head, trained in full
  )
  adapter = jlora.init(jax.random.key(1), variables, config, model.apply, ids)
  assert len(adapter.lora) == 12 and set(adapter.extras) == {"params/head/kernel",
                                                             "params/head/bias"}
  lora_apply = jlora.wrap(model.apply)
  optimizer = optax.adamw(3e-3)

  def loss_fn(adapter, variables, ids, targets, key):
    logits = lora_apply(variables, adapter, ids, rngs={"lora_dropout": key})
    return _xent(logits, targets)

  @jax.jit
  @chex.assert_max_traces(n=1)  # the updated adapter keeps its structure and dtypes
  def train_step(adapter, opt_state, variables, ids, targets, key):
    loss, grads = jax.value_and_grad(loss_fn)(adapter, variables, ids, targets, key)
    updates, opt_state = optimizer.update(grads, opt_state, adapter)
    return optax.apply_updates(adapter, updates), opt_state, loss

  @jax.jit
  def eval_loss(adapter, variables, ids, targets):  # no rng: no dropout
    return _xent(lora_apply(variables, adapter, ids), targets)

  initial = float(eval_loss(adapter, variables, ids, targets))
  opt_state = optimizer.init(adapter)
  for step in range(STEPS):
    adapter, opt_state, _ = train_step(adapter, opt_state, variables, ids, targets,
                                       jax.random.fold_in(jax.random.key(2), step))
  final = float(eval_loss(adapter, variables, ids, targets))
  assert final < 0.5 * initial, (initial, final)
  assert {x.dtype for x in jax.tree.leaves(adapter)} == {jnp.dtype(jnp.float32)}

  # Inference: fold the adapter into the kernels; the plain model then predicts the same.
  merged = jlora.merge(variables, adapter)
  assert jax.tree.structure(merged) == jax.tree.structure(variables)
  held_out, held_out_targets = _toy_task(1)
  merged_logits = jax.jit(model.apply)(merged, held_out)
  _assert_same_predictions(merged_logits, jax.jit(lora_apply)(variables, adapter, held_out))
  base_logits = jax.jit(model.apply)(variables, held_out)
  assert _xent(merged_logits, held_out_targets) < _xent(base_logits, held_out_targets)


# ----------------------------------------------------------------------------------------------
# NNX.


class NNXBlock(nnx.Module):
  def __init__(self, rngs):
    shape = (HEADS, DIM // HEADS)
    self.norm1 = nnx.LayerNorm(DIM, rngs=rngs)
    self.query = nnx.LinearGeneral(DIM, shape, rngs=rngs)
    self.key = nnx.LinearGeneral(DIM, shape, rngs=rngs)
    self.value = nnx.Einsum("btd,dhk->bthk", (DIM, *shape), rngs=rngs)
    self.out = nnx.LinearGeneral(shape, DIM, axis=(-2, -1), rngs=rngs)
    self.norm2 = nnx.LayerNorm(DIM, rngs=rngs)
    self.up = nnx.Linear(DIM, 2 * DIM, rngs=rngs)
    self.down = nnx.Linear(2 * DIM, DIM, rngs=rngs)

  def __call__(self, x):
    h = self.norm1(x)
    x = x + self.out(_causal_attention(self.query(h), self.key(h), self.value(h)))
    return x + self.down(nnx.gelu(self.up(self.norm2(x))))


class NNXTransformer(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Embed(VOCAB, DIM, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (SEQ, DIM)))
    self.blocks = nnx.List([NNXBlock(rngs) for _ in range(2)])
    self.norm = nnx.LayerNorm(DIM, rngs=rngs)
    self.head = nnx.Linear(DIM, VOCAB, rngs=rngs)

  def __call__(self, ids):
    x = self.embed(ids) + self.pos[...][None]
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x))


def test_nnx_story_train_with_wrap_then_serve_merged():
  model = NNXTransformer(nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  ids, targets = _toy_task(0)

  config = jlora.LoraConfig(rank=4, alpha=8.0, dropout=0.1, targets=r".*kernel",
                            trainable=r"head/bias")
  adapter = jlora.init(jax.random.key(1), state, config, model, ids)
  assert len(adapter.lora) == 2 * 6 + 1 and "blocks/0/value/kernel" in adapter.lora
  lora_apply = jlora.wrap(graphdef)
  optimizer = optax.adam(3e-3)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def train_step(adapter, opt_state, state, ids, targets, key):
    def loss_fn(adapter):
      return _xent(lora_apply(state, adapter, ids, dropout_key=key), targets)

    loss, grads = jax.value_and_grad(loss_fn)(adapter)
    updates, opt_state = optimizer.update(grads, opt_state, adapter)
    return optax.apply_updates(adapter, updates), opt_state, loss

  @jax.jit
  def eval_loss(adapter, state, ids, targets):  # no dropout key: no dropout
    return _xent(lora_apply(state, adapter, ids), targets)

  initial = float(eval_loss(adapter, state, ids, targets))
  opt_state = optimizer.init(adapter)
  for step in range(STEPS):
    adapter, opt_state, _ = train_step(adapter, opt_state, state, ids, targets,
                                       jax.random.fold_in(jax.random.key(2), step))
  final = float(eval_loss(adapter, state, ids, targets))
  assert final < 0.5 * initial, (initial, final)

  # Inference: a plain NNX model with the adapter folded into its kernels.
  served = nnx.merge(graphdef, jlora.merge(state, adapter))
  held_out, held_out_targets = _toy_task(1)
  merged_logits = nnx.jit(lambda m, x: m(x))(served, held_out)
  _assert_same_predictions(merged_logits, jax.jit(lora_apply)(state, adapter, held_out))
  base_logits = nnx.jit(lambda m, x: m(x))(model, held_out)
  assert _xent(merged_logits, held_out_targets) < _xent(base_logits, held_out_targets)
