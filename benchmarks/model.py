"""The standard benchmark model (shared/BENCHMARK.md): a GPT-style decoder in Flax linen and NNX.

`GPT` is the linen model every JAX system of ``benchmarks/train_step.py`` trains: token and
learned positional embeddings, pre-LayerNorm blocks of causal multi-head attention (q/k/v as
``nn.DenseGeneral(features=(heads, head_dim))``, output as ``nn.DenseGeneral(d_model,
axis=(-2, -1))``) and a tanh-gelu MLP, a final LayerNorm and an untied output head. At the
default `GPTConfig` it has ~13.7M parameters.

`NnxLoraGPT` is the same network in Flax NNX with Flax's own ``nnx.LoRALinear`` on q, k, v, o,
up and down, built from the linen weights by `nnx_lora_model`. ``nnx.LoRALinear`` is a 2-D
``nnx.Linear``, so the 3-D DenseGeneral kernels are reshaped to 2-D matrices with the same math:
q/k/v kernels (d_model, heads, head_dim) become (d_model, heads·head_dim) and their outputs are
reshaped to (…, heads, head_dim); the output kernel (heads, head_dim, d_model) becomes
(heads·head_dim, d_model) applied to the flattened heads. ``nnx.LoRA`` has no scale, so
`ScaledLoRALinear` multiplies its branch by α/r, as jlora and PEFT do.

The parameter tree of `GPT`::

    params/embed/embedding                       (vocab, d_model)
    params/pos_embed                             (seq, d_model)
    params/blocks_0/ln1/{scale,bias}
    params/blocks_0/attn/{q,k,v}/{kernel,bias}   (d_model, heads, head_dim), (heads, head_dim)
    params/blocks_0/attn/o/{kernel,bias}         (heads, head_dim, d_model), (d_model,)
    params/blocks_0/ln2/{scale,bias}
    params/blocks_0/mlp/up/{kernel,bias}         (d_model, d_ff)
    params/blocks_0/mlp/down/{kernel,bias}       (d_ff, d_model)
    ...                                          (blocks_0 .. blocks_{n-1})
    params/ln_f/{scale,bias}
    params/head/{kernel,bias}                    (d_model, vocab)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

LN_EPS = 1e-6  # Flax's LayerNorm default, also given to torch
LORA_TARGETS = ("q", "k", "v", "o", "up", "down")
# re.fullmatch pattern for jlora.LoraConfig.targets: the six adapted kernels of every block.
LORA_TARGET_REGEX = r"params/blocks_\d+/(attn/(q|k|v|o)|mlp/(up|down))/kernel"


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTConfig:
  """Sizes of the benchmark decoder; the defaults are BENCHMARK.md's workload.

  Attributes:
    vocab: vocabulary size.
    d_model: model width.
    blocks: number of decoder blocks.
    head_dim: width of one attention head; heads = d_model // head_dim.
    seq: sequence length (also the positional table's length).
    dtype: computation dtype of the layers; parameters are created in float32.
  """

  vocab: int = 1024
  d_model: int = 512
  blocks: int = 4
  head_dim: int = 64
  seq: int = 128
  dtype: Any = jnp.float32

  def __post_init__(self):
    if self.d_model % self.head_dim:
      raise ValueError(f"GPTConfig: d_model must be a multiple of head_dim, got "
                       f"{self.d_model=}, {self.head_dim=}.")

  @property
  def heads(self) -> int:
    return self.d_model // self.head_dim

  @property
  def d_ff(self) -> int:
    return 4 * self.d_model


# ----------------------------------------------------------------------------------------------
# Linen.


class Attention(nn.Module):
  config: GPTConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    shape = (c.heads, c.head_dim)
    q = nn.DenseGeneral(shape, dtype=c.dtype, name="q")(x)
    k = nn.DenseGeneral(shape, dtype=c.dtype, name="k")(x)
    v = nn.DenseGeneral(shape, dtype=c.dtype, name="v")(x)
    y = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return nn.DenseGeneral(c.d_model, axis=(-2, -1), dtype=c.dtype, name="o")(y)


class Mlp(nn.Module):
  config: GPTConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    h = nn.gelu(nn.Dense(c.d_ff, dtype=c.dtype, name="up")(x), approximate=True)
    return nn.Dense(c.d_model, dtype=c.dtype, name="down")(h)


class Block(nn.Module):
  config: GPTConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    x = x + Attention(c, name="attn")(nn.LayerNorm(LN_EPS, dtype=c.dtype, name="ln1")(x))
    return x + Mlp(c, name="mlp")(nn.LayerNorm(LN_EPS, dtype=c.dtype, name="ln2")(x))


class GPT(nn.Module):
  """The benchmark decoder: int tokens (batch, seq) -> logits (batch, seq, vocab)."""

  config: GPTConfig

  @nn.compact
  def __call__(self, tokens):
    c = self.config
    x = nn.Embed(c.vocab, c.d_model, dtype=c.dtype, name="embed")(tokens)
    pos = self.param("pos_embed", nn.initializers.normal(0.02), (c.seq, c.d_model))
    x = x + pos[None, : tokens.shape[1], :].astype(x.dtype)
    for i in range(c.blocks):
      x = Block(c, name=f"blocks_{i}")(x)
    x = nn.LayerNorm(LN_EPS, dtype=c.dtype, name="ln_f")(x)
    return nn.Dense(c.vocab, dtype=c.dtype, name="head")(x)


def init_variables(config: GPTConfig, seed: int = 0) -> dict[str, Any]:
  """Seeded `GPT` variables, GPT-2 style: weights N(0, 0.02²), biases 0, norm scales 1.

  Drawn with NumPy into the tree `GPT.init` would make (its structure from `jax.eval_shape`),
  which takes a fraction of the time of compiling ``GPT.init``.
  """
  tokens = jax.ShapeDtypeStruct((1, config.seq), jnp.int32)
  shapes = jax.eval_shape(GPT(config).init, jax.random.key(0), tokens)
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name = path[-1].key
    if name == "bias":
      x = np.zeros(s.shape, np.float32)
    elif name == "scale":
      x = np.ones(s.shape, np.float32)
    else:
      x = (0.02 * rng.standard_normal(s.shape)).astype(np.float32)
    return jnp.asarray(x, s.dtype)

  return jax.tree.map_with_path(leaf, shapes)


def next_token_loss(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """Mean cross-entropy of logits (batch, seq, vocab) against tokens (batch, seq + 1)[:, 1:]."""
  logits = logits.astype(jnp.float32)
  labels = tokens[:, 1:]
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.take_along_axis(logp, labels[..., None], axis=-1).mean()


# ----------------------------------------------------------------------------------------------
# NNX with Flax's own LoRA layers.


class ScaledLoRALinear(nnx.LoRALinear):
  """``nnx.LoRALinear`` whose low-rank branch is scaled: y = x·W + b + s·(x·A)·B."""

  def __init__(self, in_features: int, out_features: int, *, scale: float, **kwargs):
    super().__init__(in_features, out_features, **kwargs)
    self.scale = scale

  def __call__(self, x):
    return nnx.Linear.__call__(self, x) + self.scale * self.lora(x)


class NnxBlock(nnx.Module):
  def __init__(self, c: GPTConfig, rank: int, scale: float, rngs: nnx.Rngs):
    def lora(n_in, n_out):
      return ScaledLoRALinear(n_in, n_out, scale=scale, lora_rank=rank, dtype=c.dtype,
                              lora_dtype=c.dtype, rngs=rngs)

    d = c.d_model
    self.config = c
    self.ln1 = nnx.LayerNorm(d, epsilon=LN_EPS, dtype=c.dtype, rngs=rngs)
    self.q, self.k, self.v, self.o = lora(d, d), lora(d, d), lora(d, d), lora(d, d)
    self.ln2 = nnx.LayerNorm(d, epsilon=LN_EPS, dtype=c.dtype, rngs=rngs)
    self.up, self.down = lora(d, c.d_ff), lora(c.d_ff, d)

  def __call__(self, x):
    c = self.config
    b, t, d = x.shape
    h = self.ln1(x)
    split = lambda y: y.reshape(b, t, c.heads, c.head_dim)  # noqa: E731
    y = jax.nn.dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)),
                                     is_causal=True)
    x = x + self.o(y.reshape(b, t, d))
    return x + self.down(nnx.gelu(self.up(self.ln2(x)), approximate=True))


class NnxLoraGPT(nnx.Module):
  """`GPT` in NNX with ``nnx.LoRALinear`` (scaled) on q, k, v, o, up and down."""

  def __init__(self, c: GPTConfig, rank: int, scale: float, rngs: nnx.Rngs):
    self.config = c
    self.embed = nnx.Embed(c.vocab, c.d_model, dtype=c.dtype, rngs=rngs)
    self.pos_embed = nnx.Param(jnp.zeros((c.seq, c.d_model)))
    self.blocks = nnx.List([NnxBlock(c, rank, scale, rngs) for _ in range(c.blocks)])
    self.ln_f = nnx.LayerNorm(c.d_model, epsilon=LN_EPS, dtype=c.dtype, rngs=rngs)
    self.head = nnx.Linear(c.d_model, c.vocab, dtype=c.dtype, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    x = x + self.pos_embed[...][None, : tokens.shape[1], :].astype(x.dtype)
    for block in self.blocks:
      x = block(x)
    return self.head(self.ln_f(x))


def linear_weights(params, block: int, name: str) -> tuple[np.ndarray, np.ndarray]:
  """(kernel as (fan_in, fan_out), bias as (fan_out,)) of one adapted layer of `GPT`."""
  group = "mlp" if name in ("up", "down") else "attn"
  layer = params[f"blocks_{block}"][group][name]
  kernel, bias = np.asarray(layer["kernel"]), np.asarray(layer["bias"])
  fan_out = bias.size
  return kernel.reshape(-1, fan_out), bias.reshape(fan_out)


def lora_path(block: int, name: str) -> str:
  """The jlora adapter path of one adapted kernel of `GPT`."""
  group = "mlp" if name in ("up", "down") else "attn"
  return f"params/blocks_{block}/{group}/{name}/kernel"


def nnx_lora_model(config: GPTConfig, variables, adapter, rank: int, scale: float) -> NnxLoraGPT:
  """`NnxLoraGPT` holding the weights of `GPT` `variables` and the factors of a jlora adapter.

  Each ``nnx.LoRA`` gets ``lora_a = Aᵀ`` (fan_in, r) and ``lora_b = B`` (r, fan_out) of the
  adapter's factors for the same kernel, so both models compute the same function. The module
  is built abstractly (`nnx.eval_shape`) and every variable is then set, so nothing is
  initialised twice.
  """
  p = variables["params"]
  model = nnx.eval_shape(lambda: NnxLoraGPT(config, rank, scale, nnx.Rngs(0)))
  put = lambda var, x: var.set_value(jnp.asarray(x))  # noqa: E731
  put(model.embed.embedding, p["embed"]["embedding"])
  put(model.pos_embed, p["pos_embed"])
  for i, block in enumerate(model.blocks):
    src = p[f"blocks_{i}"]
    for ln in ("ln1", "ln2"):
      put(getattr(block, ln).scale, src[ln]["scale"])
      put(getattr(block, ln).bias, src[ln]["bias"])
    for name in LORA_TARGETS:
      layer = getattr(block, name)
      kernel, bias = linear_weights(p, i, name)
      put(layer.kernel, kernel)
      put(layer.bias, bias)
      factors = adapter.lora[lora_path(i, name)]
      put(layer.lora.lora_a, jnp.asarray(factors.a).T)
      put(layer.lora.lora_b, factors.b)
  for dst, src in ((model.ln_f, p["ln_f"]), (model.head, p["head"])):
    for name, value in src.items():
      put(getattr(dst, name), value)
  unset = [leaf for leaf in jax.tree.leaves(nnx.state(model))
           if isinstance(leaf, jax.ShapeDtypeStruct)]
  if unset:
    raise ValueError(f"nnx_lora_model: {len(unset)} NNX variables were not loaded.")
  return model
