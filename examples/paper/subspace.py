"""The LoRA paper's §7 analysis of what the update learns, regenerated at small scale.

    python examples/paper/subspace.py

Trains two LoRA adapters, of rank 8 and rank 64, on W_q and W_v of the byte-level decoder of
examples/finetune.py (the cached base is shared), fine-tuning on Python source code. Then, from
`jlora.analysis`:

* the normalized subspace similarity φ(A_r8, A_r64, i, j) = ‖U_iᵀ U_j‖²_F / min(i, j) between
  the top-i right-singular directions of A_r8 and the top-j of A_r64, drawn as the paper's
  Figure 3 heat map for W_q and W_v of one block (for random subspaces φ ≈ max(i, j) / d);
* the amplification factor ‖ΔW‖_F / ‖U_rᵀ W V_r‖_F of each update (Table 7), next to that of
  a random update of the same rank, and the effective and numerical rank of ΔW.

Writes subspace.md and subspace.png to examples/results/.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from collections.abc import Sequence

import numpy as np
from flax import traverse_util

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import common  # noqa: E402

import jlora  # noqa: E402

KERNELS = ("query", "value")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="subspace.py", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  common.model_arguments(parser)
  g = parser.add_argument_group("the two adapters")
  g.add_argument("--steps", type=common.positive, default=300, help="fine-tuning steps per run")
  g.add_argument("--ranks", type=common.int_list, default=(8, 64),
                 help="the small and the large rank, comma-separated")
  g.add_argument("--alpha", type=common.positive_float, default=16.0, help="LoRA alpha")
  g.add_argument("--lr", type=common.positive_float, default=common.LORA_LR, help="peak LR")
  g.add_argument("--layer", type=int, default=-1,
                 help="block whose W_q and W_v are drawn (negative counts from the last)")
  g.add_argument("--results-dir", default=str(common.RESULTS),
                 help="where subspace.md and subspace.png are written")
  args = parser.parse_args(argv)
  if len(args.ranks) != 2 or args.ranks[0] >= args.ranks[1]:
    parser.error(f"--ranks takes two increasing ranks such as 8,64, got {args.ranks}")
  if not -args.layers <= args.layer < args.layers:
    parser.error(f"--layer {args.layer} is out of range for --layers {args.layers}")
  return args


def main(argv: Sequence[str] | None = None) -> dict:
  """Trains both adapters and analyses them; returns the grids and the table rows."""
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  start = time.perf_counter()
  configs = [common.lora_config("qv", r, args.alpha) for r in args.ranks]
  setup = common.prepare(args, configs)
  base = setup.base
  adapters, losses = [], []
  for config in configs:
    fresh = common.init_adapter(base, config, args.seed + 1)
    run = common.finetune_lora(base, fresh, setup.corpus_b, setup.eval_b, steps=args.steps,
                               lr=args.lr, batch=args.batch, seed=args.seed + 2,
                               desc=f"LoRA q,v r={config.rank}")
    adapters.append((fresh, run.trained))
    losses.append(run.eval_loss)

  layer = args.layer % args.layers
  paths = {name: f"params/block_{layer}/{name}/kernel" for name in KERNELS}
  (_, small), (_, large) = adapters
  grids = {name: np.asarray(jlora.subspace_similarity_grid(small.lora[path].a,
                                                           large.lora[path].a))
           for name, path in paths.items()}
  rows = _update_rows(base, adapters, args)

  results_dir = pathlib.Path(args.results_dir)
  results_dir.mkdir(parents=True, exist_ok=True)
  plot = results_dir / "subspace.png"
  _plot(plot, grids, args.ranks, layer)
  body = _report(args, layer, grids, rows, losses, adapters, paths)
  results = common.write_results(results_dir / "subspace.md",
                                 "Subspace similarity and amplification of LoRA updates",
                                 common.command_line("paper/subspace.py", argv), body)
  print()
  print(body.split("\n\n![")[0])
  print(f"\nHeat map: {plot.resolve()}\nResults: {results}")
  print(f"Total time: {time.perf_counter() - start:.0f} s")
  return dict(grids=grids, rows=rows, losses=losses, results=results, plot=plot)


def _as_matrix(x) -> np.ndarray:
  """A (d_model, heads, head_dim) q/v kernel or update as the (fan_in, fan_out) matrix."""
  return np.asarray(x).reshape(x.shape[0], -1)


def _update_rows(base, adapters, args) -> list[list[str]]:
  """Per block, kernel and rank: ‖ΔW‖, effective/numerical rank, amplification vs random."""
  kernels = traverse_util.flatten_dict(base.variables, sep="/")
  rng = np.random.default_rng(args.seed)
  rows = []
  for block in range(args.layers):
    for name in KERNELS:
      path = f"params/block_{block}/{name}/kernel"
      w = _as_matrix(kernels[path])
      for _, trained in adapters:
        factors = trained.lora[path]
        delta = _as_matrix(jlora.delta(factors))
        r = factors.rank
        random = rng.standard_normal((w.shape[0], r)) @ rng.standard_normal((r, w.shape[1]))
        random *= np.linalg.norm(delta) / np.linalg.norm(random)
        rows.append([str(block), f"W_{name[0]}", str(r), f"{np.linalg.norm(w):.2f}",
                     f"{np.linalg.norm(delta):.3f}",
                     f"{float(jlora.effective_rank(delta)):.2f}",
                     str(int(jlora.numerical_rank(delta, rtol=1e-3))),
                     f"{float(jlora.amplification(delta, w, rank=r)):.2f}",
                     f"{float(jlora.amplification(random, w, rank=r)):.2f}"])
  return rows


def _report(args, layer, grids, rows, losses, adapters, paths) -> str:
  r1, r2 = args.ranks
  d = args.d_model
  table = common.markdown_table(
      ["block", "kernel", "rank r", "‖W‖_F", "‖ΔW‖_F", "effective rank of ΔW",
       "numerical rank (rtol 1e-3)", "amplification ‖ΔW‖/‖U_rᵀWV_r‖",
       "same for a random rank-r ΔW"], rows)
  sims = []
  for name, grid in grids.items():
    top = grid[0, 0]
    diag = grid[min(r1, grid.shape[0]) - 1, min(r1, grid.shape[1]) - 1]
    sims.append(f"W_{name[0]} of block {layer}: φ(1, 1) = {top:.3f} (random ≈ {1 / d:.3f}), "
                f"φ({r1}, {r1}) = {diag:.3f} (random ≈ {r1 / d:.3f}), "
                f"φ({r1}, {r2}) = {grid[-1, -1]:.3f} (random ≈ {r2 / d:.3f})")
  below = sum(float(row[-2]) < float(row[-1]) for row in rows)
  moved = []
  for (fresh, trained), r in zip(adapters, args.ranks, strict=True):
    for name, path in paths.items():
      phi = float(jlora.subspace_similarity(fresh.lora[path].a, trained.lora[path].a, r, r))
      moved.append(f"r={r} W_{name[0]}: {phi:.3f}")
  notes = [
      f"Adapters: LoRA on W_q, W_v with r = {r1} and r = {r2} (α = {args.alpha:g}, scale α/r), "
      f"{args.steps} steps each, peak LR {args.lr:g}; eval loss on B {losses[0]:.4f} (r={r1}) "
      f"and {losses[1]:.4f} (r={r2}).",
      "Subspace similarity of the trained A factors (`jlora.subspace_similarity_grid`), with "
      f"the value two random subspaces of R^{d} would give: " + "; ".join(sims) + ".",
      "How far A moved from its random initialisation, φ(A_init, A_trained, r, r) (1 = the "
      "same row space, i.e. A barely trained): " + ", ".join(moved) + ".",
      "Amplification (`jlora.amplification`, rank = r): the random ΔW column projects a "
      "random update of the same rank and norm onto W for comparison (paper Table 7). "
      f"LoRA's ΔW amplifies less than the random update in {below} of {len(rows)} rows, i.e. "
      "its subspace holds more of W than a random subspace of the same rank does.",
  ]
  return (table + "\n\n" + "\n".join(f"- {n}" for n in notes)
          + "\n\n![subspace similarity heat maps](subspace.png)")


def _plot(path, grids, ranks, layer) -> None:
  plt = common.pyplot()
  from matplotlib.ticker import MaxNLocator

  r1, r2 = ranks
  fig, axes = plt.subplots(1, 2 * len(grids), figsize=(4.5 * 2 * len(grids), 3.4),
                           gridspec_kw=dict(width_ratios=[3, 1] * len(grids)))
  for k, (name, grid) in enumerate(grids.items()):
    zoom = grid[:, :min(r1, grid.shape[1])]
    for ax, shown in ((axes[2 * k], grid), (axes[2 * k + 1], zoom)):
      image = ax.imshow(shown, vmin=0, vmax=1, cmap="viridis", aspect="auto",
                        extent=(0.5, shown.shape[1] + 0.5, shown.shape[0] + 0.5, 0.5))
      ax.xaxis.set_major_locator(MaxNLocator(integer=True))
      ax.yaxis.set_major_locator(MaxNLocator(integer=True))
      ax.set(xlabel=f"j (top directions of A, r={r2})", ylabel=f"i (A, r={r1})",
             title=f"W_{name[0]}, block {layer}"
             + (f" (j ≤ {shown.shape[1]})" if shown is zoom else ""))
  fig.colorbar(image, ax=axes, shrink=0.85, label=f"φ(A_r{r1}, A_r{r2}, i, j)")
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)


if __name__ == "__main__":
  common.cli(main, "subspace.py")
