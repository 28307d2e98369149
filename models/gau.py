"""Gated attention unit (GAU), FLASH mixed-chunk attention and GAU-alpha (docs/algorithms.md 6).

One GAU layer on X [b, n, d] (post-norm, so X is the raw residual stream):

  U, V, Z = split(phi(X W_uvz + b), [e, e, s])        phi = swish (or relu, for GAU-7)
  Q = gamma_q * Z + beta_q,  K = gamma_k * Z + beta_k  (ScaleOffset; no beta when bias-free)
  Q, K <- RoPE over the s dims
  A = norm(Q K^T)                                      see `attention_weights`
  O = (U * (A V)) W_o + b_o
  X <- Norm(a * X + Dropout(O))

Attention normalisations (l = number of keys the query may attend to, padding-aware):
  'relu2'        relu(Q K^T / sqrt(s))^2 / l            (Su / bert4keras squared_relu)
                 causal LM, model.causal_normalizer: 'visible' (default) l = keys j <= i of
                 the query's document, as bert4keras 0.11.5 computes it (its boolean causal
                 mask is summed into l); 'n' l = all keys of the document, the fixed
                 normaliser of the FLASH paper's pseudo-code (Hua et al. 2022;
                 docs/algorithms.md 6.1)
  'softmax'      softmax(scale * Q K^T), scale from model.attention_scale (standard or
                 entropy-invariant, docs/algorithms.md 7.4)
  'softmax_plus' softmax(log_512(max(l, 16)) * Q K^T / sqrt(s))   (GAU-alpha)

FLASH (model.chunk_size = c > 0, docs/algorithms.md 6.2): four scale-offsets of Z give Q_quad,
K_quad,
Q_lin, K_lin. The sequence is padded to a multiple of c (pads masked). Per chunk g:
  local  : norm(Q_quad,g K_quad,g^T) V_g within the chunk (segment- and causal-masked)
  global : non-causal Q_lin,g (sum_{j in doc} K_lin,j^T V_j) / |doc|;
           causal Q_lin,g (sum_{j in doc, chunk(j) < g} K_lin,j^T V_j) / (their count)
           (prefix sums over chunks; zero in the document's first chunk)
  O_g = (U_g * (local + global)) W_o.
Both parts stay inside the query's packed document (`mixed_chunk_attention`); cost is linear
in n.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from models import attention
from models import layers
from models import rope

NORMS = ('relu2', 'softmax', 'softmax_plus')


def attention_weights(
  qk: jax.Array,
  mask: jax.Array,
  norm: str,
  shared_dim: int,
  scale_kind: str = 'standard',
  relu2_divisor: jax.Array | None = None,
) -> jax.Array:
  """A from raw scores qk = Q K^T [..., n_q, n_k] (float32) and a boolean mask of that shape.

  relu2_divisor [..., n_q, 1]: the l of relu2 (default: the keys the mask lets each query
  see); see `relu2_divisor` for the causal choice.
  """
  num_keys = mask.sum(-1, keepdims=True).astype(jnp.float32)
  if norm == 'relu2':
    a = jnp.square(jax.nn.relu(qk / math.sqrt(shared_dim)))
    divisor = num_keys if relu2_divisor is None else relu2_divisor.astype(jnp.float32)
    return jnp.where(mask, a, 0.0) / jnp.maximum(divisor, 1.0)
  if norm == 'softmax_plus' or (norm == 'softmax' and scale_kind == 'entropy_invariant'):
    scale = attention.entropy_invariant_factor(num_keys) / math.sqrt(shared_dim)
  elif norm == 'softmax':
    scale = 1.0 / math.sqrt(shared_dim)
  else:
    raise ValueError(f'unknown model.attention_norm={norm!r}; choose one of {NORMS}')
  logits = jnp.where(mask, qk * scale, attention.NEG_INF)
  return jax.nn.softmax(logits, axis=-1)


def gau_attention(
  q,
  k,
  v,
  mask,
  *,
  norm: str,
  scale_kind: str = 'standard',
  relu2_divisor: jax.Array | None = None,
  dropout_rate: float = 0.0,
  dropout_rng=None,
) -> jax.Array:
  """Quadratic GAU attention A V. q, k [b, n, s]; v [b, n, e]; mask [b, n, n] -> [b, n, e]."""
  qk = jnp.einsum('bis,bjs->bij', q, k, preferred_element_type=jnp.float32)
  a = attention_weights(qk, mask, norm, q.shape[-1], scale_kind, relu2_divisor)
  a = layers.dropout(a, dropout_rate, dropout_rng)
  return jnp.einsum('bij,bje->bie', a.astype(v.dtype), v)


def _pad_to(x: jax.Array, length: int, axis: int = 1) -> jax.Array:
  pad = length - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)


def run_bounds(segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """First and last index of the run of equal segment ids each token lies in.

  segment_ids [b, n] -> (start, end) int32 [b, n], end inclusive. Packing writes every
  document as one contiguous run, so a run is a document (padding, id 0, forms runs too).
  """
  n = segment_ids.shape[1]
  t = jnp.arange(n, dtype=jnp.int32)[None]
  change = segment_ids[:, 1:] != segment_ids[:, :-1]
  first = jnp.concatenate([jnp.ones_like(change[:, :1]), change], axis=1)
  last = jnp.concatenate([change, jnp.ones_like(change[:, :1])], axis=1)
  start = jax.lax.cummax(jnp.where(first, t, 0), axis=1)
  end = jax.lax.cummin(jnp.where(last, t, n - 1), axis=1, reverse=True)
  return start, end


def _take_chunks(x: jax.Array, index: jax.Array) -> jax.Array:
  """x [b, G', ...] indexed on axis 1 by index [b, G] -> [b, G, ...]."""
  index = index.reshape(index.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1, mode='clip')


def _global_per_document(ql, kl, vv, seg, valid, c: int, causal: bool) -> jax.Array:
  """FLASH's linear part within each packed document (see mixed_chunk_attention), float32.

  ql, kl [b, G, c, s]; vv [b, G, c, e]; seg, valid [b, G c] (pads contribute nothing).
  Returns [b, G, c, e].
  """
  b, num_chunks = ql.shape[:2]
  f32 = jnp.float32
  start, end = run_bounds(seg)
  start_c, end_c = start.reshape(b, num_chunks, c), end.reshape(b, num_chunks, c)
  chunk_first = start_c[..., 0]  # [b, G] run start
  kl = (kl * valid.reshape(b, num_chunks, c, 1).astype(kl.dtype)).astype(f32)
  vv32, ql32 = vv.astype(f32), ql.astype(f32)
  sums = jnp.einsum('bgjs,bgje->bgse', kl, vv32)  # F_h
  zero = jnp.zeros_like(sums[:, :1])
  prefix = jnp.concatenate([zero, jnp.cumsum(sums, axis=1)], axis=1)  # [b, G + 1, s, e]
  kl_x = jnp.concatenate([kl, jnp.zeros_like(kl[:, :1])], axis=1)  # a zero chunk G
  vv_x = jnp.concatenate([vv32, jnp.zeros_like(vv32[:, :1])], axis=1)
  offsets = jnp.arange(c, dtype=jnp.int32)

  def prefix_at(t):
    """sum_{j < t} k_j v_j^T for token indices t [b, G] in [0, n_pad]: [b, G, s, e]."""
    h, r = t // c, t % c
    below = (offsets[None, None] < r[..., None]).astype(f32)  # [b, G, c]
    partial = jnp.einsum('bgjs,bgj,bgje->bgse', _take_chunks(kl_x, h), below, _take_chunks(vv_x, h))
    return _take_chunks(prefix, h) + partial

  chunk_start = jnp.arange(num_chunks, dtype=jnp.int32)[None] * c  # [1, G]
  before = prefix[:, :-1] - prefix_at(chunk_first)  # B_g
  first_doc = (start_c == chunk_first[..., None]).astype(f32)  # [b, G, c]
  glob = first_doc[..., None] * jnp.einsum('bgis,bgse->bgie', ql32, before)
  if causal:
    count = (chunk_start - chunk_first).astype(f32)[..., None, None]
  else:
    after = prefix_at(end_c[..., -1] + 1) - prefix[:, 1:]  # A_g
    last_doc = (end_c == end_c[..., -1:]).astype(f32)
    same_run = (start_c[..., :, None] == start_c[..., None, :]).astype(f32)
    inside = jnp.einsum('bgis,bgjs->bgij', ql32, kl) * same_run
    glob = (
      glob
      + jnp.einsum('bgij,bgje->bgie', inside, vv32)
      + last_doc[..., None] * jnp.einsum('bgis,bgse->bgie', ql32, after)
    )
    count = (end_c - start_c + 1).astype(f32)[..., None]
  return glob / jnp.maximum(count, 1.0)


def _global_one_document(ql, kl, vv, seg, valid, c: int, causal: bool) -> jax.Array:
  """`_global_per_document` when no row holds more than one document (padding aside): the
  original FLASH global part, without the per-document boundary corrections. Same arguments
  and result (pad queries get zero)."""
  if not causal:
    return _global_one_document_non_causal(ql, kl, vv, valid)[0]
  b, num_chunks = ql.shape[:2]
  f32 = jnp.float32
  valid_c = valid.reshape(b, num_chunks, c, 1).astype(f32)
  sums = jnp.einsum('bgjs,bgje->bgse', kl.astype(f32) * valid_c, vv.astype(f32))
  before = jnp.cumsum(sums, axis=1) - sums  # keys of the chunks before g
  glob = jnp.einsum('bgis,bgse->bgie', ql.astype(f32), before)
  t = jnp.arange(seg.shape[1], dtype=jnp.int32)[None]
  start = jnp.min(jnp.where(valid, t, seg.shape[1]), axis=1)  # the document's first token
  chunk_start = jnp.arange(num_chunks, dtype=jnp.int32)[None] * c
  count = (chunk_start - start[:, None]).astype(f32)[..., None, None]
  return glob * (valid_c / jnp.maximum(count, 1.0))


def _global_one_document_non_causal(ql, kl, vv, valid):
  """The non-causal `_global_one_document` (ql, kl [b, G, c, s]; vv [b, G, c, e]; valid
  [b, G c]) and its key-value sum: ([b, G, c, e], [b, s, e]), float32.

  Both contractions run over the tokens [b, n, .], one contracting axis, not the chunks' two
  (g, j): XLA on CPU copied the operands into a transposed layout for the two-axis
  contraction (this part's forward and backward at n = 4096: 20 -> 12 ms a layer; the same
  values).
  """
  f32 = jnp.float32
  total = _one_document_total(kl.astype(f32), vv.astype(f32), valid)
  return _one_document_read(ql.astype(f32), total, valid), total


def _one_document_total(kl, vv, valid) -> jax.Array:
  """sum_j k_j v_j^T over the valid tokens: kl [b, G, c, s], vv [b, G, c, e] -> [b, s, e]."""
  tokens = lambda x: x.reshape(x.shape[0], -1, x.shape[-1])
  return jnp.einsum('bns,bne->bse', tokens(kl) * valid[..., None].astype(kl.dtype), tokens(vv))


def _one_document_read(ql, total, valid) -> jax.Array:
  """q_i total / |D| for each valid query (zero at pads): ql [b, G, c, s], total [b, s, e],
  valid [b, G c] -> [b, G, c, e]."""
  glob = jnp.einsum('bns,bse->bne', ql.reshape(ql.shape[0], -1, ql.shape[-1]), total)
  weight = valid.astype(glob.dtype) / jnp.maximum(valid.sum(1, keepdims=True), 1)
  return (glob * weight[..., None]).reshape(ql.shape[:3] + (-1,))


def one_document_per_row(segment_ids: jax.Array) -> jax.Array:
  """A traced bool scalar: every row of segment_ids [b, n] holds at most one document (one run
  of a nonzero id; padding aside). Decides FLASH's global part on device, without a host sync."""
  first = jnp.concatenate(
    [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
  )
  return jnp.all(jnp.sum(first & (segment_ids != 0), axis=1) <= 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _global_part(ql, kl, vv, seg, valid, c: int, causal: bool) -> jax.Array:
  """FLASH's global part: `_global_one_document` when no row holds more than one document,
  else `_global_per_document` (same arguments and result), chosen on device by a lax.cond.

  Differentiated by hand (`_global_part_bwd`): JAX's own derivative of a cond makes the
  forward pass write the residuals of both branches (zeros for the branch not taken, the
  general branch's [b, G, c, c] and [b, G, s, e] tensors among them), about 10 ms a layer of a
  FLASH step at n = 4096 on CPU; here the residuals are the inputs, the branch taken and,
  for the non-causal one-document branch, its key-value sum [b, s, e] (so the backward pass
  does not contract over the n tokens again to recompute it); the backward pass recomputes
  the general branch inside its own cond.
  """
  return _global_part_fwd(ql, kl, vv, seg, valid, c, causal)[0]


def _global_part_fwd(ql, kl, vv, seg, valid, c, causal):
  def one_document(ql, kl, vv, seg, valid):
    if causal:
      return _global_one_document(ql, kl, vv, seg, valid, c, causal), _no_total(kl, vv)
    return _global_one_document_non_causal(ql, kl, vv, valid)

  def per_document(ql, kl, vv, seg, valid):
    return _global_per_document(ql, kl, vv, seg, valid, c, causal), _no_total(kl, vv)

  one_doc = one_document_per_row(seg)
  glob, total = jax.lax.cond(one_doc, one_document, per_document, ql, kl, vv, seg, valid)
  return glob, (ql, kl, vv, seg, valid, one_doc, total)


def _no_total(kl, vv) -> jax.Array:
  """The [b, s, e] float32 zeros a branch without a key-value sum residual returns."""
  return jnp.zeros((kl.shape[0], kl.shape[-1], vv.shape[-1]), jnp.float32)


def _global_part_bwd(c, causal, residuals, g):
  ql, kl, vv, seg, valid, one_doc, total = residuals

  def branch_vjp(global_fn):
    def vjp(ql, kl, vv, total, g):
      f = lambda ql, kl, vv: global_fn(ql, kl, vv, seg, valid, c, causal)
      return jax.vjp(f, ql, kl, vv)[1](g)

    return vjp

  def one_document_vjp(ql, kl, vv, total, g):
    """The non-causal one-document branch's gradients from its residual key-value sum: the
    read's vjp at (ql, total), then the sum's, which needs no forward value."""
    f32 = jnp.float32
    read = lambda ql, total: _one_document_read(ql, total, valid)
    d_ql, d_total = jax.vjp(read, ql.astype(f32), total)[1](g)
    total_of = lambda kl, vv: _one_document_total(kl, vv, valid)
    d_kl, d_vv = jax.vjp(total_of, kl.astype(f32), vv.astype(f32))[1](d_total)
    return d_ql.astype(ql.dtype), d_kl.astype(kl.dtype), d_vv.astype(vv.dtype)

  one_document = branch_vjp(_global_one_document) if causal else one_document_vjp
  grads = jax.lax.cond(
    one_doc, one_document, branch_vjp(_global_per_document), ql, kl, vv, total, g
  )
  return (*grads, None, None)  # segment ids and the valid mask are not differentiable


_global_part.defvjp(_global_part_fwd, _global_part_bwd)


def mixed_chunk_attention(
  q_quad,
  k_quad,
  q_lin,
  k_lin,
  v,
  segment_ids,
  *,
  chunk_size: int,
  causal: bool,
  norm: str,
  scale_kind: str = 'standard',
  causal_normalizer: str = 'visible',
  dropout_rate: float = 0.0,
  dropout_rng=None,
) -> jax.Array:
  """FLASH local + global attention (see the module docstring), segment-aware.

  q_*, k_* [b, n, s]; v [b, n, e]; segment_ids [b, n] (0 = pad; each document one contiguous
  run, as packing writes it). Returns [b, n, e]. No token sees another document: the local
  part masks by segment, and the global part sums k v^T over the query's own document only,
  still in O(n (c + e) s) time and O((n / c) s e) memory.

  Global part for a query i in chunk g, document D (a run [start, end]): with chunk sums
  F_h = sum_{j in h} k_j v_j^T and their exclusive prefix sums, the part of D before chunk g,
  B_g = sum_{j in D, j < g c} k_j v_j^T, and after it, A_g = sum_{j in D, j >= (g+1) c}, are
  prefix differences plus one partial chunk each; only the chunk's first document can reach
  back and only its last can reach forward, so B_g and A_g are one [s, e] matrix per chunk.
    non-causal: q_i (B_g [D first in g] + sum_{j in g, j in D} k_j v_j^T + A_g [D last in g])
                / |D|
    causal:     q_i B_g [D first in g] / (g c - start)      (zero when D starts in chunk g)
  With one document per row this is the original FLASH global part (kexue 8934): when no row
  of the batch holds more than one document (`one_document_per_row`, decided on device by a
  lax.cond, no host sync) `_global_one_document` computes it without the boundary corrections.
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
  same_doc = (seg_c[..., :, None] == seg_c[..., None, :]) & (seg_c[..., :, None] != 0)
  local_mask = same_doc
  if causal:
    local_mask = local_mask & jnp.tril(jnp.ones((c, c), bool))
  num_keys = None
  if causal and causal_normalizer == 'n':
    num_keys = same_doc.sum(-1, keepdims=True)  # the chunk's keys of the document
  qk = jnp.einsum('bgis,bgjs->bgij', qq, kq, preferred_element_type=jnp.float32)
  a = attention_weights(qk, local_mask, norm, q_quad.shape[-1], scale_kind, num_keys)
  a = layers.dropout(a, dropout_rate, dropout_rng)
  local = jnp.einsum('bgij,bgje->bgie', a.astype(vv.dtype), vv)

  glob = _global_part(ql, kl, vv, seg, valid, c, causal)
  out = local.astype(jnp.float32) + glob
  return out.reshape(b, n_pad, -1)[:, :n].astype(v.dtype)


class ScaleOffset(nnx.Module):
  """Per-dimension scale and offset of Z, one row per derived tensor: scale/bias [k, s]."""

  def __init__(self, num: int, features: int, *, use_bias: bool, param_dtype, rngs):
    self.scale = layers.make_param(
      rngs, layers.ones_init, (num, features), param_dtype, (None, 'kv')
    )
    self.bias = (
      layers.make_param(rngs, layers.zeros_init, (num, features), param_dtype, (None, 'kv'))
      if use_bias
      else None
    )

  def __call__(self, z: jax.Array, sin=None, cos=None) -> list[jax.Array]:
    """z [..., n, s] -> k tensors [..., n, s]: scale[i] * z + bias[i] (z's dtype).

    With RoPE's sin/cos [..., n, s/2], z is in rotate-half order (`GAUBlock.projections` with
    pairs_first=True; `rope.pairs_first`) and each output is rotated by RoPE in that order
    (`rope.rotate_halves`, float32): the same rotations as the interleaved layout, with every
    read and write contiguous; the attention only takes dot products of these vectors, which
    the common permutation leaves unchanged (docs/performance.md 6).
    """
    # One product per row, not one [..., k, s] product sliced afterwards: the slices'
    # transposes are pads and adds of the whole [..., k, s] gradient per row (11 % of a FLASH
    # step at n = 4096 on CPU, docs/performance.md 6); the values are the same.
    scale = self.scale[...].astype(z.dtype)
    bias = None if self.bias is None else self.bias[...].astype(z.dtype)
    if sin is not None:
      scale = rope.pairs_first(scale)
      bias = None if bias is None else rope.pairs_first(bias)
    out = []
    for i in range(scale.shape[0]):
      y = z * scale[i] if bias is None else z * scale[i] + bias[i]
      if sin is not None:
        y = rope.rotate_halves(y.astype(jnp.float32), sin, cos).astype(z.dtype)
      out.append(y)
    return out


class GAUBlock(nnx.Module):
  """One post-norm GAU layer (FLASH when chunk_size > 0). Params:

  uvz/{kernel [d, 2e+s] ('embed', 'mlp'), bias}  fused U, V, Z projection, split [e, e, s]
  qk/{scale, bias} [k, s]                         k = 2 (GAU: q, k) or 4 (FLASH: q_quad,
                                                  k_quad, q_lin, k_lin)
  out/{kernel [e, d] ('mlp', 'embed'), bias}
  norm/...                                        the post-norm (absent if parameter-free)
  """

  def __init__(self, spec, *, rngs: nnx.Rngs):
    d, s = spec.hidden_size, spec.shared_dim
    e = spec.expansion_factor * d
    self.e, self.s = e, s
    self.norm_kind, self.scale_kind = spec.attention_norm, spec.attention_scale
    self.chunk_size, self.causal = spec.chunk_size, spec.causal
    self.causal_normalizer = spec.causal_normalizer
    self.dropout_rate, self.alpha = spec.dropout_rate, spec.residual_alpha
    self.activation = spec.gau_activation
    common = dict(dtype=spec.dtype, param_dtype=spec.param_dtype, rngs=rngs)
    self.uvz = layers.Dense(
      (d,),
      (2 * e + s,),
      in_axes=('embed',),
      out_axes=('mlp',),
      kernel_init=spec.kernel_init('gau_in', (d,), (2 * e + s,)),
      use_bias=spec.use_bias,
      **common,
    )
    self.qk = ScaleOffset(
      4 if spec.chunk_size > 0 else 2,
      s,
      use_bias=spec.use_bias,
      param_dtype=spec.param_dtype,
      rngs=rngs,
    )
    self.out = layers.Dense(
      (e,),
      (d,),
      in_axes=('mlp',),
      out_axes=('embed',),
      kernel_init=spec.kernel_init('gau_out', (e,), (d,)),
      use_bias=spec.use_bias,
      **common,
    )
    self.norm = layers.make_norm(spec.norm_type, d, eps=spec.norm_eps, **common)

  def projections(self, x, pairs_first: bool = False):
    """U [b, n, e], V [b, n, e], Z [b, n, s] (activation applied); Z's dimensions in
    rotate-half order with pairs_first (`rope.pairs_first` of the kernel's Z columns and bias:
    the parameters keep the released interleaved layout).

    Three matmuls on the tokens as rows, [b n, d] x [d, e | e | s], with the fused kernel
    sliced (the parameter keeps its [d, 2e + s] layout): each output is contiguous, where
    slicing one [b n, 2e + s] product into U, V, Z made the backward pass write the three
    gradients back into a [b n, 2e + s] array (a FLASH step at n = 4096 on CPU: 608 -> 551 ms,
    docs/performance.md 6). Rows keep the kernel's gradient a one-axis contraction (a
    [b, n, d] input made XLA on CPU transpose the product in the backward pass).
    """
    rows = x.reshape(-1, x.shape[-1]).astype(self.uvz.dtype)
    kernel = self.uvz.kernel[...].astype(self.uvz.dtype)
    bias = None if self.uvz.bias is None else self.uvz.bias[...].astype(self.uvz.dtype)
    act = jax.nn.relu if self.activation == 'relu' else jax.nn.silu

    def part(lo, hi, reorder=lambda t: t):
      h = rows @ reorder(kernel[:, lo:hi])
      h = act(h if bias is None else h + reorder(bias[lo:hi]))
      return h.reshape(x.shape[:-1] + (hi - lo,))

    e = self.e
    z = part(2 * e, kernel.shape[1], rope.pairs_first if pairs_first else lambda t: t)
    return part(0, e), part(e, 2 * e), z

  def mix(self, x, ctx: attention.AttentionContext, dropout_rng=None):
    """The GAU branch O [b, n, d] (before dropout, residual and norm). ctx: sin/cos (r = s),
    segment_ids, and mask unless FLASH."""
    u, v, z = self.projections(x, pairs_first=ctx.sin is not None)
    qks = self.qk(z, ctx.sin, ctx.cos)
    if self.chunk_size > 0:
      q_quad, k_quad, q_lin, k_lin = qks
      av = mixed_chunk_attention(
        q_quad,
        k_quad,
        q_lin,
        k_lin,
        v,
        ctx.segment_ids,
        chunk_size=self.chunk_size,
        causal=self.causal,
        norm=self.norm_kind,
        scale_kind=self.scale_kind,
        causal_normalizer=self.causal_normalizer,
        dropout_rate=self.dropout_rate,
        dropout_rng=dropout_rng,
      )
    else:
      q, k = qks
      divisor = None
      if self.causal and self.causal_normalizer == 'n':
        divisor = attention.attention_mask(ctx.segment_ids, False).sum(-1, keepdims=True)
      av = gau_attention(
        q,
        k,
        v,
        ctx.mask,
        norm=self.norm_kind,
        scale_kind=self.scale_kind,
        relu2_divisor=divisor,
        dropout_rate=self.dropout_rate,
        dropout_rng=dropout_rng,
      )
    o = (u * av.astype(u.dtype)).reshape(-1, u.shape[-1])  # tokens as rows, as in projections
    return self.out(o).reshape(x.shape[:-1] + (-1,))

  def __call__(self, x, ctx: attention.AttentionContext, dropout_rng=None):
    """x [b, n, d] -> [b, n, d]; dropout_rng: a PRNG key (training) or None."""
    k_att, k_res = layers.split_key(dropout_rng, 2)
    y = layers.dropout(self.mix(x, ctx, k_att), self.dropout_rate, k_res)
    return self.norm(x * self.alpha + y if self.alpha != 1.0 else x + y)
