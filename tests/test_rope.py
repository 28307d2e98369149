"""RoPE tests (docs/algorithms.md 7.1 RP-1..RP-5, 7.3 2-D RoPE)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from models import rope


def _rng(seed=0):
  return np.random.default_rng(seed)


def test_rp1_relativity():
  """<R_m q, R_n k> == <R_{m+c} q, R_{n+c} k> (depends only on n - m)."""
  d = 16
  q, k = _rng().normal(size=(2, d))
  pos = jnp.array([3, 11, 3 + 7, 11 + 7, 3 + 100, 11 + 100])
  rq = rope.apply_rope(jnp.broadcast_to(q, (6, d)), pos, head_axis=False)
  rk = rope.apply_rope(jnp.broadcast_to(k, (6, d)), pos, head_axis=False)
  dots = [float(jnp.dot(rq[i], rk[i + 1])) for i in (0, 2, 4)]
  np.testing.assert_allclose(dots, dots[0], rtol=1e-5)
  # and <R_m q, R_n k> = <q, R_{n-m} k>
  r = rope.rotation_matrix(11 - 3, d)
  np.testing.assert_allclose(dots[0], q @ r @ k, rtol=1e-5)


def test_rp2_matrix_form_equals_elementwise():
  d, n = 8, 5
  x = _rng(1).normal(size=(n, 3, d)).astype(np.float32)  # [n, h, d_h]
  positions = np.array([0, 1, 2, 7, 33])
  y = np.asarray(rope.apply_rope(jnp.asarray(x), jnp.asarray(positions), base=10000.0))
  for t, m in enumerate(positions):
    expected = x[t] @ rope.rotation_matrix(m, d).T
    np.testing.assert_allclose(y[t], expected, atol=1e-5)


def test_rp3_norm_preserved_and_identity_at_zero():
  x = jnp.asarray(_rng(2).normal(size=(4, 2, 16)), jnp.float32)
  pos = jnp.array([0, 5, 50, 500])
  y = rope.apply_rope(x, pos)
  np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
  np.testing.assert_allclose(y[0], x[0], atol=0)
  r = rope.rotation_matrix(17, 16)
  np.testing.assert_allclose(r @ r.T, np.eye(16), atol=1e-12)


def test_rp4_layout_conversion_is_a_permutation():
  d = 12
  x = jnp.asarray(_rng(3).normal(size=(6, 2, d)), jnp.float32)
  pos = jnp.arange(6) * 3
  perm = rope.interleaved_to_rotate_half(d)
  inv = rope.rotate_half_to_interleaved(d)
  assert sorted(perm.tolist()) == list(range(d))
  np.testing.assert_array_equal(perm[inv], np.arange(d))
  np.testing.assert_array_equal(rope.pairs_first(x), x[..., perm])
  y_interleaved = rope.apply_rope(x, pos)
  y_half = rope.apply_rope_rotate_half(x[..., perm], pos)
  np.testing.assert_allclose(y_half[..., inv], y_interleaved, atol=1e-6)
  # Scores agree too (what checkpoint import relies on).
  s1 = jnp.einsum('nhd,mhd->hnm', y_interleaved, y_interleaved)
  s2 = jnp.einsum('nhd,mhd->hnm', y_half, y_half)
  np.testing.assert_allclose(s1, s2, atol=1e-5)


@pytest.mark.parametrize('m,expected', [(0, 32.5), (10, 17.954), (100, 10.227), (256, 6.543)])
def test_rp5_long_range_decay(m, expected):
  assert rope.long_range_decay(m, 128) == pytest.approx(expected, abs=5e-4)


def test_odd_dim_rejected():
  with pytest.raises(ValueError, match='even'):
    rope.frequencies(7)


# ---------------------------------------------------------------- 2-D RoPE (docs/algorithms.md 7.3)


def test_rope_2d_relativity():
  """<R_{x1,y1} q, R_{x2,y2} k> depends only on (x2 - x1, y2 - y1)."""
  d = 16
  q, k = _rng(4).normal(size=(2, d))
  rows = jnp.array([1, 4, 1 + 9, 4 + 9])
  cols = jnp.array([2, 7, 2 - 5 + 10, 7 - 5 + 10])
  rq = rope.apply_rope_2d(jnp.broadcast_to(q, (4, d)), rows, cols, head_axis=False)
  rk = rope.apply_rope_2d(jnp.broadcast_to(k, (4, d)), rows, cols, head_axis=False)
  np.testing.assert_allclose(jnp.dot(rq[0], rk[1]), jnp.dot(rq[2], rk[3]), rtol=1e-5)
  r = rope.rotation_matrix_2d(4 - 1, 7 - 2, d)
  np.testing.assert_allclose(jnp.dot(rq[0], rk[1]), q @ r @ k, rtol=1e-5)
  # R_{x1,y1}^T R_{x2,y2} == R_{x2-x1, y2-y1}
  lhs = rope.rotation_matrix_2d(1, 2, d).T @ rope.rotation_matrix_2d(4, 7, d)
  np.testing.assert_allclose(lhs, rope.rotation_matrix_2d(3, 5, d), atol=1e-12)


def test_rope_2d_reduces_to_1d_on_halves():
  d = 8
  x = jnp.asarray(_rng(5).normal(size=(5, 2, d)), jnp.float32)
  rows, cols = jnp.arange(5), jnp.arange(5) * 2 + 1
  y = rope.apply_rope_2d(x, rows, cols)
  np.testing.assert_allclose(y[..., :4], rope.apply_rope(x[..., :4], rows), atol=1e-6)
  np.testing.assert_allclose(y[..., 4:], rope.apply_rope(x[..., 4:], cols), atol=1e-6)
  # zero column position: the second half is unchanged
  y0 = rope.apply_rope_2d(x, rows, jnp.zeros(5, jnp.int32))
  np.testing.assert_allclose(y0[..., 4:], x[..., 4:], atol=0)


def test_rope_2d_orthogonal():
  d = 8
  r = rope.rotation_matrix_2d(3, -2, d)
  np.testing.assert_allclose(r.T @ r, np.eye(d), atol=1e-12)
  x = jnp.asarray(_rng(6).normal(size=(3, 1, d)), jnp.float32)
  y = rope.apply_rope_2d(x, jnp.array([1, 2, 3]), jnp.array([5, 0, 9]))
  np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
  with pytest.raises(ValueError, match='divisible by 4'):
    rope.apply_rope_2d(jnp.zeros((2, 1, 6)), jnp.arange(2), jnp.arange(2))


def test_rotate_halves_is_one_elementwise_pass_forward_and_backward():
  """rotate_halves and its gradient contain no concatenation and no interior pad of x's size:
  XLA fuses the whole rotation into one pass over x each way (a concatenation of the rotated
  halves was a pass of its own: docs/performance.md 6). Also checks the gradient is the
  inverse rotation."""
  x = jnp.asarray(_rng(3).normal(size=(2, 5, 3, 8)), jnp.float32)
  y = jnp.asarray(_rng(6).normal(size=(2, 5, 3, 8)), jnp.float32)
  pos = jnp.array([[0, 1, 2, 7, 33], [5, 4, 3, 2, 1]])
  sin, cos = (t[..., None, :] for t in rope.sin_cos(pos, 8))  # [2, 5, 1, 4]: not x's shape
  rotate = lambda x: rope.rotate_halves(x, sin, cos)
  value_and_grad = lambda x: jax.vjp(rotate, x)[1](y)
  for fn in (rotate, value_and_grad):
    jaxpr = jax.make_jaxpr(fn)(x).jaxpr
    assert not helpers.interior_pads(jaxpr)
    equations = helpers.jaxpr_equations(jaxpr)
    shapes = {e.outvars[0].aval.shape for e in equations if e.primitive.name == 'concatenate'}
    assert x.shape not in shapes
  (dx,) = value_and_grad(x)
  np.testing.assert_allclose(dx, rope.rotate_halves(y, -sin, cos), atol=1e-6)  # R_m^T = R_{-m}


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_split_pairs_derivative_is_the_strided_slices_derivative(dtype):
  """split_pairs' hand-written derivative (one interleaved write) equals JAX's derivative of
  x[..., 0::2], x[..., 1::2] bit for bit, and RoPE's gradient is the inverse rotation."""
  x = jnp.asarray(_rng(3).normal(size=(2, 5, 3, 8)), dtype)
  g0, g1 = (jnp.asarray(_rng(s).normal(size=(2, 5, 3, 4)), dtype) for s in (4, 5))
  (ours,) = jax.vjp(rope.split_pairs, x)[1]((g0, g1))
  (plain,) = jax.vjp(lambda x: (x[..., 0::2], x[..., 1::2]), x)[1]((g0, g1))
  assert ours.dtype == dtype
  np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(plain, np.float32))
  pos = jnp.array([[0, 1, 2, 7, 33], [5, 4, 3, 2, 1]])
  sin, cos = rope.sin_cos(pos, 8)
  y = jnp.asarray(_rng(6).normal(size=(2, 5, 3, 8)), jnp.float32)
  (dx,) = jax.vjp(lambda x: rope.apply_sin_cos(x, sin, cos), x.astype(jnp.float32))[1](y)
  inverse = rope.apply_sin_cos(y, -sin, cos)  # R_m^T = R_{-m}
  np.testing.assert_allclose(dx, inverse, atol=1e-6)


def test_rope_gradient_has_no_pad():
  """RoPE's backward pass writes the interleaved layout directly: no pad (the transpose of a
  strided slice, which XLA on CPU runs at under 1 GB/s; docs/performance.md 2) in the
  gradient of apply_sin_cos."""
  x = jnp.ones((2, 5, 3, 8))
  sin, cos = rope.sin_cos(jnp.broadcast_to(jnp.arange(5), (2, 5)), 8)
  grad = jax.grad(lambda x: jnp.sum(rope.apply_sin_cos(x, sin, cos) ** 2))
  equations = helpers.jaxpr_equations(jax.make_jaxpr(grad)(x).jaxpr)
  assert 'pad' not in {eqn.primitive.name for eqn in equations}
