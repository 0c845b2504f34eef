"""PEFT module names: the `name_map` of `jlora.export_peft`/`jlora.import_peft` (see jlora.peft)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

NameMap = None | Sequence[tuple[str, str]] | Callable[[str], str | None]


def _namer(name_map: NameMap) -> Callable[[str], str | None]:
  if name_map is None:
    return lambda module: re.sub(r"^params/", "", module).replace("/", ".") or None
  if callable(name_map):
    return name_map
  try:
    rules = [(re.compile(regex), str(template)) for regex, template in name_map]
  except (TypeError, ValueError, re.error) as e:
    raise TypeError(
        "name_map must be None, a callable (flax module path) -> torch module name, or a "
        f"sequence of (flax_regex, torch_template) pairs; got {name_map!r} ({e})."
    ) from None

  def by_rules(module: str) -> str | None:
    for regex, template in rules:
      match = regex.fullmatch(module)
      if match:
        return match.expand(template)
    return None

  return by_rules


def _split(path: str) -> tuple[str, str]:
  module, _, leaf = path.rpartition("/")
  return module, leaf


def _template(namer, path: str, required: bool) -> str | None:
  """The torch module name (with a '{}' per stacked axis) of the leaf at `path`'s module."""
  module = _split(path)[0]
  template = namer(module)
  if template is None and required:
    raise ValueError(f"name_map gives no torch module for {module!r} (of {path!r}). "
                     "Fix: add a rule (flax_regex, torch_template) that matches it.")
  if template is not None and not isinstance(template, str):
    raise TypeError(f"name_map returned {template!r} for {module!r}; expected a str or None.")
  return template


def _layer_names(template: str, stacked: tuple[int, ...], path: str) -> dict[tuple, str]:
  """{layer index: torch module name}; the index is () for an unstacked leaf."""
  if template.count("{}") != len(stacked):
    raise ValueError(
        f"{path!r} has {len(stacked)} stacked (layer) axes {stacked}, so its torch name needs "
        f"as many '{{}}' placeholders; name_map gives {template!r}. Fix: e.g. "
        "'model.layers.{}.self_attn.q_proj' for a scanned stack."
    )
  return {idx: template.format(*idx) for idx in np.ndindex(*stacked)}


def _reverse_map(namer, flat: dict[str, Any]) -> dict[str, tuple[str, tuple[int, ...]]]:
  """{torch module name: (flax module path, layer index)} over every leaf of `flat`."""
  found: dict[str, tuple[str, tuple[int, ...]]] = {}
  for path, leaf in flat.items():
    template = _template(namer, path, required=False)
    n = 0 if template is None else template.count("{}")
    if template is None or n > len(leaf.shape):
      continue
    module = _split(path)[0]
    for idx, name in _layer_names(template, tuple(leaf.shape[:n]), path).items():
      if found.setdefault(name, (module, idx))[0] != module:
        raise ValueError(f"name_map maps both {found[name][0]!r} and {module!r} to the torch "
                         f"module {name!r}. Fix: make the rules tell them apart.")
  return found


def _pattern_key(pattern_keys, module_name: str) -> str | None:
  """The first key of a PEFT rank/alpha pattern that matches `module_name`, as PEFT 0.21 does.

  PEFT tries each key in order with ``re.match(rf"(.*\\.)?({key})$", module_name)``: the key is a
  regex that must match the end of the name, starting at a "." boundary.
  """
  for key in pattern_keys:
    if re.match(rf"(.*\.)?({key})$", module_name):
      return key
  return None
