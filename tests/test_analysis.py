"""Tests for jlora/analysis.py against float64 NumPy references written here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora.analysis import (
    amplification,
    effective_rank,
    numerical_rank,
    subspace_similarity,
    subspace_similarity_grid,
)


def _orthogonal(rng: np.random.Generator, n: int) -> np.ndarray:
  q, _ = np.linalg.qr(rng.standard_normal((n, n)))
  return q


def _with_singular_values(rng: np.random.Generator, shape, sigma) -> np.ndarray:
  """A float64 matrix of `shape` whose singular values are `sigma` (padded with zeros)."""
  u, v = _orthogonal(rng, shape[0]), _orthogonal(rng, shape[1])
  s = np.zeros(shape)
  s[np.arange(len(sigma)), np.arange(len(sigma))] = sigma
  return u @ s @ v.T


def _phi_reference(a1: np.ndarray, a2: np.ndarray, i: int, j: int) -> float:
  """φ via orthogonal projectors onto the top right-singular subspaces, in float64."""
  v1 = np.linalg.svd(a1.astype(np.float64))[2][:i].T  # (d, i)
  v2 = np.linalg.svd(a2.astype(np.float64))[2][:j].T  # (d, j)
  p1, p2 = v1 @ v1.T, v2 @ v2.T
  return float(np.trace(p1 @ p2)) / min(i, j)


# --- subspace_similarity ---------------------------------------------------------------------


def test_subspace_similarity_identical_subspace_is_one():
  a = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
  mix = np.random.default_rng(1).standard_normal((4, 4)).astype(np.float32)
  phi = jax.jit(subspace_similarity, static_argnums=(2, 3))(a, mix @ a, 4, 4)
  np.testing.assert_allclose(phi, 1.0, atol=1e-5)


def test_subspace_similarity_orthogonal_subspaces_is_zero():
  q = _orthogonal(np.random.default_rng(2), 12).astype(np.float32)  # rows orthonormal
  a1, a2 = 3.0 * q[:4], q[4:9]
  phi = jax.jit(subspace_similarity, static_argnums=(2, 3))(a1, a2, 4, 5)
  np.testing.assert_allclose(phi, 0.0, atol=1e-6)


def test_subspace_similarity_nested_subspace_is_one():
  # The top direction of a1 lies in the row space of a2; min(i, j) normalizes to 1.
  q = _orthogonal(np.random.default_rng(3), 10)
  a1 = np.diag([5.0, 1.0]) @ q[:2]
  a2 = q[[0, 5, 6]]
  np.testing.assert_allclose(subspace_similarity(a1, a2, 1, 3), 1.0, atol=1e-5)


@pytest.mark.parametrize("i, j", [(1, 1), (2, 5), (3, 3), (4, 8)])
def test_subspace_similarity_matches_numpy_reference(i, j):
  rng = np.random.default_rng(4)
  a1 = rng.standard_normal((4, 20)).astype(np.float32)
  a2 = rng.standard_normal((8, 20)).astype(np.float32)
  phi = jax.jit(subspace_similarity, static_argnums=(2, 3))(a1, a2, i, j)
  assert phi.shape == () and phi.dtype == jnp.float32
  np.testing.assert_allclose(phi, _phi_reference(a1, a2, i, j), rtol=1e-4, atol=1e-6)


def test_subspace_similarity_casts_low_precision_up():
  a = np.random.default_rng(5).standard_normal((3, 8)).astype(np.float32)
  phi = subspace_similarity(jnp.asarray(a, jnp.bfloat16), jnp.asarray(a, jnp.bfloat16), 2, 3)
  assert phi.dtype == jnp.float32
  np.testing.assert_allclose(phi, 1.0, atol=1e-5)


def test_subspace_similarity_grid_matches_pointwise_and_reference():
  rng = np.random.default_rng(6)
  a1 = rng.standard_normal((3, 10)).astype(np.float32)
  a2 = rng.standard_normal((5, 10)).astype(np.float32)
  grid = jax.jit(subspace_similarity_grid)(a1, a2)
  assert grid.shape == (3, 5) and grid.dtype == jnp.float32
  reference = np.array(
      [[_phi_reference(a1, a2, i, j) for j in range(1, 6)] for i in range(1, 4)]
  )
  np.testing.assert_allclose(grid, reference, rtol=1e-4, atol=1e-6)
  for i, j in [(1, 1), (2, 4), (3, 5)]:
    np.testing.assert_allclose(grid[i - 1, j - 1], subspace_similarity(a1, a2, i, j), atol=1e-6)


def test_subspace_similarity_grid_rank_above_fan_in_is_capped():
  rng = np.random.default_rng(7)
  a8 = rng.standard_normal((8, 16)).astype(np.float32)
  a64 = rng.standard_normal((64, 16)).astype(np.float32)
  grid = subspace_similarity_grid(a8, a64)
  assert grid.shape == (8, 16)
  np.testing.assert_allclose(grid[:, -1], 1.0, atol=1e-5)  # j = fan_in spans all of R^16


@pytest.mark.parametrize(
    "a1_shape, a2_shape, match",
    [
        ((4,), (2, 4), r"a1 must be a 2-D matrix of shape \(rank, fan_in\).*a1\.shape=\(4,\)"),
        ((2, 4), (1, 2, 4), r"(?s)a2 must be a 2-D matrix.*a2\.shape=\(1, 2, 4\).*a2\[0\]"),
        ((2, 8), (2, 6), r"(?s)share fan_in.*a1\.shape=\(2, 8\).*a2\.shape=\(2, 6\).*transpose"),
    ],
)
def test_subspace_similarity_rejects_bad_shapes(a1_shape, a2_shape, match):
  with pytest.raises(ValueError, match=match):
    subspace_similarity(jnp.ones(a1_shape), jnp.ones(a2_shape), 1, 1)
  with pytest.raises(ValueError, match=match):
    subspace_similarity_grid(jnp.ones(a1_shape), jnp.ones(a2_shape))


@pytest.mark.parametrize(
    "i, j, match",
    [
        (0, 1, r"i must be in 1\.\.2 \(the rank of a1.*got i=0"),
        (3, 1, r"i must be in 1\.\.2 \(the rank of a1.*got i=3"),
        (1, 4, r"j must be in 1\.\.3 \(the rank of a2.*got j=4"),
        (1, -1, r"(?s)j must be in 1\.\.3.*got j=-1.*Fix: choose j between 1 and 3"),
    ],
)
def test_subspace_similarity_rejects_out_of_range_i_j(i, j, match):
  a1, a2 = jnp.ones((2, 6)), jnp.ones((3, 6))
  with pytest.raises(ValueError, match=match):
    subspace_similarity(a1, a2, i, j)


def test_subspace_similarity_rejects_non_integer_i():
  with pytest.raises(TypeError, match=r"(?s)i must be a Python int, got i=1\.5.*static"):
    subspace_similarity(jnp.ones((2, 6)), jnp.ones((3, 6)), 1.5, 1)


# --- numerical_rank and effective_rank -------------------------------------------------------


def test_numerical_rank_of_known_singular_values():
  m = _with_singular_values(np.random.default_rng(8), (12, 9), [4.0, 2.0, 1e-3, 1e-9])
  m = m.astype(np.float32)
  assert int(jax.jit(numerical_rank)(m)) == 3  # 1e-9 is below float32 noise
  assert int(numerical_rank(m, rtol=1e-2)) == 2
  assert int(numerical_rank(m, rtol=0.6)) == 1
  assert numerical_rank(m).dtype == jnp.int32
  assert int(numerical_rank(jnp.zeros((3, 5)))) == 0


@pytest.mark.parametrize("rtol", [-0.1, 1.0, float("nan")])
def test_numerical_rank_rejects_bad_rtol(rtol):
  with pytest.raises(ValueError, match=r"rtol must be in \[0, 1\), got rtol="):
    numerical_rank(jnp.eye(3), rtol=rtol)


@pytest.mark.parametrize(
    "sigma",
    [[3.0, 1.0], [1.0, 1.0, 1.0], [5.0, 2.0, 0.5, 0.1], [1.0]],
)
def test_effective_rank_of_known_singular_values(sigma):
  m = _with_singular_values(np.random.default_rng(9), (10, 7), sigma).astype(np.float32)
  p = np.asarray(sigma) / np.sum(sigma)
  expected = np.exp(-np.sum(p * np.log(p)))
  erank = jax.jit(effective_rank)(m)
  assert erank.shape == () and erank.dtype == jnp.float32
  np.testing.assert_allclose(erank, expected, rtol=1e-4)


def test_effective_rank_equal_singular_values_is_rank_and_zero_matrix_is_zero():
  np.testing.assert_allclose(effective_rank(2.0 * jnp.eye(5)[:, :3]), 3.0, rtol=1e-5)
  assert float(effective_rank(jnp.zeros((4, 3)))) == 0.0


@pytest.mark.parametrize("fn", [effective_rank, numerical_rank])
def test_rank_measures_reject_non_matrix(fn):
  with pytest.raises(ValueError, match=r"m must be a 2-D matrix.*m\.shape=\(2, 3, 4\)"):
    fn(jnp.ones((2, 3, 4)))


# --- amplification ---------------------------------------------------------------------------


def _known_structure():
  """W with singular values (10, 5, 2, 0.5, 0.1); ΔW along W's two weakest directions."""
  rng = np.random.default_rng(10)
  u, v = _orthogonal(rng, 7), _orthogonal(rng, 5)
  sigma_w = np.array([10.0, 5.0, 2.0, 0.5, 0.1])
  w = u[:, :5] @ np.diag(sigma_w) @ v.T  # (fan_in=7, fan_out=5)
  delta_w = 3.0 * np.outer(u[:, 3], v[:, 3]) + 1.0 * np.outer(u[:, 4], v[:, 4])
  return w.astype(np.float32), delta_w.astype(np.float32)


def test_amplification_known_structure():
  w, delta_w = _known_structure()
  # ‖ΔW‖_F = sqrt(9 + 1); projecting W onto ΔW's subspace keeps σ = 0.5 and 0.1.
  expected = np.sqrt(10.0) / np.sqrt(0.5**2 + 0.1**2)
  np.testing.assert_allclose(jax.jit(amplification)(delta_w, w), expected, rtol=1e-4)
  np.testing.assert_allclose(amplification(delta_w, w, rank=2), expected, rtol=1e-4)
  # rank=1 keeps only ΔW's top direction (σ_ΔW = 3), where W has σ = 0.5.
  rank1 = jax.jit(amplification, static_argnames="rank")(delta_w, w, rank=1)
  np.testing.assert_allclose(rank1, np.sqrt(10.0) / 0.5, rtol=1e-4)


def test_amplification_is_layout_invariant():
  w, delta_w = _known_structure()
  np.testing.assert_allclose(
      amplification(delta_w.T, w.T), amplification(delta_w, w), rtol=1e-5
  )


def test_amplification_matches_numpy_reference():
  rng = np.random.default_rng(11)
  delta_w = (rng.standard_normal((24, 4)) @ rng.standard_normal((4, 16))).astype(np.float32)
  w = rng.standard_normal((24, 16)).astype(np.float32)
  u, _, vt = np.linalg.svd(delta_w.astype(np.float64))
  projected = u[:, :4].T @ w.astype(np.float64) @ vt[:4].T
  expected = np.linalg.norm(delta_w.astype(np.float64)) / np.linalg.norm(projected)
  result = amplification(delta_w, w)
  assert result.shape == () and result.dtype == jnp.float32
  np.testing.assert_allclose(result, expected, rtol=1e-4)
  np.testing.assert_allclose(amplification(delta_w, w, rank=4), expected, rtol=1e-4)


def test_amplification_casts_low_precision_up():
  w, delta_w = _known_structure()
  result = amplification(jnp.asarray(delta_w, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16))
  assert result.dtype == jnp.float32


@pytest.mark.parametrize(
    "delta_w_shape, w_shape, match",
    [
        ((7,), (7, 5), r"delta_w must be a 2-D matrix of shape \(fan_in, fan_out\)"),
        ((7, 5), (2, 7, 5), r"w must be a 2-D matrix.*w\.shape=\(2, 7, 5\)"),
        ((7, 5), (5, 7), r"same shape.*delta_w\.shape=\(7, 5\) and w\.shape=\(5, 7\)"),
    ],
)
def test_amplification_rejects_bad_shapes(delta_w_shape, w_shape, match):
  with pytest.raises(ValueError, match=match):
    amplification(jnp.ones(delta_w_shape), jnp.ones(w_shape))


@pytest.mark.parametrize("rank", [0, 6])
def test_amplification_rejects_out_of_range_rank(rank):
  w, delta_w = _known_structure()
  with pytest.raises(ValueError, match=rf"rank must be in 1\.\.5 .*got rank={rank}"):
    amplification(delta_w, w, rank=rank)
