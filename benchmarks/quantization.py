"""Bytes and reconstruction error of jlora's quantized frozen kernels on the benchmark model.

For the adapted kernels of the BENCHMARK.md decoder (per block: q, k, v 512x8x64, o 8x64x512,
up 512x2048, down 2048x512; 4 blocks; GPT-2 style N(0, 0.02²) init as `benchmarks/model.py`
draws it), each scheme quantizes every kernel along its last axis and reports:

* bytes: all leaves of the `QuantizedArray`s (codes, scales, second-level scales) over the
  float32 kernels' bytes;
* rel. error: ‖dequantize(quantize(W)) − W‖_F / ‖W‖_F over all 24 kernels together, and the
  worst single kernel;
* then bytes vs float32 per kernel shape: blocks and double-quantization groups run along the
  last axis only, so q/k/v (last axis 64 = one block per row) gain nothing from double
  quantization (one 8-bit scale plus a float32 offset and step per row cost more than one
  float32 scale).

Nothing is timed and nothing is written; it prints a markdown table::

    python benchmarks/quantization.py
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import model as bm  # noqa: E402
from jlora import _tree  # noqa: E402
from jlora import quant as jq  # noqa: E402

SCHEMES = [  # (label, scheme, block_size, double_quant)
    ("int8, one scale per row", "int8", None, False),
    ("int8, block 64", "int8", 64, False),
    ("int4, block 64", "int4", 64, False),
    ("nf4, block 64", "nf4", 64, False),
    ("nf4, block 64, double quant", "nf4", 64, True),
]


def kernels() -> dict[str, np.ndarray]:
  """{path: float32 kernel} of the 24 adapted kernels of the benchmark model."""
  flat = _tree.flatten(bm.init_variables(bm.GPTConfig()))
  return {p: np.asarray(x) for p, x in flat.items() if re.fullmatch(bm.LORA_TARGET_REGEX, p)}


def measure(ws: dict[str, np.ndarray], scheme: str, block: int | None, dq: bool):
  """(bytes ratio, relative Frobenius error over all kernels, worst kernel's error,
  {shape: bytes ratio})."""
  stored = dense = err2 = norm2 = 0.0
  worst = 0.0
  by_shape: dict[str, float] = {}
  dequant = jax.jit(jq.dequantize)
  for w in ws.values():
    q = jq.quantize_array(w, scheme, block_size=block, double_quant=dq)
    back = np.asarray(dequant(q), np.float64)
    e2, n2 = float(((back - w) ** 2).sum()), float((w.astype(np.float64) ** 2).sum())
    stored, dense = stored + q.nbytes, dense + w.nbytes
    err2, norm2 = err2 + e2, norm2 + n2
    worst = max(worst, (e2 / n2) ** 0.5)
    by_shape["x".join(map(str, w.shape))] = q.nbytes / w.nbytes  # equal within a shape
  return stored / dense, (err2 / norm2) ** 0.5, worst, by_shape


def main() -> None:
  ws = kernels()
  total = sum(w.nbytes for w in ws.values())
  results = {label: measure(ws, *rest) for label, *rest in SCHEMES}
  shapes = list(next(iter(results.values()))[3])
  print(f"{len(ws)} kernels ({', '.join(shapes)}), {total:,} bytes in float32; "
        f"jax {jax.__version__}\n")
  print("| scheme | bytes vs f32 | rel. error (all) | rel. error (worst kernel) |")
  print("|---|---:|---:|---:|")
  for label, (ratio, rel, worst, _) in results.items():
    print(f"| {label} | {ratio:.4f}x | {rel:.4f} | {worst:.4f} |")
  print("\n| scheme | " + " | ".join(shapes) + " |")
  print("|---|" + "---:|" * len(shapes))
  for label, (*_, by_shape) in results.items():
    print(f"| {label} | " + " | ".join(f"{by_shape[s]:.4f}x" for s in shapes) + " |")


if __name__ == "__main__":
  main()
