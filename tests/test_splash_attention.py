"""model.attention_impl: the Pallas splash-attention kernel (run in interpret mode on CPU)
against the XLA path, forward and gradients, on packed and padded batches (docs/algorithms.md
9.3); how 'auto' / 'xla' / 'splash' resolve and what they refuse.

Interpret mode runs the TPU kernel's program as plain JAX ops, tile by tile, so shapes stay
small; the tests fix the tile at 128 tokens, so n = 256 runs the online softmax over two key
tiles (and, causal, skips the tile above the diagonal).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from models import attention
from models import encoder
from pretrain import config as config_schema

# Relative tolerance: both paths compute in float32; they differ in summation order (online
# softmax over 128-key tiles vs one softmax) and in where the scale multiplies, so a few ulps.
RTOL = 1e-5


@pytest.fixture
def interpret(monkeypatch):
  monkeypatch.setattr(attention, 'SPLASH_INTERPRET', True)
  monkeypatch.setattr(attention, 'SPLASH_BLOCKS', (128,))


def packed_padded_segments(b: int, n: int) -> np.ndarray:
  """int32 [b, n]: row 0 three documents then padding, row 1 one document filling the row,
  further rows two documents then padding; document borders off the 128-token tiles."""
  seg = np.zeros((b, n), np.int32)
  seg[0, : n // 3], seg[0, n // 3 : n // 2 + 9], seg[0, n // 2 + 9 : n - 21] = 1, 2, 3
  seg[1] = 1
  seg[2:, : n // 2 - 5], seg[2:, n // 2 - 5 : n - 40] = 1, 2
  return seg


def positions_of(seg: np.ndarray) -> np.ndarray:
  """Positions restarting at 0 in every document (0 on padding), as the pipeline packs."""
  pos = np.zeros_like(seg)
  for r in range(seg.shape[0]):
    for i in range(1, seg.shape[1]):
      pos[r, i] = pos[r, i - 1] + 1 if seg[r, i] == seg[r, i - 1] and seg[r, i] else 0
  return pos


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def assert_close_tree(actual, expected, rtol=RTOL):
  """Every leaf: max |a - e| <= rtol * max |e| (the leaf's own magnitude)."""
  flat = jax.tree_util.tree_flatten_with_path(actual)[0]
  for (path, a), e in zip(flat, jax.tree.leaves(expected), strict=True):
    err = rel_err(a, e)
    assert err <= rtol, f'{jax.tree_util.keystr(path)}: max error {err:.2e} of its magnitude'


@pytest.mark.parametrize(
  'causal,kind', [(False, 'standard'), (False, 'entropy_invariant'), (True, 'standard')]
)
def test_kernel_matches_xla_forward_and_gradients(interpret, causal, kind):
  b, n, h, d = 3, 256, 2, 32
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v = (2.0 * jax.random.normal(kk, (b, n, h, d), jnp.float32) for kk in keys[:3])
  seg = jnp.asarray(packed_padded_segments(b, n))
  mask = attention.attention_mask(seg, causal)
  scale_xla = attention.attention_scale(kind, mask, d)
  scale = attention.segment_attention_scale(kind, seg, causal, d)
  np.testing.assert_array_equal(np.broadcast_to(scale, np.shape(scale_xla)), scale_xla)

  def xla(q, k, v):
    return attention.dot_product_attention(q, k, v, mask, scale_xla)

  def splash(q, k, v):
    return attention.splash_attention(q, k, v, seg, scale, causal=causal)

  # A cotangent that weights every output, padding rows included: the splash path is meant
  # to equal the XLA path everywhere, not only where the loss looks.
  w = jax.random.normal(keys[3], (b, n, h, d), jnp.float32)
  loss = lambda f: lambda *a: jnp.sum(f(*a) * w)
  out_x, out_s = jax.jit(xla)(q, k, v), jax.jit(splash)(q, k, v)
  grads_x = jax.jit(jax.grad(loss(xla), (0, 1, 2)))(q, k, v)
  grads_s = jax.jit(jax.grad(loss(splash), (0, 1, 2)))(q, k, v)
  assert out_s.shape == out_x.shape and out_s.dtype == jnp.float32
  assert_close_tree(out_s, out_x)
  assert_close_tree(grads_s, grads_x)
  # Padding rows: the mean of v over all keys in both paths (a uniform fully masked row).
  pad = np.asarray(seg) == 0
  np.testing.assert_allclose(
    np.asarray(out_s)[pad], np.broadcast_to(v.mean(1)[:, None], out_x.shape)[pad], atol=1e-5
  )


def tiny_config(family: str, impl: str, **model):
  config = config_schema.get_base_config()
  config.model.family = family
  if family == 'roformer_v2':
    config.model.update(use_bias=False, norm_type='rmsnorm_noparam', mlp_activation='relu')
  config.model.update(
    vocab_size=64, hidden_size=32, num_heads=2, mlp_dim=64, num_layers=2, initializer_range=0.2
  )
  config.model.attention_impl = impl
  config.model.update(model)
  config.data.seq_len = 128
  return config


def model_loss_and_grads(config, tokens, seg, pos):
  """(logits [b, n, V], grads of a loss over every valid position) under one jit."""
  model = models.build(config, rngs=nnx.Rngs(params=0))
  graphdef, state = nnx.split(model)
  weights = (seg > 0).astype(jnp.float32)

  def loss(state):
    logits = nnx.merge(graphdef, state)(tokens, seg, pos)
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, tokens[..., None], -1)[..., 0]
    return jnp.sum(nll * weights) / jnp.sum(weights), logits

  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state)
  return logits, grads


@pytest.mark.parametrize(
  'family,objective', [('roformer', 'mlm'), ('roformer_v2', 'mlm'), ('roformer_v2', 'clm')]
)
def test_whole_model_splash_matches_xla(interpret, family, objective):
  b, n = 2, 128
  seg_np = packed_padded_segments(b, n)
  seg, pos = jnp.asarray(seg_np), jnp.asarray(positions_of(seg_np))
  tokens = jax.random.randint(jax.random.key(1), (b, n), 0, 64, jnp.int32)
  results = {}
  for impl in ('xla', 'splash'):
    config = tiny_config(family, impl)
    config.objective = objective
    results[impl] = model_loss_and_grads(config, tokens, seg, pos)
  (logits_x, grads_x), (logits_s, grads_s) = results['xla'], results['splash']
  assert float(jnp.abs(logits_x).max()) > 0.5  # O(1) logits: the tolerance means something
  assert_close_tree(logits_s, logits_x)
  assert_close_tree(grads_s, grads_x)


def test_kernel_under_a_mesh_matches_xla(interpret):
  """On a (2, 2, 2) mesh with the trainer's rules the kernel runs in shard_map, batch over
  ('data', 'fsdp') and heads over 'tensor'; the result is that of the unsharded XLA path."""
  from pretrain import mesh as mesh_lib  # pylint: disable=g-import-not-at-top

  config = tiny_config('roformer', 'splash')
  config.mesh.shape = (2, 2, 2)
  mesh = mesh_lib.make_mesh(config.mesh)
  rules = tuple(tuple(r) for r in config.mesh.logical_axis_rules)
  b, n = 4, 128
  seg_np = packed_padded_segments(b, n)
  seg, pos = jnp.asarray(seg_np), jnp.asarray(positions_of(seg_np))
  tokens = jax.random.randint(jax.random.key(2), (b, n), 0, 64, jnp.int32)
  logits_x, grads_x = model_loss_and_grads(tiny_config('roformer', 'xla'), tokens, seg, pos)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    logits_s, grads_s = model_loss_and_grads(config, tokens, seg, pos)
    hlo = (
      jax.jit(lambda q: attention.splash_attention(q, q, q, seg, 0.25, causal=False))
      .lower(jnp.zeros((b, n, 2, 16)))
      .as_text()
    )
  # One kernel call per device on its own examples and heads (Shardy's manual computation).
  assert 'manual_computation' in hlo and '[{"data", "fsdp"}, {"tensor"}, {}, {}]' in hlo
  assert_close_tree(logits_s, logits_x)
  assert_close_tree(grads_s, grads_x)


def context_kind(config, n=128) -> str:
  spec = encoder.resolve(config)
  seg = jnp.ones((1, n), jnp.int32)
  ctx = encoder.make_context(spec, seg, jnp.zeros((1, n), jnp.int32))
  return 'splash' if ctx.mask is None and ctx.scale is not None else 'xla'


def test_auto_is_xla_off_tpu_and_splash_on_tpu(monkeypatch):
  assert jax.default_backend() == 'cpu'
  assert context_kind(tiny_config('roformer', 'auto')) == 'xla'
  monkeypatch.setattr(attention, '_mesh_on_tpu', lambda: True)
  assert context_kind(tiny_config('roformer', 'auto')) == 'splash'
  assert context_kind(tiny_config('roformer', 'xla')) == 'xla'
  # Where the kernel cannot run, 'auto' falls back to XLA even on TPU.
  assert context_kind(tiny_config('roformer', 'auto', dropout_rate=0.1)) == 'xla'
  assert context_kind(tiny_config('roformer', 'auto'), n=96) == 'xla'
  assert context_kind(tiny_config('gau', 'auto', shared_dim=16)) == 'xla'


def test_splash_refuses_what_it_cannot_compute():
  with pytest.raises(ValueError, match='model.dropout_rate=0.1'):
    models.validate(tiny_config('roformer', 'splash', dropout_rate=0.1))
  with pytest.raises(ValueError, match="family='gau'"):
    models.validate(tiny_config('gau', 'splash', shared_dim=16))
  odd = tiny_config('roformer', 'splash')
  odd.data.seq_len = 200
  with pytest.raises(ValueError, match='seq_len=200'):
    models.validate(odd)
  with pytest.raises(ValueError, match='attention_impl'):
    models.validate(tiny_config('roformer', 'flash'))
  models.validate(tiny_config('roformer', 'auto', dropout_rate=0.1))  # auto falls back
  # Without TPU devices (and without interpret mode) the kernel cannot run at all.
  with pytest.raises(ValueError, match='SPLASH_INTERPRET'):
    context_kind(tiny_config('roformer', 'splash'))


def test_splash_refuses_dropout_in_a_call():
  """A block built with dropout but called on the splash path with a dropout key."""
  layer = attention.MultiHeadAttention(
    16,
    2,
    8,
    use_bias=False,
    kernel_init=encoder.resolve(tiny_config('roformer', 'xla')).kernel_init,
    dropout_rate=0.1,
    scale_kind='standard',
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs=nnx.Rngs(params=0),
  )
  seg = jnp.ones((1, 128), jnp.int32)
  ctx = attention.AttentionContext(segment_ids=seg, scale=jnp.float32(0.35))
  with pytest.raises(ValueError, match='dropout_rate=0.1'):
    layer(jnp.ones((1, 128, 16)), ctx, jax.random.key(0))
