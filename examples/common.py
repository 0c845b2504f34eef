"""Shared pieces of the language-model examples: model, corpora, batches, training, outputs.

* `Decoder`: a small pre-LayerNorm, byte-level, decoder-only transformer in Flax linen, laid out
  like the benchmark model (``nn.DenseGeneral`` query/key/value/out, ``nn.Dense`` up/down), so
  the LoRA targets ``.*/(query|key|value|out|up|down)/kernel`` apply.
* `load_corpus`, `train_windows`, `eval_windows`: UTF-8 bytes as tokens (vocabulary 256).
* `train`, `evaluate`, `pretrained_base`: one optax training loop for pretraining, LoRA and
  full fine-tuning, with a tqdm bar; the pretrained base is cached on disk and reused.
* `save_adapter`, `export_peft`, `plot_curves`, `write_results`, `cli`: what the scripts write,
  and how they fail on bad input (one ``error:`` line and exit status 2, never a traceback).

The scripts import this file as ``common`` (examples/ is on their ``sys.path``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from cli import positive, positive_float  # noqa: F401  (re-used by the scripts)
from flax import traverse_util
from tqdm.auto import tqdm

import jlora

EXAMPLES = pathlib.Path(__file__).resolve().parent
DATA = EXAMPLES / "data"
RESULTS = EXAMPLES / "results"
CORPUS_A = DATA / "python_reference.txt"  # English prose: the Python Language Reference
CORPUS_B = DATA / "python_stdlib_code.txt"  # Python source code from the standard library
VOCAB = 256  # one token per byte
TARGETS = {  # named LoRA target sets; any other value of --targets is used as a regex
    "qv": r".*/(query|value)/kernel",
    "qkvo": r".*/(query|key|value|out)/kernel",
    "all": r".*/(query|key|value|out|up|down)/kernel",
}
# Peak learning rates of the fine-tuning runs, each the best of a sweep at the default settings
# (300 steps; LoRA r=8 on q,v and on all linear layers: 1e-3, 3e-3, 1e-2, 3e-2; full fine-tuning:
# 3e-4, 1e-3, 3e-3, 1e-2), so that LoRA and full fine-tuning are both compared at their best.
LORA_LR = 1e-2
FULL_LR = 3e-3
Variables = Any  # {"params": pytree of arrays}


class CliError(Exception):
  """Bad input to an example script: `cli` prints it as one line and exits with status 2."""


# ------------------------------------------------------------------------------------ the model


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """Sizes of a `Decoder`; the defaults (~0.43 M parameters) are every script's default base."""

  d_model: int = 128
  layers: int = 2
  heads: int = 4
  seq: int = 128


class Block(nn.Module):
  """Pre-LN transformer block: causal self-attention, then a 4x GELU MLP."""

  heads: int

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    h = nn.LayerNorm(name="norm_attn")(x)
    q, k, v = (nn.DenseGeneral((self.heads, d // self.heads), name=name)(h)
               for name in ("query", "key", "value"))
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
    attn = nn.dot_product_attention(q, k, v, mask=mask)
    x = x + nn.DenseGeneral(d, axis=(-2, -1), name="out")(attn)
    h = nn.gelu(nn.Dense(4 * d, name="up")(nn.LayerNorm(name="norm_mlp")(x)))
    return x + nn.Dense(d, name="down")(h)


class Decoder(nn.Module):
  """Byte-level decoder-only transformer: token ids (batch, seq) -> logits (batch, seq, 256)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, ids):
    c = self.config
    positions = jnp.arange(ids.shape[1])
    x = nn.Embed(VOCAB, c.d_model, name="embed")(ids)
    x = x + nn.Embed(c.seq, c.d_model, name="position")(positions)[None]
    for i in range(c.layers):
      x = Block(c.heads, name=f"block_{i}")(x)
    return nn.Dense(VOCAB, name="head")(nn.LayerNorm(name="norm")(x))


def num_params(tree) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))


# ------------------------------------------------------------------------------------ the data


class Corpus(NamedTuple):
  name: str
  train: np.ndarray  # uint8 bytes
  eval: np.ndarray  # the last `eval_fraction` of the file, never trained on


def load_corpus(path: str | os.PathLike, seq: int, *, eval_fraction: float = 0.1) -> Corpus:
  """Reads a text file as UTF-8 bytes and splits off its tail for evaluation."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise CliError(f"corpus file not found: {str(path)!r}. Fix: pass an existing text file.")
  tokens = np.frombuffer(path.read_bytes(), dtype=np.uint8)
  n_eval = int(len(tokens) * eval_fraction)
  if n_eval < seq + 1:
    raise CliError(
        f"corpus {str(path)!r} has {len(tokens)} bytes; its evaluation tail "
        f"({eval_fraction:.0%}) must hold at least one window of --seq {seq} + 1 bytes. "
        "Fix: use a longer text or a smaller --seq."
    )
  return Corpus(path.name, tokens[:-n_eval], tokens[-n_eval:])


def train_windows(tokens: np.ndarray, batch: int, seq: int, seed: int) -> Iterator[np.ndarray]:
  """Endless (batch, seq + 1) int32 windows at random offsets: inputs [:, :-1], targets [:, 1:]."""
  rng = np.random.default_rng(seed)
  offsets = np.arange(seq + 1)
  while True:
    starts = rng.integers(0, len(tokens) - seq - 1, size=batch)
    yield tokens[starts[:, None] + offsets].astype(np.int32)


def eval_windows(tokens: np.ndarray, seq: int, count: int) -> np.ndarray:
  """Up to `count` non-overlapping, evenly spaced (seq + 1)-byte windows, the same every run."""
  n = min(count, len(tokens) // (seq + 1))
  starts = np.linspace(0, len(tokens) - seq - 1, n).astype(np.int64)
  return tokens[starts[:, None] + np.arange(seq + 1)].astype(np.int32)


def lm_loss(logits: jax.Array, windows: jax.Array) -> jax.Array:
  """Mean next-byte cross-entropy (nats per byte)."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]).mean()


# -------------------------------------------------------------------------------- the training


@dataclasses.dataclass
class Curve:
  """Loss history of one run: every training step, and evaluations every so often."""

  steps: list[int] = dataclasses.field(default_factory=list)
  losses: list[float] = dataclasses.field(default_factory=list)
  eval_steps: list[int] = dataclasses.field(default_factory=list)
  eval_losses: list[float] = dataclasses.field(default_factory=list)


def schedule(lr: float, steps: int) -> np.ndarray:
  """Per-step learning rates: linear warmup over 10 % of the steps, cosine decay to lr / 10."""
  fn = optax.warmup_cosine_decay_schedule(
      0.0, lr, warmup_steps=max(1, steps // 10), decay_steps=max(2, steps), end_value=lr / 10)
  return np.asarray(fn(np.arange(steps)), np.float32)


def evaluate(loss_fn: Callable, trainable, frozen, windows: np.ndarray, batch: int) -> float:
  """Mean of a jitted `loss_fn(trainable, frozen, windows)` over `windows`, a batch at a time."""
  total = 0.0
  for i in range(0, len(windows), batch):
    chunk = windows[i:i + batch]
    total += float(loss_fn(trainable, frozen, chunk)) * len(chunk)
  return total / len(windows)


class Losses(NamedTuple):
  """The loss functions of one model size, each `(trainable, frozen, windows) -> loss`."""

  full: Callable  # (variables, None, windows): the plain model, what full fine-tuning trains
  lora: Callable  # (adapter, variables, windows): the frozen model run through `jlora.wrap`


@functools.cache
def losses(config: ModelConfig) -> Losses:
  """The same function objects for the same config, so that jit caches are shared by runs."""
  model = Decoder(config)
  lora_apply = jlora.wrap(model.apply)
  return Losses(
      full=lambda variables, _, w: lm_loss(model.apply(variables, w[:, :-1]), w),
      lora=lambda adapter, variables, w: lm_loss(lora_apply(variables, adapter, w[:, :-1]), w))


@functools.cache
def jitted(loss_fn: Callable, weight_decay: float = 0.0):
  """(the loss under jit, one AdamW training step under jit, the optimizer).

  AdamW with gradient clipping at 1; the learning rate is an argument of the step, so runs that
  differ only in learning rate or length reuse one compiled step.
  """
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam(),
                   optax.add_decayed_weights(weight_decay))

  @jax.jit
  def step(trainable, opt_state, frozen, windows, lr):
    loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, windows)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    updates = jax.tree.map(lambda u: -lr * u, updates)
    return optax.apply_updates(trainable, updates), opt_state, loss

  return jax.jit(loss_fn), step, tx


def train(loss_fn: Callable, trainable, frozen, data: Iterator[np.ndarray], *, steps: int,
          lr: float, desc: str, weight_decay: float = 0.0,
          eval_fn: Callable[[Any], float] | None = None, evals: int = 0) -> tuple[Any, Curve]:
  """Minimises `loss_fn(trainable, frozen, windows)` over `trainable` only, with a tqdm bar.

  `frozen` is passed to the compiled step as an argument (never differentiated, never baked in
  as a constant). With `eval_fn`, `evals` evenly spaced evaluations (plus one at step 0) go into
  the returned curve.
  """
  _, step, tx = jitted(loss_fn, weight_decay)
  lrs = schedule(lr, steps)
  opt_state = jax.jit(tx.init)(trainable)
  curve = Curve()
  eval_at = set(np.linspace(0, steps, evals + 1).astype(int).tolist()) if eval_fn else set()
  pending = []
  with tqdm(range(steps), desc=desc, unit="step", mininterval=1.0, dynamic_ncols=True) as bar:
    for i in bar:
      if i in eval_at:
        curve.eval_steps.append(i)
        curve.eval_losses.append(eval_fn(trainable))
      trainable, opt_state, loss = step(trainable, opt_state, frozen, next(data), lrs[i])
      pending.append((i + 1, loss))
      if len(pending) == 20 or i == steps - 1:  # fetch losses in groups: fewer host syncs
        curve.steps.extend(s for s, _ in pending)
        curve.losses.extend(float(v) for _, v in pending)
        pending.clear()
        bar.set_postfix(loss=f"{curve.losses[-1]:.3f}")
  if eval_fn and steps in eval_at:
    curve.eval_steps.append(steps)
    curve.eval_losses.append(eval_fn(trainable))
  return trainable, curve


@dataclasses.dataclass
class Base:
  """The pretrained model and its pretraining curve."""

  model: Decoder
  variables: Variables
  curve: Curve  # pretraining losses, also when loaded from the cache
  path: pathlib.Path | None = None

  @property
  def losses(self) -> Losses:
    return losses(self.model.config)

  def eval(self, windows: np.ndarray, batch: int, *, adapter: jlora.Adapter | None = None,
           variables: Variables | None = None) -> float:
    """Eval loss of the base, of the base with `adapter`, or of other `variables`."""
    if adapter is not None:
      return evaluate(jitted(self.losses.lora)[0], adapter, self.variables, windows, batch)
    dense = jlora.dequantize(self.variables if variables is None else variables)  # QLoRA base
    return evaluate(jitted(self.losses.full)[0], dense, None, windows, batch)


def pretrained_base(config: ModelConfig, corpus: Corpus, *, steps: int, lr: float, batch: int,
                    seed: int, cache_dir: str | os.PathLike | None) -> Base:
  """Pretrains a `Decoder` on `corpus`, or loads the weights a run with the same settings cached.

  The cache file is named by a hash of everything that determines the weights: the model
  config, the corpus bytes and the training settings. `cache_dir=None` disables the cache.
  """
  model = Decoder(config)
  key = json.dumps(dict(dataclasses.asdict(config), steps=steps, lr=lr, batch=batch, seed=seed,
                        corpus=hashlib.sha256(corpus.train.tobytes()).hexdigest()),
                   sort_keys=True)
  name = f"base-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
  path = pathlib.Path(cache_dir or ".").expanduser().resolve() / name
  if cache_dir is not None and path.is_file():
    with np.load(path) as saved:
      flat = {k: jnp.asarray(v) for k, v in saved.items() if not k.startswith("curve/")}
      curve = Curve(steps=saved["curve/steps"].tolist(), losses=saved["curve/losses"].tolist())
    print(f"Reusing the pretrained base model cached at {path}")
    return Base(model, traverse_util.unflatten_dict(flat, sep="/"), curve, path)

  variables = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, config.seq), jnp.int32))
  print(f"Pretraining a {num_params(variables):,}-parameter byte-level decoder on "
        f"{corpus.name} ({len(corpus.train):,} bytes) for {steps} steps")
  variables, curve = train(losses(config).full, variables, None,
                           train_windows(corpus.train, batch, config.seq, seed),
                           steps=steps, lr=lr, weight_decay=0.1, desc="pretrain on A")
  if cache_dir is not None:
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = traverse_util.flatten_dict(jax.device_get(variables), sep="/")
    np.savez(path, **flat, **{"curve/steps": np.array(curve.steps),
                              "curve/losses": np.array(curve.losses)})
    print(f"Cached the pretrained base model at {path}")
  return Base(model, variables, curve, path)


def lora_config(targets: str, rank: int, alpha: float, *, rslora: bool = False
                ) -> jlora.LoraConfig:
  return jlora.LoraConfig(rank=rank, alpha=alpha, targets=TARGETS.get(targets, targets),
                          use_rslora=rslora)


def init_adapter(base: Base, config: jlora.LoraConfig, seed: int, *, abstract: bool = False
                 ) -> jlora.Adapter:
  """`jlora.init` on the base model; a target or rank that does not fit is a `CliError`.

  With `abstract`, only shapes are computed (`jax.eval_shape`): a free check of the config.
  """
  example = jax.ShapeDtypeStruct((1, base.model.config.seq), jnp.int32)
  init = lambda key, variables: jlora.init(key, variables, config, base.model.apply, example)
  run = functools.partial(jax.eval_shape, init) if abstract else jax.jit(init)
  try:  # under jit: one compile, not one per eager op
    return run(jax.random.key(seed), base.variables)
  except ValueError as e:
    if "matched no leaf" in str(e):
      raise CliError(f"LoRA targets {' | '.join(config.targets)!r} match no kernel of the "
                     "model. Fix: use qv, qkvo, all, or a regex that fullmatches paths such as "
                     "'params/block_0/query/kernel'.") from None
    reason = str(e).splitlines()[0].split(" Fix:")[0]
    raise CliError(f"LoRA rank {config.rank} does not fit the model: {reason} Fix: lower the "
                   "rank (--rank, or --ranks in the paper scripts).") from None


class Finetuned(NamedTuple):
  trained: Any  # the adapter (LoRA) or the full variables (full fine-tuning)
  curve: Curve
  eval_loss: float
  seconds: float  # training and its evaluations


def finetune_lora(base: Base, adapter: jlora.Adapter, corpus: Corpus, windows: np.ndarray, *,
                  steps: int, lr: float, batch: int, seed: int, evals: int = 0,
                  desc: str = "LoRA on B") -> Finetuned:
  """Trains only `adapter` on `corpus`, through `jlora.wrap` (the base never gets a gradient)."""
  eval_fn = lambda adapter: base.eval(windows, batch, adapter=adapter)
  start = time.perf_counter()
  adapter, curve = train(base.losses.lora, adapter, base.variables,
                         train_windows(corpus.train, batch, base.model.config.seq, seed),
                         steps=steps, lr=lr, desc=desc, eval_fn=eval_fn, evals=evals)
  return Finetuned(adapter, curve, eval_fn(adapter), time.perf_counter() - start)


def finetune_full(base: Base, corpus: Corpus, windows: np.ndarray, *, steps: int, lr: float,
                  batch: int, seed: int, evals: int = 0) -> Finetuned:
  """Trains every parameter of the base on `corpus`: the baseline LoRA is compared with."""
  eval_fn = lambda variables: base.eval(windows, batch, variables=variables)
  start = time.perf_counter()
  variables, curve = train(base.losses.full, base.variables, None,
                           train_windows(corpus.train, batch, base.model.config.seq, seed),
                           steps=steps, lr=lr, desc="full FT on B", eval_fn=eval_fn, evals=evals)
  return Finetuned(variables, curve, eval_fn(variables), time.perf_counter() - start)


# ------------------------------------------------------------------------------------- outputs


def save_adapter(directory: str | os.PathLike, adapter: jlora.Adapter, config: jlora.LoraConfig,
                 step: int) -> pathlib.Path:
  """`jlora.save` of the adapter and its config into ``directory/adapter`` (replaced if there)."""
  target = pathlib.Path(directory).resolve() / "adapter"
  if target.exists():
    shutil.rmtree(target)
  jlora.save(target, step, adapter, config=config)
  return target


def export_peft(directory: str | os.PathLike, adapter: jlora.Adapter,
                config: jlora.LoraConfig) -> pathlib.Path:
  """`jlora.export_peft` into ``directory/peft``; torch module names like ``block_0.query``."""
  target = pathlib.Path(directory).resolve() / "peft"
  jlora.export_peft(target, adapter, config=config)
  return target


def pyplot():
  """matplotlib.pyplot on the Agg backend: files only, no display needed."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def plot_curves(path: str | os.PathLike, panels: Sequence[tuple[str, dict[str, Curve]]]) -> None:
  """One panel per (title, {label: curve}): training loss (smoothed) and eval points."""
  plt = pyplot()
  fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
  for ax, (title, curves) in zip(axes[0], panels, strict=True):
    for i, (label, curve) in enumerate(curves.items()):
      color = f"C{i}"
      if curve.losses:
        ax.plot(curve.steps, _smooth(curve.losses), color=color, alpha=0.8,
                label=f"{label} (train)")
      if curve.eval_losses:
        ax.plot(curve.eval_steps, curve.eval_losses, "o--", color=color, label=f"{label} (eval)")
    ax.set(title=title, xlabel="step", ylabel="loss (nats/byte)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _smooth(values: Sequence[float], width: int = 20) -> np.ndarray:
  values = np.asarray(values, np.float64)
  width = max(1, min(width, len(values) // 5))
  kernel = np.ones(width) / width
  padded = np.concatenate([np.full(width - 1, values[0]), values])
  return np.convolve(padded, kernel, mode="valid")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def write_results(path: str | os.PathLike, title: str, command: str, body: str) -> pathlib.Path:
  """Writes a markdown results file: the title, the exact command, the machine, then `body`."""
  path = pathlib.Path(path).resolve()
  path.parent.mkdir(parents=True, exist_ok=True)
  device = jax.devices()[0]
  path.write_text(f"# {title}\n\n"
                  f"Command: `{command}`  \n"
                  f"Machine: {os.cpu_count()} CPU cores visible, JAX {jax.__version__} on "
                  f"{device.platform} ({device.device_kind}), {time.strftime('%Y-%m-%d')}.\n\n"
                  f"{body.strip()}\n")
  return path


def command_line(script: str, argv: Sequence[str]) -> str:
  """How to rerun: ``python examples/<script> <argv>``."""
  return " ".join(["python", f"examples/{script}", *argv])


def fmt_params(n: int, total: int) -> tuple[str, str]:
  return f"{n:,}", f"{100 * n / total:.3g} %"


# ---------------------------------------------------------------------------------- the command


def model_arguments(parser: argparse.ArgumentParser) -> None:
  """Flags shared by every script: corpora, model size, pretraining, batching, cache.

  With the same values the scripts share one cached base model.
  """
  defaults = ModelConfig()
  g = parser.add_argument_group("base model and pretraining on corpus A")
  g.add_argument("--corpus-a", default=str(CORPUS_A), help="pretraining text")
  g.add_argument("--corpus-b", default=str(CORPUS_B), help="fine-tuning text")
  g.add_argument("--d-model", type=positive, default=defaults.d_model, help="width")
  g.add_argument("--layers", type=positive, default=defaults.layers, help="transformer blocks")
  g.add_argument("--heads", type=positive, default=defaults.heads, help="attention heads")
  g.add_argument("--seq", type=positive, default=defaults.seq, help="context length in bytes")
  g.add_argument("--batch", type=positive, default=16, help="windows per step")
  g.add_argument("--pretrain-steps", type=positive, default=800, help="pretraining steps on A")
  g.add_argument("--pretrain-lr", type=positive_float, default=3e-3, help="pretraining peak LR")
  g.add_argument("--eval-windows", type=positive, default=128,
                 help="held-out windows of --seq bytes for every eval loss")
  g.add_argument("--seed", type=int, default=0)
  g.add_argument("--cache-dir", default=str(default_cache_dir()),
                 help="where the pretrained base is cached")
  g.add_argument("--no-cache", action="store_true", help="always pretrain; cache nothing")


def default_cache_dir() -> pathlib.Path:
  root = os.environ.get("XDG_CACHE_HOME") or pathlib.Path("~/.cache").expanduser()
  return pathlib.Path(root) / "jlora" / "examples"


def model_config(args: argparse.Namespace) -> ModelConfig:
  if args.d_model % args.heads:
    raise CliError(f"--d-model {args.d_model} is not divisible by --heads {args.heads}. "
                   "Fix: choose a multiple of the head count.")
  return ModelConfig(d_model=args.d_model, layers=args.layers, heads=args.heads, seq=args.seq)


class Setup(NamedTuple):
  base: Base
  corpus_a: Corpus
  corpus_b: Corpus
  eval_a: np.ndarray  # held-out windows of A (what the base was trained on: forgetting)
  eval_b: np.ndarray  # held-out windows of B (the fine-tuning task)


def prepare(args: argparse.Namespace, lora_configs: Sequence[jlora.LoraConfig] = ()) -> Setup:
  """Checks the inputs, loads both corpora, then pretrains (or loads) the base model.

  Every LoRA config is tried on the abstract model first, so a rank or target that does not
  fit fails in a second, not after pretraining.
  """
  config = model_config(args)
  corpus_a = load_corpus(args.corpus_a, config.seq)
  corpus_b = load_corpus(args.corpus_b, config.seq)
  model = Decoder(config)
  example = jax.ShapeDtypeStruct((1, config.seq), jnp.int32)
  abstract = jax.eval_shape(model.init, jax.random.key(0), example)
  for lora in lora_configs:
    init_adapter(Base(model, abstract, Curve()), lora, 0, abstract=True)
  base = pretrained_base(config, corpus_a, steps=args.pretrain_steps, lr=args.pretrain_lr,
                         batch=args.batch, seed=args.seed,
                         cache_dir=None if args.no_cache else args.cache_dir)
  return Setup(base, corpus_a, corpus_b, eval_windows(corpus_a.eval, config.seq, args.eval_windows),
               eval_windows(corpus_b.eval, config.seq, args.eval_windows))


def int_list(text: str) -> tuple[int, ...]:
  return tuple(positive(part) for part in text.split(",") if part.strip())


def cli(main: Callable[[Sequence[str] | None], Any], prog: str) -> None:
  """Runs `main(sys.argv[1:])`; a `CliError` becomes one ``prog: error: ...`` line, exit 2."""
  try:
    main(None)
  except CliError as e:
    print(f"{prog}: error: {e}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    print(f"{prog}: interrupted", file=sys.stderr)
    sys.exit(130)
