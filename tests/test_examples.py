"""Tiny runs of the language-model examples (examples/finetune.py, examples/paper/*.py).

Each script's `main(argv)` runs in-process on a model a few hundred parameters wide for a few
steps, so the scripts cannot rot; bad input must end in one ``error:`` line and exit status 2.
"""

import importlib.util
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

import jlora

_EXTRA = 'the examples extra is not installed: pip install -e ".[examples]"'
pytest.importorskip("tqdm", reason=_EXTRA)
pytest.importorskip("matplotlib", reason=_EXTRA)

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
import common  # noqa: E402


def _load(relative: str):
  path = EXAMPLES / relative
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


finetune = _load("finetune.py")
rank_sweep = _load("paper/rank_sweep.py")
subspace = _load("paper/subspace.py")

TINY_MODEL = ["--d-model", "16", "--layers", "2", "--heads", "2", "--seq", "16", "--batch", "4",
              "--pretrain-steps", "3", "--eval-windows", "4"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  """One cache for the whole module: the tiny base is pretrained once and then reused."""
  root = tmp_path_factory.mktemp("examples")
  return dict(cache=root / "cache", results=root / "results", out=root / "out")


def tiny(dirs, *extra):
  return [*TINY_MODEL, "--cache-dir", str(dirs["cache"]), "--results-dir",
          str(dirs["results"]), *extra]


def test_finetune_end_to_end(dirs, capsys):
  result = finetune.main(tiny(dirs, "--steps", "4", "--evals", "2", "--rank", "2",
                              "--out", str(dirs["out"])))
  assert result["lora"] < result["before"]
  assert abs(result["merged"] - result["lora"]) <= finetune.MERGE_TOLERANCE
  assert result["full"] is not None
  assert 0 < result["lora_params"] < result["base_params"]
  text = result["results"].read_text()
  assert "| full fine-tuning |" in text and "Merged inference" in text
  assert result["plot"].stat().st_size > 0
  printed = capsys.readouterr().out
  assert str(result["adapter_dir"]) in printed and str(result["plot"].resolve()) in printed
  assert result["restored"] == result["lora"]
  assert (result["peft_dir"] / "adapter_config.json").is_file()


def tiny_base(dirs) -> common.Base:
  """The module's tiny base (pretrained by the first test that needs it, then cached)."""
  return common.pretrained_base(common.ModelConfig(d_model=16, layers=2, heads=2, seq=16),
                                common.load_corpus(common.CORPUS_A, 16), steps=3, lr=3e-3,
                                batch=4, seed=0, cache_dir=dirs["cache"])


def test_saved_adapter_restores_and_exports(dirs, tmp_path):
  base = tiny_base(dirs)
  config = common.lora_config("all", 2, 4.0)
  adapter = common.init_adapter(base, config, 0)
  adapter = jax.tree.map(lambda x: x + 0.5, adapter)  # B != 0, as after training
  common.save_adapter(tmp_path, adapter, config, step=7)
  saved = common.save_adapter(tmp_path, adapter, config, step=8)  # a rerun replaces it
  restored = jlora.restore(saved, params=base.variables)
  assert restored.step == 8 and restored.config == config
  assert jax.tree.structure(restored.adapter) == jax.tree.structure(adapter)
  assert jax.tree.all(jax.tree.map(np.array_equal, restored.adapter, adapter))
  peft = common.export_peft(tmp_path, adapter, config)
  assert sorted(p.name for p in peft.iterdir()) == ["adapter_config.json",
                                                    "adapter_model.safetensors"]


def test_pretrained_base_is_cached(dirs, capsys):
  first = tiny_base(dirs)  # trains unless a test before did
  second = tiny_base(dirs)
  assert "Reusing the pretrained base model cached at" in capsys.readouterr().out
  assert second.path == first.path and second.path.parent == dirs["cache"].resolve()
  assert jax.tree.all(jax.tree.map(np.array_equal, first.variables, second.variables))
  assert second.curve.losses == first.curve.losses and len(second.curve.losses) == 3


def test_rank_sweep_and_search(dirs):
  result = rank_sweep.main(tiny(dirs, "--steps", "3", "--ranks", "1,2", "--targets", "qv",
                                "--search", "qv"))
  assert set(result["runs"]) == {("qv", 1), ("qv", 2)}
  params = {key: run[1] for key, run in result["runs"].items()}
  assert params["qv", 2] == 2 * params["qv", 1] == 2 * 2 * 2 * (16 + 16)  # r·blocks·(q, v)·(A+B)
  assert result["searches"]["qv"].best_rank in (1, 2)
  text = result["results"].read_text()
  assert "| LoRA on q, v | 1 |" in text and "jlora.search_rank" in text
  assert (dirs["results"] / "rank_sweep.png").stat().st_size > 0


def test_subspace(dirs):
  result = subspace.main(tiny(dirs, "--steps", "3", "--ranks", "2,4"))
  assert set(result["grids"]) == {"query", "value"}
  for grid in result["grids"].values():
    assert grid.shape == (2, 4)
    assert np.all((grid >= -1e-5) & (grid <= 1 + 1e-5))
  assert len(result["rows"]) == 2 * 2 * 2  # blocks x (q, v) x ranks
  assert "amplification" in result["results"].read_text()
  assert result["plot"].stat().st_size > 0


# ------------------------------------------------------------------------------- bad input


def run_cli(module, argv, monkeypatch, capsys):
  """Runs the script as its __main__ block does; returns (exit status, stderr)."""
  monkeypatch.setattr(sys, "argv", [module.__name__, *argv])
  with pytest.raises(SystemExit) as exit_info:
    common.cli(module.main, module.__name__)
  return exit_info.value.code, capsys.readouterr().err


def test_missing_corpus_is_one_line_in_a_real_process(tmp_path):
  missing = tmp_path / "nope.txt"
  proc = subprocess.run([sys.executable, str(EXAMPLES / "finetune.py"), "--corpus-b",
                         str(missing)], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines() == [
      f"finetune.py: error: corpus file not found: {str(missing)!r}. "
      "Fix: pass an existing text file."]


@pytest.mark.parametrize("module", [finetune, rank_sweep, subspace], ids=lambda m: m.__name__)
def test_unknown_option(module, monkeypatch, capsys):
  code, err = run_cli(module, ["--bogus"], monkeypatch, capsys)
  assert code == 2
  assert "error: unrecognized arguments: --bogus" in err and "Traceback" not in err


@pytest.mark.parametrize("module, argv, message", [
    (finetune, ["--rank", "64"], r"LoRA rank 64 .* exceeds min\(fan_in, fan_out\)"),
    (rank_sweep, ["--ranks", "1,64"], r"LoRA rank 64 .*params/block_0/query/kernel"),
    (subspace, ["--ranks", "8,64"], r"LoRA rank 64 .*exceeds"),
    (finetune, ["--targets", ".*/attn/kernel"], r"targets '.\*/attn/kernel' match no kernel"),
    (finetune, ["--corpus-a", "/no/such/file.txt"], r"corpus file not found: '/no/such/file.txt'"),
    (finetune, ["--heads", "3"], r"--d-model 16 is not divisible by --heads 3"),
    (finetune, ["--seq", "100000"], r"must hold at least one window of --seq 100000"),
], ids=["finetune-rank", "sweep-rank", "subspace-rank", "targets", "corpus", "heads", "seq"])
def test_bad_values_are_clear_errors(module, argv, message, dirs, monkeypatch, capsys):
  with pytest.raises(common.CliError, match=message):
    module.main(tiny(dirs, *argv))
  code, err = run_cli(module, tiny(dirs, *argv), monkeypatch, capsys)
  assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("module, argv, message", [
    (rank_sweep, ["--ranks", "4,2"], "--ranks must be strictly increasing"),
    (rank_sweep, ["--targets", "qv,mlp"], "unknown target set(s) mlp"),
    (rank_sweep, ["--lr", "-1"], "expected a positive number, got '-1'"),
    (subspace, ["--ranks", "8"], "--ranks takes two increasing ranks"),
    (subspace, ["--layer", "5"], "--layer 5 is out of range"),
    (finetune, ["--steps", "0"], "expected a positive integer, got '0'"),
], ids=["ranks-order", "targets", "lr", "subspace-ranks", "layer", "steps"])
def test_bad_flags_are_usage_errors(module, argv, message, dirs, monkeypatch, capsys):
  code, err = run_cli(module, tiny(dirs, *argv), monkeypatch, capsys)
  assert code == 2 and message in err and "Traceback" not in err
