"""Test models written the way real codebases write them, without Flax's layer classes.

Each builder returns a `Case`: the function to adapt, a random float32 parameter tree (drawn
with NumPy, so no XLA compilation is spent on it), example inputs, the targets, and the axis
roles `jlora.init` must read from the program. The models follow their sources closely:

* Gemma (linen): its own `Einsum` layer with a param named ``w`` and the equation given at call
  time, multi-axis q / kv / attention-output kernels, the gated feed-forward that slices one
  ``(2, D, F)`` kernel, and the `Embedder` whose table is read by indexing and by
  ``x @ table.T``;
* HF GPT-2's `FlaxConv1D` and torch-ported linear layers: kernels stored (out, in);
* tunix (NNX): ``nnx.Param`` used through `jnp.einsum` and `jax.lax.dot_general`;
* lab code: plain functions of a dict of arrays, `jax.checkpoint` with a policy, `lax.cond`,
  `jax.jit`-decorated helpers, `fori_loop` / `while_loop`, an RNN `lax.scan`, a scanned stack
  of weights, a kernel also used elementwise, and per-expert weights.

Dimensions are small (8-32) and distinct where the compiled-step checks need to tell the
token count from every kernel axis: batch 2 x seq 7 = 14 tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jlora import AxisRoles

B, T, D, N, K, H, F, V, L, E = 2, 7, 24, 2, 1, 8, 32, 32, 3, 4
F_EXPERT = 16  # small: E · D · F_EXPERT parameters per expert kernel
TOKENS = B * T


class Case(NamedTuple):
  """One model to test.

  Attributes:
    fn: ``fn(tree, *args)``: what `jlora.init` and `jlora.wrap` get (for NNX, the graphdef).
    tree: the parameter tree (linen variables, a dict of arrays, or an ``nnx.State``).
    args: example inputs.
    targets: the `LoraConfig.targets` regex.
    roles: ``{path: AxisRoles}`` that init must record for every target.
    ref: ``ref(tree, *args)``, the model itself (the reference runs it on merged kernels).
    module: for NNX, the module (what `jlora.init` gets).
  """

  fn: Callable[..., Any]
  tree: Any
  args: tuple
  targets: str
  roles: dict[str, AxisRoles]
  ref: Callable[..., Any]
  module: Any = None


def dense(contracting, features, stacked=()) -> AxisRoles:
  return AxisRoles("dense", tuple(contracting), tuple(features), tuple(stacked))


EMBED = AxisRoles("embed", (0,), (1,))


# ----------------------------------------------------------------------------------------------
# Random arrays from NumPy.


def normal(shape, seed=0, scale=1.0, dtype=jnp.float32) -> jax.Array:
  rng = np.random.default_rng(seed)
  return jnp.asarray(scale * rng.standard_normal(shape).astype(np.float32), dtype)


def ids(shape, vocab=V, seed=0) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape, np.int32))


def fill(shapes, seed=11, scale=0.3):
  """A tree of the given ShapeDtypeStructs (or arrays) filled with scale · N(0, 1)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype), shapes)


def _linen_case(model: nn.Module, args, targets, roles, seed=11) -> Case:
  variables = fill(jax.eval_shape(model.init, jax.random.key(0), *args), seed)
  return Case(model.apply, variables, tuple(args), targets, roles, model.apply)


def _row_bias(bias, y):
  """`bias` shaped to add to `y` without implicit rank promotion (the tests forbid it)."""
  return bias.reshape((1,) * (y.ndim - 1) + (-1,))


# ----------------------------------------------------------------------------------------------
# 1. Gemma (linen): Einsum with a param named `w`, attention, gated feed-forward.


class GemmaEinsum(nn.Module):
  """Gemma's `layers.Einsum`: one param ``w``, the equation passed at call time."""

  shape: tuple[int, ...]

  @nn.compact
  def __call__(self, eqn: str, x):
    w = self.param("w", nn.initializers.normal(), self.shape)
    return jnp.einsum(eqn, x, w)


class GemmaAttention(nn.Module):
  """Gemma's attention: q ``BTD,NDH->BTNH``, kv ``BSD,CKDH->CBSKH`` (grouped), output
  ``BTNH,NHD->BTD``, a causal mask."""

  num_heads: int = N
  num_kv_heads: int = K
  features: int = D
  head_dim: int = H

  @nn.compact
  def __call__(self, x):
    q = GemmaEinsum((self.num_heads, self.features, self.head_dim), name="q_einsum")(
        "BTD,NDH->BTNH", x)
    key, value = GemmaEinsum((2, self.num_kv_heads, self.features, self.head_dim),
                             name="kv_einsum")("BSD,CKDH->CBSKH", x)
    repeat = self.num_heads // self.num_kv_heads
    key, value = jnp.repeat(key, repeat, axis=2), jnp.repeat(value, repeat, axis=2)
    logits = jnp.einsum("BTNH,BSNH->BTNS", q * self.head_dim**-0.5, key)
    causal = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))
    logits = jnp.where(causal[None, :, None, :], logits, -1e9)
    probs = jax.nn.softmax(logits, axis=-1)
    encoded = jnp.einsum("BTNS,BSNH->BTNH", probs, value)
    return GemmaEinsum((self.num_heads, self.head_dim, self.features), name="attn_vec_einsum")(
        "BTNH,NHD->BTD", encoded)


class GemmaFeedForward(nn.Module):
  """Gemma's gated MLP: one ``(2, D, F)`` kernel sliced into gate and up, then ``linear``."""

  features: int = D
  hidden_dim: int = F

  @nn.compact
  def __call__(self, x):
    w_gating = self.param("gating_einsum", nn.initializers.normal(),
                          (2, self.features, self.hidden_dim))
    gate = nn.gelu(jnp.dot(x, w_gating[0]))
    activations = gate * jnp.dot(x, w_gating[1])
    w_linear = self.param("linear", nn.initializers.normal(), (self.hidden_dim, self.features))
    return jnp.dot(activations, w_linear)


def gemma_attention(seed=11) -> Case:
  roles = {
      "params/q_einsum/w": dense((1,), (0, 2)),
      "params/kv_einsum/w": dense((2,), (0, 1, 3)),
      "params/attn_vec_einsum/w": dense((0, 1), (2,)),
  }
  return _linen_case(GemmaAttention(), (normal((B, T, D), 1),), r"params/.*/w", roles, seed)


def gemma_feed_forward() -> Case:
  # `gating_einsum` is read through w[0] and w[1]: axis 1 is contracted, axis 2 an output; how
  # axis 0 is recorded (stacked or an output) is the implementation's choice, checked by value.
  roles = {"params/gating_einsum": dense((1,), (0, 2)), "params/linear": dense((0,), (1,))}
  return _linen_case(GemmaFeedForward(), (normal((B, T, D), 2),),
                     r"params/(gating_einsum|linear)", roles)


# ----------------------------------------------------------------------------------------------
# 2. Kernels stored (out, in): torch-ported Linear and HF's FlaxConv1D.


class TorchLinear(nn.Module):
  """A torch.nn.Linear ported as it is: ``weight`` (out, in), y = x @ weight.T + bias."""

  in_features: int
  out_features: int

  @nn.compact
  def __call__(self, x):
    weight = self.param("weight", nn.initializers.normal(), (self.out_features, self.in_features))
    bias = self.param("bias", nn.initializers.zeros, (self.out_features,))
    y = x @ weight.T
    return y + _row_bias(bias, y)


class HFConv1D(nn.Module):
  """transformers' `FlaxConv1D` (GPT-2): kernel (features, in), transposed, dot_general."""

  features: int

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.normal(), (self.features, x.shape[-1]))
    kernel = jnp.asarray(kernel.transpose(), x.dtype)
    y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    return y + _row_bias(bias, y)


class TorchStyleMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.gelu(HFConv1D(F, name="c_fc")(x))
    h = HFConv1D(D, name="c_proj")(h)
    return TorchLinear(D, D, name="out")(x + h)


def torch_style_mlp() -> Case:
  roles = {"params/c_fc/kernel": dense((1,), (0,)), "params/c_proj/kernel": dense((1,), (0,)),
           "params/out/weight": dense((1,), (0,))}
  return _linen_case(TorchStyleMLP(), (normal((B, T, D), 3),), r"params/.*/(kernel|weight)",
                     roles)


# ----------------------------------------------------------------------------------------------
# 3. Gemma's Embedder: a table read by indexing (or jnp.take) and by x @ table.T.


class Embedder(nn.Module):
  vocab_size: int
  embed_dim: int
  lookup: str = "index"

  def setup(self):
    self.input_embedding_table = self.param(
        "input_embedding", nn.initializers.normal(), (self.vocab_size, self.embed_dim))

  def encode(self, tokens):
    table = self.input_embedding_table
    if self.lookup == "index":
      x = table[(tokens,)]
    else:
      x = jnp.take(table, tokens, axis=0)
    return x * jnp.sqrt(self.embed_dim).astype(x.dtype)

  def decode(self, x):
    return jnp.dot(x, self.input_embedding_table.T)


class TiedLM(nn.Module):
  lookup: str = "index"

  @nn.compact
  def __call__(self, tokens):
    embedder = Embedder(V, D, self.lookup, name="embedder")
    x = embedder.encode(tokens)
    x = x + jnp.tanh(GemmaEinsum((D, D), name="mix")("BTD,DE->BTE", x))
    return embedder.decode(x)


def tied_lm(lookup: str = "index") -> Case:
  roles = {"params/embedder/input_embedding": EMBED, "params/mix/w": dense((0,), (1,))}
  return _linen_case(TiedLM(lookup), (ids((B, T), V, 4),),
                     r"params/(embedder/input_embedding|mix/w)", roles)


# ----------------------------------------------------------------------------------------------
# 4. NNX (tunix style): nnx.Param through jnp.einsum and jax.lax.dot_general.


class NNXEinsum(nnx.Module):
  """tunix's `Einsum`: an ``nnx.Param`` named ``w`` and a fixed equation."""

  def __init__(self, einsum_str: str, shape, *, rngs: nnx.Rngs):
    self.einsum_str = einsum_str
    self.w = nnx.Param(nnx.initializers.normal()(rngs.params(), shape))

  def __call__(self, x):
    return jnp.einsum(self.einsum_str, x, self.w[...])


class NNXDot(nnx.Module):
  """A projection written with `jax.lax.dot_general` on an ``nnx.Param`` (not nnx.Linear)."""

  def __init__(self, d_in: int, d_out: int, *, rngs: nnx.Rngs):
    self.kernel = nnx.Param(nnx.initializers.normal()(rngs.params(), (d_in, d_out)))

  def __call__(self, x):
    return jax.lax.dot_general(x, self.kernel[...], (((x.ndim - 1,), (0,)), ((), ())))


class NNXBlock(nnx.Module):
  """Attention (einsum projections, multi-axis) and a gated MLP (dot_general projections)."""

  def __init__(self, rngs: nnx.Rngs):
    self.q_proj = NNXEinsum("BTD,DNH->BTNH", (D, N, H), rngs=rngs)
    self.k_proj = NNXEinsum("BSD,DNH->BSNH", (D, N, H), rngs=rngs)
    self.v_proj = NNXEinsum("BSD,DNH->BSNH", (D, N, H), rngs=rngs)
    self.o_proj = NNXEinsum("BTNH,NHD->BTD", (N, H, D), rngs=rngs)
    self.gate_proj = NNXDot(D, F, rngs=rngs)
    self.up_proj = NNXDot(D, F, rngs=rngs)
    self.down_proj = NNXDot(F, D, rngs=rngs)
    self.scale = nnx.Param(jnp.ones((D,)))

  def __call__(self, x):
    q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    probs = jax.nn.softmax(jnp.einsum("BTNH,BSNH->BNTS", q, k) * H**-0.5, axis=-1)
    x = x + self.o_proj(jnp.einsum("BNTS,BSNH->BTNH", probs, v))
    h = x * self.scale[...][None, None, :]
    return x + self.down_proj(jax.nn.silu(self.gate_proj(h)) * self.up_proj(h))


def nnx_block() -> Case:
  graphdef, shapes = nnx.split(nnx.eval_shape(lambda: NNXBlock(nnx.Rngs(0))))
  state = fill(shapes, seed=12)
  roles = {
      "q_proj/w": dense((0,), (1, 2)), "k_proj/w": dense((0,), (1, 2)),
      "v_proj/w": dense((0,), (1, 2)), "o_proj/w": dense((0, 1), (2,)),
      "gate_proj/kernel": dense((0,), (1,)), "up_proj/kernel": dense((0,), (1,)),
      "down_proj/kernel": dense((0,), (1,)),
  }
  ref = lambda state, *args: nnx.merge(graphdef, state)(*args)  # noqa: E731
  return Case(graphdef, state, (normal((B, T, D), 5),), r".*/(w|kernel)", roles, ref,
              module=nnx.merge(graphdef, state))


# ----------------------------------------------------------------------------------------------
# 5. A plain function of a dict of arrays.


def mlp(params, x):
  h = x @ params["w1"]
  h = jax.nn.gelu(h + params["b1"][None, :])
  return h @ params["w2"]


def mlp_params(seed=13, dtype=jnp.float32):
  return {"w1": normal((D, F), seed, 0.3, dtype), "b1": normal((F,), seed + 1, 0.3, dtype),
          "w2": normal((F, D), seed + 2, 0.3, dtype)}


def dict_mlp(batch=B * T) -> Case:
  roles = {"w1": dense((0,), (1,)), "w2": dense((0,), (1,))}
  return Case(mlp, mlp_params(), (normal((batch, D), 6),), r"w\d", roles, mlp)


# ----------------------------------------------------------------------------------------------
# 6. Control flow: nn.scan + nn.remat of custom layers, checkpoint policies, cond, jit, loops.


class ScanBody(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    w_in = self.param("w_in", nn.initializers.normal(), (D, N, H))
    w_out = self.param("w_out", nn.initializers.normal(), (N, H, D))
    h = jnp.tanh(jnp.einsum("btd,dnh->btnh", x, w_in))
    return x + jnp.einsum("btnh,nhd->btd", h, w_out), None


class ScannedStack(nn.Module):
  layers: int = L

  @nn.compact
  def __call__(self, x):
    stack = nn.scan(nn.remat(ScanBody), variable_axes={"params": 0},
                    split_rngs={"params": True}, length=self.layers)
    return stack(name="layers")(x, None)[0]


def scanned_stack() -> Case:
  roles = {"params/layers/w_in": dense((1,), (2, 3), (0,)),
           "params/layers/w_out": dense((1, 2), (3,), (0,))}
  return _linen_case(ScannedStack(), (normal((B, T, D), 7),), r"params/layers/w_(in|out)", roles)


def _block(params, x):
  return x + jnp.tanh(x @ params["w1"]) @ params["w2"]


def _checkpointed(policy):
  def fn(params, x):
    return jax.checkpoint(_block, policy=policy)(params, x)

  return fn


def _cond(params, x):
  """Two uses of w1, chosen at run time; w2 after the cond."""
  h = jax.lax.cond(jnp.sum(x) > 0,
                   lambda p, x: x @ p["w1"],
                   lambda p, x: jnp.einsum("bd,df->bf", jnp.tanh(x), p["w1"]),
                   params, x)
  return jnp.tanh(h) @ params["w2"]


@jax.jit
def _jitted_project(x, w):
  return x @ w


def _jit_inner(params, x):
  return _jitted_project(jnp.tanh(_jitted_project(x, params["w1"])), params["w2"])


def _fori(params, x):
  h = jax.lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ params["w"]), x)
  return h @ params["w2"]


def _while(params, x):
  def body(carry):
    i, h = carry
    return i + 1, jnp.tanh(h @ params["w"])

  _, h = jax.lax.while_loop(lambda carry: carry[0] < 3, body, (0, x))
  return h @ params["w2"]


def _scan_weights(params, x):
  """A stack of L square kernels run by lax.scan (the layer axis sliced)."""
  h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, params["ws"])
  return h @ params["w2"]


def _rnn(params, xs):
  """An Elman RNN: a time-major lax.scan that closes over both kernels."""
  h0 = jnp.zeros((xs.shape[0], F), xs.dtype)

  def step(h, x_t):
    h = jnp.tanh(x_t @ params["w_x"] + h @ params["w_h"])
    return h, h

  _, hs = jax.lax.scan(step, h0, jnp.swapaxes(xs, 0, 1))
  return jnp.swapaxes(hs, 0, 1)


_SQUARE = {"w": normal((D, D), 20, 0.3), "w2": normal((D, F), 21, 0.3)}

CONTROL_FLOW = {
    # name: (fn, params, x, roles); every fn differentiable except while_loop
    "checkpoint_nothing_saveable": (
        _checkpointed(jax.checkpoint_policies.nothing_saveable), mlp_params(22),
        {"w1": dense((0,), (1,)), "w2": dense((0,), (1,))}),
    "checkpoint_dots_saveable": (
        _checkpointed(jax.checkpoint_policies.dots_saveable), mlp_params(23),
        {"w1": dense((0,), (1,)), "w2": dense((0,), (1,))}),
    "cond": (_cond, mlp_params(24), {"w1": dense((0,), (1,)), "w2": dense((0,), (1,))}),
    "jit_inner": (_jit_inner, mlp_params(25), {"w1": dense((0,), (1,)), "w2": dense((0,), (1,))}),
    "fori_loop": (_fori, _SQUARE, {"w": dense((0,), (1,)), "w2": dense((0,), (1,))}),
    "while_loop": (_while, _SQUARE, {"w": dense((0,), (1,)), "w2": dense((0,), (1,))}),
    "scan_weights": (
        _scan_weights, {"ws": normal((L, D, D), 26, 0.3), "w2": normal((D, F), 27, 0.3)},
        {"ws": dense((1,), (2,), (0,)), "w2": dense((0,), (1,))}),
    "rnn": (_rnn, {"w_x": normal((D, F), 28, 0.3), "w_h": normal((F, F), 29, 0.3)},
            {"w_x": dense((0,), (1,)), "w_h": dense((0,), (1,))}),
}


def control_flow(name: str, sign: float = 1.0) -> Case:
  fn, params, roles = CONTROL_FLOW[name]
  x = normal((B, T, D), 30) if name == "rnn" else normal((B * T, D), 30)
  x = jnp.abs(x) * sign if name == "cond" else x
  return Case(fn, params, (x,), "|".join(roles), roles, fn)


# ----------------------------------------------------------------------------------------------
# Layout ops on a kernel before its contraction: a fused kernel reshaped or split, a cast.


def _fused_qkv(params, x):
  """One (D, 3·N·H) kernel reshaped to (D, 3, N, H) and contracted once: q, k, v."""
  w = params["qkv"].reshape(x.shape[-1], 3, N, H)
  q, k, v = jnp.einsum("btd,dcnh->cbtnh", x, w)
  probs = jax.nn.softmax(jnp.einsum("btnh,bsnh->bnts", q, k) * H**-0.5, axis=-1)
  o = jnp.einsum("bnts,bsnh->btnh", probs, v)
  return o.reshape(*o.shape[:2], N * H) @ params["out"]


def _split_columns(params, x):
  """One (D, 2·16) kernel split into gate and up halves by slicing."""
  w = params["w"]
  half = w.shape[1] // 2
  return (jax.nn.silu(x @ w[:, :half]) * (x @ w[:, half:])) @ params["w2"]


def _bf16_compute(params, x):
  """float32 params cast to bfloat16 at the use, as mixed-precision models do."""
  h = x.astype(jnp.bfloat16) @ params["w1"].astype(jnp.bfloat16)
  h = jax.nn.gelu(h.astype(jnp.float32) + params["b1"][None, :])
  return h.astype(jnp.bfloat16) @ params["w2"].astype(jnp.bfloat16)


def _split_fused_gate_up(params, x):
  """One fused (D, 2F) kernel cut with jnp.split into gate and up, and a frozen copy of the
  output projection (a reference pass under stop_gradient)."""
  gate, up = jnp.split(params["gate_up"], 2, axis=1)
  h = jax.nn.gelu(x @ gate) * (x @ up)
  return h @ params["down"] + 0.1 * (h @ jax.lax.stop_gradient(params["down"]))


LAYOUT = {
    "fused_qkv_reshape": (
        _fused_qkv, {"qkv": normal((D, 3 * N * H), 42, 0.3), "out": normal((N * H, D), 43, 0.3)},
        {"qkv": dense((0,), (1,)), "out": dense((0,), (1,))}, (B, T, D)),
    "split_columns": (
        _split_columns, {"w": normal((D, 32), 44, 0.3), "w2": normal((16, D), 45, 0.3)},
        {"w": dense((0,), (1,)), "w2": dense((0,), (1,))}, (TOKENS, D)),
    "split_fused_gate_up_and_stop_gradient": (
        _split_fused_gate_up,
        {"gate_up": normal((D, 32), 49, 0.3), "down": normal((16, D), 50, 0.3)},
        {"gate_up": dense((0,), (1,)), "down": dense((0,), (1,))}, (TOKENS, D)),
}


def layout(name: str) -> Case:
  fn, params, roles, shape = LAYOUT[name]
  return Case(fn, params, (normal(shape, 46),), "|".join(roles), roles, fn)


def bf16_compute() -> Case:
  roles = {"w1": dense((0,), (1,)), "w2": dense((0,), (1,))}
  return Case(_bf16_compute, mlp_params(47), (normal((TOKENS, D), 48),), r"w\d", roles,
              _bf16_compute)


# ----------------------------------------------------------------------------------------------
# More ways lab code reads one kernel: as the left operand, transposed for a tied decoder, or
# shared by several layers.


def _column_convention(params, x):
  """y = W·xᵀ with W (out, in): the kernel is the left operand of the dot."""
  return jnp.tanh(params["W"] @ x.T).T @ params["W"]


def _tied_autoencoder(params, x):
  return jnp.tanh(x @ params["w"]) @ params["w"].T


def _shared_layers(params, x):
  """ALBERT-style: one kernel applied by three layers (a Python loop, three contractions)."""
  for _ in range(3):
    x = jnp.tanh(x @ params["w"])
  return x


USES = {
    "kernel_as_left_operand": (_column_convention, {"W": normal((F, D), 54, 0.3)},
                               {"W": dense((1,), (0,))}),
    "tied_autoencoder": (_tied_autoencoder, {"w": normal((D, F), 55, 0.3)},
                         {"w": dense((0,), (1,))}),
    "shared_layers": (_shared_layers, {"w": normal((D, D), 56, 0.2)}, {"w": dense((0,), (1,))}),
}


def uses(name: str) -> Case:
  fn, params, roles = USES[name]
  return Case(fn, params, (normal((TOKENS, D), 57),), "|".join(roles), roles, fn)


# ----------------------------------------------------------------------------------------------
# Convolutions written with jax.lax: Flax's layout (HWIO) and torch's (OIHW).


def _conv_hwio(params, x):
  y = jax.lax.conv_general_dilated(x, params["w"], (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jax.nn.relu(y)


def _conv_oihw(params, x):
  y = jax.lax.conv_general_dilated(x, params["w"], (2, 1), ((1, 1), (0, 0)),
                                   dimension_numbers=("NCHW", "OIHW", "NCHW"))
  return jax.nn.relu(y)


CONVS = {
    # name: (fn, kernel shape, input shape, roles)
    "hwio": (_conv_hwio, (3, 3, 8, 16), (B, 9, 10, 8),
             AxisRoles("conv", (0, 1, 2), (3,))),
    "oihw_torch_layout": (_conv_oihw, (16, 8, 3, 3), (B, 8, 9, 10),
                          AxisRoles("conv", (1, 2, 3), (0,))),
}


def lax_conv(name: str) -> Case:
  fn, shape, x_shape, roles = CONVS[name]
  return Case(fn, {"w": normal(shape, 49, 0.3)}, (normal(x_shape, 50),), "w", {"w": roles}, fn)


# ----------------------------------------------------------------------------------------------
# A custom_vjp matmul (quantized or fused kernels are written so): no factored rule applies.


@jax.custom_vjp
def custom_matmul(x, w):
  return x @ w


def _custom_matmul_fwd(x, w):
  return x @ w, (x, w)


def _custom_matmul_bwd(res, g):
  x, w = res
  return g @ w.T, x.T @ g


custom_matmul.defvjp(_custom_matmul_fwd, _custom_matmul_bwd)


def custom_vjp_mlp(params, x):
  return jnp.tanh(custom_matmul(x, params["w1"])) @ params["w2"]


# ----------------------------------------------------------------------------------------------
# An nn.vmap ensemble: members' kernels stacked, the input broadcast to every member.


class Member(nn.Module):
  @nn.compact
  def __call__(self, x):
    return jnp.tanh(x @ self.param("w", nn.initializers.normal(), (D, F)))


class Ensemble(nn.Module):
  members: int = E

  @nn.compact
  def __call__(self, x):
    vmapped = nn.vmap(Member, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=None, out_axes=0, axis_size=self.members)
    return jnp.mean(vmapped(name="members")(x), axis=0)


def ensemble() -> Case:
  # Roles are not asserted: the member axis of the kernel is a free output axis of the dot.
  return _linen_case(Ensemble(), (normal((TOKENS, D), 51),), r"params/members/w", {})


# ----------------------------------------------------------------------------------------------
# 7. A kernel also used elementwise (a masked weight) beside its contraction.


def masked_use(params, x):
  w = params["proj"]["w"]
  mask = jnp.tril(jnp.ones(w.shape, w.dtype))
  return x @ w + jnp.tanh(x) @ (w * mask) + x @ params["other"]["w"]


def masked() -> Case:
  params = {"proj": {"w": normal((D, D), 31, 0.3)}, "other": {"w": normal((D, D), 32, 0.3)}}
  roles = {"proj/w": dense((0,), (1,)), "other/w": dense((0,), (1,))}
  return Case(masked_use, params, (normal((B * T, D), 33),), r"(proj|other)/w", roles,
              masked_use)


# ----------------------------------------------------------------------------------------------
# 8. Per-expert weights: einsum 'ted,edf->tef' (the expert axis a batch axis of the dot).


def moe(params, x):
  """A dense mixture of experts: every token through every expert, mixed by a router."""
  gates = jax.nn.softmax(x @ params["router"], axis=-1)
  xe = jnp.broadcast_to(x[:, None, :], (x.shape[0], E, x.shape[1]))
  h = jax.nn.gelu(jnp.einsum("ted,edf->tef", xe, params["w_up"]))
  y = jnp.einsum("tef,efd->ted", h, params["w_down"])
  return jnp.einsum("ted,te->td", y, gates)


def experts() -> Case:
  params = {"router": normal((D, E), 34, 0.3), "w_up": normal((E, D, F_EXPERT), 35, 0.3),
            "w_down": normal((E, F_EXPERT, D), 36, 0.3)}
  roles = {"w_up": dense((1,), (2,), (0,)), "w_down": dense((1,), (2,), (0,)),
           "router": dense((0,), (1,))}
  return Case(moe, params, (normal((TOKENS, D), 37),), r"w_(up|down)|router", roles, moe)


# ----------------------------------------------------------------------------------------------
# Two heads, one of them not run.


def two_heads(params, x, head: str = "a"):
  h = jnp.tanh(x @ params["body"])
  if head == "both":
    return h @ params["head_a"], h @ params["head_b"]
  return h @ params[f"head_{head}"]


def two_heads_params():
  return {"body": normal((D, F), 38, 0.3), "head_a": normal((F, D), 39, 0.3),
          "head_b": normal((F, D), 40, 0.3)}
