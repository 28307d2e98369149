"""Rotary position embedding (RoPE), 1-D and 2-D (docs/algorithms.md 7.1, 7.3).

Layout: *interleaved* pairs (2i, 2i+1) of each head vector are rotated by the angle
m * theta_i, theta_i = base^(-2i/d_h) (Su's RoPE, bert4keras and Hugging Face's RoFormer):

  RoPE(q, m) = q * cos_m + rot(q) * sin_m,  rot(q) = [-q1, q0, -q3, q2, ...],
  cos_m = [cos m theta_0, cos m theta_0, cos m theta_1, ...] (each value twice), sin_m likewise.

LLaMA-style checkpoints use the "rotate_half" layout (pairs (i, i + d_h/2)); the two are the
same map up to a fixed permutation of the head dimensions: `interleaved_to_rotate_half` /
`rotate_half_to_interleaved` give the index arrays (apply them to the columns of W_q and W_k).

Shapes: x [..., n, h, d_h] with positions [..., n] (the head axis is broadcast). A head axis
is not required: pass `head_axis=False` for x [..., n, d] (GAU's single head).

RoFormer attention rotates its queries and keys interleaved (`apply_sin_cos`). GAU keeps the
interleaved layout in its parameters but rotates in rotate-half order: it reorders Z's kernel
columns at run time with `pairs_first`, so Z comes out in that order, and rotates with
`rotate_halves`, whose reads and writes are contiguous (docs/performance.md 6). Attention
takes only dot products of queries and keys, which a permutation applied to both leaves
unchanged. (The same reorder for RoFormer's q/k was 4 % faster on CPU but raised a
roformer:base TPU compile's temporaries by 22 %: docs/performance.md 2.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def frequencies(dim: int, base: float = 10000.0) -> jax.Array:
  """theta_i = base^(-2i/dim), i = 0..dim/2-1, float32 [dim/2]."""
  if dim % 2:
    raise ValueError(f'RoPE needs an even dimension, got {dim}; use an even head_dim')
  return jnp.asarray(base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim), jnp.float32)


def sin_cos(positions: jax.Array, dim: int, base: float = 10000.0):
  """(sin, cos) of m * theta_i, float32 [..., n, dim/2] for positions [..., n]."""
  angles = positions.astype(jnp.float32)[..., None] * frequencies(dim, base)
  return jnp.sin(angles), jnp.cos(angles)


def apply_sin_cos(x: jax.Array, sin: jax.Array, cos: jax.Array, head_axis: bool = True):
  """Rotates interleaved pairs of x [..., n, (h,) d] by precomputed sin/cos [..., n, d/2].

  Computed in float32; returns x's dtype. sin = cos = None returns x unchanged (no rotary:
  model.position_embedding='learned', docs/algorithms.md 7.6).
  """
  if sin is None:
    return x
  if head_axis:
    sin, cos = sin[..., None, :], cos[..., None, :]
  x0, x1 = split_pairs(x.astype(jnp.float32))
  return interleave(x0 * cos - x1 * sin, x1 * cos + x0 * sin).astype(x.dtype)


def interleave(x0: jax.Array, x1: jax.Array) -> jax.Array:
  """[x0_0, x1_0, x0_1, x1_1, ...]: two [..., d/2] arrays as the pairs of one [..., d]."""
  return jnp.stack([x0, x1], axis=-1).reshape(x0.shape[:-1] + (2 * x0.shape[-1],))


@jax.custom_vjp
def split_pairs(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(x[..., 0::2], x[..., 1::2]): the interleaved pairs of x [..., d], [..., d/2] each.

  Its derivative interleaves the two gradients in one write (`interleave`). JAX's own
  derivative of a strided slice is a pad with interior padding, one per half, added: XLA on
  CPU runs those at under 1 GB/s (8 % of a RoFormer training step on one core, 18 % of the
  summed op time of a FLASH step, when it rotated interleaved activations;
  docs/performance.md 2 and 6).
  """
  return x[..., 0::2], x[..., 1::2]


def _split_pairs_fwd(x):
  return split_pairs(x), None


def _split_pairs_bwd(_, grads):
  return (interleave(*grads),)


split_pairs.defvjp(_split_pairs_fwd, _split_pairs_bwd)


def pairs_first(x: jax.Array) -> jax.Array:
  """x [..., d] reordered to [x0, x2, x4, ..., x1, x3, ...]: the interleaved layout's pairs as
  rotate-half pairs (i, i + d/2), `interleaved_to_rotate_half`. On a projection's kernel
  columns it makes the projection's output rotate-half ordered (`rotate_halves`)."""
  return jnp.concatenate(split_pairs(x), axis=-1)


def rotate_halves(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
  """RoPE on x [..., d] in rotate-half order (`pairs_first`), sin/cos [..., d/2] broadcastable;
  the result in the same order, computed in x's dtype (GAU passes float32). Dot products of
  two such vectors equal those of the interleaved `apply_sin_cos` (the same rotation, the
  dimensions permuted alike).

  One element-wise formula, x * [cos, cos] + [x1, x0] * [-sin, sin] with x = [x0, x1]: the
  swapped halves are two edge pads, which XLA fuses with the products into one pass over x,
  forward and backward (the derivative of an edge pad is a slice and back). Rotating each half
  and concatenating them took three passes, the concatenation its own (a FLASH step at
  n = 4096 on CPU: 486 -> 455 ms, docs/performance.md 6).
  """
  half = x.shape[-1] // 2
  edge = [(0, 0)] * (x.ndim - 1)
  swapped = jnp.pad(x[..., half:], edge + [(0, half)]) + jnp.pad(x[..., :half], edge + [(half, 0)])
  return x * jnp.concatenate([cos, cos], -1) + swapped * jnp.concatenate([-sin, sin], -1)


def apply_rope(
  x: jax.Array, positions: jax.Array, base: float = 10000.0, head_axis: bool = True
) -> jax.Array:
  """RoPE on x [..., n, h, d_h] (or [..., n, d] with head_axis=False) at positions [..., n]."""
  sin, cos = sin_cos(positions, x.shape[-1], base)
  return apply_sin_cos(x, sin, cos, head_axis)


def rotation_matrix(m, dim: int, base: float = 10000.0) -> np.ndarray:
  """The block-diagonal orthogonal matrix R_m (float64 numpy) with RoPE(q, m) = R_m q."""
  theta = base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
  r = np.zeros((dim, dim))
  for i, t in enumerate(theta):
    c, s = np.cos(m * t), np.sin(m * t)
    r[2 * i : 2 * i + 2, 2 * i : 2 * i + 2] = [[c, -s], [s, c]]
  return r


def interleaved_to_rotate_half(dim: int) -> np.ndarray:
  """Index array p with y = x[..., p]: interleaved layout -> rotate_half layout.

  Interleaved pair i sits at (2i, 2i+1); rotate_half pair i sits at (i, i + dim/2).
  """
  return np.concatenate([np.arange(0, dim, 2), np.arange(1, dim, 2)])


def rotate_half_to_interleaved(dim: int) -> np.ndarray:
  """Inverse permutation of `interleaved_to_rotate_half`."""
  return np.argsort(interleaved_to_rotate_half(dim))


def apply_rope_rotate_half(x: jax.Array, positions: jax.Array, base: float = 10000.0):
  """RoPE in the LLaMA / HF "rotate_half" layout (pairs (i, i + d/2)) on x [..., n, h, d] at
  positions [..., n]: `rotate_halves` with the head axis broadcast (layout tests)."""
  sin, cos = sin_cos(positions, x.shape[-1], base)
  return rotate_halves(x, sin[..., None, :], cos[..., None, :])


def apply_rope_2d(
  x: jax.Array, rows: jax.Array, cols: jax.Array, base: float = 10000.0, head_axis: bool = True
) -> jax.Array:
  """2-D RoPE (docs/algorithms.md 7.3): 1-D RoPE with the row position on the first half of each
  head
  vector and the column position on the second half; each half uses its own standard table
  base^(-2i/(d_h/2)). x [..., n, h, d_h] (d_h divisible by 4), rows/cols [..., n].

  R_{x,y} = blockdiag(R_x, R_y), so R_{x1,y1}^T R_{x2,y2} = R_{x2-x1, y2-y1}.
  """
  dim = x.shape[-1]
  if dim % 4:
    raise ValueError(f'2-D RoPE needs a head size divisible by 4, got {dim}')
  half = dim // 2
  first = apply_rope(x[..., :half], rows, base, head_axis)
  second = apply_rope(x[..., half:], cols, base, head_axis)
  return jnp.concatenate([first, second], axis=-1)


def rotation_matrix_2d(row, col, dim: int, base: float = 10000.0) -> np.ndarray:
  """blockdiag(R_row, R_col) on halves of size dim/2 (float64 numpy)."""
  half = dim // 2
  r = np.zeros((dim, dim))
  r[:half, :half] = rotation_matrix(row, half, base)
  r[half:, half:] = rotation_matrix(col, half, base)
  return r


def long_range_decay(m, dim: int = 128, base: float = 10000.0) -> float:
  """Su's bound f(m) = (2/d) sum_{j=1}^{d/2} |sum_{i<j} e^{i m theta_i}|
  (docs/algorithms.md 7.1)."""
  theta = base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
  partial = np.cumsum(np.exp(1j * m * theta))
  return float(np.abs(partial).sum() * 2.0 / dim)
