"""optim.build / learning_rate_schedule / metrics / validate: the trainer-facing API."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optim
from pretrain import config as config_schema

NAMES = ('adamw', 'adafactor', 'lamb', 'sgdm')
SCHEDULES = ('linear', 'cosine', 'constant', 'rsqrt', 'piecewise_linear')


def make_config(**optim_fields):
  config = config_schema.get_base_config()
  config.train.num_train_steps = 30
  config.optim.warmup_steps = 5
  config.optim.learning_rate = 0.05
  config.optim.update_from_flattened_dict(optim_fields)
  return config


def init_params(dtype=jnp.float32):
  rng = np.random.default_rng(0)
  return {
    'embed': {'embedding': jnp.asarray(0.1 * rng.standard_normal((20, 8)), dtype)},
    'layers': {
      'attention': {
        'query': {
          'kernel': jnp.asarray(0.1 * rng.standard_normal((2, 8, 8)), dtype),
          'bias': jnp.zeros((2, 8), dtype),
        }
      },
      'norm': {'scale': jnp.ones((2, 8), dtype)},
    },
    'head': {'bias': jnp.zeros((20,), dtype)},
  }


def loss_fn(params):
  """A smooth nonconvex-free objective touching every leaf."""
  x = jnp.linspace(-1.0, 1.0, 8 * 8).reshape(8, 8)
  q = params['layers']['attention']['query']
  h = x @ q['kernel'][0] + q['bias'][0]
  h = h * params['layers']['norm']['scale'][0] @ q['kernel'][1] + q['bias'][1]
  logits = h @ params['embed']['embedding'].T + params['head']['bias']
  return jnp.mean((logits - 0.5) ** 2)


def run(config, steps=30, params=None):
  tx = optim.build(config)
  params = init_params() if params is None else params
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for _ in range(steps):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  return params, state, losses


@pytest.mark.parametrize(
  'name, schedule',
  [(name, 'linear') for name in NAMES]
  + [('adamw', schedule) for schedule in SCHEDULES[1:]]
  + [('adafactor', 'rsqrt'), ('lamb', 'piecewise_linear')],
)
def test_each_name_and_schedule_decreases_the_loss(name, schedule):
  config = make_config(
    name=name,
    schedule=schedule,
    weight_decay=0.0,
    schedule_boundaries=((0, 1.0), (30, 0.1)),
    learning_rate=0.1 if name == 'adafactor' else 0.05,
  )
  _, _, losses = run(config)
  assert np.isfinite(losses).all()
  assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize(
  'name, accumulation',
  [(name, mode) for name in NAMES for mode in ('momentum', 'eg')]
  + [('adamw', 'every_k'), ('adamw', 'multisteps')],
)
def test_accumulation_and_eg_decrease_the_loss(name, accumulation):
  fields = dict(
    name=name,
    weight_decay=0.0,
    adafactor_variant='bert4keras',
    learning_rate=0.2 if name == 'adafactor' else 0.05,
  )
  if accumulation == 'eg':
    fields['eg.enabled'] = True
  else:
    fields.update(accumulation=accumulation, accumulation_steps=2)
    if accumulation == 'momentum':
      fields['grad_clip_norm'] = 0.0
  config = make_config(**fields)
  config.train.num_train_steps = 40  # micro-steps: the schedule spans 40 // k updates
  _, _, losses = run(config, steps=40)
  assert losses[-1] < 0.9 * losses[0], losses


def test_decay_mask():
  params = init_params()
  mask = optim.decay_mask(params)
  assert mask['embed']['embedding'] and mask['layers']['attention']['query']['kernel']
  assert not mask['layers']['attention']['query']['bias']  # named bias (rank 2 when stacked)
  assert not mask['layers']['norm']['scale']
  assert not mask['head']['bias']
  assert not optim.decay_mask({'w': jnp.zeros((3,))})['w']  # rank < 2
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  assert optim.decay_mask(shapes) == mask


@pytest.mark.parametrize('name', NAMES)
def test_weight_decay_skips_bias_and_scale(name):
  config = make_config(
    name=name, weight_decay=0.1, warmup_steps=0, grad_clip_norm=0.0, adafactor_variant='bert4keras'
  )
  tx = optim.build(config)
  params = init_params()
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  mask = optim.decay_mask(params)
  for decayed, u in zip(jax.tree.leaves(mask), jax.tree.leaves(updates)):
    assert bool(jnp.any(u != 0)) == decayed


def test_piecewise_linear_bert4keras_semantics():
  roformer_v2 = optim.piecewise_linear(
    ((32_000, 1.0), (320_000, 0.5), (1_280_000, 0.1), (2_560_000, 0.01))
  )
  for step, expected in [
    (0, 0.0),
    (16_000, 0.5),
    (32_000, 1.0),
    (176_000, 0.75),
    (320_000, 0.5),
    (800_000, 0.3),
    (2_560_000, 0.01),
    (5_000_000, 0.01),
  ]:
    assert float(roformer_v2(step)) == pytest.approx(expected, rel=1e-6, abs=1e-9)
  gau_alpha = optim.piecewise_linear({0: 1.0, 160: 0.5, 640: 0.1}.items())
  assert [float(gau_alpha(s)) for s in (0, 80, 160, 400, 10_000)] == pytest.approx(
    [1.0, 0.75, 0.5, 0.3, 0.1]
  )
  unsorted = optim.piecewise_linear(((10, 0.5), (5, 1.0)), from_zero=False)
  assert [float(unsorted(s)) for s in (0, 5, 7.5, 10, 20)] == pytest.approx(
    [1.0, 1.0, 0.75, 0.5, 0.5]
  )
  with pytest.raises(ValueError, match='schedule_boundaries'):
    optim.piecewise_linear(((5, 1.0), (5, 0.5)))


def test_learning_rate_schedule_values():
  config = make_config(learning_rate=0.1, warmup_steps=10, end_learning_rate_factor=0.1)
  config.train.num_train_steps = 110
  values = {}
  for schedule in SCHEDULES[:4]:
    config.optim.schedule = schedule
    values[schedule] = optim.learning_rate_schedule(config)
  for schedule in ('linear', 'cosine', 'constant', 'rsqrt'):
    assert float(values[schedule](0)) == 0.0
    assert float(values[schedule](5)) == pytest.approx(0.05)
    assert float(values[schedule](10)) == pytest.approx(0.1)
  assert float(values['linear'](60)) == pytest.approx(0.055)
  assert float(values['linear'](110)) == pytest.approx(0.01)
  assert float(values['linear'](500)) == pytest.approx(0.01)
  assert float(values['cosine'](60)) == pytest.approx(0.055)
  assert float(values['constant'](1000)) == pytest.approx(0.1)
  assert float(values['rsqrt'](399)) == pytest.approx(0.05)  # t = 400: 1/sqrt(t)
  config.optim.schedule = 'piecewise_linear'
  config.optim.schedule_boundaries = ((0, 1.0), (100, 0.5))
  assert float(optim.learning_rate_schedule(config)(50)) == pytest.approx(0.075)
  assert optim.learning_rate_schedule(config)(jnp.int32(3)).dtype == jnp.float32


RESUME = [
  dict(name='adamw'),
  dict(name='adafactor'),
  dict(name='adafactor', adafactor_variant='bert4keras', b1=0.0),
  dict(name='sgdm', **{'eg.enabled': True}),
  dict(
    name='adamw',
    **{'eg.enabled': True, 'eg.scale_granularity': 'global', 'eg.scale_signal': 'gbar'},
  ),
  dict(name='lamb', accumulation='multisteps', accumulation_steps=2),
]


@pytest.mark.parametrize('fields', RESUME, ids=lambda f: '-'.join(map(str, f.values())))
def test_state_round_trip_continues_identically(fields):
  config = make_config(**fields)
  params_a, state_a, _ = run(config, steps=5)
  leaves, treedef = jax.tree.flatten(state_a)
  state_b = jax.tree.unflatten(treedef, [np.array(x) for x in leaves])
  tx = optim.build(config)
  step = jax.jit(lambda p, s: tx.update(jax.grad(loss_fn)(p), s, p))
  pa, pb, sa, sb = params_a, params_a, state_a, state_b
  for _ in range(4):
    ua, sa = step(pa, sa)
    ub, sb = step(pb, sb)
    pa, pb = optax.apply_updates(pa, ua), optax.apply_updates(pb, ub)
  for a, b in zip(jax.tree.leaves((pa, sa)), jax.tree.leaves((pb, sb))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


BAD = [
  ('name', 'adam', 'optim.name'),
  ('schedule', 'exponential', 'optim.schedule'),
  ('adafactor_variant', 'mesh_tf', 'optim.adafactor_variant'),
  ('accumulation', 'sum', 'optim.accumulation'),
  ('accumulation_steps', 0, 'optim.accumulation_steps'),
  ('b1', 1.0, 'optim.b1'),
  ('learning_rate', 0.0, 'optim.learning_rate'),
  ('weight_decay', -0.1, 'optim.weight_decay'),
  ('eg.scale_signal', 'loss', 'optim.eg.scale_signal'),
  ('eg.scale_min', 2.0, 'optim.eg.scale_min'),
]


@pytest.mark.parametrize('field, value, message', BAD)
def test_validate_names_the_field(field, value, message):
  config = make_config(**{field: value, 'eg.enabled': field.startswith('eg.')})
  with pytest.raises(ValueError, match=message.replace('.', r'\.')):
    optim.validate(config)
  with pytest.raises(ValueError):
    optim.build(config)


def test_validate_combinations():
  with pytest.raises(ValueError, match='eg.enabled'):
    optim.validate(
      make_config(
        accumulation='momentum', accumulation_steps=2, grad_clip_norm=0.0, **{'eg.enabled': True}
      )
    )
  with pytest.raises(ValueError, match=r'optim\.b1'):
    optim.validate(
      make_config(
        name='adafactor',
        adafactor_variant='bert4keras',
        b1=0.0,
        accumulation='momentum',
        accumulation_steps=2,
        grad_clip_norm=0.0,
      )
    )
  with pytest.raises(ValueError, match='bert4keras'):
    optim.validate(
      make_config(
        name='adafactor', accumulation='momentum', accumulation_steps=2, grad_clip_norm=0.0
      )
    )
  optim.validate(make_config())  # the defaults are valid
  for name in NAMES:  # so are the defaults with any optimizer
    optim.validate(make_config(name=name))
    optim.validate(make_config(name=name, adafactor_variant='bert4keras'))


def test_clip_with_accumulation_in_momentum_is_refused_naming_both_fields():
  """A clip per micro-batch is not the large batch's clip of the window mean."""
  for name in NAMES:
    config = make_config(
      name=name, accumulation='momentum', accumulation_steps=4, adafactor_variant='bert4keras'
    )
    with pytest.raises(ValueError, match=r'optim\.grad_clip_norm=1\.0.*optim\.accumulation'):
      optim.build(config)
    config.optim.grad_clip_norm = 0.0
    optim.build(config)
  for mode in ('multisteps', 'every_k'):
    optim.build(make_config(accumulation=mode, accumulation_steps=4))
  optim.build(make_config(accumulation='momentum', accumulation_steps=1))  # k = 1: plain


def test_adafactor_default_weight_decay_is_safe():
  """optim.name=adafactor with every other field at its default: the optax placement does not
  multiply decay by the learning rate, so its default is 0; zero gradients leave weights be."""
  params = init_params()
  zero = jax.tree.map(jnp.zeros_like, params)
  for variant, decays in (('optax', False), ('bert4keras', True)):
    config = make_config(
      name='adafactor',
      adafactor_variant=variant,
      warmup_steps=0,
      learning_rate=1e-3,
      schedule='constant',
    )
    assert optim.weight_decay(config) == (0.01 if decays else 0.0)
    tx = optim.build(config)
    state, p = tx.init(params), params
    for _ in range(100):
      u, state = tx.update(zero, state, p)
      p = optax.apply_updates(p, u)
    kernel = np.asarray(p['layers']['attention']['query']['kernel'])
    ratio = (
      np.abs(kernel).sum()
      / np.abs(np.asarray(params['layers']['attention']['query']['kernel'])).sum()
    )
    # bert4keras: theta *= (1 - lr wd) per update: 0.999 after 100; optax: untouched.
    assert ratio == pytest.approx((1 - 1e-3 * 0.01) ** 100 if decays else 1.0, rel=1e-5)
  for name in ('adamw', 'lamb', 'sgdm'):
    assert optim.weight_decay(make_config(name=name)) == 0.01
  with pytest.raises(ValueError, match=r'optim\.weight_decay=0\.01.*bert4keras'):
    optim.validate(make_config(name='adafactor', weight_decay=0.01, learning_rate=1e-3))
  optim.validate(make_config(name='adafactor', weight_decay=1e-4, learning_rate=1e-3))


def test_metrics():
  params = init_params()
  assert optim.metrics(optim.build(make_config()).init(params)) == {}
  config = make_config(name='sgdm', **{'eg.enabled': True, 'eg.scale_lr': 0.1})
  _, state, _ = run(config, steps=3)
  extra = optim.metrics(state)
  assert set(extra) == {
    'eg/scale/embed',
    'eg/scale/layers/attention',
    'eg/scale/layers/norm',
    'eg/scale/head',
    'eg/gain_mean',
  }
  assert all(v.shape == () for v in extra.values())
  assert float(extra['eg/scale/embed']) != 1.0
  jitted = jax.jit(optim.metrics)(state)
  assert set(jitted) == set(extra)
  config = make_config(
    accumulation='multisteps',
    accumulation_steps=2,
    **{'eg.enabled': True, 'eg.scale_granularity': 'global'},
  )
  assert set(optim.metrics(optim.build(config).init(params))) == {'eg/scale/global', 'eg/gain_mean'}


@pytest.mark.parametrize('name', ['adamw', 'adafactor', 'sgdm'])
def test_bfloat16_params_get_float32_state(name):
  config = make_config(name=name, b1=0.9, **{'eg.enabled': name == 'sgdm'})
  params, state, losses = run(config, steps=3, params=init_params(jnp.bfloat16))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  floats = [x.dtype for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert set(floats) == {jnp.dtype(jnp.float32)}
  assert np.isfinite(losses).all()


def test_init_is_shape_only():
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), init_params())
  for name in NAMES:
    state = jax.eval_shape(optim.build(make_config(name=name)).init, shapes)
    assert jax.tree.leaves(state)


def _layer_layouts(seed, scale):
  """The same parameters (or gradients) stacked [L, ...] under 'layers' and as a list."""
  rng = np.random.default_rng(seed)
  per_layer = [
    {
      'attention': {
        'query': {
          'kernel': scale * rng.standard_normal((130, 4, 32)),
          'bias': scale * rng.standard_normal((4, 32)),
        }
      },
      'mlp': {'wi': {'kernel': scale * rng.standard_normal((130, 140))}},
      'norm': {'scale': 1.0 + scale * rng.standard_normal(130)},
    }
    for _ in range(2)
  ]
  embed = {'embedding': scale * rng.standard_normal((150, 130))}
  stacked = {'embed': embed, 'layers': jax.tree.map(lambda *xs: np.stack(xs), *per_layer)}
  as_list = {'embed': embed, 'layers': {i: layer for i, layer in enumerate(per_layer)}}
  cast = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t)  # noqa: E731
  return cast(stacked), cast(as_list)


@pytest.mark.parametrize(
  'fields',
  [
    dict(name='lamb'),
    dict(name='adafactor', b1=0.0),
    dict(
      name='adafactor',
      adafactor_variant='bert4keras',
      accumulation='momentum',
      accumulation_steps=2,
      grad_clip_norm=0.0,
    ),
    dict(name='sgdm', **{'eg.enabled': True, 'eg.scale_lr': 0.1, 'eg.gain_lr': 0.1}),
    dict(name='lamb', **{'eg.enabled': True, 'eg.scale_lr': 0.1}),
  ],
  ids=lambda f: '-'.join(map(str, f.values())),
)
def test_scanned_and_listed_layers_give_the_same_optimizer(fields):
  """Per-leaf quantities (RMS clipping, parameter scale, trust ratio, EG scale) are per layer
  for stacked leaves, so scan_layers does not change the optimizer."""
  params = _layer_layouts(0, 0.1)
  grads = [_layer_layouts(i + 1, 1.0) for i in range(3)]
  finals = []
  for layout, scan in ((0, True), (1, False)):
    config = make_config(warmup_steps=0, **fields)
    config.model.scan_layers = scan
    tx = optim.build(config)
    p = params[layout]
    state = tx.init(p)
    update = jax.jit(tx.update)
    for g in grads:
      u, state = update(g[layout], state, p)
      p = optax.apply_updates(p, u)
    finals.append(p)
  stacked, as_list = finals
  for i in range(2):
    for a, b in zip(
      jax.tree.leaves(jax.tree.map(lambda x: x[i], stacked['layers'])),
      jax.tree.leaves(as_list['layers'][i]),
    ):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-7)
  np.testing.assert_allclose(
    np.asarray(stacked['embed']['embedding']),
    np.asarray(as_list['embed']['embedding']),
    rtol=2e-5,
    atol=1e-7,
  )


@pytest.mark.parametrize(
  'fields',
  [
    dict(name='adafactor', b1=0.0),
    dict(name='adafactor', adafactor_variant='bert4keras', b1=0.9),
    dict(
      name='adafactor',
      adafactor_variant='bert4keras',
      accumulation='momentum',
      accumulation_steps=2,
      grad_clip_norm=0.0,
    ),
  ],
  ids=lambda f: '-'.join(map(str, f.values())),
)
def test_adafactor_never_factors_the_layers_axis(fields):
  """128 stacked layers (deepnet:deep's FFN kernel shape (64, 256)): the plain rule would
  factor the stacked (128, 64, 256) leaf over (L, F); per layer (64, 256) is not factored."""
  rng = np.random.default_rng(0)
  num_layers, shape = 128, (64, 256)

  def layouts(scale):
    stacked = scale * rng.standard_normal((num_layers,) + shape).astype(np.float32)
    return (
      {'layers': {'mlp': {'wi': {'kernel': jnp.asarray(stacked)}}}},
      {
        'layers': {
          i: {'mlp': {'wi': {'kernel': jnp.asarray(stacked[i])}}} for i in range(num_layers)
        }
      },
    )

  params = layouts(0.1)
  grads = [layouts(1.0) for _ in range(2)]
  finals = []
  for layout, scan in ((0, True), (1, False)):
    config = make_config(warmup_steps=0, **fields)
    config.model.scan_layers = scan
    tx = optim.build(config)
    p, state = params[layout], tx.init(params[layout])
    for g in grads:
      u, state = jax.jit(tx.update)(g[layout], state, p)
      p = optax.apply_updates(p, u)
    finals.append((p, state))
  (stacked, stacked_state), (as_list, _) = finals
  kernel = np.asarray(stacked['layers']['mlp']['wi']['kernel'])
  for i in (0, 77, 127):
    np.testing.assert_allclose(
      kernel[i], np.asarray(as_list['layers'][i]['mlp']['wi']['kernel']), rtol=2e-5, atol=1e-7
    )
  # The statistics are full per layer: no [128, 256] / [64, 256] factors anywhere.
  shapes = {x.shape for x in jax.tree.leaves(stacked_state) if x.ndim >= 2}
  assert shapes <= {(num_layers,) + shape}, shapes
