"""The LoRA paper's rank sweep (Hu et al., 2021, §7.2, Table 6), regenerated at small scale.

    python examples/paper/rank_sweep.py

Fine-tunes the byte-level decoder of examples/finetune.py (pretrained on prose, the cached base
is shared) on Python source code with LoRA of rank r = 1, 2, 4, 8, 64 on three target sets:
W_q, W_v; W_q, W_k, W_v, W_o; and every linear layer of the blocks (attention and MLP), plus
full fine-tuning, with the same steps, schedule and data order. Writes a markdown table of eval
loss and trainable parameters and a plot to examples/results/.

The paper keeps α fixed while r varies (scale α/r) and uses one learning rate for all ranks;
so does this script by default (``--rslora`` scales by α/√r instead). Several comma-separated
``--lr`` values train each configuration at each and keep the best eval loss.

``--search qv`` also runs `jlora.search_rank` on that target set: grow r from the smallest
rank while the eval loss improves by at least ``--min-improvement``, stop at the plateau. The
search runs first and trains lazily; the sweep then reuses its runs.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from collections.abc import Sequence

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import common  # noqa: E402

import jlora  # noqa: E402

TARGET_LABELS = {"qv": "q, v", "qkvo": "q, k, v, o", "all": "q, k, v, o, up, down"}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="rank_sweep.py", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  common.model_arguments(parser)
  g = parser.add_argument_group("the sweep")
  g.add_argument("--steps", type=common.positive, default=300, help="fine-tuning steps per run")
  g.add_argument("--ranks", type=common.int_list, default=(1, 2, 4, 8, 64),
                 help="comma-separated LoRA ranks")
  g.add_argument("--targets", type=target_list, default=("qv", "qkvo", "all"),
                 help="comma-separated target sets among qv, qkvo, all")
  g.add_argument("--alpha", type=common.positive_float, default=16.0,
                 help="LoRA alpha, the same for every rank")
  g.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r) instead of alpha/r")
  g.add_argument("--lr", type=float_list, default=(common.LORA_LR,), help="LoRA peak LR(s)")
  g.add_argument("--full-lr", type=float_list, default=(common.FULL_LR,),
                 help="full fine-tuning peak LR(s)")
  g.add_argument("--search", type=target_list, default=("qv",),
                 help="target sets to run jlora.search_rank on ('' for none)")
  g.add_argument("--min-improvement", type=float, default=0.01,
                 help="search_rank: smallest relative eval-loss decrease that counts")
  g.add_argument("--results-dir", default=str(common.RESULTS),
                 help="where rank_sweep.md and rank_sweep.png are written")
  args = parser.parse_args(argv)
  if not args.ranks or list(args.ranks) != sorted(set(args.ranks)):
    parser.error(f"--ranks must be strictly increasing, got {','.join(map(str, args.ranks))}")
  return args


def target_list(text: str) -> tuple[str, ...]:
  names = tuple(t.strip() for t in text.split(",") if t.strip())
  unknown = [t for t in names if t not in TARGET_LABELS]
  if unknown:
    raise argparse.ArgumentTypeError(
        f"unknown target set(s) {', '.join(unknown)}; choose among {', '.join(TARGET_LABELS)}")
  return names


def float_list(text: str) -> tuple[float, ...]:
  values = tuple(common.positive_float(t) for t in text.split(",") if t.strip())
  if not values:
    raise argparse.ArgumentTypeError("expected at least one positive number")
  return values


def main(argv: Sequence[str] | None = None) -> dict:
  """Runs the sweep; returns {(targets, rank): eval loss} plus the full and base losses."""
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  start = time.perf_counter()
  configs = {(t, r): common.lora_config(t, r, args.alpha, rslora=args.rslora)
             for t in dict.fromkeys(args.targets + args.search) for r in args.ranks}
  setup = common.prepare(args, list(configs.values()))
  base, batch = setup.base, args.batch
  base_params = common.num_params(base.variables)
  runs: dict[tuple[str, int], tuple[float, int, float]] = {}  # -> (loss, params, lr)

  def run_lora(targets: str, rank: int) -> float:
    if (targets, rank) not in runs:
      adapter = common.init_adapter(base, configs[targets, rank], args.seed + 1)
      best = None
      for lr in args.lr:
        result = common.finetune_lora(base, adapter, setup.corpus_b, setup.eval_b,
                                      steps=args.steps, lr=lr, batch=batch, seed=args.seed + 2,
                                      desc=f"LoRA {targets} r={rank} lr={lr:g}")
        print(f"  {TARGET_LABELS[targets]:<22} r={rank:<3} lr={lr:<8g} eval loss "
              f"{result.eval_loss:.4f}")
        if best is None or result.eval_loss < best[0]:
          best = (result.eval_loss, jlora.num_params(adapter), lr)
      runs[targets, rank] = best
    return runs[targets, rank][0]

  base_loss = base.eval(setup.eval_b, batch)
  print(f"Base model, not fine-tuned: eval loss on B {base_loss:.4f}")
  searches = {t: jlora.search_rank(lambda r, t=t: run_lora(t, r), args.ranks,
                                   min_improvement=args.min_improvement) for t in args.search}
  for targets in args.targets:
    for rank in args.ranks:
      run_lora(targets, rank)
  full = None
  for lr in args.full_lr:
    loss = common.finetune_full(base, setup.corpus_b, setup.eval_b, steps=args.steps, lr=lr,
                                batch=batch, seed=args.seed + 2).eval_loss
    print(f"  full fine-tuning             lr={lr:<8g} eval loss {loss:.4f}")
    full = min(full or (loss, lr), (loss, lr))

  results_dir = pathlib.Path(args.results_dir)
  results_dir.mkdir(parents=True, exist_ok=True)
  plot = results_dir / "rank_sweep.png"
  _plot(plot, runs, args.targets, full[0], base_loss, base_params)
  body = _report(args, runs, full, base_loss, base_params, searches)
  results = common.write_results(results_dir / "rank_sweep.md",
                                 "Rank sweep: eval loss and trainable parameters",
                                 common.command_line("paper/rank_sweep.py", argv), body)
  print()
  print(body.split("\n\n![")[0])
  print(f"\nPlot: {plot.resolve()}\nResults table: {results}")
  print(f"Total time: {time.perf_counter() - start:.0f} s")
  return dict(runs=runs, full=full[0], base=base_loss, searches=searches, results=results)


def _report(args, runs, full, base_loss, base_params, searches) -> str:
  tuned = len(args.lr) > 1 or len(args.full_lr) > 1
  lr_column = (lambda lr: [f"{lr:g}"]) if tuned else (lambda lr: [])  # noqa: E731
  rows = [["base model, not fine-tuned", "-", "0", "0 %", *(["-"] if tuned else []),
           f"{base_loss:.4f}", "-"]]
  for targets in args.targets:
    for rank in args.ranks:
      loss, params, lr = runs[targets, rank]
      rows.append([f"LoRA on {TARGET_LABELS[targets]}", str(rank),
                   *common.fmt_params(params, base_params), *lr_column(lr), f"{loss:.4f}",
                   f"{100 * (loss - full[0]) / full[0]:+.2f} %"])
  rows.append(["full fine-tuning", "-", *common.fmt_params(base_params, base_params),
               *lr_column(full[1]), f"{full[0]:.4f}", "0 %"])
  table = common.markdown_table(
      ["method", "rank", "trainable params", "of base", *(["best peak LR"] if tuned else []),
       "eval loss on B", "vs full FT"], rows)
  scale = "α/√r" if args.rslora else "α/r"
  lrs = lambda values: ", ".join(f"{v:g}" for v in values)  # noqa: E731
  notes = [
      f"Each run: {args.steps} steps of {args.batch}×{args.seq} bytes of corpus B from the same "
      f"base, data order and A initialisation; AdamW, 10 % warmup, cosine decay; LoRA peak LR "
      f"{lrs(args.lr)}, full fine-tuning {lrs(args.full_lr)}"
      + (" (best of these per configuration, selected on the eval windows)"
         if len(args.lr) > 1 or len(args.full_lr) > 1 else "")
      + f"; α = {args.alpha:g} for every rank (scale {scale}).",
      f"Eval loss: mean next-byte cross-entropy (nats) over {args.eval_windows} held-out windows "
      f"of corpus B; base model {base_params:,} parameters.",
  ]
  within = [(t, r) for (t, r), (loss, params, _) in runs.items()
            if r <= 8 and params <= 0.01 * base_params and loss <= 1.02 * full[0]]
  notes.append("LoRA with r ≤ 8, ≤ 1 % of the parameters and eval loss within 2 % of full "
               "fine-tuning: " + (", ".join(f"{TARGET_LABELS[t]} r={r}" for t, r in within)
                                  if within else "none at this scale."))
  for targets, result in searches.items():
    tried = ", ".join(f"r={r}: {s:.4f}" for r, s in result.history)
    notes.append(f"`jlora.search_rank` on {TARGET_LABELS[targets]} (min_improvement "
                 f"{args.min_improvement:g}): chose r = {result.best_rank} after trying {tried}.")
  return (table + "\n\n" + "\n".join(f"- {n}" for n in notes)
          + "\n\n![eval loss against rank and parameters](rank_sweep.png)")


def _plot(path, runs, target_sets, full_loss, base_loss, base_params) -> None:
  plt = common.pyplot()

  fig, (by_rank, by_params) = plt.subplots(1, 2, figsize=(12, 4.2))
  for i, targets in enumerate(target_sets):
    points = sorted((r, loss, params) for (t, r), (loss, params, _) in runs.items()
                    if t == targets)
    ranks, losses, params = zip(*points, strict=True)
    label = f"LoRA on {TARGET_LABELS[targets]}"
    by_rank.plot(ranks, losses, "o-", color=f"C{i}", label=label)
    by_params.plot(params, losses, "o-", color=f"C{i}", label=label)
  for ax in (by_rank, by_params):
    ax.axhline(full_loss, color="k", ls="--", label="full fine-tuning")
    ax.axhline(base_loss, color="gray", ls=":", label="base, not fine-tuned")
    ax.set_ylabel("eval loss on B (nats/byte)")
    ax.grid(alpha=0.3)
  by_params.plot([base_params], [full_loss], "k*", markersize=10)
  by_rank.set(xscale="log", xlabel="rank r", title="eval loss against rank")
  ranks = sorted({r for _, r in runs})
  by_rank.set_xticks(ranks, [str(r) for r in ranks])
  by_rank.minorticks_off()
  by_params.set(xscale="log", xlabel="trainable parameters",
                title="eval loss against trainable parameters")
  by_params.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  common.cli(main, "rank_sweep.py")
