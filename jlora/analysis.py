"""Analysis of low-rank updates, after §7 of the LoRA paper.

Pure `jax.numpy` functions on plain 2-D matrices (one kernel or one factor at a time):

* `subspace_similarity` and `subspace_similarity_grid` compare the subspaces spanned by the
  top singular directions of two LoRA factors A (Hu et al., 2021, §7.2, Figure 3).
* `amplification` measures how much an update ΔW amplifies directions that are weak in W
  (Hu et al., 2021, §7.3, Table 7).
* `effective_rank` (Roy & Vetterli, 2007) and `numerical_rank` say how many directions an
  update really uses.

Every function computes in at least float32 (lower-precision inputs are cast up) and runs under
`jax.jit`; integer arguments such as `i`, `j` and `rank` must then be static.

References:
  Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021.
  https://arxiv.org/abs/2106.09685
  Roy & Vetterli, "The effective rank: a measure of effective dimensionality", EUSIPCO 2007.
"""

import functools
import operator

import jax
import jax.numpy as jnp

# Each public function validates shapes and integer arguments eagerly, then calls a jitted core.
_HIGHEST = jax.lax.Precision.HIGHEST  # full float32 matmuls, also on TPU and GPU


def _as_matrix(fn: str, name: str, x: jax.typing.ArrayLike, layout: str) -> jax.Array:
  """Checks that `x` is 2-D and returns it in at least float32."""
  x = jnp.asarray(x)
  if x.ndim != 2:
    raise ValueError(
        f"{fn}: {name} must be a 2-D matrix of shape {layout},"
        f" got {name}.shape={x.shape}.\n"
        f"  Fix: pass one matrix; for a stacked (scanned) adapter or kernel, index one"
        f" layer first, e.g. {name}[0]."
    )
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_count(fn: str, name: str, value: int, upper: int, what: str) -> int:
  """Checks that `value` is a Python integer in 1..upper and returns it as an int."""
  try:
    value = operator.index(value)
  except TypeError:
    raise TypeError(
        f"{fn}: {name} must be a Python int, got {name}={value!r}.\n"
        f"  Fix: pass a concrete integer; under jax.jit mark {name} as a static argument."
    ) from None
  if not 1 <= value <= upper:
    raise ValueError(
        f"{fn}: {name} must be in 1..{upper} ({what}), got {name}={value}.\n"
        f"  Fix: choose {name} between 1 and {upper}."
    )
  return value


def _right_singular_vectors(a: jax.Array) -> jax.Array:
  """Rows of Vh in a = U·diag(s)·Vh, by decreasing singular value: shape (min(a.shape), d)."""
  return jnp.linalg.svd(a, full_matrices=False)[2]


def _check_factors(fn: str, a1: jax.typing.ArrayLike, a2: jax.typing.ArrayLike):
  layout = "(rank, fan_in)"
  a1, a2 = _as_matrix(fn, "a1", a1, layout), _as_matrix(fn, "a2", a2, layout)
  if a1.shape[1] != a2.shape[1]:
    raise ValueError(
        f"{fn}: a1 and a2 must share fan_in (their last axis), got a1.shape={a1.shape} and"
        f" a2.shape={a2.shape}.\n"
        f"  Fix: compare the A factors of the same kernel, both laid out (rank, fan_in);"
        f" transpose a factor stored as (fan_in, rank)."
    )
  return a1, a2


def subspace_similarity(
    a1: jax.typing.ArrayLike, a2: jax.typing.ArrayLike, i: int, j: int
) -> jax.Array:
  """Normalized similarity of the top-i and top-j right-singular subspaces of two factors.

  With A = U·diag(σ)·Vᵀ, let V_i (fan_in, i) hold the right-singular vectors of `a1` for its
  i largest singular values, and V_j those of `a2` for its j largest. Then

    φ(A1, A2, i, j) = ‖V_iᵀ V_j‖²_F / min(i, j)  ∈ [0, 1],

  which is 1 when one subspace contains the other and 0 when they are orthogonal. This is the
  paper's φ (§7.2, eq. 4), whose "U_A" is the right-singular matrix of A ∈ R^{r×d}: the paper
  lays A out as (rank, fan_in), as `jlora` does. Directions whose singular value is zero are
  arbitrary, so keep i and j within the numerical rank of each factor.

  Args:
    a1: a LoRA factor A of shape (rank1, fan_in).
    a2: a LoRA factor A of shape (rank2, fan_in), e.g. from a run with another rank or seed.
    i: how many top directions of `a1` to compare, 1 <= i <= min(a1.shape).
    j: how many top directions of `a2` to compare, 1 <= j <= min(a2.shape).

  Returns:
    A float32 scalar in [0, 1].

  Raises:
    ValueError: if `a1` or `a2` is not 2-D, their fan_in differ, or i or j is out of range.
    TypeError: if i or j is not an integer.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jlora.analysis import subspace_similarity
    >>> a = jax.random.normal(jax.random.key(0), (4, 16))
    >>> round(float(subspace_similarity(a, 2.0 * a[::-1], 4, 4)), 4)  # same row space
    1.0
    >>> round(float(subspace_similarity(jnp.eye(16)[:4], jnp.eye(16)[4:8], 4, 4)), 4)
    0.0
  """
  fn = "subspace_similarity"
  a1, a2 = _check_factors(fn, a1, a2)
  i = _check_count(fn, "i", i, min(a1.shape), "the rank of a1, min(a1.shape)")
  j = _check_count(fn, "j", j, min(a2.shape), "the rank of a2, min(a2.shape)")
  return _subspace_similarity(a1, a2, i, j)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _subspace_similarity(a1: jax.Array, a2: jax.Array, i: int, j: int) -> jax.Array:
  v1, v2 = _right_singular_vectors(a1)[:i], _right_singular_vectors(a2)[:j]
  overlap = jnp.matmul(v1, v2.T, precision=_HIGHEST)  # (i, j)
  return jnp.sum(overlap**2) / min(i, j)


def subspace_similarity_grid(a1: jax.typing.ArrayLike, a2: jax.typing.ArrayLike) -> jax.Array:
  """φ(A1, A2, i, j) for every i and j at once, as drawn in the paper's heat maps (Figure 3).

  Entry [i - 1, j - 1] equals `subspace_similarity(a1, a2, i, j)`. Each factor is decomposed
  once: with G = (V1ᵀ V2)² elementwise, ‖V_iᵀ V_j‖²_F is the sum of G over its first i rows
  and j columns, so the grid is a 2-D cumulative sum of G divided by min(i, j).

  Args:
    a1: a LoRA factor A of shape (rank1, fan_in).
    a2: a LoRA factor A of shape (rank2, fan_in).

  Returns:
    A float32 array of shape (min(a1.shape), min(a2.shape)) with values in [0, 1].

  Raises:
    ValueError: if `a1` or `a2` is not 2-D or their fan_in differ.

  Example:
    >>> import jax
    >>> from jlora.analysis import subspace_similarity_grid
    >>> a8 = jax.random.normal(jax.random.key(0), (8, 32))
    >>> a64 = jax.random.normal(jax.random.key(1), (64, 32))
    >>> grid = subspace_similarity_grid(a8, a64)
    >>> grid.shape
    (8, 32)
    >>> bool(jax.numpy.allclose(grid[:, -1], 1.0, atol=1e-5))  # j = fan_in spans everything
    True
  """
  return _subspace_similarity_grid(*_check_factors("subspace_similarity_grid", a1, a2))


@jax.jit
def _subspace_similarity_grid(a1: jax.Array, a2: jax.Array) -> jax.Array:
  v1, v2 = _right_singular_vectors(a1), _right_singular_vectors(a2)
  overlap_sq = jnp.matmul(v1, v2.T, precision=_HIGHEST) ** 2  # (k1, k2)
  sums = jnp.cumsum(jnp.cumsum(overlap_sq, axis=0), axis=1)
  i = jnp.arange(1, v1.shape[0] + 1)[:, None]
  j = jnp.arange(1, v2.shape[0] + 1)[None, :]
  return sums / jnp.minimum(i, j).astype(sums.dtype)


def _default_rtol(shape: tuple[int, ...], dtype) -> float:
  return max(shape) * float(jnp.finfo(dtype).eps)


def numerical_rank(m: jax.typing.ArrayLike, *, rtol: float | None = None) -> jax.Array:
  """Counts the singular values of `m` above a threshold relative to the largest.

  rank = #{k : σ_k > rtol · σ_max}. The default rtol = max(m.shape) · eps of the compute dtype
  (float32 unless `m` is float64) follows NumPy's `matrix_rank`. A zero matrix has rank 0.

  Args:
    m: a 2-D matrix, e.g. an update ΔW of shape (fan_in, fan_out).
    rtol: relative threshold in [0, 1); None for the default above.

  Returns:
    An int32 scalar.

  Raises:
    ValueError: if `m` is not 2-D or `rtol` is not in [0, 1).

  Example:
    >>> import jax
    >>> from jlora.analysis import numerical_rank
    >>> k1, k2 = jax.random.split(jax.random.key(0))
    >>> delta_w = jax.random.normal(k1, (32, 3)) @ jax.random.normal(k2, (3, 16))
    >>> int(numerical_rank(delta_w))
    3
  """
  m = _as_matrix("numerical_rank", "m", m, "(rows, columns)")
  if rtol is None:
    rtol = _default_rtol(m.shape, m.dtype)
  elif not 0.0 <= float(rtol) < 1.0:
    raise ValueError(
        f"numerical_rank: rtol must be in [0, 1), got {rtol=}.\n"
        f"  Fix: pass a small relative tolerance such as 1e-5, or None for the default."
    )
  return _numerical_rank(m, float(rtol))


@functools.partial(jax.jit, static_argnums=1)
def _numerical_rank(m: jax.Array, rtol: float) -> jax.Array:
  s = jnp.linalg.svdvals(m)
  return jnp.sum(s > rtol * s[0]).astype(jnp.int32)


def effective_rank(m: jax.typing.ArrayLike) -> jax.Array:
  """Entropy-based effective rank of `m` (Roy & Vetterli, 2007).

  With singular values σ_k and p_k = σ_k / Σ_l σ_l, the effective rank is

    erank(m) = exp(-Σ_k p_k · log p_k),   taking 0 · log 0 = 0.

  It is a real number between 1 and the rank of `m`, equal to the rank when all nonzero singular
  values are equal, and smaller when a few directions dominate. A zero matrix gives 0.

  Args:
    m: a 2-D matrix, e.g. an update ΔW of shape (fan_in, fan_out).

  Returns:
    A float32 scalar.

  Raises:
    ValueError: if `m` is not 2-D.

  Example:
    >>> import jax.numpy as jnp
    >>> from jlora.analysis import effective_rank
    >>> round(float(effective_rank(jnp.diag(jnp.array([2.0, 2.0, 2.0, 0.0])))), 4)
    3.0
    >>> float(effective_rank(jnp.diag(jnp.array([1.0, 1e-9])))) < 1.01  # one dominates
    True
  """
  return _effective_rank(_as_matrix("effective_rank", "m", m, "(rows, columns)"))


@jax.jit
def _effective_rank(m: jax.Array) -> jax.Array:
  s = jnp.linalg.svdvals(m)
  total = jnp.sum(s)
  p = s / jnp.where(total > 0, total, 1.0)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  return jnp.where(total > 0, jnp.exp(entropy), 0.0)


def amplification(
    delta_w: jax.typing.ArrayLike, w: jax.typing.ArrayLike, *, rank: int | None = None
) -> jax.Array:
  """How much an update ΔW amplifies directions of W: ‖ΔW‖_F / ‖U_rᵀ W V_r‖_F.

  U_r (fan_in, r) and V_r (fan_out, r) hold the left and right singular vectors of ΔW for its r
  largest singular values, so U_rᵀ W V_r is W projected onto the r-dimensional subspace of ΔW
  (Hu et al., 2021, §7.3, Table 7). A large factor means ΔW boosts directions that W barely
  uses. Both matrices use Flax's kernel layout (fan_in, fan_out); the paper's (fan_out, fan_in)
  layout transposes both and gives the same value. The numerator is the norm of the whole ΔW.

  Args:
    delta_w: the update ΔW of shape (fan_in, fan_out), e.g. the merged kernel minus `w`.
    w: the pretrained kernel W, same shape as `delta_w`.
    rank: r, with 1 <= r <= min(delta_w.shape); None uses the numerical rank of ΔW
      (see `numerical_rank`), for which a zero ΔW gives NaN.

  Returns:
    A float32 scalar; +inf if W has no component in ΔW's subspace.

  Raises:
    ValueError: if an input is not 2-D, the shapes differ, or `rank` is out of range.
    TypeError: if `rank` is not an integer or None.

  Example:
    >>> import jax.numpy as jnp
    >>> from jlora.analysis import amplification
    >>> w = jnp.diag(jnp.array([10.0, 1.0, 0.1]))
    >>> delta_w = jnp.diag(jnp.array([0.0, 0.0, 2.0]))  # boosts W's weakest direction
    >>> round(float(amplification(delta_w, w)), 4)
    20.0
  """
  fn = "amplification"
  delta_w = _as_matrix(fn, "delta_w", delta_w, "(fan_in, fan_out)")
  w = _as_matrix(fn, "w", w, "(fan_in, fan_out)")
  if delta_w.shape != w.shape:
    raise ValueError(
        f"{fn}: delta_w and w must have the same shape,"
        f" got delta_w.shape={delta_w.shape} and w.shape={w.shape}.\n"
        f"  Fix: pass the update and the kernel it applies to, both (fan_in, fan_out)."
    )
  if rank is not None:
    rank = _check_count(fn, "rank", rank, min(delta_w.shape), "at most min(delta_w.shape)")
  return _amplification(delta_w, w, rank)


@functools.partial(jax.jit, static_argnums=2)
def _amplification(delta_w: jax.Array, w: jax.Array, rank: int | None) -> jax.Array:
  u, s, vh = jnp.linalg.svd(delta_w, full_matrices=False)  # u (fan_in, k), vh (k, fan_out)
  # A mask rather than a slice keeps the data-dependent numerical rank traceable.
  if rank is None:
    keep = s > _default_rtol(delta_w.shape, s.dtype) * s[0]
  else:
    keep = jnp.arange(s.shape[0]) < rank
  projected = jnp.matmul(jnp.matmul(u.T, w, precision=_HIGHEST), vh.T, precision=_HIGHEST)
  projected = jnp.where(keep[:, None] & keep[None, :], projected, 0.0)  # (k, k) -> top r x r
  return jnp.linalg.norm(delta_w) / jnp.linalg.norm(projected)
