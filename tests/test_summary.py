"""Tests for jlora/summary.py: the table names every adapted leaf and counts what trains."""

import math
import re

import conftest
import jax
import jax.numpy as jnp
import pytest

import jlora

KEY = jax.random.key(0)


@pytest.fixture(scope="module")
def adapted():
  """(abstract variables of the conftest TinyLM, an abstract adapter with mixed ranks/scales)."""
  model = conftest.TinyLM()
  ids = (jnp.arange(12).reshape(2, 6) * 7) % 20
  variables = jax.eval_shape(model.init, KEY, ids)
  config = jlora.LoraConfig(
      rank=2, alpha=3.0, targets=r".*(kernel|embedding)", use_rslora=True,
      rank_pattern={r".*/attn/.*": 4}, alpha_pattern={r".*/conv/.*": 1.0},
      trainable=r".*/norm/(scale|bias)")
  adapter = jax.eval_shape(lambda v: jlora.init(KEY, v, config, model.apply, ids), variables)
  return variables, adapter


def _row(text: str, path: str) -> str:
  rows = [line for line in text.splitlines() if line.split(" ", 1)[0] == path]
  assert len(rows) == 1, (path, text)
  return rows[0]


def test_summary_lists_every_adapted_kernel_with_shape_kind_rank_scale_and_size(adapted):
  variables, adapter = adapted
  text = jlora.summary(adapter, variables)
  assert len(adapter.lora) == 8
  for path, f in adapter.lora.items():
    rank = 4 if "/attn/" in path else 2
    alpha = 1.0 if "/conv/" in path else 3.0
    scale = alpha / math.sqrt(rank)
    size = rank * (f.a.shape[-1] + f.b.shape[-1]) * math.prod(f.a.shape[:-2])
    assert re.fullmatch(
        rf"{re.escape(path)}\s+{re.escape(str(f.kernel_shape))}\s+{f.roles.kind}\s+{rank}\s+"
        rf"{re.escape(f'{scale:g}')}\s+{size}", _row(text, path))


def test_summary_lists_the_extras(adapted):
  variables, adapter = adapted
  text = jlora.summary(adapter, variables)
  assert sorted(adapter.extras) == ["params/layers/norm/bias", "params/layers/norm/scale"]
  for path in adapter.extras:
    assert re.fullmatch(rf"{re.escape(path)}\s+\(2, 8\)\s+full\s+-\s+-\s+16", _row(text, path))


def test_summary_total_counts_and_percentage(adapted):
  variables, adapter = adapted
  trained = sum(x.size for x in jax.tree.leaves(adapter))
  base = sum(x.size for x in jax.tree.leaves(variables))
  assert trained == jlora.num_params(adapter)
  text = jlora.summary(adapter, variables)
  share = 100 * trained / base
  assert text.splitlines()[-1] == f"trainable: {trained:,} of {base:,} ({share:.3f}%)"
  assert len(text.splitlines()) == 1 + len(adapter.lora) + len(adapter.extras) + 1


def test_summary_without_params_has_no_percentage(adapted):
  _, adapter = adapted
  last = jlora.summary(adapter).splitlines()[-1]
  assert last == f"trainable: {jlora.num_params(adapter):,}"


def test_summary_of_a_small_adapter_reads_like_a_table():
  params = {"fc": {"kernel": jnp.ones((64, 32)), "bias": jnp.zeros(32)}}
  config = jlora.LoraConfig(rank=4, alpha=8.0, targets="fc/kernel", trainable="fc/bias")
  text = jlora.summary(jlora.init(KEY, params, config), params)
  assert text.splitlines() == [
      "path       kernel    kind   rank  scale  params",
      "fc/kernel  (64, 32)  dense     4  2      384",
      "fc/bias    (32,)     full      -  -      32",
      "trainable: 416 of 2,080 (20.000%)",
  ]


def test_summary_reports_the_bytes_of_a_quantized_base(tiny_lm):
  model, variables, ids = tiny_lm
  config = jlora.LoraConfig(rank=2, alpha=4.0, targets=r".*/(up|down)/kernel")
  adapter = jlora.init(KEY, variables, config, model.apply, ids)
  qvars = jlora.quant.quantize(variables, r".*/(up|down|query)/kernel", "nf4", block_size=4)
  qvars = jlora.quant.quantize(qvars, r".*/conv/kernel", "int8", block_size=None)
  leaves = jax.tree.leaves(variables)
  dense = sum(x.size * x.dtype.itemsize for x in leaves)  # all float32
  stored = sum(x.nbytes for x in jax.tree.leaves(qvars))  # codes, scales and dense leaves
  assert stored < dense
  lines = jlora.summary(adapter, qvars).splitlines()
  assert lines[-2] == jlora.summary(adapter, variables).splitlines()[-1]  # same counts
  assert lines[-1] == (f"frozen base: {stored:,} bytes with 4 quantized kernels (int8, nf4), "
                       f"{dense:,} bytes dense ({stored / dense:.3f}x)")


def test_summary_of_a_dense_base_has_no_bytes_line(adapted):
  variables, adapter = adapted
  assert "frozen base" not in jlora.summary(adapter, variables)
