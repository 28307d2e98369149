"""Configurations of the RoFormer-v2 and GAU-alpha exports of encoder-pretrain.

This file travels inside an export directory written by `python -m launch.export` (RoFormer-v2
and GAU-alpha runs), beside `modeling_encoder_pretrain.py`; config.json's `auto_map` names the
classes, so that

  AutoModelForMaskedLM.from_pretrained(export_dir, trust_remote_code=True)

builds the architecture the run trained. transformers has no class for either family: its
RoFormer is v1 (LayerNorms and biases), so without this code an export could load as a
different function. The fields are those of the community PyTorch ports (JunnYu/RoFormer_pytorch
with norm_type 'rms_norm', JunnYu/GAU-alpha-pytorch), whose tensor names the export keeps.
Reference: the suite's docs/huggingface.md 3.
"""

from transformers import PretrainedConfig


class _EncoderConfig(PretrainedConfig):
  """The fields both families share (the ports' names and defaults)."""

  def __init__(
    self,
    vocab_size=12000,
    hidden_size=768,
    num_hidden_layers=12,
    intermediate_size=3072,
    hidden_act='relu',
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
    max_position_embeddings=1536,
    type_vocab_size=2,
    initializer_range=0.02,
    layer_norm_eps=1e-12,
    pad_token_id=0,
    tie_word_embeddings=True,
    **kwargs,
  ):
    self.vocab_size = vocab_size
    self.hidden_size = hidden_size
    self.num_hidden_layers = num_hidden_layers
    self.intermediate_size = intermediate_size
    self.hidden_act = hidden_act
    self.hidden_dropout_prob = hidden_dropout_prob
    self.attention_probs_dropout_prob = attention_probs_dropout_prob
    self.max_position_embeddings = max_position_embeddings
    self.type_vocab_size = type_vocab_size
    self.initializer_range = initializer_range
    self.layer_norm_eps = layer_norm_eps
    super().__init__(pad_token_id=pad_token_id, tie_word_embeddings=tie_word_embeddings, **kwargs)


class RoFormerV2Config(_EncoderConfig):
  """RoFormer-v2: post-norm encoder, rotary positions (interleaved pairs, base 10000), no
  biases, parameter-free RMS norm x / sqrt(mean(x^2) + layer_norm_eps), MLM head tied to the
  word embeddings."""

  model_type = 'roformer_v2'

  def __init__(self, num_attention_heads=12, **kwargs):
    self.num_attention_heads = num_attention_heads
    super().__init__(**kwargs)


class GAUAlphaConfig(_EncoderConfig):
  """GAU-alpha: post-norm stack of gated attention units (one shared query/key head of
  attention_key_size per layer), rotary positions, no biases, parameter-free RMS norm, MLM head
  tied to the word embeddings. normalization: 'softmax_plus' (softmax scaled by
  log_512(max(l, 16)) / sqrt(s), l = the keys a query sees), 'softmax' (1 / sqrt(s)) or
  'squared_relu' (relu(q.k / sqrt(s))^2 / l)."""

  model_type = 'gau_alpha'

  def __init__(
    self,
    attention_key_size=128,
    normalization='softmax_plus',
    num_hidden_layers=24,
    intermediate_size=1536,
    hidden_act='swish',
    **kwargs,
  ):
    if normalization not in ('softmax_plus', 'softmax', 'squared_relu'):
      raise ValueError(
        f'normalization={normalization!r}: choose softmax_plus, softmax or squared_relu'
      )
    self.attention_key_size = attention_key_size
    self.normalization = normalization
    super().__init__(
      num_hidden_layers=num_hidden_layers,
      intermediate_size=intermediate_size,
      hidden_act=hidden_act,
      **kwargs,
    )
