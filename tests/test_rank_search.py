"""Tests for jlora/rank_search.py with synthetic train-and-evaluate callbacks."""

import jax.numpy as jnp
import pytest

from jlora.rank_search import RankSearchResult, search_rank

# Validation loss per rank: improves up to r = 4, plateaus (< 1% gains), then drops again at 32.
PLATEAU_AT_4 = {1: 1.0, 2: 0.6, 4: 0.4, 8: 0.399, 16: 0.398, 32: 0.2, 64: 0.199}


class _Recorder:
  """A callback that looks up the loss for a rank and records which ranks were trained."""

  def __init__(self, losses):
    self.losses, self.calls = losses, []

  def __call__(self, rank):
    self.calls.append(rank)
    return self.losses[rank]


def test_search_rank_stops_at_plateau():
  train_and_eval = _Recorder(PLATEAU_AT_4)
  result = search_rank(train_and_eval)
  assert isinstance(result, RankSearchResult)
  assert result.best_rank == 4
  assert train_and_eval.calls == [1, 2, 4, 8]  # nothing past the first non-improving rank
  assert result.history == ((1, 1.0), (2, 0.6), (4, 0.4), (8, 0.399))
  best_rank, history = result  # a NamedTuple unpacks
  assert (best_rank, len(history)) == (4, 4)


def test_search_rank_patience_tries_more_ranks_but_keeps_smallest_on_plateau():
  train_and_eval = _Recorder(PLATEAU_AT_4)
  result = search_rank(train_and_eval, patience=2)
  assert result.best_rank == 4
  assert train_and_eval.calls == [1, 2, 4, 8, 16]


def test_search_rank_patience_resets_after_an_improvement():
  train_and_eval = _Recorder(PLATEAU_AT_4)
  result = search_rank(train_and_eval, patience=3)
  # 8 and 16 stall, 32 improves by 50% and becomes best, 64 stalls and the ranks run out.
  assert result.best_rank == 32
  assert train_and_eval.calls == [1, 2, 4, 8, 16, 32, 64]
  assert [rank for rank, _ in result.history] == [1, 2, 4, 8, 16, 32, 64]


def test_search_rank_min_improvement_sets_the_plateau():
  losses = {1: 1.0, 2: 0.6, 4: 0.4, 8: 0.399, 16: 0.3989}
  # 8 gains 0.25% over 4: a plateau at 1%, an improvement at 0.1%; 16 gains only 0.025%.
  assert search_rank(_Recorder(losses), ranks=losses, min_improvement=0.001).best_rank == 8
  # 2 gains 40% over 1: not enough at 50%.
  assert search_rank(_Recorder(losses), ranks=losses, min_improvement=0.5).best_rank == 1
  # At 0, any strict decrease counts.
  assert search_rank(_Recorder(losses), ranks=losses, min_improvement=0.0).best_rank == 16


def test_search_rank_all_improving_tries_every_rank():
  losses = {r: 1.0 / r for r in (2, 4, 8)}
  train_and_eval = _Recorder(losses)
  result = search_rank(train_and_eval, ranks=[2, 4, 8])
  assert result.best_rank == 8
  assert train_and_eval.calls == [2, 4, 8]


def test_search_rank_worse_score_counts_as_no_improvement():
  result = search_rank(_Recorder({1: 0.5, 2: 0.7, 4: 0.1}), ranks=(1, 2, 4))
  assert result.best_rank == 1
  assert result.history == ((1, 0.5), (2, 0.7))


def test_search_rank_handles_zero_and_negative_losses():
  # Relative improvement uses |best|, so negative losses (e.g. -log-likelihood) work.
  assert search_rank(_Recorder({1: -1.0, 2: -2.0, 4: -2.001}), ranks=(1, 2, 4)).best_rank == 2
  # From a best of 0, any strict decrease is an improvement; equal is not.
  assert search_rank(_Recorder({1: 0.0, 2: -0.5, 4: -0.5}), ranks=(1, 2, 4)).best_rank == 2
  assert search_rank(_Recorder({1: 0.0, 2: 0.0}), ranks=(1, 2)).best_rank == 1


def test_search_rank_single_rank_and_array_scores():
  result = search_rank(lambda rank: jnp.float32(0.25), ranks=(8,))
  assert result == RankSearchResult(best_rank=8, history=((8, 0.25),))
  assert type(result.history[0][1]) is float


@pytest.mark.parametrize(
    "ranks, match",
    [
        ((), r"(?s)ranks is empty.*Fix: pass increasing ranks"),
        ((1, 4, 2), r"(?s)strictly increasing, got ranks=\(1, 4, 2\).*\(1, 2, 4\)"),
        ((1, 2, 2), r"(?s)strictly increasing, got ranks=\(1, 2, 2\).*\(1, 2\)"),
        ((0, 1, 2), r"every rank must be >= 1, got ranks=\(0, 1, 2\)"),
        ((-2,), r"every rank must be >= 1"),
    ],
)
def test_search_rank_rejects_bad_ranks(ranks, match):
  train_and_eval = _Recorder({r: 1.0 for r in range(-2, 5)})
  with pytest.raises(ValueError, match=match):
    search_rank(train_and_eval, ranks=ranks)
  assert train_and_eval.calls == []  # validated before any training


def test_search_rank_rejects_non_integer_ranks():
  with pytest.raises(TypeError, match=r"ranks must be integers, got ranks=\(1, 2\.5\)"):
    search_rank(_Recorder({}), ranks=(1, 2.5))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(min_improvement=-0.1), r"min_improvement must be a finite number >= 0.*=-0\.1"),
        (dict(min_improvement=float("nan")), r"min_improvement must be a finite.*=nan"),
        (dict(patience=0), r"patience must be an int >= 1, got patience=0"),
        (dict(patience=1.5), r"patience must be an int >= 1, got patience=1\.5"),
        (dict(patience=True), r"patience must be an int >= 1, got patience=True"),
    ],
)
def test_search_rank_rejects_bad_options(kwargs, match):
  train_and_eval = _Recorder(PLATEAU_AT_4)
  with pytest.raises(ValueError, match=match):
    search_rank(train_and_eval, **kwargs)
  assert train_and_eval.calls == []


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_search_rank_rejects_non_finite_score(bad):
  train_and_eval = _Recorder({1: 1.0, 2: bad, 4: 0.1})
  with pytest.raises(ValueError, match=r"(?s)train_and_eval\(2\) returned score=.*finite.*rank 2"):
    search_rank(train_and_eval, ranks=(1, 2, 4))
  assert train_and_eval.calls == [1, 2]


def test_search_rank_rejects_non_number_score():
  with pytest.raises(TypeError, match=r"train_and_eval\(1\) returned 'low', not a number"):
    search_rank(lambda rank: "low", ranks=(1, 2))
  with pytest.raises(TypeError, match=r"returned .*not a number"):
    search_rank(lambda rank: jnp.ones(2), ranks=(1, 2))


def test_search_rank_rejects_non_callable():
  with pytest.raises(TypeError, match=r"train_and_eval must be callable, got 0\.5"):
    search_rank(0.5)
