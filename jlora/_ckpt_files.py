"""The files around jlora's orbax checkpoints: writer lock, cleanup, per-step checksums.

Private to `jlora.checkpoint`. `WriterManager` is the orbax `CheckpointManager` that
`checkpoint_manager` returns; the rest works on the directory alone:

* a writer lock (``.jlora-writer.lock``, `fcntl.flock`, held for a manager's lifetime), so a
  second process writing into the same directory fails at once instead of losing both runs;
* a sealed step: once orbax has renamed a step into place, jlora writes ``jlora_manifest.json``
  into it with the size and sha256 of every file, and the manifest's own sha256. A step of the
  current format without a manifest is incomplete (the process died before it was sealed);
* errors that orbax logs and drops in its background thread, raised from the next save,
  ``wait_until_finished()`` or ``close()``;
* cleanup when a manager opens for writing: orbax's temporary folders, the folder that steps
  deleted by ``max_to_keep`` are renamed into (so a deletion is one atomic rename), and
  incomplete steps.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import hashlib
import json
import os
import shutil
import warnings
import weakref

import orbax.checkpoint as ocp

LOCK = ".jlora-writer.lock"
TRASH = ".jlora-deleted"
MANIFEST = "jlora_manifest.json"
METADATA_FILE = os.path.join("adapter_metadata", "metadata")
TMP_MARK = ".orbax-checkpoint-tmp"
LEGACY_FORMAT = "jlora.adapter/1"  # saved before manifests: checked for missing files only
LEGACY_REQUIRED = ("_CHECKPOINT_METADATA", METADATA_FILE, os.path.join("adapter", "_METADATA"))
_CHUNK = 1 << 20


class CheckpointError(ValueError):
  """A checkpoint step on disk is incomplete or corrupt, or its directory is in use.

  Example:
    >>> import tempfile, jlora
    >>> directory = tempfile.mkdtemp()
    >>> with jlora.checkpoint_manager(directory) as manager:
    ...   try:
    ...     jlora.checkpoint_manager(directory)  # a second writer of the same directory
    ...   except jlora.CheckpointError as e:
    ...     print(type(e).__name__, isinstance(e, ValueError))
    CheckpointError True
  """


def lock(directory: str):
  """Takes the writer lock of `directory`; returns the open lock file (closing it unlocks)."""
  path = os.path.join(directory, LOCK)
  handle = open(path, "a+")  # noqa: SIM115 (held for the manager's lifetime)
  try:
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    handle.seek(0)
    holder = handle.read().strip() or "another process"
    handle.close()
    if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
      raise
    raise CheckpointError(
        f"checkpoint_manager: {directory} is already open for writing by {holder} (lock file "
        f"{path}). Two writers in one directory delete each other's steps. Fix: give each run "
        "its own directory, or close the other manager first."
    ) from None
  handle.seek(0)
  handle.truncate()
  handle.write(f"pid {os.getpid()}\n")
  handle.flush()
  return handle


def step_dirs(directory: str) -> dict[int, str]:
  """{step: path} of every finished-looking step folder (a plain integer name)."""
  try:
    names = os.listdir(directory)
  except FileNotFoundError:
    return {}
  return {int(n): os.path.join(directory, n) for n in names
          if n.isdigit() and os.path.isdir(os.path.join(directory, n))}


def leftovers(directory: str) -> list[str]:
  """Paths of orbax's unfinished temporary folders and jlora's deleted-steps folder."""
  try:
    names = os.listdir(directory)
  except FileNotFoundError:
    return []
  return [os.path.join(directory, n) for n in sorted(names) if TMP_MARK in n or n == TRASH]


def _files(step_dir: str) -> list[str]:
  out = []
  for root, _, names in os.walk(step_dir):
    out += [os.path.relpath(os.path.join(root, n), step_dir) for n in names if n != MANIFEST]
  return sorted(out)


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def _canonical(obj) -> bytes:
  return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def seal(step_dir: str) -> None:
  """Writes the manifest of a finished step (atomically: a temporary file, fsync, rename)."""
  files = {name: {"size": os.path.getsize(os.path.join(step_dir, name)),
                  "sha256": _sha256(os.path.join(step_dir, name))} for name in _files(step_dir)}
  manifest = {"files": files, "sha256": hashlib.sha256(_canonical(files)).hexdigest()}
  tmp = os.path.join(step_dir, f".{MANIFEST}.tmp")
  with open(tmp, "w") as f:
    json.dump(manifest, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(step_dir, MANIFEST))
  _fsync_dir(step_dir)


def _fsync_dir(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def problem(step_dir: str, *, hashes: bool = True) -> tuple[str, str] | None:
  """None if the step is whole; else (kind, what), kind "incomplete" or "corrupt".

  Without `hashes`, only the files' presence and sizes are checked (cheap: for cleanup).
  """
  manifest_path = os.path.join(step_dir, MANIFEST)
  if not os.path.exists(manifest_path):
    return _unsealed_problem(step_dir)
  try:
    with open(manifest_path, "rb") as f:
      manifest = json.loads(f.read())
    files = manifest["files"]
    ok = hashlib.sha256(_canonical(files)).hexdigest() == manifest["sha256"]
  except (ValueError, KeyError, TypeError, UnicodeDecodeError):
    ok = False
  if not ok:
    return "corrupt", f"{manifest_path} is damaged (does not match its own checksum)"
  for name, want in sorted(files.items()):
    path = os.path.join(step_dir, name)
    if not os.path.isfile(path):
      return "incomplete", f"{path} is missing"
    size = os.path.getsize(path)
    if size != want["size"]:
      return "corrupt", f"{path} has {size} bytes, {want['size']} were saved (truncated?)"
    if hashes and _sha256(path) != want["sha256"]:
      return "corrupt", f"{path} does not match its saved sha256 (changed on disk)"
  return None


def _unsealed_problem(step_dir: str) -> tuple[str, str] | None:
  path = os.path.join(step_dir, METADATA_FILE)
  if not os.path.isfile(path):
    return "incomplete", f"{path} is missing (and there is no {MANIFEST})"
  try:
    with open(path, "rb") as f:
      fmt = json.loads(f.read()).get("format")
  except (ValueError, AttributeError, UnicodeDecodeError):
    return "corrupt", f"{path} is not valid JSON (and there is no {MANIFEST} to check against)"
  if fmt != LEGACY_FORMAT:
    return "incomplete", f"{os.path.join(step_dir, MANIFEST)} is missing (step never sealed)"
  for name in LEGACY_REQUIRED:
    if not os.path.exists(os.path.join(step_dir, name)):
      return "incomplete", f"{os.path.join(step_dir, name)} is missing"
  return None


def clean(directory: str) -> None:
  """Removes leftovers and incomplete steps (warning for each step); for a manager that writes."""
  for path in leftovers(directory):
    shutil.rmtree(path, ignore_errors=True)
  for step, path in sorted(step_dirs(directory).items()):
    found = problem(path, hashes=False)
    if found is not None and found[0] == "incomplete":
      warnings.warn(f"checkpoint_manager: removed incomplete checkpoint step {step} in "
                    f"{directory}: {found[1]}.", UserWarning, stacklevel=3)
      shutil.rmtree(path)


def empty_trash(directory: str, *, put_back: bool) -> None:
  """Ends a save: removes deleted steps (or puts them back, if it failed) and temporary folders."""
  trash = os.path.join(directory, TRASH)
  if put_back and os.path.isdir(trash):
    for name in os.listdir(trash):
      if name.isdigit() and not os.path.exists(os.path.join(directory, name)):
        os.rename(os.path.join(trash, name), os.path.join(directory, name))
  for path in leftovers(directory):
    shutil.rmtree(path, ignore_errors=True)


class WriterManager(ocp.CheckpointManager):
  """An orbax `CheckpointManager` that holds the writer lock and seals every step it saves."""

  def __init__(self, directory: str, options: ocp.CheckpointManagerOptions,
               item_handlers: dict[str, ocp.CheckpointHandler], best: str | None = None):
    os.makedirs(directory, exist_ok=True)
    self._jlora_lock = lock(directory)
    try:
      clean(directory)
      super().__init__(directory, options=options, item_handlers=item_handlers)
    except BaseException:
      self._jlora_lock.close()
      raise
    self._jlora_dir, self.ranked_by = directory, best
    self._jlora_unsealed: list[int] = []
    self._jlora_errors: list[BaseException] = []
    atexit.register(_seal_at_exit, weakref.ref(self))

  def save(self, step, *args, **kwargs) -> bool:
    saved = super().save(step, *args, **kwargs)
    if saved:
      self._jlora_unsealed.append(step)
    return saved

  def check_for_errors(self):
    try:
      super().check_for_errors()
    except Exception as e:  # orbax logs and drops it while finalizing: keep it for the raise
      self._jlora_errors.append(e)
      raise

  def wait_until_finished(self):
    """Waits for the background write, seals the new steps; raises if one did not land."""
    try:
      super().wait_until_finished()
    except Exception as e:
      self._jlora_errors.append(e)
    pending, self._jlora_unsealed = self._jlora_unsealed, []
    errors, self._jlora_errors = self._jlora_errors, []
    lost = [s for s in pending if not os.path.isdir(os.path.join(self._jlora_dir, str(s)))
            and (errors or s in self.all_steps())]
    for step in pending:
      if step not in lost and os.path.isdir(os.path.join(self._jlora_dir, str(step))):
        seal(os.path.join(self._jlora_dir, str(step)))
    empty_trash(self._jlora_dir, put_back=bool(lost))
    if lost or errors:
      self.reload()  # orbax still lists a step whose write failed
      cause = "; ".join(f"{type(e).__name__}: {first_line(e)}" for e in errors) or "unknown"
      raise CheckpointError(
          f"checkpoint step(s) {lost} were not written to {self._jlora_dir} ({cause}). Steps "
          "that max_to_keep had dropped meanwhile are kept. Fix: free disk space or fix the "
          "cause above, then save again."
      ) from (errors[0] if errors else None)

  def close(self):
    try:
      self.wait_until_finished()
    finally:
      super().close()
      self._jlora_lock.close()


def _seal_at_exit(ref: weakref.ref) -> None:
  manager = ref()
  if manager is not None and manager._jlora_unsealed:  # noqa: SLF001
    manager.wait_until_finished()


def first_line(e: BaseException) -> str:
  """The first line of an exception's message, for one-line jlora errors."""
  return (str(e).strip().splitlines() or [""])[0][:300]
