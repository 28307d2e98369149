"""DeepNet / DeepNorm tests (docs/algorithms.md 5.4 DN-1..DN-4)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from pretrain import config as config_schema
from models import encoder
from models import layers
from models import transformer

D, H, F = 64, 4, 256


def deepnet_config(num_layers, **overrides):
  config = config_schema.get_base_config()
  m = config.model
  m.vocab_size, m.hidden_size, m.num_heads, m.mlp_dim, m.num_layers = 40, D, H, F, num_layers
  m.residual = 'deepnorm'
  for k, v in overrides.items():
    setattr(m, k, v)
  return config


@pytest.mark.parametrize(
  'n,alpha,beta', [(6, 1.8612, 0.3799), (12, 2.2134, 0.3195), (18, 2.4495, 0.2887)]
)
def test_dn1_constants(n, alpha, beta):
  a, b = encoder.deepnorm_constants(deepnet_config(n).model)
  assert a == pytest.approx(alpha, abs=1e-4) and b == pytest.approx(beta, abs=1e-4)
  spec = models.resolve(deepnet_config(n))
  assert spec.residual_alpha == pytest.approx(alpha, abs=1e-4)
  overridden = encoder.deepnorm_constants(
    deepnet_config(n, deepnorm_alpha=1.0, deepnorm_beta=0.5).model
  )
  assert overridden == (1.0, 0.5)


def test_dn2_init_stds():
  n = 6
  _, beta = encoder.deepnorm_constants(deepnet_config(n).model)
  config = deepnet_config(n)
  params = nnx.to_pure_dict(nnx.state(models.build(config, rngs=nnx.Rngs(params=0)), nnx.Param))
  lay = params['layers']
  xavier = lambda fi, fo: math.sqrt(2.0 / (fi + fo))
  check = lambda x, std: np.testing.assert_allclose(np.asarray(x).std(), std, rtol=0.05)
  check(lay['attention']['query']['kernel'], xavier(D, D))
  check(lay['attention']['key']['kernel'], xavier(D, D))
  check(lay['attention']['value']['kernel'], beta * xavier(D, D))
  check(lay['attention']['out']['kernel'], beta * xavier(D, D))
  check(lay['mlp']['wi']['kernel'], beta * xavier(D, F))
  check(lay['mlp']['wo']['kernel'], beta * xavier(F, D))
  check(params['embedder']['token']['embedding'], config.model.initializer_range)


def test_dn3_scaled_residual_equals_scaled_eps():
  alpha, eps = 2.2134, 1e-5
  x = jax.random.normal(jax.random.key(0), (3, D))
  g = jax.random.normal(jax.random.key(1), (3, D)) * 0.3
  norm = lambda eps: layers.LayerNorm(D, eps=eps, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(
    norm(eps)(alpha * x + g), norm(eps / alpha**2)(x + g / alpha), atol=1e-5
  )


def _block_update(num_layers):
  """||block(x) - LN(x)|| / ||LN(x)|| for the first block of an N-block DeepNet at init."""
  config = deepnet_config(num_layers, norm_eps=1e-6)
  spec = models.resolve(config)
  block = transformer.TransformerBlock(spec, rngs=nnx.Rngs(params=0))
  x = jax.random.normal(jax.random.key(2), (2, 16, D))
  seg, pos = jnp.ones((2, 16), jnp.int32), jnp.broadcast_to(jnp.arange(16), (2, 16))
  y = block(x, encoder.make_context(spec, seg, pos))
  ln_x = layers.LayerNorm(D, eps=1e-6, rngs=nnx.Rngs(0))(x)
  return float(jnp.linalg.norm(y - ln_x) / jnp.linalg.norm(ln_x))


def test_dn4_blocks_approach_identity_with_depth():
  updates = [_block_update(n) for n in (2, 12, 100)]
  assert updates[0] > updates[1] > updates[2]
  assert updates[2] < 0.05


def test_deepnorm_full_model_runs():
  config = deepnet_config(3, hidden_size=32, mlp_dim=64)
  model = models.build(config, rngs=nnx.Rngs(params=0))
  graphdef, state = nnx.split(model)
  tokens = jnp.zeros((2, 8), jnp.int32)
  seg, pos = jnp.ones((2, 8), jnp.int32), jnp.broadcast_to(jnp.arange(8), (2, 8))
  logits = jax.jit(lambda s: nnx.merge(graphdef, s)(tokens, seg, pos))(state)
  assert logits.shape == (2, 8, 40) and bool(jnp.isfinite(logits).all())


@pytest.mark.parametrize('preset', ['tiny', 'deep', 'base'])
def test_presets_validate_and_build_abstractly(preset):
  from launch.configs import deepnet as deepnet_presets

  config = deepnet_presets.get_config(preset)
  models.validate(config)
  model = nnx.eval_shape(lambda: models.build(config, rngs=nnx.Rngs(params=0)))
  kernel = nnx.to_pure_dict(nnx.state(model, nnx.Param))['layers']['mlp']['wi']['kernel']
  assert kernel.shape == (config.model.num_layers, config.model.hidden_size, config.model.mlp_dim)
