"""Strict JAX settings and small linen/NNX models shared by the tests."""

import jax

jax.config.update("jax_num_cpu_devices", 8)  # sharding tests run on 8 fake CPU devices
jax.config.update("jax_numpy_rank_promotion", "raise")

import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402


class Attention(nn.Module):
  """Multi-head self-attention with DenseGeneral q/k, an Einsum v and a multi-axis output."""

  heads: int = 2
  head_dim: int = 4

  @nn.compact
  def __call__(self, x):
    shape = (self.heads, self.head_dim)
    q = nn.DenseGeneral(shape, name="query")(x)
    k = nn.DenseGeneral(shape, name="key")(x)
    v = nn.Einsum((x.shape[-1], *shape), "btd,dhk->bthk", name="value")(x)
    weights = jax.nn.softmax(jnp.einsum("bqhk,bshk->bhqs", q, k) / self.head_dim**0.5, -1)
    out = jnp.einsum("bhqs,bshk->bqhk", weights, v)
    return nn.DenseGeneral(x.shape[-1], axis=(-2, -1), name="out")(out)


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _=None):
    x = x + Attention(name="attn")(nn.LayerNorm(name="norm")(x))
    x = x + nn.Dense(x.shape[-1], name="down")(nn.gelu(nn.Dense(16, name="up")(x)))
    return x, None


class TinyLM(nn.Module):
  """Embed -> Conv -> scanned (and rematerialised) blocks -> tied output head."""

  vocab: int = 20
  dim: int = 8
  layers: int = 2

  @nn.compact
  def __call__(self, ids):
    embed = nn.Embed(self.vocab, self.dim, name="embed")
    x = nn.Conv(self.dim, (3,), name="conv")(embed(ids))
    stack = nn.scan(nn.remat(Block), variable_axes={"params": 0},
                    split_rngs={"params": True}, length=self.layers)
    x, _ = stack(name="layers")(x, None)
    return embed.attend(x)


class TinyNNX(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(20, 8, rngs=rngs)
    self.conv = nnx.Conv(8, 8, (3,), rngs=rngs)
    self.query = nnx.LinearGeneral(8, (2, 4), rngs=rngs)
    self.value = nnx.Einsum("btd,dhk->bthk", (8, 2, 4), rngs=rngs)
    self.out = nnx.LinearGeneral((2, 4), 8, axis=(-2, -1), rngs=rngs)
    self.head = nnx.Linear(8, 20, rngs=rngs)

  def __call__(self, ids):
    x = self.conv(self.embed(ids))
    x = x + self.out(self.query(x) * self.value(x))
    return self.head(x)


@pytest.fixture(scope="session")
def tiny_lm():
  """(model, variables, ids) of `TinyLM`."""
  model = TinyLM()
  ids = (jnp.arange(12).reshape(2, 6) * 7) % 20
  return model, model.init(jax.random.key(0), ids), ids


@pytest.fixture(scope="session")
def tiny_nnx():
  """(graphdef, state, ids) of `TinyNNX`."""
  graphdef, state = nnx.split(TinyNNX(nnx.Rngs(0)))
  ids = (jnp.arange(12).reshape(2, 6) * 7) % 20
  return graphdef, state, ids


@pytest.fixture(scope="session")
def abstract_lm():
  """(model, abstract variables, ids) of `TinyLM`: enough for shape-only checks."""
  model = TinyLM()
  ids = (jnp.arange(12).reshape(2, 6) * 7) % 20
  return model, jax.eval_shape(model.init, jax.random.key(0), ids), ids


@pytest.fixture(scope="session")
def abstract_nnx():
  """(abstract module, its state) of `TinyNNX`."""
  model = nnx.eval_shape(lambda: TinyNNX(nnx.Rngs(0)))
  return model, nnx.state(model)
