"""The benchmark decoder written as code jlora did not write: its own layers, no Flax Dense.

`CustomGPT` computes exactly what `benchmarks.model.GPT` computes, with the projections of
every block done the way other codebases do them:

* ``layout="einsum"`` — Gemma style: each projection is a param named ``w`` used by
  `jnp.einsum` over heads, q/k/v kernels (heads, d_model, head_dim) with
  ``"btd,ndh->btnh"``, the output (heads, head_dim, d_model) with ``"btnh,nhd->btd"``, the MLP
  ``"btd,df->btf"``;
* ``layout="out_in"`` — torch-ported style: each projection keeps a ``weight`` stored
  (out, in) and computes ``x @ weight.T + bias`` (HF GPT-2's Conv1D transposed, any port of
  ``torch.nn.Linear``); q/k/v produce (heads·head_dim) and are reshaped to heads.

`convert` lays out a `GPT` variables tree in either layout, so both start from the same
weights as the Flax model (their step-0 losses must match its).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from benchmarks.model import LN_EPS, GPTConfig

LAYOUTS = ("einsum", "out_in")
KERNEL_NAMES = {"einsum": "w", "out_in": "weight"}
LORA_TARGET_REGEX = {
    layout: rf"params/blocks_\d+/(attn/(q|k|v|o)|mlp/(up|down))/{name}"
    for layout, name in KERNEL_NAMES.items()
}


class Einsum(nn.Module):
  """Gemma's pattern: a param `w` and an einsum equation, plus a bias of the output's shape."""

  shape: tuple[int, ...]
  equation: str
  bias_shape: tuple[int, ...]

  @nn.compact
  def __call__(self, x):
    w = self.param("w", nn.initializers.normal(0.02), self.shape)
    b = self.param("bias", nn.initializers.zeros, self.bias_shape)
    y = jnp.einsum(self.equation, x, w)
    return y + b[(None,) * (y.ndim - b.ndim)]


class OutIn(nn.Module):
  """A torch-style linear layer: ``weight`` stored (out, in), y = x·weightᵀ + bias."""

  features: int

  @nn.compact
  def __call__(self, x):
    weight = self.param("weight", nn.initializers.normal(0.02), (self.features, x.shape[-1]))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    y = x @ weight.T
    return y + bias[(None,) * (y.ndim - 1)]


def _projections(c: GPTConfig, layout: str):
  """(qkv(name) -> x -> (b, t, heads, head_dim), out(y), up(x), down(h)) in `layout`."""
  n, h, d, f = c.heads, c.head_dim, c.d_model, c.d_ff
  if layout == "einsum":
    return (lambda name: Einsum((n, d, h), "btd,ndh->btnh", (n, h), name=name),
            Einsum((n, h, d), "btnh,nhd->btd", (d,), name="o"),
            Einsum((d, f), "btd,df->btf", (f,), name="up"),
            Einsum((f, d), "btf,fd->btd", (d,), name="down"))

  def qkv(name):
    layer = OutIn(n * h, name=name)
    return lambda x: layer(x).reshape(*x.shape[:-1], n, h)

  out = OutIn(d, name="o")
  return qkv, lambda y: out(y.reshape(*y.shape[:-2], n * h)), OutIn(f, name="up"), OutIn(
      d, name="down")


class Block(nn.Module):
  config: GPTConfig
  layout: str

  @nn.compact
  def __call__(self, x):
    c = self.config
    h = nn.LayerNorm(LN_EPS, name="ln1")(x)
    attn = _Attention(c, self.layout, name="attn")
    x = x + attn(h)
    h = nn.LayerNorm(LN_EPS, name="ln2")(x)
    return x + _Mlp(c, self.layout, name="mlp")(h)


class _Attention(nn.Module):
  config: GPTConfig
  layout: str

  @nn.compact
  def __call__(self, x):
    qkv, out, _, _ = _projections(self.config, self.layout)
    q, k, v = qkv("q")(x), qkv("k")(x), qkv("v")(x)
    return out(jax.nn.dot_product_attention(q, k, v, is_causal=True))


class _Mlp(nn.Module):
  config: GPTConfig
  layout: str

  @nn.compact
  def __call__(self, x):
    _, _, up, down = _projections(self.config, self.layout)
    return down(nn.gelu(up(x), approximate=True))


class CustomGPT(nn.Module):
  """`benchmarks.model.GPT` with its block projections in `layout` (float32 only)."""

  config: GPTConfig
  layout: str

  @nn.compact
  def __call__(self, tokens):
    c = self.config
    x = nn.Embed(c.vocab, c.d_model, name="embed")(tokens)
    pos = self.param("pos_embed", nn.initializers.normal(0.02), (c.seq, c.d_model))
    x = x + pos[None, : tokens.shape[1], :]
    for i in range(c.blocks):
      x = Block(c, self.layout, name=f"blocks_{i}")(x)
    return nn.Dense(c.vocab, name="head")(nn.LayerNorm(LN_EPS, name="ln_f")(x))


def convert(variables, layout: str):
  """A `GPT` variables tree laid out for `CustomGPT(config, layout)`: the same weights."""
  flat = traverse_util.flatten_dict(variables, sep="/")
  out = {}
  for path, x in flat.items():
    parent, _, leaf = path.rpartition("/")
    name = parent.rpartition("/")[2]
    in_block = "/blocks_" in path and name in ("q", "k", "v", "o", "up", "down")
    if not in_block:
      out[path] = x
    elif leaf == "bias":
      out[path] = x.reshape(-1) if layout == "out_in" else x
    elif layout == "einsum":
      out[f"{parent}/w"] = jnp.transpose(x, (1, 0, 2)) if name in "qkv" else x
    else:  # (in..., out...) -> (out, in)
      n_in = 2 if name == "o" else 1
      rows = x.reshape(int(jnp.prod(jnp.array(x.shape[:n_in]))), -1)
      out[f"{parent}/weight"] = rows.T
  return traverse_util.unflatten_dict(out, sep="/")
