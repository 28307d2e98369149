"""Masks, the entropy-invariant scale and multi-head softmax attention with RoPE.

Masking: query i may attend to key j iff segment_ids[i] == segment_ids[j] != 0 (and j <= i
for causal LM). Fully masked rows (padding queries) get a uniform distribution over a large
negative bias instead of NaN; their outputs are ignored downstream.

Scale (docs/algorithms.md 7.4): 'standard' 1/sqrt(d_h); 'entropy_invariant' log_512(n)/sqrt(d_h)
with n the
number of keys the query may attend to, clamped at n >= 16 (causal: visible keys of that query).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from models import layers
from models import rope

NEG_INF = -1e30
ENTROPY_MIN_KEYS = 16.0
ENTROPY_BASE_KEYS = 512.0


class AttentionContext(NamedTuple):
  """Per-call constants shared by every block (built once per call by
  `models.encoder.make_context`, passed to each block as its `ctx`).

  A NamedTuple, hence a pytree: it passes through jax.jit, jax.lax.scan and jax.checkpoint
  (remat) like any argument; a field that is None is an empty subtree (no leaf, not traced).
  b = batch, n = sequence length, r = the RoPE dimension (head_dim, or shared_dim for GAU).

  Attributes:
    segment_ids: int32 [b, n]; 0 = padding, 1..k = packed documents (FLASH's chunked
      attention masks from these directly).
    sin, cos: float32 [b, n, r/2], RoPE's sin / cos of position * theta_i; None with
      model.position_embedding='learned' (no rotation).
    mask: bool [b, n, n], `attention_mask` (same nonzero segment, and j <= i for causal LM);
      None for FLASH (GAU with chunk_size > 0), which does not use a quadratic mask.
    scale: float32 logit scale from `attention_scale`: a scalar [] ('standard') or [b, n, 1]
      per query ('entropy_invariant'); None whenever mask is None.
  """

  segment_ids: jax.Array
  sin: jax.Array | None = None
  cos: jax.Array | None = None
  mask: jax.Array | None = None
  scale: jax.Array | None = None


def attention_mask(segment_ids: jax.Array, causal: bool) -> jax.Array:
  """Boolean mask [b, n, n]: (i, j) allowed iff same nonzero segment (and j <= i if causal)."""
  seg = segment_ids
  mask = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0)
  if causal:
    n = seg.shape[-1]
    mask = mask & jnp.tril(jnp.ones((n, n), dtype=bool))[None]
  return mask


def entropy_invariant_factor(num_keys: jax.Array) -> jax.Array:
  """log_512(max(n, 16)) for key counts n (float32)."""
  n = jnp.maximum(num_keys.astype(jnp.float32), ENTROPY_MIN_KEYS)
  return jnp.log(n) / math.log(ENTROPY_BASE_KEYS)


def attention_scale(kind: str, mask: jax.Array, dim: int) -> jax.Array:
  """Logit scale: a scalar (standard) or [b, n, 1] per query (entropy_invariant)."""
  if kind == 'standard':
    return jnp.float32(1.0 / math.sqrt(dim))
  if kind == 'entropy_invariant':
    num_keys = mask.sum(-1, keepdims=True)
    return entropy_invariant_factor(num_keys) / math.sqrt(dim)
  raise ValueError(f'unknown attention scale {kind!r}; choose standard or entropy_invariant')


def dot_product_attention(q, k, v, mask, scale, *, dropout_rate=0.0, dropout_rng=None):
  """Softmax attention. q, k: [b, n, h, d_h]; v: [b, n, h, d_v]; mask [b, n, n];
  scale scalar or [b, n, 1]. Logits and softmax in float32; returns [b, n, h, d_v] in v.dtype.
  """
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
  if jnp.ndim(scale) == 3:
    scale = scale[:, None]  # [b, 1, n, 1]
  logits = logits * scale
  logits = jnp.where(mask[:, None], logits, NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1)
  probs = layers.dropout(probs, dropout_rate, dropout_rng)
  return jnp.einsum('bhqk,bkhd->bqhd', probs.astype(v.dtype), v)


class MultiHeadAttention(nnx.Module):
  """Multi-head softmax self-attention with RoPE on q and k (RoFormer, docs/algorithms.md 7.1).

  Params: query/key/value kernel [d, h, d_h] ('embed', 'heads', 'kv'), bias [h, d_h];
  out kernel [h, d_h, d] ('heads', 'kv', 'embed'), bias [d].
  """

  def __init__(
    self,
    hidden_size: int,
    num_heads: int,
    head_dim: int,
    *,
    use_bias: bool,
    kernel_init: layers.KernelInit,
    dropout_rate: float,
    scale_kind: str,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
  ):
    self.num_heads, self.head_dim = num_heads, head_dim
    self.dropout_rate, self.scale_kind = dropout_rate, scale_kind
    common = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    qkv = lambda role: layers.Dense(
      (hidden_size,),
      (num_heads, head_dim),
      in_axes=('embed',),
      out_axes=('heads', 'kv'),
      kernel_init=kernel_init(role, (hidden_size,), (num_heads, head_dim)),
      **common,
    )
    self.query, self.key, self.value = qkv('q'), qkv('k'), qkv('v')
    self.out = layers.Dense(
      (num_heads, head_dim),
      (hidden_size,),
      in_axes=('heads', 'kv'),
      out_axes=('embed',),
      kernel_init=kernel_init('o', (num_heads, head_dim), (hidden_size,)),
      **common,
    )

  def __call__(self, x, ctx: AttentionContext, dropout_rng=None):
    """x [b, n, d] -> [b, n, d]; ctx: its mask, scale and sin/cos (r = d_h) are used."""
    q = rope.apply_sin_cos(self.query(x), ctx.sin, ctx.cos)
    k = rope.apply_sin_cos(self.key(x), ctx.sin, ctx.cos)
    v = self.value(x)
    o = dot_product_attention(
      q, k, v, ctx.mask, ctx.scale, dropout_rate=self.dropout_rate, dropout_rng=dropout_rng
    )
    return self.out(o)
