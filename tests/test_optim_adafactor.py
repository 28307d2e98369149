"""AdaFactor (docs/algorithms.md 1.5, AF-1..AF-10) against a NumPy float64 version of
docs/algorithms.md 1.1."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optim import adafactor as af


def rms(x):
  return np.sqrt(np.mean(np.square(x)))


def np_vhat(stats, shape, dims):
  """Vhat from (R, C) (factored) or V, docs/algorithms.md 1.1 step 3 (mean form)."""
  if dims is None:
    return stats
  d1, d0 = dims
  row, col = stats
  reduced_d1 = d1 - 1 if d1 > d0 else d1
  return (
    np.expand_dims(row, d0)
    * np.expand_dims(col, d1)
    / np.expand_dims(row.mean(axis=reduced_d1, keepdims=True), d0)
  )


def np_adafactor(
  theta0, grads, *, variant, rho, b1=0.0, wd=0.0, c=0.8, d=1.0, param_scale=True, factored=True
):
  """docs/algorithms.md 1.1 + the two placements of docs/algorithms.md 1.2, float64. Returns the
  list of thetas."""
  theta = {k: np.array(v, np.float64) for k, v in theta0.items()}
  stats, mom, out = {}, {k: np.zeros_like(v) for k, v in theta.items()}, []
  for t, g_tree in enumerate(grads, start=1):
    b = 1.0 - t ** (-c)
    rho_t = rho(t - 1)
    new = {}
    for k, th in theta.items():
      g = np.asarray(g_tree[k], np.float64)
      dims = af.factored_dims(th.shape, factored)
      big_g = g * g + 1e-30
      if dims is None:
        prev = stats.get(k, np.zeros_like(g))
        stats[k] = b * prev + (1 - b) * big_g
      else:
        d1, d0 = dims
        prev_r, prev_c = stats.get(k, (0.0, 0.0))
        stats[k] = (
          b * prev_r + (1 - b) * big_g.mean(axis=d0),
          b * prev_c + (1 - b) * big_g.mean(axis=d1),
        )
      u = g / np.sqrt(np_vhat(stats[k], th.shape, dims))
      u_hat = u / max(1.0, rms(u) / d) if d else u
      scale = max(1e-3, rms(th)) if param_scale else 1.0
      if variant == 'optax':
        step = rho_t * scale * u_hat
        mom[k] = b1 * mom[k] + (1 - b1) * step if b1 else step
        new[k] = th - mom[k] - wd * th
      else:
        mom[k] = b1 * mom[k] + (1 - b1) * u_hat if b1 else u_hat
        new[k] = th - rho_t * (scale * mom[k] + wd * th)
    theta = new
    out.append(theta)
  return out


def run(tx, theta0, grads, dtype=None):
  params = jax.tree.map(lambda x: jnp.asarray(x, dtype), theta0)
  state = tx.init(params)
  update = jax.jit(tx.update)
  out = []
  for g in grads:
    u, state = update(jax.tree.map(lambda x: jnp.asarray(x, dtype), g), state, params)
    params = optax.apply_updates(params, u)
    out.append(params)
  return out, state


def random_tree(rng, shapes, scale=1.0):
  return {k: scale * rng.standard_normal(s) for k, s in shapes.items()}


SHAPES = {
  'bias': (3,),
  'small': (5, 7),
  'wide': (127, 1000),
  'kernel': (130, 200),
  'stacked': (4, 130, 140),
}


def test_af1_rank1_identity():
  rng = np.random.default_rng(0)
  big_c = rng.uniform(0.1, 2.0, (6, 9))
  mean_form = np_vhat((big_c.mean(axis=1), big_c.mean(axis=0)), big_c.shape, (0, 1))
  sum_form = np.outer(big_c.sum(1), big_c.sum(0)) / big_c.sum()
  np.testing.assert_allclose(mean_form, sum_form, rtol=1e-13)
  np.testing.assert_allclose(sum_form.sum(1), big_c.sum(1), rtol=1e-13)
  np.testing.assert_allclose(sum_form.sum(0), big_c.sum(0), rtol=1e-13)
  # I-divergence sum c log(c / (a b)) - c + a b is stationary at a = rows, b = cols / total.
  a, b = big_c.sum(1), big_c.sum(0) / big_c.sum()
  grad_a = (-big_c / a[:, None] + b[None, :]).sum(1)
  grad_b = (-big_c / b[None, :] + a[:, None]).sum(0)
  assert np.abs(grad_a).max() < 1e-12 and np.abs(grad_b).max() < 1e-12


def test_af1_code_uses_the_rank1_estimate(x64):
  # At t = 1 (beta2hat = 0) the factored statistic of G = g^2 is the sum form of G.
  rng = np.random.default_rng(1)
  g = rng.standard_normal((130, 140))
  tx = af.adafactor_direction(clipping_threshold=0.0, parameter_scale=False)
  u, _ = tx.update(
    {'w': jnp.asarray(g)}, tx.init({'w': jnp.zeros_like(g)}), {'w': jnp.zeros_like(g)}
  )
  big_g = g * g + 1e-30
  vhat = np.outer(big_g.sum(1), big_g.sum(0)) / big_g.sum()
  np.testing.assert_allclose(np.asarray(u['w']), g / np.sqrt(vhat), rtol=1e-6)


def test_af2_first_step(x64):
  rng = np.random.default_rng(2)
  a, b = rng.uniform(0.5, 2.0, 150), rng.uniform(0.5, 2.0, 140)
  signs = rng.choice([-1.0, 1.0], (150, 140))
  grads = {'v': rng.standard_normal((7, 9)), 'f': signs * np.sqrt(np.outer(a, b))}
  tx = af.adafactor_direction(clipping_threshold=0.0, parameter_scale=False)
  zeros = jax.tree.map(jnp.zeros_like, grads)
  u, _ = tx.update(jax.tree.map(jnp.asarray, grads), tx.init(zeros), zeros)
  g = grads['v']
  np.testing.assert_allclose(np.asarray(u['v']), g / np.sqrt(g * g + 1e-30), rtol=1e-12)
  np.testing.assert_allclose(np.asarray(u['f']), signs, rtol=1e-12)  # Vhat_1 = g^2 exactly


@pytest.mark.parametrize('t, expected', [(2, 0.425651), (10, 0.841511), (1000, 0.996019)])
def test_af3_beta2hat(x64, t, expected):
  # g = 1 for t - 1 steps (V = 1 + eps1), then g = 2: V_t = b + 4 (1 - b), U_t = 2 / sqrt(V_t).
  tx = af.adafactor_direction(clipping_threshold=0.0, parameter_scale=False)
  p = {'v': jnp.zeros((2,))}
  state = jax.lax.fori_loop(
    0, t - 1, lambda i, s: tx.update({'v': jnp.ones((2,))}, s, p)[1], tx.init(p)
  )
  u, _ = tx.update({'v': 2 * jnp.ones((2,))}, state, p)
  v_t = (2.0 / float(u['v'][0])) ** 2
  assert abs((4.0 - v_t) / 3.0 - expected) < 2e-6
  assert abs((1 - t**-0.8) - expected) < 1e-6


def test_af4_clipping(x64):
  rng = np.random.default_rng(4)
  clipped = af.adafactor_direction(clipping_threshold=1.0, parameter_scale=False)
  raw = af.adafactor_direction(clipping_threshold=0.0, parameter_scale=False)
  p = {'w': jnp.zeros((140, 130)), 'b': jnp.zeros((9,))}
  s_c, s_r = clipped.init(p), raw.init(p)
  for step in range(6):
    g = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape) * 10 ** (step % 3)), p)
    u_c, s_c = clipped.update(g, s_c, p)
    u_r, s_r = raw.update(g, s_r, p)
    for k in p:
      r = rms(np.asarray(u_r[k]))
      assert rms(np.asarray(u_c[k])) <= 1 + 1e-12
      if r <= 1:
        np.testing.assert_array_equal(np.asarray(u_c[k]), np.asarray(u_r[k]))
      else:
        np.testing.assert_allclose(np.asarray(u_c[k]), np.asarray(u_r[k]) / r, rtol=1e-12)


@pytest.mark.parametrize('variant', af.VARIANTS)
def test_af5_step_size(x64, variant):
  rng = np.random.default_rng(5)
  rho = 0.01
  theta0 = {'w': rng.standard_normal((140, 130)) * 0.05, 'zero': np.zeros((150, 140))}
  # A small then a large gradient: RMS(U_2) >> 1, so the second update is clipped.
  grads = [
    jax.tree.map(lambda x: 1e-3 * rng.standard_normal(x.shape), theta0),
    jax.tree.map(lambda x: 1e2 * rng.standard_normal(x.shape), theta0),
  ]
  tx = af.adafactor(rho, variant=variant)
  thetas, _ = run(tx, theta0, grads)
  for k in theta0:
    step = np.asarray(thetas[1][k]) - np.asarray(thetas[0][k])
    assert rms(step) == pytest.approx(rho * max(1e-3, rms(np.asarray(thetas[0][k]))), rel=1e-9)
  ref = np_adafactor(theta0, grads, variant=variant, rho=lambda t: rho)
  for k in theta0:
    np.testing.assert_allclose(np.asarray(thetas[1][k]), ref[1][k], rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize('variant', af.VARIANTS)
def test_af6_gradient_scale_invariance(x64, variant):
  rng = np.random.default_rng(6)
  theta0 = random_tree(rng, {'w': (130, 140), 'b': (9,)}, 0.1)
  grads = [random_tree(rng, {'w': (130, 140), 'b': (9,)}) for _ in range(5)]
  tx = af.adafactor(1e-2, variant=variant, momentum=0.9)
  base, _ = run(tx, theta0, grads)
  scaled, _ = run(tx, theta0, [jax.tree.map(lambda g: 1e3 * g, gs) for gs in grads])
  for a, b in zip(base, scaled):
    for k in theta0:
      np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=1e-12, atol=1e-14)


def test_af7_parity_with_optax_adafactor():
  rng = np.random.default_rng(7)
  theta0 = random_tree(rng, SHAPES, 0.1)
  grads = [random_tree(rng, SHAPES) for _ in range(50)]
  lr = optax.linear_schedule(1e-2, 1e-3, 50)
  ours, _ = run(af.adafactor(lr, variant='optax'), theta0, grads, jnp.float32)
  ref, _ = run(optax.adafactor(learning_rate=lr), theta0, grads, jnp.float32)
  for a, b in zip(ours, ref):
    for k in theta0:
      assert np.abs(np.asarray(a[k]) - np.asarray(b[k])).max() <= 1e-6


@pytest.mark.parametrize('variant', af.VARIANTS)
def test_variants_match_numpy_reference(x64, variant):
  rng = np.random.default_rng(8)
  shapes = {'bias': (3,), 'small': (5, 7), 'kernel': (130, 200), 'stacked': (3, 130, 140)}
  theta0 = random_tree(rng, shapes, 0.1)
  grads = [random_tree(rng, shapes) for _ in range(12)]
  lr = optax.linear_schedule(1e-2, 1e-3, 12)
  tx = af.adafactor(lr, variant=variant, momentum=0.9, weight_decay=1e-3)
  ours, _ = run(tx, theta0, grads)
  ref = np_adafactor(theta0, grads, variant=variant, rho=lambda t: float(lr(t)), b1=0.9, wd=1e-3)
  for a, b in zip(ours, ref):
    for k in theta0:
      # beta2hat is float32 inside optax even under x64: agreement ~1e-7 relative.
      np.testing.assert_allclose(np.asarray(a[k]), b[k], rtol=2e-6, atol=1e-9)


def test_af8_momentum_placement(x64):
  rng = np.random.default_rng(9)
  theta = {'w': jnp.asarray(rng.standard_normal((130, 140)) * 0.1)}
  grads = [{'w': jnp.asarray(rng.standard_normal((130, 140)))} for _ in range(8)]

  def updates(lr):
    outs = []
    for variant in af.VARIANTS:
      tx = af.adafactor(lr, variant=variant, momentum=0.9)
      state, us = tx.init(theta), []
      for g in grads:  # theta held fixed: RMS(theta) is constant
        u, state = tx.update(g, state, theta)
        us.append(np.asarray(u['w']))
      outs.append(np.stack(us))
    return outs

  optax_u, b4k_u = updates(1e-2)
  np.testing.assert_allclose(optax_u, b4k_u, rtol=1e-10, atol=1e-16)
  optax_u, b4k_u = updates(optax.linear_schedule(1e-2, 1e-4, 8))
  # Under a schedule the placements differ (documented, not fixed).
  assert np.abs(optax_u - b4k_u).max() > 1e-2 * np.abs(b4k_u).max()


def test_af9_weight_decay_convention(x64):
  theta0 = {'w': np.full((130, 140), 0.5)}
  zero = [{'w': np.zeros((130, 140))}]
  lr, wd = 0.1, 0.01
  b4k, _ = run(af.adafactor(lr, variant='bert4keras', weight_decay=wd), theta0, zero)
  opt, _ = run(af.adafactor(lr, variant='optax', weight_decay=wd), theta0, zero)
  np.testing.assert_allclose(np.asarray(b4k[0]['w']), 0.5 * (1 - lr * wd), rtol=1e-14)
  np.testing.assert_allclose(np.asarray(opt[0]['w']), 0.5 * (1 - wd), rtol=1e-14)


def test_af10_memory_and_factoring_rule():
  params = {
    'm_n': jnp.zeros((300, 200)),
    'short': jnp.zeros((127, 1000)),
    'stacked': jax.ShapeDtypeStruct((12, 768, 768), jnp.float32),
  }
  state = jax.eval_shape(af.adafactor(1e-3).init, params)
  fstate = next(
    s for s in jax.tree.leaves(state, is_leaf=lambda s: hasattr(s, 'v_row')) if hasattr(s, 'v_row')
  )
  # optax's v_row is indexed by the second largest axis, v_col by the largest.
  assert fstate.v_row['m_n'].shape == (200,) and fstate.v_col['m_n'].shape == (300,)
  assert fstate.v['m_n'].shape == (1,)  # m + n (+1 placeholder) floats, not m * n
  assert fstate.v['short'].shape == (127, 1000)  # 127 < 128: not factored
  assert fstate.v_row['short'].shape == (1,)
  # Stacked layers: factored over the two 768 axes, one rank-1 estimate per layer.
  assert fstate.v_row['stacked'].shape == (12, 768)
  assert fstate.v_col['stacked'].shape == (12, 768)
  assert af.factored_dims((12, 768, 3072)) == (1, 2)
  assert af.factored_dims((12, 768)) is None


def test_float32_statistics_with_bfloat16_params():
  rng = np.random.default_rng(10)
  shapes = {'w': (130, 140), 'b': (140,)}
  theta0 = random_tree(rng, shapes, 0.1)
  grads = [random_tree(rng, shapes) for _ in range(4)]
  # optax alone keeps bf16 statistics; ours keeps float32.
  bf16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), theta0)
  optax_state = optax.adafactor(1e-2).init(bf16)
  assert {x.dtype for x in jax.tree.leaves(optax_state) if x.ndim} == {jnp.dtype(jnp.bfloat16)}
  for variant in af.VARIANTS:
    tx = af.adafactor(1e-2, variant=variant, momentum=0.9)
    out, state = run(tx, theta0, grads, jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(state) if x.ndim} == {jnp.dtype(jnp.float32)}
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(out[-1]))
    ref, _ = run(
      tx,
      jax.tree.map(lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32), theta0),
      grads,
      jnp.float32,
    )
    for k in shapes:
      np.testing.assert_allclose(
        np.asarray(out[-1][k], np.float32), np.asarray(ref[-1][k]), rtol=3e-2, atol=3e-3
      )


def test_matrix_view_factors_dense_general_kernels():
  view = af.matrix_view_shape
  assert view((12, 768, 12, 64), ('layers', 'attention', 'query', 'kernel')) == (12, 768, 768)
  assert view((12, 12, 64, 768), ('layers', 'attention', 'out', 'kernel')) == (12, 768, 768)
  assert view((768, 12, 64), ('attention', 'query', 'kernel')) == (768, 768)
  assert view((12, 12, 64), ('layers', 'attention', 'query', 'bias')) == (12, 12, 64)
  assert view((12, 768, 768), ('layers', 'mlp', 'kernel')) == (12, 768, 768)  # already factored
  assert view((4, 130, 140)) == (4, 130, 140)
  assert view((127, 1000)) == (127, 1000)
  # Without the stacked-layers name, the leading 12 is an ordinary small axis.
  assert view((12, 12, 64, 768), ('attention', 'out', 'kernel')) == (9216, 768)


@pytest.mark.parametrize('variant', af.VARIANTS)
def test_dense_general_leaf_equals_its_matrix(x64, variant):
  rng = np.random.default_rng(11)
  theta0 = {'layers': {'q': {'kernel': 0.1 * rng.standard_normal((2, 130, 4, 32))}}}
  grads = [{'layers': {'q': {'kernel': rng.standard_normal((2, 130, 4, 32))}}} for _ in range(4)]
  # Both under 'layers' (stacked: per-layer RMS for clipping and parameter scale).
  as_matrix = lambda t: {
    'layers': {
      'm': t['layers']['q']['kernel'].reshape(  # noqa: E731
        2, 130, 128
      )
    }
  }
  tx = af.adafactor(1e-2, variant=variant, momentum=0.9)
  ours, state = run(tx, theta0, grads)
  ref, _ = run(tx, as_matrix(theta0), [as_matrix(g) for g in grads])
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(
      np.asarray(a['layers']['q']['kernel']).reshape(2, 130, 128),
      np.asarray(b['layers']['m']),
      rtol=1e-12,
    )
  raw, _ = run(
    af.adafactor(1e-2, variant=variant, momentum=0.9, merge_small_axes=False), theta0, grads
  )
  assert (
    np.abs(
      np.asarray(raw[-1]['layers']['q']['kernel']) - np.asarray(ours[-1]['layers']['q']['kernel'])
    ).max()
    > 1e-6
  )
  stats = [x.shape for x in jax.tree.leaves(state) if x.ndim == 2]
  assert stats == [(2, 128), (2, 130)] or sorted(stats) == [(2, 128), (2, 130)]
