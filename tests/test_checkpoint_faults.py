"""Faults around jlora/checkpoint.py: each loses nothing and fails loud, with a jlora error.

Relative paths, failed background writes, ranking metrics that are NaN or missing, two writers,
half-deleted and unfinished steps, bit rot, NaN factors, every file of a step truncated, flipped
or deleted, another optimizer, a read-only directory, a full disk, NumPy/JAX step numbers, and
a kill -9 loop. Process and disk faults run in tests/_ckpt_faults_worker.py.
"""

import errno
import json
import os
import random
import shutil
import subprocess
import sys
import time
import warnings

import _ckpt_faults_worker as worker
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import jlora
from jlora import checkpoint

WORKER = os.path.join(os.path.dirname(__file__), "_ckpt_faults_worker.py")
CheckpointError = checkpoint.CheckpointError


def _worker(mode, directory, **kwargs):
  return subprocess.Popen([sys.executable, WORKER, mode, str(directory)], text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          cwd=os.path.dirname(WORKER), **kwargs)


def _run(mode, directory, timeout=120):
  proc = _worker(mode, directory)
  out, err = proc.communicate(timeout=timeout)
  return proc.returncode, out, err


def _assert_exact(x, y):
  assert jax.tree.structure(x) == jax.tree.structure(y)
  for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
    assert u.dtype == v.dtype
    np.testing.assert_array_equal(u, v)


def _steps_on_disk(directory):
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def _leftovers(directory):
  return [n for n in os.listdir(directory) if ".orbax-checkpoint-tmp" in n or n == ".jlora-deleted"]


# 1. Relative paths; a failed background write surfaces.


def test_relative_paths_are_made_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with checkpoint.checkpoint_manager("runs/ckpt") as manager:
    assert checkpoint.save(manager, 1, worker.adapter(1))
  assert checkpoint.save("runs/plain", 2, worker.adapter(2))
  assert _steps_on_disk(tmp_path / "runs/ckpt") == [1] and not _leftovers(tmp_path / "runs/ckpt")
  _assert_exact(checkpoint.restore("runs/ckpt").adapter, worker.adapter(1))
  _assert_exact(checkpoint.restore("runs/plain").adapter, worker.adapter(2))



def test_urls_are_refused_with_a_fix():
  for call in (lambda: checkpoint.checkpoint_manager("gs://bucket/run"),
               lambda: checkpoint.save("gs://bucket/run", 1, worker.adapter(1)),
               lambda: checkpoint.restore("gs://bucket/run")):
    with pytest.raises(ValueError, match=r"'gs://bucket/run' is a URL; .*Fix: use a local or "):
      call()
  assert not os.path.exists("gs:")

class _FailingFuture:
  def result(self, timeout=None):
    raise OSError(errno.ENOSPC, "No space left on device (injected by the test)")


class _Fail:
  """Switch for `failing_writes`: when on, the adapter's commit fails, as on a full disk."""

  on = False


@pytest.fixture
def failing_writes(monkeypatch):
  handlers = checkpoint._handlers

  def patched():
    out = handlers()
    handler = out["adapter"]
    async_save = handler.async_save

    async def failing_save(*args, **kwargs):
      futures = await async_save(*args, **kwargs)
      return [*(futures or []), _FailingFuture()] if _Fail.on else futures

    handler.async_save = failing_save
    return out

  monkeypatch.setattr(checkpoint, "_handlers", patched)
  _Fail.on = False
  yield _Fail
  _Fail.on = False


def test_failed_background_write_raises_and_keeps_the_previous_step(tmp_path, failing_writes):
  manager = checkpoint.checkpoint_manager(tmp_path, max_to_keep=1)
  assert checkpoint.save(manager, 1, worker.adapter(1))
  manager.wait_until_finished()
  failing_writes.on = True
  checkpoint.save(manager, 2, worker.adapter(2))  # accepted; written in the background
  with pytest.raises(CheckpointError, match=r"step\(s\) \[2\] were not written to .*No space"):
    checkpoint.save(manager, 3, worker.adapter(3))  # the next save raises
  assert manager.all_steps() == [1]  # not listed, and max_to_keep=1 did not drop step 1
  checkpoint.save(manager, 4, worker.adapter(4))
  with pytest.raises(CheckpointError, match=r"step\(s\) \[4\] were not written"):
    manager.close()  # closing raises too
  assert _steps_on_disk(tmp_path) == [1] and not _leftovers(tmp_path)
  with pytest.raises(CheckpointError, match=r"step\(s\) \[5\] were not written"):
    checkpoint.save(tmp_path, 5, worker.adapter(5))  # a directory: never True for a lost step
  failing_writes.on = False
  _assert_exact(checkpoint.restore(tmp_path).adapter, worker.adapter(1))
  assert checkpoint.save(tmp_path, 6, worker.adapter(6))  # the lock was released
  assert checkpoint.restore(tmp_path).step == 6



def test_a_manager_made_with_orbax_is_waited_for_and_sealed(tmp_path):
  with ocp.CheckpointManager(tmp_path) as manager:
    assert checkpoint.save(manager, 1, worker.adapter(1))
    assert os.path.isfile(tmp_path / "1" / "jlora_manifest.json")  # on disk before True
  _assert_exact(checkpoint.restore(tmp_path).adapter, worker.adapter(1))

# 2. Ranking by a metric.


def test_nonfinite_metric_ranks_worst_and_warns(tmp_path):
  with checkpoint.checkpoint_manager(tmp_path, max_to_keep=2, best="loss") as manager:
    for step, loss in enumerate([0.1, float("nan"), 0.5, 0.6, 0.7]):
      if np.isfinite(loss):
        checkpoint.save(manager, step, worker.adapter(step), metrics={"loss": loss})
      else:
        with pytest.warns(UserWarning, match=r"metrics\['loss'\] of step 1 is nan; this step "
                          "ranks worst"):
          checkpoint.save(manager, step, worker.adapter(step), metrics={"loss": loss})
    manager.wait_until_finished()
    assert manager.all_steps() == [0, 2] and manager.best_step() == 0
  with checkpoint.checkpoint_manager(tmp_path / "max", max_to_keep=2, best="acc",
                                     best_mode="max") as manager:
    for step, acc in enumerate([0.9, float("inf"), 0.5, float("-inf"), 0.7]):
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checkpoint.save(manager, step, worker.adapter(step), metrics={"acc": jnp.float32(acc)})
      assert len(caught) == (0 if np.isfinite(acc) else 1)
    manager.wait_until_finished()
    assert manager.all_steps() == [0, 4]


@pytest.mark.parametrize("metrics, match", [
    ({"acc": 0.3}, r"ranks checkpoints by 'loss', but step 0 got metrics with keys \['acc'\]"),
    (None, r"ranks checkpoints by 'loss', but step 0 got metrics=None"),
    ({"loss": "low"}, r"metrics\['loss'\] of step 0 must be a real number, got 'low'"),
    ({"loss": True}, r"metrics\['loss'\] of step 0 must be a real number, got True"),
    ({"loss": np.ones(2)}, r"metrics\['loss'\] of step 0 must be a real number"),
    ({"loss": 1j}, r"metrics\['loss'\] of step 0 must be a real number, got 1j"),
])
def test_metrics_are_checked_before_anything_is_written(tmp_path, metrics, match):
  with checkpoint.checkpoint_manager(tmp_path, max_to_keep=1, best="loss") as manager:
    with pytest.raises(ValueError, match=match + r".*nothing was saved\. Fix: "):
      checkpoint.save(manager, 0, worker.adapter(0), metrics=metrics)
    assert manager.all_steps() == [] and os.listdir(tmp_path) == [".jlora-writer.lock"]
    assert checkpoint.save(manager, 0, worker.adapter(0), metrics={"loss": 0.25})
  assert checkpoint.restore(tmp_path).metrics == {"loss": 0.25}


# 3. Two writers.


def test_two_processes_cannot_write_one_directory(tmp_path):
  holder = _worker("hold", tmp_path, stdin=subprocess.PIPE)
  try:
    assert holder.stdout.readline().strip() == "ready", holder.stderr.read()[-3000:]
    code, out, err = _run("write", tmp_path)
    assert code != 0 and "saved 2" not in out
    assert "CheckpointError" in err and "is already open for writing by pid" in err, err[-3000:]
    with pytest.raises(CheckpointError, match=r"already open for writing by pid \d+ .*Fix: "):
      checkpoint.checkpoint_manager(tmp_path)  # nor this process
    with pytest.raises(CheckpointError, match=r"already open for writing"):
      checkpoint.save(tmp_path, 3, worker.adapter(3))
    _assert_exact(checkpoint.restore(tmp_path).adapter, worker.adapter(1))  # reading is fine
  finally:
    holder.communicate("\n", timeout=60)
  assert holder.returncode == 0
  code, out, err = _run("write", tmp_path)  # once the first writer is gone, a second may write
  assert code == 0 and "saved 2" in out, err[-3000:]
  assert _steps_on_disk(tmp_path) == [1, 2]
  _assert_exact(checkpoint.restore(tmp_path, 1).adapter, worker.adapter(1))
  _assert_exact(checkpoint.restore(tmp_path, 2).adapter, worker.adapter(2))


# 4. Half-deleted and unfinished steps.


def _three_steps(directory):
  with checkpoint.checkpoint_manager(directory) as manager:
    for step in (1, 2, 3):
      checkpoint.save(manager, step, worker.adapter(step))


def test_incomplete_steps_are_skipped_when_reading_and_removed_when_writing(tmp_path):
  _three_steps(tmp_path)
  shutil.rmtree(tmp_path / "2" / "adapter")  # max_to_keep's rmtree, cut short by a kill
  os.remove(tmp_path / "3" / "jlora_manifest.json")  # killed after orbax's rename, not sealed
  os.makedirs(tmp_path / "4.orbax-checkpoint-tmp" / "adapter")  # killed mid-write
  before = worker.snapshot(tmp_path)
  assert checkpoint.restore(tmp_path).step == 1  # the latest whole step
  with pytest.raises(CheckpointError, match=r"step 2 in .* is incomplete: .*/2/adapter/.* is "
                     r"missing\. Nothing was restored\. Fix: "):
    checkpoint.restore(tmp_path, 2)
  with pytest.raises(CheckpointError, match=r"step 3 .* incomplete: .*jlora_manifest.json is "
                     r"missing \(step never sealed\)"):
    checkpoint.restore(tmp_path, 3)
  assert worker.snapshot(tmp_path) == before  # reading changed nothing
  with pytest.warns(UserWarning) as caught:
    manager = checkpoint.checkpoint_manager(tmp_path)
  assert [str(w.message).split(" in ")[0] for w in caught] == [
      "checkpoint_manager: removed incomplete checkpoint step 2",
      "checkpoint_manager: removed incomplete checkpoint step 3"]
  assert manager.all_steps() == [1] and manager.latest_step() == 1
  assert sorted(os.listdir(tmp_path)) == [".jlora-writer.lock", "1"]
  checkpoint.save(manager, 2, worker.adapter(2))
  manager.close()
  _assert_exact(checkpoint.restore(tmp_path).adapter, worker.adapter(2))


def test_max_to_keep_deletes_whole_steps(tmp_path):
  with checkpoint.checkpoint_manager(tmp_path, max_to_keep=2) as manager:
    for step in range(5):
      checkpoint.save(manager, step, worker.adapter(step))
      manager.wait_until_finished()
      assert not _leftovers(tmp_path)  # dropped steps went in one rename, then were removed
  assert _steps_on_disk(tmp_path) == [3, 4]
  for step in (3, 4):
    _assert_exact(checkpoint.restore(tmp_path, step).adapter, worker.adapter(step))


def test_no_finished_step_names_the_incomplete_ones(tmp_path):
  checkpoint.save(tmp_path, 1, worker.adapter(1))
  os.remove(tmp_path / "1" / "jlora_manifest.json")
  with pytest.raises(FileNotFoundError, match=r"no finished checkpoint in .* \(incomplete: step "
                     r"1: .*jlora_manifest.json is missing"):
    checkpoint.restore(tmp_path)


def test_steps_saved_before_manifests_still_load(tmp_path):
  checkpoint.save(tmp_path, 1, worker.adapter(1))
  os.remove(tmp_path / "1" / "jlora_manifest.json")
  path = tmp_path / "1" / "adapter_metadata" / "metadata"
  path.write_text(path.read_text().replace("jlora.adapter/2", "jlora.adapter/1"))
  _assert_exact(checkpoint.restore(tmp_path).adapter, worker.adapter(1))
  os.remove(tmp_path / "1" / "_CHECKPOINT_METADATA")  # but a missing file is still named
  with pytest.raises(CheckpointError, match=r"step 1 .* incomplete: .*1/_CHECKPOINT_METADATA is "
                     r"missing"):
    checkpoint.restore(tmp_path, 1)


# 5. Bit rot in the metadata; 7. every file of a step truncated, flipped or deleted.


def test_metadata_bit_rot_is_named(tmp_path):
  checkpoint.save(tmp_path, 1, worker.adapter(1), config=worker.CONFIG)
  for name, key in [("adapter_metadata", '"scale": 2.0'), ("config", '"alpha": 8.0')]:
    path = tmp_path / "1" / name / "metadata"
    text = path.read_text()
    assert key in text, text
    path.write_text(text.replace(key, key[:-3] + "3.0"))
    with pytest.raises(CheckpointError, match=rf"step 1 .* is corrupt: .*1/{name}/metadata does "
                       r"not match its saved sha256"):
      checkpoint.restore(tmp_path)
    path.write_text(text)
  assert checkpoint.restore(tmp_path).adapter.lora["fc/kernel"].scale == 2.0


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _flip(path):
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    data[len(data) // 2] ^= 0x01
    f.seek(0)
    f.write(data)


def test_every_file_of_a_step_truncated_flipped_or_deleted_is_named(tmp_path):
  optimizer = optax.adamw(1e-3)
  template = tmp_path / "template"
  adapter = worker.adapter(1)
  checkpoint.save(template, 1, adapter, opt_state=optimizer.init(adapter), config=worker.CONFIG)
  files = sorted(os.path.relpath(os.path.join(root, n), template / "1")
                 for root, _, names in os.walk(template / "1") for n in names)
  assert len(files) > 20 and "jlora_manifest.json" in files
  faults = {"truncated": _truncate, "flipped": _flip, "deleted": os.remove}
  for name in files:
    for fault, apply in faults.items():
      directory = tmp_path / "case"
      shutil.rmtree(directory, ignore_errors=True)
      shutil.copytree(template, directory)
      apply(directory / "1" / name)
      with pytest.raises(CheckpointError) as raised:
        checkpoint.restore(directory, 1, optimizer=optimizer)
      message = str(raised.value)
      assert f"step 1 in {directory}" in message and "Fix: " in message, (name, fault)
      assert os.path.join("1", name) in message, (name, fault, message)


# 6. NaN and inf in restored factors.


def test_restore_rejects_nonfinite_factors_unless_told_not_to(tmp_path):
  adapter = worker.adapter(1)
  bad = jlora.Adapter(lora=jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan),
                                        adapter.lora), extras=adapter.extras)
  checkpoint.save(tmp_path, 1, bad)
  with pytest.raises(ValueError, match=r"lora/fc/kernel/a in checkpoint step 1 in .* has 1 "
                     r"non-finite value\(s\).*Fix: "):
    checkpoint.restore(tmp_path)
  restored = checkpoint.restore(tmp_path, validate=False)
  _assert_exact(restored.adapter, bad)


# 7. Another optimizer; a read-only directory; a full disk; NumPy and JAX step numbers.


def test_restore_into_another_optimizer_is_one_clear_error(tmp_path):
  adapter = worker.adapter(1)
  checkpoint.save(tmp_path, 1, adapter, opt_state=optax.adamw(1e-3).init(adapter))
  for other in (optax.sgd(1e-2), optax.sgd(1e-2, momentum=0.9)):
    with pytest.raises(CheckpointError, match=r"could not read the optimizer state into "
                       r"optimizer.init's structure of checkpoint step 1 in .*Fix: pass the "
                       r"optimizer the run saved with"):
      checkpoint.restore(tmp_path, optimizer=other)
  restored = checkpoint.restore(tmp_path, optimizer=optax.adamw(1e-3))
  _assert_exact(restored.opt_state, optax.adamw(1e-3).init(adapter))


def test_restore_from_a_read_only_directory_writes_nothing(tmp_path):
  _three_steps(tmp_path)
  os.remove(tmp_path / "3" / "jlora_manifest.json")  # an unsealed step, which reading keeps
  os.makedirs(tmp_path / "4.orbax-checkpoint-tmp")  # and a leftover
  code, out, err = _run("readonly", tmp_path)
  assert code == 0, err[-3000:]
  result = json.loads(out.strip().splitlines()[-1])
  assert result == {"step": 2, "explicit": 1, "unchanged": True, "files": result["files"]}
  assert os.path.isdir(tmp_path / "4.orbax-checkpoint-tmp")


def test_full_disk_keeps_the_previous_step(tmp_path):
  disk = tmp_path / "disk"
  disk.mkdir()
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)],
                           capture_output=True, text=True)
  if mounted.returncode != 0:
    pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
  try:
    code, out, err = _run("full", disk / "ckpt")
  finally:
    subprocess.run(["umount", "-l", str(disk)], check=False)
  assert code == 0, err[-3000:]
  result = json.loads(out.strip().splitlines()[-1])
  assert result["save_1"] is True
  assert "step(s) [2] were not written" in result["error_2"]
  assert "No space left on device" in result["error_2"] or "RESOURCE_EXHAUSTED" in result["error_2"]
  assert "save_3" not in result and "step(s) [3] were not written" in result["error_3"]
  assert result["steps_after_2"] == [1]  # max_to_keep=1 had dropped it: it is back
  assert result["listing"] == [".jlora-writer.lock", "1"]  # no partial step left
  assert result["restored_step"] == 1 and result["restored_exact"] is True


def test_steps_as_numpy_or_jax_integers(tmp_path):
  assert checkpoint.save(tmp_path, np.int64(3), worker.adapter(3))
  assert checkpoint.save(tmp_path, jnp.int32(4), worker.adapter(4))
  assert _steps_on_disk(tmp_path) == [3, 4]
  for step in (np.int16(3), jnp.uint8(3), 3):
    restored = checkpoint.restore(tmp_path, step)
    assert restored.step == 3 and type(restored.step) is int
  for bad in (True, np.bool_(True), -1, np.int32(-2), 2.0, np.float32(2), jnp.zeros(2, int), "1"):
    with pytest.raises(ValueError, match=r"step must be an integer >= 0, got .*Fix: pass a "):
      checkpoint.save(tmp_path, bad, worker.adapter(5))
    with pytest.raises(ValueError, match=r"step must be an integer >= 0"):
      checkpoint.restore(tmp_path, bad)
  assert _steps_on_disk(tmp_path) == [3, 4]


# 8. kill -9 at random times during saves.


def test_kill_loop_leaves_only_whole_steps(tmp_path):
  rng = random.Random(0)
  killed_after = []
  for _ in range(10):
    proc = _worker("loop", tmp_path)
    try:
      wanted, seen = rng.randint(1, 2), 0
      while seen < wanted:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()[-3000:]
        seen += line.startswith("saved")
      time.sleep(rng.uniform(0.0, 0.15))  # into the next step's write, or just after
    finally:
      proc.kill()
      proc.communicate(timeout=60)
    killed_after.append((seen, sorted(n for n in os.listdir(tmp_path) if not n.isdigit())))
    latest = checkpoint.restore(tmp_path)  # reading first, leftovers and all
    _assert_exact(latest.adapter, worker.adapter(latest.step, worker.LOOP_EXTRA))
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      manager = checkpoint.checkpoint_manager(tmp_path, max_to_keep=2)
    assert all("removed incomplete checkpoint step" in str(w.message) for w in caught)
    try:
      assert not _leftovers(tmp_path), os.listdir(tmp_path)
      steps = manager.all_steps()
      assert steps and steps == _steps_on_disk(tmp_path)
      for step in steps:
        restored = checkpoint.restore(manager, step).adapter
        _assert_exact(restored, worker.adapter(step, worker.LOOP_EXTRA))
    finally:
      manager.close()
  assert len(killed_after) == 10
  print("kill loop: (steps seen, leftovers) per trial:", killed_after)
