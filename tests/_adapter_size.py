"""Bytes on disk of the benchmark workload's adapter checkpoint next to its base params.

The GPT of BENCHMARK.md (vocab 1024, d_model 512, 4 blocks, 8 heads of 64, MLP 2048, 128
positions) is built abstractly (`jax.eval_shape`): no base weight is ever materialised. The
LoRA of the benchmark (rank 8, α 16 on q, k, v, o, up, down: 24 kernels) is saved with
`jlora.checkpoint.save`. Run it as a script to print the figures:

  python tests/_adapter_size.py
"""

import dataclasses
import math
import os
import sys
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp

import jlora
from jlora import checkpoint

VOCAB, DIM, BLOCKS, HEADS, HEAD_DIM, MLP, SEQ = 1024, 512, 4, 8, 64, 2048, 128


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(name="ln1")(x)
    q, k, v = (nn.DenseGeneral((HEADS, HEAD_DIM), name=n)(h) for n in ("query", "key", "value"))
    mask = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))
    w = jnp.einsum("bqhd,bkhd->bhqk", q, k) / HEAD_DIM**0.5
    w = jax.nn.softmax(jnp.where(mask, w, -1e9), -1)
    x = x + nn.DenseGeneral(DIM, axis=(-2, -1), name="out")(jnp.einsum("bhqk,bkhd->bqhd", w, v))
    h = nn.gelu(nn.Dense(MLP, name="up")(nn.LayerNorm(name="ln2")(x)))
    return x + nn.Dense(DIM, name="down")(h)


class GPT(nn.Module):
  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(VOCAB, DIM, name="embed")(ids)
    x = x + self.param("pos", nn.initializers.normal(0.02), (SEQ, DIM))[None, : ids.shape[1]]
    for i in range(BLOCKS):
      x = Block(name=f"layers_{i}")(x)
    return nn.Dense(VOCAB, name="head")(nn.LayerNorm(name="ln_f")(x))


def measure(directory) -> dict:
  """Saves the benchmark adapter under `directory`; returns parameter counts and bytes."""
  model, ids = GPT(), jax.ShapeDtypeStruct((8, SEQ), jnp.int32)
  variables = jax.eval_shape(model.init, jax.random.key(0), ids)
  config = jlora.LoraConfig(rank=8, alpha=16.0,
                            targets=r".*/(query|key|value|out|up|down)/kernel")
  adapter = jlora.init(jax.random.key(1), variables, config, model.apply, ids)
  # A trained B is not zero (zeros would compress away): fill it with noise.
  noise = lambda f, i: jax.random.normal(jax.random.key(i), f.b.shape, f.b.dtype) / 100
  lora = {path: dataclasses.replace(f, b=noise(f, i))
          for i, (path, f) in enumerate(sorted(adapter.lora.items()))}
  adapter = jlora.Adapter(lora=lora, extras=adapter.extras)
  checkpoint.save(directory, 0, adapter, config=config)
  files = [os.path.join(root, name) for root, _, names in os.walk(os.path.join(directory, "0"))
           for name in names]
  leaves = jax.tree.leaves(variables)
  return {
      "adapter_params": jlora.num_params(adapter),
      "adapter_kernels": len(adapter.lora),
      "adapter_checkpoint_bytes": sum(os.path.getsize(f) for f in files),
      "base_params": sum(math.prod(x.shape) for x in leaves),
      "base_bytes": sum(math.prod(x.shape) * x.dtype.itemsize for x in leaves),
  }


if __name__ == "__main__":
  sizes = measure(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
  for name, value in sizes.items():
    print(f"{name}: {value:,}")
  ratio = sizes["base_bytes"] / sizes["adapter_checkpoint_bytes"]
  print(f"base bytes / adapter checkpoint bytes: {ratio:.1f}")
