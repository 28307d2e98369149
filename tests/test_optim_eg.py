"""EG step-size adaptation (docs/algorithms.md 3.6, EG-1..EG-7) against a NumPy float64 version of
docs/algorithms.md 3."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optim
from pretrain import config as config_schema


SHAPES = {'a': (4, 3), 'b': (5,)}


def grad_stream(seed, n, scale=1.0):
  rng = np.random.default_rng(seed)
  # Correlated gradients (a drifting mean plus noise) so that signals are not all random.
  mean = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
  return [
    {k: scale * (mean[k] + 0.7 * rng.standard_normal(s)) for k, s in SHAPES.items()}
    for _ in range(n)
  ]


def np_adam(b1=0.9, b2=0.999, eps=1e-6):
  state = {'t': 0}

  def step(g):
    state['t'] += 1
    t = state['t']
    out = {}
    for k, x in g.items():
      m = b1 * state.get(('m', k), 0.0) + (1 - b1) * x
      v = b2 * state.get(('v', k), 0.0) + (1 - b2) * x * x
      state[('m', k)], state[('v', k)] = m, v
      out[k] = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    return out

  return step


def np_eg(
  grads,
  *,
  base,
  placement,
  normalized,
  signal,
  granularity,
  scale_lr,
  gain_lr,
  beta=0.9,
  mu=0.9,
  bounds=((0.1, 10.0), (0.01, 100.0)),
):
  """docs/algorithms.md 3.4/3.5 in float64. Returns [(output, S, p)] per step."""
  (s_lo, s_hi), (p_lo, p_hi) = bounds
  keys = list(SHAPES)
  scale = {k: 1.0 for k in keys} if granularity == 'per_leaf' else 1.0
  gain = {k: np.ones(SHAPES[k]) for k in keys}
  gbar = {k: np.zeros(SHAPES[k]) for k in keys}
  prev = {k: np.zeros(SHAPES[k]) for k in keys}
  mom = {k: np.zeros(SHAPES[k]) for k in keys}
  adam = np_adam()
  out = []
  for t, g in enumerate(grads, start=1):
    if signal == 'gbar':
      d = gbar
    elif placement == 'output':
      d = {k: gain[k] * prev[k] for k in keys}
    else:
      d = prev
    dots = {k: np.sum(g[k] * d[k]) for k in keys}
    ng = {k: np.linalg.norm(g[k]) for k in keys}
    nd = {k: np.linalg.norm(d[k]) for k in keys}
    if granularity == 'per_leaf':
      align = {
        k: dots[k] / ((ng[k] + 1e-10) * (nd[k] + 1e-10)) if normalized else dots[k] for k in keys
      }
      scale = {k: np.clip(scale[k] * np.exp(scale_lr * align[k]), s_lo, s_hi) for k in keys}
    else:
      dot = sum(dots.values())
      if normalized:
        norm_g = np.sqrt(sum(v**2 for v in ng.values()))
        norm_d = np.sqrt(sum(v**2 for v in nd.values()))
        dot = dot / ((norm_g + 1e-10) * (norm_d + 1e-10))
      scale = np.clip(scale * np.exp(scale_lr * dot), s_lo, s_hi)
    for k in keys:
      b = (
        np.sign(g[k]) * np.sign(gbar[k])
        if normalized
        else g[k] * gbar[k] / (1 - beta ** max(t - 1, 1))
      )
      gain[k] = np.clip(gain[k] * np.exp(gain_lr * b), p_lo, p_hi)
    s_of = (lambda k: scale[k]) if granularity == 'per_leaf' else (lambda k: scale)
    if placement == 'input':
      for k in keys:
        mom[k] = mu * mom[k] + gain[k] * g[k]
      u = dict(mom)
      result = {k: s_of(k) * u[k] for k in keys}
    else:
      u = adam(g)
      result = {k: s_of(k) * gain[k] * u[k] for k in keys}
    for k in keys:
      gbar[k] = beta * gbar[k] + (1 - beta) * g[k]
    prev = u
    out.append(
      (
        result,
        dict(scale) if isinstance(scale, dict) else scale,
        {k: v.copy() for k, v in gain.items()},
      )
    )
  return out


CASES = [
  dict(
    base='trace',
    placement='input',
    normalized=True,
    signal='momentum',
    granularity='per_leaf',
    from_state=True,
  ),
  dict(
    base='trace',
    placement='input',
    normalized=True,
    signal='momentum',
    granularity='per_leaf',
    from_state=False,
  ),
  dict(
    base='trace',
    placement='input',
    normalized=False,
    signal='gbar',
    granularity='global',
    from_state=False,
  ),
  dict(
    base='adam',
    placement='output',
    normalized=True,
    signal='momentum',
    granularity='per_leaf',
    from_state=False,
  ),
  dict(
    base='adam',
    placement='output',
    normalized=False,
    signal='gbar',
    granularity='global',
    from_state=False,
  ),
  dict(
    base='adam',
    placement='output',
    normalized=True,
    signal='momentum',
    granularity='global',
    from_state=False,
  ),
]


def make_eg(case, scale_lr, gain_lr, adam_eps=1e-6, **kwargs):
  base = optax.trace(0.9) if case['base'] == 'trace' else optax.scale_by_adam(0.9, 0.999, adam_eps)
  return optim.eg_adapt(
    base,
    scale_lr=scale_lr,
    gain_lr=gain_lr,
    normalized=case['normalized'],
    scale_signal=case['signal'],
    scale_granularity=case['granularity'],
    gain_placement=case['placement'],
    direction_from_state=(lambda s: s.trace) if case['from_state'] else None,
    **kwargs,
  )


def run_eg(tx, grads):
  params = {k: jnp.zeros(s) for k, s in SHAPES.items()}
  state = tx.init(params)
  update = jax.jit(tx.update)
  out = []
  for g in grads:
    u, state = update(jax.tree.map(jnp.asarray, g), state, params)
    out.append((u, state))
  return out


@pytest.mark.parametrize('case', CASES, ids=lambda c: '-'.join(str(v) for v in c.values()))
def test_matches_numpy_reference(x64, case):
  grads = grad_stream(0, 25)
  ours = run_eg(make_eg(case, 0.05, 0.1), grads)
  ref = np_eg(
    grads, scale_lr=0.05, gain_lr=0.1, **{k: v for k, v in case.items() if k != 'from_state'}
  )
  # optax's Adam bias correction is float32 (int32 counter) even under x64.
  rtol = 1e-12 if case['base'] == 'trace' else 1e-6
  for (u, state), (r_u, r_s, r_p) in zip(ours, ref):
    for k in SHAPES:
      np.testing.assert_allclose(np.asarray(u[k]), r_u[k], rtol=rtol, atol=1e-14)
      np.testing.assert_allclose(np.asarray(state.gain[k]), r_p[k], rtol=1e-10)
      s = state.scale[k] if case['granularity'] == 'per_leaf' else state.scale
      np.testing.assert_allclose(float(s), r_s[k] if isinstance(r_s, dict) else r_s, rtol=1e-9)


@pytest.mark.parametrize('case', CASES[1:4], ids=['trace-leaf', 'trace-global', 'adam-leaf'])
def test_eg1_positivity_and_bounds(case):
  grads = grad_stream(1, 40, scale=3.0)
  states = [s for _, s in run_eg(make_eg(case, 5.0, 5.0), grads)]
  scales = np.array([jax.tree.leaves(s.scale) for s in states]).ravel()
  gains = np.concatenate([np.ravel(x) for s in states for x in jax.tree.leaves(s.gain)])
  assert scales.min() >= 0.1 - 1e-7 and scales.max() <= 10.0 + 1e-6
  assert gains.min() >= 0.01 - 1e-9 and gains.max() <= 100.0 + 1e-5
  assert np.isclose(gains.min(), 0.01) or np.isclose(gains.max(), 100.0)  # bounds are hit


@pytest.mark.parametrize('name', ['sgdm', 'adamw', 'lamb', 'adafactor'])
def test_eg2_zero_meta_lr_is_bitwise_the_base(name):
  config = config_schema.get_base_config()
  config.optim.name = name
  config.optim.adafactor_variant = 'bert4keras'
  config.optim.eg.scale_lr = config.optim.eg.gain_lr = 0.0
  rng = np.random.default_rng(2)
  params = {
    'dense': {
      'kernel': jnp.asarray(0.1 * rng.standard_normal((130, 140)), jnp.float32),
      'bias': jnp.zeros((140,), jnp.float32),
    }
  }
  grads = [
    jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
    for _ in range(4)
  ]
  results = []
  for enabled in (False, True):
    config.optim.eg.enabled = enabled
    tx = optim.build(config)
    p, state = params, tx.init(params)
    for g in grads:
      u, state = tx.update(g, state, p)
      p = optax.apply_updates(p, u)
    results.append(p)
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize('normalized', [True, False])
def test_eg3_loss_scale_invariance(x64, normalized):
  grads = grad_stream(3, 20)
  for case in (CASES[1], CASES[3]):
    case = dict(case, normalized=normalized)
    # Adam's eps is the one scale-dependent constant: set it negligible here.
    tx = make_eg(case, 0.05, 0.1, adam_eps=1e-20)
    base_run = run_eg(tx, grads)
    scaled_run = run_eg(tx, [jax.tree.map(lambda g: 1e3 * g, gs) for gs in grads])

    def meta(run):
      return np.concatenate(
        [np.ravel(x) for _, s in run for x in jax.tree.leaves((s.scale, s.gain))]
      )

    diff = np.abs(meta(base_run) - meta(scaled_run)).max()
    if normalized:
      assert diff < 1e-9
    else:
      assert diff > 1e-2


def quartic_loss(theta):
  a = jnp.arange(12.0).reshape(4, 3) / 10.0
  return 0.5 * jnp.sum((a @ theta - 1.0) ** 2) + 0.1 * jnp.sum(theta**4)


def test_eg4_hypergradients(x64):
  rng = np.random.default_rng(4)
  theta, u = jnp.asarray(rng.standard_normal(3)), jnp.asarray(rng.standard_normal(3))
  p, s, eta = jnp.asarray(rng.uniform(0.5, 2.0, 3)), 1.3, 0.1
  step = lambda s, p: quartic_loss(theta - eta * s * p * u)  # noqa: E731
  d_s, d_p = jax.grad(step, argnums=(0, 1))(s, p)
  g_next = jax.grad(quartic_loss)(theta - eta * s * p * u)
  np.testing.assert_allclose(d_s, -eta * jnp.sum(g_next * p * u), rtol=1e-12)
  np.testing.assert_allclose(d_p, -eta * s * g_next * u, rtol=1e-12)
  # The unnormalised wrapper moves log S by -(eta_S / eta) dL/dS and log p by
  # -(eta_p / (eta S)) dL/dp (plain SGD base, beta = 0: gbar_{t-1} = g_{t-1} = u_{t-1}).
  eta_s, eta_p = 0.3, 0.2
  tx = optax.chain(
    optim.eg_adapt(
      optax.identity(),
      scale_lr=eta_s,
      gain_lr=eta_p,
      normalized=False,
      beta=0.0,
      scale_min=1e-6,
      scale_max=1e6,
      gain_min=1e-6,
      gain_max=1e6,
    ),
    optax.scale(-eta),
  )
  state = tx.init(theta)
  upd, state = tx.update(jax.grad(quartic_loss)(theta), state, theta)
  theta1 = theta + upd
  _, state = tx.update(jax.grad(quartic_loss)(theta1), state, theta1)
  g1 = jax.grad(quartic_loss)(theta)
  step = lambda s, p: quartic_loss(theta - eta * s * p * g1)  # noqa: E731
  d_s, d_p = jax.grad(step, argnums=(0, 1))(1.0, jnp.ones(3))
  np.testing.assert_allclose(np.log(float(state[0].scale)), -eta_s / eta * d_s, rtol=1e-10)
  np.testing.assert_allclose(np.log(np.asarray(state[0].gain)), -eta_p / eta * d_p, rtol=1e-10)


def quadratic_loss(theta):
  a = jnp.asarray([[2.0, 0.3, 0.0], [0.3, 1.0, 0.2], [0.0, 0.2, 0.5]])
  return 0.5 * theta @ a @ theta - jnp.sum(theta)


def test_eg5_su_closed_form(x64):
  gamma, eta, steps = 0.3, 0.4, 30
  tx = optax.chain(
    optim.eg_adapt(
      optax.identity(),
      scale_lr=0.0,
      gain_lr=gamma,
      normalized=False,
      beta=0.0,
      gain_placement='input',
      scale_signal='gbar',
      gain_min=1e-300,
      gain_max=1e300,
    ),
    optax.scale(-eta),
  )
  theta = jnp.asarray([1.0, -2.0, 0.5])
  state = tx.init(theta)
  np_theta, nu, g_prev, log_nu = np.asarray(theta), np.ones(3), np.zeros(3), np.zeros(3)
  for _ in range(steps):
    g = jax.grad(quadratic_loss)(theta)
    upd, state = tx.update(g, state, theta)
    theta = theta + upd
    # Su: nu_{t+1} = nu_t exp(gamma g_{t-1} g_t), theta_{t+1} = theta_t - eta nu_{t+1} g_t.
    np_g = np.asarray(jax.grad(quadratic_loss)(jnp.asarray(np_theta)))
    nu = nu * np.exp(gamma * g_prev * np_g)
    log_nu += gamma * g_prev * np_g
    np_theta = np_theta - eta * nu * np_g
    g_prev = np_g
    np.testing.assert_allclose(np.asarray(theta), np_theta, rtol=1e-12)
    np.testing.assert_allclose(np.log(np.asarray(state[0].gain)), log_nu, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize('base', ['sgd', 'adam'])
def test_eg6_one_dimensional_quadratic(base):
  def final_scale(lr, h=1.0, steps=60):
    if base == 'sgd':
      eg = optim.eg_adapt(
        optax.trace(0.0),
        scale_lr=0.05,
        gain_lr=0.0,
        gain_placement='input',
        direction_from_state=lambda s: s.trace,
      )
    else:
      eg = optim.eg_adapt(optax.scale_by_adam(), scale_lr=0.05, gain_lr=0.0)
    tx = optax.chain(eg, optax.scale(-lr))
    x = jnp.asarray([3.0])
    state = tx.init(x)
    update = jax.jit(tx.update)
    for _ in range(steps):
      u, state = update(h * x, state, x)
      x = x + u
    return float(state[0].scale)

  small, large = (0.01, 1.8) if base == 'sgd' else (0.001, 5.0)
  assert final_scale(small) > 1.5  # consecutive gradients agree: S grows
  assert final_scale(large) < 0.9  # oscillation: S shrinks


def test_eg7_meta_update_reads_previous_signals(x64):
  g1 = {'a': np.array([[1.0, -2.0, 0.5]] * 4), 'b': np.array([0.3, -0.1, 2.0, 1.0, -1.0])}
  g2 = {'a': np.array([[-0.5, -1.0, 2.0]] * 4), 'b': np.array([-0.3, 0.4, 1.0, 1.0, 1.0])}
  case = dict(CASES[1])
  (u1, s1), (u2, s2) = run_eg(make_eg(case, 1.0, 1.0), [g1, g2])
  # t = 1: m_0 = gbar_0 = 0, so S and p stay 1 whatever the meta learning rates.
  assert all(float(x) == 1.0 for x in jax.tree.leaves(s1.scale))
  assert all(np.all(np.asarray(x) == 1.0) for x in jax.tree.leaves(s1.gain))
  for k in SHAPES:
    m1 = g1[k]  # m_1 = p_1 . g_1 = g_1
    cos = np.sum(g2[k] * m1) / ((np.linalg.norm(g2[k]) + 1e-10) * (np.linalg.norm(m1) + 1e-10))
    np.testing.assert_allclose(float(s2.scale[k]), np.clip(np.exp(cos), 0.1, 10.0), rtol=1e-12)
    p2 = np.clip(np.exp(np.sign(g2[k]) * np.sign(0.1 * g1[k])), 0.01, 100.0)
    np.testing.assert_allclose(np.asarray(s2.gain[k]), p2, rtol=1e-12)
    # Using m_2 (already updated with g_2) would give a different S.
    m2 = 0.9 * m1 + p2 * g2[k]
    cos_wrong = np.sum(g2[k] * m2) / (np.linalg.norm(g2[k]) * np.linalg.norm(m2))
    assert abs(np.clip(np.exp(cos_wrong), 0.1, 10.0) - float(s2.scale[k])) > 1e-3
