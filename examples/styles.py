"""Style LoRAs on one frozen image generator, mixed and hot-swapped (Stable-Diffusion-style).

A small image generator with conv and attention layers (`Generator`: conv stem, a strided conv
down to half resolution, a self-attention block over the pixels there, upsampling and conv back
to RGB) learns to render a layout of shapes (circles, squares, triangles) in a plain "flat" look.
It is then frozen, and two LoRA adapters learn two other looks from the same layouts:

* style 1, "neon": bright outlines of the shapes on a near-black background;
* style 2, "paper": hatched ink fills, outlines and a drop shadow on cream paper.

The two adapters differ in rank and scaling (rank 4 with α/r, rank 8 with rsLoRA's α/√r by
default) and adapt every conv, attention and MLP kernel. The script then writes a PNG grid, one
row per held-out layout: the layout, the base, style 1, style 2 and the mixes
W + (1−t)·ΔW₁ + t·ΔW₂ for t = 0.25, 0.5, 0.75. The mixes are made twice, and the script checks
that the two agree:

1. `jlora.combine` (exact, method "cat"), merged into the base weights with `jlora.merge`;
2. one compiled sampler that takes a `jlora.stack` of [style 1, style 2, the three mixes] and an
   index, and applies `jlora.select(stack, index)` factored with `jlora.wrap`: every column,
   the base included (index -1), comes from one trace.

A third check renders the whole grid in one batch with `jlora.route` (one adapter per example).

All images are generated procedurally by this script (no image data is downloaded or shipped),
so there is no licence to record. Runs offline; the defaults take a few minutes on 2 CPU cores.

    python examples/styles.py                      # writes examples/results/styles.png
    python examples/styles.py --tiny --out /tmp/styles.png   # a seconds-long smoke run
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import jlora

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from cli import positive, positive_float  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
STYLES = ("flat", "neon", "paper")  # the base look, style 1, style 2
MIXES = (0.25, 0.5, 0.75)  # t in W + (1 − t)·ΔW_neon + t·ΔW_paper
TARGETS = r".*/kernel"  # every Conv, attention (query/key/value/out) and Dense kernel
# (the RGB conv has 3 outputs, so its rank is capped at 3 with LoraConfig.rank_pattern)

# ------------------------------------------------------------------------ procedural images

_FLAT = {"bg": (0.88, 0.88, 0.86), "fill": ((0.90, 0.35, 0.30), (0.30, 0.65, 0.35),
                                              (0.30, 0.45, 0.85))}
_NEON = {"bg": (0.05, 0.05, 0.10), "fill": ((1.00, 0.20, 0.90), (0.10, 1.00, 1.00),
                                              (1.00, 0.95, 0.10))}
_PAPER = {"bg": (0.96, 0.92, 0.80), "fill": ((0.55, 0.10, 0.10), (0.10, 0.35, 0.15),
                                               (0.10, 0.15, 0.45))}


def make_layouts(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
  """n layouts of 1–3 shapes: (n, size, size, 3) one-hot masks (circle, square, triangle)."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
  masks = np.zeros((n, size, size, 3), np.float32)
  for i in range(n):
    for _ in range(rng.integers(1, 4)):
      kind = rng.integers(3)
      r = rng.uniform(0.12, 0.25) * size
      cx, cy = rng.uniform(r, size - r, 2)
      if kind == 0:
        shape = (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2
      elif kind == 1:
        shape = (np.abs(xx - cx) <= 0.85 * r) & (np.abs(yy - cy) <= 0.85 * r)
      else:
        depth = yy - (cy - r)
        shape = (depth >= 0) & (depth <= 1.8 * r) & (np.abs(xx - cx) <= 0.6 * depth)
      masks[i][shape] = 0.0  # later shapes cover earlier ones
      masks[i, ..., kind][shape] = 1.0
  return masks


def _shift(m: np.ndarray, dy: int, dx: int) -> np.ndarray:
  out = np.zeros_like(m)
  h, w = m.shape[1:3]
  out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = m[
      :, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
  return out


def _erode(m: np.ndarray) -> np.ndarray:
  out = m.copy()
  for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
    out = np.minimum(out, _shift(m, dy, dx))
  return out


def _hatch(size: int) -> np.ndarray:
  yy, xx = np.mgrid[0:size, 0:size]
  return np.sin(2 * np.pi * (xx + yy) / 6.0).astype(np.float32)


def render(masks: np.ndarray, style: str) -> np.ndarray:
  """The target images of one look: (n, size, size, 3) in [0, 1]."""
  palette = {"flat": _FLAT, "neon": _NEON, "paper": _PAPER}[style]
  n, size = masks.shape[:2]
  fill = np.asarray(palette["fill"], np.float32)  # (3 shapes, rgb)
  color = masks @ fill  # each pixel's shape colour
  inside = masks.sum(-1, keepdims=True)
  bg = np.broadcast_to(np.asarray(palette["bg"], np.float32), (n, size, size, 3))
  if style == "flat":
    return bg * (1 - inside) + color
  edge = inside - _erode(_erode(inside)) if style == "neon" else inside - _erode(inside)
  if style == "neon":
    return bg * (1 - inside) + color * (0.2 * (inside - edge) + edge)
  shadow = np.clip(_shift(inside, 2, 2) - inside, 0, 1) * 0.35
  ink = (_hatch(size)[None, :, :, None] > 0.0) * (inside - edge) + edge
  paper = bg * (1 - shadow)
  return paper * (1 - inside) + inside * (ink * color + (1 - ink) * (0.7 * bg + 0.3 * color))


def features(masks: np.ndarray) -> np.ndarray:
  """The generator's input: the masks, x and y in [−1, 1], and a diagonal hatching phase."""
  n, size = masks.shape[:2]
  yy, xx = (np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)) * 2 - 1
  extra = np.stack([xx, yy, _hatch(size)], -1)
  return np.concatenate([masks, np.broadcast_to(extra, (n, size, size, 3))], -1)


# ------------------------------------------------------------------------------- the model


class Generator(nn.Module):
  """Layout features (batch, size, size, 6) -> RGB (batch, size, size, 3) in (0, 1)."""

  width: int = 24
  heads: int = 4

  @nn.compact
  def __call__(self, x):
    h = nn.gelu(nn.Conv(self.width, (3, 3), name="stem")(x))
    d = nn.gelu(nn.Conv(self.width, (3, 3), strides=2, name="down")(h))
    b, hh, ww, c = d.shape
    t = d.reshape(b, hh * ww, c)  # one token per pixel at half resolution
    t = t + nn.MultiHeadDotProductAttention(self.heads, name="attn")(nn.LayerNorm(name="ln1")(t))
    t = t + nn.Dense(c, name="mlp_out")(nn.gelu(nn.Dense(2 * c, name="mlp_in")(
        nn.LayerNorm(name="ln2")(t))))
    u = jax.image.resize(t.reshape(b, hh, ww, c), h.shape, "nearest") + h
    u = nn.gelu(nn.Conv(self.width, (3, 3), name="up")(u))
    return nn.sigmoid(nn.Conv(3, (3, 3), name="rgb")(u))


def _mse(y, target):
  return jnp.mean((y - target) ** 2)


def fit(loss_fn, trainable, data_x, data_y, *, steps: int, batch: int, lr: float, seed: int,
        desc: str):
  """Adam with cosine decay on random batches of (data_x, data_y); returns the trained tree."""
  optimizer = optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.05))
  state = jax.jit(optimizer.init)(trainable)  # one compile, not one per leaf shape

  @jax.jit
  def step(trainable, state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(trainable, x, y)
    updates, state = optimizer.update(grads, state, trainable)
    return optax.apply_updates(trainable, updates), state, loss

  rng = np.random.default_rng(seed)
  with tqdm(range(steps), desc=desc, leave=False) as bar:
    for i in bar:
      idx = rng.integers(0, len(data_x), batch)
      trainable, state, loss = step(trainable, state, data_x[idx], data_y[idx])
      if i % 25 == 0 or i == steps - 1:
        bar.set_postfix(loss=f"{float(loss):.4f}")
  return trainable


# ----------------------------------------------------------------------------- the grid


def write_grid(path: pathlib.Path, layouts: np.ndarray, columns: dict[str, np.ndarray],
               title: str) -> None:
  """A PNG with one row per layout and one column per entry of `columns` (plus the layout)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = ["layout", *columns]
  rows = len(layouts)
  fig, axes = plt.subplots(rows, len(names), figsize=(1.6 * len(names), 1.6 * rows + 0.6),
                           squeeze=False)
  gray = 1 - layouts @ np.array([0.8, 0.55, 0.3], np.float32)  # circle, square, triangle
  shown = {"layout": np.repeat(gray[..., None], 3, -1), **columns}
  for j, name in enumerate(names):
    for i in range(rows):
      ax = axes[i, j]
      ax.imshow(np.clip(shown[name][i], 0, 1), interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
    axes[0, j].set_title(name, fontsize=9)
  fig.suptitle(title, fontsize=8)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ----------------------------------------------------------------------------- the script


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="styles.py", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--size", type=positive, default=32, help="image side (multiple of 4)")
  parser.add_argument("--width", type=positive, default=24, help="generator channels")
  parser.add_argument("--heads", type=positive, default=4, help="attention heads")
  parser.add_argument("--images", type=positive, default=2048, help="training layouts")
  parser.add_argument("--batch", type=positive, default=16)
  parser.add_argument("--base-steps", type=positive, default=500, help="pretraining steps")
  parser.add_argument("--style-steps", type=positive, default=400, help="steps per style")
  parser.add_argument("--base-lr", type=positive_float, default=3e-3)
  parser.add_argument("--lora-lr", type=positive_float, default=5e-3)
  parser.add_argument("--ranks", default="4,8",
                      help="LoRA ranks of style 1 (α/r scaling) and style 2 (rsLoRA α/√r)")
  parser.add_argument("--alpha", type=positive_float, default=8.0, help="LoRA alpha")
  parser.add_argument("--rows", type=positive, default=4, help="layouts in the grid")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=str(RESULTS / "styles.png"), help="the PNG to write")
  parser.add_argument("--tiny", action="store_true",
                      help="a seconds-long smoke run: 16 px, 8 channels, 3 steps each")
  args = parser.parse_args(argv)
  if args.tiny:
    args.size, args.width, args.heads, args.images, args.batch = 16, 8, 2, 32, 4
    args.base_steps, args.style_steps, args.rows, args.ranks = 3, 3, 2, "1,2"
  try:
    args.ranks = tuple(int(r) for r in args.ranks.split(","))
  except ValueError:
    parser.error(f"--ranks: expected two integers like 4,8, got {args.ranks!r}")
  if len(args.ranks) != 2 or min(args.ranks) < 1:
    parser.error(f"--ranks: expected two positive integers like 4,8, got {args.ranks!r}")
  if args.size % 4 or args.size < 8:
    parser.error(f"--size must be a multiple of 4 and at least 8, got {args.size}")
  if args.width % args.heads:
    parser.error(f"--width ({args.width}) must be a multiple of --heads ({args.heads})")
  if max(args.ranks) > args.width:
    parser.error(f"--ranks {args.ranks} must not exceed --width ({args.width}): a kernel's "
                 "rank is at most its number of output channels")
  if not args.out.endswith(".png"):
    parser.error(f"--out must name a .png file, got {args.out!r}")
  return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Trains the base and both styles, writes the grid, returns what it measured."""
  args = parse_args(argv)
  start = time.perf_counter()
  rng = np.random.default_rng(args.seed)
  train_masks = make_layouts(rng, args.images, args.size)
  grid_masks = make_layouts(rng, args.rows, args.size)
  x_train, x_grid = jnp.asarray(features(train_masks)), jnp.asarray(features(grid_masks))
  targets = {s: jnp.asarray(render(train_masks, s)) for s in STYLES}

  model = Generator(args.width, args.heads)
  # One compile; the "rbg" PRNG compiles this init several times faster than threefry.
  variables = jax.jit(model.init)(jax.random.key(args.seed, impl="rbg"), x_train[:1])
  variables = fit(lambda v, x, y: _mse(model.apply(v, x), y), variables, x_train,
                  targets["flat"], steps=args.base_steps, batch=args.batch, lr=args.base_lr,
                  seed=args.seed, desc="pretrain base (flat)")

  lora_apply = jlora.wrap(model.apply)
  styles = []
  for k, (style, rank) in enumerate(zip(STYLES[1:], args.ranks, strict=True)):
    config = jlora.LoraConfig(rank=rank, alpha=args.alpha, targets=TARGETS, use_rslora=k == 1,
                              rank_pattern={r".*/rgb/kernel": min(rank, 3)})  # 3 outputs
    make = jax.jit(lambda key, v, x, c=config: jlora.init(key, v, c, model.apply, x))
    adapter = make(jax.random.key(args.seed + 1 + k), variables, x_train[:1])
    styles.append(fit(lambda a, x, y: _mse(lora_apply(variables, a, x), y), adapter, x_train,
                      targets[style], steps=args.style_steps, batch=args.batch, lr=args.lora_lr,
                      seed=args.seed + 1 + k, desc=f"LoRA style {k + 1} ({style})"))

  # 1. combine + merge: one compiled plain model for every set of merged weights.
  # (Every jlora function runs under jit; compiling each step once beats op-by-op dispatch.)
  apply, merge, combine = jax.jit(model.apply), jax.jit(jlora.merge), jax.jit(jlora.combine)
  mixes = [combine(styles, jnp.array([1 - t, t])) for t in MIXES]  # one trace: weights vary
  merged = [apply(variables, x_grid)] + [apply(merge(variables, a), x_grid)
                                         for a in (*styles, *mixes)]

  # 2. one compiled sampler over a stack: index -1 is the base, 0..4 the styles and mixes.
  traces = []

  @jax.jit
  def sample(stacked, index):
    traces.append(index)
    return lora_apply(variables, jlora.select(stacked, index), x_grid)

  stacked = jax.jit(jlora.stack)([*styles, *mixes])
  selected = [sample(stacked, jnp.int32(i)) for i in range(-1, stacked.size)]

  # 3. the whole grid as one mixed batch through route.
  ids = jnp.repeat(jnp.arange(-1, stacked.size), args.rows)
  routed = jax.jit(lambda s, ids, x: lora_apply(variables, jlora.route(s, ids), x))(
      stacked, ids, jnp.tile(x_grid, (stacked.size + 1, 1, 1, 1)))
  routed = routed.reshape(stacked.size + 1, args.rows, *routed.shape[1:])

  combine_vs_select = max(float(jnp.abs(a - b).max()) for a, b in zip(merged, selected,
                                                                      strict=True))
  select_vs_route = max(float(jnp.abs(a - b).max()) for a, b in zip(selected, routed,
                                                                    strict=True))
  grid_targets = {s: render(grid_masks, s) for s in STYLES}
  mse = {name: float(_mse(selected[i], grid_targets[s]))
         for i, (name, s) in enumerate((("base", "flat"), ("style 1", "neon"),
                                        ("style 2", "paper")))}
  base_mse = {s: float(_mse(selected[0], grid_targets[s])) for s in STYLES[1:]}

  names = ["base", "style 1 (neon)", "style 2 (paper)", *(f"mix {t:g}" for t in MIXES)]
  title = (f"columns via one compiled select sampler ({len(traces)} trace); combine+merge "
           f"agrees to {combine_vs_select:.1e}, route to {select_vs_route:.1e}")
  out = pathlib.Path(args.out)
  write_grid(out, grid_masks, {n: np.asarray(y) for n, y in zip(names, selected, strict=True)},
             title)

  result = {
      "png": str(out),
      "traces": len(traces),
      "max_diff_combine_vs_select": combine_vs_select,
      "max_diff_select_vs_route": select_vs_route,
      "mse": mse,
      "base_mse_on_styles": base_mse,
      "seconds": time.perf_counter() - start,
  }
  print(f"wrote {out}")
  print(f"held-out MSE to its own look: base {mse['base']:.4f}, style 1 {mse['style 1']:.4f} "
        f"(base: {base_mse['neon']:.4f}), style 2 {mse['style 2']:.4f} "
        f"(base: {base_mse['paper']:.4f})")
  print(f"mixes: combine+merge vs select sampler max |Δ| {combine_vs_select:.2e}; select vs "
        f"route {select_vs_route:.2e}; sampler traced {len(traces)} time(s); "
        f"{result['seconds']:.0f} s")
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
