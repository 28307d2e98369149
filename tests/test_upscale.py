"""Lossless growth (models/growth.py; docs/algorithms.md 4.8 UP-1..UP-6) for every model family.

Float64 runs the real model code with its hard-coded float32 casts redirected to float64
(`float64_models`; models/ has no float64 option yet): "exact" = max |logit error| <= 1e-10
(docs/algorithms.md 0). Float32 runs the unmodified models: <= 1e-5 relative.
"""

import contextlib
import dataclasses
import importlib
import math
import pkgutil
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import models
import optim
from pretrain import config as config_schema
from launch.configs import deepnet as deepnet_configs
from launch.configs import gau as gau_configs
from launch.configs import roformer as roformer_configs
from launch.configs import roformer_v2 as roformer_v2_configs
from models import growth
from pretrain import grow as grow_lib

V, N = 40, 12
FAMILIES = ('roformer', 'roformer_v2', 'deepnet', 'gau', 'flash')


# ----------------------------------------------------------------------------- helpers


class _Float64Numpy(types.ModuleType):
  """jax.numpy with float32 -> float64 (what the models' explicit casts then produce)."""

  def __getattr__(self, name):
    return jnp.float64 if name == 'float32' else getattr(jnp, name)


@contextlib.contextmanager
def float64_models():
  """x64 on, and the models' `jnp.float32` casts (norm statistics, RoPE, softmax logits)
  become float64; both restored on exit."""
  for info in pkgutil.iter_modules(models.__path__):  # lazily imported blocks too
    importlib.import_module(f'models.{info.name}')
  modules = [
    m
    for name, m in sorted(sys.modules.items())
    if name.startswith('models.') and not name.startswith('models.growth') and hasattr(m, 'jnp')
  ]
  saved = [m.jnp for m in modules]
  with jax.enable_x64(True):
    try:
      for m in modules:
        m.jnp = _Float64Numpy('jnp_float64')
      yield
    finally:
      for m, s in zip(modules, saved):
        m.jnp = s


def family_config(family: str, dtype: str = 'float64', **model):
  """A tiny config of `family` (d 16, L 2, h 2 x 8, F 32; GAU s 8, e 32)."""
  config = config_schema.get_base_config()
  m = config.model
  m.vocab_size, m.hidden_size, m.num_layers, m.num_heads, m.mlp_dim = V, 16, 2, 2, 32
  m.shared_dim, m.initializer_range = 8, 0.2
  if family == 'deepnet':
    m.residual = 'deepnorm'
  elif family != 'roformer':
    m.family, m.use_bias, m.norm_type, m.norm_eps = (
      'gau' if family in ('gau', 'flash') else family,
      False,
      'rmsnorm_noparam',
      0.0,
    )
    if family == 'gau':
      m.attention_norm = 'softmax_plus'
    elif family == 'flash':
      m.attention_norm, m.chunk_size = 'relu2', 4
  m.dtype = m.param_dtype = dtype
  for key, value in model.items():
    setattr(m, key, value)
  return config


def grow_case(family: str, case: str):
  """(target model overrides, Options) of the named growth."""
  transformer = family not in ('gau', 'flash')
  if case == 'k2':  # width x2 (heads / e / s and F too) + one block
    shape = (
      dict(hidden_size=32, num_heads=4, mlp_dim=64, num_layers=3)
      if transformer
      else dict(hidden_size=32, shared_dim=16, num_layers=3)
    )
    return shape, growth.Options()
  if case == 'k3':  # width x3, head_dim x2, two blocks (one in front), zero_out
    shape = (
      dict(hidden_size=48, num_heads=6, head_dim=16, mlp_dim=96, num_layers=4)
      if transformer
      else dict(hidden_size=48, num_layers=4)
    )
    return shape, growth.Options(symmetry_breaking='zero_out', depth_positions='0,3')
  raise ValueError(case)


def _abstract(config):
  spec = models.resolve(config)
  return nnx.split(nnx.eval_shape(lambda: models.Encoder(spec, rngs=nnx.Rngs(params=0))), nnx.Param)


def random_params(config, seed=0):
  """Random parameters with nontrivial gains and biases (numpy, the config's param dtype)."""
  _, state = _abstract(config)
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = str(path[-1].key)
    if name == 'scale':
      x = 1.0 + 0.3 * rng.standard_normal(leaf.shape)
    elif name == 'bias':
      x = 0.5 * rng.standard_normal(leaf.shape)
    else:
      x = 0.3 * rng.standard_normal(leaf.shape)
    return x.astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state))


def batch(n=N, seed=0):
  """tokens, segment_ids, positions [2, n]: row 0 ends in 2 pads, row 1 packs two documents
  (the second holds the last 4 tokens); positions restart at 0 in every document."""
  tokens = jnp.asarray(np.random.default_rng(seed).integers(0, V, (2, n)), jnp.int32)
  seg = np.ones((2, n), np.int32)
  seg[0, n - 2 :] = 0
  seg[1, n - 4 :] = 2
  pos = np.tile(np.arange(n), (2, 1))
  pos[1, n - 4 :] = np.arange(4)
  return tokens, jnp.asarray(seg), jnp.asarray(pos, jnp.int32)


def model_of(config, params):
  graphdef, state = _abstract(config)
  state = jax.tree.map(lambda x: x, state)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  return nnx.merge(graphdef, state)


_FORWARD = {}


def logits(config, params, inputs=None):
  """Logits at the non-padding tokens [tokens, V] (numpy); one jit per architecture."""
  tokens, seg, pos = inputs if inputs is not None else batch()
  key = (models.resolve(config), jax.config.jax_enable_x64)
  if key not in _FORWARD:
    _FORWARD[key] = jax.jit(lambda prm, t, s, p: model_of(config, prm)(t, s, p))
  out = _FORWARD[key](jax.tree.map(jnp.asarray, params), tokens, seg, pos)
  return np.asarray(out)[np.asarray(seg) != 0]


def grow(src, dst, options, params):
  p = growth.plan(src, dst, options)
  return growth.grow_params(params, p), growth.grown_config(dst, p), p


def max_error(src, dst, options, seed=0, params=None, edit=None):
  """max |logits(grown) - logits(small)| / max |logits(small)| scale, plus the plan."""
  params = random_params(src, seed) if params is None else params
  grown, config, p = grow(src, dst, options, params)
  if edit is not None:
    grown, config = edit(grown, config, p)
  a, b = logits(src, params), logits(config, grown)
  err = float(np.abs(a - b).max())
  if err < 1e-6:  # UP-5: the same predictions (MLM accuracy) token for token
    np.testing.assert_array_equal(a.argmax(-1), b.argmax(-1))
  return err, float(np.abs(a).max()), p


# ----------------------------------------------------------------------------- UP-1 exact

# An affine-LayerNorm model without an MLM head transform: 'su' growth is exact with the
# eps / k the plan sets (v1's head norm would need eps * 1, so v1 is exact only up to O(eps)),
# and eps = 1e-3 is large enough that keeping the old eps misses the tolerance by far.
LAYERNORM_V2 = dict(use_bias=True, norm_type='layernorm', norm_eps=1e-3)


@pytest.mark.parametrize('case', ['k2', 'k3'])
@pytest.mark.parametrize('family', FAMILIES + ('v2_layernorm',))
def test_up1_exact_float64(family, case):
  extra = LAYERNORM_V2 if family == 'v2_layernorm' else {}
  shape, options = grow_case(family, case)
  if extra:  # width only: inserted blocks under an affine norm are exact only to O(eps)
    family = 'roformer_v2'
    shape = (
      dict(hidden_size=32, num_heads=4, mlp_dim=64)
      if case == 'k2'
      else dict(hidden_size=48, num_heads=6, mlp_dim=96)
    )
  with float64_models():
    src = family_config(family, scan_layers=(case == 'k2'), **extra)
    dst = family_config(family, **shape, **extra)
    err, scale, p = max_error(src, dst, options)
  assert scale > 0.5
  assert err <= 1e-10, (family, case, err, p.notes)
  assert p.exactness in ('yes', 'up to O(eps)')
  if extra:
    k = dst.model.hidden_size // src.model.hidden_size
    assert p.config_overrides == {'model.norm_eps': pytest.approx(1e-3 / k)}


@pytest.mark.parametrize(
  'name,shape,options',
  [
    ('heads', dict(num_heads=4, head_dim=8), growth.Options()),
    ('mlp', dict(mlp_dim=96), growth.Options(symmetry_breaking='zero_out')),
    ('depth', dict(num_layers=4), growth.Options(depth_positions='interleave')),
    (
      'width_unit',
      dict(hidden_size=48, num_heads=6, mlp_dim=96),
      growth.Options(width_method='unit'),
    ),
  ],
)
def test_up1_single_axis_v1_float64(name, shape, options):
  with float64_models():
    err, _, p = max_error(family_config('roformer'), family_config('roformer', **shape), options)
  assert err <= 1e-10, (name, err)
  if name == 'width_unit':  # stream scale 1: eps unchanged everywhere -> exact to rounding
    assert p.exactness == 'yes' and err < 1e-12 and not p.config_overrides
  if name == 'depth':
    assert p.new_layers == (1, 3)


def test_up1_float32_models():
  """The unmodified float32 models: relative error <= 1e-5 for every family."""
  for family in FAMILIES:
    shape, options = grow_case(family, 'k2')
    err, scale, _ = max_error(
      family_config(family, 'float32'), family_config(family, 'float32', **shape), options
    )
    assert err <= 1e-5 * scale, (family, err, scale)


# ----------------------------------------------------------------------------- UP-2 controls


def _scaled_leaf(path, factor):
  def edit(grown, config, p):
    node = grown
    for key in path[:-1]:
      node = node[key]
    node[path[-1]] = node[path[-1]] * factor
    return grown, config

  return edit


def test_up2_negative_controls_float64():
  k2 = dict(hidden_size=32, num_heads=4, mlp_dim=64)
  with float64_models():
    src, dst = family_config('roformer'), family_config('roformer', **k2)
    exact, scale, _ = max_error(src, dst, growth.Options())
    # Su's post: b2 -> b2/2 instead of b2/sqrt(2) for GELU FFNs (k = 2): O(1) logit error.
    su_b2, _, _ = max_error(
      src,
      dst,
      growth.Options(),
      edit=_scaled_leaf(('layers', 'mlp', 'wo', 'bias'), math.sqrt(2) / 2),
    )
    # Head size by PairRep with the standard RoPE table (Su's eq.): O(1) score error.
    pair = dict(k2, num_heads=2, head_dim=16)

    def pair_rep(grown, config, p):
      q = dataclasses.replace(p.maps['dh_q'], kind='pair_rep', scale=2**-0.25)
      k = dataclasses.replace(p.maps['dh_k'], kind='pair_rep', scale=2**-0.25)
      p2 = dataclasses.replace(p, maps=dict(p.maps, dh_q=q, dh_k=k))
      return growth.grow_params(random_params(src), p2), config

    zero_slot, _, _ = max_error(src, family_config('roformer', **pair), growth.Options())
    pair_err, _, _ = max_error(
      src, family_config('roformer', **pair), growth.Options(), edit=pair_rep
    )
    # Unscaled eps: an affine-LN model without a head transform ('su' is then exact with
    # eps/k everywhere); leaving eps as it was costs O(eps / var).
    ln = dict(use_bias=True, norm_type='layernorm', norm_eps=1e-5)
    src_ln = family_config('roformer_v2', **ln)
    dst_ln = family_config('roformer_v2', **ln, **k2)
    scaled_eps, _, p_ln = max_error(src_ln, dst_ln, growth.Options())

    def keep_eps(grown, config, p):
      config.model.norm_eps = 1e-5
      return grown, config

    unscaled_eps, _, _ = max_error(src_ln, dst_ln, growth.Options(), edit=keep_eps)
  assert exact <= 1e-10 and zero_slot <= 1e-10 and scaled_eps <= 1e-10
  assert p_ln.config_overrides == {'model.norm_eps': 5e-6}
  assert su_b2 > 1e-2 * scale, su_b2
  assert pair_err > 1e-1, pair_err
  assert 1e-8 < unscaled_eps < 1e-2, unscaled_eps


# ----------------------------------------------------------------------------- UP-4 depth


def test_up4_depth():
  """Zero-branch insertion: exact for parameter-free post-norm (v2, GAU) and DeepNorm with
  the trained alpha; not for affine post-LN (v1) unless the norm is transferred."""
  with float64_models():
    v1, v1_deep = family_config('roformer'), family_config('roformer', num_layers=3)
    transfer, _, p = max_error(v1, v1_deep, growth.Options())
    assert p.depth_method == 'norm_transfer'

    def naive(grown, config, p):  # zero branches, fresh identity norms, nothing moved
      p2 = dataclasses.replace(p, depth_method='zero_branch')
      return growth.grow_params(random_params(v1), p2), config

    naive_err, _, _ = max_error(v1, v1_deep, growth.Options(), edit=naive)
    v2_err, _, _ = max_error(
      family_config('roformer_v2'), family_config('roformer_v2', num_layers=4), growth.Options()
    )
    v2_eps, _, _ = max_error(
      family_config('roformer_v2', norm_eps=1e-7),
      family_config('roformer_v2', num_layers=4, norm_eps=1e-7),
      growth.Options(),
    )
    dn, dn_deep = family_config('deepnet'), family_config('deepnet', num_layers=4)
    dn_err, _, p_dn = max_error(dn, dn_deep, growth.Options())

    def formula_alpha(grown, config, p):
      config.model.deepnorm_alpha = 0.0  # (2N)^(1/4) of the new depth
      return grown, config

    dn_formula, _, _ = max_error(dn, dn_deep, growth.Options(), edit=formula_alpha)
  assert transfer <= 1e-10 and v2_err <= 1e-10 and dn_err <= 1e-10
  assert naive_err > 1e-2, naive_err
  assert v2_eps < 1e-5  # O(eps) with eps = 1e-7
  assert dn_formula > 1e-3, dn_formula
  assert p_dn.config_overrides['model.deepnorm_alpha'] == pytest.approx(4**0.25)
  assert any('alpha kept' in note for note in p_dn.notes)


# ----------------------------------------------------------------------------- UP-3, UP-6


def _loss_fn(config, inputs, targets):
  tokens, seg, pos = inputs

  def loss(params):
    out = model_of(config, params)(tokens, seg, pos)
    logp = jax.nn.log_softmax(out)
    w = (seg != 0).astype(logp.dtype)
    return -(jnp.take_along_axis(logp, targets[..., None], -1)[..., 0] * w).sum() / w.sum()

  return loss


def _copy_gap(w):
  """max |w[.., 2i, ..] - w[.., 2i+1, ..]| over the stream-copy rows of wi [L, 2d, F']."""
  return float(np.abs(w[:, 0::2] - w[:, 1::2]).max())


def test_up3_up6_gradients_and_symmetry():
  """UP-6: the grown model's gradient is the gradient map of the small one's (what
  optimizer_state='map' uses). UP-3: copies get identical gradients and stay identical under
  SGD and Adam; noise and zero_out break the symmetry under both."""
  inputs = batch()
  targets = jnp.asarray(np.random.default_rng(1).integers(0, V, (2, N)), jnp.int32)
  shape = dict(hidden_size=32, num_heads=4, mlp_dim=64)
  with float64_models():
    src, dst = family_config('roformer'), family_config('roformer', **shape)
    params = random_params(src)
    p = growth.plan(src, dst, growth.Options())
    grads = jax.jit(jax.grad(_loss_fn(src, inputs, targets)))(jax.tree.map(jnp.asarray, params))
    grown_config = growth.grown_config(dst, p)
    loss = jax.jit(jax.value_and_grad(_loss_fn(grown_config, inputs, targets)))
    grown = growth.grow_params(params, p)
    grown_grads = loss(jax.tree.map(jnp.asarray, grown))[1]
    mapped = growth.grow_like_gradient(jax.tree.map(np.asarray, grads), p)
    for (path, g), m in zip(
      jax.tree_util.tree_flatten_with_path(grown_grads)[0], jax.tree.leaves(mapped)
    ):
      np.testing.assert_allclose(g, m, atol=1e-12, rtol=1e-9, err_msg=jax.tree_util.keystr(path))

    gaps = {}
    for sym in ('none', 'noise', 'zero_out'):
      options = growth.Options(symmetry_breaking=sym, noise_sigma=1e-2)
      q = growth.plan(src, dst, options)
      start = jax.tree.map(jnp.asarray, growth.grow_params(params, q))
      # Old FFN units only (zero_out appends new ones after the first F columns).
      wi = lambda tree: np.asarray(tree['layers']['mlp']['wi']['kernel'])[..., :32]
      gaps[sym, 'start'] = _copy_gap(wi(start))
      for name, tx in (('sgd', optax.sgd(0.1)), ('adam', optax.adam(1e-2))):
        state, x = tx.init(start), start
        for _ in range(3):  # eager updates: the jitted gradient compiles once
          updates, state = tx.update(loss(x)[1], state, x)
          x = optax.apply_updates(x, updates)
        gaps[sym, name] = _copy_gap(wi(x))
  assert gaps['none', 'start'] == 0.0 and gaps['zero_out', 'start'] == 0.0
  assert gaps['noise', 'start'] > 1e-5
  assert gaps['none', 'sgd'] < 1e-12 and gaps['none', 'adam'] < 1e-12, gaps
  for key in (('noise', 'sgd'), ('noise', 'adam'), ('zero_out', 'sgd'), ('zero_out', 'adam')):
    assert gaps[key] > 1e-6, (key, gaps)


# ----------------------------------------------------------------------------- optimizer


def test_optimizer_state_map():
  src = family_config('roformer', 'float32')
  dst = family_config('roformer', 'float32', hidden_size=32, num_heads=4, mlp_dim=64, num_layers=3)
  src.optim.name = dst.optim.name = 'adamw'
  params = random_params(src)
  tx_src, tx_dst = optim.build(src), optim.build(dst)
  # A state as after some updates: random moments (nu > 0) and counters at 2.
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    names = [str(getattr(k, 'name', getattr(k, 'key', k))) for k in path]
    if np.ndim(leaf) == 0:
      return np.asarray(2, np.asarray(leaf).dtype)
    x = rng.standard_normal(np.shape(leaf)).astype(np.float32)
    return x * x if 'nu' in names else x

  state = jax.tree_util.tree_map_with_path(fill, tx_src.init(params))
  p = growth.plan(src, dst, growth.Options(optimizer_state='map'))
  grown = growth.grow_params(params, p)
  fresh = tx_dst.init(grown)
  mapped = grow_lib.grow_opt_state(state, p, fresh, params)
  assert jax.tree.structure(mapped) == jax.tree.structure(fresh)
  for a, b in zip(jax.tree.leaves(mapped), jax.tree.leaves(fresh)):
    assert np.shape(a) == np.shape(b)
  adam_src, adam_dst = state[1][0], mapped[1][0]
  assert int(adam_dst.count) == int(adam_src.count) == 2
  # Only the moments' own counter is kept (bias correction); other counters (the learning-rate
  # schedule) restart with the grown run.
  scalars = sorted(int(leaf) for leaf in jax.tree.leaves(mapped) if np.ndim(leaf) == 0)
  assert len(scalars) > 1 and scalars == [0] * (len(scalars) - 1) + [2]
  mu = growth.grow_like_gradient(jax.tree.map(np.asarray, adam_src.mu), p)
  nu = growth.grow_like_gradient(jax.tree.map(np.asarray, adam_src.nu), p, power=2)
  chex_close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
  jax.tree.map(chex_close, adam_dst.mu, mu)
  jax.tree.map(chex_close, adam_dst.nu, nu)
  # The Su-table gradient factor of wi: c_in / (copies_out c_out) = (1/sqrt 2) / 2.
  wi_src = np.asarray(adam_src.mu['layers']['mlp']['wi']['kernel'])
  wi_dst = np.asarray(adam_dst.mu['layers']['mlp']['wi']['kernel'])
  np.testing.assert_allclose(wi_dst[:2, 0, 0], wi_src[:, 0, 0] / (2 * math.sqrt(2)), rtol=1e-6)
  assert np.all(wi_dst[2] == 0)  # the inserted block starts with zero moments
  bad = {'weird': np.zeros((3, 5))}
  with pytest.raises(growth.GrowthError, match="optimizer_state='reset'"):
    grow_lib.grow_opt_state(bad, p, bad, params)


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
  'family,dst_overrides,options,fragments',
  [
    ('roformer', dict(hidden_size=24), {}, ['hidden_size 16 -> 24', '32, 48']),
    ('roformer', dict(num_layers=1), {}, ['num_layers 2 -> 1', '>= 2']),
    ('roformer', dict(vocab_size=50), {}, ['model.vocab_size differs', 'vocab_size=40']),
    ('roformer', dict(num_heads=3, hidden_size=48), {}, ['num_heads 2 -> 3']),
    (
      'roformer',
      dict(num_layers=3),
      dict(depth_method='zero_branch'),
      ['not exact', "depth_method='norm_transfer'"],
    ),
    ('roformer_v2', dict(hidden_size=32), dict(width_method='su'), ["width_method='unit'"]),
    ('flash', dict(chunk_size=8), {}, ['model.chunk_size differs']),
    ('gau', dict(shared_dim=12), {}, ['shared_dim 8 -> 12']),
    ('roformer', dict(num_layers=4), dict(depth_positions='0,9'), ['2 distinct']),
    ('roformer', {}, dict(symmetry_breaking='noise', noise_sigma=0.0), ['noise_sigma']),
    ('roformer', {}, dict(width_method='tile'), ["'su', 'unit'"]),
  ],
)
def test_refused_with_alternatives(family, dst_overrides, options, fragments):
  src = family_config(family, 'float32')
  dst = family_config(family, 'float32', **dst_overrides)
  with pytest.raises(growth.GrowthError) as e:
    growth.plan(src, dst, growth.Options(**options))
  for fragment in fragments:
    assert fragment in str(e.value), str(e.value)


def test_grown_config_and_options():
  v1 = growth.plan(
    family_config('roformer', 'float32'),
    family_config('roformer', 'float32', hidden_size=48, num_heads=6, mlp_dim=96),
  )
  assert v1.width_method == 'su' and v1.config_overrides == {'model.norm_eps': 1e-12 / 3}
  v2 = growth.plan(
    family_config('roformer_v2', 'float32', norm_eps=1e-7),
    family_config('roformer_v2', 'float32', hidden_size=32, num_heads=4, mlp_dim=64, norm_eps=1e-7),
  )
  assert v2.width_method == 'unit' and v2.config_overrides == {'model.norm_eps': 1e-7 / 4}
  assert v2.exactness == 'up to O(eps)' and v2.c_embed == 0.5
  config = config_schema.get_base_config()
  assert growth.options_from_config(config) == growth.Options()  # the defaults agree
  config.upscale.symmetry_breaking, config.upscale.seed = 'zero_out', 3
  assert growth.options_from_config(config) == growth.Options(symmetry_breaking='zero_out', seed=3)


@pytest.mark.parametrize('module', [roformer_configs, roformer_v2_configs, gau_configs])
def test_consecutive_presets_are_growth_pairs(module):
  """tiny -> small -> base -> large with no extra flags (launch/configs docstrings)."""
  presets = ('tiny', 'small', 'base', 'large')
  for a, b in zip(presets, presets[1:]):
    p = growth.plan(module.get_config(a), module.get_config(b))
    assert p.exactness in ('yes', 'up to O(eps)'), (a, b, p.notes)


def test_deepnet_presets_grow_keeping_alpha():
  p = growth.plan(deepnet_configs.get_config('tiny'), deepnet_configs.get_config('base'))
  assert p.factors['hidden'] == 6 and p.new_layers and len(p.new_layers) == 32
  assert p.config_overrides['model.deepnorm_alpha'] == pytest.approx(32**0.25)
  assert any('alpha kept' in note for note in p.notes)
