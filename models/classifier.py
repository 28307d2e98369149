"""Sequence classification and regression heads over the encoder of every family
(docs/finetuning.md 1).

  logits = model(tokens, segment_ids, positions, token_types=None, dropout_rng=None)

tokens, segment_ids, positions, token_types: int32 [b, n], one example per row: segment_ids 1
on the example's tokens and 0 on padding, positions 0..len-1, token_types 0 for the first text
and 1 for the second of a pair (None: all 0). logits: float32 [b, C], C = the number of labels
(classification) or 1 (regression). dropout_rng: a PRNG key (training) or None.

Pooling (`pooling`; docs/finetuning.md 1 says why launch.finetune defaults to 'mean'):
  'cls'  : the first token's final hidden state through a tanh pooler, h_pool = tanh(W_p h_0 +
           b_p), as BERT's pooler (Devlin et al. 2019, 3) and the RoFormer fine-tuning recipe.
  'mean' : the mean of the final hidden states over the row's non-padding tokens
           (segment_ids > 0), no pooler (Reimers and Gurevych 2019, Sentence-BERT).
Then dropout (model.dropout_rate) and the output projection W_o [d, C] + b_o.

Parameter layout (the encoder's, `models/encoder.py`, without its MLM head):

  encoder/embedder/..., encoder/layers/...      as models/encoder.py
  pooler/kernel, bias        [d, d], [d]        ('embed', 'mlp'), ('mlp',)     pooling 'cls'
  output/kernel, bias        [d, C], [C]        ('embed', None), (None,)

Head kernels are N(0, model.initializer_range^2) and biases 0 in every family (BERT's
initialisation of task layers), whatever the encoder's init rule.
"""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp

from models import encoder as encoder_lib
from models import layers

POOLINGS = ('cls', 'mean')
POOLED_AXES = ('batch', None)


def validate_head(pooling: str, num_outputs: int) -> None:
  """Raises ValueError naming the flag when the head settings are invalid."""
  if pooling not in POOLINGS:
    raise ValueError(
      f'--pooling={pooling!r} is not supported; choose one of '
      f'{", ".join(POOLINGS)} (cls: first token through a tanh pooler, as '
      f'BERT; mean: mean over non-padding tokens).'
    )
  if num_outputs < 1:
    raise ValueError(
      f'the task has {num_outputs} outputs; a classification task needs at '
      f'least 2 labels in its training file, a regression task 1 output.'
    )


class Classifier(nnx.Module):
  """The encoder (no MLM head) + pooling + output projection; see the module docstring.

  Args:
    spec: the encoder's resolved hyper-parameters (`models.resolve(config)`).
    num_outputs: C, the number of labels (classification) or 1 (regression).
    pooling: 'cls' or 'mean'.
    rngs: parameter initialisation keys.
  """

  def __init__(
    self, spec: encoder_lib.ArchSpec, num_outputs: int, pooling: str = 'cls', *, rngs: nnx.Rngs
  ):
    validate_head(pooling, num_outputs)
    self.encoder = encoder_lib.Encoder(spec, rngs=rngs)
    self.encoder.head = None  # the MLM head is not part of a fine-tuned model
    self.pooling = pooling
    self.dropout_rate = spec.dropout_rate
    d = spec.hidden_size
    head_init = layers.KernelInit('normal', spec.kernel_init.std, spec.num_layers)
    common = dict(dtype=spec.dtype, param_dtype=spec.param_dtype, rngs=rngs)
    if pooling == 'cls':
      self.pooler = layers.Dense(
        (d,),
        (d,),
        in_axes=('embed',),
        out_axes=('mlp',),
        kernel_init=head_init('head', (d,), (d,)),
        use_bias=True,
        **common,
      )
    else:
      self.pooler = None
    self.output = layers.Dense(
      (d,),
      (num_outputs,),
      in_axes=('embed',),
      out_axes=(None,),
      kernel_init=head_init('head', (d,), (num_outputs,)),
      use_bias=True,
      **common,
    )

  def pool(self, hidden: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """hidden [b, n, d], segment_ids [b, n] -> pooled [b, d] (before dropout)."""
    if self.pooling == 'cls':
      first = layers.constrain(hidden[:, 0, :], POOLED_AXES)
      return jnp.tanh(layers.constrain(self.pooler(first), POOLED_AXES))
    mask = (segment_ids > 0).astype(jnp.float32)[..., None]
    total = jnp.sum(hidden.astype(jnp.float32) * mask, axis=1)
    pooled = total / jnp.maximum(jnp.sum(mask, axis=1), 1.0)
    return layers.constrain(pooled.astype(hidden.dtype), POOLED_AXES)

  def __call__(self, tokens, segment_ids, positions, token_types=None, dropout_rng=None):
    k_encoder, k_head = layers.split_key(dropout_rng, 2)
    hidden = self.encoder.encode(tokens, segment_ids, positions, k_encoder, token_types)
    pooled = layers.dropout(self.pool(hidden, segment_ids), self.dropout_rate, k_head)
    logits = self.output(pooled, preferred_element_type=jnp.float32)
    return layers.constrain(logits.astype(jnp.float32), POOLED_AXES)


def build(config, num_outputs: int, pooling: str = 'cls', *, rngs: nnx.Rngs) -> Classifier:
  """The classifier for `config.model` (every family: roformer, roformer_v2, gau, DeepNet).

  Args:
    config: the full ConfigDict (config.model; config.objective must be 'mlm' or 'clm', and
      is forced to bidirectional attention here: a classifier reads the whole text).
    num_outputs: C (labels) or 1 (regression); pooling: 'cls' or 'mean'.
    rngs: e.g. nnx.Rngs(params=config.seed).

  Raises:
    ValueError: an invalid model config (models.validate) or head setting.
  """
  from models import validate  # pylint: disable=g-import-not-at-top

  validate(config)
  spec = encoder_lib.resolve(config)
  if spec.causal:  # a CLM-pretrained encoder is fine-tuned with bidirectional attention
    spec = spec.__class__(**dict(spec.__dict__, causal=False))
  return Classifier(spec, num_outputs, pooling, rngs=rngs)
