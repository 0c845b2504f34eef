"""Program-level `init`/`wrap` on Hugging Face's own Flax GPT-2 and Llama (optional).

Needs `transformers` 4.x with its Flax models (v5 removed them; 4.57.6 runs on flax 0.12.8 and
JAX 0.10.2); the PEFT cross-check also needs torch and peft. Models are built from tiny configs
with random weights: nothing is downloaded. HF's Flax code broadcasts biases by rank promotion,
so these tests allow it (conftest makes it an error elsewhere).

GPT-2's `FlaxConv1D` stores its kernels (out, in) and reads them with ``kernel.transpose()``;
its LM head reads the token embedding outside its module (``wte.embedding.T``). Llama uses
`nn.Dense`. Tolerances are those of tests/test_program.py.
"""

from __future__ import annotations

import _custom_models as cm
import _hlo
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_program import (
  _assert_close,
  _compare,
  _config,
  _kernel_sizes,
  _max_abs,
  _step,
  _trained,
)

import jlora

transformers = pytest.importorskip("transformers")
try:
  from transformers import FlaxGPT2LMHeadModel, FlaxLlamaForCausalLM, GPT2Config, LlamaConfig
except ImportError:
  pytest.skip(
      f"transformers {transformers.__version__} has no Flax models (removed in v5). To run "
      "these tests: pip install 'transformers<5' (4.57.6 works with flax 0.12.8).",
      allow_module_level=True)

VOCAB, SEQ = 64, 7
GPT2_TARGETS = r"transformer/h/\d+/(attn|mlp)/(c_attn|c_proj|c_fc)/kernel"
LLAMA_TARGETS = r"params/model/layers/\d+/(self_attn|mlp)/\w+_proj/kernel"


@pytest.fixture(autouse=True)
def _allow_rank_promotion():
  with jax.numpy_rank_promotion("allow"):
    yield


def _ids():
  return cm.ids((2, SEQ), VOCAB, seed=3)


@pytest.fixture(scope="module")
def gpt2():
  """(model, params, fn): ``fn(params, ids)`` calls the model as users do."""
  config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=16,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
  with jax.numpy_rank_promotion("allow"):
    model = FlaxGPT2LMHeadModel(config, seed=0)
  params = cm.fill(model.params, seed=5, scale=0.1)
  return model, params, lambda params, ids: model(ids, params=params).logits


@pytest.fixture(scope="module")
def llama():
  """(module, variables, fn): ``fn(variables, ids)`` is the Flax module's own apply."""
  config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=32)
  with jax.numpy_rank_promotion("allow"):
    model = FlaxLlamaForCausalLM(config, seed=0)
  variables = {"params": cm.fill(model.params, seed=6, scale=0.1)}

  def fn(variables, ids):
    mask = jnp.ones_like(ids)
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1])[None, :], ids.shape)
    return model.module.apply(variables, ids, mask, positions).logits

  return model, variables, fn


def _merged(fn):
  return lambda tree, adapter, *args: fn(jlora.merge(tree, adapter), *args)


def test_gpt2_conv1d_kernels_are_out_in(gpt2):
  _, params, fn = gpt2
  adapter = jlora.init(jax.random.key(0), params, _config(GPT2_TARGETS), fn, _ids())
  assert len(adapter.lora) == 8  # 2 layers x c_attn, attn c_proj, c_fc, mlp c_proj
  for path, f in adapter.lora.items():
    assert f.roles == cm.dense((1,), (0,)), path
  c_fc = adapter.lora["transformer/h/0/mlp/c_fc/kernel"]  # (4·32, 32) stored (out, in)
  assert (c_fc.a.shape, c_fc.b.shape) == ((2, 32), (2, 128))


def test_gpt2_wrap_equals_merged(gpt2):
  _, params, fn = gpt2
  adapter = _trained(jlora.init(jax.random.key(0), params, _config(GPT2_TARGETS), fn, _ids()))
  _compare(jlora.wrap(fn), _merged(fn), params, adapter, _ids())


def test_gpt2_tied_embedding_updated_in_lookup_and_lm_head(gpt2):
  _, params, fn = gpt2
  config = _config(r"transformer/wte/embedding")
  adapter = jlora.init(jax.random.key(0), params, config, fn, _ids())
  assert adapter.lora["transformer/wte/embedding"].roles == cm.EMBED
  _compare(jlora.wrap(fn), _merged(fn), params, _trained(adapter), _ids())


def test_gpt2_training_step_has_no_weight_gradient(gpt2):
  _, params, fn = gpt2
  adapter = _trained(jlora.init(jax.random.key(0), params, _config(GPT2_TARGETS), fn, _ids()))
  tokens = _ids().size  # 14: no kernel axis has that size
  found = {}
  for recipe, apply in (("wrap", jlora.wrap(fn)), ("merged", _merged(fn))):
    step = _step(apply, params, (_ids(),))
    hlo = jax.jit(step).lower(adapter).compile().as_text()
    jaxpr = jax.make_jaxpr(step)(adapter).jaxpr
    found[recipe] = (
        [d for s in _kernel_sizes(adapter) for d in _hlo.hlo_weight_gradient_dots(hlo, s, tokens)],
        [d for s in _kernel_sizes(adapter)
         for d in _hlo.jaxpr_weight_gradient_dots(jaxpr, s, tokens)],
    )
  assert found["wrap"] == ([], []), found["wrap"]
  assert min(map(len, found["merged"])) >= len(adapter.lora), found["merged"]


def test_llama_wrap_equals_merged(llama):
  _, variables, fn = llama
  adapter = jlora.init(jax.random.key(0), variables, _config(LLAMA_TARGETS), fn, _ids())
  assert len(adapter.lora) == 14  # 2 layers x q, k, v, o, gate, up, down
  for path, f in adapter.lora.items():
    assert f.roles == cm.dense((0,), (1,)), path
  _compare(jlora.wrap(fn), _merged(fn), variables, _trained(adapter), _ids())


def test_gpt2_peft_export_loads_into_torch_gpt2(gpt2, tmp_path):
  """The exported folder, loaded by PEFT onto torch's GPT-2 with the same weights, gives the
  logits of the merged Flax model: A and B are laid out for (out, in) kernels, not transposed."""
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  from transformers import GPT2LMHeadModel
  from transformers.modeling_flax_pytorch_utils import load_flax_weights_in_pytorch_model

  model, params, fn = gpt2
  adapter = _trained(jlora.init(jax.random.key(0), params, _config(GPT2_TARGETS), fn, _ids()))
  jlora.export_peft(tmp_path, adapter)
  base = GPT2LMHeadModel(model.config).eval()
  load_flax_weights_in_pytorch_model(base, jax.tree.map(np.array, params))  # writable copies
  ids = _ids()
  with torch.no_grad():
    torch_base = base(torch.as_tensor(np.array(ids))).logits.numpy()
  _assert_close(torch_base, np.asarray(fn(params, ids)), 1e-4, "torch base vs flax base")
  # PEFT notices GPT-2's Conv1D and turns fan_in_fan_out on itself, with a warning.
  with pytest.warns(UserWarning, match="fan_in_fan_out"):
    lora_model = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
  with torch.no_grad():
    got = lora_model(torch.as_tensor(np.array(ids))).logits.numpy()
  want = np.asarray(fn(jlora.merge(params, adapter), ids))
  assert _max_abs(want - torch_base) > 0.05 * _max_abs(torch_base)  # the update matters
  _assert_close(got, want, 1e-4, "PEFT torch vs merged flax")
