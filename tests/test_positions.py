"""model.position_embedding: 'rope' (default, unchanged) vs 'learned' absolute positions
(docs/algorithms.md 7.6): what the table does, that it trains, its parameter count, and what
refuses it or carries it (Hugging Face export, growth)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from pretrain import config as config_schema
from launch.configs import gau as gau_configs
from models import growth
from models import hf_export

V, D, H, F, L, N = 50, 32, 4, 64, 2, 16


def config_of(family='roformer', **model):
  """A tiny config of 'roformer' (v1: 4 heads, F 64), 'gau' or 'flash' (s 16, chunk 8): d 32,
  2 layers, n 16, with model overrides."""
  if family == 'roformer':
    config = config_schema.get_base_config()
  else:
    config = gau_configs.get_config('flash_tiny' if family == 'flash' else 'tiny')
  m = config.model
  m.vocab_size, m.hidden_size, m.num_layers, m.num_heads, m.mlp_dim = V, D, L, H, F
  m.shared_dim, m.chunk_size = 16, 8 if m.chunk_size else 0
  m.initializer_range = 0.2  # logits O(1)
  config.data.seq_len = N
  for key, value in model.items():
    setattr(m, key, value)
  return config


def build(config, seed=0):
  return models.build(config, rngs=nnx.Rngs(params=seed))


_JIT = {}


def forward(model, tokens, seg, pos):
  """Logits [b, n, V] under one jit per architecture (split / merge, as the trainer)."""
  graphdef, state = nnx.split(model)
  if graphdef not in _JIT:
    _JIT[graphdef] = jax.jit(lambda s, t, g, p: nnx.merge(graphdef, s)(t, g, p))
  return np.asarray(_JIT[graphdef](state, tokens, seg, pos))


def packed(n=N, split=10):
  """tokens, segment_ids, positions [2, n]: row 0 one document, row 1 two documents (the
  second from `split` on, its positions restarting at 0)."""
  tokens = jax.random.randint(jax.random.key(1), (2, n), 0, V, jnp.int32)
  seg = jnp.ones((2, n), jnp.int32).at[1, split:].set(2)
  pos = (
    jnp.tile(jnp.arange(n, dtype=jnp.int32), (2, 1))
    .at[1, split:]
    .set(jnp.arange(n - split, dtype=jnp.int32))
  )
  return tokens, seg, pos


# ----------------------------------------------------------------------------- the default

# Logits [0, 0, :4] and the sum of |logits| of the default v1 model on `packed()`, computed by
# the code before model.position_embedding existed (it was then bitwise equal, all families).
GOLDEN_FIRST = [-0.70218009, -0.80207837, 0.46683043, -0.43744662]
GOLDEN_ABS_SUM = 1071.0891


def test_rope_default_has_no_table_and_matches_the_code_before_the_option():
  config = config_of()
  assert config.model.position_embedding == 'rope'
  model = build(config)
  assert model.embedder.position is None
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  assert set(params['embedder']) == {'token', 'token_type', 'norm'}
  out = forward(model, *packed())
  np.testing.assert_allclose(out[0, 0, :4], GOLDEN_FIRST, rtol=1e-5, atol=1e-7)
  assert np.abs(out).sum() == pytest.approx(GOLDEN_ABS_SUM, rel=1e-5)


# ----------------------------------------------------------------------------- learned


def test_learned_output_depends_on_absolute_position_rope_only_on_relative():
  """Shifting every position by 3 leaves RoPE's logits unchanged (relativity, up to float32)
  but changes the learned model's; the packed second document gives the same logits as that
  document alone at positions 0.. (positions restart per document); a row of the table moves
  exactly the tokens at that position's documents."""
  tokens, seg, pos = packed()
  rope_model = build(config_of())
  a, b = forward(rope_model, tokens, seg, pos), forward(rope_model, tokens, seg, pos + 3)
  np.testing.assert_allclose(a, b, atol=2e-5 * np.abs(a).max())

  model = build(config_of(position_embedding='learned', max_position=32))
  a, b = forward(model, tokens, seg, pos), forward(model, tokens, seg, pos + 3)
  assert np.abs(a - b).max() > 1e-2 * np.abs(a).max()
  alone = forward(model, tokens[1:, 10:], jnp.ones((1, N - 10), jnp.int32), pos[1:, 10:])
  np.testing.assert_allclose(a[1, 10:], alone[0], atol=2e-5 * np.abs(a).max())
  # Row 13 occurs only in row 0 (row 1's documents stop at position 9). Not a constant
  # vector: LayerNorm removes those.
  table = model.embedder.position.embedding
  table[...] = table[...].at[13].add(jnp.linspace(-1.0, 1.0, D))
  c = forward(model, tokens, seg, pos)
  np.testing.assert_array_equal(c[1], a[1])
  assert np.abs(c[0] - a[0]).max() > 1e-2 * np.abs(a).max()


def test_learned_positions_in_gau():
  """GAU (FLASH, chunked attention): rope.apply_sin_cos skips the rotation in models/gau.py;
  the table exists and moves the output."""
  tokens, seg, pos = packed()
  model = build(config_of('flash', position_embedding='learned', max_position=32))
  assert model.embedder.position.embedding.shape == (32, D)
  a, b = forward(model, tokens, seg, pos), forward(model, tokens, seg, pos + 3)
  assert np.abs(a - b).max() > 1e-2 * np.abs(a).max()


def test_learned_table_gets_gradients_only_at_used_positions():
  config = config_of(position_embedding='learned', max_position=40)
  model = build(config)
  tokens, seg, pos = packed()
  graphdef, params = nnx.split(model, nnx.Param)

  def loss(params):
    logits = nnx.merge(graphdef, params)(tokens, seg, pos)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  grads = nnx.to_pure_dict(jax.jit(jax.grad(loss))(params))
  g = np.asarray(grads['embedder']['position']['embedding'])
  assert g.shape == (40, D)
  norms = np.linalg.norm(g, axis=-1)
  assert (norms[:N] > 0).all()  # positions 0..15 occur in the batch
  np.testing.assert_array_equal(norms[N:], 0.0)  # rows past the longest document: none


def test_parameter_count_and_flops():
  """The table adds max_position * d parameters (analytic v1 count) and no counted FLOPs."""
  rope_config = config_of()
  learned_config = config_of(position_embedding='learned', max_position=96)
  n_rope = models.encoder.num_params(nnx.eval_shape(lambda: build(rope_config)))
  n_learned = models.encoder.num_params(nnx.eval_shape(lambda: build(learned_config)))
  layer = 3 * (D * D + D) + (D * D + D) + 2 * 2 * D + (D * F + F) + (F * D + D)
  analytic = V * D + 2 * D + 2 * D + L * layer + (D * D + D) + 2 * D + V
  assert n_rope == analytic
  assert n_learned == analytic + 96 * D
  assert models.flops_per_token(learned_config, 3) == models.flops_per_token(rope_config, 3)


def test_validate_names_the_option():
  with pytest.raises(ValueError, match='model.position_embedding'):
    models.validate(config_of(position_embedding='sinusoidal'))
  config = config_of(position_embedding='learned', max_position=8)
  with pytest.raises(ValueError, match='model.max_position=8'):
    models.validate(config)  # data.seq_len 16 > 8
  config.data.seq_len = 8
  models.validate(config)
  with pytest.raises(ValueError, match="'learned' needs the batch's positions"):
    build(config).embedder(jnp.zeros((1, 4), jnp.int32))
  # Odd head widths: refused with RoPE (it rotates pairs), built and run with a learned table.
  for family, field, odd in (('roformer', 'head_dim', 7), ('gau', 'shared_dim', 7)):
    with pytest.raises(ValueError, match=f'{field}.*{odd}'):
      models.validate(config_of(family, **{field: odd}))
    config = config_of(family, position_embedding='learned', **{field: odd})
    models.validate(config)
    assert np.isfinite(forward(build(config), *packed())).all()


# ----------------------------------------------------------------------------- export, growth


def test_hf_export_refuses_learned_positions():
  hf_export.check_exportable(config_of())
  config = config_of(position_embedding='learned')
  with pytest.raises(hf_export.ExportError, match="model.position_embedding='learned'"):
    hf_export.check_exportable(config)
  with pytest.raises(hf_export.ExportError, match='position_embedding'):
    hf_export.to_torch({}, config)


def _logits(config, params):
  graphdef, state = nnx.split(nnx.eval_shape(lambda: build(config)), nnx.Param)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  tokens, seg, pos = packed()
  return forward(nnx.merge(graphdef, state), tokens, seg, pos)


def test_growth_carries_the_table_exactly():
  """d 32 -> 64, heads 4 -> 4 with d_h 8 -> 16 (zero-slot map without RoPE), 2 -> 3 blocks:
  float32 logits equal to 1e-5 relative; the table keeps its rows."""
  src = config_of(position_embedding='learned', max_position=24)
  dst = config_of(
    position_embedding='learned', max_position=24, hidden_size=64, mlp_dim=128, num_layers=3
  )
  params = nnx.to_pure_dict(nnx.state(build(src), nnx.Param))
  plan = growth.plan(src, dst, growth.Options())
  grown = growth.grow_params(params, plan)
  assert grown['embedder']['position']['embedding'].shape == (24, 64)
  a, b = _logits(src, params), _logits(growth.grown_config(dst, plan), grown)
  assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()


def test_growth_refuses_a_changed_position_option():
  src = config_of(position_embedding='learned', max_position=24)
  with pytest.raises(growth.GrowthError, match='model.position_embedding'):
    growth.plan(src, config_of(hidden_size=64, mlp_dim=128))
  with pytest.raises(growth.GrowthError, match='model.max_position'):
    growth.plan(
      src, config_of(position_embedding='learned', max_position=48, hidden_size=64, mlp_dim=128)
    )
