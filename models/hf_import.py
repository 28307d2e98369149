"""Hugging Face / PyTorch RoFormer, RoFormer-v2 and GAU-alpha parameters into our trees.

  family, fields = hf_import.model_fields(hf_config)           # config.json -> config.model
  params, report = hf_import.from_torch(state_dict, config)    # PyTorch names -> our tree
  state_dict = hf_import.torch_names_from_flax(flax_params)    # flax_model.msgpack -> names

The layouts and the name table are `models.hf_export.layout` (docs/huggingface.md 2): import
is its exact inverse, so ours -> export -> import is bit-identical.

HF's Flax RoFormer applies RoPE in the *interleaved* layout (it builds
sin_pos = [s0, s0, s1, s1, ...] and rotate_half = [-x1, x0, -x3, x2, ...] per head, with
theta_i = 10000^(-2i/d_h) over the head size), which is exactly models/rope.py, so query/key
kernels need no column permutation. (A LLaMA-style "rotate_half" checkpoint would need
`rope.rotate_half_to_interleaved` applied to the head-dim columns of W_q, W_k and their biases;
see `permute_qk_rotate_half`.) HF's rotary base is fixed at 10000: set model.rotary_base=10000.

`roformer_from_hf(hf_model.params, config)` maps the Flax FlaxRoFormerForMaskedLM tree
directly (the golden test). Pure NumPy: no file is read here (pretrain/hf_io.py and
pretrain/hf_weights.py do the I/O).
"""

from __future__ import annotations

import copy
import re
from typing import Any

import numpy as np

from models import hf_export
from models import rope


def _np(x):
  return np.asarray(x)


def _layer(hf_layer: dict, h: int, d_h: int) -> dict:
  att = hf_layer['attention']
  d = _np(att['self']['query']['kernel']).shape[0]

  def qkv(name):
    p = att['self'][name]
    return {'kernel': _np(p['kernel']).reshape(d, h, d_h), 'bias': _np(p['bias']).reshape(h, d_h)}

  out = att['output']
  ffn_in, ffn_out = hf_layer['intermediate']['dense'], hf_layer['output']['dense']
  return {
    'attention': {
      'query': qkv('query'),
      'key': qkv('key'),
      'value': qkv('value'),
      'out': {
        'kernel': _np(out['dense']['kernel']).reshape(h, d_h, d),
        'bias': _np(out['dense']['bias']),
      },
    },
    'attention_norm': {
      'scale': _np(out['LayerNorm']['scale']),
      'bias': _np(out['LayerNorm']['bias']),
    },
    'mlp': {
      'wi': {'kernel': _np(ffn_in['kernel']), 'bias': _np(ffn_in['bias'])},
      'wo': {'kernel': _np(ffn_out['kernel']), 'bias': _np(ffn_out['bias'])},
    },
    'mlp_norm': {
      'scale': _np(hf_layer['output']['LayerNorm']['scale']),
      'bias': _np(hf_layer['output']['LayerNorm']['bias']),
    },
  }


def roformer_from_hf(hf_params: dict, config) -> dict:
  """HF FlaxRoFormerForMaskedLM params -> our pure param dict (numpy arrays).

  The layout (stacked [L, ...] vs {0: ..., 1: ...}) follows config.model.scan_layers.
  Requires tied word embeddings (HF's default) and embedding_size == hidden_size.

  Raises:
    ValueError: shapes that do not match config.model, or an untied decoder.
  """
  m = config.model
  h = m.num_heads
  d_h = m.head_dim or m.hidden_size // h
  if h * d_h != m.hidden_size:
    raise ValueError(
      f'HF RoFormer needs num_heads * head_dim == hidden_size, got {h} * {d_h} '
      f'!= {m.hidden_size}; set model.head_dim=0'
    )
  if m.rotary_base != 10000.0:
    raise ValueError(
      f'HF RoFormer uses RoPE base 10000 but model.rotary_base={m.rotary_base}; '
      'set model.rotary_base=10000'
    )
  rf = hf_params['roformer']
  emb = rf['embeddings']
  word = _np(emb['word_embeddings']['embedding'])
  if word.shape != (m.vocab_size, m.hidden_size):
    raise ValueError(
      f'HF word embeddings have shape {word.shape} but model.vocab_size, '
      f'model.hidden_size = {(m.vocab_size, m.hidden_size)}; match the config'
    )
  pred = hf_params['cls']['predictions']
  if 'decoder' in pred:
    raise ValueError('the HF checkpoint has an untied decoder; only tied embeddings are supported')
  embedder = {
    'token': {'embedding': word},
    'norm': {'scale': _np(emb['LayerNorm']['scale']), 'bias': _np(emb['LayerNorm']['bias'])},
  }
  if m.type_vocab_size > 0:
    tt = _np(emb['token_type_embeddings']['embedding'])
    if tt.shape[0] != m.type_vocab_size:
      raise ValueError(
        f'HF type vocab size is {tt.shape[0]} but model.type_vocab_size='
        f'{m.type_vocab_size}; set model.type_vocab_size={tt.shape[0]}'
      )
    embedder['token_type'] = {'embedding': tt}
  hf_layers = rf['encoder']['layer']
  if len(hf_layers) != m.num_layers:
    raise ValueError(
      f'HF checkpoint has {len(hf_layers)} layers but model.num_layers='
      f'{m.num_layers}; set model.num_layers={len(hf_layers)}'
    )
  per_layer = [_layer(hf_layers[str(i)], h, d_h) for i in range(m.num_layers)]
  if m.scan_layers:
    import jax  # pylint: disable=g-import-not-at-top

    layers_tree = jax.tree.map(lambda *xs: np.stack(xs), *per_layer)
  else:
    layers_tree = dict(enumerate(per_layer))
  tr = pred['transform']
  head = {
    'transform': {'kernel': _np(tr['dense']['kernel']), 'bias': _np(tr['dense']['bias'])},
    'norm': {'scale': _np(tr['LayerNorm']['scale']), 'bias': _np(tr['LayerNorm']['bias'])},
    'bias': _np(pred['bias']),
  }
  return {'embedder': embedder, 'layers': layers_tree, 'head': head}


def permute_qk_rotate_half(params_qk: dict, to_interleaved: bool = True) -> dict:
  """Permutes the head-dim axis (last) of a query/key {'kernel', 'bias'} between layouts."""
  d_h = params_qk['kernel'].shape[-1]
  perm = (
    rope.rotate_half_to_interleaved(d_h) if to_interleaved else rope.interleaved_to_rotate_half(d_h)
  )
  return {k: v[..., perm] for k, v in params_qk.items()}


class FormatError(ValueError):
  """A checkpoint that is not a supported layout, or does not match its config.json; the
  message names the file or field and the fix."""


def _act(hf: dict, key: str = 'hidden_act') -> str:
  act = hf.get(key, 'gelu')
  if not isinstance(act, str) or act not in hf_export.ACT_FROM_HF:  # a list is unhashable
    raise FormatError(
      f'config.json {key}={act!r} has no counterpart here; supported: '
      f'{", ".join(hf_export.ACT_FROM_HF)}.'
    )
  return hf_export.ACT_FROM_HF[act]


def model_fields(hf: dict) -> tuple[str, dict[str, Any]]:
  """Our family and `config.model` fields for a Hugging Face config.json (a dict).

  model_type 'roformer' is RoFormer v1, or RoFormer-v2 when norm_type is 'rms_norm' (the
  `roformer` package's convention); 'gau_alpha' is GAU-alpha (the `gau-alpha` package).

  Returns:
    (family, {field: value}) with every field that fixes the function the weights compute
    (shape, norm, biases, activation, attention normalisation, RoPE base 10000) plus
    dropout_rate and initializer_range.

  Raises:
    FormatError: another model type, or a feature without a counterpart here (rotary_value,
      embedding_size != hidden_size, a decoder, biases in v2 / GAU-alpha, ...).
  """
  model_type = hf.get('model_type')

  def need(key):
    if key not in hf:
      raise FormatError(f'config.json has no {key!r}; it is not a complete {model_type} config.')
    return hf[key]

  # A size that is a string, null or 0 would otherwise end in a traceback (int('x'), x % 0).
  def count(key, default=None, minimum=1):
    value = need(key) if default is None else hf.get(key, default)
    whole = (isinstance(value, int) and not isinstance(value, bool)) or (
      isinstance(value, float) and value.is_integer()
    )
    if not whole or value < minimum:
      raise FormatError(f'config.json {key}={value!r} must be an integer >= {minimum}.')
    return int(value)

  def real(key, default):
    value = hf.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
      raise FormatError(f'config.json {key}={value!r} must be a number >= 0.')
    return float(value)

  hidden = count('hidden_size')
  common = {
    'vocab_size': count('vocab_size'),
    'hidden_size': hidden,
    'num_layers': count('num_hidden_layers'),
    'type_vocab_size': count('type_vocab_size', 2, minimum=0),
    'norm_eps': real('layer_norm_eps', 1e-12),
    'dropout_rate': real('hidden_dropout_prob', 0.1),
    'initializer_range': real('initializer_range', 0.02),
    'residual': 'post_ln',
    'rotary_base': hf_export.ROPE_BASE,
    'attention_scale': 'standard',
  }
  embedding = count('embedding_size', hidden) if hf.get('embedding_size') else hidden
  if embedding != hidden:
    raise FormatError(
      f'config.json embedding_size={embedding} != hidden_size={hidden}: the '
      'factorised embedding (embeddings_project) has no counterpart here.'
    )
  if hf.get('is_decoder') or hf.get('add_cross_attention'):
    raise FormatError(
      'config.json describes a decoder (is_decoder / add_cross_attention); '
      'convert reads bidirectional masked-LM encoders.'
    )
  if model_type == 'roformer':
    if hf.get('rotary_value'):
      raise FormatError(
        'config.json rotary_value=true (RoPE also on the values, as '
        'roformer_small_generator/discriminator) is not implemented here.'
      )
    heads = count('num_attention_heads')
    if hidden % heads:
      raise FormatError(
        f'config.json num_attention_heads={heads} does not divide hidden_size={hidden}.'
      )
    v2 = hf.get('norm_type', 'layer_norm') == 'rms_norm'
    if hf.get('norm_type', 'layer_norm') not in ('layer_norm', 'rms_norm'):
      raise FormatError(
        f'config.json norm_type={hf["norm_type"]!r}; expected layer_norm '
        '(RoFormer) or rms_norm (RoFormer-v2).'
      )
    if v2 and hf.get('use_bias', False):
      raise FormatError(
        'config.json use_bias=true with norm_type=rms_norm: a RoFormer-v2 with '
        'biases has no counterpart here (our v2 MLM head would gain a bias).'
      )
    fields = dict(
      common,
      num_heads=heads,
      head_dim=0,
      mlp_dim=count('intermediate_size'),
      mlp_activation=_act(hf),
      norm_type='rmsnorm_noparam' if v2 else 'layernorm',
      use_bias=not v2,
    )
    return ('roformer_v2' if v2 else 'roformer'), fields
  if model_type == 'gau_alpha':
    inner = count('intermediate_size')
    if inner % hidden:
      raise FormatError(
        f'config.json intermediate_size={inner} is not a multiple of '
        f'hidden_size={hidden}; our GAU expansion e is an integer multiple.'
      )
    normalization = hf.get('normalization', 'softmax_plus')
    if not isinstance(normalization, str) or normalization not in hf_export.GAU_NORM_FROM_HF:
      raise FormatError(
        f'config.json normalization={normalization!r}; supported: '
        f'{", ".join(hf_export.GAU_NORM_FROM_HF)}.'
      )
    if not hf.get('attention_scale', True):
      raise FormatError(
        'config.json attention_scale=false (no 1/sqrt(s) on Q K^T) has no counterpart here.'
      )
    if hf.get('use_bias', False):
      raise FormatError(
        'config.json use_bias=true: a GAU-alpha with biases has no '
        'counterpart here (our MLM head would gain a bias).'
      )
    act = _act(hf)
    if act not in ('swish', 'relu'):
      raise FormatError(
        f'config.json hidden_act={hf.get("hidden_act")!r}; GAU layers here use swish or relu.'
      )
    key_size = count('attention_key_size', 128)
    fields = dict(
      common,
      expansion_factor=inner // hidden,
      shared_dim=key_size,
      attention_norm=hf_export.GAU_NORM_FROM_HF[normalization],
      gau_activation=act,
      norm_type='rmsnorm_noparam',
      use_bias=False,
      chunk_size=0,
    )
    return 'gau', fields
  raise FormatError(
    f'config.json has model_type={model_type!r}; convert reads RoFormer (model_type '
    "'roformer'; RoFormer-v2 when norm_type is 'rms_norm') and GAU-alpha ('gau_alpha') "
    'checkpoints.'
  )


def _per_layer_shapes(config) -> dict:
  """{path: (shape, dtype)} of our parameters with layers unstacked (no allocation)."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  import models  # pylint: disable=g-import-not-at-top

  config = copy.deepcopy(config)
  config.model.scan_layers = False
  abstract = nnx.eval_shape(lambda: models.build(config, rngs=nnx.Rngs(params=0)))
  tree = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  return {
    path: (tuple(x.shape), np.dtype(x.dtype))
    for path, x in traverse_util.flatten_dict(tree).items()
    if isinstance(x, jax.ShapeDtypeStruct)
  }


def _with_prefix(state_dict: dict, prefix: str) -> dict:
  """Base-model checkpoints (RoFormerModel, GAUAlphaModel) name tensors without the prefix."""
  if any(k.startswith(prefix + '.') for k in state_dict):
    return state_dict
  return {
    (f'{prefix}.{k}' if k.startswith(('embeddings.', 'encoder.')) else k): v
    for k, v in state_dict.items()
  }


def _import_array(value, entry: hf_export.Entry, shape: tuple) -> np.ndarray:
  value = np.asarray(value)
  if entry.kind == 'dense':
    n_in = int(np.prod(shape[: entry.arg]))
    if value.ndim != 2 or value.shape[1] != n_in or value.size != int(np.prod(shape)):
      raise ValueError(value.shape)
    return value.T.reshape(shape)
  if entry.kind == 'flat':
    if value.shape != (int(np.prod(shape)),):
      raise ValueError(value.shape)
    return value.reshape(shape)
  want = shape[1:] if entry.kind == 'row' else shape
  if value.shape != want:
    raise ValueError(value.shape)
  return value


def _expected_torch_shape(entry: hf_export.Entry, shape: tuple) -> tuple:
  if entry.kind == 'dense':
    n_in = int(np.prod(shape[: entry.arg]))
    return (int(np.prod(shape)) // n_in, n_in)
  if entry.kind == 'flat':
    return (int(np.prod(shape)),)
  return tuple(shape[1:] if entry.kind == 'row' else shape)


# Our config.model field -> the config.json key it is read from (for messages).
_HF_KEY = {
  'vocab_size': 'vocab_size',
  'hidden_size': 'hidden_size',
  'num_layers': 'num_hidden_layers',
}


def check_shapes(
  shapes: dict, config, source: str = 'the checkpoint', explicit: frozenset = frozenset()
) -> None:
  """Checks config.model against the tensor shapes of a checkpoint, before anything is built.

  A config.json edited to num_hidden_layers=1000000 would otherwise build a million-layer
  model before `from_torch` noticed; here the sizes are compared with the shapes alone (a
  safetensors header suffices), the layer count and embedding first, so that the abstract
  model traced for the per-tensor comparison is no bigger than the weights.

  Args:
    shapes: {PyTorch name: shape tuple} of the checkpoint (no values needed).
    config: our ConfigDict with `model_fields` applied (`models.validate` passed).
    source: the weights file, for messages.
    explicit: dotted config fields given on the command line (named as --config.model.X
      instead of config.json's key).

  Raises:
    FormatError: no word embeddings, a vocab / hidden size or layer count other than the
      weights', a missing encoder tensor, or a tensor of another shape; the message names the
      config.json field (or flag) and the value the weights imply.
  """
  m = config.model
  prefix = hf_export.PREFIX[m.family]
  shapes = {k: tuple(v) for k, v in _with_prefix(dict(shapes), prefix).items()}

  def wrong(field: str, implied: int, evidence: str):
    if f'model.{field}' in explicit:
      flag = f'--config.model.{field}'
      raise FormatError(
        f'{flag}={m[field]} but {source} {evidence}; set {flag}={implied} or leave the flag out.'
      )
    key = _HF_KEY[field]
    raise FormatError(
      f'config.json: {key}={m[field]} but {source} {evidence}; set {key}='
      f'{implied} (or use the config.json that came with these weights).'
    )

  word = f'{prefix}.embeddings.word_embeddings.weight'
  if word not in shapes:
    raise FormatError(
      f'{source} lacks {word}; it is not a {m.family} checkpoint (its tensors '
      f'include {", ".join(sorted(shapes)[:3]) or "nothing"}).'
    )
  if len(shapes[word]) != 2:
    raise FormatError(f'{source}: {word} has shape {shapes[word]}, not [vocab, hidden].')
  vocab, hidden = shapes[word]
  if hidden != m.hidden_size:
    wrong('hidden_size', hidden, f'holds {word} of shape {shapes[word]}')
  if vocab != m.vocab_size:
    wrong('vocab_size', vocab, f'holds {word} of shape {shapes[word]}')
  layer = re.compile(rf'{re.escape(prefix)}\.encoder\.layer\.(\d+)\.')
  found = sorted({int(x.group(1)) for x in map(layer.match, shapes) if x})
  if len(found) != m.num_layers:
    wrong('num_layers', len(found), f'holds {len(found)} layers ({prefix}.encoder.layer.N)')
  if found != list(range(len(found))):
    raise FormatError(
      f'{source} numbers its layers {", ".join(map(str, found[:8]))}, not 0 to '
      f'{len(found) - 1}; it is incomplete or renamed.'
    )
  # The sizes above bound the abstract model: tracing it is now cheap.
  ours = _per_layer_shapes(config)
  entries = hf_export.layout(config)
  missing = [e.name for e in entries if e.name not in shapes and e.path[0] != 'head']
  if missing:
    shown = ', '.join(missing[:4]) + (f' and {len(missing) - 4} more' if len(missing) > 4 else '')
    raise FormatError(
      f'{source} lacks {shown}; it is not a complete {m.family} masked-LM '
      'checkpoint for its config.json.'
    )
  for entry in entries:
    if entry.name in shapes:
      want = _expected_torch_shape(entry, ours[entry.path][0])
      if shapes[entry.name] != want:
        raise FormatError(
          f'{source}: {entry.name} has shape {shapes[entry.name]} but config.json implies '
          f'{want}; the weights do not match their config.json (or its sizes were edited).'
        )


# Tensors the PyTorch classes hold that carry no trained value here (skipped silently).
_DERIVED = (
  'roformer.encoder.embed_positions.weight',
  'roformer.embeddings.position_ids',
  'cls.predictions.decoder.bias',
)


def from_torch(
  state_dict: dict, config, fill: dict | None = None, source: str = 'the checkpoint'
) -> tuple[dict, dict]:
  """PyTorch-named tensors -> our pure param dict for `config` (the inverse of
  `hf_export.to_torch`).

  Args:
    state_dict: {name: array} (model.safetensors, a torch state dict, or
      `torch_names_from_flax`).
    config: our ConfigDict (`model_fields` applied); the layers come out stacked [L, ...]
      when config.model.scan_layers, else as {i: tree}.
    fill: optional fresh parameters (same layout as the result) for an MLM head the checkpoint
      lacks (a base-model or classification checkpoint); without it a missing head is an error.
    source: the file name, for messages.

  Returns:
    (params, report): params in the dtypes of config.model.param_dtype; report = {'ignored':
    [names not used], 'filled': [our paths taken from `fill`]}.

  Raises:
    FormatError: a tensor with the wrong shape, a missing tensor, or an untied decoder.
  """
  from flax import traverse_util  # pylint: disable=g-import-not-at-top

  m = config.model
  prefix = hf_export.PREFIX[m.family]
  state_dict = _with_prefix(dict(state_dict), prefix)
  shapes = _per_layer_shapes(config)
  word_name = f'{prefix}.embeddings.word_embeddings.weight'
  decoder = state_dict.get('cls.predictions.decoder.weight')
  if (
    decoder is not None
    and word_name in state_dict
    and not np.array_equal(np.asarray(decoder), np.asarray(state_dict[word_name]))
  ):
    raise FormatError(
      f'{source}: cls.predictions.decoder.weight differs from {word_name}; '
      'the MLM decoder is tied to the word embeddings here (untied decoders '
      'are not supported).'
    )
  if 'cls.predictions.bias' not in state_dict and 'cls.predictions.decoder.bias' in state_dict:
    state_dict['cls.predictions.bias'] = state_dict['cls.predictions.decoder.bias']
  flat, rows, used, missing, filled = {}, {}, set(), [], []
  fill_flat = traverse_util.flatten_dict(hf_export.per_layer(fill, m.num_layers)) if fill else {}
  for entry in hf_export.layout(config):
    shape, dtype = shapes[entry.path]
    if entry.name not in state_dict:
      if entry.path[0] == 'head' and entry.path in fill_flat:
        flat[entry.path] = np.asarray(fill_flat[entry.path])
        filled.append('/'.join(map(str, entry.path)))
        continue
      missing.append(entry.name)
      continue
    used.add(entry.name)
    try:
      value = _import_array(state_dict[entry.name], entry, shape)
    except ValueError:
      raise FormatError(
        f'{source}: {entry.name} has shape {tuple(np.shape(state_dict[entry.name]))} but '
        f'config.json implies {_expected_torch_shape(entry, shape)}; the weights do not '
        'match their config.json (or its sizes were edited).'
      ) from None
    value = np.asarray(value, np.float32).astype(dtype)
    if entry.kind == 'row':
      rows.setdefault(entry.path, {})[entry.arg] = value
    else:
      flat[entry.path] = value
  if missing:
    shown = ', '.join(missing[:4]) + (f' and {len(missing) - 4} more' if len(missing) > 4 else '')
    raise FormatError(
      f'{source} lacks {shown}; it is not a complete {m.family} masked-LM '
      'checkpoint for its config.json.'
    )
  for path, by_row in rows.items():
    flat[path] = np.stack([by_row[i] for i in range(len(by_row))])
  tree = traverse_util.unflatten_dict(flat)
  layers = [tree['layers'][i] for i in range(m.num_layers)]
  if m.scan_layers:
    import jax  # pylint: disable=g-import-not-at-top

    tree['layers'] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
  else:
    tree['layers'] = dict(enumerate(layers))
  ignored = sorted(
    k
    for k in state_dict
    if k not in used
    and k not in _DERIVED
    and k != 'cls.predictions.decoder.weight'
    and not (m.type_vocab_size == 0 and 'token_type_embeddings' in k)
  )
  return tree, {'ignored': ignored, 'filled': filled}


def torch_names_from_flax(flax_params: dict) -> dict:
  """A transformers Flax parameter tree (flax_model.msgpack) -> PyTorch names and layout
  (kernel -> weight transposed, LayerNorm scale -> weight, embedding -> weight), the inverse of
  transformers' `convert_pytorch_state_dict_to_flax` for these models."""
  from flax import traverse_util  # pylint: disable=g-import-not-at-top

  flax_params = flax_params.get('params', flax_params)
  out = {}
  for path, value in traverse_util.flatten_dict(flax_params).items():
    *scope, leaf = map(str, path)
    value = np.asarray(value)
    if leaf == 'kernel':
      value = value.T if value.ndim == 2 else value
      leaf = 'weight'
    elif leaf in ('scale', 'embedding'):
      leaf = 'weight'
    out['.'.join(scope + [leaf])] = value
  return out
