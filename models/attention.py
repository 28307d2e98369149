"""Masks, the entropy-invariant scale and multi-head softmax attention with RoPE.

Masking: query i may attend to key j iff segment_ids[i] == segment_ids[j] != 0 (and j <= i
for causal LM). Fully masked rows (padding queries) get a uniform distribution over a large
negative bias instead of NaN; their outputs are ignored downstream.

Scale (docs/algorithms.md 7.4): 'standard' 1/sqrt(d_h); 'entropy_invariant' log_512(n)/sqrt(d_h)
with n the
number of keys the query may attend to, clamped at n >= 16 (causal: visible keys of that query).

Two implementations of the same attention (model.attention_impl, docs/algorithms.md 9):
'xla' (`dot_product_attention`: logits [b, h, n, n] in HBM) and 'splash' (`splash_attention`:
JAX's Pallas splash-attention kernel for TPU, which never holds more than a block of logits
and masks from the segment ids itself); 'auto' picks splash on TPU when it can
(`use_splash`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd as flax_spmd

from models import layers
from models import rope

NEG_INF = -1e30
ENTROPY_MIN_KEYS = 16.0
ENTROPY_BASE_KEYS = 512.0

# model.attention_impl values (pretrain/config.py).
ATTENTION_IMPLS = ('auto', 'xla', 'splash')
# Splash tile sizes tried in order, largest first: the sequence length must be a multiple of
# one. The kernel's segment-id masking works on 128-lane vregs, so 128 is the floor; larger
# tiles amortise the per-tile overhead (512 is MaxText's default on TPU).
SPLASH_BLOCKS = (512, 256, 128)
# Run the splash kernel in Pallas interpret mode (plain JAX ops, any backend; slow). Tests set
# it to compare the kernel with the XLA path on CPU; with it False, attention_impl='splash'
# needs TPU devices.
SPLASH_INTERPRET = False


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
      None for FLASH (GAU with chunk_size > 0), which does not use a quadratic mask, and when
      the splash kernel runs (`use_splash`), which masks from segment_ids itself: building
      the [b, n, n] mask would bring back the quadratic memory the kernel avoids.
    scale: float32 logit scale from `attention_scale`: a scalar [] ('standard') or [b, n, 1]
      per query ('entropy_invariant'); None for FLASH. Set whenever the mask is, and with the
      splash kernel (then mask is None and scale is not: that pair selects the kernel).
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


def segment_attention_scale(kind: str, segment_ids: jax.Array, causal: bool, dim: int) -> jax.Array:
  """`attention_scale` from segment ids, for the splash path (which builds no mask).

  The key count per query is the same reduction of the same mask as the XLA path's; inside
  jit XLA fuses the [b, n, n] comparison into the reduction, so nothing quadratic is stored.

  Args:
    kind: 'standard' or 'entropy_invariant'.
    segment_ids: int32 [b, n], 0 = padding.
    causal: count only keys j <= i (objective 'clm').
    dim: the head size d_h.

  Returns:
    float32 scalar [] (standard) or [b, n, 1] (entropy_invariant).
  """
  if kind == 'standard':
    return attention_scale(kind, None, dim)
  return attention_scale(kind, attention_mask(segment_ids, causal), dim)


def splash_blocker(*, family: str, seq_len: int, dropout_rate: float) -> str | None:
  """Why the splash kernel cannot compute this model's attention, or None if it can.

  Args:
    family: model.family; only the softmax-attention families ('roformer', 'roformer_v2')
      have multi-head softmax attention (GAU: docs/algorithms.md 9.4).
    seq_len: n, tokens per row.
    dropout_rate: model.dropout_rate, which also drops attention weights in the XLA path;
      the kernel never forms the weights, so it cannot drop them.

  Returns:
    A sentence naming the setting and the fix, or None.
  """
  if family == 'gau':
    return (
      "model.family='gau' has no multi-head softmax attention for the splash kernel "
      '(docs/algorithms.md 9.4); set --config.model.attention_impl=xla (or auto)'
    )
  if dropout_rate > 0.0:
    return (
      f'model.dropout_rate={dropout_rate} also drops attention weights, which the splash '
      'kernel never forms; set --config.model.dropout_rate=0 or '
      '--config.model.attention_impl=auto (falls back to XLA) or xla'
    )
  if seq_len % SPLASH_BLOCKS[-1]:
    return (
      f'data.seq_len={seq_len} is not a multiple of {SPLASH_BLOCKS[-1]}, the smallest splash '
      'tile; choose such a seq_len or --config.model.attention_impl=auto (or xla)'
    )
  return None


def trace_platform() -> str:
  """The platform this trace targets ('cpu', 'tpu', 'gpu', ...): that of the mesh set by
  jax.set_mesh (an ahead-of-time compile for a TPU topology runs on a CPU host, whose default
  backend is 'cpu'), else the default backend's."""
  mesh = jax.sharding.get_abstract_mesh()  # get_mesh() is refused inside jit
  device = None if mesh.empty else getattr(mesh, 'abstract_device', None)
  if device is not None:
    return device.platform
  return jax.default_backend()


def _mesh_on_tpu() -> bool:
  """True when this trace targets TPU devices (`trace_platform`)."""
  return trace_platform() == 'tpu'


def use_splash(impl: str, *, family: str, seq_len: int, dropout_rate: float) -> bool:
  """Resolves model.attention_impl for one trace: True runs `splash_attention`.

  'xla': never. 'auto': on TPU devices (see `_mesh_on_tpu`) when `splash_blocker` finds
  nothing, else XLA (dropout included). 'splash': always, or an error.

  Raises:
    ValueError: impl='splash' with a setting the kernel cannot compute (`splash_blocker`), or
      without TPU devices and without SPLASH_INTERPRET; an unknown impl.
  """
  if impl == 'xla':
    return False
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f'unknown model.attention_impl={impl!r}; choose one of {ATTENTION_IMPLS}')
  reason = splash_blocker(family=family, seq_len=seq_len, dropout_rate=dropout_rate)
  on_tpu = _mesh_on_tpu()
  if impl == 'auto':
    return reason is None and on_tpu
  if reason is not None:
    raise ValueError(f"model.attention_impl='splash': {reason}")
  if not (on_tpu or SPLASH_INTERPRET):
    raise ValueError(
      "model.attention_impl='splash' runs a TPU kernel but this computation targets "
      f'{jax.default_backend()!r} devices; use --config.model.attention_impl=auto (XLA '
      'off TPU), or set models.attention.SPLASH_INTERPRET = True to interpret it (slow)'
    )
  return True


def _splash_module():
  """jax.experimental.pallas.ops.tpu.splash_attention, imported when the kernel first runs
  (the Pallas TPU modules are not needed otherwise)."""
  from jax.experimental.pallas.ops.tpu import splash_attention

  return splash_attention


def _splash_kernel(num_heads: int, seq_len: int, causal: bool, interpret: bool):
  """The splash MHA kernel for [num_heads, seq_len, d] inputs of one example.

  Built in the trace that uses it: its block tables become that trace's constants (a kernel
  cached across traces would hold arrays of the first trace, or of a mesh's devices that this
  process cannot address in an ahead-of-time compile). The NumPy work behind the tables
  (about a second for n = 32768) is cached by JAX's own splash_attention_mask_info.
  """
  sa = _splash_module()
  block = next(b for b in SPLASH_BLOCKS if seq_len % b == 0)
  shape = (seq_len, seq_len)
  # Documents and padding are separated by segment ids inside the kernel; the static mask
  # only adds causality (whose fully masked tiles the kernel then skips).
  head_mask = sa.CausalMask(shape) if causal else sa.FullMask(shape)
  sizes = sa.BlockSizes(
    block_q=block,
    block_kv=block,
    block_kv_compute=block,
    block_q_dkv=block,
    block_kv_dkv=block,
    block_kv_dkv_compute=block,
    block_q_dq=block,
    block_kv_dq=block,
  )
  return sa.make_splash_mha(
    sa.MultiHeadMask([head_mask] * num_heads),
    block_sizes=sizes,
    head_shards=1,
    q_seq_shards=1,
    interpret=interpret,
  )


def _mesh_axes(logical: str, size: int):
  """Mesh axes the logical axis maps to under the current rules if they divide `size`, else
  None (that dimension is then whole on every device). None without a mesh or rules."""
  mesh = jax.sharding.get_abstract_mesh()
  rules = flax_spmd.get_logical_axis_rules()
  if mesh.empty or not rules:
    return None
  axes = flax_spmd.from_sharding_rules((logical,), rules)[0]
  names = (axes,) if isinstance(axes, str) else tuple(axes or ())
  if not names or size % math.prod(mesh.shape[a] for a in names):
    return None
  return axes


def splash_attention(q, k, v, segment_ids, scale, *, causal: bool):
  """The same attention as `dot_product_attention`, in the Pallas splash kernel.

  Query i attends to key j iff segment_ids[i] == segment_ids[j] (and j <= i when causal),
  with softmax(scale * q.k) as in the XLA path. Padding queries (segment id 0) attend to the
  padding keys inside the kernel (a row is never empty there), and their outputs are then
  replaced by the mean of v over all n keys: exactly what the XLA path gives a fully masked
  row (a uniform softmax over n equal NEG_INF logits), so both paths agree everywhere.

  The scale multiplies q before the kernel (the kernel takes q pre-scaled): it multiplies
  every logit of a query row by the same number, so a per-query scale ('entropy_invariant')
  is exact too. In float32 the two paths then differ by rounding only; in bfloat16 q * scale
  is rounded to bfloat16 (exact when the scale is a power of two, e.g. 1/8 for d_h = 64).

  Under a mesh and logical axis rules (jax.set_mesh, nnx.logical_axis_rules) the kernel runs
  per device in jax.shard_map over the 'batch' and 'heads' mesh axes (a Pallas call has no
  sharding rule, so XLA would otherwise gather q, k and v onto every device); each device
  vmaps the kernel over its examples.

  Args:
    q, k: [b, n, h, d_h]; v: [b, n, h, d_v]; one dtype (bfloat16 or float32).
    segment_ids: int32 [b, n]; 0 = padding.
    scale: float32 scalar [] or [b, n, 1].
    causal: also mask j > i.

  Returns:
    [b, n, h, d_v] in v.dtype.

  Raises:
    ValueError: n not a multiple of 128 (from `splash_blocker`'s tiles).

  Source: the kernel is `jax.experimental.pallas.ops.tpu.splash_attention` (JAX); the
  algorithm is FlashAttention's online softmax (Dao et al. 2022, arXiv 2205.14135).
  """
  b, n, h, _ = q.shape
  if n % SPLASH_BLOCKS[-1]:
    raise ValueError(f'splash attention needs n % {SPLASH_BLOCKS[-1]} == 0, got n={n}')
  scale = jnp.asarray(scale, jnp.float32)
  scale = scale[..., None] if scale.ndim == 3 else scale  # [b, n, 1, 1]: per query row
  q = (q.astype(jnp.float32) * scale).astype(q.dtype)
  # The kernel's layout: [heads, n, d] per example.
  q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
  interpret = bool(SPLASH_INTERPRET)

  def local(q, k, v, seg):
    kernel = _splash_kernel(q.shape[1], n, causal, interpret)
    ids = _splash_module().SegmentIds
    one = lambda q, k, v, s: kernel(q, k, v, segment_ids=ids(q=s, kv=s))
    return jax.vmap(one)(q, k, v, seg)

  if jax.sharding.get_abstract_mesh().empty:
    out = local(q, k, v, segment_ids)
  else:
    batch_axes, head_axes = _mesh_axes('batch', b), _mesh_axes('heads', h)
    qkv_spec = jax.sharding.PartitionSpec(batch_axes, head_axes, None, None)
    seg_spec = jax.sharding.PartitionSpec(batch_axes, None)
    # Also when neither axis splits (every device then runs the whole call): the placement
    # is explicit rather than left to how XLA partitions an opaque custom call.
    # check_vma off: the Pallas call has no rule for varying manual axes; every input and
    # the output are split over the same axes, so nothing crosses devices.
    out = jax.shard_map(
      local, in_specs=(qkv_spec, qkv_spec, qkv_spec, seg_spec), out_specs=qkv_spec, check_vma=False
    )(q, k, v, segment_ids)
  out = out.transpose(0, 2, 1, 3)  # [b, n, h, d_v]
  uniform = jnp.mean(v.astype(jnp.float32), axis=2)[:, None].astype(out.dtype)  # [b, 1, h, d_v]
  return jnp.where((segment_ids == 0)[:, :, None, None], uniform, out)


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
    causal: bool = False,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
  ):
    self.num_heads, self.head_dim = num_heads, head_dim
    self.dropout_rate, self.scale_kind, self.causal = dropout_rate, scale_kind, causal
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
    """x [b, n, d] -> [b, n, d]; ctx: its mask, scale and sin/cos (r = d_h) are used.

    A ctx without a mask but with a scale (`models.encoder.make_context` under
    `use_splash`) runs `splash_attention` on ctx.segment_ids, else `dot_product_attention`.

    Raises:
      ValueError: the splash path with attention-weight dropout in this call (a dropout key
        and dropout_rate > 0); models.validate refuses that configuration earlier.
    """
    q = rope.apply_sin_cos(self.query(x), ctx.sin, ctx.cos)
    k = rope.apply_sin_cos(self.key(x), ctx.sin, ctx.cos)
    v = self.value(x)
    if ctx.mask is None and ctx.scale is not None:
      if dropout_rng is not None and self.dropout_rate > 0.0:
        raise ValueError(
          f'the splash attention kernel cannot drop attention weights (model.dropout_rate='
          f"{self.dropout_rate}); set model.attention_impl='xla' or dropout_rate=0"
        )
      o = splash_attention(q, k, v, ctx.segment_ids, ctx.scale, causal=self.causal)
    else:
      o = dot_product_attention(
        q, k, v, ctx.mask, ctx.scale, dropout_rate=self.dropout_rate, dropout_rng=dropout_rng
      )
    return self.out(o)
