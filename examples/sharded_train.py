r"""Sharded LoRA training: a frozen decoder split over a device mesh, the adapter sharded to match.

The story: the base model is too large for one device, so its kernels are split over a
`jax.sharding.Mesh`, FSDP style (over the "data" axis), Megatron style (over "model"), or both.
jlora derives every adapter factor's sharding from its kernel's, creates the adapter directly in
those shards, and the train step is a plain `jax.jit` with pinned `out_shardings`: XLA's SPMD
partitioner does all the communication.

    python examples/sharded_train.py                                 # FSDP on 8 devices
    python examples/sharded_train.py --layout tensor_parallel
    python examples/sharded_train.py --layout data_x_model --accumulate 2 --ckpt /tmp/lora_ckpt
    python examples/sharded_train.py --replicate                     # DDP-style adapter

Two processes on one machine (4 CPU devices each), as a dry run of a multi-host job::

    python examples/sharded_train.py --distributed --devices 4 --coordinator 127.0.0.1:12355 \
        --num-processes 2 --process-id 0 &
    python examples/sharded_train.py --distributed --devices 4 --coordinator 127.0.0.1:12355 \
        --num-processes 2 --process-id 1

On a CPU-only machine the script asks XLA for `--devices` fake CPU devices (default 8). On GPUs
or TPUs it uses the real ones; the same code runs on many hosts (see docs/multihost.md).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence

import jax

LAYOUTS = ("data_parallel", "fsdp", "tensor_parallel", "data_x_model")


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--layout", choices=LAYOUTS, default="fsdp")
  parser.add_argument("--devices", type=int, default=8, help="fake CPU devices, on CPU only")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
  parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per update")
  parser.add_argument("--replicate", action="store_true", help="replicate the adapter")
  parser.add_argument("--ckpt", help="save the adapter and optimizer state here (orbax)")
  parser.add_argument("--distributed", action="store_true",
                      help="call jax.distributed.initialize (one process per host)")
  parser.add_argument("--coordinator", help="host:port of process 0 (auto on TPU and SLURM)")
  parser.add_argument("--num-processes", type=int, help="(auto on TPU and SLURM)")
  parser.add_argument("--process-id", type=int, help="(auto on TPU and SLURM)")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[float]:
  args = parse(argv)
  if jax.config.jax_platforms in (None, "", "cpu"):
    jax.config.update("jax_num_cpu_devices", args.devices)  # before any computation
    if args.distributed:  # CPU processes talk through gloo (GPUs use NCCL, TPUs their ICI)
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if args.distributed:
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id)

  import flax.linen as nn
  import jax.numpy as jnp
  import numpy as np
  import optax
  import orbax.checkpoint as ocp
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  import jlora

  vocab, dim, heads, mlp, layers, seq = 256, 128, 8, 512, 4, 32

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.LayerNorm(name="ln1")(x)
      q, k, v = (nn.DenseGeneral((heads, dim // heads), name=n)(h) for n in ("query", "key",
                                                                                "value"))
      mask = jnp.tril(jnp.ones((1, 1, x.shape[1], x.shape[1]), bool))
      scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / (dim // heads) ** 0.5
      o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(jnp.where(mask, scores, -1e9)), v)
      x = x + nn.DenseGeneral(dim, axis=(-2, -1), name="out")(o)
      h = nn.gelu(nn.Dense(mlp, name="up")(nn.LayerNorm(name="ln2")(x)))
      return x + nn.Dense(dim, name="down")(h)

  class Decoder(nn.Module):
    @nn.compact
    def __call__(self, ids):
      x = nn.Embed(vocab, dim, name="embed")(ids)
      for i in range(layers):
        x = Block(name=f"blocks_{i}")(x)
      return nn.Dense(vocab, name="head")(nn.LayerNorm(name="ln_f")(x))

  # 1. The mesh, and how the frozen kernels are split on it ({regex: spec}; others replicated).
  n = len(jax.devices())
  shape = {"data_parallel": (n,), "fsdp": (n,), "tensor_parallel": (n,),
           "data_x_model": (2, n // 2)}[args.layout]
  names = {"tensor_parallel": ("model",), "data_x_model": ("data", "model")}.get(
      args.layout, ("data",))
  mesh = Mesh(np.array(jax.devices()).reshape(shape), names)
  rules = {
      "data_parallel": {},
      "fsdp": {r".*/(query|key|value|up|down)/kernel": P("data"),  # the contracted axis
               r".*/out/kernel": P(None, None, "data"),             # (heads, head_dim, d): d
               r".*/embedding|params/head/kernel": P("data")},
      "tensor_parallel": {r".*/(query|key|value)/kernel": P(None, "model"),  # columns: heads
                          r".*/up/kernel": P(None, "model"),                  # columns: d_ff
                          r".*/(out|down)/kernel": P("model")},               # rows
      "data_x_model": {r".*/(query|key|value)/kernel": P("data", "model"),
                       r".*/up/kernel": P("data", "model"),
                       r".*/out/kernel": P("model", None, "data"),
                       r".*/down/kernel": P("model", "data"),
                       r".*/embedding": P("data")},
  }[args.layout]

  def spec(path, _):
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    return next((s for pattern, s in rules.items() if re.fullmatch(pattern, name)), P())

  model = Decoder()
  batch_spec = P() if args.layout == "tensor_parallel" else P("data")
  ids_shape = jax.ShapeDtypeStruct((args.batch, seq), jnp.int32)
  abstract = jax.eval_shape(model.init, jax.random.key(0), ids_shape)
  param_shardings = jax.tree.map(lambda s: NamedSharding(mesh, s),
                                 jax.tree_util.tree_map_with_path(spec, abstract))

  # 2. Frozen params created already split: each device computes only its own slices.
  variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, seq), jnp.int32)),
                      out_shardings=param_shardings)(jax.random.key(0))

  # 3. The adapter, created in its shards: A follows the kernel's contracted axes, B its
  #    feature axes, the rank axis is replicated (or everything replicated, DDP style).
  config = jlora.LoraConfig(rank=8, alpha=16.0, targets=r".*/(query|key|value|out|up|down)/kernel")
  adapter = jlora.init_sharded(jax.random.key(1), variables, config, model.apply, ids_shape,
                               replicate=args.replicate)
  adapter_sh = jlora.shardings(adapter, variables, replicate=args.replicate)
  optimizer = optax.adamw(3e-3)
  if args.accumulate > 1:
    optimizer = optax.MultiSteps(optimizer, every_k_schedule=args.accumulate)
  state_sh = jlora.opt_state_shardings(jax.eval_shape(optimizer.init, adapter), adapter_sh)
  opt_state = jax.jit(optimizer.init, out_shardings=state_sh)(adapter)
  if jax.process_index() == 0:
    print(jlora.summary(adapter, variables).splitlines()[-1])
    print(f"mesh {dict(mesh.shape)}; e.g. {_describe(adapter, 'blocks_0/out/kernel')}")

  # 4. The step: pinned out_shardings keep the adapter and optimizer state where they are
  #    (left to propagation alone, XLA may move a factor to another layout after one step).
  lora_apply = jlora.wrap(model.apply)

  def loss_fn(adapter, variables, ids, labels):
    logits = lora_apply(variables, adapter, ids)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  def train_step(adapter, opt_state, variables, ids, labels):
    loss, grads = jax.value_and_grad(loss_fn)(adapter, variables, ids, labels)
    updates, opt_state = optimizer.update(grads, opt_state, adapter)
    return optax.apply_updates(adapter, updates), opt_state, loss

  step = jax.jit(train_step, donate_argnums=(0, 1),
                 out_shardings=(adapter_sh, state_sh, NamedSharding(mesh, P())))

  # 5. Data: each process loads only the rows of the global batch its own devices hold (a toy
  #    task: the next token is the current one plus one, mod vocab; row r of step i is seeded
  #    by (i, r), standing in for a dataset indexed by global row).
  batch_sharding = NamedSharding(mesh, batch_spec)
  micro = args.batch // args.accumulate
  start, stop = local_rows(batch_sharding, (micro, seq))
  losses = []
  for i in range(args.steps * args.accumulate):
    first = [np.random.default_rng([i, r]).integers(vocab) for r in range(start, stop)]
    tokens = (np.array(first)[:, None] + np.arange(seq + 1)) % vocab
    ids, labels = (jax.make_array_from_process_local_data(batch_sharding, t, (micro, seq))
                   for t in (tokens[:, :-1], tokens[:, 1:]))
    adapter, opt_state, loss = step(adapter, opt_state, variables, ids, labels)
    losses.append(float(loss))
    update, micro_step = divmod(i + 1, args.accumulate)
    if micro_step == 0 and (update % 5 == 0 or update == 1) and jax.process_index() == 0:
      print(f"update {update:4d}  loss {losses[-1]:.4f}")

  # 6. Sharded checkpoint with orbax: every process writes the shards it holds. To restore onto
  #    another mesh, build the target from jlora.shardings for the new params (see
  #    docs/multihost.md).
  if args.ckpt:
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(args.ckpt, {"adapter": adapter, "opt_state": opt_state})
    if jax.process_index() == 0:
      print(f"saved to {args.ckpt}")
  return losses


def local_rows(sharding, global_shape) -> tuple[int, int]:
  """[start, stop) of the global batch rows that this process's devices hold under `sharding`.

  A mesh built from `jax.devices()` in order gives each process one contiguous block.
  """
  index = sharding.addressable_devices_indices_map(global_shape).values()
  starts = [rows.start or 0 for rows, *_ in index]
  stops = [global_shape[0] if rows.stop is None else rows.stop for rows, *_ in index]
  return min(starts), max(stops)


def _describe(adapter, suffix: str) -> str:
  path = next(p for p in adapter.lora if p.endswith(suffix))
  f = adapter.lora[path]
  return f"{path}: A {f.a.shape} {f.a.sharding.spec}, B {f.b.shape} {f.b.sharding.spec}"


if __name__ == "__main__":
  main(sys.argv[1:])
