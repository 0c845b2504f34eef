"""Subprocess side of tests/test_checkpoint_faults.py: processes that fight, die or hit a full disk.

  python tests/_ckpt_faults_worker.py hold DIR      open a manager on DIR, save step 1, print
                                                    "ready", wait for a line on stdin, close
  python tests/_ckpt_faults_worker.py write DIR     open a manager on DIR and save step 2
  python tests/_ckpt_faults_worker.py loop DIR      save steps forever (max_to_keep=2), printing
                                                    "saved N" once each step is sealed
  python tests/_ckpt_faults_worker.py full DIR      on a tiny disk: save step 1, then a step too
                                                    big for it, twice; print what happened (JSON)
  python tests/_ckpt_faults_worker.py readonly DIR  restore from DIR (made read-only) and print
                                                    whether its files changed (JSON)

`adapter(step)` is the adapter saved as `step`, the same in every process, for bit-exact checks.
"""

import json
import os
import stat
import sys

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")  # as tests/conftest.py, minus its imports
import jax.numpy as jnp  # noqa: E402

import jlora  # noqa: E402
from jlora import checkpoint  # noqa: E402

PARAMS = {"fc": {"kernel": jnp.ones((64, 32))}}
CONFIG = jlora.LoraConfig(rank=4, alpha=8.0, targets="fc/kernel")
LOOP_EXTRA = (512, 512)  # 1 MiB a step in the kill loop, so kills land mid-write too


def adapter(step, extra=(256, 256)):
  """The adapter saved as `step`: factors and a ~256 KiB extra that depend on the step."""
  base = jlora.init(jax.random.key(0), PARAMS, CONFIG)
  base = jax.tree.map(lambda x: x + 0.25 * step, base)
  big = jax.random.normal(jax.random.key(step), extra)
  return jlora.Adapter(lora=base.lora, extras={"big": big})


def snapshot(directory):
  """{relative path: (size, mtime_ns)} of every file and folder under `directory`."""
  out = {}
  for root, dirs, files in os.walk(directory):
    for name in dirs + files:
      path = os.path.join(root, name)
      st = os.stat(path)
      out[os.path.relpath(path, directory)] = (st.st_size, st.st_mtime_ns)
  return out


def hold(directory):
  manager = checkpoint.checkpoint_manager(directory)
  checkpoint.save(manager, 1, adapter(1))
  manager.wait_until_finished()
  print("ready", flush=True)
  sys.stdin.readline()
  manager.close()


def write(directory):
  with checkpoint.checkpoint_manager(directory) as manager:
    checkpoint.save(manager, 2, adapter(2))
  print("saved 2", flush=True)


def loop(directory):
  manager = checkpoint.checkpoint_manager(directory, max_to_keep=2)
  step = (manager.latest_step() or 0) + 1
  while True:
    checkpoint.save(manager, step, adapter(step, extra=LOOP_EXTRA))
    manager.wait_until_finished()
    print(f"saved {step}", flush=True)
    step += 1


def full(directory):
  out = {}
  manager = checkpoint.checkpoint_manager(directory, max_to_keep=1)
  out["save_1"] = checkpoint.save(manager, 1, adapter(1))
  manager.wait_until_finished()
  too_big = adapter(2, extra=(1024, 1024))  # 4 MiB of random floats: the disk holds 2 MiB
  try:
    out["save_2"] = checkpoint.save(manager, 2, too_big)
    manager.wait_until_finished()
  except checkpoint.CheckpointError as e:
    out["error_2"] = str(e)
  out["steps_after_2"] = list(manager.all_steps())
  manager.close()
  try:
    out["save_3"] = checkpoint.save(directory, 3, too_big)  # a directory: save waits and checks
  except checkpoint.CheckpointError as e:
    out["error_3"] = str(e)
  out["listing"] = sorted(os.listdir(directory))
  restored = checkpoint.restore(directory)
  out["restored_step"] = restored.step
  out["restored_exact"] = all(
      bool((x == y).all()) for x, y in zip(jax.tree.leaves(restored.adapter),
                                           jax.tree.leaves(adapter(1)), strict=True))
  print(json.dumps(out))


def readonly(directory):
  for root, dirs, files in os.walk(directory):
    for name in dirs + files + [""]:
      path = os.path.join(root, name)
      os.chmod(path, os.stat(path).st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
  before = snapshot(directory)
  restored = checkpoint.restore(directory)
  explicit = checkpoint.restore(directory, step=1)
  after = snapshot(directory)
  print(json.dumps({"step": restored.step, "explicit": explicit.step,
                    "unchanged": before == after, "files": len(before)}))


if __name__ == "__main__":
  modes = {"hold": hold, "write": write, "loop": loop, "full": full, "readonly": readonly}
  if len(sys.argv) != 3 or sys.argv[1] not in modes:
    raise SystemExit(f"usage: {sys.argv[0]} {'|'.join(modes)} DIR")
  modes[sys.argv[1]](sys.argv[2])
