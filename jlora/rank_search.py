"""Choosing a LoRA rank by growing it until validation stops improving.

The LoRA paper (Hu et al., 2021, §7.2 and Table 6) finds that a very small rank often suffices.
`search_rank` turns that into a search around a user-supplied training-and-evaluation callback:
start at r = 1 or 2, increase the rank while the validation loss improves, stop at the plateau.

Reference:
  Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021.
  https://arxiv.org/abs/2106.09685
"""

import math
import operator
from collections.abc import Callable, Iterable
from typing import NamedTuple

DEFAULT_RANKS = (1, 2, 4, 8, 16, 32, 64)


class RankSearchResult(NamedTuple):
  """What `search_rank` found.

  Attributes:
    best_rank: the smallest rank whose score no later rank beat by `min_improvement`.
    history: the `(rank, score)` pairs that were evaluated, in order.

  Example:
    >>> from jlora.rank_search import RankSearchResult
    >>> result = RankSearchResult(best_rank=2, history=((1, 0.9), (2, 0.5), (4, 0.5)))
    >>> best_rank, history = result
    >>> best_rank, len(history)
    (2, 3)
  """

  best_rank: int
  history: tuple[tuple[int, float], ...]


def _check_ranks(ranks: Iterable[int]) -> tuple[int, ...]:
  ranks = tuple(ranks)
  if not ranks:
    raise ValueError(
        "search_rank: ranks is empty.\n"
        f"  Fix: pass increasing ranks to try, e.g. ranks={DEFAULT_RANKS}."
    )
  try:
    checked = tuple(operator.index(r) for r in ranks)
  except TypeError:
    raise TypeError(
        f"search_rank: ranks must be integers, got {ranks=}.\n"
        f"  Fix: pass Python ints, e.g. ranks={DEFAULT_RANKS}."
    ) from None
  if min(checked) < 1:
    raise ValueError(
        f"search_rank: every rank must be >= 1, got {ranks=}.\n"
        "  Fix: drop the ranks below 1; the search starts at r = 1 or 2."
    )
  if any(a >= b for a, b in zip(checked[:-1], checked[1:], strict=True)):
    raise ValueError(
        f"search_rank: ranks must be strictly increasing, got {ranks=}.\n"
        f"  Fix: sort them and remove duplicates, e.g. {tuple(sorted(set(checked)))}."
    )
  return checked


def _check_options(min_improvement: float, patience: int) -> None:
  if not (math.isfinite(min_improvement) and min_improvement >= 0):
    raise ValueError(
        f"search_rank: min_improvement must be a finite number >= 0, got {min_improvement=}.\n"
        "  Fix: pass a relative improvement such as 0.01 (1%), or 0 to accept any decrease."
    )
  if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
    raise ValueError(
        f"search_rank: patience must be an int >= 1, got {patience=}.\n"
        "  Fix: pass how many ranks in a row may fail to improve before stopping, e.g. 1."
    )


def _score(train_and_eval: Callable[[int], float], rank: int) -> float:
  raw = train_and_eval(rank)
  try:
    score = float(raw)
  except (TypeError, ValueError):
    raise TypeError(
        f"search_rank: train_and_eval({rank}) returned {raw!r}, not a number.\n"
        "  Fix: return the validation loss as one float (a scalar array also works)."
    ) from None
  if not math.isfinite(score):
    raise ValueError(
        f"search_rank: train_and_eval({rank}) returned score={score}; scores must be"
        " finite validation losses.\n"
        f"  Fix: check the run at rank {rank} (did training diverge? try a lower learning"
        " rate)."
    )
  return score


def search_rank(
    train_and_eval: Callable[[int], float],
    ranks: Iterable[int] = DEFAULT_RANKS,
    *,
    min_improvement: float = 0.01,
    patience: int = 1,
) -> RankSearchResult:
  """Grows the LoRA rank while the validation loss improves; stops at the plateau.

  Ranks are tried in order. A rank improves on the best score so far when

    best - score >= min_improvement · |best|   and   score < best,

  i.e. it lowers the loss by at least `min_improvement` relative to the best. An improving rank
  becomes the best; after `patience` ranks in a row that do not improve, the search stops and
  the remaining ranks are never trained. So `best_rank` is the smallest rank at the plateau:
  larger ranks that gain less than `min_improvement` do not replace it.

  Args:
    train_and_eval: called as `train_and_eval(rank)`; trains an adapter of that rank and
      returns its validation loss (lower is better) as a finite float.
    ranks: strictly increasing ranks >= 1 to try, smallest first.
    min_improvement: smallest relative decrease of the loss that counts, >= 0.
    patience: how many ranks in a row may fail to improve before stopping, >= 1.

  Returns:
    A `RankSearchResult(best_rank, history)`; `history` holds a `(rank, score)` pair for each
    rank that was evaluated, in order.

  Raises:
    ValueError: if `ranks` is empty, not strictly increasing or has a rank < 1, if
      `min_improvement` or `patience` is out of range, or if a score is not finite.
    TypeError: if a rank is not an integer or `train_and_eval` returns a non-number.

  Example:
    >>> from jlora.rank_search import search_rank
    >>> losses = {1: 2.0, 2: 1.5, 4: 1.2, 8: 1.195, 16: 1.19, 32: 1.18, 64: 1.17}
    >>> result = search_rank(losses.__getitem__)
    >>> result.best_rank
    4
    >>> [rank for rank, _ in result.history]  # 16, 32 and 64 were never trained
    [1, 2, 4, 8]
  """
  if not callable(train_and_eval):
    raise TypeError(
        f"search_rank: train_and_eval must be callable, got {train_and_eval!r}.\n"
        "  Fix: pass a function rank -> validation loss."
    )
  ranks = _check_ranks(ranks)
  _check_options(min_improvement, patience)
  best_rank, best, stalls, history = ranks[0], _score(train_and_eval, ranks[0]), 0, []
  history.append((best_rank, best))
  for rank in ranks[1:]:
    score = _score(train_and_eval, rank)
    history.append((rank, score))
    if score < best and best - score >= min_improvement * abs(best):
      best_rank, best, stalls = rank, score, 0
    else:
      stalls += 1
      if stalls >= patience:
        break
  return RankSearchResult(best_rank=best_rank, history=tuple(history))
