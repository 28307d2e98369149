"""PyTorch RoFormer-v2 and GAU-alpha, the function encoder-pretrain trains, for transformers.

This file travels inside an export directory written by `python -m launch.export` (RoFormer-v2
and GAU-alpha runs); config.json's `auto_map` points the Auto classes here:

  model = AutoModelForMaskedLM.from_pretrained(export_dir, trust_remote_code=True)
  model = AutoModel.from_pretrained(export_dir, trust_remote_code=True)  # hidden states

Tensor names are those of the community PyTorch ports (JunnYu/RoFormer_pytorch,
JunnYu/GAU-alpha-pytorch), so the same model.safetensors also loads there. The forward pass is
the suite's (models/transformer.py, models/gau.py), checked against it by the suite's
tests/test_hf_torch.py to 1e-5:

  x = rms(word_embeddings[ids] + token_type_embeddings[type_ids])      rms: no parameters
  RoFormer-v2 layer:  x = rms(x + attention(x));  x = rms(x + W_o act(W_i x))
  GAU-alpha layer:    u, v, z = split(act(W_i x));  q, k = rope(z * gamma_q), rope(z * gamma_k)
                      x = rms(x + W_o (u * (A(q k^T) v)))
  logits = x word_embeddings^T

RoPE rotates interleaved pairs (2i, 2i+1) by position * 10000^(-2i/dim), the angles formed in
float32 as the suite forms them. attention_mask (1 = token, 0 = padding) hides padded keys and
counts the keys l of GAU-alpha's normalisations. Reference: the suite's docs/huggingface.md 3.
"""

import math

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput

from .configuration_encoder_pretrain import GAUAlphaConfig, RoFormerV2Config


def rms_norm(x, eps):
  """x / sqrt(mean(x^2) + eps) over the last axis, computed in float32."""
  xf = x.float()
  return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope_sin_cos(length, dim, device):
  """(sin, cos) [length, dim / 2] of position * 10000^(-2i/dim) (frequencies in float64, then
  float32, as the suite computes them)."""
  inv = torch.pow(10000.0, -torch.arange(0, dim, 2, dtype=torch.float64) / dim).float()
  angles = torch.arange(length, dtype=torch.float32)[:, None] * inv[None]
  return angles.sin().to(device), angles.cos().to(device)


def apply_rope(x, sin, cos):
  """Rotates the interleaved pairs (2i, 2i+1) of x [..., n, dim] by sin/cos [n, dim / 2]."""
  xf = x.float()
  x1, x2 = xf[..., 0::2], xf[..., 1::2]
  out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).flatten(-2)
  return out.to(x.dtype)


def key_mask(attention_mask, input_ids):
  """Boolean [b, 1, n] of the keys a query may see (all when attention_mask is None)."""
  if attention_mask is None:
    return torch.ones_like(input_ids, dtype=torch.bool)[:, None, :]
  return attention_mask.bool()[:, None, :]


class Embeddings(nn.Module):
  """Word plus token-type embeddings, then the parameter-free RMS norm."""

  def __init__(self, config):
    super().__init__()
    self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
    self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
    self.dropout = nn.Dropout(config.hidden_dropout_prob)
    self.eps = config.layer_norm_eps

  def forward(self, input_ids, token_type_ids=None):
    if token_type_ids is None:
      token_type_ids = torch.zeros_like(input_ids)
    x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
    return self.dropout(rms_norm(x, self.eps))


# ----------------------------------------------------------------------------- RoFormer-v2


class RoFormerV2SelfAttention(nn.Module):
  def __init__(self, config):
    super().__init__()
    d = config.hidden_size
    self.num_heads = config.num_attention_heads
    self.head_dim = d // self.num_heads
    self.query = nn.Linear(d, d, bias=False)
    self.key = nn.Linear(d, d, bias=False)
    self.value = nn.Linear(d, d, bias=False)
    self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

  def forward(self, x, mask, sin, cos):
    b, n, _ = x.shape
    split = lambda t: t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # noqa: E731
    q = apply_rope(split(self.query(x)), sin, cos)
    k = apply_rope(split(self.key(x)), sin, cos)
    v = split(self.value(x))
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
    scores = scores.masked_fill(~mask[:, None], torch.finfo(scores.dtype).min)
    probs = self.dropout(scores.softmax(-1))
    return torch.matmul(probs, v).transpose(1, 2).reshape(b, n, -1)


class DenseHolder(nn.Module):
  """One bias-free `dense` layer under the name the ports' state dicts use
  (attention.output.dense, intermediate.dense, output.dense)."""

  def __init__(self, in_features, out_features):
    super().__init__()
    self.dense = nn.Linear(in_features, out_features, bias=False)


class RoFormerV2Attention(nn.Module):
  def __init__(self, config):
    super().__init__()
    self.self = RoFormerV2SelfAttention(config)
    self.output = DenseHolder(config.hidden_size, config.hidden_size)


class RoFormerV2Layer(nn.Module):
  def __init__(self, config):
    super().__init__()
    self.attention = RoFormerV2Attention(config)
    self.intermediate = DenseHolder(config.hidden_size, config.intermediate_size)
    self.output = DenseHolder(config.intermediate_size, config.hidden_size)
    self.act = ACT2FN[config.hidden_act]
    self.dropout = nn.Dropout(config.hidden_dropout_prob)
    self.eps = config.layer_norm_eps

  def forward(self, x, mask, sin, cos):
    att = self.attention.output.dense(self.attention.self(x, mask, sin, cos))
    x = rms_norm(x + self.dropout(att), self.eps)
    mlp = self.output.dense(self.act(self.intermediate.dense(x)))
    return rms_norm(x + self.dropout(mlp), self.eps)


class RoFormerV2Encoder(nn.Module):
  def __init__(self, config):
    super().__init__()
    self.layer = nn.ModuleList([RoFormerV2Layer(config) for _ in range(config.num_hidden_layers)])


# ----------------------------------------------------------------------------- GAU-alpha


class ScaleOffset(nn.Module):
  """gamma * z, one gamma [s] per use (no offset: the export is bias-free)."""

  def __init__(self, size):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(size))

  def forward(self, z):
    return z * self.weight


class GatedAttentionUnit(nn.Module):
  def __init__(self, config):
    super().__init__()
    d, e, s = config.hidden_size, config.intermediate_size, config.attention_key_size
    self.e, self.s = e, s
    self.i_dense = nn.Linear(d, 2 * e + s, bias=False)
    self.o_dense = nn.Linear(e, d, bias=False)
    self.q_scaleoffset = ScaleOffset(s)
    self.k_scaleoffset = ScaleOffset(s)
    self.act = ACT2FN[config.hidden_act]
    self.normalization = config.normalization
    self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

  def forward(self, x, mask, sin, cos):
    u, v, z = self.act(self.i_dense(x)).split([self.e, self.e, self.s], dim=-1)
    q = apply_rope(self.q_scaleoffset(z), sin, cos)
    k = apply_rope(self.k_scaleoffset(z), sin, cos)
    scores = torch.matmul(q, k.transpose(-1, -2)).float()
    num_keys = mask.sum(-1, keepdim=True).float()  # [b, 1, 1]: the keys each query sees
    if self.normalization == 'squared_relu':
      a = torch.relu(scores / math.sqrt(self.s)).square()
      a = a.masked_fill(~mask, 0.0) / num_keys.clamp(min=1.0)
    else:
      scale = 1.0 / math.sqrt(self.s)
      if self.normalization == 'softmax_plus':
        scale = torch.log(num_keys.clamp(min=16.0)) / math.log(512.0) * scale
      scores = (scores * scale).masked_fill(~mask, torch.finfo(scores.dtype).min)
      a = scores.softmax(-1)
    a = self.dropout(a).to(v.dtype)
    return self.o_dense(u * torch.matmul(a, v))


class GAUAlphaLayer(nn.Module):
  def __init__(self, config):
    super().__init__()
    self.gau = GatedAttentionUnit(config)
    self.dropout = nn.Dropout(config.hidden_dropout_prob)
    self.eps = config.layer_norm_eps

  def forward(self, x, mask, sin, cos):
    return rms_norm(x + self.dropout(self.gau(x, mask, sin, cos)), self.eps)


class GAUAlphaEncoder(nn.Module):
  def __init__(self, config):
    super().__init__()
    self.layer = nn.ModuleList([GAUAlphaLayer(config) for _ in range(config.num_hidden_layers)])


# ----------------------------------------------------------------------------- models


class _PreTrainedModel(PreTrainedModel):
  """Initialisation for training from scratch: normal(initializer_range) matrices."""

  def _init_weights(self, module):
    std = self.config.initializer_range
    if isinstance(module, (nn.Linear, nn.Embedding)):
      nn.init.normal_(module.weight, mean=0.0, std=std)
    elif isinstance(module, ScaleOffset):
      nn.init.ones_(module.weight)


class _Model(_PreTrainedModel):
  """The encoder: input_ids [b, n] (int64) -> last_hidden_state [b, n, hidden_size]."""

  encoder_class = None

  def __init__(self, config):
    super().__init__(config)
    self.embeddings = Embeddings(config)
    self.encoder = self.encoder_class(config)
    self.rope_dim = self.rope_dim_of(config)
    self.post_init()

  def get_input_embeddings(self):
    return self.embeddings.word_embeddings

  def set_input_embeddings(self, value):
    self.embeddings.word_embeddings = value

  def forward(
    self,
    input_ids=None,
    attention_mask=None,
    token_type_ids=None,
    output_hidden_states=None,
    return_dict=None,
    **kwargs,
  ):
    """input_ids, attention_mask (1 = token, 0 = padding), token_type_ids: [b, n]."""
    x = self.embeddings(input_ids, token_type_ids)
    mask = key_mask(attention_mask, input_ids)
    sin, cos = rope_sin_cos(input_ids.shape[1], self.rope_dim, x.device)
    states = [x]
    for layer in self.encoder.layer:
      x = layer(x, mask, sin, cos)
      states.append(x)
    return BaseModelOutput(
      last_hidden_state=x, hidden_states=tuple(states) if output_hidden_states else None
    )


class _ForMaskedLM(_PreTrainedModel):
  """Masked LM: logits [b, n, vocab_size] = hidden states times the word embeddings^T."""

  model_class = None

  def __init__(self, config):
    super().__init__(config)
    setattr(self, self.base_model_prefix, self.model_class(config))
    self.cls = nn.Module()
    self.cls.predictions = nn.Module()
    self.cls.predictions.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    self.post_init()

  def get_output_embeddings(self):
    return self.cls.predictions.decoder

  def set_output_embeddings(self, value):
    self.cls.predictions.decoder = value

  def forward(
    self,
    input_ids=None,
    attention_mask=None,
    token_type_ids=None,
    labels=None,
    output_hidden_states=None,
    return_dict=None,
    **kwargs,
  ):
    """labels [b, n]: token ids where the loss counts, -100 elsewhere (cross-entropy mean)."""
    out = getattr(self, self.base_model_prefix)(
      input_ids, attention_mask, token_type_ids, output_hidden_states
    )
    logits = self.cls.predictions.decoder(out.last_hidden_state)
    loss = None
    if labels is not None:
      loss = nn.functional.cross_entropy(
        logits.view(-1, logits.shape[-1]).float(), labels.view(-1), ignore_index=-100
      )
    return MaskedLMOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


class RoFormerV2PreTrainedModel(_PreTrainedModel):
  config_class = RoFormerV2Config
  base_model_prefix = 'roformer'


class RoFormerV2Model(RoFormerV2PreTrainedModel, _Model):
  encoder_class = RoFormerV2Encoder

  @staticmethod
  def rope_dim_of(config):
    return config.hidden_size // config.num_attention_heads


class RoFormerV2ForMaskedLM(RoFormerV2PreTrainedModel, _ForMaskedLM):
  model_class = RoFormerV2Model
  _tied_weights_keys = {
    'cls.predictions.decoder.weight': 'roformer.embeddings.word_embeddings.weight'
  }


class GAUAlphaPreTrainedModel(_PreTrainedModel):
  config_class = GAUAlphaConfig
  base_model_prefix = 'gau_alpha'


class GAUAlphaModel(GAUAlphaPreTrainedModel, _Model):
  encoder_class = GAUAlphaEncoder

  @staticmethod
  def rope_dim_of(config):
    return config.attention_key_size


class GAUAlphaForMaskedLM(GAUAlphaPreTrainedModel, _ForMaskedLM):
  model_class = GAUAlphaModel
  _tied_weights_keys = {
    'cls.predictions.decoder.weight': 'gau_alpha.embeddings.word_embeddings.weight'
  }
