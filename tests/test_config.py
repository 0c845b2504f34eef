"""Tests for jlora/config.py: validation, pattern lookups, scales and JSON round trips."""

import copy
import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora

BASE = dict(rank=4, alpha=8.0, targets=r".*/kernel")


def _config(**overrides) -> jlora.LoraConfig:
  return jlora.LoraConfig(**(BASE | overrides))


# --- validation: one error per bad field, each with a paired success ------------------------

BAD_FIELDS = [
    # (overrides, exception, message regex)
    (dict(rank=0), ValueError, r"rank must be an integer >= 1, got 0 for 'rank'"),
    (dict(rank=-3), ValueError, r"rank must be an integer >= 1, got -3"),
    (dict(rank=2.0), ValueError, r"rank must be an integer >= 1, got 2\.0"),
    (dict(rank=True), ValueError, r"rank must be an integer >= 1, got True"),
    (dict(alpha=math.nan), ValueError, r"alpha must be a finite number > 0, got nan"),
    (dict(alpha=0.0), ValueError, r"alpha must be a finite number > 0, got 0\.0 for 'alpha'\. "
     r"Fix:"),
    (dict(alpha=-8), ValueError, r"alpha must be a finite number > 0, got -8"),
    (dict(alpha=True), ValueError, r"alpha must be a finite number > 0, got True"),
    (dict(alpha=np.bool_(True)), ValueError, r"alpha must be a finite number > 0, got True"),
    (dict(alpha_pattern={".*": -1.0}), ValueError, r"got -1\.0 for '\.\*'"),
    (dict(rank=np.float32(2)), ValueError, r"rank must be an integer >= 1, got 2\.0"),
    (dict(rank=jnp.int32(0)), ValueError, r"rank must be an integer >= 1, got 0 for 'rank'"),
    (dict(dtype=None), ValueError, r"dtype=None is not a dtype\. Fix: use 'float32'"),
    (dict(dtype="float64"), ValueError, r"dtype='float64' cannot be held by JAX as configured.*"
     r"Fix: .*jax_enable_x64"),
    (dict(dtype=jnp.int8), ValueError, r"dtype.*int8.*is not a floating dtype.*Fix:"),
    (dict(dtype="complex64"), ValueError, r"is not a floating dtype"),
    (dict(alpha="8"), ValueError, r"alpha must be a finite number > 0, got '8'"),
    (dict(targets="(query"), ValueError, r"LoraConfig\.targets: '\(query' is not a valid regex"),
    (dict(targets=[".*/kernel", "[a-"]), ValueError, r"targets: '\[a-' is not a valid regex"),
    (dict(targets=[]), ValueError, r"LoraConfig\.targets is empty"),
    (dict(targets=5), TypeError, r"LoraConfig\.targets"),
    (dict(exclude="*bias"), ValueError, r"LoraConfig\.exclude: '\*bias' is not a valid regex"),
    (dict(trainable="(norm"), ValueError, r"LoraConfig\.trainable: '\(norm' is not a valid"),
    (dict(rank_pattern={"(q": 2}), ValueError, r"LoraConfig\.rank_pattern: '\(q' is not a valid"),
    (dict(rank_pattern={".*query.*": 2.5}), ValueError,
     r"rank must be an integer >= 1, got 2\.5 for '\.\*query\.\*'"),
    (dict(rank_pattern={".*query.*": "8"}), ValueError, r"rank must be an integer >= 1, got '8'"),
    (dict(rank_pattern={".*query.*": 0}), ValueError, r"got 0 for '\.\*query\.\*'"),
    (dict(rank_pattern=5), TypeError, r"LoraConfig\.rank_pattern must map regexes to values"),
    (dict(alpha_pattern={".*": math.inf}), ValueError,
     r"alpha must be a finite number > 0, got inf"),
    (dict(dropout=1.0), ValueError, r"dropout must be in \[0, 1\), got self\.dropout=1\.0"),
    (dict(dropout=-0.1), ValueError, r"dropout must be in \[0, 1\)"),
    (dict(dropout="0.1"), (TypeError, ValueError), r"LoraConfig.*dropout"),
    (dict(init="xavier"), ValueError, r"unknown init scheme 'xavier'.*kaiming.*gaussian"),
    (dict(init="Kaiming"), ValueError, r"unknown init scheme 'Kaiming'"),
    (dict(dtype="float33"), ValueError, r"self\.dtype='float33' is not a floating dtype"),
    (dict(dtype="int32"), ValueError, r"dtype.*int32"),
    (dict(use_rslora="no"), TypeError, r"LoraConfig.*use_rslora"),
    (dict(roles={".*": "iq"}), ValueError,
     r"roles\['\.\*'\] = 'iq' is not a roles string\. Fix: give one letter per kernel"),
    (dict(roles={".*": "ii"}), ValueError, r"at least one 'i' and one 'o'"),
    (dict(roles={".*": "so"}), ValueError, r"at least one 'i' and one 'o'"),
    (dict(roles={".*": 3}), ValueError, r"roles\['\.\*'\] = 3"),
    (dict(roles={"(": "io"}), ValueError, r"LoraConfig\.roles: '\(' is not a valid regex"),
]


@pytest.mark.parametrize("overrides, error, match", BAD_FIELDS,
                         ids=[f"{k}={v!r}" for o, *_ in BAD_FIELDS for k, v in o.items()])
def test_bad_field_raises_one_clear_error_and_leaves_input_unchanged(overrides, error, match):
  before = copy.deepcopy(overrides)
  with pytest.raises(error, match=match):
    _config(**overrides)
  assert overrides == before


GOOD_FIELDS = [
    dict(rank=1),
    dict(rank=512),
    dict(alpha=0.5),
    dict(alpha=16),
    dict(targets=[r".*/query/kernel", r".*/value/kernel"]),
    dict(targets=lambda path, leaf: path.endswith("kernel")),
    dict(exclude=r".*head.*"),
    dict(trainable=[r".*/bias", r".*/scale"]),
    dict(rank_pattern={r".*query.*": 2}),
    dict(rank_pattern=[(r".*query.*", 2), (r".*", 3)]),
    dict(alpha_pattern={r".*query.*": 0.5}),
    dict(use_rslora=True),
    dict(dropout=0.0),
    dict(dropout=0.99),
    dict(init="kaiming"),
    dict(init="gaussian"),
    dict(dtype="bfloat16"),
    dict(dtype=jnp.float16),
    dict(roles={r".*attn/out/kernel": "sioo", r".*": "io"}),
]


@pytest.mark.parametrize("overrides", GOOD_FIELDS, ids=lambda o: next(iter(o)))
def test_good_field_is_accepted_and_config_is_hashable(overrides):
  config = _config(**overrides)
  hash(config)  # a static argument of jax.jit
  for name in ("exclude", "trainable", "rank_pattern", "alpha_pattern", "roles"):
    assert isinstance(getattr(config, name), tuple)
  if not callable(config.targets):
    assert isinstance(config.targets, tuple)


def test_dtype_is_normalised_to_its_name():
  assert _config().dtype == "float32"
  assert _config(dtype=jnp.bfloat16).dtype == "bfloat16"
  assert _config(dtype="bfloat16") == _config(dtype=jnp.bfloat16)


def test_config_is_frozen_and_keyword_only():
  config = _config()
  with pytest.raises(dataclasses.FrozenInstanceError):
    config.rank = 8  # type: ignore[misc]
  with pytest.raises(TypeError, match="positional"):
    jlora.LoraConfig(4, 8.0, ".*")  # type: ignore[misc]


def test_config_is_a_static_argument_of_jit():
  scale = jax.jit(lambda x, config: x * config.scale_for("params/fc/kernel"),
                  static_argnums=1)
  assert float(scale(jnp.float32(1.0), _config(rank=4, alpha=8.0))) == 2.0
  assert float(scale(jnp.float32(1.0), _config(rank=4, alpha=4.0))) == 1.0


# --- targets, exclude, trainable ------------------------------------------------------------


def test_targets_use_fullmatch_on_the_whole_path():
  config = _config(targets=r".*/query/kernel")
  assert config.is_target("params/attn/query/kernel", None)
  assert not config.is_target("params/attn/query/kernel_lora", None)
  assert not config.is_target("params/attn/query/bias", None)


def test_exclude_wins_over_targets():
  config = _config(targets=r".*/kernel", exclude=[r".*/head/.*", r"params/layers_0/.*"])
  assert config.is_target("params/layers_1/attn/kernel", None)
  assert not config.is_target("params/head/kernel", None)
  assert not config.is_target("params/layers_0/attn/kernel", None)


def test_exclude_wins_over_callable_targets():
  config = _config(targets=lambda path, leaf: leaf.ndim == 2, exclude=r".*/head/.*")
  w = jnp.zeros((2, 2))
  assert config.is_target("params/fc/kernel", w)
  assert not config.is_target("params/fc/bias", jnp.zeros(2))
  assert not config.is_target("params/head/kernel", w)


def test_trainable_extras():
  config = _config(trainable=[r".*/bias", r".*/norm/scale"])
  assert config.is_trainable_extra("params/fc/bias")
  assert config.is_trainable_extra("params/norm/scale")
  assert not config.is_trainable_extra("params/fc/kernel")


# --- per-path rank, alpha and scale -----------------------------------------------------------


def test_rank_and_alpha_patterns_first_match_wins():
  config = _config(
      rank=4, alpha=8.0,
      rank_pattern=[(r"params/layers_0/.*", 2), (r".*/query/.*", 16), (r".*", 32)],
      alpha_pattern={r".*/query/.*": 64.0, r"params/layers_0/.*": 1.0},
  )
  # layers_0 query: rank from the first rank pattern, alpha from the first alpha pattern.
  assert config.rank_for("params/layers_0/query/kernel") == 2
  assert config.scale_for("params/layers_0/query/kernel") == 64.0 / 2
  assert config.rank_for("params/layers_1/query/kernel") == 16
  assert config.scale_for("params/layers_1/query/kernel") == 64.0 / 16
  assert config.rank_for("params/layers_1/value/kernel") == 32
  assert config.scale_for("params/layers_0/value/kernel") == 1.0 / 2


def test_rank_default_without_patterns():
  config = _config(rank=4, alpha=8.0)
  assert config.rank_for("anything") == 4
  assert config.scale_for("anything") == 2.0


@pytest.mark.parametrize("rank, alpha", [(1, 1.0), (4, 8.0), (16, 16.0), (64, 8.0)])
def test_rslora_scale_is_alpha_over_sqrt_rank(rank, alpha):
  plain = _config(rank=rank, alpha=alpha)
  rs = _config(rank=rank, alpha=alpha, use_rslora=True)
  assert plain.scale_for("p") == pytest.approx(alpha / rank, rel=1e-15)
  assert rs.scale_for("p") == pytest.approx(alpha / math.sqrt(rank), rel=1e-15)


def test_rslora_scale_uses_the_pattern_rank():
  config = _config(rank=4, alpha=8.0, use_rslora=True, rank_pattern={r".*query.*": 16})
  assert config.scale_for("params/query/kernel") == pytest.approx(8.0 / 4.0)
  assert config.scale_for("params/value/kernel") == pytest.approx(8.0 / 2.0)


def test_roles_for_first_match():
  config = _config(roles=[(r".*/out/kernel", "sioo"), (r".*/kernel", "sio")])
  assert config.roles_for("params/attn/out/kernel") == "sioo"
  assert config.roles_for("params/up/kernel") == "sio"
  assert config.roles_for("params/up/bias") is None


# --- serialisation ----------------------------------------------------------------------------

FULL = dict(
    rank=8, alpha=16.0, targets=[r".*/query/kernel", r".*/value/kernel"], exclude=r".*/head/.*",
    rank_pattern={r"a.*": 4, r"b.*": 2}, alpha_pattern={r"a.*": 4.0}, use_rslora=True,
    dropout=0.1, init="gaussian", dtype="bfloat16", trainable=r".*/bias",
    roles={r".*/out/kernel": "sioo"},
)


def test_json_round_trip_is_equal():
  config = jlora.LoraConfig(**FULL)
  text = config.to_json()
  assert isinstance(json.loads(text), dict)  # plain JSON
  back = jlora.LoraConfig.from_json(text)
  assert back == config
  assert hash(back) == hash(config)


def test_dict_round_trip_is_equal():
  config = jlora.LoraConfig(**FULL)
  assert jlora.LoraConfig.from_dict(config.to_dict()) == config


def test_json_round_trip_keeps_pattern_order_so_first_match_still_wins():
  # Patterns listed in non-alphabetical order: the first one must stay first.
  config = _config(rank_pattern={r"params/z.*": 2, r"params/.*": 8},
                   alpha_pattern={r"params/z.*": 1.0, r"params/.*": 32.0},
                   roles={r".*out/kernel": "iio", r".*/kernel": "io"})
  back = jlora.LoraConfig.from_json(config.to_json())
  assert back.rank_for("params/zeta/kernel") == config.rank_for("params/zeta/kernel") == 2
  assert back.scale_for("params/zeta/kernel") == config.scale_for("params/zeta/kernel")
  assert back.roles_for("params/out/kernel") == "iio"
  assert back == config


def test_callable_targets_cannot_be_serialised():
  config = _config(targets=lambda path, leaf: True)
  with pytest.raises(TypeError, match=r"callable `targets` cannot be serialised.*regexes"):
    config.to_json()
  with pytest.raises(TypeError, match=r"callable `targets` cannot be serialised"):
    config.to_dict()
  assert callable(config.targets)  # unchanged
  assert jlora.LoraConfig.from_json(_config().to_json()) == _config()  # the regex form works


def test_from_dict_rejects_unknown_keys():
  data = _config().to_dict() | {"lora_rank": 8}
  before = copy.deepcopy(data)
  with pytest.raises(ValueError, match=r"unknown keys \['lora_rank'\]"):
    jlora.LoraConfig.from_dict(data)
  assert data == before
  del data["lora_rank"]
  assert jlora.LoraConfig.from_dict(data) == _config()


def test_from_json_validates():
  text = _config().to_json().replace('"init": "kaiming"', '"init": "xavier"')
  with pytest.raises(ValueError, match="unknown init scheme 'xavier'"):
    jlora.LoraConfig.from_json(text)


# --- NumPy and JAX scalars are accepted and stored as Python numbers ----------------------------


@pytest.mark.parametrize("to_scalar", [np.int64, np.int32, jnp.int32, lambda x: jnp.asarray(x)],
                         ids=["np.int64", "np.int32", "jnp.int32", "0-d jax array"])
def test_numpy_and_jax_scalars_become_python_numbers(to_scalar):
  config = jlora.LoraConfig(
      rank=to_scalar(4), alpha=np.float32(8.0), targets=".*/kernel", dropout=np.float64(0.25),
      rank_pattern={".*query.*": to_scalar(2)}, alpha_pattern={".*query.*": jnp.float32(0.5)},
      use_rslora=np.bool_(False))
  assert config == _config(dropout=0.25, rank_pattern={".*query.*": 2},
                           alpha_pattern={".*query.*": 0.5})
  assert type(config.rank) is int and type(config.alpha) is float
  assert type(config.dropout) is float and type(config.use_rslora) is bool
  assert type(config.rank_pattern[0][1]) is int and type(config.alpha_pattern[0][1]) is float
  hash(config)  # a static argument of jax.jit
  assert jlora.LoraConfig.from_json(config.to_json()) == config


def test_traced_rank_is_a_clear_error():
  def make(rank):
    return _config(rank=rank).rank

  with pytest.raises(TypeError, match=r"LoraConfig\.rank is a traced value.*Fix: pass a Python"):
    jax.jit(make)(4)
  assert make(jnp.int32(4)) == 4


@pytest.mark.parametrize("text, match", [
    ('{"rank": 4, "alpha": 8.0, "targets": [".*"]',
     r"the text is not valid JSON \(.*\)\. Fix: pass the whole string"),
    ("", r"the text is not valid JSON"),
    ("[4, 8.0]", r"expected a JSON object of config fields, got \[4, 8\.0\]\. Fix:"),
    ("null", r"expected a JSON object of config fields, got null\. Fix:"),
    ("3", r"expected a JSON object of config fields, got 3\. Fix:"),
])
def test_from_json_of_something_else_is_one_clear_error(text, match):
  with pytest.raises(ValueError, match=r"LoraConfig\.from_json: " + match):
    jlora.LoraConfig.from_json(text)
  with pytest.raises(TypeError, match=r"from_json: expected a JSON string, got NoneType\. Fix:"):
    jlora.LoraConfig.from_json(None)  # type: ignore[arg-type]
  with pytest.raises(TypeError, match=r"from_dict: expected a mapping .* got list\. Fix:"):
    jlora.LoraConfig.from_dict([("rank", 4)])  # type: ignore[arg-type]
  assert jlora.LoraConfig.from_json(_config().to_json().encode()) == _config()
