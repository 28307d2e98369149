"""Accumulation hidden in momentum (docs/algorithms.md 2.7, GA-1..GA-7) against NumPy float64
recursions."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optim
from pretrain import config as config_schema
from optim import adafactor as af


def make_config(**optim_fields):
  config = config_schema.get_base_config()
  config.train.num_train_steps = 60
  config.optim.grad_clip_norm = 0.0
  config.optim.schedule = 'linear'
  config.optim.warmup_steps = 3
  config.optim.update_from_flattened_dict(optim_fields)
  return config


def least_squares(seed=0, n_updates=50, rows=28, dim=5, out=3):
  rng = np.random.default_rng(seed)
  w_true = rng.standard_normal((dim, out))
  xs = rng.standard_normal((n_updates, rows, dim))
  ys = xs @ w_true + 0.5 * rng.standard_normal((n_updates, rows, out))
  params = {'dense': {'kernel': 0.1 * rng.standard_normal((dim, out)), 'bias': np.zeros(out)}}
  return params, xs, ys


def loss_fn(params, x, y):
  pred = x @ params['dense']['kernel'] + params['dense']['bias']
  return 0.5 * jnp.mean(jnp.sum((pred - y) ** 2, axis=-1))


def make_step(tx):
  @jax.jit
  def step(params, state, x, y):
    updates, state = tx.update(jax.grad(loss_fn)(params, x, y), state, params)
    return optax.apply_updates(params, updates), state, updates

  return step


def train(tx, params, xs, ys, k):
  """Micro-batch training: each update's rows split into k micro-batches; returns params
  after every micro-step."""
  params = jax.tree.map(jnp.asarray, params)
  state = tx.init(params)
  step = make_step(tx)
  history = []
  for x, y in zip(xs, ys):
    for xm, ym in zip(np.split(x, k), np.split(y, k)):
      params, state, updates = step(params, state, xm, ym)
      history.append((params, updates))
  return history


def np_grad(params, x, y):
  w, b = params['dense']['kernel'], params['dense']['bias']
  r = x @ w + b - y
  return {'dense': {'kernel': x.T @ r / len(x), 'bias': r.mean(0)}}


def flat(tree):
  return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


@pytest.mark.parametrize('k', [1, 2, 4, 7])
def test_ga1_hidden_sgdm_equals_multisteps_and_large_batch(x64, k):
  params, xs, ys = least_squares(k, rows=4 * 7)
  config = make_config(
    name='sgdm',
    learning_rate=0.05,
    b1=0.9,
    weight_decay=0.01,
    accumulation_steps=k,
    accumulation='momentum',
  )
  schedule = optim.learning_rate_schedule(config)
  hidden = train(optim.build(config), params, xs, ys, k)
  config.optim.accumulation = 'multisteps'
  multi = train(optim.build(config), params, xs, ys, k)
  large = train(
    optax.chain(
      optax.trace(0.9),
      optax.add_decayed_weights(0.01, optim.decay_mask),
      optax.scale_by_learning_rate(schedule),
    ),
    params,
    xs,
    ys,
    1,
  )
  # NumPy float64: heavy-ball SGDM on the k-times larger batch, decoupled decay on the kernel.
  theta = jax.tree.map(np.array, params)
  m = jax.tree.map(np.zeros_like, theta)
  for tau, (x, y) in enumerate(zip(xs, ys)):
    g = np_grad(theta, x, y)
    m = jax.tree.map(lambda m, g: 0.9 * m + g, m, g)
    lr = float(schedule(tau))
    theta = {
      'dense': {
        'kernel': theta['dense']['kernel']
        - lr * (m['dense']['kernel'] + 0.01 * theta['dense']['kernel']),
        'bias': theta['dense']['bias'] - lr * m['dense']['bias'],
      }
    }
    for run in (hidden[(tau + 1) * k - 1][0], multi[(tau + 1) * k - 1][0], large[tau][0]):
      assert np.abs(flat(run) - flat(theta)).max() <= 1e-12


def eager_run(tx, params, grads):
  state = tx.init(params)
  outs = []
  for g in grads:
    u, state = tx.update(g, state, params)
    params = optax.apply_updates(params, u)
    outs.append(params)
  return outs


@pytest.mark.parametrize('kind', ['sgdm', 'adamw', 'lamb', 'adafactor', 'every_k'])
def test_ga2_k1_is_bitwise_the_base(kind):
  rng = np.random.default_rng(2)
  shapes = {'w': (130, 140), 'b': (140,), 'v': (3, 4), 'dense_general': (130, 4, 32)}
  params = {k: jnp.asarray(0.1 * rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
  grads = [
    {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
    for _ in range(4)
  ]
  lr = optax.linear_schedule(1e-2, 1e-3, 4)
  mask = optim.decay_mask
  tail = optax.chain(optax.add_decayed_weights(0.01, mask), optax.scale_by_learning_rate(lr))
  if kind == 'sgdm':
    ours = optim.accumulate_in_momentum_sgdm(1, 0.9, tail=tail)
    ref = optax.chain(optax.trace(0.9), tail)
  elif kind == 'adamw':
    ours = optim.accumulate_in_momentum_adam(1, 0.9, 0.999, 1e-6, tail=tail)
    ref = optax.adamw(lr, 0.9, 0.999, 1e-6, weight_decay=0.01, mask=mask)
  elif kind == 'lamb':
    ours = optim.accumulate_in_momentum_adam(
      1,
      0.9,
      0.999,
      1e-6,
      tail=optax.chain(
        optax.add_decayed_weights(0.01, mask),
        optax.scale_by_trust_ratio(),
        optax.scale_by_learning_rate(lr),
      ),
    )
    ref = optax.lamb(lr, 0.9, 0.999, 1e-6, weight_decay=0.01, mask=mask)
  elif kind == 'adafactor':
    ours = optim.accumulate_in_momentum_adafactor(
      1, 0.9, tail=optax.chain(optax.scale_by_param_block_rms(1e-3), tail)
    )
    ref = af.adafactor(
      lr, variant='bert4keras', momentum=0.9, weight_decay=0.01, weight_decay_mask=mask
    )
  else:
    ref = optax.adamw(lr, 0.9, 0.999, 1e-6, weight_decay=0.01, mask=mask)
    ours = optim.every_k(ref, 1)
  for a, b in zip(eager_run(ours, params, grads), eager_run(ref, params, grads)):
    for key in shapes:
      np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))


ACCUMULATING = [
  dict(name='sgdm', accumulation='momentum'),
  dict(name='adamw', accumulation='momentum'),
  dict(name='lamb', accumulation='momentum'),
  dict(name='adafactor', accumulation='momentum', adafactor_variant='bert4keras'),
  dict(name='adamw', accumulation='every_k'),
  dict(name='adamw', accumulation='multisteps'),
]


def _id(fields):
  return '-'.join(str(v) for v in fields.values())


@pytest.mark.parametrize('fields', ACCUMULATING, ids=_id)
def test_ga3_theta_constant_inside_window(fields):
  params, xs, ys = least_squares(3, n_updates=3, rows=12)
  clip = 0.0 if fields['accumulation'] == 'momentum' else 1.0  # momentum refuses a clip
  config = make_config(
    accumulation_steps=3, learning_rate=0.1, grad_clip_norm=clip, warmup_steps=0, **fields
  )
  history = train(optim.build(config), params, xs, ys, 3)
  for s, (p, u) in enumerate(history, start=1):
    if s % 3:
      assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(u))
    else:
      assert any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(u))
    if s % 3 and s > 1:
      np.testing.assert_array_equal(flat(p), flat(history[s - 2][0]))


def test_ga4_hidden_adam_first_moment_exact(x64):
  rng = np.random.default_rng(4)
  k, b1, b2, eps, lr = 4, 0.9, 0.999, 1e-6, 1e-2
  params = {'w': jnp.asarray(rng.standard_normal((4, 3)))}
  grads = [{'w': jnp.asarray(rng.standard_normal((4, 3)))} for _ in range(6 * k)]
  hidden = optim.accumulate_in_momentum_adam(k, b1, b2, eps, tail=optax.scale_by_learning_rate(lr))
  multi = optax.MultiSteps(
    optax.adam(lr, b1, b2, eps), every_k_schedule=k, accumulator_dtype=jnp.float64
  )
  s_h, s_m = hidden.init(params), multi.init(params)
  update_h, update_m = jax.jit(hidden.update), jax.jit(multi.update)
  mu = nu = np.zeros((4, 3))
  for s, g in enumerate(grads, start=1):
    u_h, s_h = update_h(g, s_h, params)
    _, s_m = update_m(g, s_m, params)
    # NumPy float64, docs/algorithms.md 2.2.
    first = (s - 1) % k == 0
    gw = np.asarray(g['w'])
    mu = (b1 * mu if first else mu) + (1 - b1) / k * gw
    nu = (b2 * nu if first else nu) + (1 - b2) / k * gw**2
    if s % k == 0:
      tau = s // k
      mhat = mu / (1 - b1**tau)
      expected = -lr * mhat / (np.sqrt(nu / (1 - b2**tau)) + eps)
      # optax's bias correction computes 1 - b^tau in float32 (int32 counter) even under
      # x64, hence 1e-6 here; the moments themselves agree to 1e-12.
      np.testing.assert_allclose(np.asarray(u_h['w']), expected, rtol=1e-6)
      exact_mu = np.asarray(s_m.inner_opt_state[0].mu['w'])
      np.testing.assert_allclose(np.asarray(s_h.moments.mu['w']), exact_mu, rtol=1e-12)
      np.testing.assert_allclose(mhat, exact_mu / (1 - b1**tau), rtol=1e-12)


def test_ga4_hidden_adam_exact_for_equal_micro_gradients(x64):
  params, xs, ys = least_squares(5, n_updates=20, rows=8)
  k = 4
  # Each micro-batch is the whole batch: all micro-gradients of a window are equal.
  xs_rep = np.concatenate([xs] * k, axis=1)
  ys_rep = np.concatenate([ys] * k, axis=1)
  config = make_config(name='adamw', accumulation_steps=k, accumulation='momentum')
  hidden = train(optim.build(config), params, xs_rep, ys_rep, k)
  config.optim.accumulation = 'multisteps'
  multi = train(optim.build(config), params, xs_rep, ys_rep, k)
  for (a, _), (b, _) in zip(hidden, multi):
    assert np.abs(flat(a) - flat(b)).max() <= 1e-12


def test_ga5_beta_tilde_deviation_shrinks_as_beta_grows(x64):
  params, xs, ys = least_squares(6, n_updates=40, rows=16)
  k, lr = 4, 0.5
  deviations = []
  for beta in (0.9, 0.99, 0.999):
    beta_tilde = 1 - (1 - beta) / k
    tx = optim.every_k(optax.chain(optax.ema(beta_tilde, debias=False), optax.scale(-lr)), k)
    approx = train(tx, params, xs, ys, k)[-1][0]
    # NumPy float64 exact accumulation: EMA momentum of the window-mean gradient.
    theta = jax.tree.map(np.array, params)
    m = jax.tree.map(np.zeros_like, theta)
    for x, y in zip(xs, ys):
      m = jax.tree.map(lambda m, g: beta * m + (1 - beta) * g, m, np_grad(theta, x, y))
      theta = jax.tree.map(lambda t, m: t - lr * m, theta, m)
    moved = np.linalg.norm(flat(theta) - flat(params))
    deviations.append(np.linalg.norm(flat(approx) - flat(theta)) / moved)
  assert deviations[0] > deviations[1] > deviations[2]
  assert deviations[0] < 0.05


@pytest.mark.parametrize('fields', ACCUMULATING, ids=_id)
def test_ga6_resume_mid_window(fields):
  params, xs, ys = least_squares(7, n_updates=4, rows=12)
  config = make_config(accumulation_steps=3, learning_rate=0.05, warmup_steps=0, **fields)
  straight = train(optim.build(config), params, xs, ys, 3)
  # Run 4 micro-steps (mid-window), round-trip the state through host leaves, then resume
  # with a freshly built optimizer (as a restarted process would).
  tx = optim.build(config)
  p = jax.tree.map(jnp.asarray, params)
  state = tx.init(p)
  micro = [(xm, ym) for x, y in zip(xs, ys) for xm, ym in zip(np.split(x, 3), np.split(y, 3))]
  step = make_step(tx)
  for x, y in micro[:4]:
    p, state, _ = step(p, state, x, y)
  assert int(jax.tree.leaves(state)[0]) in (1, 4)  # a micro-step counter, mid-window
  leaves, treedef = jax.tree.flatten(state)
  state = jax.tree.unflatten(treedef, [np.asarray(x).copy() for x in leaves])
  step = make_step(optim.build(config))
  for i, (x, y) in enumerate(micro[4:], start=4):
    p, state, _ = step(p, state, x, y)
    np.testing.assert_array_equal(flat(p), flat(straight[i][0]))


@pytest.mark.parametrize('fields', ACCUMULATING, ids=_id)
def test_ga7_decoupled_decay_only_at_boundaries(x64, fields):
  k, wd = 3, 0.1
  config = make_config(
    accumulation_steps=k, weight_decay=wd, learning_rate=0.5, warmup_steps=0, **fields
  )
  schedule = optim.learning_rate_schedule(config)
  tx = optim.build(config)
  params = {'dense': {'kernel': jnp.full((4, 3), 2.0), 'bias': jnp.full((3,), 2.0)}}
  zeros = jax.tree.map(jnp.zeros_like, params)
  state = tx.init(params)
  update = jax.jit(tx.update)
  kernel = 2.0
  for s in range(1, 4 * k + 1):
    updates, state = update(zeros, state, params)
    params = optax.apply_updates(params, updates)
    if s % k == 0:
      tau = s // k
      lr = float(schedule(tau - 1))
      if fields['name'] == 'lamb':  # trust ratio: ||update|| = lr ||theta||
        kernel *= 1 - lr
      else:
        kernel *= 1 - lr * wd
    np.testing.assert_allclose(np.asarray(params['dense']['kernel']), kernel, rtol=1e-13)
    np.testing.assert_array_equal(np.asarray(params['dense']['bias']), 2.0)


def _adafactor_accumulation_reference(
  theta, grads, k, lr, beta1=0.9, decay_rate=0.8, eps1=1e-30, clip=1.0, eps2=1e-3
):
  """The recursion of `accumulate_in_momentum_adafactor`'s docstring in float64 NumPy: a
  factored (rows, cols) leaf 'w' and an unfactored vector 'b'; parameters after each
  micro-step."""
  theta = {n: np.array(v, np.float64) for n, v in theta.items()}
  rows, cols = theta['w'].shape
  r, c, v = np.zeros(rows), np.zeros(cols), np.zeros_like(theta['b'])
  m = {n: np.zeros_like(x) for n, x in theta.items()}
  history = []
  for s, g in enumerate(grads, start=1):
    tau, i = -(-s // k), (s - 1) % k + 1
    first, last = i == 1, i == k
    b = 1.0 - tau ** (-decay_rate)
    w = 1.0 - (1.0 - b) * (k - i) / k  # the window weight the code divides by
    sq = {n: g[n] ** 2 + eps1 for n in g}
    r = (b * r if first else r) + (1 - b) / k * sq['w'].mean(axis=1)
    c = (b * c if first else c) + (1 - b) / k * sq['w'].mean(axis=0)
    v = (b * v if first else v) + (1 - b) / k * sq['b']
    rw, cw = r / w, c / w
    u = {'w': g['w'] / np.sqrt(np.outer(rw, cw) / rw.mean()), 'b': g['b'] / np.sqrt(v / w)}
    for n in u:
      if clip:
        u[n] = u[n] / max(1.0, np.sqrt(np.mean(u[n] ** 2)) / clip)
      m[n] = (beta1 * m[n] if first else m[n]) + (1 - beta1) / k * u[n]
    if last:
      theta = {n: theta[n] - lr * max(eps2, np.sqrt(np.mean(theta[n] ** 2))) * m[n] for n in theta}
    history.append(theta)
  return history


@pytest.mark.parametrize('k, clip', [(2, 0.0), (3, 0.0), (3, 1.0)])
def test_adafactor_accumulation_matches_float64_reference(x64, k, clip):
  """Numbers, not just shapes: 3 windows of k micro-steps through `optim.build` against the
  float64 recursion (a factored 130 x 140 leaf and an unfactored vector). Dropping the window
  weight w (w = 1) moves the parameters by ~10 %, far outside the tolerance (update clipping
  can hide w's scale, hence the cases without it)."""
  rng = np.random.default_rng(4)
  theta = {'w': 0.1 * rng.standard_normal((130, 140)), 'b': 0.1 * rng.standard_normal(7)}
  grads = [
    {'w': rng.standard_normal((130, 140)) * (1 + s), 'b': rng.standard_normal(7)}
    for s in range(3 * k)
  ]
  lr = 0.05
  config = make_config(
    name='adafactor',
    adafactor_variant='bert4keras',
    b1=0.9,
    accumulation='momentum',
    accumulation_steps=k,
    learning_rate=lr,
    schedule='constant',
    warmup_steps=0,
    weight_decay=0.0,
    clipping_threshold=clip,
  )
  tx = optim.build(config)
  params = jax.tree.map(jnp.asarray, theta)
  state = tx.init(params)
  update = jax.jit(tx.update)
  ref = _adafactor_accumulation_reference(theta, grads, k, lr, clip=clip)
  for s, g in enumerate(grads):
    u, state = update(jax.tree.map(jnp.asarray, g), state, params)
    params = optax.apply_updates(params, u)
    for n in theta:  # statistics are float32 by design: compare the moves to 1e-5
      moved, expected = np.asarray(params[n]) - theta[n], ref[s][n] - theta[n]
      assert np.linalg.norm(moved - expected) <= 1e-5 * np.linalg.norm(expected) + 1e-15, (
        f'micro-step {s + 1}, leaf {n}'
      )
  assert not np.allclose(ref[-1]['w'], theta['w'])  # it moved
