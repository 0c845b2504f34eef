"""One process of the two-process dry run of multi-host LoRA training (see docs/multihost.md).

Run by tests/test_sharding.py as two processes on localhost, or by hand::

    python tests/_multihost_worker.py 0 2 localhost:12355 /tmp/ckpt & \
    python tests/_multihost_worker.py 1 2 localhost:12355 /tmp/ckpt

Each process owns 4 CPU devices; together they form one 8-device mesh, FSDP over "data". Each
process loads only its half of the global batch (`jax.make_array_from_process_local_data`),
trains a few jlora steps, saves the adapter and optimizer state with orbax (each process writes
its own shards), restores them, and process 0 prints one JSON line with the losses.
"""

import json
import os
import sys

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

STEPS = 3
LOCAL_DEVICES = 4


def main(process_id: int, num_processes: int, coordinator: str, ckpt: str):
  jax.config.update("jax_num_cpu_devices", LOCAL_DEVICES)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.config.update("jax_numpy_rank_promotion", "raise")
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id, initialization_timeout=60)
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import _sharding_model as m

  from jlora import sharding

  assert jax.process_count() == num_processes and jax.device_count() == 8
  mesh = Mesh(np.array(jax.devices()).reshape(8), ("data",))
  ids, labels = m.data()  # the global batch; each process keeps its own rows only
  # Frozen params made already sharded: each device computes its own slice of every kernel.
  init = lambda key: m.MODEL.init(key, ids)  # noqa: E731
  specs = m.param_specs(jax.eval_shape(init, jax.random.key(0)), "fsdp")
  placed = jax.jit(init, out_shardings=jax.tree.map(lambda s: NamedSharding(mesh, s), specs))(
      jax.random.key(0))
  adapter = sharding.init_sharded(jax.random.key(2), placed, m.CONFIG, m.MODEL.apply, ids)
  adapter_sh = sharding.shardings(adapter, placed)
  state_sh = sharding.opt_state_shardings(jax.eval_shape(m.OPTIMIZER.init, adapter), adapter_sh)
  opt_state = jax.jit(m.OPTIMIZER.init, out_shardings=state_sh)(adapter)

  batch = NamedSharding(mesh, P("data"))
  rows = len(ids) // jax.process_count()
  mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
  ids, labels = (jax.make_array_from_process_local_data(batch, np.asarray(x[mine]))
                 for x in (ids, labels))
  step = jax.jit(m.make_step(m.model_for("fsdp", mesh)), donate_argnums=(0, 1),
                 out_shardings=(adapter_sh, state_sh, NamedSharding(mesh, P())))
  losses = []
  for _ in range(STEPS):
    adapter, opt_state, loss = step(adapter, opt_state, placed, ids, labels)
    losses.append(float(loss))

  sharding.save_sharded(ckpt, {"adapter": adapter, "opt_state": opt_state})
  restored = sharding.restore_sharded(ckpt, {"adapter": adapter, "opt_state": opt_state},
                                      {"adapter": adapter_sh, "opt_state": state_sh})
  # Each process checks the shards it holds (no compile, no cross-host traffic); the test
  # checks both processes' exit status.
  same = all(np.array_equal(x.data, y.data)
             for a, b in zip(jax.tree.leaves(restored),
                             jax.tree.leaves({"adapter": adapter, "opt_state": opt_state}),
                             strict=True)
             for x, y in zip(a.addressable_shards, b.addressable_shards, strict=True))
  if not same:
    sys.exit(f"process {process_id}: restored shards differ from the saved ones")
  if jax.process_index() == 0:
    print(json.dumps({"losses": losses, "restored_equal": same,
                      "devices": jax.device_count(), "local": jax.local_device_count()}))
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
