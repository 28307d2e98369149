"""Gradient accumulation hidden inside momentum (docs/algorithms.md 2; Su, kexue 8634), and Su's
every-k.

The trainer calls the optimizer once per micro-batch s = 1, 2, ...; k micro-steps make one
optimizer update tau = ceil(s / k); chi_k(s) = 1 iff s mod k == 0 (the window's last
micro-step). Instead of a gradient buffer (optax.MultiSteps), the window is folded into the
momentum that the optimizer keeps anyway:

  m_s = [1 - (1 - beta) chi_k(s - 1)] m_{s-1} + w g_s     (chi_k(0) = 1)

i.e. decay m once, on the first micro-step of a window, and add w g_s on every micro-step
(heavy ball: w = 1/k; EMA: w = (1 - beta)/k). The parameters move only at window ends:
the optimizer's direction computed from the moments is passed through `tail` (decoupled
weight decay, trust ratio, parameter scale, learning rate: anything the base optimizer does
after its moments) at chi_k(s) = 1 only; the other micro-steps return zero updates and leave
`tail`'s state, hence its update counter and the learning rate it reads, untouched. So the
learning rate is indexed by updates and weight decay is applied once per update (GA-7).

State: `AccumulateInMomentumState(micro_step, moments, tail)`; the micro-step counter makes a
checkpoint taken mid-window resume exactly (GA-6). No buffer beyond the base optimizer's.

| kind      | moments                 | exact?                                                 |
|-----------|-------------------------|--------------------------------------------------------|
| SGDM      | m (heavy ball)          | exact: equals MultiSteps(SGDM) and the k-times batch   |
| Adam/LAMB | mu, nu                  | mu exact; nu holds mean(g^2), not mean(g)^2 (2.2) |
| AdaFactor | R, C or V; M (beta1 > 0) | experimental: two approximations (2.3)            |

(section numbers of docs/algorithms.md)

`every_k` is Su's cheaper "update every k with unchanged beta" variant (docs/algorithms.md 2.4): the
base
optimizer runs on every micro-step and its updates are multiplied by chi_k(s).

Clipping: a global-norm clip chained in front would act on each micro-batch here (there is
no window mean to clip), which breaks the equality with a large batch, so `optim.build`
refuses grad_clip_norm > 0 with accumulation='momentum'; optax.MultiSteps clips the window
mean. With `every_k` the clip acts on each micro-batch gradient: the gradient its base
optimizer steps on, as without accumulation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optim import adafactor as adafactor_lib
from optim import tree_paths


class AccumulateInMomentumState(NamedTuple):
  """State of the accumulate-in-momentum transforms.

  micro_step: int32 [], micro-steps taken (s - 1 at the start of micro-step s).
  moments: SGDMMoments / AdamMoments / AdafactorMoments.
  tail: state of the `tail` transformation; advances only at window ends.
  """

  micro_step: jax.Array
  moments: Any
  tail: Any


class SGDMMoments(NamedTuple):
  """Heavy-ball momentum m, like the params."""

  momentum: Any


class AdamMoments(NamedTuple):
  """First and second moments mu, nu (EMA form), like the params."""

  mu: Any
  nu: Any


class AdafactorMoments(NamedTuple):
  """AdaFactor statistics (float32): factored R (v_row), C (v_col) or full V (v), and M.

  Same layout as optax.FactoredState: unused entries are float32 [1] placeholders.
  """

  v_row: Any
  v_col: Any
  v: Any
  momentum: Any


def _where_tree(cond, new, old):
  return jax.tree.map(lambda a, b: jnp.where(cond, a, b), new, old)


def _accumulate_in_momentum(
  accumulation_steps: int,
  init_moments: Callable,
  step_moments: Callable,
  tail: optax.GradientTransformation | None,
):
  """Shared window bookkeeping; `step_moments(g, moments, first, tau, pos, params)`."""
  k = int(accumulation_steps)
  if k < 1:
    raise ValueError(f'accumulation_steps={k} must be >= 1')
  tail = tail if tail is not None else optax.identity()

  def init_fn(params):
    return AccumulateInMomentumState(
      micro_step=jnp.zeros([], jnp.int32), moments=init_moments(params), tail=tail.init(params)
    )

  def update_fn(updates, state, params=None):
    micro = state.micro_step
    first = micro % k == 0  # chi_k(s - 1)
    last = (micro + 1) % k == 0  # chi_k(s)
    tau = micro // k + 1  # 1-based update index (ceil(s / k))
    pos = micro % k + 1  # 1-based position in the window
    direction, moments = step_moments(updates, state.moments, first, tau, pos, params)
    tail_updates, tail_state = tail.update(direction, state.tail, params)
    new_updates = jax.tree.map(lambda u: jnp.where(last, u, jnp.zeros_like(u)), tail_updates)
    tail_state = _where_tree(last, tail_state, state.tail)
    return new_updates, AccumulateInMomentumState(
      micro_step=optax.safe_increment(micro), moments=moments, tail=tail_state
    )

  return optax.GradientTransformation(init_fn, update_fn)


def accumulate_in_momentum_sgdm(
  accumulation_steps: int, momentum: float = 0.9, tail: optax.GradientTransformation | None = None
) -> optax.GradientTransformation:
  """SGD heavy-ball momentum with k-step accumulation hidden in m (docs/algorithms.md 2.1, exact).

    m_s = [1 - (1 - beta) chi_k(s-1)] m_{s-1} + g_s / k
    u_s = chi_k(s) * tail(m_s)        e.g. tail = chain(add_decayed_weights(wd), lr):
                                      theta -= chi_k(s) alpha_tau (m_s + wd theta)

  Equals optax.MultiSteps(chain(trace(beta), tail), k) and SGDM on the k-times larger batch
  (mean loss, same examples, no batch statistics); k = 1 is chain(trace(beta), tail) bitwise.

  Args:
    accumulation_steps: k >= 1 micro-steps per update.
    momentum: beta (heavy-ball decay, optax.trace convention m = beta m + g).
    tail: applied to m at window ends (its counter counts updates); None = identity.

  Returns:
    GradientTransformation with AccumulateInMomentumState(micro_step, SGDMMoments, tail).
  """
  k = int(accumulation_steps)

  def init(params):
    return SGDMMoments(jax.tree.map(jnp.zeros_like, params))

  def step(g, moments, first, tau, pos, params):
    del tau, pos, params
    m = jax.tree.map(lambda g, m: jnp.where(first, momentum * m, m) + g / k, g, moments.momentum)
    return m, SGDMMoments(m)

  return _accumulate_in_momentum(k, init, step, tail)


def accumulate_in_momentum_adam(
  accumulation_steps: int,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-6,
  tail: optax.GradientTransformation | None = None,
) -> optax.GradientTransformation:
  """Adam moments with k-step accumulation hidden in mu and nu (docs/algorithms.md 2.2,
  approximation).

    mu_s = [1 - (1 - b1) chi_k(s-1)] mu_{s-1} + ((1 - b1)/k) g_s
    nu_s = [1 - (1 - b2) chi_k(s-1)] nu_{s-1} + ((1 - b2)/k) g_s^2
    tau = ceil(s/k);  u_s = chi_k(s) tail( (mu_s/(1 - b1^tau)) / (sqrt(nu_s/(1 - b2^tau)) + eps) )

  eps is outside the root (optax.scale_by_adam; Su puts it inside). mu is exact; nu holds the
  window mean of g^2 (>= the square of the mean; up to ~k times larger when noise dominates,
  so steps shrink by up to sqrt(k) vs large-batch Adam); exact when all micro-gradients of a
  window are equal. tail = chain(add_decayed_weights(wd, mask), scale_by_learning_rate(lr))
  gives AdamW (k = 1: optax.adamw bitwise); add scale_by_trust_ratio() before the learning
  rate for LAMB.

  Returns:
    GradientTransformation with AccumulateInMomentumState(micro_step, AdamMoments, tail).
  """
  k = int(accumulation_steps)

  def init(params):
    return AdamMoments(jax.tree.map(jnp.zeros_like, params), jax.tree.map(jnp.zeros_like, params))

  def step(g, moments, first, tau, pos, params):
    del pos, params
    mu = jax.tree.map(lambda g, m: jnp.where(first, b1 * m, m) + ((1 - b1) / k) * g, g, moments.mu)
    nu = jax.tree.map(
      lambda g, v: jnp.where(first, b2 * v, v) + ((1 - b2) / k) * (g**2), g, moments.nu
    )
    mu_hat = optax.tree.bias_correction(mu, b1, tau)
    nu_hat = optax.tree.bias_correction(nu, b2, tau)
    direction = jax.tree.map(lambda m, v: m / (jnp.sqrt(v + 0.0) + eps), mu_hat, nu_hat)
    return direction, AdamMoments(mu, nu)

  return _accumulate_in_momentum(k, init, step, tail)


def _zero_stats(shape: tuple[int, ...], dims: tuple[int, int] | None):
  """(R, C, V) zeros of a leaf viewed as `shape`, factored over `dims` or not (float32; the
  unused ones are [1] placeholders, as in optax.FactoredState)."""
  f32 = jnp.float32
  if dims is None:
    return jnp.zeros((1,), f32), jnp.zeros((1,), f32), jnp.zeros(shape, f32)
  d1, d0 = dims
  return (
    jnp.zeros(tuple(n for a, n in enumerate(shape) if a != d0), f32),
    jnp.zeros(tuple(n for a, n in enumerate(shape) if a != d1), f32),
    jnp.zeros((1,), f32),
  )


def _scale_by_window_stats(g, row, col, v, dims, first, b, w, k: int, eps1: float):
  """One micro-step of docs/algorithms.md 2.3's statistics: decay once per window (first),
  add ((1 - b) / k) mean squares, and scale g by the window-normalised estimate (stats / w).

  Returns:
    (U = g / sqrt(Vhat), R, C, V).
  """
  grad_sqr = g * g + eps1
  if dims is None:
    v = jnp.where(first, b * v, v) + ((1.0 - b) / k) * grad_sqr
    return g * (v / w) ** -0.5, row, col, v
  d1, d0 = dims
  row = jnp.where(first, b * row, row) + ((1.0 - b) / k) * jnp.mean(grad_sqr, axis=d0)
  col = jnp.where(first, b * col, col) + ((1.0 - b) / k) * jnp.mean(grad_sqr, axis=d1)
  row_w, col_w = row / w, col / w
  reduced_d1 = d1 - 1 if d1 > d0 else d1
  row_factor = (row_w / jnp.mean(row_w, axis=reduced_d1, keepdims=True)) ** -0.5
  u = g * jnp.expand_dims(row_factor, axis=d0) * jnp.expand_dims(col_w**-0.5, axis=d1)
  return u, row, col, v


def _statistics_view(
  path,
  shape,
  factored: bool,
  min_dim_size_to_factor: int,
  merge_small_axes: bool,
  stacked_key: str | None,
):
  """The shape AdaFactor's statistics see (adafactor.matrix_view_shape) and its factored axes
  (never the stacked layers axis, adafactor.factored_dims)."""
  shape = tuple(shape)
  names = tree_paths.path_names(path)
  if merge_small_axes:
    shape = adafactor_lib.matrix_view_shape(shape, names, min_dim_size_to_factor, stacked_key)
  stacked = tree_paths.is_stacked(names, stacked_key)
  return shape, adafactor_lib.factored_dims(shape, factored, min_dim_size_to_factor, stacked)


def _zero_moments(params, view) -> 'AdafactorMoments':
  """Zero AdaFactor statistics (in each leaf's `view`) and momentum, float32."""
  leaves = jax.tree_util.tree_map_with_path(
    lambda path, p: _zero_stats(*view(path, p.shape)), params
  )
  is_triple = lambda x: isinstance(x, tuple) and len(x) == 3  # noqa: E731
  pick = lambda i: jax.tree.map(lambda t: t[i], leaves, is_leaf=is_triple)  # noqa: E731
  return AdafactorMoments(
    pick(0), pick(1), pick(2), jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  )


def accumulate_in_momentum_adafactor(
  accumulation_steps: int,
  momentum: float = 0.9,
  *,
  factored: bool = True,
  decay_rate: float = 0.8,
  clipping_threshold: float = 1.0,
  min_dim_size_to_factor: int = adafactor_lib.MIN_DIM_SIZE_TO_FACTOR,
  eps1: float = adafactor_lib.EPS1,
  merge_small_axes: bool = True,
  stacked_key: str | None = 'layers',
  tail: optax.GradientTransformation | None = None,
) -> optax.GradientTransformation:
  """AdaFactor with momentum, k-step accumulation hidden in M (docs/algorithms.md 2.3;
  EXPERIMENTAL).

  bert4keras placement (momentum on the clipped update, before parameter scaling). With
  tau = ceil(s/k), b = beta2hat_tau = 1 - tau^-c, i = position of s in its window (1..k):

    G_s = g_s^2 + eps1
    R_s = [1 - (1 - b) chi_k(s-1)] R_{s-1} + ((1 - b)/k) mean_b(G_s)   (C_s, V_s likewise)
    w_s = 1 - (1 - b)(k - i)/k        total weight of R_s (1 at window ends)
    Vhat_s = (R_s/w_s)(C_s/w_s)/mean(R_s/w_s)   or V_s / w_s
    U_s = g_s / sqrt(Vhat_s);  Uhat_s = U_s / max(1, RMS(U_s)/d)
    M_s = [1 - (1 - beta1) chi_k(s-1)] M_{s-1} + ((1 - beta1)/k) Uhat_s
    u_s = chi_k(s) tail(M_s),  tail = chain(per_layer_blocks(scale_by_param_block_rms(1e-3)),
                                            add_decayed_weights(wd), lr)

  Dividing by w_s turns the partly filled window statistic into a weighted mean of the
  previous estimate and the window's G's so far, so U_s is normalised by a complete second
  moment estimate at every micro-step (without it the first micro-step of training would see
  Vhat = G_1/k); at window ends w = 1 and R, C, V are exactly docs/algorithms.md 2.3's.
  Approximations:
  the second moment averages squares, and per-micro-step normalisation and clipping are
  nonlinear. k = 1 equals adafactor(variant='bert4keras') bitwise. Statistics are float32 and
  use the same matrix view as `adafactor` (merge_small_axes).

  Returns:
    GradientTransformation with AccumulateInMomentumState(micro_step, AdafactorMoments, tail).

  Raises:
    ValueError: momentum <= 0 (there is no buffer to hide the window in; use MultiSteps).
  """
  if not momentum > 0:
    raise ValueError(
      f'momentum={momentum} must be > 0 to accumulate in AdaFactor momentum; '
      'set optim.b1 > 0 or use accumulation="multisteps"'
    )
  k = int(accumulation_steps)
  f32 = jnp.float32

  view = lambda path, shape: _statistics_view(  # noqa: E731
    path, shape, factored, min_dim_size_to_factor, merge_small_axes, stacked_key
  )

  init = lambda params: _zero_moments(params, view)  # noqa: E731

  def step(g_tree, moments, first, tau, pos, params):
    del params
    t = jnp.asarray(tau, f32)
    b = 1.0 - t ** (-decay_rate)
    w = 1.0 - (1.0 - b) * (k - pos) / k
    clip = optax.clip_by_block_rms(clipping_threshold) if clipping_threshold else optax.identity()

    def leaf(path, g_in, row, col, v, m):
      shape, d = view(path, g_in.shape)
      g = jnp.reshape(g_in.astype(f32), shape)
      u, row, col, v = _scale_by_window_stats(g, row, col, v, d, first, b, w, k, eps1)
      u = jnp.reshape(u, g_in.shape)
      clip_one = lambda x: clip.update(x, clip.init(x))[0]  # noqa: E731
      if tree_paths.is_stacked(tree_paths.path_names(path), stacked_key):
        u = jax.vmap(clip_one)(u)  # per-layer RMS (adafactor.per_layer_blocks)
      else:
        u = clip_one(u)
      m = jnp.where(first, momentum * m, m) + ((1 - momentum) / k) * u
      return m, row, col, v

    out = jax.tree_util.tree_map_with_path(
      leaf, g_tree, moments.v_row, moments.v_col, moments.v, moments.momentum
    )
    is_quad = lambda x: isinstance(x, tuple) and len(x) == 4  # noqa: E731
    pick = lambda i: jax.tree.map(lambda q: q[i], out, is_leaf=is_quad)  # noqa: E731
    m = pick(0)
    return m, AdafactorMoments(pick(1), pick(2), pick(3), m)

  return _accumulate_in_momentum(k, init, step, tail)


class EveryKState(NamedTuple):
  """micro_step: int32 [] micro-steps taken; base: the base optimizer's state."""

  micro_step: jax.Array
  base: Any


def every_k(
  base: optax.GradientTransformation, accumulation_steps: int
) -> optax.GradientTransformation:
  """Su's "update every k with unchanged beta" (docs/algorithms.md 2.4): u_s = chi_k(s) * base(g_s).

  The base optimizer (its moments, bias corrections and counters) runs on every micro-step
  with its usual betas; only its updates at window ends are applied, so decoupled weight
  decay is applied once per update. Build the base with a schedule indexed by updates,
  lr(count // k) (`optim.build` does). Not an accumulation: the gradients of the k - 1
  discarded micro-steps only enter through the moments. With beta replaced by
  beta~ = 1 - (1 - beta)/k (EMA form) this is Su's beta-tilde approximation of exact
  accumulation (first order in 1 - beta, GA-5).

  Returns:
    GradientTransformation with EveryKState(micro_step, base_state).
  """
  k = int(accumulation_steps)
  if k < 1:
    raise ValueError(f'accumulation_steps={k} must be >= 1')

  def init_fn(params):
    return EveryKState(jnp.zeros([], jnp.int32), base.init(params))

  def update_fn(updates, state, params=None):
    last = (state.micro_step + 1) % k == 0
    new_updates, base_state = base.update(updates, state.base, params)
    new_updates = jax.tree.map(lambda u: jnp.where(last, u, jnp.zeros_like(u)), new_updates)
    return new_updates, EveryKState(optax.safe_increment(state.micro_step), base_state)

  return optax.GradientTransformation(init_fn, update_fn)
