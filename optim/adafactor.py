"""AdaFactor from optax's own pieces, in two documented variants, with float32 statistics.

docs/algorithms.md 1 (Shazeer & Stern 2018, arXiv 1804.04235; kexue 7302). Per leaf theta with
gradient g_t,
t = count + 1 (optimizer updates):

  beta2hat_t = 1 - t^(-c)                                   (c = decay_rate = 0.8)
  G_t = g_t^2 + eps1                                        (eps1 = 1e-30)
  factored (two largest axes a, b; second largest >= 128):
    R_t = beta2hat_t R_{t-1} + (1 - beta2hat_t) mean_b(G_t),  C_t likewise with mean_a
    Vhat_t = R_t C_t / mean_a(R_t)
  unfactored: Vhat_t = beta2hat_t Vhat_{t-1} + (1 - beta2hat_t) G_t
  U_t = g_t / sqrt(Vhat_t);  Uhat_t = U_t / max(1, RMS(U_t) / d)          (d = clipping_threshold)
  alpha_t = rho_t * max(eps2, RMS(theta_{t-1})) (parameter_scale) else rho_t   (eps2 = 1e-3)

The two variants differ only in where momentum beta1 and weight decay wd sit
(docs/algorithms.md 1.2):

  'optax'      (= optax.adafactor with the learning rate passed explicitly, docs/algorithms.md 1.2
  (a)):
               M_t = beta1 M_{t-1} + (1 - beta1) alpha_t Uhat_t;   theta -= M_t + wd theta
               (decay NOT multiplied by the learning rate: wd = 0.01 shrinks theta 1 % a step)
  'bert4keras' (bert4keras AdaFactorV1 + extend_with_weight_decay, docs/algorithms.md 1.3):
               M_t = beta1 M_{t-1} + (1 - beta1) Uhat_t;
               theta -= rho_t (max(eps2, RMS(theta_{t-1})) M_t + wd theta)

They coincide for beta1 = 0 and wd = 0 (up to bert4keras' second eps1 inside the root, which
neither reproduces). With a changing rho_t or RMS(theta) momentum places differ (AF-8); the
weight-decay conventions differ by the factor rho_t (AF-9).

optax casts v_row / v_col / v to the parameter dtype (bf16 params -> bf16 statistics, and
eps1 = 1e-30 underflows in float16, docs/algorithms.md 1.4): `upcast_to_float32` runs the whole
chain on
float32 copies of gradients and parameters, so every statistic is float32 whatever the
parameter dtype; updates are cast back to the gradient dtype on the way out.

Factoring follows the rule of optax/bert4keras (two largest axes, second largest >= 128) on a
"matrix view" of each leaf (`matrix_view_shape`): Flax DenseGeneral attention kernels
(L, d, h, d_h) are factored as the (L, d, h*d_h) matrices they are in Keras/bert4keras
(docs/algorithms.md 1.4), which the raw rule would not factor (d_h = 64 < 128). For leaves stacked
on a
leading layers axis (scanned layers) the RMS-based steps (update clipping, parameter scale)
are per layer (`per_layer_blocks`), so the optimizer is the same with or without scan.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optim import tree_paths

VARIANTS = ('optax', 'bert4keras')
# Paper constants (docs/algorithms.md 1.1).
EPS1 = 1e-30
EPS2 = 1e-3
MIN_DIM_SIZE_TO_FACTOR = 128


def factored_dims(
  shape: tuple[int, ...],
  factored: bool = True,
  min_dim_size_to_factor: int = MIN_DIM_SIZE_TO_FACTOR,
  stacked: bool = False,
) -> tuple[int, int] | None:
  """The (second largest, largest) axes a leaf's second moment is factored over, or None.

  The rule of bert4keras and optax (docs/algorithms.md 1.2): factor iff rank >= 2 and the second
  largest
  axis has >= min_dim_size_to_factor entries. stacked: the leaf holds one layer per index of
  its leading axis (scanned layers); the rule then runs on shape[1:], so that axis is never
  factored and every layer gets the statistics it gets unscanned: a (L, d, d) kernel factors
  over its two d axes (one rank-1 estimate per layer) and a (128, 64, 256) kernel, whose
  layers are not factored, is not factored (the plain rule would factor it over (L, F)).
  """
  if stacked:
    dims = factored_dims(tuple(shape)[1:], factored, min_dim_size_to_factor)
    return None if dims is None else (dims[0] + 1, dims[1] + 1)
  if not factored or len(shape) < 2:
    return None
  order = np.argsort(shape)
  if shape[order[-2]] < min_dim_size_to_factor:
    return None
  return int(order[-2]), int(order[-1])


def matrix_view_shape(
  shape: tuple[int, ...],
  names: list[str] | tuple[str, ...] = (),
  min_dim_size_to_factor: int = MIN_DIM_SIZE_TO_FACTOR,
  stacked_key: str | None = 'layers',
) -> tuple[int, ...]:
  """The shape under which a leaf's second moment is factored (docs/algorithms.md 1.4, 2-D kernel
  parity).

  A Flax DenseGeneral kernel (d, h, d_h) = (768, 12, 64) is not factored by the plain rule
  (its second largest axis, 64, is < 128), although as the (d, h*d_h) = (768, 768) matrix
  of a Keras/bert4keras per-projection kernel it is. So: if the plain rule does not factor
  the leaf, merge every run of adjacent axes smaller than min_dim_size_to_factor into one
  axis, keeping a leading stacked-layers axis (leaves with `stacked_key` among their parent
  names) apart: (L, d, h, d_h) -> (L, d, h*d_h), (L, h, d_h, d) -> (L, h*d_h, d). The
  merged shape is used only if the plain rule factors it; otherwise `shape` is returned.
  Merging does not change RMS-based steps (clipping, parameter scale), only the factoring.

  Args:
    shape: the leaf's shape.
    names: the leaf's path names (tree_paths.path_names), e.g. ('layers', 'mlp', 'kernel').
    min_dim_size_to_factor: 128.
    stacked_key: parent name marking leaves stacked on a leading layers axis
      (tree_paths.is_stacked); None: no leaf is stacked.
  """
  shape = tuple(int(n) for n in shape)
  if len(shape) < 3 or factored_dims(shape, True, min_dim_size_to_factor) is not None:
    return shape
  lead = 1 if tree_paths.is_stacked(names, stacked_key) else 0
  merged, run = list(shape[:lead]), None
  for n in shape[lead:]:
    if n < min_dim_size_to_factor:
      run = n if run is None else run * n
    else:
      if run is not None:
        merged.append(run)
        run = None
      merged.append(n)
  if run is not None:
    merged.append(run)
  merged = tuple(merged)
  return merged if factored_dims(merged, True, min_dim_size_to_factor) is not None else shape


def factor_in_matrix_view(
  inner: optax.GradientTransformation,
  min_dim_size_to_factor: int = MIN_DIM_SIZE_TO_FACTOR,
  stacked_key: str | None = 'layers',
) -> optax.GradientTransformation:
  """Runs `inner` (e.g. optax.scale_by_factored_rms) on leaves reshaped to matrix_view_shape.

  Gradients and parameters are reshaped (a free, layout-only op) before `inner`, its updates
  are reshaped back; `inner`'s state lives in the view shapes. A no-op for leaves the plain
  rule already factors. State: `inner`'s.
  """

  def view(tree):
    if tree is None:
      return None
    return jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.reshape(
        x,
        matrix_view_shape(
          x.shape, tree_paths.path_names(path), min_dim_size_to_factor, stacked_key
        ),
      ),
      tree,
    )

  def init_fn(params):
    return inner.init(view(params))

  def update_fn(updates, state, params=None):
    new_updates, state = inner.update(view(updates), state, view(params))
    new_updates = jax.tree.map(lambda u, g: jnp.reshape(u, g.shape), new_updates, updates)
    return new_updates, state

  return optax.GradientTransformation(init_fn, update_fn)


def per_layer_blocks(
  tx: optax.GradientTransformation, stacked_key: str | None = 'layers'
) -> optax.GradientTransformation:
  """Applies a stateless per-leaf ("block") transform to each layer of stacked leaves.

  optax's block transforms (clip_by_block_rms, scale_by_param_block_rms, scale_by_trust_ratio)
  take RMS / norms over a whole leaf. A leaf stacked on a leading layers axis (scanned layers,
  [L, ...], tree_paths.is_stacked) holds L per-layer blocks, so `tx` is vmapped over that
  axis: RMS(U), RMS(theta) and trust ratios are per layer, as in bert4keras / Keras with
  one weight per layer, and the optimizer does not depend on model.scan_layers. Other
  leaves are passed to `tx` unchanged. `tx` must keep no state (EmptyState); so does this.
  """

  def update_fn(updates, state, params=None):
    def leaf(path, u, p):
      one = lambda u1, p1: tx.update(u1, tx.init(u1), p1)[0]  # noqa: E731
      if tree_paths.is_stacked(tree_paths.path_names(path), stacked_key) and u.ndim >= 1:
        return jax.vmap(one)(u, p) if p is not None else jax.vmap(lambda u1: one(u1, None))(u)
      return one(u, p)

    if params is None:
      return jax.tree_util.tree_map_with_path(lambda path, u: leaf(path, u, None), updates), state
    return jax.tree_util.tree_map_with_path(leaf, updates, params), state

  return optax.GradientTransformation(tx.init, update_fn)


class _LeafStats(NamedTuple):
  """One leaf's update and AdaFactor statistics (unused ones are [1] placeholders)."""

  update: jax.Array
  v_row: jax.Array
  v_col: jax.Array
  v: jax.Array


def scale_by_factored_rms(
  factored: bool = True,
  decay_rate: float = 0.8,
  min_dim_size_to_factor: int = MIN_DIM_SIZE_TO_FACTOR,
  epsilon: float = EPS1,
  stacked_key: str | None = 'layers',
) -> optax.GradientTransformation:
  """`optax.scale_by_factored_rms` (step_offset 0) that never factors a stacked layers axis.

  The same statistics, update and state (`optax.FactoredState`) as optax's, leaf by leaf,
  except which axes are factored: `factored_dims(..., stacked=tree_paths.is_stacked(path))`
  instead of optax's rule on the raw shape, which would pick the layers axis L of a scanned
  [L, ...] leaf as soon as L >= 128 and give scanned and unscanned models different updates.
  """

  def dims(path, shape):
    stacked = tree_paths.is_stacked(tree_paths.path_names(path), stacked_key)
    return factored_dims(tuple(shape), factored, min_dim_size_to_factor, stacked)

  def init_leaf(path, p):
    d = dims(path, p.shape)
    one = jnp.zeros((1,), p.dtype)
    if d is None:
      return _LeafStats(one, one, one, jnp.zeros_like(p))
    d1, d0 = d
    return _LeafStats(
      one,
      jnp.zeros(np.delete(p.shape, d0), p.dtype),
      jnp.zeros(np.delete(p.shape, d1), p.dtype),
      one,
    )

  def to_state(count, results):
    pick = lambda f: jax.tree.map(
      lambda r: getattr(r, f),
      results,  # noqa: E731
      is_leaf=lambda r: isinstance(r, _LeafStats),
    )
    return pick('update'), optax.FactoredState(
      count=count, v_row=pick('v_row'), v_col=pick('v_col'), v=pick('v')
    )

  def init_fn(params):
    return to_state(jnp.zeros([], jnp.int32), jax.tree_util.tree_map_with_path(init_leaf, params))[
      1
    ]

  def update_fn(updates, state, params=None):
    del params
    t = jnp.asarray(state.count + 1, jnp.float32)
    beta2 = 1.0 - t ** (-decay_rate)

    def leaf(path, g, v_row, v_col, v):
      d = dims(path, g.shape)
      grad_sqr = jnp.square(g) + epsilon
      if d is None:
        v = (beta2 * v + (1.0 - beta2) * grad_sqr).astype(g.dtype)
        return _LeafStats(g * v**-0.5, v_row, v_col, v)
      d1, d0 = d
      v_row = (beta2 * v_row + (1.0 - beta2) * jnp.mean(grad_sqr, axis=d0)).astype(g.dtype)
      v_col = (beta2 * v_col + (1.0 - beta2) * jnp.mean(grad_sqr, axis=d1)).astype(g.dtype)
      reduced_d1 = d1 - 1 if d1 > d0 else d1
      row_factor = (v_row / jnp.mean(v_row, axis=reduced_d1, keepdims=True)) ** -0.5
      u = g * jnp.expand_dims(row_factor, axis=d0) * jnp.expand_dims(v_col**-0.5, axis=d1)
      return _LeafStats(u, v_row, v_col, v)

    results = jax.tree_util.tree_map_with_path(leaf, updates, state.v_row, state.v_col, state.v)
    return to_state(optax.safe_increment(state.count), results)

  return optax.GradientTransformation(init_fn, update_fn)


def _factored_rms(
  factored, decay_rate, min_dim_size_to_factor, eps1, merge_small_axes, stacked_key
):
  tx = scale_by_factored_rms(
    factored=factored,
    decay_rate=decay_rate,
    min_dim_size_to_factor=min_dim_size_to_factor,
    epsilon=eps1,
    stacked_key=stacked_key,
  )
  if merge_small_axes:
    tx = factor_in_matrix_view(tx, min_dim_size_to_factor, stacked_key)
  return tx


def _to_float32(x):
  if hasattr(x, 'dtype') and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != jnp.float64:
    return jnp.asarray(x, jnp.float32)
  return x


def upcast_to_float32(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """Runs `inner` on float32 copies of gradients and parameters (float64 is left as is).

  init(params): inner.init(params cast to float32), so every state leaf `inner` derives from
  the parameters (AdaFactor's v_row / v_col / v, momenta, EG gains) is float32.
  update(g, state, params): u = inner.update(float32(g), state, float32(params)); each leaf
  of u is cast back to the dtype of its gradient. A no-op for float32 trees.

  The state is `inner`'s state, unchanged in structure (no wrapper NamedTuple), so a float32
  run and a bfloat16 run have the same state tree.
  """

  def init_fn(params):
    return inner.init(jax.tree.map(_to_float32, params))

  def update_fn(updates, state, params=None):
    params32 = None if params is None else jax.tree.map(_to_float32, params)
    new_updates, state = inner.update(jax.tree.map(_to_float32, updates), state, params32)
    new_updates = jax.tree.map(lambda u, g: jnp.asarray(u, g.dtype), new_updates, updates)
    return new_updates, state

  return optax.GradientTransformation(init_fn, update_fn)


def adafactor_direction(
  *,
  factored: bool = True,
  decay_rate: float = 0.8,
  clipping_threshold: float = 1.0,
  momentum: float = 0.0,
  parameter_scale: bool = True,
  min_dim_size_to_factor: int = MIN_DIM_SIZE_TO_FACTOR,
  eps1: float = EPS1,
  merge_small_axes: bool = True,
  stacked_key: str | None = 'layers',
) -> optax.GradientTransformation:
  """bert4keras AdaFactor without learning rate and weight decay: max(eps2, RMS theta) * M_t.

  chain(scale_by_factored_rms(factored, c, 0, 128, eps1) [in the matrix view if
  merge_small_axes], clip_by_block_rms(d) [d > 0],
  ema(beta1, debias=False) [beta1 > 0], scale_by_param_block_rms(eps2) [parameter_scale]).
  Output has the sign of the gradient (a descent direction to be multiplied by -rho_t); used
  by `adafactor(variant='bert4keras')` and as the base direction of `eg_adapt`.
  """
  tx = [
    _factored_rms(factored, decay_rate, min_dim_size_to_factor, eps1, merge_small_axes, stacked_key)
  ]
  if clipping_threshold:
    tx.append(per_layer_blocks(optax.clip_by_block_rms(clipping_threshold), stacked_key))
  if momentum:
    tx.append(optax.ema(momentum, debias=False))
  if parameter_scale:
    tx.append(per_layer_blocks(optax.scale_by_param_block_rms(EPS2), stacked_key))
  return optax.chain(*tx)


def adafactor(
  learning_rate: optax.ScalarOrSchedule,
  *,
  variant: str = 'optax',
  factored: bool = True,
  decay_rate: float = 0.8,
  clipping_threshold: float = 1.0,
  momentum: float = 0.0,
  parameter_scale: bool = True,
  weight_decay: float = 0.0,
  weight_decay_mask: Any | Callable[[Any], Any] | None = None,
  min_dim_size_to_factor: int = MIN_DIM_SIZE_TO_FACTOR,
  eps1: float = EPS1,
  merge_small_axes: bool = True,
  stacked_key: str | None = 'layers',
) -> optax.GradientTransformation:
  """AdaFactor (docs/algorithms.md 1.1) in the 'optax' or 'bert4keras' placement, float32
  statistics.

  Args:
    learning_rate: rho_t, a float or a schedule of the update count (always passed: optax's
      default None applies no rho at all, docs/algorithms.md 1.2 (a)). With parameter_scale it is a
      relative
      step (1e-3 = 0.1 % of RMS(theta) per update).
    variant: 'optax' (chain of optax.adafactor: factored_rms -> clip -> rho -> param scale ->
      ema -> add_decayed_weights -> scale(-1)) or 'bert4keras' (factored_rms -> clip -> ema ->
      param scale -> add_decayed_weights -> scale_by_learning_rate), see the module docstring.
    factored: factor second moments of leaves with two axes >= min_dim_size_to_factor.
    decay_rate: c in beta2hat_t = 1 - t^-c (optax's name; it is an exponent, not a beta).
    clipping_threshold: d of the update clipping; 0 disables clipping.
    momentum: beta1; 0 keeps no momentum buffer (the paper's memory-saving default).
    parameter_scale: multiply steps by max(eps2, RMS(theta_{t-1})) per leaf.
    weight_decay: wd (see the variants for whether it is multiplied by rho_t).
    weight_decay_mask: bool pytree or callable params -> bool pytree (True = decay).
    min_dim_size_to_factor: 128 in the paper, bert4keras and optax.
    eps1: added to g^2.
    merge_small_axes: factor (L, d, h, d_h)-style leaves as (L, d, h*d_h) matrices (see
      `matrix_view_shape`); False = optax's rule on the raw shape.
    stacked_key: parent name of leaves stacked on a leading layers axis (scanned layers):
      their clipping and parameter-scale RMS are per layer (`per_layer_blocks`) and the
      layers axis is kept out of the matrix view. None = every leaf is one block (optax).

  Returns:
    A GradientTransformation; its state is float32 for float32/bfloat16/float16 params.

  Raises:
    ValueError: unknown variant.
  """
  if variant == 'optax':
    tx = [
      _factored_rms(
        factored, decay_rate, min_dim_size_to_factor, eps1, merge_small_axes, stacked_key
      )
    ]
    if clipping_threshold:
      tx.append(per_layer_blocks(optax.clip_by_block_rms(clipping_threshold), stacked_key))
    tx.append(optax.scale_by_learning_rate(learning_rate, flip_sign=False))
    if parameter_scale:
      tx.append(per_layer_blocks(optax.scale_by_param_block_rms(EPS2), stacked_key))
    if momentum:
      # optax.adafactor passes accumulator_dtype=float32; upcast_to_float32 already gives
      # float32 (and keeps float64 in float64 runs).
      tx.append(optax.ema(momentum, debias=False))
    if weight_decay:
      tx.append(optax.add_decayed_weights(weight_decay, mask=weight_decay_mask))
    tx.append(optax.scale(-1))
    return upcast_to_float32(optax.chain(*tx))
  if variant == 'bert4keras':
    tx = [
      adafactor_direction(
        factored=factored,
        decay_rate=decay_rate,
        clipping_threshold=clipping_threshold,
        momentum=momentum,
        parameter_scale=parameter_scale,
        min_dim_size_to_factor=min_dim_size_to_factor,
        eps1=eps1,
        merge_small_axes=merge_small_axes,
        stacked_key=stacked_key,
      )
    ]
    if weight_decay:
      tx.append(optax.add_decayed_weights(weight_decay, mask=weight_decay_mask))
    tx.append(optax.scale_by_learning_rate(learning_rate))
    return upcast_to_float32(optax.chain(*tx))
  raise ValueError(
    f'optim.adafactor_variant={variant!r} is unknown; choose one of {", ".join(VARIANTS)}'
  )
