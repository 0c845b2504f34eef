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
is adapter-sized. Orbax writes each step into a temporary directory and renames it only once
complete, so a save killed midway leaves the earlier steps loadable; the next manager opened on
the directory removes the unfinished one. Adapter paths contain "/" and go into orbax as dict
keys unchanged (orbax joins key paths with "." into array names; the keys stay distinct).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp

from jlora.adapter import Adapter, LoraFactors, Params
from jlora.config import LoraConfig
from jlora.merge import check_fits
from jlora.roles import AxisRoles

_FORMAT = "jlora.adapter/1"
_ADAPTER, _METADATA, _OPT_STATE, _CONFIG = "adapter", "adapter_metadata", "opt_state", "config"
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


def checkpoint_manager(directory: str | os.PathLike, *, max_to_keep: int | None = None,
                       best: str | None = None, best_mode: str = "min",
                       **options: Any) -> ocp.CheckpointManager:
  """An `orbax.checkpoint.CheckpointManager` for adapter checkpoints.

  With ``best``, checkpoints are ranked by ``metrics[best]`` (given to `save`) and
  ``max_to_keep`` keeps the best ones, as orbax does, so the latest step may be deleted; keep a
  second manager without ``best`` for resuming after pre-emption.

  Args:
    directory: where the steps go, one subdirectory each; created if missing.
    max_to_keep: how many checkpoints to keep (None: all).
    best: the name of the metric that ranks checkpoints, or None to keep the latest.
    best_mode: ``"min"`` or ``"max"``: whether a smaller or a larger metric is better.
    **options: further `ocp.CheckpointManagerOptions` fields, e.g. ``save_interval_steps``.

  Returns:
    The manager; pass it to `save` and `restore`, and `close()` it when done.

  Raises:
    ValueError: if ``best_mode`` is neither "min" nor "max".

  Example:
    >>> import tempfile, jlora
    >>> manager = jlora.checkpoint_manager(tempfile.mkdtemp(), max_to_keep=2, best="loss")
    >>> manager.all_steps()
    []
    >>> manager.close()
  """
  if best_mode not in ("min", "max"):
    raise ValueError(f"checkpoint_manager: best_mode must be 'min' or 'max', got {best_mode!r}.")
  best_fn = None if best is None else (lambda metrics: metrics[best])
  opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, best_fn=best_fn,
                                      best_mode=best_mode, **options)
  return ocp.CheckpointManager(os.fspath(directory), options=opts, item_handlers=_handlers())


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
  if metadata.get("format") != _FORMAT:
    raise ValueError(
        f"This checkpoint's adapter metadata has format {metadata.get('format')!r}; this jlora "
        f"reads {_FORMAT!r}. Fix: restore it with the jlora version that saved it."
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


def save(target: Source, step: int, adapter: Adapter, *, opt_state: Any = None,
         config: LoraConfig | None = None, metrics: Mapping[str, Any] | None = None) -> bool:
  """Saves the adapter, and optionally the optimizer state and config, as checkpoint `step`.

  Given a manager, the save is asynchronous as orbax makes it: arrays are copied off the
  device before `save` returns and written in the background (call ``wait_until_finished()``
  or ``close()`` on the manager before the process ends). Given a directory, `save` opens a
  manager with orbax's defaults, waits for the write and closes it.

  Args:
    target: a `CheckpointManager` (see `checkpoint_manager`) or a directory.
    step: the training step; the checkpoint's name.
    adapter: the `Adapter` to save.
    opt_state: the optimizer state of the adapter, e.g. ``optimizer.init(adapter)`` trained on.
    config: the `LoraConfig` (regex targets only: it is saved as JSON).
    metrics: ``{name: number}`` for ranking checkpoints (`checkpoint_manager`'s ``best``).

  Returns:
    Whether a checkpoint was written (orbax skips steps its options say not to save).

  Raises:
    TypeError: if `adapter` is not an `Adapter`, or the config's targets are a callable.
    ValueError: if `step` is not a non-negative integer, or already saved in `target`.

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
  if isinstance(step, bool) or not isinstance(step, int) or step < 0:
    raise ValueError(f"save: step must be an integer >= 0, got {step!r}.")
  items = {_ADAPTER: ocp.args.StandardSave(adapter),
           _METADATA: ocp.args.JsonSave(_metadata(adapter))}
  if config is not None:
    items[_CONFIG] = ocp.args.JsonSave(config.to_dict())
  if opt_state is not None:
    items[_OPT_STATE] = ocp.args.StandardSave(opt_state)
  if isinstance(target, ocp.CheckpointManager):
    return _save_new(target, step, items, metrics)
  with ocp.CheckpointManager(os.fspath(target), item_handlers=_handlers()) as manager:
    saved = _save_new(manager, step, items, metrics)
    manager.wait_until_finished()
  return saved


def _save_new(manager: ocp.CheckpointManager, step: int, items, metrics) -> bool:
  if step in manager.all_steps():  # orbax would keep the old one and return False
    raise ValueError(
        f"save: {manager.directory} already has a checkpoint for {step=}; it is left as it is. "
        "Fix: save under a new step, or into a new directory."
    )
  return manager.save(step, args=ocp.args.Composite(**items), metrics=metrics)


def _pick_step(manager: ocp.CheckpointManager, step: int | None) -> int:
  steps = manager.all_steps()
  if not steps:
    raise FileNotFoundError(
        f"restore: no finished checkpoint in {manager.directory}. Fix: check the directory, "
        "or save one with jlora.save."
    )
  if step is None:
    return manager.latest_step()
  if step not in steps:
    raise ValueError(f"restore: no checkpoint for {step=} in {manager.directory}; it has steps "
                     f"{sorted(steps)}.")
  return step


def _saved_items(manager: ocp.CheckpointManager, step: int) -> set[str]:
  return set(manager.item_metadata(step).keys())


def _handlers() -> dict[str, ocp.CheckpointHandler]:
  """Handlers for every item, so orbax can list a step's items without restoring them."""
  return {_ADAPTER: ocp.StandardCheckpointHandler(), _METADATA: ocp.JsonCheckpointHandler(),
          _OPT_STATE: ocp.StandardCheckpointHandler(), _CONFIG: ocp.JsonCheckpointHandler()}


def restore(source: Source, step: int | None = None, *, params: Params | None = None,
            optimizer: Any = None) -> Restored:
  """Restores an adapter checkpoint that `save` wrote, into a fresh process if need be.

  The adapter is rebuilt from the checkpoint's own JSON metadata; with `params`, it is checked
  against them before any array is read. The optimizer state's structure comes from
  ``optimizer.init`` run abstractly (`jax.eval_shape`) on the restored adapter's shapes.

  Args:
    source: a `CheckpointManager` or the directory it manages.
    step: the step to restore; None for the latest (``manager.best_step()`` gives the best).
    params: optionally the tree the adapter is for (as given to `jlora.init`).
    optimizer: optionally the optax `GradientTransformation` whose state was saved.

  Returns:
    A `Restored` (adapter, opt_state, step, config, metrics).

  Raises:
    FileNotFoundError: if there is no finished checkpoint.
    ValueError: if `step` is not there, the adapter does not fit `params` (naming the path and
      both shapes), or `optimizer` is given and no optimizer state was saved.

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
  """
  if isinstance(source, ocp.CheckpointManager):
    return _restore(source, step, params, optimizer)
  if not os.path.isdir(source):
    raise FileNotFoundError(f"restore: {os.fspath(source)!r} is not a directory.")
  options = ocp.CheckpointManagerOptions(create=False)
  with ocp.CheckpointManager(os.fspath(source), options=options,
                             item_handlers=_handlers()) as manager:
    return _restore(manager, step, params, optimizer)


def _restore(manager: ocp.CheckpointManager, step: int | None, params, optimizer) -> Restored:
  step = _pick_step(manager, step)
  saved = _saved_items(manager, step)
  head = manager.restore(step, args=ocp.args.Composite(
      **{_METADATA: ocp.args.JsonRestore()},
      **({_CONFIG: ocp.args.JsonRestore()} if _CONFIG in saved else {})))
  abstract = _abstract_adapter(head[_METADATA])
  if params is not None:
    try:
      check_fits(params, abstract)
    except ValueError as e:
      raise ValueError(f"Checkpoint step {step} in {manager.directory}: {e}") from None
  if optimizer is not None and _OPT_STATE not in saved:
    raise ValueError(f"restore: checkpoint step {step} has no optimizer state. Fix: restore "
                     "without `optimizer` and start a new one with optimizer.init(adapter).")
  items = {_ADAPTER: ocp.args.StandardRestore(abstract)}
  if optimizer is not None:
    items[_OPT_STATE] = ocp.args.StandardRestore(jax.eval_shape(optimizer.init, abstract))
  arrays = manager.restore(step, args=ocp.args.Composite(**items))
  config = LoraConfig.from_dict(head[_CONFIG]) if _CONFIG in saved else None
  opt_state = arrays[_OPT_STATE] if optimizer is not None else None
  return Restored(arrays[_ADAPTER], opt_state, step, config, manager.metrics(step))
