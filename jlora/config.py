"""`LoraConfig`: which leaves get an adapter, at what rank and scale, and how it starts."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Targets = str | tuple[str, ...] | Callable[[str, Any], bool]
Patterns = tuple[tuple[str, Any], ...]

INIT_SCHEMES = ("kaiming", "gaussian")
AXIS_LETTERS = "sio"  # stacked, input (contracted), output


def _as_patterns(name: str, value: Any) -> Patterns:
  """Turns a {regex: value} mapping or a sequence of pairs into a tuple of pairs."""
  items = value.items() if isinstance(value, Mapping) else value
  try:
    pairs = tuple((str(pattern), v) for pattern, v in items)
  except (TypeError, ValueError):
    raise TypeError(
        f"LoraConfig.{name} must map regexes to values; got {value!r}. Fix: pass a dict such "
        "as {'.*query.*': 16} (or a sequence of (regex, value) pairs)."
    ) from None
  for pattern, _ in pairs:
    _check_regex(name, pattern)
  return pairs


def _as_regexes(name: str, value: Any) -> tuple[str, ...]:
  try:
    regexes = (value,) if isinstance(value, str) else tuple(value)
  except TypeError:
    raise TypeError(
        f"LoraConfig.{name} must be a regex or a sequence of regexes, got {value!r}. Fix: pass "
        "e.g. '.*/kernel' or ['.*/query/kernel', '.*/value/kernel']."
    ) from None
  for pattern in regexes:
    _check_regex(name, pattern)
  return regexes


def _check_regex(name: str, pattern: Any) -> None:
  if not isinstance(pattern, str):
    raise TypeError(f"LoraConfig.{name}: expected a regex string, got {pattern!r}. Fix: "
                    "write the pattern as a str.")
  try:
    re.compile(pattern)
  except re.error as e:
    raise ValueError(f"LoraConfig.{name}: {pattern!r} is not a valid regex ({e}). Fix: escape "
                     "special characters (re.escape) or correct the pattern.") from None


def _as_python(name: str, value: Any) -> Any:
  """A NumPy or JAX scalar as the Python bool/int/float it holds (hashable, JSON-ready)."""
  if isinstance(value, np.generic | np.ndarray | jax.Array) and np.ndim(value) == 0:
    try:
      return value.item()
    except jax.errors.ConcretizationTypeError:
      raise TypeError(
          f"LoraConfig.{name} is a traced value; a config is static (hashed by jax.jit). Fix: "
          "pass a Python number, computed outside the jitted function."
      ) from None
  return value


def _check_dtype(dtype: Any) -> str:
  """The name of `dtype` if adapters can train in it on this backend; raises otherwise."""
  if dtype is None:
    raise ValueError("LoraConfig: dtype=None is not a dtype. Fix: use 'float32' (the default) "
                     "or 'bfloat16'.")
  try:
    floating = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
  except TypeError:
    floating = False
  if not floating:
    raise ValueError(
        f"LoraConfig: self.dtype={dtype!r} is not a floating dtype; adapters train in floating "
        "point. Fix: use 'float32' (the default) or 'bfloat16'."
    )
  dtype = jnp.dtype(dtype)
  if jax.dtypes.canonicalize_dtype(dtype) != dtype:
    raise ValueError(
        f"LoraConfig: dtype={dtype.name!r} cannot be held by JAX as configured (64-bit types "
        "are off, so the adapter would silently be float32). Fix: use 'float32', or run "
        "jax.config.update('jax_enable_x64', True) before making the config."
    )
  return dtype.name


def first_match(patterns: Patterns, path: str, default: Any) -> Any:
  """The value of the first (regex, value) pair whose regex fullmatches `path`."""
  for pattern, value in patterns:
    if re.fullmatch(pattern, path):
      return value
  return default


def matches_any(regexes: tuple[str, ...], path: str) -> bool:
  return any(re.fullmatch(pattern, path) for pattern in regexes)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
  """What to adapt and how: the LoRA hyperparameters, validated once.

  Each selected kernel W gets ΔW = s·Aᵀ·B with A of shape (rank, fan_in), B of shape
  (rank, fan_out) and s = alpha / rank (alpha / √rank with `use_rslora`, Kalajdzievski 2023).
  B starts at zero, so a fresh adapter leaves the model unchanged.

  Numbers may be given as Python, NumPy or (concrete) JAX scalars; they are stored as Python
  ints, floats and bools, so the config stays hashable (a static argument of `jax.jit`) and
  JSON-serialisable.

  Attributes:
    rank: the default rank r (>= 1).
    alpha: the default α (> 0); the scale is α/r.
    targets: which leaves get an adapter: a regex matched with `re.fullmatch` against each
      leaf's "/"-joined key path (e.g. ``params/layers_0/attn/query/kernel``), a sequence of
      such regexes, or a callable ``(path, leaf) -> bool``.
    exclude: regexes of paths never adapted, even if `targets` selects them.
    rank_pattern: ``{regex: rank}``; the first regex that fullmatches a path sets its rank.
    alpha_pattern: ``{regex: alpha}``, likewise for α.
    use_rslora: scale by α/√r instead of α/r.
    dropout: dropout rate on the adapter's input, applied only when the wrapped apply function
      is given a dropout key; never at evaluation.
    init: how A starts: ``"kaiming"`` (uniform, bound 1/√fan_in, PEFT's default) or
      ``"gaussian"`` (normal with standard deviation 1/rank, the paper's choice). B is zero.
    dtype: dtype of A, B and the trainable extras, whatever the base dtype: a floating dtype
      JAX can hold as configured (float64 only with ``jax_enable_x64``).
    trainable: regexes of further leaves trained in full (biases, norms, a new head: PEFT's
      ``modules_to_save``).
    roles: ``{regex: letters}`` stating the axis roles of kernels that cannot be traced: one
      letter per kernel axis, ``s`` stacked (a scanned layer axis), ``i`` input (contracted
      with the activation), ``o`` output; e.g. ``"sio"`` for a scanned Dense kernel.

  Example:
    >>> import jlora
    >>> config = jlora.LoraConfig(rank=8, alpha=16.0, targets=r".*/(query|value)/kernel")
    >>> config.scale_for("params/attn/query/kernel")
    2.0
    >>> jlora.LoraConfig.from_json(config.to_json()) == config
    True
  """

  rank: int
  alpha: float
  targets: Targets
  exclude: tuple[str, ...] = ()
  rank_pattern: Patterns = ()
  alpha_pattern: Patterns = ()
  use_rslora: bool = False
  dropout: float = 0.0
  init: str = "kaiming"
  dtype: str = "float32"
  trainable: tuple[str, ...] = ()
  roles: Patterns = ()

  def __post_init__(self):
    set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
    if not callable(self.targets):
      set_("targets", _as_regexes("targets", self.targets))
      if not self.targets:
        raise ValueError("LoraConfig.targets is empty. Fix: give a regex such as '.*/kernel'.")
    set_("exclude", _as_regexes("exclude", self.exclude))
    set_("trainable", _as_regexes("trainable", self.trainable))
    for name in ("rank", "alpha", "dropout", "use_rslora"):
      set_(name, _as_python(name, getattr(self, name)))
    for name in ("rank_pattern", "alpha_pattern"):
      set_(name, tuple((k, _as_python(f"{name}[{k!r}]", v))
                       for k, v in _as_patterns(name, getattr(self, name))))
    set_("roles", _as_patterns("roles", self.roles))
    for where, rank in (("rank", self.rank), *self.rank_pattern):
      if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoraConfig: rank must be an integer >= 1, got {rank!r} for {where!r}. "
                         "Fix: give a whole number such as 8.")
    for where, alpha in (("alpha", self.alpha), *self.alpha_pattern):
      if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not (
          math.isfinite(alpha) and alpha > 0):
        raise ValueError(
            f"LoraConfig: alpha must be a finite number > 0, got {alpha!r} for {where!r}. Fix: "
            "give e.g. alpha=16.0 (the scale is alpha/rank; to switch an adapter off, leave it "
            "out rather than scale it by 0)."
        )
    if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float) or not (
        0.0 <= self.dropout < 1.0):
      raise ValueError(f"LoraConfig: dropout must be in [0, 1), got {self.dropout=}. Fix: give "
                       "a rate such as 0.05, or 0.0 for none.")
    if self.init not in INIT_SCHEMES:
      raise ValueError(
          f"LoraConfig: unknown init scheme {self.init!r}. Fix: choose one of {INIT_SCHEMES}."
      )
    if not isinstance(self.use_rslora, bool):
      raise TypeError(f"LoraConfig: use_rslora must be True or False, got {self.use_rslora!r}. "
                      "Fix: pass a bool.")
    set_("dtype", _check_dtype(self.dtype))
    for pattern, letters in self.roles:
      if not isinstance(letters, str) or set(letters) - set(AXIS_LETTERS) or "i" not in letters \
          or "o" not in letters:
        raise ValueError(
            f"LoraConfig.roles[{pattern!r}] = {letters!r} is not a roles string. Fix: give one "
            "letter per kernel axis, 's' stacked, 'i' input, 'o' output, with at least one 'i' "
            "and one 'o' (e.g. 'sio')."
        )

  def is_target(self, path: str, leaf: Any) -> bool:
    """Whether the leaf at `path` gets an adapter."""
    if matches_any(self.exclude, path):
      return False
    if callable(self.targets):
      return bool(self.targets(path, leaf))
    return matches_any(self.targets, path)

  def is_trainable_extra(self, path: str) -> bool:
    """Whether the leaf at `path` is trained in full (PEFT's ``modules_to_save``)."""
    return matches_any(self.trainable, path)

  def rank_for(self, path: str) -> int:
    return first_match(self.rank_pattern, path, self.rank)

  def scale_for(self, path: str) -> float:
    """α/r (or α/√r with rsLoRA) for the adapter at `path`."""
    rank, alpha = self.rank_for(path), first_match(self.alpha_pattern, path, self.alpha)
    return float(alpha) / (math.sqrt(rank) if self.use_rslora else rank)

  def roles_for(self, path: str) -> str | None:
    return first_match(self.roles, path, None)

  def to_dict(self) -> dict[str, Any]:
    """A JSON-ready dict; raises TypeError if `targets` is a callable."""
    if callable(self.targets):
      raise TypeError(
          "LoraConfig.to_dict: a callable `targets` cannot be serialised. "
          "Fix: give targets as regexes."
      )
    out = dataclasses.asdict(self)
    for name in ("rank_pattern", "alpha_pattern", "roles"):
      out[name] = dict(out[name])
    for name in ("targets", "exclude", "trainable"):
      out[name] = list(out[name])
    return out

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> LoraConfig:
    """The config `to_dict` describes; raises on unknown keys and invalid values."""
    if not isinstance(data, Mapping):
      raise TypeError(f"LoraConfig.from_dict: expected a mapping of field names to values, got "
                      f"{type(data).__name__}. Fix: pass what LoraConfig.to_dict returned.")
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      names = ", ".join(f.name for f in dataclasses.fields(cls))
      raise ValueError(f"LoraConfig.from_dict: unknown keys {sorted(unknown)}. Fix: use the "
                       f"field names of LoraConfig ({names}).")
    return cls(**data)

  def to_json(self) -> str:
    """`to_dict` as a JSON string; raises TypeError if `targets` is a callable."""
    return json.dumps(self.to_dict())  # key order is match order

  @classmethod
  def from_json(cls, text: str | bytes) -> LoraConfig:
    """The config a `to_json` string describes; raises ValueError for text that is not one."""
    if not isinstance(text, str | bytes | bytearray):
      raise TypeError(f"LoraConfig.from_json: expected a JSON string, got {type(text).__name__}. "
                      "Fix: pass what LoraConfig.to_json returned (or from_dict for a dict).")
    try:
      data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"LoraConfig.from_json: the text is not valid JSON ({e}). Fix: pass the "
                       "whole string that LoraConfig.to_json wrote.") from None
    if not isinstance(data, dict):
      raise ValueError(f"LoraConfig.from_json: expected a JSON object of config fields, got "
                       f"{json.dumps(data)[:40]}. Fix: pass the string LoraConfig.to_json wrote.")
    return cls.from_dict(data)
