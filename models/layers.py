"""Basic NNX layers with logical axis names: Dense (any in/out shape), Embed, norms, dropout.

Every parameter is created through `nnx.with_partitioning`, so building a model under
`jax.set_mesh(mesh)` and `nnx.logical_axis_rules(rules)` shards it eagerly. Leaf names follow
Flax: `kernel`, `bias`, `scale` (norm gains), `embedding`. Weight decay masks rely on `bias` and
`scale` meaning "not decayed".

Initialisers (docs/algorithms.md 5.1, 5.3) are chosen per kernel *role* by `KernelInit`:
  'normal'      : N(0, initializer_range^2) (BERT / RoFormer v1).
  'roformer_v2' : truncated normal (+-2 sigma), std 1.13684723/sqrt(fan) * L^(-1/2).
  'gau_alpha'   : the same with L^(-1/3).
  DeepNorm (model.residual == 'deepnorm'): Xavier-normal with gain beta for roles 'v', 'o',
  'mlp_in', 'mlp_out' and gain 1 for 'q', 'k' (other roles keep the base rule).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd as flax_spmd

Axes = tuple[str | None, ...]

# 1 / std of a standard normal truncated to [-2, 2]: undoes the truncation (docs/algorithms.md 5.3).
TRUNCATION_CORRECTION = 1.13684723


def as_dtype(name) -> jnp.dtype:
  """'float32' / 'bfloat16' / a dtype -> jnp.dtype."""
  return jnp.dtype(name)


def _prod(xs: Sequence[int]) -> int:
  return int(math.prod(xs)) if xs else 1


def su_fan(fan_in: int, fan_out: int) -> int:
  """bert4keras' fan rule (docs/algorithms.md 5.3): shape[0], or shape[1] if shape[0] > 10000 or <
  10."""
  return fan_out if (fan_in > 10000 or fan_in < 10) else fan_in


@dataclasses.dataclass(frozen=True)
class KernelInit:
  """Kernel initialisers selected by config and role (see the module docstring).

  Attributes:
    kind: 'normal', 'roformer_v2' or 'gau_alpha'.
    std: the std of 'normal'.
    num_layers: L of the depth-scaled rules.
    deepnorm_beta: beta of DeepNorm's init, or None when DeepNorm is off.
  """

  kind: str
  std: float
  num_layers: int
  deepnorm_beta: float | None = None

  def stddev(self, role: str, fan_in: int, fan_out: int) -> tuple[float, bool]:
    """Returns (std, truncated) for a kernel of 2-D shape (fan_in, fan_out) and a role."""
    if self.deepnorm_beta is not None and role in ('q', 'k', 'v', 'o', 'mlp_in', 'mlp_out'):
      gain = 1.0 if role in ('q', 'k') else self.deepnorm_beta
      return gain * math.sqrt(2.0 / (fan_in + fan_out)), False
    if self.kind == 'normal':
      return self.std, False
    if self.kind in ('roformer_v2', 'gau_alpha'):
      power = 0.5 if self.kind == 'roformer_v2' else 1.0 / 3.0
      # Embedding tables take the feature size: what bert4keras' shape rule gives every
      # released model (vocabularies > 10000); taken literally it would give a 10..10000
      # vocabulary (our tiny presets: 8000) sqrt(V / d) times smaller embeddings, and those
      # models stall at the unigram loss (docs/algorithms.md 5.3).
      fan = fan_out if role == 'embed' else su_fan(fan_in, fan_out)
      return TRUNCATION_CORRECTION / math.sqrt(fan) * self.num_layers ** (-power), True
    raise ValueError(f'unknown model.init={self.kind!r}; choose normal, roformer_v2 or gau_alpha')

  def __call__(self, role: str, in_shape: Sequence[int], out_shape: Sequence[int]):
    """A jax initializer for a kernel of shape in_shape + out_shape."""
    std, truncated = self.stddev(role, _prod(in_shape), _prod(out_shape))

    def init(key, shape, dtype=jnp.float32):
      if truncated:
        return (jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32) * std).astype(dtype)
      return (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)

    return init


def make_param(rngs: nnx.Rngs | None, init, shape, dtype, axes: Axes) -> nnx.Param:
  """A Param with logical axis names; sharded eagerly when a mesh is set (jax.set_mesh)."""
  key = rngs.params() if rngs is not None else None
  has_mesh = not jax.sharding.get_abstract_mesh().empty
  return nnx.Param(
    nnx.with_partitioning(init, axes, eager_sharding=has_mesh)(key, tuple(shape), dtype)
  )


def zeros_init(key, shape, dtype=jnp.float32):
  del key
  return jnp.zeros(shape, dtype)


def ones_init(key, shape, dtype=jnp.float32):
  del key
  return jnp.ones(shape, dtype)


class Dense(nnx.Module):
  """y = x W + b contracting the last len(in_shape) axes of x; W has shape in_shape + out_shape.

  Example: the query projection d -> (h, d_h) has kernel [d, h, d_h] with axes
  ('embed', 'heads', 'kv'), bias [h, d_h] with axes ('heads', 'kv').
  """

  def __init__(
    self,
    in_shape: Sequence[int],
    out_shape: Sequence[int],
    *,
    in_axes: Axes,
    out_axes: Axes,
    kernel_init,
    use_bias: bool = True,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
    self.dtype = dtype
    self.kernel = make_param(
      rngs,
      kernel_init,
      self.in_shape + self.out_shape,
      param_dtype,
      tuple(in_axes) + tuple(out_axes),
    )
    self.bias = (
      make_param(rngs, zeros_init, self.out_shape, param_dtype, tuple(out_axes))
      if use_bias
      else None
    )

  def __call__(self, x: jax.Array, preferred_element_type=None) -> jax.Array:
    """x [..., *in_shape] -> [..., *out_shape] in self.dtype (or preferred_element_type).

    The product runs with the output axes flattened into one, [..., prod(out_shape)], and is
    reshaped afterwards: the layer scan saves these products for the backward pass (remat
    policy `dots_with_no_batch_dims`), and a [..., h, d_h] product with d_h = 64 gets d_h as
    the TPU's 128-lane axis, padded to twice its size, where [..., h d_h] packs the lanes:
    roformer:base v5e-8 temporaries 4.22 -> 3.93 GiB per device, no change on CPU
    (docs/tpu_fit.md). The parameters keep their shape.
    """
    k = len(self.in_shape)
    kernel = self.kernel[...].astype(self.dtype)
    kernel = kernel.reshape(kernel.shape[:k] + (-1,))
    x = x.astype(self.dtype)
    contract = (tuple(range(x.ndim - k, x.ndim)), tuple(range(k)))
    y = jax.lax.dot_general(
      x, kernel, (contract, ((), ())), preferred_element_type=preferred_element_type
    ).reshape(x.shape[: x.ndim - k] + self.out_shape)
    if self.bias is not None:
      y = y + self.bias[...].astype(y.dtype)
    return y


class Embed(nnx.Module):
  """Embedding table [num_embeddings, features] with axes (vocab_axis, 'embed')."""

  def __init__(
    self,
    num_embeddings: int,
    features: int,
    *,
    init,
    vocab_axis: str | None,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.dtype = dtype
    self.embedding = make_param(
      rngs, init, (num_embeddings, features), param_dtype, (vocab_axis, 'embed')
    )

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    """Tied output projection x E^T, accumulated and returned in float32."""
    emb = self.embedding[...].astype(self.dtype)
    return jnp.einsum(
      '...d,vd->...v', x.astype(self.dtype), emb, preferred_element_type=jnp.float32
    )


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis (statistics in float32), with `scale` and `bias`."""

  def __init__(
    self,
    features: int,
    *,
    eps: float,
    use_scale: bool = True,
    use_bias: bool = True,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs | None = None,
  ):
    self.eps, self.dtype = eps, dtype
    vector = lambda init: make_param(rngs, init, (features,), param_dtype, ('embed',))
    self.scale = vector(ones_init) if use_scale else None
    self.bias = vector(zeros_init) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.eps)
    if self.scale is not None:
      y = y * self.scale[...].astype(jnp.float32)
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


class RMSNorm(nnx.Module):
  """x / sqrt(mean(x^2) + eps) over the last axis; parameter-free unless use_scale (RoFormerV2)."""

  def __init__(
    self,
    features: int,
    *,
    eps: float,
    use_scale: bool = False,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs | None = None,
  ):
    self.eps, self.dtype = eps, dtype
    self.scale = (
      make_param(rngs, ones_init, (features,), param_dtype, ('embed',)) if use_scale else None
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    y = x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + self.eps)
    if self.scale is not None:
      y = y * self.scale[...].astype(jnp.float32)
    return y.astype(self.dtype)


def make_norm(kind: str, features: int, *, eps: float, dtype, param_dtype, rngs):
  """'layernorm' (scale + bias), 'rmsnorm' (scale) or 'rmsnorm_noparam' (no parameters)."""
  if kind == 'layernorm':
    return LayerNorm(features, eps=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
  if kind == 'rmsnorm':
    return RMSNorm(
      features, eps=eps, use_scale=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )
  if kind == 'rmsnorm_noparam':
    return RMSNorm(features, eps=eps, use_scale=False, dtype=dtype, rngs=rngs)
  raise ValueError(f'unknown norm type {kind!r}; choose layernorm, rmsnorm or rmsnorm_noparam')


def constrain(x: jax.Array, logical_axes: Axes) -> jax.Array:
  """Sharding constraint from logical axis names (e.g. ('batch', 'length', None)).

  A no-op without a mesh (jax.set_mesh) or logical axis rules, and for dimensions the mapped
  mesh axes do not divide (so single-device use and odd test shapes are unaffected).
  """
  mesh = jax.sharding.get_abstract_mesh()
  rules = flax_spmd.get_logical_axis_rules()
  if mesh.empty or not rules:
    return x
  spec = flax_spmd.from_sharding_rules(tuple(logical_axes), rules)
  spec = list(spec) + [None] * (x.ndim - len(spec))
  for i, axes in enumerate(spec):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = math.prod(mesh.shape[a] for a in names) if names else 1
    if x.shape[i] % size:
      spec[i] = None
  return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(*spec))


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Inverted dropout with an explicit key; identity when key is None or rate == 0."""
  if key is None or rate <= 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x)).astype(x.dtype)


def split_key(key: jax.Array | None, num: int):
  """jax.random.split that passes None through (as a tuple of Nones)."""
  if key is None:
    return (None,) * num
  return tuple(jax.random.split(key, num))


def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU, Hugging Face's 'gelu'."""
  return jax.nn.gelu(x, approximate=False)


# Feed-forward activations by config name (model.mlp_activation), Hugging Face's meanings:
# 'gelu' exact erf GELU (RoFormer v1, BERT), 'gelu_tanh' its tanh approximation (HF
# 'gelu_new'), 'relu' (the released RoFormer-v2 checkpoints), 'swish' x * sigmoid(x).
ACTIVATIONS = {
  'gelu': gelu,
  'gelu_tanh': lambda x: jax.nn.gelu(x, approximate=True),
  'relu': jax.nn.relu,
  'swish': jax.nn.silu,
}


def activation(name: str):
  """The elementwise function for model.mlp_activation `name` (a key of ACTIVATIONS).

  Raises:
    ValueError: unknown name, listing the choices.
  """
  if name not in ACTIVATIONS:
    raise ValueError(
      f'model.mlp_activation={name!r} is not supported; choose one of {", ".join(ACTIVATIONS)}'
    )
  return ACTIVATIONS[name]
