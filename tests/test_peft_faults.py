"""Faults around PEFT folders: failed writes keep the previous export; bad files give one error.

Disk faults (a full disk, a kill mid-write) run in a subprocess (tests/_peft_worker.py) that
patches file writing; the checks of what was left on disk run here.
"""

import json
import os
import signal
import subprocess
import sys

import _peft_worker as worker
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jlora

HERE = os.path.dirname(os.path.abspath(__file__))


def _run_worker(mode: str, folder) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.path.dirname(HERE)]))
  return subprocess.run([sys.executable, os.path.join(HERE, "_peft_worker.py"), mode,
                         str(folder)], capture_output=True, text=True, env=env, timeout=300)


def _assert_adapters_equal(x, y):
  assert jax.tree.structure(x) == jax.tree.structure(y)  # paths, scales, roles, shapes
  for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_full_disk_during_export_keeps_the_previous_export_whole(tmp_path):
  done = _run_worker("enospc", tmp_path)
  assert done.returncode == 0, done.stderr
  error = json.loads(done.stdout.strip().splitlines()[-1])
  assert error["errno"] == 28  # ENOSPC
  assert "export_peft: writing adapter_model.safetensors for" in error["message"]
  assert "the folder was left as it was. Fix: free space" in error["message"]
  assert os.listdir(tmp_path) == ["export"]  # no temporary folder remains
  v1, _ = worker.adapters()
  back, config = jlora.import_peft(tmp_path / "export", worker.PARAMS)
  _assert_adapters_equal(back, v1)  # the old A and B, with the old alpha
  assert config.alpha == 8


def test_killed_export_keeps_the_previous_export_whole(tmp_path):
  done = _run_worker("kill", tmp_path)
  assert done.returncode == -signal.SIGKILL, done.stderr
  v1, _ = worker.adapters()
  back, _ = jlora.import_peft(tmp_path / "export", worker.PARAMS)
  _assert_adapters_equal(back, v1)
  # Only a hidden, half-written sibling is left behind; the next export replaces the folder.
  assert [e for e in os.listdir(tmp_path) if e != "export"][0].startswith(".export.jlora-new-")


def test_export_replaces_the_folder_and_keeps_other_files(tmp_path):
  v1, v2 = worker.adapters()
  jlora.export_peft(tmp_path / "export", v1)
  (tmp_path / "export" / "README.md").write_text("notes")
  jlora.export_peft(tmp_path / "export", v2)
  assert sorted(os.listdir(tmp_path)) == ["export"]
  assert (tmp_path / "export" / "README.md").read_text() == "notes"
  _assert_adapters_equal(jlora.import_peft(tmp_path / "export", worker.PARAMS)[0], v2)
  (tmp_path / "file").write_text("")
  with pytest.raises(ValueError, match=r"export_peft: '.*file' exists and is not a folder\. Fix:"):
    jlora.export_peft(tmp_path / "file", v1)


def test_missing_folder_after_an_interrupted_swap_names_the_previous_export(tmp_path):
  v1, _ = worker.adapters()
  jlora.export_peft(tmp_path / "export", v1)
  os.rename(tmp_path / "export", tmp_path / ".export.jlora-old-abc")  # killed between renames
  with pytest.raises(FileNotFoundError, match=r"no adapter_config\.json.*Fix:.*"
                     r"\.export\.jlora-old-abc.*previous export, whole"):
    jlora.import_peft(tmp_path / "export", worker.PARAMS)


# --- bad files: one ValueError naming the file and the fix --------------------------------------


@pytest.fixture()
def exported(tmp_path):
  v1, _ = worker.adapters()
  folder = tmp_path / "export"
  jlora.export_peft(folder, v1)
  return folder, v1


def _config_file(folder):
  return folder / "adapter_config.json"


def _edit_config(folder, **changes):
  cfg = json.loads(_config_file(folder).read_text())
  cfg.update(changes)
  _config_file(folder).write_text(json.dumps(cfg))


BAD_CONFIGS = [
    ("truncated", lambda text: text[: len(text) // 2], r"is not valid JSON \(.*\); it is "
     r"truncated or corrupt\. Fix: export the adapter again"),
    ("binary", lambda text: "\udcff", r"is not valid JSON"),
    ("list", lambda text: "[1, 2]", r"holds a JSON array, not an object .*Fix:"),
    ("null", lambda text: "null", r"holds a JSON null, not an object"),
    ("number", lambda text: "3", r"holds a JSON number, not an object"),
]


@pytest.mark.parametrize("name, corrupt, match", BAD_CONFIGS, ids=[b[0] for b in BAD_CONFIGS])
def test_corrupt_config_is_one_clear_error(exported, name, corrupt, match):
  folder, v1 = exported
  _assert_adapters_equal(jlora.import_peft(folder, worker.PARAMS)[0], v1)
  text = _config_file(folder).read_text()
  _config_file(folder).write_bytes(corrupt(text).encode("utf-8", "surrogateescape"))
  with pytest.raises(ValueError, match=r"import_peft: .*adapter_config\.json " + match):
    jlora.import_peft(folder, worker.PARAMS)


BAD_FIELDS = [
    (dict(r="8"), r"has r='8'; r must be an integer >= 1\. Fix: correct it in the file"),
    (dict(r=0), r"has r=0; r must be an integer >= 1"),
    (dict(r=True), r"has r=True"),
    (dict(lora_alpha="16"), r"has lora_alpha='16'; lora_alpha must be a number > 0"),
    (dict(lora_alpha=0), r"has lora_alpha=0; lora_alpha must be a number > 0"),
    (dict(lora_dropout=1.5), r"lora_dropout must be a number in \[0, 1\)"),
    (dict(use_rslora="yes"), r"use_rslora must be true or false"),
    (dict(rank_pattern={"fc(1": 2}), r"rank_pattern=.*'fc\(1' is not a valid regex"),
    (dict(alpha_pattern={"[fc": 2}), r"alpha_pattern=.*'\[fc' is not a valid regex"),
    (dict(rank_pattern={"fc1": "2"}), r"the value for 'fc1' must be an integer >= 1"),
    (dict(rank_pattern=["fc1"]), r"rank_pattern must map module-name regexes to values"),
]


@pytest.mark.parametrize("changes, match", BAD_FIELDS, ids=[str(c) for c, _ in BAD_FIELDS])
def test_config_fields_of_the_wrong_type_are_named(exported, changes, match):
  folder, _ = exported
  _edit_config(folder, **changes)
  with pytest.raises(ValueError, match=r"import_peft: .*adapter_config\.json .*" + match):
    jlora.import_peft(folder, worker.PARAMS)


def test_corrupt_weights_are_one_clear_error(exported):
  folder, v1 = exported
  weights = folder / "adapter_model.safetensors"
  data = weights.read_bytes()
  for bad in (data[: len(data) - 7], b"not a tensor" * 9, b""):  # truncated, garbage, empty
    weights.write_bytes(bad)
    with pytest.raises(ValueError, match=r"import_peft: .*adapter_model\.safetensors is not a "
                       r"safetensors file jlora can read .*Fix: export the adapter again"):
      jlora.import_peft(folder, worker.PARAMS)
  weights.unlink()
  weights.symlink_to(_config_file(folder))
  with pytest.raises(ValueError, match=r"adapter_model\.safetensors \(a link to "
                     r"'.*adapter_config\.json'\) is not a safetensors file"):
    jlora.import_peft(folder, worker.PARAMS)
  weights.unlink()
  weights.write_bytes(data)
  _assert_adapters_equal(jlora.import_peft(folder, worker.PARAMS)[0], v1)


def test_integer_weights_are_refused(exported):
  folder, _ = exported
  weights = folder / "adapter_model.safetensors"
  tensors = load_file(weights)
  key = "base_model.model.fc1.lora_A.weight"
  tensors[key] = tensors[key].astype(np.int32)
  save_file(tensors, weights)
  with pytest.raises(ValueError, match=r"holds 'base_model\.model\.fc1\.lora_A\.weight' with "
                     r"dtype int32; LoRA weights are floating point\. Fix:"):
    jlora.import_peft(folder, worker.PARAMS)


def test_nan_weights_are_refused_unless_validate_is_false(exported):
  folder, v1 = exported
  weights = folder / "adapter_model.safetensors"
  tensors = load_file(weights)
  tensors["base_model.model.fc2.lora_B.weight"][0, 0] = np.nan
  tensors["base_model.model.fc2.lora_B.weight"][1, 0] = np.inf
  save_file(tensors, weights)
  with pytest.raises(ValueError, match=r"lora/params/fc2/kernel/b in .*adapter_model\.safetensors"
                     r" has 2 non-finite value\(s\) \(NaN or inf\)\. Fix: .*validate=False"):
    jlora.import_peft(folder, worker.PARAMS)
  back, _ = jlora.import_peft(folder, worker.PARAMS, validate=False)
  assert int(np.sum(~np.isfinite(np.asarray(back.lora["params/fc2/kernel"].b)))) == 2
  _assert_adapters_equal(back.lora["params/fc1/kernel"], v1.lora["params/fc1/kernel"])
