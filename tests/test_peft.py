"""Tests of jlora/peft.py: PEFT folder layout, round trips, errors, and the real `peft` library."""

import dataclasses
import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TinyLM
from safetensors.numpy import load_file, save_file

import jlora
from jlora import peft

# TinyLM (tests/conftest.py) as a torch model would name it: scanned layers are model.layers.{}.
TINY_LM_NAMES = [
    (r"params/(embed|conv)", r"model.\1"),
    (r"params/layers/attn/(query|key|value)", r"model.layers.{}.self_attn.\1"),
    (r"params/layers/attn/out", r"model.layers.{}.self_attn.o_proj"),
    (r"params/layers/(up|down)", r"model.layers.{}.mlp.\1_proj"),
    (r"params/layers/norm", r"model.layers.{}.input_layernorm"),
]


def _noisy(adapter, seed=0, scale=0.3):
  """The adapter plus noise: B no longer zero, every value distinct (NumPy: nothing compiles)."""
  rng = np.random.default_rng(seed)
  noise = lambda x: x + scale * rng.standard_normal(x.shape).astype(x.dtype)  # noqa: E731
  return jax.tree.map(lambda x: jnp.asarray(noise(np.asarray(x))), adapter)


def _assert_adapters_equal(x, y):
  assert jax.tree.structure(x) == jax.tree.structure(y)  # paths, scales, roles, shapes
  for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
    np.testing.assert_array_equal(u, v)


def _read(folder):
  with open(os.path.join(folder, "adapter_config.json")) as fh:
    return json.load(fh), load_file(os.path.join(folder, "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def lm_adapter():
  model = TinyLM()
  ids = (jnp.arange(12).reshape(2, 6) * 7) % 20
  variables = jax.jit(model.init)(jax.random.key(0), ids)
  config = jlora.LoraConfig(
      rank=4, alpha=8.0, targets=r".*/(embedding|kernel)", exclude=(r".*/key/kernel",),
      rank_pattern={r".*/up/kernel": 2, r".*/conv/kernel": 3}, alpha_pattern={r".*/out/.*": 3.0},
      use_rslora=True, trainable=(r"params/layers/norm/.*",))
  adapter = _noisy(jlora.init(jax.random.key(1), variables, config, model.apply, ids))
  return model, variables, ids, config, adapter


def test_export_writes_peft_layout(tmp_path, lm_adapter):
  _, _, _, config, adapter = lm_adapter
  peft.export_peft(tmp_path, adapter, TINY_LM_NAMES, config=config, base_model_name_or_path="m")
  cfg, tensors = _read(tmp_path)
  p = "base_model.model.model."
  expected = {  # the shapes PEFT 0.21 gives these torch layers (Linear, Conv1d, Embedding)
      "embed.lora_embedding_A": (4, 20), "embed.lora_embedding_B": (8, 4),
      "conv.lora_A.weight": (3, 8, 3), "conv.lora_B.weight": (8, 3, 1),
      "layers.1.self_attn.query.lora_A.weight": (4, 8),
      "layers.1.self_attn.query.lora_B.weight": (8, 4),  # (D, H, hd) is Linear(D, H·hd)
      "layers.0.self_attn.o_proj.lora_A.weight": (4, 8),
      "layers.0.mlp.up_proj.lora_A.weight": (2, 8), "layers.0.mlp.up_proj.lora_B.weight": (16, 2),
      "layers.1.input_layernorm.weight": (8,), "layers.1.input_layernorm.bias": (8,),
  }
  for name, shape in expected.items():
    assert tensors[p + name].shape == shape, name
    assert tensors[p + name].dtype == np.float32
  assert not any("key" in name or "lora_A.weight" in name and "embed" in name for name in tensors)
  assert len(tensors) == 2 * (2 + 2 * 5) + 2 * 2  # embed, conv, 2 layers × 5 kernels; 2 norms
  assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
  assert cfg["use_rslora"] is True and cfg["base_model_name_or_path"] == "m"
  assert cfg["rank_pattern"] == {r"model\.layers\.0\.mlp\.up_proj": 2,
                                 r"model\.layers\.1\.mlp\.up_proj": 2, r"model\.conv": 3}
  assert set(cfg["alpha_pattern"]) == {r"model\.layers\.0\.self_attn\.o_proj",
                                       r"model\.layers\.1\.self_attn\.o_proj"}
  assert cfg["modules_to_save"] == ["model.layers.0.input_layernorm",
                                    "model.layers.1.input_layernorm"]
  assert "model.layers.1.self_attn.value" in cfg["target_modules"] and cfg["bias"] == "none"


def test_export_matches_an_independent_delta(tmp_path, lm_adapter):
  """PEFT's ΔW = s·B·A (s·(B·A)ᵀ for embeddings) in torch layout equals jlora.delta."""
  _, _, _, config, adapter = lm_adapter
  peft.export_peft(tmp_path, adapter, TINY_LM_NAMES, config=config)
  _, tensors = _read(tmp_path)
  t = lambda name: tensors["base_model.model.model." + name].astype(np.float64)  # noqa: E731
  s = lambda path: adapter.lora[path].scale  # noqa: E731
  delta = lambda path: np.asarray(jlora.delta(adapter.lora[path]), np.float64)  # noqa: E731
  # Linear(D, H·hd): torch weight (H·hd, D) is the (D, H, hd) kernel flattened and transposed.
  q = t("layers.1.self_attn.query.lora_B.weight") @ t("layers.1.self_attn.query.lora_A.weight")
  path = "params/layers/attn/query/kernel"
  np.testing.assert_allclose(s(path) * q, delta(path)[1].reshape(8, 8).T, atol=1e-5)
  o = t("layers.0.self_attn.o_proj.lora_B.weight") @ t("layers.0.self_attn.o_proj.lora_A.weight")
  path = "params/layers/attn/out/kernel"
  np.testing.assert_allclose(s(path) * o, delta(path)[0].reshape(8, 8).T, atol=1e-5)
  # Conv1d: torch weight (cout, cin, k); Flax kernel (k, cin, cout).
  conv = np.einsum("or,rik->oik", t("conv.lora_B.weight")[..., 0], t("conv.lora_A.weight"))
  path = "params/conv/kernel"
  np.testing.assert_allclose(s(path) * conv, delta(path).transpose(2, 1, 0), atol=1e-5)
  # Embedding: torch weight (vocab, dim) as in Flax; ΔW = s·(B·A)ᵀ.
  emb = (t("embed.lora_embedding_B") @ t("embed.lora_embedding_A")).T
  path = "params/embed/embedding"
  np.testing.assert_allclose(s(path) * emb, delta(path), atol=1e-5)


def test_round_trip_is_exact(tmp_path, lm_adapter):
  model, variables, ids, config, adapter = lm_adapter
  peft.export_peft(tmp_path, adapter, TINY_LM_NAMES, config=config)
  back, back_config = peft.import_peft(tmp_path, variables, TINY_LM_NAMES, model.apply, ids)
  _assert_adapters_equal(back, adapter)  # bitwise, scales and roles included
  assert back_config.use_rslora and back_config.rank == 4 and back_config.alpha == 8
  assert back_config.rank_for("params/layers/up/kernel") == 2
  lora_apply = jax.jit(jlora.wrap(model.apply))
  np.testing.assert_array_equal(lora_apply(variables, back, ids),
                                lora_apply(variables, adapter, ids))
  # The returned config makes the same adapter shapes and scales with jlora.init.
  fresh = jlora.init(jax.random.key(0), variables, back_config, model.apply, ids)
  assert jax.tree.structure(fresh) == jax.tree.structure(adapter)


def test_round_trip_with_abstract_params_and_default_names(tmp_path):
  params = {"params": {"fc": {"kernel": jnp.ones((8, 6)), "bias": jnp.ones(6)},
                       "enc": {"fc": {"kernel": jnp.ones((6, 8))}}}}
  # "fc" is a suffix of "enc.fc": PEFT's `(.*\.)?(key)$` would give enc.fc fc's rank unless
  # enc.fc has its own pattern key.
  config = jlora.LoraConfig(rank=4, alpha=4.0, targets=".*/kernel",
                            rank_pattern={"params/fc/kernel": 2}, trainable=("params/fc/bias",),
                            alpha_pattern={"params/enc/.*": 1 / 3})  # α/r comes back exactly
  adapter = _noisy(jlora.init(jax.random.key(0), params, config))
  peft.export_peft(tmp_path, adapter)
  cfg, tensors = _read(tmp_path)
  assert cfg["r"] == 4 and cfg["rank_pattern"] == {r"enc\.fc": 4, "fc": 2}
  assert cfg["bias"] == "lora_only" and cfg["modules_to_save"] is None
  assert tensors["base_model.model.fc.base_layer.bias"].shape == (6,)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  back, _ = peft.import_peft(tmp_path, abstract)
  _assert_adapters_equal(back, adapter)


def test_pattern_key_matches_like_peft():
  assert peft._pattern_key(["fc1"], "model.fc1") == "fc1"
  assert peft._pattern_key(["fc1"], "model.xfc1") is None  # only at a "." boundary
  assert peft._pattern_key(["fc1"], "fc1.sub") is None  # and at the end
  assert peft._pattern_key([r"layers\.[01]\.q", "q"], "model.layers.1.q") == r"layers\.[01]\.q"
  assert peft._pattern_key(["q", r"layers\.1\.q"], "model.layers.1.q") == "q"  # first wins


def _write(folder, cfg, tensors):
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "adapter_config.json"), "w") as fh:
    json.dump(cfg, fh)
  save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))


DENSE = {"params": {"fc1": {"kernel": jnp.ones((8, 6))}, "fc2": {"kernel": jnp.ones((6, 5))}}}


def _handmade(**overrides):
  rng = np.random.default_rng(0)
  cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "rank_pattern": {"fc2": 2},
         "alpha_pattern": {"x.fc1": 5, "fc1": 3}, "use_rslora": False, "lora_dropout": 0.1,
         "target_modules": ["fc1", "fc2"], "bias": "none", "modules_to_save": None}
  tensors = {"base_model.model.fc1.lora_A.weight": rng.normal(size=(4, 8)).astype(np.float32),
             "base_model.model.fc1.lora_B.weight": rng.normal(size=(6, 4)).astype(np.float32),
             "base_model.model.fc2.lora_A.weight": rng.normal(size=(2, 6)).astype(np.float32),
             "base_model.model.fc2.lora_B.weight": rng.normal(size=(5, 2)).astype(np.float32)}
  cfg.update(overrides)
  return cfg, tensors


def test_import_follows_rank_and_alpha_patterns(tmp_path):
  cfg, tensors = _handmade()
  _write(tmp_path, cfg, tensors)
  adapter, config = peft.import_peft(tmp_path, DENSE)
  fc1, fc2 = adapter.lora["params/fc1/kernel"], adapter.lora["params/fc2/kernel"]
  assert (fc1.rank, fc1.scale, fc2.rank, fc2.scale) == (4, 3 / 4, 2, 8 / 2)
  assert fc1.dropout == 0.1 and config.dropout == 0.1
  np.testing.assert_array_equal(fc1.b, tensors["base_model.model.fc1.lora_B.weight"].T)
  by_callable, _ = peft.import_peft(tmp_path, DENSE, lambda module: module.split("/")[-1])
  _assert_adapters_equal(by_callable, adapter)
  cfg, tensors = _handmade(use_rslora=True)
  _write(tmp_path / "rs", cfg, tensors)
  adapter, _ = peft.import_peft(tmp_path / "rs", DENSE)
  assert adapter.lora["params/fc2/kernel"].scale == 8 / math.sqrt(2)


def test_export_writes_float32_from_bfloat16(tmp_path):
  config = jlora.LoraConfig(rank=2, alpha=2.0, targets=".*kernel", dtype="bfloat16")
  adapter = _noisy(jlora.init(jax.random.key(0), DENSE, config))
  peft.export_peft(tmp_path, adapter, [(r"params/fc(\d)", r"model.layers.\1.mlp")])
  _, tensors = _read(tmp_path)
  a = tensors["base_model.model.model.layers.2.mlp.lora_A.weight"]
  assert a.dtype == np.float32
  np.testing.assert_array_equal(a, np.asarray(adapter.lora["params/fc2/kernel"].a, np.float32))


def test_import_warns_on_unknown_config_keys(tmp_path):
  cfg, tensors = _handmade(future_option=True, another=None)
  _write(tmp_path, cfg, tensors)
  with pytest.warns(UserWarning, match=r"ignoring config keys unknown to PEFT 0.21.*"
                    r"\['another', 'future_option'\]"):
    adapter, _ = peft.import_peft(tmp_path, DENSE)
  assert sorted(adapter.lora) == ["params/fc1/kernel", "params/fc2/kernel"]


@pytest.mark.parametrize("overrides, match", [
    ({"use_dora": True}, r"uses DoRA"),
    ({"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4}}, r"uses LoftQ"),
    ({"init_lora_weights": "pissa"}, r"init_lora_weights='pissa' \(it changes the base"),
    ({"lora_bias": True}, r"uses lora_bias"),
    ({"peft_type": "IA3"}, r"peft_type='IA3'; jlora reads LoRA"),
])
def test_import_rejects_unsupported_features(tmp_path, overrides, match):
  _write(tmp_path, *_handmade(**overrides))
  with pytest.raises(ValueError, match=match):
    peft.import_peft(tmp_path, DENSE)


def test_import_errors_on_bad_tensors(tmp_path):
  cfg, tensors = _handmade()
  del tensors["base_model.model.fc2.lora_B.weight"]
  _write(tmp_path / "missing", cfg, tensors)
  with pytest.raises(ValueError, match=r"torch module 'fc2' has no lora_B tensor"):
    peft.import_peft(tmp_path / "missing", DENSE)
  cfg, tensors = _handmade()
  tensors["base_model.model.fc2.lora_A.weight"] = np.zeros((2, 7), np.float32)
  _write(tmp_path / "shape", cfg, tensors)
  with pytest.raises(ValueError, match=r"'fc2' has lora_A of shape \(2, 7\), but "
                     r"'params/fc2/kernel' \(kernel \(6, 5\), rank 2\) needs \(2, 6\)"):
    peft.import_peft(tmp_path / "shape", DENSE)
  cfg, tensors = _handmade()
  tensors["base_model.model.fc2.lora_magnitude_vector"] = np.ones(5, np.float32)
  _write(tmp_path / "dora", cfg, tensors)
  with pytest.raises(ValueError, match=r"DoRA magnitude"):
    peft.import_peft(tmp_path / "dora", DENSE)
  with pytest.raises(FileNotFoundError, match=r"no adapter_config.json"):
    peft.import_peft(tmp_path / "nowhere", DENSE)


def test_import_errors_on_names(tmp_path):
  _write(tmp_path, *_handmade())
  with pytest.raises(ValueError, match=r"torch module 'fc1', but name_map maps no leaf of "
                     r"params to it; torch names it does give: model\.fc1"):
    peft.import_peft(tmp_path, DENSE, [(r"params/(\w+)", r"model.\1")])
  with pytest.raises(ValueError, match=r"maps both 'params/fc1' and 'params/fc2' to the torch "
                     r"module 'fc1'"):
    peft.import_peft(tmp_path, DENSE, lambda module: "fc1")
  conv = {"params": {"fc1": {"kernel": jnp.ones((3, 8, 6))}, "fc2": DENSE["params"]["fc2"]}}
  with pytest.raises(ValueError, match=r"params/fc1/kernel: a kernel of shape \(3, 8, 6\) has "
                     r"more than two axes.*pass the model"):
    peft.import_peft(tmp_path, conv)
  assert len(peft.import_peft(tmp_path, DENSE)[0].lora) == 2


def test_export_errors(tmp_path, lm_adapter):
  _, _, _, _, adapter = lm_adapter
  with pytest.raises(ValueError, match=r"name_map gives no torch module for 'params/conv'"):
    peft.export_peft(tmp_path, adapter, TINY_LM_NAMES[1:])
  with pytest.raises(ValueError, match=r"'params/layers/attn/out/kernel' has 1 stacked "
                     r"\(layer\) axes \(2,\), so its torch name needs as many '\{\}'"):
    peft.export_peft(tmp_path, adapter)  # the default names have no layer placeholder
  with pytest.raises(TypeError, match=r"expected a jlora.Adapter, got dict"):
    peft.export_peft(tmp_path, {"a": 1})
  with pytest.raises(TypeError, match=r"name_map must be None, a callable"):
    peft.export_peft(tmp_path, adapter, ["params/conv"])
  params = {"fc": {"kernel": jnp.ones((2, 4, 3))}, "g": {"kernel": jnp.ones((3, 3))}}
  config = jlora.LoraConfig(rank=1, alpha=1.0, targets="g/kernel", trainable=("fc/kernel",))
  odd = jlora.init(jax.random.key(0), params, config)
  with pytest.raises(ValueError, match=r"fc/kernel: jlora maps trained extras named bias, "
                     r"scale, embedding or a 2-D kernel"):
    peft.export_peft(tmp_path, odd)
  params = {"head": {"kernel": jnp.ones((4, 4))}, "x": {"head": {"kernel": jnp.ones((4, 4))}}}
  config = jlora.LoraConfig(rank=1, alpha=1.0, targets="x/head/kernel", trainable=("head/.*",))
  clash = jlora.init(jax.random.key(0), params, config)
  with pytest.raises(ValueError, match=r"'head' would be trained in full \(modules_to_save\), "
                     r"but PEFT would then also wrap LoRA modules \['x.head'\]"):
    peft.export_peft(tmp_path, clash)
  assert not os.listdir(tmp_path)  # nothing written by a failed export


# ----------------------------------------------------------------------------------------------
# Cross-checks against PyTorch and the real `peft` library.


class FlaxMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(8, use_bias=False, name="fc2")(nn.gelu(nn.Dense(16, name="fc1")(x), False))


class FlaxNet(nn.Module):
  """Embedding, Conv2d, DenseGeneral to (H, hd) and back, Linear with and without bias, head."""

  @nn.compact
  def __call__(self, ids):  # ids: (batch, height, width)
    x = nn.Embed(20, 8, name="embed")(ids)
    x = nn.Conv(8, (3, 2), padding=((1, 1), (0, 1)), name="conv")(x)
    h = jax.nn.softmax(nn.DenseGeneral((2, 4), name="proj")(x), -1)
    x = x + nn.DenseGeneral(8, axis=(-2, -1), use_bias=False, name="out")(h)
    return nn.Dense(5, name="head")(FlaxMLP(name="mlp")(x))


def _torch_net(torch, variables):
  """The same network in PyTorch, holding the Flax weights."""
  tnn = torch.nn

  class TorchMLP(tnn.Module):
    def __init__(self):
      super().__init__()
      self.fc1, self.fc2 = tnn.Linear(8, 16), tnn.Linear(16, 8, bias=False)

    def forward(self, x):
      return self.fc2(tnn.functional.gelu(self.fc1(x)))

  class TorchNet(tnn.Module):
    def __init__(self):
      super().__init__()
      self.embed = tnn.Embedding(20, 8)
      self.conv = tnn.Conv2d(8, 8, (3, 2), padding=0)
      self.proj, self.out = tnn.Linear(8, 8), tnn.Linear(8, 8, bias=False)
      self.mlp, self.head = TorchMLP(), tnn.Linear(8, 5)

    def forward(self, ids):
      x = self.embed(ids).permute(0, 3, 1, 2)
      x = self.conv(tnn.functional.pad(x, (0, 1, 1, 1))).permute(0, 2, 3, 1)
      h = self.proj(x).view(*x.shape[:-1], 2, 4).softmax(-1)
      x = x + self.out(h.reshape(*x.shape[:-1], 8))
      return self.head(self.mlp(x))

  p = jax.tree.map(np.asarray, variables["params"])
  weights = {
      "embed.weight": p["embed"]["embedding"],
      "conv.weight": p["conv"]["kernel"].transpose(3, 2, 0, 1), "conv.bias": p["conv"]["bias"],
      "proj.weight": p["proj"]["kernel"].reshape(8, 8).T, "proj.bias": p["proj"]["bias"].ravel(),
      "out.weight": p["out"]["kernel"].reshape(8, 8).T,
      "mlp.fc1.weight": p["mlp"]["fc1"]["kernel"].T, "mlp.fc1.bias": p["mlp"]["fc1"]["bias"],
      "mlp.fc2.weight": p["mlp"]["fc2"]["kernel"].T,
      "head.weight": p["head"]["kernel"].T, "head.bias": p["head"]["bias"],
  }
  net = TorchNet()
  net.load_state_dict({k: torch.tensor(np.ascontiguousarray(v)) for k, v in weights.items()})
  return net.eval()


@pytest.fixture(scope="module")
def nets():
  why = "the PEFT cross-check needs torch and peft: pip install torch==2.13.0 '.[torch]'"
  torch = pytest.importorskip("torch", reason=why)
  pytest.importorskip("peft", reason=why)
  model = FlaxNet()
  ids = (np.arange(2 * 5 * 4).reshape(2, 5, 4) * 7) % 20
  variables = model.init(jax.random.key(0), jnp.asarray(ids))
  return torch, model, variables, ids


def _torch_outputs(torch, net, ids):
  with torch.no_grad():
    return net(torch.tensor(ids)).numpy()


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_made_adapter_imports_with_equal_outputs(tmp_path, nets, use_rslora):
  torch, model, variables, ids = nets
  import peft as hf_peft

  config = hf_peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=["embed", "conv", "proj", "out", "fc1", "fc2"],
      rank_pattern={"fc1": 2}, alpha_pattern={"out": 3.0}, use_rslora=use_rslora,
      modules_to_save=["head"], bias="lora_only", lora_dropout=0.1)
  peft_model = hf_peft.get_peft_model(_torch_net(torch, variables), config)
  generator = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for param in peft_model.parameters():
      if param.requires_grad:  # lora_A/B, the head copy, the LoRA layers' biases
        param.add_(0.1 * torch.randn(param.shape, generator=generator))
  peft_model.save_pretrained(tmp_path)
  expected = _torch_outputs(torch, peft_model.eval(), ids)

  adapter, lora_config = peft.import_peft(tmp_path, variables, None, model.apply, ids)
  assert sorted(adapter.extras) == ["params/conv/bias", "params/head/bias", "params/head/kernel",
                                    "params/mlp/fc1/bias", "params/proj/bias"]
  assert adapter.lora["params/mlp/fc1/kernel"].rank == 2 and lora_config.use_rslora == use_rslora
  factored = jax.jit(jlora.wrap(model.apply))(variables, adapter, ids)
  merged = model.apply(jlora.merge(variables, adapter), ids)
  assert np.abs(expected - model.apply(variables, ids)).max() > 0.1  # the adapter matters
  print(f"max |jlora - peft|: factored {np.abs(factored - expected).max():.2e}, "
        f"merged {np.abs(merged - expected).max():.2e}, |y| max {np.abs(expected).max():.1f}")
  np.testing.assert_allclose(factored, expected, rtol=0, atol=1e-5)
  np.testing.assert_allclose(merged, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_jlora_trained_adapter_loads_in_peft_with_equal_outputs(tmp_path, nets, use_rslora):
  torch, model, variables, ids = nets
  import optax
  import peft as hf_peft

  config = jlora.LoraConfig(
      rank=4, alpha=8.0, targets=r"params/(embed|conv|proj|out|mlp/fc1|mlp/fc2)/(kernel|embedding)",
      rank_pattern={"params/mlp/fc1/kernel": 2}, alpha_pattern={"params/out/kernel": 3.0},
      use_rslora=use_rslora, trainable=(r"params/head/.*", r"params/(mlp/fc1|proj)/bias"))
  adapter = jlora.init(jax.random.key(1), variables, config, model.apply, ids)
  lora_apply = jlora.wrap(model.apply)
  target = jax.random.normal(jax.random.key(2), (*ids.shape, 5))
  optimizer = optax.adam(0.1)

  @jax.jit
  def step(adapter, opt_state):
    grads = jax.grad(lambda a: jnp.mean((lora_apply(variables, a, ids) - target) ** 2))(adapter)
    updates, opt_state = optimizer.update(grads, opt_state, adapter)
    return optax.apply_updates(adapter, updates), opt_state

  state = (adapter, optimizer.init(adapter))
  for _ in range(5):
    state = step(*state)
  adapter = state[0]
  assert float(jnp.abs(adapter.lora["params/mlp/fc2/kernel"].b).max()) > 0.1  # it trained

  peft.export_peft(tmp_path, adapter, None, config=config)
  peft_model = hf_peft.PeftModel.from_pretrained(_torch_net(torch, variables), tmp_path)
  got = _torch_outputs(torch, peft_model.eval(), ids)
  expected = jax.jit(lora_apply)(variables, adapter, ids)
  assert np.abs(expected - model.apply(variables, ids)).max() > 0.1  # the adapter matters
  print(f"max |peft - jlora|: {np.abs(got - expected).max():.2e}, "
        f"|y| max {np.abs(expected).max():.1f}")
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
  scaling = peft_model.base_model.model.out.scaling["default"]
  assert scaling == adapter.lora["params/out/kernel"].scale


@pytest.mark.parametrize("changes, error, match", [
    (dict(b=np.zeros((3, 6), np.float32)), ValueError, r"params/fc1/kernel: a has rank 2 "
     r"\(shape \(2, 8\)\) but b has rank 3"),
    (dict(a=np.zeros((2, 7), np.float32)), ValueError, r"params/fc1/kernel: the kernel \(8, 6\) "
     r"needs a of shape \(\.\.\., rank, 8\)"),
    (dict(a=[[0.0] * 8] * 2), TypeError, r"params/fc1/kernel: factor a is a list, not an array"),
])
def test_export_refuses_inconsistent_factors_and_writes_nothing(tmp_path, changes, error, match):
  adapter = jlora.init(jax.random.key(0), DENSE,
                       jlora.LoraConfig(rank=2, alpha=4.0, targets=".*/kernel"))
  bad = dataclasses.replace(adapter, lora=adapter.lora | {
      "params/fc1/kernel": dataclasses.replace(adapter.lora["params/fc1/kernel"], **changes)})
  with pytest.raises(error, match=match + r".*Fix:"):
    peft.export_peft(tmp_path / "out", bad)
  assert os.listdir(tmp_path) == []
  peft.export_peft(tmp_path / "out", adapter)
  assert sorted(os.listdir(tmp_path / "out")) == ["adapter_config.json",
                                                  "adapter_model.safetensors"]
