"""`benchmarks.model.GPT` in PyTorch, loading the weights of the Flax model, for PEFT comparisons.

Every linear layer is a ``torch.nn.Linear`` named as in Flax (``q``, ``k``, ``v``, ``o``, ``up``,
``down``, ``head``), whose weight is the Flax kernel reshaped to (fan_in, fan_out) and
transposed; attention is ``F.scaled_dot_product_attention`` with a causal mask, LayerNorm uses
Flax's epsilon and gelu its tanh approximation. Importing this module needs torch; `peft_model`
also needs peft.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.model import LN_EPS, LORA_TARGETS, GPTConfig, linear_weights, lora_path


def _tensor(x) -> torch.Tensor:
  return torch.from_numpy(np.array(x, dtype=np.float32))


class TorchBlock(nn.Module):
  def __init__(self, c: GPTConfig):
    super().__init__()
    d = c.d_model
    self.heads, self.head_dim = c.heads, c.head_dim
    self.ln1 = nn.LayerNorm(d, eps=LN_EPS)
    self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
    self.ln2 = nn.LayerNorm(d, eps=LN_EPS)
    self.up, self.down = nn.Linear(d, c.d_ff), nn.Linear(c.d_ff, d)

  def forward(self, x):
    b, t, d = x.shape
    h = self.ln1(x)
    split = lambda y: y.view(b, t, self.heads, self.head_dim).transpose(1, 2)  # noqa: E731
    y = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)),
                                       is_causal=True)
    x = x + self.o(y.transpose(1, 2).reshape(b, t, d))
    return x + self.down(F.gelu(self.up(self.ln2(x)), approximate="tanh"))


class TorchGPT(nn.Module):
  """The benchmark decoder: int64 tokens (batch, seq) -> logits (batch, seq, vocab)."""

  def __init__(self, c: GPTConfig):
    super().__init__()
    self.embed = nn.Embedding(c.vocab, c.d_model)
    self.pos_embed = nn.Parameter(torch.zeros(c.seq, c.d_model))
    self.blocks = nn.ModuleList(TorchBlock(c) for _ in range(c.blocks))
    self.ln_f = nn.LayerNorm(c.d_model, eps=LN_EPS)
    self.head = nn.Linear(c.d_model, c.vocab)

  def forward(self, tokens):
    x = self.embed(tokens) + self.pos_embed[: tokens.shape[1]]
    for block in self.blocks:
      x = block(x)
    return self.head(self.ln_f(x))


def _load_linear(layer: nn.Linear, kernel, bias) -> None:
  layer.weight.copy_(_tensor(kernel).T)
  layer.bias.copy_(_tensor(bias))


def _load_norm(layer: nn.LayerNorm, p) -> None:
  layer.weight.copy_(_tensor(p["scale"]))
  layer.bias.copy_(_tensor(p["bias"]))


@torch.no_grad()
def torch_model(config: GPTConfig, variables) -> TorchGPT:
  """A float32 `TorchGPT` (on the CPU) holding the weights of the Flax `GPT` `variables`."""
  p = variables["params"]
  model = TorchGPT(config)
  model.embed.weight.copy_(_tensor(p["embed"]["embedding"]))
  model.pos_embed.copy_(_tensor(p["pos_embed"]))
  for i, block in enumerate(model.blocks):
    _load_norm(block.ln1, p[f"blocks_{i}"]["ln1"])
    _load_norm(block.ln2, p[f"blocks_{i}"]["ln2"])
    for name in LORA_TARGETS:
      _load_linear(getattr(block, name), *linear_weights(p, i, name))
  _load_norm(model.ln_f, p["ln_f"])
  _load_linear(model.head, p["head"]["kernel"], p["head"]["bias"])
  return model


@torch.no_grad()
def peft_model(config: GPTConfig, variables, adapter, rank: int, alpha: float):
  """`torch_model` wrapped by PEFT LoRA on q, k, v, o, up and down, with the adapter's A, B = 0.

  PEFT's ``lora_A.weight`` is (r, fan_in), the layout of jlora's A, and its scale is α/r.
  """
  import peft  # optional dependency

  lora_config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                target_modules=list(LORA_TARGETS), bias="none")
  model = peft.get_peft_model(torch_model(config, variables), lora_config)
  for i, block in enumerate(model.base_model.model.blocks):
    for name in LORA_TARGETS:
      layer = getattr(block, name)
      factors = adapter.lora[lora_path(i, name)]
      layer.lora_A["default"].weight.copy_(_tensor(factors.a))
      layer.lora_B["default"].weight.copy_(_tensor(factors.b).T)
  return model
