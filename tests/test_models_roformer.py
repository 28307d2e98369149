"""RoFormer v1: golden test vs Hugging Face, masking/packing, scan/remat, sharding, causal LM."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

import models
from pretrain import config as config_schema
from models import hf_import
from models import layers

V, D, H, F, L = 37, 32, 4, 64, 2


def tiny_config(**model_overrides):
  config = config_schema.get_base_config()
  m = config.model
  m.vocab_size, m.hidden_size, m.num_heads, m.mlp_dim, m.num_layers = V, D, H, F, L
  m.type_vocab_size = 2
  m.initializer_range = 0.2  # logits O(1), so 1e-5 differences are meaningful
  for k, v in model_overrides.items():
    if k == 'objective':
      config.objective = v
    else:
      setattr(m, k, v)
  return config


def load(model, params):
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)
  return model


def pure_params(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def forward(model, *args, **kwargs):
  """model(*args) under one jax.jit (split/merge, as the trainer does): faster than eager."""
  graphdef, state = nnx.split(model)
  return jax.jit(lambda state, *a, **k: nnx.merge(graphdef, state)(*a, **k))(state, *args, **kwargs)


def inputs(b=2, n=12, seed=0):
  tokens = jax.random.randint(jax.random.key(seed), (b, n), 0, V, jnp.int32)
  seg = jnp.ones((b, n), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
  return tokens, seg, pos


@pytest.fixture(scope='module')
def hf():
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    from transformers import FlaxRoFormerForMaskedLM, RoFormerConfig
  hc = RoFormerConfig(
    vocab_size=V,
    hidden_size=D,
    num_hidden_layers=L,
    num_attention_heads=H,
    intermediate_size=F,
    max_position_embeddings=64,
    type_vocab_size=2,
    initializer_range=0.2,
    hidden_act='gelu',
    layer_norm_eps=1e-12,
  )
  hm = FlaxRoFormerForMaskedLM(hc, seed=1)
  # Give biases, norm gains and the output bias random values so every mapping is exercised.
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map_with_path(
    lambda p, x: (
      x + 0.1 * rng.standard_normal(x.shape).astype(x.dtype)
      if p[-1].key in ('bias', 'scale')
      else x
    ),
    hm.params,
  )
  return hm, params


@pytest.mark.parametrize('scan_layers', [True, False])
def test_golden_vs_hugging_face(hf, scan_layers):
  hm, hf_params = hf
  config = tiny_config(scan_layers=scan_layers)
  model = load(
    models.build(config, rngs=nnx.Rngs(params=0)), hf_import.roformer_from_hf(hf_params, config)
  )
  tokens, seg, pos = inputs()
  ours = forward(model, tokens, seg, pos)
  ref = hm(
    np.asarray(tokens),
    attention_mask=np.ones(tokens.shape, np.int32),
    token_type_ids=np.zeros(tokens.shape, np.int32),
    params=hf_params,
  ).logits
  assert ours.dtype == jnp.float32 and ours.shape == (2, 12, V)
  assert float(jnp.abs(ref).max()) > 0.5
  np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def test_golden_with_padding(hf):
  hm, hf_params = hf
  config = tiny_config()
  model = load(
    models.build(config, rngs=nnx.Rngs(params=0)), hf_import.roformer_from_hf(hf_params, config)
  )
  tokens, _, pos = inputs()
  lengths = np.array([12, 7])
  valid = (np.arange(12)[None] < lengths[:, None]).astype(np.int32)
  ours = forward(model, tokens, jnp.asarray(valid), pos * valid)
  ref = hm(
    np.asarray(tokens), attention_mask=valid, token_type_ids=np.zeros_like(valid), params=hf_params
  ).logits
  ours, ref = np.asarray(ours), np.asarray(ref)
  np.testing.assert_allclose(ours[valid == 1], ref[valid == 1], atol=1e-5, rtol=0)


def test_prediction_positions_gather():
  config = tiny_config()
  model = models.build(config, rngs=nnx.Rngs(params=0))
  tokens, seg, pos = inputs()
  full = forward(model, tokens, seg, pos)
  pp = jnp.array([[0, 5, 11], [3, 3, 7]], jnp.int32)
  gathered = forward(model, tokens, seg, pos, prediction_positions=pp)
  assert gathered.shape == (2, 3, V) and gathered.dtype == jnp.float32
  np.testing.assert_allclose(gathered, jnp.take_along_axis(full, pp[..., None], 1), atol=1e-6)


@pytest.mark.parametrize('objective', ['mlm', 'clm'])
def test_packed_segments_do_not_interact(objective):
  config = tiny_config(objective=objective)
  model = models.build(config, rngs=nnx.Rngs(params=0))
  tokens, _, _ = inputs(b=1, n=10)
  seg = jnp.array([[1, 1, 1, 2, 2, 2, 2, 3, 3, 0]], jnp.int32)
  pos = jnp.array([[0, 1, 2, 0, 1, 2, 3, 0, 1, 0]], jnp.int32)
  packed = forward(model, tokens, seg, pos)
  for s, (start, stop) in {1: (0, 3), 2: (3, 7), 3: (7, 9)}.items():
    alone_tokens = tokens[:, start:stop]
    n = stop - start
    alone = forward(model, alone_tokens, jnp.ones((1, n), jnp.int32), jnp.arange(n)[None])
    np.testing.assert_allclose(packed[:, start:stop], alone, atol=1e-5, err_msg=f'segment {s}')


@pytest.mark.parametrize('num_layers,scan_unroll', [(2, 1), (3, 2), (2, 0)])
def test_scan_equals_unrolled(num_layers, scan_unroll):
  """The scanned stack, as a loop of one layer per iteration, of two (3 layers: a remainder),
  or with no loop (0: auto on CPU), equals the listed layers."""
  config = tiny_config(scan_layers=True, scan_unroll=scan_unroll, num_layers=num_layers)
  scanned = models.build(config, rngs=nnx.Rngs(params=0))
  config_list = tiny_config(scan_layers=False, num_layers=num_layers)
  unrolled = load(
    models.build(config_list, rngs=nnx.Rngs(params=1)), models.unstack_layers(pure_params(scanned))
  )
  tokens, seg, pos = inputs()
  np.testing.assert_allclose(
    forward(scanned, tokens, seg, pos), forward(unrolled, tokens, seg, pos), atol=1e-5
  )
  # and back
  restacked = models.stack_layers(pure_params(unrolled))
  jax.tree.map(np.testing.assert_array_equal, restacked, pure_params(scanned))


def test_scan_unroll_auto_drops_the_loop_on_cpu_up_to_12_layers_only():
  from models import encoder  # pylint: disable=g-import-not-at-top

  spec = lambda layers, unroll=0: models.resolve(tiny_config(num_layers=layers, scan_unroll=unroll))
  assert [encoder.scan_unroll(spec(n), 'cpu') for n in (2, 12, 13)] == [2, 12, 1]
  assert encoder.scan_unroll(spec(4), 'tpu') == encoder.scan_unroll(spec(4), 'gpu') == 1
  assert encoder.scan_unroll(spec(4, 3), 'tpu') == 3  # as given, anywhere
  tokens, seg, pos = inputs()
  for unroll, loop in ((0, False), (1, True)):  # the setting reaches the compiled step
    model = models.build(tiny_config(scan_unroll=unroll), rngs=nnx.Rngs(params=0))
    graphdef, state = nnx.split(model)
    step = jax.jit(lambda st, *a: nnx.merge(graphdef, st)(*a))
    hlo = step.lower(state, tokens, seg, pos).compile().as_text()
    assert (' while(' in hlo) == loop, unroll


def _loss_and_grads(config, params, dropout=False):
  model = load(models.build(config, rngs=nnx.Rngs(params=0)), params)
  graphdef, state = nnx.split(model)
  tokens, seg, pos = inputs()
  key = jax.random.key(3) if dropout else None

  def loss_fn(state):
    logits = nnx.merge(graphdef, state)(tokens, seg, pos, dropout_rng=key)
    return jnp.mean(
      jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0]
    )

  return jax.jit(jax.value_and_grad(loss_fn))(state)


@pytest.mark.parametrize(
  'scan_layers,scan_unroll,policy,rate',
  [
    (True, 1, 'full', 0.1),
    (True, 1, 'dots_with_no_batch_dims', 0.0),
    (True, 0, 'full', 0.0),
    (False, 0, 'full', 0.0),
  ],
)
def test_remat_gradients_equal(scan_layers, scan_unroll, policy, rate):
  """RC-1 (and RC-4 with dropout: the recompute sees the same dropout keys), in a scan loop
  (scan_unroll=1), a scan without a loop (auto on CPU) and listed layers."""
  cfg = lambda **kw: tiny_config(
    scan_layers=scan_layers, scan_unroll=scan_unroll, dropout_rate=rate, **kw
  )
  params = pure_params(models.build(cfg(), rngs=nnx.Rngs(params=0)))
  loss0, g0 = _loss_and_grads(cfg(), params, dropout=rate > 0)
  loss1, g1 = _loss_and_grads(cfg(remat_policy=policy), params, dropout=rate > 0)
  assert abs(float(loss0 - loss1)) <= 1e-6
  diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), g0, g1))
  assert max(diffs) <= 1e-6


def test_dropout_is_pure_and_keyed():
  config = tiny_config(dropout_rate=0.2)
  model = models.build(config, rngs=nnx.Rngs(params=0))
  graphdef, state = nnx.split(model)
  tokens, seg, pos = inputs()

  @jax.jit
  def fwd(state, key):
    return nnx.merge(graphdef, state)(tokens, seg, pos, dropout_rng=key)

  a, b = fwd(state, jax.random.key(0)), fwd(state, jax.random.key(0))
  c = fwd(state, jax.random.key(1))
  det = forward(model, tokens, seg, pos)
  np.testing.assert_array_equal(a, b)
  assert float(jnp.abs(a - c).max()) > 1e-3 and float(jnp.abs(a - det).max()) > 1e-3


def test_param_names_and_specs_on_mesh():
  config = tiny_config(vocab_size=40)  # vocab divisible by the 'tensor' axis
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ('data', 'fsdp', 'tensor'))
  with jax.set_mesh(mesh), nnx.logical_axis_rules(config.mesh.logical_axis_rules):
    model = models.build(config, rngs=nnx.Rngs(params=0))
    specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model, nnx.Param)))
  layers = specs['layers']
  assert specs['embedder']['token']['embedding'] == P('tensor', 'fsdp')
  assert specs['embedder']['token_type']['embedding'] == P(None, 'fsdp')
  assert layers['attention']['query']['kernel'] == P(None, 'fsdp', 'tensor', None)
  assert layers['attention']['out']['kernel'] == P(None, 'tensor', None, 'fsdp')
  assert layers['mlp']['wi']['kernel'] == P(None, 'fsdp', 'tensor')
  assert layers['mlp']['wo']['bias'] == P(None, 'fsdp')
  assert specs['head']['bias'] == P('tensor')
  kernel = model.layers.attention.query.kernel[...]
  assert kernel.sharding.is_equivalent_to(
    jax.sharding.NamedSharding(mesh, P(None, 'fsdp', 'tensor', None)), kernel.ndim
  )
  assert kernel.addressable_shards[0].data.shape == (L, D // 2, H // 2, D // H)
  # Leaf names: only kernel / bias / scale / embedding.
  names = {p[-1] for p, _ in jax.tree_util.tree_flatten_with_path(specs)[0]}
  leaf_names = {getattr(k, 'key', k) for k in names}
  assert leaf_names == {'kernel', 'bias', 'scale', 'embedding'}
  # The sharded model runs under jit (activations constrained to ('batch', 'length', None))
  # and agrees with a single-device build.
  tokens, seg, pos = inputs(b=4)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(config.mesh.logical_axis_rules):
    graphdef, state = nnx.split(model)
    out = jax.jit(lambda s: nnx.merge(graphdef, s)(tokens, seg, pos))(state)
  single = load(
    models.build(config, rngs=nnx.Rngs(params=1)), jax.tree.map(np.asarray, pure_params(model))
  )
  np.testing.assert_allclose(out, forward(single, tokens, seg, pos), atol=1e-5)


def jacobian(model, x, seg, pos):
  """d out[0, i] / d x[0, j] as |J| summed over features: [n_out, n_in] (row-wise VJPs)."""
  graphdef, state = nnx.split(model)
  r = jax.random.normal(jax.random.key(7), x.shape[-1:])

  @jax.jit
  def row(state, x, i):
    fn = lambda x: jnp.dot(nnx.merge(graphdef, state).run_layers(x, seg, pos)[0, i], r)
    return jnp.abs(jax.grad(fn)(x)[0]).sum(-1)

  return jnp.stack([row(state, x, i) for i in range(x.shape[1])])


def test_clm_causal_jacobian():
  config = tiny_config(objective='clm')
  model = models.build(config, rngs=nnx.Rngs(params=0))
  tokens, seg, pos = inputs(b=1, n=6)
  x = model.embedder(tokens)
  block = jacobian(model, x, seg, pos)  # [n_out, n_in]
  upper = np.triu(np.ones((6, 6), bool), k=1)
  assert float(block[upper].max()) == 0.0
  assert float(block[~upper].min()) > 0.0
  # MLM (bidirectional) does see the future.
  mlm = load(models.build(tiny_config(), rngs=nnx.Rngs(params=1)), pure_params(model))
  assert float(jacobian(mlm, x, seg, pos)[0, 5]) > 0.0


def test_entropy_invariant_scale():
  """EI-1: at 512 keys the scale is 1/sqrt(d_h); EI-2 clamping at 16; EI-3 padding invariance."""
  from models import attention

  np.testing.assert_allclose(attention.entropy_invariant_factor(jnp.array(512.0)), 1.0, rtol=1e-6)
  np.testing.assert_allclose(
    attention.entropy_invariant_factor(jnp.array([1.0, 8.0, 16.0])),
    np.log(16) / np.log(512),
    rtol=1e-6,
  )
  mask = jnp.ones((1, 512, 512), bool)
  np.testing.assert_allclose(
    attention.attention_scale('entropy_invariant', mask, 64), 1 / 8, rtol=1e-6
  )
  config = tiny_config(attention_scale='entropy_invariant')
  model = models.build(config, rngs=nnx.Rngs(params=0))
  tokens, _, _ = inputs(b=1, n=40)
  n = 30  # > 16, so the scale depends on the number of valid keys
  alone = forward(model, tokens[:, :n], jnp.ones((1, n), jnp.int32), jnp.arange(n)[None])
  seg = (jnp.arange(40) < n).astype(jnp.int32)[None]
  padded = forward(model, tokens, seg, jnp.arange(40)[None] * seg)
  np.testing.assert_allclose(padded[:, :n], alone, atol=1e-5)
  standard = load(models.build(tiny_config(), rngs=nnx.Rngs(params=0)), pure_params(model))
  assert (
    float(
      jnp.abs(
        forward(standard, tokens[:, :n], jnp.ones((1, n), jnp.int32), jnp.arange(n)[None]) - alone
      ).max()
    )
    > 1e-4
  )


def test_validate_messages():
  with pytest.raises(ValueError, match=r'num_heads=12 does not divide hidden_size=1000; choose'):
    models.validate(tiny_config(num_heads=12, hidden_size=1000))
  with pytest.raises(ValueError, match='model.family'):
    models.validate(tiny_config(family='bert'))
  with pytest.raises(ValueError, match='head_dim=5 is odd'):
    models.validate(tiny_config(head_dim=5))
  with pytest.raises(ValueError, match='model.remat_policy'):
    models.validate(tiny_config(remat_policy='some'))


def test_init_statistics():
  config = tiny_config(initializer_range=0.02, hidden_size=64, mlp_dim=256, vocab_size=500)
  p = pure_params(models.build(config, rngs=nnx.Rngs(params=0)))
  np.testing.assert_allclose(np.std(p['layers']['mlp']['wi']['kernel']), 0.02, rtol=0.05)
  np.testing.assert_allclose(np.std(p['embedder']['token']['embedding']), 0.02, rtol=0.05)
  assert not np.any(p['layers']['attention']['query']['bias'])
  np.testing.assert_array_equal(p['layers']['attention_norm']['scale'], 1.0)


def test_flops_per_token():
  config = tiny_config()
  config.data.seq_len = 128
  m = config.model
  d_h = D // H
  layer = 2 * D * H * d_h * 4 + 2 * 128 * H * d_h * 2 + 2 * D * F * 2
  head = 2 * D * V + 2 * D * D
  assert models.flops_per_token(config, 20) == pytest.approx(3 * (L * layer + head * 20 / 128))
  config.objective = 'clm'
  assert models.flops_per_token(config, 20) == pytest.approx(3 * (L * layer + head))
  del m


@pytest.mark.parametrize('preset', ['tiny', 'small', 'base', 'large'])
def test_presets_validate_and_build_abstractly(preset):
  from launch.configs import roformer as roformer_presets

  config = roformer_presets.get_config(preset)
  models.validate(config)
  model = nnx.eval_shape(lambda: models.build(config, rngs=nnx.Rngs(params=0)))
  n = models.encoder.num_params(model)
  expected = {'tiny': 1.8e6, 'small': 14e6, 'base': 92e6, 'large': 690e6}[preset]
  assert abs(n - expected) / expected < 0.15


@pytest.mark.parametrize('in_shape,out_shape', [((8,), (3, 4)), ((3, 4), (8,)), ((8,), (5,))])
def test_dense_multiplies_with_its_output_axes_flattened(in_shape, out_shape):
  """Dense multiplies by its kernel viewed as [*in_shape, prod(out_shape)] and reshapes the
  product: the layer scan saves the projections' products for the backward pass, and a
  [..., h, d_h] product with d_h = 64 gets d_h as a TPU's 128-lane axis, padded to twice its
  size (docs/tpu_fit.md). Values and gradients equal the einsum over the kernel's own shape,
  bias included."""
  init = lambda key, shape, dtype: jax.random.normal(key, shape, dtype)
  names = lambda shape: tuple(f'a{i}' for i in range(len(shape)))
  dense = layers.Dense(
    in_shape,
    out_shape,
    in_axes=names(in_shape),
    out_axes=names(out_shape),
    kernel_init=init,
    rngs=nnx.Rngs(0),
  )
  dense.bias[...] = jax.random.normal(jax.random.key(1), out_shape)
  x = jax.random.normal(jax.random.key(2), (2, 5) + in_shape)
  products = [e for e in jax.make_jaxpr(dense)(x).jaxpr.eqns if e.primitive.name == 'dot_general']
  assert [e.outvars[0].aval.shape for e in products] == [(2, 5, int(np.prod(out_shape)))]
  contract, out = 'ij'[: len(in_shape)], 'kl'[: len(out_shape)]
  graphdef, state = nnx.split(dense)
  ours = lambda x, state: nnx.merge(graphdef, state)(x)
  reference = lambda x, state: (
    jnp.einsum(f'bn{contract},{contract}{out}->bn{out}', x, state['kernel'][...])
    + state['bias'][...]
  )
  np.testing.assert_allclose(ours(x, state), reference(x, state), rtol=1e-5, atol=1e-5)
  grad = lambda f: jax.grad(lambda x, state: jnp.sum(jnp.sin(f(x, state))), (0, 1))(x, state)
  for a, r in zip(jax.tree.leaves(grad(ours)), jax.tree.leaves(grad(reference))):
    np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-5)
