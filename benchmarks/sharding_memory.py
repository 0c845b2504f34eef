"""Per-device memory of sharded LoRA training, layout by layout, on the benchmark model.

For the BENCHMARK.md decoder (d_model 512, 4 blocks, rank-8 LoRA on q, k, v, o, up, down,
adamw) on 8 devices, each layout places the frozen params on a mesh, creates the adapter in its
shards (`jlora.init_sharded`), its Adam state likewise (`jlora.opt_state_shardings`), compiles
one jlora train step and runs it once. It reports, per device:

* frozen: bytes of frozen params on the fullest device, from the arrays' own shards, and that
  over total / N (FSDP must be ≈ 1: every kernel is split, only norms and biases are whole);
* adapter + Adam: the same for the adapter and its optimizer state;
* the compiled step's memory analysis (XLA's per-device program): arguments, temporaries, and
  the temporaries of the frozen model's own forward/backward step (no LoRA, gradients to the
  positional embedding only) on the same layout, so what LoRA adds shows;
* the loss after one step, which must agree across layouts.

Nothing is timed. The table goes between the ``sharding`` markers of benchmarks/RESULTS.md::

    python benchmarks/sharding_memory.py                  # 8 fake CPU devices on a CPU host
    python benchmarks/sharding_memory.py --out /tmp/RESULTS.md --tiny
"""

from __future__ import annotations

import argparse
import datetime
import re
import sys
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

BEGIN, END = "<!-- sharding:begin -->", "<!-- sharding:end -->"
DEFAULT_OUT = Path(__file__).resolve().parent / "RESULTS.md"
DEVICES = 8
RANK, ALPHA, BATCH = 8, 16.0, 8
MIB = 2**20


def layouts():
  """{name: (mesh shape, axis names, batch spec, {regex: kernel spec}, replicate adapter)}."""
  from jax.sharding import PartitionSpec as P

  fsdp = {r".*/attn/(q|k|v)/kernel": P("data"),            # (d, heads, head_dim): d
          r".*/attn/o/kernel": P(None, None, "data"),      # (heads, head_dim, d): d
          r".*/mlp/(up|down)/kernel": P("data"),           # (d, 4d) and (4d, d): rows
          r"params/embed/embedding": P("data"), r"params/pos_embed": P("data"),
          r"params/head/kernel": P("data")}
  tp = {r".*/attn/(q|k|v)/kernel": P(None, "model"),       # columns: heads
        r".*/attn/(q|k|v)/bias": P("model"),
        r".*/attn/o/kernel": P("model"),                   # rows: heads
        r".*/mlp/up/kernel": P(None, "model"), r".*/mlp/up/bias": P("model"),
        r".*/mlp/down/kernel": P("model"),
        r"params/head/kernel": P(None, "model"), r"params/head/bias": P("model")}
  both = {r".*/attn/(q|k|v)/kernel": P("data", "model"), r".*/attn/(q|k|v)/bias": P("model"),
          r".*/attn/o/kernel": P("model", None, "data"),
          r".*/mlp/up/kernel": P("data", "model"), r".*/mlp/up/bias": P("model"),
          r".*/mlp/down/kernel": P("model", "data"),
          r"params/embed/embedding": P("data"), r"params/head/kernel": P("data", "model")}
  return {
      "data parallel": ((DEVICES,), ("data",), P("data"), {}, False),
      "FSDP": ((DEVICES,), ("data",), P("data"), fsdp, False),
      "FSDP, replicated adapter": ((DEVICES,), ("data",), P("data"), fsdp, True),
      "tensor parallel": ((DEVICES,), ("model",), P(), tp, False),
      "data × model (2 × 4)": ((2, DEVICES // 2), ("data", "model"), P("data"), both, False),
  }


def per_device(tree) -> dict:
  """{device: bytes of the tree's shards on it}."""
  out = defaultdict(int)
  for x in jax.tree.leaves(tree):
    for shard in x.addressable_shards:
      out[shard.device] += shard.data.nbytes
  return out


def measure(name, spec, config, variables, tokens):
  import numpy as np
  import optax
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  import jlora
  from benchmarks import model as bm

  shape, names, batch_spec, rules, replicate = spec
  mesh = Mesh(np.array(jax.devices()[:DEVICES]).reshape(shape), names)

  def place(path, _):
    path = jax.tree_util.keystr(path, simple=True, separator="/")
    found = next((s for pattern, s in rules.items() if re.fullmatch(pattern, path)), P())
    return NamedSharding(mesh, found)

  frozen = jax.device_put(variables, jax.tree_util.tree_map_with_path(place, variables))
  model = bm.GPT(config)
  lora = jlora.LoraConfig(rank=RANK, alpha=ALPHA, targets=bm.LORA_TARGET_REGEX)
  adapter = jlora.init_sharded(jax.random.key(1), frozen, lora, model.apply, tokens[:, :-1],
                               replicate=replicate)
  adapter_sh = jlora.shardings(adapter, frozen, replicate=replicate)
  optimizer = optax.adamw(1e-3, weight_decay=1e-4)
  state_sh = jlora.opt_state_shardings(jax.eval_shape(optimizer.init, adapter), adapter_sh)
  opt_state = jax.jit(optimizer.init, out_shardings=state_sh)(adapter)
  lora_apply = jlora.wrap(model.apply)

  def step(adapter, opt_state, frozen, tokens):
    loss_fn = lambda a: bm.next_token_loss(lora_apply(frozen, a, tokens[:, :-1]), tokens)  # noqa: E731
    loss, grads = jax.value_and_grad(loss_fn)(adapter)
    updates, opt_state = optimizer.update(grads, opt_state, adapter)
    return optax.apply_updates(adapter, updates), opt_state, loss

  batch = jax.device_put(tokens, NamedSharding(mesh, batch_spec))
  trained = {"adapter": adapter, "opt_state": opt_state}
  frozen_dev, trained_dev = per_device(frozen), per_device(trained)
  compiled = jax.jit(step, donate_argnums=(0, 1),
                     out_shardings=(adapter_sh, state_sh, NamedSharding(mesh, P()))).lower(
      adapter, opt_state, frozen, batch).compile()
  memory = compiled.memory_analysis()
  _, _, loss = compiled(adapter, opt_state, frozen, batch)

  def floor_step(pos, frozen, tokens):  # frozen forward/backward, no LoRA: what XLA needs anyway
    def loss_fn(pos):
      params = {"params": dict(frozen["params"], pos_embed=pos)}
      return bm.next_token_loss(model.apply(params, tokens[:, :-1]), tokens)

    value, grad = jax.value_and_grad(loss_fn)(pos)
    return pos - 1e-3 * grad, value

  floor = jax.jit(floor_step).lower(frozen["params"]["pos_embed"], frozen, batch).compile()
  floor_memory = floor.memory_analysis()
  frozen_total = sum(x.nbytes for x in jax.tree.leaves(frozen))
  trained_total = sum(x.nbytes for x in jax.tree.leaves(trained))
  row = dict(
      layout=name, mesh=" × ".join(f"{k} {v}" for k, v in mesh.shape.items()),
      frozen=max(frozen_dev.values()), frozen_total=frozen_total,
      trained=max(trained_dev.values()), trained_total=trained_total,
      args=getattr(memory, "argument_size_in_bytes", None),
      temp=getattr(memory, "temp_size_in_bytes", None),
      floor_temp=getattr(floor_memory, "temp_size_in_bytes", None), loss=float(loss))
  print(f"{name:26s} frozen/device {row['frozen'] / MIB:7.2f} MiB "
        f"({row['frozen'] / (frozen_total / DEVICES):.2f}× total/N); adapter+Adam/device "
        f"{row['trained'] / MIB:6.3f} MiB; loss {row['loss']:.6f}", flush=True)
  return row


def table(rows) -> str:
  header = ["layout", "mesh", "frozen / device (MiB)", "× total/N", "adapter + Adam / device "
            "(MiB)", "× total/N", "step args / device (MiB)", "step temp / device (MiB)",
            "frozen-only step temp / device (MiB)", "loss after 1 step"]

  def mib(x):
    return "n/a" if x is None else f"{x / MIB:.3f}"

  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in rows:
    cells = [r["layout"], r["mesh"], mib(r["frozen"]),
             f"{r['frozen'] / (r['frozen_total'] / DEVICES):.2f}", mib(r["trained"]),
             f"{r['trained'] / (r['trained_total'] / DEVICES):.2f}", mib(r["args"]),
             mib(r["temp"]), mib(r["floor_temp"]), f"{r['loss']:.6f}"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def section(rows, config, description: str) -> str:
  r = rows[0]
  return "\n".join([
      "## Sharded training: memory per device",
      "",
      f"{datetime.date.today().isoformat()}; {description}. "
      f"`python benchmarks/sharding_memory.py`: the benchmark decoder (d_model {config.d_model}, "
      f"{config.blocks} blocks, vocab {config.vocab}), batch {BATCH} × seq {config.seq}, rank "
      f"{RANK} LoRA on q, k, v, o, up, down, adamw, on {DEVICES} devices. Totals: frozen "
      f"{r['frozen_total'] / MIB:.2f} MiB, adapter + Adam state {r['trained_total'] / MIB:.3f} "
      "MiB. Per-device bytes are the fullest device's shards; *step args* and *temp* are XLA's "
      "memory analysis of the compiled jlora train step (per device, so arguments include the "
      "batch). The adapter's factors follow their kernels' shardings (A the contracted axes, B "
      "the feature axes, rank replicated) unless replicated; nothing here is timed.",
      "",
      table(rows),
      "",
      "- FSDP and data × model split the frozen params ≈ N ways (× total/N near 1; what stays "
      "whole is LayerNorms, biases and, for TP, the embeddings); data parallel keeps a full copy "
      "on each device (× total/N = N).",
      "- The loss after one step is the same in every layout (float32 reduction order aside).",
      "- Temporaries follow the frozen model's own step on each layout (XLA:CPU keeps FSDP's "
      "gathered kernels, and pure tensor parallelism replicates the batch's activations); what "
      "jlora adds on top is its saved LoRA inputs and the factor gradients.",
  ])


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the RESULTS.md to update")
  p.add_argument("--tiny", action="store_true", help="a tiny model, to check the script runs")
  args = p.parse_args(argv)
  if jax.config.jax_platforms in (None, "", "cpu"):
    jax.config.update("jax_num_cpu_devices", DEVICES)
  if len(jax.devices()) < DEVICES:
    sys.exit(f"error: needs {DEVICES} devices, found {len(jax.devices())}.")

  import jax.numpy as jnp

  from benchmarks import model as bm
  from benchmarks.train_step import machine, write_section

  config = (bm.GPTConfig(vocab=64, d_model=64, blocks=1, head_dim=8, seq=16) if args.tiny
            else bm.GPTConfig())
  variables = bm.init_variables(config)
  tokens = jax.random.randint(jax.random.key(0), (BATCH, config.seq + 1), 0, config.vocab,
                              jnp.int32)
  rows = [measure(name, spec, config, variables, tokens) for name, spec in layouts().items()]
  write_section(args.out, section(rows, config, machine()), BEGIN, END)
  print(f"wrote {args.out}")
  return rows


if __name__ == "__main__":
  main()
