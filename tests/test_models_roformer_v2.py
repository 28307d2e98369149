"""RoFormer v2 tests (docs/algorithms.md 7.2, 7.5 RV2-1..3)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from pretrain import config as config_schema
from models import layers

V, D, H, F = 40, 64, 4, 128


def v2_config(**overrides):
  config = config_schema.get_base_config()
  m = config.model
  m.family, m.vocab_size, m.hidden_size, m.num_heads, m.mlp_dim, m.num_layers = (
    'roformer_v2',
    V,
    D,
    H,
    F,
    4,
  )
  m.norm_eps, m.init = 1e-7, 'roformer_v2'
  m.use_bias, m.norm_type = False, 'rmsnorm_noparam'  # as launch/configs/roformer_v2.py
  for k, v in overrides.items():
    if k == 'objective':
      config.objective = v
    else:
      setattr(m, k, v)
  return config


def leaf_names(tree):
  return {str(p[-1].key) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_rv2_1_no_bias_gamma_beta():
  model = models.build(v2_config(), rngs=nnx.Rngs(params=0))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  assert leaf_names(params) == {'kernel', 'embedding'}
  assert set(params) == {'embedder', 'layers'}  # tied head: no transform, no output bias
  assert set(params['layers']) == {'attention', 'mlp'}  # norms are parameter-free
  graphdef, state = nnx.split(model)
  tokens = jax.random.randint(jax.random.key(0), (2, 10), 0, V)
  seg, pos = jnp.ones((2, 10), jnp.int32), jnp.broadcast_to(jnp.arange(10), (2, 10))
  logits = jax.jit(lambda s: nnx.merge(graphdef, s)(tokens, seg, pos))(state)
  assert logits.shape == (2, 10, V) and bool(jnp.isfinite(logits).all())
  # No bias: the tied head is exactly the hidden states times E^T.
  hidden = jax.jit(lambda s: nnx.merge(graphdef, s).encode(tokens, seg, pos))(state)
  np.testing.assert_allclose(logits, hidden @ params['embedder']['token']['embedding'].T, atol=1e-5)


def test_rv2_2_parameter_free_rms_norm():
  norm = layers.RMSNorm(D, eps=1e-7)
  x = jax.random.normal(jax.random.key(1), (5, D)) * 3
  y = norm(x)
  np.testing.assert_allclose(norm(7.5 * x), y, atol=1e-6)
  np.testing.assert_allclose(jnp.sqrt(jnp.mean(y**2, -1)), 1.0, atol=1e-6)
  assert nnx.state(norm, nnx.Param) == nnx.State({})


def test_rv2_3_init_stds():
  """Truncated normal (+-2 sigma), sigma = 1.13684723/sqrt(fan) * L^(-1/2); fan = shape[0],
  or shape[1] if shape[0] > 10000 or < 10, and d for embedding tables (docs/algorithms.md 5.3)."""
  num_layers = 4
  params = nnx.to_pure_dict(
    nnx.state(models.build(v2_config(), rngs=nnx.Rngs(params=0)), nnx.Param)
  )
  truncated_std = 0.87962566  # std of a unit normal truncated at +-2

  def check(x, fan):
    sigma = 1.13684723 / math.sqrt(fan) * num_layers**-0.5
    x = np.asarray(x)
    np.testing.assert_allclose(x.std(), sigma * truncated_std, rtol=0.05)
    assert np.abs(x).max() <= 2 * sigma + 1e-7

  lay = params['layers']
  check(lay['attention']['query']['kernel'], D)
  check(lay['attention']['out']['kernel'], D)  # fan_in = h * d_h = D
  check(lay['mlp']['wi']['kernel'], D)
  check(lay['mlp']['wo']['kernel'], F)
  # Embedding tables: fan = d for every vocabulary size, as the rule gives released models
  # (V > 10000); the literal rule would give fan = V here (10 <= V <= 10000).
  check(params['embedder']['token']['embedding'], D)
  check(params['embedder']['token_type']['embedding'], D)
  assert layers.su_fan(32000, 768) == 768 and layers.su_fan(8000, 768) == 8000


@pytest.mark.parametrize('objective', ['mlm', 'clm'])
def test_v2_packing_and_scan_equivalence(objective):
  config = v2_config(objective=objective, num_layers=2, hidden_size=32, mlp_dim=64)
  model = models.build(config, rngs=nnx.Rngs(params=0))
  graphdef, state = nnx.split(model)
  fwd = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))
  tokens = jax.random.randint(jax.random.key(2), (1, 9), 0, V)
  seg = jnp.array([[1, 1, 1, 1, 2, 2, 2, 2, 0]])
  pos = jnp.array([[0, 1, 2, 3, 0, 1, 2, 3, 0]])
  packed = fwd(state, tokens, seg, pos)
  alone = fwd(state, tokens[:, 4:8], jnp.ones((1, 4), jnp.int32), jnp.arange(4)[None])
  np.testing.assert_allclose(packed[:, 4:8], alone, atol=1e-5)
  config.model.scan_layers = False
  unrolled = models.build(config, rngs=nnx.Rngs(params=1))
  st = nnx.state(unrolled, nnx.Param)
  nnx.replace_by_pure_dict(st, models.unstack_layers(nnx.to_pure_dict(nnx.state(model))))
  nnx.update(unrolled, st)
  g2, s2 = nnx.split(unrolled)
  out2 = jax.jit(lambda s, *a: nnx.merge(g2, s)(*a))(s2, tokens, seg, pos)
  np.testing.assert_allclose(out2, packed, atol=1e-5)


@pytest.mark.parametrize('preset', ['tiny', 'small', 'base', 'large'])
def test_presets_validate_and_build_abstractly(preset):
  from launch.configs import roformer_v2 as v2_presets

  config = v2_presets.get_config(preset)
  models.validate(config)
  model = nnx.eval_shape(lambda: models.build(config, rngs=nnx.Rngs(params=0)))
  assert leaf_names(nnx.to_pure_dict(nnx.state(model, nnx.Param))) == {'kernel', 'embedding'}


@pytest.mark.parametrize('activation', ['relu', 'gelu', 'swish', 'gelu_tanh'])
def test_mlp_activation_is_the_configured_one(activation):
  config = v2_config(mlp_activation=activation)
  model = models.build(config, rngs=nnx.Rngs(params=0))
  x = jax.random.normal(jax.random.key(1), (2, 5, D))
  wi = model.layers.mlp.wi.kernel[...][0]  # layer 0 of the stacked [L, ...] kernels
  wo = model.layers.mlp.wo.kernel[...][0]
  manual = {
    'relu': jax.nn.relu,
    'gelu': lambda h: jax.nn.gelu(h, approximate=False),
    'swish': jax.nn.silu,
    'gelu_tanh': lambda h: jax.nn.gelu(h, approximate=True),
  }
  from models import transformer  # pylint: disable=g-import-not-at-top

  one = transformer.MLP(
    D,
    F,
    use_bias=False,
    kernel_init=models.resolve(config).kernel_init,
    activation=activation,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs=nnx.Rngs(params=0),
  )
  one.wi.kernel[...], one.wo.kernel[...] = wi, wo
  np.testing.assert_allclose(one(x), manual[activation](x @ wi) @ wo, rtol=1e-5, atol=1e-6)


def test_v2_presets_use_relu_and_v1_gelu():
  from launch.configs import roformer, roformer_v2  # pylint: disable=g-import-not-at-top

  for preset in roformer.PRESETS:
    assert roformer_v2.get_config(preset).model.mlp_activation == 'relu'
    assert roformer.get_config(preset).model.mlp_activation == 'gelu'


@pytest.mark.parametrize('family', ['roformer_v2', 'gau', 'roformer'])
def test_embedding_dropout_order_follows_the_reference(family):
  """v2 / GAU-alpha (bert4keras): Dropout -> RMSNorm, so every token's output has RMS 1 even
  with dropout; v1 (Hugging Face): LayerNorm -> Dropout, so dropped entries are exactly 0."""
  config = v2_config(dropout_rate=0.5)
  if family == 'gau':
    config.model.family, config.model.shared_dim = 'gau', 16
  if family == 'roformer':
    config.model.family, config.model.use_bias, config.model.norm_type = (
      'roformer',
      True,
      'layernorm',
    )
  model = models.build(config, rngs=nnx.Rngs(params=0))
  tokens = jax.random.randint(jax.random.key(0), (2, 10), 0, V)
  out = np.asarray(model.embedder(tokens, jax.random.key(3)))
  rms = np.sqrt(np.mean(out**2, axis=-1))
  if family == 'roformer':
    assert (out == 0).mean() > 0.3  # dropout after the norm
  else:
    np.testing.assert_allclose(rms, 1.0, rtol=1e-5)  # Norm(Dropout(x)): unit RMS
