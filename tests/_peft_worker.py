"""Subprocess side of tests/test_peft_faults.py: an export that fails while writing the weights.

  python tests/_peft_worker.py enospc DIR   export v1 to DIR/export, then export v2 over it with
                                            the disk "full" half-way through the weights file;
                                            print the error as JSON
  python tests/_peft_worker.py kill DIR     the same, but the process is SIGKILLed half-way

The adapters themselves (`adapters`) are shared with the test, which imports this module.
"""

import builtins
import errno
import json
import os
import signal
import sys

import conftest  # noqa: F401  (the same JAX settings as the test process)
import jax
import jax.numpy as jnp
import numpy as np

import jlora

PARAMS = {"params": {"fc1": {"kernel": jnp.ones((8, 6))}, "fc2": {"kernel": jnp.ones((6, 5))}}}


def adapters() -> tuple[jlora.Adapter, jlora.Adapter]:
  """(v1, v2): two trained-looking adapters of PARAMS with different alphas and values."""
  out = []
  for seed, alpha in ((1, 8.0), (2, 3.0)):
    config = jlora.LoraConfig(rank=2, alpha=alpha, targets=".*/kernel")
    rng = np.random.default_rng(seed)
    adapter = jlora.init(jax.random.key(seed), PARAMS, config)
    out.append(jax.tree.map(
        lambda x, r=rng: jnp.asarray(r.standard_normal(x.shape), jnp.float32), adapter))
  return out[0], out[1]


def _failing_open(fault):
  real_open = builtins.open

  class HalfWritten:
    """A weights file that takes half of what is written, then fails."""

    def __init__(self, fh):
      self.fh = fh

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      self.fh.close()

    def write(self, data):
      self.fh.write(data[: len(data) // 2])
      self.fh.flush()
      fault()

    def __getattr__(self, name):
      return getattr(self.fh, name)

  def patched(file, mode="r", *args, **kwargs):
    fh = real_open(file, mode, *args, **kwargs)
    if str(file).endswith("adapter_model.safetensors") and "w" in mode:
      return HalfWritten(fh)
    return fh

  return patched


def _disk_full():
  raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _killed():
  os.kill(os.getpid(), signal.SIGKILL)


def main(mode: str, folder: str) -> None:
  v1, v2 = adapters()
  target = os.path.join(folder, "export")
  jlora.export_peft(target, v1)
  builtins.open = _failing_open(_disk_full if mode == "enospc" else _killed)
  try:
    jlora.export_peft(target, v2)
  except OSError as e:
    print(json.dumps({"errno": e.errno, "message": str(e)}))
    return
  print(json.dumps({"errno": None, "message": "no error"}))


if __name__ == "__main__":
  main(*sys.argv[1:])
