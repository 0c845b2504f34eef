"""Training-step speed and memory of LoRA systems on the standard workload (shared/BENCHMARK.md).

One process runs each system in turn on the same weights, tokens and A factors (B = 0, so every
step-0 loss is the base model's; the script asserts they agree):

- ``full``: full fine-tuning, every parameter trained;
- ``floor``: only the positional embedding trains, so the step backpropagates to the input
  through every block without a single weight gradient; no LoRA step in JAX can beat it;
- ``merged``: the naive recipe, ``model.apply(jlora.merge(variables, adapter), x)`` inside the
  step, differentiated through W + s·AᵀB;
- ``jlora``: ``jlora.wrap(model.apply)``, the factored path, as a user writes it;
- ``jlora_bf16``: the same with the frozen params stored in bfloat16 (adapter and optimizer state
  stay float32);
- ``nnx_lora``: the model in Flax NNX with Flax's own ``nnx.LoRALinear`` (scaled by α/r; the 3-D
  DenseGeneral kernels become 2-D Linear layers with the same math, see benchmarks/model.py);
- ``peft_torch`` and ``torch_floor`` (when torch and peft import): the same network in PyTorch
  with PEFT LoRA, and with every weight frozen but the positional embedding.

Every JAX step is one ``jax.jit`` with the trained state and optimizer state donated
(``donate_argnums=(0, 1)``) and the frozen params not. After 5 warm-up steps (step 0 is the
first), each of the timed steps is measured on its own up to ``jax.block_until_ready``. The table
gives the median and min step time, each median's ratio to ``full`` and to its own framework's
floor (JAX systems ÷ ``floor``, torch systems ÷ ``torch_floor``), the compiled step's XLA FLOPs
and memory analysis, the process's peak RSS so far, and the loss after the timed steps. It is
printed and written, with the machine and the date, between the ``train_step`` markers of
benchmarks/RESULTS.md.

Run it on a quiet machine (nothing else computing), from the repository root::

    python benchmarks/train_step.py                     # the full protocol, ~2 min on 2 cores
    python benchmarks/train_step.py --quick             # a smoke run (< 1 min), not for quoting
    python benchmarks/train_step.py --systems floor,jlora --out /tmp/RESULTS.md
    python benchmarks/train_step.py --dtype bfloat16 --d-model 1024 --blocks 12 --seq 1024  # GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import importlib.metadata
import importlib.util
import math
import os
import platform
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# On a GPU, torch runs in this process after JAX: let JAX grow its pool instead of taking 75 %.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import jlora  # noqa: E402
from benchmarks import custom_model as cm  # noqa: E402
from benchmarks import model as bm  # noqa: E402

RANK, ALPHA = 8, 16.0
LR, WEIGHT_DECAY = 1e-3, 1e-4
WARMUP, TIMED = 5, 20
QUICK_WARMUP, QUICK_TIMED = 1, 3
# The quantized frozen bases: (scheme, block size, double quantization) for jlora.quantize.
QUANTIZED = {"jlora_int8": ("int8", None, False), "jlora_nf4": ("nf4", 64, False),
             "jlora_nf4_dq": ("nf4", 64, True)}
# The same network with its projections in the layers of benchmarks/custom_model.py.
CUSTOM = tuple(f"{kind}_{layout}" for layout in cm.LAYOUTS for kind in ("floor", "jlora"))
JAX_SYSTEMS = ("full", "floor", "merged", "jlora", "jlora_bf16", "nnx_lora", *QUANTIZED, *CUSTOM)
TORCH_SYSTEMS = ("peft_torch", "torch_floor")
SYSTEMS = JAX_SYSTEMS + TORCH_SYSTEMS
FLOORS = {"jax": "floor", "torch": "torch_floor"}


def own_floor(name: str, framework: str) -> str:
  """The floor a system's ratio is taken against: its framework's, or its layout's."""
  layout = next((x for x in cm.LAYOUTS if name.endswith(f"_{x}")), None)
  return f"floor_{layout}" if layout else FLOORS[framework]
BEGIN, END = "<!-- train_step:begin -->", "<!-- train_step:end -->"
# |step-0 loss - reference| allowed: float32 systems, systems computing in bfloat16, and
# systems whose frozen base is quantized (a slightly different model).
LOSS_ATOL = {"float32": 1e-4, "bfloat16": 5e-2, "quantized": 5e-2}
DEFAULT_OUT = Path(__file__).resolve().parent / "RESULTS.md"


def optimizer() -> optax.GradientTransformation:
  """BENCHMARK.md's optimizer; torch.optim.AdamW's defaults (betas, eps) are the same."""
  return optax.adamw(LR, weight_decay=WEIGHT_DECAY)


def torch_available() -> bool:
  """Whether torch and peft are importable (without importing them)."""
  try:
    return all(importlib.util.find_spec(name) is not None for name in ("torch", "peft"))
  except (ImportError, ValueError):  # a module set to None in sys.modules, or a broken install
    return False


# ----------------------------------------------------------------------------------------------
# The workload.


@dataclasses.dataclass(frozen=True)
class Workload:
  """The model, its weights, the fixed tokens and the fresh adapter every system starts from."""

  config: bm.GPTConfig
  model: bm.GPT
  variables: dict[str, Any]
  tokens: jax.Array  # (batch, seq + 1) int32: inputs tokens[:, :-1], labels tokens[:, 1:]
  adapter: jlora.Adapter

  @property
  def num_tokens(self) -> int:
    return self.tokens.shape[0] * (self.tokens.shape[1] - 1)


def make_workload(config: bm.GPTConfig, batch: int, seed: int = 0) -> Workload:
  """Weights, tokens and a rank-8, α-16 adapter on q, k, v, o, up, down (B = 0), all seeded."""
  model = bm.GPT(config)
  k_tokens, k_lora = jax.random.split(jax.random.key(seed))
  tokens = jax.random.randint(k_tokens, (batch, config.seq + 1), 0, config.vocab, jnp.int32)
  variables = bm.init_variables(config, seed)
  lora_config = jlora.LoraConfig(rank=RANK, alpha=ALPHA, targets=bm.LORA_TARGET_REGEX)
  adapter = jlora.init(k_lora, variables, lora_config, model.apply, tokens[:, :-1])
  return Workload(config, model, variables, tokens, adapter)


# ----------------------------------------------------------------------------------------------
# JAX systems: each gives loss_fn(trained, frozen, tokens), the trained tree and the frozen tree.

LossFn = Callable[[Any, Any, jax.Array], jax.Array]


def _full(w: Workload) -> tuple[LossFn, Any, Any]:
  def loss_fn(params, frozen, tokens):
    del frozen
    return bm.next_token_loss(w.model.apply({"params": params}, tokens[:, :-1]), tokens)

  return loss_fn, w.variables["params"], {}


def _floor(w: Workload) -> tuple[LossFn, Any, Any]:
  frozen = dict(w.variables["params"])
  pos_embed = frozen.pop("pos_embed")

  def loss_fn(pos_embed, frozen, tokens):
    params = {**frozen, "pos_embed": pos_embed}
    return bm.next_token_loss(w.model.apply({"params": params}, tokens[:, :-1]), tokens)

  return loss_fn, pos_embed, frozen


def _merged(w: Workload) -> tuple[LossFn, Any, Any]:
  def loss_fn(adapter, variables, tokens):
    logits = w.model.apply(jlora.merge(variables, adapter), tokens[:, :-1])
    return bm.next_token_loss(logits, tokens)

  return loss_fn, w.adapter, w.variables


def _jlora(w: Workload, frozen_dtype=None) -> tuple[LossFn, Any, Any]:
  lora_apply = jlora.wrap(w.model.apply)

  def loss_fn(adapter, variables, tokens):
    return bm.next_token_loss(lora_apply(variables, adapter, tokens[:, :-1]), tokens)

  variables = w.variables
  if frozen_dtype is not None:
    variables = jax.tree.map(lambda x: x.astype(frozen_dtype), variables)
  return loss_fn, w.adapter, variables


def _nnx_lora(w: Workload) -> tuple[LossFn, Any, Any]:
  module = bm.nnx_lora_model(w.config, w.variables, w.adapter, RANK, ALPHA / RANK)
  graphdef, lora_state, rest = nnx.split(module, nnx.LoRAParam, ...)

  def loss_fn(lora_state, rest, tokens):
    model = nnx.merge(graphdef, lora_state, rest)
    return bm.next_token_loss(model(tokens[:, :-1]), tokens)

  return loss_fn, lora_state, rest


def _jlora_quantized(w: Workload, name: str) -> tuple[LossFn, Any, Any]:
  scheme, block, double_quant = QUANTIZED[name]
  loss_fn, adapter, variables = _jlora(w)
  return loss_fn, adapter, jlora.quantize(variables, bm.LORA_TARGET_REGEX, scheme,
                                          block_size=block, double_quant=double_quant)


def _custom(w: Workload, name: str) -> tuple[LossFn, Any, Any]:
  """floor or jlora on the same network written with custom layers (custom_model.py)."""
  kind, layout = name.split("_", 1)
  model = cm.CustomGPT(w.config, layout)
  variables = cm.convert(w.variables, layout)
  if kind == "floor":
    return _floor(dataclasses.replace(w, model=model, variables=variables))
  config = jlora.LoraConfig(rank=RANK, alpha=ALPHA, targets=cm.LORA_TARGET_REGEX[layout])
  adapter = jlora.init(jax.random.key(0), variables, config, model.apply, w.tokens[:, :-1])
  # The same A as the Flax workload's adapter (B = 0): the layouts' A are the same numbers.
  adapter = dataclasses.replace(adapter, lora={
      p: dataclasses.replace(f, a=w.adapter.lora[p.rsplit("/", 1)[0] + "/kernel"].a)
      for p, f in adapter.lora.items()})
  return _jlora(dataclasses.replace(w, model=model, variables=variables, adapter=adapter))


_JAX_BUILDERS = {
    "full": _full,
    "floor": _floor,
    "merged": _merged,
    "jlora": _jlora,
    "jlora_bf16": lambda w: _jlora(w, jnp.bfloat16),
    "nnx_lora": _nnx_lora,
    **{name: functools.partial(_jlora_quantized, name=name) for name in QUANTIZED},
    **{name: functools.partial(_custom, name=name) for name in CUSTOM},
}


def _nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _size(tree) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))


class JaxRunner:
  """One compiled, donating training step of a JAX system and its state."""

  framework = "jax"

  def __init__(self, loss_fn: LossFn, trained, frozen, tokens: jax.Array):
    trained = jax.tree.map(jnp.copy, trained)  # donated, so never the workload's own buffers
    opt = optimizer()
    opt_state = opt.init(trained)

    def step(trained, opt_state, frozen, tokens):
      loss, grads = jax.value_and_grad(loss_fn)(trained, frozen, tokens)
      updates, opt_state = opt.update(grads, opt_state, trained)
      return optax.apply_updates(trained, updates), opt_state, loss

    lowered = jax.jit(step, donate_argnums=(0, 1)).lower(trained, opt_state, frozen, tokens)
    self.compiled = lowered.compile()
    self.state, self.frozen, self.tokens = (trained, opt_state), frozen, tokens
    self.trained_params, self.frozen_bytes = _size(trained), _nbytes(frozen)

  def step(self) -> jax.Array:
    """Runs one training step (asynchronously) and returns its loss, taken before the update."""
    trained, opt_state, loss = self.compiled(*self.state, self.frozen, self.tokens)
    self.state = (trained, opt_state)
    return loss

  def sync(self, loss) -> None:
    jax.block_until_ready((self.state, loss))

  def analysis(self) -> dict[str, float]:
    """XLA's FLOPs and memory analysis of the compiled step (missing entries left out)."""
    out = {}
    cost = self.compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older JAX: one dict per computation
      cost = cost[0] if cost else {}
    if cost and "flops" in cost:
      out["flops"] = float(cost["flops"])
    mem = self.compiled.memory_analysis()
    if mem is not None:
      out["temp"] = mem.temp_size_in_bytes
      out["argument"] = mem.argument_size_in_bytes
      out["output"] = mem.output_size_in_bytes
      out["alias"] = mem.alias_size_in_bytes
    return out


# ----------------------------------------------------------------------------------------------
# Torch systems.


class TorchRunner:
  """A torch module, its AdamW over the parameters that require grad, and the fixed tokens."""

  framework = "torch"

  def __init__(self, module, tokens, dtype: str):
    import torch  # optional dependency

    self.torch = torch
    self.device = torch.device("cuda" if _on_gpu() and torch.cuda.is_available() else "cpu")
    self.module = module.to(self.device)
    params = [p for p in self.module.parameters() if p.requires_grad]
    self.opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    ids = torch.from_numpy(np.asarray(tokens, dtype=np.int64)).to(self.device)
    self.inputs, self.labels = ids[:, :-1], ids[:, 1:].reshape(-1)
    self.autocast = dtype == "bfloat16"
    self.trained_params = sum(p.numel() for p in params)
    self.frozen_bytes = sum(p.numel() * p.element_size() for p in self.module.parameters()
                            if not p.requires_grad)

  def step(self):
    torch = self.torch
    self.opt.zero_grad(set_to_none=True)
    with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
      logits = self.module(self.inputs)
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), self.labels)
    loss.backward()
    self.opt.step()
    return loss.detach()

  def sync(self, loss) -> None:
    if self.device.type == "cuda":
      self.torch.cuda.synchronize()
    float(loss)

  def analysis(self) -> dict[str, float]:
    return {}


def _torch_runner(name: str, w: Workload, dtype: str) -> TorchRunner:
  from benchmarks import torch_model  # optional dependency

  if name == "peft_torch":
    module = torch_model.peft_model(w.config, w.variables, w.adapter, RANK, ALPHA)
  else:
    module = torch_model.torch_model(w.config, w.variables)
    for p in module.parameters():
      p.requires_grad_(False)
    module.pos_embed.requires_grad_(True)
  return TorchRunner(module, w.tokens, dtype)


def _on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def build(name: str, w: Workload, dtype: str = "float32"):
  """The runner of system `name` on workload `w`: compiled (JAX) and ready for its step 0."""
  if name in TORCH_SYSTEMS:
    return _torch_runner(name, w, dtype)
  loss_fn, trained, frozen = _JAX_BUILDERS[name](w)
  return JaxRunner(loss_fn, trained, frozen, w.tokens)


# ----------------------------------------------------------------------------------------------
# Measuring.


@dataclasses.dataclass
class Result:
  name: str
  framework: str
  trained_params: int
  frozen_bytes: int
  loss0: float
  loss_after: float
  times_ms: list[float]
  analysis: dict[str, float]
  peak_rss: int  # bytes, the process's peak so far

  @property
  def median(self) -> float:
    return statistics.median(self.times_ms)


def _peak_rss() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def measure(name: str, w: Workload, warmup: int, timed: int, dtype: str = "float32") -> Result:
  """Builds system `name`, runs `warmup` steps (step 0 first), `timed` timed steps, one more."""
  runner = build(name, w, dtype)
  loss0 = float(runner.step())
  for _ in range(warmup - 1):
    runner.sync(runner.step())
  times = []
  for _ in range(timed):
    start = time.perf_counter()
    loss = runner.step()
    runner.sync(loss)
    times.append((time.perf_counter() - start) * 1e3)
  loss_after = float(runner.step())  # the loss of the state the timed steps left
  return Result(name, runner.framework, runner.trained_params, runner.frozen_bytes, loss0,
                loss_after, times, runner.analysis(), _peak_rss())


def check_step0_losses(results: Sequence[Result], dtype: str = "float32") -> list[str]:
  """Problems (empty if none): step-0 losses that differ from the first float32 system's.

  Systems computing in bfloat16 (``jlora_bf16``, or all with ``--dtype bfloat16``) get the
  bfloat16 tolerance.
  """
  if not results:
    return []
  exact = [r for r in results if r.name != "jlora_bf16" and r.name not in QUANTIZED]
  ref = (exact or list(results))[0]
  problems = []
  for r in results:
    low = dtype == "bfloat16" or r.name == "jlora_bf16"
    atol = LOSS_ATOL["quantized" if r.name in QUANTIZED else "bfloat16" if low else "float32"]
    if not abs(r.loss0 - ref.loss0) <= atol:
      problems.append(f"{r.name}: step-0 loss {r.loss0:.6f} != {ref.name}'s {ref.loss0:.6f} "
                      f"(tolerance {atol})")
  return problems


# ----------------------------------------------------------------------------------------------
# Reporting.

_MIB = 2**20


def _fmt(x, spec: str) -> str:
  return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def table_rows(results: Sequence[Result]) -> tuple[list[str], list[list[str]]]:
  """Header and formatted rows of the results table."""
  by_name = {r.name: r for r in results}
  header = ["system", "trained params", "median ms", "min ms", "× full", "× own floor",
            "GFLOP", "temp MiB", "arg MiB", "out MiB", "peak RSS MiB", "step-0 loss",
            "loss after"]
  rows = []
  for r in results:
    full, floor = by_name.get("full"), by_name.get(own_floor(r.name, r.framework))
    a = r.analysis
    mib = {k: a[k] / _MIB if k in a else None for k in ("temp", "argument", "output")}
    rows.append([
        r.name, f"{r.trained_params:,}", f"{r.median:.1f}", f"{min(r.times_ms):.1f}",
        _fmt(r.median / full.median if full else None, ".2f"),
        _fmt(r.median / floor.median if floor else None, ".2f"),
        _fmt(a["flops"] / 1e9 if "flops" in a else None, ".4g"),
        _fmt(mib["temp"], ".1f"), _fmt(mib["argument"], ".1f"), _fmt(mib["output"], ".1f"),
        f"{r.peak_rss / _MIB:.0f}", f"{r.loss0:.6f}", f"{r.loss_after:.6f}",
    ])
  return header, rows


def text_table(header, rows) -> str:
  widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
  line = lambda cells: "  ".join(  # noqa: E731
      c.ljust(n) if i == 0 else c.rjust(n)
      for i, (c, n) in enumerate(zip(cells, widths, strict=True)))
  return "\n".join([line(header), line(["-" * n for n in widths]), *map(line, rows)])


def markdown_table(header, rows) -> str:
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return "\n".join(lines)


def saved_lora_inputs(w: Workload, itemsize: int) -> int:
  """Bytes of the distinct inputs of the adapted layers (q, k and v share one) in one step."""
  c = w.config
  per_block = 3 * c.d_model + c.d_ff  # ln1 out (q, k, v), attention out (o), ln2 out, gelu out
  return c.blocks * w.num_tokens * per_block * itemsize


def notes(results: Sequence[Result], w: Workload, dtype: str) -> list[str]:
  """Lines on the targets: step-0 losses, FLOPs and temp memory against floor, bf16 memory."""
  by = {r.name: r for r in results}
  out = []
  losses = ", ".join(f"{r.name} {r.loss0:.6f}" for r in results)
  problems = check_step0_losses(results, dtype)
  out.append(f"Step-0 losses ({'MISMATCH: ' + '; '.join(problems) if problems else 'equal'}): "
             f"{losses}.")
  floor = by.get("floor")
  if floor and "flops" in floor.analysis:
    for name in ("jlora", "jlora_bf16", "merged", "nnx_lora", "full"):
      r = by.get(name)
      if r and "flops" in r.analysis:
        out.append(f"{name}: XLA FLOPs {r.analysis['flops'] / floor.analysis['flops']:.3f}× "
                   "floor's.")
  dtype_name = jnp.dtype(w.config.dtype).name
  saved = saved_lora_inputs(w, jnp.dtype(w.config.dtype).itemsize)
  r = by.get("jlora")
  if floor and r and "temp" in floor.analysis and "temp" in r.analysis:
    extra = r.analysis["temp"] - floor.analysis["temp"]
    verdict = "within" if extra <= saved else "over"
    out.append(f"jlora: temp {r.analysis['temp'] / _MIB:.1f} MiB = floor's "
               f"{floor.analysis['temp'] / _MIB:.1f} MiB {extra / _MIB:+.1f} MiB, {verdict} the "
               f"saved LoRA inputs ({saved / _MIB:.1f} MiB in {dtype_name}: the distinct inputs "
               "of the adapted layers).")
  f32, bf16 = by.get("jlora"), by.get("jlora_bf16")
  if f32 and bf16:
    arg = ""
    if "argument" in f32.analysis and "argument" in bf16.analysis:
      arg = (f"; compiled argument bytes {bf16.analysis['argument'] / _MIB:.1f} MiB vs "
             f"{f32.analysis['argument'] / _MIB:.1f} MiB")
    temp = ""
    if "temp" in f32.analysis and "temp" in bf16.analysis:
      temp = (f"; temp {bf16.analysis['temp'] / _MIB:.1f} MiB vs "
              f"{f32.analysis['temp'] / _MIB:.1f} MiB")
    out.append(f"jlora_bf16: frozen params {bf16.frozen_bytes / _MIB:.1f} MiB = "
               f"{bf16.frozen_bytes / f32.frozen_bytes:.3f}× the float32 jlora run's "
               f"{f32.frozen_bytes / _MIB:.1f} MiB{arg}{temp}.")
  out += quantized_notes(by, w)
  out += custom_notes(by)
  out.append("Peak RSS is the process's maximum so far (getrusage), so it never decreases down "
             "the table; systems run in the order shown.")
  return out


def adapted_kernel_bytes(w: Workload, name: str | None) -> int:
  """Bytes of the 24 adapted kernels alone, dense float32 (None) or as system `name` stores
  them (embeddings, norms and the head stay dense in every system)."""
  kernels = {p: x for p, x in jlora._tree.flatten(w.variables).items()
             if re.fullmatch(bm.LORA_TARGET_REGEX, p)}
  if name is not None:
    scheme, block, double_quant = QUANTIZED[name]
    kernels = jlora.quantize(kernels, ".*", scheme, block_size=block, double_quant=double_quant)
  return sum(x.nbytes for x in kernels.values())


def quantized_notes(by: dict, w: Workload) -> list[str]:
  out = []
  f32, bf16 = by.get("jlora"), by.get("jlora_bf16")
  dense = adapted_kernel_bytes(w, None)
  for name in QUANTIZED:
    r = by.get(name)
    if r is None:
      continue
    stored = adapted_kernel_bytes(w, name)
    line = (f"{name}: adapted kernels {stored / _MIB:.2f} MiB = {stored / dense:.4f}× their "
            f"float32 {dense / _MIB:.2f} MiB")
    if bf16 and "temp" in r.analysis and "temp" in bf16.analysis:
      ratio = r.analysis["temp"] / bf16.analysis["temp"]
      line += (f"; step temp {r.analysis['temp'] / _MIB:.1f} MiB = {ratio:.3f}× the bf16-base "
               f"step's ({'within' if ratio <= 1.05 else 'OVER'} +5 %)")
    if f32:
      line += f"; step time {r.median / f32.median:.2f}× the float32-base jlora step"
    out.append(line + ".")
  return out


def custom_notes(by: dict) -> list[str]:
  out = []
  for layout in cm.LAYOUTS:
    floor, r = by.get(f"floor_{layout}"), by.get(f"jlora_{layout}")
    if floor and r:
      out.append(f"jlora_{layout}: {r.median / floor.median:.3f}× its own floor (the same "
                 f"network written with {layout} layers, benchmarks/custom_model.py).")
  return out


def _version(pkg: str) -> str:
  try:
    return importlib.metadata.version(pkg)
  except importlib.metadata.PackageNotFoundError:
    return "not installed"


def machine() -> str:
  """CPU model, cores, accelerator, and the versions that matter."""
  cpu = platform.processor() or "unknown CPU"
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  device = jax.devices()[0]
  versions = ", ".join(f"{p} {_version(p)}" for p in
                       ("jax", "jaxlib", "flax", "optax", "torch", "peft"))
  return (f"{cpu}, {cores} cores ({os.cpu_count()} online); JAX backend {jax.default_backend()} "
          f"({device.device_kind}); Python {platform.python_version()}; {versions}")


def section(results, w: Workload, args, warmup: int, timed: int) -> str:
  header, rows = table_rows(results)
  c = w.config
  workload = (f"d_model {c.d_model}, {c.blocks} blocks, {c.heads} heads of {c.head_dim}, vocab "
              f"{c.vocab}, seq {c.seq} × batch {w.tokens.shape[0]}, {args.dtype}, "
              f"{_size(w.variables):,} params; LoRA rank {RANK}, α {ALPHA:g} on "
              f"{len(w.adapter.lora)} kernels ({jlora.num_params(w.adapter):,} params)")
  mode = " — **--quick smoke run: too few steps to quote**" if args.quick else ""
  lines = [
      f"## Training step (benchmarks/train_step.py){mode}",
      "",
      f"- Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
      f"- Machine: {machine()}",
      f"- Workload: {workload}",
      f"- Protocol: {warmup} warm-up steps, {timed} timed steps each; donated trained and "
      "optimizer state; ratios are of medians, from this one run.",
      f"- Command: `python benchmarks/train_step.py {' '.join(sys.argv[1:])}`".rstrip(),
      "",
      markdown_table(header, rows),
      "",
      *(f"- {n}" for n in notes(results, w, args.dtype)),
  ]
  return "\n".join(lines)


def write_section(path: Path, text: str, begin: str = BEGIN, end: str = END) -> None:
  """Replaces the text between the `begin`/`end` markers of `path` (creating what is missing).

  Every benchmark script writes its own section of benchmarks/RESULTS.md this way.
  """
  old = path.read_text() if path.exists() else "# Benchmark results\n"
  if begin not in old or end not in old:
    old = old.rstrip("\n") + f"\n\n{begin}\n{end}\n"
  before, rest = old.split(begin, 1)
  after = rest.split(end, 1)[1]
  path.write_text(f"{before}{begin}\n{text}\n{end}{after}")


# ----------------------------------------------------------------------------------------------
# Command line.


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true",
                 help=f"{QUICK_WARMUP} warm-up and {QUICK_TIMED} timed steps (a smoke run)")
  p.add_argument("--systems", default=",".join(SYSTEMS),
                 help="comma-separated subset of: " + ", ".join(SYSTEMS))
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="computation dtype of the layers (params stay float32)")
  p.add_argument("--d-model", type=int, default=512)
  p.add_argument("--blocks", type=int, default=4)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the RESULTS.md to update")
  args = p.parse_args(argv)
  names = [s.strip() for s in args.systems.split(",") if s.strip()]
  unknown = [s for s in names if s not in SYSTEMS]
  if unknown or not names:
    p.error(f"--systems: unknown {unknown}; choose from {', '.join(SYSTEMS)}")
  args.systems = [s for s in SYSTEMS if s in names]  # the protocol's order
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  warmup, timed = (QUICK_WARMUP, QUICK_TIMED) if args.quick else (WARMUP, TIMED)
  systems = args.systems
  if not torch_available() and any(s in TORCH_SYSTEMS for s in systems):
    print("torch or peft is not importable: skipping peft_torch and torch_floor.")
    systems = [s for s in systems if s not in TORCH_SYSTEMS]
  config = bm.GPTConfig(d_model=args.d_model, blocks=args.blocks, seq=args.seq,
                        dtype=jnp.dtype(args.dtype))
  w = make_workload(config, args.batch)
  print(machine())
  results = []
  for name in systems:
    print(f"{name} ...", end=" ", flush=True)
    r = measure(name, w, warmup, timed, args.dtype)
    results.append(r)
    print(f"step-0 loss {r.loss0:.6f}, median {r.median:.1f} ms", flush=True)
    gc.collect()
  header, rows = table_rows(results)
  print()
  print(text_table(header, rows))
  print()
  for line in notes(results, w, args.dtype):
    print(line)
  problems = check_step0_losses(results, args.dtype)
  if problems:
    raise AssertionError("step-0 losses differ, results not written:\n" + "\n".join(problems))
  write_section(args.out, section(results, w, args, warmup, timed))
  print(f"\nwrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
