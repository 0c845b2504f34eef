"""Smoke test of benchmarks/train_step.py on a tiny model: every system builds, agrees at step 0
and trains a step. Nothing here is timed."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` lives at the root

from benchmarks import model as bm  # noqa: E402
from benchmarks import train_step as ts  # noqa: E402

TINY = bm.GPTConfig(vocab=64, d_model=64, blocks=1, head_dim=8, seq=16)  # rows of 64: nf4


@pytest.fixture(scope="module")
def workload():
  return ts.make_workload(TINY, batch=2)


@pytest.fixture(scope="module")
def jax_losses(workload):
  """{system: (step-0 loss, step-1 loss, XLA analysis)} of every JAX system."""
  out = {}
  for name in ts.JAX_SYSTEMS:
    runner = ts.build(name, workload)
    out[name] = (float(runner.step()), float(runner.step()), runner.analysis())
  return out


def test_workload_matches_the_benchmark_layout(workload):
  assert len(workload.adapter.lora) == 6 * TINY.blocks
  q = workload.adapter.lora["params/blocks_0/attn/q/kernel"]
  assert q.a.shape == (ts.RANK, TINY.d_model)
  assert q.b.shape == (ts.RANK, TINY.d_model)
  assert workload.tokens.shape == (2, TINY.seq + 1)


def test_jax_systems_agree_at_step_0_and_train(jax_losses):
  ref = jax_losses["full"][0]
  for name, (loss0, loss1, analysis) in jax_losses.items():
    kind = ("quantized" if name in ts.QUANTIZED else "bfloat16" if name == "jlora_bf16"
            else "float32")
    atol = ts.LOSS_ATOL[kind]
    assert abs(loss0 - ref) <= atol, name
    assert math.isfinite(loss1) and loss1 != loss0, name
    assert {"flops", "temp", "argument", "output"} <= set(analysis), name


def test_lora_systems_take_the_same_step(jax_losses):
  # Same math, same optimizer: the factored, merged and NNX LoRA steps agree after a step too.
  ref = jax_losses["merged"][1]
  for name in ("jlora", "nnx_lora"):
    np.testing.assert_allclose(jax_losses[name][1], ref, rtol=1e-5, err_msg=name)


def test_check_step0_losses_names_the_mismatch():
  r = lambda name, loss: ts.Result(name, "jax", 1, 0, loss, loss, [1.0], {}, 0)  # noqa: E731
  assert ts.check_step0_losses([r("full", 4.0), r("jlora", 4.0 + 1e-6)]) == []
  problems = ts.check_step0_losses([r("full", 4.0), r("jlora", 4.1)])
  assert len(problems) == 1 and problems[0].startswith("jlora: step-0 loss 4.100000")


@pytest.mark.skipif(not ts.torch_available(), reason="torch or peft is not installed")
def test_torch_systems_agree_with_jax(workload, jax_losses):
  for name in ts.TORCH_SYSTEMS:
    runner = ts.build(name, workload)
    loss0, loss1 = float(runner.step()), float(runner.step())
    assert abs(loss0 - jax_losses["full"][0]) <= ts.LOSS_ATOL["float32"], name
    assert math.isfinite(loss1) and loss1 != loss0, name


def test_write_section_keeps_the_rest_of_the_file(tmp_path):
  path = tmp_path / "RESULTS.md"
  ts.write_section(path, "first")
  assert ts.BEGIN in path.read_text() and "first" in path.read_text()
  path.write_text("intro\n" + path.read_text() + "other benchmark\n")
  ts.write_section(path, "second")
  text = path.read_text()
  assert text.startswith("intro\n") and text.endswith("other benchmark\n")
  assert "second" in text and "first" not in text


def test_parse_args_rejects_unknown_systems(capsys):
  assert ts.parse_args(["--systems", "jlora,floor"]).systems == ["floor", "jlora"]
  with pytest.raises(SystemExit):
    ts.parse_args(["--systems", "jlora,lorax"])
  assert "unknown ['lorax']" in capsys.readouterr().err

