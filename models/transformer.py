"""The RoFormer block (v1, v2 and DeepNet variants): attention + FFN, post-norm residuals.

  x = Norm(a * x + Dropout(Attention(x)))      a = 1 (post_ln) or DeepNorm alpha
  x = Norm(a * x + Dropout(FFN(x)))            FFN = Dense(F) -> act -> Dense(d)

act = model.mlp_activation: GELU for v1 (RoFormer, as BERT), ReLU for the released v2.

v1: biases, LayerNorm with scale and bias. v2: no biases, parameter-free RMSNorm.
"""

from __future__ import annotations

from flax import nnx

from models import attention
from models import layers


class MLP(nnx.Module):
  """wi [d, F] ('embed', 'mlp') -> activation -> wo [F, d] ('mlp', 'embed')."""

  def __init__(
    self,
    hidden_size: int,
    mlp_dim: int,
    *,
    use_bias: bool,
    kernel_init: layers.KernelInit,
    activation: str = 'gelu',
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
  ):
    self.activation = activation
    common = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.wi = layers.Dense(
      (hidden_size,),
      (mlp_dim,),
      in_axes=('embed',),
      out_axes=('mlp',),
      kernel_init=kernel_init('mlp_in', (hidden_size,), (mlp_dim,)),
      **common,
    )
    self.wo = layers.Dense(
      (mlp_dim,),
      (hidden_size,),
      in_axes=('mlp',),
      out_axes=('embed',),
      kernel_init=kernel_init('mlp_out', (mlp_dim,), (hidden_size,)),
      **common,
    )

  def __call__(self, x):
    return self.wo(layers.activation(self.activation)(self.wi(x)))


class TransformerBlock(nnx.Module):
  """One post-norm RoFormer block. See the module docstring.

  Attributes:
    attention, attention_norm, mlp, mlp_norm: submodules (parameter paths).
  """

  def __init__(self, spec, *, rngs: nnx.Rngs):
    """spec: a models.encoder.ArchSpec (resolved hyper-parameters)."""
    self.dropout_rate = spec.dropout_rate
    self.alpha = spec.residual_alpha
    common = dict(dtype=spec.dtype, param_dtype=spec.param_dtype, rngs=rngs)
    self.attention = attention.MultiHeadAttention(
      spec.hidden_size,
      spec.num_heads,
      spec.head_dim,
      use_bias=spec.use_bias,
      kernel_init=spec.kernel_init,
      dropout_rate=spec.dropout_rate,
      scale_kind=spec.attention_scale,
      causal=spec.causal,
      **common,
    )
    self.attention_norm = layers.make_norm(
      spec.norm_type, spec.hidden_size, eps=spec.norm_eps, **common
    )
    self.mlp = MLP(
      spec.hidden_size,
      spec.mlp_dim,
      use_bias=spec.use_bias,
      kernel_init=spec.kernel_init,
      activation=spec.mlp_activation,
      **common,
    )
    self.mlp_norm = layers.make_norm(spec.norm_type, spec.hidden_size, eps=spec.norm_eps, **common)

  def _residual(self, x, y):
    return x * self.alpha + y if self.alpha != 1.0 else x + y

  def __call__(self, x, ctx: attention.AttentionContext, dropout_rng=None):
    """x [b, n, d] -> [b, n, d]; dropout_rng: a PRNG key (training) or None."""
    k_att, k_res1, k_res2 = layers.split_key(dropout_rng, 3)
    y = self.attention(x, ctx, k_att)
    x = self.attention_norm(self._residual(x, layers.dropout(y, self.dropout_rate, k_res1)))
    y = self.mlp(x)
    x = self.mlp_norm(self._residual(x, layers.dropout(y, self.dropout_rate, k_res2)))
    return x
