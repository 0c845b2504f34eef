"""A tiny run of examples/styles.py (style LoRAs mixed with combine, select and route).

The script's `main(argv)` runs in-process with ``--tiny`` (16 px images, 8 channels, 3 steps of
each training), so it cannot rot; nothing is timed. Bad options end in one argparse ``error:``
line and exit status 2.
"""

import importlib.util
import pathlib
import sys

import numpy as np
import pytest

_EXTRA = 'the examples extra is not installed: pip install -e ".[examples]"'
pytest.importorskip("tqdm", reason=_EXTRA)
pytest.importorskip("matplotlib", reason=_EXTRA)

_PATH = pathlib.Path(__file__).resolve().parents[1] / "examples" / "styles.py"
_spec = importlib.util.spec_from_file_location("examples_styles", _PATH)
styles = importlib.util.module_from_spec(_spec)
sys.modules["examples_styles"] = styles  # flax's dataclasses look their module up
_spec.loader.exec_module(styles)


def test_tiny_run_writes_the_grid_and_the_three_paths_agree(tmp_path):
  out = tmp_path / "grid.png"
  result = styles.main(["--tiny", "--out", str(out)])
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert result["traces"] == 1  # base, both styles and three mixes: one compiled sampler
  assert result["max_diff_combine_vs_select"] < 1e-4
  assert result["max_diff_select_vs_route"] < 1e-4
  assert all(np.isfinite(v) for v in result["mse"].values())


def test_procedural_styles_differ():
  masks = styles.make_layouts(np.random.default_rng(0), 4, 16)
  assert masks.shape == (4, 16, 16, 3) and set(np.unique(masks)) <= {0.0, 1.0}
  assert (masks.sum(-1) <= 1).all()  # one shape per pixel
  looks = [styles.render(masks, s) for s in styles.STYLES]
  for look in looks:
    assert look.shape == (4, 16, 16, 3) and look.min() >= 0 and look.max() <= 1
  for i in range(3):
    for j in range(i):
      assert np.abs(looks[i] - looks[j]).mean() > 0.1


@pytest.mark.parametrize("argv, message", [
    (["--size", "10"], "--size must be a multiple of 4"),
    (["--ranks", "4"], "--ranks: expected two positive integers"),
    (["--ranks", "a,b"], "--ranks: expected two integers"),
    (["--ranks", "4,64"], "must not exceed --width"),
    (["--width", "10", "--heads", "4"], "must be a multiple of --heads"),
    (["--out", "grid.jpg"], "--out must name a .png file"),
    (["--batch", "0"], "expected a positive integer, got '0'"),
    (["--lora-lr", "nan"], "expected a positive number, got 'nan'"),
])
def test_bad_options_exit_with_one_error_line(argv, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    styles.parse_args(argv)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert "error:" in err and message in err
