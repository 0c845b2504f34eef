"""Hugging Face PEFT adapter folders: `export_peft` and `import_peft`.

A PEFT LoRA folder (as ``save_pretrained`` of PEFT 0.21 writes it) holds ``adapter_config.json``
and ``adapter_model.safetensors`` with float32 tensors named after torch modules:

* Linear: ``base_model.model.<module>.lora_A.weight`` [r, in], ``lora_B.weight`` [out, r];
* Embedding: ``<module>.lora_embedding_A`` [r, vocab], ``lora_embedding_B`` [dim, r];
* ConvNd: ``lora_A.weight`` [r, cin, *window] (a conv with the base window), ``lora_B.weight``
  [cout, r, 1, ...] (a 1×1 conv);
* trained extras: ``<module>.weight``/``.bias`` of ``modules_to_save`` modules, and
  ``<module>.base_layer.bias`` for the bias of a LoRA module (``bias="lora_only"``).

jlora's factors map onto these without a loss: A = a and B = bᵀ, since ΔW_flax = s·aᵀb is
(in, out) and torch's ΔW = s·B·A is (out, in). A multi-axis kernel such as DenseGeneral's
(D, H, hd) is torch's Linear(D, H·hd): its contracted and output axes are flattened row-major
in the Flax kernel's order, so the torch model must view its output as (..., H, hd) (the usual
``.view``). A Flax conv kernel (*window, cin, cout) is torch's (cout, cin, *window); a Flax
embedding (vocab, dim) is laid out as torch's. Only the safetensors numpy API is used: torch
is not needed.

**name_map** turns the Flax *module* path of a leaf (its path without the last key, e.g.
``params/layers_0/attn/query``) into the torch module name (``model.layers.0.self_attn.q_proj``):

* None: drop a leading ``params/`` and join with "." (``params/fc1`` -> ``fc1``);
* a sequence of ``(flax_regex, torch_template)`` rules: the first regex that fullmatches the
  module path wins, and the name is ``match.expand(torch_template)`` (``\\1``, ``\\g<name>``);
* a callable ``module_path -> str | None`` (None: no torch counterpart).

A stacked (`nn.scan`) kernel stands for one torch module per layer: its name has one ``{}``
per stacked axis, filled with the layer index (``"model.layers.{}.self_attn.q_proj"``). The
same forward map serves both directions: `import_peft` maps every leaf of the params it is
given and looks the file's torch names up in that.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save

from jlora import _tree
from jlora._peft_names import (
  NameMap,
  _layer_names,
  _namer,
  _pattern_key,
  _reverse_map,
  _split,
  _template,
)
from jlora.adapter import Adapter, LoraFactors, Params, init
from jlora.config import LoraConfig
from jlora.validate import check_factors, check_finite, check_not_routed

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
_NEW_TAG, _OLD_TAG = "jlora-new-", "jlora-old-"  # hidden sibling folders of an export
_LORA_KEYS = {"dense": ("lora_A.weight", "lora_B.weight"),
              "conv": ("lora_A.weight", "lora_B.weight"),
              "embed": ("lora_embedding_A", "lora_embedding_B")}
_WEIGHT_LEAVES = ("kernel", "embedding", "scale")  # what torch calls `weight`
# The fields of PEFT 0.21's LoraConfig; others come from a newer PEFT and are ignored.
_KNOWN = frozenset("""
  alora_invocation_tokens alpha_pattern arrow_config auto_mapping base_model_name_or_path bias
  corda_config ensure_weight_tying eva_config exclude_modules fan_in_fan_out inference_mode
  init_lora_weights kasa_config layer_replication layers_pattern layers_to_transform loftq_config
  lora_alpha lora_bias lora_dropout lora_ga_config megatron_config megatron_core modules_to_save
  monteclora_config peft_type peft_version qalora_group_size r rank_pattern revision
  runtime_config target_modules target_parameters task_type trainable_token_indices use_bdlora
  use_dora use_qalora use_rslora velora_config""".split())
# Fields that change what the adapter computes in ways jlora does not reproduce, when set.
_UNSUPPORTED = {
    "use_dora": "DoRA (weight-decomposed LoRA)", "loftq_config": "LoftQ",
    "lora_bias": "lora_bias (a trained bias on B)", "use_qalora": "QALoRA",
    "use_bdlora": "block-diagonal LoRA", "layer_replication": "layer_replication",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "trainable_token_indices": "trainable tokens", "target_parameters": "target_parameters",
    "arrow_config": "Arrow routing", "monteclora_config": "MonteCLoRA",
    "velora_config": "VeLoRA", "kasa_config": "KaSA", "megatron_config": "Megatron layers",
}
_BASE_CHANGING_INITS = ("loftq", "pissa", "olora", "corda", "lora_ga")


# ----------------------------------------------------------------------------------------------
# Layouts: jlora's (a, b) of one layer <-> PEFT's (A, B).


def _to_torch(kind: str, a: np.ndarray, b: np.ndarray, kernel_shape) -> tuple[np.ndarray, ...]:
  if kind == "conv":
    window, cin, cout = kernel_shape[:-2], kernel_shape[-2], kernel_shape[-1]
    a_t = np.moveaxis(a.reshape(a.shape[0], *window, cin), -1, 1)
    return a_t, b.T.reshape(cout, b.shape[0], *(1,) * len(window))
  return a, b.T


def _torch_shapes(kind: str, rank: int, fan_in: int, fan_out: int, kernel_shape):
  if kind == "conv":
    window, cin = tuple(kernel_shape[:-2]), kernel_shape[-2]
    return (rank, cin, *window), (kernel_shape[-1], rank, *(1,) * len(window))
  return (rank, fan_in), (fan_out, rank)


def _from_torch(kind: str, a_t: np.ndarray, b_t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  rank = a_t.shape[0]
  if kind == "conv":
    return np.moveaxis(a_t, 1, -1).reshape(rank, -1), b_t.reshape(b_t.shape[0], rank).T
  return a_t, b_t.T


def _extra_to_torch(path: str, leaf: str, x: np.ndarray) -> tuple[str, np.ndarray]:
  """(torch parameter name, value) of one layer of an extra leaf."""
  if leaf == "bias":  # a multi-axis module's bias is flattened row-major, like its features
    return "bias", x.reshape(-1)
  if leaf in ("embedding", "scale"):
    return "weight", x
  if leaf == "kernel" and x.ndim == 2:
    return "weight", x.T
  raise ValueError(
      f"{path}: jlora maps trained extras named bias, scale, embedding or a 2-D kernel to torch "
      f"parameters, not a {leaf!r} leaf of shape {x.shape}. Fix: leave it out of "
      "LoraConfig.trainable, or give the kernel a LoRA instead."
  )


# ----------------------------------------------------------------------------------------------
# Export.


def _scalar(x: float) -> int | float:
  return int(x) if float(x).is_integer() else float(x)


def _alpha(scale: float, rank: int, rslora: bool) -> int | float:
  """PEFT's α for scale s: s·r (s·√r with rsLoRA), tidied where PEFT then gives s back exactly."""
  divisor = math.sqrt(rank) if rslora else rank
  raw = scale * divisor
  for alpha in (float(f"{raw:.12g}"), raw):  # drop the last-bit noise of the product
    if alpha / divisor == scale:
      return _scalar(alpha)
  return raw


def _patterns(values: dict[str, Any], default: Any) -> dict[str, Any]:
  """PEFT pattern keys (escaped module names, longest first) so every module gets its value."""
  pattern = {re.escape(m): v for m, v in values.items() if v != default}
  while True:
    keys = sorted(pattern, key=len, reverse=True)
    wrong = [m for m, v in values.items()
             if pattern.get(_pattern_key(keys, m), default) != v]
    if not wrong:
      return {k: pattern[k] for k in keys}
    pattern.update({re.escape(m): values[m] for m in wrong})


def _most_common(values) -> Any:
  return collections.Counter(values).most_common(1)[0][0]


def export_peft(path: str | os.PathLike, adapter: Adapter, name_map: NameMap = None, *,
                config: LoraConfig | None = None,
                base_model_name_or_path: str | None = None) -> None:
  """Writes `adapter` as a Hugging Face PEFT LoRA folder that ``PeftModel.from_pretrained`` loads.

  Each factor (one per layer of a stacked kernel) becomes PEFT's A = a and B = bᵀ in the torch
  layouts of the module docstring, as float32. The config's ``r`` and ``lora_alpha`` are the
  most common rank and α = s·r (s·√r with rsLoRA) over the modules, or those of `config`;
  other modules go into ``rank_pattern``/``alpha_pattern`` under their escaped full names, so
  each module gets back its exact scale. Extras become ``modules_to_save`` (``bias`` of a LoRA
  module: ``bias="lora_only"``).

  The write is atomic: both files go into a new hidden sibling folder that is then renamed
  onto `path` (an existing folder is renamed aside first and removed last, its other files
  carried over as hard links), so a full disk or a kill leaves the previous export whole.

  Args:
    path: the folder to write (created if missing; replaced as a whole, other files kept).
    adapter: the adapter to export.
    name_map: Flax module path -> torch module name (see the module docstring).
    config: optionally the adapter's `LoraConfig`, for ``use_rslora``, ``lora_dropout`` and the
      default ``r``/``lora_alpha``.
    base_model_name_or_path: written into the config for PEFT.

  Raises:
    TypeError: if `adapter` is not an `Adapter`, a factor is not a floating array, or
      `name_map` is malformed.
    ValueError: if the adapter has per-example factors (from `jlora.route`) or factors that
      disagree with their kernel, a path has no torch name, two paths share one, an extra has
      no torch counterpart, or `path` is a file.
    OSError: if writing fails (e.g. the disk is full); the previous export is left as it was.

  Example:
    >>> import json, os, pathlib, tempfile, jax, jax.numpy as jnp, jlora
    >>> from safetensors.numpy import load_file
    >>> params = {"params": {"fc": {"kernel": jnp.ones((16, 8))}}}
    >>> config = jlora.LoraConfig(rank=4, alpha=8.0, targets=".*/kernel")
    >>> adapter = jlora.init(jax.random.key(0), params, config)
    >>> folder = tempfile.mkdtemp()
    >>> jlora.export_peft(folder, adapter, [("params/fc", "model.fc1")])
    >>> for name, x in load_file(os.path.join(folder, "adapter_model.safetensors")).items():
    ...   print(name, x.shape)
    base_model.model.model.fc1.lora_A.weight (4, 16)
    base_model.model.model.fc1.lora_B.weight (8, 4)
    >>> json.loads(pathlib.Path(folder, "adapter_config.json").read_text())["lora_alpha"]
    8
  """
  if not isinstance(adapter, Adapter):
    raise TypeError(f"export_peft: expected a jlora.Adapter, got {type(adapter).__name__}. "
                    "Fix: pass what jlora.init, jlora.select or jlora.combine returned.")
  check_not_routed(adapter, where="jlora.export_peft")
  for leaf_path, factors in adapter.lora.items():
    check_factors(leaf_path, factors)
  namer = _namer(name_map)
  tensors, ranks, alphas, dropouts, owners = {}, {}, {}, [], {}

  def names_of(leaf_path: str, stacked: tuple[int, ...]) -> dict[tuple, str]:
    names = _layer_names(_template(namer, leaf_path, required=True), stacked, leaf_path)
    for name in names.values():
      if _split(owners.setdefault(name, leaf_path))[0] != _split(leaf_path)[0]:
        raise ValueError(f"name_map maps both {owners[name]!r} and {leaf_path!r} to the torch "
                         f"module {name!r}. Fix: make the rules tell them apart.")
    return names

  rslora = bool(config.use_rslora) if config is not None else False
  for leaf_path, f in sorted(adapter.lora.items()):
    a, b = np.asarray(f.a, np.float32), np.asarray(f.b, np.float32)
    names = names_of(leaf_path, tuple(f.kernel_shape[i] for i in f.roles.stacked))
    layer_shape = tuple(d for i, d in enumerate(f.kernel_shape) if i not in f.roles.stacked)
    suffix_a, suffix_b = _LORA_KEYS[f.roles.kind]
    for idx, name in names.items():
      a_t, b_t = _to_torch(f.roles.kind, a[idx], b[idx], layer_shape)
      tensors[f"{PREFIX}{name}.{suffix_a}"], tensors[f"{PREFIX}{name}.{suffix_b}"] = a_t, b_t
      ranks[name], alphas[name] = f.rank, _alpha(f.scale, f.rank, rslora)
      dropouts.append(f.dropout)
  lora_modules = set(ranks)
  to_save, lora_bias = set(), False
  for leaf_path, x in sorted(adapter.extras.items()):
    x = np.asarray(x, np.float32)
    template = _template(namer, leaf_path, required=True)
    names = names_of(leaf_path, x.shape[:template.count("{}")])
    for idx, name in names.items():
      param, value = _extra_to_torch(leaf_path, _split(leaf_path)[1], x[idx])
      if name in lora_modules and param == "bias":
        tensors[f"{PREFIX}{name}.base_layer.bias"], lora_bias = value, True
      elif name in lora_modules:
        raise ValueError(f"{leaf_path}: torch module {name!r} has a LoRA, so PEFT cannot also "
                         f"train its {param} in full. Fix: leave {leaf_path!r} out of "
                         "LoraConfig.trainable.")
      else:
        tensors[f"{PREFIX}{name}.{param}"] = value
        to_save.add(name)
  for saved in to_save:  # PEFT wraps names ending in `saved`, and their submodules
    clash = sorted(m for m in lora_modules
                   if m.endswith(saved) or re.match(rf"(^|.*\.){re.escape(saved)}\.", m))
    if clash:
      raise ValueError(f"Torch module {saved!r} would be trained in full (modules_to_save), but "
                       f"PEFT would then also wrap LoRA modules {clash[:3]}. Fix: leave the "
                       f"leaves of {saved!r} out of LoraConfig.trainable, or rename it.")
  r = config.rank if config is not None else _most_common(ranks.values()) if ranks else 8
  alpha = (_scalar(config.alpha) if config is not None
           else _most_common(alphas.values()) if alphas else 8)
  peft_config = {
      "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
      "revision": None, "inference_mode": True, "r": r, "lora_alpha": alpha,
      "target_modules": sorted(lora_modules), "exclude_modules": None,
      "rank_pattern": _patterns(ranks, r), "alpha_pattern": _patterns(alphas, alpha),
      "use_rslora": rslora,
      "lora_dropout": config.dropout if config is not None else
      (_most_common(dropouts) if dropouts else 0.0),
      "bias": "lora_only" if lora_bias else "none",
      "modules_to_save": sorted(to_save) or None, "fan_in_fan_out": False,
      "init_lora_weights": True, "use_dora": False, "lora_bias": False,
      "layers_to_transform": None, "layers_pattern": None,
  }
  files = {
      CONFIG_FILE: json.dumps(peft_config, indent=2, sort_keys=True).encode(),
      WEIGHTS_FILE: save({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                         metadata={"format": "pt"}),
  }
  _write_folder(path, files)


def _write_file(file: str, data: bytes) -> None:
  with open(file, "wb") as fh:
    fh.write(data)
    fh.flush()
    os.fsync(fh.fileno())


def _fsync_dir(folder: str) -> None:
  try:
    fd = os.open(folder, os.O_RDONLY)
  except OSError:  # e.g. a platform without directory handles
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def _link_or_copy(src: str, dst: str) -> None:
  try:
    os.link(src, dst)
  except OSError:
    shutil.copy2(src, dst)


def _carry_over(folder: str, new: str, skip: set[str]) -> None:
  """Links (or copies) every entry of `folder` but `skip` into `new`; symlinks stay links."""
  for entry in os.listdir(folder):
    if entry in skip:
      continue
    src, dst = os.path.join(folder, entry), os.path.join(new, entry)
    if os.path.islink(src):
      os.symlink(os.readlink(src), dst)
    elif os.path.isdir(src):
      shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
    else:
      _link_or_copy(src, dst)


def _write_folder(path: str | os.PathLike, files: dict[str, bytes]) -> None:
  """Writes `files` as the folder `path`, all or nothing.

  The files go into a new hidden sibling folder, which is renamed onto `path`; an existing
  folder is first renamed aside and removed only once the new one is in place, so any
  failure (a full disk, an error) leaves the previous export whole at `path`. A kill in the
  instant between the two renames leaves it whole under the hidden ``.<name>.jlora-old-*``
  name, which `import_peft`'s error then points to. Other entries of an existing folder (a
  README, tokenizer files) are carried over as hard links (or copies).
  """
  target = os.path.realpath(path)
  parent, name = os.path.split(target)
  if os.path.exists(target) and not os.path.isdir(target):
    raise ValueError(f"export_peft: {target!r} exists and is not a folder. Fix: give a folder "
                     "path (it is created if missing).")
  try:
    os.makedirs(parent, exist_ok=True)
    new = tempfile.mkdtemp(prefix=f".{name}.{_NEW_TAG}", dir=parent)
  except OSError as e:
    raise OSError(e.errno, f"export_peft: cannot create a folder next to {target!r} "
                  f"({e.strerror or e}). Fix: choose a folder in a writable place.") from e
  old = None
  try:
    for file_name, data in files.items():
      try:
        _write_file(os.path.join(new, file_name), data)
      except OSError as e:
        raise OSError(e.errno, f"export_peft: writing {file_name} for {target!r} failed "
                      f"({e.strerror or e}); the folder was left as it was. Fix: free space "
                      "or choose a writable folder, then export again.") from e
    if os.path.isdir(target):
      _carry_over(target, new, skip=set(files))
      suffix = os.path.basename(new)[len(f".{name}.{_NEW_TAG}"):]
      old = os.path.join(parent, f".{name}.{_OLD_TAG}{suffix}")
      try:
        os.rename(target, old)
      except OSError as e:
        old = None
        raise OSError(e.errno, f"export_peft: cannot replace the folder {target!r} "
                      f"({e.strerror or e}); it was left as it was. Fix: export into a new "
                      "folder, e.g. a subfolder of it.") from e
    try:
      os.rename(new, target)
    except BaseException:
      if old is not None:
        os.rename(old, target)
        old = None
      raise
  except BaseException:
    shutil.rmtree(new, ignore_errors=True)
    raise
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)
  _fsync_dir(parent)


# ----------------------------------------------------------------------------------------------
# Import.


def _interrupted_export(path: str | os.PathLike) -> str:
  """A hint naming the folders an interrupted `export_peft` left next to `path`, if any."""
  parent, name = os.path.split(os.path.realpath(path))
  try:
    left = sorted(e for e in os.listdir(parent) if e.startswith(f".{name}.jlora-"))
  except OSError:
    return ""
  if not left:
    return ""
  return (f" An interrupted jlora.export_peft left {left} in {parent!r}: a '{_OLD_TAG}' folder "
          "is the previous export, whole; rename it to the folder's name.")


def _bad_field(file: str, key: str, value: Any, want: str) -> ValueError:
  return ValueError(f"import_peft: {file} has {key}={value!r}; {want}. Fix: correct it in the "
                    "file, or export the adapter again.")


def _is_number(x: Any) -> bool:
  return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _is_rank(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def _is_alpha(x: Any) -> bool:
  return _is_number(x) and x > 0


def _check_fields(file: str, cfg: dict[str, Any]) -> None:
  """Raises naming the file unless the fields jlora reads have PEFT's types."""
  if not _is_rank(cfg.get("r", 8)):
    raise _bad_field(file, "r", cfg["r"], "r must be an integer >= 1")
  if not _is_alpha(cfg.get("lora_alpha", 8)):
    raise _bad_field(file, "lora_alpha", cfg["lora_alpha"], "lora_alpha must be a number > 0")
  dropout = cfg.get("lora_dropout", 0.0)
  if not _is_number(dropout) or not 0 <= dropout < 1:
    raise _bad_field(file, "lora_dropout", dropout, "lora_dropout must be a number in [0, 1)")
  if not isinstance(cfg.get("use_rslora", False), bool):
    raise _bad_field(file, "use_rslora", cfg["use_rslora"], "use_rslora must be true or false")
  for key, ok, want in (("rank_pattern", _is_rank, "an integer >= 1"),
                        ("alpha_pattern", _is_alpha, "a number > 0")):
    pattern = cfg.get(key) or {}
    if not isinstance(pattern, dict):
      raise _bad_field(file, key, pattern, f"{key} must map module-name regexes to values")
    for regex, value in pattern.items():
      try:
        re.compile(rf"(.*\.)?({regex})$")  # how PEFT 0.21 uses a pattern key
      except re.error as e:
        raise _bad_field(file, key, pattern, f"{regex!r} is not a valid regex ({e})") from None
      if not ok(value):
        raise _bad_field(file, key, pattern, f"the value for {regex!r} must be {want}")


def _read_config(path: str | os.PathLike) -> dict[str, Any]:
  """The folder's adapter_config.json, checked: LoRA, no unsupported feature; warns on unknowns."""
  file = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(file):
    hint = _interrupted_export(path)
    raise FileNotFoundError(f"import_peft: no {CONFIG_FILE} in {os.fspath(path)!r}. Fix: give "
                            f"the folder that PEFT's save_pretrained wrote.{hint}")
  try:
    with open(file, "rb") as fh:
      cfg = json.loads(fh.read().decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"import_peft: {file} is not valid JSON ({e}); it is truncated or "
                     "corrupt. Fix: export the adapter again (PEFT's save_pretrained or "
                     "jlora.export_peft).") from None
  if not isinstance(cfg, dict):
    kind = {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(cfg), "number")
    raise ValueError(f"import_peft: {file} holds a JSON {kind}, not an object "
                     "of PEFT config fields. Fix: export the adapter again.")
  if cfg.get("peft_type") != "LORA":
    raise ValueError(f"import_peft: {file} has peft_type={cfg.get('peft_type')!r}; jlora reads "
                     "LoRA adapters ('LORA') only. Fix: export a LoRA adapter from PEFT.")
  unknown = sorted(set(cfg) - _KNOWN)
  if unknown:
    warnings.warn(f"import_peft: ignoring config keys unknown to PEFT 0.21 in {file}: {unknown}.",
                  stacklevel=3)
  used = [what for key, what in _UNSUPPORTED.items() if cfg.get(key)]
  init_scheme = str(cfg.get("init_lora_weights", True)).lower()
  if init_scheme.startswith(_BASE_CHANGING_INITS):
    used.append(f"init_lora_weights={cfg['init_lora_weights']!r} (it changes the base weights)")
  if used:
    raise ValueError(
        f"import_peft: {file} uses {', '.join(used)}, which jlora does not support. Fix: export "
        "a plain LoRA from PEFT (for PiSSA/OLoRA/CorDA/LoRA-GA, save_pretrained with "
        "path_initial_model_for_weight_conversion)."
    )
  _check_fields(file, cfg)
  return cfg


def _load_weights(file: str) -> dict[str, np.ndarray]:
  """The tensors of a safetensors file, or one error naming the file (and what it links to)."""
  try:
    tensors = load_file(file)
  except (SafetensorError, OSError, TypeError, ValueError) as e:
    real = os.path.realpath(file)
    link = f" (a link to {real!r})" if real != os.path.abspath(file) else ""
    raise ValueError(f"import_peft: {file}{link} is not a safetensors file jlora can read "
                     f"({type(e).__name__}: {e}); it is truncated, corrupt or holds a dtype "
                     "NumPy lacks (bfloat16). Fix: export the adapter again, in float32 "
                     "(PEFT: model.float() before save_pretrained).") from None
  for key, value in tensors.items():
    if not np.issubdtype(value.dtype, np.floating):
      raise ValueError(f"import_peft: {file} holds {key!r} with dtype {value.dtype}; LoRA "
                       "weights are floating point. Fix: export the adapter again.")
  return tensors


def _read_tensors(path) -> tuple[dict, dict]:
  """({torch module: {"A"|"B": array, "kind": ...}}, {torch module: {param: array}})."""
  file = os.path.join(path, WEIGHTS_FILE)
  if not os.path.isfile(file):
    raise FileNotFoundError(f"import_peft: no {WEIGHTS_FILE} in {os.fspath(path)!r}. Fix: save "
                            "with safe_serialization=True (PEFT's default).")
  lora, extras = collections.defaultdict(dict), collections.defaultdict(dict)
  for key, value in _load_weights(file).items():
    name = key.removeprefix(PREFIX)
    if "lora_magnitude_vector" in name:
      raise ValueError(f"import_peft: {key!r} is a DoRA magnitude, which jlora does not support. "
                       "Fix: export a plain LoRA (use_dora=False) from PEFT.")
    found = re.fullmatch(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)",
                         name)
    if found:
      module, part = found.groups()
      lora[module]["A" if "A" in part else "B"] = value
      lora[module]["kind"] = "embed" if "embedding" in part else "lora"
    elif ".original_module." not in name:  # PEFT's copy of a frozen module
      if "." not in name:
        raise ValueError(f"import_peft: {file} holds {key!r}, which names no torch module "
                         "parameter (module.param). Fix: export the adapter again.")
      module, param = name.rsplit(".", 1)
      module = re.sub(r"\.(base_layer|modules_to_save)$", "", module)
      extras[module][param] = value
  return dict(lora), dict(extras)


def _rank_and_alpha(cfg: dict[str, Any], module: str) -> tuple[int, float]:
  ranks, alphas = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
  rank = ranks.get(_pattern_key(ranks, module), cfg.get("r", 8))
  return rank, alphas.get(_pattern_key(alphas, module), cfg.get("lora_alpha", 8))


def _gather(torch_modules, reverse, what: str) -> dict[str, dict[tuple[int, ...], str]]:
  """{flax module path: {layer index: torch module}} for the file's torch modules."""
  out = collections.defaultdict(dict)
  for name in torch_modules:
    if name not in reverse:
      raise ValueError(
          f"import_peft: the file has {what} for torch module {name!r}, but name_map maps no "
          f"leaf of params to it; torch names it does give: {_tree.close_paths(reverse, name)}. "
          "Fix: add a rule (flax_regex, torch_template) for it."
      )
    module, idx = reverse[name]
    out[module][idx] = name
  return dict(out)


def _leaf_for(module: str, flat, leaves, torch_name: str) -> str:
  for leaf in leaves:
    if f"{module}/{leaf}" in flat:
      return f"{module}/{leaf}"
  raise ValueError(f"import_peft: torch module {torch_name!r} maps to {module!r}, which has no "
                   f"{' or '.join(leaves)} leaf in params.")


def _stack(parts: dict[tuple[int, ...], np.ndarray], n_stacked: tuple[int, ...]) -> np.ndarray:
  return np.stack([parts[idx] for idx in np.ndindex(*n_stacked)]).reshape(
      *n_stacked, *next(iter(parts.values())).shape)


def _check_layers(path, layers: dict, stacked: tuple[int, ...], what: str):
  missing = [idx for idx in np.ndindex(*stacked) if idx not in layers]
  if missing:
    raise ValueError(f"import_peft: {path!r} is a stack of {stacked} layers, but the file has "
                     f"no {what} for layer(s) {missing[:4]}. Fix: check name_map's '{{}}'.")


def import_peft(path: str | os.PathLike, params: Params, name_map: NameMap = None,
                model: Any = None, *example_args: Any, validate: bool = True,
                **example_kwargs: Any) -> tuple[Adapter, LoraConfig]:
  """Reads a Hugging Face PEFT LoRA folder into a jlora adapter for `params`.

  Each torch module with LoRA weights is mapped to its Flax leaf through `name_map` (applied to
  every leaf of `params`); axis roles come from `model` as in `jlora.init` (2-D kernels and
  embeddings need none). Rank and α per module follow the config as PEFT does (`rank_pattern`
  and `alpha_pattern` keys match with ``(.*\\.)?(key)$``; rsLoRA scales by α/√r), and the
  returned `LoraConfig` states them per path. ``modules_to_save`` and LoRA-module biases
  become the adapter's extras. Everything is checked before the adapter is built (JSON
  types, tensor dtypes and shapes), and by default every value is checked to be finite.

  Args:
    path: the folder holding adapter_config.json and adapter_model.safetensors.
    params: the tree the adapter is for (arrays or `jax.ShapeDtypeStruct`), with the weights
      of the torch base model.
    name_map: Flax module path -> torch module name (see the module docstring).
    model: optionally `model.apply` (or an NNX module), for kernels with more than two axes.
    *example_args: example inputs of `model`, as for `jlora.init`.
    validate: check that every value read is finite (`jlora.validate.check_finite`, one
      reduction per tensor); True by default. Pass False only to load a file known to hold
      NaN or inf on purpose, e.g. to inspect a diverged run.
    **example_kwargs: example keyword inputs of `model`.

  Returns:
    ``(adapter, config)``: the `Adapter` (float32) and a `LoraConfig` that reproduces its
    targets, ranks and scales.

  Raises:
    FileNotFoundError: if a file is missing.
    ValueError: naming the file, for a config that is not valid JSON, not a JSON object or
      has fields of the wrong type (``r`` not an integer >= 1, ``lora_alpha`` not a number
      > 0, an invalid regex in ``rank_pattern``/``alpha_pattern``); for weights that are not
      a readable safetensors file (truncated, garbage, a link to another file) or hold NaN or
      inf (unless ``validate=False``); for a non-LoRA or unsupported adapter (DoRA, LoftQ,
      ...), a torch module with no Flax leaf, a missing tensor or a tensor of the wrong shape.

  Warns:
    UserWarning: for config keys that PEFT 0.21 does not have (they are ignored).

  Example:
    >>> import tempfile, jax, jax.numpy as jnp, jlora
    >>> params = {"params": {"fc": {"kernel": jnp.ones((16, 8))}}}
    >>> config = jlora.LoraConfig(rank=4, alpha=8.0, targets=".*/kernel", use_rslora=True)
    >>> adapter = jlora.init(jax.random.key(0), params, config)
    >>> folder = tempfile.mkdtemp()
    >>> jlora.export_peft(folder, adapter, config=config)
    >>> back, back_config = jlora.import_peft(folder, params)
    >>> back.lora["params/fc/kernel"].scale, back_config.use_rslora
    (4.0, True)
    >>> bool((back.lora["params/fc/kernel"].a == adapter.lora["params/fc/kernel"].a).all())
    True
  """
  cfg = _read_config(path)
  lora_tensors, extra_tensors = _read_tensors(path)
  flat = _tree.flatten(params)
  reverse = _reverse_map(_namer(name_map), flat)
  for name, parts in lora_tensors.items():
    for part in ("A", "B"):
      if part not in parts:
        prefix = "lora_embedding_" if parts["kind"] == "embed" else "lora_"
        raise ValueError(f"import_peft: torch module {name!r} has no {prefix}{part} tensor in "
                         f"{WEIGHTS_FILE}; the file is incomplete.")
  targets = {}  # {flax kernel path: {layer index: torch module}}
  for module, layers in _gather(lora_tensors, reverse, "LoRA weights").items():
    first = next(iter(layers.values()))
    leaves = ("embedding",) if lora_tensors[first]["kind"] == "embed" else ("kernel",)
    targets[_leaf_for(module, flat, leaves, first)] = layers
  extras = {}  # {flax leaf path: {layer index: array or None}}
  for module, layers in _gather(extra_tensors, reverse, "trained weights").items():
    first = next(iter(layers.values()))
    for param in sorted({p for name in layers.values() for p in extra_tensors[name]}):
      leaves = ("bias",) if param == "bias" else _WEIGHT_LEAVES
      extras[_leaf_for(module, flat, leaves, first)] = {
          idx: extra_tensors[name].get(param) for idx, name in layers.items()}
  config = _jlora_config(cfg, targets, sorted(extras))
  # init makes the factors' shapes, scales and roles; the extras come from the file alone.
  no_extras = dataclasses.replace(config, trainable=())
  adapter = init(jax.random.key(0), params, no_extras, model, *example_args, **example_kwargs)
  lora = {p: _fill(p, f, targets[p], lora_tensors) for p, f in adapter.lora.items()}
  filled = {p: _fill_extra(p, flat[p], layers) for p, layers in extras.items()}
  adapter = Adapter(lora=lora, extras=filled)
  if validate:
    check_finite(adapter, where=os.path.join(path, WEIGHTS_FILE), fix=(
        "retrain or re-export the adapter from a step before it diverged, or pass "
        "validate=False to load it anyway."))
  return adapter, config


def _jlora_config(cfg: dict[str, Any], targets: dict[str, dict], extras: list[str]) -> LoraConfig:
  """A `LoraConfig` with PEFT's r and α as defaults and every other value stated per path."""
  if not targets:
    raise ValueError(f"import_peft: {WEIGHTS_FILE} holds no LoRA weights (lora_A/lora_B or "
                     "lora_embedding_A/B).")
  r, alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)
  ranks, alphas = {}, {}
  for path, layers in targets.items():
    per_layer = {_rank_and_alpha(cfg, name) for name in layers.values()}
    if len(per_layer) > 1:
      raise ValueError(f"import_peft: {path!r} is one stacked kernel, but its torch modules "
                       f"have different (rank, alpha) pairs: {sorted(per_layer)}.")
    ranks[path], alphas[path] = per_layer.pop()
  return LoraConfig(
      rank=r, alpha=alpha, targets=tuple(re.escape(p) for p in sorted(targets)),
      rank_pattern={re.escape(p): v for p, v in ranks.items() if v != r},
      alpha_pattern={re.escape(p): v for p, v in alphas.items() if v != alpha},
      use_rslora=bool(cfg.get("use_rslora", False)), dropout=float(cfg.get("lora_dropout", 0.0)),
      trainable=tuple(re.escape(p) for p in extras),
  )


def _fill(path: str, f: LoraFactors, layers: dict, tensors: dict) -> LoraFactors:
  stacked = tuple(f.kernel_shape[i] for i in f.roles.stacked)
  if len(next(iter(layers))) != len(stacked):
    raise ValueError(f"import_peft: {path!r} has {len(stacked)} stacked axes, but name_map's "
                     f"name for it has {len(next(iter(layers)))} '{{}}' placeholders.")
  _check_layers(path, layers, stacked, "LoRA weights")
  layer_shape = tuple(d for i, d in enumerate(f.kernel_shape) if i not in f.roles.stacked)
  a_parts, b_parts = {}, {}
  for idx, name in layers.items():
    t = tensors[name]
    if (t["kind"] == "embed") != (f.roles.kind == "embed"):
      found = "lora_embedding_A/B" if t["kind"] == "embed" else "lora_A/B"
      raise ValueError(f"import_peft: torch module {name!r} has {found} weights, but {path!r} "
                       f"is a {f.roles.kind} kernel. Fix: check name_map.")
    want = _torch_shapes(f.roles.kind, f.rank, f.a.shape[-1], f.b.shape[-1], layer_shape)
    for part, got, shape in (("A", t["A"], want[0]), ("B", t["B"], want[1])):
      if tuple(got.shape) != shape:
        raise ValueError(
            f"import_peft: torch module {name!r} has lora_{part} of shape {tuple(got.shape)}, "
            f"but {path!r} (kernel {f.kernel_shape}, rank {f.rank}) needs {shape}. Fix: check "
            "name_map and that params are the weights of the model the adapter was made for."
        )
    a_parts[idx], b_parts[idx] = _from_torch(f.roles.kind, t["A"], t["B"])
  a, b = _stack(a_parts, stacked), _stack(b_parts, stacked)
  return dataclasses.replace(f, a=jnp.asarray(a, f.a.dtype), b=jnp.asarray(b, f.b.dtype))


def _fill_extra(path: str, leaf, layers: dict) -> jax.Array:
  n = len(next(iter(layers)))
  stacked = tuple(leaf.shape[:n])
  _check_layers(path, {k: v for k, v in layers.items() if v is not None}, stacked, "weights")
  parts = {}
  for idx, value in layers.items():
    want, name = tuple(leaf.shape[n:]), _split(path)[1]
    flax_value = value.T if name == "kernel" and value.ndim == 2 else value
    if name == "bias" and flax_value.size == math.prod(want):
      flax_value = flax_value.reshape(want)  # torch flattens a multi-axis bias
    if tuple(flax_value.shape) != want:
      raise ValueError(f"import_peft: the torch weight for {path!r} (layer {idx}) has shape "
                       f"{tuple(value.shape)}; the params need {want} in Flax's layout.")
    parts[idx] = flax_value
  return jnp.asarray(_stack(parts, stacked), jnp.float32)
