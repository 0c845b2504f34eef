"""The main job: pretrain a small byte-level language model, then LoRA-fine-tune it.

    pip install -e ".[examples]"
    python examples/finetune.py                  # defaults: a few minutes on 2 CPU cores

1. Pretrains a decoder-only transformer (byte-level, Flax linen) on corpus A, the English prose
   of the Python Language Reference, or reuses the base weights a previous run cached.
2. LoRA-fine-tunes it on corpus B, Python source code from the standard library: `jlora.wrap`
   runs the frozen base with the adapter, and optax trains the adapter alone.
3. Fine-tunes every parameter on B for the same steps and schedule, as the baseline, and checks
   that `jlora.merge` + plain `model.apply` gives the wrapped model's eval loss.
4. Saves the adapter with `jlora.save` (orbax) and as a PEFT folder (`jlora.export_peft`), a
   loss-curve plot, and a markdown table of the eval losses.

``--quantize nf4`` (QLoRA) keeps the adapted kernels of the frozen base in NF4 and writes
``finetune_nf4.md`` instead; compare its eval loss on B with the float32 base's.

Scale it up on a GPU with the flags, e.g.
``--d-model 512 --layers 8 --heads 8 --seq 256 --batch 64 --pretrain-steps 5000 --steps 1000``.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402

import jlora  # noqa: E402

MERGE_TOLERANCE = 1e-4  # |eval loss of merge + model.apply - eval loss of the wrapped model|


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="finetune.py", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  common.model_arguments(parser)
  g = parser.add_argument_group("fine-tuning on corpus B")
  g.add_argument("--steps", type=common.positive, default=300, help="fine-tuning steps")
  g.add_argument("--rank", type=common.positive, default=8, help="LoRA rank r")
  g.add_argument("--alpha", type=common.positive_float, default=16.0, help="LoRA alpha (scale α/r)")
  g.add_argument("--targets", default="all",
                 help="'qv', 'qkvo', 'all' (q,k,v,o,up,down) or a regex over parameter paths")
  g.add_argument("--lr", type=common.positive_float, default=common.LORA_LR,
                 help="LoRA peak LR")
  g.add_argument("--full-lr", type=common.positive_float, default=common.FULL_LR,
                 help="full fine-tuning peak LR")
  g.add_argument("--no-full", action="store_true", help="skip the full fine-tuning baseline")
  g.add_argument("--quantize", choices=("nf4", "int4", "int8"), default=None,
                 help="QLoRA: keep the adapted kernels of the frozen base quantized "
                 "(jlora.quantize, blocks of 64); implies --no-full")
  g.add_argument("--double-quant", action="store_true",
                 help="with --quantize: also store the block scales in 8 bits")
  g.add_argument("--evals", type=int, default=10, help="eval points on each fine-tuning curve")
  g = parser.add_argument_group("outputs")
  g.add_argument("--out", default="runs/finetune", help="where the adapter is saved")
  g.add_argument("--results-dir", default=str(common.RESULTS),
                 help="where finetune.md and finetune.png are written")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
  """Runs the job; returns what it measured and where it wrote (for tests)."""
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  start = time.perf_counter()
  config = common.lora_config(args.targets, args.rank, args.alpha)
  setup = common.prepare(args, [config])
  base, batch = setup.base, args.batch
  if args.quantize:  # QLoRA: the frozen kernels that get adapters are stored quantized
    base = dataclasses.replace(base, variables=jlora.quantize(
        base.variables, config.targets, args.quantize, double_quant=args.double_quant))
    args.no_full = True
  m = dict(base_params=common.num_params(setup.base.variables),  # dense, as trained
           before=base.eval(setup.eval_b, batch), before_a=base.eval(setup.eval_a, batch))
  print(f"Base model: eval loss {m['before']:.4f} on B ({setup.corpus_b.name}), "
        f"{m['before_a']:.4f} on A ({setup.corpus_a.name})")

  adapter = common.init_adapter(base, config, args.seed + 1)
  print(jlora.summary(adapter, base.variables).splitlines()[-1],
        f"(r={args.rank}, {len(adapter.lora)} kernels)")
  lora = common.finetune_lora(base, adapter, setup.corpus_b, setup.eval_b, steps=args.steps,
                              lr=args.lr, batch=batch, seed=args.seed + 2, evals=args.evals)
  adapter = lora.trained
  m.update(lora=lora.eval_loss, lora_a=base.eval(setup.eval_a, batch, adapter=adapter),
           lora_params=jlora.num_params(adapter), **_quantized(base),
           **_merge_check(base, adapter, setup.eval_b, batch))
  full = None
  if not args.no_full:
    full = common.finetune_full(base, setup.corpus_b, setup.eval_b, steps=args.steps,
                                lr=args.full_lr, batch=batch, seed=args.seed + 2,
                                evals=args.evals)
    m.update(full=full.eval_loss, full_a=base.eval(setup.eval_a, batch, variables=full.trained))

  out = common.save_adapter(args.out, adapter, config, step=args.steps)
  restored = jlora.restore(out, params=base.variables)
  m["restored"] = base.eval(setup.eval_b, batch, adapter=restored.adapter)
  peft = common.export_peft(args.out, adapter, config)
  results_dir = pathlib.Path(args.results_dir).resolve()
  results_dir.mkdir(parents=True, exist_ok=True)
  name = f"finetune_{args.quantize}" if args.quantize else "finetune"
  curves = {f"LoRA r={args.rank}": lora.curve} | ({"full fine-tuning": full.curve} if full else {})
  common.plot_curves(results_dir / f"{name}.png",
                     [(f"pretraining on A ({setup.corpus_a.name})", {"base": base.curve}),
                      (f"fine-tuning on B ({setup.corpus_b.name})", curves)])
  table, notes = _report(args, setup, m, lora, full)
  results = common.write_results(
      results_dir / f"{name}.md", "LoRA vs full fine-tuning",
      common.command_line("finetune.py", argv),
      table + "\n\n" + "\n".join(f"- {n}" for n in notes) + f"\n\n![loss curves]({name}.png)")

  print(f"\n{table}\n")
  print("\n".join(notes[2:]))
  print(f"\nSaved the adapter and its LoraConfig (orbax) to {out}")
  print(f"Saved it as a Hugging Face PEFT adapter folder to {peft}")
  print(f"Loss curves: {results_dir / f'{name}.png'}\nResults table: {results}")
  print(f"Total time: {time.perf_counter() - start:.0f} s")
  if m["merge_gap"] > MERGE_TOLERANCE or m["restored"] != m["lora"]:
    raise common.CliError(
        f"the merged model or the restored adapter does not reproduce the trained adapter's "
        f"eval loss {m['lora']:.6f} (merged {m['merged']:.6f}, restored {m['restored']:.6f}).")
  return dict(m, adapter_dir=out, peft_dir=peft, results=results,
              plot=results_dir / f"{name}.png")


def _quantized(base: common.Base) -> dict:
  """How many kernels of the base are quantized, and the summary's bytes line."""
  leaves = jlora._tree.flatten(base.variables).values()
  quantized = [x for x in leaves if jlora.quant.is_quantized(x)]
  dense = sum(x.size * x.dtype.itemsize for x in quantized)
  stored = sum(x.nbytes for x in quantized)
  ratio = stored / max(dense, 1)
  return dict(quantized_kernels=len(quantized),
              frozen_bytes=f"{stored:,} bytes against {dense:,} dense, {ratio:.3f}×")


def _merge_check(base: common.Base, adapter: jlora.Adapter, windows, batch: int) -> dict:
  """Eval loss and logits of plain `model.apply` on merged weights vs the wrapped model."""
  merged = jax.jit(jlora.merge)(base.variables, adapter)
  ids = windows[:batch, :-1]
  wrapped_logits = jax.jit(jlora.wrap(base.model.apply))(base.variables, adapter, ids)
  logits_gap = float(jnp.abs(jax.jit(base.model.apply)(merged, ids) - wrapped_logits).max())
  loss = base.eval(windows, batch, variables=merged)
  return dict(merged=loss, merge_gap=abs(loss - base.eval(windows, batch, adapter=adapter)),
              logits_gap=logits_gap)


def _report(args, setup: common.Setup, m: dict, lora, full) -> tuple[str, list[str]]:
  """The markdown table and the notes under it."""
  name = args.targets if args.targets in common.TARGETS else "custom"
  rows = [["base model, not fine-tuned", "0", "0 %", f"{m['before']:.4f}",
           f"{m['before_a']:.4f}", "-"],
          [f"LoRA r={args.rank}, α={args.alpha:g}, targets {name}"
           + (f", on a {args.quantize}{' + dq' if args.double_quant else ''} base"
              if args.quantize else ""),
           *common.fmt_params(m["lora_params"], m["base_params"]), f"{m['lora']:.4f}",
           f"{m['lora_a']:.4f}", f"{lora.seconds:.0f} s"],
          ["the same LoRA merged: jlora.merge, then model.apply", "-", "-", f"{m['merged']:.4f}",
           "-", "-"]]
  if full:
    rows.append(["full fine-tuning", *common.fmt_params(m["base_params"], m["base_params"]),
                 f"{m['full']:.4f}", f"{m['full_a']:.4f}", f"{full.seconds:.0f} s"])
  table = common.markdown_table(
      ["model", "trainable params", "of base", "eval loss on B", "eval loss on A",
       "train time"], rows)
  ok = "within" if m["merge_gap"] <= MERGE_TOLERANCE else "OUTSIDE"
  notes = [
      f"Base: {m['base_params']:,}-parameter byte-level decoder (d_model {args.d_model}, "
      f"{args.layers} blocks, {args.heads} heads, context {args.seq} bytes), pretrained for "
      f"{args.pretrain_steps} steps on corpus A ({setup.corpus_a.name}), then fine-tuned for "
      f"{args.steps} steps of {args.batch}×{args.seq} bytes of corpus B "
      f"({setup.corpus_b.name}): AdamW, 10 % warmup, cosine decay, peak LR {args.lr:g} (LoRA) "
      f"and {args.full_lr:g} (full fine-tuning)"
      + (", each the best of a sweep for its method (lr_sweep.md)"
         if (args.lr, args.full_lr) == (common.LORA_LR, common.FULL_LR) else "")
      + ", the same data order for both.",
      f"Eval loss: mean next-byte cross-entropy (nats) over {len(setup.eval_b)} held-out windows "
      "from the last 10 % of each corpus; 'on A' shows how much of the pretraining survives.",
      f"Merged inference: |eval loss merged − wrapped| = {m['merge_gap']:.2e} ({ok} the "
      f"tolerance {MERGE_TOLERANCE:g}); max |logits merged − wrapped| = {m['logits_gap']:.2e}.",
      f"Adapter saved with `jlora.save` and read back with `jlora.restore`: eval loss "
      f"{m['restored']:.4f}.",
  ]
  if args.quantize:
    dq = " with double quantization" if args.double_quant else ""
    notes.append(f"QLoRA: the {m['quantized_kernels']} adapted kernels of the frozen base are "
                 f"stored as {args.quantize}{dq} ({m['frozen_bytes']}); the merged model is "
                 "dense: dequantized W + ΔW.")
  if full:
    gap = 100 * (m["lora"] - m["full"]) / m["full"]
    notes.append(f"LoRA vs full fine-tuning: eval loss {gap:+.2f} % with "
                 f"{100 * m['lora_params'] / m['base_params']:.3g} % of the trainable "
                 "parameters.")
  return table, notes


if __name__ == "__main__":
  common.cli(main, "finetune.py")
