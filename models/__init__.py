"""Flax NNX encoder models: RoFormer v1/v2, DeepNet (DeepNorm), GAU / FLASH / GAU-alpha.

Public API:

  models.validate(config)                        # ValueError naming the field and the fix
  model = models.build(config, rngs=nnx.Rngs(params=seed))
  logits = model(tokens, segment_ids, positions, prediction_positions=None, dropout_rng=None)
  models.flops_per_token(config, num_predictions_per_row)   # training FLOPs per input token

See models/encoder.py for the call contract and the parameter layout.
"""

from __future__ import annotations

from flax import nnx

from models import attention
from models import encoder
from models import layers
from models.encoder import Encoder, resolve, stack_layers, unstack_layers
from models.flops import flops_per_token

FAMILIES = ('roformer', 'roformer_v2', 'gau')
# model.position_embedding: rotary (every preset) or a learned absolute table
# (docs/algorithms.md 7.6).
POSITION_EMBEDDINGS = ('rope', 'learned')

__all__ = [
  'build',
  'validate',
  'flops_per_token',
  'Encoder',
  'resolve',
  'stack_layers',
  'unstack_layers',
  'FAMILIES',
]


def _choice(name: str, value, choices) -> None:
  if value not in choices:
    options = ', '.join(map(repr, choices))
    raise ValueError(f'{name}={value!r} is not supported; choose one of {options}')


def validate(config) -> None:
  """Checks config.model (and config.objective) and raises ValueError with a one-line fix."""
  m = config.model
  _choice('model.family', m.family, FAMILIES)
  _choice('objective', config.objective, ('mlm', 'clm'))
  for name in ('vocab_size', 'hidden_size', 'num_layers'):
    if m[name] <= 0:
      raise ValueError(f'model.{name}={m[name]} must be positive; set --config.model.{name} > 0')
  if m.family == 'gau':
    # RoPE rotates pairs of features; learned absolute positions take any width.
    if m.shared_dim <= 0 or (m.shared_dim % 2 and m.position_embedding == 'rope'):
      raise ValueError(
        f'model.shared_dim={m.shared_dim} must be a positive even number '
        '(RoPE rotates pairs); choose an even shared_dim such as 128'
      )
    if m.expansion_factor <= 0:
      raise ValueError(
        f'model.expansion_factor={m.expansion_factor} must be positive; use 2 (e = 2d)'
      )
    _choice('model.attention_norm', m.attention_norm, ('relu2', 'softmax', 'softmax_plus'))
    _choice('model.gau_activation', m.gau_activation, ('swish', 'relu'))
    if m.chunk_size < 0:
      raise ValueError(f'model.chunk_size={m.chunk_size} must be >= 0 (0 = plain GAU)')
  else:
    if m.num_heads <= 0:
      raise ValueError(f'model.num_heads={m.num_heads} must be positive')
    if m.head_dim == 0 and m.hidden_size % m.num_heads:
      raise ValueError(
        f'num_heads={m.num_heads} does not divide hidden_size={m.hidden_size}; choose '
        'num_heads so that hidden_size % num_heads == 0 (or set model.head_dim)'
      )
    head_dim = m.head_dim or m.hidden_size // m.num_heads
    if head_dim % 2 and m.position_embedding == 'rope':
      raise ValueError(
        f'head_dim={head_dim} is odd but RoPE rotates pairs of features; '
        'choose hidden_size, num_heads or model.head_dim so that head_dim is even'
      )
    if m.mlp_dim <= 0:
      raise ValueError(f'model.mlp_dim={m.mlp_dim} must be positive')
  _choice('model.mlp_activation', m.mlp_activation, tuple(layers.ACTIVATIONS))
  _choice('model.causal_normalizer', m.causal_normalizer, ('visible', 'n'))
  _choice('model.attention_scale', m.attention_scale, ('standard', 'entropy_invariant'))
  _choice('model.attention_impl', m.attention_impl, attention.ATTENTION_IMPLS)
  if m.attention_impl == 'splash':
    # The platform is only known when the step is traced (attention.use_splash); what the
    # config alone decides is refused here, before any compile.
    reason = attention.splash_blocker(
      family=m.family,
      seq_len=config.data.seq_len if 'data' in config else 0,
      dropout_rate=m.dropout_rate,
    )
    if reason:
      raise ValueError(f"model.attention_impl='splash': {reason}")
  _choice('model.position_embedding', m.position_embedding, POSITION_EMBEDDINGS)
  if m.position_embedding == 'learned':
    if m.max_position <= 0:
      raise ValueError(
        f'model.max_position={m.max_position} must be positive with '
        "model.position_embedding='learned' (rows of the position table)"
      )
    seq_len = config.data.seq_len if 'data' in config else 0
    if seq_len > m.max_position:
      raise ValueError(
        f'data.seq_len={seq_len} > model.max_position={m.max_position}: the learned '
        f'position table has no row for positions >= {m.max_position}; set '
        f'--config.model.max_position >= {seq_len} (a new run) or a shorter seq_len'
      )
  _choice('model.residual', m.residual, ('post_ln', 'deepnorm'))
  _choice('model.init', m.init, ('normal', 'roformer_v2', 'gau_alpha'))
  _choice('model.remat_policy', m.remat_policy, encoder.REMAT_POLICIES)
  if m.get('scan_unroll', 0) < 0:
    raise ValueError(
      f'model.scan_unroll={m.scan_unroll} must be >= 0 (0 = auto, k = layers per iteration)'
    )
  _choice('model.norm_type', m.norm_type, ('layernorm', 'rmsnorm', 'rmsnorm_noparam'))
  for name in ('dtype', 'param_dtype'):
    _choice(f'model.{name}', m[name], ('float32', 'bfloat16', 'float16'))
  if not 0.0 <= m.dropout_rate < 1.0:
    raise ValueError(f'model.dropout_rate={m.dropout_rate} must be in [0, 1)')


def build(config, *, rngs: nnx.Rngs) -> Encoder:
  """Builds the model for config (full ConfigDict: config.model and config.objective).

  Under `jax.set_mesh(mesh)` and `nnx.logical_axis_rules(rules)` the parameters are created
  sharded (eager sharding); without a mesh they are plain single-device arrays.
  """
  validate(config)
  return Encoder(resolve(config), rngs=rngs)
