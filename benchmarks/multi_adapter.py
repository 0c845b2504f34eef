"""Many adapters on one frozen base: forward time of serving systems (shared/BENCHMARK.md model).

Forward passes only, on the standard decoder (benchmarks/model.py) with a batch of 32 × seq 128
on CPU; every adapter is rank 8, α 16 on q, k, v, o, up and down of every block (BENCHMARK.md's
LoRA), with distinct random A and B. In one process, one after another:

- ``base``: the frozen model, ``model.apply(variables, tokens)``;
- ``merged``: one adapter merged into the weights beforehand (``jlora.merge``), so the same
  compiled function as ``base`` on other weights;
- ``factored``: one adapter through ``jlora.wrap(model.apply)``, unmerged;
- ``routed K=k``: a mixed batch in which example b uses adapter ``b mod k`` of a stack of 32,
  through ``jlora.route`` (a per-example gather of the factors and a batched contraction);
- ``sub-batch loop K=k``: PEFT's method for mixed batches: one forward pass per distinct adapter
  on its own sub-batch (``jlora.select`` + ``wrap``, one compiled function, called k times),
  the outputs put back in batch order;
- ``routed, stack of s``: K = 4 distinct adapters in the batch, from stacks of 4 and 256.

Then the hot-swap: one compiled serving function takes the stack and an index
(``jlora.select``); switching to another index runs it again without tracing or compiling
(the trace count is checked), against the time to compile a serving function afresh.

After warm-up calls, each timed call is measured on its own up to ``jax.block_until_ready``;
the table gives median and min ms, ratios of medians to ``base`` and to ``factored``, and the
compiled function's XLA FLOPs. Ratios are from one run; machines are noisy, so run it on a quiet
one. It writes its section between the ``multi_adapter`` markers of benchmarks/RESULTS.md::

    python benchmarks/multi_adapter.py            # the full protocol (several minutes, 2 cores)
    python benchmarks/multi_adapter.py --quick    # a smoke run on a small model, not for quoting
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jlora  # noqa: E402
from benchmarks import model as bm  # noqa: E402
from benchmarks.train_step import machine, markdown_table, text_table, write_section  # noqa: E402,E501

RANK, ALPHA = 8, 16.0
WARMUP, TIMED = 3, 15
QUICK_WARMUP, QUICK_TIMED = 1, 3
KS = (1, 4, 16, 32)
ROUTED_STACK = 32  # adapters in the stack of the routed K rows
STACK_SIZES = (4, 256)  # routed with K = 4 distinct adapters from stacks of these sizes
BEGIN, END = "<!-- multi_adapter:begin -->", "<!-- multi_adapter:end -->"
DEFAULT_OUT = Path(__file__).resolve().parent / "RESULTS.md"


class Row(NamedTuple):
  name: str
  times_ms: list[float]
  flops: float | None

  @property
  def median(self) -> float:
    return statistics.median(self.times_ms)


def time_calls(fn: Callable[[], Any], warmup: int, timed: int) -> list[float]:
  """Milliseconds of each of `timed` calls of `fn` after `warmup` calls, to block_until_ready."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(timed):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(1e3 * (time.perf_counter() - start))
  return times


def xla_flops(jitted, *args) -> float | None:
  """XLA's FLOP count of the compiled function (None where the backend gives none)."""
  analysis = jitted.lower(*args).compile().cost_analysis()
  if isinstance(analysis, list | tuple):
    analysis = analysis[0] if analysis else {}
  return (analysis or {}).get("flops")


def trained(adapter: jlora.Adapter, seed: int) -> jlora.Adapter:
  """`adapter` with random A and B (as if trained: B ≠ 0)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: jnp.asarray(0.02 * rng.standard_normal(x.shape).astype(np.float32)), adapter)


def random_stack(template: jlora.Adapter, size: int, seed: int) -> jlora.AdapterStack:
  """A stack of `size` distinct trained-looking adapters shaped like `template`."""
  one = jax.tree.map(lambda x: x[0], jlora.stack([template]))  # the stack's structure
  return trained(jax.tree.map(lambda x: jax.ShapeDtypeStruct((size, *x.shape), x.dtype), one),
                 seed)


class Setup(NamedTuple):
  config: bm.GPTConfig
  model: bm.GPT
  variables: dict
  tokens: jax.Array
  adapter: jlora.Adapter  # one trained-looking adapter
  stack: jlora.AdapterStack  # ROUTED_STACK adapters


def make_setup(config: bm.GPTConfig, batch: int, seed: int = 0) -> Setup:
  model = bm.GPT(config)
  tokens = jax.random.randint(jax.random.key(seed), (batch, config.seq), 0, config.vocab,
                              jnp.int32)
  variables = bm.init_variables(config, seed)
  lora_config = jlora.LoraConfig(rank=RANK, alpha=ALPHA, targets=bm.LORA_TARGET_REGEX)
  adapter = trained(jlora.init(jax.random.key(seed + 1), variables, lora_config, model.apply,
                               tokens), seed + 1)
  return Setup(config, model, variables, tokens, adapter,
               random_stack(adapter, ROUTED_STACK, seed + 2))


def subbatch_loop(single: Callable, variables, stack, tokens, ids: np.ndarray):
  """PEFT's mixed batch: one forward pass per distinct adapter on its sub-batch, reassembled."""
  order = np.argsort(ids, kind="stable")
  outputs = [single(variables, stack, jnp.int32(k), tokens[np.flatnonzero(ids == k)])
             for k in np.unique(ids)]
  return jnp.concatenate(outputs)[np.argsort(order)]


def run(s: Setup, warmup: int, timed: int, log: Callable[[str], None]) -> tuple[list, dict]:
  """Every system's Row, and the hot-swap measurements."""
  apply = jax.jit(s.model.apply)
  lora_apply = jlora.wrap(s.model.apply)
  factored = jax.jit(lora_apply)
  routed = jax.jit(lambda v, stack, ids, x: lora_apply(v, jlora.route(stack, ids), x))
  single = jax.jit(lambda v, stack, i, x: lora_apply(v, jlora.select(stack, i), x))
  merged_vars = jax.jit(jlora.merge)(s.variables, s.adapter)
  batch = s.tokens.shape[0]
  rows = []

  def add(name, fn, jitted=None, *args):
    log(f"{name} ...")
    flops = xla_flops(jitted, *args) if jitted is not None else None
    rows.append(Row(name, time_calls(fn, warmup, timed), flops))
    log(f"  median {rows[-1].median:.1f} ms")

  args = (s.variables, s.tokens)
  add("base", lambda: apply(*args), apply, *args)
  add("merged (1 adapter)", lambda: apply(merged_vars, s.tokens), apply, merged_vars, s.tokens)
  fargs = (s.variables, s.adapter, s.tokens)
  add("factored (1 adapter)", lambda: factored(*fargs), factored, *fargs)
  for k in KS:
    ids = jnp.arange(batch, dtype=jnp.int32) % k
    rargs = (s.variables, s.stack, ids, s.tokens)
    add(f"routed K={k}", lambda rargs=rargs: routed(*rargs), routed, *rargs)
  for k in KS:
    ids = np.arange(batch) % k
    add(f"sub-batch loop K={k}",
        lambda ids=ids: subbatch_loop(single, s.variables, s.stack, s.tokens, ids))
  for size in STACK_SIZES:
    stack = random_stack(s.adapter, size, 100 + size)
    rargs = (s.variables, stack, jnp.arange(batch, dtype=jnp.int32) % 4, s.tokens)
    add(f"routed K=4, stack of {size}", lambda rargs=rargs: routed(*rargs), routed, *rargs)
    del stack, rargs
  return rows, hot_swap(s, lora_apply, warmup, timed, log)


def hot_swap(s: Setup, lora_apply, warmup: int, timed: int, log) -> dict:
  """A swap in a compiled select server (a call with a new index) vs its first call (compile)."""
  log("hot-swap ...")
  traces = []

  def serve(v, stack, i, x):
    traces.append(None)
    return lora_apply(v, jlora.select(stack, i), x)

  served = jax.jit(serve)
  start = time.perf_counter()
  jax.block_until_ready(served(s.variables, s.stack, jnp.int32(0), s.tokens))
  first_s = time.perf_counter() - start
  indices = iter(range(1, 10**9))
  swap_ms = time_calls(
      lambda: served(s.variables, s.stack, jnp.int32(next(indices) % s.stack.size), s.tokens),
      warmup, timed)
  same_ms = time_calls(lambda: served(s.variables, s.stack, jnp.int32(0), s.tokens), 0, timed)
  # A merged server swaps by merging the new adapter into the weights instead.
  remerge = jax.jit(lambda v, stack, i: jlora.merge(v, jlora.select(stack, i)))
  remerge_ms = time_calls(
      lambda: remerge(s.variables, s.stack, jnp.int32(next(indices) % s.stack.size)),
      warmup + 1, timed)
  return {"first_s": first_s, "swap_ms": statistics.median(swap_ms),
          "same_ms": statistics.median(same_ms), "traces": len(traces),
          "swaps": warmup + timed, "remerge_ms": statistics.median(remerge_ms)}


def notes(rows: Sequence[Row], swap: dict) -> list[str]:
  by = {r.name: r.median for r in rows}
  f, k1, k32 = by["factored (1 adapter)"], by["routed K=1"], by["routed K=32"]
  loop32 = by["sub-batch loop K=32"]
  s_small, s_big = (by[f"routed K=4, stack of {n}"] for n in STACK_SIZES)

  def verdict(ok):
    return "met" if ok else "NOT met"

  return [
      f"routed K=32 / factored = {k32 / f:.2f} (target ≤ 1.3: {verdict(k32 <= 1.3 * f)}); "
      f"routed K=32 / routed K=1 = {k32 / k1:.2f} (target ≤ 1.15: "
      f"{verdict(k32 <= 1.15 * k1)}).",
      f"sub-batch loop K=32 / routed K=32 = {loop32 / k32:.1f} (target ≥ 3: "
      f"{verdict(loop32 >= 3 * k32)}).",
      f"routed with a stack of {STACK_SIZES[1]} / stack of {STACK_SIZES[0]} = "
      f"{s_big / s_small:.2f} (target ≤ 1.2: {verdict(s_big <= 1.2 * s_small)}).",
      f"hot-swap: {swap['swaps']} swaps to new indices in one compiled select server took "
      f"{swap['swap_ms']:.1f} ms each (median; the same index again: {swap['same_ms']:.1f} ms) "
      f"with {swap['traces']} trace in all (target: a swap costs no compile: "
      f"{verdict(swap['traces'] == 1)}); the server's first call (trace, compile, run) took "
      f"{swap['first_s']:.2f} s; a merged server's swap (merge the new adapter, compiled) "
      f"took {swap['remerge_ms']:.1f} ms.",
      "The sub-batch loop runs the whole model once per distinct adapter on its sub-batch "
      "(select + wrap, one compiled function called K times); PEFT loops per adapted layer "
      "inside one pass instead.",
  ]


def table(rows: Sequence[Row]) -> tuple[list[str], list[list[str]]]:
  by = {r.name: r.median for r in rows}
  base, fac = by["base"], by["factored (1 adapter)"]
  header = ["system", "median ms", "min ms", "× base", "× factored", "GFLOP"]
  body = [[r.name, f"{r.median:.1f}", f"{min(r.times_ms):.1f}", f"{r.median / base:.2f}",
           f"{r.median / fac:.2f}", "-" if r.flops is None else f"{r.flops / 1e9:.4g}"]
          for r in rows]
  return header, body


def section(rows, swap, s: Setup, args, warmup: int, timed: int) -> str:
  c = s.config
  n_adapter = jlora.num_params(s.adapter)
  mode = " — **--quick smoke run: not for quoting**" if args.quick else ""
  lines = [
      f"## Many adapters, forward only (benchmarks/multi_adapter.py){mode}",
      "",
      f"- Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
      f"- Machine: {machine()}",
      f"- Workload: d_model {c.d_model}, {c.blocks} blocks, {c.heads} heads of {c.head_dim}, "
      f"vocab {c.vocab}, batch {s.tokens.shape[0]} × seq {c.seq}, float32; each adapter rank "
      f"{RANK}, α {ALPHA:g} on {len(s.adapter.lora)} kernels ({n_adapter:,} params); routed "
      f"rows: example b uses adapter b mod K of a stack of {ROUTED_STACK}.",
      f"- Protocol: {warmup} warm-up and {timed} timed calls per system, each to "
      "block_until_ready; ratios of medians from this one run.",
      f"- Command: `python benchmarks/multi_adapter.py {' '.join(args.argv)}`".rstrip(),
      "",
      markdown_table(*table(rows)),
      "",
      *(f"- {n}" for n in notes(rows, swap)),
  ]
  return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true",
                 help=f"a smoke run: {QUICK_WARMUP} warm-up and {QUICK_TIMED} timed calls on a "
                      "small model (d_model 128, 2 blocks, seq 32) unless sizes are given")
  p.add_argument("--d-model", type=int, default=None, help="model width (default 512)")
  p.add_argument("--blocks", type=int, default=None, help="decoder blocks (default 4)")
  p.add_argument("--seq", type=int, default=None, help="sequence length (default 128)")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the RESULTS.md to update")
  args = p.parse_args(argv)
  args.argv = list(sys.argv[1:] if argv is None else argv)
  small = {"d_model": 128, "blocks": 2, "seq": 32} if args.quick else {}
  full = {"d_model": 512, "blocks": 4, "seq": 128}
  for name, default in full.items():
    if getattr(args, name) is None:
      setattr(args, name, small.get(name, default))
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
  if args.batch < max(KS):
    p.error(f"--batch must be >= {max(KS)} (the largest K), got {args.batch}")
  if args.d_model % 64:
    p.error(f"--d-model must be a multiple of the head size 64, got {args.d_model}")
  return args


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  warmup, timed = (QUICK_WARMUP, QUICK_TIMED) if args.quick else (WARMUP, TIMED)
  config = bm.GPTConfig(d_model=args.d_model, blocks=args.blocks, seq=args.seq)
  s = make_setup(config, args.batch)
  print(machine())
  rows, swap = run(s, warmup, timed, lambda line: print(line, flush=True))
  print()
  print(text_table(*table(rows)))
  print()
  for line in notes(rows, swap):
    print(line)
  write_section(args.out, section(rows, swap, s, args, warmup, timed), BEGIN, END)
  print(f"\nwrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
