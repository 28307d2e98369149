"""Exponentiated-gradient step-size adaptation around a base optimizer (docs/algorithms.md 3).

Amid, Anil, Fifty, Warmuth 2022 (arXiv 2202.00145); Su, kexue 8968; reference code: lingvo's
EGDD optimizer (lingvo/core/egdd.py). A positive step-size multiplier nu moves by EG,
nu <- nu exp(-eta dL/dnu) (docs/algorithms.md 3.1), with the one-step-delayed hypergradients of
docs/algorithms.md 3.2:
for theta_{t+1} = theta_t - eta_t S_t (p_t . u_t),
  dL(theta_{t+1})/dS_t = -eta_t <g_{t+1}, p_t . u_t>,
  dL(theta_{t+1})/dp_t = -eta_t S_t g_{t+1} . u_t.

`eg_adapt(base)` keeps a scale S (one float32 scalar per leaf - per layer for leaves stacked on
a leading layers axis - or one for the whole tree) and per-coordinate gains p (like params).
Step t = count + 1 with gradient g_t:

 (1) meta-update from g_t and signals stored at t - 1 (EG-7: nothing here has seen g_t):
       S_t = clip(S_{t-1} exp(eta_S a_t), scale_min, scale_max)
         a_t = cos(g_t, d_{t-1}) = <g, d> / ((|g| + 1e-10)(|d| + 1e-10))      normalized
             = <g_t, d_{t-1}>                                                  unnormalized
         (sums over one leaf for 'per_leaf', over all leaves for 'global')
         d_{t-1} = previous direction (scale_signal='momentum': EGDD's momentum m_{t-1}, or
                   p_{t-1} . u_{t-1} for gains applied on the output) or gbar_{t-1} ('gbar').
       p_t = clip(p_{t-1} exp(eta_p b_t), gain_min, gain_max)
         b_t = sign(g_t) sign(gbar_{t-1})                                      normalized
             = g_t gbar_{t-1} / (1 - beta^max(t-1, 1))                          unnormalized
 (2) base direction, gradient sign convention:
       gain_placement='input'  (EGDD, SGDM): u_t = base(p_t . g_t); output S_t u_t
       gain_placement='output' (Adam family, docs/algorithms.md 3.5): u_t = base(g_t); output S_t
       p_t . u_t
     (gains on g before Adam would be cancelled by Adam's per-coordinate normalisation).
 (3) the caller chains weight decay and -eta_t after this transform, so theta moves by
     -eta_t S_t (p_t . u_t) as in docs/algorithms.md 3.2.
 (4) store gbar_t = beta gbar_{t-1} + (1 - beta) g_t and (if needed) u_t.

With base = optax.trace(mu) and gain_placement='input' this is EGDD: m = mu m + p . g,
theta -= eta S m, except that the learning rate multiplies after the momentum (optax.sgd) and
not inside it (lingvo: m = mu m + eta p . g); the two agree for a constant learning rate. At
t = 1, d_0 = gbar_0 = 0, so S and p stay 1. With eta_S = eta_p = 0 the base runs unchanged,
bitwise (EG-2). Normalised signals are invariant to the loss scale (EG-3) and bounded, so
e^eta_S, e^eta_p bound the change per step.

Extra state: p and gbar (2 x params), plus u_{t-1} (1 x params) when scale_signal='momentum'
and the previous direction cannot be read from the base state (`direction_from_state`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optim import tree_paths

SCALE_SIGNALS = ('momentum', 'gbar')
SCALE_GRANULARITIES = ('per_leaf', 'global')
GAIN_PLACEMENTS = ('input', 'output')
_NORM_EPS = 1e-10


class EGState(NamedTuple):
  """State of `eg_adapt`.

  count: int32 [], steps taken.
  scale: S, a float32 [] per leaf (float32 [L] for stacked leaves; tree like params) or one
    float32 [] ('global').
  gain: p, like params (float32 at least).
  gbar: EMA of gradients, like params (float32 at least).
  prev_direction: u_{t-1} like params, or () when not stored.
  base: the base transformation's state.
  """

  count: jax.Array
  scale: Any
  gain: Any
  gbar: Any
  prev_direction: Any
  base: Any


def _stat_dtype(x):
  return jnp.promote_types(x.dtype, jnp.float32)


def _check_args(
  scale_signal, scale_granularity, gain_placement, scale_range, gain_range, direction_from_state
):
  """The ValueErrors of eg_adapt's arguments."""
  if scale_signal not in SCALE_SIGNALS:
    raise ValueError(f'scale_signal={scale_signal!r}; choose one of {SCALE_SIGNALS}')
  if scale_granularity not in SCALE_GRANULARITIES:
    raise ValueError(
      f'scale_granularity={scale_granularity!r}; choose one of {SCALE_GRANULARITIES}'
    )
  if gain_placement not in GAIN_PLACEMENTS:
    raise ValueError(f'gain_placement={gain_placement!r}; choose one of {GAIN_PLACEMENTS}')
  (scale_min, scale_max), (gain_min, gain_max) = scale_range, gain_range
  if not (0 < scale_min <= 1 <= scale_max and 0 < gain_min <= 1 <= gain_max):
    raise ValueError(
      f'EG bounds scale [{scale_min}, {scale_max}] and gain [{gain_min}, '
      f'{gain_max}] must be positive and contain 1'
    )
  if direction_from_state is not None and gain_placement != 'input':
    raise ValueError('direction_from_state is only valid with gain_placement="input"')


def _stacked_leaves(tree, stacked_key):
  """Bool per leaf: stacked on a leading layers axis (then its S has shape [L])."""
  return jax.tree_util.tree_map_with_path(
    lambda path, x: x.ndim >= 1 and tree_paths.is_stacked(tree_paths.path_names(path), stacked_key),
    tree,
  )


def _leaf_sum(x, is_stacked):
  return jnp.sum(x, axis=tuple(range(1, x.ndim))) if is_stacked else jnp.sum(x)


def _bcast(s, u):
  return jnp.reshape(s, s.shape + (1,) * (u.ndim - s.ndim))


def _updated_scale(scale, g, signal, st, per_leaf, normalized, scale_lr, scale_range):
  """S <- clip(S exp(eta_S align(g_t, signal_{t-1}))), per leaf (per layer) or global."""
  scale_min, scale_max = scale_range
  dots = jax.tree.map(lambda a, b, s: _leaf_sum(a.astype(b.dtype) * b, s), g, signal, st)
  if normalized:
    sq_g = jax.tree.map(lambda a, b, s: _leaf_sum(jnp.square(a.astype(b.dtype)), s), g, signal, st)
    sq_d = jax.tree.map(lambda b, s: _leaf_sum(jnp.square(b), s), signal, st)
  if per_leaf:
    if normalized:
      align = jax.tree.map(
        lambda dot, a, b: dot / ((jnp.sqrt(a) + _NORM_EPS) * (jnp.sqrt(b) + _NORM_EPS)),
        dots,
        sq_g,
        sq_d,
      )
    else:
      align = dots
    return jax.tree.map(
      lambda s, a: jnp.clip(s * jnp.exp(scale_lr * a.astype(s.dtype)), scale_min, scale_max),
      scale,
      align,
    )
  dot = sum(jax.tree.leaves(dots))
  if normalized:
    norm_g = jnp.sqrt(sum(jax.tree.leaves(sq_g)))
    norm_d = jnp.sqrt(sum(jax.tree.leaves(sq_d)))
    align = dot / ((norm_g + _NORM_EPS) * (norm_d + _NORM_EPS))
  else:
    align = dot
  return jnp.clip(scale * jnp.exp(scale_lr * align.astype(scale.dtype)), scale_min, scale_max)


def _updated_gain(gain, g, gbar, t, normalized, beta, gain_lr, gain_range):
  """p <- clip(p exp(eta_p signal)), signal = sign(g_t) sign(gbar_{t-1}) (normalised) or
  g_t gbar_{t-1} / (1 - beta^max(t-1, 1))."""
  gain_min, gain_max = gain_range
  if normalized:
    signal = jax.tree.map(lambda a, b: jnp.sign(a).astype(b.dtype) * jnp.sign(b), g, gbar)
  else:
    debias = 1 - beta ** jnp.maximum(t - 1, 1)
    signal = jax.tree.map(lambda a, b: a.astype(b.dtype) * b / debias.astype(b.dtype), g, gbar)
  return jax.tree.map(
    lambda p, b: jnp.clip(p * jnp.exp(gain_lr * b), gain_min, gain_max), gain, signal
  )


def _scaled(scale, gain, direction, per_leaf):
  """S (p * u) in the direction's dtype; gain None: S u (gains already applied to the input)."""
  gained = direction if gain is None else jax.tree.map(lambda p, u: p * u, gain, direction)
  if per_leaf:
    return jax.tree.map(
      lambda s, v, u: (_bcast(s, v) * v).astype(u.dtype), scale, gained, direction
    )
  return jax.tree.map(lambda v, u: (scale * v).astype(u.dtype), gained, direction)


def _initial_scale(params, stacked):
  """S = 1: per leaf ([L] for stacked leaves) when `stacked` is given, else one scalar."""
  if stacked is not None:
    return jax.tree.map(
      lambda p, st: jnp.ones(p.shape[:1] if st else (), _stat_dtype(p)), params, stacked
    )
  dtype = jnp.result_type(jnp.float32, *[_stat_dtype(p) for p in jax.tree.leaves(params)])
  return jnp.ones([], dtype)


def _previous_signal(state, scale_signal, direction_from_state, gain_placement):
  """The step-(t - 1) signal S aligns with: gbar, or the previous applied direction."""
  if scale_signal == 'gbar':
    return state.gbar
  if direction_from_state is not None:
    return direction_from_state(state.base)
  if gain_placement == 'output':
    return jax.tree.map(lambda p, u: p * u, state.gain, state.prev_direction)
  return state.prev_direction


def eg_adapt(
  base: optax.GradientTransformation,
  *,
  scale_lr: float = 1e-3,
  gain_lr: float = 1e-2,
  normalized: bool = True,
  scale_min: float = 0.1,
  scale_max: float = 10.0,
  gain_min: float = 0.01,
  gain_max: float = 100.0,
  scale_signal: str = 'momentum',
  scale_granularity: str = 'per_leaf',
  beta: float = 0.9,
  gain_placement: str = 'output',
  direction_from_state: Callable[[Any], Any] | None = None,
  stacked_key: str | None = 'layers',
) -> optax.GradientTransformation:
  """Wraps `base` with EG-adapted scale S and gains p (see the module docstring for equations).

  Args:
    base: transformation whose output is a direction with the sign of the gradient (no
      learning rate, no minus sign), e.g. optax.trace(mu) or optax.scale_by_adam().
    scale_lr: eta_S, meta learning rate of S (0 freezes S at 1).
    gain_lr: eta_p, meta learning rate of p (0 freezes p at 1).
    normalized: cosine / sign meta-gradients (scale-invariant) or raw inner products.
    scale_min, scale_max: clip range of S (must contain 1).
    gain_min, gain_max: clip range of p (must contain 1).
    scale_signal: 'momentum' (previous direction, EGDD) or 'gbar' (EMA of gradients).
    scale_granularity: 'per_leaf' (one S per leaf, EGDD) or 'global' (one S).
    beta: EMA decay of gbar.
    gain_placement: 'input' (p . g fed to base: EGDD for SGDM) or 'output' (p . base(g)).
    direction_from_state: base_state -> previous base output u_{t-1} (e.g.
      `lambda s: s.trace` for optax.trace); saves storing u_{t-1}. Only for 'input'.
    stacked_key: leaves with this parent name are stacked on a leading layers axis
      (tree_paths.is_stacked): 'per_leaf' keeps one S per layer there (float32 [L]), sums
      running over the other axes, as EGDD has one S per layer weight. None: one S per leaf.

  Returns:
    GradientTransformation with EGState; updates have the dtype of the base's output.

  Raises:
    ValueError: unknown scale_signal / scale_granularity / gain_placement, or bounds that
      exclude 1 or are not positive.
  """
  _check_args(
    scale_signal,
    scale_granularity,
    gain_placement,
    (scale_min, scale_max),
    (gain_min, gain_max),
    direction_from_state,
  )
  store_direction = scale_signal == 'momentum' and direction_from_state is None
  per_leaf = scale_granularity == 'per_leaf'

  stacked = lambda tree: _stacked_leaves(tree, stacked_key)  # noqa: E731

  def init_fn(params):
    ones = lambda p: jnp.ones(p.shape, _stat_dtype(p))  # noqa: E731
    zeros = lambda p: jnp.zeros(p.shape, _stat_dtype(p))  # noqa: E731
    scale = _initial_scale(params, stacked(params) if per_leaf else None)
    return EGState(
      count=jnp.zeros([], jnp.int32),
      scale=scale,
      gain=jax.tree.map(ones, params),
      gbar=jax.tree.map(zeros, params),
      prev_direction=jax.tree.map(zeros, params) if store_direction else (),
      base=base.init(params),
    )

  def update_fn(updates, state, params=None):
    t = state.count + 1
    g = updates
    # (1) Meta-updates from g_t and the signals of step t - 1.
    signal = _previous_signal(state, scale_signal, direction_from_state, gain_placement)
    st = stacked(g) if per_leaf else jax.tree.map(lambda _: False, g)
    scale = _updated_scale(
      state.scale, g, signal, st, per_leaf, normalized, scale_lr, (scale_min, scale_max)
    )

    gain = _updated_gain(
      state.gain, g, state.gbar, t, normalized, beta, gain_lr, (gain_min, gain_max)
    )

    # (2) Base direction and the scaled output.
    if gain_placement == 'input':
      base_in = jax.tree.map(lambda p, a: (p * a).astype(a.dtype), gain, g)
      direction, base_state = base.update(base_in, state.base, params)
      out = _scaled(scale, None, direction, per_leaf)
    else:
      direction, base_state = base.update(g, state.base, params)
      out = _scaled(scale, gain, direction, per_leaf)

    # (4) Signals for step t + 1.
    gbar = jax.tree.map(lambda m, a: beta * m + (1 - beta) * a.astype(m.dtype), state.gbar, g)
    prev = (
      jax.tree.map(lambda u, old: u.astype(old.dtype), direction, state.prev_direction)
      if store_direction
      else ()
    )
    return out, EGState(
      count=optax.safe_increment(state.count),
      scale=scale,
      gain=gain,
      gbar=gbar,
      prev_direction=prev,
      base=base_state,
    )

  return optax.GradientTransformation(init_fn, update_fn)


def leaf_group(path) -> str:
  """Metric group of a leaf: its first two path levels, not counting the leaf's own name.

  ('embed', 'embedding') -> 'embed'; ('layers', 'attention', 'query', 'kernel') ->
  'layers/attention'; ('mlm', 'dense', 'kernel') -> 'mlm/dense'; ('w',) -> 'w'.
  """
  names = tree_paths.path_names(path)
  parents = names[:-1] or names
  return '/'.join(parents[:2])


def eg_metrics(opt_state) -> dict[str, jax.Array]:
  """Mean S per layer group ('eg/scale/<group>', see `leaf_group`) and the mean gain.

  The mean runs over the group's leaves and, for stacked leaves, over their L layers.

  Finds every EGState inside `opt_state` (chains, MultiSteps, masked, ...). 'global'
  granularity gives 'eg/scale/global'. Returns {} when there is no EGState.
  """
  states = [
    x
    for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, EGState))
    if isinstance(x, EGState)
  ]
  out = {}
  for i, st in enumerate(states):
    prefix = 'eg' if i == 0 else f'eg{i}'
    if isinstance(st.scale, jax.Array) or hasattr(st.scale, 'shape'):
      out[f'{prefix}/scale/global'] = jnp.asarray(st.scale, jnp.float32)
    else:
      groups: dict[str, list] = {}
      for path, s in jax.tree_util.tree_leaves_with_path(st.scale):
        groups.setdefault(leaf_group(path), []).append(jnp.ravel(s).astype(jnp.float32))
      for name, values in groups.items():
        out[f'{prefix}/scale/{name}'] = jnp.mean(jnp.concatenate(values))
    gains = jax.tree.leaves(st.gain)
    if gains:
      total = sum(jnp.sum(p.astype(jnp.float32)) for p in gains)
      out[f'{prefix}/gain_mean'] = total / sum(p.size for p in gains)
  return out
