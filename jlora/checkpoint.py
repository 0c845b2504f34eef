"""Adapter checkpoints with orbax: `checkpoint_manager`, `save` and `restore`.

A checkpoint is one step of an `orbax.checkpoint.CheckpointManager` with these items
(`ocp.args.Composite`; no file format of jlora's own):

* ``adapter``: the `Adapter` pytree as it is (`ocp.args.StandardSave`): A, B and the extras;
* ``adapter_metadata``: JSON (`ocp.args.JsonSave`) with each factor's static metadata (scale,
  axis roles, kernel shape, dropout) and the shape and dtype of every array, so that `restore`
  rebuilds the adapter without any Python object of the run that saved it;
* ``opt_state`` (when given): the optimizer state (`ocp.args.StandardSave`);
* ``config`` (when given): `LoraConfig.to_dict` as JSON.

The step is the manager's step number. The frozen base params are never written: a checkpoint
is adapter-sized. Directories are local (or mounted) paths, made absolute before orbax sees
them; URLs and multi-process runs are refused (save with orbax there: docs/multihost.md).

What jlora adds around orbax so that a checkpoint loses nothing and fails loud:

* **One writer per directory.** A manager from `checkpoint_manager` (and `save` given a
  directory) holds a lock file (``.jlora-writer.lock``, `fcntl.flock`) until it is closed; a
  second writer, in this process or another, gets an error at once.
* **Sealed steps.** Orbax writes a step into a temporary folder and renames it once complete;
  jlora then writes ``jlora_manifest.json`` into it: the size and sha256 of every file. `restore`
  checks every file against it, so a truncated, edited or deleted file is named in the error. A
  step without a manifest was not finished and is never restored (steps of jlora's first
  format, ``jlora.adapter/1``, predate manifests: they are only checked for missing files).
* **Atomic deletion.** Steps that ``max_to_keep`` drops are first renamed into
  ``.jlora-deleted`` and removed once the new step is sealed; if the new step fails, they are
  put back.
* **Failed writes surface.** A background write that fails raises from the next `save`, from
  ``wait_until_finished()`` or from ``close()``, and the step is no longer listed.
* **Checked metrics.** With ``best``, `save` refuses metrics that lack it or are not a number
  before anything is written; a NaN or infinite value is warned and ranks worst.
* **Finite on restore.** `restore` raises if a restored factor or extra holds NaN or inf
  (`jlora.check_finite`), unless given ``validate=False``.
* **Cleanup only when writing.** Opening a manager removes orbax's unfinished temporary folders
  and incomplete steps (with a warning); `restore` from a directory never writes to it.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from jlora import _ckpt_files as _files
from jlora._ckpt_files import CheckpointError
from jlora.adapter import Adapter, LoraFactors, Params
from jlora.config import LoraConfig
from jlora.merge import check_fits
from jlora.roles import AxisRoles
from jlora.validate import check_finite

_FORMAT = "jlora.adapter/2"  # /2: every step is sealed with a manifest; /1 steps still load
_READS = (_files.LEGACY_FORMAT, _FORMAT)
_ADAPTER, _METADATA, _OPT_STATE, _CONFIG = "adapter", "adapter_metadata", "opt_state", "config"
_NAMING = ("step_prefix", "step_format_fixed_length", "step_name_format")
Source = str | os.PathLike | ocp.CheckpointManager


class Restored(NamedTuple):
  """What `restore` returns.

  Attributes:
    adapter: the `Adapter`, arrays on the default device.
    opt_state: the optimizer state, or None when no optimizer was given or none was saved.
    step: the checkpoint's step.
    config: the `LoraConfig` saved with it, or None.
    metrics: the metrics saved with it (orbax keeps them when the manager ranks by one), or None.

  Example:
    >>> import tempfile, jax, jax.numpy as jnp, jlora
    >>> params = {"fc": {"kernel": jnp.ones((4, 3))}}
    >>> adapter = jlora.init(jax.random.key(0), params,
    ...                      jlora.LoraConfig(rank=2, alpha=4.0, targets="fc/kernel"))
    >>> directory = tempfile.mkdtemp()
    >>> _ = jlora.save(directory, 1, adapter)
    >>> adapter, opt_state, step, config, metrics = jlora.restore(directory)
    >>> step, opt_state, config
    (1, None, None)
  """

  adapter: Adapter
  opt_state: Any
  step: int
  config: LoraConfig | None
  metrics: Any


def _ranking(best: str, best_mode: str):
  """orbax's best_fn: metrics[best], with anything non-finite or missing ranked worst."""
  worst = math.inf if best_mode == "min" else -math.inf

  def rank(metrics) -> float:
    try:
      value = float(metrics[best])
    except (KeyError, TypeError, ValueError):
      return worst
    return value if math.isfinite(value) else worst

  return rank


def checkpoint_manager(directory: str | os.PathLike, *, max_to_keep: int | None = None,
                       best: str | None = None, best_mode: str = "min",
                       **options: Any) -> ocp.CheckpointManager:
  """An `orbax.checkpoint.CheckpointManager` for adapter checkpoints, the only writer there.

  With ``best``, checkpoints are ranked by ``metrics[best]`` (given to `save`) and
  ``max_to_keep`` keeps the best ones, as orbax does, so the latest step may be deleted; keep a
  second manager without ``best`` for resuming after pre-emption. A NaN or infinite metric
  ranks worst (and `save` warns). The manager holds the directory's writer lock until
  ``close()``; opening it removes orbax's unfinished temporary folders and incomplete steps.

  Args:
    directory: where the steps go, one subdirectory each; created if missing; a relative path
      is taken from the current directory now.
    max_to_keep: how many checkpoints to keep (None: all).
    best: the name of the metric that ranks checkpoints, or None to keep the latest.
    best_mode: ``"min"`` or ``"max"``: whether a smaller or a larger metric is better.
    **options: further `ocp.CheckpointManagerOptions` fields, e.g. ``save_interval_steps``
      (not the step naming ones: jlora names steps by their number).

  Returns:
    The manager; pass it to `save` and `restore`, and `close()` it when done (or use it in a
    ``with`` block).

  Raises:
    ValueError: if ``best_mode`` is neither "min" nor "max", or an option renames steps.
    CheckpointError: (a ValueError) if another manager is writing into ``directory``.

  Example:
    >>> import tempfile, jlora
    >>> manager = jlora.checkpoint_manager(tempfile.mkdtemp(), max_to_keep=2, best="loss")
    >>> manager.all_steps()
    []
    >>> manager.close()
  """
  if best_mode not in ("min", "max"):
    raise ValueError(f"checkpoint_manager: best_mode must be 'min' or 'max', got {best_mode!r}.")
  if renaming := sorted(set(options) & set(_NAMING)):
    raise ValueError(f"checkpoint_manager: option(s) {renaming} rename the step folders, which "
                     "jlora reads by number. Fix: leave them out.")
  options.setdefault("todelete_subdir", _files.TRASH)
  opts = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, best_mode=best_mode,
      best_fn=None if best is None else _ranking(best, best_mode), **options)
  return _files.WriterManager(_writable(directory), opts, _handlers(), best)


def _local(directory: str | os.PathLike, where: str) -> str:
  """`directory` as an absolute local path (orbax needs absolute ones; locks need a local one)."""
  path = os.fspath(directory)
  if "://" in path:
    raise ValueError(f"{where}: {path!r} is a URL; jlora's checkpoints lock and checksum files "
                     "with the operating system. Fix: use a local or mounted directory, or orbax "
                     "directly (docs/multihost.md).")
  return os.path.abspath(path)


def _writable(directory: str | os.PathLike) -> str:
  if jax.process_count() > 1:
    raise ValueError("checkpoint_manager: jlora's checkpoints have one writer, but this run has "
                     f"{jax.process_count()} processes. Fix: save with orbax on every host, as "
                     "docs/multihost.md shows.")
  return _local(directory, "checkpoint_manager")


def _roles_json(roles: AxisRoles) -> dict[str, Any]:
  return {"kind": roles.kind, "contracting": list(roles.contracting),
          "features": list(roles.features), "stacked": list(roles.stacked)}


def _array_json(x) -> dict[str, Any]:
  return {"shape": list(x.shape), "dtype": jax.numpy.dtype(x.dtype).name}


def _metadata(adapter: Adapter) -> dict[str, Any]:
  """The JSON-ready description of `adapter` that `restore` rebuilds it from (no arrays)."""
  lora = {path: {"scale": f.scale, "roles": _roles_json(f.roles),
                 "kernel_shape": list(f.kernel_shape), "dropout": f.dropout,
                 "a": _array_json(f.a), "b": _array_json(f.b)}
          for path, f in adapter.lora.items()}
  extras = {path: _array_json(x) for path, x in adapter.extras.items()}
  return {"format": _FORMAT, "lora": lora, "extras": extras}


def _abstract(spec: Mapping[str, Any]) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(spec["shape"]), jax.numpy.dtype(spec["dtype"]))


def _abstract_adapter(metadata: Mapping[str, Any]) -> Adapter:
  """The adapter that `_metadata` describes, with `jax.ShapeDtypeStruct` leaves."""
  if metadata.get("format") not in _READS:
    raise ValueError(
        f"This checkpoint's adapter metadata has format {metadata.get('format')!r}; this jlora "
        f"reads {' and '.join(map(repr, _READS))}. Fix: restore it with the jlora version that "
        "saved it."
    )
  lora = {}
  for path, f in metadata["lora"].items():
    r = f["roles"]
    roles = AxisRoles(r["kind"], tuple(r["contracting"]), tuple(r["features"]),
                      tuple(r["stacked"]))
    lora[path] = LoraFactors(a=_abstract(f["a"]), b=_abstract(f["b"]), scale=float(f["scale"]),
                             roles=roles, kernel_shape=tuple(f["kernel_shape"]),
                             dropout=float(f["dropout"]))
  extras = {path: _abstract(spec) for path, spec in metadata["extras"].items()}
  return Adapter(lora=lora, extras=extras)


def _handlers() -> dict[str, ocp.CheckpointHandler]:
  """Handlers for every item, so orbax can list a step's items without restoring them."""
  return {_ADAPTER: ocp.StandardCheckpointHandler(), _METADATA: ocp.JsonCheckpointHandler(),
          _OPT_STATE: ocp.StandardCheckpointHandler(), _CONFIG: ocp.JsonCheckpointHandler()}


def _check_step(step: Any, where: str) -> int:
  """`step` as an int: a Python, NumPy or JAX integer >= 0 (not a bool, not a float)."""
  dtype = getattr(step, "dtype", None)
  ok = not isinstance(step, bool) and (
      isinstance(step, int) or (dtype is not None and np.ndim(step) == 0
                                and np.issubdtype(dtype, np.integer)))
  if ok and int(step) >= 0:
    return int(step)
  raise ValueError(f"{where}: step must be an integer >= 0, got {step!r} "
                   f"({type(step).__name__}). Fix: pass a Python, NumPy or JAX integer.")


def _check_metrics(manager: ocp.CheckpointManager, step: int, metrics: Any) -> Any:
  """The metrics to give orbax; raises before anything is written if the ranking cannot use them."""
  best = getattr(manager, "ranked_by", None)  # jlora's managers know it; orbax's do not say
  if best is None:
    return metrics
  if not isinstance(metrics, Mapping) or best not in metrics:
    got = (f"metrics with keys {sorted(metrics)}" if isinstance(metrics, Mapping)
           else f"metrics={metrics!r}")
    raise ValueError(f"save: the manager of {manager.directory} ranks checkpoints by {best!r}, "
                     f"but step {step} got {got}; nothing was saved. Fix: pass "
                     f"metrics={{{best!r}: value}}, or use a manager without `best`.")
  value = metrics[best]
  kind = np.asarray(value).dtype
  if isinstance(value, bool | np.bool_) or np.ndim(value) != 0 or not (
      np.issubdtype(kind, np.integer) or np.issubdtype(kind, np.floating)):
    raise ValueError(f"save: metrics[{best!r}] of step {step} must be a real number, got "
                     f"{value!r}; nothing was saved. Fix: pass a float, e.g. float(loss).")
  value = float(value)
  if not math.isfinite(value):
    warnings.warn(f"save: metrics[{best!r}] of step {step} is {value}; this step ranks worst "
                  "and max_to_keep drops it first.", UserWarning, stacklevel=3)
  return {**metrics, best: value}


def save(target: Source, step: int, adapter: Adapter, *, opt_state: Any = None,
         config: LoraConfig | None = None, metrics: Mapping[str, Any] | None = None) -> bool:
  """Saves the adapter, and optionally the optimizer state and config, as checkpoint `step`.

  Given a manager from `checkpoint_manager`, the save is asynchronous as orbax makes it: arrays
  are copied off the device before `save` returns and written in the background; a write that
  fails raises from the next `save`, ``wait_until_finished()`` or ``close()`` (call one before
  the process ends). Given a directory (or a manager made with orbax directly), `save` waits
  for the write, checks that the step is on disk and only then returns True.

  Args:
    target: a `CheckpointManager` (see `checkpoint_manager`) or a directory.
    step: the training step (a Python, NumPy or JAX integer >= 0); the checkpoint's name.
    adapter: the `Adapter` to save.
    opt_state: the optimizer state of the adapter, e.g. ``optimizer.init(adapter)`` trained on.
    config: the `LoraConfig` (regex targets only: it is saved as JSON).
    metrics: ``{name: number}`` for ranking checkpoints (`checkpoint_manager`'s ``best``);
      required, with that name, when the manager ranks by one.

  Returns:
    Whether a checkpoint was written (orbax skips steps its options say not to save).

  Raises:
    TypeError: if `adapter` is not an `Adapter`, or the config's targets are a callable.
    ValueError: if `step` is not a non-negative integer or already saved in `target`, or the
      manager ranks by a metric that `metrics` lacks or that is not a number. Nothing is written.
    CheckpointError: (a ValueError) if this step or the previous one could not be written, or
      another manager is writing into the directory.

  Example:
    >>> import tempfile, jax, jax.numpy as jnp, jlora
    >>> params = {"fc": {"kernel": jnp.ones((4, 3))}}
    >>> config = jlora.LoraConfig(rank=2, alpha=4.0, targets="fc/kernel")
    >>> adapter = jlora.init(jax.random.key(0), params, config)
    >>> directory = tempfile.mkdtemp()
    >>> jlora.save(directory, 10, adapter, config=config)
    True
    >>> restored = jlora.restore(directory, params=params)
    >>> restored.step, restored.config == config, restored.adapter.lora["fc/kernel"].a.shape
    (10, True, (2, 4))
  """
  if not isinstance(adapter, Adapter):
    raise TypeError(f"save: expected a jlora.Adapter, got {type(adapter).__name__}.")
  step = _check_step(step, "save")
  items = {_ADAPTER: ocp.args.StandardSave(adapter),
           _METADATA: ocp.args.JsonSave(_metadata(adapter))}
  if config is not None:
    items[_CONFIG] = ocp.args.JsonSave(config.to_dict())
  if opt_state is not None:
    items[_OPT_STATE] = ocp.args.StandardSave(opt_state)
  if isinstance(target, _files.WriterManager):
    return _save_new(target, step, items, metrics)
  if isinstance(target, ocp.CheckpointManager):  # not ours: wait, check, seal here
    return _save_and_seal(target, step, items, metrics)
  options = ocp.CheckpointManagerOptions(todelete_subdir=_files.TRASH)
  with _files.WriterManager(_writable(target), options,
                            _handlers()) as manager:
    saved = _save_new(manager, step, items, metrics)
    manager.wait_until_finished()
  return saved


def _save_new(manager: ocp.CheckpointManager, step: int, items, metrics) -> bool:
  metrics = _check_metrics(manager, step, metrics)
  manager.wait_until_finished()  # the previous write's error, if any, surfaces here
  if step in manager.all_steps():  # orbax would keep the old one and return False
    raise ValueError(
        f"save: {manager.directory} already has a checkpoint for {step=}; it is left as it is. "
        "Fix: save under a new step, or into a new directory."
    )
  return manager.save(step, args=ocp.args.Composite(**items), metrics=metrics)


def _save_and_seal(manager: ocp.CheckpointManager, step: int, items, metrics) -> bool:
  saved = _save_new(manager, step, items, metrics)
  manager.wait_until_finished()
  path = os.path.join(os.fspath(manager.directory), str(step))
  if saved and not os.path.isdir(path):
    manager.reload()
    raise CheckpointError(f"save: checkpoint step {step} was not written to "
                          f"{manager.directory} (orbax's log has the cause). Fix: use "
                          "jlora.checkpoint_manager, which reports it, and save again.")
  if saved:
    _files.seal(path)
  return saved


def _pick_step(directory: str, step: int | None) -> int:
  """The step to read: `step` if whole, else the latest whole one; raises naming what is wrong."""
  on_disk = _files.step_dirs(directory)
  if step is not None:
    if step not in on_disk:
      raise ValueError(f"restore: no checkpoint for {step=} in {directory}; it has steps "
                       f"{sorted(on_disk)}.")
    _raise_if_damaged(directory, step, _files.problem(on_disk[step]))
    return step
  skipped = []
  for candidate in sorted(on_disk, reverse=True):
    found = _files.problem(on_disk[candidate])
    if found is None:
      return candidate
    if found[0] == "corrupt":
      _raise_if_damaged(directory, candidate, found)
    skipped.append(f"step {candidate}: {found[1]}")
  raise FileNotFoundError(
      f"restore: no finished checkpoint in {directory}"
      + (f" (incomplete: {'; '.join(skipped)})" if skipped else "")
      + ". Fix: check the directory, or save one with jlora.save."
  )


def _raise_if_damaged(directory: str, step: int, found: tuple[str, str] | None) -> None:
  if found is not None:
    kind, what = found
    raise CheckpointError(
        f"restore: checkpoint step {step} in {directory} is {kind}: {what}. Nothing was "
        "restored. Fix: restore another step (restore(directory, step=...))"
        + (", or open a jlora.checkpoint_manager on it to remove it." if kind == "incomplete"
           else ", or copy the step again from a backup.")
    )


def restore(source: Source, step: int | None = None, *, params: Params | None = None,
            optimizer: Any = None, validate: bool = True) -> Restored:
  """Restores an adapter checkpoint that `save` wrote, into a fresh process if need be.

  Every file of the step is first checked against the step's manifest (size and sha256), so a
  truncated, edited or missing file is named instead of read. The adapter is rebuilt from the
  checkpoint's own JSON metadata; with `params`, it is checked against them before any array is
  read. The optimizer state's structure comes from ``optimizer.init`` run abstractly
  (`jax.eval_shape`) on the restored adapter's shapes. Then, unless ``validate=False``, the
  restored adapter is checked for NaN and inf (`jlora.check_finite`). Given a directory,
  `restore` only reads: it works on a read-only directory and never cleans up.

  Args:
    source: a `CheckpointManager` or the directory it manages.
    step: the step to restore; None for the latest finished one (``manager.best_step()`` gives
      the best).
    params: optionally the tree the adapter is for (as given to `jlora.init`).
    optimizer: optionally the optax `GradientTransformation` whose state was saved.
    validate: whether to raise if a restored factor or extra holds a NaN or an inf.

  Returns:
    A `Restored` (adapter, opt_state, step, config, metrics).

  Raises:
    FileNotFoundError: if there is no finished checkpoint.
    ValueError: if `step` is not there or not an integer >= 0, the adapter does not fit
      `params` (naming the path and both shapes), `optimizer` is given and no optimizer state
      was saved or its state has another structure, or the adapter holds NaN or inf.
    CheckpointError: (a ValueError) if a file of the step is missing or corrupt (naming it).

  Example:
    >>> import tempfile, jax, jax.numpy as jnp, optax, jlora
    >>> params = {"fc": {"kernel": jnp.ones((4, 3))}}
    >>> config = jlora.LoraConfig(rank=2, alpha=4.0, targets="fc/kernel")
    >>> adapter = jlora.init(jax.random.key(0), params, config)
    >>> optimizer = optax.adam(1e-3)
    >>> directory = tempfile.mkdtemp()
    >>> _ = jlora.save(directory, 3, adapter, opt_state=optimizer.init(adapter))
    >>> restored = jlora.restore(directory, optimizer=optimizer)
    >>> restored.opt_state[0].mu.lora["fc/kernel"].b.shape
    (2, 3)
    >>> bad = {"fc": {"kernel": jnp.ones((5, 3))}}
    >>> jlora.restore(directory, params=bad)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: Checkpoint step 3 in ...'fc/kernel' was made for shape (4, 3), but ...(5, 3)...
    >>> _ = jlora.save(directory, 4, jax.tree.map(lambda x: x * jnp.nan, adapter))
    >>> jlora.restore(directory, validate=False).step  # with validate=True: a ValueError
    4
  """
  if step is not None:
    step = _check_step(step, "restore")
  if isinstance(source, ocp.CheckpointManager):
    source.wait_until_finished()  # a step still being written is not read half-way
    step = _pick_step(os.fspath(source.directory), step)
    return _restore(source, step, params, optimizer, validate)
  directory = _local(source, "restore")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"restore: {os.fspath(source)!r} is not a directory. Fix: pass the "
                            "directory given to jlora.save or jlora.checkpoint_manager.")
  step = _pick_step(directory, step)  # before orbax opens it: it would list incomplete steps
  options = ocp.CheckpointManagerOptions(read_only=True, create=False)
  with ocp.CheckpointManager(directory, options=options, item_handlers=_handlers()) as manager:
    return _restore(manager, step, params, optimizer, validate)


def _read(manager: ocp.CheckpointManager, step: int, what: str, fix: str, **items) -> Any:
  try:
    return manager.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:  # orbax/tensorstore internals: one jlora error naming the step
    raise CheckpointError(f"restore: could not read {what} of checkpoint step {step} in "
                          f"{manager.directory}: {type(e).__name__}: {_files.first_line(e)} "
                          f"Fix: {fix}") from e


def _restore(manager: ocp.CheckpointManager, step: int, params, optimizer,
             validate: bool) -> Restored:
  """Reads step `step`, which `_pick_step` has checked, through `manager`."""
  directory = os.fspath(manager.directory)
  saved = set(os.listdir(os.path.join(directory, str(step))))
  damaged = "restore another step, or copy this one again from a backup."
  head = _read(manager, step, "the adapter metadata", damaged,
               **{_METADATA: ocp.args.JsonRestore()},
               **({_CONFIG: ocp.args.JsonRestore()} if _CONFIG in saved else {}))
  abstract = _abstract_adapter(head[_METADATA])
  if params is not None:
    try:
      check_fits(params, abstract)
    except ValueError as e:
      raise ValueError(f"Checkpoint step {step} in {manager.directory}: {e}") from None
  if optimizer is not None and _OPT_STATE not in saved:
    raise ValueError(f"restore: checkpoint step {step} has no optimizer state. Fix: restore "
                     "without `optimizer` and start a new one with optimizer.init(adapter).")
  adapter = _read(manager, step, "the adapter", damaged,
                  **{_ADAPTER: ocp.args.StandardRestore(abstract)})[_ADAPTER]
  opt_state = None
  if optimizer is not None:
    target = jax.eval_shape(optimizer.init, abstract)
    opt_state = _read(manager, step, "the optimizer state into optimizer.init's structure",
                      "pass the optimizer the run saved with (the same optax chain), or "
                      "restore without `optimizer`.",
                      **{_OPT_STATE: ocp.args.StandardRestore(target)})[_OPT_STATE]
  if validate:
    check_finite(adapter, where=f"checkpoint step {step} in {directory}")
  config = LoraConfig.from_dict(head[_CONFIG]) if _CONFIG in saved else None
  return Restored(adapter, opt_state, step, config, manager.metrics(step))
