"""Our parameter trees in Hugging Face / PyTorch layout: names, shapes and config.json.

  hf_export.check_exportable(config)                 # ExportError naming the field
  state_dict = hf_export.to_torch(params, config)    # {PyTorch name: float32 ndarray}
  hf_config = hf_export.hf_config(config, pad_token_id=0, max_position_embeddings=1536)

Three layouts (docs/huggingface.md 2-3), one per family:

  roformer     transformers' RoFormerForMaskedLM (PyTorch) / FlaxRoFormerForMaskedLM
  roformer_v2  the `roformer` package's RoFormerForMaskedLM with norm_type='rms_norm'
               (JunnYu/RoFormer_pytorch >= 0.4, the port of ZhuiyiTechnology/roformer-v2)
  gau          the `gau-alpha` package's GAUAlphaForMaskedLM (JunnYu/GAU-alpha-pytorch, the
               port of ZhuiyiTechnology/GAU-alpha)

Only v1 carries a model_type that transformers knows ('roformer'). transformers has no
RoFormer-v2 or GAU-alpha class, and its RoFormer would load a v2 directory with model_type
'roformer' as v1 (fresh LayerNorms and biases, another function), so the v2 and GAU-alpha
config.json name model types it does not know ('roformer_v2', 'gau_alpha', see MODEL_TYPES)
and an `auto_map` into the PyTorch code the export carries (REMOTE_CODE_FILES, from
models/hf_remote/): AutoModel* build the right model with trust_remote_code=True and refuse
the directory without it. `port_config` maps our 'roformer_v2' back to the port's convention
for import.

PyTorch `nn.Linear` stores weight [out, in] for y = x W^T + b; our Dense kernels are
[in..., out...] for y = x K + b, so weight = K.reshape(prod(in), prod(out)).T (query
[d, h, d_h] -> [h d_h, d]; attention output [h, d_h, d] -> [d, h d_h]). LayerNorm scale is
`weight`, embeddings are `weight` [V, d] unchanged. RoPE needs no permutation: every layout
rotates interleaved pairs (2i, 2i+1) of each head (GAU-alpha's port concatenates the rotated
halves afterwards, which permutes q and k alike and leaves q.k unchanged).

Pure NumPy on host arrays: no file is read here (pretrain/hf_io.py does the I/O).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

# model.mlp_activation (or gau_activation) -> Hugging Face hidden_act.
ACT_TO_HF = {'gelu': 'gelu', 'gelu_tanh': 'gelu_new', 'relu': 'relu', 'swish': 'swish'}
# Hugging Face hidden_act -> ours (the names transformers' ACT2FN gives the same function).
ACT_FROM_HF = {
  'gelu': 'gelu',
  'gelu_new': 'gelu_tanh',
  'gelu_pytorch_tanh': 'gelu_tanh',
  'relu': 'relu',
  'swish': 'swish',
  'silu': 'swish',
}
# GAU attention_norm -> the gau-alpha port's `normalization`.
GAU_NORM_TO_HF = {'softmax_plus': 'softmax_plus', 'relu2': 'squared_relu', 'softmax': 'softmax'}
GAU_NORM_FROM_HF = {v: k for k, v in GAU_NORM_TO_HF.items()}
PREFIX = {'roformer': 'roformer', 'roformer_v2': 'roformer', 'gau': 'gau_alpha'}
# config.json (model_type, architectures) per family. Only 'roformer' is a transformers model
# type; the others are names transformers does not know, so that its Auto classes refuse them.
MODEL_TYPES = {
  'roformer': ('roformer', 'RoFormerForMaskedLM'),
  'roformer_v2': ('roformer_v2', 'RoFormerV2ForMaskedLM'),
  'gau': ('gau_alpha', 'GAUAlphaForMaskedLM'),
}
# The PyTorch code a RoFormer-v2 or GAU-alpha export carries (files of models/hf_remote/,
# copied by pretrain/hf_io.py) and the classes config.json's auto_map names in it.
REMOTE_CODE_FILES = ('configuration_encoder_pretrain.py', 'modeling_encoder_pretrain.py')
AUTO_MAP = {
  family: {
    'AutoConfig': f'configuration_encoder_pretrain.{name}Config',
    'AutoModel': f'modeling_encoder_pretrain.{name}Model',
    'AutoModelForMaskedLM': f'modeling_encoder_pretrain.{name}ForMaskedLM',
  }
  for family, name in (('roformer_v2', 'RoFormerV2'), ('gau', 'GAUAlpha'))
}
# What export supports, for refusal messages.
SUPPORTED = (
  'export supports RoFormer v1 (post-LN, LayerNorm, biases: loads with transformers), '
  "RoFormer-v2 (bias-free, parameter-free RMS norm: the `roformer` package's layout) and "
  "GAU-alpha (the `gau-alpha` package's layout), masked LM, RoPE base 10000"
)
ROPE_BASE = 10000.0  # fixed in all three PyTorch implementations


class ExportError(ValueError):
  """The config has no counterpart in the target layout; the message names the field."""


@dataclasses.dataclass(frozen=True)
class Entry:
  """One PyTorch tensor and where it lives in our tree.

  Attributes:
    name: the state-dict name, e.g. 'roformer.encoder.layer.0.attention.self.query.weight'.
    path: our parameter path with the layer index unstacked, e.g.
      ('layers', 0, 'attention', 'query', 'kernel').
    kind: 'copy' (same array), 'flat' (a bias [h, d_h] -> [h d_h]), 'dense' (kernel ->
      [out, in] weight; `arg` = number of input axes of our kernel), or 'row' (row `arg` of
      our [k, s] leaf, GAU's q/k scale-offset).
    arg: see kind.
  """

  name: str
  path: tuple
  kind: str = 'copy'
  arg: int = 0


def _norm(name: str, path: tuple, use_params: bool) -> list[Entry]:
  if not use_params:
    return []
  return [Entry(f'{name}.weight', path + ('scale',)), Entry(f'{name}.bias', path + ('bias',))]


def _dense(name: str, path: tuple, n_in: int, bias: bool) -> list[Entry]:
  out = [Entry(f'{name}.weight', path + ('kernel',), 'dense', n_in)]
  return out + ([Entry(f'{name}.bias', path + ('bias',), 'flat')] if bias else [])


def layout(config) -> list[Entry]:
  """Every tensor of the family's PyTorch layout for `config` (tied weights once: the word
  embeddings; the decoder copy and position tables are added by `to_torch`)."""
  m = config.model
  family, bias, v1 = m.family, bool(m.use_bias), m.family == 'roformer'
  p = PREFIX[family]
  entries = [Entry(f'{p}.embeddings.word_embeddings.weight', ('embedder', 'token', 'embedding'))]
  if m.type_vocab_size > 0:
    entries.append(
      Entry(f'{p}.embeddings.token_type_embeddings.weight', ('embedder', 'token_type', 'embedding'))
    )
  entries += _norm(f'{p}.embeddings.LayerNorm', ('embedder', 'norm'), v1)
  for i in range(m.num_layers):
    layer = ('layers', i)
    if family == 'gau':
      base = f'{p}.encoder.layer.{i}.gau'
      entries += _dense(f'{base}.i_dense', layer + ('uvz',), 1, bias)
      entries += _dense(f'{base}.o_dense', layer + ('out',), 1, bias)
      for row, which in enumerate(('q', 'k')):
        entries.append(
          Entry(f'{base}.{which}_scaleoffset.weight', layer + ('qk', 'scale'), 'row', row)
        )
        if bias:
          entries.append(
            Entry(f'{base}.{which}_scaleoffset.bias', layer + ('qk', 'bias'), 'row', row)
          )
      continue
    base = f'{p}.encoder.layer.{i}'
    for which in ('query', 'key', 'value'):
      entries += _dense(f'{base}.attention.self.{which}', layer + ('attention', which), 1, bias)
    entries += _dense(f'{base}.attention.output.dense', layer + ('attention', 'out'), 2, bias)
    entries += _norm(f'{base}.attention.output.LayerNorm', layer + ('attention_norm',), v1)
    entries += _dense(f'{base}.intermediate.dense', layer + ('mlp', 'wi'), 1, bias)
    entries += _dense(f'{base}.output.dense', layer + ('mlp', 'wo'), 1, bias)
    entries += _norm(f'{base}.output.LayerNorm', layer + ('mlp_norm',), v1)
  if v1:
    entries += _dense('cls.predictions.transform.dense', ('head', 'transform'), 1, True)
    entries += _norm('cls.predictions.transform.LayerNorm', ('head', 'norm'), True)
    entries.append(Entry('cls.predictions.bias', ('head', 'bias')))
  return entries


def check_exportable(config) -> None:
  """Raises ExportError unless `config` is expressible in its family's PyTorch layout.

  Refused: objective 'clm'; DeepNorm residuals; entropy-invariant softmax scale; learned
  absolute positions (model.position_embedding='learned': every layout is RoPE-only); a RoPE
  base other than 10000; v1 without LayerNorm and biases or with head_dim * num_heads != hidden;
  v2 / GAU with biases (the ports' MLM heads have none) or a norm other than the
  parameter-free RMS norm; FLASH (chunk_size > 0); activations without a transformers name.
  """
  m = config.model
  fix = {
    'roformer': 'launch/configs/roformer.py',
    'roformer_v2': 'launch/configs/roformer_v2.py',
    'gau': 'launch/configs/gau.py',
  }.get(m.family)
  if fix is None:
    raise ExportError(f'model.family={m.family!r} has no Hugging Face layout here; {SUPPORTED}.')
  target = {
    'roformer': "transformers' RoFormer",
    'roformer_v2': "the roformer package's RoFormerV2",
    'gau': 'the gau-alpha package',
  }[m.family]

  def refuse(what: str):
    raise ExportError(
      f'{what}, which {target} cannot express; this run cannot be exported '
      f'(train with the defaults of {fix} for an exportable model; {SUPPORTED}).'
    )

  if config.objective != 'mlm':
    refuse(
      f'objective={config.objective!r} trains a causal model, but the exported classes '
      'are bidirectional masked LMs'
    )
  if m.residual != 'post_ln':
    refuse(f'model.residual={m.residual!r} (DeepNorm scales the residual by alpha)')
  if m.position_embedding != 'rope':
    refuse(
      f'model.position_embedding={m.position_embedding!r} (a learned absolute position '
      'table with rotary off; the layout has RoPE and no position table)'
    )
  if float(m.rotary_base) != ROPE_BASE:
    refuse(f'model.rotary_base={m.rotary_base} (the PyTorch code fixes it at 10000)')
  if m.family == 'gau':
    if m.chunk_size > 0:
      refuse(
        f'model.chunk_size={m.chunk_size} (FLASH mixed-chunk attention with four scale-offsets)'
      )
    if m.gau_activation not in ACT_TO_HF:
      refuse(f'model.gau_activation={m.gau_activation!r}')
  else:
    if m.attention_scale != 'standard':
      refuse(f'model.attention_scale={m.attention_scale!r} (log-length scaled softmax)')
    head_dim = m.head_dim or m.hidden_size // m.num_heads
    if head_dim * m.num_heads != m.hidden_size:
      refuse(f'num_heads * head_dim = {m.num_heads} * {head_dim} != hidden_size={m.hidden_size}')
    if m.mlp_activation not in ACT_TO_HF:
      refuse(f'model.mlp_activation={m.mlp_activation!r}')
  if m.family == 'roformer':
    if m.norm_type != 'layernorm' or not m.use_bias:
      refuse(
        f'model.norm_type={m.norm_type!r}, model.use_bias={m.use_bias} (RoFormer v1 has '
        'LayerNorm and biases)'
      )
  else:
    if m.norm_type != 'rmsnorm_noparam':
      refuse(f'model.norm_type={m.norm_type!r} (the port has only the parameter-free RMS norm)')
    if m.use_bias:
      refuse('model.use_bias=True (the MLM head gets a bias, the port has none)')


def hf_config(config, *, pad_token_id: int, max_position_embeddings: int) -> dict:
  """The config.json of the family's PyTorch layout (see the module docstring); RoFormer-v2
  and GAU-alpha add `auto_map` (AUTO_MAP), so the export must carry REMOTE_CODE_FILES.

  Args:
    config: the run's ConfigDict; pad_token_id: the tokenizer's [PAD] id;
    max_position_embeddings: length of the RoPE tables the PyTorch code precomputes (our
      model has no limit).

  Raises:
    ExportError: see check_exportable.
  """
  check_exportable(config)
  m = config.model
  common = {
    'vocab_size': int(m.vocab_size),
    'hidden_size': int(m.hidden_size),
    'embedding_size': int(m.hidden_size),
    'num_hidden_layers': int(m.num_layers),
    'max_position_embeddings': int(max_position_embeddings),
    'type_vocab_size': max(1, int(m.type_vocab_size)),
    'initializer_range': float(m.initializer_range),
    'layer_norm_eps': float(m.norm_eps),
    'hidden_dropout_prob': float(m.dropout_rate),
    'attention_probs_dropout_prob': float(m.dropout_rate),
    'pad_token_id': int(pad_token_id),
    'tie_word_embeddings': True,
    # transformers >= 4.56 reads `dtype` (`torch_dtype` is deprecated there and in 5); older
    # versions ignore it and load float32, the default.
    'dtype': 'float32',
  }
  if m.family == 'gau':
    if m.attention_norm == 'softmax' and m.attention_scale == 'entropy_invariant':
      normalization = 'softmax_plus'
    else:
      normalization = GAU_NORM_TO_HF[m.attention_norm]
    return {
      'architectures': [MODEL_TYPES['gau'][1]],
      'model_type': MODEL_TYPES['gau'][0],
      'auto_map': AUTO_MAP['gau'],
      **common,
      'intermediate_size': int(m.expansion_factor) * int(m.hidden_size),
      'attention_key_size': int(m.shared_dim),
      'hidden_act': ACT_TO_HF[m.gau_activation],
      'normalization': normalization,
      'attention_scale': True,
      'use_bias': False,
      'classifier_dropout': 0.1,
    }
  model_type, architecture = MODEL_TYPES[m.family]
  out = {
    'architectures': [architecture],
    'model_type': model_type,
    **common,
    'num_attention_heads': int(m.num_heads),
    'intermediate_size': int(m.mlp_dim),
    'hidden_act': ACT_TO_HF[m.mlp_activation],
    'rotary_value': False,
    'use_cache': True,
  }
  if m.family == 'roformer_v2':
    out.update(norm_type='rms_norm', use_bias=False, auto_map=AUTO_MAP['roformer_v2'])
  return out


def port_config(hf: dict) -> dict:
  """config.json in the ports' convention, which `hf_import.model_fields` reads: our
  model_type 'roformer_v2' becomes the `roformer` package's model_type 'roformer' with
  norm_type 'rms_norm'; any other config is returned as is."""
  if isinstance(hf, dict) and hf.get('model_type') == MODEL_TYPES['roformer_v2'][0]:
    return {**hf, 'model_type': 'roformer', 'norm_type': 'rms_norm'}
  return hf


def per_layer(params: dict, num_layers: int) -> dict:
  """A pure param dict with `layers` as {i: tree} (unstacking a scan_layers [L, ...] tree)."""
  layers = params['layers']
  if isinstance(layers, dict) and set(layers) == set(range(num_layers)):
    return params
  if isinstance(layers, (list, tuple)):
    return {**params, 'layers': dict(enumerate(layers))}

  def take(tree, i):
    return {k: take(v, i) if isinstance(v, dict) else np.asarray(v)[i] for k, v in tree.items()}

  return {**params, 'layers': {i: take(layers, i) for i in range(num_layers)}}


def _get(tree: dict, path: tuple):
  for key in path:
    tree = tree[key]
  return np.asarray(tree)


def export_array(value: np.ndarray, entry: Entry) -> np.ndarray:
  """Our leaf -> the PyTorch tensor of `entry` (float32, C-contiguous)."""
  value = np.asarray(value, np.float32)
  if entry.kind == 'dense':
    n_in = math.prod(value.shape[: entry.arg])
    value = value.reshape(n_in, -1).T
  elif entry.kind == 'row':
    value = value[entry.arg]
  elif entry.kind == 'flat':
    value = value.reshape(-1)
  return np.ascontiguousarray(value)


def rope_table(num_positions: int, dim: int) -> np.ndarray:
  """transformers' RoFormerSinusoidalPositionalEmbedding weight [P, d_h] (float32): sin of
  pos * 10000^(-2i/d_h) in the first half, cos in the second (computed in float64)."""
  j = np.arange(dim)
  enc = np.arange(num_positions)[:, None] / np.power(10000.0, 2 * (j // 2) / dim)[None]
  out = np.empty((num_positions, dim), np.float32)
  half = dim // 2 + dim % 2
  out[:, :half] = np.sin(enc[:, 0::2])
  out[:, half:] = np.cos(enc[:, 1::2])
  return out


def to_torch(params: dict, config, max_position_embeddings: int = 1536) -> dict:
  """Our pure param dict (stacked or per-layer) -> {PyTorch name: float32 ndarray}.

  Adds what the PyTorch classes expect besides the trained tensors: transformers' RoFormer
  position table `roformer.encoder.embed_positions.weight` [P, d_h] (v1); the tied decoder
  `cls.predictions.decoder.weight` (v2 and GAU ports, which do not declare it tied); a zero
  [1, d] token-type table when model.type_vocab_size = 0.

  Raises:
    ExportError: see check_exportable.
  """
  check_exportable(config)
  m = config.model
  tree = per_layer(params, m.num_layers)
  out = {e.name: export_array(_get(tree, e.path), e) for e in layout(config)}
  p = PREFIX[m.family]
  if m.type_vocab_size == 0:
    out[f'{p}.embeddings.token_type_embeddings.weight'] = np.zeros((1, m.hidden_size), np.float32)
  if m.family == 'roformer':
    head_dim = m.hidden_size // m.num_heads
    out['roformer.encoder.embed_positions.weight'] = rope_table(max_position_embeddings, head_dim)
  else:
    out['cls.predictions.decoder.weight'] = out[f'{p}.embeddings.word_embeddings.weight'].copy()
  return out
