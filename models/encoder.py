"""The encoder model shared by every family: embeddings -> L blocks -> LM head.

  logits = model(tokens, segment_ids, positions, prediction_positions=None, dropout_rng=None)

tokens, segment_ids, positions: int32 [b, n]. segment_ids 0 = padding, 1..k = packed
documents; attention never crosses segments (nor reaches padding); objective 'clm' adds j <= i.
positions restart at 0 in every segment and drive RoPE (model.position_embedding='rope', the
default) or index a learned absolute table ('learned': BERT-style, rotary off;
docs/algorithms.md 7.6).
prediction_positions [b, P] (MLM): the final hidden states are gathered there before the head,
so logits are [b, P, V]; None: logits for every position [b, n, V]. Logits are float32.
dropout_rng: a PRNG key (training) or None (deterministic). Dropout keys are derived from it
(split per layer and scanned), so the model holds no RNG state and `nnx.split` / `nnx.merge`
inside a jitted pure step is safe.

Parameter layout (scan_layers=True: every layers/... leaf has a leading L axis with logical
name 'layers'; scan_layers=False: `layers` is a list, layers/<i>/... without the L axis;
`stack_layers` / `unstack_layers` convert pure dicts between the two):

  embedder/token/embedding                [V, d]         ('vocab', 'embed')   (tied LM head)
  embedder/token_type/embedding           [T, d]         (None, 'embed')      if T > 0
  embedder/position/embedding             [P, d]         (None, 'embed')      'learned' only
  embedder/norm/{scale,bias}              [d]            ('embed',)           v1 (LayerNorm)
  RoFormer v1 / v2 / DeepNet block:
  layers/attention/{query,key,value}/kernel [L, d, h, d_h] ('layers', 'embed', 'heads', 'kv')
  layers/attention/{query,key,value}/bias   [L, h, d_h]    ('layers', 'heads', 'kv')     v1
  layers/attention/out/kernel             [L, h, d_h, d] ('layers', 'heads', 'kv', 'embed')
  layers/attention/out/bias               [L, d]         ('layers', 'embed')           v1
  layers/attention_norm/{scale,bias}      [L, d]         ('layers', 'embed')           v1
  layers/mlp/wi/kernel, bias              [L, d, F], [L, F]   ('layers', 'embed', 'mlp')
  layers/mlp/wo/kernel, bias              [L, F, d], [L, d]   ('layers', 'mlp', 'embed')
  layers/mlp_norm/{scale,bias}            [L, d]         ('layers', 'embed')           v1
  GAU block (models/gau.py):
  layers/uvz/kernel, bias                 [L, d, 2e+s]   ('layers', 'embed', 'mlp')
  layers/qk/scale, bias                   [L, k, s]      ('layers', None, 'kv')  k = 2 or 4
  layers/out/kernel, bias                 [L, e, d]      ('layers', 'mlp', 'embed')
  head/transform/{kernel,bias}            [d, d], [d]    ('embed', 'mlp')              v1
  head/norm/{scale,bias}                  [d]            ('embed',)                    v1
  head/bias                               [V]            ('vocab',)                    v1

v2 and GAU (bias-free, parameter-free RMSNorm by default) have no bias and no norm leaves.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from models import attention
from models import layers
from models import rope

REMAT_POLICIES = ('none', 'full', 'dots_with_no_batch_dims')


@dataclasses.dataclass(frozen=True)
class ArchSpec:
  """Hyper-parameters resolved from config.model (+ family defaults). See resolve()."""

  family: str
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  head_dim: int
  mlp_dim: int
  type_vocab_size: int
  dropout_rate: float
  rotary_base: float
  position_embedding: str
  max_position: int
  attention_scale: str
  norm_eps: float
  norm_type: str
  use_bias: bool
  residual: str
  residual_alpha: float
  kernel_init: Any
  dtype: Any
  param_dtype: Any
  remat_policy: str
  scan_layers: bool
  scan_unroll: int
  causal: bool
  head_transform: bool
  head_bias: bool
  mlp_activation: str
  embed_dropout_first: bool
  causal_normalizer: str
  # GAU / FLASH
  expansion_factor: int
  shared_dim: int
  attention_norm: str
  chunk_size: int
  gau_activation: str
  # model.attention_impl: 'auto', 'xla' or 'splash' (attention.use_splash)
  attention_impl: str = 'auto'

  @property
  def rope_dim(self) -> int:
    return self.shared_dim if self.family == 'gau' else self.head_dim


def deepnorm_constants(model_cfg) -> tuple[float, float]:
  """Encoder-only DeepNorm (alpha, beta) = ((2N)^(1/4), (8N)^(-1/4)) unless set
  (docs/algorithms.md 5.1)."""
  n = model_cfg.num_layers
  alpha = model_cfg.deepnorm_alpha if model_cfg.deepnorm_alpha > 0 else (2.0 * n) ** 0.25
  beta = model_cfg.deepnorm_beta if model_cfg.deepnorm_beta > 0 else (8.0 * n) ** -0.25
  return float(alpha), float(beta)


def resolve(config) -> ArchSpec:
  """config (full ConfigDict) -> ArchSpec. Call models.validate(config) first for clear errors."""
  m = config.model
  family = m.family
  v1 = family == 'roformer'
  head_dim = m.head_dim or m.hidden_size // m.num_heads
  use_bias = bool(m.use_bias)
  if m.residual == 'deepnorm':
    alpha, beta = deepnorm_constants(m)
  elif m.residual == 'post_ln':
    alpha, beta = 1.0, None
  else:
    raise ValueError(f'unknown model.residual={m.residual!r}; choose post_ln or deepnorm')
  return ArchSpec(
    family=family,
    vocab_size=m.vocab_size,
    hidden_size=m.hidden_size,
    num_layers=m.num_layers,
    num_heads=m.num_heads,
    head_dim=head_dim,
    mlp_dim=m.mlp_dim,
    type_vocab_size=m.type_vocab_size,
    dropout_rate=float(m.dropout_rate),
    rotary_base=float(m.rotary_base),
    position_embedding=m.position_embedding,
    max_position=int(m.max_position),
    attention_scale=m.attention_scale,
    norm_eps=float(m.norm_eps),
    norm_type=m.norm_type,
    use_bias=use_bias,
    residual=m.residual,
    residual_alpha=alpha,
    kernel_init=layers.KernelInit(m.init, m.initializer_range, m.num_layers, beta),
    dtype=layers.as_dtype(m.dtype),
    param_dtype=layers.as_dtype(m.param_dtype),
    remat_policy=m.remat_policy,
    scan_layers=bool(m.scan_layers),
    scan_unroll=int(m.get('scan_unroll', 0)),
    causal=config.objective == 'clm',
    head_transform=v1,
    head_bias=use_bias,
    expansion_factor=int(m.expansion_factor),
    shared_dim=int(m.shared_dim),
    attention_norm=m.attention_norm,
    chunk_size=int(m.chunk_size),
    gau_activation=m.gau_activation,
    mlp_activation=m.mlp_activation,
    embed_dropout_first=not v1,
    causal_normalizer=m.causal_normalizer,
    attention_impl=m.attention_impl,
  )


def block_class(spec: ArchSpec):
  if spec.family == 'gau':
    from models import gau  # pylint: disable=g-import-not-at-top

    return gau.GAUBlock
  from models import transformer  # pylint: disable=g-import-not-at-top

  return transformer.TransformerBlock


class Embedder(nnx.Module):
  """Token (+ learned absolute position) (+ token type 0) embeddings, then Norm -> Dropout (v1,
  as Hugging Face's RoFormerEmbeddings) or Dropout -> Norm (v2 and GAU-alpha, as bert4keras'
  RoFormerV2 and GAU_alpha build their embeddings; docs/algorithms.md 7.2, 6.3).

  model.position_embedding='learned' adds `position` [max_position, d] (BERT's
  position_embeddings, Devlin et al. 2019; docs/algorithms.md 7.6) at the batch's positions,
  which restart at 0 in every packed document. 'rope' has no table (RoPE acts in attention).
  """

  def __init__(self, spec: ArchSpec, *, rngs: nnx.Rngs):
    common = dict(dtype=spec.dtype, param_dtype=spec.param_dtype, rngs=rngs)
    d = spec.hidden_size
    init = spec.kernel_init('embed', (spec.vocab_size,), (d,))
    self.token = layers.Embed(spec.vocab_size, d, init=init, vocab_axis='vocab', **common)
    if spec.position_embedding == 'learned':
      pinit = spec.kernel_init('embed', (spec.max_position,), (d,))
      self.position = layers.Embed(spec.max_position, d, init=pinit, vocab_axis=None, **common)
    else:
      self.position = None
    if spec.type_vocab_size > 0:
      tinit = spec.kernel_init('embed', (spec.type_vocab_size,), (d,))
      self.token_type = layers.Embed(spec.type_vocab_size, d, init=tinit, vocab_axis=None, **common)
    else:
      self.token_type = None
    self.norm = layers.make_norm(spec.norm_type, d, eps=spec.norm_eps, **common)
    self.dropout_rate = spec.dropout_rate
    self.dropout_first = spec.embed_dropout_first

  def __call__(self, tokens, dropout_rng=None, token_types=None, positions=None):
    """tokens (and positions, token_types) int32 [b, n] -> [b, n, d] (compute dtype).

    dropout_rng: a PRNG key (training) or None (no dropout).
    positions: needed with a learned table (ValueError otherwise), ignored with RoPE. A
    position outside [0, max_position) gives NaN rows (jnp.take's fill); models.validate
    refuses data.seq_len > model.max_position before that can happen.
    """
    x = self.token(tokens)
    if self.position is not None:
      if positions is None:
        raise ValueError("model.position_embedding='learned' needs the batch's positions")
      x = x + self.position(positions)
    if self.token_type is not None:
      if token_types is None:  # pretraining: every token has type 0
        x = x + self.token_type.embedding[0].astype(x.dtype)
      else:  # sentence pairs (fine-tuning): type 0 for the first text, 1 for the second
        x = x + self.token_type(token_types)
    if self.dropout_first:
      return self.norm(layers.dropout(x, self.dropout_rate, dropout_rng))
    return layers.dropout(self.norm(x), self.dropout_rate, dropout_rng)


class LMHead(nnx.Module):
  """v1: Dense(d, d) -> act -> LayerNorm -> tied E^T + bias (act = model.mlp_activation, as
  Hugging Face's hidden_act drives both). v2/GAU: dropout -> tied E^T."""

  def __init__(self, spec: ArchSpec, *, rngs: nnx.Rngs):
    common = dict(dtype=spec.dtype, param_dtype=spec.param_dtype, rngs=rngs)
    d = spec.hidden_size
    if spec.head_transform:
      self.transform = layers.Dense(
        (d,),
        (d,),
        in_axes=('embed',),
        out_axes=('mlp',),
        kernel_init=spec.kernel_init('head', (d,), (d,)),
        use_bias=spec.use_bias,
        **common,
      )
      self.norm = layers.make_norm(spec.norm_type, d, eps=spec.norm_eps, **common)
    else:
      self.transform = self.norm = None
    self.bias = (
      layers.make_param(rngs, layers.zeros_init, (spec.vocab_size,), spec.param_dtype, ('vocab',))
      if spec.head_bias
      else None
    )
    self.dropout_rate = 0.0 if spec.head_transform else spec.dropout_rate
    self.activation = spec.mlp_activation

  def __call__(self, x, embed: layers.Embed, dropout_rng=None):
    if self.transform is not None:
      # Constrained like every residual-stream activation: see gather_positions.
      x = layers.constrain(self.transform(x), ACTIVATION_AXES)
      x = self.norm(layers.activation(self.activation)(x))
    x = layers.dropout(x, self.dropout_rate, dropout_rng)
    logits = embed.attend(x)
    if self.bias is not None:
      logits = logits + self.bias[...].astype(jnp.float32)
    return logits


def _remat(fn, policy: str, prevent_cse: bool):
  """jax.checkpoint with the configured policy (docs/algorithms.md 8); identity for 'none'."""
  if policy == 'none':
    return fn
  if policy == 'full':
    return jax.checkpoint(fn, prevent_cse=prevent_cse)
  if policy == 'dots_with_no_batch_dims':
    return jax.checkpoint(
      fn, prevent_cse=prevent_cse, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    )
  raise ValueError(f'unknown model.remat_policy={policy!r}; choose one of {REMAT_POLICIES}')


def make_context(spec: ArchSpec, segment_ids, positions) -> attention.AttentionContext:
  """Per-call constants shared by all layers (see attention.AttentionContext): segment_ids,
  RoPE sin/cos [b, n, r/2] (None with model.position_embedding='learned': no rotation), and
  for quadratic attention the mask [b, n, n] and the softmax scale (None for FLASH). When
  model.attention_impl resolves to the splash kernel (attention.use_splash), no mask: the
  scale alone selects the kernel in every block.

  Raises:
    ValueError: model.attention_impl='splash' where the kernel cannot run (use_splash).
  """
  sin = cos = mask = scale = None
  if spec.position_embedding != 'learned':
    sin, cos = rope.sin_cos(positions, spec.rope_dim, spec.rotary_base)
  splash = attention.use_splash(
    spec.attention_impl,
    family=spec.family,
    seq_len=segment_ids.shape[-1],
    dropout_rate=spec.dropout_rate,
  )
  if splash:
    scale = attention.segment_attention_scale(
      spec.attention_scale, segment_ids, spec.causal, spec.rope_dim
    )
  elif not (spec.family == 'gau' and spec.chunk_size > 0):
    mask = attention.attention_mask(segment_ids, spec.causal)
    scale = attention.attention_scale(spec.attention_scale, mask, spec.rope_dim)
  return attention.AttentionContext(
    segment_ids=segment_ids, sin=sin, cos=cos, mask=mask, scale=scale
  )


ACTIVATION_AXES = ('batch', 'length', None)


def _block_fn(graphdef):
  """A pure function (block_state, x, ctx, dropout_rng) -> x for one block of this graphdef."""

  def apply(state, x, ctx, dropout_rng):
    y = nnx.merge(graphdef, state)(x, ctx, dropout_rng)
    return layers.constrain(y, ACTIVATION_AXES)

  return apply


class Encoder(nnx.Module):
  """The whole model; see the module docstring for the call and the parameter layout."""

  def __init__(self, spec: ArchSpec, *, rngs: nnx.Rngs):
    self.spec = nnx.static(spec) if hasattr(nnx, 'static') else spec
    self.embedder = Embedder(spec, rngs=rngs)
    block_cls = block_class(spec)
    if spec.scan_layers:

      @nnx.split_rngs(splits=spec.num_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
      def make_layers(rngs):
        return block_cls(spec, rngs=rngs)

      self.layers = make_layers(rngs)
    else:
      self.layers = nnx.List([block_cls(spec, rngs=rngs) for _ in range(spec.num_layers)])
    self.head = LMHead(spec, rngs=rngs)

  def context(self, segment_ids, positions) -> attention.AttentionContext:
    return make_context(self.spec, segment_ids, positions)

  def encode(self, tokens, segment_ids, positions, dropout_rng=None, token_types=None):
    """Final hidden states [b, n, d] (compute dtype). token_types: int32 [b, n] or None (all
    type 0); ignored when model.type_vocab_size is 0."""
    k_embed, k_layers = layers.split_key(dropout_rng, 2)
    x = layers.constrain(self.embedder(tokens, k_embed, token_types, positions), ACTIVATION_AXES)
    return self.run_layers(x, segment_ids, positions, k_layers)

  def run_layers(self, x, segment_ids, positions, dropout_rng=None):
    """The L blocks on embedded inputs x [b, n, d] (used by encode; handy for Jacobians)."""
    spec = self.spec
    ctx = self.context(segment_ids, positions)
    layer_keys = None if dropout_rng is None else jax.random.split(dropout_rng, spec.num_layers)
    # Blocks run as pure functions of their state (split / merge): remat and scan are then
    # plain jax.checkpoint / jax.lax.scan, parameter paths do not depend on them, and the
    # model works under any outer JAX transform (also grads w.r.t. inputs only).
    if spec.scan_layers:
      graphdef, state = nnx.split(self.layers)
      body = _remat(_block_fn(graphdef), spec.remat_policy, prevent_cse=False)

      def step(x, layer):
        layer_state, layer_rng = layer
        return body(layer_state, x, ctx, layer_rng), None

      x, _ = jax.lax.scan(step, x, (state, layer_keys), unroll=scan_unroll(spec))
    else:
      for i, block in enumerate(self.layers):
        graphdef, state = nnx.split(block)
        body = _remat(_block_fn(graphdef), spec.remat_policy, prevent_cse=True)
        x = body(state, x, ctx, None if layer_keys is None else layer_keys[i])
    return x

  def __call__(self, tokens, segment_ids, positions, prediction_positions=None, dropout_rng=None):
    k_enc, k_head = layers.split_key(dropout_rng, 2)
    x = self.encode(tokens, segment_ids, positions, k_enc)
    if prediction_positions is not None:
      x = gather_positions(x, prediction_positions)
    return self.head(x, self.embedder.token, k_head)


# Deepest stack that model.scan_unroll=0 unrolls fully on CPU (compile time grows with it).
AUTO_UNROLL_MAX_LAYERS = 12


def scan_unroll(spec: ArchSpec, platform: str | None = None) -> int:
  """Layers per iteration of the scanned stack for one trace (model.scan_unroll).

  k >= 1 is taken as given (k >= num_layers: no loop). 0 (auto): all layers, no loop, when the
  trace targets CPU (`attention.trace_platform`, or `platform`) and num_layers <=
  AUTO_UNROLL_MAX_LAYERS; else 1. On CPU the loop's stacked residuals (zero-filled buffers,
  then one dynamic-update-slice per layer) cost 6-7 % of a step at 4, 8 and 16 layers
  (docs/performance.md 3); on TPU the loop updates them in place and keeps compile time flat
  in depth. The parameter layout ([L, ...]) is the same either way.
  """
  if spec.scan_unroll > 0:
    return spec.scan_unroll
  platform = platform or attention.trace_platform()
  if platform == 'cpu' and spec.num_layers <= AUTO_UNROLL_MAX_LAYERS:
    return spec.num_layers
  return 1


def gather_positions(x: jax.Array, positions: jax.Array) -> jax.Array:
  """Rows of x at positions: x [b, n, d], positions int [b, P] -> [b, P, d] (x.dtype).

  Operand and result are constrained to ACTIVATION_AXES (batch split, features whole), so the
  gather and its transpose (a scatter-add) are row-local on every mesh. Left to choose, XLA
  picked layouts whose partitioning gave wrong gradients on a (2, 2, 2) mesh
  (benchmarks/repro/gather_grad_sharding.py). A position outside [0, n) is clamped.
  """
  x = layers.constrain(x, ACTIVATION_AXES)
  y = jnp.take_along_axis(x, positions[..., None].astype(jnp.int32), axis=1, mode='clip')
  return layers.constrain(y, ACTIVATION_AXES)


# ---------------------------------------------------------------- layout conversion


def stack_layers(params: dict) -> dict:
  """Pure param dict with layers as a list/dict {0: ..., 1: ...} -> stacked [L, ...] layout."""
  out = dict(params)
  items = params['layers']
  seq = [items[i] for i in sorted(items)] if isinstance(items, dict) else list(items)
  out['layers'] = jax.tree.map(lambda *xs: jnp.stack(xs), *seq)
  return out


def unstack_layers(params: dict) -> dict:
  """Stacked [L, ...] layout -> {0: ..., 1: ...} (the scan_layers=False pure dict)."""
  out = dict(params)
  stacked = params['layers']
  num = jax.tree.leaves(stacked)[0].shape[0]
  out['layers'] = {i: jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(num)}
  return out


def num_params(model) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
