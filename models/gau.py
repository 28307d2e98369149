"""Gated attention unit (GAU), FLASH mixed-chunk attention and GAU-alpha (SPEC 6).

One GAU layer on X [b, n, d] (post-norm, so X is the raw residual stream):

  U, V, Z = split(phi(X W_uvz + b), [e, e, s])        phi = swish (or relu, for GAU-7)
  Q = gamma_q * Z + beta_q,  K = gamma_k * Z + beta_k  (ScaleOffset; no beta when bias-free)
  Q, K <- RoPE over the s dims
  A = norm(Q K^T)                                      see `attention_weights`
  O = (U * (A V)) W_o + b_o
  X <- Norm(a * X + Dropout(O))

Attention normalisations (l = number of keys the query may attend to, padding-aware):
  'relu2'        relu(Q K^T / sqrt(s))^2 / l            (Su / bert4keras squared_relu)
  'softmax'      softmax(scale * Q K^T), scale from model.attention_scale (standard or
                 entropy-invariant, SPEC 7.4)
  'softmax_plus' softmax(log_512(max(l, 16)) * Q K^T / sqrt(s))   (GAU-alpha)

FLASH (model.chunk_size = c > 0, SPEC 6.2): four scale-offsets of Z give Q_quad, K_quad,
Q_lin, K_lin. The sequence is padded to a multiple of c (pads masked). Per chunk g:
  local  : norm(Q_quad,g K_quad,g^T) V_g within the chunk (segment- and causal-masked)
  global : non-causal Q_lin,g (sum_h K_lin,h^T V_h) / n_valid;
           causal Q_lin,g (sum_{h<g} K_lin,h^T V_h) / ((g-1) c)  (prefix sums over chunks;
           zero for g = 1; the divisor counts the summed non-pad tokens)
  O_g = (U_g * (local + global)) W_o.
Cost is linear in n. Limitation: the global (linear) part masks padding but does not separate
packed documents of one row (the local part does); for causal LM this only adds earlier
context, never future tokens.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from models import attention
from models import layers
from models import rope

NORMS = ('relu2', 'softmax', 'softmax_plus')


def attention_weights(qk: jax.Array, mask: jax.Array, norm: str, shared_dim: int,
                      scale_kind: str = 'standard') -> jax.Array:
  """A from raw scores qk = Q K^T [..., n_q, n_k] (float32) and a boolean mask of that shape."""
  num_keys = mask.sum(-1, keepdims=True).astype(jnp.float32)
  if norm == 'relu2':
    a = jnp.square(jax.nn.relu(qk / math.sqrt(shared_dim)))
    return jnp.where(mask, a, 0.0) / jnp.maximum(num_keys, 1.0)
  if norm == 'softmax_plus' or (norm == 'softmax' and scale_kind == 'entropy_invariant'):
    scale = attention.entropy_invariant_factor(num_keys) / math.sqrt(shared_dim)
  elif norm == 'softmax':
    scale = 1.0 / math.sqrt(shared_dim)
  else:
    raise ValueError(f'unknown model.attention_norm={norm!r}; choose one of {NORMS}')
  logits = jnp.where(mask, qk * scale, attention.NEG_INF)
  return jax.nn.softmax(logits, axis=-1)


def gau_attention(q, k, v, mask, *, norm: str, scale_kind: str = 'standard',
                  dropout_rate: float = 0.0, dropout_key=None) -> jax.Array:
  """Quadratic GAU attention A V. q, k [b, n, s]; v [b, n, e]; mask [b, n, n] -> [b, n, e]."""
  qk = jnp.einsum('bis,bjs->bij', q, k, preferred_element_type=jnp.float32)
  a = attention_weights(qk, mask, norm, q.shape[-1], scale_kind)
  a = layers.dropout(a, dropout_rate, dropout_key)
  return jnp.einsum('bij,bje->bie', a.astype(v.dtype), v)


def _pad_to(x: jax.Array, length: int, axis: int = 1) -> jax.Array:
  pad = length - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)


def mixed_chunk_attention(q_quad, k_quad, q_lin, k_lin, v, segment_ids, *, chunk_size: int,
                          causal: bool, norm: str, scale_kind: str = 'standard',
                          dropout_rate: float = 0.0, dropout_key=None) -> jax.Array:
  """FLASH local + global attention (see the module docstring).

  q_*, k_* [b, n, s]; v [b, n, e]; segment_ids [b, n] (0 = pad). Returns [b, n, e].
  """
  b, n, _ = q_quad.shape
  c = chunk_size
  num_chunks = -(-n // c)
  n_pad = num_chunks * c
  seg = _pad_to(segment_ids, n_pad)
  valid = seg != 0
  chunk = lambda x: _pad_to(x, n_pad).reshape((b, num_chunks, c) + x.shape[2:])
  qq, kq, ql, kl, vv = map(chunk, (q_quad, k_quad, q_lin, k_lin, v))
  seg_c = seg.reshape(b, num_chunks, c)

  # Local quadratic attention inside each chunk.
  local_mask = (seg_c[..., :, None] == seg_c[..., None, :]) & (seg_c[..., :, None] != 0)
  if causal:
    local_mask = local_mask & jnp.tril(jnp.ones((c, c), bool))
  qk = jnp.einsum('bgis,bgjs->bgij', qq, kq, preferred_element_type=jnp.float32)
  a = attention_weights(qk, local_mask, norm, q_quad.shape[-1], scale_kind)
  a = layers.dropout(a, dropout_rate, dropout_key)
  local = jnp.einsum('bgij,bgje->bgie', a.astype(vv.dtype), vv)

  # Global linear attention over chunks (pads contribute nothing).
  kl = kl * valid.reshape(b, num_chunks, c, 1).astype(kl.dtype)
  kv = jnp.einsum('bgjs,bgje->bgse', kl, vv, preferred_element_type=jnp.float32)
  counts = valid.reshape(b, num_chunks, c).sum(-1).astype(jnp.float32)  # [b, G]
  if causal:
    kv = jnp.cumsum(kv, axis=1) - kv  # exclusive prefix sum: chunks h < g
    denom = jnp.cumsum(counts, axis=1) - counts
  else:
    kv = jnp.broadcast_to(kv.sum(1, keepdims=True), kv.shape)
    denom = jnp.broadcast_to(counts.sum(1, keepdims=True), counts.shape)
  glob = jnp.einsum('bgis,bgse->bgie', ql.astype(jnp.float32), kv)
  glob = glob / jnp.maximum(denom, 1.0)[..., None, None]
  out = local.astype(jnp.float32) + glob
  return out.reshape(b, n_pad, -1)[:, :n].astype(v.dtype)


class ScaleOffset(nnx.Module):
  """Per-dimension scale and offset of Z, one row per derived tensor: scale/bias [k, s]."""

  def __init__(self, num: int, features: int, *, use_bias: bool, param_dtype, rngs):
    self.scale = layers.make_param(rngs, layers.ones_init, (num, features), param_dtype,
                                   (None, 'kv'))
    self.bias = (layers.make_param(rngs, layers.zeros_init, (num, features), param_dtype,
                                   (None, 'kv')) if use_bias else None)

  def __call__(self, z: jax.Array) -> list[jax.Array]:
    out = z[..., None, :] * self.scale[...].astype(z.dtype)
    if self.bias is not None:
      out = out + self.bias[...].astype(z.dtype)
    return [out[..., i, :] for i in range(out.shape[-2])]


class GAUBlock(nnx.Module):
  """One post-norm GAU layer (FLASH when chunk_size > 0). Params:

    uvz/{kernel [d, 2e+s] ('embed', 'mlp'), bias}  fused U, V, Z projection, split [e, e, s]
    qk/{scale, bias} [k, s]                         k = 2 (GAU: q, k) or 4 (FLASH: q_quad,
                                                    k_quad, q_lin, k_lin)
    out/{kernel [e, d] ('mlp', 'embed'), bias}
    norm/...                                        the post-norm (absent if parameter-free)
  """

  def __init__(self, spec, *, rngs: nnx.Rngs):
    d, s = spec.hidden, spec.shared_dim
    e = spec.expansion * d
    self.e, self.s = e, s
    self.norm_kind, self.scale_kind = spec.attention_norm, spec.attention_scale
    self.chunk_size, self.causal = spec.chunk_size, spec.causal
    self.dropout_rate, self.alpha = spec.dropout_rate, spec.residual_alpha
    self.activation = spec.gau_activation
    common = dict(dtype=spec.dtype, param_dtype=spec.param_dtype, rngs=rngs)
    self.uvz = layers.Dense((d,), (2 * e + s,), in_axes=('embed',), out_axes=('mlp',),
                            kernel_init=spec.kernel_init('gau_in', (d,), (2 * e + s,)),
                            use_bias=spec.use_bias, **common)
    self.qk = ScaleOffset(4 if spec.chunk_size > 0 else 2, s, use_bias=spec.use_bias,
                          param_dtype=spec.param_dtype, rngs=rngs)
    self.out = layers.Dense((e,), (d,), in_axes=('mlp',), out_axes=('embed',),
                            kernel_init=spec.kernel_init('gau_out', (e,), (d,)),
                            use_bias=spec.use_bias, **common)
    self.norm = layers.make_norm(spec.norm, d, eps=spec.norm_eps, **common)

  def projections(self, x):
    """U [b, n, e], V [b, n, e], Z [b, n, s] (activation applied)."""
    h = self.uvz(x)
    h = jax.nn.relu(h) if self.activation == 'relu' else jax.nn.silu(h)
    return h[..., :self.e], h[..., self.e:2 * self.e], h[..., 2 * self.e:]

  def mix(self, x, ctx, key=None):
    """The GAU branch O [b, n, d] (before dropout, residual and norm)."""
    u, v, z = self.projections(x)
    rot = lambda t: rope.apply_sin_cos(t, ctx['sin'], ctx['cos'], head_axis=False)
    qks = [rot(t) for t in self.qk(z)]
    if self.chunk_size > 0:
      q_quad, k_quad, q_lin, k_lin = qks
      av = mixed_chunk_attention(
          q_quad, k_quad, q_lin, k_lin, v, ctx['segment_ids'], chunk_size=self.chunk_size,
          causal=self.causal, norm=self.norm_kind, scale_kind=self.scale_kind,
          dropout_rate=self.dropout_rate, dropout_key=key)
    else:
      q, k = qks
      av = gau_attention(q, k, v, ctx['mask'], norm=self.norm_kind, scale_kind=self.scale_kind,
                         dropout_rate=self.dropout_rate, dropout_key=key)
    return self.out(u * av.astype(u.dtype))

  def __call__(self, x, ctx, key=None):
    k_att, k_res = layers.split_key(key, 2)
    y = layers.dropout(self.mix(x, ctx, k_att), self.dropout_rate, k_res)
    return self.norm(x * self.alpha + y if self.alpha != 1.0 else x + y)
